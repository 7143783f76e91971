"""The demo's cost: the training step of each demo model in isolation, and (``--full``) the whole demo.

    python benchmarks/bench_demo.py [--repeats 5] [--threads 2] [--full --out runs/bench-demo]

A step is what the demo's trainer runs per optimiser step (batch 32 at 96x96, 150 classes, ArcFace,
backward, AdamW with the demo's parameter groups, channels-last, the CNN fixed up to stride 4),
on a fixed random batch, the models interleaved
and the median reported: on a shared machine, step times measured alone are far steadier than a
whole demo run. Both wall and CPU seconds are printed; on a busy machine the CPU seconds of one
thread (``--threads 1``) tell the work, and a quiet 2-core machine runs about at CPU / 1.7. The
demo's training stages cost ``4 × steps × step`` plus data loading. Target: dtop_lite / cls_lite ≤ 1.15.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench_train_step import Variant
from dtop.apps.demo import FREEZE_STRIDE
from timing import timed

DEMO_MODELS = ("dtop_lite", "cls_lite", "gem_tokens_lite", "gem_cnn_lite")


def step_times(repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of one training step per demo model."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    images, labels = torch.randn(32, 3, 96, 96), torch.randint(0, 150, (32,))
    # the demo's recipe: channels-last, the CNN fixed up to stride 4
    variants = [Variant(name, device, 150, channels_last=True, freeze_stride=FREEZE_STRIDE) for name in DEMO_MODELS]
    for v in variants:
        v.step(images, labels, None)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {v.name: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            wall, cpu, _ = timed(lambda: v.step(images, labels, None), device)  # noqa: B023
            times[v.name].append((wall, cpu))
    return {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="also run the whole demo and print its stage times")
    parser.add_argument("--out", default="runs/bench-demo")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"demo training step, batch 32 × 96x96, CPU, {args.threads} threads, median of {args.repeats}")
    times = step_times(args.repeats)
    print(f"{'model':>16} {'wall s':>8} {'CPU s':>8}")
    for name, (wall, cpu) in times.items():
        print(f"{name:>16} {wall:>8.3f} {cpu:>8.3f}")
    for i, what in enumerate(("wall", "CPU")):
        ratio = times["dtop_lite"][i] / times["cls_lite"][i]
        print(f"ratio dtop_lite / cls_lite step ({what}): {ratio:.3f} (target <= 1.15)")
    if args.full:
        from dtop.apps.demo import run_demo

        result = run_demo(args.out, device="cpu")
        print(result.table)
        print("\n".join(result.stage_lines()))


if __name__ == "__main__":
    main()
