"""Inpaint a tumour into a real CT with the published ControlNet models, by latent blending.

Stages:
1. Tumour mask: the user's, or a smooth irregular ball around a point (RAS mm) of a given diameter
   (mm), clipped to its host organ when organ labels are given.
2. Region of interest (ROI): the tumour's bounding box plus a context margin, cut from the CT in its
   closest-RAS index order (no resampling), sized to a multiple of 32 voxels (the model's grid), air
   outside the scan. Everything after this step costs what the ROI costs, not what the scan does.
3. Encode the ROI (exact split encoder). Run the diffusion with the ControlNet following the
   anatomy + tumour labels; after every step the latent outside the (dilated) tumour region is
   replaced by the original latent diffused to that step, so only the tumour region is generated.
4. Decode, then composite: inside the tumour the generated CT, fading to the original over a
   feathered band; outside the dilated tumour region the input voxels are copied unchanged.

Arrays are (x, y, z) with index → RAS affines (mm); HU in, HU out in the input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..anatomy.body import BodyOptions
from ..anatomy.labels import label_table
from ..anatomy.tumors import (
    CONTEXT_MM,
    GRID_MULTIPLE,
    MAX_ROI_VOXELS,
    TUMOR_HOSTS,
    ball_roi_side,
    largest_ball_diameter,
    tumor_host_ids,
    tumor_id,
)
from ..diffusion.sampling import sample, start_sampling
from ..errors import Cancelled, InputError
from ..io.geometry import Volume, to_closest_ras, undo_reorientation
from ..models.weights import LoadedModel
from ..vae.decode import decode_latents, hu_to_unit, unit_to_hu
from .plan import GenerationPlan, make_denoise_fn
from .requests import InpaintRequest

# Tumour types, host organs, the ROI constants and size rule live in ``maisicore.anatomy.tumors``
# (torch-free, shared with the Slicer module).
FEATHER_VOXELS = 2  # the blend band outside the tumour
BODY_CHECK_MM = 2.0  # the body envelope of the outside-the-body check is computed on voxels about this far apart


def ball_tumor(ct: Volume, center_ras, diameter_mm: float, seed: int) -> np.ndarray:
    """Boolean (x, y, z) mask on ``ct``'s grid: a ball of ``diameter_mm`` around ``center_ras`` (mm)
    whose radius varies smoothly with direction (±15 %), so it is irregular but smooth."""
    from scipy import ndimage

    spacing = np.asarray(ct.spacing)
    side = np.ceil(ball_roi_side(diameter_mm, spacing.min()))
    if side > MAX_ROI_VOXELS:
        largest = largest_ball_diameter(spacing.min())
        raise InputError(
            f"--tumor-diameter {diameter_mm:g} mm is too large for the inpainting region ({int(side)} voxels per side "
            f"at {spacing.min():g} mm, at most {MAX_ROI_VOXELS}); use at most {largest:.0f} mm"
        )
    inverse = np.linalg.inv(ct.affine)
    centre = (inverse @ np.append(np.asarray(center_ras, dtype=np.float64), 1.0))[:3]
    if np.any(centre < -0.5) or np.any(centre > np.asarray(ct.shape) - 0.5):
        raise InputError(
            f"--tumor-center {' '.join(f'{c:g}' for c in center_ras)} (RAS mm) lies outside the image "
            f"(voxel {np.round(centre, 1).tolist()} of {list(ct.shape)})"
        )
    radius = diameter_mm / 2.0
    reach = np.ceil((radius * 1.2) / spacing).astype(int) + 2
    lo = np.maximum(np.floor(centre).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(centre).astype(int) + reach + 1, ct.shape)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1)
    offset_mm = (grid - centre) @ ct.affine[:3, :3].T
    distance = np.linalg.norm(offset_mm, axis=-1)
    rng = np.random.default_rng(seed)
    bumps = ndimage.gaussian_filter(rng.standard_normal(distance.shape), sigma=max(distance.shape) / 6.0)
    bumps /= np.abs(bumps).max() + 1e-9
    mask = np.zeros(ct.shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = distance <= radius * (1.0 + 0.15 * bumps)
    return mask


@dataclass
class InpaintResult:
    ct: Volume  # HU on the input grid, in the input's dtype
    labels: Volume  # anatomy used + the tumour, dictionary ids, on the input grid
    roi_shape: tuple[int, int, int]
    notes: list[str]
    model: str = ""  # preset key, recorded in DICOM output
    steps: int = 0  # denoising steps run


def _roi_box(mask_ras: np.ndarray, spacing, shape,
             too_large: str = "the tumour is too large for the inpainting region",
             advice: str = "reduce --tumor-diameter") -> tuple[np.ndarray, np.ndarray]:
    """Start index (may be negative) and size of the ROI around the region, sizes multiples of 32."""
    where = np.argwhere(mask_ras)
    lo, hi = where.min(axis=0), where.max(axis=0) + 1
    margin = np.ceil(CONTEXT_MM / np.asarray(spacing)).astype(int)
    need = hi - lo + 2 * margin
    size = np.maximum(GRID_MULTIPLE, -(-need // GRID_MULTIPLE) * GRID_MULTIPLE)
    if np.any(size > MAX_ROI_VOXELS):
        raise InputError(
            f"{too_large}: {'×'.join(map(str, size))} voxels needed, at most "
            f"{MAX_ROI_VOXELS} per side; {advice}"
        )
    start = (lo + hi) // 2 - size // 2
    return start, size


def _crop(array: np.ndarray, start, size, fill) -> np.ndarray:
    """``array[start:start+size]`` with ``fill`` outside the array."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, array.shape)
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = array[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    return out


# ---- latent blending, shared with ``maisi generate --update`` (``pipelines.update``) ---------------


def encode_region(model: LoadedModel, roi_ct: np.ndarray) -> torch.Tensor:
    """The ROI (HU, (x, y, z)) encoded with the exact split encoder and scaled: the known latent
    (1, 4, X/4, Y/4, Z/4) on the model's device."""
    from ..vae.tsp import encode_exact

    image01 = torch.from_numpy(hu_to_unit(roi_ct.astype(np.float32)).astype(np.float32))[None, None]
    mu, _ = encode_exact(model.autoencoder, image01, device=model.device)
    return (mu * model.scale_factor).to(model.device)


def latent_region(edit: np.ndarray, device) -> torch.Tensor:
    """The latent voxels an image-space region (bool (x, y, z)) touches, plus one latent voxel:
    (1, 1, X/4, Y/4, Z/4) float, 1 where the sampler generates."""
    latent_edit = torch.from_numpy(edit)[None, None].float()
    latent_edit = torch.nn.functional.max_pool3d(latent_edit, 4)
    return torch.nn.functional.max_pool3d(latent_edit, 3, stride=1, padding=1).to(device)  # + 1 latent voxel


def blended_sample(
    model: LoadedModel,
    plan: GenerationPlan,
    known: torch.Tensor,
    edit: np.ndarray,
    seed: int,
    progress: Callable[[str, int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    numerics=None,
) -> torch.Tensor:
    """Sample ``plan`` (the ROI's grid and labels) from ``seed``; after every step the latent outside
    ``edit`` (bool, image space) is replaced by ``known`` diffused to that step, so only the region
    is generated. ``numerics``: the precision of each stage (default the reference's for the device).
    Returns the latents."""
    from ..precision import reference_numerics_for
    from .plan import loop_autocast

    device = model.device
    numerics = numerics if numerics is not None else reference_numerics_for(device.type)
    latent_edit = latent_region(edit, device)
    sampling = start_sampling(model.preset, device, plan.latent_shape, plan.steps, seed, plan.sampler,
                              float16_noise=numerics.float16_inputs)
    noise, schedule = sampling.noise, sampling.schedule
    known = known.to(noise.dtype)

    def put_back_known(x: torch.Tensor, step) -> torch.Tensor:
        return latent_edit * x + (1 - latent_edit) * schedule.noised(known, noise, step.next_t)

    callback = (lambda done, total: progress("denoise", done, total)) if progress else None
    with torch.no_grad(), loop_autocast(device, numerics):
        latents = sample(make_denoise_fn(model, plan, numerics), noise, schedule, sampling.step_generator, callback,
                         cancel, put_back_known)
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")
    return latents


def decode_region(model: LoadedModel, latents: torch.Tensor,
                  progress: Callable[[str, int, int], None] | None = None, numerics=None) -> np.ndarray:
    """Decoded latents as HU, float (x, y, z), in ``numerics``' decoder precision."""
    if progress:
        progress("decode", 0, 1)
    generated = unit_to_hu(decode_latents(model.autoencoder, latents, model.scale_factor,
                                          numerics=numerics)[0, 0].numpy())
    if progress:
        progress("decode", 1, 1)
    return generated


def composite(roi_ct: np.ndarray, generated: np.ndarray, core: np.ndarray, edit: np.ndarray) -> np.ndarray:
    """The ROI with ``generated`` inside ``core``, fading to ``roi_ct`` over ``FEATHER_VOXELS`` outside
    it, and ``roi_ct`` unchanged outside ``edit``; ``roi_ct``'s dtype (integers rounded, clipped)."""
    from scipy import ndimage

    weight = np.clip(1.0 - ndimage.distance_transform_edt(~core) / (FEATHER_VOXELS + 1), 0.0, 1.0)
    weight[~edit] = 0.0
    blended = weight * generated + (1.0 - weight) * roi_ct
    if np.issubdtype(roi_ct.dtype, np.integer):
        info = np.iinfo(roi_ct.dtype)
        blended = np.clip(np.rint(blended), info.min, info.max)
    return np.where(edit, blended.astype(roi_ct.dtype), roi_ct)


def paste(out: np.ndarray, roi_out: np.ndarray, edit: np.ndarray, start, size):
    """Copy ``roi_out`` into ``out`` (in place) where ``edit`` holds, the ROI at ``start`` (may lie
    partly outside ``out``); returns the (out, roi) slices of the overlap."""
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, out.shape)
    dst = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
    roi = tuple(slice(a - s, b - s) for a, b, s in zip(src_lo, src_hi, start))
    out[dst] = np.where(edit[roi], roi_out[roi], out[dst])
    return dst, roi


def inpaint(
    model: LoadedModel,
    ct: Volume,
    tumor_mask: np.ndarray,
    tumor_type: str,
    labels: Volume | None = None,
    seed: int = 0,
    steps: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    numerics=None,
    body_options: BodyOptions | None = None,
) -> InpaintResult:
    """Generate a ``tumor_type`` tumour inside ``tumor_mask`` (bool, ``ct``'s grid) of ``ct`` (HU).

    ``labels``: MAISI anatomy labels on ``ct``'s grid (e.g. from ``maisi labels convert``, whose
    ``--body-*`` options shape their body envelope); without them the body envelope of the ROI (the
    CT cropped around the tumour, air beyond the scan; NVIDIA's ``add_body_envelope`` algorithm with
    ``body_options``, None: its defaults, the table-piece step off as no lungs are labelled) and the
    tumour are the only condition (quality drops).
    Voxels outside the dilated tumour region are returned unchanged. ``numerics``
    (``maisicore.precision.Numerics``): the precision of the networks and the decode (the encoder
    stays float32); default the reference's for the model's device.
    """
    from scipy import ndimage

    from ..precision import reference_numerics_for

    if numerics is None:
        numerics = reference_numerics_for(model.device.type)

    from ..anatomy.body import body_from_ct

    notes: list[str] = []
    label_id = tumor_id(tumor_type)
    if tumor_mask.shape != ct.shape:
        raise InputError(f"the tumour mask's shape {tumor_mask.shape} differs from the image's {ct.shape}")
    if not tumor_mask.any():
        raise InputError("the tumour mask is empty")
    if labels is not None and not labels.same_grid(ct):
        raise InputError("--labels is not on the image's grid (shape and affine must match)")

    # 2. ROI in the closest-RAS frame (a permutation/flip: no resampling, exact round trip).
    ct_ras, reorientation = to_closest_ras(ct)
    mask_ras, _ = to_closest_ras(Volume(tumor_mask.astype(np.uint8), ct.affine))
    mask_ras = mask_ras.array.astype(bool)
    start, size = _roi_box(mask_ras, ct_ras.spacing, ct_ras.shape)
    roi_ct = _crop(ct_ras.array, start, size, -1000)  # the input's dtype, air outside the scan
    roi_tumor = _crop(mask_ras, start, size, False)
    if labels is not None:
        labels_ras, _ = to_closest_ras(labels)
        roi_labels = _crop(np.rint(labels_ras.array).astype(np.int16), start, size, 0)
    else:
        body = body_from_ct(roi_ct, body_options)
        roi_labels = np.where(body, label_table().by_name("body").id, 0).astype(np.int16)
        notes.append("no --labels: the condition is the body envelope and the tumour only; expect lower quality")
    roi_labels = roi_labels.copy()
    roi_labels[roi_tumor] = label_id
    edit = ndimage.binary_dilation(roi_tumor, iterations=FEATHER_VOXELS)

    # 3. Encode, then denoise with the known latent put back outside the tumour region.
    spacing = tuple(float(s) for s in ct_ras.spacing)
    plan = GenerationPlan(
        size=tuple(int(s) for s in size),
        spacing=spacing,
        steps=int(steps or model.preset.scheduler.default_steps),
        labels=roi_labels.astype(np.int64),
        body_region=_region(model, roi_labels),
        output_affine=np.eye(4),
        reorientation=None,
    )
    known = encode_region(model, roi_ct)
    latents = blended_sample(model, plan, known, edit, seed, progress, cancel, numerics)

    # 4. Decode and composite inside the dilated tumour region only.
    generated = decode_region(model, latents, progress, numerics)
    roi_out = composite(roi_ct, generated, roi_tumor, edit)

    out_ras = ct_ras.array.copy()
    out_labels_ras = (
        np.rint(to_closest_ras(labels)[0].array).astype(np.int16) if labels is not None else np.zeros(ct_ras.shape, np.int16)
    )
    dst, roi = paste(out_ras, roi_out, edit, start, size)
    region = out_labels_ras[dst]
    region[roi_tumor[roi]] = label_id
    if labels is None:
        body = roi_labels[roi]
        region[(region == 0) & (body != 0)] = body[(region == 0) & (body != 0)]
    ct_out = undo_reorientation(out_ras, reorientation)
    labels_out = undo_reorientation(out_labels_ras, reorientation)
    return InpaintResult(Volume(ct_out, ct.affine.copy()), Volume(labels_out, ct.affine.copy()), tuple(size), notes,
                         model.preset.key, plan.steps)


def _region(model: LoadedModel, labels: np.ndarray):
    if not model.preset.uses_body_region:
        return None
    from ..anatomy.labels import body_region_from_mask

    return body_region_from_mask(labels) or ("abdomen", "abdomen")


def check_host(labels: Volume | None, tumor_mask: np.ndarray, tumor_type: str, center_ras=None) -> np.ndarray:
    """Clip a tumour mask to its host organ (when labels are given); refuses a tumour whose centre
    is outside the host or that keeps less than a quarter of its voxels inside it."""
    if labels is None:
        return tumor_mask
    tumor_type = label_table().by_id(tumor_id(tumor_type)).name
    hosts = tumor_host_ids().get(tumor_type, ())
    host = np.isin(np.rint(labels.array).astype(np.int64), hosts)
    organ = TUMOR_HOSTS[tumor_type]
    if center_ras is not None:
        index = np.rint((np.linalg.inv(labels.affine) @ np.append(np.asarray(center_ras, float), 1.0))[:3]).astype(int)
        index = np.clip(index, 0, np.asarray(labels.shape) - 1)
        if not host[tuple(index)]:
            raise InputError(
                f"--tumor-center is outside its host organ ({organ}) in --labels; move it inside the {organ}"
            )
    clipped = tumor_mask & host
    if clipped.sum() < 0.25 * tumor_mask.sum():
        raise InputError(
            f"the tumour lies mostly outside its host organ ({organ}): {int(clipped.sum())} of "
            f"{int(tumor_mask.sum())} voxels inside; reduce --tumor-diameter or move it"
        )
    return clipped


def check_inside_body(ct: Volume, tumor_mask: np.ndarray, tumor_type: str, center_ras=None, where: str = "") -> None:
    """Refuse a tumour outside the body envelope of the CT (``anatomy.body.body_from_ct``, computed
    on the whole scan in its closest-RAS order, every voxel up to ``BODY_CHECK_MM`` apart: 3 s
    instead of 10 s for 512×512×200 voxels on 2 CPU cores): its centre (``center_ras``, RAS mm) in
    the air around the patient, or most of its voxels outside the body. No host organ lies there."""
    from ..anatomy.body import body_from_ct

    tumor_type = label_table().by_id(tumor_id(tumor_type)).name
    organ = TUMOR_HOSTS[tumor_type]
    ct_ras, _ = to_closest_ras(ct)
    step = np.maximum(1, np.floor(BODY_CHECK_MM / np.asarray(ct_ras.spacing))).astype(int)
    coarse = np.asarray(ct_ras.array)[::step[0], ::step[1], ::step[2]]
    body = np.asarray(body_from_ct(coarse), dtype=bool)
    mask_ras = to_closest_ras(Volume(tumor_mask.astype(np.uint8), ct.affine))[0].array.astype(bool)
    if center_ras is not None:
        index = np.rint((np.linalg.inv(ct_ras.affine) @ np.append(np.asarray(center_ras, float), 1.0))[:3]).astype(int)
        index = np.clip(index // step, 0, np.asarray(body.shape) - 1)
        if not body[tuple(index)]:
            raise InputError(
                f"--tumor-center {' '.join(f'{c:g}' for c in center_ras)} (RAS mm) is outside the body (the CT's "
                f"body envelope); a {tumor_type} belongs in the {organ}: move the centre there")
    voxels = np.argwhere(mask_ras) // step
    inside, total = int(body[tuple(voxels.T)].sum()), len(voxels)
    if inside * 2 < total:
        raise InputError(
            f"{where or 'the tumour'}: {inside} of its {total} voxels lie inside the body (the CT's body envelope); "
            f"a {tumor_type} belongs in the {organ}: move it there")


# ---- the request → pipeline → result path ----------------------------------------------------------


@dataclass
class PreparedInpaint:
    """A checked ``InpaintRequest``: the CT, anatomy labels and tumour mask read and checked
    (tumour inside its host organ). No network has been built."""

    request: InpaintRequest
    preset: object  # ModelPreset
    weights_dir: object  # Path
    ct: Volume
    labels: Volume | None
    tumor_mask: np.ndarray  # bool (x, y, z) on the CT's grid
    notes: list[str] = field(default_factory=list)  # what the checks could not do or changed


def prepare_inpaint(request: InpaintRequest, image: Volume | None = None) -> PreparedInpaint:
    """Check an inpainting request completely before any network is built (one-line ``InputError``).
    ``image`` (Python API): a CT ``Volume`` used instead of ``request.image``."""
    from ..io.volumes import check_output_path, read_volume
    from ..models.weights import check_weight_files, resolve_model
    from .safety import check_output_paths

    request.check(has_image_volume=image is not None)
    check_output_paths(request)
    if request.out:
        from ..io.dicom import is_dicom_path
        from ..io.volumes import check_output

        check_output(request.out, request.format, "--out")
        if request.keep_patient and (image is not None or not is_dicom_path(request.image)):
            raise InputError("--keep-patient copies the patient of a DICOM --image; this --image is not a DICOM series")
    if request.label_out:
        check_output_path(request.label_out, "--label-out")
    tumor_id(request.tumor_type)
    preset, weights_dir = resolve_model(request.model, request.weights_dir)
    if preset.image_only:
        raise InputError(f"{preset.name} is an image-only MR model (no ControlNet): inpainting needs rflow-ct or ddpm-ct")
    check_weight_files(preset, weights_dir)
    ct = image if image is not None else read_volume(request.image, modality="CT")
    from ..io.geometry import onto_grid_of  # same voxels in another axis order (DICOM vs NIfTI) are fine

    labels = read_volume(request.labels) if request.labels else None
    if labels is not None:
        labels = onto_grid_of(labels, ct)
        if labels is None:
            raise InputError(f"--labels {request.labels} is not on the image's grid (shape and affine must match)")
    if request.tumor_mask:
        mask_volume = onto_grid_of(read_volume(request.tumor_mask), ct)
        if mask_volume is None:
            raise InputError(f"--tumor-mask {request.tumor_mask} is not on the image's grid (shape and affine must match)")
        from ..anatomy.labelmap import check_binary_mask

        check_binary_mask(mask_volume.array, f"--tumor-mask {request.tumor_mask}")
        drawn = np.asarray(mask_volume.array) != 0
        center, where = None, f"--tumor-mask {request.tumor_mask}"
    else:
        drawn = ball_tumor(ct, request.tumor_center, request.tumor_diameter, request.seed)
        center, where = request.tumor_center, "the tumour"
    notes = []
    organ = TUMOR_HOSTS[label_table().by_id(tumor_id(request.tumor_type)).name]
    if labels is None:  # no host organ to check: at least inside the body
        check_inside_body(ct, drawn, request.tumor_type, center, where)
        notes.append(f"no --labels: the tumour was not checked against its host organ ({organ}), only against the "
                     "body; give --labels (e.g. from `maisi labels convert`) to check it and clip it to the organ")
    mask = check_host(labels, drawn, request.tumor_type, center)
    if labels is not None and mask.sum() < drawn.sum():
        notes.append(f"the tumour was clipped to its host organ ({organ}) in --labels: {int(mask.sum())} of "
                     f"{int(drawn.sum())} voxels kept")
    return PreparedInpaint(request, preset, weights_dir, ct, labels, mask, notes)


class InpaintPipeline:
    """Tumour inpainting with the networks loaded once: prepare (read, host check) → encode the
    region → denoise with latent blending → decode → composite."""

    def __init__(self, model: LoadedModel):
        self.model = model

    @classmethod
    def from_request(cls, request: InpaintRequest, device: str | None = None) -> InpaintPipeline:
        """Load the request's model onto ``device`` (default ``request.device``)."""
        from ..models.weights import check_weight_files, load_model, resolve_model
        from ..precision import resolve_precision
        from ..validation import resolve_device

        preset, weights_dir = resolve_model(request.model, request.weights_dir)
        check_weight_files(preset, weights_dir)
        device = resolve_device(device or request.device)
        choice = resolve_precision(request.precision, device, request.reference_numerics)
        return cls(load_model(preset, weights_dir, device, attention=choice.attention))

    def __call__(
        self,
        request: InpaintRequest | PreparedInpaint,
        image: Volume | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> InpaintResult:
        """Run a request (or a prepared one); nothing is written (``write_inpaint_result``)."""
        prepared = request if isinstance(request, PreparedInpaint) else prepare_inpaint(request, image)
        from .plan import precision_numerics

        r = prepared.request
        numerics = precision_numerics(self.model, r)
        result = inpaint(self.model, prepared.ct, prepared.tumor_mask, r.tumor_type, prepared.labels, r.seed, r.steps,
                         progress=progress, cancel=cancel, numerics=numerics)
        result.notes[:0] = prepared.notes  # the checks' notes first, in the result's notes (and events)
        return result


def write_inpaint_result(result: InpaintResult, request: InpaintRequest) -> dict[str, object]:
    """Write the request's outputs (temporary file or folder + rename each); role → path. With
    ``format == "dicom"`` a CT series and a DICOM SEG (``maisicore.io.dicom.write_dicom``): a new
    synthetic patient, or with ``keep_patient`` the source's patient and study, each slice
    referencing its source slice."""
    from ..io.volumes import write_volume

    written = {}
    if request.out and request.format == "dicom":
        from ..io.dicom import Provenance, write_dicom

        provenance = Provenance(result.model or str(request.model), request.seed, result.steps, action="inpaint")
        source = request.image if request.keep_patient else None
        written.update(write_dicom(request.out, result.ct, result.labels, provenance, source=source))
    elif request.out:
        written["ct"] = write_volume(request.out, result.ct)
    if request.label_out:
        written["labels"] = write_volume(request.label_out, result.labels)
    return written
