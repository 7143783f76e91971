"""Revisited-protocol metrics: hand-worked values, the reference loop, real ground truth, scores path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dtop.data.gnd import PROTOCOLS, GroundTruth, load_gnd
from dtop.errors import DataError
from dtop.retrieval.metrics import (
    compute_ap,
    compute_map,
    evaluate,
    evaluate_scores,
    format_results,
    positions_from_scores,
    score_and_search,
)

DATA = Path("/work/shared/data/revisitop")
if not DATA.is_dir():
    DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "revisitop"
needs_data = pytest.mark.skipif(not (DATA / "gnd_roxford5k.pkl").is_file(), reason="no real ground truth")


@pytest.fixture(scope="module")
def roxf() -> GroundTruth:
    return load_gnd(DATA / "gnd_roxford5k.pkl")


@pytest.fixture(scope="module")
def rpar() -> GroundTruth:
    return load_gnd(DATA / "gnd_rparis6k.pkl")


# ---------------------------------------------------------------- independent reference (revisitop)


def reference_compute_ap(ranks: np.ndarray, nres: int) -> float:
    """revisitop compute_ap, verbatim apart from style."""
    nimgranks = len(ranks)
    ap = 0
    recall_step = 1.0 / nres
    for j in np.arange(nimgranks):
        rank = ranks[j]
        if rank == 0:
            precision_0 = 1.0
        else:
            precision_0 = float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def reference_compute_map(ranks: np.ndarray, gnd: list[dict], kappas: list[int]) -> tuple:
    """revisitop compute_map (the per-query loop), plus one fix.

    Fix: when a truncated list holds no positive, the reference crashes on ``max(pos)``; dtop
    defines P@k = 0 there (AP is already 0).
    """
    map_ = 0.0
    nq = len(gnd)
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    for i in np.arange(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        try:
            qgndj = np.array(gnd[i]["junk"])
        except KeyError:
            qgndj = np.empty(0)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = reference_compute_ap(pos, len(qgnd))
        map_ = map_ + ap
        aps[i] = ap
        pos += 1
        for j in np.arange(len(kappas)):
            if len(pos) == 0:  # the fix
                prs[i, j] = 0.0
                continue
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    map_ = map_ / (nq - nempty)
    pr = pr / (nq - nempty)
    return map_, aps, pr, prs


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical arrays, NaN equal to NaN."""
    return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True))


def _ref_gnd(gnd: GroundTruth, protocol: str) -> list[dict]:
    return [{"ok": p, "junk": j} for p, j in gnd.protocol(protocol)]


# ----------------------------------------------------------------------------------- hand-worked


def test_compute_ap_by_hand() -> None:
    # one positive at the top: P0 = 1 (r = 0), P1 = 1/1 -> AP = 1
    assert compute_ap([0], 1) == 1.0
    # one positive second: P0 = 0/1 = 0, P1 = 1/2 -> (0 + 1/2)/2 = 1/4
    assert compute_ap([1], 1) == 0.25
    # r = [0, 2], n = 2: j=0 -> (1 + 1)/2 * 1/2 = 1/2; j=1 -> (1/2 + 2/3)/2 * 1/2 = 7/24 -> 19/24
    assert compute_ap([0, 2], 2) == pytest.approx(19 / 24, abs=1e-15)
    # r = [1, 3], n = 3 (third positive never retrieved): j=0 -> (0 + 1/2)/2 / 3 = 1/12;
    # j=1 -> (1/3 + 2/4)/2 / 3 = 5/36 -> 8/36 = 2/9
    assert compute_ap([1, 3], 3) == pytest.approx(2 / 9, abs=1e-15)
    assert compute_ap([], 4) == 0.0  # nothing retrieved
    assert math.isnan(compute_ap([], 0))  # no positives at all
    with pytest.raises(ValueError):
        compute_ap([3, 1], 2)  # not in ranked order
    with pytest.raises(ValueError):
        compute_ap([0, 1, 2], 2)


