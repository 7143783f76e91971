"""Ground truth of the revisited benchmarks (ROxford5k, RParis6k): loading, validation, protocols.

The official ``gnd_<dataset>.pkl`` files are read with an unpickler that admits no global at all
(:func:`dtop.utils.io.safe_unpickle`); the same content is accepted as JSON. See ``docs/data.md``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dtop.errors import DataError
from dtop.utils.io import MAX_PICKLE_BYTES, safe_unpickle, write_json

PROTOCOLS: tuple[str, ...] = ("easy", "medium", "hard")
#: The k of mP@k reported by default (the reference code's kappas).
DEFAULT_KAPPAS: tuple[int, ...] = (1, 5, 10)
"""The three protocols of the revisited benchmarks, in reporting order."""

_INDEX_KEYS: tuple[str, ...] = ("easy", "hard", "junk")


class QueryTruth(NamedTuple):
    """Ground truth of one query under one protocol: sorted unique database indices."""

    positives: np.ndarray
    junk: np.ndarray


def _fail(source: str, what: str) -> DataError:
    return DataError(f"{source}: invalid ground truth: {what}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _is_number(x: Any) -> bool:
    return (isinstance(x, int | float | np.integer | np.floating)) and not isinstance(x, bool | np.bool_)


def _name_list(value: Any, key: str, source: str) -> list[str]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise _fail(source, f"'{key}' must be a list of image names, got {type(value).__name__}")
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise _fail(source, f"'{key}'[{i}] must be a string (an image name), got {type(v).__name__}")
        out.append(str(v))
    return out


def _index_list(value: Any, where: str, n_db: int, source: str) -> list[int]:
    if isinstance(value, np.ndarray):
        value = value.reshape(-1).tolist() if value.ndim <= 1 else value
    if isinstance(value, str | bytes | dict) or not isinstance(value, Sequence | set | frozenset):
        raise _fail(source, f"{where} must be a list of database indices, got {type(value).__name__}")
    if isinstance(value, set | frozenset):
        value = sorted(value)
    out: list[int] = []
    for v in value:
        if not _is_int(v):
            raise _fail(source, f"{where} must hold integers (indices into imlist), found {v!r}")
        v = int(v)
        if not 0 <= v < n_db:
            raise _fail(
                source,
                f"{where} holds index {v}, outside imlist (valid: 0..{n_db - 1}); the file does "
                "not match its own imlist, or the indices are 1-based (subtract 1)",
            )
        out.append(v)
    if len(set(out)) != len(out):
        dup = sorted({v for v in out if out.count(v) > 1})[:5]
        raise _fail(source, f"{where} lists the same database index more than once: {dup}")
    return out


def _bbx(value: Any, where: str, source: str) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = value.reshape(-1).tolist()
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != 4:
        raise _fail(source, f"{where} must be [x1, y1, x2, y2] (4 numbers) or null, got {value!r}")
    if not all(_is_number(v) and math.isfinite(float(v)) for v in value):
        raise _fail(source, f"{where} must hold 4 finite numbers, got {value!r}")
    x1, y1, x2, y2 = (float(v) for v in value)
    if x2 < x1 or y2 < y1:
        raise _fail(source, f"{where} = {value!r} is not [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2")
    return [x1, y1, x2, y2]


@dataclass
class GroundTruth:
    """Ground truth of a revisited benchmark; validated on construction.

    ``gnd[i]`` is the ground truth of query ``qimlist[i]``: ``bbx`` (``[x1, y1, x2, y2]`` floats, or
    None when the query is not cropped) and sorted index lists ``easy``, ``hard``, ``junk`` into
    ``imlist``. The three index lists of a query are disjoint.
    """

    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]
    name: str = ""
    source: str = field(default="<memory>", repr=False, compare=False)

    def __post_init__(self) -> None:
        src = self.source
        self.imlist = _name_list(self.imlist, "imlist", src)
        self.qimlist = _name_list(self.qimlist, "qimlist", src)
        if not self.imlist:
            raise _fail(src, "'imlist' is empty: a benchmark needs database images")
        if isinstance(self.gnd, dict | str) or not isinstance(self.gnd, Sequence):
            raise _fail(src, f"'gnd' must be a list with one dict per query, got {type(self.gnd).__name__}")
        if len(self.gnd) != len(self.qimlist):
            raise _fail(
                src,
                f"'gnd' has {len(self.gnd)} entries but 'qimlist' has {len(self.qimlist)} queries; "
                "there must be one ground-truth dict per query",
            )
        n_db = len(self.imlist)
        clean: list[dict[str, Any]] = []
        for i, q in enumerate(self.gnd):
            where = f"gnd[{i}] (query '{self.qimlist[i]}')"
            if not isinstance(q, dict):
                raise _fail(src, f"{where} must be a dict, got {type(q).__name__}")
            missing = [k for k in ("bbx", *_INDEX_KEYS) if k not in q]
            if missing:
                raise _fail(
                    src,
                    f"{where} lacks {missing}; each query needs 'bbx', 'easy', 'hard' and 'junk' "
                    "(old-style files with 'ok' are not revisited ground truth)",
                )
            entry: dict[str, Any] = {"bbx": _bbx(q["bbx"], f"{where}['bbx']", src)}
            for key in _INDEX_KEYS:
                entry[key] = sorted(_index_list(q[key], f"{where}['{key}']", n_db, src))
            for a, b in (("easy", "hard"), ("easy", "junk"), ("hard", "junk")):
                both = sorted(set(entry[a]) & set(entry[b]))
                if both:
                    raise _fail(
                        src,
                        f"{where}: '{a}' and '{b}' share database indices {both[:5]}; they must be disjoint",
                    )
            clean.append(entry)
        self.gnd = clean
        self.name = str(self.name or "")

    @property
    def n_database(self) -> int:
        """Number of database images (``len(imlist)``)."""
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        """Number of queries (``len(qimlist)``)."""
        return len(self.qimlist)

    def protocol(self, name: str) -> list[QueryTruth]:
        """Per-query ``(positives, junk)`` int64 arrays under protocol ``easy``, ``medium`` or ``hard``.

        Easy: positives = easy, junk = junk ∪ hard. Medium: positives = easy ∪ hard, junk = junk.
        Hard: positives = hard, junk = junk ∪ easy. Arrays are sorted and unique.
        """
        key = str(name).lower()
        if key not in PROTOCOLS:
            raise DataError(f"unknown protocol '{name}'; choose one of {', '.join(PROTOCOLS)}")
        pos_keys, junk_keys = {
            "easy": (("easy",), ("junk", "hard")),
            "medium": (("easy", "hard"), ("junk",)),
            "hard": (("hard",), ("junk", "easy")),
        }[key]
        out = []
        for q in self.gnd:
            pos = np.sort(np.concatenate([np.asarray(q[k], dtype=np.int64) for k in pos_keys]))
            junk = np.sort(np.concatenate([np.asarray(q[k], dtype=np.int64) for k in junk_keys]))
            out.append(QueryTruth(pos, junk))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (the official pickle layout plus ``name``)."""
        return {
            "name": self.name,
            "imlist": list(self.imlist),
            "qimlist": list(self.qimlist),
            "gnd": [{k: (list(v) if v is not None else None) for k, v in q.items()} for q in self.gnd],
        }

    def save_json(self, path: str | os.PathLike) -> None:
        """Write the ground truth as JSON (atomically); :func:`load_gnd` reads it back."""
        write_json(path, self.to_dict(), indent=None)

    @classmethod
    def from_dict(cls, obj: Any, name: str = "", source: str = "<memory>") -> GroundTruth:
        """Build from the official dict layout (``imlist``, ``qimlist``, ``gnd``, optional ``name``)."""
        if not isinstance(obj, dict):
            raise _fail(source, f"expected a dict with 'imlist', 'qimlist' and 'gnd', got {type(obj).__name__}")
        missing = [k for k in ("imlist", "qimlist", "gnd") if k not in obj]
        if missing:
            raise _fail(source, f"missing keys {missing}; a ground-truth dict has 'imlist', 'qimlist', 'gnd'")
        return cls(
            imlist=obj["imlist"],
            qimlist=obj["qimlist"],
            gnd=obj["gnd"],
            name=str(obj.get("name") or name),
            source=source,
        )


