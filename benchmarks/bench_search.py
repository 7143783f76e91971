"""Benchmark: revisited-protocol scoring at +1M distractors against the bare matrix product.

    python benchmarks/bench_search.py                      # 70 queries, ROxford gnd, +1,000,000
    python benchmarks/bench_search.py --distractors 100000 # quick run

Data: random L2-normalised float32 descriptors (d = 512) for the 70 queries, the database
(the real ROxford5k ground truth when available, else a synthetic one of 5,000 images) and N
distractors, generated in chunks. Each query is pulled towards its easy/hard images so that the
metrics are not trivial. Descriptors are rounded to multiples of 2^-10 after normalisation: every
dot product is then exact in float32 whatever the summation order, so all pipelines see
bit-identical scores and their results are asserted *identical*; ties between equal scores
become common, which exercises the tie rule (equal scores ranked by increasing index).

Timed, interleaved, best of ``--repeats`` (wall and CPU seconds):

- bare matmul: ``Q @ chunk.T`` over the database in the chunks dtop uses, nothing else: the limit;
- dtop scoring: ``evaluate_scores(iter_scores(Q, X), gnd)``: chunked matmul and rank counting;
- dtop evaluate path: ``score_and_search(Q, X, gnd, topk)``: the scoring plus the top-k lists
  that ``dtop evaluate`` saves, in one pass;
- reference (once): numpy matmul of all scores, full stable argsort per query, and the per-query
  loop of revisitop's compute_map for each protocol.

Targets: dtop scoring and the evaluate path <= 1.5x the bare matmul, the bare matmul >= 10x
faster than the reference, peak extra memory <= 0.2x the descriptor matrix.

float16 (``--no-float16`` skips it): the same pipelines on unrounded descriptors stored as
float32 and as float16 (converted chunk by chunk): time, peak memory, and the mAP difference
(target: within 0.05 points).

Memory: "peak extra" is the growth of the process's peak resident set (VmHWM in
/proc/self/status) above the resident set before the step; the peak is reset before each step
by writing 5 to /proc/self/clear_refs (Linux). The machine's other load shows in the timings:
run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dtop.data.gnd import PROTOCOLS, GroundTruth, load_gnd
from dtop.retrieval.metrics import evaluate, evaluate_scores, score_and_search
from dtop.retrieval.search import chunk_rows, iter_scores

DEFAULT_GND = Path(__file__).resolve().parents[2] / "shared" / "data" / "revisitop" / "gnd_roxford5k.pkl"
if not DEFAULT_GND.is_file():
    DEFAULT_GND = Path("/work/shared/data/revisitop/gnd_roxford5k.pkl")
KAPPAS = [1, 5, 10]


# ------------------------------------------------------------------------------------ memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak resident-set growth (bytes) during a block, from /proc/self/status."""

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.reset = True
        except OSError:
            self.reset = False
        self.start = _status_kib("VmRSS")
        self.start_hwm = _status_kib("VmHWM")
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _status_kib("VmHWM")
        base = self.start if self.reset else self.start_hwm
        self.extra = max(0, hwm - base) * 1024


class Step:
    """Best wall and CPU seconds of a repeated step, and its peak extra memory (first run)."""

    def __init__(self, name: str, fn: Callable[[], Any]) -> None:
        self.name, self.fn = name, fn
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.extra = 0
        self.result: Any = None

    def run(self) -> None:
        with PeakMemory() as mem:
            wall, cpu = time.perf_counter(), time.process_time()
            self.result = self.fn()
            self.wall.append(time.perf_counter() - wall)
            self.cpu.append(time.process_time() - cpu)
        if len(self.wall) == 1:
            self.extra = mem.extra

    @property
    def best(self) -> float:
        return min(self.wall)

    def line(self, matrix_bytes: int) -> str:
        return (
            f"{self.name:<52}{self.best:9.2f}{min(self.cpu):9.2f}{self.extra / 2**20:10.1f}"
            f"{self.extra / matrix_bytes:9.3f}"
        )


HEADER = f"{'step':<52}{'wall s':>9}{'cpu s':>9}{'peak MiB':>10}{'x matrix':>9}"


# -------------------------------------------------------------------------------------- data


def synthetic_gnd(n_db: int, n_queries: int, rng: np.random.Generator) -> GroundTruth:
    gnd = []
    for _ in range(n_queries):
        chosen = rng.choice(n_db, size=int(rng.integers(20, 150)), replace=False).tolist()
        a, b = len(chosen) // 3, 2 * len(chosen) // 3
        gnd.append({"bbx": None, "easy": chosen[:a], "hard": chosen[a:b], "junk": chosen[b:]})
    return GroundTruth([f"db{i}" for i in range(n_db)], [f"q{i}" for i in range(n_queries)], gnd, "synthetic")


def normalise(x: np.ndarray, grid: bool) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (np.round(x * 1024) / 1024).astype(np.float32) if grid else x.astype(np.float32)