def test_compute_map_by_hand() -> None:
    # 4 queries, 5 ranked images each (a truncated list: the database is larger), best first.
    ranks = np.array(
        [
            [5, 5, 5, 5],
            [9, 9, 9, 9],
            [2, 2, 8, 2],
            [7, 7, 7, 7],
            [3, 3, 6, 3],
        ]
    )
    gnd = [
        # q0: positives 2 (position 2) and 3 (position 4); junk 9 at position 1 is removed, so the
        #     shifted positions are [1, 3]: AP = (0 + 1/2)/2/2 + (1/3 + 2/4)/2/2 = 1/8 + 5/24 = 1/3.
        #     P@k: 1-based shifted [2, 4], L = 4: P@1 = 0/1, P@5 = |{2,4}|/min(4,5) = 2/4, P@10 = 2/4.
        ([2, 3], [9]),
        # q1: no positive at all -> NaN, left out of the means
        ([], [9]),
        # q2: the truncated list holds none of its positives -> AP = 0, P@k = 0 (counted in the means)
        ([2, 3], []),
        # q3: positives 2, 3, 100; 100 is missing from the truncated list and contributes nothing:
        #     shifted positions [1, 3], n_p = 3 -> AP = 2/9 (as in test_compute_ap_by_hand).
        #     P@k: [2, 4] -> P@1 = 0, P@5 = 2/4, P@10 = 2/4.
        ([2, 3, 100], [9]),
    ]
    mean_ap, aps, pr, prs = compute_map(ranks, gnd, [1, 5, 10])
    assert aps[0] == pytest.approx(1 / 3, abs=1e-15)
    assert math.isnan(aps[1]) and np.isnan(prs[1]).all()
    assert aps[2] == 0.0 and prs[2].tolist() == [0.0, 0.0, 0.0]
    assert aps[3] == pytest.approx(2 / 9, abs=1e-15)
    assert prs[0].tolist() == [0.0, 0.5, 0.5] and prs[3].tolist() == [0.0, 0.5, 0.5]
    assert mean_ap == pytest.approx((1 / 3 + 0 + 2 / 9) / 3, abs=1e-15)  # 3 queries with positives
    assert pr.tolist() == pytest.approx([0.0, 1 / 3, 1 / 3])
    # the reference (with that fix for q2) agrees bit for bit
    ref = reference_compute_map(ranks, [{"ok": p, "junk": j} for p, j in gnd], [1, 5, 10])
    assert ref[0] == mean_ap and _same(ref[1], aps) and _same(ref[2], pr) and _same(ref[3], prs)


def test_reference_dict_input_and_no_kappas() -> None:
    ranks = np.array([[1], [0], [2]])
    mean_ap, aps, pr, prs = compute_map(ranks, [{"ok": [0]}])  # 'junk' optional, like the reference
    assert mean_ap == 0.25 and pr.shape == (0,) and prs.shape == (1, 0)


def test_all_queries_without_positives_gives_nan() -> None:
    mean_ap, aps, pr, _ = compute_map(np.array([[0], [1]]), [([], [0])], [1])
    assert math.isnan(mean_ap) and math.isnan(pr[0])


def test_tie_rule_by_hand() -> None:
    # scores of 4 images for one query; 0, 2 and 3 tie. Rule: decreasing score, then increasing
    # index -> ranking 1, 0, 2, 3: image 3 is at position 3 -> AP = (0 + 1/4)/2 = 0.125
    scores = np.array([[0.5, 0.9, 0.5, 0.5]], dtype=np.float32)
    assert positions_from_scores(scores, [[3, 0]])[0].tolist() == [1, 3]  # aligned with sorted [0, 3]
    ranks = np.argsort(-scores, axis=1, kind="stable").T
    assert ranks[:, 0].tolist() == [1, 0, 2, 3]
    assert compute_map(ranks, [([3], [])])[0] == 0.125


