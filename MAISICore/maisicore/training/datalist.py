"""Datalists: the JSON index of training cases that ``maisi prepare`` writes and ``maisi train`` reads.

Format (paths relative to the datalist's folder)::

    {"format": "maisi-datalist", "version": 1,
     "training": [{"image": "ct/a.nii.gz", "label": "labels/a.nii.gz", "dim": [x, y, z],
                   "spacing": [x, y, z], "modality": "ct", "body_region": ["chest", "abdomen"],
                   "fold": 0}, ...],
     "problems": [{"file": "ct/b.nii.gz", "reason": "..."}]}

After ``maisi prepare latents`` entries also carry ``"latent"`` (a [X/4, Y/4, Z/4, 4] NIfTI of the VAE
posterior mean with a JSON sidecar) and ``"label"`` then names the labels resampled onto the
latent's image grid; ``dim``/``spacing`` describe that grid. Dim in voxels, spacing in mm, (x, y, z)
in the closest-RAS index order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..anatomy.labels import body_region_from_mask
from ..errors import InputError
from ..io.volumes import (
    VOLUME_EXTENSIONS,
    atomic_write,
    read_json,
    read_volume,
    volume_extension,
)

FORMAT = "maisi-datalist"
VERSION = 1


@dataclass(frozen=True)
class Case:
    """One training case with absolute paths."""

    image: Path | None
    label: Path | None
    latent: Path | None
    dim: tuple[int, int, int]
    spacing: tuple[float, float, float]
    modality: str
    body_region: tuple[str, str] | None
    fold: int


def _volume_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and volume_extension(p))


def _label_files(folder: Path) -> list[Path]:
    """Label volumes (NIfTI, NRRD) and DICOM SEG files (``.dcm``) in ``folder``."""
    return sorted(p for p in folder.iterdir() if p.is_file() and (volume_extension(p) or p.suffix.lower() == ".dcm"))


def _dicom_series(folder: Path) -> list[Path]:
    """The image series in ``folder`` (DICOM SEG files left out): ``folder`` itself when it holds
    one series, else ``FOLDER#SeriesInstanceUID`` for each."""
    from ..io.dicom import SERIES_SEPARATOR, find_series

    series = find_series(folder)
    images = [s for s in series if not s.is_seg]
    if len(series) == 1 and images:
        return [folder]
    return [Path(f"{folder}{SERIES_SEPARATOR}{s.uid}") for s in images]


def _stem(path: Path) -> str:
    """Case name: the file name without its volume or ``.dcm`` extension; a DICOM folder's name
    (without ``#UID``)."""
    ext = volume_extension(path) or (".dcm" if path.name.lower().endswith(".dcm") else "")
    return path.name[: -len(ext)] if ext else path.name.split("#")[0]


def path_exists(path: Path) -> bool:
    """Whether a datalist path exists: a file, a DICOM folder, or ``FOLDER#UID`` with its folder."""
    from ..io.dicom import split_series

    return split_series(path)[0].exists()


def _matching_label(image: Path, labels_dir: Path | None, label_files: dict[str, Path]) -> Path | None:
    if labels_dir is None:
        return None
    stem = _stem(image)
    for candidate in (stem, stem.removesuffix("_0000"), f"{stem}_seg", f"{stem}_label", f"{stem}_labels"):
        if candidate in label_files:
            return label_files[candidate]
    return None


