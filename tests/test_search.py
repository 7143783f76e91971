"""Exact chunked search, the tie rule, and the faiss index against exact search."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dtop.errors import ConfigError, DataError
from dtop.retrieval import search as search_mod
from dtop.retrieval.faiss_index import FaissIndex
from dtop.retrieval.search import iter_scores, search, to_ranks


def grid_descriptors(n: int, dim: int, seed: int) -> np.ndarray:
    """L2-normalised random rows rounded to multiples of 2^-10.

    Every product and partial sum of two such rows is an integer multiple of 2^-20 below 2^4 in
    magnitude, hence exact in float32: any summation order (any chunking, BLAS kernel or engine)
    gives bit-identical scores, so exact comparisons are meaningful.
    """
    x = np.random.default_rng(seed).standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (np.round(x * 1024) / 1024).astype(np.float32)


def reference(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full matmul + stable argsort of -scores: the tie rule (equal scores by increasing index)."""
    s = queries.astype(np.float64) @ database.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return grid_descriptors(37, 64, 1), grid_descriptors(3000, 64, 2)


@pytest.mark.parametrize("chunk_size", [1, 7, 256, 1000, 2999, None])
@pytest.mark.parametrize("topk", [1, 10, 300])
def test_chunked_search_equals_full_sort(data: tuple, chunk_size: int | None, topk: int) -> None:
    q, x = data
    scores, idx = search(q, x, topk, chunk_size=chunk_size)
    ref_s, ref_i = reference(q, x, topk)
    assert scores.dtype == np.float32 and idx.dtype == np.int64 and idx.shape == (37, topk)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(scores, ref_s.astype(np.float32))


def test_ties_straddling_chunk_and_k_boundaries() -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(-2, 3, size=(9, 6)).astype(np.float32)
    x = rng.integers(-2, 3, size=(2000, 6)).astype(np.float32)  # scores take few values: ties everywhere
    for chunk_size in (3, 64, 500, None):
        for k in (1, 5, 77, 2000):
            _, idx = search(q, x, k, chunk_size=chunk_size)
            np.testing.assert_array_equal(idx, reference(q, x, k)[1])


def test_inputs_parts_dtypes_and_devices(data: tuple) -> None:
    q, x = data
    ref = reference(q, x, 25)[1]
    # a list of parts is searched as their concatenation, with global indices
    np.testing.assert_array_equal(search(q, [x[:1000], x[1000:1001], x[1001:]], 25, chunk_size=300)[1], ref)
    # torch inputs, float16 (the grid values are exact in float16), float64
    np.testing.assert_array_equal(search(torch.from_numpy(q), torch.from_numpy(x), 25)[1], ref)
    np.testing.assert_array_equal(search(q.astype(np.float16), x.astype(np.float16), 25, device="cpu")[1], ref)
    s64, i64 = search(q.astype(np.float64), x.astype(np.float64), 25)
    assert s64.dtype == np.float64
    np.testing.assert_array_equal(i64, ref)
    # topk larger than the database: everything, ranked
    s, i = search(q[:2], x[:5], 50)
    assert i.shape == (2, 5)
    np.testing.assert_array_equal(i, reference(q[:2], x[:5], 5)[1])
    # query blocks
    np.testing.assert_array_equal(search(q, x, 25, query_chunk_size=4, chunk_size=512)[1], ref)


def test_memory_mapped_database(tmp_path: Path, data: tuple) -> None:
    q, x = data
    np.save(tmp_path / "x.npy", x)
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    np.testing.assert_array_equal(search(q, xm, 10, chunk_size=1000)[1], reference(q, x, 10)[1])


def test_iter_scores_and_ranks_layout(data: tuple) -> None:
    q, x = data
    blocks = list(iter_scores(q, [x[:100], x[100:]], chunk_size=512))
    assert [b.shape[1] for b in blocks] == [100, 512, 512, 512, 512, 512, 340]
    full = torch.cat(blocks, dim=1).numpy()
    np.testing.assert_array_equal(full, (q.astype(np.float64) @ x.astype(np.float64).T).astype(np.float32))
    _, idx = search(q, x, 10)
    ranks = to_ranks(idx)
    assert ranks.shape == (10, 37) and ranks.flags.c_contiguous
    np.testing.assert_array_equal(ranks[:, 3], idx[3])
    assert to_ranks(torch.from_numpy(idx)).dtype == np.int64


