"""Atomic writes: complete or absent, never a temp file left behind, the usual file mode."""

import os
import stat

import pytest

from dtop.utils.io import atomic_path, write_json, write_text


def test_atomic_write_leaves_nothing_on_failure_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_written_files_get_the_mode_of_a_plain_open_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        write_text(tmp_path / "atomic.txt", "x")
        mode = stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode)
        assert mode == stat.S_IMODE(plain.stat().st_mode) == 0o644
    finally:
        os.umask(old)
    assert write_json(tmp_path / "n.json", {"v": float("nan")}) is None
    assert (tmp_path / "n.json").read_text() == '{\n  "v": null\n}\n'
