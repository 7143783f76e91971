"""Training curves of a run's ``metrics.jsonl``: the records, and the data behind each chart."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtop.errors import DataError

PLOT_FILES: dict[str, str] = {"loss": "loss.png", "lr": "lr.png", "validation": "val_map.png",
                              "mining": "negatives.png"}
"""The file each chart of ``dtop plot`` is written to, by chart key."""

PLOT_TITLES: dict[str, str] = {"loss": "training loss", "lr": "learning rate", "validation": "validation mAP",
                               "mining": "mean distance to the mined hard negatives"}
"""The title of each chart, by chart key."""

MAIN_SERIES: dict[str, str] = {"loss": "loss", "lr": "lr", "validation": "val_map",
                               "mining": "mean_negative_distance"}
"""The metric that stands for a run in an overlay of several runs, by chart key."""


@dataclass
class Series:
    """One line of a chart: its label and its points in the order they were logged."""

    label: str
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)


@dataclass
class Chart:
    """The data behind one figure: a key of :data:`PLOT_FILES`, a title and its lines."""

    key: str
    title: str
    series: list[Series]
    xlabel: str = "step"
    legend: bool = False

    @property
    def labels(self) -> list[str]:
        """The labels of the lines, in drawing order."""
        return [s.label for s in self.series]

    def get(self, label: str) -> Series:
        """The line labelled ``label`` (KeyError if there is none)."""
        for s in self.series:
            if s.label == label:
                return s
        raise KeyError(label)


@dataclass
class MetricsLog:
    """The records read from a ``metrics.jsonl`` and messages about the lines that were skipped."""

    path: Path
    records: list[dict[str, Any]]
    messages: list[str] = field(default_factory=list)


@dataclass
class RunCharts:
    """The charts of one run, or of several runs overlaid, and messages about what they leave out."""

    charts: list[Chart]
    messages: list[str] = field(default_factory=list)

    def get(self, key: str) -> Chart | None:
        """The chart of ``key`` (``"loss"``, ``"lr"``, ``"validation"``, ``"mining"``), None if not drawn."""
        return next((c for c in self.charts if c.key == key), None)


def _problem(raw: bytes) -> tuple[Any, str | None]:
    """The JSON object of one line, or why the line is not one."""
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except ValueError as err:
        return None, f"not valid JSON ({getattr(err, 'msg', err)})"
    if isinstance(obj, dict):
        return obj, None
    kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(obj), "null")
    return None, f"a JSON {kind}, not an object"


def read_metrics(path: str | os.PathLike, strict: bool = False) -> MetricsLog:
    """The records of a training run's ``metrics.jsonl`` (one JSON object per line).

    Blank lines are skipped. Unreadable lines (not JSON, or not a JSON object) are skipped too, unless
    ``strict``: then the first one raises :class:`~dtop.errors.DataError` naming the file and line number.
    Even when ``strict``, an unreadable *last line without its newline* is skipped (a write cut off by a
    killed run, or one still in progress); the returned log's ``messages`` say so.
    """
    log = MetricsLog(Path(path), [])
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    # split() leaves the text after the last newline (b"" when the file ends with one) as the last item.
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        obj, problem = _problem(raw)
        if problem is None:
            log.records.append(obj)
        elif number == len(lines):  # no newline after it: an incomplete write
            log.messages.append(f"{path}, line {number}: skipped an incomplete last line (a killed run or one "
                                "still writing)")
        elif strict:
            raise DataError(f"{path}, line {number}: corrupt record: {problem}. Each line of metrics.jsonl must "
                            "be one JSON object; delete or fix that line.")
    return log


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _chart_of(key: str) -> str | None:
    """The chart a metric belongs to, None for metrics that are not plotted."""
    if key == "loss" or (key.endswith("_loss") and not key.startswith("val_")):
        return "loss"
    if key == "lr" or key.startswith("lr_") or key.endswith("_lr"):
        return "lr"
    if key.startswith("val_"):
        return "validation"
    if key == "mean_negative_distance":
        return "mining"
    return None


def training_curves(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Series]]:
    """Group the records into charts: ``{"loss": {label: Series}, "lr": ..., "validation": ..., "mining": ...}``.

    The x axis is ``step`` (the record's position where absent). ``loss`` and ``lr`` plot those keys
    (and ``lr_*`` / ``*_lr`` keys, e.g. per-part learning rates); ``validation`` plots ``val_map`` and
    every other numeric ``val_*`` key; ``mining`` plots ``mean_negative_distance`` of the contrastive
    protocol's mining records (one per epoch); a dict value (e.g. ``val_map: {"medium": .., "hard": ..}``)
    gives one series per entry. Non-finite values are left out, and so are charts without data.
    """
    charts: dict[str, dict[str, Series]] = {key: {} for key in PLOT_FILES}

    def add(chart: str, label: str, x: float, value: Any) -> None:
        y = _number(value)
        if y is not None:
            series = charts[chart].setdefault(label, Series(label))
            series.x.append(x)
            series.y.append(y)

    for i, rec in enumerate(records):
        x = _number(rec.get("step"))
        x = float(i) if x is None else x
        for key, value in rec.items():
            chart = _chart_of(key)
            if chart is None:
                continue
            if isinstance(value, Mapping):
                for sub, v in value.items():
                    add(chart, f"{key} {sub}", x, v)
            else:
                add(chart, key, x, value)
    return {k: v for k, v in charts.items() if v}


def run_labels(paths: Sequence[Path]) -> list[str]:
    """The folder names of the runs; the paths as given where names repeat; numbered where those do too."""
    folders = [p.parent if p.is_file() else p for p in paths]  # a metrics.jsonl given: its run folder
    names = [f.resolve().name or str(f) for f in folders]
    labels = [str(f) if names.count(n) > 1 else n for f, n in zip(folders, names)]
    out: list[str] = []
    for label in labels:
        unique, k = label, 2
        while unique in out:
            unique, k = f"{label} ({k})", k + 1
        out.append(unique)
    return out


def load_run(run: str | os.PathLike) -> MetricsLog:
    """The step and validation records of a training run folder (or of its ``metrics.jsonl`` itself).

    Raises :class:`~dtop.errors.DataError` when the folder or its ``metrics.jsonl`` is missing, a line
    is corrupt (see :func:`read_metrics` with ``strict``) or the run has no step records (a numeric
    ``step`` and a ``loss``). Records without a numeric ``step`` (e.g. the final ``"event": "end"``) are
    left out.
    """
    run = Path(run)
    metrics = run if run.is_file() else run / "metrics.jsonl"
    if not run.exists():
        raise DataError(f"{run}: no such training run folder")
    if not metrics.is_file():
        raise DataError(f"{run}: no metrics.jsonl in this folder: is it the run.out folder of `dtop train`?")
    try:
        log = read_metrics(metrics, strict=True)
    except OSError as err:
        raise DataError(f"{metrics}: cannot read: {err}") from err
    log.records = [r for r in log.records if _number(r.get("step")) is not None]
    if not any("loss" in r for r in log.records):
        raise DataError(f"{metrics}: no step records (lines with \"step\" and \"loss\"): the run logged no "
                        "training step yet")
    return log


def _left_out(label: str, curves: Mapping[str, Any]) -> list[str]:
    """Messages about the charts a run has no data for."""
    missing = {"loss": "the loss is not a finite number in any step record", "lr": "no learning rate (lr) logged",
               "validation": "no validation records"}
    return [f"{label}: {text}" for key, text in missing.items() if not curves.get(key)]


def run_charts(runs: Sequence[str | os.PathLike]) -> RunCharts:
    """The charts of ``dtop plot``: every run is read and checked (see :func:`load_run`) first.

    One run: each chart shows all of its series (``val_map`` and every other ``val_*`` value, say).
    Several runs: one line per run and chart, labelled with the run folder name, of the chart's main
    metric (:data:`MAIN_SERIES`) or else of its first series (labelled ``run: name``). The loss chart
    is always there; the others only with data.
    """
    paths = [Path(r) for r in runs]
    logs = [load_run(p) for p in paths]
    labels = run_labels(paths)
    several = len(paths) > 1
    messages = [m for log in logs for m in log.messages]
    lines: dict[str, list[Series]] = {key: [] for key in PLOT_FILES}
    for label, log in zip(labels, logs):
        curves = training_curves(log.records)
        messages += _left_out(label, curves)
        for key in lines:
            series = curves.get(key, {})
            if not several:
                lines[key] = list(series.values())
                continue
            main = MAIN_SERIES[key]
            name = main if main in series else next(iter(series), None)
            if name is not None:
                s = series[name]
                lines[key].append(Series(label if name == main else f"{label}: {name}", s.x, s.y))
    prefix = "" if several else f"{labels[0]}: "
    charts = [Chart(key, prefix + PLOT_TITLES[key], series, legend=several or len(series) > 1)
              for key, series in lines.items() if key == "loss" or series]
    return RunCharts(charts, messages)
