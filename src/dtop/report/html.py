"""``build_report``: a self-contained HTML report of an evaluation folder (``dtop evaluate`` output).

Data is gathered (results, ranks, images, heatmaps) into the view model of :mod:`dtop.report.view`,
which the jinja2 templates of ``templates/`` render. What the page shows and why: docs/report.md.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from tqdm.auto import tqdm

from dtop.errors import DataError
from dtop.report import view
from dtop.report.assets import AssetWriter, HeatmapMaker, query_images
from dtop.report.curves import PLOT_TITLES, Chart, read_metrics, training_curves
from dtop.report.results import (
    choose_variant,
    load_ranks,
    load_results,
    name_heatmap_models,
    open_dataset,
    resolve_run,
    slug,
)
from dtop.utils.io import write_text

DEFAULT_THUMB = 144
MAX_HEATMAP_SIZE = 512


@dataclass(frozen=True)
class _Options:
    topk: int
    variant: str | None
    max_queries: int | None
    heatmap_size: int | None
    progress: bool
    compare: tuple[str, str] | None = None


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
    compare: tuple[str, str] | None = None,
) -> Path:
    """Write an HTML report of the evaluation in ``eval_dir`` to ``out_dir`` (default ``<eval_dir>/report``).

    ``topk``: retrieved images shown per query and model (at most the ranks stored by the
    evaluation). ``heatmap_models``: models (:class:`~dtop.models.RetrievalModel`, or ``(name,
    model)`` pairs) whose attention on each query crop is shown: DToP's local-branch attention, a
    ViT baseline's last-block [CLS]→patch attention. ``variant``: the dataset variant whose ranks
    are shown per query (default: the evaluated dataset without +1M). ``max_queries``: show only
    the first queries. ``heatmap_size``: longer side of the model input for heatmaps (default: the
    evaluation's image size, at most 512). ``progress``: a progress bar over the queries. Returns
    the path of ``index.html``.
    """
    out = Path(out_dir) if out_dir is not None else Path(eval_dir) / "report"
    page = collect_report(eval_dir, out, topk, heatmap_models, variant=variant, max_queries=max_queries,
                          thumb_size=thumb_size, heatmap_size=heatmap_size, progress=progress, compare=compare)
    return write_report(page, out)


def collect_report(
    eval_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    topk: int = 10,
    heatmap_models: Sequence[Any] | None = None,
    *,
    variant: str | None = None,
    max_queries: int | None = None,
    thumb_size: int = DEFAULT_THUMB,
    heatmap_size: int | None = None,
    progress: bool = False,
    compare: tuple[str, str] | None = None,
) -> view.ReportPage:
    """The view model of the report of ``eval_dir``, its images written to ``out_dir/assets``.

    Takes the arguments of :func:`build_report`. An ``index.html`` already in ``out_dir`` is removed
    first, so that it never sits next to new, partly written assets: :func:`write_report` writes
    the new one.
    """
    start = time.perf_counter()
    eval_dir = Path(eval_dir)
    payload = load_results(eval_dir)
    topk = int(topk)
    if topk < 1:
        raise DataError(f"topk must be at least 1, got {topk}")
    if thumb_size < 16:
        raise DataError(f"thumb_size must be at least 16 pixels, got {thumb_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").unlink(missing_ok=True)
    options = _Options(topk, variant, max_queries, heatmap_size, progress, compare)
    page = make_page(payload, eval_dir, AssetWriter(out, thumb_size), heatmap_models, options)
    page.seconds = time.perf_counter() - start
    return page


def write_report(page: view.ReportPage, out_dir: str | os.PathLike) -> Path:
    """Render ``page`` to ``out_dir/index.html`` (atomically) and return its path."""
    index = Path(out_dir) / "index.html"
    # Pure ASCII (non-ASCII as character references): correct whatever the locale's default encoding.
    write_text(index, render(page).encode("ascii", "xmlcharrefreplace").decode("ascii"))
    return index


def make_page(
    payload: dict[str, Any], eval_dir: Path, writer: AssetWriter, heatmap_models: Sequence[Any] | None,
    options: _Options,
) -> view.ReportPage:
    """Gather what the report shows (writing its images with ``writer``) into its view model."""
    models: list[dict[str, Any]] = payload["models"]
    taken: set[str] = set()
    slugs = [slug(e["name"], taken) for e in models]
    dataset_name = str(payload.get("dataset") or (payload.get("data") or {}).get("name") or "dataset")
    training, notes = training_views(models, slugs, eval_dir, writer)
    dataset, why = open_dataset(payload, eval_dir)
    heat = name_heatmap_models(heatmap_models, models)
    queries = None
    if dataset is None:
        notes.append(f"Images of the dataset not found, so per-query results are not shown: {why}")
    else:
        queries, more = queries_section(payload, dataset, eval_dir, writer, heat, options)
        notes += more
    comparison = None
    if options.compare is not None and dataset is not None:
        comparison, more = comparison_section(payload, dataset, eval_dir, writer, options)
        notes += more
    return view.ReportPage(
        dataset_name, view.summary(payload, dataset_name, dataset), view.results_tables(models), training,
        queries, view.details(payload), notes, view.legend(), comparison=comparison,
    )


def comparison_section(
    payload: dict[str, Any], dataset: Any, eval_dir: Path, writer: AssetWriter, options: _Options
) -> tuple[view.Comparison | None, list[str]]:
    """Three typical queries with the top-k of the two ``options.compare`` models side by side."""
    names = list(options.compare or ())
    by_name = {str(e["name"]): e for e in payload["models"]}
    missing = [n for n in names if n not in by_name]
    if missing:
        return None, [f"No comparison: {', '.join(missing)} not among the evaluated models."]
    entries = [by_name[n] for n in names]
    nq = dataset.n_queries
    variant = options.variant if options.variant is not None else choose_variant(payload, dataset.name)
    ranks = [load_ranks(e, variant, eval_dir, nq) for e in entries]
    aps = [((e["results"].get(variant) or {}).get("medium") or {}).get("aps") or [] for e in entries]
    chosen = view.comparison_queries(aps[0], aps[1])
    no_heatmaps = HeatmapMaker([], 0)
    queries = [_query(qi, dataset, entries, ranks, variant, writer, no_heatmaps, options.topk) for qi in chosen]
    return view.Comparison(names, "the 25th, 50th and 75th percentile of the AP difference", queries,
                           options.topk), []


def training_views(
    models: list[dict[str, Any]], slugs: list[str], eval_dir: Path, writer: AssetWriter
) -> tuple[list[view.TrainingView], list[str]]:
    """The training curves of the models with a ``train_run`` (charts drawn), and notes on those without."""
    views, notes = [], []
    for entry, name_slug in zip(models, slugs):
        run = entry.get("train_run")
        if not run:
            continue
        metrics = resolve_run(str(run), eval_dir)
        if metrics is None:
            notes.append(f"Training run of {entry['name']} not found ({run}/metrics.jsonl): no training curves.")
            continue
        curves = training_curves(read_metrics(metrics).records)
        if not curves:
            notes.append(f"{metrics} holds no loss, lr or val_* values: no training curves for {entry['name']}.")
            continue
        charts = []
        for key, series in curves.items():
            chart = Chart(key, f"{entry['name']}: {PLOT_TITLES[key]}", list(series.values()),
                          legend=len(series) > 1)
            image = writer.chart(chart, f"assets/plots/{name_slug}-{key}.png", PLOT_TITLES[key])
            charts.append(view.ChartView(chart, image))
        views.append(view.TrainingView(str(entry["name"]), str(run), charts))
    return views, notes


def queries_section(
    payload: dict[str, Any], dataset: Any, eval_dir: Path, writer: AssetWriter, heat: list[tuple[str, Any]],
    options: _Options,
) -> tuple[view.QueriesSection, list[str]]:
    """Every shown query with its images, heatmaps and each model's top-k; and notes on what is left out."""
    models: list[dict[str, Any]] = payload["models"]
    nq = dataset.n_queries
    shown = nq if options.max_queries is None else max(0, min(nq, int(options.max_queries)))
    variant = options.variant if options.variant is not None else choose_variant(payload, dataset.name)
    ranks = [load_ranks(e, variant, eval_dir, nq) for e in models]
    notes = []
    missing = [str(e["name"]) for e, r in zip(models, ranks) if r is None]
    if missing:
        notes.append(f"No ranks for {', '.join(missing)} on {variant}: their retrieved images are not shown.")
    settings = payload.get("settings") or {}
    size = options.heatmap_size or int(min(MAX_HEATMAP_SIZE, view.number(settings.get("image_size")) or 512))
    taken: set[str] = set()
    maker = HeatmapMaker([(name, model, slug(name, taken)) for name, model in heat], size)
    colorbar = writer.colorbar() if heat else None
    queries = [_query(qi, dataset, models, ranks, variant, writer, maker, options.topk)
               for qi in tqdm(range(shown), desc="report", unit="query", disable=not options.progress)]
    notes += maker.messages
    if shown < nq:
        notes.append(f"Showing the first {shown} of {nq} queries.")
    names = [str(e["name"]) for e in models]
    section = view.QueriesSection(variant, options.topk, writer.thumb_size, names, queries,
                                  colorbar if maker.models else None)
    return section, notes


def _query(
    qi: int, dataset: Any, models: list[dict[str, Any]], ranks: list[np.ndarray | None], variant: str,
    writer: AssetWriter, maker: HeatmapMaker, topk: int,
) -> view.QueryView:
    """Query ``qi``: its images and heatmaps written, and each model's retrieved images."""
    q = dataset.gnd.gnd[qi]
    images, crop = query_images(writer, dataset, qi)
    heatmaps = maker.make(writer, crop, qi) if crop is not None else []
    cat = view.categories(q)
    imlist = dataset.gnd.imlist
    rows = []
    for entry, r in zip(models, ranks):
        retrieved = view.top_indices(r, qi, topk)
        thumbs = {i: writer.database(dataset, i, imlist[i]) for i in retrieved if 0 <= i < len(imlist)}
        rows.append(view.model_hits(entry, variant, qi, retrieved, cat, imlist, thumbs))
    return view.QueryView(qi, str(dataset.gnd.qimlist[qi]), view.query_counts(q), images, heatmaps, rows)


@functools.cache
def _environment() -> Environment:
    return Environment(loader=PackageLoader("dtop.report", "templates"), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render(page: view.ReportPage) -> str:
    """The HTML of ``page`` (every value escaped by the templates)."""
    return _environment().get_template("report.html.j2").render(page=page)
