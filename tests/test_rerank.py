"""Re-ranking: diffusion and SuperGlobal on hand-worked cases, against direct references, and properties."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dtop.data.gnd import GroundTruth
from dtop.errors import CheckpointError, ConfigError, DataError
from dtop.retrieval import diffusion as diffusion_module
from dtop.retrieval.diffusion import (
    KnnGraph,
    build_knn_graph,
    conjugate_gradient,
    diffusion_rerank,
    knn_graph_for,
    load_knn_graph,
    save_knn_graph,
)
from dtop.retrieval.metrics import evaluate, evaluate_scores
from dtop.retrieval.postprocess import Diffusion, PostProcessing, SuperGlobal
from dtop.retrieval.rerank import evaluate_reranked, lift_reranked, order_by_score
from dtop.retrieval.search import iter_scores, search
from dtop.retrieval.superglobal import superglobal_rerank


def at(degrees: float) -> list[float]:
    """The unit vector of the plane at ``degrees``."""
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def clustered(n: int, d: int, seed: int = 0, centres: int = 6, spread: float = 0.5) -> torch.Tensor:
    """Unit vectors around a few centres (neighbourhoods with positive similarities)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g)
    x = c[torch.randint(0, centres, (n,), generator=g)] + spread * torch.randn(n, d, generator=g)
    return F.normalize(x, dim=1)


# ------------------------------------------------------------------------- diffusion, by hand

# A query at 0° in the plane; a "manifold" a0..a3 at 20°, 40°, 60°, 80° and an outlier at -50°.
# Database indices are shuffled so that no order comes from the index.
A2, OUT, A0, A3, A1 = range(5)
CHAIN_DB = torch.tensor([at(60), at(-50), at(20), at(80), at(40)], dtype=torch.float32)
QUERY = torch.tensor([at(0)], dtype=torch.float32)


def test_chain_graph_is_the_manifold() -> None:
    # k = 3 (the vector itself + 2): a0 lists {a1 (20°), a2 (40°)}, a1 {a0, a2}, a2 {a1, a3},
    # a3 {a2, a1 (40°)}, the outlier {a0 (70°), a1 (90°)}. Reciprocal: a0-a1, a1-a2, a2-a3; a0-a2
    # is not (a0 is not in a2's list), a3-a1 neither, and nobody lists the outlier: it is isolated.
    for engine in ("torch", "faiss"):
        g = build_knn_graph(CHAIN_DB, k=3, gamma=3.0, engine=engine)
        edges = {(i, int(j)) for i in range(5) for j in g.neighbors[i] if j >= 0}
        assert edges == {(A0, A1), (A1, A0), (A1, A2), (A2, A1), (A2, A3), (A3, A2)}
        assert g.num_edges == 3
        w = {(i, int(j)): float(v) for i in range(5) for j, v in zip(g.neighbors[i], g.weights[i]) if j >= 0}
        for edge, weight in w.items():  # every edge spans 20°: weight cos(20°)^3, both directions
            assert weight == pytest.approx(math.cos(math.radians(20)) ** 3, abs=1e-6)
            assert w[edge[::-1]] == weight


def chain_f(alpha: float) -> tuple[float, float, float, float]:
    """f of a0..a3 solved by hand for y = c e_a0, c = cos(20°)^3.

    The chain has degrees (w, 2w, 2w, w), so S = D^-1/2 W D^-1/2 has S01 = S23 = 1/√2 and S12 = 1/2
    whatever w. With a = alpha/√2 and b = alpha/2 the rows of (I - alpha S) f = y read
        f0 - a f1 = c,   -a f0 + f1 - b f2 = 0,   -b f1 + f2 - a f3 = 0,   -a f2 + f3 = 0.
    From the last: f3 = a f2; the third: f2 = b f1 / (1 - a²); the second:
    f0 = f1 (1 - b² / (1 - a²)) / a; the first: f1 = c / ((1 - b² / (1 - a²)) / a - a).
    """
    c = math.cos(math.radians(20)) ** 3
    a, b = alpha / math.sqrt(2), alpha / 2
    f1 = c / ((1 - b * b / (1 - a * a)) / a - a)
    f2 = b * f1 / (1 - a * a)
    return f1 * (1 - b * b / (1 - a * a)) / a, f1, f2, a * f2