def _default_name(path: Path) -> str:
    stem = path.name
    for suffix in (".json", ".pkl", ".pickle"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem[4:] if stem.startswith("gnd_") else stem


def load_gnd(path: str | os.PathLike) -> GroundTruth:
    """Load and validate a ground-truth file: the official pickle (safely) or its JSON form.

    The format is chosen by the suffix: ``.json`` is JSON, anything else is a pickle read with an
    unpickler that refuses every global reference. The benchmark name defaults to the file name
    without ``gnd_`` and the suffix (``gnd_roxford5k.pkl`` → ``roxford5k``).
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise DataError(
            f"ground-truth file not found: {path}. Download gnd_<dataset>.pkl "
            "(e.g. http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl) "
            "or fix the path."
        )
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise DataError(f"{path}: {size} bytes is far too large for a ground-truth file; wrong file?")
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: not valid JSON ({err}); write it with GroundTruth.save_json") from err
    else:
        with open(path, "rb") as f:
            head = f.read(4096)
        if head.lstrip()[:1] in (b"{", b"["):
            raise DataError(f"{path}: looks like JSON but is not named .json; rename it to *.json")
        # The official files use only the opcodes of dicts, lists, str, int and float: no global at all.
        obj = safe_unpickle(
            path,
            kind="ground-truth pickle",
            holds="dicts, lists, strings and numbers",
            hint="Download the official gnd_<dataset>.pkl again (http://cmp.felk.cvut.cz/revisitop/) or "
            "convert your ground truth to JSON (GroundTruth.save_json).",
        )
    return GroundTruth.from_dict(obj, name=_default_name(path), source=source)
