"""Clean-up of a generated anatomy mask: the reference's ``general_mask_generation_post_process``
(NV-Generate-CTMR scripts/utils.py) step for step, so the result is the same label volume.

The steps, on a MAISI label volume (x, y, z):
1. body: the labelled region, eroded, its largest 26-connected part kept, dilated back; labels
   outside it are cleared;
2. tumours: every tumour but the requested one becomes its host organ (lung lobe, pancreas,
   liver, colon, body); the requested one is closed (filled) and, except hepatic tumours and bone
   lesions, reduced to its largest part;
3. organs (liver, pancreas, spleen, stomach, kidneys, lung lobes, vessels, … and the vertebrae
   unless a bone lesion is requested): only the largest part kept (the rest becomes body), then
   closed; small bowel and colon outside the largest intestinal part become body;
4. rules for the requested tumour (lung tumour: surrounding lung lobe filled back; hepatic tumour:
   liver and spleen filled back; colon cancer: the tumour grown into removed voxels);
5. hepatic vessels become liver, the airway and the requested tumour are put back.

Morphology is a 3×3×3 cube with zero padding outside the volume (the reference's MONAI
``erode``/``dilate`` with ``pad_value=0`` on binary masks); components are 26-connected (the
reference's ``skimage.measure.label(connectivity=3)``). Work is cropped to each mask's bounding box
with a margin that leaves every result unchanged. numpy and scipy only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .tumors import LUNG_LOBE_IDS as LUNG_LOBES
from .tumors import LUNG_TUMOR_ID as LUNG_TUMOR
from .tumors import TUMOR_TO_ORGAN_IDS

BODY = 200
HEPATIC_VESSEL = 25
AIRWAY = 132
LIVER = 1
SPLEEN = 3
HEPATIC_TUMOR, PANCREATIC_TUMOR, COLON_TUMOR, BONE_LESION = 26, 24, 27, 128
INTESTINE = (12, 13, 19, 62)  # stomach, duodenum, small bowel, colon
SMALL_BOWEL, COLON = 19, 62
# Tumour → the label it becomes when it is not the requested tumour (reference order): the organs of
# ``remove_tumors`` (anatomy.tumors), the first lung lobe for a lung tumour, the body for a bone lesion.
TUMOR_HOSTS = {LUNG_TUMOR: LUNG_LOBES[0], **{t: TUMOR_TO_ORGAN_IDS[t] for t in (PANCREATIC_TUMOR, HEPATIC_TUMOR,
                                                                             COLON_TUMOR)}, BONE_LESION: BODY}
# Organs reduced to their largest part, in the reference's order (10, duodenum, appears twice there).
LARGEST_PART_ORGANS = (1, 4, 10, 12, 3, 28, 29, 30, 31, 32, 5, 14, 13, 6, 7, 8, 9, 10)
VERTEBRAE = tuple(range(33, 60))

_CUBE = np.ones((3, 3, 3), dtype=bool)


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` grown by ``margin`` voxels (clipped to the volume), or None if empty."""
    where = np.nonzero(mask.any(axis=(1, 2)))[0], np.nonzero(mask.any(axis=(0, 2)))[0], np.nonzero(mask.any(axis=(0, 1)))[0]
    if any(len(w) == 0 for w in where):
        return None
    return tuple(slice(max(int(w[0]) - margin, 0), min(int(w[-1]) + margin + 1, n)) for w, n in zip(where, mask.shape))


