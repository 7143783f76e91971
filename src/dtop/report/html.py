"""``build_report``: a self-contained HTML report of an evaluation folder (``dtop evaluate`` output).

The report is a folder: ``index.html`` plus ``assets/`` (JPEG thumbnails and heatmaps, PNG plots),
linked with relative paths, with inline CSS and no JavaScript or external resource, so it opens
offline from disk or any static server. It shows

* the results table: mAP Easy/Medium/Hard and mP@k per dataset variant, the models side by side;
* training curves (loss, learning rate, validation mAP) of models whose ``train_run`` holds a
  ``metrics.jsonl``;
* per query: the query image with its bbx, the crop, heatmaps of where the given models look on the
  crop, and each model's top-k with borders coloured by the query's ground truth under the Medium
  protocol (easy, hard, junk, wrong) and the query's AP (Medium).

``index.html`` is written last and atomically (an older one is removed first), so a killed run
never leaves an index that looks complete.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dtop.errors import ConfigError, DataError
from dtop.utils.io import atomic_path, write_text

DEFAULT_THUMB = 144
PROTOCOL_LABELS = (("easy", "E"), ("medium", "M"), ("hard", "H"))
CATEGORY_COLOURS: dict[str, str] = {
    "easy": "#2ca02c",
    "hard": "#1f77b4",
    "junk": "#a0a0a0",
    "wrong": "#d62728",
}
"""Border colour of a retrieved image by its ground truth for the query (Medium protocol positives
are easy and hard)."""
_CATEGORY_TEXT = {
    "easy": "easy (positive)",
    "hard": "hard (positive)",
    "junk": "junk (ignored)",
    "wrong": "wrong (negative)",
}
_CATEGORY_MARK = {"easy": "E", "hard": "H", "junk": "J", "wrong": "✗"}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
       color: #222; background: #fafafa; }
header { background: #263238; color: #fff; padding: 14px 24px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 0; color: #cfd8dc; font-size: 13px; }
main { padding: 8px 24px 40px 24px; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 28px; }
h3 { margin: 18px 0 6px 0; }
table.results { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 8px 0 16px 0; }
table.results th, table.results td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.results th { background: #eceff1; }
table.results td.name, table.results th.name { text-align: left; }
table.results td.best { font-weight: bold; background: #e8f5e9; }
.legend { display: flex; flex-wrap: wrap; gap: 16px; align-items: center; margin: 8px 0; font-size: 14px; }
.legend span.swatch { display: inline-block; width: 18px; height: 14px; border: 4px solid; margin-right: 6px;
                      vertical-align: middle; background: #fff; }
.query { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px; margin: 14px 0; }
.query h3 { margin-top: 0; }
.qrow { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
figure { margin: 0; text-align: center; font-size: 11px; color: #555; }
figure img { display: block; margin: 0 auto; }
figure.hit { border: 5px solid #999; padding: 0; background: #fff; }
figure.hit figcaption { padding: 1px 2px; }
figure.easy { border-color: #2ca02c; } figure.hard { border-color: #1f77b4; }
figure.junk { border-color: #a0a0a0; } figure.wrong { border-color: #d62728; }
.ranked { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-end; margin: 6px 0 10px 0; }
.model-row { margin-top: 6px; }
.model-row .label { font-weight: 600; font-size: 13px; margin-bottom: 2px; }
.ap { font-variant-numeric: tabular-nums; color: #333; font-weight: normal; }
.placeholder { display: flex; align-items: center; justify-content: center; background: #eee; color: #777; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.note { color: #8a6d3b; background: #fcf8e3; border: 1px solid #faebcc; padding: 6px 10px; border-radius: 4px; }
details { margin: 6px 0; } pre { background: #f3f3f3; padding: 8px; overflow-x: auto; font-size: 12px; }
table.aps { border-collapse: collapse; font-size: 12px; font-variant-numeric: tabular-nums; }
table.aps td, table.aps th { border: 1px solid #ddd; padding: 1px 6px; text-align: right; }
table.aps td.name { text-align: left; }
nav.toc { font-size: 13px; } nav.toc a { margin-right: 12px; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip("._") or "model"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


def _pct(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return "–"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    return "–" if not math.isfinite(f) else f"{100.0 * f:.2f}"


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def load_results(eval_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``<eval_dir>/results.json`` (written by ``dtop evaluate``)."""
    path = Path(eval_dir) / "results.json"
    if not path.is_file():
        raise DataError(f"{path} not found: pass the output folder of `dtop evaluate` (it holds results.json)")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); run `dtop evaluate` again") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("models"), list) or not payload["models"]:
        raise DataError(f"{path}: no 'models' list; is this the results.json of `dtop evaluate`?")
    for i, entry in enumerate(payload["models"]):
        if not isinstance(entry, dict) or "name" not in entry or not isinstance(entry.get("results"), dict):
            raise DataError(f"{path}: models[{i}] lacks 'name' or 'results'")
    return payload


