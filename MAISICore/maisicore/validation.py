"""Checks of a generation request before any network is built: one-line ``InputError`` messages
naming the argument, the value, the accepted range and the unit."""

from __future__ import annotations

import math

import numpy as np
import torch

from .anatomy.labels import unknown_label_ids
from .errors import InputError
from .models.presets import BODY_REGIONS, ModelPreset, OutputGridRules


def _fmt(values) -> str:
    return "×".join(f"{v:g}" for v in values)


def check_grid(size, spacing, rules: OutputGridRules, allow_any_size: bool, regions=None) -> list[str]:
    """Check an output grid (size voxels, spacing mm, both x, y, z). Returns warnings."""
    notes: list[str] = []
    if len(size) != 3 or len(spacing) != 3:
        raise InputError("--size and --spacing take three values each: X Y Z")
    if any(s <= 0 for s in spacing):
        raise InputError(f"--spacing {_fmt(spacing)} mm: every spacing must be positive")
    if rules.max_voxels is not None and not allow_any_size:  # free grids (MR models)
        m = rules.any_size_multiple
        if any(s <= 0 or s % m for s in size):
            raise InputError(f"--size {_fmt(size)}: every size must be a positive multiple of {m} "
                             "(the VAE divides by 4 and the diffusion UNet halves the latent 3 times)")
        if math.prod(size) > rules.max_voxels:
            raise InputError(f"--size {_fmt(size)}: {math.prod(size)} voxels, more than the {rules.max_voxels} "
                             "the model was published for; ask for fewer voxels (or pass --allow-any-size)")
        return notes
    if allow_any_size:
        m = rules.any_size_multiple
        if any(s <= 0 or s % m for s in size):
            raise InputError(
                f"--size {_fmt(size)}: with --allow-any-size every size must be a positive multiple of {m} "
                f"(the VAE divides by 4 and the diffusion UNet halves the latent 3 times)"
            )
        notes.append(
            f"--allow-any-size: {_fmt(size)} voxels at {_fmt(spacing)} mm is outside the published models' "
            "training grids; expect lower quality"
        )
        return notes
    if size[0] != size[1] or size[0] not in rules.inplane_sizes or size[2] not in rules.slice_sizes:
        raise InputError(
            f"--size {_fmt(size)}: X and Y must be equal and one of {rules.inplane_sizes}, Z one of "
            f"{rules.slice_sizes} (or pass --allow-any-size)"
        )
    lo, hi = rules.inplane_spacing_mm
    zlo, zhi = rules.slice_spacing_mm
    if abs(spacing[0] - spacing[1]) > 1e-6 or not (lo <= spacing[0] <= hi) or not (zlo <= spacing[2] <= zhi):
        raise InputError(
            f"--spacing {_fmt(spacing)} mm: X and Y must be equal and within {lo}–{hi} mm, Z within {zlo}–{zhi} mm "
            "(or pass --allow-any-size)"
        )
    fov = size[0] * spacing[0]
    if fov < rules.min_inplane_fov_mm:
        raise InputError(
            f"in-plane field of view {fov:g} mm (size {size[0]} × spacing {spacing[0]:g} mm) is below "
            f"{rules.min_inplane_fov_mm:g} mm; raise --spacing or --size"
        )
    if fov < rules.recommended_inplane_fov_mm and not (regions and set(regions) == {"head"}):
        notes.append(
            f"in-plane field of view {fov:g} mm is below the {rules.recommended_inplane_fov_mm:g} mm "
            "recommended for bodies other than the head"
        )
    return notes


def check_mask_values(labels: np.ndarray, name: str = "mask") -> np.ndarray:
    """Integer MAISI label ids or refuse; returns the labels as int64."""
    if not np.issubdtype(labels.dtype, np.integer):
        rounded = np.rint(labels)
        if not np.array_equal(rounded, labels):
            raise InputError(f"{name}: holds non-integer values; a label volume must hold integer label ids")
        labels = rounded
    labels = labels.astype(np.int64, copy=False)
    unknown = unknown_label_ids(labels)
    if unknown:
        shown = ", ".join(map(str, unknown[:8])) + (" …" if len(unknown) > 8 else "")
        raise InputError(
            f"{name}: label ids {shown} are not in the MAISI dictionary (0–132, body 200); remap them first"
        )
    return labels


def check_body_regions(regions, preset: ModelPreset) -> list[str]:
    """Check ``--body-region`` names; returns warnings."""
    if not regions:
        return []
    bad = [r for r in regions if r not in BODY_REGIONS]
    if bad:
        raise InputError(f"--body-region {bad[0]!r}: choose from {', '.join(BODY_REGIONS)}")
    if not preset.uses_body_region:
        return [f"--body-region is not a condition of {preset.name}; it is ignored"]
    return []


def check_steps(steps: int, preset: ModelPreset) -> list[str]:
    """Check the number of denoising steps; returns warnings."""
    train = preset.scheduler.kwargs["num_train_timesteps"]
    if not 1 <= steps <= train:
        raise InputError(f"--steps {steps}: must be between 1 and {train}")
    if preset.scheduler.kind == "ddpm" and steps < train:
        return [f"{preset.name} was trained for {train} DDPM steps; {steps} steps lower the quality"]
    return []


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; refuses CUDA without CUDA."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise InputError(f"--device {device!r}: choose auto, cpu or cuda")
