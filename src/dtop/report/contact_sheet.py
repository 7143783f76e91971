"""Contact sheets of search results: one PNG grid, one row per query.

Each row shows the query (framed in blue) and then its results in rank order, every tile captioned
(``query`` / ``#rank  score`` on the first line, the file name on the second, shortened from the
left to fit). Thumbnails keep their aspect ratio, scaled to fit and centred on a light-grey
``thumb`` × ``thumb`` square; an image that cannot be read (deleted since it was indexed, say) becomes a grey tile
captioned ``unreadable`` instead of failing the whole sheet. Images are loaded with
:func:`dtop.data.images.load_image`, the one loader of dtop.

Geometry (all in pixels, see :func:`sheet_size`): with ``c`` columns (1 + the longest result
list) and ``r`` rows, the sheet is ``PAD + c·(thumb + PAD) + SEPARATOR`` wide (the separator
sets the query column apart; none when no query has results) and ``PAD + r·(thumb +
CAPTION_HEIGHT + PAD)`` high.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from dtop.data.images import load_image
from dtop.errors import ConfigError, DataError
from dtop.utils.io import atomic_path

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


def sheet_size(n_rows: int, n_cols: int, thumb: int = 160) -> tuple[int, int]:
    """``(width, height)`` of a sheet with ``n_rows`` queries and ``n_cols`` columns (query + results)."""
    separator = SEPARATOR if n_cols > 1 else 0
    width = PAD + n_cols * (thumb + PAD) + separator
    height = PAD + n_rows * (thumb + CAPTION_HEIGHT + PAD)
    return width, height


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """``text`` shortened from the left (with an ellipsis) so that it is at most ``width`` wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    for start in range(1, len(text)):
        candidate = "…" + text[start:]
        if draw.textlength(candidate, font=font) <= width:
            return candidate
    return "…"


class _Thumbnails:
    """Loads each image once per sheet; unreadable images give ``None``."""

    def __init__(self, size: int, exif_transpose: bool) -> None:
        self.size = size
        self.exif_transpose = exif_transpose
        self.cache: dict[str, Image.Image | None] = {}

    def get(self, path: str) -> Image.Image | None:
        if path not in self.cache:
            try:
                img = load_image(path, self.exif_transpose, draft_long_side=self.size)
                self.cache[path] = ImageOps.contain(img, (self.size, self.size), Image.Resampling.BICUBIC)
            except DataError:
                self.cache[path] = None
        return self.cache[path]


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
    """
    if len(query_paths) != len(results):
        raise ConfigError(f"got {len(query_paths)} queries but {len(results)} result lists; give one list per query")
    if not query_paths:
        raise ConfigError("a contact sheet needs at least one query")
    if int(thumb) < MIN_THUMB:
        raise ConfigError(f"thumb must be at least {MIN_THUMB} pixels, got {thumb}")
    thumb = int(thumb)
    rows = []
    for i, (paths, scores) in enumerate(results):
        paths, scores = [str(p) for p in paths], [float(s) for s in scores]
        if len(paths) != len(scores):
            raise ConfigError(f"results of query {i}: {len(paths)} paths but {len(scores)} scores")
        rows.append((paths, scores))
    n_cols = 1 + max(len(p) for p, _ in rows)
    sheet = Image.new("RGB", sheet_size(len(rows), n_cols, thumb), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    thumbs = _Thumbnails(thumb, exif_transpose)
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
    thumbs: _Thumbnails,
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
    draw.text((x, y + thumb + 15), _fit(draw, Path(path).name, font, thumb), fill=TEXT, font=font)


__all__ = ["contact_sheet", "sheet_size", "CAPTION_HEIGHT", "PAD", "SEPARATOR"]