# ------------------------------------------------------------------------- cross-check (random)


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_on_random_problems(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_db, n_extra, nq = 300, 200, 25
    gnd = []
    for _ in range(nq):
        chosen = rng.permutation(n_db)
        n_pos = int(rng.integers(0, 30)) if rng.random() > 0.15 else 0
        n_junk = int(rng.integers(0, 30))
        gnd.append({"ok": chosen[:n_pos], "junk": chosen[n_pos : n_pos + n_junk]})
    ranks = np.stack([rng.permutation(n_db + n_extra) for _ in range(nq)], axis=1)
    kappas = [1, 2, 5, 10, 100]
    for n_ranked in (n_db + n_extra, 250, 40, 3, 1):
        ours = compute_map(ranks[:n_ranked], gnd, kappas)
        ref = reference_compute_map(ranks[:n_ranked], gnd, kappas)
        assert ours[0] == ref[0] or (math.isnan(ours[0]) and math.isnan(ref[0]))
        for a, b in zip(ours[1:], ref[1:], strict=True):
            assert _same(a, b)


# ---------------------------------------------------------------------------- real ground truth


def _perfect_ranks(gnd: GroundTruth, protocol: str) -> np.ndarray:
    cols = []
    for pos, _ in gnd.protocol(protocol):
        rest = np.setdiff1d(np.arange(gnd.n_database), pos)
        cols.append(np.concatenate([pos, rest]))
    return np.stack(cols, axis=1)


@needs_data
@pytest.mark.parametrize("name", ["roxf", "rpar"])
def test_perfect_and_random_rankings(name: str, request: pytest.FixtureRequest) -> None:
    gnd: GroundTruth = request.getfixturevalue(name)
    for protocol in PROTOCOLS:
        res = evaluate(_perfect_ranks(gnd, protocol), gnd)[protocol]
        assert res["map"] == pytest.approx(1.0, abs=1e-12)  # a sum of n_p terms 1/n_p: rounding
        assert all(a is None or a == pytest.approx(1.0, abs=1e-12) for a in res["aps"])
        assert res["mp"] == {"1": 1.0, "5": 1.0, "10": 1.0}
    rng = np.random.default_rng(0)
    ranks = np.stack([rng.permutation(gnd.n_database) for _ in range(gnd.n_queries)], axis=1)
    res = evaluate(ranks, gnd)
    for protocol in PROTOCOLS:
        assert 0.0 < res[protocol]["map"] < 0.15
        ref = reference_compute_map(ranks, _ref_gnd(gnd, protocol), [1, 5, 10])
        assert res[protocol]["map"] == ref[0]
        assert list(res[protocol]["mp"].values()) == ref[2].tolist()
        assert _same(np.array([np.nan if a is None else a for a in res[protocol]["aps"]]), ref[1])


@needs_data
def test_evaluate_structure(roxf: GroundTruth) -> None:
    res = evaluate(_perfect_ranks(roxf, "medium"), roxf, kappas=(1, 5, 10))
    assert list(res) == ["easy", "medium", "hard"]
    for r in res.values():
        assert set(r) == {"map", "mp", "aps"}
        assert list(r["mp"]) == ["1", "5", "10"]
        assert len(r["aps"]) == 70
    # two ROxford queries have no easy positive: None in the list, excluded from the mean
    assert sum(a is None for a in res["easy"]["aps"]) == 2
    assert sum(a is None for a in res["hard"]["aps"]) == 0
    # easy ∪ hard first is perfect under all three protocols: the other kind is junk there
    for protocol in PROTOCOLS:
        assert res[protocol]["map"] == pytest.approx(1.0, abs=1e-12)
    text = format_results(res, title="roxford5k")
    assert "Medium      100.00  100.00  100.00  100.00" in text
    assert "easy: 2 of 70 queries have no positive" in text
    # hard images first, then the rest: easy images end up behind them -> easy protocol not perfect
    res = evaluate(_perfect_ranks(roxf, "hard"), roxf)
    assert res["hard"]["map"] == pytest.approx(1.0, abs=1e-12) and res["medium"]["map"] < 0.9


# ------------------------------------------------------------------------------- scores path


def _tie_heavy_scores(gnd: GroundTruth, n_extra: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scores = rng.integers(-40, 40, size=(gnd.n_queries, gnd.n_database + n_extra)).astype(np.float32)
    for q, g in enumerate(gnd.gnd):  # make the easy images likelier to rank high
        scores[q, g["easy"]] += rng.integers(0, 50, len(g["easy"]))
    return scores


@needs_data
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int32])
def test_scores_path_equals_ranks_path(rpar: GroundTruth, dtype: type) -> None:
    scores = _tie_heavy_scores(rpar, 2000, seed=1).astype(dtype)
    ranks = np.argsort(-scores, axis=1, kind="stable").T  # the tie rule, made explicit
    full = evaluate(ranks, rpar)
    assert evaluate_scores(scores, rpar) == full
    assert evaluate_scores(torch.from_numpy(scores), rpar) == full
    blocks = (scores[:, i : i + 997] for i in range(0, scores.shape[1], 997))
    assert evaluate_scores(blocks, rpar) == full
    for n_ranked in (1, 500, 8000):
        assert evaluate_scores(scores, rpar, n_ranked=n_ranked) == evaluate(ranks[:n_ranked], rpar)


@needs_data
def test_scores_path_continuous_scores(roxf: GroundTruth) -> None:
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((roxf.n_queries, roxf.n_database + 20_000)).astype(np.float32)
    for q, g in enumerate(roxf.gnd):
        scores[q, g["hard"]] += 1.5
    ranks = np.argsort(-scores, axis=1, kind="stable").T
    assert evaluate_scores(scores, roxf) == evaluate(ranks, roxf)
    medium = evaluate_scores(scores, roxf)["medium"]["map"]
    ref = reference_compute_map(ranks, _ref_gnd(roxf, "medium"), [1, 5, 10])
    assert medium == ref[0]


