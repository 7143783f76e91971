"""Reproducible randomness of training: seeding, RNG states for exact resume, per-item seeds."""

from __future__ import annotations

import random
from collections.abc import Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class SeededItems(Dataset):
    """Seeds the RNGs for each item from (seed, epoch, index): augmentation independent of workers."""

    def __init__(self, dataset: Dataset, seed: int):
        if not isinstance(dataset, Sized):
            raise TypeError("SeededItems needs a dataset with a length")
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.size = len(dataset)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, item: Any) -> Any:
        index = item[0] if isinstance(item, tuple | list) else item
        item_seed = (self.seed * 1_000_003 + self.epoch * 7_919 + int(index) * 104_729) % (2**31)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            random.seed(item_seed)
            np.random.seed(item_seed)
            return self.dataset[item]


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU, CUDA), numpy and python, as tensors (weights_only-loadable)."""
    mt19937 = np.random.get_state(legacy=False)["state"]  # {"key": uint32 array, "pos": int}
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.tensor(mt19937["key"].astype(np.int64)),
             "numpy_pos": int(mt19937["pos"]),
             "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python's RNGs."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
