"""Forward time of DToP (head + locality) vs the bare timm backbone with the same weights.

    python benchmarks/bench_forward.py [--model dtop_hybrid] [--sizes 512x384 1024x768] [--batches 1 8]
                                       [--device cpu|cuda] [--dtype float32|bfloat16]

Both models run the same timm VisionTransformer weights; the bare backbone is timm's own
``forward_features`` (final norm included), DToP adds locality modules (zero-initialised) and its head.
Runs are interleaved (A, B, A, B, ...) and the median is reported, because this machine is noisy.
Target: DToP / backbone <= 1.10.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from dtop.models import build_model, resolve_model_config
from dtop.models.backbone import create_vit
from dtop.models.locality import is_locality_param
from timing import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dtop_hybrid")
    parser.add_argument("--sizes", nargs="+", default=["512x384", "1024x768"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = dataclasses.replace(resolve_model_config(args.model), pretrained=None)
    torch.manual_seed(0)
    model = build_model(config).to(device).eval()
    bare = create_vit(config).eval()
    bare.load_state_dict({k: v for k, v in model.backbone.state_dict().items() if not is_locality_param(k)})
    bare = bare.to(device)
    print(f"model {args.model} on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), {args.dtype}, median of {args.repeats} interleaved runs")
    print(f"{'size':>10} {'batch':>5} {'backbone s':>11} {'dtop s':>9} {'ratio':>6} {'dtop img/s':>10}")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:
        for size in args.sizes:
            h, w = (int(v) for v in size.split("x"))
            for batch in args.batches:
                x = torch.randn(batch, 3, h, w, device=device)
                model(x), bare.forward_features(x)  # warm-up
                t_bare, t_dtop = [], []
                for _ in range(args.repeats):
                    t_bare.append(timed(lambda: bare.forward_features(x), device)[0])  # noqa: B023
                    t_dtop.append(timed(lambda: model(x), device)[0])  # noqa: B023
                b, d = statistics.median(t_bare), statistics.median(t_dtop)
                print(f"{size:>10} {batch:>5} {b:>11.3f} {d:>9.3f} {d / b:>6.3f} {batch / d:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
