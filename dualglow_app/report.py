"""Self-contained HTML reports (figures embedded as PNG) and the figures they show.

Reports are single files a person can open anywhere (no assets beside them). A report is
built from sections and written atomically; callers should log, not raise, when a report
fails, so a figure never fails a subject.

>>> report = HtmlReport("sub-01", banner="SYNTHETIC PET from a demonstration model")
>>> report.add_paragraph("Synthesized from sub-01_T1w.nii.gz")
>>> report.add_table(["metric", "value"], [["PSNR", "24.1"]])
>>> html = report.render()
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dualglow_app import __version__
from dualglow_app.io import write_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
.banner{background:#fff3cd;border:1px solid #e0c060;padding:.6em 1em;border-radius:6px;font-weight:600}
.meta{color:#666;font-size:.9em}table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}
img{max-width:100%}
"""


def figure_to_png(figure: Any, dpi: int = 100) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


@dataclass
class MontageRow:
    """One row of an orthogonal montage: a volume with its colour scale."""

    title: str
    volume: np.ndarray
    cmap: str = "gray"
    vmin: float | None = None
    vmax: float | None = None
    colorbar_label: str | None = None


def orthogonal_montage(rows: Sequence[MontageRow], slices_per_plane: int = 3) -> Any:
    """Axial, coronal and sagittal slices of each volume (RAS voxel order), one row per volume.

    Slices are taken at evenly spaced positions through the middle 60 % of each axis, where
    the brain is; intensity limits default to the 1st and 99.5th percentiles of non-zero voxels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 3 * slices_per_plane
    figure, axes = plt.subplots(
        len(rows), columns, figsize=(1.6 * columns, 1.9 * len(rows)), squeeze=False
    )
    for row_index, row in enumerate(rows):
        volume = np.asarray(row.volume, dtype=np.float32)
        nonzero = volume[np.isfinite(volume) & (volume != 0)]
        vmin = row.vmin if row.vmin is not None else (float(np.percentile(nonzero, 1)) if nonzero.size else 0.0)
        vmax = row.vmax if row.vmax is not None else (float(np.percentile(nonzero, 99.5)) if nonzero.size else 1.0)
        image = None
        for plane in range(3):
            size = volume.shape[plane]
            positions = np.linspace(0.2 * size, 0.8 * size, slices_per_plane).astype(int)
            for k, position in enumerate(positions):
                section = np.take(volume, position, axis=plane)
                # RAS voxels: show with anterior/superior up and the subject's left on the right
                ax = axes[row_index, plane * slices_per_plane + k]
                image = ax.imshow(np.rot90(section), cmap=row.cmap, vmin=vmin, vmax=vmax)
                ax.set_axis_off()
        axes[row_index, 0].set_title(row.title, loc="left", fontsize=9)
        if image is not None and row.colorbar_label:
            figure.colorbar(image, ax=axes[row_index, -1], fraction=0.05, label=row.colorbar_label)
    figure.subplots_adjust(wspace=0.02, hspace=0.15)
    return figure


def outline_montage(volume: np.ndarray, outline: np.ndarray, title: str, slices_per_plane: int = 3) -> Any:
    """Axial, coronal and sagittal slices of ``volume`` (greyscale) with the edge of the mask
    ``outline`` drawn over them in one colour: a registration check (as fMRIPrep draws the
    template's brain edge over the subject's T1w). Both on the same grid, RAS voxels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volume = np.asarray(volume, dtype=np.float32)
    outline = np.asarray(outline) > 0
    if volume.shape != outline.shape:
        raise ValueError(f"outline_montage: volume {volume.shape} and outline {outline.shape} are not on one grid")
    nonzero = volume[np.isfinite(volume) & (volume != 0)]
    vmax = float(np.percentile(nonzero, 99.5)) if nonzero.size else 1.0
    columns = 3 * slices_per_plane
    figure, axes = plt.subplots(1, columns, figsize=(1.6 * columns, 2.1), squeeze=False)
    for plane in range(3):
        size = volume.shape[plane]
        for k, position in enumerate(np.linspace(0.25 * size, 0.75 * size, slices_per_plane).astype(int)):
            ax = axes[0, plane * slices_per_plane + k]
            ax.imshow(np.rot90(np.take(volume, position, axis=plane)), cmap="gray", vmin=0.0, vmax=vmax)
            edge = np.rot90(np.take(outline, position, axis=plane)).astype(np.float32)
            if edge.any() and not edge.all():
                ax.contour(edge, levels=[0.5], colors="#ff3030", linewidths=0.8)
            ax.set_axis_off()
    axes[0, 0].set_title(title, loc="left", fontsize=9)
    figure.subplots_adjust(wspace=0.02)
    return figure


def line_figure(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Any:
    """A simple line plot of several named series, with optional shaded bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6.0, 3.6))
    for name, values in series.items():
        (line,) = ax.plot(x[: len(values)], values, marker="o", markersize=3, label=name)
        if bands and name in bands:
            low, high = bands[name]
            ax.fill_between(x[: len(low)], low, high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return figure


class HtmlReport:
    """A single-file HTML report: title, an optional warning banner, then sections in order."""

    def __init__(self, title: str, banner: str | None = None) -> None:
        self.title = title
        self.banner = banner
        self._parts: list[str] = []

    def add_heading(self, text: str) -> None:
        self._parts.append(f"<h2>{html.escape(text)}</h2>")

    def add_paragraph(self, text: str) -> None:
        self._parts.append(f"<p>{html.escape(text)}</p>")

    def add_table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_format_cell(c))}</td>" for c in row) + "</tr>" for row in rows
        )
        self._parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def add_figure(self, figure_or_png: Any, caption: str = "") -> None:
        """Embed a matplotlib figure (or PNG bytes) with a caption."""
        png = figure_or_png if isinstance(figure_or_png, bytes) else figure_to_png(figure_or_png)
        data = base64.b64encode(png).decode("ascii")
        self._parts.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def render(self) -> str:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        banner = f'<p class="banner">{html.escape(self.banner)}</p>' if self.banner else ""
        return (
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>{banner}"
            f"<p class='meta'>dualglow {html.escape(__version__)} &middot; {stamp}</p>"
            + "\n".join(self._parts)
            + "</body></html>\n"
        )

    def write(self, path: os.PathLike[str] | str) -> Path:
        return write_text(path, self.render())


#: Table cells smaller than this are float round-off of a zero (a mean PET's bias against itself).
_ROUND_OFF = 1e-6


def _format_cell(value: Any) -> str:
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            return "n/a"
        return "0" if abs(value) < _ROUND_OFF else f"{value:.4g}"
    return str(value)
