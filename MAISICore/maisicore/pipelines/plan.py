"""A checked generation plan and running it: conditions, the denoising loop, the decode.

Stages (as the reference does them):
1. Check the request (``plan_generation``): grid, spacing, mask, body region, steps. No network.
2. Noise: a float16-rounded normal latent (B=1, 4, X/4, Y/4, Z/4) from ``seed``.
3. Denoising loop: ControlNet(mask bits) residuals + diffusion UNet(spacing×100, modality or body
   region one-hots ×100) → scheduler step. Without a mask the UNet runs alone.
4. Decode latents / scale_factor → [0, 1] → HU; voxels where the mask is background → −1000; int16.

Arrays in and out are indexed (x, y, z) with index → RAS affines (``maisicore.io.geometry``). A mask
in any orientation is permuted/flipped to the closest RAS order for the model and the result is
put back, so the output has the mask's array shape and exact affine.

The request → pipeline → result path over these stages is ``maisicore.pipelines.generate``; the
drafts, region updates and inpainting build on this module too (it imports none of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..anatomy.labels import (
    BACKGROUND,
    body_region_from_mask,
)
from ..diffusion.conditioning import controlnet_condition, unet_inputs
from ..diffusion.sampling import sample, start_sampling
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
    ModelPreset,
    modality_code,
)
from ..models.weights import LoadedModel
from ..precision import Numerics, numerics_for, reference_numerics_for, resolve_precision, torch_dtype
from ..vae.decode import decode_latents, unit_to_hu
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
    modality_code: int = CT_MODALITY  # the UNet's class label (modality_mapping.json)
    guidance_scale: float = 0.0  # classifier-free guidance; 0: none (the unguided loop, unchanged)
    # The unconditional ControlNet labels of guidance with a mask: the mask with tumours replaced
    # by their organs (reference remove_tumors), int64 (x, y, z) in the model frame.
    uncond_labels: np.ndarray | None = None
    sampler: str = "euler"  # rectified-flow solver (maisicore.diffusion.schedulers.SAMPLERS)

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
    modality: str | None = None,
    guidance_scale: float | None = None,
    mask_to_come: bool = False,
) -> GenerationPlan:
    """Check a request against the preset's rules and resolve defaults; raises ``InputError``.

    Args:
        size: output voxels (x, y, z); default: the mask's shape, else 256³.
        spacing: output voxel size, mm (x, y, z); default: the mask's, else 1.5×1.5×2.
        mask: MAISI label volume (ids of the label dictionary, body = 200); the output takes its grid.
        body_region: one or more of head, chest, abdomen, lower (top first); ddpm-ct only.
        steps: denoising steps; default the model's (rflow-ct 30, ddpm-ct 1000).
        allow_any_size: accept any size that is a multiple of 32 and any positive spacing.
        modality: a ``MODALITY_CODES`` name the model takes (``mri_t1`` …); default the model's.
        guidance_scale: classifier-free guidance (0: none); default the model's reference value.
        mask_to_come: no ``mask`` yet, one will be generated (``--anatomy-size``): no body-region
            default and no note about guidance without a mask (``with_generated_mask`` completes the plan).
    """
    notes: list[str] = []
    notes += check_body_regions(body_region, preset)
    code = modality_code(preset, modality)
    if mask is not None and preset.image_only:
        raise InputError(f"{preset.name} is an image-only model (NVIDIA published no MR ControlNet): it cannot "
                         "follow a mask; leave out --mask/--anatomy, or use rflow-ct or ddpm-ct")
    guidance = float(preset.default_guidance_scale if guidance_scale is None else guidance_scale)
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
        size = tuple(int(s) for s in (size or preset.default_size))
        spacing = tuple(float(s) for s in (spacing or preset.default_spacing))
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
        elif not mask_to_come:
            region = (DEFAULT_BODY_REGION[0], DEFAULT_BODY_REGION[-1])
            notes.append(f"no --body-region or mask: {preset.name} conditioned on {DEFAULT_BODY_REGION[0]} (reference default)")
    steps = int(steps if steps is not None else preset.scheduler.default_steps)
    notes += check_steps(steps, preset)
    uncond = None
    if guidance > 0:
        if labels is not None:
            from ..anatomy.tumors import tumor_free_labels

            uncond = tumor_free_labels(labels)
        elif not preset.uses_modality and not mask_to_come:
            notes.append(f"--guidance-scale: {preset.name} takes no modality label, so without a mask guidance "
                         "changes nothing (it only doubles the work)")
    return GenerationPlan(size, spacing, steps, labels, region, output_affine, reorientation, notes,
                          modality_code=code, guidance_scale=guidance, uncond_labels=uncond)


def with_generated_mask(preset: ModelPreset, plan: GenerationPlan, mask: Volume) -> GenerationPlan:
    """``plan`` (made with ``mask_to_come``) completed with a generated mask on its grid: the labels,
    the body region read from them when the model needs one and none was given, the unconditional
    labels of guidance. One-line ``InputError`` when the mask holds no label or no body region."""
    import dataclasses

    labels = check_mask_values(mask.array, "generated mask")
    if not np.any(labels != BACKGROUND):
        raise InputError("the generated mask holds no label (the mask networks gave background only); "
                         "try another --seed or other sizes")
    region = plan.body_region
    if preset.uses_body_region and region is None:
        region = body_region_from_mask(labels)
        if region is None:
            raise InputError(f"{preset.name} is conditioned on the body region and the generated mask holds none of "
                             f"brain/skull, lungs, abdominal organs or femurs: give --body-region ({', '.join(BODY_REGIONS)})")
    uncond = None
    if plan.guidance_scale > 0:
        from ..anatomy.tumors import tumor_free_labels

        uncond = tumor_free_labels(labels)
    return dataclasses.replace(plan, labels=labels, body_region=region, uncond_labels=uncond,
                               output_affine=mask.affine.copy(), notes=list(plan.notes))


def plan_conditions(preset: ModelPreset, plan: GenerationPlan, device: torch.device, dtype: torch.dtype):
    """The UNet's keyword inputs and the ControlNet condition (or None without a mask) for a plan
    (``maisicore.diffusion.conditioning``, as in training)."""
    unet_kwargs = unet_inputs(preset, [plan.spacing], [plan.modality_code],
                              [plan.body_region] if plan.body_region else None,
                              device=device, dtype=dtype, half_rounded=True)
    condition = None
    if plan.labels is not None:
        condition = controlnet_condition(torch.from_numpy(plan.labels)[None, None], preset, device, dtype)
    return unet_kwargs, condition


def _numerics(model: LoadedModel, numerics: Numerics | None) -> Numerics:
    """``numerics`` or, when None, the reference's for the model's device (every run before ``--precision``)."""
    return numerics if numerics is not None else reference_numerics_for(model.device.type)


def loop_autocast(device: torch.device, numerics: Numerics):
    """The context the whole sampling loop runs in: the reference's CUDA float16 autocast, else none
    (reduced precisions autocast each network call instead: ``reduced_precision_fn``)."""
    import contextlib

    if numerics.loop_autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch_dtype(numerics.loop_autocast))


def reduced_precision_fn(denoise_fn, device: torch.device, numerics: Numerics):
    """``denoise_fn`` with each call under ``torch.autocast(device, numerics.network_autocast)`` and its
    prediction cast back to float32, so the sampler's step and the latents stay float32 (an autocast
    around MONAI's scheduler fails on the CPU); ``denoise_fn`` itself when there is nothing to cast."""
    if numerics.network_autocast is None:
        return denoise_fn
    dtype = torch_dtype(numerics.network_autocast)

    def reduced(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            prediction = denoise_fn(x, t)
        return prediction.float()

    return reduced


def make_denoise_fn(model: LoadedModel, plan: GenerationPlan, numerics: Numerics | None = None):
    """Fold every condition of the plan into ``denoise_fn(x, t) -> prediction`` for ``sample``;
    ``numerics`` (default: the reference's for the device) says in which precision the networks run."""
    numerics = _numerics(model, numerics)
    dtype = torch.float16 if numerics.float16_inputs else torch.float32
    unet_kwargs, condition = plan_conditions(model.preset, plan, model.device, dtype)
    class_labels = unet_kwargs.get("class_labels")
    if plan.guidance_scale > 0:
        from ..diffusion.conditioning import guided_denoise_fn

        uncond = None
        if plan.uncond_labels is not None:
            uncond = controlnet_condition(torch.from_numpy(plan.uncond_labels)[None, None], model.preset,
                                          model.device, dtype)
        return reduced_precision_fn(guided_denoise_fn(model.diffusion_unet, model.controlnet, unet_kwargs, condition,
                                                      uncond, plan.guidance_scale), model.device, numerics)

    def denoise_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        residuals = {}
        if condition is not None:
            down, mid = model.controlnet(x=x, timesteps=t, controlnet_cond=condition, class_labels=class_labels)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return model.diffusion_unet(x=x, timesteps=t, **unet_kwargs, **residuals)

    return reduced_precision_fn(denoise_fn, model.device, numerics)


@torch.no_grad()
def generate_latents(
    model: LoadedModel,
    plan: GenerationPlan,
    seed: int = 0,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    numerics: Numerics | None = None,
) -> torch.Tensor:
    """Denoised latent (1, 4, X/4, Y/4, Z/4) for ``plan``, deterministic for a given ``seed``, device and
    ``numerics`` (default: the reference's precision for the device, ``maisicore.precision``)."""
    numerics = _numerics(model, numerics)
    sampling = start_sampling(model.preset, model.device, plan.latent_shape, plan.steps, seed, plan.sampler,
                              float16_noise=numerics.float16_inputs)
    callback = (lambda done, total: progress("denoise", done, total)) if progress else None
    with loop_autocast(model.device, numerics):
        return sample(make_denoise_fn(model, plan, numerics), sampling.noise, sampling.schedule,
                      sampling.step_generator, callback, cancel)


def latents_to_ct(
    model: LoadedModel,
    latents: torch.Tensor,
    plan: GenerationPlan,
    decode: str = "exact",
    memory_budget_bytes: int | None = None,
    log: Callable[[str], None] | None = None,
    devices: Sequence[torch.device] | None = None,
    numerics: Numerics | None = None,
) -> Volume:
    """Decode, map to HU, set background to −1000 and return an int16 volume on the output grid.
    MR models (``preset.intensity == "mr"``): the reference's MR intensities instead, float32
    (``maisicore.vae.decode.unit_to_mr``: 0-1000 and above, no upper clip), no mask."""
    clip_max = None if model.preset.intensity == "mr" else 1.0
    image01 = decode_latents(model.autoencoder, latents, model.scale_factor, decode, memory_budget_bytes, log=log,
                             clip_max=clip_max, devices=devices, numerics=numerics)
    return unit_image_to_volume(model.preset, image01[0, 0].numpy(), plan)


def unit_image_to_volume(preset: ModelPreset, image01: np.ndarray, plan: GenerationPlan, resize=None) -> Volume:
    """A decoded image on the VAE's [0, 1] scale, (x, y, z) in the model frame, as the plan's output:
    CT int16 HU with −1000 where the plan's labels are background, MR float32 (``unit_to_mr``), put
    back onto the output grid's axis order. ``resize``: applied to the HU/MR array first (drafts
    resample onto the plan's size)."""
    from ..vae.decode import unit_to_mr

    if preset.intensity == "mr":
        image = unit_to_mr(image01)
        image = (resize(image) if resize is not None else image).astype(np.float32)
    else:
        image = unit_to_hu(image01)
        if resize is not None:
            image = resize(image)
        if plan.labels is not None:
            image[plan.labels == BACKGROUND] = HU_BACKGROUND
        image = np.rint(image).astype(np.int16)
    if plan.reorientation is not None:
        image = undo_reorientation(image, plan.reorientation)
    return Volume(image, plan.output_affine.copy())


def generate(
    model: LoadedModel,
    plan: GenerationPlan,
    seed: int = 0,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    decode: str = "exact",
    memory_budget_bytes: int | None = None,
    log: Callable[[str], None] | None = None,
    devices: Sequence[torch.device] | None = None,
    numerics: Numerics | None = None,
) -> Volume:
    """Run a checked plan: a synthetic CT (int16 HU, (x, y, z), index → RAS affine).

    Args:
        progress: called as ``progress(stage, done, total)``; stages ``denoise`` then ``decode``.
        cancel: checked between steps; returning True raises ``maisicore.errors.Cancelled``.
        decode: ``exact`` (tensor splitting, default), ``sliding-window`` (reference) or ``plain``.
        memory_budget_bytes: for the exact decode; default what the device has free.
        log: receives one-line notes (the decode plan).
        devices: the exact decode's devices (``--devices``); default the model's.
        numerics: the precision of each stage (``maisicore.precision.numerics_for``); default the
            reference's for the device (float16 autocast on CUDA, float32 on the CPU).
    """
    latents = generate_latents(model, plan, seed, progress, cancel, numerics)
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")
    if progress:
        progress("decode", 0, 1)
    ct = latents_to_ct(model, latents, plan, decode, memory_budget_bytes, log, devices, numerics)
    if progress:
        progress("decode", 1, 1)
    return ct

def precision_numerics(model: LoadedModel, request) -> Numerics:
    """The numerics of a request's ``precision``/``reference_numerics`` on ``model``'s device; refuses
    (one line) networks loaded with another attention than the choice needs (``choice.attention``)."""
    choice = resolve_precision(request.precision, model.device, request.reference_numerics)
    loaded = getattr(model, "attention", "sdpa")
    if loaded != choice.attention:
        raise InputError(f"these networks were loaded with {loaded} attention and the request needs {choice.attention} "
                         f"({'--reference-numerics' if choice.reference_numerics else 'without --reference-numerics'}); "
                         f"load them with attention={choice.attention!r}")
    return numerics_for(choice, model.device.type)
