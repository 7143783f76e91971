"""Training-step time of DToP vs the same backbone with a plain [CLS] head.

    python benchmarks/bench_train_step.py [--model dtop_hybrid] [--baseline cls_hybrid]
        [--size 512x384] [--batch 4] [--classes 1000] [--device cpu|cuda] [--amp none|bf16]
        [--repeats 3] [--checkpointing]

One step is what :class:`dtop.engine.train.Trainer` runs per optimiser step: forward, ArcFace loss,
backward, gradient clipping, AdamW step with the trainer's own parameter groups. Both models get
the same random batch and labels; runs are interleaved (A, B, A, B, ...) and the median is
reported, because this machine is noisy. Target: DToP / CLS ≤ 1.15.

``--checkpointing`` adds, for the first model, a step with gradient checkpointing, and on CUDA the
peak memory of every variant (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from dtop.engine.losses import build_loss
from dtop.engine.train import TrainModule, param_groups
from dtop.engine.train_parts import freeze_cnn
from dtop.models import build_model, resolve_model_config
from timing import timed


class Variant:
    """A model + loss + optimiser that runs one training step on a fixed batch."""

    def __init__(self, name: str, device: torch.device, classes: int, checkpointing: bool = False,
                 channels_last: bool = False, freeze_stride: int = 0):
        config = dataclasses.replace(resolve_model_config(name), pretrained=None)
        model = build_model(config).to(device).train()
        if checkpointing:
            model.backbone.set_grad_checkpointing(True)
        self.channels_last = channels_last  # as the trainer's run.channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        freeze_cnn(model, freeze_stride)  # as optim.freeze_stride
        loss = build_loss("arcface", embedding_dim=model.descriptor_dim, num_classes=classes).to(device)
        self.name = name + (" +ckpt" if checkpointing else "")
        self.module = TrainModule(model, loss)
        self.optimizer = torch.optim.AdamW(param_groups(model, loss, 1e-4, 0.1, 0.05), lr=1e-4)
        self.params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step(self, images: torch.Tensor, labels: torch.Tensor, amp: torch.dtype | None) -> None:
        """One optimiser step (as the trainer runs it)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = self.module(images, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def peak_memory_gib(variant: Variant, images, labels, amp, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    variant.step(images, labels, amp)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dtop_hybrid")
    parser.add_argument("--baseline", default="cls_hybrid")
    parser.add_argument("--size", default="512x384", help="HxW of the batch")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=1000, help="ArcFace classes (GLDv2-clean: 81313)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--checkpointing", action="store_true", help="also time the model with grad checkpointing")
    args = parser.parse_args()

    device = torch.device(args.device)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    h, w = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, h, w, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    variants = [Variant(args.model, device, args.classes), Variant(args.baseline, device, args.classes)]
    if args.checkpointing:
        variants.append(Variant(args.model, device, args.classes, checkpointing=True))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"train step, batch {args.batch} × {args.size}, {args.classes} classes, amp {args.amp}, "
          f"{gpu}, torch {torch.__version__}; median of {args.repeats} interleaved runs")
    memory = {}
    for v in variants:  # warm-up (allocator, kernels), then the peak memory of one step
        v.step(images, labels, amp)
        memory[v.name] = peak_memory_gib(v, images, labels, amp, device)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            times[v.name].append(timed(lambda: v.step(images, labels, amp), device)[0])  # noqa: B023
    print(f"{'model':>22} {'M params':>9} {'step s':>8} {'img/s':>8} {'peak GiB':>9}")
    for v in variants:
        t = statistics.median(times[v.name])
        mem = f"{memory[v.name]:.2f}" if memory[v.name] is not None else "-"
        print(f"{v.name:>22} {v.params / 1e6:>9.2f} {t:>8.3f} {args.batch / t:>8.1f} {mem:>9}")
    ratio = statistics.median(times[variants[0].name]) / statistics.median(times[variants[1].name])
    print(f"ratio {variants[0].name} / {variants[1].name} step time: {ratio:.3f} (target <= 1.15)")
    if args.checkpointing:
        c = statistics.median(times[variants[2].name]) / statistics.median(times[variants[0].name])
        print(f"ratio with / without gradient checkpointing, step time: {c:.3f}")


if __name__ == "__main__":
    main()
