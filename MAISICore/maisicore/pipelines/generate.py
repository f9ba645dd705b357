"""Generate a CT from noise, optionally conditioned on a MAISI label volume: the request →
pipeline → result path (``prepare_generation``, ``GeneratePipeline``, ``GenerateResult``).

The plan and its stages (conditions, denoising loop, decode) live in ``maisicore.pipelines.plan``,
re-exported here; drafts (``pipelines.draft``) and region updates (``pipelines.update``) are run by
``GeneratePipeline`` from the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..anatomy.grids import Grid, generation_grid, grid_around, image_on_grid, labels_on_grid
from ..anatomy.labels import label_dict
from ..devices import resolve_devices
from ..errors import InputError
from ..io.geometry import Volume, to_closest_ras
from ..models.presets import ModelPreset, check_sampler, modality_code
from ..models.weights import LoadedModel
from ..precision import Numerics, resolve_precision
from ..validation import check_grid, check_mask_values
from .plan import (  # noqa: F401 - the plan and its stages, importable from here as before
    HU_BACKGROUND,
    GenerationPlan,
    ProgressFn,
    generate,
    generate_latents,
    latents_to_ct,
    loop_autocast,
    make_denoise_fn,
    plan_conditions,
    plan_generation,
    precision_numerics,
    reduced_precision_fn,
    with_generated_mask,
)
from .requests import GenerateRequest

# ---- the request → pipeline → result path ----------------------------------------------------------


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
