"""Extraction throughput and model FLOP utilisation: from image files vs the model alone.

    python benchmarks/bench_extract.py [--model dtop_hybrid] [--images 64] [--source 1024x768]
        [--image-size 1024] [--scales 0.7071 1 1.4142] [--batch 8] [--workers 2]
        [--device cpu|cuda] [--amp none|bf16] [--repeats 3] [--compile] [--peak-tflops T]

* **files**: :func:`dtop.engine.extract.extract_to_store` on JPEG files (half landscape, half
  portrait, ``--source`` pixels, photo-like content): decoding, multi-scale resizing and
  normalisation in DataLoader workers, bucketed batches, the model, the scale average, the store.
* **model alone**: the same model on the same batches of the same tensors, decoded, resized and
  stacked beforehand (pinned on CUDA): only the model and the host-to-device copies are timed.

Both give the same descriptors (checked). Runs are interleaved and the median is reported.
FLOPs per image are counted with ``torch.utils.flop_counter.FlopCounterMode`` (attention
included) for every input size of the run; achieved TFLOP/s are set against the device's dense
bf16 peak (a table of GPUs in :mod:`dtop.engine.profiling`, or ``--peak-tflops``). Also printed:
the attention kernel each scale's input runs (flash / efficient; "math" is the slow fallback),
how full the planned batches are, the compile time apart from the steady runs with
``--compile``, and on CUDA the first call inside the extraction loop that makes the host wait for
the GPU (expected: none). Targets: the model alone >= 40 % of the peak; files / model alone
throughput >= 0.95; the implied time for R1M (1,001,001 images) on this device is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dtop.data.images import ImageListDataset
from dtop.engine.extract import (
    ExtractSettings,
    MultiScaleTransform,
    _Sums,
    collate_groups,
    extract_to_store,
    input_shapes,
    plan_batches,
)
from dtop.engine.profiling import attention_kernels, count_flops, peak_tflops
from dtop.engine.runtime import Acceleration
from dtop.models import build_model, resolve_model_config
from timing import timed

R1M_IMAGES = 1_001_001


class StubModel(torch.nn.Module):
    """A model that costs almost nothing (mean colour → linear): isolates the loading pipeline.

    With it, the files run's CPU time on the calling thread is the loading work that thread does
    per image; on a GPU that work is what must fit in the model's time for loading to stay hidden.
    """

    def __init__(self, dim: int = 8):
        super().__init__()
        self.fc = torch.nn.Linear(3, dim)
        self.mean, self.std, self.descriptor_dim = [0.5] * 3, [0.25] * 3, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.nn.functional.normalize(self.fc(x.mean(dim=(2, 3))), dim=1)


def write_images(folder: Path, n: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs with smooth structure plus fine texture (photo-like file sizes and decode cost)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (width, height) if i % 2 == 0 else (height, width)
        coarse = rng.random((h // 32 + 1, w // 32 + 1, 3)) * 255
        img = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 12, (h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def decode_batches(dataset: ImageListDataset, settings: ExtractSettings, batch_size: int, pin: bool) -> list:
    """Every batch of the files run, decoded, resized and stacked beforehand (pinned on CUDA)."""
    indices = list(range(len(dataset)))
    batches = []
    for plan in plan_batches(input_shapes(dataset, indices, settings), batch_size):
        batch = collate_groups([(0, i, dataset[i][0]) for i in plan])
        if pin:
            batch["groups"] = [(ix, [x.pin_memory() for x in xs]) for ix, xs in batch["groups"]]
        batches.append(batch)
    return batches


def run_tensors(model, batches, n_items: int, n_scales: int, device, amp, acceleration: Acceleration) -> torch.Tensor:
    """The model on pre-decoded batches, exactly as extraction runs it on the loaded ones."""
    with acceleration.applied(model, device) as forward:
        sums = _Sums(model, n_items, n_scales, device, amp, None, forward, bool(acceleration.channels_last))
        for batch in batches:
            for indices, stacks in batch["groups"]:
                for x in stacks:
                    sums.add(indices, x)
        return sums.descriptors()


def host_waits(model, batches, n_items: int, n_scales: int, device, amp, acceleration: Acceleration) -> str:
    """On CUDA: the first call in the extraction loop that makes the host wait for the GPU, or 'none'.

    Such a wait per batch leaves the GPU idle while the next batch is fetched from the loader.
    """
    with acceleration.applied(model, device) as forward:
        sums = _Sums(model, n_items, n_scales, device, amp, None, forward, bool(acceleration.channels_last))
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in batches:
                for indices, stacks in batch["groups"]:
                    for x in stacks:
                        sums.add(indices, x)
            return "none"
        except RuntimeError as error:
            return str(error).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")


def flops_per_image(model, dataset: ImageListDataset, settings: ExtractSettings) -> list[int]:
    """FLOPs of each image over its scales (one forward pass per scale, batch of one)."""
    shapes = input_shapes(dataset, list(range(len(dataset))), settings)
    distinct = {(1, 3, h, w) for sizes in shapes if sizes is not None for w, h in sizes}
    flops = count_flops(model, sorted(distinct))
    return [sum(flops[(1, 3, h, w)] for w, h in sizes) if sizes is not None else 0 for sizes in shapes]


def batch_fill(dataset: ImageListDataset, settings: ExtractSettings, batch_size: int) -> float:
    """Images per planned batch over the batch size (1.0: every forward pass full)."""
    batches = plan_batches(input_shapes(dataset, list(range(len(dataset))), settings), batch_size)
    return len(dataset) / (len(batches) * batch_size)


def verdict(value: float, target: float) -> str:
    return "met" if value >= target else "NOT MET"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dtop_hybrid", help="a model config, or 'stub' (no compute)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--source", default="1024x768", help="WxH of the JPEG files (ROxf/RPar/R1M: ≤ 1024)")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--scales", type=float, nargs="+", default=[1 / math.sqrt(2), 1.0, math.sqrt(2)])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (dynamic shapes)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last model and inputs (default: on CUDA)")
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
                        help="cuDNN autotuning (default: on CUDA)")
    parser.add_argument("--no-files", action="store_true", help="time the model alone only")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak in TFLOP/s (default: from the table of GPUs)")
    return parser.parse_args()


@dataclasses.dataclass
class Timings:
    """Seconds (wall and calling-thread CPU) of each run, the first run, the descriptors of both."""

    files: list[float] = dataclasses.field(default_factory=list)
    files_cpu: list[float] = dataclasses.field(default_factory=list)
    tensors: list[float] = dataclasses.field(default_factory=list)
    tensors_cpu: list[float] = dataclasses.field(default_factory=list)
    first: float = 0.0
    from_files: torch.Tensor | None = None
    from_tensors: torch.Tensor | None = None


def measure(args, model, settings, acceleration: Acceleration, device, paths, decoded, tmp: Path) -> Timings:
    """Interleaved runs from files and of the model alone (after one warm-up of the model alone)."""

    def files():
        store = extract_to_store(model, paths, tmp / "store", settings=settings, batch_size=args.batch,
                                 num_workers=args.workers, device=device, amp=args.amp, overwrite=True,
                                 progress=False, shard_size=len(paths), acceleration=acceleration)
        return store.load()[0]

    def tensors():
        return run_tensors(model, decoded, len(paths), len(settings.scales), device, args.amp, acceleration)

    out = Timings()
    out.first, _, _ = timed(tensors, device)  # warm-up: kernels, allocator, autotuning (and compiling)
    for _ in range(args.repeats):
        if not args.no_files:
            t, c, out.from_files = timed(files, device)
            out.files.append(t)
            out.files_cpu.append(c)
        t, c, out.from_tensors = timed(tensors, device)
        out.tensors.append(t)
        out.tensors_cpu.append(c)
    return out


def report(args, timings: Timings, total_flops: int, peak: float | None, compiled: bool) -> None:
    """The table of runs, the utilisation of the peak, files / model alone and the R1M time."""
    m = statistics.median(timings.tensors)
    rows = [("model alone", m, statistics.median(timings.tensors_cpu))]
    if timings.files:
        rows.insert(0, ("files", statistics.median(timings.files), statistics.median(timings.files_cpu)))
    print(f"{'run':>12} {'s':>8} {'img/s':>8} {'TFLOP/s':>9} {'% of peak':>10} {'main-thread CPU ms/img':>23}")
    for label, seconds, cpu in rows:
        tflops = total_flops / seconds / 1e12
        share = f"{100 * tflops / peak:9.1f}%" if peak else f"{'n/a':>10}"
        print(f"{label:>12} {seconds:>8.2f} {args.images / seconds:>8.2f} {tflops:>9.3g} {share} "
              f"{1e3 * cpu / args.images:>23.1f}")
    if compiled:
        print(f"compile time (first run minus a steady one): {timings.first - m:.1f} s")
    if peak:
        share = total_flops / m / 1e12 / peak
        print(f"model alone: {100 * share:.1f} % of the {peak:g} TFLOP/s peak (target >= 40 %): {verdict(share, 0.4)}")
    else:
        print("model alone: % of peak n/a (unknown device: pass --peak-tflops)")
    rate = args.images / m
    if timings.files and timings.from_files is not None and timings.from_tensors is not None:
        f = statistics.median(timings.files)
        diff = (timings.from_files - timings.from_tensors).abs().max().item()
        cpu = statistics.median(timings.files_cpu) - statistics.median(timings.tensors_cpu)
        print(f"loading work left on the thread that drives the model: {1e3 * cpu / args.images:.1f} ms/img")
        print(f"max |descriptor difference| files vs model alone: {diff:.2e}")
        print(f"ratio files / model alone throughput: {m / f:.3f} (target >= 0.95): {verdict(m / f, 0.95)}")
        rate = args.images / f
    hours = R1M_IMAGES / rate / 3600
    print(f"implied R1M extraction on this device: {hours:.2f} h ({R1M_IMAGES:,} images at {rate:.1f} img/s"
          f"{', model alone' if not timings.files else ''})")


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.model == "stub":
        model = StubModel().to(device).eval()
    else:
        model = build_model(dataclasses.replace(resolve_model_config(args.model), pretrained=None)).to(device).eval()
    settings = ExtractSettings(image_size=args.image_size, scales=args.scales)
    acceleration = Acceleration(args.compile, args.channels_last, args.cudnn_benchmark).resolved(device)
    width, height = (int(v) for v in args.source.split("x"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = args.peak_tflops if args.peak_tflops is not None else (peak_tflops(name) if device.type == "cuda" else None)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images, width, height)
        dataset = ImageListDataset(paths, None, MultiScaleTransform(settings.image_size, settings.scales))
        decoded = decode_batches(dataset, settings, args.batch, pin=device.type == "cuda")
        megabytes = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{args.model} on {name}, torch {torch.__version__}, amp {args.amp}: {args.images} JPEGs "
              f"{args.source} ({megabytes / args.images:.2f} MiB each), image size {args.image_size}, "
              f"scales {[round(s, 4) for s in settings.scales]}, batch {args.batch}, {args.workers} workers, "
              f"compile {acceleration.compile}, channels-last {acceleration.channels_last}, cudnn benchmark "
              f"{acceleration.cudnn_benchmark}; median of {args.repeats} interleaved runs")
        total_flops = sum(flops_per_image(model, dataset, settings))
        print(f"FLOPs per image over its scales (attention included): {total_flops / args.images / 1e12:.3f} TFLOP")
        print(f"batch fill (images per planned batch / batch size): {batch_fill(dataset, settings, args.batch):.2f}")
        if args.model != "stub":
            shapes = sorted({(1, 3, x.shape[-2], x.shape[-1]) for b in decoded for _, xs in b["groups"] for x in xs})
            for shape, names in attention_kernels(model, shapes, device, args.amp).items():
                print(f"attention kernel at input {shape[-1]}x{shape[-2]}: "
                      f"{', '.join(names) if names else 'MATH FALLBACK (no fused kernel)'}")
        timings = measure(args, model, settings, acceleration, device, paths, decoded, Path(tmp))
        if device.type == "cuda":
            waits = host_waits(model, decoded, len(paths), len(settings.scales), device, args.amp, acceleration)
            print(f"host waits for the GPU inside the extraction loop: {waits}")
    report(args, timings, total_flops, peak, acceleration.compile)


if __name__ == "__main__":
    main()
