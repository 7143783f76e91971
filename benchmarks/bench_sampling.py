"""Group-size sampling vs fixed square resizing: pixels per image and wasted / distorted pixels.

For a distribution of aspect ratios (a parameterised mix, or the real images of a folder) it
reports, per image and epoch:

- pixels and ViT tokens (16×16 patches) the model processes, and the relative self-attention
  cost (tokens²);
- fixed square ``S × S``: the aspect change when stretched (``max(a, 1/a) - 1``), which equals
  the fraction of pixels that are interpolated redundancy; the same fraction is padding when
  letterboxed instead, or content cut away when centre-cropped (``1 - min(a, 1/a)``);
- group-size: the aspect-ratio error between an image and its bucket's size (the stretch if
  resized, ``|log(a / a_bucket)|``), the content cut by the centre crop to the bucket's ratio, no
  padding; and the images left out of an epoch by ``drop_last``;
- the time to build the sampler and to iterate one epoch.

Default mix ("ROxford-like", an assumption: Oxford/Paris Flickr photos are mostly 1024×768 or
768×1024, with a few other crops and panoramas) and a small log-normal spread for crops::

    python benchmarks/bench_sampling.py
    python benchmarks/bench_sampling.py --mix "4:3=.5,3:4=.3,16:9=.1,1:1=.05,3:1=.05" --n 1580470
    python benchmarks/bench_sampling.py --folder data/roxford5k/jpg
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from dtop.data.folders import list_images
from dtop.data.images import read_image_sizes
from dtop.data.sampler import FixedSizeBatchSampler, GroupSizeBatchSampler

ROXFORD_LIKE = "4:3=0.62,3:4=0.25,3:2=0.04,2:3=0.02,1:1=0.02,16:9=0.02,3:1=0.03"


def parse_mix(text: str) -> tuple[np.ndarray, np.ndarray]:
    """``"4:3=0.6,3:4=0.3,..."`` → (aspect ratios w/h, probabilities summing to 1)."""
    ratios, probs = [], []
    for part in text.split(","):
        shape, _, p = part.strip().partition("=")
        w, _, h = shape.partition(":")
        ratios.append(float(w) / float(h))
        probs.append(float(p))
    probs_a = np.asarray(probs, dtype=np.float64)
    return np.asarray(ratios), probs_a / probs_a.sum()


def sample_ratios(mix: str, n: int, spread: float, seed: int) -> np.ndarray:
    """``n`` aspect ratios drawn from ``mix`` with a log-normal spread (crops, odd sizes)."""
    rng = np.random.default_rng(seed)
    ratios, probs = parse_mix(mix)
    a = rng.choice(ratios, size=n, p=probs)
    return a * np.exp(rng.normal(0.0, spread, n)) if spread > 0 else a


def folder_ratios(folder: str, workers: int) -> np.ndarray:
    """Aspect ratios of the images of a folder (headers only)."""
    paths = [str(p) for p in list_images(folder)]
    sizes = read_image_sizes(paths, workers=workers, progress=True).astype(np.float64)
    ok = (sizes[:, 0] > 0) & (sizes[:, 1] > 0)
    return sizes[ok, 0] / sizes[ok, 1]


def evaluate(a: np.ndarray, train_size: int, batch_size: int, world: int) -> dict[str, dict[str, float]]:
    """The figures of both samplers for aspect ratios ``a``."""
    out: dict[str, dict[str, float]] = {}
    for name, cls in (("fixed-square", FixedSizeBatchSampler), ("group-size", GroupSizeBatchSampler)):
        t0 = time.perf_counter()
        s = cls(a, batch_size=batch_size, train_size=train_size, world_size=world, drop_last=True)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        used = sum(len(b) for b in s)
        t_iter = time.perf_counter() - t0
        hw = s.size_of().astype(np.float64)
        target = hw[:, 1] / hw[:, 0]
        r = a / target
        log_err = np.abs(np.log(r))
        pixels = hw[:, 0] * hw[:, 1]
        out[name] = {
            "groups": len(s.groups),
            "pixels": float(pixels.mean()),
            "tokens": float((pixels / 256).mean()),
            "attn": float(((pixels / 256) ** 2).mean()),
            # stretching to the target: the aspect change, and the fraction of interpolated pixels
            "stretch_mean": float(np.mean(np.exp(log_err) - 1)),
            "stretch_p95": float(np.percentile(np.exp(log_err) - 1, 95)),
            "stretch_max": float(np.max(np.exp(log_err) - 1)),
            # letterbox padding / centre-crop loss (the same fraction 1 - min(r, 1/r))
            "waste_mean": float(np.mean(1 - np.exp(-log_err))),
            "dropped": 1.0 - used * world / len(a),
            "t_build": t_build,
            "t_iter": t_iter,
        }
    return out


def report(title: str, a: np.ndarray, args: argparse.Namespace) -> None:
    """Print the comparison for aspect ratios ``a``."""
    res = evaluate(a, args.train_size, args.batch_size, args.world_size)
    f, g = res["fixed-square"], res["group-size"]
    print(f"\n== {title}: {len(a)} images, train_size {args.train_size}, batch {args.batch_size}, "
          f"world {args.world_size}")
    print(f"   aspect ratios: median {np.median(a):.3f}, portrait {np.mean(a < 1) * 100:.1f} %, "
          f"panoramas (>2:1 or <1:2) {np.mean((a > 2) | (a < 0.5)) * 100:.1f} %")
    rows = [
        ("groups (sizes)", "groups", "{:.0f}"),
        ("pixels / image", "pixels", "{:,.0f}"),
        ("ViT tokens / image", "tokens", "{:.0f}"),
        ("attention cost / image (tokens²)", "attn", "{:,.0f}"),
        ("stretch if resized: mean", "stretch_mean", "{:.2%}"),
        ("stretch if resized: 95th pct", "stretch_p95", "{:.2%}"),
        ("stretch if resized: max", "stretch_max", "{:.2%}"),
        ("pad (letterbox) or crop loss: mean", "waste_mean", "{:.2%}"),
        ("images dropped per epoch", "dropped", "{:.3%}"),
        ("build sampler [s]", "t_build", "{:.3f}"),
        ("iterate one epoch [s]", "t_iter", "{:.3f}"),
    ]
    print(f"   {'':38s} {'fixed square':>14s} {'group-size':>14s} {'group/fixed':>12s}")
    for label, key, fmt in rows:
        ratio = g[key] / f[key] if f[key] else float("nan")
        ratio_s = f"{ratio:.3f}" if key in ("pixels", "tokens", "attn", "stretch_mean", "waste_mean") else ""
        print(f"   {label:38s} {fmt.format(f[key]):>14s} {fmt.format(g[key]):>14s} {ratio_s:>12s}")
    wasted_f = f["pixels"] * f["waste_mean"]
    print(f"   fixed square wastes {wasted_f:,.0f} pixels / image (padding or interpolated), "
          f"{f['waste_mean']:.1%} of what it processes; group-size processes "
          f"{1 - g['pixels'] / f['pixels']:.1%} fewer pixels with {g['stretch_mean']:.2%} mean aspect error")


def main() -> None:
    """Run the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mix", default=ROXFORD_LIKE, help=f"aspect-ratio mix w:h=weight,... (default {ROXFORD_LIKE})")
    p.add_argument("--n", type=int, default=100_000, help="images drawn from the mix (default 100000)")
    p.add_argument("--spread", type=float, default=0.03, help="log-normal spread around each ratio (default 0.03)")
    p.add_argument("--folder", default=None, help="also measure the real images of this folder")
    p.add_argument("--train-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=16, help="header-reading threads for --folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    report(f"mix {args.mix} (spread {args.spread})", sample_ratios(args.mix, args.n, args.spread, args.seed), args)
    if args.folder:
        report(f"folder {Path(args.folder)}", folder_ratios(args.folder, args.workers), args)


if __name__ == "__main__":
    main()
