"""Benchmark: CPU extraction settings swept on this machine, to choose the defaults by measurement.

    python benchmarks/bench_cpu_defaults.py                     # dtop_lite, 40 images, 512 px × 3 scales
    python benchmarks/bench_cpu_defaults.py --threads 1 2 4 --workers 0 1 2 --batches 1 8

Sweeps torch intra-op threads × decoding workers × batch size (per size bucket) for
``extract_to_store`` (what ``dtop extract`` and ``dtop index build`` run) with a CNN-stem model
(random weights: the cost is what matters) on images from the built-in benchmark generator
(photo-like JPEGs, 1024 px longer side, landscape and portrait). Each setting runs ``--repeats``
times after one warm-up run; the table lists the best wall time of each, fastest first, marks
settings with more threads + workers than cores, and ends with the best setting next to the
current defaults (``dtop.engine.runtime.cpu_defaults``), which is where the chosen values go,
and with the memory layout at the best setting: NCHW against channels-last (the CPU default).
Run it on a quiet machine: other load changes the ranking.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import tempfile
import time
from pathlib import Path

import torch

from dtop.apps.synthetic import generate_benchmark
from dtop.data.revisited import RevisitedDataset
from dtop.engine.extract import extract_to_store
from dtop.engine.runtime import Acceleration, available_cores, cpu_defaults
from dtop.engine.settings import ExtractSettings
from dtop.models import build_model, resolve_model_config


def images(folder: Path, n: int) -> list[Path]:
    """``n`` images of the built-in benchmark generator (database images first, then queries)."""
    info = generate_benchmark(folder, n_train_instances=1, n_test_instances=max(1, math.ceil(n / 6)), train_views=1,
                              n_distractors=4, image_size=1024)
    ds = RevisitedDataset(info["root"], info["name"])
    return [*ds.database_paths, *ds.query_paths][:n]


def main() -> None:
    cores = available_cores()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dtop_lite", help="model config (default: the EfficientNet-Lite0 hybrid)")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--scales", type=float, nargs="+", default=[1 / math.sqrt(2), 1.0, math.sqrt(2)])
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, max(1, cores - 1), cores}))
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({0, 1, 2, max(1, cores // 4)}))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting (best taken)")
    parser.add_argument("--data", type=Path, default=None, help="folder for the generated images (kept; default: temp)")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = dataclasses.replace(resolve_model_config(args.model), pretrained=None)
    model = build_model(config).eval()
    settings = ExtractSettings(image_size=args.image_size, scales=args.scales)
    defaults = cpu_defaults(cores)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp) / "data"
        paths = images(folder, args.images)
        print(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), {len(paths)} "
              f"images, image size {args.image_size}, scales {[round(s, 4) for s in settings.scales]}; {cores} CPU "
              f"cores; torch {torch.__version__}; best of {args.repeats} after a warm-up")

        def run(threads: int, workers: int, batch: int, channels_last: bool | None = None) -> float:
            start = time.perf_counter()
            extract_to_store(model, paths, Path(tmp) / "store", settings=settings, batch_size=batch,
                             num_workers=workers, torch_threads=threads, device="cpu", amp="none",
                             overwrite=True, progress=False, shard_size=len(paths),
                             acceleration=Acceleration(channels_last=channels_last))
            return time.perf_counter() - start

        run(defaults.torch_threads or 1, defaults.num_workers, defaults.batch_size)  # warm-up
        results = []
        for threads, workers, batch in itertools.product(args.threads, args.workers, args.batches):
            best = min(run(threads, workers, batch) for _ in range(args.repeats))
            results.append((best, threads, workers, batch))
            print(f"  threads {threads}, workers {workers}, batch {batch}: {best:.1f} s", flush=True)
        # the memory layout (default: channels-last on the CPU) at the best setting, NCHW against NHWC
        _, b_threads, b_workers, b_batch = min(results)
        layout = {cl: min(run(b_threads, b_workers, b_batch, cl) for _ in range(args.repeats)) for cl in (False, True)}
    results.sort()
    fastest = results[0][0]
    print(f"\n{'threads':>8}{'workers':>9}{'batch':>7}{'s':>9}{'img/s':>8}{'x best':>8}")
    for seconds, threads, workers, batch in results:
        notes = []
        if threads + workers > cores:
            notes.append("more threads + workers than cores")
        if (threads, workers, batch) == (defaults.torch_threads, defaults.num_workers, defaults.batch_size):
            notes.append("current default")
        print(f"{threads:>8}{workers:>9}{batch:>7}{seconds:>9.1f}{len(paths) / seconds:>8.2f}{seconds / fastest:>8.2f}"
              f"  {'; '.join(notes)}")
    best, threads, workers, batch = results[0]
    print(f"\nbest: {threads} torch thread(s), {workers} decoding worker(s), batch {batch} ({best:.1f} s)")
    print(f"current defaults (dtop.engine.runtime.cpu_defaults): {defaults.describe()}")
    current = [r for r in results if (r[1], r[2], r[3]) == (defaults.torch_threads, defaults.num_workers,
                                                             defaults.batch_size)]
    if current:
        print(f"the defaults take {current[0][0] / best:.2f}x the best time")
    print(f"memory layout at the best setting: NCHW {layout[False]:.1f} s, channels-last {layout[True]:.1f} s "
          f"(channels-last / NCHW = {layout[True] / layout[False]:.2f}x)")


if __name__ == "__main__":
    main()
