"""Contact sheets of search results: one PNG grid, one row per query (``dtop search --sheet``).

Layout and geometry: docs/report.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dtop.errors import ConfigError
from dtop.report.thumbnails import ThumbnailCache
from dtop.utils.io import atomic_path
from dtop.utils.paths import show_path

PAD = 8
"""Margin around and between tiles."""
SEPARATOR = 8
"""Extra gap between the query column and the results."""
CAPTION_HEIGHT = 30
"""Height of the two caption lines under each tile."""
BACKGROUND = (255, 255, 255)
TILE_BACKGROUND = (235, 235, 235)
QUERY_FRAME = (40, 90, 220)
TEXT = (20, 20, 20)
MIN_THUMB = 32
MAX_THUMB = 1024
MAX_SHEET_PIXELS = 200_000_000
"""Largest sheet (width × height; 600 MB of RGB): more queries or results than that need several sheets."""


def sheet_size(n_rows: int, n_cols: int, thumb: int = 160) -> tuple[int, int]:
    """``(width, height)`` of a sheet with ``n_rows`` queries and ``n_cols`` columns (query + results)."""
    separator = SEPARATOR if n_cols > 1 else 0
    width = PAD + n_cols * (thumb + PAD) + separator
    height = PAD + n_rows * (thumb + CAPTION_HEIGHT + PAD)
    return width, height


def check_sheet(n_rows: int, n_cols: int, thumb: int) -> None:
    """Refuse a thumbnail size outside ``MIN_THUMB..MAX_THUMB`` or a sheet over :data:`MAX_SHEET_PIXELS`
    (call it before the work that produces the results)."""
    if not MIN_THUMB <= int(thumb) <= MAX_THUMB:
        raise ConfigError(f"the thumbnail size must be {MIN_THUMB} to {MAX_THUMB} pixels, got {thumb} (--thumb)")
    width, height = sheet_size(n_rows, n_cols, int(thumb))
    if width * height > MAX_SHEET_PIXELS:
        raise ConfigError(
            f"a contact sheet of {n_rows} queries × {n_cols} tiles of {thumb} pixels would be {width}x{height} "
            f"pixels (more than {MAX_SHEET_PIXELS // 1_000_000} megapixels); use a smaller --thumb or --topk, or "
            "fewer queries per sheet"
        )


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """``text`` shortened from the left (with an ellipsis) so that it is at most ``width`` wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    for start in range(1, len(text)):
        candidate = "…" + text[start:]
        if draw.textlength(candidate, font=font) <= width:
            return candidate
    return "…"


def contact_sheet(
    query_paths: Sequence[str | os.PathLike],
    results: Sequence[tuple[Sequence[str | os.PathLike], Sequence[float]]],
    out_png: str | os.PathLike,
    thumb: int = 160,
    *,
    exif_transpose: bool = False,
) -> Path:
    """Write a PNG grid of ``query_paths`` and their ranked ``results`` to ``out_png`` (atomically).

    ``results[i]`` is ``(paths, scores)`` of query ``i``, best first (lists may be empty or of
    different lengths). ``thumb`` is the side of each tile's image square. ``exif_transpose``
    shows images upright the way the index extracted them (use the index's setting). Returns the
    path written; its pixel size is :func:`sheet_size` ``(len(query_paths), 1 + max k, thumb)``.
    Each image is scaled to fit its tile and centred; an unreadable one (deleted since it was
    indexed, say) becomes a grey tile captioned ``unreadable`` instead of failing the whole sheet.
    """
    if len(query_paths) != len(results):
        raise ConfigError(f"got {len(query_paths)} queries but {len(results)} result lists; give one list per query")
    if not query_paths:
        raise ConfigError("a contact sheet needs at least one query")
    thumb = int(thumb)
    rows: list[tuple[list[str], list[float]]] = []
    for i, (given_paths, given_scores) in enumerate(results):
        if len(given_paths) != len(given_scores):
            raise ConfigError(f"results of query {i}: {len(given_paths)} paths but {len(given_scores)} scores")
        rows.append(([str(p) for p in given_paths], [float(s) for s in given_scores]))
    n_cols = 1 + max(len(p) for p, _ in rows)
    check_sheet(len(rows), n_cols, thumb)
    sheet = Image.new("RGB", sheet_size(len(rows), n_cols, thumb), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    thumbs = ThumbnailCache(thumb, exif_transpose=exif_transpose, upscale=True)
    separator = SEPARATOR if n_cols > 1 else 0
    for r, (query, (paths, scores)) in enumerate(zip(query_paths, rows)):
        y = PAD + r * (thumb + CAPTION_HEIGHT + PAD)
        _tile(sheet, draw, font, thumbs, str(query), "query", PAD, y, thumb, frame=True)
        for j, (path, score) in enumerate(zip(paths, scores)):
            x = PAD + separator + (j + 1) * (thumb + PAD)
            _tile(sheet, draw, font, thumbs, path, f"#{j + 1}  {score:.4f}", x, y, thumb, frame=False)
        if n_cols > 1:  # a thin rule between the query and its results
            rule_x = PAD + thumb + PAD + separator // 2 - 1
            draw.line([(rule_x, y), (rule_x, y + thumb + CAPTION_HEIGHT - 4)], fill=(190, 190, 190), width=1)
    out = Path(out_png)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def _tile(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    thumbs: ThumbnailCache,
    path: str,
    label: str,
    x: int,
    y: int,
    thumb: int,
    frame: bool,
) -> None:
    """Draw one tile: the image letterboxed into its square, a frame for queries, two caption lines."""
    draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=TILE_BACKGROUND)
    img = thumbs.get(path)
    if img is None:
        text = "unreadable"
        w = draw.textlength(text, font=font)
        draw.text((x + (thumb - w) / 2, y + thumb / 2 - 6), text, fill=(150, 30, 30), font=font)
    else:
        sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
    if frame:
        draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline=QUERY_FRAME, width=3)
    draw.text((x, y + thumb + 2), _fit(draw, label, font, thumb), fill=TEXT, font=font)
    draw.text((x, y + thumb + 15), _fit(draw, show_path(Path(path).name), font, thumb), fill=TEXT, font=font)


__all__ = ["contact_sheet", "check_sheet", "sheet_size", "CAPTION_HEIGHT", "PAD", "SEPARATOR"]
