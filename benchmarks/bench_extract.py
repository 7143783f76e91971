"""Extraction throughput from image files on disk vs the model alone on pre-decoded tensors (issue 3).

    python benchmarks/bench_extract.py [--model dtop_hybrid] [--images 64] [--source 1024x768]
        [--image-size 1024] [--scales 0.7071 1 1.4142] [--batch 8] [--workers 2]
        [--device cpu|cuda] [--amp none|bf16] [--repeats 3]

* **files**: :func:`dtop.engine.extract.extract` on JPEG files (half landscape, half portrait,
  ``--source`` pixels, photo-like content): decoding, multi-scale resizing and normalisation in
  DataLoader workers, bucketed batches, the model, the scale average.
* **tensors**: the same model on the same bucketed batches of the same tensors, decoded and
  resized beforehand (only the model and the bucketing are timed).

Both give the same descriptors (checked). Runs are interleaved and the median is reported.
Target: files / tensors throughput ≥ 0.9 (decoding hidden behind compute). The images/s of the
files run and the implied time for R1M (1,001,001 images) on this device are printed too.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dtop.data.images import load_image
from dtop.engine.extract import ExtractSettings, MultiScaleTransform, _Bucketer, extract
from dtop.models import build_model, resolve_model_config

R1M_IMAGES = 1_001_001


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


def run_tensors(model, decoded, batch_size, device, amp) -> torch.Tensor:
    """The model on pre-decoded multi-scale tensors, bucketed exactly as extraction buckets them."""
    bucketer = _Bucketer(model, len(decoded), len(decoded[0]), batch_size, device, amp)
    for position, tensors in enumerate(decoded):
        bucketer.add(position, tensors)
    bucketer.flush()
    return bucketer.descriptors()


def timed(fn, device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dtop_hybrid")
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
    config = dataclasses.replace(resolve_model_config(args.model), pretrained=None)
    torch.manual_seed(0)
    model = build_model(config).to(device).eval()
    settings = ExtractSettings(image_size=args.image_size, scales=args.scales)
    width, height = (int(v) for v in args.source.split("x"))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images, width, height)
        transform = MultiScaleTransform(settings.image_size, settings.scales, model.mean, model.std)
        decoded = [transform(load_image(p)) for p in paths]
        megabytes = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{args.model} on {gpu}, torch {torch.__version__}, amp {args.amp}: {args.images} JPEGs "
              f"{args.source} ({megabytes / args.images:.2f} MiB each), image size {args.image_size}, "
              f"scales {[round(s, 4) for s in settings.scales]}, batch {args.batch}, {args.workers} workers; "
              f"median of {args.repeats} interleaved runs")

        def files():
            return extract(model, paths, settings=settings, batch_size=args.batch, num_workers=args.workers,
                           device=device, amp=args.amp)

        def tensors():
            return run_tensors(model, decoded, args.batch, device, args.amp)

        tensors()  # warm-up: kernels, allocator, autotuning for every bucket shape
        t_files, t_tensors = [], []
        for _ in range(args.repeats):
            t, from_files = timed(files, device)
            t_files.append(t)
            t, from_tensors = timed(tensors, device)
            t_tensors.append(t)
    diff = (from_files - from_tensors).abs().max().item()
    f, m = statistics.median(t_files), statistics.median(t_tensors)
    print(f"{'run':>8} {'s':>8} {'img/s':>8}")
    print(f"{'files':>8} {f:>8.2f} {args.images / f:>8.2f}")
    print(f"{'tensors':>8} {m:>8.2f} {args.images / m:>8.2f}")
    print(f"max |descriptor difference| files vs tensors: {diff:.2e}")
    print(f"ratio files / tensors throughput: {m / f:.3f} (target >= 0.9)")
    hours = R1M_IMAGES / (args.images / f) / 3600
    print(f"implied R1M extraction on this device: {hours:.2f} h "
          f"({R1M_IMAGES:,} images at {args.images / f:.1f} img/s)")


if __name__ == "__main__":
    main()
