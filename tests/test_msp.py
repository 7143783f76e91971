"""Multi-scale power averaging (cirtorch's msp): resolution per model, values against a direct computation."""

import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dtop.engine.extract import (
    describe,
    extract,
    extract_to_store,
    gem_power,
    scale_power,
    settings_digest,
    settings_record,
)
from dtop.engine.settings import ExtractSettings, load_extract_settings
from dtop.errors import ConfigError
from dtop.models import build_model, resolve_model_config

SCALES = [0.75, 1.0, 1.25]


def gem_cnn(dim=None, p=3.0):
    """A small GeM ResNet (random weights); ``dim=None``: the GeM feature is the descriptor (cirtorch)."""
    config = dataclasses.replace(resolve_model_config("gem_cnn_r101"), backbone="resnet10t", pretrained=None,
                                 dim=dim, gem_p=p)
    torch.manual_seed(0)
    return build_model(config).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("msp")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(80, 60), (60, 80), (72, 72), (90, 50), (64, 64)]):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def by_hand(model, paths, power):
    """Each scale extracted on its own, then combined as cirtorch's extract_ms does."""
    per_scale = [extract(model, paths, settings=ExtractSettings(image_size=64, scales=[s], scale_pool="mean"))
                 for s in SCALES]
    v = torch.zeros_like(per_scale[0], dtype=torch.float64)
    for d in per_scale:
        v += d.double() ** power
    v = (v / len(SCALES)) ** (1 / power)
    return (v / v.norm(dim=1, keepdim=True)).float(), per_scale


@pytest.mark.slow
def test_which_models_take_the_power_mean():
    model = gem_cnn(p=2.5)
    assert gem_power(model) == 2.5
    with torch.no_grad():
        model.pool.p.fill_(2.75)  # a learned exponent: the current value, as cirtorch reads net.pool.p
    assert scale_power(model, "auto") == scale_power(model, "power") == 2.75
    assert scale_power(model, "mean") is None
    projected = gem_cnn(dim=32)  # a layer after GeM (cirtorch: a whitening layer): plain mean
    assert gem_power(projected) is None and scale_power(projected, "auto") is None
    torch.manual_seed(0)
    dtop = build_model("dtop_tiny")
    assert scale_power(dtop, "auto") is None  # DToP: unchanged
    with pytest.raises(ConfigError, match="scale_pool=power needs a GeM model"):
        scale_power(dtop, "power")
    with pytest.raises(ConfigError, match="scale_pool"):
        ExtractSettings(scale_pool="max")


@pytest.mark.slow
def test_power_mean_equals_the_direct_computation(images):
    model = gem_cnn(p=3.0)
    expected, per_scale = by_hand(model, images, 3.0)
    got = extract(model, images, settings=ExtractSettings(image_size=64, scales=SCALES), batch_size=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # explicit power: the same; the plain mean differs (so the test can tell them apart)
    power = extract(model, images, settings=ExtractSettings(image_size=64, scales=SCALES, scale_pool="power"))
    torch.testing.assert_close(power, expected, rtol=1e-5, atol=1e-6)
    mean = extract(model, images, settings=ExtractSettings(image_size=64, scales=SCALES, scale_pool="mean"))
    plain = torch.stack(per_scale).mean(0)
    torch.testing.assert_close(mean, plain / plain.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert (mean - expected).abs().max() > 1e-4
    # one image at a time (dtop.describe) gives the same power mean
    one = describe(model, images[0], image_size=64, scales=SCALES)
    torch.testing.assert_close(one, expected[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_dtop_default_is_the_plain_mean(images):
    torch.manual_seed(0)
    model = build_model("dtop_tiny").eval()
    default = extract(model, images[:3], settings=ExtractSettings(image_size=64, scales=SCALES[:2]))
    per_scale = [extract(model, images[:3], settings=ExtractSettings(image_size=64, scales=[s])) for s in SCALES[:2]]
    plain = torch.stack(per_scale).mean(0)
    torch.testing.assert_close(default, plain / plain.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_records_and_digests_stay_those_of_the_plain_mean(tmp_path, images):
    torch.manual_seed(0)
    dtop = build_model("dtop_tiny")
    settings = ExtractSettings(image_size=64, scales=[1.0])
    legacy = {"image_size": 64, "scales": [1.0], "dtype": "float32", "exif_transpose": False}
    # the plain mean is recorded as before the option existed: old stores and caches still match
    assert settings_record(dtop, settings) == legacy
    assert settings_digest(dtop, settings) == hashlib.sha256(
        json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:10]
    store = extract_to_store(dtop, images[:2], tmp_path / "dtop", settings=settings, num_workers=0, progress=False)
    assert "scale_pool" not in store.settings
    gem = gem_cnn(p=3.0)
    record = settings_record(gem, settings)
    assert record == {**legacy, "scale_pool": "power", "scale_power": 3.0}
    assert settings_digest(gem, settings) != settings_digest(gem, dataclasses.replace(settings, scale_pool="mean"))
    store = extract_to_store(gem, images[:2], tmp_path / "gem", settings=settings, num_workers=0, progress=False)
    assert store.settings["scale_pool"] == "power" and math.isclose(store.settings["scale_power"], 3.0)


def test_scale_pool_from_file_and_command_line(tmp_path):
    from dtop.cli.common import settings_from_args
    from dtop.cli.main import build_parser

    (tmp_path / "x.yaml").write_text("scale_pool: power\nscales: [1.0]\n")
    assert load_extract_settings(tmp_path / "x.yaml").scale_pool == "power"
    assert load_extract_settings(None, ["scale_pool=mean"]).scale_pool == "mean"
    args = build_parser().parse_args(["extract", "--model", "dtop_tiny", "--out", "x", "--scale-pool", "mean"])
    assert settings_from_args(args).scale_pool == "mean"
    args = build_parser().parse_args(["extract", "--model", "dtop_tiny", "--out", "x"])
    assert settings_from_args(args).scale_pool == "auto"