def prepare_datalist(
    images_dir: str | os.PathLike,
    labels_dir: str | os.PathLike | None,
    out: str | os.PathLike,
    folds: int = 5,
    modality: str = "ct",
    log=print,
) -> dict:
    """Scan ``images_dir`` (and ``labels_dir``, matched by file name) and write a datalist to ``out``.

    Images are NIfTI/NRRD files and DICOM series (each subfolder's series, and series whose files lie
    directly in ``images_dir``; ``FOLDER#UID`` when a folder holds several); labels are NIfTI/NRRD
    files or DICOM SEG files (``NAME.dcm``) named like the image file or the series' folder.
    Every readable image becomes an entry with its dim, spacing (closest-RAS order), modality, body
    region (from its labels) and fold (round robin over sorted names). Unreadable files and images
    whose labels are on another grid are reported under ``problems`` and skipped, never fatal.
    """
    from ..io.geometry import to_closest_ras

    images_dir, out = Path(images_dir), Path(out)
    if not images_dir.is_dir():
        raise InputError(f"--images {images_dir}: not a folder")
    labels_path = Path(labels_dir) if labels_dir else None
    if labels_path is not None and not labels_path.is_dir():
        raise InputError(f"--labels {labels_path}: not a folder")
    if folds < 1:
        raise InputError(f"--folds must be at least 1, got {folds}")
    images = _volume_files(images_dir) + _dicom_series(images_dir)
    folders = sorted(p for p in images_dir.iterdir() if p.is_dir())
    skipped_dirs = []
    for folder in folders:
        series = _dicom_series(folder)
        images += series
        if not series:
            skipped_dirs.append(folder)
    if not images:
        raise InputError(f"--images {images_dir}: no {', '.join(VOLUME_EXTENSIONS)} files and no DICOM series")
    label_files = {_stem(p): p for p in _label_files(labels_path)} if labels_path else {}
    root = out.resolve().parent
    entries, problems = [], []
    for folder in skipped_dirs:
        problems.append({"file": _relative(folder, root), "reason": "a folder without DICOM image files"})

    def skip(image_path: Path, problem_file: Path, reason: str, logged: str | None = None) -> None:
        """Record ``problem_file`` as a problem and log that ``image_path``'s case is left out."""
        problems.append({"file": _relative(problem_file, root), "reason": reason})
        log(f"skipped {image_path.name}: {logged or reason}")

    for index, image_path in enumerate(images):
        try:
            image, _ = to_closest_ras(read_volume(image_path, modality="CT" if modality == "ct" else None))
        except InputError as exc:
            skip(image_path, image_path, str(exc))
            continue
        entry = {
            "image": _relative(image_path, root),
            "dim": [int(n) for n in image.shape],
            "spacing": [round(float(s), 6) for s in image.spacing],
            "modality": modality,
            "body_region": None,
            "fold": len(entries) % folds,
        }
        label_path = _matching_label(image_path, labels_path, label_files)
        if labels_path is not None and label_path is None:
            problems.append({"file": entry["image"], "reason": f"no label file of the same name in {labels_path}"})
        if label_path is not None:
            try:
                labels, _ = to_closest_ras(read_volume(label_path))
            except InputError as exc:
                skip(image_path, label_path, str(exc), f"its labels are unreadable ({exc})")
                continue
            if not labels.same_grid(image):
                reason = (f"labels {labels.shape} voxels at {_fmt(labels.spacing)} mm are not on the image's grid "
                          f"{image.shape} at {_fmt(image.spacing)} mm")
                skip(image_path, label_path, reason)
                continue
            entry["label"] = _relative(label_path, root)
            region = body_region_from_mask(np.asarray(labels.array))
            entry["body_region"] = list(region) if region else None
        entries.append(entry)
        log(f"[{index + 1}/{len(images)}] {image_path.name}: {'×'.join(map(str, entry['dim']))} at "
            f"{_fmt(entry['spacing'])} mm" + (f", region {entry['body_region']}" if entry["body_region"] else ""))
    data = {"format": FORMAT, "version": VERSION, "training": entries, "problems": problems}
    write_datalist(out, data)
    return data


def write_datalist(path: str | os.PathLike, data: dict) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def _relative(path: Path, root: Path) -> str:
    return os.path.relpath(Path(path).resolve(), root)


def _fmt(values) -> str:
    return "×".join(f"{v:.3g}" for v in values)