def dilate(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by a 3×3×3 cube (outside the volume counts as 0)."""
    return ndimage.binary_dilation(mask, structure=_CUBE)


def erode(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by a 3×3×3 cube, zero outside the volume (the border erodes)."""
    return ndimage.binary_erosion(mask, structure=_CUBE, border_value=0)


def closed(mask: np.ndarray, times: int = 2) -> np.ndarray:
    """``mask`` closed ``times`` times (dilate then erode), the reference's ``organ_fill_by_closing``.
    Computed on the bounding box grown by 2·times + 1 voxels: nothing reaches farther."""
    out = np.zeros(mask.shape, dtype=bool)
    box = _box(mask, 2 * times + 1)
    if box is None:
        return out
    part = mask[box]
    for _ in range(times):
        part = erode(dilate(part))
    out[box] = part
    return out


def grown_into(labels: np.ndarray, label: int, removed: np.ndarray) -> np.ndarray:
    """Voxels of ``removed`` within three dilations of ``label`` (the reference's
    ``organ_fill_by_removed_mask``)."""
    out = np.zeros(labels.shape, dtype=bool)
    box = _box(labels == label, 4)
    if box is None:
        return out
    part = labels[box] == label
    for _ in range(3):
        part = dilate(part)
    out[box] = part & (removed[box] != 0)
    return out


def keep_largest(labels: np.ndarray, targets, fill) -> np.ndarray:
    """The reference's ``supress_non_largest_components``: for each label of ``targets``, label the
    26-connected components of its mask (0 elsewhere) and keep the voxels carrying one of the two
    most frequent component ids (normally 0, the rest of the volume, and the largest component);
    every other voxel becomes ``fill``. The suppressed voxels of all targets are found on the input
    first, then filled. Returns a new array of the input's dtype."""
    total = labels.size
    suppressed = np.zeros(labels.shape, dtype=bool)
    for target in targets:
        mask = labels == target
        box = _box(mask, 0)
        if box is None:
            continue  # only id 0: one value, nothing is suppressed
        components, count = ndimage.label(mask[box], structure=_CUBE)
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        sizes[0] += total - components.size  # the voxels outside the box carry id 0 too
        ids = np.arange(count + 1)
        if sizes[0] == 0:  # the label fills the volume: id 0 does not occur
            ids, sizes = ids[1:], sizes[1:]
        keep = ids[np.argsort(sizes)[::-1][:2]]
        if len(keep) < 2:
            continue
        inside = (components != keep[0]) & (components != keep[1])
        if 0 not in keep:  # the rest of the volume (id 0) is suppressed as well
            before = suppressed[box] | inside
            suppressed[...] = True
            suppressed[box] = before
        else:
            suppressed[box] |= inside
    out = labels.copy()
    out[suppressed] = fill
    return out


def _neighbour_mode(labels: np.ndarray, ring: np.ndarray, label: int) -> int | None:
    """Most frequent non-zero label in ``ring`` outside ``label`` (smallest on ties), or None."""
    values = labels[ring & (labels != label)]
    values = values[values != 0]
    if values.size == 0:
        return None
    unique, counts = np.unique(values, return_counts=True)
    return int(unique[np.argmax(counts)])


def post_process_generated_mask(labels: np.ndarray, target_tumor: int | None = None) -> np.ndarray:
    """The generated mask after the reference's clean-up (module docstring), int64 (x, y, z).

    Args:
        labels: MAISI label ids (x, y, z) as decoded and remapped.
        target_tumor: MAISI id of the requested tumour (``anatomy.maskgen.target_tumor_label``), or None.
    """
    volume = np.asarray(labels).astype(np.int64)
    hepatic_vessel = volume == HEPATIC_VESSEL
    airway = volume == AIRWAY

    body = keep_largest(erode(volume > 0).astype(np.uint8), [1], 0)
    volume = volume * dilate(body.astype(bool))

    for tumor in TUMOR_HOSTS:
        if tumor != target_tumor:
            volume[volume == tumor] = TUMOR_HOSTS[tumor]
        else:
            volume[closed(volume == tumor)] = tumor
            volume[closed(volume == tumor)] = tumor
    if target_tumor is not None and target_tumor not in (HEPATIC_TUMOR, BONE_LESION):
        volume = keep_largest(volume, [target_tumor], BODY)
    target_mask = volume == target_tumor if target_tumor is not None else np.zeros(volume.shape, dtype=bool)

    organs = LARGEST_PART_ORGANS + (VERTEBRAE if target_tumor != BONE_LESION else ())
    data = keep_largest(volume, organs, BODY)
    organ_removed = volume != data
    intestine = keep_largest(np.isin(data, INTESTINE).astype(np.int64), [1], 0) != 0
    intestine_removed = ((data == SMALL_BOWEL) | (data == COLON)) & ~intestine
    data[intestine_removed] = BODY

    for organ in organs:
        data[closed(data == organ)] = organ

    if target_tumor == LUNG_TUMOR and target_mask.any():
        ring = dilate(data == LUNG_TUMOR)
        mode = _neighbour_mode(data, ring, LUNG_TUMOR)
        if mode in LUNG_LOBES:
            ring = dilate(ring)
            data[grown_into(data, mode, ring & (data != LUNG_TUMOR))] = mode
        ring = dilate(ring)
        data[grown_into(data, LUNG_TUMOR, ring & organ_removed)] = LUNG_TUMOR
        for lobe in LUNG_LOBES:
            for _ in range(3):
                data[closed(data == lobe)] = lobe

    if target_tumor == HEPATIC_TUMOR and target_mask.any():
        for _ in range(2):
            data[grown_into(data, LIVER, intestine_removed)] = LIVER
        for _ in range(2):
            data[grown_into(data, SPLEEN, organ_removed)] = SPLEEN
        ring = dilate(dilate(data == HEPATIC_TUMOR))
        data[grown_into(data, HEPATIC_TUMOR, ring & organ_removed)] = HEPATIC_TUMOR
        # As the reference: tumour, vessel and liver voxels "overlapping" (a voxel holds one label,
        # so none do) keep their largest part; the tumour kept for step 5 is therefore empty.
        overlap = ((data == HEPATIC_TUMOR).astype(np.int64) + (data == HEPATIC_VESSEL) + (data == LIVER)) > 1
        overlap_kept = keep_largest(overlap.astype(np.int64), [1], 0) != 0
        data[overlap & ~overlap_kept] = BODY
        target_mask &= overlap_kept
        for _ in range(3):
            data[closed(data == LIVER)] = LIVER

    if target_tumor == COLON_TUMOR and target_mask.any():
        ring = dilate(dilate(data == COLON_TUMOR))
        data[grown_into(data, COLON_TUMOR, ring & organ_removed)] = COLON_TUMOR

    data[hepatic_vessel] = LIVER
    data[airway] = AIRWAY
    if target_tumor is not None:
        data[target_mask] = target_tumor
    return data
