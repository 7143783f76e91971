"""Converting weights of another port of an architecture into timm's key names."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from dtop.errors import CheckpointError
from dtop.models.weights import OPTIONAL_BUFFER_SUFFIX, read_state_dict
from dtop.utils.io import atomic_path


def _role(key: str) -> str:
    """The tensor's role in its layer (``weight``, ``bias``, ``running_mean`` ...)."""
    return key.rsplit(".", 1)[-1]


def convert_by_order(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source: str = "the file"
) -> dict[str, torch.Tensor]:
    """Rename the tensors of ``state`` to the keys of ``target``, pairing them in order.

    Both sides drop BatchNorm's ``num_batches_tracked``; the remaining tensors must pair one to one
    with the same count, the same shape and the same role (``weight``/``bias``/running statistic),
    or :class:`~dtop.errors.CheckpointError` names the first mismatch. Only ports that keep the
    original layer order (EfficientNet-PyTorch and timm's EfficientNets do) convert this way.
    """
    src = [(k, v) for k, v in state.items() if _role(k) != OPTIONAL_BUFFER_SUFFIX]
    dst = [(k, v) for k, v in target.items() if _role(k) != OPTIONAL_BUFFER_SUFFIX]
    if len(src) != len(dst):
        raise CheckpointError(
            f"cannot convert {source}: it has {len(src)} tensors, the target architecture {len(dst)} "
            "(not counting num_batches_tracked); it is the weights of another architecture"
        )
    out: dict[str, torch.Tensor] = {}
    for i, ((ks, vs), (kd, vd)) in enumerate(zip(src, dst)):
        if tuple(vs.shape) != tuple(vd.shape) or _role(ks) != _role(kd):
            raise CheckpointError(
                f"cannot convert {source}: tensor {i} {ks} {tuple(vs.shape)} does not match "
                f"{kd} {tuple(vd.shape)} of the target architecture"
            )
        out[kd] = vs.detach().to(vd.dtype).contiguous().clone()
    return out


@functools.lru_cache(maxsize=4)
def timm_state_dict(architecture: str) -> dict[str, torch.Tensor]:
    """The state dict of timm's ``architecture`` (random weights, classifier included): the target keys.

    Cached (building the network is the slow part); callers only read its keys, shapes and dtypes.
    """
    import timm

    with torch.random.fork_rng(devices=[]):  # do not advance the caller's RNG
        return timm.create_model(architecture, pretrained=False).state_dict()


def convert_weights(src: str | os.PathLike, dst: str | os.PathLike, architecture: str) -> Path:
    """Convert the weights file ``src`` (another port's key names) into a timm-keyed safetensors ``dst``.

    ``dst`` can then be passed as ``model.pretrained`` of a model on ``architecture`` (or, for a
    CNN-stem hybrid, of its stem). Refuses any count, shape or role mismatch.
    """
    from safetensors.torch import save_file

    state = convert_by_order(read_state_dict(src), timm_state_dict(architecture), source=str(src))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"dtop": json.dumps({"converted_from": Path(src).name, "architecture": architecture})}
    with atomic_path(dst) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return dst
