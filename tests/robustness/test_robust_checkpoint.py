"""Tampered and foreign checkpoints: every one is a CheckpointError naming the file (one line from
`dtop info`), validated before use: no AttributeError, no huge allocation, no silent cast."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from dtop.errors import CheckpointError
from dtop.models import build_model, create_model, load_model, load_weights, read_checkpoint, save_checkpoint
from dtop.models.checkpoint import HEADER_KEY

from .hostile import TRIED


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("dtop_tiny")


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, tiny) -> Path:
    return save_checkpoint(tiny, tmp_path_factory.mktemp("ckpt") / "good.safetensors")


def tensors_and_header(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[HEADER_KEY])


def with_header(good: Path, out: Path, edit: Any) -> Path:
    """A copy of ``good`` whose header JSON is ``edit(header)`` (a value, or a string written as is)."""
    tensors, header = tensors_and_header(good)
    new = edit(header)
    save_file(tensors, str(out), metadata={HEADER_KEY: new if isinstance(new, str) else json.dumps(new)})
    return out


def _set(key: str, value: Any):  # noqa: ANN202
    def edit(h: dict[str, Any]) -> dict[str, Any]:
        h[key] = value
        return h
    return edit


def _config(**changes: Any):  # noqa: ANN202
    def edit(h: dict[str, Any]) -> dict[str, Any]:
        h["config"].update(changes)
        return h
    return edit


TAMPERED_HEADERS: dict[str, tuple[Any, str]] = {
    "not_json": (lambda h: "{not json", "without a dtop configuration"),
    "json_list": (lambda h: [1, 2], "not a JSON object"),
    "json_string": (lambda h: "\"dtop-model\"", "not a JSON object"),
    "json_number": (lambda h: 5, "not a JSON object"),
    "json_null": (lambda h: None, "not a JSON object"),
    "deeply_nested": (lambda h: "[" * 100000 + "]" * 100000, "without a dtop configuration"),
    "other_format": (_set("format", "timm"), "format='timm'"),
    "no_format": (lambda h: {k: v for k, v in h.items() if k != "format"}, "format=None"),
    "future_version": (_set("format_version", "99"), "format version '99'"),
    "version_as_list": (_set("format_version", [1]), "format version"),
    "config_string": (_set("config", "dtop_tiny"), "'config' is str"),
    "config_list": (_set("config", [1, 2]), "'config' is list"),
    "config_missing": (lambda h: {k: v for k, v in h.items() if k != "config"}, "'config' is NoneType"),
    "config_unknown_key": (_config(colour="red"), "unknown config key 'model.colour'"),
    "config_bad_choice": (_config(arch="resnet"), "model.arch"),
    "config_negative_dim": (_config(dim=-4), "model.dim"),
    "config_nan": (_config(gem_p=float("nan")), "model.gem_p"),
    "config_backbone_args_list": (_config(backbone_args=[1]), "model.backbone_args"),
    "extras_list": (_set("extras", [1]), "'extras'"),
    "extras_entry_string": (_set("extras", {"whitening": "x"}), "'extras'"),
    "metadata_list": (_set("metadata", [1]), "'metadata'"),
    "huge_embed_dim": (_config(backbone_args={"embed_dim": 200000, "depth": 4, "num_heads": 4}),
                       "do not fit the model its header describes"),
    "huge_dim": (_config(dim=10**7), "do not fit the model its header describes"),
    "deeper_than_its_tensors": (_config(backbone_args={"embed_dim": 64, "depth": 40, "num_heads": 4}),
                                "do not fit the model its header describes"),
}


@pytest.mark.parametrize("name", sorted(TAMPERED_HEADERS))
def test_tampered_headers_are_checkpoint_errors(tmp_path: Path, good: Path, name: str) -> None:
    edit, words = TAMPERED_HEADERS[name]
    path = with_header(good, tmp_path / f"{name}.safetensors", edit)
    TRIED["tampered checkpoint headers"] += 1
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    assert words in str(info.value) and str(path) in str(info.value)
    assert time.monotonic() - start < 30  # nothing of the declared size was allocated


def test_a_huge_declared_model_is_refused_before_it_is_built(tmp_path: Path, good: Path, monkeypatch) -> None:
    import dtop.models.factory as factory

    path = with_header(good, tmp_path / "huge.safetensors", TAMPERED_HEADERS["huge_embed_dim"][0])
    real, devices = factory.build_model, []

    def spy(*args: Any, **kwargs: Any):  # noqa: ANN202
        devices.append(torch.empty(0).device.type)  # the default device the model would be built on
        return real(*args, **kwargs)

    monkeypatch.setattr(factory, "build_model", spy)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)
    assert devices == ["meta"]  # built without storage only


def _corrupt_tensors(good: Path, out: Path, change: Any) -> Path:
    tensors, header = tensors_and_header(good)
    change(tensors)
    save_file(tensors, str(out), metadata={HEADER_KEY: json.dumps(header)})
    return out


TAMPERED_TENSORS: dict[str, tuple[Any, str]] = {
    "integer_weight": (lambda t: t.update({k: t[k].to(torch.int32) for k in list(t)[:1]}), "of another kind"),
    "all_integer": (lambda t: t.update({k: v.to(torch.int64) for k, v in t.items()}), "of another kind"),
    "bool_weight": (lambda t: t.update({k: t[k] > 0 for k in list(t)[:1]}), "of another kind"),
    "missing_tensor": (lambda t: t.pop(next(iter(t))), "missing keys"),
    "extra_tensor": (lambda t: t.update({"surprise": torch.zeros(3)}), "unexpected keys"),
    "wrong_shape": (lambda t: t.update({k: torch.zeros(7, 7) for k in list(t)[:1]}), "shape mismatches"),
}


@pytest.mark.parametrize("name", sorted(TAMPERED_TENSORS))
def test_tampered_tensors_are_checkpoint_errors(tmp_path: Path, good: Path, tiny, name: str) -> None:
    change, words = TAMPERED_TENSORS[name]
    path = _corrupt_tensors(good, tmp_path / f"{name}.safetensors", change)
    TRIED["tampered checkpoint tensors"] += 1
    with pytest.raises(CheckpointError, match=words):
        load_model(path)
    with pytest.raises(CheckpointError, match=words):
        load_weights(tiny, path)  # fails before changing the model


def test_half_precision_weights_still_load(tmp_path: Path, good: Path) -> None:
    path = _corrupt_tensors(good, tmp_path / "half.safetensors",
                            lambda t: t.update({k: v.half() for k, v in t.items() if v.is_floating_point()}))
    assert load_model(path).descriptor_dim == 64


def _raw_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {
        "empty": b"",
        "truncated_header": data[:20],
        "truncated_tensors": data[: len(data) // 2],
        "huge_header_length": (10**18).to_bytes(8, "little") + data[8:],
        "header_length_beyond_file": (len(data)).to_bytes(8, "little") + data[8:],
        "random_bytes": bytes(range(256)) * 8,
        "torch_pickle": None,
        "json_text": b'{"format": "dtop-model"}',
    }
    out = {}
    for name, content in files.items():
        path = tmp_path / f"{name}.safetensors"
        if content is None:
            torch.save({"w": torch.zeros(2)}, path)
        else:
            path.write_bytes(content)
        out[name] = path
    out["directory"] = tmp_path / "dir.safetensors"
    out["directory"].mkdir()
    out["missing"] = tmp_path / "missing.safetensors"
    return out


def test_foreign_and_broken_files_are_one_line_from_the_cli(tmp_path: Path, good: Path, run_cli) -> None:
    files = _raw_files(tmp_path, good)
    tampered = {n: with_header(good, tmp_path / f"h_{n}.safetensors", TAMPERED_HEADERS[n][0])
                for n in ("json_list", "config_string", "huge_embed_dim")}
    tampered["integer"] = _corrupt_tensors(good, tmp_path / "int.safetensors", TAMPERED_TENSORS["integer_weight"][0])
    for name, path in {**files, **tampered}.items():
        TRIED["broken checkpoint files"] += 1
        result = run_cli("info", path)
        assert result.code == 2, (name, result.err)
        assert len(result.error_lines) == 1, (name, result.err)
        if name not in ("directory", "missing"):  # those are taken for a model name (none exists)
            assert str(path) in result.error_lines[0], (name, result.err)
    for path in files.values():
        if path.is_file():
            with pytest.raises(CheckpointError):
                read_checkpoint(path)


def test_a_dtop_checkpoint_with_locality_blocks_is_a_pretrained_backbone(good: Path) -> None:
    """model.pretrained=<a dtop checkpoint>: its backbone loads; the locality modules start as identity."""
    assert read_checkpoint(good).config.locality == "conv-ffn"
    model = create_model("dtop_tiny", [f"pretrained={good}"])
    source = load_model(good)
    own = model.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("backbone.") and "dwconv" not in key:
            assert torch.equal(own[key], value), key
    assert all(not v.any() for k, v in own.items() if "dwconv" in k)  # identity, as when built
