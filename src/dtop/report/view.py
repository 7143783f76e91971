"""The view model of the HTML report: what the page shows, as plain data, computed without I/O."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dtop.report.curves import Chart

PROTOCOL_LABELS = (("easy", "E"), ("medium", "M"), ("hard", "H"))
CATEGORY_COLOURS: dict[str, str] = {"easy": "#2ca02c", "hard": "#1f77b4", "junk": "#a0a0a0", "wrong": "#d62728"}
"""Border colour of a retrieved image by its ground truth for the query (Medium protocol positives
are easy and hard)."""
CATEGORY_TEXT = {"easy": "easy (positive)", "hard": "hard (positive)", "junk": "junk (ignored)",
                 "wrong": "wrong (negative)"}
CATEGORY_MARK = {"easy": "E", "hard": "H", "junk": "J", "wrong": "✗"}


@dataclass(frozen=True)
class ImageRef:
    """An image file of the report, relative to ``index.html``, with its pixel size."""

    src: str
    width: int
    height: int
    alt: str


@dataclass(frozen=True)
class Cell:
    """One number of the results table (formatted), ``best`` when it is the column's maximum."""

    text: str
    best: bool = False


@dataclass
class TableRow:
    """A model's row of a results table."""

    name: str
    cells: list[Cell]


@dataclass
class ResultsTable:
    """mAP and mP@k of every model on one dataset variant; ``groups`` span one column per protocol."""

    variant: str
    groups: list[str]
    protocols: list[str]
    rows: list[TableRow]

    @property
    def span(self) -> int:
        """Columns under each group heading (one per protocol)."""
        return len(self.protocols) // max(1, len(self.groups))


@dataclass
class ChartView:
    """A training chart: its data and the PNG drawn from it."""

    chart: Chart
    image: ImageRef


@dataclass
class TrainingView:
    """The training curves of one evaluated model."""

    model: str
    run: str
    charts: list[ChartView]


@dataclass(frozen=True)
class Hit:
    """One retrieved image: its rank, ground-truth category, label and thumbnail (None: unreadable)."""

    rank: int
    kind: str
    label: str
    image: ImageRef | None

    @property
    def mark(self) -> str:
        """The one-letter mark of the category."""
        return CATEGORY_MARK[self.kind]

    @property
    def caption(self) -> str:
        """``rank. mark short-name``."""
        return f"{self.rank}. {self.mark} {short_name(self.label)}"


@dataclass
class ModelHits:
    """A model's top-k for a query (``hits`` empty: no ranks stored) and its AP there."""

    model: str
    ap: str
    hits: list[Hit]


@dataclass(frozen=True)
class HeatmapView:
    """Where a model looks on a query crop."""

    model: str
    kind: str
    image: ImageRef


@dataclass
class QueryImages:
    """The query's image (bbx drawn) and crop as written, or why they could not be read."""

    image: ImageRef | None = None
    crop: ImageRef | None = None
    error: str | None = None


@dataclass
class QueryView:
    """One query: its images, the heatmaps of its crop, and each model's top-k."""

    index: int
    name: str
    counts: str
    images: QueryImages
    heatmaps: list[HeatmapView]
    models: list[ModelHits]

    @property
    def anchor(self) -> str:
        """The id of the query's section."""
        return f"q{self.index}"


@dataclass
class QueriesSection:
    """The per-query part of the page; ``colorbar`` is set when heatmaps are shown."""

    variant: str
    topk: int
    thumb_size: int
    models: list[str]
    queries: list[QueryView]
    colorbar: ImageRef | None = None


@dataclass
class Comparison:
    """The first screen's side-by-side: a few queries with the top-k of two models each."""

    models: list[str]
    chosen: str
    queries: list[QueryView]
    topk: int = 10


def comparison_queries(ap_first: Sequence[float | None], ap_second: Sequence[float | None], n: int = 3) -> list[int]:
    """Queries at evenly spaced quantiles of the AP difference (first − second), so typical, not picked.

    With ``n`` = 3: the 25th, 50th and 75th percentile of the difference, in that order.
    """
    diffs = [((number(a) or 0.0) - (number(b) or 0.0), qi) for qi, (a, b) in enumerate(zip(ap_first, ap_second))]
    diffs.sort()
    chosen: list[int] = []
    for k in range(1, n + 1):
        if diffs:
            qi = diffs[round(k / (n + 1) * (len(diffs) - 1))][1]
            if qi not in chosen:
                chosen.append(qi)
    return chosen


@dataclass(frozen=True)
class LegendItem:
    """A ground-truth category of retrieved images, as the legend shows it."""

    kind: str
    colour: str
    mark: str
    text: str


@dataclass(frozen=True)
class Detail:
    """A collapsed block of raw settings."""

    summary: str
    text: str


@dataclass
class ReportPage:
    """Everything ``index.html`` shows."""

    dataset: str
    summary: str
    tables: list[ResultsTable]
    training: list[TrainingView]
    queries: QueriesSection | None
    details: list[Detail]
    notes: list[str] = field(default_factory=list)
    legend: list[LegendItem] = field(default_factory=list)
    seconds: float = 0.0
    comparison: Comparison | None = None


def percent(v: Any) -> str:
    """A fraction as a percentage with two decimals; "–" for anything that is not a finite number."""
    f = number(v)
    return "–" if f is None or isinstance(v, bool) else f"{100.0 * f:.2f}"


