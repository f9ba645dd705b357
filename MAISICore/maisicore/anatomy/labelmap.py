"""From any segmentation to a MAISI label volume.

Sources: a TotalSegmentator v2 multi-label file, a folder of TotalSegmentator per-class masks, or a
set of named binary masks (what a Slicer segmentation exports; names or Slicer terminology
strings). Every source class is either mapped to a MAISI id or listed as unmapped in the report:
nothing is dropped silently.

Overlaps (named masks may overlap) are resolved by priority: tumours over organs and other
structures, those over the body envelope; within a tier the smaller structure wins (a vessel
inside an organ stays visible). Arrays are (x, y, z); affines index → RAS (mm).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import InputError
from ..io.geometry import Volume
from ..io.volumes import VOLUME_EXTENSIONS, read_volume, volume_extension
from .body import BodyOptions, add_body_envelope
from .labels import LabelInfo, label_table

BODY_NAME = "body"


@dataclass
class ConversionReport:
    """What a conversion did, class by class (voxel counts are in the converted volume)."""

    mapped: list[dict] = field(default_factory=list)  # {"source", "id", "name", "voxels"}
    unmapped: list[dict] = field(default_factory=list)  # {"source", "voxels"}
    overlap_voxels: int = 0  # voxels claimed by more than one mapped source
    body_voxels_added: int = 0  # voxels set to body (200) by the envelope

    def to_dict(self) -> dict:
        return {
            "mapped": self.mapped,
            "unmapped": self.unmapped,
            "overlap_voxels": self.overlap_voxels,
            "body_voxels_added": self.body_voxels_added,
        }

    def summary(self) -> str:
        text = f"{len(self.mapped)} classes mapped"
        if self.unmapped:
            names = ", ".join(u["source"] for u in self.unmapped[:6]) + (" …" if len(self.unmapped) > 6 else "")
            text += f"; {len(self.unmapped)} unmapped ({names})"
        if self.overlap_voxels:
            text += f"; {self.overlap_voxels} overlapping voxels resolved by priority"
        if self.body_voxels_added:
            text += f"; body envelope added on {self.body_voxels_added} voxels"
        return text

    def write_json(self, path: str | os.PathLike) -> None:
        from ..io.volumes import atomic_write

        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(self.to_dict(), indent=2) + "\n"))


def _tier(info: LabelInfo) -> int:
    if info.tumor:
        return 3
    return 1 if info.name == BODY_NAME else 2


def paint_priority(info: LabelInfo, voxels: int) -> tuple[int, int]:
    """Sort key of the painting order where masks overlap: paint in ascending order, each mask over
    the earlier ones, so the last painted wins. Body first, then organs and other structures, then
    tumours; within a tier the larger first (``voxels``: the mask's size on the output grid), so
    small structures stay visible. Ties keep their given order (sort stably)."""
    return _tier(info), -int(voxels)


def labels_from_masks(
    masks: Mapping[str, np.ndarray], affine: np.ndarray, names_are_totalsegmentator: bool = False
) -> tuple[Volume, ConversionReport]:
    """Combine named binary masks (same grid) into one MAISI label volume.

    Args:
        masks: source name (segment name, TotalSegmentator class name or Slicer terminology
            string) → boolean/0-1 array (x, y, z).
        affine: index → RAS of every mask.
        names_are_totalsegmentator: look names up as TotalSegmentator classes first.
    """
    table = label_table()
    report = ConversionReport()
    shapes = {np.shape(m) for m in masks.values()}
    if len(shapes) > 1:
        raise InputError(f"the masks differ in shape ({', '.join(map(str, sorted(shapes)))}); resample them to one grid")
    shape = shapes.pop() if shapes else None
    resolved = []
    for source, mask in masks.items():
        mask = np.asarray(mask) != 0
        info = table.by_totalsegmentator(source) if names_are_totalsegmentator else None
        info = info or table.resolve(source)
        voxels = int(mask.sum())
        if info is None:
            report.unmapped.append({"source": source, "voxels": voxels})
            continue
        resolved.append((info, source, mask, voxels))
    if shape is None:
        raise InputError("no masks given")
    out = np.zeros(shape, dtype=np.int16)
    claimed = np.zeros(shape, dtype=np.uint8)
    for info, _source, mask, _voxels in sorted(resolved, key=lambda r: paint_priority(r[0], r[3])):
        out[mask] = info.id
        claimed[mask] = np.minimum(claimed[mask] + 1, 2)
    report.overlap_voxels = int((claimed > 1).sum())
    for info, source, mask, _voxels in resolved:
        report.mapped.append({"source": source, "id": info.id, "name": info.name, "voxels": int((out == info.id)[mask].sum())})
    return Volume(out, affine), report


def labels_from_totalsegmentator(segmentation: Volume) -> tuple[Volume, ConversionReport]:
    """Map a TotalSegmentator v2 ("total" task) multi-label volume to MAISI ids, voxel for voxel."""
    table = label_table()
    names = table.totalsegmentator_v2_names()
    values = segmentation.array
    if not np.issubdtype(values.dtype, np.integer):
        if not np.array_equal(np.rint(values), values):
            raise InputError("the TotalSegmentator volume holds non-integer values")
        values = np.rint(values).astype(np.int32)
    lookup = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=np.int16)
    report = ConversionReport()
    present, counts = np.unique(values, return_counts=True)
    for value, count in zip(present.tolist(), counts.tolist()):
        if value == 0:
            continue
        name = names.get(int(value))
        info = table.by_totalsegmentator(name) if name else None
        if info is None:
            report.unmapped.append({"source": name or f"label {value}", "voxels": int(count)})
            continue
        lookup[value] = info.id
        report.mapped.append({"source": name, "id": info.id, "name": info.name, "voxels": int(count)})
    if values.min() < 0:
        raise InputError("the TotalSegmentator volume holds negative values")
    return Volume(lookup[values], segmentation.affine), report


def read_totalsegmentator(path: str | os.PathLike) -> tuple[Volume, ConversionReport]:
    """A TotalSegmentator result: one multi-label file, or a folder of per-class mask files
    (``<class>.nii.gz``)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if volume_extension(p))
        if not files:
            raise InputError(f"{path}: no {', '.join(VOLUME_EXTENSIONS)} files in the folder")
        volumes = {_stem(p): read_volume(p) for p in files}
        return _masks_on_one_grid(volumes, names_are_totalsegmentator=True)
    return labels_from_totalsegmentator(read_volume(path))


