import pytest

from dtop.config import NonNegativeFloat, PositiveInt, apply_overrides, from_dict, load_config
from dtop.engine.settings import ExtractSettings, load_extract_settings
from dtop.engine.train_config import load_train_config
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


def test_a_choice_outside_the_literal_lists_the_choices_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"'model.fusion' must be one of concat, orthogonal, got 'orthogonl'; "
                                          r"did you mean 'orthogonal'\?"):
        from_dict(ModelConfig, {"fusion": "orthogonl"}, where="model")
    with pytest.raises(ConfigError, match="optim.amp' must be one of auto, none, bf16, fp16"):
        load_train_config(_train_configs() / "tiny.yaml", ["optim.amp=float16"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.epochs=0", "'optim.epochs' must be positive, got 0"),
        ("optim.grad_clip=-1", "'optim.grad_clip' must be non-negative"),
        ("loss.subcenters=0", "'loss.subcenters' must be positive"),
        ("val.scales=[1.0, -0.5]", r"'val.scales\[1\]' must be positive"),
        ("data.train_size=8", "'data.train_size' must be at least 16"),
        ("model.dim=0", "'model.dim' must be positive"),
    ],
)
def test_numbers_out_of_range_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(_train_configs() / "tiny.yaml", [override])


def test_ints_become_floats_and_direct_construction_is_checked_too():
    cfg = from_dict(ModelConfig, {"gem_p": 4, "mean": [0, 0, 1]}, where="model")
    assert isinstance(cfg.gem_p, float) and cfg.mean == [0.0, 0.0, 1.0] and isinstance(cfg.mean[0], float)
    assert isinstance(ModelConfig(gem_p=2).gem_p, float)  # no file: the same conversion
    with pytest.raises(ConfigError, match="'model.locality_blocks' must be non-negative"):
        ModelConfig(locality_blocks=-1)
    with pytest.raises(ConfigError, match="'dtype' must be one of float32, float16"):
        ExtractSettings(dtype="bf16")


def test_literal_and_bounds_in_the_checker_itself():
    from dataclasses import dataclass
    from typing import Literal

    @dataclass
    class Small:
        mode: Literal["fast", "exact"] = "fast"
        count: PositiveInt = 1
        rate: NonNegativeFloat = 0.0
        limit: PositiveInt | None = None

    assert from_dict(Small, {"rate": 0, "limit": None}) == Small(rate=0.0)
    with pytest.raises(ConfigError, match="did you mean 'exact'"):
        from_dict(Small, {"mode": "exac"})
    with pytest.raises(ConfigError, match="must be one of fast, exact, got True"):
        from_dict(Small, {"mode": True})
    with pytest.raises(ConfigError, match="'count' must be positive, got -2"):
        from_dict(Small, {"count": -2})
    with pytest.raises(ConfigError, match="'limit' must be positive, got 0"):
        from_dict(Small, {"limit": 0})
    with pytest.raises(ConfigError, match="'count' must be of type int"):
        from_dict(Small, {"count": 1.5})


def test_every_shipped_config_loads():
    from dtop.models import list_models

    models = sorted(_configs().glob("*.yaml"))
    assert models and {p.stem for p in models} <= set(list_models())
    for path in models:
        resolve_model_config(path)
    trains = [p for p in sorted(_train_configs().glob("*.yaml")) if not p.name.startswith("_")]
    assert len(trains) > 5
    for path in trains:
        load_train_config(path)


def test_extraction_settings_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "extract.yaml"
    path.write_text("image_size: 512\nscales: [1, 0.5]\ndtype: float16\n")
    settings = load_extract_settings(path, ["exif_transpose=true"])
    assert settings == ExtractSettings(image_size=512, scales=[1.0, 0.5], dtype="float16", exif_transpose=True)
    assert load_extract_settings(None, ["image_size=256"]).image_size == 256
    with pytest.raises(ConfigError, match="did you mean 'scales'"):
        load_extract_settings(None, ["scale=[1.0]"])
    with pytest.raises(ConfigError, match="'scales\\[0\\]' must be positive"):
        load_extract_settings(path, ["scales=[0]"])
    with pytest.raises(ConfigError, match="at least one"):
        load_extract_settings(path, ["scales=[]"])
    with pytest.raises(ConfigError, match="'image_size' must be at least 16"):
        load_extract_settings(path, ["image_size=-1"])


def _train_configs():
    return _configs().parent / "train"


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    from dtop.config import parse_yaml

    assert parse_yaml("1e-4") == 1e-4 and parse_yaml("-2E3") == -2000.0 and parse_yaml("+5e0") == 5.0
    assert parse_yaml("1e") == "1e" and parse_yaml("1.2.3") == "1.2.3" and parse_yaml("0x10") == 16
    (tmp_path / "t.yaml").write_text("optim:\n  lr: 1e-4\n")
    assert load_train_config(tmp_path / "t.yaml", ["optim.weight_decay=5e-2"]).optim.lr == 1e-4


def test_duplicate_keys_are_an_error_naming_key_and_lines(tmp_path):
    (tmp_path / "t.yaml").write_text("model:\n  dim: 64\n  dim: 128\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'dim' \(first given on line 2\).*line 3"):
        load_config(tmp_path / "t.yaml")
    # a YAML merge key may be overridden: that is not a duplicate
    (tmp_path / "m.yaml").write_text("a: &b {dim: 1}\nmodel:\n  <<: *b\n  dim: 2\n")
    assert load_config(tmp_path / "m.yaml")["model"] == {"dim": 2}


def test_floats_are_finite_and_bounds_apply_in_code():
    from dataclasses import dataclass
    from typing import Annotated

    from dtop.config import AtMost, Positive, check_fields

    @dataclass
    class C:
        x: Annotated[float, Positive, AtMost(1.0, why="a fraction")] = 0.5

        def __post_init__(self) -> None:
            check_fields(self, "c")

    with pytest.raises(ConfigError, match="'c.x' must be at most 1 \\(a fraction\\)"):
        C(2.0)
    with pytest.raises(ConfigError, match="'c.x' must be a finite number"):
        C(float("nan"))
    with pytest.raises(ConfigError, match="section 'c' must be a mapping"):
        from_dict(C, [1], where="c")
