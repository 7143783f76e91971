"""``dtop report``: a self-contained HTML folder from an evaluation output (fixture made here)."""

import html
import json
import re
import shutil
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
from dtop.report.curves import Chart, Series, read_metrics, training_curves
from dtop.report.heatmaps import attention_heatmap, cls_attention, colormap, overlay
from dtop.report.html import collect_report, render, write_report
from dtop.report.plots import draw_chart
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
    """The report of the evaluation: index.html, results.json's payload, the dataset, the view model."""
    eval_dir, payload, ds = evaluation
    out = tmp_path_factory.mktemp("report")
    page = collect_report(eval_dir, out, topk=TOPK, heatmap_models=models)
    index = write_report(page, out)
    return index, payload, ds, page


def test_folder_is_complete_and_self_contained(report):
    index, _, ds, _ = report
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
    index, _, ds, page = report
    imgs = parse(index).imgs
    for slug in ("dtop_tiny", "cls_tiny"):
        for qi in range(ds.n_queries):
            rel = f"assets/heatmaps/{slug}/{qi}.jpg"
            assert rel in imgs
            crop = Image.open(index.parent / f"assets/queries/{qi}-crop.jpg")
            assert Image.open(index.parent / rel).size == crop.size
    text = read(index)
    assert "local-branch spatial attention" in text and "[CLS]→patch attention" in text
    # The view model: one heatmap per model and query, each the size of the query crop.
    assert page.queries.colorbar is not None and (index.parent / page.queries.colorbar.src).is_file()
    for query in page.queries.queries:
        assert [h.model for h in query.heatmaps] == ["dtop_tiny", "cls_tiny"]
        assert query.heatmaps[0].kind == "local-branch spatial attention"
        assert all(h.image.width == query.images.crop.width for h in query.heatmaps)


def test_legend_colours_and_categories(report):
    index, payload, ds, page = report
    text = read(index)
    for word in ("easy (positive)", "hard (positive)", "junk (ignored)", "wrong (negative)"):
        assert word in text
    assert len(parse(index).hits) == ds.n_queries * len(payload["models"]) * TOPK
    # Borders follow the ground truth: query 0 of the first model retrieved its positives first.
    q = ds.gnd.gnd[0]
    expected = {ds.gnd.imlist[i]: k for k in ("easy", "hard", "junk") for i in q[k]}
    parsed = parse(index)
    hits0 = [h for h in parsed.hits if h[0] == "q0"][:TOPK]
    for _, kind, title in hits0:
        assert kind == expected.get(title, "wrong")
    assert hits0[0][1] in ("easy", "hard")
    # The view model behind it: every model's top-k of every query, categories from the ground truth.
    assert [item.text for item in page.legend] == ["easy (positive)", "hard (positive)", "junk (ignored)",
                                                   "wrong (negative)"]
    first = page.queries.queries[0].models[0]
    assert first.model == "dtop_tiny" and len(first.hits) == TOPK
    assert [h.kind for h in first.hits] == [expected.get(h.label, "wrong") for h in first.hits]
    assert [h.rank for h in first.hits] == list(range(1, TOPK + 1))
    assert all(h.image is not None and h.caption.startswith(f"{h.rank}. {h.mark} ") for h in first.hits)


def test_ap_and_table_shown(report):
    index, payload, ds, page = report
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
    index, _, _, page = report
    plots = [s for s in parse(index).imgs if s.startswith("assets/plots/")]
    assert {Path(s).stem for s in plots} == {"dtop_tiny-loss", "dtop_tiny-lr", "dtop_tiny-validation"}
    for s in plots:
        with Image.open(index.parent / s) as im:
            assert im.format == "PNG" and im.size == (520, 300)
    # The data behind the charts: steps 0-39 (the cut-off last line left out), validation every 10 steps.
    (run,) = page.training
    assert run.model == "dtop_tiny" and run.run.endswith("train-run")
    charts = {c.chart.key: c.chart for c in run.charts}
    assert set(charts) == {"loss", "lr", "validation"}
    loss = charts["loss"].get("loss")
    assert loss.x == list(range(40)) and loss.y == pytest.approx([5.0 / (1 + s) for s in range(40)])
    assert charts["lr"].labels == ["lr"] and charts["lr"].get("lr").y[0] == pytest.approx(1e-3)
    assert charts["validation"].get("val_map").x == [0, 10, 20, 30]
    assert charts["loss"].title == "dtop_tiny: training loss" and not charts["loss"].legend
    assert [c.image.src for c in run.charts] == [f"assets/plots/dtop_tiny-{k}.png" for k in ("loss", "lr",
                                                                                             "validation")]


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


