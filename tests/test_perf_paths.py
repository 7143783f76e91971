"""The fast paths against the plain definitions: rank counting, running top k, one-pass scoring, float16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtop.data.gnd import GroundTruth, load_gnd
from dtop.retrieval import positions as positions_mod
from dtop.retrieval import search as search_mod
from dtop.retrieval.metrics import evaluate, evaluate_scores, positions_from_scores, score_and_search
from dtop.retrieval.search import RunningTopK, iter_scores, search

DATA = Path("/work/shared/data/revisitop")
if not DATA.is_dir():
    DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "revisitop"
needs_data = pytest.mark.skipif(not (DATA / "gnd_roxford5k.pkl").is_file(), reason="no real ground truth")


def stable_positions(scores: np.ndarray) -> np.ndarray:
    """Position of every image in each row's ranking: the tie rule, made explicit."""
    return np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1, kind="stable")


def grid_descriptors(n: int, dim: int, seed: int, levels: int = 1024) -> np.ndarray:
    """L2-normalised rows rounded to multiples of 1/levels: exact float32 scores, frequent ties."""
    x = np.random.default_rng(seed).standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (np.round(x * levels) / levels).astype(np.float32)


def small_gnd(n_db: int, n_queries: int, seed: int) -> GroundTruth:
    rng = np.random.default_rng(seed)
    gnd = []
    for q in range(n_queries):
        chosen = rng.choice(n_db, size=int(rng.integers(0, 40)), replace=False).tolist()
        a, b = len(chosen) // 3, 2 * len(chosen) // 3
        if q == 0:  # a query without any image of interest
            chosen, a, b = [], 0, 0
        gnd.append({"bbx": None, "easy": chosen[:a], "hard": chosen[a:b], "junk": chosen[b:]})
    return GroundTruth([f"db{i}" for i in range(n_db)], [f"q{i}" for i in range(n_queries)], gnd, "small")


