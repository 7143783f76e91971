"""The command line: overrides are never taken for a model name or another value, `model.` works on
every model command, hints print commands that work as printed, one `--dataset` rule, and OS
errors, bad devices and out-of-range options end as one line (exit 2, no traceback)."""

from __future__ import annotations

import argparse
import errno
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from dtop.cli.main import build_parser, parse_args

from .hostile import TRIED, texture

FAST = ["--image-size", "64", "--scales", "1.0", "--workers", "0", "--no-progress", "--batch-size", "4"]


def one_error_line(result: Any, *words: str) -> str:
    assert result.code == 2, (result.code, result.out, result.err)
    assert len(result.error_lines) == 1, result.err
    line = result.error_lines[0]
    for word in words:
        assert word in line, (word, line)
    return line


def _commands_with_overrides() -> list[tuple[list[str], argparse.ArgumentParser]]:
    out = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            if any(a.dest == "overrides" for a in parser._actions):
                out.append((prefix, parser))
            return
        for name, sub in subs[0].choices.items():
            walk(sub, [*prefix, name])

    walk(build_parser(), [])
    return out


def _value(action: argparse.Action) -> str:
    if action.choices:
        return str(next(iter(action.choices)))
    return "1" if action.type in (int, float) or getattr(action.type, "__name__", "") == "integer" else "x"


def _ids(value: Any) -> str:
    return " ".join(value) if isinstance(value, list) else ""


@pytest.mark.parametrize("command, parser", _commands_with_overrides(), ids=_ids)
def test_an_override_is_never_taken_for_another_value(command: list[str], parser: argparse.ArgumentParser) -> None:
    """Every option of several values, followed by overrides: they stay overrides, in every command."""
    required = [t for a in parser._actions if a.required and a.option_strings for t in (a.option_strings[0], _value(a))]
    multi = [a for a in parser._actions if a.option_strings and a.nargs in ("+", "*")]
    for action in multi or [None]:
        before = [action.option_strings[0], _value(action)] if action else []
        argv = [*command, *required, *before, "zz.key=1", "model.dim=8"]
        TRIED["override placements"] += 1
        args = parse_args(argv)
        assert args is not None
        assert args.overrides[-2:] == ["zz.key=1", "model.dim=8"], (argv, args)
        if action is not None:
            assert "zz.key=1" not in (getattr(args, action.dest) or []), (argv, args)


@pytest.mark.parametrize("argv, expected", [
    (["evaluate", "--model", "gem_cnn_r101", "backbone=efficientnet_lite0", "pretrained=W.safetensors",
      "--dataset", "D"],
     {"model": ["gem_cnn_r101"], "overrides": ["backbone=efficientnet_lite0", "pretrained=W.safetensors"]}),
    (["evaluate", "--model", "a", "runs/lr=0.1/last.safetensors", "dim=8", "--dataset", "D", "--post", "whiten",
      "qe:k=5,alpha=3", "model.dim=16"],
     {"model": ["a", "runs/lr=0.1/last.safetensors"], "post": ["whiten", "qe:k=5,alpha=3"],
      "overrides": ["dim=8", "model.dim=16"]}),
    (["extract", "--model", "m", "--scales", "1", "2", "dim=32", "--out", "o"], {"scales": [1.0, 2.0],
                                                                               "overrides": ["dim=32"]}),
    (["index", "build", "--model", "m", "--images", "i", "--out", "o", "--search-params", "nprobe=16", "dim=8"],
     {"search_params": "nprobe=16", "overrides": ["dim=8"]}),
    (["info", "dtop_tiny", "model.dim=32", "--size", "64"], {"model": "dtop_tiny", "overrides": ["model.dim=32"]}),
    (["info", "model.dim=32"], {"model": "dtop_hybrid", "overrides": ["model.dim=32"]}),
    (["train", "--config", "c.yaml", "optim.lr=1e-4", "--resume"], {"overrides": ["optim.lr=1e-4"], "resume": True}),
])
def test_overrides_where_the_issue_found_them(argv: list[str], expected: dict[str, Any]) -> None:
    TRIED["override placements"] += 1
    args = parse_args(argv)
    for key, value in expected.items():
        assert getattr(args, key) == value, (key, getattr(args, key))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_photos")
    for i in range(3):
        texture(i).save(root / f"p{i}.jpg")
    return root


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import timm
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(path))
    return path


