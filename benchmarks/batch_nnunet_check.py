"""nnU-Net v2's own dataset-integrity check on a `maisi batch --format nnunet` folder.

nnunetv2 is too heavy for the test extra (pandas, scikit-learn, scikit-image, timm, ...), so this
script runs it: install it beside the CPU torch without replacing it,

    pip install nnunetv2 "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"

then either check an existing folder or make a small one from the real example segmentation
(two masks × two seeds and two liver-tumour inpaintings, demo model, 2 steps):

    python benchmarks/batch_nnunet_check.py [DIR]

Prints what ``nnunetv2.experiment_planning.verify_dataset_integrity`` says; exit 0 when it passes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "Testing"))


def make_dataset(folder: Path) -> Path:
    import fetch_test_data
    from conftest import body_mask_from_real_data
    from maisicore.io.geometry import Volume
    from maisicore.io.volumes import write_volume
    from maisicore.pipelines.batch import BatchOptions, run_batch

    labels, affine = body_mask_from_real_data(fetch_test_data.reference_files())
    write_volume(folder / "mask.nii.gz", Volume(labels, affine))
    coarse = affine.copy()
    coarse[:3, :2] *= 3
    write_volume(folder / "coarse.nii.gz", Volume(labels[::3, ::3, :].copy(), coarse))
    import numpy as np
    from maisicore.io.volumes import read_volume

    ct = read_volume(fetch_test_data.reference_files() / "example_ct_sm.nii.gz")
    crop = np.full(labels.shape, -1000, np.int16)
    crop[:, :, :30] = np.asarray(ct.array)[13:109, 2:98, :]
    write_volume(folder / "ct.nii.gz", Volume(crop, affine))
    centre = affine @ np.append(np.argwhere(labels == 1).mean(axis=0), 1.0)
    lines = [{"id": name, "model": "demo", "mask": f"{name}.nii.gz", "steps": 2, "count": 2} for name in ("mask", "coarse")]
    lines.append({"kind": "inpaint", "id": "tumour", "model": "demo", "image": "ct.nii.gz", "labels": "mask.nii.gz",
                  "tumor_type": "hepatic tumor", "tumor_center": [float(c) for c in centre[:3]], "tumor_diameter": 12.0,
                  "steps": 2, "count": 2})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = folder / "Dataset901_MAISISynthetic"
    summary = run_batch(manifest, out, BatchOptions(format="nnunet", label_set="liver,spleen,left kidney,hepatic tumor",
                                                     device="cpu", montage=0))
    assert summary.done == 6, summary
    return out


def main() -> int:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else make_dataset(Path(tempfile.mkdtemp(prefix="maisi-nnunet-")))
    print(f"checking {folder}: {json.loads((folder / 'dataset.json').read_text())}")
    verify_dataset_integrity(str(folder), num_processes=1)
    print(f"nnU-Net v2 verify_dataset_integrity passed for {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
