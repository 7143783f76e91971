"""Sub-center ArcFace cleaning: dominant sub-centres, the dropped samples are the noisy ones, the trainer's stage."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_TRAIN_CONFIG, make_classes, train_state
from dtop.engine.cleaning import DROPPED_FILE, clean_subcenters, dominant_subcenters
from dtop.engine.losses import ArcFaceLoss, arcface_logits
from dtop.engine.train import Trainer, train
from dtop.engine.train_config import load_train_config
from dtop.errors import ConfigError, DataError

# ------------------------------------------------------------------------------------------- math


def test_dominant_subcenters_worked_by_hand():
    # 2 classes × 2 sub-centres in 2-d: class 0 at +x and +y, class 1 at -x and -y
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    x = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0],      # class 0: nearest sub-centres 0, 0, 1
                      [0.0, -1.0], [0.1, -1.0], [-1.0, 0.0]])   # class 1: nearest 1, 1, 0
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    dominant, cos = dominant_subcenters(x, labels, weight, 2, 2)
    assert dominant.tolist() == [0, 1]
    assert cos.shape == (6, 2)
    keep, dom, angles = clean_subcenters(x, labels, weight, 2, 2, max_angle=75.0)
    # angles to the dominant sub-centre of the own class: atan(0.1) = 5.71°, the same, 90 - 5.71 = 84.29°;
    # 0°, 5.71°, 90°
    small = math.degrees(math.atan(0.1))
    np.testing.assert_allclose(angles, [small, small, 90 - small, 0.0, small, 90.0], atol=1e-9)
    assert keep.tolist() == [True, True, False, True, True, False] and dom.tolist() == [0, 1]
    # a tie (one sample on each sub-centre) goes to the lower index; a class without samples: 0
    dominant, _ = dominant_subcenters(x[[0, 2]], torch.tensor([0, 0]), weight, 2, 2)
    assert dominant.tolist() == [0, 0]
    with pytest.raises(DataError, match="do not fit"):
        dominant_subcenters(x, labels, weight, 3, 2)


def test_keeping_the_dominant_subcenter_is_plain_arcface_on_those_rows():
    torch.manual_seed(0)
    loss = ArcFaceLoss(embedding_dim=8, num_classes=5, subcenters=3)
    x, labels = torch.randn(12, 8), torch.randint(0, 5, (12,))
    keep = torch.tensor([2, 0, 1, 1, 0])
    loss.keep_subcenters(keep)
    assert "dominant only" in repr(loss)
    rows = loss.weight.view(5, 3, 8)[torch.arange(5), keep]
    torch.testing.assert_close(loss.logits(x, labels), arcface_logits(x, rows, labels, 0.3, 30.0))
    loss(x, labels).backward()
    grad = loss.weight.grad.view(5, 3, 8)
    others = torch.ones(5, 3, dtype=torch.bool)
    others[torch.arange(5), keep] = False
    assert torch.count_nonzero(grad[others]) == 0  # the other sub-centres take no part
    assert "active" not in loss.state_dict()  # not part of the module state: the trainer's state holds it
    loss.keep_subcenters(None)
    assert loss.active is None
    with pytest.raises(DataError, match="one sub-centre"):
        loss.keep_subcenters(torch.tensor([3, 0, 0, 0, 0]))


def noisy_features(n_classes=8, per_class=40, dim=32, noise=0.2, seed=0):
    """Clustered unit features, one cluster per class; a fraction ``noise`` of the labels flipped."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, dim, generator=g), dim=1)
    true = torch.arange(n_classes).repeat_interleave(per_class)
    x = F.normalize(centres[true] + 0.1 * torch.randn(len(true), dim, generator=g), dim=1)
    labels = true.clone()
    noisy = torch.randperm(len(true), generator=g)[: int(noise * len(true))]
    labels[noisy] = (true[noisy] + torch.randint(1, n_classes, (len(noisy),), generator=g)) % n_classes
    is_noisy = torch.zeros(len(true), dtype=torch.bool)
    is_noisy[noisy] = True
    return x, labels, is_noisy