def number(v: Any) -> float | None:
    """``v`` as a finite float, else None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def short_name(name: str, n: int = 18) -> str:
    """The file name of ``name``, cut to ``n`` characters with an ellipsis."""
    name = name.rsplit("/", 1)[-1]
    return name if len(name) <= n else name[: n - 1] + "…"


def legend() -> list[LegendItem]:
    """The ground-truth categories, in legend order."""
    return [LegendItem(k, c, CATEGORY_MARK[k], CATEGORY_TEXT[k]) for k, c in CATEGORY_COLOURS.items()]


def _protocols_in(res: Any) -> list[str]:
    """The protocols present in one variant's results."""
    if not isinstance(res, dict):
        return []
    return [p for p, _ in PROTOCOL_LABELS if isinstance(res.get(p), dict)]


def _cell(res: Any, protocol: str, what: str, k: str | None) -> float | None:
    if not isinstance(res, dict) or not isinstance(res.get(protocol), dict):
        return None
    value = res[protocol].get(what)
    if k is not None:
        value = (value or {}).get(k)
    return number(value)


def results_table(variant: str, models: Sequence[Mapping[str, Any]]) -> ResultsTable:
    """The table of one variant: mAP, then mP@k for every k any model has, per protocol."""
    rows = [(e["name"], e["results"].get(variant)) for e in models]
    kappas: list[str] = []
    for _, res in rows:
        for p in _protocols_in(res):
            kappas += [k for k in (res[p].get("mp") or {}) if k not in kappas]
    kappas.sort(key=lambda k: number(k) or 0.0)
    columns: list[tuple[str, str, str | None]] = [(p, "map", None) for p, _ in PROTOCOL_LABELS]
    for k in kappas:
        columns += [(p, "mp", k) for p, _ in PROTOCOL_LABELS]
    values = [[_cell(res, *col) for col in columns] for _, res in rows]
    best: list[float | None] = []
    for c in range(len(columns)):
        finite = [x for x in (v[c] for v in values) if x is not None]
        best.append(max(finite) if finite and len(rows) > 1 else None)
    table_rows = [TableRow(name, [Cell(percent(v), b is not None and v == b) for v, b in zip(vals, best)])
                  for (name, _), vals in zip(rows, values)]
    return ResultsTable(variant, ["mAP"] + [f"mP@{k}" for k in kappas],
                        [lbl for _ in range(1 + len(kappas)) for _, lbl in PROTOCOL_LABELS], table_rows)


def results_tables(models: Sequence[Mapping[str, Any]]) -> list[ResultsTable]:
    """One table per dataset variant, in the order the models list them."""
    variants: list[str] = []
    for entry in models:
        variants += [v for v in entry["results"] if v not in variants]
    return [results_table(v, models) for v in variants]


def categories(q: Mapping[str, Any]) -> dict[int, str]:
    """Database index → ground-truth category (easy, hard, junk) of one query."""
    cat: dict[int, str] = {}
    for key in ("junk", "hard", "easy"):
        for i in q.get(key, []):
            cat[int(i)] = key
    return cat


def top_indices(ranks: np.ndarray | None, qi: int, topk: int) -> list[int]:
    """The first ``topk`` retrieved indices of query ``qi`` (empty without ranks)."""
    if ranks is None:
        return []
    return [int(ranks[pos, qi]) for pos in range(min(topk, ranks.shape[0]))]


def model_hits(
    entry: Mapping[str, Any], variant: str, qi: int, retrieved: list[int], cat: Mapping[int, str],
    imlist: Sequence[str], thumbs: Mapping[int, ImageRef | None],
) -> ModelHits:
    """A model's row of a query: its AP (Medium) and its retrieved images, distractors included."""
    aps = ((entry["results"].get(variant) or {}).get("medium") or {}).get("aps") or []
    hits = []
    for pos, idx in enumerate(retrieved):
        label = imlist[idx] if 0 <= idx < len(imlist) else f"distractor #{idx - len(imlist)}"
        hits.append(Hit(pos + 1, cat.get(idx, "wrong"), label, thumbs.get(idx)))
    return ModelHits(entry["name"], percent(aps[qi] if qi < len(aps) else None), hits)


def query_counts(q: Mapping[str, Any]) -> str:
    """``n easy, n hard, n junk`` of one query's ground truth."""
    return f"{len(q.get('easy', []))} easy, {len(q.get('hard', []))} hard, {len(q.get('junk', []))} junk"


def details(payload: Mapping[str, Any]) -> list[Detail]:
    """The raw dataset settings, then each model's spec, fingerprint, run, timing and config."""
    out = [Detail("dataset and settings",
                  json.dumps({"data": payload.get("data"), "settings": payload.get("settings")}, indent=2,
                             default=str))]
    for entry in payload["models"]:
        info = {k: entry.get(k) for k in ("spec", "fingerprint", "train_run", "post", "timing") if k in entry}
        out.append(Detail(str(entry["name"]), f"{json.dumps(info, indent=2, default=str)}\n\nconfig: "
                          f"{json.dumps(entry.get('config'), indent=2, default=str)}"))
    return out


def summary(payload: Mapping[str, Any], dataset_name: str, dataset: Any) -> str:
    """The header line: how many models on which dataset, its size, the dtop version."""
    n = len(payload["models"])
    sizes = f" ({dataset.n_queries} queries, {dataset.n_database} database images)" if dataset is not None else ""
    return f"{n} model{'s' if n != 1 else ''} on {dataset_name}{sizes} · dtop {payload.get('dtop_version', '?')}"
