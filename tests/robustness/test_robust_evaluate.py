"""`dtop evaluate --skip-bad` with unreadable queries and database images (defect 2): counted, named,
and scored by the stated rule instead of silently as zero descriptors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dtop.data.revisited import RevisitedDataset
from dtop.engine.evaluate import UNREADABLE_RULE
from dtop.engine.extract import extract_with_failures
from dtop.engine.settings import ExtractSettings
from dtop.retrieval.metrics import evaluate
from test_evaluate import make_benchmark  # the small generated benchmark of the evaluation tests

from .hostile import TRIED, run_dtop

ARGS = ["--image-size", "64", "--scales", "1.0", "--workers", "0", "--no-progress", "--batch-size", "4"]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):  # type: ignore[no-untyped-def]
    """The benchmark with query q1 empty, a positive of q0 and a distractor truncated."""
    root = tmp_path_factory.mktemp("bench")
    folder = make_benchmark(root)
    (folder / "jpg" / "q1.jpg").write_bytes(b"")
    for name in ("db0_0.jpg", "distractor2.jpg"):
        path = folder / "jpg" / name
        path.write_bytes(path.read_bytes()[:200])
    TRIED["unreadable benchmark images"] += 3
    return root


def expected_results(root, missing_q: set[int], missing_db: set[int]) -> dict:  # type: ignore[no-untyped-def]
    """The rule, computed independently: full rankings with unreadable database images last, the
    reference `evaluate`, then AP 0 for unreadable queries that have positives."""
    torch.manual_seed(0)
    from dtop.models import build_model

    model = build_model("dtop_tiny")
    ds = RevisitedDataset(root, "mini")
    settings = ExtractSettings(image_size=64, scales=[1.0])
    q, _ = extract_with_failures(model, ds.query_paths, bbxs=ds.query_bbxs, settings=settings)
    x, _ = extract_with_failures(model, ds.database_paths, settings=settings)
    scores = (q @ x.T).numpy()
    scores[:, sorted(missing_db)] = -np.inf
    ranks = np.argsort(-scores, axis=1, kind="stable").T
    res = evaluate(ranks, ds.gnd)
    for name, protocol in res.items():
        aps = protocol["aps"]
        truth = ds.gnd.protocol(name)
        for i in missing_q:
            if truth[i][0].size:
                aps[i] = 0.0
        scored = [a for a in aps if a is not None]
        protocol["map"] = sum(scored) / len(scored)
    return res


def test_scoring_rule_on_synthetic_descriptors():
    """Unit check of the rule: an unreadable database positive is ranked after every readable image, an
    unreadable query's AP is 0 and its P@k 0, every other query scores as before."""
    from dtop.data.gnd import GroundTruth
    from dtop.engine.evaluate import _score_without, _unreadable_queries_score_zero, _without_queries
    from dtop.retrieval.metrics import score_and_search
    from dtop.retrieval.store import Failure

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    q = torch.nn.functional.normalize(x[[0, 10, 20]] + 0.3 * torch.randn(3, 8, generator=g), dim=1)
    gnd = GroundTruth([f"d{i}" for i in range(40)], ["a", "b", "c"], [
        {"bbx": None, "easy": [0, 1], "hard": [2], "junk": [3]},
        {"bbx": None, "easy": [10, 11], "hard": [], "junk": []},
        {"bbx": None, "easy": [20], "hard": [21, 22], "junk": []},
    ])
    plain, _ = score_and_search(q, [x], gnd, topk=40)
    missing_db = np.array([1, 30])
    got, indices = _score_without(q, [x], _without_queries(gnd, [Failure(1, "b", "empty")]), 40, missing_db)
    got = _unreadable_queries_score_zero(got, gnd, [Failure(1, "b", "empty")])
    scores = (q @ x.T).numpy()
    scores[:, missing_db] = -np.inf
    ref = evaluate(np.argsort(-scores, axis=1, kind="stable").T, gnd)
    for name in ("easy", "medium", "hard"):
        aps = got[name]["aps"]
        assert aps[0] == pytest.approx(ref[name]["aps"][0]) and aps[2] == pytest.approx(ref[name]["aps"][2])
        assert aps[1] == (0.0 if name != "hard" else None)  # query b has no hard positive: unscored there
        assert got[name]["map"] == pytest.approx(np.mean([a for a in aps if a is not None]))
    from dtop.retrieval.metrics import compute_map

    ranks = np.argsort(-scores, axis=1, kind="stable").T
    for name in ("easy", "medium"):
        _, aps_ref, _, prs = compute_map(ranks, gnd.protocol(name), [1, 5])
        prs[1] = 0.0  # the unreadable query
        assert [got[name]["mp"][k] for k in ("1", "5")] == pytest.approx(prs.mean(axis=0).tolist())
    assert set(indices[:, :38].ravel().tolist()).isdisjoint({1, 30})  # never retrieved before the readable
    assert plain["medium"]["aps"][0] != got["medium"]["aps"][0]  # db 1 (a positive of query a) is lost