@pytest.mark.parametrize(
    "alpha,order",
    [
        # alpha = 0.5: a = 0.35355, b = 0.25, f2 = 2/7 f1, f0 = 2.6264 f1, f3 = 0.10102 f1: the order
        # of graph distance from a0
        (0.5, [A0, A1, A2, A3, OUT]),
        # alpha = 0.99 (the default): a = 0.70004, b = 0.495, f0 = 0.74212 f1, f2 = 0.97068 f1,
        # f3 = 0.67952 f1: close to the stationary state, the inner nodes (degree 2) lead
        (0.99, [A1, A2, A0, A3, OUT]),
    ],
)
def test_diffusion_lifts_the_manifold_above_a_closer_outlier(alpha: float, order: list[int]) -> None:
    scores, indices = search(QUERY, CHAIN_DB, 5)
    # plain cosine order: a0 (cos 20° = .940), a1 (.766), outlier (cos 50° = .643), a2 (.5), a3 (.174)
    assert indices[0].tolist() == [A0, A1, OUT, A2, A3]
    graph = build_knn_graph(CHAIN_DB, k=3)
    f_scores, f_indices = diffusion_rerank(scores, indices, graph, kq=1, alpha=alpha)
    assert f_indices[0].tolist() == order  # a2 and a3 now rank above the outlier
    f = dict(zip(f_indices[0].tolist(), f_scores[0].tolist()))
    assert f[OUT] == 0.0  # isolated and not in y: the diffusion never reaches it
    np.testing.assert_allclose([f[A0], f[A1], f[A2], f[A3]], chain_f(alpha), rtol=1e-5)


def test_diffusion_truncation_and_kq() -> None:
    scores, indices = search(QUERY, CHAIN_DB, 5)
    graph = build_knn_graph(CHAIN_DB, k=3)
    # trunc = 3 diffuses over {a0, a1, outlier} only, whose one edge a0-a1 has S01 = 1 (equal
    # degrees w): f0 - alpha f1 = c, f1 = alpha f0, so f0 = c / (1 - alpha²) = 41.70 and
    # f1 = 0.99 f0 = 41.28; a2 and a3 keep places 4 and 5 with their plain scores.
    c = math.cos(math.radians(20)) ** 3
    s, idx = diffusion_rerank(scores, indices, graph, trunc=3, kq=1)
    assert idx[0].tolist() == [A0, A1, OUT, A2, A3]
    np.testing.assert_allclose(s[0], [c / (1 - 0.99**2), 0.99 * c / (1 - 0.99**2), 0, 0.5, math.cos(math.radians(80))],
                               rtol=1e-5, atol=1e-7)
    # kq = 3 puts the outlier into y; isolated, it keeps f = y = cos(50°)^3 = 0.2656 and still
    # ranks last: the chain gets y = (cos(20°)^3, cos(40°)^3, 0, 0) and f = (I - 0.99 S)^-1 y
    s, idx = diffusion_rerank(scores, indices, graph, kq=3)
    assert idx[0].tolist() == [A1, A2, A0, A3, OUT]
    r = 1 / math.sqrt(2)
    chain_s = np.array([[0, r, 0, 0], [r, 0, 0.5, 0], [0, 0.5, 0, r], [0, 0, r, 0]])
    y = np.array([c, math.cos(math.radians(40)) ** 3, 0, 0])
    f = np.linalg.solve(np.eye(4) - 0.99 * chain_s, y)
    got = dict(zip(idx[0].tolist(), s[0].tolist()))
    np.testing.assert_allclose([got[A0], got[A1], got[A2], got[A3]], f, rtol=1e-5)
    assert got[OUT] == pytest.approx(math.cos(math.radians(50)) ** 3, rel=1e-6)


