"""A PNG of a CT's three mid-planes (axial, coronal, sagittal), label contours overlaid."""

from __future__ import annotations

import os

import numpy as np

from .geometry import Volume, to_closest_ras
from .volumes import atomic_write

WINDOW_HU = (-1000.0, 1000.0)
PANEL_PX = 256  # longest side of each panel


def _label_colour(label_id: int) -> tuple[int, int, int]:
    """The label table's display colour; a stable hue for ids outside the table."""
    from ..anatomy.labels import label_table

    try:
        return label_table().by_id(label_id).color
    except KeyError:
        import colorsys

        r, g, b = colorsys.hsv_to_rgb((label_id * 0.618033988749895) % 1.0, 0.9, 1.0)
        return int(r * 255), int(g * 255), int(b * 255)


def _display(plane: np.ndarray) -> np.ndarray:
    """(u, v) plane of a RAS-ordered volume → (rows, cols): +v up, +u to the viewer's left."""
    return plane[::-1, ::-1].T


def _panels(volume: Volume):
    """Mid-planes (display order) and their pixel sizes (mm): axial, coronal, sagittal."""
    a = volume.array
    sx, sy, sz = volume.spacing
    cx, cy, cz = (n // 2 for n in a.shape)
    return [
        (_display(a[:, :, cz]), (sy, sx)),
        (_display(a[:, cy, :]), (sz, sx)),
        (_display(a[cx, :, :]), (sz, sy)),
    ]


def render_preview(ct: Volume, labels: Volume | None = None) -> "np.ndarray":
    """RGB uint8 image: three mid-planes side by side at their physical aspect ratio, window
    −1000…1000 HU; boundaries of label regions drawn in colour when ``labels`` are given."""
    from PIL import Image

    ct_ras, _ = to_closest_ras(ct)
    lab_panels = None
    if labels is not None:
        lab_ras, _ = to_closest_ras(labels)
        lab_panels = _panels(lab_ras)
    tiles = []
    for index, (plane, (row_mm, col_mm)) in enumerate(_panels(ct_ras)):
        height_mm, width_mm = plane.shape[0] * row_mm, plane.shape[1] * col_mm
        scale = PANEL_PX / max(height_mm, width_mm)
        size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
        lo, hi = WINDOW_HU
        grey = (np.clip((plane.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
        rgb = np.asarray(Image.fromarray(grey).resize(size, Image.BILINEAR).convert("RGB")).copy()
        if lab_panels is not None:
            lab = np.asarray(Image.fromarray(lab_panels[index][0].astype(np.int32)).resize(size, Image.NEAREST))
            edge = np.zeros(lab.shape, bool)
            edge[1:, :] |= lab[1:, :] != lab[:-1, :]
            edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
            edge &= lab != 0
            for label_id in np.unique(lab[edge]):
                rgb[edge & (lab == label_id)] = _label_colour(int(label_id))
        tiles.append(rgb)
    height = max(t.shape[0] for t in tiles)
    canvas = np.zeros((height, sum(t.shape[1] for t in tiles) + 4 * (len(tiles) - 1), 3), np.uint8)
    x = 0
    for tile in tiles:
        canvas[: tile.shape[0], x : x + tile.shape[1]] = tile
        x += tile.shape[1] + 4
    return canvas


def write_preview(path: str | os.PathLike, ct: Volume, labels: Volume | None = None) -> None:
    """Write ``render_preview`` as a PNG, atomically."""
    from PIL import Image

    image = Image.fromarray(render_preview(ct, labels))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), suffix=".png")
