"""Tumour rules of inpainting: the tumour types the ControlNet models know, each type's host organ,
and the size of the region inpainting regenerates around a tumour.

What lives here: ``TUMOR_HOSTS`` / ``TUMOR_TYPES``, ``tumor_id`` and ``tumor_host_ids`` (names
resolved with the label table), the region-of-interest (ROI) constants and ``ball_roi_size``.
What is NOT here: drawing the tumour, cropping and the diffusion (``maisicore.pipelines.inpaint``).
Nothing here imports torch or numpy at file scope: the Slicer modules import these constants at
start-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import InputError

TUMOR_HOSTS = {  # tumour type (MAISI name) → its host organ group (``anatomy.qc.organ_groups``, or colon)
    "hepatic tumor": "liver",
    "pancreatic tumor": "pancreas",
    "lung tumor": "lung",
    "colon cancer primaries": "colon",
    "bone lesion": "bone",
}
TUMOR_TYPES = tuple(TUMOR_HOSTS)

CONTEXT_MM = 24.0  # context kept around the tumour on each side
BALL_EXTENT = 1.15  # a ball tumour's radius varies by up to ±15 % with direction
MAX_ROI_VOXELS = 256  # the largest side the ROI may have
GRID_MULTIPLE = 32  # ROI sides are multiples of this (the VAE's and UNet's downsampling)


def tumor_host_ids() -> dict[str, tuple[int, ...]]:
    """Tumour type (MAISI name) → host organ label ids (organ groups of the quality check)."""
    from .labels import label_table
    from .qc import organ_groups

    groups = dict(organ_groups(), colon=(label_table().by_name("colon").id,))
    return {tumor: groups[host] for tumor, host in TUMOR_HOSTS.items()}


def tumor_id(tumor_type: str) -> int:
    """MAISI id of a tumour type (name, synonym); refuses anything that is not a tumour."""
    from .labels import label_table

    info = label_table().by_segment_name(tumor_type)
    if info is None or not info.tumor:
        names = ", ".join(f'"{n}"' for n in tumor_host_ids())
        raise InputError(f"--tumor-type {tumor_type!r}: not a tumour type; choose one of {names}")
    return info.id


def ball_roi_side(diameter_mm: float, spacing_mm: float) -> float:
    """Voxels (not rounded) the ROI needs along an axis of ``spacing_mm`` (mm) around a ball tumour
    of ``diameter_mm`` (mm): the tumour at its largest and ``CONTEXT_MM`` on each side."""
    return (diameter_mm * BALL_EXTENT + 2 * CONTEXT_MM) / spacing_mm


def largest_ball_diameter(spacing_mm: float) -> float:
    """The largest ball tumour diameter (mm) whose ROI fits ``MAX_ROI_VOXELS`` at ``spacing_mm`` (mm)."""
    return (MAX_ROI_VOXELS * spacing_mm - 2 * CONTEXT_MM) / BALL_EXTENT


def ball_roi_size(diameter_mm: float, spacing_mm: Sequence[float]) -> tuple[int, ...]:
    """Voxels (x, y, z) of the ROI around a ball tumour of ``diameter_mm`` (mm) on a grid of
    ``spacing_mm`` (x, y, z) mm: ``ball_roi_side`` rounded up to multiples of ``GRID_MULTIPLE``,
    capped at ``MAX_ROI_VOXELS`` (inpainting refuses a larger tumour)."""
    return tuple(
        int(min(MAX_ROI_VOXELS, GRID_MULTIPLE * math.ceil(ball_roi_side(float(diameter_mm), float(s)) / GRID_MULTIPLE)))
        for s in spacing_mm
    )


# Classifier-free guidance with a mask (reference ``remove_tumors``): the unconditional ControlNet
# input is the mask without tumours. Tumour id → the organ id that replaces it.
TUMOR_TO_ORGAN_IDS = {26: 1, 24: 4, 27: 62, 116: 14, 117: 5}  # hepatic, pancreatic, colon, kidney cyst ×2
LUNG_TUMOR_ID = 23
LUNG_LOBE_IDS = (28, 29, 30, 31, 32)


def tumor_free_labels(labels):
    """``labels`` (int array, (x, y, z)) with every tumour replaced by its organ, as the reference's
    ``remove_tumors`` without pseudo labels: hepatic/pancreatic/colon tumours and kidney cysts take
    their organ's id; lung tumour voxels take the most frequent lung-lobe id among the voxels next to
    them (3×3×3 neighbourhood; as in the reference, whose dilation pads with 1, the voxels on the
    volume's faces count as neighbours too), else the most frequent lobe id of the whole volume.
    Returns a new int64 array."""
    import numpy as np
    from scipy import ndimage

    labels = np.asarray(labels)
    out = labels.astype(np.int64, copy=True)
    for tumor, organ in TUMOR_TO_ORGAN_IDS.items():
        out[labels == tumor] = organ
    tumor = out == LUNG_TUMOR_ID
    lobes = np.array(LUNG_LOBE_IDS, dtype=np.int64)
    near = ndimage.binary_dilation(tumor, structure=np.ones((3, 3, 3), bool))
    for axis in range(near.ndim):  # the reference pads its dilation with 1: every face voxel is "near"
        index = [slice(None)] * near.ndim
        for end in (0, -1):
            index[axis] = end
            near[tuple(index)] = True
    ring = near & ~tumor & np.isin(out, lobes)
    if ring.any():
        values, counts = np.unique(out[ring], return_counts=True)
        fill = int(values[np.argmax(counts)])  # the smallest id among equally frequent ones
    else:
        fill = int(lobes[np.argmax([(out == lobe).sum() for lobe in lobes])])
    out[tumor] = fill
    return out
