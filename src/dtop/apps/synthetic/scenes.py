"""Scenes: an instance placed in a background with clutter, under a view (warp, light, occlusion)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dtop.apps.synthetic.drawing import _FG_SHAPES, _colour, _pattern, _shade, _shape
from dtop.apps.synthetic.params import _ASPECTS

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
    big = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
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
        corner = (int(arr[0, 0, 0]), int(arr[0, 0, 1]), int(arr[0, 0, 2]))
        _pattern(d, (0, 0, w, h), str(rng.choice(["stripes", "dots"])), _shade(corner, 0.9), rng)
    if kind == 0 and rng.random() < 0.7:  # far silhouettes
        for _ in range(int(rng.integers(2, 6))):
            bw, bh = float(rng.uniform(0.08, 0.25)) * w, float(rng.uniform(0.1, 0.35)) * h
            x = float(rng.uniform(-0.1, 1.0)) * w
            shade = _shade(_colour(rng), float(rng.uniform(0.4, 0.7)))
            d.rectangle((x, horizon - bh, x + bw, horizon), fill=shade)
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
    small = obj.convert("RGBa").resize((sw, sh), Image.Resampling.LANCZOS)
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
    layer = small.transform((cw, ch), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC).convert("RGBA")
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