# ------------------------------------------------------------------------------ rank counting


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_queries=st.integers(1, 6),
    n_images=st.integers(1, 300),
    values=st.sampled_from([3, 10, 1000]),
    threads=st.integers(1, 3),
    piece=st.sampled_from([1, 7, 64, 1 << 16]),
    sparse=st.sampled_from([0.0, 0.3, 1.0]),
    top=st.booleans(),
    overlap=st.booleans(),
)
def test_positions_equal_a_stable_sort(
    seed: int, n_queries: int, n_images: int, values: int, threads: int, piece: int, sparse: float, top: bool,
    overlap: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(-values, values, size=(n_queries, n_images)).astype(np.float32) / 8
    interest = [rng.choice(n_images, size=int(rng.integers(0, n_images + 1)), replace=True) for _ in range(n_queries)]
    if top:  # images of interest among the best: most scores lie below every threshold
        interest = [np.argsort(-row)[: int(rng.integers(0, 6))] for row in scores]
    cuts = np.sort(rng.integers(0, n_images + 1, size=int(rng.integers(0, 5))))
    blocks = np.split(scores, cuts, axis=1)
    expected = stable_positions(scores)
    # several pieces per row (the hot path across pieces); compacted pieces always, sometimes, never
    monkeypatch.setattr(positions_mod, "ROW_PIECE", piece)
    monkeypatch.setattr(positions_mod, "SPARSE_SHARE", sparse)
    source = positions_mod.ScoreBlocks(b.copy() for b in blocks) if overlap else blocks
    got = positions_from_scores(source, interest, threads=threads)
    for q in range(n_queries):
        assert got[q].tolist() == expected[q, np.unique(interest[q])].tolist()


def test_positions_threads_agree_on_continuous_scores() -> None:
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((9, 50_000)).astype(np.float32)
    interest = [rng.choice(4000, 120, replace=False) for _ in range(9)]
    one = positions_from_scores(scores, interest, threads=1)
    two = positions_from_scores(scores, interest, threads=2)
    expected = stable_positions(scores)
    for q in range(9):
        assert one[q].tolist() == two[q].tolist() == expected[q, np.unique(interest[q])].tolist()


def test_positions_float64_neighbours() -> None:
    # equal-looking float64 values a float32 comparison would tie: counted in float64
    base = 0.3
    scores = np.array([[base, np.nextafter(base, 1), np.nextafter(base, 0), base]], dtype=np.float64)
    assert positions_from_scores(scores, [[0, 1, 2, 3]])[0].tolist() == [1, 0, 3, 2]


# ------------------------------------------------------------------------------- running top k


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_rows=st.integers(1, 5),
    n_cols=st.integers(1, 400),
    k=st.integers(1, 450),
    values=st.sampled_from([2, 20, 10_000]),
)
def test_running_topk_equals_a_stable_sort(seed: int, n_rows: int, n_cols: int, k: int, values: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(-values, values, size=(n_rows, n_cols)).astype(np.float32)
    cuts = np.sort(rng.integers(0, n_cols + 1, size=int(rng.integers(0, 6))))
    best = RunningTopK(k)
    for block in np.split(scores, cuts, axis=1):
        best.update(torch.from_numpy(block))
    values_out, indices = best.result()
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_array_equal(values_out, np.take_along_axis(scores, order, 1))


def test_search_on_many_blocks_with_ties() -> None:
    q = grid_descriptors(40, 16, 1, levels=4)
    x = grid_descriptors(5000, 16, 2, levels=4)  # scores take few values: ties everywhere
    s = q.astype(np.float64) @ x.astype(np.float64).T
    for chunk_size, k in ((37, 5), (512, 100), (5000, 1)):
        _, idx = search(q, x, k, chunk_size=chunk_size)
        np.testing.assert_array_equal(idx, np.argsort(-s, axis=1, kind="stable")[:, :k])


# ------------------------------------------------------------------------------ one-pass path


@pytest.mark.parametrize("chunk_size", [97, 1000, None])
def test_score_and_search_equals_the_two_passes(chunk_size: int | None) -> None:
    gnd = small_gnd(600, 12, 3)
    q = grid_descriptors(12, 24, 4, levels=8)
    x = grid_descriptors(2600, 24, 5, levels=8)  # database + distractors, many equal scores
    results, top = score_and_search(q, [x[:600], x[600:]], gnd, topk=50, chunk_size=chunk_size)
    assert results == evaluate_scores(iter_scores(q, x), gnd)
    np.testing.assert_array_equal(top, search(q, x, 50)[1])
    ranks = np.argsort(-(q.astype(np.float64) @ x.astype(np.float64).T), axis=1, kind="stable").T
    assert results == evaluate(ranks, gnd)
    np.testing.assert_array_equal(top, ranks[:50].T)


def test_score_and_search_topk_larger_than_the_database() -> None:
    gnd = small_gnd(30, 4, 6)
    q, x = grid_descriptors(4, 8, 7), grid_descriptors(30, 8, 8)
    _, top = score_and_search(q, x, gnd, topk=100)
    assert top.shape == (4, 30)


@needs_data
def test_score_and_search_real_ground_truth() -> None:
    gnd = load_gnd(DATA / "gnd_roxford5k.pkl")
    q = grid_descriptors(gnd.n_queries, 32, 1)
    x = grid_descriptors(gnd.n_database + 3000, 32, 2)
    for i, g in enumerate(gnd.gnd):  # easy images near their query
        x[g["easy"]] = np.round((x[g["easy"]] + q[i]) * 256) / 256
    results, top = score_and_search(q, x, gnd, topk=100)
    ranks = np.argsort(-(q.astype(np.float64) @ x.astype(np.float64).T), axis=1, kind="stable").T
    assert results == evaluate(ranks, gnd)
    assert results["easy"]["map"] > 0.2
    np.testing.assert_array_equal(top, ranks[:100].T)


# ------------------------------------------------------------------------------------ float16


def test_float16_chunks_are_converted_into_one_reused_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_mod, "CONVERT_BUDGET", 64 * 10)  # 10 rows of dimension 64
    x = grid_descriptors(95, 64, 0).astype(np.float16)
    chunks = list(search_mod._iter_chunks([x], 1000, torch.device("cpu"), torch.float32))
    assert [offset for offset, _ in chunks] == list(range(0, 95, 10))
    assert len({chunk.data_ptr() for _, chunk in chunks}) == 1  # one buffer, never the whole matrix
    assert all(chunk.dtype == torch.float32 for _, chunk in chunks)
    # float32 numpy needs no copy at all: the chunks are views of the store
    x32 = x.astype(np.float32)
    first = next(search_mod._iter_chunks([x32], 40, torch.device("cpu"), torch.float32))[1]
    assert first.data_ptr() == x32.ctypes.data