def test_dropped_samples_are_mostly_the_noisy_ones():
    x, labels, is_noisy = noisy_features()
    torch.manual_seed(0)
    loss = ArcFaceLoss(embedding_dim=32, num_classes=8, subcenters=3)
    optim = torch.optim.Adam(loss.parameters(), lr=0.05)
    for _ in range(200):  # train the sub-centres (the features stay fixed)
        optim.zero_grad()
        loss(x, labels).backward()
        optim.step()
    keep, dominant, angles = clean_subcenters(x, labels, loss.weight, 3, 8, max_angle=75.0)
    dropped = ~keep
    precision = (dropped & is_noisy.numpy()).sum() / dropped.sum()
    recall = (dropped & is_noisy.numpy()).sum() / is_noisy.sum()
    assert precision >= 0.9 and recall >= 0.7, (precision, recall)  # measured: 1.0 and 0.83
    # the clean samples sit near their dominant sub-centre (median ~54°), the noisy ones far from it (~87°)
    assert np.median(angles[~is_noisy.numpy()]) < 65 and np.median(angles[is_noisy.numpy()]) > 80


# ---------------------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def noisy_folder(tmp_path_factory):
    """Six classes of six images; two images moved into the wrong class (label noise)."""
    root = make_classes(tmp_path_factory.mktemp("clean") / "classes")
    shutil.move(root / "c0" / "0.jpg", root / "c3" / "from_c0.jpg")
    shutil.move(root / "c1" / "1.jpg", root / "c4" / "from_c1.jpg")
    return root


def config(run: Path, data: Path, *extra: str):
    return load_train_config(TINY_TRAIN_CONFIG, [
        f"data.root={data}", f"run.out={run}", "data.train_size=64", "data.num_workers=0", "data.augment=false",
        "optim.batch_size=6", "run.progress=false", "run.log_every=1", "loss.name=subcenter-arcface",
        "loss.clean_after_epoch=1", "loss.clean_angle=78", "optim.epochs=2", *extra])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_config_checks(tmp_path, noisy_folder):
    with pytest.raises(ConfigError, match="needs loss.name=subcenter-arcface"):
        config(tmp_path, noisy_folder, "loss.name=arcface")
    with pytest.raises(ConfigError, match="leaves no epoch"):
        config(tmp_path, noisy_folder, "loss.clean_after_epoch=2")
    with pytest.raises(ConfigError, match="clean_angle"):
        config(tmp_path, noisy_folder, "loss.clean_angle=200")


@pytest.mark.slow
def test_trainer_cleans_once_records_it_and_resumes_exactly(tmp_path, noisy_folder):
    full = tmp_path / "full"
    summary = train(config(full, noisy_folder))
    cleaning = [r for r in records(full) if r.get("event") == "cleaning"]
    assert len(cleaning) == 1 and cleaning[0]["epoch"] == 1 and cleaning[0]["images"] == 36
    kept, dropped = cleaning[0]["kept"], cleaning[0]["dropped"]
    # (after one epoch the tiny model's embeddings are still far from every sub-centre: 78° drops some)
    assert 0 < dropped < 36 and kept + dropped == 36
    lines = (full / DROPPED_FILE).read_text().splitlines()
    assert lines[0] == "index\tclass\tangle\tpath" and len(lines) == 1 + dropped
    assert all(float(line.split("\t")[2]) > 78 for line in lines[1:])
    state = train_state(full)
    assert state["cleaning"]["kept"].numel() == kept and state["cleaning"]["epoch"] == 1
    assert summary["epochs"] == 2
    # fewer images after the cleaning: fewer steps per epoch, and the schedule still ends with the last epoch
    steps = [r["step"] for r in records(full) if "loss" in r]
    assert 0 < steps[-1] - cleaning[0]["step"] < cleaning[0]["step"]
    lrs = [r["lr"] for r in records(full) if "lr" in r]
    assert lrs[-1] == pytest.approx(1e-3 * 0.01, rel=0.2)  # min_lr_ratio reached at the end
    # interrupted before and after the cleaning, then resumed: the same weights and optimiser state
    for stop in (4, cleaning[0]["step"] + 2):
        part = tmp_path / f"stop{stop}"
        train(config(part, noisy_folder, f"run.max_steps={stop}"))
        Trainer(config(part, noisy_folder), resume=True).train()
        a, b = train_state(full), train_state(part)
        assert a["step"] == b["step"]
        for key, value in a["module"].items():
            assert torch.equal(value, b["module"][key]), (stop, key)
        for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
            assert torch.equal(sa["exp_avg"], sb["exp_avg"]), stop
        assert torch.equal(a["cleaning"]["kept"], b["cleaning"]["kept"])
        assert [r for r in records(part) if r.get("event") == "cleaning"] == cleaning
