"""Update only the edited region (``maisi generate --mask NEW --update PREVIOUS_CT --previous-labels OLD``).

The voxels whose label differs between ``--previous-labels`` and ``--mask``, grown by
``--update-margin`` mm (default ``DEFAULT_MARGIN_MM``), are regenerated with the inpainting
machinery of ``pipelines.inpaint`` conditioned on the NEW labels: a region of interest around them
(``CONTEXT_MM`` of context, sides multiples of 32, on the volumes' own grid in closest-RAS order, no
resampling), encoded with the exact split encoder; after every sampler step the latent outside the
region is the encoded previous CT diffused to that step; decoded, the voxels where the new labels are
background set to −1000 HU as a generation does, and composited: generated inside the region,
fading to the previous CT over ``FEATHER_VOXELS`` at its border. Every voxel outside the region is
PREVIOUS_CT's, bit for bit. Same model, steps and sampler as the request; noise from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..anatomy.labels import BACKGROUND, body_region_from_mask
from ..errors import InputError
from ..io.geometry import Volume, to_closest_ras, undo_reorientation
from ..models.presets import BODY_REGIONS, ModelPreset, check_sampler, modality_code
from ..validation import check_mask_values, check_steps
from .inpaint import FEATHER_VOXELS, _crop, _roi_box, blended_sample, composite, decode_region, encode_region, paste
from .plan import HU_BACKGROUND, GenerationPlan

DEFAULT_MARGIN_MM = 10.0  # regenerated around the changed voxels: room for the new organ's boundary to settle


@dataclass
class UpdateSource:
    """What an update starts from, read and checked: the previous CT, the changed voxels (bool on
    the grid of the three volumes) and the margin (mm)."""

    previous: Volume
    changed: np.ndarray
    margin_mm: float


def _grid_text(volume: Volume) -> str:
    return f"{'×'.join(map(str, volume.shape))} voxels at {'×'.join(f'{s:.4g}' for s in volume.spacing)} mm"


def read_update_source(request, mask: Volume) -> UpdateSource:
    """Read ``--update`` and ``--previous-labels`` (put into ``mask``'s index order when they hold the
    same voxels in another order, e.g. a DICOM series); one-line ``InputError`` when the three grids
    differ (shape, or affine beyond 1 µm) or when no label changed."""
    from ..io.geometry import onto_grid_of  # the same voxels in another axis order (DICOM vs NIfTI) are fine
    from ..io.volumes import read_volume

    read = {"--update": read_volume(request.update, modality="CT"), "--previous-labels": read_volume(request.previous_labels)}
    for option, path in (("--update", request.update), ("--previous-labels", request.previous_labels)):
        volume, read[option] = read[option], onto_grid_of(read[option], mask)
        if read[option] is None:
            raise InputError(f"{option} {path}: not on --mask's grid ({_grid_text(volume)} vs {_grid_text(mask)}, or "
                             "another orientation or origin); an update needs the three volumes on one grid")
    previous, old = read["--update"], read["--previous-labels"]
    new_labels = check_mask_values(mask.array, "--mask")
    old_labels = check_mask_values(old.array, f"--previous-labels {request.previous_labels}")
    changed = new_labels != old_labels
    if not changed.any():
        raise InputError(f"--update: --mask holds the same labels as --previous-labels {request.previous_labels}; "
                         "nothing changed, nothing to regenerate")
    margin = DEFAULT_MARGIN_MM if request.update_margin_mm is None else float(request.update_margin_mm)
    return UpdateSource(previous, changed, margin)


def update_plan(request, preset: ModelPreset, mask: Volume) -> GenerationPlan:
    """The conditions of an update (steps, sampler, modality, guidance, body region) with the new
    labels in the closest-RAS frame; the volumes' own grid (the region of interest is cut from it)."""
    ras, reorientation = to_closest_ras(mask)
    labels = check_mask_values(ras.array, "--mask")
    notes: list[str] = []
    region = None
    if preset.uses_body_region:
        if request.body_region:
            region = (request.body_region[0], request.body_region[-1])
        else:
            region = body_region_from_mask(labels)
            if region is None:
                raise InputError(f"{preset.name} is conditioned on the body region and the mask holds none: give "
                                 f"--body-region ({', '.join(BODY_REGIONS)})")
    steps = int(request.steps if request.steps is not None else preset.scheduler.default_steps)
    notes += check_steps(steps, preset)
    guidance = float(preset.default_guidance_scale if request.guidance_scale is None else request.guidance_scale)
    return GenerationPlan(ras.shape, tuple(float(s) for s in ras.spacing), steps, labels, region, mask.affine.copy(),
                          reorientation, notes, modality_code=modality_code(preset, request.modality),
                          guidance_scale=guidance, sampler=check_sampler(request.sampler, preset.scheduler.kind))


