"""A built-in instance-retrieval benchmark, generated offline and deterministically from a seed.

``generate_benchmark(root)`` draws procedural scenes with numpy and PIL only (no network, no extra
dependency) and writes them in exactly the revisited format, so every dtop tool reads them:

* ``<root>/<name>/jpg/<image>.jpg`` and ``<root>/<name>/gnd_<name>.pkl`` (``imlist``, ``qimlist``,
  ``gnd`` = one ``{bbx, easy, hard, junk}`` per query; plain dicts, lists, str, int and float, so the
  restricted unpickler of :func:`dtop.data.gnd.load_gnd` reads it);
* a training split of other instances, a folder per class: ``<root>/<name>-train/<class>/<image>.jpg``,
  and the same list as ``<root>/<name>-train/train.csv`` (``path,label``; paths relative to the CSV).

Each *instance* is a distinctive object (a building facade with windows, an emblem of patterned
shapes, a sign panel with text-like glyphs) drawn from its own random stream, and pasted into
scenes with random backgrounds and clutter made of the same colours and shapes. Backgrounds never
depend on the instance, so instances are told apart by the object's appearance only. Views:

* **query**: mild viewpoint change, the object large; ``bbx`` is the box around the object;
* **easy**: mild perspective warp, rotation, scale and lighting change;
* **hard**: strong warp, small or large scale, strong lighting change and shadow, blur, partial
  occlusion by clutter;
* **junk**: barely visible: tiny, heavily occluded or mostly outside the frame;
* **distractors**: scenes without any test instance (often with another, unrelated object).

Query images are only in ``qimlist`` (as in ROxford5k); database names are opaque and shuffled, so
nothing but the pixels tells an image's instance. The training instances are disjoint from the
test instances. Every image is generated from its own seed stream, so the output does not depend
on generation order; the same parameters give byte-identical files (same numpy/Pillow/libjpeg).

Difficulty (seed 0, defaults, single scale 128 px, measured on 2 CPU cores): chance is about 1.5 %
mAP (Medium); the randomly initialised ``dtop_tiny`` / ``cls_tiny`` score about 4 %, a colour
histogram of the whole image about 9 %, and ``dtop_tiny`` trained 4 minutes from scratch on the
training split (normalised softmax, scale 16, no margin, AdamW 3e-4, batch 32 at 128 px, random
crops) about 16 % (Hard: 2 % untrained, 10 % trained). More training instances help more than more
views per instance.

Generation is idempotent: a finished benchmark records its parameters in ``synthetic.json`` in both
folders and is not regenerated for the same parameters. A run builds into a hidden temporary folder
and moves the result into place at the end, so a killed run never leaves a half-made benchmark.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dtop.errors import DataError

GENERATOR_VERSION = 1
"""Bumped whenever the generated pixels or layout change (part of the idempotence marker)."""

GENERATOR_ID = "dtop.data.synthetic"
"""The generator's name in the marker file: an on-disk identifier, kept as earlier versions wrote it."""

MARKER = "synthetic.json"
"""File in the benchmark and training folders that records the generation parameters."""

DEFAULT_NAME = "dtop-mini"

# One shared palette for objects, clutter and backgrounds, so that colour alone does not identify
# an instance: instances differ in the arrangement of colours, shapes, patterns and glyphs.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (200, 40, 40), (230, 120, 30), (235, 200, 50), (60, 150, 60), (30, 110, 170), (80, 60, 160),
    (170, 60, 140), (240, 240, 230), (30, 30, 35), (120, 120, 125), (150, 100, 60), (200, 170, 130),
    (90, 170, 190), (170, 200, 90), (120, 30, 40), (40, 70, 60),
)
_WALLS = (7, 9, 10, 11, 14, 15, 0, 4, 2)
_ASPECTS = ((4, 3), (3, 4), (1, 1), (3, 2), (2, 3))
_KINDS = ("facade", "emblem", "panel")

# Seed-stream tags: every image / object has its own stream [seed, tag, index, ...].
_T_OBJECT, _T_TRAIN, _T_QUERY, _T_DB, _T_DISTRACTOR, _T_ORDER = 1, 2, 3, 4, 5, 6
# Object index spaces: training instances 0.., test instances from _TEST_BASE, distractor objects from
# _DISTRACTOR_OBJECT_BASE, so the test split does not change with the size of the training split.
_TEST_BASE = 500_000
_DISTRACTOR_OBJECT_BASE = 1_000_000


