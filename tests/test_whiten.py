"""``dtop whiten``: Lw on training pairs and PCA on a separate set, cached stores, files and checkpoint copies."""

import dataclasses
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_classes
from dtop.cli.main import main
from dtop.data.training import load_training_set
from dtop.engine.extract import extract, extract_to_store, settings_record
from dtop.engine.mining import pairs_from_labels
from dtop.engine.settings import ExtractSettings
from dtop.engine.whiten import (
    learn_lw,
    learn_pca,
    learn_pca_from_store,
    sample_pairs,
    save_with_whitening,
    store_folder,
    warn_on_mismatch,
    whitening_mismatches,
)
from dtop.errors import DataError
from dtop.models import WHITENING_EXTRA, build_model, load_model, resolve_model_config, save_checkpoint
from dtop.models.identity import model_fingerprint
from dtop.retrieval.store import DescriptorStore
from dtop.retrieval.whitening import fit_learned_whitening, fit_pca_whitening, load_whitening

SETTINGS = ExtractSettings(image_size=64, scales=[1.0])
RUN = dict(num_workers=0, progress=False)
EXTRACT_ARGS = ["--image-size", "64", "--scales", "1.0", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("dtop_tiny").eval()


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    return make_classes(tmp_path_factory.mktemp("classes") / "train", n_classes=5, per_class=5)


def sfm_folder(root: Path, n: int = 14) -> tuple[Path, list[int], list[int]]:
    """A small SfM-120k layout (textured images) whose pairs are *not* those of pairs_from_labels."""
    rng = np.random.default_rng(3)
    cids = [f"img{k:05d}abcdef" for k in range(n)]
    for cid in cids:
        path = root / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path, format="JPEG")
    qidxs, pidxs = [0, 2, 5, 9, 11, 3], [1, 4, 6, 12, 13, 10]
    db = {"train": {"cids": cids, "cluster": [k // 2 for k in range(n)], "qidxs": qidxs, "pidxs": pidxs}}
    (root / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps(db, protocol=2))
    return root, qidxs, pidxs


def cached(model, cache, name, paths):
    """The descriptors that the whitening was learned from (its cached store)."""
    store = DescriptorStore.open(store_folder(cache, model, SETTINGS, name, [str(p) for p in paths]))
    return store.load()[0]


@pytest.mark.slow
def test_lw_on_labelled_pairs_equals_a_direct_fit_and_is_cached(model, classes, tmp_path):
    ts = load_training_set("folder", classes)
    whitening = learn_lw(model, ts, tmp_path / "cache", SETTINGS, **RUN)
    # direct: the same pairs (each image with the next of its class) on the same descriptors, which
    # are those of an in-memory extraction of the set
    q, p = pairs_from_labels(ts.labels)
    descriptors = cached(model, tmp_path / "cache", ts.name, ts.paths)
    torch.testing.assert_close(descriptors, extract(model, ts.paths, settings=SETTINGS), rtol=1e-5, atol=1e-5)
    direct = fit_learned_whitening(descriptors, q, p)
    assert torch.equal(whitening.projection, direct.projection) and torch.equal(whitening.mean, direct.mean)
    assert whitening.kind == "lw" and whitening.info["num_pairs"] == len(q) == 25
    info = whitening.info
    assert info["fitted_on"] == ts.name and info["model_fingerprint"] == model_fingerprint(model)
    assert info["extraction"] == settings_record(model, SETTINGS) and info["source"]["kind"] == "training-set"
    # the descriptors went into a store under <cache>/<fingerprint>/<settings digest>/: a rerun reuses it
    shards = sorted((tmp_path / "cache" / model_fingerprint(model)).rglob("shard-*.safetensors"))
    assert len(shards) == 1 and "whiten-" in shards[0].parent.name
    before = shards[0].stat().st_mtime_ns
    again = learn_lw(model, ts, tmp_path / "cache", SETTINGS, **RUN)
    assert shards[0].stat().st_mtime_ns == before and torch.equal(again.projection, whitening.projection)


@pytest.mark.slow
def test_lw_uses_the_sfm120k_pairs(model, tmp_path):
    root, qidxs, pidxs = sfm_folder(tmp_path / "retrieval-SfM-120k")
    ts = load_training_set("sfm120k", root)
    whitening = learn_lw(model, ts, tmp_path / "cache", SETTINGS, **RUN)
    assert whitening.info["num_pairs"] == 6 and whitening.info["num_descriptors"] == 14  # scatter: all images
    direct = fit_learned_whitening(cached(model, tmp_path / "cache", ts.name, ts.paths), qidxs, pidxs)
    assert torch.equal(whitening.projection, direct.projection)
    # the pairs are the file's: other pairs give another whitening
    other = fit_learned_whitening(cached(model, tmp_path / "cache", ts.name, ts.paths), *pairs_from_labels(ts.labels))
    assert not torch.allclose(whitening.projection, other.projection)
    # a draw of pairs: deterministic, a subset, in order
    q, p = sample_pairs(np.array(qidxs), np.array(pidxs), 3, seed=1)
    q2, p2 = sample_pairs(np.array(qidxs), np.array(pidxs), 3, seed=1)
    assert q.tolist() == q2.tolist() and len(q) == 3 and all(
        (a, b) in set(zip(qidxs, pidxs, strict=True)) for a, b in zip(q, p, strict=True))
    drawn = learn_lw(model, ts, tmp_path / "cache", SETTINGS, max_pairs=3, seed=1, **RUN)
    assert drawn.info["num_pairs"] == 3 and drawn.info["source"]["num_images"] == 6  # only their images
    used = sorted(set(q.tolist() + p.tolist()))
    rows = {i: r for r, i in enumerate(used)}
    direct = fit_learned_whitening(cached(model, tmp_path / "cache", ts.name, [ts.paths[i] for i in used]),
                                   [rows[i] for i in q.tolist()], [rows[i] for i in p.tolist()])
    assert torch.equal(drawn.projection, direct.projection)


@pytest.mark.slow
def test_pca_on_images_and_on_a_store(model, classes, tmp_path):
    ts = load_training_set("folder", classes)
    whitening = learn_pca(model, ts.paths, tmp_path / "cache", SETTINGS, name="other", dim=8, **RUN)
    direct = fit_pca_whitening(cached(model, tmp_path / "cache", "other", ts.paths), dim=8)
    assert torch.equal(whitening.projection, direct.projection)
    assert whitening.kind == "pca" and whitening.info["fitted_on"] == "other"
    store = extract_to_store(model, ts.paths, tmp_path / "store", settings=SETTINGS, **RUN)
    from_store = learn_pca_from_store(model, store.root, SETTINGS, dim=8)
    torch.testing.assert_close(from_store.projection, whitening.projection)
    assert from_store.info["source"] == {"kind": "store", "name": "store", "num_images": len(ts.paths)}
    # a store of other settings (or another model) is refused: the whitening must match the evaluation
    with pytest.raises(DataError, match="another model or settings"):
        learn_pca_from_store(model, store.root, ExtractSettings(image_size=96, scales=[1.0]))


def test_mismatches_and_the_checkpoint_copy(model, tmp_path, caplog):
    whitening = fit_pca_whitening(torch.randn(300, model.descriptor_dim), dim=16, fitted_on="x")
    assert whitening_mismatches(whitening, model, SETTINGS) == []  # nothing recorded: nothing to compare
    whitening.info.update(model_fingerprint=model_fingerprint(model), extraction=settings_record(model, SETTINGS))
    assert whitening_mismatches(whitening, model, SETTINGS) == []
    other = ExtractSettings(image_size=64, scales=[1.0, 0.5])
    assert "extraction settings" in whitening_mismatches(whitening, model, other)[0]
    with caplog.at_level(logging.WARNING, logger="dtop"):
        warn_on_mismatch(whitening, model, other)  # what the evaluation does with the whitening it uses
    assert "may not suit" in caplog.text and "dtop whiten" in caplog.text
    another = build_model(dataclasses.replace(resolve_model_config("dtop_tiny"), init_seed=1))
    assert "learned for model" in whitening_mismatches(whitening, another, SETTINGS)[0]
    # a copy of a checkpoint that carries it: same fingerprint, the source's metadata kept
    source = save_checkpoint(model, tmp_path / "m.safetensors", metadata={"epoch": 3})
    copy = save_with_whitening(load_model(source), whitening, tmp_path / "m-w.safetensors", source=source)
    loaded = load_model(copy)
    assert model_fingerprint(loaded) == model_fingerprint(model)
    extra = loaded.checkpoint_extras[WHITENING_EXTRA]
    assert torch.equal(extra.tensors["projection"], whitening.projection)
    assert extra.metadata["model_fingerprint"] == model_fingerprint(model)
    from dtop.models.checkpoint import read_checkpoint

    assert read_checkpoint(copy).metadata == {"epoch": 3}


@pytest.mark.slow
def test_cli_whiten_then_evaluate_with_the_file_and_with_the_checkpoint(classes, tmp_path, capsys):
    from test_evaluate import make_benchmark

    bench = make_benchmark(tmp_path / "bench").parent
    model_file = tmp_path / "tiny.safetensors"
    torch.manual_seed(0)
    save_checkpoint(build_model("dtop_tiny"), model_file)
    out, ckpt = tmp_path / "w" / "lw.safetensors", tmp_path / "w" / "tiny-lw.safetensors"
    assert main(["whiten", "--model", str(model_file), "--train", str(classes), "--format", "folder",
                 "--out", str(out), "--into-checkpoint", str(ckpt), *EXTRACT_ARGS]) == 0
    printed = capsys.readouterr().out
    assert "lw whitening 64 -> 64" in printed and "whiten:path=" in printed
    assert (tmp_path / "w" / "descriptors").is_dir()  # the default cache: beside the output
    whitening = load_whitening(out)
    assert whitening.info["num_pairs"] == 25
    assert torch.equal(load_model(ckpt).checkpoint_extras[WHITENING_EXTRA].tensors["mean"], whitening.mean)
    # the two documented ways give the same results, and neither is transductive
    results = []
    for name, model_arg, post in (("file", model_file, f"whiten:path={out}"), ("ckpt", ckpt, "whiten")):
        assert main(["evaluate", "--model", str(model_arg), "--dataset", "mini", "--data-root", str(bench),
                     "--out", str(tmp_path / name), "--post", post, *EXTRACT_ARGS]) == 0
        payload = json.loads((tmp_path / name / "results.json").read_text())
        assert payload["transductive"] is False
        assert payload["models"][0]["post"][0]["whitening"]["type"] == "lw"
        results.append(payload["models"][0]["results"])
    assert results[0] == results[1]
    assert "*" not in capsys.readouterr().out


def test_cli_errors(classes, tmp_path, capsys):
    base = ["whiten", "--model", "dtop_tiny", *EXTRACT_ARGS]
    assert main([*base, "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "one source" in capsys.readouterr().err
    assert main([*base, "--images", str(classes), "--method", "lw", "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "matching pairs" in capsys.readouterr().err
    assert main([*base, "--train", str(classes), "--format", "folder"]) == 2
    assert "--out FILE" in capsys.readouterr().err
    assert main([*base, "--train", str(classes), "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "--format" in capsys.readouterr().err
    assert not (tmp_path / "w.safetensors").exists()
