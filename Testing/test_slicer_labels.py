"""Segmentation nodes -> the MAISI label array MAISIGenerate hands to maisicore, on real MRML
(slicer-core wheel) with the real example CT and TotalSegmentator masks.

Segments are named the way users name them ("Liver", "kidney left"), come from a TotalSegmentator
import (class names plus terminology), or carry only terminology; the reference volume has an
oblique, flipped IJKToRAS. The label array must hold the right ids on exactly that grid, and
unresolved segments must be reported, never dropped silently.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import slicer
import vtk
from maisicore.anatomy.body import envelope_from_ct
from MAISIGenerateLib import mrml
from MAISIGenerateLib.logic import (
    estimate_seconds,
    labels_from_segmentation,
    mask_grid,
    match_segments,
    resolve_label,
    suggest_grid,
)
from slicer_headless import (
    add_segmentation,
    add_volume,
    node_checksum,
    oblique_flipped_ijk_to_ras,
    paint_segment,
)

# Terminology as SlicerTotalSegmentator writes it (its own context name, SNOMED-CT codes).
TS_CONTEXT = "Segmentation category and type - Total Segmentator"
ANATOMY = "SCT^123037004^Anatomical Structure"
TS_TERMS = {
    "spleen": f"{TS_CONTEXT}~{ANATOMY}~SCT^78961009^Spleen~^^~Anatomic codes - DICOM master list~^^~^^",
    "pancreas": f"{TS_CONTEXT}~{ANATOMY}~SCT^15776009^Pancreas~^^~Anatomic codes - DICOM master list~^^~^^",
    "kidney_right": f"{TS_CONTEXT}~{ANATOMY}~SCT^64033007^Kidney~SCT^24028007^Right~Anatomic codes - DICOM master list~^^~^^",
    "aorta": f"{TS_CONTEXT}~{ANATOMY}~SCT^15825003^Aorta~^^~Anatomic codes - DICOM master list~^^~^^",
    "stomach": f"{TS_CONTEXT}~{ANATOMY}~SCT^69695003^Stomach~^^~Anatomic codes - DICOM master list~^^~^^",
}
# What Slicer gives a new segment by default: generic "Tissue", which is no MAISI label.
GENERIC_TISSUE = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~SCT^85756007^Tissue~^^"
    "~Anatomic codes - DICOM master list~^^~^^"
)
# segment name -> (TotalSegmentator mask file, MAISI id expected, terminology given to the segment)
SEGMENTS = {
    "Liver": ("liver", 1, None),  # typed by a user
    "kidney left": ("kidney_left", 14, GENERIC_TISSUE),  # synonym; default terminology ignored
    "spleen": ("spleen", 3, TS_TERMS["spleen"]),  # TotalSegmentator import: class name + terminology
    "pancreas": ("pancreas", 4, TS_TERMS["pancreas"]),
    "kidney_right": ("kidney_right", 5, TS_TERMS["kidney_right"]),
    "aorta": ("aorta", 6, TS_TERMS["aorta"]),
    "Segment_7": ("stomach", 12, TS_TERMS["stomach"]),  # renamed: only the terminology says stomach
    "my annotation": ("gallbladder", None, GENERIC_TISSUE),  # nothing says what it is
}


@pytest.fixture
def case(scene, real_data):
    """The real example CT on an oblique, flipped 3 mm grid, with the segments above painted on it."""
    ct = np.asanyarray(nib.load(real_data / "example_ct_sm.nii.gz").dataobj).astype(np.int16)  # (x, y, z)
    ijk_to_ras = oblique_flipped_ijk_to_ras(spacing=(3.0, 3.0, 3.0))
    reference = add_volume(ct, ijk_to_ras, "CT")
    segmentation = add_segmentation("Segmentation", reference)
    masks = {}
    for name, (ts_class, _id, terminology) in SEGMENTS.items():
        mask = np.asanyarray(nib.load(real_data / "example_seg_fast" / f"{ts_class}.nii.gz").dataobj) > 0
        assert mask.any() and mask.shape == ct.shape
        paint_segment(segmentation, name, mask, reference, terminology)
        masks[name] = mask
    return {"ct": ct, "ijk_to_ras": ijk_to_ras, "reference": reference, "segmentation": segmentation, "masks": masks}


def _expected_ids(masks: dict) -> np.ndarray:
    """The MAISI ids the resolved segments must get (the example's masks do not overlap)."""
    expected = np.zeros(next(iter(masks.values())).shape, np.int16)
    for name, mask in masks.items():
        label_id = SEGMENTS[name][1]
        if label_id is not None:
            assert not (expected[mask] != 0).any(), "test data: masks overlap"
            expected[mask] = label_id
    return expected


def test_label_array_has_the_right_ids_on_the_exact_oblique_flipped_grid(case):
    before = {key: node_checksum(case[key]) for key in ("reference", "segmentation")}

    build = labels_from_segmentation(case["segmentation"], case["reference"])

    labels = build.labels
    assert labels.shape == case["ct"].shape
    assert labels.array.dtype == np.int16
    # Exactly the reference node's IJKToRAS (the node keeps spacing and directions apart, so it
    # recomposes the matrix it was given to within one rounding step).
    np.testing.assert_array_equal(labels.affine, mrml.ijk_to_ras(case["reference"]))
    np.testing.assert_allclose(labels.affine, case["ijk_to_ras"], rtol=0, atol=1e-12)
    expected = _expected_ids(case["masks"])
    organs = expected != 0
    np.testing.assert_array_equal(labels.array[organs], expected[organs])
    # Everything else is background or the body envelope, taken from the reference CT (NVIDIA's
    # add_body_envelope algorithm, test_body_envelope.py) around the painted organs.
    body = (envelope_from_ct(expected, case["ct"], 200) == 200) & ~organs
    np.testing.assert_array_equal(labels.array[~organs], np.where(body, 200, 0)[~organs])
    assert build.body_voxels_added == int(body.sum()) > 0
    # The unresolved segment is reported (and its voxels are body, not an organ).
    assert [m.segment_name for m in build.unresolved] == ["my annotation"]
    assert "unresolved: 'my annotation'" in build.summary()
    by = {m.segment_name: m.matched_by for m in build.matches}
    assert by == {"Liver": "name", "kidney left": "name", "spleen": "name", "pancreas": "name",
                  "kidney_right": "name", "aorta": "name", "Segment_7": "terminology", "my annotation": "unresolved"}
    assert {key: node_checksum(case[key]) for key in ("reference", "segmentation")} == before


def test_body_options_reach_the_envelope(case):
    """The module's body parameters (parameter node → ``parameters.body_options``) shape the envelope
    from the reference CT as ``maisi labels convert --body-*`` does; a bad one is a one-line error."""
    from maisicore.errors import InputError
    from MAISIGenerateLib.parameters import body_options

    options = body_options(-700.0, 5, 3, 0.02, "yes")
    steps = []
    build = labels_from_segmentation(case["segmentation"], case["reference"], body_options=options,
                                     progress=lambda done, total: steps.append((done, total)))
    expected = _expected_ids(case["masks"])
    np.testing.assert_array_equal(build.labels.array, envelope_from_ct(expected, case["ct"], 200, options))
    assert not np.array_equal(build.labels.array, envelope_from_ct(expected, case["ct"], 200))
    assert steps[-1] == (8, 8)  # the envelope's steps follow the painted slices
    with pytest.raises(InputError, match="body closing kernel 4 voxels is invalid"):
        body_options(closing_voxels=4)


def test_overrides_and_the_segmentations_own_geometry(case):
    segmentation = case["segmentation"]
    ids = {m.segment_name: m.segment_id for m in match_segments(segmentation)}
    # The user maps the unresolved segment (by id) to gallbladder and leaves the liver out (by name).
    overrides = {ids["my annotation"]: "gallbladder", "Liver": 0}

    build = labels_from_segmentation(segmentation, None, overrides, add_body=False)

    by = {m.segment_name: (m.label_id, m.matched_by) for m in build.matches}
    assert by["my annotation"] == (10, "override")
    assert by["Liver"] == (None, "skipped")
    assert build.unresolved == []
    # Without a reference volume the grid is the segmentation's reference geometry (here the CT's).
    np.testing.assert_allclose(build.labels.affine, case["ijk_to_ras"], atol=1e-9)
    masks = case["masks"]
    np.testing.assert_array_equal(build.labels.array[masks["my annotation"]], 10)
    assert not (build.labels.array == 1).any()
    assert not (build.labels.array == 200).any()  # add_body=False


def test_a_segmentation_that_matches_nothing_is_refused_naming_its_segments(scene):
    reference = add_volume(np.zeros((8, 8, 8), np.int16), np.eye(4), "CT")
    segmentation = add_segmentation("Unknown things", reference)
    mask = np.zeros((8, 8, 8), bool)
    mask[2:5, 2:5, 2:5] = True
    paint_segment(segmentation, "thing one", mask, reference, GENERIC_TISSUE)
    with pytest.raises(ValueError, match="'thing one'"):
        labels_from_segmentation(segmentation, reference)


def test_override_values_are_checked():
    assert resolve_label(14) == (14, "left kidney")
    assert resolve_label("14") == (14, "left kidney")
    assert resolve_label("Kidney, left") == (14, "left kidney")
    assert resolve_label(TS_TERMS["aorta"]) == (6, "aorta")
    assert resolve_label(0) == (None, None) and resolve_label("") == (None, None)
    with pytest.raises(ValueError, match="not a MAISI label id"):
        resolve_label(199)
    with pytest.raises(ValueError, match="not a MAISI label name"):
        resolve_label("flux capacitor")


def test_the_output_grid_suggested_from_the_masks_field_of_view(case):
    """The mask's grid comes from the segmentation alone (no export); the suggestion is the
    published grid closest to its field of view (122x101x30 voxels of 3 mm here)."""
    grid = mask_grid(case["segmentation"])
    assert grid.shape == case["ct"].shape
    np.testing.assert_allclose(grid.affine, mrml.ijk_to_ras(case["reference"]), atol=1e-9)
    size, spacing = suggest_grid(grid)
    assert size == (256, 256, 128)  # the allowed sizes nearest 111.5 in-plane and 30 slices
    fov = np.array(case["ct"].shape) * 3.0
    assert spacing[0] == spacing[1] and 0.5 <= spacing[0] <= 3.0 and 0.5 <= spacing[2] <= 5.0
    assert size[0] * spacing[0] >= max(fov[0], fov[1]) - 1e-6 and abs(size[2] * spacing[2] - fov[2]) < 0.01
    # The time estimate grows with the grid and the steps, and a GPU is faster.
    small, large = estimate_seconds((128, 128, 128), 30), estimate_seconds(size, 30)
    assert 0 < small < large < estimate_seconds(size, 1000, "ddpm-ct")
    assert estimate_seconds(size, 30, device="cuda") < large


def test_a_reference_volume_on_another_grid_gets_what_slicer_exports(case, scene):
    """Segments painted on the oblique, flipped CT grid, labels asked on a plain axis-aligned 2 mm
    grid: every segment lands where Slicer's own export (ExportSegmentsToLabelmapNode onto that
    volume) puts it, though the layers are read slice by slice and nothing is exported."""
    from maisicore.io.geometry import kji_to_ijk

    center = case["ijk_to_ras"] @ np.array([*(np.array(case["ct"].shape) / 2), 1.0])
    other = np.diag([2.0, 2.0, 2.0, 1.0])
    other[:3, 3] = center[:3] - np.array([80, 80, 40]) * 2.0
    reference = add_volume(np.zeros((160, 160, 80), np.int16), other, "axis-aligned 2 mm")
    segmentation = case["segmentation"]

    build = labels_from_segmentation(segmentation, reference, add_body=False)

    assert build.labels.shape == (160, 160, 80)
    np.testing.assert_array_equal(build.labels.affine, mrml.ijk_to_ras(reference))
    expected = np.zeros((160, 160, 80), np.int16)
    for match in build.matches:
        if match.label_id is None:
            continue
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(match.segment_id)
        exported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        assert slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
            segmentation, ids, exported, reference, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        expected[kji_to_ijk(slicer.util.arrayFromVolume(exported)) != 0] = match.label_id
    assert (expected != 0).sum() > 1000
    # Voxel for voxel, but for centres that fall on a half-voxel tie, where floating-point rounding
    # in the two transform chains may pick the other neighbour (1 voxel of 2 million here).
    assert (build.labels.array != expected).sum() <= 2


def _sphere_surface_segmentation(reference, source_representation):
    """A segmentation holding a 15 mm sphere as a closed surface ("Liver"), ``source_representation``
    its source representation (as a model imported into Segmentations gives it)."""
    segmentation = add_segmentation("Surfaces", reference)
    segmentation.GetSegmentation().SetSourceRepresentationName(source_representation)
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(40.0, 38.0, 45.0)
    sphere.SetRadius(15.0)
    sphere.SetThetaResolution(32)
    sphere.SetPhiResolution(32)
    sphere.Update()
    return segmentation, segmentation.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "Liver", [1, 0, 0])


def test_closed_surface_segments_are_converted_in_a_copy_leaving_the_node_as_it_was(scene):
    reference = add_volume(np.zeros((40, 40, 30), np.int16), np.diag([2.0, 2.0, 3.0, 1.0]), "CT")
    labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    segmentation, segment_id = _sphere_surface_segmentation(reference, surface)
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    assert segment.GetRepresentation(labelmap) is None

    build = labels_from_segmentation(segmentation, reference, add_body=False)

    assert segment.GetRepresentation(labelmap) is None  # no representation added to the user's node
    assert segmentation.GetSegmentation().GetSourceRepresentationName() == surface
    # The voxels are Slicer's own closed surface -> labelmap conversion of the same sphere.
    same, same_id = _sphere_surface_segmentation(reference, labelmap)
    expected = slicer.util.arrayFromSegmentBinaryLabelmap(same, same_id, reference)
    assert expected.sum() > 500
    np.testing.assert_array_equal(build.labels.array, np.where(np.transpose(expected, (2, 1, 0)) != 0, 1, 0))
