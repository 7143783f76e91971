"""Ground-truth loading: the real files, the restricted unpickler, JSON, validation."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from dtop.data.gnd import PROTOCOLS, GroundTruth, load_gnd
from dtop.errors import DataError, DtopError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "revisitop"
if not DATA.is_dir():
    DATA = Path("/work/shared/data/revisitop")
ROXF = DATA / "gnd_roxford5k.pkl"
RPAR = DATA / "gnd_rparis6k.pkl"
needs_data = pytest.mark.skipif(not ROXF.is_file(), reason="real revisitop ground truth not available")


def _tiny() -> dict:
    return {
        "imlist": ["a", "b", "c", "d", "e"],
        "qimlist": ["q0", "q1"],
        "gnd": [
            {"bbx": [1, 2.5, 30, 40], "easy": [3, 0], "hard": [1], "junk": [4]},
            {"bbx": [0.0, 0.0, 5.0, 5.0], "easy": [], "hard": [2, 4], "junk": []},
        ],
    }


def _write_pickle(tmp_path: Path, obj: object, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    path = tmp_path / "gnd_test.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


# ------------------------------------------------------------------------------ the real files


@needs_data
@pytest.mark.parametrize(
    ("path", "name", "n_db", "totals"),
    [
        # totals: number of (easy, hard, junk) entries over the 70 queries of the official files
        (ROXF, "roxford5k", 4993, (3029, 2497, 1356)),
        (RPAR, "rparis6k", 6322, (6874, 10350, 7153)),
    ],
)
def test_real_files_load(path: Path, name: str, n_db: int, totals: tuple[int, int, int]) -> None:
    gnd = load_gnd(path)
    assert gnd.name == name
    assert gnd.n_database == len(gnd.imlist) == n_db
    assert gnd.n_queries == len(gnd.qimlist) == len(gnd.gnd) == 70
    got = tuple(sum(len(q[k]) for q in gnd.gnd) for k in ("easy", "hard", "junk"))
    assert got == totals
    for q in gnd.gnd:
        assert len(q["bbx"]) == 4 and all(isinstance(v, float) for v in q["bbx"])
        assert q["bbx"][0] <= q["bbx"][2] and q["bbx"][1] <= q["bbx"][3]
    assert gnd.qimlist[0] == "all_souls_000013" if name == "roxford5k" else gnd.qimlist[0] == "paris_defense_000605"


@needs_data
def test_real_file_matches_plain_unpickling() -> None:
    gnd = load_gnd(ROXF)
    with open(ROXF, "rb") as fh:  # the trusted official file, for comparison only
        raw = pickle.load(fh)
    assert gnd.imlist == raw["imlist"] and gnd.qimlist == raw["qimlist"]
    for ours, theirs in zip(gnd.gnd, raw["gnd"], strict=True):
        for key in ("easy", "hard", "junk"):
            assert ours[key] == sorted(theirs[key])
        assert ours["bbx"] == [float(v) for v in theirs["bbx"]]


@needs_data
def test_protocols_on_real_file() -> None:
    gnd = load_gnd(ROXF)
    easy, medium, hard = (gnd.protocol(p) for p in PROTOCOLS)
    for q, e, m, h in zip(gnd.gnd, easy, medium, hard, strict=True):
        assert e.positives.tolist() == sorted(q["easy"])
        assert e.junk.tolist() == sorted(q["junk"] + q["hard"])
        assert m.positives.tolist() == sorted(q["easy"] + q["hard"])
        assert m.junk.tolist() == sorted(q["junk"])
        assert h.positives.tolist() == sorted(q["hard"])
        assert h.junk.tolist() == sorted(q["junk"] + q["easy"])
        for pr in (e, m, h):
            assert pr.positives.dtype == np.int64
            assert not set(pr.positives.tolist()) & set(pr.junk.tolist())
    # ROxford: two queries have no easy positive, every query has a hard one
    assert sum(len(e.positives) == 0 for e in easy) == 2
    assert all(len(h.positives) > 0 for h in hard)
    assert sum(len(m.positives) for m in medium) == 3029 + 2497


def test_protocol_unknown_name() -> None:
    gnd = GroundTruth.from_dict(_tiny())
    with pytest.raises(DataError, match="unknown protocol 'extreme'"):
        gnd.protocol("extreme")
    assert gnd.protocol("Medium")[0].positives.tolist() == [0, 1, 3]


# ------------------------------------------------------------------------- restricted unpickler


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_is_refused_without_running_code(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    obj = _tiny()
    obj["gnd"][0]["bbx"] = _Evil(marker)
    path = _write_pickle(tmp_path, obj, protocol)
    assert b"system" in path.read_bytes()
    with pytest.raises(DataError, match=r"global '(posix|os|nt)\.system'.*could run code"):
        load_gnd(path)
    assert not marker.exists()


def test_pickle_with_numpy_or_builtins_globals_is_refused(tmp_path: Path) -> None:
    obj = _tiny()
    obj["gnd"][0]["easy"] = np.array([0, 3])  # numpy arrays need numpy globals: not in official files
    with pytest.raises(DataError, match="numpy"):
        load_gnd(_write_pickle(tmp_path, obj))
    # protocol 2 pickles a set through the global builtins.set: refused too (official files have none)
    obj = _tiny()
    obj["gnd"][0]["easy"] = {0, 3}
    with pytest.raises(DataError, match=r"global .(__builtin__|builtins)\.set."):
        load_gnd(_write_pickle(tmp_path, obj, protocol=2))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_data_pickles_load(tmp_path: Path, protocol: int) -> None:
    gnd = load_gnd(_write_pickle(tmp_path, _tiny(), protocol))
    assert gnd.name == "test"
    assert gnd.gnd[0] == {"bbx": [1.0, 2.5, 30.0, 40.0], "easy": [0, 3], "hard": [1], "junk": [4]}


def test_corrupt_pickle(tmp_path: Path) -> None:
    data = pickle.dumps(_tiny())
    path = tmp_path / "gnd_cut.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable ground-truth pickle"):
        load_gnd(path)
    path.write_bytes(b"")
    with pytest.raises(DataError, match="not a readable ground-truth pickle"):
        load_gnd(path)


# ---------------------------------------------------------------------------------------- JSON


@needs_data
def test_json_round_trip(tmp_path: Path) -> None:
    gnd = load_gnd(RPAR)
    out = tmp_path / "sub" / "gnd_rparis6k.json"
    gnd.save_json(out)
    assert json.loads(out.read_text())["name"] == "rparis6k"
    back = load_gnd(out)
    assert back == gnd  # dataclass equality: imlist, qimlist, gnd, name
    assert [p.positives.tolist() for p in back.protocol("hard")] == [p.positives.tolist() for p in gnd.protocol("hard")]
    assert not list(out.parent.glob(".*.tmp"))  # the atomic write left no temporary file


def test_json_null_bbx_and_name_from_file(tmp_path: Path) -> None:
    obj = _tiny()
    obj["gnd"][1]["bbx"] = None
    path = tmp_path / "gnd_mine.json"
    path.write_text(json.dumps(obj))
    gnd = load_gnd(path)
    assert gnd.name == "mine" and gnd.gnd[1]["bbx"] is None


def test_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "g.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_gnd(path)
    path2 = tmp_path / "g.pkl"
    path2.write_text(json.dumps(_tiny()))
    with pytest.raises(DataError, match="rename it to"):
        load_gnd(path2)


# ---------------------------------------------------------------------------------- validation


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="ground-truth file not found"):
        load_gnd(tmp_path / "gnd_nothing.pkl")


def _mutate(fn) -> dict:  # type: ignore[no-untyped-def]
    obj = _tiny()
    fn(obj)
    return obj


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda o: o["gnd"][0].__setitem__("easy", [0, 5]), r"index 5, outside imlist \(valid: 0..4\)"),
        (lambda o: o["gnd"][0].__setitem__("junk", [-1]), "index -1, outside imlist"),
        (lambda o: o["gnd"][0].pop("bbx"), r"lacks \['bbx'\]"),
        (lambda o: o["gnd"].pop(), "'gnd' has 1 entries but 'qimlist' has 2"),
        (lambda o: o["gnd"][0].__setitem__("bbx", [1, 2, 3]), r"\[x1, y1, x2, y2\]"),
        (lambda o: o["gnd"][0].__setitem__("bbx", [10, 0, 5, 5]), "x1 <= x2"),
        (lambda o: o["gnd"][0].__setitem__("hard", [3]), "'easy' and 'hard' share database indices"),
        (lambda o: o["gnd"][0].__setitem__("easy", [0, 0]), "more than once"),
        (lambda o: o["gnd"][0].__setitem__("easy", [0.5]), "must hold integers"),
        (lambda o: o["gnd"].__setitem__(1, [1, 2]), "must be a dict"),
        (lambda o: o.__setitem__("imlist", []), "'imlist' is empty"),
        (lambda o: o.__setitem__("imlist", "abcde"), "list of image names"),
        (lambda o: o.pop("qimlist"), "missing keys"),
    ],
)
def test_invalid_structure(mutation, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match=message) as info:
        GroundTruth.from_dict(_mutate(mutation), source="gnd_x.pkl")
    assert isinstance(info.value, DtopError)
    assert "gnd_x.pkl" in str(info.value) or "imlist" in str(info.value)


def test_invalid_structure_reported_from_file(tmp_path: Path) -> None:
    path = _write_pickle(tmp_path, _mutate(lambda o: o["gnd"][1].__setitem__("hard", [9])))
    with pytest.raises(DataError, match=r"gnd_test\.pkl: invalid ground truth: gnd\[1\] \(query 'q1'\)"):
        load_gnd(path)
    path = _write_pickle(tmp_path, [1, 2, 3])
    with pytest.raises(DataError, match="expected a dict"):
        load_gnd(path)
