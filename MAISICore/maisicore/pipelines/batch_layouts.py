"""Where ``maisi batch`` puts its cases, and the index files training frameworks read.

Formats (``--format``):
- ``nifti`` (default): ``DIR/images/ID.nii.gz`` (CT, int16 HU) and ``DIR/labels/ID.nii.gz``.
- ``monai``: the same files plus ``DIR/datalist.json`` (``{"training": [{"image", "label"}, ...]}``,
  paths relative to DIR) for ``monai.data.load_decathlon_datalist(..., base_dir=DIR)`` and Auto3DSeg.
- ``nnunet``: nnU-Net v2's raw dataset layout: ``DIR/imagesTr/ID_0000.nii.gz`` (channel 0, CT),
  ``DIR/labelsTr/ID.nii.gz`` and ``DIR/dataset.json`` (``channel_names``, ``labels``, ``numTraining``,
  ``file_ending``).

Labels are MAISI dictionary ids unless a label set is given (``--label-set liver,spleen``; needed for
nnU-Net, which wants consecutive ids): the named classes become 1..n in that order, every other
voxel background (0). The mapping is written to ``DIR/label_map.json``. No torch at import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

BATCH_FORMATS = ("nifti", "monai", "nnunet")
FILE_ENDING = ".nii.gz"
DATALIST = "datalist.json"
DATASET_JSON = "dataset.json"
LABEL_MAP = "label_map.json"


def parse_label_set(text: str | None) -> list[tuple[str, int]]:
    """``"liver,spleen"`` → [(name, MAISI id), ...] in the given order; one-line error for an unknown
    or repeated name."""
    if text is None:
        return []
    from ..anatomy.labels import label_table

    table = label_table()
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise InputError("--label-set: give comma-separated MAISI label names (see `maisi labels list`)")
    chosen: list[tuple[str, int]] = []
    for name in names:
        info = table.by_name(name) or table.resolve(name)
        if info is None:
            raise InputError(f"--label-set: {name!r} is not a MAISI label name (see `maisi labels list`)")
        if any(info.id == i for _, i in chosen):
            raise InputError(f"--label-set: {name!r} names {info.name} twice; list each class once")
        chosen.append((info.name, info.id))
    return chosen


@dataclass(frozen=True)
class Layout:
    """The files of one output folder: case paths by id, label remapping, index files."""

    root: Path
    format: str = "nifti"
    label_set: tuple[tuple[str, int], ...] = ()  # (MAISI name, MAISI id), new ids 1..n in this order

    def __post_init__(self):
        if self.format not in BATCH_FORMATS:
            raise InputError(f"--format {self.format!r}: choose one of {', '.join(BATCH_FORMATS)}")
        if self.format == "nnunet" and not self.label_set:
            raise InputError("--format nnunet needs consecutive label ids: give --label-set NAMES "
                             "(the classes to keep, comma-separated, e.g. liver,spleen)")

    @property
    def key(self) -> dict:
        """What makes an item's files differ between layouts (part of its fingerprint)."""
        return {"format": self.format, "label_set": [list(p) for p in self.label_set]}

    def image(self, case: str) -> Path:
        if self.format == "nnunet":
            return self.root / "imagesTr" / f"{case}_0000{FILE_ENDING}"
        return self.root / "images" / f"{case}{FILE_ENDING}"

    def label(self, case: str) -> Path:
        return self.root / ("labelsTr" if self.format == "nnunet" else "labels") / f"{case}{FILE_ENDING}"

    def folders(self) -> list[Path]:
        return [self.image("x").parent, self.label("x").parent]

    def remap(self, labels: np.ndarray) -> np.ndarray:
        """MAISI ids → the label set's 1..n (others 0), uint8; unchanged (int16) without a label set."""
        if not self.label_set:
            return labels.astype(np.int16)
        lookup = np.zeros(max(256, int(labels.max()) + 1), np.uint8)
        for new_id, (_, maisi_id) in enumerate(self.label_set, start=1):
            if maisi_id < lookup.size:
                lookup[maisi_id] = new_id
        return lookup[np.clip(labels.astype(np.int64), 0, lookup.size - 1)]

    def to_maisi(self, labels: np.ndarray) -> np.ndarray:
        """The inverse of ``remap`` (for label colours in the montage)."""
        if not self.label_set:
            return labels
        lookup = np.array([0] + [maisi_id for _, maisi_id in self.label_set], np.int16)
        return lookup[np.clip(labels.astype(np.int64), 0, lookup.size - 1)]

    def index_files(self) -> list[Path]:
        """Files ``write_index`` writes (besides the cases)."""
        files = [self.root / LABEL_MAP] if self.label_set else []
        if self.format == "monai":
            files.append(self.root / DATALIST)
        if self.format == "nnunet":
            files.append(self.root / DATASET_JSON)
        return files

    def write_index(self, cases: list[str], description: str = "") -> list[Path]:
        """Write the index of the finished ``cases`` (ids, sorted by the caller) for this format."""
        from ..io.volumes import atomic_write

        def dump(path: Path, data) -> Path:
            text = json.dumps(data, indent=2) + "\n"
            return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), suffix=".json")

        written = []
        if self.label_set:
            written.append(dump(self.root / LABEL_MAP, {
                "background": 0,
                "labels": [{"name": name, "id": new_id, "maisi_id": maisi_id}
                           for new_id, (name, maisi_id) in enumerate(self.label_set, start=1)],
                "note": "MAISI label ids not listed here are background (0)"}))
        if self.format == "monai":
            rows = [{"image": str(self.image(c).relative_to(self.root)), "label": str(self.label(c).relative_to(self.root))}
                    for c in cases]
            written.append(dump(self.root / DATALIST, {"description": description, "training": rows}))
        if self.format == "nnunet":
            labels = {"background": 0}
            labels.update({name: new_id for new_id, (name, _) in enumerate(self.label_set, start=1)})
            written.append(dump(self.root / DATASET_JSON, {
                "name": self.root.name, "description": description, "channel_names": {"0": "CT"},
                "labels": labels, "numTraining": len(cases), "file_ending": FILE_ENDING}))
        return written
