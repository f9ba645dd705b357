"""Body envelope: MAISI's label 200 covers every voxel inside the body that no other label covers.

Without it the published models produce degraded images. Two ways to find the body:

- from a CT (the default when one is given): the algorithm of NVIDIA's NV-Generate-CTMR
  (``add_body_envelope`` in its ``scripts/utils.py``), written here with NumPy/SciPy and giving the
  same voxels. The outside air is the largest region below ``air_hu``; the body is everything else,
  labelled voxels included; the CT table is cut off by an erosion, a largest-region pick and a
  dilation, and air pockets in the body as large as a table piece are dropped. A limb lying apart
  from the trunk stays (it is not outside air), and so does the skin down to ``air_hu``.
- from the labels alone (no CT): the union of the labels, closed (10 mm ball) and with its holes
  filled. It sees only what is labelled: skin, fat and muscle outside the labelled structures, and
  limbs with no label, are left out, so the envelope is smaller than the CT's (64 % of it on
  TotalSegmentator's example_ct_sm with its full segmentation); gaps inside the body are body only
  where the closing bridges them.

Arrays are (x, y, z) (any axis order works: the steps are symmetric in the axes); CT values in HU;
kernel sizes in voxels, as in the reference; spacing in mm.

Memory and time: the masks are booleans (1 byte per voxel); the box erosions and dilations are
separable, the OR / AND of shifted masks along each axis (no convolution, no float copy); region
sizes are counted in chunks. The peak is the int32 image of one connected-component labelling (4
bytes per voxel) plus a few masks and the output: 7.3 bytes per voxel measured (tracemalloc, output
included) beyond the CT and labels, under 2 GB for a 512×512×500 scan. The time is mostly that of two
connected-component labellings: 0.67 s for 512×512×20 voxels (NVIDIA's function: 4.2 s), 4.2 s for
512×512×100, on 2 shared cores (``benchmarks/body_envelope.py``). ``progress(done, total)`` is called between the steps, so a GUI
can repaint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import InputError

LABELS_CLOSING_MM = 10.0

# The reference's defaults (NV-Generate-CTMR ``add_body_envelope``).
AIR_HU = -800.0  # air / outside the body below this
CLOSING_VOXELS = 3  # box side of the closings that seal the air mask and small cavities of the body
BED_VOXELS = 5  # box side of the erosion / dilation that separates the body from the CT table
TABLE_FRACTION = 0.05  # an air-in-body region this large (fraction of the body) is a table piece
MAX_KERNEL_VOXELS = 31

ENVELOPE_STEPS = 8  # the ``progress`` total of ``envelope_from_ct``


@dataclass(frozen=True)
class BodyOptions:
    """Parameters of the body envelope from a CT (the reference's, same defaults).

    air_hu: HU below which a voxel is air (outside the body, or an air pocket), in (-1024, 0].
    closing_voxels: odd box side (voxels) of the closing of the air mask and of the body's cavities.
    bed_voxels: odd box side (voxels) of the erode → largest region → dilate that drops the CT table.
    table_fraction: air-in-body regions of at least this fraction of the body are removed as table
        pieces, in (0, 1].
    labels_have_lungs: whether the labels include the lungs; the table-piece removal runs only then
        (unlabelled lung air would look like a table piece). None: yes when a lung lobe id is present.
    """

    air_hu: float = AIR_HU
    closing_voxels: int = CLOSING_VOXELS
    bed_voxels: int = BED_VOXELS
    table_fraction: float = TABLE_FRACTION
    labels_have_lungs: bool | None = None

    def check(self) -> BodyOptions:
        """Self, or ``InputError`` (one line) naming the bad value and its range."""
        if not (math.isfinite(self.air_hu) and -1024.0 < self.air_hu <= 0.0):
            raise InputError(f"body air threshold {self.air_hu:g} HU is out of range: give a value in (-1024, 0] HU "
                             f"(default {AIR_HU:g})")
        for name, value, default in (("closing", self.closing_voxels, CLOSING_VOXELS),
                                     ("bed", self.bed_voxels, BED_VOXELS)):
            if int(value) != value or not (1 <= value <= MAX_KERNEL_VOXELS) or value % 2 == 0:
                raise InputError(f"body {name} kernel {value} voxels is invalid: give an odd whole number from 1 to "
                                 f"{MAX_KERNEL_VOXELS} (default {default})")
        if not (math.isfinite(self.table_fraction) and 0.0 < self.table_fraction <= 1.0):
            raise InputError(f"body table fraction {self.table_fraction:g} is out of range: give a value in (0, 1] "
                             f"(default {TABLE_FRACTION:g})")
        return self


def _lungs_labelled(labels: np.ndarray) -> bool:
    from .tumors import LUNG_LOBE_IDS

    return bool(np.isin(labels, LUNG_LOBE_IDS).any())


def region_sizes(regions: np.ndarray, count: int, chunk: int = 1 << 22) -> np.ndarray:
    """Voxel count of each region id 0..``count`` of a labelled volume, counted ``chunk`` voxels at a
    time (``np.bincount`` of the whole would first copy the int32 ids to 8-byte integers)."""
    flat = regions.reshape(-1)
    sizes = np.zeros(count + 1, np.int64)
    for start in range(0, flat.size, chunk):
        sizes += np.bincount(flat[start:start + chunk], minlength=count + 1)
    return sizes


def largest_component(mask: np.ndarray, full_connectivity: bool = False) -> np.ndarray:
    """The largest connected region of a boolean volume (empty stays empty): 6-connected, or
    26-connected (faces, edges and corners) with ``full_connectivity``."""
    from scipy import ndimage

    structure = np.ones((3,) * mask.ndim, bool) if full_connectivity else None
    labelled, count = ndimage.label(mask, structure=structure)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    if count == 1:
        return labelled.astype(bool)
    sizes = region_sizes(labelled, count)
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))  # a comparison: no 8-byte index copy as keep[labelled] makes


def _box(mask: np.ndarray, size: int, grow: bool, outside: bool) -> np.ndarray:
    """Box (``size``³ voxels) dilation (``grow``) or erosion of a boolean volume, the voxels beyond
    its faces taken as ``outside``: per axis, the OR (AND) of the mask shifted by up to ``size // 2``
    voxels each way (a box is separable; two masks alive, no convolution)."""
    reach = size // 2
    combine = np.logical_or if grow else np.logical_and
    out = mask.copy()
    for axis in range(mask.ndim):
        if reach == 0 or mask.shape[axis] == 0:
            continue
        source = out.copy()
        for shift in range(1, min(reach, mask.shape[axis] - 1) + 1):
            lower = [slice(None)] * mask.ndim
            upper = [slice(None)] * mask.ndim
            lower[axis], upper[axis] = slice(shift, None), slice(None, -shift)
            lower, upper = tuple(lower), tuple(upper)
            combine(out[lower], source[upper], out=out[lower])
            combine(out[upper], source[lower], out=out[upper])
        del source
        if outside == grow:  # the faces' outside voxels decide: all set (dilation) or all cleared (erosion)
            edge = min(reach, mask.shape[axis])
            first = [slice(None)] * mask.ndim
            last = [slice(None)] * mask.ndim
            first[axis], last[axis] = slice(0, edge), slice(mask.shape[axis] - edge, None)
            out[tuple(first)] = grow
            out[tuple(last)] = grow
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed cavities in 3D, then slice by slice along z (cavities open at the volume's
    top or bottom, like lungs cut by the field of view, are closed in their axial slices)."""
    from scipy import ndimage

    filled = ndimage.binary_fill_holes(mask)
    for k in range(filled.shape[2]):
        filled[:, :, k] = ndimage.binary_fill_holes(filled[:, :, k])
    return filled


def envelope_from_ct(
    labels: np.ndarray, ct_hu: np.ndarray, body_id: int, options: BodyOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """``labels`` with ``body_id`` on the body's unlabelled voxels, the body found in ``ct_hu``.

    labels: integer volume; ct_hu: same shape, HU. Returns a new array of ``labels``' dtype. The
    steps of NV-Generate-CTMR's ``add_body_envelope`` (same result; ``BodyOptions`` are its
    parameters): 1. outside air = largest 26-connected region below ``air_hu``, closed (box
    ``closing_voxels``; dilation pads with 0, erosion with 1); 2. labelled voxels are not air;
    3. body = not air; 4. erosion (box ``bed_voxels``, pad 0), largest 26-connected region,
    dilation: drops the table; 5. closing (box ``closing_voxels``); 6. labelled voxels are body;
    7. unlabelled body voxels take ``body_id``; 8. when the labels have lungs, every 6-connected
    region of ``body_id`` voxels below ``air_hu`` holding at least ``table_fraction`` of the
    ``body_id`` voxels is set to 0 (table pieces).
    """
    options = (options or BodyOptions()).check()
    if ct_hu.shape != labels.shape:
        raise InputError(f"CT shape {ct_hu.shape} differs from the labels' {labels.shape}")
    tick = progress or (lambda done, total: None)
    labelled = labels != 0
    # 1-3. Outside air, closed; labelled voxels are not air; the body is the rest.
    air = largest_component(ct_hu < options.air_hu, full_connectivity=True)
    tick(1, ENVELOPE_STEPS)
    air = _box(_box(air, options.closing_voxels, True, False), options.closing_voxels, False, True)
    air &= ~labelled
    body = ~air
    del air
    tick(2, ENVELOPE_STEPS)
    # 4. The table: erode, keep the largest region, dilate back.
    body = _box(body, options.bed_voxels, False, False)
    tick(3, ENVELOPE_STEPS)
    body = largest_component(body, full_connectivity=True)
    tick(4, ENVELOPE_STEPS)
    body = _box(body, options.bed_voxels, True, False)
    # 5-6. Small cavities closed; labelled voxels are body.
    body = _box(_box(body, options.closing_voxels, True, False), options.closing_voxels, False, True)
    body |= labelled
    tick(5, ENVELOPE_STEPS)
    # 7. The envelope.
    out = labels.copy()
    np.copyto(out, body_id, where=body & ~labelled, casting="unsafe")
    del body, labelled
    tick(6, ENVELOPE_STEPS)
    # 8. Table pieces: large air regions inside the body (safe only when the lungs are labelled).
    lungs = options.labels_have_lungs if options.labels_have_lungs is not None else _lungs_labelled(labels)
    if lungs:
        from scipy import ndimage

        in_body = out == body_id
        count = int(in_body.sum())
        in_body &= ct_hu < options.air_hu
        if count and in_body.any():
            regions, found = ndimage.label(in_body)
            del in_body
            sizes = region_sizes(regions, found)
            sizes[0] = 0
            table = np.nonzero(sizes >= options.table_fraction * count)[0]  # at most 1 / table_fraction
            for region in table:
                np.copyto(out, 0, where=regions == region, casting="unsafe")
            tick(7, ENVELOPE_STEPS)
    tick(ENVELOPE_STEPS, ENVELOPE_STEPS)
    return out


def body_from_ct(ct_hu: np.ndarray, options: BodyOptions | None = None, labels: np.ndarray | None = None) -> np.ndarray:
    """Boolean body mask of a CT (HU, (x, y, z)): the voxels ``envelope_from_ct`` puts in the body
    (labelled or envelope), with ``labels`` (same shape) when given, else with no labels (the
    table-piece step then runs only if ``options.labels_have_lungs`` says so)."""
    if labels is None:
        labels = np.zeros(ct_hu.shape, np.uint8)
    return envelope_from_ct(labels, ct_hu, 1, options) != 0


def body_from_labels(labels: np.ndarray, spacing_mm, closing_mm: float = LABELS_CLOSING_MM) -> np.ndarray:
    """Boolean body mask from a label volume alone (no CT): the labelled voxels, closed with a ball of
    radius ``closing_mm`` (gaps between organs), holes filled. Unlike ``body_from_ct`` it cannot see
    the unlabelled tissue: skin, fat, muscle and unlabelled limbs outside the labelled structures are
    not body."""
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
    labels: np.ndarray, body_id: int, ct_hu: np.ndarray | None = None, spacing_mm=(1.0, 1.0, 1.0),
    options: BodyOptions | None = None, progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, int]:
    """Copy of ``labels`` with ``body_id`` on every body voxel that holds no label.

    The body comes from ``ct_hu`` (same grid, HU) when given (``envelope_from_ct``, the reference's
    algorithm, ``options`` its parameters), else from the labels (``body_from_labels``; ``spacing_mm``
    (x, y, z) sizes its closing). Returns the new labels and the number of voxels set to ``body_id``.
    """
    if ct_hu is not None:
        out = envelope_from_ct(labels, ct_hu, body_id, options, progress)
        return out, int(((out == body_id) & (labels != body_id)).sum())
    body = body_from_labels(labels, spacing_mm)
    out = labels.copy()
    envelope = body & (labels == 0)
    out[envelope] = body_id
    return out, int(envelope.sum())
