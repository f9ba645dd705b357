"""Image geometry: the one place that converts between index orders and world frames.

Conventions used throughout ``maisicore``:
- arrays are indexed (i, j, k) = (x, y, z) — NIfTI order. Slicer's ``arrayFromVolume`` is (k, j, i);
  transpose with ``kji_to_ijk``/``ijk_to_kji``.
- an affine is a 4×4 matrix mapping voxel index (i, j, k, 1) to RAS world coordinates in mm
  (Slicer's IJKToRAS; NIfTI's sform). ITK/DICOM/NRRD files are LPS: ``lps_to_ras`` converts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D image or label volume: ``array`` indexed (x, y, z) and ``affine`` index → RAS (mm)."""

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self):
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ValueError(f"a volume must be 3D, got an array of shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along each index axis, mm."""
        return spacing_of(self.affine)

    def same_grid(self, other: "Volume", atol_mm: float = 1e-3) -> bool:
        """Whether ``other`` lies on this grid: same shape, affines equal within ``atol_mm``."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol_mm))


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along each index axis: the length of each of the affine's first 3 columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def centered_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS-aligned affine for a grid of ``shape`` voxels at ``spacing`` mm, centred on the origin."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * np.asarray(spacing, dtype=np.float64)
    return affine


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Index → LPS affine to index → RAS (and back: the flip is its own inverse)."""
    return _LPS_RAS @ np.asarray(affine_lps, dtype=np.float64)


ras_to_lps = lps_to_ras


def ijk_to_kji(array: np.ndarray) -> np.ndarray:
    """(x, y, z) array to Slicer's (z, y, x) order (a view)."""
    return np.transpose(array, (2, 1, 0))


kji_to_ijk = ijk_to_kji


@dataclass(frozen=True)
class Reorientation:
    """How a volume was permuted/flipped to the closest RAS index order, so it can be undone."""

    ornt: np.ndarray  # nibabel orientation: (axis, flip) per input axis
    shape: tuple[int, int, int]  # input array shape

    @property
    def is_identity(self) -> bool:
        return bool(np.all(self.ornt[:, 0] == np.arange(3)) and np.all(self.ornt[:, 1] == 1))


def to_closest_ras(volume: Volume) -> tuple[Volume, Reorientation]:
    """Permute/flip ``volume`` so its index axes run closest to R, A, S (no resampling).

    Returns the reoriented volume (its affine describes the same world positions) and the
    ``Reorientation`` that ``undo_reorientation`` inverts exactly.
    """
    import nibabel.orientations as nio

    ornt = nio.io_orientation(volume.affine)
    array = nio.apply_orientation(volume.array, ornt)
    affine = volume.affine @ nio.inv_ornt_aff(ornt, volume.shape)
    return Volume(np.ascontiguousarray(array), affine), Reorientation(ornt, volume.shape)


def undo_reorientation(array: np.ndarray, reorientation: Reorientation) -> np.ndarray:
    """Put an array computed on the ``to_closest_ras`` grid back in the original index order."""
    import nibabel.orientations as nio

    # ornt takes the input axes to R, A, S; its inverse takes the RAS-ordered array back.
    inverse = nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), reorientation.ornt)
    out = nio.apply_orientation(array, inverse)
    if out.shape != reorientation.shape:
        raise AssertionError(f"reorientation round trip gave {out.shape}, expected {reorientation.shape}")
    return np.ascontiguousarray(out)


def onto_grid_of(volume: Volume, reference: Volume, atol_mm: float = 1e-3) -> Volume | None:
    """``volume`` permuted/flipped (no resampling) into ``reference``'s index order when both lie on
    the same voxel lattice (e.g. a DICOM series and a NIfTI conversion of it with a flipped axis);
    None when they do not."""
    import nibabel.orientations as nio

    transform = nio.ornt_transform(nio.io_orientation(volume.affine), nio.io_orientation(reference.affine))
    array = nio.apply_orientation(volume.array, transform)
    affine = volume.affine @ nio.inv_ornt_aff(transform, volume.shape)
    moved = Volume(np.ascontiguousarray(array), affine)
    return moved if moved.same_grid(reference, atol_mm) else None