def _open_dataset(payload: dict[str, Any], eval_dir: Path) -> tuple[Any, str | None]:
    """The evaluated :class:`RevisitedDataset`, or (None, why) when its files cannot be found."""
    from dtop.data.revisited import RevisitedDataset

    data = payload.get("data") or {}
    attempts: list[tuple[Any, Any]] = []
    if data.get("name"):
        attempts.append((data.get("root"), data["name"]))
    if data.get("gnd"):
        attempts.append((None, data["gnd"]))
        attempts.append((eval_dir, data["gnd"]))
    reasons = []
    for root, name in attempts:
        try:
            return RevisitedDataset(root, name), None
        except DataError as err:
            reasons.append(str(err))
        except (OSError, TypeError) as err:
            reasons.append(f"{name}: {err}")
    return None, (reasons[0] if reasons else "results.json names no dataset ('data': {'root', 'name', 'gnd'})")


def _resolve_run(run: str, eval_dir: Path) -> Path | None:
    p = Path(run)
    for cand in ([p] if p.is_absolute() else [eval_dir / p, Path.cwd() / p, p]):
        if (cand / "metrics.jsonl").is_file():
            return cand / "metrics.jsonl"
        if cand.is_file() and cand.name.endswith(".jsonl"):
            return cand
    return None


class _Thumbs:
    """Writes thumbnails once per image into ``assets/`` and returns their relative paths and sizes."""

    def __init__(self, out_dir: Path, size: int):
        self.out_dir = out_dir
        self.size = size
        self.cache: dict[str, tuple[str, int, int]] = {}

    def save(self, img: Image.Image, rel: str, size: int | None = None) -> tuple[str, int, int]:
        img = img.convert("RGB")
        s = size or self.size
        img.thumbnail((s, s), Image.LANCZOS)
        path = self.out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            img.save(tmp, format="JPEG", quality=85)
        self.cache[rel] = (rel, img.width, img.height)
        return self.cache[rel]

    def database(self, dataset: Any, index: int) -> tuple[str, int, int] | None:
        from dtop.data.images import ImageLoadError, load_image

        rel = f"assets/db/{index}.jpg"
        if rel in self.cache:
            return self.cache[rel]
        try:
            img = load_image(dataset.database_paths[index], draft_long_side=self.size)
        except ImageLoadError:
            return None
        return self.save(img, rel)


def _img(src: str, w: int, h: int, alt: str) -> str:
    return f'<img src="{_esc(src)}" width="{w}" height="{h}" alt="{_esc(alt)}" loading="lazy">'


