"""Extraction throughput from image files on disk vs the model alone on pre-decoded tensors.

    python benchmarks/bench_extract.py [--model dtop_hybrid] [--images 64] [--source 1024x768]
        [--image-size 1024] [--scales 0.7071 1 1.4142] [--batch 8] [--workers 2]
        [--device cpu|cuda] [--amp none|bf16] [--repeats 3]

* **files**: :func:`dtop.engine.extract.extract` on JPEG files (half landscape, half portrait,
  ``--source`` pixels, photo-like content): decoding, multi-scale resizing and normalisation in
  DataLoader workers, bucketed batches, the model, the scale average.
* **tensors**: the same model on the same batches of the same tensors, decoded, resized and
  stacked beforehand (pinned on CUDA): only the model and the host-to-device copies are timed.

Both give the same descriptors (checked). Runs are interleaved and the median is reported. On
CUDA it also reports the first call inside the extraction loop that makes the host wait for the GPU
(expected: none; such a wait per batch leaves the GPU idle while the next batch is fetched).
Target: files / tensors throughput ≥ 0.9 (decoding hidden behind compute). The images/s of the
files run and the implied time for R1M (1,001,001 images) on this device are printed too.
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
    extract,
    input_shapes,
    plan_batches,
)
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


def run_tensors(model, batches, n_items: int, n_scales: int, device, amp) -> torch.Tensor:
    """The model on pre-decoded batches, exactly as extraction runs it on the loaded ones."""
    sums = _Sums(model, n_items, n_scales, device, amp)
    for batch in batches:
        for indices, stacks in batch["groups"]:
            for x in stacks:
                sums.add(indices, x)
    return sums.descriptors()


def host_waits(model, batches, n_items: int, n_scales: int, device, amp) -> str:
    """On CUDA: the first call in the extraction loop that makes the host wait for the GPU, or 'none'.

    Such a wait per batch leaves the GPU idle while the next batch is fetched from the loader.
    """
    sums = _Sums(model, n_items, n_scales, device, amp)
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


def main() -> None:
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
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.model == "stub":
        model = StubModel().to(device).eval()
    else:
        model = build_model(dataclasses.replace(resolve_model_config(args.model), pretrained=None)).to(device).eval()
    settings = ExtractSettings(image_size=args.image_size, scales=args.scales)
    width, height = (int(v) for v in args.source.split("x"))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images, width, height)
        transform = MultiScaleTransform(settings.image_size, settings.scales)
        dataset = ImageListDataset(paths, None, transform)
        decoded = decode_batches(dataset, settings, args.batch, pin=device.type == "cuda")
        megabytes = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{args.model} on {gpu}, torch {torch.__version__}, amp {args.amp}: {args.images} JPEGs "
              f"{args.source} ({megabytes / args.images:.2f} MiB each), image size {args.image_size}, "
              f"scales {[round(s, 4) for s in settings.scales]}, batch {args.batch}, {args.workers} workers; "
              f"median of {args.repeats} interleaved runs")

        def files():
            return extract(model, paths, settings=settings, batch_size=args.batch, num_workers=args.workers,
                           device=device, amp=args.amp)

        def tensors():
            return run_tensors(model, decoded, len(paths), len(settings.scales), device, args.amp)

        tensors()  # warm-up: kernels, allocator, autotuning for every bucket shape
        t_files, t_tensors, c_files, c_tensors = [], [], [], []
        for _ in range(args.repeats):
            t, c, from_files = timed(files, device)
            t_files.append(t)
            c_files.append(c)
            t, c, from_tensors = timed(tensors, device)
            t_tensors.append(t)
            c_tensors.append(c)
        if device.type == "cuda":
            waits = host_waits(model, decoded, len(paths), len(settings.scales), device, args.amp)
            print(f"host waits for the GPU inside the extraction loop: {waits}")
    diff = (from_files - from_tensors).abs().max().item()
    f, m = statistics.median(t_files), statistics.median(t_tensors)
    cf, cm = (1e3 * statistics.median(c) / args.images for c in (c_files, c_tensors))
    print(f"{'run':>8} {'s':>8} {'img/s':>8} {'main-thread CPU ms/img':>23}")
    print(f"{'files':>8} {f:>8.2f} {args.images / f:>8.2f} {cf:>23.1f}")
    print(f"{'tensors':>8} {m:>8.2f} {args.images / m:>8.2f} {cm:>23.1f}")
    print(f"loading work left on the thread that drives the model: {cf - cm:.1f} ms/img")
    print(f"max |descriptor difference| files vs tensors: {diff:.2e}")
    print(f"ratio files / tensors throughput: {m / f:.3f} (target >= 0.9)")
    hours = R1M_IMAGES / (args.images / f) / 3600
    print(f"implied R1M extraction on this device: {hours:.2f} h "
          f"({R1M_IMAGES:,} images at {args.images / f:.1f} img/s)")


if __name__ == "__main__":
    main()