@dataclass(frozen=True)
class SyntheticParams:
    """Everything that determines a generated benchmark (recorded in the marker file)."""

    name: str = DEFAULT_NAME
    seed: int = 0
    n_train_instances: int = 150
    n_test_instances: int = 35
    train_views: int = 6
    queries_per_instance: int = 2
    n_easy: int = 3
    n_hard: int = 2
    n_junk: int = 1
    n_distractors: int = 150
    image_size: int = 192
    jpeg_quality: int = 90

    def validate(self) -> None:
        """Raise :class:`~dtop.errors.DataError` for values that cannot make a benchmark."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise DataError(f"benchmark name {self.name!r} must be a plain folder name (letters, digits, _ . -)")
        if self.name.lower() in ("roxford5k", "rparis6k", "revisitop1m"):
            raise DataError(f"benchmark name {self.name!r} is an official dataset's name; choose another")
        positive = {
            "n_train_instances": self.n_train_instances, "n_test_instances": self.n_test_instances,
            "train_views": self.train_views, "queries_per_instance": self.queries_per_instance,
        }
        for key, value in positive.items():
            if int(value) < 1:
                raise DataError(f"{key} must be at least 1, got {value}")
        for key in ("n_easy", "n_hard", "n_junk", "n_distractors"):
            if int(getattr(self, key)) < 0:
                raise DataError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.n_easy + self.n_hard < 1:
            raise DataError("each query needs a positive: n_easy + n_hard must be at least 1")
        if self.n_train_instances > _TEST_BASE or self.n_test_instances > _DISTRACTOR_OBJECT_BASE - _TEST_BASE:
            raise DataError(f"at most {_TEST_BASE} training and test instances each")
        if not 64 <= self.image_size <= 1024:
            raise DataError(f"image_size (longer side in pixels) must be in 64..1024, got {self.image_size}")
        if not 50 <= self.jpeg_quality <= 100:
            raise DataError(f"jpeg_quality must be in 50..100, got {self.jpeg_quality}")


# ----------------------------------------------------------------------------------------------
# Small drawing helpers
# ----------------------------------------------------------------------------------------------


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _colour(rng: np.random.Generator, exclude: tuple[int, ...] = ()) -> tuple[int, int, int]:
    choices = [i for i in range(len(PALETTE)) if i not in exclude]
    return PALETTE[int(rng.choice(choices))]


def _shade(c: tuple[int, int, int], k: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(v * k, 0, 255)) for v in c)  # type: ignore[return-value]


def _index(c: tuple[int, int, int]) -> int:
    return PALETTE.index(c) if c in PALETTE else -1


def _regular_polygon(cx: float, cy: float, r: float, n: int, phase: float, inner: float = 1.0) -> list[tuple]:
    pts = []
    steps = n * (2 if inner < 1.0 else 1)
    for i in range(steps):
        rr = r if (inner >= 1.0 or i % 2 == 0) else r * inner
        a = phase + 2 * math.pi * i / steps
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, float, float, float], fill: tuple,
           rng: np.random.Generator, outline: tuple | None = None) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 2
    width = max(1, int(r / 8))
    if kind == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif kind == "rect":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif kind == "triangle":
        draw.polygon(_regular_polygon(cx, cy, r, 3, -math.pi / 2 + float(rng.uniform(-0.3, 0.3))), fill=fill,
                     outline=outline)
    elif kind == "star":
        n = int(rng.integers(5, 9))
        draw.polygon(_regular_polygon(cx, cy, r, n, float(rng.uniform(0, 1)), inner=0.45), fill=fill, outline=outline)
    elif kind == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, float(rng.uniform(0, 1))), fill=fill, outline=outline)
    elif kind == "cross":
        t = r * 0.35
        draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)
        draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill, outline=outline)


_FG_SHAPES = ("circle", "rect", "triangle", "star", "hexagon", "cross", "ring", "diamond")


def _alphabet() -> list[list[tuple[tuple[float, float], tuple[float, float]]]]:
    """A fixed 'font' of 32 stroke glyphs on a 3x5 lattice (the same for every seed)."""
    rng = _rng(7, 31337)
    lattice = [(x / 2, y / 4) for x in range(3) for y in range(5)]
    glyphs = []
    for _ in range(32):
        strokes = []
        for _ in range(int(rng.integers(2, 5))):
            a, b = rng.choice(len(lattice), size=2, replace=False)
            strokes.append((lattice[int(a)], lattice[int(b)]))
        glyphs.append(strokes)
    return glyphs


_GLYPHS = _alphabet()


def _glyph_text(draw: ImageDraw.ImageDraw, x: float, y: float, height: float, text: list[int], fill: tuple) -> float:
    """Draw glyphs ``text`` (indices into the alphabet) from (x, y); return the x after the last."""
    w = height * 0.55
    stroke = max(1, int(round(height / 7)))
    for g in text:
        for (ax, ay), (bx, by) in _GLYPHS[g]:
            draw.line((x + ax * w, y + ay * height, x + bx * w, y + by * height), fill=fill, width=stroke)
        x += w * 1.45
    return x


def _pattern(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], kind: str, colour: tuple,
             rng: np.random.Generator) -> None:
    """Fill ``box`` with a pattern (drawn over whatever is there; clip with a mask afterwards)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    step = float(rng.uniform(0.07, 0.16)) * max(w, h)
    if kind == "stripes":
        angle = float(rng.choice([0.0, math.pi / 4, math.pi / 2, -math.pi / 4, math.pi / 6]))
        dx, dy = math.cos(angle), math.sin(angle)
        span = w + h
        width = max(1, int(step * float(rng.uniform(0.25, 0.5))))
        k = -span
        while k < span:
            cx, cy = x0 + w / 2 + (-dy) * k, y0 + h / 2 + dx * k
            draw.line((cx - dx * span, cy - dy * span, cx + dx * span, cy + dy * span), fill=colour, width=width)
            k += step
    elif kind == "checker":
        nx, ny = max(2, int(w / step)), max(2, int(h / step))
        for i in range(nx):
            for j in range(ny):
                if (i + j) % 2 == 0:
                    draw.rectangle((x0 + i * w / nx, y0 + j * h / ny, x0 + (i + 1) * w / nx, y0 + (j + 1) * h / ny),
                                   fill=colour)
    elif kind == "dots":
        r = step * 0.25
        yy = y0 + step / 2
        row = 0
        while yy < y1:
            xx = x0 + step / 2 + (step / 2 if row % 2 else 0)
            while xx < x1:
                draw.ellipse((xx - r, yy - r, xx + r, yy + r), fill=colour)
                xx += step
            yy += step
            row += 1
    elif kind == "rings":
        cx, cy = x0 + w / 2, y0 + h / 2
        rr = max(w, h) * 0.75
        width = max(1, int(step * 0.3))
        while rr > step / 2:
            draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), outline=colour, width=width)
            rr -= step


# ----------------------------------------------------------------------------------------------
# Instances (objects)
# ----------------------------------------------------------------------------------------------