def test_conjugate_gradient_solves_spd_systems() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = m @ m.T + 30 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda p: a @ p, b, tol=1e-12, iterations=100)
    torch.testing.assert_close(x, torch.linalg.solve(a, b))
    assert torch.equal(conjugate_gradient(lambda p: a @ p, torch.zeros(30, dtype=torch.float64)), torch.zeros(30))


# ------------------------------------------------------------------- diffusion, dense reference


def ref_diffusion(q: np.ndarray, x: np.ndarray, k: int, kq: int, trunc: int, gamma: float, alpha: float
                  ) -> np.ndarray:
    """Dense transcription: k-NN lists, reciprocal affinity, truncated normalised Laplacian, exact solve."""
    sims = x @ x.T
    knn = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    member = np.zeros_like(sims, dtype=bool)
    np.put_along_axis(member, knn, True, axis=1)
    w = np.where(member & member.T, np.clip(sims, 0, None) ** gamma, 0.0)
    np.fill_diagonal(w, 0.0)
    out = []
    for row in q @ x.T:
        plain = np.argsort(-row, kind="stable")
        sub = plain[:trunc]
        ws = w[np.ix_(sub, sub)]
        deg = ws.sum(1)
        d = np.where(deg > 0, 1 / np.sqrt(np.where(deg > 0, deg, 1)), 0.0)
        s = d[:, None] * ws * d[None, :]
        y = np.zeros(len(sub))
        y[:kq] = np.clip(row[sub[:kq]], 0, None) ** gamma
        f = np.linalg.solve(np.eye(len(sub)) - alpha * s, y)
        order = sorted(range(len(sub)), key=lambda i: (-f[i], sub[i]))
        out.append(np.concatenate([sub[order], plain[trunc:]]))
    return np.stack(out)


@pytest.mark.parametrize("trunc,k", [(400, 10), (120, 6)])
def test_diffusion_matches_dense_reference(trunc: int, k: int) -> None:
    x, q = clustered(400, 16, seed=1), clustered(6, 16, seed=2)
    scores, indices = search(q, x, 400)
    graph = build_knn_graph(x, k=k)
    _, got = diffusion_rerank(scores, indices, graph, trunc=trunc, kq=5, tol=1e-14, iterations=500)
    want = ref_diffusion(q.double().numpy(), x.double().numpy(), k, 5, trunc, 3.0, 0.99)
    assert (got[:, :50] == want[:, :50]).mean() > 0.98  # float32 graph vs float64 reference: near-ties may swap
    assert np.array_equal(np.sort(got[:, :trunc], 1), np.sort(want[:, :trunc], 1))


def test_graph_engines_agree_and_graph_is_symmetric() -> None:
    x = clustered(500, 12, seed=3)
    a, b = build_knn_graph(x, k=8, engine="torch"), build_knn_graph(x, k=8, engine="faiss")
    assert torch.equal(a.neighbors, b.neighbors)
    torch.testing.assert_close(a.weights, b.weights)
    nb, w = a.neighbors.long(), a.weights
    for i in range(0, 500, 7):
        for j, v in zip(nb[i].tolist(), w[i].tolist()):
            if j >= 0:
                assert j != i and w[j][nb[j] == i].tolist() == [v]


