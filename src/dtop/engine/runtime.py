"""Where a run computes: the device, autocast and the ``torchrun`` process group, set up in one place."""

from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from dtop.engine.settings import Amp
from dtop.errors import ConfigError

#: An autocast mode with ``auto`` resolved for a device.
ResolvedAmp = Literal["none", "bf16", "fp16"]
_AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """This process's place in a run: its rank, the number of processes and its device."""

    rank: int
    world: int
    device: torch.device


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``auto`` → CUDA when available, else CPU; anything else as torch reads it, checked to exist."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device!r}: no CUDA GPU is available here; use cpu (or auto)")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: Apple's MPS is not available here; use cpu (or auto)")
    return dev


def resolve_amp(amp: str, device: torch.device) -> ResolvedAmp:
    """The autocast mode ``amp`` on ``device``: ``auto`` is bf16 on CUDA and none elsewhere."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    for mode in get_args(ResolvedAmp):
        if amp == mode:
            return mode
    raise ConfigError(f"amp must be one of {', '.join(get_args(Amp))}, got {amp!r}")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device`` (None: no autocast)."""
    return _AMP_DTYPES[resolve_amp(amp, device)]


def autocast_context(device: torch.device, amp: str) -> AbstractContextManager[object]:
    """The autocast context of ``amp`` on ``device`` (a no-op for ``none``)."""
    dtype = amp_dtype(amp, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def init_distributed(device: str | torch.device | None = "auto") -> Runtime:
    """Join the process group when started by ``torchrun`` and pick this process's device.

    NCCL when the device is a GPU, gloo otherwise. A GPU without an index becomes ``cuda:LOCAL_RANK``
    (made the current device), so each process of a node takes its own GPU. Without ``torchrun``
    this only resolves the device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return Runtime(rank=rank, world=world, device=dev)


def dist_info() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every process of the group (nothing to wait for without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