_CANON = 256  # canonical object resolution (longer side), downscaled per view


def _render_facade(rng: np.random.Generator) -> Image.Image:
    w = int(rng.integers(150, _CANON + 1))
    h = int(rng.integers(150, _CANON + 1))
    img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    wall = PALETTE[int(rng.choice(_WALLS))]
    trim = _colour(rng, exclude=(_index(wall),))
    roof = int(rng.integers(0, 5))
    top = int(h * (0.22 if roof in (1, 2, 3) else 0.06))
    d.rectangle((0, top, w - 1, h - 1), fill=wall)
    if roof == 1:  # gable
        d.polygon([(0, top), (w / 2, 0), (w - 1, top)], fill=trim)
    elif roof == 2:  # dome
        d.ellipse((w * 0.25, 0, w * 0.75, top * 2), fill=trim)
        d.rectangle((0, top - 4, w - 1, top + 3), fill=_shade(trim, 0.7))
    elif roof == 3:  # stepped
        d.rectangle((w * 0.15, top * 0.45, w * 0.85, top), fill=wall)
        d.rectangle((w * 0.35, 0, w * 0.65, top * 0.45), fill=trim)
    elif roof == 4:  # towers
        tw = w * float(rng.uniform(0.12, 0.2))
        d.rectangle((0, 0, tw, top + 2), fill=trim)
        d.rectangle((w - 1 - tw, 0, w - 1, top + 2), fill=trim)
    d.rectangle((0, top, w - 1, top + max(3, h // 30)), fill=_shade(trim, 0.85))
    texture = int(rng.integers(0, 3))
    if texture == 1:  # brick courses
        for y in range(top + 6, h, int(rng.integers(6, 11))):
            d.line((0, y, w, y), fill=_shade(wall, 0.82), width=1)
    elif texture == 2:  # pilasters
        n = int(rng.integers(3, 7))
        for i in range(n + 1):
            x = i * (w - 1) / n
            d.rectangle((x - 3, top, x + 3, h - 1), fill=_shade(wall, 0.88))
    rows, cols = int(rng.integers(2, 6)), int(rng.integers(2, 7))
    glass = _colour(rng, exclude=(_index(wall),))
    lit = _colour(rng, exclude=(_index(wall), _index(glass)))
    frame = _shade(trim, 0.6)
    shape = str(rng.choice(["rect", "arch", "round", "tall"]))
    door_col = int(rng.integers(0, cols))
    lit_mask = rng.random((rows, cols)) < float(rng.uniform(0.1, 0.45))
    body_h = h - top
    cell_w, cell_h = w / cols, body_h * 0.8 / rows
    for r in range(rows):
        for c in range(cols):
            if r == rows - 1 and c == door_col:
                continue
            cx = (c + 0.5) * cell_w
            cy = top + body_h * 0.08 + (r + 0.5) * cell_h
            ww = cell_w * (0.3 if shape == "tall" else 0.5)
            hh = cell_h * (0.75 if shape == "tall" else 0.55)
            box = (cx - ww / 2, cy - hh / 2, cx + ww / 2, cy + hh / 2)
            fill = lit if lit_mask[r, c] else glass
            if shape == "round":
                d.ellipse(box, fill=fill, outline=frame, width=2)
            else:
                d.rectangle(box, fill=fill, outline=frame, width=2)
                if shape == "arch":
                    d.ellipse((box[0], box[1] - ww / 2, box[2], box[1] + ww / 2), fill=fill, outline=frame, width=2)
    dx = (door_col + 0.5) * cell_w
    dw = cell_w * 0.32
    d.rectangle((dx - dw, h - cell_h * 1.1, dx + dw, h - 1), fill=_shade(trim, 0.55))
    if rng.random() < 0.6:  # a sign with glyphs over the door
        text = [int(g) for g in rng.integers(0, len(_GLYPHS), size=int(rng.integers(3, 7)))]
        sh = max(8.0, cell_h * 0.3)
        sw = len(text) * sh * 0.55 * 1.45 + sh * 0.4
        sx = float(np.clip(dx - sw / 2, 2, w - sw - 2))
        sy = h - cell_h * 1.1 - sh * 1.5
        sign = _colour(rng, exclude=(_index(wall),))
        d.rectangle((sx, sy, sx + sw, sy + sh * 1.3), fill=sign)
        _glyph_text(d, sx + sh * 0.25, sy + sh * 0.15, sh, text, PALETTE[7] if sum(sign) < 380 else PALETTE[8])
    return img


def _render_emblem(rng: np.random.Generator) -> Image.Image:
    size = _CANON
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    base_kind = str(rng.choice(["circle", "rect", "hexagon", "diamond", "shield"]))
    base = _colour(rng)
    second = _colour(rng, exclude=(_index(base),))
    mask = Image.new("L", (size, size), 0)
    md = ImageDraw.Draw(mask)
    box = (4, 4, size - 5, size - 5)
    if base_kind == "circle":
        md.ellipse(box, fill=255)
    elif base_kind == "rect":
        md.rounded_rectangle(box, radius=int(rng.integers(0, 50)), fill=255)
    elif base_kind == "hexagon":
        md.polygon(_regular_polygon(size / 2, size / 2, size / 2 - 4, 6, float(rng.uniform(0, 1))), fill=255)
    elif base_kind == "diamond":
        md.polygon([(size / 2, 4), (size - 5, size / 2), (size / 2, size - 5), (4, size / 2)], fill=255)
    else:  # shield
        md.polygon([(4, 4), (size - 5, 4), (size - 5, size * 0.55), (size / 2, size - 5), (4, size * 0.55)], fill=255)
    layer = Image.new("RGBA", (size, size), base + (255,))
    ld = ImageDraw.Draw(layer)
    pattern = str(rng.choice(["stripes", "checker", "dots", "rings", "none"]))
    if pattern != "none":
        _pattern(ld, (0, 0, size, size), pattern, second, rng)
    n = int(rng.integers(2, 5))
    for _ in range(n):
        r = float(rng.uniform(0.12, 0.3)) * size
        cx, cy = rng.uniform(0.28, 0.72, size=2) * size
        kind = str(rng.choice(_FG_SHAPES))
        fill = _colour(rng, exclude=(_index(base),)) + (255,)
        _shape(ld, kind, (cx - r, cy - r, cx + r, cy + r), fill, rng, outline=PALETTE[8] + (255,))
    if rng.random() < 0.7:
        text = [int(g) for g in rng.integers(0, len(_GLYPHS), size=int(rng.integers(3, 6)))]
        gh = size * 0.1
        tw = len(text) * gh * 0.55 * 1.45
        ty = size * float(rng.choice([0.12, 0.74]))
        ld.rectangle((size / 2 - tw / 2 - 6, ty - 5, size / 2 + tw / 2 + 4, ty + gh + 5), fill=PALETTE[7] + (255,))
        _glyph_text(ld, size / 2 - tw / 2, ty, gh, text, PALETTE[8] + (255,))
    img.paste(layer, (0, 0), mask)
    border = _colour(rng)
    od = ImageDraw.Draw(img)
    width = int(rng.integers(4, 10))
    if base_kind == "circle":
        od.ellipse(box, outline=border + (255,), width=width)
    elif base_kind == "rect":
        od.rectangle(box, outline=border + (255,), width=width)
    return img


def _render_panel(rng: np.random.Generator) -> Image.Image:
    wide = rng.random() < 0.7
    ratio = float(rng.uniform(1.3, 2.2))
    w, h = (_CANON, int(_CANON / ratio)) if wide else (int(_CANON / ratio), _CANON)
    bg = _colour(rng)
    ink = PALETTE[8] if sum(bg) > 380 else PALETTE[7]
    img = Image.new("RGBA", (w, h), bg + (255,))
    d = ImageDraw.Draw(img)
    header = rng.random() < 0.6
    y = 8.0
    if header:
        hc = _colour(rng, exclude=(_index(bg),))
        hh = h * float(rng.uniform(0.18, 0.3))
        d.rectangle((0, 0, w, hh), fill=hc + (255,))
        if rng.random() < 0.5:
            _pattern(d, (0, 0, w, hh), "stripes", _shade(hc, 0.7) + (255,), rng)
        y = hh + 6
    icon = rng.random() < 0.7
    x_text = 10.0
    if icon:
        r = min(h - y, w) * float(rng.uniform(0.18, 0.3))
        _shape(d, str(rng.choice(_FG_SHAPES)), (10, y + 4, 10 + 2 * r, y + 4 + 2 * r),
               _colour(rng, exclude=(_index(bg),)) + (255,), rng)
        x_text = 10 + 2 * r + 10
    lines = int(rng.integers(2, 4))
    gh = (h - y - 8) / (lines * 1.4)
    for _ in range(lines):
        n = int(max(2, min(8, (w - x_text - 6) / (gh * 0.8))))
        text = [int(g) for g in rng.integers(0, len(_GLYPHS), size=int(rng.integers(2, n + 1)))]
        _glyph_text(d, x_text, y + gh * 0.2, gh, text, ink + (255,))
        y += gh * 1.4
    border = _colour(rng, exclude=(_index(bg),))
    d.rectangle((0, 0, w - 1, h - 1), outline=border + (255,), width=int(rng.integers(3, 8)))
    return img


def render_instance(seed: int, instance: int) -> Image.Image:
    """The canonical RGBA image of instance ``instance`` of the benchmark with ``seed`` (transparent around)."""
    rng = _rng(seed, _T_OBJECT, instance)
    kind = _KINDS[int(rng.integers(0, len(_KINDS)))]
    return {"facade": _render_facade, "emblem": _render_emblem, "panel": _render_panel}[kind](rng)


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------


def _canvas_size(rng: np.random.Generator, long_side: int) -> tuple[int, int]:
    a, b = _ASPECTS[int(rng.integers(0, len(_ASPECTS)))]
    if a >= b:
        return long_side, max(16, int(round(long_side * b / a)))
    return max(16, int(round(long_side * a / b))), long_side


def _noise(rng: np.random.Generator, size: tuple[int, int], cells: int, amount: float) -> np.ndarray:
    w, h = size
    small = (rng.random((max(2, h // cells), max(2, w // cells))) * 255).astype(np.uint8)
    big = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    return (np.asarray(big, dtype=np.float32) / 255.0 - 0.5) * amount


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    kind = int(rng.integers(0, 3))
    arr = np.empty((h, w, 3), dtype=np.float32)
    if kind == 0:  # outdoor: sky gradient over ground
        sky_top = np.array(_colour(rng), np.float32) * 0.4 + np.array([150, 180, 220], np.float32) * 0.6
        sky_bottom = sky_top * 0.6 + 255 * 0.4
        horizon = int(h * float(rng.uniform(0.45, 0.8)))
        t = np.linspace(0, 1, max(1, horizon), dtype=np.float32)[:, None, None]
        arr[:horizon] = sky_top * (1 - t) + sky_bottom * t
        ground = np.array(_colour(rng), np.float32) * 0.5 + 60
        arr[horizon:] = ground
        arr[horizon:] += _noise(rng, size, 6, 60)[horizon:, :, None]
    elif kind == 1:  # indoor wall with a faint pattern
        arr[:] = np.array(_colour(rng), np.float32) * 0.6 + 70
        arr += _noise(rng, size, 24, 40)[:, :, None]
    else:  # coloured low-frequency texture around a base colour
        base = np.array(_colour(rng), np.float32) * 0.5 + 64
        cells = int(rng.integers(8, 32))
        for c in range(3):
            arr[:, :, c] = base[c] + _noise(rng, size, cells, 110)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    if kind == 1 and rng.random() < 0.6:
        _pattern(d, (0, 0, w, h), str(rng.choice(["stripes", "dots"])), _shade(tuple(int(v) for v in arr[0, 0]), 0.9),
                 rng)
    if kind == 0 and rng.random() < 0.7:  # far silhouettes
        for _ in range(int(rng.integers(2, 6))):
            bw, bh = float(rng.uniform(0.08, 0.25)) * w, float(rng.uniform(0.1, 0.35)) * h
            x = float(rng.uniform(-0.1, 1.0)) * w
            c = _shade(_colour(rng), float(rng.uniform(0.4, 0.7)))
            d.rectangle((x, horizon - bh, x + bw, horizon), fill=c)
    return img


def _clutter(img: Image.Image, rng: np.random.Generator, n: int) -> None:
    """Random shapes in muted colours of the shared palette (so colours and shapes alone identify nothing)."""
    w, h = img.size
    d = ImageDraw.Draw(img)
    for _ in range(n):
        r = float(rng.uniform(0.03, 0.11)) * max(w, h)
        cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        kind = str(rng.choice([*_FG_SHAPES, "rect", "rect", "pole"]))
        # Muted (mixed with grey, darker): clutter looks like scenery, not like another instance.
        c = _colour(rng)
        fill = _shade(tuple(int(0.6 * v + 0.4 * 128) for v in c), float(rng.uniform(0.55, 0.85)))  # type: ignore[arg-type]
        if kind == "pole":
            t = r * 0.15
            d.rectangle((cx - t, cy - 2 * r, cx + t, h), fill=fill)
        else:
            _shape(d, kind, (cx - r, cy - r * float(rng.uniform(0.5, 1.5)), cx + r, cy + r), fill, rng)


def _perspective_coeffs(out_pts: np.ndarray, in_pts: np.ndarray) -> tuple[float, ...]:
    """PIL ``PERSPECTIVE`` coefficients mapping output points to input points (4 correspondences)."""
    a = np.zeros((8, 8), dtype=np.float64)
    b = np.zeros(8, dtype=np.float64)
    for i, ((x, y), (u, v)) in enumerate(zip(out_pts, in_pts)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * i], b[2 * i + 1] = u, v
    return tuple(float(c) for c in np.linalg.solve(a, b))


@dataclass
class _View:
    """How an instance appears in one scene."""

    scale: float  # object's longer side relative to the canvas' longer side
    rotation: float  # degrees
    warp: float  # perspective strength (fraction of the object size)
    brightness: tuple[float, float]
    gain: float  # per-channel colour change
    shadow: float  # depth of a linear shadow across the object
    blur: float
    occlusion: tuple[float, float]  # wanted occluded fraction of the object (0, 0: none)
    centre: str  # "inside" (whole object in the frame) or "cut" (mostly outside)


_VIEWS: dict[str, Callable[[np.random.Generator], _View]] = {
    "query": lambda r: _View(float(r.uniform(0.55, 0.75)), float(r.uniform(-6, 6)), float(r.uniform(0.0, 0.06)),
                             (0.9, 1.1), 0.05, 0.0, 0.0, (0, 0), "inside"),
    "easy": lambda r: _View(float(r.uniform(0.45, 0.8)), float(r.uniform(-10, 10)), float(r.uniform(0.03, 0.1)),
                            (0.75, 1.25), 0.1, float(r.uniform(0, 0.15)), 0.0, (0, 0.08), "inside"),
    "hard": lambda r: _View(float(r.choice([r.uniform(0.2, 0.32), r.uniform(0.8, 0.95)])), float(r.uniform(-28, 28)),
                            float(r.uniform(0.14, 0.24)), (0.45, 1.6), 0.2, float(r.uniform(0.2, 0.5)),
                            float(r.choice([0.0, 0.0, 0.8, 1.2])), (0.2, 0.45) if r.random() < 0.7 else (0, 0),
                            "inside"),
}


def _junk_view(r: np.random.Generator) -> _View:
    mode = int(r.integers(0, 3))
    if mode == 0:  # tiny
        return _View(float(r.uniform(0.07, 0.11)), float(r.uniform(-20, 20)), 0.1, (0.6, 1.3), 0.15, 0.2, 0.0,
                     (0, 0), "inside")
    if mode == 1:  # heavily occluded
        return _View(float(r.uniform(0.35, 0.6)), float(r.uniform(-20, 20)), 0.15, (0.6, 1.3), 0.15, 0.3, 0.0,
                     (0.72, 0.88), "inside")
    return _View(float(r.uniform(0.4, 0.65)), float(r.uniform(-20, 20)), 0.15, (0.6, 1.3), 0.15, 0.3, 0.0,
                 (0, 0), "cut")


_VIEWS["junk"] = _junk_view
_VIEWS["train"] = lambda r: _VIEWS[str(r.choice(["query", "easy", "easy", "hard"]))](r)


def _place(obj: Image.Image, canvas: tuple[int, int], view: _View,
           rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, float]:
    """Warp ``obj`` into a canvas-sized RGBA layer; also return the destination quad (4, 2) and the
    fraction of the object's rectangle that the object covers."""
    cw, ch = canvas
    ow, oh = obj.size
    k = view.scale * max(cw, ch) / max(ow, oh)
    sw, sh = max(4, int(round(ow * k))), max(4, int(round(oh * k)))
    # Downscale with antialiasing first (transform itself does not filter when shrinking); premultiplied
    # alpha keeps the edges free of dark fringes.
    small = obj.convert("RGBa").resize((sw, sh), Image.LANCZOS)
    half = np.array([[-sw, -sh], [sw, -sh], [sw, sh], [-sw, sh]], dtype=np.float64) / 2
    # Perspective: one side shorter (yaw or pitch), plus jitter of each corner.
    p = view.warp * float(rng.uniform(0.6, 1.4))
    if rng.random() < 0.5:
        side = 0 if rng.random() < 0.5 else 1
        idx = [0, 3] if side == 0 else [1, 2]
        half[idx, 1] *= 1 - 1.6 * p
    else:
        side = 0 if rng.random() < 0.5 else 1
        idx = [0, 1] if side == 0 else [3, 2]
        half[idx, 0] *= 1 - 1.6 * p
    half += rng.uniform(-1, 1, size=(4, 2)) * p * 0.35 * np.array([sw, sh])
    a = math.radians(view.rotation)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    quad = half @ rot.T
    qw = quad[:, 0].max() - quad[:, 0].min()
    qh = quad[:, 1].max() - quad[:, 1].min()
    if view.centre == "inside" and (qw > cw - 2 or qh > ch - 2):  # shrink to fit the frame
        k = min((cw - 2) / qw, (ch - 2) / qh)
        quad, qw, qh = quad * k, qw * k, qh * k
    if view.centre == "cut":  # centre outside the frame so that 15-35% of the object shows
        edge = int(rng.integers(0, 4))
        frac = float(rng.uniform(0.15, 0.35))
        cx, cy = float(rng.uniform(qw / 2, max(qw / 2 + 1, cw - qw / 2))), float(rng.uniform(qh / 2, max(qh / 2 + 1,
                                                                                                        ch - qh / 2)))
        if edge == 0:
            cx = -qw / 2 + frac * qw
        elif edge == 1:
            cx = cw + qw / 2 - frac * qw
        elif edge == 2:
            cy = -qh / 2 + frac * qh
        else:
            cy = ch + qh / 2 - frac * qh
    else:
        mx, my = qw / 2 + 1, qh / 2 + 1
        cx = float(rng.uniform(mx, cw - mx)) if cw - mx > mx else cw / 2
        cy = float(rng.uniform(my, ch - my)) if ch - my > my else ch / 2
    quad = quad - (quad.min(0) + quad.max(0)) / 2 + np.array([cx, cy])
    src = np.array([[0, 0], [sw, 0], [sw, sh], [0, sh]], dtype=np.float64)
    coeffs = _perspective_coeffs(quad, src)
    layer = small.transform((cw, ch), Image.PERSPECTIVE, coeffs, Image.BICUBIC).convert("RGBA")
    coverage = float((np.asarray(small)[:, :, 3] > 127).mean())  # object pixels / its rectangle
    return layer, quad, coverage


def _light(layer: Image.Image, view: _View, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(layer, dtype=np.float32).copy()
    rgb = arr[:, :, :3]
    lo, hi = view.brightness
    gains = float(rng.uniform(lo, hi)) * (1 + rng.uniform(-view.gain, view.gain, size=3))
    contrast = float(rng.uniform(0.8, 1.2))
    rgb = (rgb - 128) * contrast + 128
    rgb = rgb * gains.astype(np.float32)
    if view.shadow > 0:
        h, w = rgb.shape[:2]
        a = float(rng.uniform(0, 2 * math.pi))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (xx / w - 0.5) * math.cos(a) + (yy / h - 0.5) * math.sin(a) + 0.5
        rgb = rgb * (1 - view.shadow * np.clip(t, 0, 1))[:, :, None]
    arr[:, :, :3] = rgb
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGBA")


def _occlude(img: Image.Image, obj_mask: np.ndarray, want: tuple[float, float], rng: np.random.Generator) -> float:
    """Draw occluders over the object until the occluded fraction is in ``want``; return the fraction."""
    w, h = img.size
    area = float(obj_mask.sum())
    if area <= 0 or want[1] <= 0:
        return 0.0
    ys, xs = np.nonzero(obj_mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    target = float(rng.uniform(*want))
    best, best_frac = None, 0.0
    for _ in range(8):
        mask = Image.new("L", (w, h), 0)
        md = ImageDraw.Draw(mask)
        kind = int(rng.integers(0, 3))
        bw, bh = (x1 - x0), (y1 - y0)
        if kind == 0:  # a wall/panel from one side
            side = int(rng.integers(0, 4))
            f = target * float(rng.uniform(0.9, 1.2))
            box = [(x0, y0, x0 + bw * f, y1), (x1 - bw * f, y0, x1, y1), (x0, y0, x1, y0 + bh * f),
                   (x0, y1 - bh * f, x1, y1)][side]
            md.rectangle(box, fill=255)
        elif kind == 1:  # a blob (tree, person, car) over the object
            r = math.sqrt(target * bw * bh / math.pi) * float(rng.uniform(0.95, 1.2))
            cx, cy = float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))
            md.ellipse((cx - r, cy - r * 1.2, cx + r, cy + r * 1.2), fill=255)
        else:  # poles / branches
            n = int(rng.integers(2, 5))
            t = max(2.0, target * bw / n)
            for _ in range(n):
                cx = float(rng.uniform(x0, x1))
                md.rectangle((cx - t / 2, 0, cx + t / 2, h), fill=255)
        m = np.asarray(mask) > 127
        frac = float((m & obj_mask).sum()) / area
        if best is None or abs(frac - target) < abs(best_frac - target):
            best, best_frac = mask, frac
    colour = Image.new("RGB", (w, h), _shade(_colour(rng), float(rng.uniform(0.5, 0.9))))
    texture = Image.fromarray(np.clip(128 + _noise(rng, (w, h), 4, 90), 0, 255).astype(np.uint8), "L")
    colour = Image.composite(colour, Image.merge("RGB", (texture,) * 3), Image.new("L", (w, h), 190))
    img.paste(colour, (0, 0), best)
    return best_frac


def _scene(obj: Image.Image | None, kind: str, rng: np.random.Generator, long_side: int) -> tuple[Image.Image,
                                                                                                  dict[str, Any]]:
    """One scene: background, clutter, the object seen as ``kind`` (or none), global lighting, noise."""
    size = _canvas_size(rng, long_side)
    img = _background(rng, size)
    _clutter(img, rng, int(rng.integers(2, 6)))
    info: dict[str, Any] = {"kind": kind}
    if obj is not None:
        view = _VIEWS[kind](rng)
        for _ in range(6):  # "cut" views: place again until a recognisable part (>= 12 %) is in the frame
            layer, quad, coverage = _place(obj, size, view, rng)
            obj_mask = np.asarray(layer)[:, :, 3] > 127
            full = max(1.0, _polygon_area(quad) * coverage)  # object pixels if it were all in the frame
            visible = min(1.0, float(obj_mask.sum()) / full)
            if visible >= 0.12:
                break
        layer = _light(layer, view, rng)
        img.paste(layer.convert("RGB"), (0, 0), layer.getchannel("A"))
        occluded = _occlude(img, obj_mask, view.occlusion, rng) if view.occlusion[1] > 0 else 0.0
        info["visible"] = round(visible * (1 - occluded), 3)  # fraction of the object that shows
        info["area"] = round(float(obj_mask.sum()) * (1 - occluded) / (size[0] * size[1]), 4)  # of the image
        ys, xs = np.nonzero(obj_mask)
        if len(xs):
            x1, y1 = max(0, int(xs.min()) - 2), max(0, int(ys.min()) - 2)
            x2, y2 = min(size[0], int(xs.max()) + 3), min(size[1], int(ys.max()) + 3)
            info["bbx"] = [float(x1), float(y1), float(x2), float(y2)]
        if view.blur > 0:
            img = img.filter(ImageFilter.GaussianBlur(view.blur))
    # Global lighting and sensor noise.
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * float(rng.uniform(0.85, 1.15)) + rng.normal(0, 3.0, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), info


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------


def _marker(params: SyntheticParams) -> dict[str, Any]:
    return {"generator": GENERATOR_ID, "version": GENERATOR_VERSION, "params": asdict(params)}


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_ours(folder: Path) -> bool:
    m = _read_marker(folder)
    return isinstance(m, dict) and m.get("generator") == GENERATOR_ID


def _build(params: SyntheticParams, test_dir: Path, train_dir: Path) -> dict[str, Any]:
    """Generate everything into ``test_dir`` and ``train_dir`` (both new); return the counts."""
    seed, long_side, quality = params.seed, params.image_size, params.jpeg_quality
    jpg = test_dir / "jpg"
    jpg.mkdir(parents=True)
    train_dir.mkdir(parents=True)
    rows: list[tuple[str, int]] = []
    for c in range(params.n_train_instances):
        obj = render_instance(seed, c)
        cls = f"{c:04d}"
        (train_dir / cls).mkdir()
        for v in range(params.train_views):
            img, _ = _scene(obj, "train", _rng(seed, _T_TRAIN, c, v), long_side)
            rel = f"{cls}/{cls}_{v:02d}.jpg"
            (train_dir / rel).write_bytes(_jpeg(img, quality))
            rows.append((rel, c))
    with open(train_dir / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label"])
        writer.writerows(rows)

    # Test split: database views per instance, then distractors; shuffled, opaque names.
    first = _TEST_BASE
    db_items: list[tuple[int, str, Image.Image, dict[str, Any]]] = []  # (instance or -1, kind, image, info)
    queries: list[tuple[int, Image.Image, dict[str, Any]]] = []
    kinds = ["easy"] * params.n_easy + ["hard"] * params.n_hard + ["junk"] * params.n_junk
    for t in range(params.n_test_instances):
        inst = first + t
        obj = render_instance(seed, inst)
        for q in range(params.queries_per_instance):
            img, info = _scene(obj, "query", _rng(seed, _T_QUERY, inst, q), long_side)
            queries.append((inst, img, info))
        for v, kind in enumerate(kinds):
            img, info = _scene(obj, kind, _rng(seed, _T_DB, inst, v), long_side)
            db_items.append((inst, kind, img, info))
    for j in range(params.n_distractors):
        rng = _rng(seed, _T_DISTRACTOR, j)
        obj = render_instance(seed, _DISTRACTOR_OBJECT_BASE + j) if rng.random() < 0.7 else None
        img, info = _scene(obj, "easy", rng, long_side)
        db_items.append((-1, "distractor", img, {**info, "kind": "distractor"}))
    order = _rng(seed, _T_ORDER).permutation(len(db_items))
    imlist: list[str] = []
    position: dict[int, int] = {}
    images_meta: dict[str, Any] = {}
    for new, old in enumerate(order.tolist()):
        name = f"img_{new:05d}"
        imlist.append(name)
        position[old] = new
        inst, kind, img, info = db_items[old]
        (jpg / f"{name}.jpg").write_bytes(_jpeg(img, quality))
        images_meta[name] = {"instance": inst, "kind": kind, "size": list(img.size),
                             **{k: info[k] for k in ("visible", "area") if k in info}}
    qimlist, gnd = [], []
    for qi, (inst, img, info) in enumerate(queries):
        name = f"query_{qi:03d}"
        qimlist.append(name)
        (jpg / f"{name}.jpg").write_bytes(_jpeg(img, quality))
        entry: dict[str, Any] = {"bbx": info["bbx"]}
        for key in ("easy", "hard", "junk"):
            entry[key] = sorted(position[i] for i, (ii, k, _, _) in enumerate(db_items) if ii == inst and k == key)
        gnd.append(entry)
        images_meta[name] = {"instance": inst, "kind": "query", "size": list(img.size), "bbx": info["bbx"]}
    gnd_obj = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    (test_dir / f"gnd_{params.name}.pkl").write_bytes(pickle.dumps(gnd_obj, protocol=4))
    counts = {
        "train_instances": params.n_train_instances,
        "train_images": len(rows),
        "test_instances": params.n_test_instances,
        "queries": len(qimlist),
        "database": len(imlist),
        "distractors": params.n_distractors,
        "easy": sum(len(g["easy"]) for g in gnd[:: params.queries_per_instance]),
        "hard": sum(len(g["hard"]) for g in gnd[:: params.queries_per_instance]),
        "junk": sum(len(g["junk"]) for g in gnd[:: params.queries_per_instance]),
    }
    (test_dir / "images.json").write_text(json.dumps(images_meta, indent=None, sort_keys=True) + "\n",
                                          encoding="utf-8")
    return counts


def _result(root: Path, params: SyntheticParams, counts: dict[str, Any], generated: bool,
            seconds: float) -> dict[str, Any]:
    test_dir, train_dir = root / params.name, root / f"{params.name}-train"
    return {
        "root": str(root),
        "name": params.name,
        "dataset_dir": str(test_dir),
        "gnd": str(test_dir / f"gnd_{params.name}.pkl"),
        "images": str(test_dir / "jpg"),
        "train_dir": str(train_dir),
        "train_csv": str(train_dir / "train.csv"),
        "counts": dict(counts),
        "params": asdict(params),
        "generated": generated,
        "seconds": round(seconds, 3),
    }


def generate_benchmark(
    root: str | os.PathLike,
    name: str = DEFAULT_NAME,
    seed: int = 0,
    n_train_instances: int = 150,
    n_test_instances: int = 35,
    *,
    train_views: int = 6,
    queries_per_instance: int = 2,
    n_easy: int = 3,
    n_hard: int = 2,
    n_junk: int = 1,
    n_distractors: int = 150,
    image_size: int = 192,
    jpeg_quality: int = 90,
    force: bool = False,
) -> dict[str, Any]:
    """Generate the synthetic benchmark ``<root>/<name>`` and its training split ``<root>/<name>-train``.

    Defaults: 150 training instances × 6 views (900 images), 35 test instances × 2 queries (70
    queries), per instance 3 easy, 2 hard and 1 junk database image, 150 distractors (360 database
    images), longer side 192 px. Returns a dict with the paths (``dataset_dir``, ``gnd``, ``images``,
    ``train_dir``, ``train_csv``), ``counts``, ``params``, ``generated`` (False when a finished
    benchmark with the same parameters was found and kept) and ``seconds``.

    ``RevisitedDataset(root, name)`` reads the result. A folder in the way that this generator did
    not write is never deleted: that raises :class:`~dtop.errors.DataError`. ``force`` regenerates
    even when the parameters match.
    """
    params = SyntheticParams(
        name=str(name), seed=int(seed), n_train_instances=int(n_train_instances),
        n_test_instances=int(n_test_instances), train_views=int(train_views),
        queries_per_instance=int(queries_per_instance), n_easy=int(n_easy), n_hard=int(n_hard), n_junk=int(n_junk),
        n_distractors=int(n_distractors), image_size=int(image_size), jpeg_quality=int(jpeg_quality),
    )
    params.validate()
    root = Path(root)
    test_dir, train_dir = root / params.name, root / f"{params.name}-train"
    want = _marker(params)
    if not force:
        found = [_read_marker(d) for d in (test_dir, train_dir)]
        if all(isinstance(m, dict) and {k: m.get(k) for k in want} == want for m in found) and \
                (test_dir / f"gnd_{params.name}.pkl").is_file():
            return _result(root, params, found[0].get("counts", {}), False, 0.0)  # type: ignore[union-attr]
    for d in (test_dir, train_dir):
        if d.exists() and not _is_ours(d) and (not d.is_dir() or any(d.iterdir())):
            raise DataError(
                f"{d} exists and was not made by the synthetic benchmark generator (no {MARKER} in it); "
                "refusing to overwrite it. Choose another root or name, or move it away."
            )
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".{params.name}.partial"
    if work.exists():  # left by a killed run
        shutil.rmtree(work)
    work.mkdir()
    try:
        counts = _build(params, work / params.name, work / f"{params.name}-train")
        marker = {**want, "counts": counts}
        text = json.dumps(marker, indent=2, sort_keys=True) + "\n"
        for sub in (params.name, f"{params.name}-train"):
            (work / sub / MARKER).write_text(text, encoding="utf-8")
        # Move into place: the training split first, the benchmark (whose marker completes the pair) last.
        for sub, dest in ((f"{params.name}-train", train_dir), (params.name, test_dir)):
            if dest.exists():
                shutil.rmtree(dest)  # ours (checked above) or an empty folder
            os.replace(work / sub, dest)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return _result(root, params, counts, True, time.perf_counter() - start)


def load_image_meta(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Per-image metadata of a generated benchmark: ``{name: {instance, kind, size, visible?, area?, bbx?}}``.

    ``instance`` is -1 for distractors; ``kind`` is query, easy, hard, junk or distractor; ``visible``
    is the fraction of the object that shows, ``area`` the fraction of the image it covers.
    """
    path = Path(dataset_dir) / "images.json"
    if not path.is_file():
        raise DataError(f"{path} not found: {dataset_dir} is not a generated synthetic benchmark")
    return json.loads(path.read_text(encoding="utf-8"))