def test_float16_graph_equals_the_graph_of_its_float32_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss scans a float16 database as it is (SQfp16): no float32 copy of it, the same graph."""
    pytest.importorskip("faiss")
    x16 = torch.as_tensor(clustered(600, 12, seed=4)).half()
    copies: list[tuple[int, ...]] = []
    real = np.ascontiguousarray

    def spy(a: object, dtype: object = None) -> np.ndarray:
        out = real(a, dtype=dtype)
        if out.dtype == np.float32 and out.shape[0] == 600:
            copies.append(out.shape)
        return out

    from dtop.retrieval import diffusion, faiss_index

    monkeypatch.setattr(diffusion, "_ROW_CHUNK", 100)  # blocks smaller than the matrix
    monkeypatch.setattr(faiss_index, "CONVERT_BUDGET", 100 * 12)
    monkeypatch.setattr(np, "ascontiguousarray", spy)
    half = build_knn_graph(x16, k=8, engine="faiss")
    assert copies == []  # never the whole matrix in float32 at once
    monkeypatch.undo()
    full = build_knn_graph(x16.float(), k=8, engine="faiss")
    assert torch.equal(half.neighbors, full.neighbors)
    torch.testing.assert_close(half.weights, full.weights)


def test_approximate_graph() -> None:
    x = clustered(2000, 12, seed=3)
    exact = build_knn_graph(x, k=8)
    # probing every list of the IVF index is exact search
    full = build_knn_graph(x, k=8, ivf=4, nprobe=4)
    assert torch.equal(full.neighbors, exact.neighbors) and full.info["engine"] == "faiss IVF4,Flat nprobe=4"
    # one list out of 16: some neighbours are missed, the graph stays symmetric and mostly right
    approx = build_knn_graph(x, k=8, ivf=16, nprobe=1)
    edges = {(i, int(j)) for i, row in enumerate(approx.neighbors.tolist()) for j in row if j >= 0}
    true = {(i, int(j)) for i, row in enumerate(exact.neighbors.tolist()) for j in row if j >= 0}
    assert all((j, i) in edges for i, j in edges)
    assert len(edges & true) > 0.7 * len(true)


def test_graph_save_load_and_cache(tmp_path, monkeypatch) -> None:
    x = clustered(300, 8, seed=4)
    graph = build_knn_graph(x, k=6)
    loaded = load_knn_graph(save_knn_graph(graph, tmp_path / "g.safetensors"))
    assert torch.equal(loaded.neighbors, graph.neighbors) and torch.equal(loaded.weights, graph.weights)
    assert (loaded.k, loaded.gamma, loaded.info) == (graph.k, graph.gamma, graph.info)
    first = knn_graph_for(x, k=6, cache=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def no_build(*args, **kwargs):
        raise AssertionError("the cached graph should have been used")

    monkeypatch.setattr(diffusion_module, "build_knn_graph", no_build)
    assert torch.equal(knn_graph_for(x, k=6, cache=tmp_path / "cache").neighbors, first.neighbors)
    monkeypatch.undo()
    knn_graph_for(x[:200], k=6, cache=tmp_path / "cache")  # another database: another file
    knn_graph_for(x, k=7, cache=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 3
    (tmp_path / "bad.safetensors").write_bytes(b"not a graph")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_knn_graph(tmp_path / "bad.safetensors")


def test_diffusion_bad_arguments() -> None:
    x = clustered(50, 8, seed=5)
    graph = build_knn_graph(x, k=5)
    scores, indices = search(x[:2], x, 20)
    with pytest.raises(ConfigError, match="alpha"):
        diffusion_rerank(scores, indices, graph, alpha=1.0)
    with pytest.raises(ConfigError, match="k must be"):
        build_knn_graph(x, k=1)
    with pytest.raises(DataError, match="indices must lie"):
        diffusion_rerank(scores, indices + 100, graph)
    with pytest.raises(DataError, match="twice"):
        diffusion_rerank(scores, np.zeros_like(indices), graph)
    with pytest.raises(ConfigError, match="engine"):
        build_knn_graph(x, k=5, engine="annoy")  # type: ignore[arg-type]


# ----------------------------------------------------------------------- SuperGlobal, by hand

# Query e1 = (1, 0). A = (.96, .28), B = (.6, .8), O = (.8, -.6) (an outlier), D = (-.6, .8).
# Database order O, D, B, A; plain order A (.96), O (.8), B (.6), D (-.6).
O_, D_, B_, A_ = range(4)
SG_DB = torch.tensor([[0.8, -0.6], [-0.6, 0.8], [0.6, 0.8], [0.96, 0.28]], dtype=torch.float64)


def test_superglobal_by_hand() -> None:
    # m = 3: the candidates are A, O, B (D keeps place 4). k = 1, beta = 0.5, kq = 1.
    # Similarities: A·B = .576 + .224 = .8, A·O = .768 - .168 = .6, B·O = .48 - .48 = 0.
    # Refinement with the nearest other candidate, weight beta * s:
    #   A' = (A + .4 B) / 1.4 = (1.2, .6) / 1.4             = (6/7, 3/7)
    #   B' = (B + .4 A) / 1.4 = (.984, .912) / 1.4          = (123/175, 114/175)
    #   O' = (O + .3 A) / 1.3 = (1.088, -.516) / 1.3        = (272/325, -129/325)
    # s1 = q · x': A 6/7 = .857143, B 123/175 = .702857, O 272/325 = .836923; best (kq = 1): A'.
    # q' = A'; s2 = q' · x': A 45/49, B (6·123 + 3·114) / 1225 = 216/245, O (6·272 - 3·129) / 2275 = 249/455.
    # (s1 + s2) / 2: A 87/98 = .887755, B 1941/2450 = .792245, O 3149/4550 = .692088: B passes O.
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    scores, indices = search(q, SG_DB, 4)
    assert indices[0].tolist() == [A_, O_, B_, D_]
    s, idx = superglobal_rerank(q, SG_DB, scores, indices, m=3, k=1, kq=1, beta=0.5)
    assert idx[0].tolist() == [A_, B_, O_, D_]
    np.testing.assert_allclose(s[0], [87 / 98, 1941 / 2450, 3149 / 4550, -0.6], rtol=1e-6)


def test_superglobal_negative_similarities_weigh_nothing() -> None:
    # kq = 2: q' = max(A', O') element-wise = (6/7, 3/7) = A' again (A' dominates O'): same result;
    # k = 2: A's neighbours are B and O (weights .4, .3); B's are A (.4) and O (s = 0: weight 0).
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    scores, indices = search(q, SG_DB, 4)
    _, idx = superglobal_rerank(q, SG_DB, scores, indices, m=3, k=1, kq=2, beta=0.5)
    assert idx[0].tolist() == [A_, B_, O_, D_]
    # with D among the candidates (m = 4), D·O = -.96 < 0 is clamped to a zero weight
    s, _ = superglobal_rerank(q, SG_DB, scores, indices, m=4, k=3, kq=1, beta=0.5)
    assert np.isfinite(s).all()


def ref_superglobal(q: np.ndarray, x: np.ndarray, m: int, k: int, kq: int, beta: float) -> np.ndarray:
    """Direct transcription of the re-ranking of the authors' code (top-M descriptor augmentation,
    then max-pooled query expansion, mean of the two similarities), in float64."""
    out = []
    for qv in q:
        plain = np.argsort(-(x @ qv), kind="stable")
        cand = plain[:m]
        xm = x[cand]
        gram = xm @ xm.T
        refined = np.empty_like(xm)
        for i in range(len(cand)):
            others = [j for j in np.argsort(-gram[i], kind="stable") if j != i][:k]
            w = beta * np.clip(gram[i, others], 0, None)
            refined[i] = (xm[i] + (w[:, None] * xm[others]).sum(0)) / (1 + w.sum())
        s1 = refined @ qv
        expanded = refined[np.argsort(-s1, kind="stable")[:kq]].max(0)
        final = (s1 + refined @ expanded) / 2
        out.append(np.concatenate([cand[np.argsort(-final, kind="stable")], plain[m:]]))
    return np.stack(out)


@pytest.mark.parametrize("m,k,kq,beta", [(400, 9, 10, 0.15), (50, 3, 1, 0.5), (30, 0, 4, 0.15)])
def test_superglobal_matches_reference(m: int, k: int, kq: int, beta: float) -> None:
    x, q = clustered(600, 24, seed=6), clustered(7, 24, seed=7)
    scores, indices = search(q, x, 600)
    _, got = superglobal_rerank(q, x, scores, indices, m=m, k=k, kq=kq, beta=beta)
    want = ref_superglobal(q.double().numpy(), x.double().numpy(), m, k, kq, beta)
    assert (got == want).mean() > 0.99  # float32 vs float64: a near-tie may swap
    assert np.array_equal(got[:, m:], want[:, m:])


# ------------------------------------------------------------------------------------ properties


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(5, 80), d=st.integers(2, 10), depth=st.integers(1, 90), k=st.integers(2, 12),
    dup=st.integers(0, 10), seed=st.integers(0, 2**16),
)
def test_rerankers_only_permute_the_top_they_touch(n: int, d: int, depth: int, k: int, dup: int, seed: int) -> None:
    x = clustered(n, d, seed=seed, spread=1.0)
    x = torch.cat([x, x[:dup]])  # exact duplicates: equal scores everywhere
    q = clustered(3, d, seed=seed + 1, spread=1.0)
    scores, indices = search(q, x, x.shape[0])
    graph = build_knn_graph(x, k=k)
    for run in (
        lambda: diffusion_rerank(scores, indices, graph, trunc=depth, kq=3),
        lambda: superglobal_rerank(q, x, scores, indices, m=depth, k=k % 5, kq=2),
    ):
        s, idx = run()
        top = min(depth, x.shape[0])
        assert np.array_equal(np.sort(idx[:, :top], 1), np.sort(indices[:, :top], 1))
        assert np.array_equal(idx[:, top:], indices[:, top:]) and np.array_equal(s[:, top:], scores[:, top:])
        assert np.all(np.diff(s[:, :top], axis=1) <= 0)  # sorted by the new score
        ties = (np.diff(s[:, :top], axis=1) == 0)
        assert np.all(np.diff(idx[:, :top], axis=1)[ties] > 0)  # equal scores: increasing index
        s2, idx2 = run()
        assert np.array_equal(idx, idx2) and np.array_equal(s, s2)  # deterministic


def test_unreached_images_tie_by_index() -> None:
    # three copies of the outlier (at indices 5, 6, 7, after the chain): they link to each other,
    # not to the chain, so the diffusion from a0 gives them f = 0 exactly: they rank by index
    x = torch.cat([CHAIN_DB, CHAIN_DB[[OUT, OUT]]])
    scores, indices = search(QUERY, x, 7)
    assert indices[0].tolist()[2:5] == [OUT, 5, 6]
    s, idx = diffusion_rerank(scores, indices, build_knn_graph(x, k=3), kq=1)
    assert idx[0].tolist() == [A1, A2, A0, A3, OUT, 5, 6] and s[0, 4:].tolist() == [0, 0, 0]


def test_order_by_score_rule() -> None:
    values = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    ids = torch.tensor([[9, 7, 2, 5, 4]])
    assert ids.gather(1, order_by_score(values, ids)).tolist() == [[2, 4, 7, 5, 9]]


# ------------------------------------------------------------------------------- evaluation


def toy_gnd(n_db: int, n_q: int, seed: int) -> GroundTruth:
    rng = np.random.default_rng(seed)
    gnd = []
    for _ in range(n_q):
        ids = rng.permutation(n_db)[:30]
        gnd.append({"bbx": None, "easy": sorted(ids[:8].tolist()), "hard": sorted(ids[8:15].tolist()),
                    "junk": sorted(ids[15:20].tolist())})
    return GroundTruth([f"db{i}" for i in range(n_db)], [f"q{i}" for i in range(n_q)], gnd, name="toy")


@pytest.mark.parametrize("depth", [1, 37, 500])
def test_lifted_scores_equal_the_reranked_ranks(depth: int) -> None:
    x = clustered(300, 12, seed=10)  # 250 database images + 50 distractors
    q = clustered(5, 12, seed=11)
    gnd = toy_gnd(250, 5, seed=12)
    scores, indices = search(q, x, depth)
    _, reranked = superglobal_rerank(q, x, scores, indices, m=depth)
    plain = np.argsort(-(q @ x.T).numpy(), axis=1, kind="stable")
    rest = [row[~np.isin(row, top)] for row, top in zip(plain, reranked)]
    full = np.stack([np.concatenate([top, r]) for top, r in zip(reranked, rest)]).T
    lifted = lift_reranked(iter_scores(q, x, chunk_size=64), reranked, scores[:, 0])
    assert evaluate_scores(lifted, gnd) == evaluate(full, gnd)


@pytest.mark.parametrize("step", [SuperGlobal(m=40, k=3), Diffusion(k=6, trunc=80, kq=4)], ids=["sg", "diffusion"])
def test_evaluate_reranked_scores_the_full_reranked_lists(step) -> None:
    x, q = clustered(300, 12, seed=15), clustered(5, 12, seed=16)
    gnd = toy_gnd(280, 5, seed=17)
    results, top = evaluate_reranked(q, x, gnd, step, topk=30)
    scores, indices = search(q, x, 300)
    _, reranked = step.rerank(q, x, scores, indices)  # the whole list: the re-ranked top, then the rest
    assert evaluate(reranked.T, gnd) == results
    assert np.array_equal(top, reranked[:, :30])


# --------------------------------------------------------------------------------- pipeline


def test_pipeline_steps_parse_and_compose() -> None:
    pp = PostProcessing.from_config(["diffusion:k=5,trunc=40,kq=3", "qe:k=2"])
    assert [s.name for s in pp] == ["qe", "diffusion"]
    step = pp.reranker
    assert isinstance(step, Diffusion) and step.depth == 40
    assert pp.describe()[1] == {"name": "diffusion", "k": 5, "kq": 3, "gamma": 3.0, "alpha": 0.99, "trunc": 40,
                                "iterations": 20, "tol": 1e-6, "cache": None, "ivf": None, "nprobe": 32}
    x, q = clustered(120, 8, seed=13), clustered(4, 8, seed=14)
    pq, px = pp.process(q, x)
    scores, indices = search(pq, px, 60)
    s, idx = pp.rerank(pq, px, scores, indices)
    assert np.array_equal(np.sort(idx[:, :40], 1), np.sort(indices[:, :40], 1))
    assert step.graph_for(px) is step.graph_for(px)  # built once per database
    sg = PostProcessing.from_config("superglobal:m=20,beta=0.2")
    assert isinstance(sg.reranker, SuperGlobal) and sg.reranker.depth == 20
    plain = PostProcessing.from_config(["qe"])
    assert plain.reranker is None and plain.rerank(q, x, scores, indices) == (scores, indices)


def test_pipeline_rejects_bad_rerank_configs() -> None:
    with pytest.raises(ConfigError, match="choose one re-ranking step"):
        PostProcessing.from_config(["diffusion", "superglobal"])
    with pytest.raises(ConfigError, match="no parameter 'n'"):
        PostProcessing.from_config(["superglobal:n=3"])
    with pytest.raises(ConfigError, match="did you mean 'diffusion'"):
        PostProcessing.from_config(["difusion"])
    with pytest.raises(ConfigError, match="beta"):
        PostProcessing.from_config(["superglobal:beta=-1"])
    with pytest.raises(ConfigError, match="trunc"):
        PostProcessing.from_config(["diffusion:trunc=0"])


def test_knn_graph_repr_and_shape_check() -> None:
    with pytest.raises(CheckpointError, match="inconsistent"):
        KnnGraph(torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 3), k=3, gamma=3.0)


# ------------------------------------------------------------------------------- dtop evaluate


@pytest.mark.slow
def test_evaluate_with_reranking_end_to_end(tmp_path, capsys) -> None:
    from dtop.apps.synthetic import generate_benchmark
    from dtop.cli.main import main
    from dtop.data.revisited import RevisitedDataset
    from dtop.engine.extract import extract
    from dtop.engine.settings import ExtractSettings
    from dtop.models import build_model, save_checkpoint

    bench = generate_benchmark(tmp_path / "data", n_train_instances=1, n_test_instances=4, train_views=1,
                               n_distractors=6, image_size=64)
    torch.manual_seed(0)
    model = build_model("dtop_tiny")
    ckpt = save_checkpoint(model, tmp_path / "tiny.safetensors")
    common = ["evaluate", "--model", str(ckpt), "--dataset", bench["name"], "--data-root", bench["root"],
              "--image-size", "64", "--scales", "1.0", "--workers", "0", "--no-progress", "--topk", "5"]
    ds = RevisitedDataset(bench["root"], bench["name"])
    settings = ExtractSettings(image_size=64, scales=[1.0])
    q = extract(model, ds.query_paths, bbxs=ds.query_bbxs, settings=settings)
    x = extract(model, ds.database_paths, settings=settings)
    scores, indices = search(q, x, x.shape[0])
    for post, step in [("superglobal:m=12,k=2,kq=2", SuperGlobal(m=12, k=2, kq=2)),
                       ("diffusion:k=4,kq=2,trunc=15", Diffusion(k=4, kq=2, trunc=15))]:
        out = tmp_path / post.split(":")[0]
        assert main([*common, "--out", str(out), "--post", post]) == 0
        payload = json.loads((out / "results.json").read_text())
        entry = payload["models"][0]
        assert entry["post"][0]["name"] == post.split(":")[0]
        # independent path: in-memory descriptors, the step on the full lists, evaluate(ranks)
        _, reranked = step.rerank(q, x, scores, indices)
        expected = evaluate(reranked.T, ds.gnd)
        for protocol in ("easy", "medium", "hard"):
            assert entry["results"][bench["name"]][protocol]["map"] == pytest.approx(expected[protocol]["map"],
                                                                                     abs=1e-6)
        np.testing.assert_array_equal(np.load(out / entry["ranks"][bench["name"]]), reranked[:, :5].T)
    graphs = list((tmp_path / "diffusion" / "descriptors").rglob("knn-*.safetensors"))
    assert len(graphs) == 1  # the graph is kept with the descriptors


# --------------------------------------------------------------------------------- dtop search

@pytest.mark.slow
def test_search_an_index_with_post_processing(tmp_path, capsys) -> None:
    from PIL import Image

    from dtop.apps.index import ImageIndex, build_image_index
    from dtop.cli.main import main
    from dtop.engine.extract import extract
    from dtop.engine.settings import ExtractSettings
    from dtop.models import build_model

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    places = rng.integers(0, 255, (4, 6, 6, 3))
    for i in range(12):  # four "places", three photos of each
        noisy = np.clip(np.kron(places[i // 3], np.ones((12, 12, 1))) + rng.integers(-30, 30, (72, 72, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(folder / f"p{i:02d}.png")
    torch.manual_seed(0)
    model = build_model("dtop_tiny")
    settings = ExtractSettings(image_size=64, scales=[1.0], dtype="float32")
    build_image_index(tmp_path / "idx", sorted(folder.iterdir()), model, settings, num_workers=0, progress=False)
    index = ImageIndex.open(tmp_path / "idx")
    queries = [str(folder / "p00.png"), str(folder / "p07.png")]
    steps = ["qe:k=2", "superglobal:m=8,k=2,kq=2"]
    out = tmp_path / "out.json"
    assert main(["search", "--index", str(tmp_path / "idx"), *queries, "--topk", "5", "--workers", "0",
                 "--no-progress", "--json", str(out), "--post", *steps]) == 0
    data = json.loads(out.read_text())
    assert [s["name"] for s in data["post"]] == ["qe", "superglobal"] and data["engine"] == "torch"
    # the same pipeline on freshly extracted descriptors of the indexed images
    q = extract(model, queries, settings=settings)
    x = extract(model, index.paths, settings=settings)
    scores, indices = PostProcessing.from_config(steps).search(q, x, 5)
    for entry, s_row, i_row in zip(data["queries"], scores, indices):
        assert [r["path"] for r in entry["results"]] == [index.paths[i] for i in i_row]
        assert [r["score"] for r in entry["results"]] == pytest.approx(s_row.tolist(), abs=1e-5)
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "idx"), queries[0], "--search-params", "nprobe=2",
                 "--post", "qe"]) == 2
    assert "exact" in capsys.readouterr().err