def test_float16_store_equals_its_float32_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_mod, "CONVERT_BUDGET", 24 * 100)
    gnd = small_gnd(500, 8, 9)
    q = np.random.default_rng(1).standard_normal((8, 24)).astype(np.float32)
    x16 = np.random.default_rng(2).standard_normal((1500, 24)).astype(np.float16)
    x32 = x16.astype(np.float32)  # the same values: float16 -> float32 is exact
    r16, top16 = score_and_search(q, x16, gnd, topk=20)
    r32, top32 = score_and_search(q, x32, gnd, topk=20)
    assert r16 == r32
    np.testing.assert_array_equal(top16, top32)
    np.testing.assert_array_equal(search(q, torch.from_numpy(x16), 20)[1], top32)


def test_faiss_trains_on_a_bounded_sample_of_float16_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("faiss")
    from dtop.retrieval import faiss_index as faiss_mod
    from dtop.retrieval.faiss_index import FaissIndex

    x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float16)
    parts = [x[:1000], torch.from_numpy(x[1000:2500]), x[2500:]]
    seen: list[np.ndarray] = []
    index = FaissIndex(16, factory="IVF4,Flat", search_params="nprobe=4")
    monkeypatch.setattr(faiss_mod, "TRAIN_PER_DIM", 50)  # at most max(50 * 16, 256 * 4) = 1024 rows
    original = index.index.train
    monkeypatch.setattr(index.index, "train", lambda data: (seen.append(data), original(data))[1])
    index.add(parts)
    assert seen[0].dtype == np.float32 and seen[0].shape == (1024, 16)
    rows = np.unique(np.linspace(0, 2999, 1024).round().astype(np.int64))
    np.testing.assert_array_equal(seen[0], x[rows].astype(np.float32))  # evenly spaced, across the parts
    assert index.ntotal == 3000
    # nprobe = nlist: exhaustive, so the same lists as exact search on the float32 values
    q = x[:7].astype(np.float32)
    np.testing.assert_array_equal(index.search(q, 5)[1], search(q, x, 5)[1])


def test_post_processing_keeps_a_float16_store_float16() -> None:
    from dtop.retrieval.postprocess import PostProcessing, alpha_database_augmentation
    from dtop.retrieval.whitening import fit_pca_whitening

    rng = np.random.default_rng(3)
    x = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((600, 32))).float(), dim=1)
    x16 = x.half()
    white = fit_pca_whitening(x16)
    w16, w32 = white.apply(x16), white.apply(x16.float())
    assert w16.dtype == torch.float16 and w32.dtype == torch.float32
    assert torch.allclose(w16.float(), w32, atol=2e-3)  # computed in float32, rounded once
    dba16 = alpha_database_augmentation(x16, k=3)
    assert dba16.dtype == torch.float16
    assert torch.allclose(dba16.float(), alpha_database_augmentation(x16.float(), k=3), atol=2e-3)
    pp = PostProcessing.from_config(["whiten:fit=database", "dba:k=3", "qe:k=2"])
    q, db = pp.process(x16[:20], x16)
    assert db.dtype == torch.float16 and q.dtype == torch.float32  # queries are few: float32


def _tiny_benchmark_results(root: Path, dtype: str, post: list[str] | None) -> dict:
    from dtop.data.revisited import RevisitedDataset
    from dtop.engine.evaluate import evaluate_model
    from dtop.engine.settings import ExtractSettings
    from dtop.models import build_model

    torch.manual_seed(0)
    model = build_model("dtop_tiny").eval()
    ds = RevisitedDataset(root / "data", "dtop-mini")
    settings = ExtractSettings(image_size=64, scales=[1.0], dtype=dtype)
    out = evaluate_model(model, ds, root / f"cache-{dtype}", settings, post=post, topk=10, num_workers=0,
                         progress=False)
    return out["results"]["dtop-mini"]


