"""Where a run computes: the device, autocast and the ``torchrun`` process group, set up in one place."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from dtop.engine.settings import Amp
from dtop.errors import ConfigError

log = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------- extraction runtime


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask, e.g. a container's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ExtractionDefaults:
    """Batch size (per size bucket), decoding workers and torch threads (None: torch's own) of an extraction."""

    batch_size: int
    num_workers: int
    torch_threads: int | None

    def describe(self) -> str:
        """One line for the log, e.g. ``batch size 1, 1 decoding worker, 1 torch thread``."""
        def n(count: int, what: str) -> str:
            return f"{count} {what}{'' if count == 1 else 's'}"
        threads = "torch threads as set" if self.torch_threads is None else n(self.torch_threads, "torch thread")
        return f"batch size {self.batch_size}, {n(self.num_workers, 'decoding worker')}, {threads}"


def cpu_defaults(cores: int | None = None) -> ExtractionDefaults:
    """The extraction defaults on a CPU of ``cores`` cores (default: this process's), in one place.

    Chosen by ``benchmarks/bench_cpu_defaults.py`` on a quiet 2-core machine (``dtop_lite``, 40
    JPEGs at 512 px × 3 scales): torch on both cores with the images decoded in the loop took
    11.9 s; one thread beside one decoding worker 19.2 s; two threads beside a worker 16.1 s
    (threads that outnumber the cores wait on each other at every operator). Batch 1 beat batches
    of 4 and 8 at every setting (11.9 against 14.2 and 15.8 s): a CPU gains nothing from batching
    but memory traffic. So: one image per forward pass; on 2 cores or fewer no decoding worker
    (decoding is a few per cent of the model's time); on more, one worker decodes ahead while torch
    takes the other cores.
    """
    cores = cores or available_cores()
    workers = 0 if cores <= 2 else 1
    return ExtractionDefaults(batch_size=1, num_workers=workers, torch_threads=max(1, cores - workers))


#: Extraction defaults on a GPU: batches fill the device; workers decode ahead of it.
GPU_BATCH_SIZE = 8
GPU_WORKERS = 4


def extraction_defaults(
    device: torch.device, batch_size: int | None = None, num_workers: int | None = None,
    torch_threads: int | None = None,
) -> ExtractionDefaults:
    """The given runtime options of an extraction on ``device``, the others from its defaults.

    On the CPU torch gets the cores the decoding workers leave, never more threads than cores.
    """
    cores = available_cores()
    if device.type == "cpu":
        base = cpu_defaults(cores)
        workers = base.num_workers if num_workers is None else num_workers
        threads = torch_threads if torch_threads is not None else max(1, cores - workers)
        return ExtractionDefaults(base.batch_size if batch_size is None else batch_size, workers, threads)
    return ExtractionDefaults(
        GPU_BATCH_SIZE if batch_size is None else batch_size,
        min(GPU_WORKERS, cores) if num_workers is None else num_workers,
        torch_threads,
    )


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` torch intra-op threads (None: unchanged), restored afterwards."""
    previous = torch.get_num_threads()
    if count is not None and count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@dataclass(frozen=True)
class Acceleration:
    """How the model runs during an extraction: ``torch.compile``, channels-last, cuDNN autotuning.

    ``compile`` compiles the model once with dynamic shapes, so the size buckets of an extraction
    share one graph instead of compiling one each (the first batches then take the compile time).
    ``channels_last`` defaults (None) to on for CPU and CUDA, where convolutions of a CNN stem
    run faster in NHWC (1.2x on CPU, measured); ``cudnn_benchmark`` to on for CUDA only.
    """

    compile: bool = False
    channels_last: bool | None = None
    cudnn_benchmark: bool | None = None

    def resolved(self, device: torch.device) -> Acceleration:
        """The options with the device's defaults filled in."""
        cuda = device.type == "cuda"
        return Acceleration(
            self.compile,
            device.type in ("cpu", "cuda") if self.channels_last is None else self.channels_last,
            cuda if self.cudnn_benchmark is None else self.cudnn_benchmark,
        )

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
        """The module to call (compiled if asked), with memory format and cuDNN mode set; restored after."""
        acc = self.resolved(device)
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = bool(acc.cudnn_benchmark)
        if acc.channels_last:
            model.to(memory_format=torch.channels_last)
        try:
            yield torch.compile(model, dynamic=True) if acc.compile else model  # type: ignore[misc]
        finally:
            torch.backends.cudnn.benchmark = previous
            if acc.channels_last:
                model.to(memory_format=torch.contiguous_format)
