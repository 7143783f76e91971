"""File names in messages and text files: shown on one line, stored losslessly.

POSIX file names are bytes: Python decodes the bytes that are not UTF-8 as lone surrogates
(``surrogateescape``), and a name may hold a line break. :func:`show_path` writes such a name on
one printable line; :func:`encode_line` / :func:`decode_line` store any name as one line of a text
file and read it back unchanged.
"""

from __future__ import annotations

import json
import os

#: Starts a line of :func:`encode_line` that holds a JSON string (a name with a line break); a
#: POSIX file name never contains a NUL byte, so no name stored plainly starts with it.
ESCAPED_LINE = b"\0"


def needs_escape(name: str) -> bool:
    """Whether ``name`` holds a character that would not print as itself on one line."""
    return not name.isprintable()


def show_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """``path`` as printable text on one line: as is when it is, else quoted with backslash escapes.

    Bytes that are not UTF-8 show as ``\\xff``, control characters as ``\\n``, ``\\t`` or ``\\x1b``;
    the result always encodes as UTF-8.
    """
    name = os.fsdecode(path)
    if not needs_escape(name):
        return name
    try:
        raw = os.fsencode(name)
    except UnicodeEncodeError:  # a surrogate that no file name decodes to
        raw = name.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return "'" + escaped.replace("'", "\\'") + "'"


def encode_line(name: str) -> bytes:
    """``name`` as the bytes of one line of a text file (without the newline), losslessly.

    A name is stored as its file-system bytes (UTF-8 for every name that is valid UTF-8); a name
    with a line break (or a string no file name can be, e.g. with a NUL) as :data:`ESCAPED_LINE` and a
    JSON string.
    """
    if not any(c in name for c in "\n\r\0"):
        try:
            return os.fsencode(name)
        except UnicodeEncodeError:
            pass
    return ESCAPED_LINE + json.dumps(name).encode("ascii")


def decode_line(line: bytes) -> str:
    """The name stored by :func:`encode_line`."""
    if line.startswith(ESCAPED_LINE):
        return str(json.loads(line[len(ESCAPED_LINE):].decode("ascii")))
    return os.fsdecode(line)
