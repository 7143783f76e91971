"""``dtop report``: a self-contained HTML folder from an evaluation output (fixture made here)."""

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtop.apps.synthetic import generate_benchmark
from dtop.cli.main import main
from dtop.data.revisited import RevisitedDataset
from dtop.models import build_model
from dtop.report import build_report
from dtop.report.heatmaps import attention_heatmap, cls_attention, colormap, overlay
from dtop.report.plots import line_plot, nice_ticks, read_metrics, training_curves
from dtop.retrieval.metrics import evaluate

TOPK = 6


class Page(HTMLParser):
    """Collects what the checks need from index.html."""

    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.ids, self.scripts, self.hits = [], [], set(), 0, []
        self._section = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
            if tag == "section":
                self._section = a["id"]
        if tag == "img":
            self.imgs.append(a["src"])
        if tag in ("a", "link") and "href" in a:
            self.links.append(a["href"])
        if tag == "script":
            self.scripts += 1
        if tag == "figure" and "hit" in (a.get("class") or ""):
            self.hits.append((self._section, a["class"].split()[1], a.get("title")))


def read(index: Path) -> str:
    text = index.read_text(encoding="ascii")  # the page is pure ASCII (character references)
    return html.unescape(text)


def parse(index: Path) -> Page:
    page = Page()
    page.feed(index.read_text(encoding="utf-8"))
    return page


