"""Encode a datalist's images to cached latents for diffusion and ControlNet training.

As the reference (``diff_model_create_training_data``): each CT is put in closest-RAS order,
clipped to ±1000 HU, resized (trilinear) to a size rounded to a multiple of ``round_to`` voxels per
axis (the field of view is kept, so the spacing changes), and encoded with the VAE (here: the exact
tensor-splitting encoder, posterior mean). Labels are resized (nearest) onto the same grid. Files
already encoded (latent and sidecar present) are skipped, so an interrupted run continues.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..io.geometry import Volume, to_closest_ras
from ..io.volumes import read_volume, volume_extension, write_volume
from .datalist import read_datalist, write_datalist


def rounded_size(n: int, base: int) -> int:
    """``n`` rounded to the nearest multiple of ``base`` (at least ``base``)."""
    return int(max(round(n / base), 1) * base)


def resized_grid(volume: Volume, shape) -> np.ndarray:
    """Index → RAS affine of ``volume``'s field of view cut into ``shape`` voxels (corners kept)."""
    scale = np.asarray(volume.shape, dtype=np.float64) / np.asarray(shape, dtype=np.float64)
    affine = np.array(volume.affine, dtype=np.float64)
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * scale
    out[:3, 3] = affine[:3, 3] + affine[:3, :3] @ (0.5 * scale - 0.5)
    return out


def resize(array: np.ndarray, shape, mode: str) -> np.ndarray:
    """``array`` (x, y, z) resized to ``shape`` with torch's ``trilinear`` or ``nearest``."""
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    out = F.interpolate(tensor, size=tuple(int(n) for n in shape), mode=mode, **kwargs)[0, 0].numpy()
    return out


def autoencoder_path(weights: str | os.PathLike) -> Path:
    """``--weights``: an autoencoder checkpoint, or a weight folder holding one."""
    from ..models.presets import get_preset
    from ..models.weights import weight_file

    path = Path(weights)
    if path.is_dir():
        path = weight_file(path, get_preset("rflow-ct").weight_files.autoencoder)
    if not path.is_file():
        raise InputError(f"--weights {weights}: no autoencoder checkpoint there")
    return path


def prepare_latents(
    datalist: str | os.PathLike,
    weights: str | os.PathLike,
    out_dir: str | os.PathLike,
    out_datalist: str | os.PathLike,
    round_to: int = 128,
    device: torch.device | str = "cpu",
    memory_budget_bytes: int | None = None,
    log=print,
) -> dict:
    """Encode every image of ``datalist`` into ``out_dir`` (``NAME_emb.nii.gz`` + ``.json`` sidecar,
    ``NAME_label.nii.gz``) and write ``out_datalist`` naming them. Returns the new datalist."""
    from ..pipelines.vae import encode_ct, load_autoencoder, write_latent

    if round_to < 32 or round_to % 32:
        raise InputError(f"--round-to {round_to}: must be a multiple of 32 (latents are a quarter, the UNet halves them 3 times)")
    out_dir, out_datalist = Path(out_dir), Path(out_datalist)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir}: exists and is not a folder")
    weights_path = autoencoder_path(weights)
    cases = read_datalist(datalist, needs=("image",), read=("image", "label"))  # every file read: before any work
    device = torch.device(device)
    autoencoder = None
    root = out_datalist.resolve().parent
    entries = []
    for number, case in enumerate(cases):
        name = Path(str(case.image)).name
        ext = volume_extension(name)
        stem = name[: -len(ext)] if ext else name.replace("#", "_")  # a DICOM folder or FOLDER#UID
        latent_path = out_dir / f"{stem}_emb.nii.gz"
        label_path = out_dir / f"{stem}_label.nii.gz" if case.label else None
        ct, _ = to_closest_ras(read_volume(case.image, modality="CT"))
        shape = tuple(rounded_size(n, round_to) for n in ct.shape)
        grid = resized_grid(ct, shape)
        done = latent_path.is_file() and Path(f"{latent_path}.json").is_file() and (label_path is None or label_path.is_file())
        if done:
            log(f"[{number + 1}/{len(cases)}] {name}: already encoded, skipped")
        else:
            if autoencoder is None:
                autoencoder = load_autoencoder(weights_path, device)
                out_dir.mkdir(parents=True, exist_ok=True)  # only once the weights are loaded: a refusal writes nothing
            hu = np.clip(ct.array.astype(np.float32), -1000.0, 1000.0)
            resized = Volume(resize(hu, shape, "trilinear"), grid)
            latent, affine, sidecar = encode_ct(autoencoder, resized, device, memory_budget_bytes)
            sidecar.update({"source_image": str(case.image), "source_dim": list(ct.shape),
                            "body_region": list(case.body_region) if case.body_region else None})
            if label_path is not None:
                labels, _ = to_closest_ras(read_volume(case.label))
                label_array = np.rint(resize(labels.array.astype(np.float32), shape, "nearest")).astype(np.int16)
                write_volume(label_path, Volume(label_array, grid))
            write_latent(latent_path, latent, affine, sidecar)
            log(f"[{number + 1}/{len(cases)}] {name}: {'×'.join(map(str, ct.shape))} → {'×'.join(map(str, shape))} "
                f"voxels, latent {'×'.join(map(str, latent.shape))}")
        spacing = [float(v) for v in np.linalg.norm(grid[:3, :3], axis=0)]
        entries.append({
            "image": os.path.relpath(case.image, root),
            "latent": os.path.relpath(latent_path.resolve(), root),
            **({"label": os.path.relpath(label_path.resolve(), root)} if label_path else {}),
            "dim": list(shape),
            "spacing": [round(s, 6) for s in spacing],
            "modality": case.modality,
            "body_region": list(case.body_region) if case.body_region else None,
            "fold": case.fold,
        })
    data = {"format": "maisi-datalist", "version": 1, "training": entries, "problems": []}
    write_datalist(out_datalist, data)
    return data
