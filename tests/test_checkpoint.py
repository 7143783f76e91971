"""Self-describing checkpoints and pretrained-weight resolution."""

import dataclasses
import json
import time

import pytest
import torch

from dtop.errors import CheckpointError, ConfigError, PretrainedWeightsUnavailable
from dtop.models import (
    CheckpointExtra,
    build_model,
    load_model,
    load_weights,
    model_fingerprint,
    read_checkpoint,
    save_checkpoint,
)
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
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors",
                           extras={"whitening": CheckpointExtra(whitening, {"fitted_on": 100})})
    model = load_model(path)
    assert set(model.checkpoint_extras) == {"whitening"}
    for key, value in whitening.items():
        assert torch.equal(model.checkpoint_extras["whitening"].tensors[key], value)
    assert model.checkpoint_extras["whitening"].metadata == {"fitted_on": 100}
    # a loaded model saves its extras again by default
    again = load_model(save_checkpoint(model, tmp_path / "again.safetensors"))
    assert again.checkpoint_extras["whitening"].metadata == {"fitted_on": 100}
    assert not tiny_model.checkpoint_extras  # a built model has none


def test_fingerprint_survives_a_checkpoint_round_trip(tmp_path, tiny_model):
    # as if built from pretrained weights: load_model clears `pretrained` (the weights are in the file)
    tiny_model.config = dataclasses.replace(tiny_model.config, pretrained="orig_in21k_ft_in1k", gem_p=4)
    loaded = load_model(save_checkpoint(tiny_model, tmp_path / "m.safetensors"))
    assert loaded.config.pretrained is None
    assert model_fingerprint(loaded) == model_fingerprint(tiny_model)


def test_fingerprint_of_a_loaded_model_is_the_one_recorded_before(tmp_path, tiny_model):
    # indexes, stores and evaluation caches recorded this (config + float32 weights) fingerprint
    import hashlib

    from dtop.config import to_dict

    loaded = load_model(save_checkpoint(tiny_model, tmp_path / "m.safetensors"))
    digest = hashlib.sha256(json.dumps(to_dict(loaded.config), sort_keys=True).encode())
    for name, tensor in sorted(loaded.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    assert model_fingerprint(loaded) == digest.hexdigest()[:16]


def test_fingerprint_follows_weights_and_config(tiny_model):
    before = model_fingerprint(tiny_model)
    assert model_fingerprint(build_model(dataclasses.replace(tiny_model.config, init_seed=1))) != before
    original = tiny_model.fusion.fc.bias[0].item()
    with torch.no_grad():
        tiny_model.fusion.fc.bias[0] += 1e-3
    assert model_fingerprint(tiny_model) != before
    with torch.no_grad():
        tiny_model.fusion.fc.bias[0] = original
    assert model_fingerprint(tiny_model) == before
    relaid = build_model(dataclasses.replace(tiny_model.config, locality_radius=5))  # same weights, other model
    relaid.load_state_dict(tiny_model.state_dict())
    assert model_fingerprint(relaid) != before


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
