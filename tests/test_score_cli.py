"""`dtop score` end to end through dtop.cli.main.main."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dtop.cli.main import main
from dtop.data.gnd import GroundTruth, load_gnd
from dtop.retrieval.metrics import evaluate

GND = Path("/work/shared/data/revisitop/gnd_roxford5k.pkl")
if not GND.is_file():
    GND = Path(__file__).resolve().parents[2] / "shared" / "data" / "revisitop" / "gnd_roxford5k.pkl"
pytestmark = pytest.mark.skipif(not GND.is_file(), reason="real revisitop ground truth not available")


@pytest.fixture(scope="module")
def gnd() -> GroundTruth:
    return load_gnd(GND)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, gnd: GroundTruth) -> dict[str, Path]:
    """Descriptors where each query resembles its easy/hard images, plus distractors and ranks."""
    root = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    dim = 32

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    q = unit(rng.standard_normal((gnd.n_queries, dim)))
    x = rng.standard_normal((gnd.n_database, dim))
    for i, g in enumerate(gnd.gnd):
        x[g["easy"]] += 3 * q[i]
        x[g["hard"]] += 1 * q[i]
    x = unit(x)
    d = unit(rng.standard_normal((3000, dim)))
    paths = {"q": root / "q.npy", "x": root / "x.npy", "d": root / "d.npy", "ranks": root / "ranks.npy"}
    np.save(paths["q"], q)
    np.save(paths["x"], x)
    np.save(paths["d"], d)
    scores = q @ np.concatenate([x, d]).T
    np.save(paths["ranks"], np.argsort(-scores, axis=1, kind="stable").T.copy())
    paths["root"] = root
    return paths


def _score(*args: str | Path) -> list[str]:
    return ["score", "--gnd", str(GND), *map(str, args)]


def test_ranks_end_to_end(files: dict, gnd: GroundTruth, capsys: pytest.CaptureFixture) -> None:
    out_json = files["root"] / "out" / "ranks.json"
    assert main(_score("--ranks", files["ranks"], "--json", out_json)) == 0
    text = capsys.readouterr().out
    assert text.startswith("roxford5k: 70 queries, ranks 7,993 per query")
    header = next(line for line in text.splitlines() if line.startswith("protocol"))
    assert header.split() == ["protocol", "mAP", "mP@1", "mP@5", "mP@10"]
    expected = evaluate(np.load(files["ranks"]), gnd)
    rows = {
        line.split()[0]: line.split()[1:]
        for line in text.splitlines()
        if line.split()[:1] in (["Easy"], ["Medium"], ["Hard"])
    }
    assert rows["Medium"][0] == f"{100 * expected['medium']['map']:.2f}"
    assert rows["Hard"][3] == f"{100 * expected['hard']['mp']['10']:.2f}"
    saved = json.loads(out_json.read_text())
    assert list(saved) == ["easy", "medium", "hard"]
    assert saved["medium"] == expected["medium"]
    assert saved["easy"]["aps"].count(None) == 2  # NaN written as null
    assert list(saved["hard"]["mp"]) == ["1", "5", "10"]


def test_descriptors_equal_ranks(files: dict, capsys: pytest.CaptureFixture) -> None:
    a, b = files["root"] / "a.json", files["root"] / "b.json"
    assert main(_score("--ranks", files["ranks"], "--json", a, "--kappas", "1", "3")) == 0
    args = ("--queries", files["q"], "--database", files["x"], "--distractors", files["d"])
    assert main(_score(*args, "--json", b, "--kappas", "1", "3", "--chunk-size", "1000")) == 0
    out = capsys.readouterr().out
    assert "3,000 distractors" in out and "mP@3" in out
    assert json.loads(a.read_text()) == json.loads(b.read_text())
    # the trivially perfect case: the database itself as queries' nearest neighbours
    assert main(_score("--queries", files["q"], "--database", files["x"])) == 0
    assert "Medium" in capsys.readouterr().out


def test_truncated_ranks(files: dict, gnd: GroundTruth, capsys: pytest.CaptureFixture) -> None:
    path = files["root"] / "top100.npy"
    np.save(path, np.load(files["ranks"])[:100])
    out_json = files["root"] / "top100.json"
    assert main(_score("--ranks", path, "--json", out_json)) == 0
    assert "ranks 100 per query" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["hard"] == evaluate(np.load(path), gnd)["hard"]


def _error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_errors(files: dict, capsys: pytest.CaptureFixture) -> None:
    root = files["root"]
    ranks = np.load(files["ranks"])
    assert "ranks file not found" in _error(_score("--ranks", root / "nope.npy"), capsys)
    assert "ground-truth file not found" in _error(["score", "--gnd", str(root / "g.pkl"), "--ranks", "x"], capsys)
    np.save(root / "t.npy", ranks.T[:, :500].copy())
    assert "looks transposed" in _error(_score("--ranks", root / "t.npy"), capsys)
    np.save(root / "f.npy", ranks[:50].astype(np.float32))
    assert "integer database indices" in _error(_score("--ranks", root / "f.npy"), capsys)
    neg = ranks[:50].copy()
    neg[3, 7] = -1
    np.save(root / "neg.npy", neg)
    assert "negative index -1" in _error(_score("--ranks", root / "neg.npy"), capsys)
    dup = ranks[:50].copy()
    dup[9, 4] = dup[2, 4]
    np.save(root / "dup.npy", dup)
    err = _error(_score("--ranks", root / "dup.npy"), capsys)
    assert f"query 4 contains image {dup[2, 4]} 2 times" in err
    (root / "text.npy").write_text("hello")
    assert "cannot read ranks as a .npy array" in _error(_score("--ranks", root / "text.npy"), capsys)
    assert "not both" in _error(_score("--ranks", files["ranks"], "--queries", files["q"]), capsys)
    assert "nothing to score" in _error(_score(), capsys)
    assert "--queries needs --database" in _error(_score("--queries", files["q"]), capsys)
    assert "--kappas must be positive" in _error(_score("--ranks", files["ranks"], "--kappas", "0"), capsys)


def test_descriptor_errors(files: dict, capsys: pytest.CaptureFixture) -> None:
    root = files["root"]
    x = np.load(files["x"])
    np.save(root / "x_short.npy", x[:-1])
    err = _error(_score("--queries", files["q"], "--database", root / "x_short.npy"), capsys)
    assert "has 4992 rows but the ground truth needs 4993" in err
    np.save(root / "x_raw.npy", x * 2)
    err = _error(_score("--queries", files["q"], "--database", root / "x_raw.npy"), capsys)
    assert "row 0 has L2 norm 2" in err and "L2-normalise" in err
    np.save(root / "d_dim.npy", np.load(files["d"])[:, :16])
    args = ("--queries", files["q"], "--database", files["x"], "--distractors", root / "d_dim.npy")
    assert "dimension 16 but the queries have 32" in _error(_score(*args), capsys)
    nan = x.copy()
    nan[17, 3] = np.nan
    np.save(root / "x_nan.npy", nan)
    assert "row 17 contains NaN" in _error(_score("--queries", files["q"], "--database", root / "x_nan.npy"), capsys)


def test_large_unsigned_ranks_and_empty_ground_truth(
    files: dict, gnd: GroundTruth, capsys: pytest.CaptureFixture
) -> None:
    root = files["root"]
    ranks = np.load(files["ranks"])[:50].copy()
    expected = evaluate(ranks, gnd)
    far = ranks.copy()
    far[0] = 10**12 + np.arange(ranks.shape[1])  # far distractors on top: no bincount up to 10^12
    np.save(root / "far.npy", far.astype(np.uint64))
    out_json = root / "far.json"
    assert main(_score("--ranks", root / "far.npy", "--json", out_json)) == 0
    assert "indices up to 1,000,000,000,069" in capsys.readouterr().out
    near = ranks.copy()
    near[0] = gnd.n_database + 10_000 + np.arange(ranks.shape[1])  # the same, as nearer distractors
    assert json.loads(out_json.read_text())["medium"] == evaluate(near, gnd)["medium"] != expected["medium"]
    dup = far.copy()
    dup[7, 3] = dup[0, 3]
    np.save(root / "far_dup.npy", dup)
    assert "query 3 contains image 1000000000003 2 times" in _error(_score("--ranks", root / "far_dup.npy"), capsys)
    wrapped = ranks.astype(np.uint64)
    wrapped[5, 2] = np.uint64(2**64 - 1)  # -1 stored as unsigned
    np.save(root / "wrapped.npy", wrapped)
    err = _error(_score("--ranks", root / "wrapped.npy"), capsys)
    assert "18446744073709551615 (>= 2^63)" in err and "Traceback" not in err
    GroundTruth(["a", "b"], [], [], "empty").save_json(root / "empty.json")
    np.save(root / "r0.npy", np.zeros((2, 0), dtype=np.int64))
    err = _error(["score", "--gnd", str(root / "empty.json"), "--ranks", str(root / "r0.npy")], capsys)
    assert "the ground truth has no queries" in err


def test_help_lists_score(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    out = capsys.readouterr().out
    assert "--ranks" in out and "--distractors" in out and "revisited" in out
