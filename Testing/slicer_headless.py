"""Headless Slicer for the `test_slicer_*` tests: real MRML from the `slicer-core` wheel (no Qt, no
application, no hand-made fakes) and helpers to build inputs the way a user would (volumes on
oblique, flipped grids; painted segments with terminology), compare nodes and watch processes.

The ``scene`` fixture (conftest.py) gives each test a fresh scene from ``fresh_scene``; conftest.py
also puts the module folders (MAISIGenerate, MAISITrain) on ``sys.path``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import slicer  # the slicer-core wheel: `pip install slicer-core`
from MAISIGenerateLib import mrml
from MAISIGenerateLib.headless import headless_scene

REPO = Path(__file__).resolve().parent.parent


def fresh_scene() -> Iterator:
    """Yield a fresh headless MRML scene (segmentations, volumes and colour logics attached), then
    clear it."""
    new_scene = headless_scene()
    yield new_scene
    new_scene.Clear(True)


def oblique_flipped_ijk_to_ras(spacing=(2.0, 2.5, 3.0), origin=(40.0, -25.0, 12.0), angle_deg=25.0) -> np.ndarray:
    """An IJKToRAS (4x4) whose axes are rotated by ``angle_deg`` about an oblique axis and whose
    first index axis is flipped (negative determinant): i runs mostly to the left (L), not R."""
    axis = np.array([1.0, 2.0, 3.0]) / np.linalg.norm([1.0, 2.0, 3.0])
    angle = np.deg2rad(angle_deg)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([-spacing[0], spacing[1], spacing[2]])
    matrix[:3, 3] = origin
    assert np.linalg.det(matrix[:3, :3]) < 0
    return matrix


def add_volume(array_xyz: np.ndarray, ijk_to_ras: np.ndarray, name: str):
    """A scalar volume node from an (x, y, z) array."""
    return slicer.util.addVolumeFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))), ijk_to_ras, name)


def add_segmentation(name: str, reference):
    """An empty segmentation node whose geometry is the reference volume's (as Segment Editor makes it)."""
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    return node


def paint_segment(segmentation, name: str, mask_xyz: np.ndarray, reference, terminology: str | None = None) -> str:
    """Add a segment painted with ``mask_xyz`` (on the reference's grid); returns its id."""
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", name)
    kji = np.ascontiguousarray(np.transpose(mask_xyz, (2, 1, 0))).astype(np.uint8)
    slicer.util.updateSegmentBinaryLabelmapFromArray(kji, segmentation, segment_id, reference)
    if terminology is not None:
        mrml.set_segment_terminology(segmentation.GetSegmentation().GetSegment(segment_id), terminology)
    return segment_id


def node_checksum(node) -> str:
    """SHA-256 over what a user would call the node's content: name, geometry and voxels for a
    volume; name, colour, terminology and voxels of every segment for a segmentation."""
    digest = hashlib.sha256(node.GetName().encode())
    if node.IsA("vtkMRMLSegmentationNode"):
        for segment_id in mrml.segment_ids(node):
            segment = node.GetSegmentation().GetSegment(segment_id)
            digest.update(f"{segment_id}|{segment.GetName()}|{segment.GetColor()}|{mrml.segment_terminology(segment)}".encode())
            digest.update(np.ascontiguousarray(slicer.util.arrayFromSegmentInternalBinaryLabelmap(node, segment_id)).tobytes())
    else:
        digest.update(mrml.ijk_to_ras(node).tobytes())
        digest.update(np.ascontiguousarray(slicer.util.arrayFromVolume(node)).tobytes())
    return digest.hexdigest()


def node_ids(scene, class_name: str = "vtkMRMLNode") -> set[str]:
    """IDs of the scene's nodes of ``class_name``."""
    return {scene.GetNthNodeByClass(i, class_name).GetID() for i in range(scene.GetNumberOfNodesByClass(class_name))}


def _proc_stat(pid) -> list[str]:
    """/proc/PID/stat fields after the command name: state, ppid, pgrp, ... ([] when gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (Linux; a zombie left for an absent init to reap does not)."""
    fields = _proc_stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def live_process_group(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (Linux)."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if process_alive(pid) and int(_proc_stat(pid)[2]) == pgid]
