"""Paired generation without a user mask: pick a label volume from a candidate mask database.

The database is the reference's JSON (``candidate_masks_flexible_size_and_spacing_*.json``: a list
of entries with ``pseudo_label_filename``, ``label_list``, ``dim``, ``spacing`` and, for v1 masks,
``top_region_index``/``bottom_region_index`` one-hots) and the mask files it names, relative to a
mask folder. Selection follows the reference: the mask must contain every requested anatomy and
cover the requested body regions, and be free of tumours unless a tumour is requested; a mask on
exactly the requested grid is preferred, otherwise the closest one by field of view, size and
spacing is resampled. Tumours are then deformed (random affine + smooth elastic field, kept inside
their host organ, at least 80 % of their size) and the whole mask is zoomed by 0.99–1.01.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.geometry import Volume
from ..io.volumes import read_volume
from ..models.presets import BODY_REGIONS
from .grids import grid_around, labels_on_grid
from .labels import label_table

# The candidate-mask index each model's reference configuration uses (environment_*.json:
# all_mask_files_json) and the folder of mask files both indexes name (all_mask_files_base_dir),
# both under $MAISI_HOME/datasets where `maisi weights download --include-datasets` puts them.
CANDIDATE_MASK_INDEX = {
    "rflow-ct": "candidate_masks_flexible_size_and_spacing_4000.json",
    "ddpm-ct": "candidate_masks_flexible_size_and_spacing_3000.json",
}
MASK_FILES_FOLDER = "all_masks_flexible_size_and_spacing_4000"
MIN_TUMOR_SIZE_RATIO = 0.8
UPSAMPLE_LIMIT_VOXELS = 128  # a candidate this much smaller than the output is not upsampled


@dataclass(frozen=True)
class Candidate:
    """One database mask: file, label ids, grid (voxels, mm) and body-region span (indices)."""

    path: Path
    label_ids: frozenset[int]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    region_span: tuple[int, int] | None  # (top, bottom) indices into BODY_REGIONS


def default_mask_database(model: str) -> tuple[Path, Path]:
    """(index JSON, mask folder) that ``maisi weights download MODEL --include-datasets`` writes."""
    from ..paths import datasets_dir

    return datasets_dir() / CANDIDATE_MASK_INDEX[model], datasets_dir() / MASK_FILES_FOLDER


def load_database(json_path: str | os.PathLike, mask_dir: str | os.PathLike | None = None) -> list[Candidate]:
    """Read the candidate JSON; mask files are looked up in ``mask_dir`` (default: the JSON's folder)."""
    from ..io.volumes import read_json

    json_path = Path(json_path)
    entries = read_json(json_path, "--mask-db")
    folder = Path(mask_dir) if mask_dir else json_path.parent
    candidates = []
    for entry in entries:
        try:
            span = None
            if "top_region_index" in entry:
                span = (int(np.argmax(entry["top_region_index"])), int(np.argmax(entry["bottom_region_index"])))
            candidates.append(
                Candidate(
                    path=folder / entry["pseudo_label_filename"],
                    label_ids=frozenset(int(v) for v in entry["label_list"]),
                    shape=tuple(int(v) for v in entry["dim"]),
                    spacing=tuple(float(v) for v in entry["spacing"]),
                    region_span=span,
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"--mask-db {json_path}: entry {len(candidates)} lacks {exc}") from exc
    return candidates


def closeness(candidate: Candidate, size, spacing) -> float:
    """Reference score (lower is closer): field-of-view difference /10 mm, size difference /100
    voxels and spacing difference in mm, summed over axes."""
    score = 0.0
    for n, s, target_n, target_s in zip(candidate.shape, candidate.spacing, size, spacing):
        score += abs(n * s - target_n * target_s) / 10 + abs(n - target_n) / 100 + abs(s - target_s)
    return score


def select_candidates(
    database: list[Candidate], anatomy_ids, regions, size, spacing
) -> list[tuple[Candidate, bool]]:
    """Candidates that fit the request, best first, each with whether it is already on the grid."""
    table = label_table()
    tumor_ids = {info.id for info in table if info.tumor}
    wanted = set(anatomy_ids)
    region_indices = [BODY_REGIONS.index(r) for r in (regions or [])]
    fitting = []
    for c in database:
        if not wanted <= c.label_ids:
            continue
        if (c.label_ids & tumor_ids) - wanted:
            continue  # holds a tumour that was not asked for
        if region_indices and c.region_span and not all(c.region_span[0] <= i <= c.region_span[1] for i in region_indices):
            continue
        fitting.append(c)
    if not fitting:
        names = ", ".join(table.by_id(i).name for i in sorted(wanted)) or "any anatomy"
        where = f" covering {', '.join(regions)}" if regions else ""
        raise InputError(
            f"no candidate mask in the database contains {names}{where} without other tumours; "
            "change --anatomy or --body-region"
        )
    exact = [c for c in fitting if c.shape == tuple(size) and np.allclose(c.spacing, spacing, atol=1e-3)]
    if exact:
        return [(c, True) for c in exact]
    near = [
        c for c in fitting if all(n > target - UPSAMPLE_LIMIT_VOXELS for n, target in zip(c.shape, size))
    ] or fitting
    return [(c, False) for c in sorted(near, key=lambda c: closeness(c, size, spacing))]


def prepare_mask(
    candidate: Candidate, on_grid: bool, size, spacing, anatomy_ids, rng: np.random.Generator
) -> Volume | None:
    """Read a candidate, bring it onto the (size, spacing) grid centred on its body, augment it.
    None when resampling lost a requested anatomy."""
    labels = read_volume(candidate.path)
    labels = Volume(np.rint(labels.array).astype(np.int16), labels.affine)
    if not on_grid:
        labels = labels_on_grid(labels, grid_around(labels, size, spacing))
        present = set(np.unique(labels.array).tolist())
        if not set(anatomy_ids) <= present:
            return None
    array = augment_tumors(labels.array, rng)
    array = zoom_about_centre(array, rng.uniform(0.99, 1.01))
    return Volume(array, labels.affine)


def _host_label(labels: np.ndarray, tumor: np.ndarray, excluded: set[int]) -> int | None:
    from scipy import ndimage

    ring = ndimage.binary_dilation(tumor, iterations=2) & ~tumor
    values, counts = np.unique(labels[ring], return_counts=True)
    best = [(n, v) for v, n in zip(values.tolist(), counts.tolist()) if v not in excluded]
    return max(best)[1] if best else None


def _random_warp(mask: np.ndarray, rng: np.random.Generator, max_shift: float) -> np.ndarray:
    """Random rotation (≤ 5°), scale (±15 %), shift (≤ ``max_shift`` voxels) about the mask's
    centroid, plus a smooth elastic field (σ 4 voxels, ≈ 2 voxels); nearest resampling."""
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    centre = np.argwhere(mask).mean(axis=0)
    rotation = Rotation.from_rotvec(rng.uniform(-1, 1, 3) * np.deg2rad(5)).as_matrix()
    matrix = rotation * rng.uniform(0.85, 1.15, 3)[None, :]
    shift = rng.uniform(-max_shift, max_shift, 3)
    grid = np.indices(mask.shape, dtype=np.float32).reshape(3, -1)
    source = np.linalg.inv(matrix) @ (grid - (centre + shift)[:, None]) + centre[:, None]
    for axis in range(3):
        field = ndimage.gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), 4.0)
        field *= 2.0 / (field.std() + 1e-6)
        source[axis] += field.ravel()
    warped = ndimage.map_coordinates(mask.astype(np.float32), source, order=0, mode="constant")
    return warped.reshape(mask.shape) > 0.5


