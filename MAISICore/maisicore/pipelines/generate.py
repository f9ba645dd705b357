"""Generate a CT from noise, optionally conditioned on a MAISI label volume.

Stages (as the reference does them):
1. Check the request (``plan_generation``): grid, spacing, mask, body region, steps. No network.
2. Noise: a float16-rounded normal latent (B=1, 4, X/4, Y/4, Z/4) from ``seed``.
3. Denoising loop: ControlNet(mask bits) residuals + diffusion UNet(spacing×100, modality or body
   region one-hots ×100) → scheduler step. Without a mask the UNet runs alone.
4. Decode latents / scale_factor → [0, 1] → HU; voxels where the mask is background → −1000; int16.

Arrays in and out are indexed (x, y, z) with index → RAS affines (``maisicore.io.geometry``). A mask
in any orientation is permuted/flipped to the closest RAS order for the model and the result is
put back, so the output has the mask's array shape and exact affine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..anatomy.labels import (
    BACKGROUND,
    binarize_labels,
    body_region_from_mask,
    region_one_hot,
)
from ..diffusion.sampling import sample
from ..diffusion.schedulers import Schedule
from ..errors import Cancelled, InputError
from ..io.geometry import (
    Reorientation,
    Volume,
    centered_affine,
    to_closest_ras,
    undo_reorientation,
)
from ..models.presets import (
    BODY_REGIONS,
    CT_MODALITY,
    DEFAULT_BODY_REGION,
    DEFAULT_SIZE,
    DEFAULT_SPACING_MM,
    ModelPreset,
)
from ..models.weights import LoadedModel
from ..vae.decode import autocast_for, decode_latents, unit_to_hu
from ..validation import check_body_regions, check_grid, check_mask_values, check_steps

HU_BACKGROUND = -1000

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total); stages "denoise", "decode"


@dataclass
class GenerationPlan:
    """A checked request: everything the sampler needs, in the model's (closest-RAS) frame."""

    size: tuple[int, int, int]  # voxels, x y z in the model frame
    spacing: tuple[float, float, float]  # mm
    steps: int
    labels: np.ndarray | None  # int64 (x, y, z) in the model frame, or None
    body_region: tuple[str, str] | None  # (top, bottom) for models conditioned on it
    output_affine: np.ndarray  # index → RAS of the returned array
    reorientation: Reorientation | None  # how to put the model-frame array back on the mask grid
    notes: list[str] = field(default_factory=list)  # warnings to show the user

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (4, self.size[0] // 4, self.size[1] // 4, self.size[2] // 4)


def plan_generation(
    preset: ModelPreset,
    size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    mask: Volume | None = None,
    body_region: Sequence[str] | None = None,
    steps: int | None = None,
    allow_any_size: bool = False,
) -> GenerationPlan:
    """Check a request against the preset's rules and resolve defaults; raises ``InputError``.

    Args:
        size: output voxels (x, y, z); default: the mask's shape, else 256³.
        spacing: output voxel size, mm (x, y, z); default: the mask's, else 1.5×1.5×2.
        mask: MAISI label volume (ids of the label dictionary, body = 200); the output takes its grid.
        body_region: one or more of head, chest, abdomen, lower (top first); ddpm-ct only.
        steps: denoising steps; default the model's (rflow-ct 30, ddpm-ct 1000).
        allow_any_size: accept any size that is a multiple of 32 and any positive spacing.
    """
    notes: list[str] = []
    notes += check_body_regions(body_region, preset)
    reorientation = None
    labels = None
    if mask is not None:
        ras_mask, reorientation = to_closest_ras(mask)
        mask_spacing = ras_mask.spacing
        if size is not None and tuple(size) != ras_mask.shape:
            raise InputError(
                f"--size {'×'.join(map(str, size))} differs from the mask's {'×'.join(map(str, ras_mask.shape))} "
                "voxels (x y z after reorienting to RAS); leave out --size or resample the mask"
            )
        if spacing is not None and not np.allclose(spacing, mask_spacing, rtol=1e-3, atol=1e-4):
            raise InputError(
                f"--spacing {'×'.join(f'{s:g}' for s in spacing)} mm differs from the mask's "
                f"{'×'.join(f'{s:.4g}' for s in mask_spacing)} mm; leave out --spacing"
            )
        size, spacing = ras_mask.shape, mask_spacing
        labels = check_mask_values(ras_mask.array)
        if not np.any(labels != BACKGROUND):
            raise InputError("mask: every voxel is background (0); a mask needs at least one label")
        output_affine = mask.affine.copy()
    else:
        size = tuple(int(s) for s in (size or DEFAULT_SIZE))
        spacing = tuple(float(s) for s in (spacing or DEFAULT_SPACING_MM))
        output_affine = None
    size = tuple(int(s) for s in size)
    spacing = tuple(float(s) for s in spacing)
    notes += check_grid(size, spacing, preset.grid, allow_any_size, body_region)
    if output_affine is None:
        output_affine = centered_affine(size, spacing)

    region = None
    if preset.uses_body_region:
        if body_region:
            region = (body_region[0], body_region[-1])
        elif labels is not None:
            region = body_region_from_mask(labels)
            if region is None:
                raise InputError(
                    f"{preset.name} is conditioned on the body region and the mask holds none of brain/skull, "
                    f"lungs, abdominal organs or femurs: give --body-region ({', '.join(BODY_REGIONS)})"
                )
        else:
            region = (DEFAULT_BODY_REGION[0], DEFAULT_BODY_REGION[-1])
            notes.append(f"no --body-region or mask: {preset.name} conditioned on {DEFAULT_BODY_REGION[0]} (reference default)")
    steps = int(steps if steps is not None else preset.scheduler.default_steps)
    notes += check_steps(steps, preset)
    return GenerationPlan(size, spacing, steps, labels, region, output_affine, reorientation, notes)


def initial_noise(latent_shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Standard normal latent (1, *latent_shape), rounded to float16 like the reference, on CPU."""
    return torch.randn((1, *latent_shape), generator=generator).half()


def make_denoise_fn(model: LoadedModel, plan: GenerationPlan):
    """Fold every condition of the plan into ``denoise_fn(x, t) -> prediction`` for ``sample``."""
    preset = model.preset
    device = model.device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet_kwargs: dict[str, torch.Tensor] = {
        # spacing enters the UNet in units of 0.01 mm (reference: float16 spacing × 100)
        "spacing_tensor": (torch.tensor([plan.spacing]).half() * 100).to(device, dtype),
    }
    class_labels = None
    if preset.uses_modality:
        class_labels = torch.full((1,), CT_MODALITY, dtype=torch.long, device=device)
        unet_kwargs["class_labels"] = class_labels
    if preset.uses_body_region:
        top, bottom = plan.body_region
        unet_kwargs["top_region_index_tensor"] = (torch.tensor([region_one_hot(top)]).half() * 100).to(device, dtype)
        unet_kwargs["bottom_region_index_tensor"] = (torch.tensor([region_one_hot(bottom)]).half() * 100).to(
            device, dtype
        )
    condition = None
    if plan.labels is not None:
        labels = torch.from_numpy(plan.labels)[None, None]
        condition = binarize_labels(labels, preset.label_bits).to(device, dtype)

    def denoise_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        residuals = {}
        if condition is not None:
            down, mid = model.controlnet(x=x, timesteps=t, controlnet_cond=condition, class_labels=class_labels)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return model.diffusion_unet(x=x, timesteps=t, **unet_kwargs, **residuals)

    return denoise_fn


@torch.no_grad()
def generate_latents(
    model: LoadedModel,
    plan: GenerationPlan,
    seed: int = 0,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Denoised latent (1, 4, X/4, Y/4, Z/4) for ``plan``, deterministic for a given ``seed`` and device."""
    device = model.device
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = initial_noise(plan.latent_shape, generator)
    x = noise.to(device) if device.type == "cuda" else noise.float()
    step_generator = generator if device.type == "cpu" else torch.Generator(device).manual_seed(int(seed) + 1)
    schedule = Schedule(model.preset, plan.steps, plan.latent_shape[1:])
    callback = (lambda done, total: progress("denoise", done, total)) if progress else None
    with autocast_for(device):
        return sample(make_denoise_fn(model, plan), x, schedule, step_generator, callback, cancel)


def latents_to_ct(
    model: LoadedModel,
    latents: torch.Tensor,
    plan: GenerationPlan,
    decode: str = "exact",
    memory_budget_bytes: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Volume:
    """Decode, map to HU, set background to −1000 and return an int16 volume on the output grid."""
    image01 = decode_latents(model.autoencoder, latents, model.scale_factor, decode, memory_budget_bytes, log=log)
    image01 = image01[0, 0].numpy()
    hu = unit_to_hu(image01)
    if plan.labels is not None:
        hu[plan.labels == BACKGROUND] = HU_BACKGROUND
    ct = np.rint(hu).astype(np.int16)
    if plan.reorientation is not None:
        ct = undo_reorientation(ct, plan.reorientation)
    return Volume(ct, plan.output_affine.copy())


def generate(
    model: LoadedModel,
    plan: GenerationPlan,
    seed: int = 0,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    decode: str = "exact",
    memory_budget_bytes: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Volume:
    """Run a checked plan: a synthetic CT (int16 HU, (x, y, z), index → RAS affine).

    Args:
        progress: called as ``progress(stage, done, total)``; stages ``denoise`` then ``decode``.
        cancel: checked between steps; returning True raises ``maisicore.errors.Cancelled``.
        decode: ``exact`` (tensor splitting, default), ``sliding-window`` (reference) or ``plain``.
        memory_budget_bytes: for the exact decode; default what the device has free.
        log: receives one-line notes (the decode plan).
    """
    latents = generate_latents(model, plan, seed, progress, cancel)
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")
    if progress:
        progress("decode", 0, 1)
    ct = latents_to_ct(model, latents, plan, decode, memory_budget_bytes, log)
    if progress:
        progress("decode", 1, 1)
    return ct