def write_results(eval_dir: Path, root: Path, name: str, models: list, train_run: str | None, seed: int = 0) -> dict:
    """An evaluation folder in the format of `dtop evaluate`, with fake (random but valid) ranks."""
    ds = RevisitedDataset(root, name)
    rng = np.random.default_rng(seed)
    eval_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, (mname, model) in enumerate(models):
        ranks = np.stack([rng.permutation(ds.n_database) for _ in range(ds.n_queries)], axis=1)[: TOPK + 4]
        if k == 0:  # make the first model good on query 0: its positives first
            q = ds.gnd.gnd[0]
            first = q["easy"] + q["hard"] + q["junk"]
            rest = [i for i in ranks[:, 0] if i not in first]
            ranks[:, 0] = (first + rest)[: ranks.shape[0]]
        np.save(eval_dir / f"ranks-{mname}-{name}.npy", ranks.astype(np.int64))
        big = ranks.copy()
        big[1::2] = ds.n_database + np.arange(big[1::2].size).reshape(big[1::2].shape)  # R1M distractors
        np.save(eval_dir / f"ranks-{mname}-{name}+1m.npy", big.astype(np.int64))
        entries.append({
            "name": mname, "spec": mname, "fingerprint": f"fp{k}", "config": {"arch": model.config.arch},
            "train_run": train_run if k == 0 else None,
            "results": {name: evaluate(ranks, ds.gnd), f"{name}+1m": evaluate(big, ds.gnd)},
            "ranks": {name: f"ranks-{mname}-{name}.npy", f"{name}+1m": f"ranks-{mname}-{name}+1m.npy"},
        })
    payload = {
        "dtop_version": "test", "dataset": name,
        "data": {"root": str(root), "name": name, "gnd": str(ds.gnd_path)},
        "models": entries, "settings": {"image_size": 96, "scales": [1.0], "topk": TOPK + 4},
    }
    (eval_dir / "results.json").write_text(json.dumps(payload))
    return payload


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return [("dtop_tiny", build_model("dtop_tiny").eval()), ("cls_tiny", build_model("cls_tiny").eval())]


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("data")
    generate_benchmark(root, "mini", n_train_instances=2, n_test_instances=3, train_views=1, n_distractors=4,
                       image_size=96)
    work = tmp_path_factory.mktemp("eval")
    run = work / "train-run"
    run.mkdir()
    lines = [json.dumps({"step": s, "epoch": s // 10, "loss": 5.0 / (1 + s), "lr": 1e-3 * (1 - s / 40),
                         **({"val_map": 0.1 + s / 100} if s % 10 == 0 else {})}) for s in range(40)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 40, "loss"')  # cut-off last line
    eval_dir = work / "evaluation"
    payload = write_results(eval_dir, root, "mini", models, train_run=str(run))
    return eval_dir, payload, RevisitedDataset(root, "mini")


@pytest.fixture(scope="module")
def report(evaluation, models, tmp_path_factory):
    eval_dir, payload, ds = evaluation
    out = tmp_path_factory.mktemp("report")
    index = build_report(eval_dir, out, topk=TOPK, heatmap_models=models)
    return index, payload, ds


def test_folder_is_complete_and_self_contained(report):
    index, _, ds = report
    assert index.name == "index.html" and index.is_file()
    page = parse(index)
    assert page.imgs, "the report shows images"
    for src in page.imgs:
        assert not re.match(r"^[a-z]+:", src) and not src.startswith("/"), f"not a relative link: {src}"
        assert (index.parent / src).is_file(), f"missing file {src}"
    for href in page.links:
        assert href.startswith("#") or href == "data:,", f"unexpected link {href}"
        if href.startswith("#"):
            assert href[1:] in page.ids
    assert page.scripts == 0
    text = read(index)
    assert "http://" not in text and "https://" not in text
    # Every query has its image with the bbx, its crop, and a thumbnail file per retrieved image.
    for qi in range(ds.n_queries):
        assert f"assets/queries/{qi}.jpg" in page.imgs and f"assets/queries/{qi}-crop.jpg" in page.imgs
    thumbs = list((index.parent / "assets" / "db").glob("*.jpg"))
    assert thumbs and all(Image.open(p).size[0] <= 144 for p in thumbs)


def test_heatmap_files_exist(report):
    index, _, ds = report
    page = parse(index)
    for slug in ("dtop_tiny", "cls_tiny"):
        for qi in range(ds.n_queries):
            rel = f"assets/heatmaps/{slug}/{qi}.jpg"
            assert rel in page.imgs
            crop = Image.open(index.parent / f"assets/queries/{qi}-crop.jpg")
            assert Image.open(index.parent / rel).size == crop.size
    text = read(index)
    assert "local-branch spatial attention" in text and "[CLS]→patch attention" in text


def test_legend_colours_and_categories(report):
    index, payload, ds = report
    text = read(index)
    for word in ("easy (positive)", "hard (positive)", "junk (ignored)", "wrong (negative)"):
        assert word in text
    page = parse(index)
    assert len(page.hits) == ds.n_queries * len(payload["models"]) * TOPK
    # Borders follow the ground truth: query 0 of the first model retrieved its positives first.
    q = ds.gnd.gnd[0]
    expected = {ds.gnd.imlist[i]: k for k in ("easy", "hard", "junk") for i in q[k]}
    hits0 = [h for h in page.hits if h[0] == "q0"][:TOPK]
    for _, kind, title in hits0:
        assert kind == expected.get(title, "wrong")
    assert hits0[0][1] in ("easy", "hard")


def test_ap_and_table_shown(report):
    index, payload, ds = report
    text = read(index)
    for entry in payload["models"]:
        res = entry["results"]["mini"]
        for p in ("easy", "medium", "hard"):
            assert f"{100 * res[p]['map']:.2f}" in text
        assert f"{100 * res['medium']['mp']['10']:.2f}" in text
        ap0 = res["medium"]["aps"][0]
        assert f"AP (Medium) = {100 * ap0:.2f}" in text
    assert "mini+1m" in text  # the +1M variant is in the table
    assert "mP@10" in text


def test_training_curves(report):
    index, _, _ = report
    page = parse(index)
    plots = [s for s in page.imgs if s.startswith("assets/plots/")]
    assert {Path(s).stem for s in plots} == {"dtop_tiny-loss", "dtop_tiny-lr", "dtop_tiny-validation"}
    for s in plots:
        with Image.open(index.parent / s) as im:
            assert im.format == "PNG" and im.size == (520, 300)


def test_distractor_variant_and_missing_dataset(evaluation, tmp_path):
    eval_dir, payload, ds = evaluation
    index = build_report(eval_dir, tmp_path / "r1", topk=4, variant="mini+1m", max_queries=2)
    text = read(index)
    assert "distractor #" in text and "Showing the first 2 of" in text
    assert all((index.parent / s).is_file() for s in parse(index).imgs)
    # The dataset moved away: the table is still reported, with a note.
    moved = tmp_path / "moved"
    moved.mkdir()
    p2 = json.loads((eval_dir / "results.json").read_text())
    p2["data"] = {"root": str(tmp_path / "nowhere"), "name": "mini", "gnd": str(tmp_path / "nowhere/gnd_mini.pkl")}
    for entry in p2["models"]:
        for rel in entry["ranks"].values():
            (moved / rel).write_bytes((eval_dir / rel).read_bytes())
    (moved / "results.json").write_text(json.dumps(p2))
    index = build_report(moved, tmp_path / "r2")
    text = read(index)
    assert "Images of the dataset not found" in text and "dtop_tiny" in text


def test_killed_run_leaves_no_complete_looking_index(evaluation, tmp_path):
    eval_dir, _, _ = evaluation
    out = tmp_path / "r"
    build_report(eval_dir, out, topk=3)
    assert (out / "index.html").is_file()

    class Broken(torch.nn.Module):
        mean, std, stride = [0.5] * 3, [0.5] * 3, 16

        def forward_parts(self, x):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_report(eval_dir, out, topk=3, heatmap_models=[("broken", Broken())])
    assert not (out / "index.html").exists()
    assert not list(out.glob(".index.html.*"))


def test_model_without_attention_gets_a_note(evaluation, tmp_path):
    eval_dir, _, _ = evaluation

    class NoAttention(torch.nn.Module):
        mean, std, stride = [0.5] * 3, [0.5] * 3, 1

        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Conv2d(3, 4, 3)

    index = build_report(eval_dir, tmp_path / "r", topk=2, heatmap_models=[("convnet", NoAttention())])
    assert "No heatmaps for convnet" in read(index)
    assert not (tmp_path / "r" / "assets" / "heatmaps" / "convnet").exists()


def test_cli(evaluation, tmp_path, capsys):
    eval_dir, _, _ = evaluation
    rc = main(["report", str(eval_dir), "--out", str(tmp_path / "cli"), "--topk", "3", "--no-progress",
               "--heatmaps", "cls_tiny"])
    assert rc == 0
    assert (tmp_path / "cli" / "index.html").is_file()
    assert list((tmp_path / "cli" / "assets" / "heatmaps" / "cls_tiny").glob("*.jpg"))
    assert "wrote" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing-here")]) == 2


def test_cls_attention_matches_timm_attention():
    torch.manual_seed(0)
    model = build_model("cls_tiny").eval()
    x = torch.randn(2, 3, 64, 48)
    block = model.backbone.blocks[-1]
    block.attn.fused_attn = False  # timm then computes the softmax explicitly, before attn_drop
    seen = {}
    handle = block.attn.attn_drop.register_forward_hook(lambda m, a, o: seen.setdefault("attn", o))
    with torch.no_grad():
        model.backbone.forward_features(x)
    handle.remove()
    expected = seen["attn"][:, :, 0, 1:].mean(1).reshape(2, 4, 3)
    torch.testing.assert_close(cls_attention(model, x), expected)


def test_heatmap_helpers(models):
    img = Image.new("RGB", (100, 60), (120, 50, 200))
    for _, model in models:
        m = attention_heatmap(model, img, 64)
        assert m.shape == (32, 64) and m.min() >= 0  # 64 x 38.4 -> sides rounded to multiples of 16 and m.max() <= 1
        assert model.training is False
    assert overlay(img, np.ones((3, 5))).size == img.size
    c = colormap(np.array([0.0, 1.0]))
    assert c.dtype == np.uint8 and c.shape == (2, 3) and c[0, 2] > c[0, 0] and c[1, 0] > c[1, 2]


def test_plot_helpers(tmp_path):
    assert nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(3, 3)[0] <= 3 <= nice_ticks(3, 3)[-1]
    recs = [{"step": 1, "loss": 2.0, "lr": 0.1, "val_map": {"medium": 0.5, "hard": 0.2}}, {"step": 2, "loss": 1.0}]
    curves = training_curves(recs)
    assert set(curves) == {"loss", "lr", "validation"}
    assert set(curves["validation"]) == {"val_map medium", "val_map hard"}
    p = line_plot(curves["loss"], tmp_path / "a.png", title="loss")
    assert Image.open(p).format == "PNG"
    line_plot({}, tmp_path / "empty.png")
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n\nnot json\n[1]\n{"step": 2}')
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2]
