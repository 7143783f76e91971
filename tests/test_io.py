"""Atomic writes: complete or absent, never a temp file left behind, the usual file mode; safe unpickling."""

import os
import pickle
import stat

import numpy as np
import pytest

from dtop.errors import DataError
from dtop.utils.io import NUMPY_ARRAY_GLOBALS, atomic_path, safe_unpickle, write_json, write_text


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


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_unpickle_refuses_a_forbidden_global_before_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"a": [1, _RunsCode(marker)]}))
    for allowed in (frozenset(), NUMPY_ARRAY_GLOBALS):  # numpy arrays admitted: still no os.system
        with pytest.raises(DataError, match=r"global '(posix|os|nt)\.system'.*refused because unpickling it could run"):
            safe_unpickle(path, allowed=allowed)
    assert not marker.exists()


def test_safe_unpickle_loads_plain_data_and_admitted_numpy(tmp_path):
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps({"ids": ["a", "b"], "n": 2}))
    assert safe_unpickle(path) == {"ids": ["a", "b"], "n": 2}
    path.write_bytes(pickle.dumps({"x": np.arange(3)}))
    with pytest.raises(DataError, match="numpy"):
        safe_unpickle(path)
    assert safe_unpickle(path, allowed=NUMPY_ARRAY_GLOBALS)["x"].tolist() == [0, 1, 2]
    path.write_bytes(b"")
    with pytest.raises(DataError, match="not a readable test pickle.*fetch it again"):
        safe_unpickle(path, kind="test pickle", hint="fetch it again")