@pytest.mark.slow
def test_float16_store_map_equals_float32_on_the_builtin_benchmark(tmp_path: Path) -> None:
    from dtop.apps.synthetic import generate_benchmark

    generate_benchmark(tmp_path / "data", n_train_instances=1, n_test_instances=8, train_views=1,
                       n_distractors=30, image_size=64)
    for post in (None, ["whiten:fit=database", "dba:k=2", "qe:k=2"]):
        r32 = _tiny_benchmark_results(tmp_path, "float32", post)
        r16 = _tiny_benchmark_results(tmp_path, "float16", post)
        for protocol in ("easy", "medium", "hard"):
            assert abs(r16[protocol]["map"] - r32[protocol]["map"]) * 100 <= 0.05, (post, protocol)


@pytest.mark.slow
def test_image_index_on_a_float16_store(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    pytest.importorskip("faiss")
    from PIL import Image

    from dtop.apps.index import build_image_index
    from dtop.engine.settings import ExtractSettings

    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        path = tmp_path / "photos" / f"p{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).resize((96, 80)).save(path)
        paths.append(path)
    found = {}
    settings = ExtractSettings(image_size=64, scales=[1.0], dtype="float16")
    for engine in ("torch", "faiss"):
        index, _ = build_image_index(tmp_path / engine, paths, tiny_model, settings, engine=engine)
        assert index._database().parts[0].dtype == np.float16
        results = index.query(paths[:4], topk=3)
        found[engine] = [r.paths for r in results]
        assert [r.paths[0] for r in results] == [str(p) for p in paths[:4]]  # each finds itself first
    assert found["torch"] == found["faiss"]


# ------------------------------------------------------------------------- model FLOPs, kernels


def test_flops_are_counted_with_attention() -> None:
    from dtop.engine.profiling import count_flops

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)  # 16x16 -> 4x4 tokens of 8 channels

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.conv(x).flatten(2).transpose(1, 2).reshape(x.shape[0], 16, 2, 4).transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(t, t, t)

    flops = count_flops(Block(), [(2, 3, 16, 16)])[(2, 3, 16, 16)]
    conv = 2 * (2 * 8 * 4 * 4) * (3 * 4 * 4)  # 2 per multiply-add, per output value
    attention = 2 * 2 * (2 * 16 * 16 * 4) * 2  # Q K^T and A V: 2 N^2 d each, per head and image
    assert flops == conv + attention


def test_device_peaks() -> None:
    from dtop.engine.profiling import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989 and peak_tflops("NVIDIA H200") == 989
    assert peak_tflops("NVIDIA H100 PCIe") == 756 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops("NVIDIA L4") == 121 and peak_tflops("NVIDIA A10") == 125
    assert peak_tflops("NVIDIA GeForce RTX 4090") == 165 and peak_tflops("NVIDIA L40S") == 362
    assert peak_tflops("NVIDIA A10G") == 70 and peak_tflops("Some Future GPU") is None


