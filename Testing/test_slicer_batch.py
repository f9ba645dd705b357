"""The README's batch example, run as a user would without Slicer: a plain Python with the
slicer-core wheel runs Examples/maisi_generate_batch.py on a segmentation file and a reference CT
file, with tiny weights."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import slicer
from maisicore.io.volumes import read_volume
from slicer_headless import REPO, add_segmentation, add_volume, paint_segment

SCRIPT = REPO / "Examples" / "maisi_generate_batch.py"


def _write(node, path, storage_class):
    storage = slicer.mrmlScene.AddNewNodeByClass(storage_class)
    storage.SetFileName(str(path))
    assert storage.WriteData(node), path


@pytest.mark.slow
def test_batch_script_writes_a_ct_on_the_reference_grid_and_its_labels(scene, tiny_weights, tmp_path):
    angle = np.deg2rad(15.0)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) * 4.0
    ijk_to_ras[:3, 3] = (-60.0, 20.0, -5.0)
    i, j, k = np.meshgrid(np.arange(32), np.arange(32), np.arange(32), indexing="ij")
    ct = np.where(((i - 15.5) / 14) ** 2 + ((j - 15.5) / 12) ** 2 < 1, 40, -1000).astype(np.int16)
    reference = add_volume(ct, ijk_to_ras, "ct")
    segmentation = add_segmentation("seg", reference)
    paint_segment(segmentation, "Liver", (i - 12) ** 2 + (j - 14) ** 2 + (k - 16) ** 2 < 49, reference)
    paint_segment(segmentation, "Segment_2", (i - 22) ** 2 + (j - 14) ** 2 + (k - 16) ** 2 < 9, reference)
    _write(reference, tmp_path / "ct.nrrd", "vtkMRMLVolumeArchetypeStorageNode")
    _write(segmentation, tmp_path / "seg.seg.nrrd", "vtkMRMLSegmentationStorageNode")

    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--segmentation", str(tmp_path / "seg.seg.nrrd"), "--reference", str(tmp_path / "ct.nrrd"),
         "--out", str(tmp_path / "synthetic.nrrd"), "--labels-out", str(tmp_path / "labels.seg.nrrd"),
         "--weights-dir", str(tiny_weights["rflow-ct"]), "--seed", "2", "--steps", "2", "--device", "cpu", "--allow-any-size"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 of 2 segments matched" in result.stdout and "unresolved: 'Segment_2'" in result.stdout

    written = read_volume(tmp_path / "synthetic.nrrd")
    expected = read_volume(tmp_path / "ct.nrrd")
    assert written.shape == expected.shape == (32, 32, 32)
    np.testing.assert_allclose(written.affine, expected.affine, atol=1e-9)
    assert written.array.dtype == np.int16 and written.array.std() > 0

    labels = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "labels.seg.nrrd"))
    assert storage.ReadData(labels)
    names = {labels.GetSegmentation().GetNthSegment(n).GetName() for n in range(labels.GetSegmentation().GetNumberOfSegments())}
    assert names == {"liver", "body"}
