"""Line charts as PNG files, drawn with matplotlib's Agg backend: the curves of ``dtop plot`` and reports."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dtop.errors import DtopError
from dtop.report.curves import PLOT_FILES, Chart, run_charts
from dtop.utils.io import atomic_path

DPI = 100
MARKERS_UP_TO = 40
"""Lines with at most this many points also mark each point."""


@dataclass
class WrittenPlots:
    """What :func:`plot_runs` wrote: the files, the chart behind each, and messages about what is left out."""

    paths: list[Path]
    charts: list[Chart]
    messages: list[str] = field(default_factory=list)


def _finite_points(xs: Sequence[float], ys: Sequence[float]) -> list[tuple[float, float]]:
    return sorted((float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y))


def draw_chart(chart: Chart, path: str | os.PathLike, *, height: int = 450, width: int = 800) -> Path:
    """Draw ``chart`` as a ``width`` × ``height`` pixel PNG at ``path`` (atomically); return the path.

    Non-finite points are left out; a line of one point is a dot; a chart without points says "no data".
    """
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to the figure: no pyplot, no global backend state
    ax = fig.add_subplot()
    drawn = 0
    for i, series in enumerate(chart.series):
        points = _finite_points(series.x, series.y)
        if not points:
            continue
        xs, ys = zip(*points)
        marker = "o" if len(points) <= MARKERS_UP_TO else None
        ax.plot(xs, ys, color=f"C{i % 10}", label=series.label, linewidth=1.8, marker=marker,
                markersize=3 if len(points) > 1 else 5)
        drawn += 1
    if drawn == 0:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.45")
    ax.set_title(chart.title, loc="left", fontsize="medium")
    ax.set_xlabel(chart.xlabel)
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    if chart.legend and drawn:
        ax.legend(fontsize="small", frameon=True, framealpha=0.9)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def plot_runs(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    height: int = 450,
    width: int = 800,
) -> WrittenPlots:
    """Draw the training curves of one or several runs to PNG files in ``out``.

    Writes ``loss.png``, ``lr.png`` (when an ``lr`` is logged), ``val_map.png`` (when some run has
    validation records) and ``negatives.png`` (contrastive mining), atomically, all against the step;
    :func:`dtop.report.curves.run_charts` says what each shows. ``out`` defaults to ``<run>/plots``
    for one run and is required for several. All runs are read (and checked) before anything is
    written.
    """
    if not runs:
        raise DtopError("no training run given")
    paths = [Path(r) for r in runs]
    if out is None:
        if len(paths) > 1:
            raise DtopError("several runs are overlaid: give the output folder with --out DIR")
        out = (paths[0].parent if paths[0].is_file() else paths[0]) / "plots"
    charts = run_charts(paths)
    written = [draw_chart(c, Path(out) / PLOT_FILES[c.key], height=height, width=width) for c in charts.charts]
    return WrittenPlots(written, charts.charts, charts.messages)
