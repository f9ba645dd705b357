"""Body envelope: MAISI's label 200 covers every voxel inside the body that no other label covers.

Without it the published models produce degraded images. The envelope comes from the CT when one
is given (HU threshold, largest connected region, holes filled) or else from the union of the
labels (closed, holes filled). Arrays are (x, y, z); spacing in mm; the slice axis is the third.
"""

from __future__ import annotations

import numpy as np

BODY_THRESHOLD_HU = -500.0  # air and lung are below, soft tissue and bone above
LABELS_CLOSING_MM = 10.0


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected region of a boolean volume (empty stays empty)."""
    from scipy import ndimage

    labelled, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed cavities in 3D, then slice by slice along z (cavities open at the volume's
    top or bottom, like lungs cut by the field of view, are closed in their axial slices)."""
    from scipy import ndimage

    filled = ndimage.binary_fill_holes(mask)
    for k in range(filled.shape[2]):
        filled[:, :, k] = ndimage.binary_fill_holes(filled[:, :, k])
    return filled


def body_from_ct(ct_hu: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Boolean body mask of a CT (HU): the largest region above ``threshold_hu``, holes filled.

    The table is usually a separate, smaller region and is left out."""
    return fill_holes(largest_component(ct_hu > threshold_hu))


def body_from_labels(labels: np.ndarray, spacing_mm, closing_mm: float = LABELS_CLOSING_MM) -> np.ndarray:
    """Boolean body mask from a label volume: the labelled voxels, closed with a ball of radius
    ``closing_mm`` (gaps between organs), holes filled."""
    from scipy import ndimage

    mask = labels != 0
    if not mask.any():
        return mask
    radius = [max(1, int(round(closing_mm / float(s)))) for s in spacing_mm]
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    ball = sum((g / r) ** 2 for g, r in zip(grid, radius)) <= 1.0
    padded = np.pad(mask, [(r, r) for r in radius])  # closing must not erode at the volume's faces
    closed = ndimage.binary_closing(padded, structure=ball)
    closed = closed[tuple(slice(r, r + n) for r, n in zip(radius, mask.shape))]
    return fill_holes(closed | mask)


def add_body_envelope(
    labels: np.ndarray, body_id: int, ct_hu: np.ndarray | None = None, spacing_mm=(1.0, 1.0, 1.0)
) -> tuple[np.ndarray, int]:
    """Copy of ``labels`` with ``body_id`` on every body voxel that holds no label.

    The body comes from ``ct_hu`` (same grid) when given, else from the labels. Returns the new
    labels and the number of voxels set to ``body_id``.
    """
    if ct_hu is not None and ct_hu.shape != labels.shape:
        raise ValueError(f"CT shape {ct_hu.shape} differs from the labels' {labels.shape}")
    body = body_from_ct(ct_hu) if ct_hu is not None else body_from_labels(labels, spacing_mm)
    out = labels.copy()
    envelope = body & (labels == 0)
    out[envelope] = body_id
    return out, int(envelope.sum())
