"""Reading weights files without unpickling, and resolving ``pretrained`` specs (offline first)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from dtop.errors import CheckpointError, ConfigError, PretrainedWeightsUnavailable

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
#: BatchNorm's step counter: not a weight, and absent from files converted from other frameworks.
OPTIONAL_BUFFER_SUFFIX = "num_batches_tracked"
HUB_PROBE_TIMEOUT_S = 3.0


def is_weights_path(spec: str) -> bool:
    """True if a ``pretrained`` spec names a file rather than a timm tag."""
    return spec.endswith(WEIGHT_SUFFIXES) or os.sep in spec or Path(spec).exists()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a weights file without unpickling arbitrary objects.

    Accepts safetensors files (including dtop checkpoints, whose backbone part is returned with the
    ``backbone.`` prefix removed), and torch files holding a state dict directly or under
    ``state_dict``/``model``/``module``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError ...
            raise CheckpointError(
                f"{path} could not be read as a torch weights file with weights_only=True ({err}). "
                "dtop never unpickles arbitrary objects: convert it to a plain state dict or to "
                ".safetensors first."
            ) from err
        for key in ("state_dict", "model", "module"):
            if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
                obj = obj[key]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
        state = obj
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):  # a dtop checkpoint: keep its backbone
        from dtop.models.locality import is_locality_param

        # without what locality enhancement added: a model inserts its own (as identity) after loading
        state = {k[len("backbone."):]: v for k, v in state.items()
                 if k.startswith("backbone.") and not is_locality_param(k)}
    return state


def state_dict_mismatches(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of ``state`` against ``own``, as short phrases.

    BatchNorm's ``num_batches_tracked`` counters may be missing (files converted from other
    frameworks lack them; torch's strict loading accepts that too).
    """
    missing = sorted(k for k in set(own) - set(state) if not k.endswith(OPTIONAL_BUFFER_SUFFIX))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
    return parts


def resolve_timm_name(backbone: str, tag: str) -> str:
    """Return ``backbone.tag`` checked against timm's list of pretrained weights."""
    import timm

    available = timm.list_pretrained(f"{backbone}.*")
    if not available:
        raise ConfigError(
            f"timm has no pretrained weights for {backbone!r}; set model.pretrained to none or to a local file"
        )
    if tag in ("default", "true", "timm"):
        return available[0]
    name = f"{backbone}.{tag}"
    if name not in available:
        raise ConfigError(
            f"unknown pretrained tag {tag!r} for {backbone!r}; timm has: "
            + ", ".join(a.split(".", 1)[1] for a in available)
        )
    return name


def cached_hub_file(hf_hub_id: str, cache_dir: str | Path | None = None) -> Path | None:
    """The weights file of ``hf_hub_id`` in the local Hugging Face cache, if it is there."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hf_hub_id, filename, cache_dir=cache_dir)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def hub_reachable(url: str | None = None, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Quick TCP probe of the weights host; False at once when ``HF_HUB_OFFLINE`` is set."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = url or os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pretrained_state_dict(
    backbone: str, tag: str, cache_dir: str | Path | None = None, **create_kwargs
) -> dict[str, torch.Tensor]:
    """State dict of the pretrained weights ``backbone.tag``.

    Looked up in this order: a pip package that ships them (:mod:`dtop.models.sources`), the local
    Hugging Face cache, the hub (only when it answers a quick probe).
    """
    import timm
    from timm.models import get_pretrained_cfg

    from dtop.models.sources import packaged_weights

    packaged = packaged_weights(backbone, tag)
    if packaged is not None:
        return packaged.state_dict()
    name = resolve_timm_name(backbone, tag)
    cfg = get_pretrained_cfg(name)
    hf_hub_id = getattr(cfg, "hf_hub_id", None)
    if hf_hub_id:
        cached = cached_hub_file(hf_hub_id, cache_dir)
        if cached is not None:
            return read_state_dict(cached)
    probe_url = None if hf_hub_id else getattr(cfg, "url", None)
    if not hub_reachable(probe_url):
        raise PretrainedWeightsUnavailable(
            f"pretrained weights {name!r} are not in the local cache and the hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE is set). On a machine with internet run\n"
            f"  python -c \"import timm, safetensors.torch as st; m = timm.create_model('{name}', "
            f"pretrained=True); st.save_file(m.state_dict(), '{backbone}.safetensors')\"\n"
            f"copy the file here and pass it as model.pretrained=/path/to/{backbone}.safetensors"
        )
    model = timm.create_model(name, pretrained=True, **create_kwargs)
    return model.state_dict()
