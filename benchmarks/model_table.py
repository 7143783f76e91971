"""Parameters and GFLOPs of every registered model config (architecture only, no weights).

    python benchmarks/model_table.py [--size 512x384]
"""

from __future__ import annotations

import argparse
import dataclasses

from dtop.models import build_model, list_models, resolve_model_config
from dtop.models.info import count_flops, count_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="512x384", help="HxW")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    print(f"| model | arch | backbone | params (M) | stem | encoder | locality | head | dim | GFLOPs @ {h}x{w} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in list_models():
        model = build_model(dataclasses.replace(resolve_model_config(name), pretrained=None))
        p = count_parameters(model)
        gflops = count_flops(model, h, w) / 1e9
        c = model.config
        print(f"| {name} | {c.arch} | {c.backbone} | {p['total'] / 1e6:.2f} | {p['stem'] / 1e6:.2f} | "
              f"{p['encoder'] / 1e6:.2f} | {p['locality'] / 1e6:.3f} | {p['head'] / 1e6:.2f} | "
              f"{model.descriptor_dim} | {gflops:.1f} |", flush=True)


if __name__ == "__main__":
    main()
