"""Test setup: never reach the network; small models only."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_model():
    """The tiny DToP of configs/models/dtop_tiny.yaml, in eval mode, seeded."""
    from dtop.models import build_model

    torch.manual_seed(0)
    return build_model("dtop_tiny")
