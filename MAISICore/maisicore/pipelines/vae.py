"""The VAE alone: encode a CT to latents and decode latents to a CT, exactly and in bounded memory.

Latent files are NIfTI ``[X, Y, Z, 4]`` float32 (the reference's ``*_emb`` layout) whose affine is
the latent grid's own (4× the image voxel size, origin at the centre of the first 4³ block), with a
JSON sidecar ``<latent>.json`` holding the image grid (``dim``, ``spacing``, ``affine``), the
modality and how the latent was made.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import InputError
from ..io.geometry import Volume, to_closest_ras
from ..io.volumes import atomic_write
from ..models.networks import build_autoencoder
from ..models.presets import WIDTHS, get_preset
from ..models.weights import load_checkpoint, load_state, state_dict_from
from ..vae.decode import decode_latents, hu_to_unit, unit_to_hu

DOWNSAMPLE = 4
LATENT_EXTENSIONS = (".nii.gz", ".nii")


def load_autoencoder(path: str | os.PathLike, device: torch.device) -> torch.nn.Module:
    """The MAISI autoencoder in checkpoint ``path`` (width recognised from its tensors), on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--weights {path}: file not found")
    checkpoint = load_checkpoint(path)
    first_error = None
    for width in WIDTHS:
        preset = get_preset("rflow-ct", width)
        state = state_dict_from(checkpoint, None, path, preset)
        autoencoder = build_autoencoder(preset, device)
        try:
            load_state(autoencoder, state, path, preset)
            return autoencoder.to(device)
        except InputError as exc:
            first_error = first_error or exc
    raise InputError(str(first_error).replace("rflow-ct/official", "the MAISI autoencoder (official or tiny width)"))


def latent_affine(image_affine: np.ndarray) -> np.ndarray:
    """Index → RAS of the latent grid of an image grid: 4× the voxel size, centred on each 4³ block."""
    affine = np.array(image_affine, dtype=np.float64)
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * DOWNSAMPLE
    out[:3, 3] = affine[:3, 3] + affine[:3, :3] @ np.full(3, (DOWNSAMPLE - 1) / 2.0)
    return out


def image_affine(latent_affine_: np.ndarray) -> np.ndarray:
    """Inverse of ``latent_affine``."""
    affine = np.array(latent_affine_, dtype=np.float64)
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] / DOWNSAMPLE
    out[:3, 3] = affine[:3, 3] - out[:3, :3] @ np.full(3, (DOWNSAMPLE - 1) / 2.0)
    return out


def encode_ct(
    autoencoder: torch.nn.Module,
    ct: Volume,
    device: torch.device,
    memory_budget_bytes: int | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Encode a CT (HU): reorient to the closest RAS order, clip to [−1000, 1000] → [0, 1], pad the
    high end of each axis with air to a multiple of 4, run the exact split encoder.

    Returns (latent mean [X/4, Y/4, Z/4, 4] float32, its affine, sidecar dict).
    """
    from ..vae.tsp import encode_exact

    ras, _ = to_closest_ras(ct)
    image = hu_to_unit(ras.array.astype(np.float32))
    pad = [(0, (-n) % DOWNSAMPLE) for n in image.shape]
    if any(p[1] for p in pad):
        image = np.pad(image, pad, constant_values=0.0)  # 0 on the [0, 1] scale = −1000 HU, air
        if log:
            log(f"padded {ras.shape} to {image.shape} with air (a multiple of {DOWNSAMPLE} along each axis)")
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    try:
        mu, _sigma = encode_exact(autoencoder, tensor.to(device), memory_budget_bytes, device=device, log=log)
    except MemoryError as exc:
        raise InputError(str(exc)) from exc
    latent = mu[0].permute(1, 2, 3, 0).numpy().astype(np.float32)
    sidecar = {
        "dim": [int(n) for n in image.shape],
        "spacing": [float(s) for s in ras.spacing],
        "affine": ras.affine.tolist(),
        "source_dim": [int(n) for n in ras.shape],
        "modality": "ct",
        "latent": "posterior mean (z_mu), unscaled; divide by nothing, multiply by the diffusion model's scale_factor to train",
    }
    return latent, latent_affine(ras.affine), sidecar


def decode_latent(
    autoencoder: torch.nn.Module,
    latent: np.ndarray,
    affine: np.ndarray,
    device: torch.device,
    scale_factor: float = 1.0,
    method: str = "exact",
    memory_budget_bytes: int | None = None,
    log: Callable[[str], None] | None = None,
    devices=None,
    numerics=None,
) -> Volume:
    """Decode a latent [X, Y, Z, 4] (divided by ``scale_factor`` first) to a CT (int16 HU) on the
    image grid of ``affine`` (the latent grid's). ``devices``: the exact decode's (``--devices``);
    ``numerics``: ``maisicore.precision.Numerics`` (default the reference's for the device)."""
    if latent.ndim != 4 or latent.shape[3] != 4:
        raise InputError(f"a latent must be [X, Y, Z, 4], got shape {latent.shape}")
    z = torch.from_numpy(np.ascontiguousarray(latent.transpose(3, 0, 1, 2)))[None].float().to(device)
    image01 = decode_latents(autoencoder, z, scale_factor, method, memory_budget_bytes, log=log,
                             devices=devices, numerics=numerics)[0, 0].numpy()
    ct = np.rint(unit_to_hu(image01)).astype(np.int16)
    return Volume(ct, image_affine(affine))


def read_latent(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A latent NIfTI [X, Y, Z, 4] and its affine."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--latent {path}: file not found")
    if not str(path).lower().endswith(LATENT_EXTENSIONS):
        raise InputError(f"--latent {path}: latents are NIfTI files (.nii.gz or .nii)")
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj).astype(np.float32)
    except Exception as exc:
        raise InputError(f"--latent {path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    return array, image.affine


def write_latent(path: str | os.PathLike, latent: np.ndarray, affine: np.ndarray, sidecar: dict) -> None:
    """Write the latent NIfTI and its JSON sidecar (both through temporary files)."""
    import nibabel as nib

    path = Path(path)
    if not str(path).lower().endswith(LATENT_EXTENSIONS):
        raise InputError(f"--out {path}: latents are written as .nii.gz or .nii")
    image = nib.Nifti1Image(latent.astype(np.float32), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    suffix = ".nii.gz" if str(path).lower().endswith(".nii.gz") else ".nii"
    atomic_write(path, lambda tmp: nib.save(image, tmp), suffix=suffix)
    atomic_write(Path(f"{path}.json"), lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))
