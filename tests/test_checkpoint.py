"""Self-describing checkpoints and pretrained-weight resolution."""

import dataclasses
import json
import time

import pytest
import torch

from dtop.errors import CheckpointError, ConfigError, PretrainedWeightsUnavailable
from dtop.models import build_model, load_model, load_weights, read_checkpoint, save_checkpoint
from dtop.models.weights import cached_hub_file, pretrained_state_dict


def test_round_trip_gives_identical_descriptors(tmp_path, tiny_model):
    with torch.no_grad():
        tiny_model.local_branch.pool.p.fill_(4.5)  # a trained-looking value, not the init
    path = save_checkpoint(tiny_model, tmp_path / "model.safetensors", metadata={"epoch": 3})
    loaded = load_model(path)
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny_model(x))
    assert loaded.config == tiny_model.config
    assert loaded.mean == [0.5, 0.5, 0.5]  # normalisation travels with the weights
    assert read_checkpoint(path).metadata == {"epoch": 3}
    assert not list(tmp_path.glob("*.tmp"))
    again = save_checkpoint(loaded, tmp_path / "again.safetensors", metadata={"epoch": 3})
    assert again.read_bytes() == path.read_bytes()  # same model, same bytes


def test_extras_round_trip(tmp_path, tiny_model):
    whitening = {"mean": torch.randn(64), "projection": torch.randn(32, 64)}
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors", extras={"whitening": whitening},
                           extras_metadata={"whitening": {"fitted_on": 100}})
    model = load_model(path)
    assert set(model.checkpoint_extras) == {"whitening"}
    for key, value in whitening.items():
        assert torch.equal(model.checkpoint_extras["whitening"][key], value)
    assert model.checkpoint_extras_metadata == {"whitening": {"fitted_on": 100}}


def test_checkpoint_of_another_model_fails_naming_the_mismatch(tmp_path, tiny_model):
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    other = build_model(dataclasses.replace(tiny_model.config, dim=32))
    with pytest.raises(CheckpointError, match=r"dim: 64 vs 32"):
        load_weights(other, path)
    other = build_model(dataclasses.replace(tiny_model.config, locality="none"))
    with pytest.raises(CheckpointError, match="locality"):
        load_weights(other, path)


def test_files_that_are_not_dtop_checkpoints(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a dtop checkpoint"):
        load_model(garbage)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="model.pretrained"):
        load_model(plain)


def test_truncated_checkpoint_fails_clearly(tmp_path, tiny_model):
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_model(path)


def test_pickled_weights_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    cfg = dataclasses.replace(build_model("dtop_tiny").config, pretrained=str(path))
    with pytest.raises(CheckpointError, match="weights_only"):
        build_model(cfg)


def test_offline_pretrained_tag_fails_fast_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable, match=r"model.pretrained=/path/to/"):
        pretrained_state_dict("vit_base_r50_s16_384", "orig_in21k_ft_in1k", cache_dir=tmp_path)
    assert time.monotonic() - start < 5


def test_unknown_pretrained_tag():
    with pytest.raises(ConfigError, match="orig_in21k_ft_in1k"):
        pretrained_state_dict("vit_base_r50_s16_384", "no_such_tag")


def test_pretrained_tag_is_read_from_the_local_hub_cache(tmp_path):
    """Weights already in the Hugging Face cache load without any network."""
    from safetensors.torch import save_file

    repo = tmp_path / "models--timm--vit_base_r50_s16_384.orig_in21k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file({"cls_token": torch.ones(1, 1, 4)}, str(snapshot / "model.safetensors"))
    hub_id = "timm/vit_base_r50_s16_384.orig_in21k_ft_in1k"
    assert cached_hub_file(hub_id, tmp_path) == snapshot / "model.safetensors"
    state = pretrained_state_dict("vit_base_r50_s16_384", "orig_in21k_ft_in1k", cache_dir=tmp_path)
    assert torch.equal(state["cls_token"], torch.ones(1, 1, 4))


def test_metadata_holds_the_full_config(tmp_path, tiny_model):
    from safetensors import safe_open

    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["dtop"])
    assert meta["format"] == "dtop-model"
    config = meta["config"]
    assert config["stem_layers"] == [1, 1, 1] and config["mean"] == [0.5, 0.5, 0.5]
