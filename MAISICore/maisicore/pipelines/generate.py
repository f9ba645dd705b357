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
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..anatomy.grids import Grid, generation_grid, grid_around, image_on_grid, labels_on_grid
from ..anatomy.labels import (
    BACKGROUND,
    body_region_from_mask,
    label_dict,
)
from ..devices import resolve_devices
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
    check_sampler,
    modality_code,
)
from ..models.weights import LoadedModel
from ..precision import Numerics, numerics_for, reference_numerics_for, resolve_precision, torch_dtype
from ..vae.decode import decode_latents, unit_to_hu
from ..validation import check_body_regions, check_grid, check_mask_values, check_steps
from .requests import GenerateRequest

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
    if model.preset.intensity == "mr":
        from ..vae.decode import unit_to_mr

        image01 = decode_latents(model.autoencoder, latents, model.scale_factor, decode, memory_budget_bytes, log=log,
                                 clip_max=None, devices=devices, numerics=numerics)
        mr = unit_to_mr(image01[0, 0].numpy()).astype(np.float32)
        if plan.reorientation is not None:
            mr = undo_reorientation(mr, plan.reorientation)
        return Volume(mr, plan.output_affine.copy())
    image01 = decode_latents(model.autoencoder, latents, model.scale_factor, decode, memory_budget_bytes, log=log,
                             devices=devices, numerics=numerics)
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


# ---- the request → pipeline → result path ----------------------------------------------------------


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


@dataclass
class PreparedGeneration:
    """A checked ``GenerateRequest``: outputs checked, mask read (or picked from the database) and
    fitted, plan made. No network has been built."""

    request: GenerateRequest
    preset: ModelPreset
    weights_dir: Path
    plan: GenerationPlan
    mask: Volume | None  # the labels the model follows (on the generation grid), or None
    original_grid: Grid | None  # the mask's own grid when it was fitted onto another, else None
    notes: list[str] = field(default_factory=list)
    # --anatomy-size: the mask is generated when the pipeline runs (``pipelines.maskgen``); None otherwise
    mask_generation: object | None = None  # maskgen.MaskGenerationPlan
    # --update: the previous CT and the changed voxels (``pipelines.update.UpdateSource``); None otherwise
    update: object | None = None


@dataclass
class GenerateResult:
    """What a generation produced: the CT (int16 HU) and the labels it followed, on the grid the
    request asked for; the seed that was used (QC retries move it on), the quality-check rows,
    notes and seconds per stage."""

    ct: Volume
    labels: Volume | None
    seed_used: int
    qc: list | None
    notes: list[str]
    timings: dict[str, float]
    plan: GenerationPlan
    model: str = ""  # preset key (e.g. rflow-ct/official), recorded in DICOM output
    action: str = "generate"  # generate, draft (--draft) or update (--update): recorded in every output
    description: str = ""  # written into the CT's NIfTI descrip / NRRD content (drafts and updates)

    def write(self, request: GenerateRequest) -> dict[str, Path]:
        """Write the request's outputs (each to a temporary file or folder, then renamed); role → path.
        ``request.format == "dicom"``: the CT as a DICOM series in ``out/ct/`` and the labels as a
        DICOM SEG ``out/labels.dcm`` (``maisicore.io.dicom.write_dicom``)."""
        from ..io.volumes import write_volume

        written: dict[str, Path] = {}
        if request.out and request.format == "dicom":
            from ..io.dicom import Provenance, write_dicom

            provenance = Provenance(self.model or str(request.model), self.seed_used, self.plan.steps, action=self.action)
            written.update(write_dicom(request.out, self.ct, self.labels, provenance))
        elif request.out:
            written["ct"] = write_volume(request.out, self.ct, description=self.description or None)
        if request.label_out and self.labels is not None:
            written["labels"] = write_volume(request.label_out, self.labels)
        if request.preview:
            from ..io.preview import write_preview

            write_preview(request.preview, self.ct, self.labels)
            written["preview"] = Path(request.preview)
        return written


def _fit_target(mask: Volume, request: GenerateRequest, preset: ModelPreset, any_size: bool) -> Grid:
    """The grid a mask is fitted onto: ``size``/``spacing`` when given, else the closest grid the
    model takes (published grids; for models that take any multiple of 32: the mask's spacing with
    each size rounded to the nearest multiple)."""
    if request.size is not None or request.spacing is not None:
        return generation_grid(mask, request.size, request.spacing, preset.grid)
    if any_size:
        ras, _ = to_closest_ras(mask)
        multiple = preset.grid.any_size_multiple
        shape = tuple(max(multiple, int(round(n / multiple)) * multiple) for n in ras.shape)
        return grid_around(mask, shape, ras.spacing)
    return generation_grid(mask, None, None, preset.grid)


