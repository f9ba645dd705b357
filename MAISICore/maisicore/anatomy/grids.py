"""Output grids for a mask: resampling label volumes, the closest valid MAISI grid, and mapping a
generated image back onto the user's grid.

All grids are (shape (x, y, z), affine index → RAS mm). Resampling goes through world coordinates,
so any orientation, obliquity or origin is handled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..io.geometry import Volume, to_closest_ras
from ..models.presets import GRID_RULES, OutputGridRules


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (x, y, z) and ``affine`` index → RAS (mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def resample(volume: Volume, grid: Grid, order: int, fill: float) -> Volume:
    """``volume`` sampled on ``grid``: ``order`` 0 nearest (labels), 1 trilinear (images);
    points outside the source get ``fill``. Same dtype as the source."""
    from scipy import ndimage

    index_map = np.linalg.inv(volume.affine) @ np.asarray(grid.affine, dtype=np.float64)
    if np.allclose(index_map, np.eye(4), atol=1e-9) and tuple(grid.shape) == volume.shape:
        return Volume(volume.array.copy(), np.array(grid.affine, dtype=np.float64))
    source = volume.array
    work = source if order == 0 else source.astype(np.float32)
    out = ndimage.affine_transform(
        work, index_map[:3, :3], offset=index_map[:3, 3], output_shape=tuple(grid.shape),
        order=order, mode="constant", cval=fill, output=work.dtype,
    )
    if order != 0 and np.issubdtype(source.dtype, np.integer):
        info = np.iinfo(source.dtype)
        out = np.clip(np.rint(out), info.min, info.max).astype(source.dtype)
    return Volume(out, np.array(grid.affine, dtype=np.float64))


def label_bounding_box_centre(labels: Volume) -> np.ndarray:
    """RAS point (mm) at the centre of the box around all non-zero labels (the grid centre if none)."""
    nonzero = np.argwhere(labels.array != 0)
    if len(nonzero) == 0:
        centre = (np.asarray(labels.shape) - 1) / 2.0
    else:
        centre = (nonzero.min(axis=0) + nonzero.max(axis=0)) / 2.0
    return (labels.affine @ np.append(centre, 1.0))[:3]


def grid_around(labels: Volume, shape, spacing) -> Grid:
    """A grid of ``shape`` voxels at ``spacing`` mm, axes along the labels' closest-RAS axes,
    centred on the centre of the labelled region (crop/pad around the body)."""
    ras, _ = to_closest_ras(labels)
    directions = ras.affine[:3, :3] / np.linalg.norm(ras.affine[:3, :3], axis=0)
    affine = np.eye(4)
    affine[:3, :3] = directions * np.asarray(spacing, dtype=np.float64)
    centre = label_bounding_box_centre(labels)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2.0)
    # Along axes where the spacing is unchanged, put voxel centres on the mask's voxel centres, so
    # nothing is shifted by a fraction of a voxel (and mapping back is exact).
    origin_index = np.linalg.solve(ras.affine, np.append(affine[:3, 3], 1.0))[:3]
    same = np.isclose(ras.spacing, np.asarray(spacing, dtype=np.float64), rtol=1e-6)
    origin_index[same] = np.round(origin_index[same])
    affine[:3, 3] = (ras.affine @ np.append(origin_index, 1.0))[:3]
    return Grid(tuple(int(s) for s in shape), affine)


def closest_valid_grid(labels: Volume, rules: OutputGridRules = GRID_RULES) -> Grid:
    """The published output grid closest to the labels' field of view (reference rule).

    Sizes: the allowed in-plane size closest to the mean in-plane size, the allowed slice count
    closest to the slice count. Spacing: the larger in-plane field of view and the slice field of
    view divided by those sizes (so the mask's extent is kept), clipped to the allowed ranges, with
    at least the minimum in-plane field of view. Centred on the labelled region.
    """
    ras, _ = to_closest_ras(labels)
    shape = np.asarray(ras.shape, dtype=np.float64)
    fov = shape * np.asarray(ras.spacing)
    size_xy = min(rules.inplane_sizes, key=lambda s: abs(s - (shape[0] + shape[1]) / 2))
    size_z = min(rules.slice_sizes, key=lambda s: abs(s - shape[2]))
    spacing_xy = max(fov[0], fov[1]) / size_xy
    spacing_xy = max(spacing_xy, rules.min_inplane_fov_mm / size_xy)
    spacing_xy = float(np.clip(spacing_xy, *rules.inplane_spacing_mm))
    spacing_z = float(np.clip(fov[2] / size_z, *rules.slice_spacing_mm))
    return grid_around(labels, (size_xy, size_xy, size_z), (spacing_xy, spacing_xy, spacing_z))


def labels_on_grid(labels: Volume, grid: Grid) -> Volume:
    """Nearest-neighbour resampling of a label volume onto ``grid`` (outside: background 0)."""
    return resample(labels, grid, order=0, fill=0)


def image_on_grid(image: Volume, grid: Grid, fill_hu: float = -1000.0) -> Volume:
    """Trilinear resampling of an image (HU) onto ``grid``; outside the source: ``fill_hu``."""
    return resample(image, grid, order=1, fill=fill_hu)


def generation_grid(labels: Volume, size=None, spacing=None, rules: OutputGridRules = GRID_RULES) -> Grid:
    """Where to generate for a mask: ``size`` voxels at ``spacing`` mm around its labelled region
    when both are given, else the closest valid grid."""
    if (size is None) != (spacing is None):
        from ..errors import InputError

        raise InputError("to fit a mask onto another grid give both --size and --spacing, or neither")
    if size is not None:
        return grid_around(labels, size, spacing)
    return closest_valid_grid(labels, rules)