def test_positions_from_scores_counts_higher_scores() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.standard_normal((3, 500)), 1).astype(np.float32)  # many ties
    order = np.argsort(-scores, axis=1, kind="stable")
    position = np.argsort(order, axis=1)  # position of every image in each ranking
    interest = [[0, 7, 499, 250], [3], list(range(0, 500, 3))]
    got = positions_from_scores(scores, interest)
    for q, idx in enumerate(interest):
        assert got[q].tolist() == position[q, sorted(idx)].tolist()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_positions_from_scores_adversarial_values(dtype: type) -> None:
    # neighbouring floats, signed zeros, subnormals and huge values: the cell map must stay exact
    rng = np.random.default_rng(1)
    one = dtype(1)
    special = np.array(
        [0.0, -0.0, 1e-40, -1e-40, 1e30, -1e30, 1.0, np.nextafter(one, 2), np.nextafter(one, 0), 0.5, 0.5],
        dtype=dtype,
    )
    base = np.concatenate([special, np.nextafter(one, 2) + np.zeros(5, dtype)])
    scores = np.stack([rng.permutation(np.concatenate([base, rng.choice(base, 400)])) for _ in range(4)])
    scores = scores.astype(dtype)
    scores[3] = scores[3] * 1e-3  # a query whose thresholds are all tiny
    position = np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1)
    interest = [rng.choice(scores.shape[1], 60, replace=False) for _ in range(4)]
    got = positions_from_scores(scores, interest)
    for q in range(4):
        assert got[q].tolist() == position[q, np.unique(interest[q])].tolist()
    # one block at a time, the same
    blocks = [scores[:, i : i + 7] for i in range(0, scores.shape[1], 7)]
    assert [g.tolist() for g in positions_from_scores(blocks, interest)] == [g.tolist() for g in got]


def test_scores_errors(roxf: GroundTruth) -> None:
    with pytest.raises(DataError, match="cover 100 images"):
        positions_from_scores(np.zeros((1, 100)), [[100]])
    with pytest.raises(DataError, match="NaN or infinity"):
        positions_from_scores(np.array([[0.0, np.nan]]), [[0]])
    with pytest.raises(DataError, match="one row per query"):
        evaluate_scores(np.zeros((3, roxf.n_database)), roxf)
    with pytest.raises(DataError, match="database images must come first"):
        evaluate_scores(np.zeros((70, roxf.n_database - 1)), roxf)
    with pytest.raises(DataError, match="n_ranked must be at least 1"):
        evaluate_scores(np.zeros((70, roxf.n_database)), roxf, n_ranked=0)
    # a block counted while the next one is computed: its error still stops the run, named
    rng = np.random.default_rng(0)
    x = rng.standard_normal((roxf.n_database + 3000, 16)).astype(np.float32)
    x[roxf.n_database + 2500, 3] = np.nan  # a distractor, several blocks after the database part
    q = rng.standard_normal((roxf.n_queries, 16)).astype(np.float32)
    bad = (roxf.n_database + 2500) // 97 * 97
    with pytest.raises(DataError, match=f"images {bad}..{bad + 96} contain NaN"):
        score_and_search(q, x, roxf, chunk_size=97)


# ------------------------------------------------------------------------------------ errors


def test_ranks_errors() -> None:
    gnd = [([0], [])] * 3
    with pytest.raises(DataError, match="looks transposed"):
        compute_map(np.zeros((3, 10), dtype=np.int64), gnd)
    with pytest.raises(DataError, match="integer database indices"):
        compute_map(np.zeros((10, 3)), gnd)
    with pytest.raises(DataError, match="negative index -1"):
        compute_map(-np.ones((10, 3), dtype=np.int64), gnd)
    with pytest.raises(DataError, match="2-D"):
        compute_map(np.zeros(10, dtype=np.int64), gnd)
    with pytest.raises(DataError, match="kappas must be positive"):
        compute_map(np.zeros((10, 3), dtype=np.int64), gnd, [0])


def test_large_and_unsigned_rank_indices() -> None:
    gnd = [([0], [1])]
    ranks = np.array([[10**12], [1], [0]], dtype=np.int64)  # a far distractor first, then junk, then the positive
    expected = compute_map(ranks, gnd, [1, 5])
    assert expected[0] == 0.25  # junk removed: the positive is second, AP = (0/1 + 1/2) / 2
    for dtype in (np.uint64, np.int64):
        got = compute_map(ranks.astype(dtype), gnd, [1, 5])
        assert got[0] == expected[0] and _same(got[2], expected[2])
    wrapped = np.array([[2**64 - 1], [0]], dtype=np.uint64)  # -1 stored as unsigned
    with pytest.raises(DataError, match=r"index 18446744073709551615 \(>= 2\^63\).*int64"):
        compute_map(wrapped, gnd)


def test_ground_truth_without_queries_is_rejected() -> None:
    empty = GroundTruth(["a", "b"], [], [], "empty")
    with pytest.raises(DataError, match="ground truth has no queries"):
        evaluate(np.zeros((2, 0), dtype=np.int64), empty)
    with pytest.raises(DataError, match="ground truth has no queries"):
        evaluate_scores(np.zeros((0, 2), dtype=np.float32), empty)
    with pytest.raises(DataError, match="ground truth has no queries"):
        compute_map(np.zeros((2, 0), dtype=np.int64), [])
