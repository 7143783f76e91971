"""What a model's forward pass costs and runs: FLOPs per input, device peaks, attention kernels.

Used by the extraction benchmark and the GPU checks to report model FLOP utilisation, and by the
tests to check that attention runs a fused kernel at every input size (docs/engine.md).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dtop.engine.runtime import autocast_context

#: Dense bf16 tensor-core peaks in TFLOP/s (no sparsity; FP32 accumulation), from NVIDIA's data
#: sheets (their "with sparsity" figures halved). Matched against the device name in this order
#: (the first pattern found wins, so specific names come before general ones). V100 and T4 have no
#: bf16 tensor cores: their fp16 peak is listed.
PEAK_TFLOPS: list[tuple[str, float]] = [
    (r"GB200|B200", 2250.0),
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL|H200.*NVL", 835.0),
    (r"H100|H200|GH200|H800", 989.0),
    (r"A100|A800", 312.0),
    (r"L40S", 362.0),
    (r"L40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"A10G", 70.0),
    (r"\bA10\b", 125.0),
    (r"A40\b", 150.0),
    (r"RTX 6000 Ada", 364.0),
    (r"RTX A6000", 155.0),
    (r"RTX 4090", 165.0),
    (r"RTX 3090", 71.0),
    (r"V100", 125.0),
    (r"\bT4\b", 65.0),
]

#: Short names of the fused attention kernels.
BACKEND_NAMES = {
    SDPBackend.FLASH_ATTENTION: "flash",
    SDPBackend.EFFICIENT_ATTENTION: "efficient",
    SDPBackend.CUDNN_ATTENTION: "cudnn",
    SDPBackend.MATH: "math",
}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU from its name (``torch.cuda.get_device_name``), None if unknown."""
    for pattern, peak in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peak
    return None


def count_flops(model: torch.nn.Module, shapes: Iterable[tuple[int, ...]]) -> dict[tuple[int, ...], int]:
    """FLOPs (2 per multiply-add) of one forward pass per input shape, attention included.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` on a copy of the model on the
    meta device: no memory for activations, no compute, and attention is counted as the matrix
    products it is (4·N²·d per head) whichever kernel would run it.
    """
    meta = copy.deepcopy(model).to("meta").eval()
    out = {}
    for shape in shapes:
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            meta(torch.empty(shape, device="meta"))
        out[tuple(shape)] = int(counter.get_total_flops())
    return out


def _fused_before_math() -> list[SDPBackend]:
    """The fused backends SDPA tries before falling back to the math kernel, in its priority order."""
    order = [SDPBackend(int(b)) if not isinstance(b, SDPBackend) else b for b in torch._C._get_sdp_priority_order()]
    fused: list[SDPBackend] = []
    for backend in order:
        if backend == SDPBackend.MATH:
            break
        if backend in BACKEND_NAMES:
            fused.append(backend)
    return fused


def _runs_with(model: torch.nn.Module, x: torch.Tensor, backends: Sequence[SDPBackend], amp: str) -> bool:
    try:
        with torch.inference_mode(), sdpa_kernel(list(backends)), autocast_context(x.device, amp):
            model(x)
    except RuntimeError as err:
        if "kernel" in str(err).lower() or "backend" in str(err).lower():
            return False
        raise
    return True


def attention_kernels(
    model: torch.nn.Module, shapes: Iterable[tuple[int, ...]], device: torch.device, amp: str = "none"
) -> dict[tuple[int, ...], list[str]]:
    """Per input shape, the fused attention kernels that can run every attention call of the model.

    Each is tried alone; an empty list means some call would fall back to the math kernel (the
    forward also runs with all fused kernels of SDPA's priority order before math together, which
    is what decides). A model without attention gets ``["none needed"]``.
    """
    fused = _fused_before_math()
    out = {}
    for shape in shapes:
        x = torch.randn(shape, device=device)
        if _runs_with(model, x, [], amp):  # no SDPA backend at all: the model has no attention
            out[tuple(shape)] = ["none needed"]
            continue
        if not fused or not _runs_with(model, x, fused, amp):
            out[tuple(shape)] = []
            continue
        alone = [BACKEND_NAMES[b] for b in fused if _runs_with(model, x, [b], amp)]
        out[tuple(shape)] = alone or ["+".join(BACKEND_NAMES[b] for b in fused)]  # each call its own
    return out
