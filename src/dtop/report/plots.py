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
) -> Path:
    """Draw ``{label: (xs, ys)}`` as lines with axes, ticks and a legend; save as PNG at ``path``.

    Non-finite points are skipped. A series with a single point is drawn as a dot.
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
        if len(clean) > 1:
            tw = d.textlength(label, font=small)
            lx = left + pw - tw - 28
            d.rectangle((lx - 4, ly - 2, left + pw - 4, ly + 13), fill=(255, 255, 255))
            d.line((lx, ly + 6, lx + 16, ly + 6), fill=colour, width=3)
            d.text((lx + 20, ly), label, fill=(30, 30, 30), font=small)
            ly += 16
    img.save(path, format="PNG")
    return Path(path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a training run's ``metrics.jsonl`` (one JSON object per line).

    Blank lines and unreadable lines (e.g. a last line cut off by a killed run) are skipped.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                records.append(obj)
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
    every other numeric ``val_*`` key; a dict value (e.g. ``val_map: {"medium": .., "hard": ..}``)
    gives one series per entry. Plots without data are left out.
    """
    plots: dict[str, dict[str, tuple[list[float], list[float]]]] = {"loss": {}, "lr": {}, "validation": {}}

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