@pytest.mark.slow
def test_the_offline_hint_works_as_printed(tmp_path: Path, photos: Path, resnet18_weights: Path, run_cli) -> None:
    """dtop extract --model gem_cnn_r101 backbone=resnet18 offline: the hint's model.pretrained=… works."""
    command = ["extract", "--model", "gem_cnn_r101", "backbone=resnet18", "--images", photos,
               "--out", tmp_path / "store", *FAST]
    result = run_cli(*command)
    assert result.code == 2 and "Traceback" not in result.err
    hint = re.search(r"pass it as (model\.pretrained=\S+)", result.err)
    assert hint, result.err
    override = hint.group(1).replace("/path/to/", f"{resnet18_weights.parent}/")
    assert Path(override.split("=", 1)[1]) == resnet18_weights  # the printed file name is the one to make
    result = run_cli(*command, override)
    assert result.code == 0, result.err
    assert "3 images" in result.out


@pytest.mark.slow
def test_evaluate_applies_overrides_after_model_and_needs_no_data_root_for_a_path(
        tmp_path: Path, resnet18_weights: Path, run_cli) -> None:
    from test_evaluate import make_benchmark

    dataset = make_benchmark(tmp_path / "bench", n_instances=2)
    # the issue's command line: overrides after --model, the model. prefix, --dataset as an absolute path
    result = run_cli("evaluate", "--model", "gem_cnn_r101", "backbone=resnet18", f"model.pretrained={resnet18_weights}",
                     "--dataset", dataset, "--out", tmp_path / "eval", *FAST)
    assert result.code == 0, result.err
    # extract reads the same --dataset path without --data-root (one rule)
    result = run_cli("extract", "--model", "gem_cnn_r101", "backbone=resnet18", f"model.pretrained={resnet18_weights}",
                     "--dataset", dataset, "--split", "queries", "--out", tmp_path / "q", *FAST)
    assert result.code == 0, result.err
    assert result.out.startswith("2 images")


def test_a_dataset_name_is_looked_up_under_data_root_in_both_commands(tmp_path: Path, run_cli) -> None:
    for command in (["extract", "--out", tmp_path / "s"], ["evaluate"]):
        TRIED["dataset arguments"] += 1
        result = run_cli(*command, "--model", "dtop_tiny", "--dataset", "roxford5k", "--data-root", tmp_path / "none")
        line = one_error_line(result, "roxford5k", "dtop download roxford5k --root")
        assert str(tmp_path / "none") in line


BAD_OPTIONS: list[tuple[list[str], str]] = [
    (["--workers", "-1"], "--workers"),
    (["--workers", "100000"], "--workers"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "lots"], "--batch-size"),
    (["--shard-size", "0"], "--shard-size"),
    (["--device", "foo"], "unknown device 'foo'"),
    (["--device", "cuda:99"], "cuda:99"),
    (["--device", "-1"], "device"),
]


@pytest.mark.parametrize("options, words", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
@pytest.mark.parametrize("command", ["extract", "evaluate"])
def test_bad_runtime_options_are_one_line(tmp_path: Path, photos: Path, run_cli, command: str, options: list[str],
                                          words: str) -> None:
    TRIED["bad option values"] += 1
    where = ["--images", photos, "--out", tmp_path / "s"] if command == "extract" else ["--dataset", tmp_path]
    result = run_cli(command, "--model", "dtop_tiny", *where, *options)
    one_error_line(result, words)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, words", [
    (["report", "x", "--topk", "0"], "--topk"),
    (["report", "x", "--thumb-size", "100000"], "--thumb-size"),
    (["report", "x", "--max-queries", "-2"], "--max-queries"),
    (["evaluate", "--model", "m", "--dataset", "d", "--topk", "0"], "--topk"),
    (["download", "rparis6k", "--root", "r", "--timeout", "nan"], "--timeout"),
    (["download", "rparis6k", "--root", "r", "--retries", "-1"], "--retries"),
    (["data", "check", "r", "--format", "folder", "--workers", "0"], "--workers"),
    (["data", "check", "r", "--format", "folder", "--min-images-per-class", "0"], "--min-images-per-class"),
])
def test_out_of_range_options_of_other_commands(argv: list[str], words: str, run_cli) -> None:
    TRIED["bad option values"] += 1
    one_error_line(run_cli(*argv), words)


