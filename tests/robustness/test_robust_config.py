"""Hostile YAML configs and out-of-range values: `dtop train --config` ends with one line naming the
file or key (exit 2), never a traceback, and nothing is trained."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY_TRAIN_CONFIG

from .hostile import TRIED

# (file content, words the one error line must contain; "{path}" stands for the file's path)
MALFORMED_YAML: dict[str, tuple[bytes, list[str]]] = {
    "section_is_a_list": (b"optim: [1, 2]\n", ["'optim'", "mapping"]),
    "section_is_a_number": (b"optim: 5\n", ["'optim'", "mapping"]),
    "section_is_a_string": (b"loss: arcface\n", ["'loss'", "mapping"]),
    "top_level_is_a_list": (b"- 1\n- 2\n", ["{path}", "top level", "mapping"]),
    "top_level_is_a_number": (b"42\n", ["{path}", "top level"]),
    "base_is_a_number": (b"_base_: 5\n", ["{path}", "_base_", "file name"]),
    "base_list_holds_a_number": (b"_base_: [5]\n", ["{path}", "_base_", "file name"]),
    "base_is_a_mapping": (b"_base_: {a: 1}\n", ["{path}", "_base_"]),
    "base_is_missing": (b"_base_: nowhere.yaml\n", ["not found", "nowhere.yaml"]),
    "base_is_itself": (b"_base_: config.yaml\n", ["{path}", "cycle"]),
    "not_utf8": (b"optim:\n  lr: \xff\xfe\n", ["{path}", "not UTF-8", "line 2"]),
    "latin1_comment": (b"# caf\xe9\noptim: {}\n", ["{path}", "not UTF-8", "line 1"]),
    "duplicate_key": (b"optim:\n  lr: 0.001\n  lr: 0.1\n", ["{path}", "duplicate key 'lr'", "line 3", "line 2"]),
    "duplicate_section": (b"optim: {lr: 0.001}\noptim: {epochs: 2}\n", ["{path}", "duplicate key 'optim'", "line 2"]),
    "bad_indentation": (b"optim:\n  lr: 1\n epochs: 2\n", ["{path}", "not valid YAML", "line"]),
    "unclosed_bracket": (b"model: {dim: [1, 2\n", ["{path}", "not valid YAML"]),
    "tab_indentation": (b"optim:\n\tlr: 1\n", ["{path}", "not valid YAML"]),
    "python_object_tag": (b"optim: !!python/object/apply:os.system [echo hi]\n", ["{path}", "not valid YAML"]),
    "unknown_section": (b"optimizer: {lr: 0.1}\n", ["unknown config section 'optimizer'"]),
    "unknown_key": (b"optim: {lrr: 0.1}\n", ["optim.lrr", "optim.lr"]),
    "key_is_a_number": (b"optim: {1: 2}\n", ["unknown config key 'optim.1'"]),
    "binary_garbage": (bytes(range(256)), ["{path}", "config"]),
    "empty_base_name": (b"_base_: ''\n", ["{path}", "_base_"]),
}

# out-of-range or non-finite values (as overrides): the key named in the one line
BAD_VALUES: dict[str, str] = {
    "optim.lr=.inf": "optim.lr",
    "optim.lr=.nan": "optim.lr",
    "optim.lr=-.inf": "optim.lr",
    "optim.lr=0": "optim.lr",
    "optim.lr=-1e-4": "optim.lr",
    "optim.lr=5": "optim.lr",
    "optim.min_lr_ratio=2": "optim.min_lr_ratio",
    "optim.weight_decay=.nan": "optim.weight_decay",
    "optim.grad_clip=.inf": "optim.grad_clip",
    "optim.backbone_lr_mult=-1": "optim.backbone_lr_mult",
    "optim.batch_size=0": "optim.batch_size",
    "optim.batch_size=-3": "optim.batch_size",
    "optim.batch_size=2.5": "optim.batch_size",
    "optim.epochs=0": "optim.epochs",
    "optim.accum_steps=0": "optim.accum_steps",
    "optim.warmup_steps=-1": "optim.warmup_steps",
    "loss.scale=0": "loss.scale",
    "loss.scale=.inf": "loss.scale",
    "loss.scale=1e6": "loss.scale",
    "loss.margin=-0.1": "loss.margin",
    "loss.margin=.nan": "loss.margin",
    "loss.margin=2": "loss.margin",
    "loss.margin=3": "loss.margin",
    "loss.name=contrastive loss.margin=2.5": "loss.margin",
    "run.max_minutes=.inf": "run.max_minutes",
    "run.max_minutes=0": "run.max_minutes",
    "run.log_every=0": "run.log_every",
    "data.train_size=8": "data.train_size",
    "data.train_size=100": "data.train_size",
    "data.num_workers=-1": "data.num_workers",
    "val.scales=[1.0,.nan]": "val.scales[1]",
    "model.gem_p=.inf": "model.gem_p",
    "model.dim=0": "model.dim",
    "model.dim=1e9": "model.dim",
    "optim.amp=fp8": "optim.amp",
    "optim.lr=[1]": "optim.lr",
    "optim={}": "",  # a section replaced by an empty mapping is valid: defaults
}


def _check_one_line(result, *words: str) -> None:
    assert result.code == 2, (result.code, result.err)
    lines = result.error_lines
    assert len(lines) == 1, result.err
    assert lines[0].startswith("dtop train: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("name", sorted(MALFORMED_YAML))
def test_malformed_yaml_is_one_line_naming_the_file(tmp_path: Path, run_cli, name: str) -> None:
    content, words = MALFORMED_YAML[name]
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    TRIED["malformed YAML configs"] += 1
    result = run_cli("train", "--config", path, f"run.out={tmp_path / 'run'}")
    _check_one_line(result, *(w.format(path=path) for w in words))
    assert not (tmp_path / "run").exists()


def test_malformed_yaml_in_a_base_names_the_base(tmp_path: Path, run_cli) -> None:
    (tmp_path / "base.yaml").write_bytes(b"optim:\n  lr: 1\n  lr: 2\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\n")
    TRIED["malformed YAML configs"] += 1
    result = run_cli("train", "--config", tmp_path / "child.yaml")
    _check_one_line(result, str(tmp_path / "base.yaml"), "duplicate key 'lr'")


@pytest.mark.parametrize("override", sorted(BAD_VALUES))
def test_out_of_range_values_are_refused_at_load(tmp_path: Path, run_cli, override: str) -> None:
    TRIED["out-of-range config values"] += 1
    key = BAD_VALUES[override]
    result = run_cli("train", "--config", TINY_TRAIN_CONFIG, *override.split(), f"run.out={tmp_path / 'run'}",
                     f"data.root={tmp_path / 'no-data'}")
    if not key:  # valid: gets as far as the (missing) data
        _check_one_line(result, "no-data")
        return
    _check_one_line(result, key)
    assert not (tmp_path / "run").exists()


def test_a_directory_or_unreadable_file_as_config(tmp_path: Path, run_cli, deny_access) -> None:
    TRIED["malformed YAML configs"] += 2
    _check_one_line(run_cli("train", "--config", tmp_path), str(tmp_path))
    path = tmp_path / "locked.yaml"
    path.write_text("optim: {}\n")
    deny_access(path)
    _check_one_line(run_cli("train", "--config", path), str(path), "cannot be read")
