"""Mask generation with controllable anatomy sizes: the reference's ``ldm_conditional_sample_one_mask``
(NV-Generate-CTMR scripts/sample_mask.py) and the resampling of its mask onto the output grid.

Stages, as the reference does them:
1. Noise: a float16-rounded normal latent ``(1, *latent_shape)`` (official (4, 64, 64, 64)) from ``seed``.
2. DDPM (1000 steps by default) with the mask diffusion UNet, conditioned by cross-attention on the
   10-entry size vector (``anatomy.maskgen.ANATOMY_SIZE_CLASSES``, float16-rounded), context (1, 1, 10).
3. Decode ``latent / scale_factor`` with the mask autoencoder to 125 class logits (whole when the latent
   has at most as many voxels as the window, else the reference's gaussian sliding window), softmax
   and argmax over the classes, the 124-class index → MAISI id (``anatomy.maskgen.remap_table``).
4. Clean-up (``anatomy.maskpost.post_process_generated_mask``) with the requested tumour's rules.
5. ``mask_on_grid``: the mask (official 256³ at 1.5 mm, centred) resampled (nearest) onto the
   requested output grid, centred on the same point (the reference: MONAI ``Spacing`` then a centred
   pad/crop).

Weights: ``models/mask_generation_autoencoder.pt`` (a plain state dict) and
``models/mask_generation_diffusion_unet.pt`` (``unet_state_dict``, ``scale_factor``) in the model's
weight folder (NVIDIA's names; ``maisi weights init --mask-networks`` writes random ones). The
folder's ``maisi_model.json`` may hold ``"mask_generation": {"width": ..., "latent_shape": [4, X, Y, Z],
"spacing_mm": S}`` (defaults: the model's width and that width's preset).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..io.geometry import Volume, centered_affine
from ..models.presets import WIDTHS, MaskGenerationPreset, get_mask_generation_preset

ProgressFn = Callable[[str, int, int], None]
SOFTMAX_CHUNK_BYTES = 1 << 28  # logits per softmax slab (the full 125-class softmax of 256³ is 8 GiB)


@dataclass(frozen=True)
class MaskGenerationSettings:
    """Which mask networks a weight folder holds and the mask they make: files, width, latent shape
    (4, X/4, Y/4, Z/4) and the mask's isotropic voxel size (mm)."""

    preset: MaskGenerationPreset
    autoencoder_path: Path
    diffusion_unet_path: Path
    latent_shape: tuple[int, int, int, int]
    spacing_mm: float

    @property
    def mask_shape(self) -> tuple[int, int, int]:
        """Voxels (x, y, z) of the generated mask (the autoencoder upsamples 4× per axis)."""
        return tuple(4 * int(n) for n in self.latent_shape[1:])


