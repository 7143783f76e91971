import pytest

from dtop.config import apply_overrides, from_dict, load_config
from dtop.errors import ConfigError
from dtop.models import ModelConfig, resolve_model_config


def test_base_composition_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  dim: 128\n  layers: [-2, -1]\n  backbone_args: {depth: 4}\n")
    (tmp_path / "child.yaml").write_text(
        "_base_: base.yaml\nmodel:\n  fusion: orthogonal\n  backbone_args: {embed_dim: 32}\n"
    )
    cfg = load_config(tmp_path / "child.yaml", ["model.dim=64", "model.layers=[-1]"])
    assert cfg["model"] == {
        "dim": 64,
        "layers": [-1],
        "fusion": "orthogonal",
        "backbone_args": {"depth": 4, "embed_dim": 32},  # mappings merge recursively
    }


def test_base_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("bad", ["nokey", "=3", "a..b=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        apply_overrides({}, [bad])


def test_override_values_are_yaml():
    cfg = apply_overrides({"model": {"dim": 1}}, ["model.dim=null", "model.pretrained=none", "x.y=1.5"])
    assert cfg == {"model": {"dim": None, "pretrained": "none"}, "x": {"y": 1.5}}


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'model.locality'"):
        from_dict(ModelConfig, {"localty": "none"}, where="model")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"dim": "big"}, "model.dim"),
        ({"fusion": "sum"}, "fusion"),
        ({"locality": "conv"}, "locality"),
        ({"layers": []}, "at least one"),
        ({"fusion": "orthogonal", "global_dim": 8, "local_dim": 16}, "global_dim == model.local_dim"),
        ({"backbone": "hybrid"}, "stem_layers"),
        ({"gem_p": True}, "gem_p"),
    ],
)
def test_bad_values_are_rejected(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, data, where="model")


def test_registered_names_and_files_resolve(tmp_path):
    tiny = resolve_model_config("dtop_tiny")
    assert tiny.backbone == "hybrid" and tiny.stem_layers == [1, 1, 1]
    assert tiny.pretrained is None  # "none" in YAML means no weights
    path = tmp_path / "m.yaml"
    path.write_text("_base_: " + str(_configs() / "dtop_tiny.yaml") + "\nmodel:\n  dim: 16\n")
    assert resolve_model_config(path).dim == 16
    assert resolve_model_config("dtop_tiny", ["dim=8"]).dim == 8
    with pytest.raises(ConfigError, match="registered"):
        resolve_model_config("no_such_model")


def _configs():
    from dtop.models.factory import builtin_config_dir

    return builtin_config_dir()
