"""``maisi evaluate``: gather the real and synthetic cases, compute the chosen metrics, write the report.

Cases come from a folder or a datalist:
- a folder: every ``.nii.gz``/``.nii``/``.nrrd`` file in it is a CT, except label files: ``NAME_labels``
  / ``NAME_label`` / ``NAME_seg`` beside ``NAME`` (as ``maisi generate --label-out`` is usually named)
  or ``labels/NAME`` in a subfolder; they are that CT's labels (MAISI ids, on its grid).
- a datalist (JSON): ``maisi prepare``'s format (``{"training": [{"image": ..., "label": ...}]}``) or
  a plain list of such objects or of image paths; paths relative to the datalist's folder.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.geometry import Volume, to_closest_ras
from ..io.volumes import VOLUME_EXTENSIONS, read_json, read_volume, volume_extension
from .report import SUMMARY_KEYS, summary  # noqa: F401  (SUMMARY_KEYS: importable from here as before)

METRICS = ("fid-2.5d", "frd", "vae", "fidelity", "diversity")
DEFAULT_METRICS = ("vae", "fidelity", "diversity")
LABEL_SUFFIXES = ("_labels", "_label", "_seg")
HISTOGRAM_EDGES_HU = np.arange(-1000.0, 1001.0, 10.0)  # 200 bins of 10 HU
MONTAGE_CASES = 4  # real and synthetic cases each in the mid-plane montage


@dataclass(frozen=True)
class Case:
    """One CT (file, folder or DICOM series) and its MAISI label file, if any."""

    image: str
    label: str | None
    name: str


def _stem(path: Path) -> str:
    ext = volume_extension(path)
    return path.name[: -len(ext)] if ext else path.name


def collect_cases(source: str | os.PathLike, option: str) -> list[Case]:
    """The cases of a folder or datalist (see the module docstring); one-line ``InputError`` when
    there are none or a file is missing."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and volume_extension(p))
        by_stem = {_stem(p): p for p in files}
        label_stems = {s for s in by_stem for suffix in LABEL_SUFFIXES
                       if s.endswith(suffix) and s[: -len(suffix)] in by_stem}
        cases = []
        for stem, path in by_stem.items():
            if stem in label_stems:
                continue
            label = next((by_stem[stem + s] for s in LABEL_SUFFIXES if stem + s in by_stem), None)
            if label is None and (source / "labels" / path.name).is_file():
                label = source / "labels" / path.name
            cases.append(Case(str(path), str(label) if label else None, stem))
        if not cases:
            raise InputError(f"{option} {source}: no CT files ({', '.join(VOLUME_EXTENSIONS)}) in this folder")
        return cases
    if not source.is_file():
        raise InputError(f"{option} {source}: no such folder or datalist file")
    data = read_json(source, option)
    entries = data.get("training") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{option} {source}: a datalist needs a non-empty 'training' list (or a top-level list)")
    root = source.resolve().parent
    cases = []
    for number, entry in enumerate(entries):
        entry = {"image": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise InputError(f"{option} {source}, entry {number}: expected an image path or an object with 'image'")
        files = {}
        for key in ("image", "label"):
            if entry.get(key):
                file = root / entry[key]
                if not Path(str(file).split("#")[0]).exists():
                    raise InputError(f"{option} {source}, entry {number}: {key} file {file} does not exist")
                files[key] = str(file)
        cases.append(Case(files["image"], files.get("label"), _stem(Path(files["image"]))))
    return cases


def read_case(case: Case) -> tuple[Volume, np.ndarray | None]:
    """The CT reoriented to the closest RAS order (HU, float32) and its labels on that grid (int32)."""
    from ..validation import check_mask_values

    ct = read_volume(case.image, modality="CT")
    labels = None
    if case.label:
        label_volume = read_volume(case.label)
        if not label_volume.same_grid(ct):
            raise InputError(f"{case.label} is not on the grid of {case.image} (shape and affine must match)")
        labels = to_closest_ras(Volume(check_mask_values(label_volume.array, case.label).astype(np.int32),
                                       label_volume.affine))[0].array
    ras = to_closest_ras(ct)[0]
    return Volume(ras.array.astype(np.float32), ras.affine), labels


def check_report_folder(out: str | os.PathLike) -> Path:
    """The report folder must be new or empty, its parent a writable folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out}: must be a new or empty folder")
    parent = out.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"--out {out}: folder {parent} does not exist or is not writable")
    return out


def parse_metrics(text: str | None) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_METRICS
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise InputError(f"--metrics {text}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(METRICS)}")
    return names


def _histogram(values: np.ndarray) -> np.ndarray:
    return np.histogram(np.clip(values, -1000.0, 1000.0), bins=HISTOGRAM_EDGES_HU)[0].astype(np.int64)


def _grid_key(volume: Volume, labels: np.ndarray | None) -> str:
    """Same request ⇔ same grid and same labels (or both without labels)."""
    digest = hashlib.sha1(np.round(volume.affine, 3).tobytes())
    digest.update(str(volume.shape).encode())
    if labels is not None:
        digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def evaluate(
    real: str | os.PathLike | None,
    synthetic: str | os.PathLike | None,
    out: str | os.PathLike,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    vae_weights: str | os.PathLike | None = None,
    feature_weights: str | os.PathLike | None = None,
    feature_network=None,
    fid_shape=(512, 512, 512),
    fid_spacing=(1.0, 1.0, 1.0),
    fid_ratio: float = 0.4,
    fid_batch: int = 8,
    frd_full: bool = False,
    device: str = "cpu",
    memory_budget_bytes: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Compute ``metrics`` and write ``out/report.md``, ``out/metrics.json`` and the PNG plots.

    ``feature_network`` (an ``nn.Module`` on (N, 3, H, W)) replaces the RadImageNet network of
    ``feature_weights`` for FID (tests). Everything is checked and computed before the folder is
    made; each file is written through a temporary file. Returns the metrics dict.
    """
    from .. import __version__
    from ..validation import resolve_device
    from . import fid as fidlib
    from . import measures
    from .report import write_report

    log = log or (lambda message: None)
    out = check_report_folder(out)
    real_cases = collect_cases(real, "--real") if real else []
    synthetic_cases = collect_cases(synthetic, "--synthetic") if synthetic else []
    needs_real = {"fid-2.5d", "frd", "vae"} & set(metrics)
    needs_synthetic = {"fid-2.5d", "frd", "fidelity", "diversity"} & set(metrics)
    if needs_real and not real_cases:
        raise InputError(f"--metrics {','.join(sorted(needs_real))} needs --real")
    if needs_synthetic and not synthetic_cases:
        raise InputError(f"--metrics {','.join(sorted(needs_synthetic))} needs --synthetic")
    if "fidelity" in metrics and not any(c.label for c in synthetic_cases + real_cases):
        raise InputError("--metrics fidelity needs labels (NAME_labels.nii.gz beside NAME.nii.gz, or 'label' in a datalist)")
    if "frd" in metrics:
        from .frd import frd_available

        problem = frd_available()
        if problem:
            raise InputError(problem)
    torch_device = resolve_device(device)
    network = None
    if "fid-2.5d" in metrics:
        network = feature_network.to(torch_device).eval() if feature_network is not None else \
            fidlib.load_feature_network(feature_weights, torch_device)
    autoencoder = None
    if "vae" in metrics:
        from ..pipelines.vae import load_autoencoder

        if vae_weights is None:
            raise InputError("--metrics vae needs --vae-weights AE.pt (e.g. the demo model's "
                             "MAISICore/maisicore/data/demo/models/autoencoder_v1.pt, or --model demo)")
        autoencoder = load_autoencoder(vae_weights, torch_device)

    result: dict = {"maisicore": __version__, "metrics": list(metrics),
                    "real": [vars(c) for c in real_cases], "synthetic": [vars(c) for c in synthetic_cases]}
    histograms: dict[str, dict[str, np.ndarray]] = {"real": {}, "synthetic": {}}
    montage: dict[str, list] = {"real": [], "synthetic": []}
    features: dict[str, dict[str, list]] = {side: {p: [] for p in fidlib.PLANES} for side in ("real", "synthetic")}
    groups: dict[str, list[Case]] = {}
    vae_rows, fidelity_rows = [], {"real": [], "synthetic": []}
    progress = None
    if network is not None:
        from tqdm import tqdm

        total = fidlib.slices_per_image(tuple(fid_shape), fid_ratio) * (len(real_cases) + len(synthetic_cases))
        progress = tqdm(total=total, desc="fid-2.5d slices", unit="slice", leave=False)

    for side, cases in (("real", real_cases), ("synthetic", synthetic_cases)):
        for case in cases:
            log(f"{side}: {case.name}")
            ct, labels = read_case(case)
            if len(montage[side]) < MONTAGE_CASES:
                montage[side].append((case.name, ct, labels))
            if labels is not None:
                for organ, ids in measures.organ_groups().items():
                    inside = np.isin(labels, ids)
                    if inside.any():
                        histograms[side].setdefault(organ, np.zeros(len(HISTOGRAM_EDGES_HU) - 1, np.int64))
                        histograms[side][organ] += _histogram(ct.array[inside])
            if "fidelity" in metrics and labels is not None:
                fidelity_rows[side].append({"case": case.name, **measures.fidelity(ct.array, labels)})
            if side == "real" and autoencoder is not None:
                recon = measures.reconstruct(autoencoder, ct.array, torch_device, memory_budget_bytes)
                vae_rows.append({"case": case.name, **measures.reconstruction_figures(ct.array, recon, labels)})
            if network is not None:
                image = fidlib.preprocess(ct, fid_spacing, fid_shape)
                planes = fidlib.plane_features(image, network, fid_ratio, fid_batch, torch_device, progress.update)
                for plane, values in planes.items():
                    features[side][plane].append(values)
            if side == "synthetic" and "diversity" in metrics:
                groups.setdefault(_grid_key(ct, labels), []).append(case)
    if progress is not None:
        progress.close()

    if network is not None:
        import torch

        stacked = {side: {p: torch.cat(v) for p, v in planes.items()} for side, planes in features.items()}
        result["fid_2_5d"] = {
            **fidlib.fid_per_plane(stacked["synthetic"], stacked["real"]),
            "slices": {side: {p: int(stacked[side][p].shape[0]) for p in fidlib.PLANES} for side in stacked},
            "settings": {"shape": list(fid_shape), "spacing_mm": list(fid_spacing), "center_slices_ratio": fid_ratio,
                         "feature_network": "given network" if feature_network is not None else
                         f"RadImageNet ResNet-50 ({feature_weights})"},
        }
    if "frd" in metrics:
        result["frd"] = _frd(real_cases, synthetic_cases, frd_full, log)
    if "vae" in metrics:
        result["vae"] = {"weights": str(vae_weights), "cases": vae_rows, **_vae_means(vae_rows)}
    if "fidelity" in metrics:
        result["fidelity"] = {side: _fidelity_summary(rows) for side, rows in fidelity_rows.items() if rows}
    if "diversity" in metrics:
        result["diversity"] = _diversity(groups, log)
    result["summary"] = summary(result)
    write_report(out, result, histograms, montage, HISTOGRAM_EDGES_HU)
    return result


def _vae_means(rows: list[dict]) -> dict:
    keys = ("mae_hu", "psnr_db", "ssim")
    return {f"mean_{k}": float(np.mean([r[k] for r in rows])) for k in keys} if rows else {}


def _fidelity_summary(rows: list[dict]) -> dict:
    passed = sum(r["passed"] for r in rows)
    checked = sum(r["checked"] for r in rows)
    return {"cases": rows, "passed": passed, "checked": checked, "pass_fraction": passed / checked if checked else None}


def _diversity(groups: dict[str, list[Case]], log) -> dict:
    from . import measures

    out = []
    for cases in groups.values():
        if len(cases) < 2:
            continue
        log(f"diversity: {len(cases)} CTs of one request")
        arrays = [read_case(c)[0].array for c in cases]
        out.append({"cases": [c.name for c in cases], **measures.diversity(arrays)})
    values = [v for g in out for v in g["ms_ssim_pairs"]]
    return {"groups": out, "pairs": len(values), "ms_ssim_mean": float(np.mean(values)) if values else None,
            "note": None if values else "no two synthetic CTs share a grid and labels (one request, several seeds)"}


def _frd(real_cases: list[Case], synthetic_cases: list[Case], full: bool, log) -> dict:
    """FRD on the files as they are (NIfTI/NRRD), inside the labelled region (labels > 0) when every
    case of both sets has labels; other inputs (DICOM) are written as NIfTI to a temporary folder."""
    from ..io.volumes import write_volume
    from .frd import FAST_IMAGE_TYPES, frd

    with_masks = all(c.label for c in real_cases + synthetic_cases)
    with tempfile.TemporaryDirectory(prefix="maisi-frd-") as tmp:
        def files(cases, side):
            images, masks = [], []
            for index, case in enumerate(cases):
                image = case.image
                if volume_extension(image) is None:
                    image = str(Path(tmp) / f"{side}{index}.nii.gz")
                    write_volume(image, read_volume(case.image, modality="CT"))
                images.append(image)
                if with_masks:
                    labels = read_volume(case.label)
                    mask = str(Path(tmp) / f"{side}{index}_mask.nii.gz")
                    write_volume(mask, Volume((np.asarray(labels.array) > 0).astype(np.uint8), labels.affine))
                    masks.append(mask)
            return images, (masks if with_masks else None)

        real_files, real_masks = files(real_cases, "real")
        synthetic_files, synthetic_masks = files(synthetic_cases, "synthetic")
        log(f"frd: {len(real_files)} real, {len(synthetic_files)} synthetic images")
        image_types = None if full else FAST_IMAGE_TYPES
        value = frd(real_files, synthetic_files, real_masks, synthetic_masks, image_types)
    return {"value": value, "masks": "labels > 0" if with_masks else "whole image",
            "version": "frd-score v1 defaults" + ("" if full else ", image types: Original only")}