@pytest.mark.slow
def test_unreadable_images_are_counted_named_and_scored_by_the_rule(damaged, tmp_path):
    out = tmp_path / "eval"
    result = run_dtop("evaluate", "--model", "dtop_tiny", "--dataset", "mini", "--data-root", damaged,
                      "--out", out, "--skip-bad", *ARGS)
    assert result.code == 0, result.err
    entry = json.loads((out / "results.json").read_text())["models"][0]
    unreadable = entry["unreadable"]
    assert unreadable["rule"] == UNREADABLE_RULE
    assert unreadable["queries"]["count"] == 1 and unreadable["queries"]["images"][0]["path"].endswith("q1.jpg")
    assert "empty file" in unreadable["queries"]["images"][0]["reason"]
    assert unreadable["database"]["count"] == 2
    assert {p["path"].rsplit("/", 1)[-1] for p in unreadable["database"]["images"]} == {"db0_0.jpg",
                                                                                         "distractor2.jpg"}
    ds = RevisitedDataset(damaged, "mini")
    missing_db = {ds.gnd.imlist.index("db0_0"), ds.gnd.imlist.index("distractor2")}
    expected = expected_results(damaged, {1}, missing_db)
    got = entry["results"]["mini"]
    for name in ("easy", "medium", "hard"):
        assert got[name]["map"] == pytest.approx(expected[name]["map"], abs=1e-6), name
        assert got[name]["aps"][1] in (0.0, None)
    ranks = np.load(out / entry["ranks"]["mini"])
    assert not set(ranks[: len(ds.gnd.imlist) - len(missing_db)].ravel()) & missing_db  # never retrieved
    assert "1 query, 2 database images unreadable" in result.out and "AP 0" in result.out
    assert "1 query, 2 database images unreadable" in (out / "results.txt").read_text()


def test_without_skip_bad_the_unreadable_images_are_an_error(damaged, tmp_path):
    result = run_dtop("evaluate", "--model", "dtop_tiny", "--dataset", "mini", "--data-root", damaged,
                      "--out", tmp_path / "eval", *ARGS)
    assert result.code == 2 and len(result.error_lines) == 1
    assert "q1.jpg: empty file" in result.err and "--skip-bad" in result.err


@pytest.mark.parametrize("entry", [{"name": 5, "results": {}}, {"name": ["a"], "results": {}},
                                   {"name": "a", "results": []}, "model"])
def test_tampered_results_json_is_refused_in_one_line(tmp_path, entry):
    """Defect 16: non-string model names in results.json were used as they were."""
    (tmp_path / "results.json").write_text(json.dumps({"models": [entry]}))
    result = run_dtop("report", tmp_path, "--out", tmp_path / "report")
    assert result.code == 2 and len(result.error_lines) == 1
    assert "results.json: models[0] needs a 'name' (a string)" in result.err
    TRIED["tampered headers"] += 1