def mask_generation_settings(weights_dir: str | Path, model_width: str = "official") -> MaskGenerationSettings:
    """The mask networks of ``weights_dir`` (module docstring); one-line ``InputError`` when a file is
    missing or the card's ``mask_generation`` entry is malformed."""
    from ..models.weights import read_model_card, weight_file

    weights_dir = Path(weights_dir)
    entry = (read_model_card(weights_dir) or {}).get("mask_generation") or {}
    where = f"{weights_dir / 'maisi_model.json'} mask_generation"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: must be an object with width, latent_shape, spacing_mm")
    width = entry.get("width", model_width)
    if width not in WIDTHS:
        raise InputError(f"{where}: width {width!r} must be one of {', '.join(WIDTHS)}")
    preset = get_mask_generation_preset(width)
    latent_shape = entry.get("latent_shape", list(preset.latent_shape))
    if (not isinstance(latent_shape, list) or len(latent_shape) != 4 or latent_shape[0] != 4
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in latent_shape)):
        raise InputError(f"{where}: latent_shape {latent_shape!r} must be [4, X, Y, Z] (positive whole numbers)")
    spacing = entry.get("spacing_mm", preset.spacing_mm)
    if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not 0 < spacing < 100:
        raise InputError(f"{where}: spacing_mm {spacing!r} must be a positive number of mm")
    paths = [weight_file(weights_dir, name) for name in preset.weight_files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(
            f"--anatomy-size needs the mask generation networks: missing {', '.join(missing)} (NVIDIA's: "
            "`maisi weights download rflow-ct --include-datasets`, or ddpm-ct; random ones: "
            "`maisi weights init --mask-networks`)")
    return MaskGenerationSettings(preset, paths[0], paths[1], tuple(int(n) for n in latent_shape), float(spacing))


@dataclass(frozen=True)
class MaskGenerationPlan:
    """A checked ``--anatomy-size`` request: the requested (name, size) pairs, the full size vector
    selected from the database (``anatomy.maskgen.select_size_condition``), the networks and the
    DDPM steps. No network has been built."""

    pairs: tuple[tuple[str, float], ...]
    vector: tuple[float, ...]
    settings: MaskGenerationSettings
    steps: int
    database: Path
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """``liver 0.6, hepatic tumor 0.1 → size vector [...]`` for logs."""
        asked = ", ".join(f"{name} {size:g}" for name, size in self.pairs)
        return f"{asked}; size vector [{', '.join(f'{v:g}' for v in self.vector)}]"

    def estimated_bytes(self, device_type: str = "cpu") -> int:
        """Rough peak memory of the mask generation (bytes): the weight files, the 125-class logits
        (float16 on CUDA, float32 elsewhere) and the clean-up's label arrays over the mask's voxels."""
        voxels = int(np.prod(self.settings.mask_shape))
        weights = sum(p.stat().st_size for p in (self.settings.autoencoder_path, self.settings.diffusion_unet_path))
        logits = (2 if device_type == "cuda" else 4) * 126 * voxels
        return weights + logits + 64 * voxels


def prepare_mask_generation(request, preset, weights_dir: str | Path) -> MaskGenerationPlan:
    """Check ``request.anatomy_size`` against the model (``preset``) and its weight folder, read the
    size database and select the size vector; one-line ``InputError`` otherwise."""
    from ..anatomy.maskgen import (
        default_size_database,
        load_size_database,
        parse_anatomy_sizes,
        select_size_condition,
    )

    if preset.image_only:
        raise InputError(f"{preset.name} is an image-only model: it cannot follow a generated mask; use --anatomy-size "
                         "with rflow-ct or ddpm-ct")
    pairs = parse_anatomy_sizes(request.anatomy_size)
    database = Path(request.anatomy_size_db) if request.anatomy_size_db else default_size_database()
    vector = select_size_condition(pairs, load_size_database(database))
    settings = mask_generation_settings(weights_dir, preset.width)
    steps = int(request.mask_steps or settings.preset.default_steps)
    notes = ()
    if steps < settings.preset.default_steps:
        notes = (f"--mask-steps {steps}: the mask model's DDPM has {settings.preset.default_steps} timesteps; MONAI's DDPM "
                 "step assumes every one is sampled, so fewer leave the mask noisy (the reference warns too)",)
    return MaskGenerationPlan(tuple(pairs), tuple(vector), settings, steps, database, notes)


@dataclass
class MaskModel:
    """Loaded mask networks on ``device`` with the settings they were loaded for."""

    settings: MaskGenerationSettings
    autoencoder: torch.nn.Module
    diffusion_unet: torch.nn.Module
    scale_factor: torch.Tensor  # the diffusion checkpoint's (the reference divides by it as stored)
    device: torch.device


def load_mask_model(settings: MaskGenerationSettings, device: torch.device | str = "cpu") -> MaskModel:
    """Build the mask networks (``models.networks.build_mask_networks``) and load their checkpoints
    (``weights_only=True``; keys and shapes checked, one-line ``InputError`` otherwise)."""
    from ..models.networks import build_mask_networks
    from ..models.weights import load_checkpoint, load_state, state_dict_from

    device = torch.device(device)
    preset = settings.preset
    autoencoder, unet = build_mask_networks(preset, device)  # device settings (CUDA flash attention) at build
    path = settings.autoencoder_path
    load_state(autoencoder, state_dict_from(load_checkpoint(path), None, path, preset), path, preset)
    path = settings.diffusion_unet_path
    checkpoint = load_checkpoint(path)
    load_state(unet, state_dict_from(checkpoint, "unet_state_dict", path, preset), path, preset)
    scale = checkpoint.get("scale_factor", preset.scale_factor)
    scale = torch.as_tensor(scale).float().reshape(()) if not isinstance(scale, torch.Tensor) else scale.reshape(())
    if not torch.isfinite(scale) or scale <= 0:
        raise InputError(f"{path}: scale_factor {float(scale)} must be a positive number")
    return MaskModel(settings, autoencoder.eval(), unet.eval(), scale.to(device), device)


def size_condition(vector: Sequence[float], device: torch.device) -> torch.Tensor:
    """The UNet's context (1, 1, 10): the size vector rounded to float16 as the reference does;
    float16 on CUDA (autocast), float32 holding the same values elsewhere."""
    context = torch.tensor([float(v) for v in vector], dtype=torch.float32).half()[None, None]
    return context.to(device) if device.type == "cuda" else context.float()


@torch.no_grad()
def sample_mask_latent(model: MaskModel, vector: Sequence[float], steps: int, seed: int,
                       progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """The denoised mask latent (1, *latent_shape) after ``steps`` DDPM steps from the noise of ``seed``
    (drawn on the CPU, float16-rounded; DDPM's step noise from the same generator on CPU, a CUDA
    generator seeded ``seed + 1`` on CUDA, as ``diffusion.sampling.start_sampling``)."""
    from ..diffusion.sampling import initial_noise, sample
    from ..diffusion.schedulers import Schedule
    from ..vae.decode import autocast_for

    device = model.device
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = initial_noise(model.settings.latent_shape, generator)
    noise = noise.to(device) if device.type == "cuda" else noise.float()
    step_generator = generator if device.type == "cpu" else torch.Generator(device).manual_seed(int(seed) + 1)
    schedule = Schedule(model.settings.preset, steps, model.settings.latent_shape[1:])
    context = size_condition(vector, device)

    def denoise_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.diffusion_unet(x, timesteps=t, context=context)

    callback = (lambda done, total: progress("mask", done, total)) if progress else None
    with autocast_for(device):
        return sample(denoise_fn, noise, schedule, step_generator, callback, cancel)


@torch.no_grad()
def decode_mask_classes(model: MaskModel, latent: torch.Tensor) -> np.ndarray:
    """Class index (0–124) per voxel, int64 (x, y, z): decode ``latent / scale_factor`` (whole, or
    the reference's sliding window when the latent is larger than the window), softmax over the
    classes, argmax (first of equal probabilities)."""
    from ..vae.decode import autocast_for

    preset = model.settings.preset

    def decode(z: torch.Tensor) -> torch.Tensor:
        return model.autoencoder.decode_stage_2_outputs(z / model.scale_factor)

    with autocast_for(model.device):
        spatial = latent.shape[2:]
        if int(np.prod(spatial)) <= int(np.prod(preset.decode_window)):
            logits = decode(latent)
        else:
            from monai.inferers.inferer import SlidingWindowInferer

            window = [min(w, n) for w, n in zip(preset.decode_window, spatial)]
            inferer = SlidingWindowInferer(roi_size=window, sw_batch_size=1, progress=False, mode="gaussian",
                                           overlap=preset.decode_overlap, sw_device=model.device,
                                           device=torch.device("cpu"))
            logits = inferer(inputs=latent, network=decode)
        classes = np.empty(logits.shape[2:], dtype=np.int64)
        slab = max(1, SOFTMAX_CHUNK_BYTES // (logits.element_size() * int(np.prod(logits.shape[1:])) // logits.shape[2]))
        for start in range(0, logits.shape[2], slab):  # per voxel, so slabs change no value
            chunk = logits[:, :, start:start + slab]
            if chunk.device.type == "cpu" and chunk.dtype != torch.float32:
                chunk = chunk.float()
            classes[start:start + slab] = torch.argmax(torch.softmax(chunk, dim=1), dim=1)[0].cpu().numpy()
    return classes


def generate_anatomy_mask(model: MaskModel, vector: Sequence[float], steps: int, seed: int = 0,
                          progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None) -> np.ndarray:
    """One generated mask, MAISI label ids int64 (x, y, z) on the mask's own grid
    (``model.settings.mask_shape`` voxels at ``spacing_mm``): sample, decode, remap, clean up."""
    from ..anatomy.maskgen import remap_table, target_tumor_label
    from ..anatomy.maskpost import post_process_generated_mask

    latent = sample_mask_latent(model, vector, steps, seed, progress, cancel)
    labels = remap_table()[decode_mask_classes(model, latent)]
    return post_process_generated_mask(labels, target_tumor_label(vector))


def mask_on_grid(labels: np.ndarray, spacing_mm: float, size: Sequence[int], spacing: Sequence[float]) -> Volume:
    """The generated mask (centred, ``spacing_mm`` isotropic) resampled (nearest) onto ``size`` voxels
    at ``spacing`` mm centred on the same point; int16 labels, RAS affine (``io.geometry.centered_affine``)."""
    from ..anatomy.grids import Grid, labels_on_grid

    source = Volume(np.asarray(labels).astype(np.int16), centered_affine(labels.shape, (spacing_mm,) * 3))
    size = tuple(int(n) for n in size)
    return labels_on_grid(source, Grid(size, centered_affine(size, tuple(float(s) for s in spacing))))