def read_named_masks(paths: list[str]) -> tuple[Volume, ConversionReport]:
    """Binary mask files named by their file name (``Liver.nii.gz``) or as ``NAME=PATH``."""
    volumes = {}
    for item in paths:
        name, sep, file = item.partition("=")
        if not sep:
            name, file = _stem(Path(item)), item
        if name in volumes:
            raise InputError(f"two masks are named {name!r}; name them with NAME=PATH")
        volumes[name] = read_volume(file)
    return _masks_on_one_grid(volumes, names_are_totalsegmentator=False)


def _stem(path: Path) -> str:
    ext = volume_extension(path) or ""
    return path.name[: len(path.name) - len(ext)] if ext else path.stem


def check_binary_mask(array: np.ndarray, name: str, allow_empty: bool = False) -> None:
    """Refuse (one line) a mask with fractional values, or an empty one unless ``allow_empty``."""
    values = np.asarray(array)
    if not np.issubdtype(values.dtype, np.integer) and not np.issubdtype(values.dtype, np.bool_):
        finite = values[np.isfinite(values)] if values.size else values
        fractional = finite[finite != np.rint(finite)]
        if fractional.size:
            raise InputError(f"mask {name}: holds fractional values (e.g. {float(fractional.flat[0]):g}); a mask must "
                             "be binary: threshold it (e.g. at 0.5) first")
    if not allow_empty and not np.any(values):
        raise InputError(f"mask {name}: every voxel is 0; give a mask that marks the structure")


def _masks_on_one_grid(volumes: Mapping[str, Volume], names_are_totalsegmentator: bool):
    first_name, first = next(iter(volumes.items()))
    for name, volume in volumes.items():
        if not volume.same_grid(first):
            raise InputError(f"mask {name!r} is not on the grid of {first_name!r}; resample the masks to one grid")
        # TotalSegmentator writes a file for every class, empty when the class is absent: skipped.
        check_binary_mask(volume.array, repr(name), allow_empty=names_are_totalsegmentator)
    return labels_from_masks({n: v.array for n, v in volumes.items()}, first.affine, names_are_totalsegmentator)


def with_body_envelope(labels: Volume, report: ConversionReport, ct: Volume | None = None,
                       options: BodyOptions | None = None, progress=None) -> Volume:
    """Add the body label (200) inside the body: from the CT (HU; its grid the labels', in any axis
    order) when given, by NVIDIA's ``add_body_envelope`` algorithm with ``options`` (``BodyOptions``,
    None: the reference's defaults); else from the labels alone (``body.body_from_labels``).
    ``progress(done, total)``: the envelope's steps (``body.envelope_from_ct``)."""
    body_id = label_table().by_name(BODY_NAME).id
    ct_array = None
    if ct is not None:
        from ..io.geometry import onto_grid_of

        aligned = onto_grid_of(ct, labels)  # the same voxels in another axis order (e.g. DICOM vs NIfTI) is fine
        if aligned is None:
            raise InputError("--ct is not on the segmentation's grid (shape and affine must match)")
        ct_array = aligned.array
    out, added = add_body_envelope(labels.array, body_id, ct_array, labels.spacing, options, progress)
    report.body_voxels_added = added
    return Volume(out, labels.affine)