def test_curve_helpers(tmp_path):
    recs = [{"step": 1, "loss": 2.0, "lr": 0.1, "val_map": {"medium": 0.5, "hard": 0.2}},
            {"step": 2, "loss": 1.0, "lr": float("nan")}, {"loss": 0.5, "event": "x"}]
    curves = training_curves(recs)
    assert set(curves) == {"loss", "lr", "validation"}
    assert set(curves["validation"]) == {"val_map medium", "val_map hard"}
    assert curves["loss"]["loss"] == Series("loss", [1.0, 2.0, 2.0], [2.0, 1.0, 0.5])  # no step: its position
    assert curves["lr"]["lr"] == Series("lr", [1.0], [0.1])  # non-finite values left out
    chart = Chart("loss", "loss", list(curves["loss"].values()))
    p = draw_chart(chart, tmp_path / "a.png", height=300, width=520)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (520, 300)
    draw_chart(Chart("lr", "empty", []), tmp_path / "empty.png")
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temporary file
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n\nnot json\n[1]\n{"step": 2}')
    log = read_metrics(tmp_path / "m.jsonl")
    assert [r["step"] for r in log.records] == [1, 2] and log.messages == []


HOSTILE = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'


def test_hostile_names_are_escaped(evaluation, tmp_path, models):
    """Model, dataset and image names from results.json and the ground truth appear as text, never as markup."""
    eval_dir, _, _ = evaluation
    hostile = tmp_path / "hostile"
    shutil.copytree(eval_dir, hostile)
    payload = json.loads((hostile / "results.json").read_text())
    payload["models"][0]["name"] = HOSTILE
    payload["models"][0]["results"][HOSTILE] = payload["models"][0]["results"]["mini"]
    payload["dataset"] = HOSTILE + " dataset"
    payload["models"][0]["train_run"] = HOSTILE
    (hostile / "results.json").write_text(json.dumps(payload))
    page = collect_report(hostile, tmp_path / "r", topk=2, max_queries=1, heatmap_models=[(HOSTILE, models[0][1])])
    assert page.tables[-1].variant == HOSTILE and page.dataset == HOSTILE + " dataset"
    text = render(page)
    assert "<script" not in text and "<img src=x" not in text
    parsed = Page()
    parsed.feed(text)
    assert parsed.scripts == 0 and all(not src.startswith("x") for src in parsed.imgs)
    assert html.unescape(text).count(HOSTILE) >= 5  # table row and heading, note, AP table, top-k row, heatmap
    # File names made from a hostile model name stay inside the report folder, in plain characters.
    (folder,) = (tmp_path / "r" / "assets" / "heatmaps").iterdir()
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", folder.name) and list(folder.glob("*.jpg"))


def test_missing_images_become_placeholders_and_notes(evaluation, tmp_path, models):
    """An unreadable query image is a note in its section; an unreadable database image a labelled placeholder."""
    eval_dir, payload, ds = evaluation
    data = tmp_path / "data"
    shutil.copytree(ds.folder, data / ds.folder.name)
    copy = RevisitedDataset(data, "mini")
    (copy.query_paths[0]).write_bytes(b"not an image")
    first = int(np.load(eval_dir / payload["models"][0]["ranks"]["mini"])[0, 1])  # query 1's first result
    copy.database_paths[first].write_bytes(b"")
    moved = tmp_path / "eval"
    shutil.copytree(eval_dir, moved)
    p2 = json.loads((moved / "results.json").read_text())
    p2["data"] = {"root": str(data), "name": "mini", "gnd": str(copy.gnd_path)}
    (moved / "results.json").write_text(json.dumps(p2))
    page = collect_report(moved, tmp_path / "r", topk=3, max_queries=2, heatmap_models=models[:1])
    q0, q1 = page.queries.queries
    assert q0.images.image is None and q0.images.crop is None and q0.heatmaps == []
    assert q0.images.error.startswith("query image unreadable")
    assert len(q1.heatmaps) == 1
    hit = q1.models[0].hits[0]
    assert hit.image is None and hit.label == ds.gnd.imlist[first]
    index = write_report(page, tmp_path / "r")
    text = read(index)
    assert "query image unreadable" in text and f">{hit.label}</div>" in text
    assert all((index.parent / s).is_file() for s in parse(index).imgs)