def _grid_problem(mask: Volume, preset: ModelPreset, any_size: bool, regions) -> str | None:
    """Why the model cannot take the mask's grid as it is (one line), or None."""
    ras, _ = to_closest_ras(mask)
    try:
        check_grid(ras.shape, ras.spacing, preset.grid, any_size, regions)
    except InputError as exc:
        return str(exc)
    return None


def prepare_generation(
    request: GenerateRequest, mask: Volume | None = None, log: Callable[[str], None] | None = None
) -> PreparedGeneration:
    """Check a request completely before any network is built; raises a one-line ``InputError``.

    ``mask`` (Python API): a label ``Volume`` used instead of ``request.mask``. Reads the mask (or
    picks one from the candidate database for ``request.anatomy``), fits it onto a grid the model
    takes when needed (``request.fit``) and plans the sampling.
    """
    from ..io.volumes import check_output_path, read_volume
    from ..models.weights import check_weight_files, read_model_card, resolve_model
    from .safety import check_output_paths

    request.check(has_mask_volume=mask is not None)
    check_output_paths(request)
    if request.out:
        from ..io.volumes import check_output

        check_output(request.out, request.format, "--out")
    if request.label_out:
        check_output_path(request.label_out, "--label-out")
    preset, weights_dir = resolve_model(request.model, request.weights_dir)
    check_weight_files(preset, weights_dir)
    if request.draft:
        from .draft import check_draft_model

        check_draft_model(preset)
    card_grid = (read_model_card(weights_dir) or {}).get("grid")
    any_size = request.allow_any_size or card_grid is not None
    default_size = tuple(card_grid["size"]) if card_grid else preset.default_size
    default_spacing = tuple(card_grid["spacing"]) if card_grid else preset.default_spacing
    if preset.image_only and (mask is not None or request.mask or request.anatomy):
        raise InputError(f"{preset.name} is an image-only model (NVIDIA published no MR ControlNet): it cannot "
                         "follow a mask; leave out --mask/--anatomy, or use rflow-ct or ddpm-ct")
    modality_code(preset, request.modality)  # an MR modality for a CT model (or the reverse) → InputError
    notes: list[str] = []
    size, spacing = request.size, request.spacing
    original_grid = None
    mask_generation = None
    if request.anatomy_size is not None:
        from .maskgen import prepare_mask_generation

        mask_generation = prepare_mask_generation(request, preset, weights_dir)
        notes += mask_generation.notes
    if mask is None and request.mask:
        mask = read_volume(request.mask)
    if request.update:  # the volumes' own grid: no fitting (the region of interest is cut from it)
        from .update import read_update_source, update_plan

        source = read_update_source(request, mask)
        plan = update_plan(request, preset, mask)
        return PreparedGeneration(request, preset, weights_dir, plan, mask, None, plan.notes, update=source)
    if request.anatomy:
        from .paired import paired_mask

        mask = paired_mask(request, preset, tuple(size or default_size), tuple(spacing or default_spacing), log)
        size = spacing = None
    elif mask is not None:
        check_mask_values(mask.array)
        if not np.any(mask.array == label_dict()["body"]):
            notes.append("the mask has no body label (200), which NVIDIA's models were trained with (images are "
                         "worse without it); make the mask with `maisi labels convert` from the segmentation "
                         "(it adds the body envelope from --ct CT, or else from the labels)")
        problem = _grid_problem(mask, preset, any_size, request.body_region)
        resize = size is not None or spacing is not None
        if request.fit == "never" and problem:
            raise InputError(f"{problem.rstrip('.')}; leave out --no-fit (or use --fit-grid) to fit the mask onto a valid grid")
        if request.fit == "always" or (request.fit == "auto" and (problem or resize)):
            original_grid = Grid(mask.shape, mask.affine.copy())
            grid = _fit_target(mask, request, preset, any_size)
            mask = labels_on_grid(mask, grid)
            back = " and mapped back onto the mask's grid" if request.maps_back else ""
            notes.append(
                f"mask grid {'×'.join(map(str, original_grid.shape))} at "
                f"{'×'.join(f'{s:.4g}' for s in original_grid.spacing)} mm fitted onto "
                f"{'×'.join(map(str, grid.shape))} at {'×'.join(f'{s:.4g}' for s in grid.spacing)} mm "
                f"around the labelled region{back}"
            )
            size = spacing = None
    elif size is None and spacing is None:
        size, spacing = default_size, default_spacing
    plan = plan_generation(preset, size, spacing, mask, request.body_region, request.steps, any_size,
                           request.modality, request.guidance_scale, mask_to_come=mask_generation is not None)
    if card_grid is not None and not request.allow_any_size:  # the model card allows its own grids
        plan.notes = [n for n in plan.notes if not n.startswith("--allow-any-size")]
    plan.notes = notes + plan.notes
    plan.sampler = check_sampler(request.sampler, preset.scheduler.kind)
    return PreparedGeneration(request, preset, weights_dir, plan, mask, original_grid, plan.notes, mask_generation)