def _results_tables(models: list[dict[str, Any]]) -> str:
    variants: list[str] = []
    for entry in models:
        for v in entry["results"]:
            if v not in variants:
                variants.append(v)
    parts = []
    for variant in variants:
        rows = [(e["name"], e["results"].get(variant)) for e in models]
        kappas: list[str] = []
        for _, res in rows:
            for p, _ in _protocols_in(res):
                for k in (res[p].get("mp") or {}):
                    if k not in kappas:
                        kappas.append(k)
        kappas.sort(key=lambda k: (_num(k) or 0.0))
        columns: list[tuple[str, str, Any]] = [("mAP", lbl, (p, "map", None)) for p, lbl in PROTOCOL_LABELS]
        for k in kappas:
            columns += [(f"mP@{k}", lbl, (p, "mp", k)) for p, lbl in PROTOCOL_LABELS]

        def cell(res: Any, key: tuple[str, str, Any]) -> float | None:
            p, what, k = key
            if not isinstance(res, dict) or not isinstance(res.get(p), dict):
                return None
            value = res[p].get(what)
            if k is not None:
                value = (value or {}).get(k)
            return _num(value)

        best = []
        for _, _, key in columns:
            vals = [cell(res, key) for _, res in rows]
            finite = [v for v in vals if v is not None]
            best.append(max(finite) if finite and len(rows) > 1 else None)
        groups = []
        for c in range(0, len(columns), 3):
            groups.append(f'<th colspan="3">{_esc(columns[c][0])}</th>')
        head1 = '<tr><th class="name" rowspan="2">model</th>' + "".join(groups) + "</tr>"
        head2 = "<tr>" + "".join(f"<th>{_esc(lbl)}</th>" for _, lbl, _ in columns) + "</tr>"
        body = []
        for name, res in rows:
            tds = []
            for (_, _, key), b in zip(columns, best):
                v = cell(res, key)
                cls = ' class="best"' if b is not None and v is not None and v == b else ""
                tds.append(f"<td{cls}>{_pct(v)}</td>")
            body.append(f'<tr><td class="name">{_esc(name)}</td>{"".join(tds)}</tr>')
        parts.append(
            f"<h3>{_esc(variant)}</h3>\n<table class=\"results\">\n{head1}\n{head2}\n" + "\n".join(body) + "\n</table>"
        )
    return "\n".join(parts)


def _protocols_in(res: Any) -> list[tuple[str, str]]:
    """The (protocol, label) pairs present in one variant's results."""
    if not isinstance(res, dict):
        return []
    return [(p, lbl) for p, lbl in PROTOCOL_LABELS if isinstance(res.get(p), dict)]


def _legend() -> str:
    items = "".join(
        f'<span><span class="swatch" style="border-color:{c}"></span>{_esc(_CATEGORY_MARK[k])} '
        f"{_esc(_CATEGORY_TEXT[k])}</span>"
        for k, c in CATEGORY_COLOURS.items()
    )
    return f'<div class="legend"><strong>Retrieved images (Medium protocol):</strong> {items}</div>'


def _load_ranks(entry: dict[str, Any], variant: str, eval_dir: Path, n_queries: int) -> np.ndarray | None:
    rel = (entry.get("ranks") or {}).get(variant)
    if not rel:
        return None
    path = Path(rel) if Path(rel).is_absolute() else eval_dir / rel
    if not path.is_file():
        raise DataError(
            f"{path}: ranks file of model {entry['name']!r} ({variant}) not found; run `dtop evaluate` again"
        )
    try:
        ranks = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npy ranks array ({err})") from err
    if ranks.ndim != 2 or ranks.shape[1] != n_queries or not np.issubdtype(ranks.dtype, np.integer):
        raise DataError(
            f"{path}: ranks must be an integer array (topk, n_queries={n_queries}), got {ranks.dtype} {ranks.shape}"
        )
    return ranks


def _heatmap_entries(
    heatmap_models: Sequence[Any] | None, models: list[dict[str, Any]]
) -> list[tuple[str, Any]]:
    """(display name, model) pairs; a bare model is named after the evaluated model with its fingerprint."""
    out: list[tuple[str, Any]] = []
    if not heatmap_models:
        return out
    by_fp = {e.get("fingerprint"): e["name"] for e in models if e.get("fingerprint")}
    for i, item in enumerate(heatmap_models):
        if isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str):
            out.append((item[0], item[1]))
            continue
        name = None
        if by_fp:
            try:
                from dtop.engine.extract import model_fingerprint

                name = by_fp.get(model_fingerprint(item))
            except Exception:  # a model the fingerprint cannot handle is still shown, under a generic name
                name = None
        arch = getattr(getattr(item, "config", None), "arch", type(item).__name__)
        out.append((name or f"{arch} #{i + 1}", item))
    return out


