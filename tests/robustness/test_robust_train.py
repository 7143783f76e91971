"""Training never exits 0 with NaN weights or without a step, and its run folder stays consistent:
metrics.jsonl holds each step once after a resume, a new run never appends to an old one."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAIN_CONFIG, make_classes
from dtop.engine.train import METRICS_FILE, Trainer, TrainModule, train
from dtop.engine.train_config import load_train_config
from dtop.errors import ConfigError, TrainingError

from .hostile import TRIED

FAST = ["data.train_size=32", "data.num_workers=0", "optim.batch_size=2", "run.progress=false", "run.log_every=1",
        "optim.epochs=100", "data.augment=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classes(tmp_path_factory.mktemp("robust_train") / "classes", n_classes=2, per_class=3)


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={data}", f"run.out={out}", *FAST, *extra]


def config(data: Path, out: Path, *extra: str):
    return load_train_config(TINY_TRAIN_CONFIG, args(data, out, *extra))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def one_error_line(result, *words: str) -> str:
    assert result.code == 2, (result.code, result.out, result.err)
    assert len(result.error_lines) == 1, result.err
    line = result.error_lines[0]
    for word in words:
        assert word in line, (word, line)
    return line


@pytest.mark.slow
def test_infinite_lr_stops_naming_the_step_and_saves_no_nan_weights(tmp_path: Path, data: Path) -> None:
    TRIED["diverging trainings"] += 2
    cfg = config(data, tmp_path / "run", "run.max_steps=1")
    cfg.optim.lr = float("inf")  # built in code, past the config check (the CLI refuses it at load)
    with pytest.raises(TrainingError, match=r"weights are not finite after step 1 .*Lower optim.lr"):
        train(cfg)
    assert not (tmp_path / "run" / "last.safetensors").exists()
    cfg = config(data, tmp_path / "run2", "run.max_steps=3")
    cfg.optim.lr = float("inf")
    with pytest.raises(TrainingError, match=r"not finite \(nan\) at step 2 \(epoch 0\)"):
        train(cfg)
    assert not (tmp_path / "run2" / "last.safetensors").exists()


def test_a_nan_loss_ends_the_cli_run_with_one_line(tmp_path: Path, data: Path, run_cli, monkeypatch) -> None:
    TRIED["diverging trainings"] += 1
    real = TrainModule.forward

    def nan_at_step_2(self, images, labels=None):  # type: ignore[no-untyped-def]
        loss = real(self, images, labels)
        nan_at_step_2.calls += 1
        return loss * float("nan") if nan_at_step_2.calls == 2 else loss

    nan_at_step_2.calls = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(TrainModule, "forward", nan_at_step_2)
    out = tmp_path / "run"
    result = run_cli("train", "--config", TINY_TRAIN_CONFIG, *args(data, out, "run.max_steps=3", "run.save_every=1"))
    one_error_line(result, "the loss is not finite (nan) at step 2 (epoch 0)", "optim.lr", "--resume")
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 1  # the last save is the good step before


def test_all_images_unreadable_is_an_error_and_its_hint_runs(tmp_path: Path, data: Path, run_cli) -> None:
    bad = tmp_path / "bad"
    for label in ("a", "b"):
        (bad / label).mkdir(parents=True)
        for i in range(3):
            (bad / label / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg" if i else b"")
    TRIED["unreadable training sets"] += 1
    result = run_cli("train", "--config", TINY_TRAIN_CONFIG, *args(bad, tmp_path / "run", "optim.epochs=2"))
    line = one_error_line(result, "no optimiser step in epoch 0", "6 image(s) of 6 were unreadable")
    assert not (tmp_path / "run" / "last.safetensors").exists()
    hint = line.split("`")[1]
    assert hint.startswith("dtop data check ")
    check = run_cli(*shlex.split(hint)[1:])  # the printed command works as printed
    assert check.code == 1 and "unreadable images: 6" in check.out


def test_fewer_images_than_a_batch_is_an_error(tmp_path: Path, data: Path, run_cli) -> None:
    TRIED["unreadable training sets"] += 1
    result = run_cli("train", "--config", TINY_TRAIN_CONFIG, *args(data, tmp_path / "run", "optim.batch_size=8"))
    one_error_line(result, "6 images give no batch of 8")


@pytest.mark.slow
def test_metrics_hold_each_step_once_after_a_resume(tmp_path: Path, data: Path) -> None:
    run = tmp_path / "run"
    train(config(data, run, "run.max_steps=2"))
    early = run / "state-step2.pt"
    shutil.copy(run / "state.pt", early)
    Trainer(config(data, run, "run.max_steps=4"), resume=True).train()
    # a kill after step 4 was logged but before it was saved: the state on disk is the one of step 2
    shutil.copy(early, run / "state.pt")
    Trainer(config(data, run, "run.max_steps=4"), resume=True).train()
    steps = [r["step"] for r in records(run) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert [r.get("event") for r in records(run)].count("end") == 1


@pytest.mark.slow
def test_metrics_of_a_state_without_the_recorded_size_are_cut_by_step(tmp_path: Path, data: Path) -> None:
    run = tmp_path / "run"
    train(config(data, run, "run.max_steps=2"))
    state = torch.load(run / "state.pt", weights_only=True)
    del state["metrics_bytes"]  # a state written before the size was recorded
    torch.save(state, run / "state.pt")
    with open(run / METRICS_FILE, "a") as f:  # a step logged after that state, and a cut-off line
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    Trainer(config(data, run, "run.max_steps=3"), resume=True).train()
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2, 3]


@pytest.mark.slow
def test_a_new_run_over_an_old_one_is_refused_or_overwritten(tmp_path: Path, data: Path, run_cli) -> None:
    run = tmp_path / "run"
    train(config(data, run, "run.max_steps=1"))
    TRIED["restarted runs"] += 2
    before = (run / METRICS_FILE).read_bytes()
    result = run_cli("train", "--config", TINY_TRAIN_CONFIG, *args(data, run, "run.max_steps=2"))
    one_error_line(result, f"run.out={run} already holds a training run", "--resume", "--overwrite")
    assert (run / METRICS_FILE).read_bytes() == before
    with pytest.raises(ConfigError, match="already holds"):
        Trainer(config(data, run, "run.max_steps=2"))
    result = run_cli("train", "--config", TINY_TRAIN_CONFIG, *args(data, run, "run.max_steps=2"), "--overwrite")
    assert result.code == 0, result.err
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2]
