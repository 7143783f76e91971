"""``dtop evaluate`` end to end on a small generated benchmark in the revisited format."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from dtop.cli.main import main
from dtop.engine.extract import extract
from dtop.engine.settings import ExtractSettings
from dtop.errors import ConfigError
from dtop.models import build_model, save_checkpoint
from dtop.retrieval.metrics import evaluate


def make_benchmark(root: Path, n_instances: int = 5, seed: int = 0) -> Path:
    """Instances = random textures; database: 2 easy views, 1 hard, 1 junk per instance, + distractors."""
    rng = np.random.default_rng(seed)
    folder = root / "mini"
    (folder / "jpg").mkdir(parents=True)
    imlist, qimlist, gnd = [], [], []

    def save(img: Image.Image, name: str) -> None:
        img.save(folder / "jpg" / f"{name}.jpg", quality=92)

    for i in range(n_instances):
        base = Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).resize((96, 96), Image.NEAREST)
        query = Image.new("RGB", (128, 112), (127, 127, 127))
        query.paste(base, (16, 8))
        save(query, f"q{i}")
        qimlist.append(f"q{i}")
        easy, hard, junk = [], [], []
        for v, kind in enumerate(["easy", "easy", "hard", "junk"]):
            if kind == "easy":
                view = base.rotate(3 * (v + 1), fillcolor=(127, 127, 127))
            elif kind == "hard":
                view = ImageEnhance.Brightness(base.transpose(Image.FLIP_LEFT_RIGHT)).enhance(0.6)
            else:
                view = Image.new("RGB", (96, 96), (127, 127, 127))
                view.paste(base.resize((24, 24)), (70, 70))
            {"easy": easy, "hard": hard, "junk": junk}[kind].append(len(imlist))
            imlist.append(f"db{i}_{v}")
            save(view, imlist[-1])
        gnd.append({"bbx": [16.0, 8.0, 112.0, 104.0], "easy": easy, "hard": hard, "junk": junk})
    for d in range(6):
        imlist.append(f"distractor{d}")
        save(Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)), imlist[-1])
    (folder / "gnd_mini.json").write_text(json.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    return folder


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make_benchmark(root)
    return root


ARGS = ["--image-size", "64", "--scales", "1.0", "--workers", "0", "--no-progress", "--batch-size", "4"]


def test_evaluate_end_to_end_matches_reference_scoring(bench, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("dtop_tiny")
    ckpt = save_checkpoint(model, tmp_path / "tiny.safetensors")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(ckpt), "cls_tiny", "--dataset", "mini", "--data-root", str(bench),
                 "--out", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "tiny" in printed and "cls_tiny" in printed
    payload = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in payload["models"]] == ["tiny", "cls_tiny"]
    assert payload["data"]["n_queries"] == 5 and payload["settings"]["image_size"] == 64

    # cross-check with an independent path: in-memory extraction, full argsort, evaluate(ranks)
    from dtop.data.revisited import RevisitedDataset

    ds = RevisitedDataset(bench, "mini")
    settings = ExtractSettings(image_size=64, scales=[1.0])
    q = extract(model, ds.query_paths, bbxs=ds.query_bbxs, settings=settings)
    x = extract(model, ds.database_paths, settings=settings)
    ranks = np.argsort(-(q @ x.T).numpy(), axis=1, kind="stable").T
    expected = evaluate(ranks, ds.gnd)
    got = payload["models"][0]["results"]["mini"]
    for protocol in ("easy", "medium", "hard"):
        assert got[protocol]["map"] == pytest.approx(expected[protocol]["map"], abs=1e-6)
        assert got[protocol]["mp"] == pytest.approx(expected[protocol]["mp"], abs=1e-6)
    saved = np.load(out / payload["models"][0]["ranks"]["mini"])
    assert saved.shape == (len(ds.database_paths), 5)
    np.testing.assert_array_equal(saved[:10], ranks[:10])


def test_second_evaluation_reuses_the_stores(bench, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "--model", "dtop_tiny", "--dataset", "mini", "--data-root", str(bench),
            "--out", str(out), *ARGS]
    assert main(args) == 0
    shards = sorted((out / "descriptors").rglob("shard-*.safetensors"))
    before = [p.stat().st_mtime_ns for p in shards]
    assert main(args) == 0
    assert [p.stat().st_mtime_ns for p in shards] == before
    # another setting makes another store
    assert main([*args[:-len(ARGS)], *ARGS[:2], "--scales", "0.8", "1.0", *ARGS[4:]]) == 0
    assert len(sorted((out / "descriptors").rglob("shard-*.safetensors"))) == 2 * len(shards)


def test_post_processing_and_bad_dataset(bench, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", "dtop_tiny", "--dataset", "mini", "--data-root", str(bench), "--out",
                 str(out), "--post", "whiten:fit=database", "qe:k=2", *ARGS]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in payload["models"][0]["post"]] == ["whiten", "qe"]
    # fitted on the evaluated database: marked in results.json and in the printed table
    assert payload["transductive"] is True and payload["models"][0]["transductive"] is True
    assert payload["models"][0]["post"][0]["transductive"] is True
    printed = capsys.readouterr().out
    assert "mini*" in printed and "transductive" in printed
    assert "transductive" in (out / "results.txt").read_text()
    # a bare whiten with no whitening anywhere: an error with a hint, before anything is extracted
    assert main(["evaluate", "--model", "dtop_tiny", "--dataset", "mini", "--data-root", str(bench), "--out",
                 str(tmp_path / "bare"), "--post", "whiten", *ARGS]) == 2
    assert "whiten:fit=database" in capsys.readouterr().err
    assert not (tmp_path / "bare" / "descriptors").exists()
    # without post-processing: not transductive, no mark
    assert main(["evaluate", "--model", "dtop_tiny", "--dataset", "mini", "--data-root", str(bench), "--out",
                 str(out), *ARGS]) == 0
    assert "mini*" not in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["transductive"] is False
    assert main(["evaluate", "--model", "dtop_tiny", "--dataset", "nowhere", "--data-root", str(bench), *ARGS]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_results_table_columns_stay_aligned_with_long_names():
    from dtop.engine.evaluate import format_table

    def result(m):
        return {p: {"map": m, "mp": {"10": m}} for p in ("easy", "medium", "hard")}

    models = [
        {"name": "dtop_tiny", "results": {"roxford5k": result(0.5)}},
        {"name": "gem_tokens_tiny (trained) with a long name", "results": {"roxford5k+r1m-long-variant": result(0.25)}},
    ]
    lines = format_table(models).splitlines()
    header, rows = lines[0], lines[2:]
    # Every row puts its numbers right under the header's E/M/H columns and names never touch them.
    assert len({len(line) for line in [header, *rows]}) == 1
    for row, model in zip(rows, models):
        name, variant = model["name"], next(iter(model["results"]))
        assert row.startswith(name + " ")
        assert variant + " " in row
        assert row.split()[-5:] == [f"{100 * model['results'][variant]['easy']['map']:.2f}"] * 5


def test_diffusion_graph_is_built_on_the_evaluation_device(bench, tmp_path, monkeypatch):
    from dtop.retrieval import postprocess

    seen = []
    real = postprocess.knn_graph_for

    def spy(database, *args, **kwargs):
        seen.append(kwargs.get("device"))
        return real(database, *args, **kwargs)

    monkeypatch.setattr(postprocess, "knn_graph_for", spy)
    assert main(["evaluate", "--model", "dtop_tiny", "--dataset", "mini", "--data-root", str(bench), "--out",
                 str(tmp_path / "eval"), "--post", "diffusion:k=5,trunc=40", "--device", "cpu", *ARGS]) == 0
    assert seen == [torch.device("cpu")]  # dtop evaluate --device reaches the graph build


def test_a_whitening_saved_in_the_checkpoint_is_used(tmp_path):
    from dtop.engine.evaluate import post_processing_for
    from dtop.models import WHITENING_EXTRA, CheckpointExtra, load_model
    from dtop.retrieval.postprocess import Whiten, fit_pca_whitening

    model = build_model("dtop_tiny")
    whitening = fit_pca_whitening(torch.randn(200, model.descriptor_dim), dim=16, fitted_on="train")
    tensors, meta = whitening.to_state()
    model.checkpoint_extras[WHITENING_EXTRA] = CheckpointExtra(tensors, meta)
    loaded = load_model(save_checkpoint(model, tmp_path / "m.safetensors"))
    pp = post_processing_for(["whiten"], loaded)
    step = next(iter(pp))
    assert isinstance(step, Whiten) and step.fitted and step.whitening.output_dim == 16
    assert torch.equal(step.whitening.mean, whitening.mean)
    with pytest.raises(ConfigError, match="no whitening"):  # none saved: an error, not a fit on the database
        post_processing_for(["whiten"], build_model("dtop_tiny"))
    step = next(iter(post_processing_for(["whiten:fit=database"], loaded)))  # explicit: the checkpoint's is not used
    assert isinstance(step, Whiten) and not step.fitted
    step = next(iter(post_processing_for(["whiten:dim=8"], loaded)))  # the checkpoint's, truncated
    assert step.whitening.output_dim == 8