def read_datalist(path: str | os.PathLike, needs: tuple[str, ...], read: tuple[str, ...] = ()) -> list[Case]:
    """Read and check a datalist before any training: every file named exists, entries carry what
    the stage ``needs`` (``image``, ``label``, ``latent``), labels are on their image's (or latent's)
    grid. The files of the keys in ``read`` are read in full, entry by entry (``read_entry_files``),
    so a bad file anywhere is refused before any work. One-line ``InputError`` naming the first bad
    entry otherwise."""
    path = Path(path)
    data = read_json(path, "--datalist")
    entries = data.get("training") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InputError(f"--datalist {path}: no 'training' entries (make one with `maisi prepare`)")
    root = path.resolve().parent
    cases = []
    for number, entry in enumerate(entries):
        where = f"--datalist {path}, entry {number}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected an object")
        for key in needs:
            if not entry.get(key):
                hint = " (run `maisi prepare latents` first)" if key == "latent" else ""
                raise InputError(f"{where}: no '{key}'{hint}")
        files = {}
        for key in ("image", "label", "latent"):
            if entry.get(key):
                file = (root / entry[key]).resolve()
                if not path_exists(file):
                    raise InputError(f"{where}: {key} file {file} does not exist")
                files[key] = file
        dim = tuple(int(v) for v in entry.get("dim") or ())
        spacing = tuple(float(v) for v in entry.get("spacing") or ())
        if len(dim) != 3 or len(spacing) != 3:
            raise InputError(f"{where}: 'dim' and 'spacing' must be three numbers each")
        region = entry.get("body_region")
        case = Case(files.get("image"), files.get("label"), files.get("latent"), dim, spacing,
                    str(entry.get("modality", "ct")), tuple(region) if region else None, int(entry.get("fold", 0)))
        _check_shapes(case, where)
        cases.append(case)
    for number, case in enumerate(cases):
        read_entry_files(case, read, f"--datalist {path}, entry {number}")
    return cases


def read_entry_files(case: Case, keys: tuple[str, ...], where: str) -> None:
    """Read the entry's ``keys`` files in full as the training and encoding will (finite voxels,
    invertible affine; labels: integer MAISI ids, on the image's grid when there is no latent);
    one-line ``InputError`` prefixed ``where`` (the datalist and entry number)."""
    from ..io.geometry import to_closest_ras
    from ..validation import check_mask_values

    try:
        image = None
        if "image" in keys and case.image is not None:
            image = read_volume(case.image, modality="CT" if case.modality == "ct" else None)
        if "latent" in keys and case.latent is not None:
            from ..pipelines.vae import read_latent

            latent, _ = read_latent(case.latent)
            if latent.ndim != 4 or latent.shape[3] != 4:
                raise InputError(f"{case.latent}: expected a latent [X, Y, Z, 4], got shape {latent.shape}")
            if not np.all(np.isfinite(latent)):
                raise InputError(f"{case.latent}: holds NaN or infinite values; encode it again (`maisi prepare latents`)")
        if "label" in keys and case.label is not None:
            labels = read_volume(case.label)
            check_mask_values(np.asarray(labels.array), str(case.label))
            if image is not None and case.latent is None and \
                    not to_closest_ras(labels)[0].same_grid(to_closest_ras(image)[0]):
                raise InputError(f"label {case.label} is not on the grid of its image {case.image} (shape and affine "
                                 "must match)")
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from exc


def _header_shape(path: Path) -> tuple[int, ...]:
    try:
        return _read_header_shape(path)
    except InputError:
        raise
    except Exception as exc:  # a corrupt or foreign file: say which and why, in one line
        raise InputError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc


def _read_header_shape(path: Path) -> tuple[int, ...]:
    if volume_extension(path) is None:  # a DICOM series or SEG
        from ..io.dicom import dicom_shape

        return dicom_shape(path)
    if volume_extension(path) == ".nrrd":
        import nrrd

        return tuple(int(n) for n in nrrd.read_header(str(path))["sizes"])
    import nibabel as nib

    return tuple(int(n) for n in nib.load(str(path)).shape)


def _check_shapes(case: Case, where: str) -> None:
    """Labels must be on their image's grid (VAE/raw data) or on the latent's image grid."""
    if case.label is None:
        return
    label_shape = _header_shape(case.label)
    if case.latent is not None:
        latent_shape = _header_shape(case.latent)
        expected = tuple(4 * n for n in latent_shape[:3])
        if label_shape[:3] != expected:
            raise InputError(f"{where}: label {case.label} has shape {label_shape}, its latent's image grid is {expected}")
    elif case.image is not None:
        image_shape = _header_shape(case.image)
        if label_shape[:3] != image_shape[:3]:
            raise InputError(f"{where}: label {case.label} has shape {label_shape}, its image {case.image} {image_shape}")