@pytest.mark.parametrize("locality", ["conv-ffn", "local-attention"])
def test_attention_runs_a_fused_kernel_at_every_scale(locality: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from torch.nn.attention import SDPBackend

    from dtop.engine import profiling
    from dtop.engine.settings import ExtractSettings
    from dtop.models import build_model, resolve_model_config

    config = dataclasses.replace(resolve_model_config("dtop_tiny"), pretrained=None, locality=locality)
    model = build_model(config).eval()
    settings = ExtractSettings(image_size=96)
    from dtop.data.images import target_size

    shapes = [(1, 3, *target_size(128, 96, settings.image_size * s)[::-1]) for s in settings.scales]
    kernels = profiling.attention_kernels(model, shapes, torch.device("cpu"))
    assert all(kernels[s] == ["flash"] for s in shapes), kernels  # the CPU's fused kernel, never math
    # the check sees a fallback: with only a kernel the CPU lacks before math, math would run
    monkeypatch.setattr(profiling, "_fused_before_math", lambda: [SDPBackend.EFFICIENT_ATTENTION])
    assert profiling.attention_kernels(model, shapes[:1], torch.device("cpu")) == {shapes[0]: []}
    cnn = build_model(dataclasses.replace(resolve_model_config("gem_cnn_lite"), pretrained=None)).eval()
    assert profiling.attention_kernels(cnn, shapes[:1], torch.device("cpu")) == {shapes[0]: ["none needed"]}


# ------------------------------------------------------------------ acceleration, CPU defaults


def _photos(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        size = (80, 64) if i % 2 else (64, 80)
        Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)).resize(size).save(folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    return paths


def test_extraction_acceleration_options(tmp_path: Path, tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from dtop.engine.extract import extract_to_store
    from dtop.engine.runtime import Acceleration
    from dtop.engine.settings import ExtractSettings

    paths = _photos(tmp_path / "img", 4)
    settings = ExtractSettings(image_size=64)
    plain = extract_to_store(tiny_model, paths, tmp_path / "plain", settings=settings, num_workers=0,
                             progress=False, acceleration=Acceleration(channels_last=False)).load()[0]
    nhwc = extract_to_store(tiny_model, paths, tmp_path / "nhwc", settings=settings, num_workers=0, progress=False,
                            acceleration=Acceleration(channels_last=True)).load()[0]
    assert torch.allclose(plain, nhwc, atol=1e-5)
    assert all(p.is_contiguous() for p in tiny_model.parameters())  # the model is given back as it came
    compiled: list[dict] = []

    def fake_compile(model: torch.nn.Module, **options: object) -> torch.nn.Module:
        compiled.append(options)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    threads = torch.get_num_threads()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dtop"):
        again = extract_to_store(tiny_model, paths, tmp_path / "compiled", settings=settings, num_workers=0,
                                 torch_threads=1, progress=False, acceleration=Acceleration(compile=True)).load()[0]
    assert compiled == [{"dynamic": True}]  # once, shapes dynamic across the size buckets
    assert torch.allclose(again, plain, atol=1e-5)  # one torch thread: other summation orders
    assert torch.get_num_threads() == threads  # restored
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("extraction on")]
    assert lines == ["extraction on cpu: batch size 1, 0 decoding workers, 1 torch thread, torch.compile"]


def test_cpu_defaults() -> None:
    from dtop.engine.runtime import ExtractionDefaults, cpu_defaults, extraction_defaults

    assert cpu_defaults(2) == ExtractionDefaults(batch_size=1, num_workers=0, torch_threads=2)
    assert cpu_defaults(1) == ExtractionDefaults(batch_size=1, num_workers=0, torch_threads=1)
    assert cpu_defaults(8) == ExtractionDefaults(batch_size=1, num_workers=1, torch_threads=7)
    cpu = torch.device("cpu")
    given = extraction_defaults(cpu, batch_size=4, num_workers=64)
    assert (given.batch_size, given.num_workers, given.torch_threads) == (4, 64, 1)  # never more threads than cores
    gpu = extraction_defaults(torch.device("cuda"))
    assert gpu.batch_size == 8 and gpu.torch_threads is None
    assert cpu_defaults(2).describe() == "batch size 1, 0 decoding workers, 2 torch threads"
    assert cpu_defaults(4).describe() == "batch size 1, 1 decoding worker, 3 torch threads"


def test_cli_extraction_defaults_come_from_the_device() -> None:
    from dtop.cli.main import build_parser

    parser = build_parser()
    for argv in (["extract", "--model", "dtop_tiny", "--images", "x", "--out", "y"],
                 ["index", "build", "--model", "dtop_tiny", "--images", "x", "--out", "y"]):
        args, _ = parser.parse_known_args(argv)
        assert args.batch_size is None and args.workers is None, argv
    args, _ = parser.parse_known_args(["extract", "--model", "dtop_tiny", "--images", "x", "--out", "y", "--compile"])
    assert args.compile is True
