"""Benchmark: post-processing and re-ranking steps, time and memory at +1M, and mAP on the built-in benchmark.

    python benchmarks/bench_rerank.py                          # 70 queries x (5,000 + 1,000,000), d = 512
    python benchmarks/bench_rerank.py --distractors 20000      # quick run
    python benchmarks/bench_rerank.py --steps search qe superglobal   # a subset
    python benchmarks/bench_rerank.py --builtin [--model CKPT] # mAP table on the built-in benchmark

**Time and memory.** Random L2-normalised float32 descriptors (70 queries, 5,000 + N database
vectors, generated in chunks from a fixed seed). Every step runs in its own process (the same
data generated again, not timed), so that its peak memory is its own: "peak extra" is the growth
of the process's peak resident set (``ru_maxrss``) over the step, above the data; the chunked
generation adds at most ~32 MiB to the baseline, so small peaks are under-estimated by that much.
Steps (top-100 lists unless the re-ranking needs more):

- ``search``: plain exact search (the reference point of the ratios);
- ``qe``: αQE (``k=10``) + search; ``dba``: αDBA (``k=10``) of the whole database (offline) + search;
- ``graph``: the offline reciprocal k-NN graph of diffusion (``k=50``), written to a cache folder;
- ``diffusion``: search ``trunc`` deep + diffusion re-ranking (online; the graph is read, not timed);
- ``superglobal``: search 400 deep + SuperGlobal re-ranking.

The offline steps (``dba``, ``graph``) compare every database vector with every other one: their
time grows as (5,000 + N)^2. At 1M they take hours on a small CPU; the summary extrapolates them
from the measured size. Other processes' load shows in the timings: run it on a quiet machine.

**mAP (``--builtin``).** Generates the built-in benchmark (:mod:`dtop.apps.synthetic`), trains the
tiny DToP on its training split for ``--train-steps`` steps (or loads ``--model``), and evaluates
none / αQE / αDBA+αQE / diffusion / SuperGlobal with ``dtop.engine.evaluate.run_evaluation``
(descriptors extracted once, shared cache). The step parameters are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

N_QUERIES, N_DATABASE = 70, 5000
STEPS = ("search", "qe", "dba", "graph", "diffusion", "superglobal")
OFFLINE = ("dba", "graph")
SEARCHES = {"search": 1, "qe": 2, "diffusion": 1, "superglobal": 1}  # searches of the whole database per step
TRAIN_SIZE = 128  # --builtin: training and evaluation image size (single scale)
GEN_CHUNK = 16384  # rows generated at once (float32): bounds what generation adds to the baseline


# ------------------------------------------------------------------------------ one step, child


def make_data(n_total: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random unit queries (70, dim) and database (n_total, dim), float32, generated in chunks."""
    rng = np.random.default_rng(seed)
    x = np.empty((n_total, dim), dtype=np.float32)
    for r0 in range(0, n_total, GEN_CHUNK):
        block = rng.standard_normal((min(GEN_CHUNK, n_total - r0), dim), dtype=np.float32)
        x[r0 : r0 + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    q = rng.standard_normal((N_QUERIES, dim), dtype=np.float32)
    return torch.from_numpy(q / np.linalg.norm(q, axis=1, keepdims=True)), torch.from_numpy(x)


def peak_bytes() -> int:
    """Peak resident set of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_step(step: str, q: torch.Tensor, x: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Run one step on (q, x); returns its wall time and peak extra memory."""
    from dtop.retrieval.diffusion import knn_graph_for
    from dtop.retrieval.postprocess import (
        Diffusion,
        SuperGlobal,
        alpha_database_augmentation,
        alpha_query_expansion,
    )
    from dtop.retrieval.rerank import reranked_search
    from dtop.retrieval.search import search

    diffusion = Diffusion(k=args.graph_k, trunc=args.trunc, cache=str(args.cache) if args.cache else None)
    if step == "diffusion":  # the offline graph is not part of the online step: read it first
        diffusion.graph_for(x)

    def work() -> Any:
        if step == "search":
            return search(q, x, args.topk)
        if step == "qe":
            return search(alpha_query_expansion(q, x, k=10), x, args.topk)
        if step == "dba":
            return search(q, alpha_database_augmentation(x, k=10), args.topk)
        if step == "graph":
            return knn_graph_for(x, k=args.graph_k, cache=args.cache)
        if step == "diffusion":
            return reranked_search(q, x, args.topk, diffusion)
        if step == "superglobal":
            return reranked_search(q, x, args.topk, SuperGlobal())
        raise ValueError(step)

    search(q[:2], x[:1000], 10)  # library initialisation (thread pools), not timed
    base = peak_bytes()
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    return {"step": step, "seconds": seconds, "peak_extra": max(0, peak_bytes() - base)}


def child(args: argparse.Namespace) -> int:
    """Generate the data, run ``args.child`` and print its result as one JSON line."""
    q, x = make_data(N_DATABASE + args.distractors, args.dim, args.seed)
    print(json.dumps(run_step(args.child, q, x, args)), flush=True)
    return 0


# ------------------------------------------------------------------------------- time, parent


def timing(args: argparse.Namespace) -> int:
    """Run every step in its own process and print the table."""
    n_total = N_DATABASE + args.distractors
    matrix = n_total * args.dim * 4
    print(f"{N_QUERIES} queries x ({N_DATABASE:,} + {args.distractors:,}) descriptors, d={args.dim}: "
          f"{matrix / 2**30:.2f} GiB; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-rerank-") as cache:
        for step in args.steps:
            cmd = [sys.executable, __file__, "--child", step, "--distractors", str(args.distractors),
                   "--dim", str(args.dim), "--seed", str(args.seed), "--topk", str(args.topk),
                   "--trunc", str(args.trunc), "--graph-k", str(args.graph_k), "--cache", cache]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"step {step} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"  {step:<12}{r['seconds']:10.2f} s {r['peak_extra'] / 2**20:10.1f} MiB", flush=True)
    plain = next((r["seconds"] for r in results if r["step"] == "search"), None)
    scale = (N_DATABASE + 1_000_000) / n_total
    print(f"\n{'step':<14}{'time (s)':>10}{'x search':>10}{'peak extra (MiB)':>18}{'x matrix':>10}"
          f"{'at 1M (est.)':>16}")
    for r in results:
        ratio = f"{r['seconds'] / plain:10.1f}" if plain else f"{'-':>10}"
        if r["step"] in OFFLINE:
            estimate: float | None = r["seconds"] * scale**2
        else:  # the searches grow with the database, the re-ranking of a fixed depth does not
            estimate = r["seconds"] + SEARCHES[r["step"]] * plain * (scale - 1) if plain else None
        est = f"{estimate / 60:12.1f} min" if estimate is not None else f"{'-':>16}"
        print(f"{r['step']:<14}{r['seconds']:10.2f}{ratio}{r['peak_extra'] / 2**20:18.1f}"
              f"{r['peak_extra'] / matrix:10.2f}{est}")
    print("\n'at 1M (est.)': extrapolated to 5,000 + 1,000,000 vectors, an estimate, not a measurement: "
          "offline steps (dba, graph) quadratically; online steps add their searches (qe 2, the others 1) "
          "scaled linearly.")
    return 0


# --------------------------------------------------------------------------------- mAP, built-in


def builtin(args: argparse.Namespace) -> int:
    """Train (or load) the tiny model, evaluate it with each post-processing on the built-in benchmark."""
    from dtop.apps.synthetic import generate_benchmark
    from dtop.engine.evaluate import run_evaluation
    from dtop.engine.settings import ExtractSettings
    from dtop.models import load_model

    out = Path(args.out)
    bench = generate_benchmark(out / "data")
    if args.model:
        checkpoint = Path(args.model)
    else:
        checkpoint = train_tiny(Path(bench["train_dir"]), out / "train", args.train_steps)
    model = load_model(checkpoint)
    settings = ExtractSettings(image_size=TRAIN_SIZE, scales=[1.0])
    configs = {"none": [], "αQE": [args.qe], "αDBA + αQE": [args.dba, args.qe],
               "diffusion": [args.diffusion], "SuperGlobal": [args.superglobal]}
    rows = []
    for label, post in configs.items():
        folder = out / "evaluation" / label.replace(" ", "").replace("α", "a").replace("+", "_")
        payload = run_evaluation([("tiny", str(checkpoint), model)], bench["root"], bench["name"], folder,
                                 cache_dir=out / "descriptors", settings=settings, post=post, topk=20,
                                 batch_size=32, num_workers=0, device="cpu", progress=False)
        res = next(iter(payload["models"][0]["results"].values()))
        rows.append((label, " ".join(post) or "-", [100 * res[p]["map"] for p in ("easy", "medium", "hard")]))
    print(f"\nbuilt-in benchmark {bench['name']} ({bench['counts']}), model {checkpoint}")
    print(f"{'post-processing':<14}{'E':>8}{'M':>8}{'H':>8}   steps")
    for label, post_text, maps in rows:
        print(f"{label:<14}" + "".join(f"{m:8.2f}" for m in maps) + f"   {post_text}")
    return 0


def train_tiny(data_dir: Path, run_dir: Path, steps: int) -> Path:
    """Train the tiny DToP on the built-in training split for ``steps`` steps (docs/apps.md's recipe)."""
    from dtop.engine.train import train
    from dtop.engine.train_config import load_train_config
    from dtop.models.factory import builtin_config_dir

    base = builtin_config_dir().parent / "train" / "tiny.yaml"
    config = load_train_config(str(base), [
        f"data.root={data_dir}", f"run.out={run_dir}", f"run.max_steps={steps}", "run.device=cpu",
        f"data.train_size={TRAIN_SIZE}", "optim.batch_size=32", "optim.lr=3e-4", "optim.warmup_steps=20",
        f"optim.epochs={-(-steps // 28)}",  # 900 images / 32 a batch: the schedule spans the steps
        "loss.margin=0.0", "loss.scale=16", "run.save_every=100000", "run.progress=false", "data.num_workers=0",
    ])
    summary = train(config)
    print(f"trained the tiny DToP for {summary['steps']} steps", flush=True)
    return run_dir / "last.safetensors"


# --------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distractors", type=int, default=1_000_000, help="N, added to 5,000 vectors (default 1M)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="steps to time (default all)")
    parser.add_argument("--topk", type=int, default=100, help="length of the returned lists")
    parser.add_argument("--trunc", type=int, default=10000, help="diffusion truncation (default 10000)")
    parser.add_argument("--graph-k", type=int, default=50, help="diffusion graph neighbours (default 50)")
    parser.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--builtin", action="store_true", help="the mAP table on the built-in benchmark instead")
    parser.add_argument("--model", help="--builtin: evaluate this checkpoint instead of training one")
    parser.add_argument("--train-steps", type=int, default=300, help="--builtin: training steps (default 300)")
    parser.add_argument("--out", default="runs/bench_rerank", help="--builtin: working folder")
    # the built-in benchmark's database is small (~360 images, <= 5 positives per query): small k
    parser.add_argument("--qe", default="qe:k=3,alpha=3", help="--builtin: the αQE step")
    parser.add_argument("--dba", default="dba:k=3,alpha=3", help="--builtin: the αDBA step")
    parser.add_argument("--diffusion", default="diffusion:k=10,kq=3", help="--builtin: the diffusion step")
    parser.add_argument("--superglobal", default="superglobal:m=100,k=3,kq=3", help="--builtin: the SuperGlobal step")
    args = parser.parse_args()
    if args.child:
        return child(args)
    return builtin(args) if args.builtin else timing(args)


if __name__ == "__main__":
    sys.exit(main())
