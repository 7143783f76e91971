"""The image files of a report (``assets/``): thumbnails, query crops, heatmaps, charts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from dtop.errors import ConfigError
from dtop.report.curves import Chart
from dtop.report.thumbnails import fit, load_thumbnail
from dtop.report.view import HeatmapView, ImageRef, QueryImages
from dtop.utils.io import atomic_path

CHART_SIZE = (300, 520)
"""Height and width of the training charts in a report, in pixels."""
BBX_COLOUR = (255, 215, 0)


class AssetWriter:
    """Writes each image of the report once under ``out`` and returns where it is and how big."""

    def __init__(self, out: Path, thumb_size: int) -> None:
        self.out = out
        self.thumb_size = thumb_size
        self._written: dict[str, ImageRef | None] = {}

    def thumbnail(self, img: Image.Image, rel: str, alt: str) -> ImageRef:
        """Save a thumbnail of ``img`` as JPEG at ``rel`` (relative to the report folder)."""
        thumb = fit(img, self.thumb_size)
        with atomic_path(self.out / rel) as tmp:
            thumb.save(tmp, format="JPEG", quality=85)
        ref = ImageRef(rel, thumb.width, thumb.height, alt)
        self._written[rel] = ref
        return ref

    def database(self, dataset: Any, index: int, alt: str) -> ImageRef | None:
        """The thumbnail of database image ``index`` (written on first use); None when it cannot be read."""
        rel = f"assets/db/{index}.jpg"
        if rel not in self._written:
            img = load_thumbnail(dataset.database_paths[index], self.thumb_size)
            self._written[rel] = None if img is None else self.thumbnail(img, rel, alt)
        ref = self._written[rel]
        return None if ref is None else ImageRef(ref.src, ref.width, ref.height, alt)

    def colorbar(self) -> ImageRef:
        """The colour scale of the heatmaps."""
        from dtop.report.heatmaps import colorbar

        bar = colorbar()
        with atomic_path(self.out / "assets" / "colorbar.png") as tmp:
            bar.save(tmp, format="PNG")
        return ImageRef("assets/colorbar.png", 160, 10, "colour scale")

    def chart(self, chart: Chart, rel: str, alt: str) -> ImageRef:
        """Draw ``chart`` as a PNG at ``rel``."""
        from dtop.report.plots import draw_chart

        height, width = CHART_SIZE
        draw_chart(chart, self.out / rel, height=height, width=width)
        return ImageRef(rel, width, height, alt)


def query_images(writer: AssetWriter, dataset: Any, qi: int) -> tuple[QueryImages, Image.Image | None]:
    """Write query ``qi`` with its bbx drawn, and its crop; return their refs and the crop (None: unreadable)."""
    from dtop.data.images import ImageLoadError, crop_bbx, load_image

    path = dataset.query_paths[qi]
    bbx = dataset.gnd.gnd[qi].get("bbx")
    try:
        full = load_image(path)
        crop = crop_bbx(full, bbx, path) if bbx is not None else full
    except ImageLoadError as err:
        return QueryImages(error=f"query image unreadable: {err}"), None
    shown = full.copy()
    if bbx is not None:
        k = max(1, round(max(full.size) / writer.thumb_size))  # a line still visible once shrunk
        ImageDraw.Draw(shown).rectangle(tuple(bbx), outline=BBX_COLOUR, width=2 * k)
    image = writer.thumbnail(shown, f"assets/queries/{qi}.jpg", "query image")
    crop_ref = writer.thumbnail(crop, f"assets/queries/{qi}-crop.jpg", "query crop")
    return QueryImages(image, crop_ref), crop


@dataclass
class HeatmapMaker:
    """Draws each model's heatmap on query crops; a model without attention is dropped, with a message."""

    models: list[tuple[str, Any, str]]
    """(display name, model, file-name slug)."""
    long_side: int
    messages: list[str] = field(default_factory=list)

    def make(self, writer: AssetWriter, crop: Image.Image, qi: int) -> list[HeatmapView]:
        """The heatmaps of query ``qi``'s crop, written to ``assets/heatmaps/<slug>/<qi>.jpg``."""
        from dtop.report.heatmaps import attention_heatmap, heatmap_kind, overlay

        views = []
        for entry in list(self.models):
            name, model, slug = entry
            try:
                heat = attention_heatmap(model, crop, self.long_side)
            except ConfigError as err:  # e.g. a CNN: no attention to show; the rest of the report goes on
                self.messages.append(f"No heatmaps for {name}: {err}")
                self.models.remove(entry)
                continue
            ref = writer.thumbnail(overlay(crop, heat), f"assets/heatmaps/{slug}/{qi}.jpg", f"{name} heatmap")
            views.append(HeatmapView(name, heatmap_kind(model), ref))
        return views
