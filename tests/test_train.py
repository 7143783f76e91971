"""Training: the loss falls, resume is exact, DDP equals one process, bad input fails clearly."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN_CONFIG, make_classes, train_state
from dtop.engine.train import Trainer, train
from dtop.engine.train_config import load_train_config
from dtop.errors import ConfigError, DataError


def config(tmp_path: Path, data: Path, *extra: str):
    return load_train_config(TINY_TRAIN_CONFIG, [
        f"data.root={data}", f"run.out={tmp_path / 'run'}", "data.train_size=64", "data.num_workers=0",
        "optim.batch_size=6", "run.progress=false", "run.log_every=1", *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_classes(tmp_path_factory.mktemp("train") / "classes")


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_loss_falls_over_20_steps(tmp_path, data):
    summary = train(config(tmp_path, data, "run.max_steps=20", "optim.epochs=100", "data.augment=false"))
    assert summary["steps"] == 20
    values = losses(tmp_path / "run")
    assert np.mean(values[-5:]) < 0.8 * np.mean(values[:5])
    from dtop.models import load_model

    assert load_model(tmp_path / "run" / "last.safetensors").descriptor_dim == 64


def test_resume_is_exact(tmp_path, data):
    train(config(tmp_path / "a", data, "run.max_steps=4", "optim.epochs=100"))
    train(config(tmp_path / "b", data, "run.max_steps=2", "optim.epochs=100"))
    Trainer(config(tmp_path / "b", data, "run.max_steps=4", "optim.epochs=100"), resume=True).train()
    a, b = train_state(tmp_path / "a" / "run"), train_state(tmp_path / "b" / "run")
    assert a["step"] == b["step"] == 4
    for key, value in a["module"].items():
        assert torch.equal(value, b["module"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_channels_last_trains_the_same_weights(tmp_path, data):
    """NHWC is a memory layout, not a recipe: 3 steps land on the same weights (to rounding)."""
    runs = {}
    for layout in ("true", "false"):
        train(config(tmp_path / layout, data, "run.max_steps=3", "optim.epochs=100", f"run.channels_last={layout}"))
        runs[layout] = train_state(tmp_path / layout / "run")["module"]
    moved = 0
    for key, value in runs["false"].items():
        assert torch.allclose(value, runs["true"][key], atol=1e-4), key
        moved += int(value.dim() == 4 and not runs["true"][key].is_contiguous())
    assert moved > 0  # the convolution weights were trained in NHWC
    from dtop.models import load_model

    assert all(p.is_contiguous() for p in load_model(tmp_path / "true" / "run" / "last.safetensors").parameters())


def test_freeze_stride_keeps_the_early_cnn_layers(tmp_path, data):
    """optim.freeze_stride=4: the stem up to stride 4 keeps its weights, everything after it trains."""
    from dtop.engine.train_parts import freeze_cnn
    from dtop.models import build_model
    from dtop.models.cnn_stem import parameters_to_stride

    cfg = config(tmp_path, data, "run.max_steps=3", "optim.epochs=100", "optim.freeze_stride=4")
    start = build_model(cfg.model).state_dict()
    train(cfg)
    end = train_state(tmp_path / "run")["module"]
    fixed = {f"model.backbone.patch_embed.backbone.{name}"
             for name, _ in parameters_to_stride(build_model(cfg.model).cnn(), 4)}
    assert fixed and all(name.split(".")[-1] in ("weight", "bias") for name in fixed)
    for name in fixed:
        assert torch.equal(end[name], start[name[len("model."):]]), name
    later = "model.backbone.patch_embed.backbone.stages.1.blocks.0.conv2.weight"  # stride 8: trains
    assert later not in fixed and not torch.equal(end[later], start[later[len("model."):]])
    with pytest.raises(ConfigError, match="below the CNN's first feature stride"):
        freeze_cnn(build_model(cfg.model), 1)
    plain = build_model(dataclasses.replace(cfg.model, backbone="vit_tiny_patch16_224", stem_layers=None,
                                            backbone_args={"depth": 2, "img_size": 64}))
    with pytest.raises(ConfigError, match="needs a model with a CNN"):
        freeze_cnn(plain, 4)


def test_schedule_steps_end_a_short_run_on_the_decayed_rate(tmp_path, data):
    train(config(tmp_path, data, "run.max_steps=8", "optim.epochs=100", "optim.schedule_steps=8", "optim.lr=0.01"))
    rates = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "lr" in r]
    assert max(rates) == pytest.approx(0.01, rel=0.05)  # the warm-up reaches the full rate
    assert rates[-1] < 0.1 * 0.01  # ... and the cosine has decayed by the last step (not 100 epochs away)


def test_bad_input_fails_clearly(tmp_path, data):
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        config(tmp_path, data, "optim.lrr=1")
    with pytest.raises(DataError):
        train(config(tmp_path, tmp_path / "nowhere"))
    csv = tmp_path / "t.csv"
    csv.write_text("path,landmark\nc0/0.jpg,0\n")
    with pytest.raises(DataError, match="label"):
        train(config(tmp_path, data, "data.format=csv", f"data.csv={csv}"))


def test_unreadable_training_image_is_skipped_and_counted(tmp_path, data):
    import shutil

    folder = tmp_path / "classes"
    shutil.copytree(data, folder)
    (folder / "c0" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    summary = train(config(tmp_path, folder, "optim.epochs=1", "data.augment=false"))
    assert summary["skipped_images"] >= 1


DDP_SCRIPT = """
import sys, torch
from dtop.engine.train import train
from dtop.engine.train_config import load_train_config
cfg = load_train_config(sys.argv[1], sys.argv[2:])
train(cfg)
"""


@pytest.mark.slow
def test_ddp_two_gloo_processes_equal_one_process_with_accumulation(tmp_path, data):
    """2 ranks × batch 6 == 1 process accumulating the same two batches per step."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    common = [f"data.root={data}", "data.train_size=64", "data.num_workers=0", "optim.batch_size=6",
              "run.progress=false", "optim.epochs=1", "data.augment=false", "run.max_steps=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    str(script), TINY_TRAIN_CONFIG, *common, f"run.out={tmp_path / 'ddp'}", "run.device=cpu"],
                   check=True, env=env, timeout=300)
    train(load_train_config(TINY_TRAIN_CONFIG, [*common, f"run.out={tmp_path / 'one'}", "optim.accum_steps=2"]))
    ddp, one = train_state(tmp_path / "ddp"), train_state(tmp_path / "one")
    assert ddp["step"] == one["step"] == 2
    for key, value in ddp["module"].items():
        torch.testing.assert_close(value, one["module"][key], rtol=1e-4, atol=1e-5, msg=key)


def test_subcenter_arcface_gets_its_default_subcenters(tmp_path, data):
    from dtop.engine.losses import ArcFaceLoss
    from dtop.engine.train import build_loss

    def loss_of(*overrides: str) -> ArcFaceLoss:
        loss = build_loss(config(tmp_path, data, *overrides), embedding_dim=64, num_classes=6)
        assert isinstance(loss, ArcFaceLoss)
        return loss

    assert loss_of("loss.name=subcenter-arcface").subcenters == 3  # not silently plain ArcFace
    assert loss_of("loss.name=subcenter-arcface", "loss.subcenters=2").subcenters == 2
    assert loss_of("loss.name=arcface").subcenters == 1
    with pytest.raises(ConfigError, match="use loss.name=subcenter-arcface"):
        config(tmp_path, data, "loss.name=arcface", "loss.subcenters=3")
