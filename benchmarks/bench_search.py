"""Benchmark: revisited-protocol scoring at +1M distractors, dtop vs a straightforward reference.

    python benchmarks/bench_search.py                      # 70 queries, ROxford gnd, +1,000,000
    python benchmarks/bench_search.py --distractors 100000 # quick run

Data: random L2-normalised float32 descriptors (d = 512) for the 70 queries, the database
(the real ROxford5k ground truth when available, else a synthetic one of 5,000 images) and N
distractors, generated in chunks. Each query is pulled towards its easy/hard images so that the
metrics are not trivial. Descriptors are rounded to multiples of 2^-10 after normalisation: every
dot product is then exact in float32 whatever the summation order (numpy's BLAS, torch's chunks),
so both pipelines see bit-identical scores and their results can be asserted *identical*; ties
between equal scores become common, which exercises the tie rule (equal scores ranked by
increasing index, i.e. a stable sort of -scores).

- reference: numpy matmul of all scores, full stable argsort per query, and the per-query loop of
  revisitop's compute_map for each protocol;
- dtop: ``evaluate_scores(iter_scores(Q, X), gnd)``: chunked matmul and rank counting, no sort.

Both run once on a small slice first (not timed) so that one-time library initialisation is not
counted. The machine's other load shows in the timings: run it on a quiet machine.

Also timed (not part of the ratio): dtop's exact top-100 ``search`` + ``evaluate`` of the truncated
lists, asserted identical to the reference on its first 100 ranks.

Memory: "peak extra" is the growth of the process's peak resident set (VmHWM in
/proc/self/status) above the resident set before the step; the peak is reset before each step
by writing 5 to /proc/self/clear_refs (Linux). It is reported relative to the size of the
descriptor matrix (database + distractors, float32).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dtop.data.gnd import PROTOCOLS, GroundTruth, load_gnd
from dtop.retrieval.metrics import evaluate, evaluate_scores
from dtop.retrieval.search import iter_scores, search, to_ranks

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


# -------------------------------------------------------------------------------------- data


def synthetic_gnd(n_db: int, n_queries: int, rng: np.random.Generator) -> GroundTruth:
    gnd = []
    for _ in range(n_queries):
        chosen = rng.choice(n_db, size=int(rng.integers(20, 150)), replace=False).tolist()
        a, b = len(chosen) // 3, 2 * len(chosen) // 3
        gnd.append({"bbx": None, "easy": chosen[:a], "hard": chosen[a:b], "junk": chosen[b:]})
    return GroundTruth([f"db{i}" for i in range(n_db)], [f"q{i}" for i in range(n_queries)], gnd, "synthetic")


def quantise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (np.round(x * 1024) / 1024).astype(np.float32)


def make_data(gnd: GroundTruth, n_distractors: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_total = gnd.n_database + n_distractors
    x = np.empty((n_total, dim), dtype=np.float32)
    step = 1 << 16
    for start in tqdm(range(0, n_total, step), desc="generating", unit="chunk", file=sys.stderr):
        stop = min(n_total, start + step)
        x[start:stop] = quantise(rng.standard_normal((stop - start, dim)))
    q = rng.standard_normal((gnd.n_queries, dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for i, g in enumerate(gnd.gnd):  # easy images close to their query, hard ones less so
        for key, weight in (("easy", 0.6), ("hard", 0.25)):
            if g[key]:
                mix = x[g[key]].astype(np.float64) + weight * rng.uniform(0.5, 2.0) * q[i]
                x[g[key]] = quantise(mix)
    return quantise(q), x


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


# -------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distractors", type=int, default=1_000_000, help="number of distractors (default 1M)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--gnd", type=Path, default=DEFAULT_GND, help="ground truth (default: real ROxford5k)")
    parser.add_argument("--topk", type=int, default=100, help="k of the timed top-k search")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gnd = load_gnd(args.gnd) if args.gnd.is_file() else synthetic_gnd(5000, 70, np.random.default_rng(1))
    q, x = make_data(gnd, args.distractors, args.dim, args.seed)
    n_total = x.shape[0]
    print(
        f"{gnd.name}: {gnd.n_queries} queries, {gnd.n_database:,} database + {args.distractors:,} distractors, "
        f"d={args.dim}; descriptor matrix {x.nbytes / 2**30:.2f} GiB; torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs"
    )

    # warm-up, not timed: library initialisation (MKL/OpenBLAS, thread pools) of both pipelines
    warm = x[: gnd.n_database + 1000]
    evaluate_scores(iter_scores(q, warm), gnd, KAPPAS)
    search(q, warm, args.topk)
    reference_results(np.argsort(-(q @ warm.T), axis=1, kind="stable").T, gnd)

    # dtop: scoring without sorting
    with PeakMemory() as mem_dtop:
        t0 = time.perf_counter()
        ours = evaluate_scores(iter_scores(q, x), gnd, KAPPAS)
        t_dtop = time.perf_counter() - t0

    # dtop: exact top-k search + evaluation of the truncated lists (informational)
    with PeakMemory() as mem_search:
        t0 = time.perf_counter()
        _, idx = search(q, x, args.topk)
        ours_topk = evaluate(to_ranks(idx), gnd, KAPPAS)
        t_search = time.perf_counter() - t0

    # reference: all scores, full stable sort, per-query loop
    with PeakMemory() as mem_ref:
        t0 = time.perf_counter()
        scores = q @ x.T
        ranks = np.argsort(-scores, axis=1, kind="stable").T
        del scores
        ref = reference_results(ranks, gnd)
        t_ref = time.perf_counter() - t0
    ref_topk = reference_results(ranks[: args.topk], gnd)
    del ranks

    assert ours == ref, "dtop and the reference disagree"
    assert ours_topk == ref_topk, "top-k search + evaluate disagrees with the reference's first k ranks"

    print(f"\n{'protocol':<10}{'mAP':>8}{'mP@1':>8}{'mP@5':>8}{'mP@10':>8}   (identical in both pipelines)")
    for name in PROTOCOLS:
        r = ours[name]
        print(f"{name:<10}{100 * r['map']:8.2f}" + "".join(f"{100 * v:8.2f}" for v in r["mp"].values()))
    size = x.nbytes
    reset = "" if mem_dtop.reset else " (VmHWM could not be reset: upper bound)"
    print(
        f"\nreference (numpy matmul + full argsort + per-query loop): {t_ref:8.2f} s, peak extra "
        f"{mem_ref.extra / 2**20:8.1f} MiB = {mem_ref.extra / size:.2f}x the descriptor matrix"
    )
    print(
        f"dtop evaluate_scores(iter_scores(...)):                  {t_dtop:8.2f} s, peak extra "
        f"{mem_dtop.extra / 2**20:8.1f} MiB = {mem_dtop.extra / size:.2f}x the descriptor matrix{reset}"
    )
    print(
        f"dtop search(top-{args.topk}) + evaluate (truncated lists):      {t_search:8.2f} s, peak extra "
        f"{mem_search.extra / 2**20:8.1f} MiB = {mem_search.extra / size:.2f}x"
    )
    ratio = t_ref / t_dtop
    print(f"speed-up of dtop scoring: {ratio:.1f}x (target >= 5x); {n_total:,} images x {gnd.n_queries} queries")
    ok = ratio >= 5 and mem_dtop.extra <= 1.5 * size
    print("targets met" if ok else "TARGETS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