def within_margin(changed: np.ndarray, spacing, margin_mm: float) -> np.ndarray:
    """The voxels whose centre lies within ``margin_mm`` (mm, Euclidean) of a changed voxel's centre;
    computed in the box around the change only."""
    from scipy import ndimage

    spacing = np.asarray(spacing, dtype=np.float64)
    where = np.argwhere(changed)
    reach = np.ceil(margin_mm / spacing).astype(int) + 1
    lo = np.maximum(where.min(axis=0) - reach, 0)
    hi = np.minimum(where.max(axis=0) + 1 + reach, changed.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    region = np.zeros(changed.shape, bool)
    region[box] = ndimage.distance_transform_edt(~changed[box], sampling=spacing) <= margin_mm
    return region


def regenerate_changed(
    model,
    plan: GenerationPlan,
    source: UpdateSource,
    seed: int,
    progress: Callable[[str, int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    numerics=None,
) -> tuple[Volume, list[str], tuple[int, int, int]]:
    """The previous CT with the changed region regenerated (see the module docstring): (CT on the
    previous CT's grid and dtype, notes, ROI shape). ``numerics``: the precision of the networks and
    the decode (``maisicore.precision``; the encoder stays float32)."""
    from scipy import ndimage

    previous = source.previous
    prev_ras, reorientation = to_closest_ras(previous)
    changed_ras = to_closest_ras(Volume(source.changed.astype(np.uint8), previous.affine))[0].array.astype(bool)
    spacing = tuple(float(s) for s in prev_ras.spacing)
    region = within_margin(changed_ras, spacing, source.margin_mm)
    start, size = _roi_box(region, spacing, prev_ras.shape, too_large="the changed region is too large to update",
                           advice="regenerate the whole CT (leave out --update) or change less at a time")
    roi_ct = _crop(prev_ras.array, start, size, HU_BACKGROUND)
    edit = _crop(region, start, size, False)
    core = ndimage.binary_erosion(edit, iterations=FEATHER_VOXELS) | _crop(changed_ras, start, size, False)
    roi_labels = _crop(plan.labels, start, size, BACKGROUND)
    uncond = None
    if plan.guidance_scale > 0:
        from ..anatomy.tumors import tumor_free_labels

        uncond = tumor_free_labels(roi_labels)
    roi_plan = GenerationPlan(tuple(int(s) for s in size), spacing, plan.steps, roi_labels, plan.body_region,
                              np.eye(4), None, modality_code=plan.modality_code, guidance_scale=plan.guidance_scale,
                              uncond_labels=uncond, sampler=plan.sampler)
    known = encode_region(model, roi_ct)
    latents = blended_sample(model, roi_plan, known, edit, seed, progress, cancel, numerics)
    generated = decode_region(model, latents, progress, numerics)
    generated[roi_labels == BACKGROUND] = HU_BACKGROUND
    roi_out = composite(roi_ct, generated, core, edit)
    out = prev_ras.array.copy()
    paste(out, roi_out, edit, start, size)
    roi_shape = tuple(int(s) for s in size)
    notes = [f"UPDATE: {int(changed_ras.sum())} changed voxels and {source.margin_mm:g} mm around them "
             f"({int(region.sum())} voxels) regenerated in a {'×'.join(map(str, roi_shape))} region, {plan.steps} "
             f"steps; every other voxel is the previous CT's"]
    return Volume(undo_reorientation(out, reorientation), previous.affine.copy()), notes, roi_shape
