"""Test setup: never reach the network; small models only."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

#: The tiny training config that ships with dtop (CPU, folder format).
TINY_TRAIN_CONFIG = str(Path(__file__).parents[1] / "configs" / "train" / "tiny.yaml")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_model():
    """The tiny DToP of configs/models/dtop_tiny.yaml, in eval mode, seeded."""
    from dtop.models import build_model

    torch.manual_seed(0)
    return build_model("dtop_tiny")


# Shared helpers (imported by test modules: ``from conftest import make_classes``).


def make_classes(root: Path, n_classes: int = 6, per_class: int = 6, seed: int = 0) -> Path:
    """A folder per class: a random colour pattern per class; its images are noisy, resized variants."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            w, h = [(80, 64), (64, 80), (72, 72)][i % 3]
            img = Image.fromarray(base).resize((w, h), Image.Resampling.NEAREST)
            noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-20, 20, (h, w, 3)), 0, 255)
            Image.fromarray(noisy.astype(np.uint8)).save(root / f"c{c}" / f"{i}.jpg")
    return root


def train_state(run: Path) -> dict:
    """The ``state.pt`` of a training run folder."""
    return torch.load(run / "state.pt", weights_only=True)
