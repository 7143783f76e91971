"""Simple line plots drawn with PIL (no matplotlib needed): training curves for reports."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

SERIES_COLOURS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194),
)
"""Line colours, in series order (the matplotlib 'tab10' start)."""


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (1, 2, 2.5, 5 × 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks and ticks[-1] < hi - step * 1e-9:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.0e}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.4g}"


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    title: str = "",
    xlabel: str = "",
    size: tuple[int, int] = (520, 300),
    legend: bool | None = None,
) -> Path:
    """Draw ``{label: (xs, ys)}`` as lines with axes, ticks and a legend; save as PNG at ``path``.

    Non-finite points are skipped. A series with a single point is drawn as a dot. ``legend``:
    ``None`` shows it when there are several series, ``True`` always, ``False`` never.
    """
    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    clean: dict[str, list[tuple[float, float]]] = {}
    for label, (xs, ys) in series.items():
        pts = [(float(x), float(y)) for x, y in zip(xs, ys)
               if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
        if pts:
            clean[label] = pts
    left, right, top, bottom = 58, 12, 26, 38
    d.text((left, 5), title, fill=(20, 20, 20), font=font)
    if not clean:
        d.text((w // 2 - 40, h // 2), "no data", fill=(120, 120, 120), font=font)
        img.save(path, format="PNG")
        return Path(path)
    xs_all = [x for pts in clean.values() for x, _ in pts]
    ys_all = [y for pts in clean.values() for _, y in pts]
    xt, yt = nice_ticks(min(xs_all), max(xs_all)), nice_ticks(min(ys_all), max(ys_all))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    pw, ph = w - left - right, h - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    for t in yt:
        d.line((left, py(t), left + pw, py(t)), fill=(232, 232, 232))
        label = _fmt(t)
        tw = d.textlength(label, font=small)
        d.text((left - 6 - tw, py(t) - 6), label, fill=(60, 60, 60), font=small)
    for t in xt:
        d.line((px(t), top, px(t), top + ph), fill=(240, 240, 240))
        label = _fmt(t)
        tw = d.textlength(label, font=small)
        d.text((px(t) - tw / 2, top + ph + 4), label, fill=(60, 60, 60), font=small)
    d.rectangle((left, top, left + pw, top + ph), outline=(90, 90, 90))
    if xlabel:
        tw = d.textlength(xlabel, font=small)
        d.text((left + pw / 2 - tw / 2, h - 16), xlabel, fill=(60, 60, 60), font=small)
    ly = top + 4
    for i, (label, pts) in enumerate(clean.items()):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        coords = [(px(x), py(y)) for x, y in sorted(pts)]
        if len(coords) == 1:
            cx, cy = coords[0]
            d.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
        else:
            d.line(coords, fill=colour, width=2)
            if len(coords) <= 40:
                for cx, cy in coords:
                    d.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=colour)
        if legend or (legend is None and len(clean) > 1):
            tw = d.textlength(label, font=small)
            lx = left + pw - tw - 28
            d.rectangle((lx - 4, ly - 2, left + pw - 4, ly + 13), fill=(255, 255, 255))
            d.line((lx, ly + 6, lx + 16, ly + 6), fill=colour, width=3)
            d.text((lx + 20, ly), label, fill=(30, 30, 30), font=small)
            ly += 16
    img.save(path, format="PNG")
    return Path(path)


def read_metrics(path: str | os.PathLike, strict: bool = False, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The records of a training run's ``metrics.jsonl`` (one JSON object per line).

    Blank lines are skipped. Unreadable lines (not JSON, or not a JSON object) are skipped too, unless
    ``strict``: then the first one raises :class:`~dtop.errors.DataError` naming the file and line number.
    Even when ``strict``, an unreadable *last line without its newline* is skipped (a write cut off by a
    killed run, or one still in progress); a message saying so is appended to ``notes`` when given.
    """
    from dtop.errors import DataError

    records = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    # split() leaves the text after the last newline (b"" when the file ends with one) as the last item.
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
                type(obj), "null")
            problem = None if isinstance(obj, dict) else f"a JSON {kind}, not an object"
        except UnicodeDecodeError:
            problem = "not UTF-8 text"
        except ValueError as err:
            problem = f"not valid JSON ({getattr(err, 'msg', err)})"
        if problem is None:
            records.append(obj)
            continue
        if number == len(lines):  # no newline after it: an incomplete write
            if notes is not None:
                notes.append(f"{path}, line {number}: skipped an incomplete last line (a killed run or one "
                             "still writing)")
            continue
        if strict:
            raise DataError(f"{path}, line {number}: corrupt record: {problem}. Each line of metrics.jsonl must "
                            "be one JSON object; delete or fix that line.")
    return records


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def training_curves(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """Group the records into plots: ``{"loss": {...}, "lr": {...}, "validation": {...}}`` of ``{label: (xs, ys)}``.

    The x axis is ``step`` (the record's position where absent). ``loss`` and ``lr`` plot those keys
    (and ``lr_*`` / ``*_lr`` keys, e.g. per-part learning rates); ``validation`` plots ``val_map`` and
    every other numeric ``val_*`` key; ``mining`` plots ``mean_negative_distance`` of the contrastive
    protocol's mining records (one per epoch); a dict value (e.g. ``val_map: {"medium": .., "hard": ..}``)
    gives one series per entry. Plots without data are left out.
    """
    plots: dict[str, dict[str, tuple[list[float], list[float]]]] = {key: {} for key in PLOT_FILES}

    def add(plot: str, label: str, x: float, y: float) -> None:
        xs, ys = plots[plot].setdefault(label, ([], []))
        xs.append(x)
        ys.append(y)

    for i, rec in enumerate(records):
        x = _number(rec.get("step"))
        x = float(i) if x is None else x
        for key, value in rec.items():
            plot = None
            if key == "loss" or (key.endswith("_loss") and not key.startswith("val_")):
                plot = "loss"
            elif key == "lr" or key.startswith("lr_") or key.endswith("_lr"):
                plot = "lr"
            elif key.startswith("val_"):
                plot = "validation"
            elif key == "mean_negative_distance":
                plot = "mining"
            if plot is None:
                continue
            if isinstance(value, Mapping):
                for sub, v in value.items():
                    y = _number(v)
                    if y is not None:
                        add(plot, f"{key} {sub}", x, y)
            else:
                y = _number(value)
                if y is not None:
                    add(plot, key, x, y)
    return {k: v for k, v in plots.items() if v}


PLOT_FILES: dict[str, str] = {"loss": "loss.png", "lr": "lr.png", "validation": "val_map.png",
                              "mining": "negatives.png"}
"""The file each plot of :func:`plot_runs` is written to."""

PLOT_TITLES: dict[str, str] = {"loss": "training loss", "lr": "learning rate", "validation": "validation mAP",
           "mining": "mean distance to the mined hard negatives"}


def _run_labels(paths: Sequence[Path]) -> list[str]:
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


def load_run(run: str | os.PathLike, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The step and validation records of a training run folder (or of its ``metrics.jsonl`` itself).

    Raises :class:`~dtop.errors.DataError` when the folder or its ``metrics.jsonl`` is missing, a line
    is corrupt (see :func:`read_metrics` with ``strict``) or the run has no step records (a numeric
    ``step`` and a ``loss``). Records without a numeric ``step`` (e.g. the final ``"event": "end"``) are
    left out.
    """
    from dtop.errors import DataError

    run = Path(run)
    metrics = run if run.is_file() else run / "metrics.jsonl"
    if not run.exists():
        raise DataError(f"{run}: no such training run folder")
    if not metrics.is_file():
        raise DataError(f"{run}: no metrics.jsonl in this folder: is it the run.out folder of `dtop train`?")
    try:
        records = read_metrics(metrics, strict=True, notes=notes)
    except OSError as err:
        raise DataError(f"{metrics}: cannot read: {err}") from err
    records = [r for r in records if _number(r.get("step")) is not None]
    if not any("loss" in r for r in records):
        raise DataError(f"{metrics}: no step records (lines with \"step\" and \"loss\"): the run logged no "
                        "training step yet")
    return records


def plot_runs(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    size: tuple[int, int] = (800, 450),
    notes: list[str] | None = None,
) -> list[Path]:
    """Draw the training curves of one or several runs to PNG files in ``out``; return their paths.

    Writes ``loss.png``, ``lr.png`` (when an ``lr`` is logged) and, when some run has validation
    records, ``val_map.png`` (atomically), all against the step. One run: ``val_map.png`` shows
    ``val_map`` (mean of Medium and Hard) and every other ``val_*`` value. Several runs: the curves
    are overlaid, one colour per run, labelled with the run folder name; ``val_map.png`` then shows
    ``val_map`` of each run. ``out`` defaults to ``<run>/plots`` for one run and is required for
    several. All runs are read (and checked) before anything is written. Messages about what was
    left out are appended to ``notes``.
    """
    from dtop.errors import DtopError
    from dtop.utils.io import atomic_path

    if not runs:
        raise DtopError("no training run given")
    paths = [Path(r) for r in runs]
    if out is None:
        if len(paths) > 1:
            raise DtopError("several runs are overlaid: give the output folder with --out DIR")
        out = (paths[0].parent if paths[0].is_file() else paths[0]) / "plots"
    out = Path(out)
    curves = [training_curves(load_run(p, notes)) for p in paths]
    labels = _run_labels(paths)
    several = len(paths) > 1
    plots: dict[str, dict[str, tuple[list[float], list[float]]]] = {key: {} for key in PLOT_FILES}
    for label, run_curves in zip(labels, curves):
        if notes is not None:
            if not run_curves.get("loss"):
                notes.append(f"{label}: the loss is not a finite number in any step record")
            if not run_curves.get("lr"):
                notes.append(f"{label}: no learning rate (lr) logged")
            if not run_curves.get("validation"):
                notes.append(f"{label}: no validation records")
        for key in plots:
            series = run_curves.get(key, {})
            if not several:
                plots[key] = series
                continue
            # One series per run: the main key, else (e.g. per-part lr, val_map as a dict) the first one.
            main = {"loss": "loss", "lr": "lr", "validation": "val_map", "mining": "mean_negative_distance"}[key]
            name = main if main in series else next(iter(series), None)
            if name is not None:
                plots[key][label if name == main else f"{label}: {name}"] = series[name]
    title_prefix = "" if several else f"{labels[0]}: "
    written = []
    for key, series in plots.items():
        # lr.png only with an lr, val_map.png with validation, negatives.png with contrastive mining
        if key != "loss" and not series:
            continue
        path = out / PLOT_FILES[key]
        with atomic_path(path) as tmp:
            line_plot(series, tmp, title=title_prefix + PLOT_TITLES[key], xlabel="step", size=size,
                      legend=True if several else None)
        written.append(path)
    return written