def test_default_chunk_is_bounded() -> None:
    # at most 1/8 of the collection (but >= 1024 rows) and at most 65,536 rows per chunk
    assert search_mod.chunk_rows(1_005_993, 70, None) == 65_536
    assert search_mod.chunk_rows(100_000, 70, None) == 12_500
    assert search_mod.chunk_rows(5_000, 70, None) == 1_024
    # the score block stays within the budget when there are many queries
    assert search_mod.chunk_rows(1_000_000, 4096, None) * 4096 <= search_mod.SCORE_BUDGET


def test_search_errors(data: tuple) -> None:
    q, x = data
    with pytest.raises(DataError, match="dimension 32 but the database has 64"):
        search(q[:, :32], x, 5)
    with pytest.raises(ConfigError, match="topk must be at least 1"):
        search(q, x, 0)
    with pytest.raises(DataError, match="2-D"):
        search(q[0], x, 5)
    with pytest.raises(DataError, match="floating-point"):
        search(q, x.astype(np.int32), 5)
    bad = x.copy()
    bad[1500, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        search(q, bad, 5)
    with pytest.raises(DataError, match="database is empty"):
        search(q, x[:0], 5)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            search(q, x, 5, device="cuda")


# ------------------------------------------------------------------------------------- faiss


def test_faiss_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch, data: tuple) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install faiss-cpu.*engine='torch'"):
        FaissIndex(64)
    # exact search does not need faiss
    assert search(data[0], data[1], 5)[1].shape == (37, 5)


def faiss_index(x: np.ndarray, factory: str = "Flat", search_params: str | None = None) -> FaissIndex:
    index = FaissIndex(x.shape[1], factory=factory, search_params=search_params)
    index.add(x)
    return index


def test_faiss_flat_equals_exact_search(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    q = rng.standard_normal((30, 48)).astype(np.float32)
    x = rng.standard_normal((4000, 48)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t_scores, t_idx = search(q, x, 50)
    index = FaissIndex(48, factory="Flat")
    index.add(x[:2500])
    index.add(torch.from_numpy(x[2500:]))
    assert index.ntotal == 4000 and index.dim == 48
    f_scores, f_idx = index.search(q, 50)
    assert f_scores.dtype == np.float32 and f_idx.dtype == np.int64
    np.testing.assert_array_equal(f_idx, t_idx)
    np.testing.assert_allclose(f_scores, t_scores, atol=1e-6)
    index.save(tmp_path / "flat.faiss")
    loaded = FaissIndex.load(tmp_path / "flat.faiss")
    np.testing.assert_array_equal(loaded.search(q, 50)[1], t_idx)


def test_faiss_exact_scores_and_tie_order(data: tuple) -> None:
    pytest.importorskip("faiss")
    q, x = data
    f_scores, f_idx = faiss_index(x).search(q, 40)
    ref_s, ref_i = reference(q, x, 40)
    np.testing.assert_array_equal(f_scores, ref_s.astype(np.float32))  # grid data: exact scores
    # within each returned list, equal scores are ordered by increasing index (the tie rule)
    for s_row, i_row in zip(f_scores, f_idx, strict=True):
        order = np.lexsort((i_row, -s_row.astype(np.float64)))
        np.testing.assert_array_equal(order, np.arange(len(i_row)))


def test_faiss_approximate_and_errors(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    x = grid_descriptors(2000, 32, 7)
    index = faiss_index(x, factory="IVF16,Flat", search_params="nprobe=16")
    s, i = index.search(x[:5], 3)
    assert i.shape == (5, 3)
    assert i[:, 0].tolist() == [0, 1, 2, 3, 4]  # nprobe = nlist: exhaustive, each finds itself
    index.save(tmp_path / "ivf.faiss")
    assert FaissIndex.load(tmp_path / "ivf.faiss").ntotal == 2000
    with pytest.raises(ConfigError, match="faiss cannot build index 'NoSuchIndex'"):
        FaissIndex(32, factory="NoSuchIndex")
    with pytest.raises(ConfigError, match="faiss rejects search parameters 'nosuch=3'"):
        FaissIndex(32, search_params="nosuch=3")
    with pytest.raises(DataError, match="dimension 16, the index has 32"):
        index.add(x[:, :16])
    with pytest.raises(DataError, match="the index is empty"):
        FaissIndex(32).search(x[:2], 3)
    with pytest.raises(DataError, match="index file not found"):
        FaissIndex.load(tmp_path / "missing.faiss")
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(DataError, match="not a readable faiss index"):
        FaissIndex.load(tmp_path / "junk.faiss")