def test_train_on_an_unknown_device_is_one_line(tmp_path: Path, run_cli) -> None:
    from conftest import TINY_TRAIN_CONFIG, make_classes

    data = make_classes(tmp_path / "c", n_classes=2, per_class=2)
    TRIED["bad option values"] += 1
    one_error_line(run_cli("train", "--config", TINY_TRAIN_CONFIG, f"data.root={data}", f"run.out={tmp_path / 'r'}",
                           "run.device=tpu:3"), "unknown device 'tpu:3'")


OS_ERRORS: dict[str, tuple[BaseException, list[str]]] = {
    "no_space": (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), ["No space left on device", "while writing under",
                                                                    "free disk space"]),
    "quota": (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/data/x.npy"), ["quota", "/data/x.npy"]),
    "denied": (PermissionError(errno.EACCES, "Permission denied", "/srv/out/shard.npy"),
               ["Permission denied: /srv/out/shard.npy", "permissions"]),
    "read_only": (OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/x"), ["/ro/x", "read-only"]),
    "rename": (OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a", None, "/b"), ["/a -> /b"]),
    "odd_name": (OSError(errno.EIO, os.strerror(errno.EIO), os.fsdecode(b"/x/bad\xffname\n.jpg")),
                 ["I/O error", "bad"]),
    "too_many_files": (OSError(errno.EMFILE, os.strerror(errno.EMFILE)), ["--workers"]),
    "memory": (MemoryError(), ["out of memory"]),
    "cuda_oom": (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text"),
                 ["out of memory", "--batch-size"]),
}


@pytest.mark.parametrize("name", sorted(OS_ERRORS))
def test_os_errors_are_one_line_naming_the_file(tmp_path: Path, photos: Path, run_cli, monkeypatch, name: str) -> None:
    import dtop.cli.extract as extract_cli
    import dtop.engine.extract as extract_module

    error, words = OS_ERRORS[name]

    def fail(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(extract_cli, "load_cli_model", lambda args: None)  # no model needed to fail
    monkeypatch.setattr(extract_module, "extract_to_store", fail)
    TRIED["injected OS errors"] += 1
    result = run_cli("extract", "--model", "dtop_tiny", "--images", photos, "--out", tmp_path / "s", *FAST)
    one_error_line(result, *words)


def test_a_safetensors_write_error_is_one_line(tmp_path: Path, photos: Path, run_cli, monkeypatch) -> None:
    import safetensors.torch

    def fail(*args: Any, **kwargs: Any) -> None:
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    TRIED["injected OS errors"] += 1
    line = one_error_line(run_cli("index", "build", "--model", "dtop_tiny", "--images", photos,
                                  "--out", tmp_path / "ix", *FAST), "StorageFull")
    assert "safetensors" in line


def test_real_os_errors_from_the_file_system(tmp_path: Path, photos: Path, run_cli) -> None:
    (tmp_path / "file").write_text("x")
    TRIED["injected OS errors"] += 1
    result = run_cli("extract", "--model", "dtop_tiny", "--images", photos, "--out", tmp_path / "file" / "store", *FAST)
    one_error_line(result, str(tmp_path / "file"))


def test_a_bug_still_shows_its_traceback(tmp_path: Path, photos: Path, monkeypatch) -> None:
    """Only user-caused errors become one line: a programming error keeps its traceback for the report."""
    import dtop.engine.extract as extract_module
    from dtop.cli.main import main

    monkeypatch.setattr(extract_module, "extract_to_store", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["extract", "--model", "dtop_tiny", "--images", str(photos), "--out", str(tmp_path / "s"), *FAST])

