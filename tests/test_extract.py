"""Extraction engine: multi-scale, bucketing, stores, resume after a kill, bad images."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtop.data.images import channel_tensors, load_image, normalize, resize_image, to_tensor
from dtop.engine.extract import _Sums, describe, extract, extract_to_store
from dtop.engine.settings import ExtractSettings
from dtop.errors import DataError
from dtop.models import build_model, save_checkpoint

SETTINGS = ExtractSettings(image_size=64, scales=[0.75, 1.0])
SIZES = [(80, 60), (60, 80), (70, 70), (90, 50)]


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        path = folder / f"img{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("dtop_tiny")


def test_bucketed_batches_equal_one_image_at_a_time(tmp_path, model):
    paths = make_images(tmp_path / "im", 9)
    batched = extract(model, paths, settings=SETTINGS, batch_size=4)
    single = torch.stack([describe(model, p, image_size=64, scales=[0.75, 1.0]) for p in paths])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(9))


def test_normalisation_constants_built_once_give_the_same_values():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    assert torch.equal(normalize(x, *channel_tensors(mean, std)), normalize(x, mean, std))
    with pytest.raises(DataError, match="3 values"):
        channel_tensors([0.5, 0.5], std)
    with pytest.raises(DataError, match="positive"):
        channel_tensors(mean, [0.2, 0.0, 0.2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_extraction_loop_never_makes_the_host_wait_for_the_gpu(model):
    # A host-side wait per batch leaves the GPU idle while the next batch is fetched: loading is
    # then no longer hidden behind compute (the files/tensors ratio of bench_extract).
    device = torch.device("cuda")
    sums = _Sums(model.to(device).eval(), 4, 2, device, "bf16")
    pageable = torch.randint(0, 256, (4, 3, 64, 48), dtype=torch.uint8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums.add(torch.arange(4), pageable.pin_memory())
        sums.add(torch.tensor([3, 2, 1, 0]), pageable)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sums.descriptors().shape == (4, model.descriptor_dim)


def test_extraction_equals_the_model_on_cpu_normalised_tensors(tmp_path, model):
    # workers ship uint8 and batches are normalised on the model's device: the same input as to_tensor
    paths = make_images(tmp_path / "im", 3)
    got = extract(model, paths, settings=SETTINGS, batch_size=2)
    with torch.inference_mode():
        for i, path in enumerate(paths):
            img = load_image(path)
            outs = [model(to_tensor(resize_image(img, 64 * s), model.mean, model.std)[None]) for s in SETTINGS.scales]
            torch.testing.assert_close(got[i], torch.nn.functional.normalize(sum(outs) / 2, dim=1)[0])


def test_multiscale_is_the_normalised_mean_of_scales(tmp_path, model):
    paths = make_images(tmp_path / "im", 3)
    per_scale = [extract(model, paths, settings=ExtractSettings(image_size=64, scales=[s])) for s in (0.75, 1.0)]
    both = extract(model, paths, settings=SETTINGS)
    expected = torch.nn.functional.normalize(per_scale[0] + per_scale[1], dim=1)
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-5)


def test_bbx_crops_the_image(tmp_path, model):
    paths = make_images(tmp_path / "im", 1)
    bbx = [10.0, 5.0, 50.0, 45.0]
    cropped = extract(model, paths, bbxs=[bbx], settings=SETTINGS)
    Image.open(paths[0]).crop((10, 5, 50, 45)).save(tmp_path / "crop.png")
    torch.testing.assert_close(cropped[0], extract(model, [tmp_path / "crop.png"], settings=SETTINGS)[0])


def test_store_equals_in_memory_extraction_and_is_reused(tmp_path, model):
    paths = make_images(tmp_path / "im", 7)
    store = extract_to_store(model, paths, tmp_path / "store", settings=SETTINGS, shard_size=3,
                             num_workers=2, progress=False)
    descriptors, valid = store.load()
    assert valid.all()
    torch.testing.assert_close(descriptors, extract(model, paths, settings=SETTINGS), rtol=1e-6, atol=1e-6)
    mtime = (tmp_path / "store" / "shard-00000.safetensors").stat().st_mtime_ns
    extract_to_store(model, paths, tmp_path / "store", settings=SETTINGS, shard_size=3, progress=False)
    assert (tmp_path / "store" / "shard-00000.safetensors").stat().st_mtime_ns == mtime  # skipped
    other = build_model("dtop_tiny", ["dim=32"])
    with pytest.raises(DataError, match="--overwrite"):
        extract_to_store(other, paths, tmp_path / "store", settings=SETTINGS, shard_size=3, progress=False)


def _shard_bytes(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.glob("shard-*.safetensors"))}


def test_killed_run_resumes_to_the_same_store(tmp_path, model):
    make_images(tmp_path / "im", 12)
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    cmd = [sys.executable, "-m", "dtop.cli.main", "extract", "--model", str(ckpt), "--images", str(tmp_path / "im"),
           "--image-size", "64", "--scales", "0.75", "1.0", "--shard-size", "2", "--workers", "0",
           "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    uninterrupted = tmp_path / "full"
    subprocess.run([*cmd, "--out", str(uninterrupted)], check=True, env=env, timeout=120)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], env=env)
    deadline = time.monotonic() + 60
    while not list(killed.glob("shard-00001.done.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(killed.glob("shard-*.done.json")))
    assert 1 <= done_before < 6, "the kill should land mid-way"
    subprocess.run([*cmd, "--out", str(killed)], check=True, env=env, timeout=120)
    assert _shard_bytes(killed) == _shard_bytes(uninterrupted)
    assert len(_shard_bytes(killed)) == 6
    assert not list(killed.glob(".*.tmp"))


def _bad_images(folder: Path) -> dict[str, Path]:
    good = make_images(folder, 2)
    rgb = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    files = {"good0": good[0], "good1": good[1]}
    files["gray"] = folder / "gray.png"
    Image.fromarray(rgb[..., 0]).save(files["gray"])
    files["cmyk"] = folder / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(files["cmyk"])
    files["alpha"] = folder / "alpha.png"
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(files["alpha"])
    files["zero"] = folder / "zero.jpg"
    files["zero"].write_bytes(b"")
    files["truncated"] = folder / "truncated.jpg"
    files["truncated"].write_bytes(good[0].read_bytes()[:300])
    files["missing"] = folder / "missing.jpg"
    return files


def test_bad_images_are_named_and_fail_unless_skipped(tmp_path, model):
    files = _bad_images(tmp_path / "im")
    paths = list(files.values())
    with pytest.raises(DataError, match=r"3 image\(s\) could not be read") as err:
        extract_to_store(model, paths, tmp_path / "store", settings=SETTINGS, shard_size=4, progress=False)
    for name in ("zero.jpg", "truncated.jpg", "missing.jpg"):
        assert name in str(err.value) or name in (tmp_path / "store" / "manifest.json").read_text()
    store = extract_to_store(model, paths, tmp_path / "store", settings=SETTINGS, shard_size=4,
                             skip_bad=True, progress=False)
    descriptors, valid = store.load()
    names = list(files)
    assert [names[i] for i in range(len(names)) if not valid[i]] == ["zero", "truncated", "missing"]
    assert {Path(f.path).name for f in store.failures()} == {"zero.jpg", "truncated.jpg", "missing.jpg"}
    torch.testing.assert_close(descriptors[valid].norm(dim=1), torch.ones(int(valid.sum())))


def test_batches_are_planned_from_headers_and_crops_as_loading_gives_them(tmp_path):
    from dtop.data.images import ImageListDataset
    from dtop.engine.extract import MultiScaleTransform, input_shapes, plan_batches

    paths = make_images(tmp_path / "im", 8)
    bbxs = [None, [3.5, 2.5, 40.5, 30.49], None, [0, 0, 10, 70], None, None, [5, 5, 64, 44], None]
    dataset = ImageListDataset(paths, bbxs, MultiScaleTransform(64, SETTINGS.scales))
    shapes = input_shapes(dataset, range(8), SETTINGS)
    for i, shape in enumerate(shapes):
        loaded, _ = dataset[i]
        assert shape == tuple((t.shape[2], t.shape[1]) for t in loaded)  # (W, H) per scale
    shapes[5] = None  # an unreadable header: batched alone
    batches = plan_batches(shapes, batch_size=2)
    assert sorted(p for b in batches for p in b) == list(range(8))
    assert [5] in batches
    for b in batches:
        assert 1 <= len(b) <= 2 and len({shapes[p] for p in b}) == 1
    assert plan_batches(shapes, 2) == batches  # deterministic


def test_a_batch_with_an_unplanned_shape_is_split_and_still_exact(tmp_path, model):
    # EXIF orientation changes the shape after planning from the header: the batch is regrouped
    from dtop.engine.extract import collate_groups

    rng = np.random.default_rng(3)
    folder = tmp_path / "im"
    folder.mkdir()
    paths = []
    for i in range(4):
        img = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
        exif = Image.Exif()
        exif[0x0112] = 6 if i % 2 else 1  # rotated 90° for odd images
        img.save(folder / f"{i}.jpg", exif=exif, quality=90)
        paths.append(folder / f"{i}.jpg")
    settings = ExtractSettings(image_size=64, scales=[1.0], exif_transpose=True)
    got = extract(model, paths, settings=settings, batch_size=4)
    single = torch.stack([describe(model, load_image(p, exif_transpose=True), image_size=64, scales=[1.0])
                          for p in paths])
    torch.testing.assert_close(got, single, rtol=1e-5, atol=1e-5)
    t = lambda h, w: [torch.zeros(3, h, w, dtype=torch.uint8)]  # noqa: E731
    out = collate_groups([(0, 0, t(48, 64)), (0, 1, t(64, 48)), (0, 2, t(48, 64))])
    assert [ix.tolist() for ix, _ in out["groups"]] == [[0, 2], [1]]
    assert [tuple(xs[0].shape) for _, xs in out["groups"]] == [(2, 3, 48, 64), (1, 3, 64, 48)]


def test_cli_settings_come_from_a_yaml_file_with_options_over_it(tmp_path, capsys):
    from dtop.cli.main import main
    from dtop.retrieval.store import DescriptorStore

    make_images(tmp_path / "im", 3)
    config = tmp_path / "extract.yaml"
    config.write_text("image_size: 64\nscales: [0.75, 1.0]\ndtype: float16\nexif_transpose: true\n")
    args = ["extract", "--model", "dtop_tiny", "--images", str(tmp_path / "im"), "--out", str(tmp_path / "store"),
            "--config", str(config), "--scales", "1", "--no-exif-transpose", "--workers", "0", "--no-progress"]
    assert main(args) == 0
    settings = DescriptorStore.open(tmp_path / "store").settings
    assert settings["image_size"] == 64 and settings["dtype"] == "float16"  # from the file
    assert settings["scales"] == [1.0] and settings["exif_transpose"] is False  # the options win
    config.write_text("image_size: 64\ndtype: bfloat16\n")
    assert main(args) == 2
    assert "did you mean 'float16'" in capsys.readouterr().err


def test_runtime_resolves_device_and_autocast_once_for_all_users():
    from dtop.engine.runtime import amp_dtype, autocast_context, init_distributed, resolve_amp
    from dtop.errors import ConfigError

    runtime = init_distributed("cpu")  # no torchrun: one process
    assert (runtime.rank, runtime.world, runtime.device) == (0, 1, torch.device("cpu"))
    assert resolve_amp("auto", torch.device("cpu")) == "none"
    assert resolve_amp("auto", torch.device("cuda")) == "bf16"
    assert amp_dtype("fp16", torch.device("cpu")) == torch.float16
    with autocast_context(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="amp must be one of auto, none, bf16, fp16"):
        resolve_amp("half", torch.device("cpu"))