def build_report(
    eval_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    topk: int = 10,
    heatmap_models: Sequence[Any] | None = None,
    *,
    variant: str | None = None,
    max_queries: int | None = None,
    thumb_size: int = DEFAULT_THUMB,
    heatmap_size: int | None = None,
    progress: bool = False,
) -> Path:
    """Write an HTML report of the evaluation in ``eval_dir`` to ``out_dir`` (default ``<eval_dir>/report``).

    ``topk``: retrieved images shown per query and model (at most the ranks stored by the
    evaluation). ``heatmap_models``: models (:class:`~dtop.models.RetrievalModel`, or ``(name,
    model)`` pairs) whose attention on each query crop is shown: DToP's local-branch attention, a
    ViT baseline's last-block [CLS]→patch attention. ``variant``: the dataset variant whose ranks
    are shown per query (default: the evaluated dataset without +1M). ``max_queries``: show only
    the first queries. ``heatmap_size``: longer side of the model input for heatmaps (default: the
    evaluation's image size, at most 512). Returns the path of ``index.html``.
    """
    start = time.perf_counter()
    eval_dir = Path(eval_dir)
    payload = load_results(eval_dir)
    topk = int(topk)
    if topk < 1:
        raise DataError(f"topk must be at least 1, got {topk}")
    if thumb_size < 16:
        raise DataError(f"thumb_size must be at least 16 pixels, got {thumb_size}")
    out = Path(out_dir) if out_dir is not None else eval_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.html"
    if index.exists():  # never leave an old index next to new, partly written assets
        index.unlink()
    models: list[dict[str, Any]] = payload["models"]
    taken: set[str] = set()
    slugs = [_slug(e["name"], taken) for e in models]
    thumbs = _Thumbs(out, thumb_size)
    dataset_name = str(payload.get("dataset") or (payload.get("data") or {}).get("name") or "dataset")
    settings = payload.get("settings") or {}
    notes: list[str] = []

    # -- results and training curves -----------------------------------------------------------
    sections = [f'<h2 id="results">Results</h2>\n<p>mAP and mP@k in %, revisited protocol (E = Easy, M = Medium, '
                f"H = Hard). Best per column in bold.</p>\n{_results_tables(models)}"]
    curves = _training_section(models, slugs, eval_dir, out, notes)
    if curves:
        sections.append(curves)

    # -- per-query -----------------------------------------------------------------------------
    dataset, why = _open_dataset(payload, eval_dir)
    heat = _heatmap_entries(heatmap_models, models)
    if dataset is None:
        notes.append(f"Images of the dataset not found, so per-query results are not shown: {why}")
    else:
        sections.append(
            _queries_section(payload, models, dataset, eval_dir, out, thumbs, topk, heat, variant, max_queries,
                             heatmap_size or int(min(512, _num(settings.get("image_size")) or 512)), notes, progress)
        )
    sections.append(_details_section(payload))

    summary = (
        f"{len(models)} model{'s' if len(models) != 1 else ''} on {_esc(dataset_name)}"
        + (f" ({dataset.n_queries} queries, {dataset.n_database} database images)" if dataset is not None else "")
        + f" · dtop {_esc(payload.get('dtop_version', '?'))}"
    )
    notes_html = "".join(f'<p class="note">{_esc(n)}</p>' for n in notes)
    toc = '<nav class="toc"><a href="#results">Results</a>' + (
        '<a href="#training">Training</a>' if curves else "") + (
        '<a href="#queries">Queries</a>' if dataset is not None else "") + '<a href="#details">Details</a></nav>'
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        '<meta name="generator" content="dtop report">\n'
        # An empty data: icon stops browsers from requesting a missing /favicon.ico.
        '<link rel="icon" href="data:,">\n'
        f"<title>dtop report: {_esc(dataset_name)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>dtop retrieval report: {_esc(dataset_name)}</h1><p>{summary}</p></header>\n<main>\n"
        f"{toc}\n{notes_html}\n" + "\n".join(sections) +
        f"\n<p style=\"color:#888;font-size:12px\">Generated in {time.perf_counter() - start:.1f} s "
        "by <code>dtop report</code>.</p>\n</main>\n</body>\n</html>\n"
    )
    # Pure ASCII (non-ASCII as character references): correct whatever the locale's default encoding.
    write_text(index, page.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    return index


def _training_section(models: list[dict[str, Any]], slugs: list[str], eval_dir: Path, out: Path,
                      notes: list[str]) -> str:
    from dtop.report.plots import PLOT_TITLES as titles
    from dtop.report.plots import line_plot, read_metrics, training_curves

    blocks = []
    for entry, slug in zip(models, slugs):
        run = entry.get("train_run")
        if not run:
            continue
        metrics = _resolve_run(str(run), eval_dir)
        if metrics is None:
            notes.append(f"Training run of {entry['name']} not found ({run}/metrics.jsonl): no training curves.")
            continue
        plots = training_curves(read_metrics(metrics))
        if not plots:
            notes.append(f"{metrics} holds no loss, lr or val_* values: no training curves for {entry['name']}.")
            continue
        figs = []
        for key, series in plots.items():
            rel = f"assets/plots/{slug}-{key}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(out / rel) as tmp:
                line_plot(series, tmp, title=f"{entry['name']}: {titles[key]}", xlabel="step")
            figs.append(f'<figure>{_img(rel, 520, 300, titles[key])}</figure>')
        blocks.append(f"<h3>{_esc(entry['name'])}</h3>\n<p>Run: <code>{_esc(run)}</code></p>\n"
                      f'<div class="plots">{"".join(figs)}</div>')
    if not blocks:
        return ""
    return '<h2 id="training">Training</h2>\n' + "\n".join(blocks)


def _category(q: dict[str, Any]) -> dict[int, str]:
    cat: dict[int, str] = {}
    for key in ("junk", "hard", "easy"):
        for i in q.get(key, []):
            cat[int(i)] = key
    return cat


def _queries_section(
    payload: dict[str, Any], models: list[dict[str, Any]], dataset: Any, eval_dir: Path, out: Path,
    thumbs: _Thumbs, topk: int, heat: list[tuple[str, Any]], variant: str | None, max_queries: int | None,
    heatmap_size: int, notes: list[str], progress: bool,
) -> str:
    from dtop.data.images import ImageLoadError, crop_bbx, load_image

    nq = dataset.n_queries
    shown = nq if max_queries is None else max(0, min(nq, int(max_queries)))
    if variant is None:
        base = str(payload.get("dataset") or dataset.name)
        names = [v for e in models for v in (e.get("ranks") or {})]
        if base in names or not names:
            variant = base
        else:
            variant = next((v for v in names if not v.endswith("+1m")), names[0])
    ranks = {e["name"]: _load_ranks(e, variant, eval_dir, nq) for e in models}
    missing = [n for n, r in ranks.items() if r is None]
    if missing:
        notes.append(f"No ranks for {', '.join(missing)} on {variant}: their retrieved images are not shown.")
    if heat:
        from dtop.report.heatmaps import colorbar

        bar = colorbar()
        (out / "assets").mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "assets" / "colorbar.png") as tmp:
            bar.save(tmp, format="PNG")
    heat_slugs: set[str] = set()
    heat = [(name, model, _slug(name, heat_slugs)) for name, model in heat]  # type: ignore[misc]
    gnd = dataset.gnd
    n_db = dataset.n_database
    ap_rows = []
    blocks = []
    for qi in range(shown):
        if progress and (qi % 10 == 0 or qi == shown - 1):
            print(f"report: query {qi + 1}/{shown}", flush=True)
        qname = gnd.qimlist[qi]
        q = gnd.gnd[qi]
        cat = _category(q)
        figs = []
        crop = None
        try:
            full = load_image(dataset.query_paths[qi])
            bbx = q.get("bbx")
            crop = crop_bbx(full, bbx, dataset.query_paths[qi]) if bbx is not None else full
            shown_full = full.copy()
            if bbx is not None:
                k = max(1, round(max(full.size) / thumbs.size))
                ImageDraw.Draw(shown_full).rectangle(tuple(bbx), outline=(255, 215, 0), width=2 * k)
            rel, w, h = thumbs.save(shown_full, f"assets/queries/{qi}.jpg")
            figs.append(f"<figure>{_img(rel, w, h, 'query image')}<figcaption>query image, bbx in yellow"
                        "</figcaption></figure>")
            rel, w, h = thumbs.save(crop, f"assets/queries/{qi}-crop.jpg")
            figs.append(f"<figure>{_img(rel, w, h, 'query crop')}<figcaption>query (bbx crop)</figcaption></figure>")
        except ImageLoadError as err:
            figs.append(f'<p class="note">query image unreadable: {_esc(err)}</p>')
        if crop is not None:
            from dtop.report.heatmaps import attention_heatmap, heatmap_kind, overlay

            for name, model, slug in list(heat):  # type: ignore[misc]
                try:
                    m = attention_heatmap(model, crop, heatmap_size)
                except ConfigError as err:  # e.g. a CNN: no attention to show; the rest of the report goes on
                    notes.append(f"No heatmaps for {name}: {err}")
                    heat.remove((name, model, slug))
                    continue
                rel, w, h = thumbs.save(overlay(crop, m), f"assets/heatmaps/{slug}/{qi}.jpg")
                figs.append(f"<figure>{_img(rel, w, h, f'{name} heatmap')}<figcaption>{_esc(name)}<br>"
                            f"{_esc(heatmap_kind(model))}</figcaption></figure>")
        rows = []
        ap_cells = []
        for entry in models:
            aps = ((entry["results"].get(variant) or {}).get("medium") or {}).get("aps") or []
            ap = aps[qi] if qi < len(aps) else None
            ap_cells.append(_pct(ap))
            r = ranks[entry["name"]]
            hits = []
            if r is not None:
                for pos in range(min(topk, r.shape[0])):
                    idx = int(r[pos, qi])
                    kind = cat.get(idx, "wrong")
                    mark = _CATEGORY_MARK[kind]
                    if 0 <= idx < n_db:
                        t = thumbs.database(dataset, idx)
                        label = gnd.imlist[idx]
                    else:
                        t, label = None, f"distractor #{idx - n_db}"
                    if t is None:
                        s = thumbs.size
                        inner = f'<div class="placeholder" style="width:{s}px;height:{s * 3 // 4}px">' \
                                f"{_esc(label)}</div>"
                    else:
                        inner = _img(t[0], t[1], t[2], label)
                    hits.append(f'<figure class="hit {kind}" title="{_esc(label)}">{inner}'
                                f"<figcaption>{pos + 1}. {_esc(mark)} {_esc(_short(label))}</figcaption></figure>")
            rows.append(
                f'<div class="model-row"><div class="label">{_esc(entry["name"])} '
                f'<span class="ap">AP (Medium) = {_pct(ap)}</span></div>'
                f'<div class="ranked">{"".join(hits) or "<em>no ranks</em>"}</div></div>'
            )
        counts = f"{len(q.get('easy', []))} easy, {len(q.get('hard', []))} hard, {len(q.get('junk', []))} junk"
        blocks.append(
            f'<section class="query" id="q{qi}"><h3>Query {qi + 1}: {_esc(qname)} '
            f'<span class="ap">({counts})</span></h3>\n<div class="qrow">{"".join(figs)}</div>\n' + "\n".join(rows)
            + "</section>"
        )
        ap_rows.append(f'<tr><td class="name"><a href="#q{qi}">{qi + 1}. {_esc(qname)}</a></td>'
                       + "".join(f"<td>{c}</td>" for c in ap_cells) + "</tr>")
    if shown < nq:
        notes.append(f"Showing the first {shown} of {nq} queries.")
    heat_note = ""
    if heat:
        heat_note = ('<p>Heatmaps: where each model looks on the query crop (normalised per image, '
                     '<img src="assets/colorbar.png" width="160" height="10" alt="colour scale"> low → high). '
                     "DToP: the local branch's spatial attention; ViT baselines: the last block's "
                     "[CLS]→patch attention, averaged over heads.</p>")
    ap_table = ('<details><summary>AP (Medium, %) per query</summary><table class="aps"><tr><th>query</th>'
                + "".join(f"<th>{_esc(e['name'])}</th>" for e in models) + "</tr>" + "".join(ap_rows)
                + "</table></details>")
    return (f'<h2 id="queries">Queries ({_esc(variant)}, top {topk})</h2>\n{_legend()}\n{heat_note}\n{ap_table}\n'
            + "\n".join(blocks))


def _short(name: str, n: int = 18) -> str:
    name = name.rsplit("/", 1)[-1]
    return name if len(name) <= n else name[: n - 1] + "…"


def _details_section(payload: dict[str, Any]) -> str:
    rows = []
    for entry in payload["models"]:
        info = {k: entry.get(k) for k in ("spec", "fingerprint", "train_run", "post", "timing") if k in entry}
        rows.append(f"<details><summary>{_esc(entry['name'])}</summary><pre>"
                    f"{_esc(json.dumps(info, indent=2, default=str))}\n\nconfig: "
                    f"{_esc(json.dumps(entry.get('config'), indent=2, default=str))}</pre></details>")
    data = {"data": payload.get("data"), "settings": payload.get("settings")}
    return ('<h2 id="details">Details</h2>\n<details><summary>dataset and settings</summary><pre>'
            f"{_esc(json.dumps(data, indent=2, default=str))}</pre></details>\n" + "\n".join(rows))