class GeneratePipeline:
    """Every stage of a generation, owned by one object with the networks loaded once:
    prepare (check, mask, grid) → sample → decode → quality check and retries → map back.

    >>> pipe = GeneratePipeline.from_request(GenerateRequest(model="demo"))
    >>> result = pipe(GenerateRequest(model="demo", mask="labels.nii.gz"))   # result.ct, result.labels
    """

    def __init__(self, model: LoadedModel):
        self.model = model
        self._mask_model = None  # the mask networks (--anatomy-size), loaded on first use

    def generate_mask(self, prepared: PreparedGeneration, progress: ProgressFn | None = None,
                      cancel: Callable[[], bool] | None = None, log=None) -> PreparedGeneration:
        """For ``--anatomy-size``: generate the mask (``pipelines.maskgen``) on the plan's grid and
        return ``prepared`` following it, as a mask from the database would be followed."""
        import dataclasses

        from .maskgen import generate_anatomy_mask, load_mask_model, mask_on_grid

        spec = prepared.mask_generation
        if self._mask_model is None or self._mask_model.settings != spec.settings:
            self._mask_model = load_mask_model(spec.settings, self.model.device)
        if log:
            log(f"generating the mask ({spec.describe()}), {spec.steps} DDPM steps, seed {prepared.request.seed}")
        labels = generate_anatomy_mask(self._mask_model, spec.vector, spec.steps, prepared.request.seed, progress, cancel)
        plan = prepared.plan
        mask = mask_on_grid(labels, spec.settings.spacing_mm, plan.size, plan.spacing)
        plan = with_generated_mask(prepared.preset, plan, mask)
        return dataclasses.replace(prepared, plan=plan, mask=mask, mask_generation=None)

    @classmethod
    def from_request(cls, request: GenerateRequest, device: str | None = None) -> GeneratePipeline:
        """Load the request's model (``request.model``/``weights_dir``) onto ``device``
        (default ``request.device``)."""
        from ..models.weights import check_weight_files, load_model, resolve_model
        from ..validation import resolve_device

        preset, weights_dir = resolve_model(request.model, request.weights_dir)
        check_weight_files(preset, weights_dir)
        device = resolve_device(device or request.device)
        choice = resolve_precision(request.precision, device, request.reference_numerics)
        return cls(load_model(preset, weights_dir, device, attention=choice.attention))

    def numerics(self, request: GenerateRequest) -> Numerics:
        """The request's precision (``precision``, ``reference_numerics``) on this pipeline's device; a
        one-line ``InputError`` when it cannot run here (fp16 on the CPU) or the networks were loaded
        with another attention than it needs (``GeneratePipeline.from_request`` loads the right one)."""
        return precision_numerics(self.model, request)

    def prepare(self, request: GenerateRequest, mask: Volume | None = None, log=None) -> PreparedGeneration:
        """``prepare_generation`` for this pipeline's model (refuses a request for another model)."""
        prepared = prepare_generation(request, mask, log)
        if prepared.preset != self.model.preset or prepared.weights_dir.resolve() != self.model.weights_dir.resolve():
            raise InputError(
                f"this pipeline holds {self.model.preset.key} from {self.model.weights_dir}; the request asks for "
                f"{prepared.preset.key} from {prepared.weights_dir}"
            )
        return prepared

    def __call__(
        self,
        request: GenerateRequest | PreparedGeneration,
        mask: Volume | None = None,
        progress: ProgressFn | None = None,
        cancel: Callable[[], bool] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> GenerateResult:
        """Run a request (or a prepared one) to a result; nothing is written (``result.write``)."""
        import time

        prepared = request if isinstance(request, PreparedGeneration) else self.prepare(request, mask, log)
        timings: dict[str, float] = {}
        if prepared.mask_generation is not None:
            started = time.perf_counter()
            prepared = self.generate_mask(prepared, progress, cancel, log)
            timings["mask_s"] = time.perf_counter() - started
        request, plan = prepared.request, prepared.plan
        numerics = self.numerics(request)
        if prepared.update is not None:
            return self._update(prepared, timings, progress, cancel, numerics)
        budget = None if request.memory_budget_gb is None else int(request.memory_budget_gb * 2**30)
        devices = resolve_devices(request.devices)
        notes = list(prepared.notes)
        if request.draft:
            return self._draft(prepared, timings, progress, cancel, log, budget, devices, numerics)
        seed, checks = request.seed, None
        for attempt in range(request.qc_retries + 1):
            started = time.perf_counter()
            ct = generate(self.model, plan, seed=seed, progress=progress, cancel=cancel, decode=request.decode,
                          memory_budget_bytes=budget, log=log, devices=devices, numerics=numerics)
            timings["generate_s"] = timings.get("generate_s", 0.0) + time.perf_counter() - started
            if not request.qc_retries:
                break
            from ..anatomy.qc import check_ct, format_table

            checks = check_ct(ct.array, prepared.mask.array)
            if all(c.passed for c in checks):
                notes.append(f"quality check passed (seed {seed})")
                break
            if log:
                log(format_table(checks))
            if attempt < request.qc_retries:
                seed += 1
                notes.append(f"quality check failed; regenerated with seed {seed}")
                if log:
                    log(f"quality check failed; regenerating with seed {seed}")
            else:
                notes.append(f"quality check still failing after {request.qc_retries} retries; the last result is kept")
        mask = prepared.mask
        labels = Volume(mask.array.astype(np.int16), mask.affine.copy()) if mask is not None else None
        if prepared.original_grid is not None and request.maps_back:
            ct = image_on_grid(ct, prepared.original_grid)
            labels = labels_on_grid(labels, prepared.original_grid)
        return GenerateResult(ct, labels, seed, checks, notes, timings, plan, prepared.preset.key)

    def _labels_on_request_grid(self, prepared: PreparedGeneration, ct: Volume) -> tuple[Volume, Volume | None]:
        mask = prepared.mask
        labels = Volume(mask.array.astype(np.int16), mask.affine.copy()) if mask is not None else None
        if prepared.original_grid is not None and prepared.request.maps_back:
            ct = image_on_grid(ct, prepared.original_grid)
            labels = labels_on_grid(labels, prepared.original_grid)
        return ct, labels

    def _draft(self, prepared: PreparedGeneration, timings, progress, cancel, log, budget, devices,
               numerics=None) -> GenerateResult:
        """``--draft`` (``pipelines.draft``): fewer voxels, ab2, resampled onto the requested grid."""
        import time

        from .draft import describe_draft, draft_evaluations, draft_plan, generate_draft

        request, plan = prepared.request, prepared.plan
        draft = draft_plan(plan, request.steps)
        note = describe_draft(plan, draft, draft_evaluations(prepared.preset, draft))
        if log:
            log(note)
        started = time.perf_counter()
        ct = generate_draft(self.model, plan, draft, request.seed, progress, cancel, request.decode, budget, log, devices,
                            numerics)
        timings["generate_s"] = time.perf_counter() - started
        ct, labels = self._labels_on_request_grid(prepared, ct)
        description = (f"MAISI DRAFT {prepared.preset.key} seed {request.seed} {draft.steps} steps {draft.sampler} "
                       f"at {'x'.join(map(str, draft.size))}; not a final result")
        return GenerateResult(ct, labels, request.seed, None, [*prepared.notes, note], timings, draft,
                              prepared.preset.key, action="draft", description=description)

    def _update(self, prepared: PreparedGeneration, timings, progress, cancel, numerics=None) -> GenerateResult:
        """``--update`` (``pipelines.update``): the changed region regenerated, the rest kept bit for bit."""
        import time

        from .update import regenerate_changed

        request = prepared.request
        started = time.perf_counter()
        ct, notes, roi_shape = regenerate_changed(self.model, prepared.plan, prepared.update, request.seed, progress,
                                                  cancel, numerics)
        timings["generate_s"] = time.perf_counter() - started
        mask = prepared.mask
        labels = Volume(mask.array.astype(np.int16), mask.affine.copy())
        description = (f"MAISI UPDATE {prepared.preset.key} seed {request.seed} {prepared.plan.steps} steps: "
                       f"region {'x'.join(map(str, roi_shape))} regenerated")
        return GenerateResult(ct, labels, request.seed, None, [*prepared.notes, *notes], timings, prepared.plan,
                              prepared.preset.key, action="update", description=description)