def make_data(
    gnd: GroundTruth, n_distractors: int, dim: int, seed: int, grid: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Queries and database + distractors; ``grid``: rounded to multiples of 2^-10 (exact scores)."""
    rng = np.random.default_rng(seed)
    n_total = gnd.n_database + n_distractors
    x = np.empty((n_total, dim), dtype=np.float32)
    step = 1 << 16
    for start in tqdm(range(0, n_total, step), desc="generating", unit="chunk", file=sys.stderr):
        stop = min(n_total, start + step)
        x[start:stop] = normalise(rng.standard_normal((stop - start, dim)), grid)
    q = rng.standard_normal((gnd.n_queries, dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for i, g in enumerate(gnd.gnd):  # easy images close to their query, hard ones less so
        for key, weight in (("easy", 0.6), ("hard", 0.25)):
            if g[key]:
                mix = x[g[key]].astype(np.float64) + weight * rng.uniform(0.5, 2.0) * q[i]
                x[g[key]] = normalise(mix, grid)
    return normalise(q, grid), x


# --------------------------------------------------------------------------------- reference


def reference_compute_map(ranks: np.ndarray, gnd: list[dict], kappas: list[int]) -> tuple:
    """revisitop compute_map (per-query loop) with the fix for lists without positives."""
    map_, nq, nempty = 0.0, len(gnd), 0
    aps, pr, prs = np.zeros(nq), np.zeros(len(kappas)), np.zeros((nq, len(kappas)))
    for i in np.arange(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap, recall_step = 0, 1.0 / len(qgnd)
        for j in np.arange(len(pos)):
            rank = pos[j]
            precision_0 = 1.0 if rank == 0 else float(j) / rank
            precision_1 = float(j + 1) / (rank + 1)
            ap += (precision_0 + precision_1) * recall_step / 2.0
        map_ = map_ + ap
        aps[i] = ap
        pos += 1
        for j in np.arange(len(kappas)):
            if len(pos) == 0:
                continue  # prs stays 0 (the reference crashes here)
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    return map_ / (nq - nempty), aps, pr / (nq - nempty), prs


def reference_results(ranks: np.ndarray, gnd: GroundTruth) -> dict:
    out = {}
    for name in PROTOCOLS:
        m, aps, pr, _ = reference_compute_map(ranks, [{"ok": p, "junk": j} for p, j in gnd.protocol(name)], KAPPAS)
        out[name] = {
            "map": float(m),
            "mp": {str(k): float(v) for k, v in zip(KAPPAS, pr)},
            "aps": [None if np.isnan(a) else float(a) for a in aps],
        }
    return out


def reference(q: np.ndarray, x: np.ndarray, gnd: GroundTruth, topk: int) -> tuple[dict, np.ndarray]:
    scores = q @ x.T
    ranks = np.argsort(-scores, axis=1, kind="stable").T
    del scores
    return reference_results(ranks, gnd), np.ascontiguousarray(ranks[:topk].T)


# -------------------------------------------------------------------------------------- steps


def bare_matmul(q: np.ndarray, x: np.ndarray) -> None:
    """The chunked matrix product alone, in dtop's chunks (float32, no conversion)."""
    rows = chunk_rows(x.shape[0], q.shape[0], None)
    qt, xt = torch.from_numpy(q), torch.from_numpy(x)
    with torch.inference_mode():
        for start in range(0, x.shape[0], rows):
            qt @ xt[start : start + rows].T


def table(results: dict) -> str:
    lines = [f"{'protocol':<10}{'mAP':>8}{'mP@1':>8}{'mP@5':>8}{'mP@10':>8}"]
    for name in PROTOCOLS:
        r = results[name]
        lines.append(f"{name:<10}{100 * r['map']:8.2f}" + "".join(f"{100 * v:8.2f}" for v in r["mp"].values()))
    return "\n".join(lines)


def verdict(label: str, value: float, limit: float, at_most: bool, unit: str = "x") -> bool:
    ok = value <= limit if at_most else value >= limit
    sign = "<=" if at_most else ">="
    print(f"  {label:<46}{value:8.2f}{unit}  (target {sign} {limit:g}{unit})  {'met' if ok else 'NOT MET'}")
    return ok


def main_section(args: argparse.Namespace, gnd: GroundTruth) -> bool:
    q, x = make_data(gnd, args.distractors, args.dim, args.seed)
    size = x.nbytes
    print(
        f"{gnd.name}: {gnd.n_queries} queries, {gnd.n_database:,} database + {args.distractors:,} distractors, "
        f"d={args.dim}; descriptor matrix {size / 2**30:.2f} GiB; torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs; best of {args.repeats} interleaved runs"
    )
    warm = x[: gnd.n_database + 1000]  # library initialisation (BLAS, thread pools), not timed
    evaluate_scores(iter_scores(q, warm), gnd, KAPPAS)
    score_and_search(q, warm, gnd, args.topk, KAPPAS)
    rows = chunk_rows(x.shape[0], q.shape[0], None)
    bare = Step(f"bare matmul ({rows:,} rows per chunk)", lambda: bare_matmul(q, x))
    scoring = Step(
        "dtop scoring: evaluate_scores(iter_scores(...))", lambda: evaluate_scores(iter_scores(q, x), gnd, KAPPAS)
    )
    path = Step(
        f"dtop evaluate path: score_and_search(top-{args.topk})",
        lambda: score_and_search(q, x, gnd, args.topk, KAPPAS),
    )
    steps = [bare, scoring, path]
    for _ in range(args.repeats):
        for step in steps:
            step.run()
    ref = Step("reference: numpy matmul + full argsort + loop", lambda: reference(q, x, gnd, args.topk))
    ref.run()
    ref_results, ref_top = ref.result
    assert scoring.result == ref_results, "dtop scoring and the reference disagree"
    assert path.result[0] == ref_results, "the evaluate path and the reference disagree"
    assert np.array_equal(path.result[1], ref_top), "the evaluate path's top-k lists differ from the reference's"
    assert evaluate(path.result[1].T, gnd, KAPPAS) == reference_results(ref_top.T, gnd)
    print("\n" + table(scoring.result) + "   (identical in all pipelines)\n")
    print(HEADER)
    for step in (*steps, ref):
        print(step.line(size))
    print("\ntargets")
    ok = verdict("dtop scoring / bare matmul", scoring.best / bare.best, 1.5, True)
    ok &= verdict("dtop evaluate path / bare matmul", path.best / bare.best, 1.5, True)
    ok &= verdict("reference / bare matmul", ref.best / bare.best, 10, False)
    ok &= verdict("peak extra memory, dtop scoring / matrix", scoring.extra / size, 0.2, True)
    ok &= verdict("peak extra memory, evaluate path / matrix", path.extra / size, 0.2, True)
    print(f"  (speed-up of dtop scoring over the reference: {ref.best / scoring.best:.1f}x)")
    return ok


def float16_section(args: argparse.Namespace, gnd: GroundTruth) -> bool:
    q, x32 = make_data(gnd, args.distractors, args.dim, args.seed, grid=False)
    x16 = x32.astype(np.float16)
    print(
        f"\nfloat16 store vs float32 store (unrounded descriptors; matrix {x32.nbytes / 2**30:.2f} GiB "
        f"vs {x16.nbytes / 2**30:.2f} GiB)"
    )
    steps = {
        dtype: Step(
            f"score_and_search(top-{args.topk}), {dtype} store",
            lambda x=x: score_and_search(q, x, gnd, args.topk, KAPPAS),
        )
        for dtype, x in (("float32", x32), ("float16", x16))
    }
    for _ in range(args.repeats):
        for step in steps.values():
            step.run()
    print(HEADER.replace("x matrix", "x  store"))
    for step, x in zip(steps.values(), (x32, x16)):
        print(step.line(x.nbytes))
    r32, r16 = steps["float32"].result[0], steps["float16"].result[0]
    print(f"\n{'protocol':<10}{'mAP f32':>9}{'mAP f16':>9}{'diff':>8}")
    worst = 0.0
    for name in PROTOCOLS:
        diff = 100 * abs(r16[name]["map"] - r32[name]["map"])
        worst = max(worst, diff)
        print(f"{name:<10}{100 * r32[name]['map']:9.3f}{100 * r16[name]['map']:9.3f}{diff:8.3f}")
    tops = zip(steps["float32"].result[1], steps["float16"].result[1])
    overlap = np.mean([len(np.intersect1d(a, b)) / a.size for a, b in tops])
    print(f"top-{args.topk} overlap float16 vs float32: {100 * overlap:.2f} %")
    print("targets")
    ok = verdict("largest mAP difference float16 - float32", worst, 0.05, True, unit=" pt")
    verdict("time float16 / float32", steps["float16"].best / steps["float32"].best, 1.5, True)
    verdict("peak extra memory float16 / matrix (float16)", steps["float16"].extra / x16.nbytes, 0.2, True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distractors", type=int, default=1_000_000, help="number of distractors (default 1M)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--gnd", type=Path, default=DEFAULT_GND, help="ground truth (default: real ROxford5k)")
    parser.add_argument("--topk", type=int, default=100, help="k of the top-k lists (dtop evaluate keeps 100)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each timed step (best taken)")
    parser.add_argument("--no-float16", action="store_true", help="skip the float16 vs float32 comparison")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gnd = load_gnd(args.gnd) if args.gnd.is_file() else synthetic_gnd(5000, 70, np.random.default_rng(1))
    ok = main_section(args, gnd)
    if not args.no_float16:
        ok &= float16_section(args, gnd)
    print("\nall targets met" if ok else "\nTARGETS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
