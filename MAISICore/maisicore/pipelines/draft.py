"""Drafts (``maisi generate --draft``): the same request at fewer voxels, a quick look to judge a
mask before paying for the full result.

A draft samples a grid of ``DRAFT_FACTOR`` times fewer voxels per axis (each side a multiple of 32,
at least 32: the VAE divides by 4 and the UNet halves the latent 3 times) covering the same field
of view, with the labels sampled (nearest) onto it, with the second-order ``ab2`` sampler and at
most ``DRAFT_MAX_STEPS`` network evaluations (rectified-flow models only). The decoded CT is
resampled (trilinear) onto the requested grid, so it overlays the user's mask, which stays the
labels of the result at full resolution; voxels where the full-resolution mask is background are
−1000 HU. Every output says DRAFT (notes, result line, NIfTI ``descrip``, NRRD ``content``, DICOM
series description).

The draft grid works in the model's (closest-RAS) index frame: draft voxel ``i`` covers full voxels
``[i·r, (i+1)·r)`` with ``r = full / draft`` per axis (the same field of view, edges aligned).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch

from ..anatomy.labels import BACKGROUND
from ..errors import Cancelled, InputError
from ..io.geometry import Volume
from ..models.presets import ModelPreset
from ..vae.decode import decode_latents
from .plan import GenerationPlan, ProgressFn, generate_latents, unit_image_to_volume
from .requests import DRAFT_MAX_STEPS

# Voxels per draft voxel along each axis. Measured on a 2-core AVX2 CPU with official-width rflow-ct
# (benchmarks/interactive_loop.py, README "Drafts"): the decode grows with the voxels (128×128×64
# ≈ 100 s, 64×64×32 ≈ 13 s), so the 256×256×128 request is drafted at 64×64×32.
DRAFT_FACTOR = 4
DRAFT_SAMPLER = "ab2"
DRAFT_STEPS = DRAFT_MAX_STEPS - 1  # ab2: N steps cost N + 1 evaluations (a Heun start)
DRAFT_MULTIPLE = 32


def check_draft_model(preset: ModelPreset) -> None:
    """A draft needs a rectified-flow model (its ``ab2`` sampler); one-line ``InputError`` otherwise."""
    if preset.scheduler.kind != "rflow":
        raise InputError(f"--draft samples with ab2, a rectified-flow solver: {preset.name} is a DDPM model; "
                         "leave out --draft (or use rflow-ct)")


def draft_size(size: Sequence[int], factor: int = DRAFT_FACTOR) -> tuple[int, int, int]:
    """The draft grid's voxels: each side ``size / factor`` rounded to a multiple of 32, at least 32
    and at most the side itself."""
    return tuple(int(min(max(DRAFT_MULTIPLE, round(n / factor / DRAFT_MULTIPLE) * DRAFT_MULTIPLE),
                         max(DRAFT_MULTIPLE, n))) for n in size)


def _draft_indices(full: int, draft: int) -> np.ndarray:
    """For each draft voxel, the full-grid voxel at its centre (nearest sampling of labels)."""
    return np.minimum(np.floor((np.arange(draft) + 0.5) * full / draft).astype(np.int64), full - 1)


def draft_plan(plan: GenerationPlan, steps: int | None = None) -> GenerationPlan:
    """``plan`` on the draft grid: fewer voxels over the same field of view, the labels sampled
    (nearest) onto it, ``ab2`` with ``steps`` (at most ``DRAFT_STEPS``) steps."""
    size = draft_size(plan.size)
    ratio = np.asarray(plan.size, dtype=np.float64) / np.asarray(size, dtype=np.float64)
    spacing = tuple(float(s * r) for s, r in zip(plan.spacing, ratio))
    labels = uncond = None
    if plan.labels is not None:
        index = np.ix_(*[_draft_indices(n, d) for n, d in zip(plan.size, size)])
        labels = np.ascontiguousarray(plan.labels[index])
        if not np.any(labels != BACKGROUND):
            raise InputError("--draft: the mask's labels vanish on the draft grid (they are smaller than a draft "
                             "voxel); leave out --draft")
        if plan.guidance_scale > 0:
            from ..anatomy.tumors import tumor_free_labels

            uncond = tumor_free_labels(labels)
    steps = min(int(steps or DRAFT_STEPS), DRAFT_STEPS)
    return dataclasses.replace(plan, size=size, spacing=spacing, labels=labels, uncond_labels=uncond, steps=steps,
                               sampler=DRAFT_SAMPLER, notes=[])


def draft_evaluations(preset: ModelPreset, draft: GenerationPlan) -> int:
    """Network evaluations the draft's sampler makes (``ab2``: steps + 1 for its Heun start)."""
    from ..diffusion.schedulers import Schedule

    return Schedule(preset, draft.steps, draft.latent_shape[1:], draft.sampler).evaluations()


def upsample(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A draft-grid image (x, y, z) resampled trilinearly onto the full grid of ``size`` voxels
    (float32; values beyond the outermost draft voxel centres are the edge values)."""
    from scipy import ndimage

    scale = np.asarray(image.shape, dtype=np.float64) / np.asarray(size, dtype=np.float64)
    return ndimage.affine_transform(image.astype(np.float32), scale, offset=0.5 * scale - 0.5,
                                    output_shape=tuple(int(s) for s in size), order=1, mode="nearest")


def describe_draft(plan: GenerationPlan, draft: GenerationPlan, evaluations: int) -> str:
    """The note every draft carries."""
    size = "×".join(map(str, draft.size))
    spacing = "×".join(f"{s:.3g}" for s in draft.spacing)
    return (f"DRAFT: sampled at {size} voxels ({spacing} mm) with {draft.sampler}, {draft.steps} steps "
            f"({evaluations} network evaluations), resampled onto {'×'.join(map(str, plan.size))}; a quick look, "
            "not a final result (leave out --draft for one)")


@torch.no_grad()
def generate_draft(
    model,
    plan: GenerationPlan,
    draft: GenerationPlan,
    seed: int = 0,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    decode: str = "exact",
    memory_budget_bytes: int | None = None,
    log: Callable[[str], None] | None = None,
    devices=None,
    numerics=None,
) -> Volume:
    """Sample ``draft`` (``draft_plan(plan)``), decode, resample onto ``plan``'s grid and return the
    CT (int16 HU; MR models: float32) with ``plan``'s shape and affine. ``numerics``: the precision of
    each stage (``maisicore.precision``; default the reference's for the device)."""
    latents = generate_latents(model, draft, seed, progress, cancel, numerics)
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")
    if progress:
        progress("decode", 0, 1)
    clip_max = None if model.preset.intensity == "mr" else 1.0
    image01 = decode_latents(model.autoencoder, latents, model.scale_factor, decode, memory_budget_bytes, log=log,
                             clip_max=clip_max, devices=devices, numerics=numerics)[0, 0].numpy()
    volume = unit_image_to_volume(model.preset, image01, plan, resize=lambda image: upsample(image, plan.size))
    if progress:
        progress("decode", 1, 1)
    return volume