def augment_tumors(labels: np.ndarray, rng: np.random.Generator, margin: int = 12, attempts: int = 10) -> np.ndarray:
    """Deform every tumour label of ``labels`` (x, y, z) inside its host organ; returns a copy.

    The voxels a tumour leaves go to its host organ; a deformation that keeps under 80 % of the
    tumour's size is retried, and after ``attempts`` failures the tumour stays as it was."""
    table = label_table()
    tumor_ids = [info.id for info in table if info.tumor]
    body_id = table.by_name("body").id
    out = labels.copy()
    for tumor_id in tumor_ids:
        tumor = out == tumor_id
        if not tumor.any():
            continue
        lo = np.maximum(np.argwhere(tumor).min(axis=0) - margin, 0)
        hi = np.minimum(np.argwhere(tumor).max(axis=0) + margin + 1, out.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        local = out[box]
        local_tumor = local == tumor_id
        host = _host_label(local, local_tumor, {0, body_id, *tumor_ids})
        allowed = local_tumor | ((local == host) if host is not None else np.ones_like(local_tumor))
        size = local_tumor.sum()
        for _ in range(attempts):
            moved = _random_warp(local_tumor, rng, max_shift=3.0) & allowed
            if moved.sum() >= MIN_TUMOR_SIZE_RATIO * size:
                local[local_tumor] = host if host is not None else body_id
                local[moved] = tumor_id
                break
    return out


def zoom_about_centre(labels: np.ndarray, factor: float) -> np.ndarray:
    """Scale a label volume by ``factor`` about its centre (nearest), same shape."""
    from scipy import ndimage

    centre = (np.asarray(labels.shape) - 1) / 2.0
    matrix = np.eye(3) / factor
    offset = centre - matrix @ centre
    return ndimage.affine_transform(labels, matrix, offset=offset, order=0, mode="constant", cval=0, output=labels.dtype)
