"""DICOM in and out on real files: TotalSegmentator's real 20-slice CT series read against SimpleITK
and against TotalSegmentator's own (dicom2nifti) conversion, used as `inpaint --image` and
`labels convert --ct`; generated and inpainted CTs written as DICOM series with a DICOM SEG, read
back with pydicom, SimpleITK and highdicom; the synthetic markers; a tilted gantry; one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from maisicore.io.geometry import Volume, lps_to_ras, onto_grid_of
from maisicore.io.volumes import read_volume, write_volume

SERIES = "example_ct_dicom"
LIVER_RAS = (76.0, 166.0, -785.0)  # inside the liver of the real series (TotalSegmentator's label 5), mm


def _simpleitk(folder: Path) -> Volume:
    """The series as SimpleITK's GDCM series reader gives it, as (x, y, z) and index → RAS."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return Volume(sitk.GetArrayFromImage(image).transpose(2, 1, 0), lps_to_ras(affine))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file())


def _error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("maisi: error:"), result.stderr
    return lines[0]


def _assert_synthetic(ds, model_text: str, seed: int) -> None:
    """The markers that keep a synthetic instance from passing for a patient's scan."""
    assert ds.SyntheticData == "YES"  # PS3.3 C.12.1
    assert ds.SeriesDescription.startswith("SYNTHETIC")
    [equipment] = [item for item in ds.ContributingEquipmentSequence  # (109100, DCM, "Synthesizing Equipment")
                   if (item.PurposeOfReferenceCodeSequence[0].CodeValue,
                       item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator) == ("109100", "DCM")]
    assert equipment.Manufacturer == "SlicerMAISI" and model_text in equipment.ManufacturerModelName
    assert f"seed {seed}" in equipment.ContributionDescription and "maisicore" in equipment.ContributionDescription


def test_real_series_reads_as_simpleitk_and_dicom2nifti_read_it(real_data):
    ours = read_volume(real_data / SERIES, modality="CT")
    assert ours.shape == (512, 512, 20) and ours.array.dtype == np.int16
    assert (int(ours.array.min()), int(ours.array.max())) == (-1024, 1839)  # stored values rescaled: slope 1, -1024
    theirs = _simpleitk(real_data / SERIES)
    np.testing.assert_array_equal(ours.array, theirs.array)
    np.testing.assert_allclose(ours.affine, theirs.affine, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours.spacing, (0.9765625, 0.9765625, 2.0), rtol=0, atol=1e-6)
    # TotalSegmentator's segmentation of this series, on its dicom2nifti grid (the y axis flipped): the
    # same voxel lattice, to 1e-4 mm.
    seg = read_volume(real_data / "example_seg_dicom.nii.gz")
    moved = onto_grid_of(ours, seg)
    assert moved is not None
    np.testing.assert_allclose(moved.affine, seg.affine, rtol=0, atol=1e-4)
    # One file of the series stands for the whole series.
    one = read_volume(_files(real_data / SERIES)[7], modality="CT")
    np.testing.assert_array_equal(one.array, ours.array)
    np.testing.assert_array_equal(one.affine, ours.affine)


@pytest.mark.slow  # an inpainting on the real 512×512 series: about 30 s on 2 cores
def test_real_series_as_labels_convert_ct_and_inpaint_image(real_data, tiny_weights, tmp_path, maisi):
    series = real_data / SERIES
    ct = read_volume(series)
    seg = real_data / "example_seg_dicom.nii.gz"
    # --ct a DICOM series: the body envelope comes from its HU, on the segmentation's (flipped) grid.
    labels = tmp_path / "labels.nii.gz"
    result = maisi("labels", "convert", "--from", "totalsegmentator", seg, "--ct", series, "--out", labels)
    assert result.returncode == 0, result.stderr
    nifti_ct = tmp_path / "ct_on_seg_grid.nii.gz"
    write_volume(nifti_ct, onto_grid_of(ct, read_volume(seg)))
    same = tmp_path / "labels_from_nifti_ct.nii.gz"
    assert maisi("labels", "convert", "--from", "totalsegmentator", seg, "--ct", nifti_ct, "--out", same).returncode == 0
    np.testing.assert_array_equal(read_volume(labels).array, read_volume(same).array)

    # --image a DICOM series, DICOM out under the source's patient.
    out = tmp_path / "inpainted"
    result = maisi("inpaint", "--image", series, "--labels", labels, "--tumor-center", *LIVER_RAS, "--tumor-diameter",
                   "6", "--tumor-type", "hepatic tumor", "--model", tiny_weights["rflow-ct"], "--steps", "2",
                   "--seed", "3", "--device", "cpu", "--out", out, "--format", "dicom", "--keep-patient")
    assert result.returncode == 0, result.stderr
    back = read_volume(out / "ct", modality="CT")
    np.testing.assert_allclose(back.affine, ct.affine, rtol=0, atol=1e-4)
    changed = np.argwhere(back.array != ct.array)  # the tumour region only; every other voxel is the input's
    assert 0 < len(changed) < 2000
    centre = (np.linalg.inv(ct.affine) @ np.append(LIVER_RAS, 1.0))[:3]
    reach = 3.0 * 1.15 + 2.5 * np.asarray(ct.spacing)  # mm: radius 3 mm +15 %, the 2-voxel feather, rounding
    assert np.all(np.abs(changed - centre) * ct.spacing <= reach)
    sources = {pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]: f for f in _files(series)}
    for file in _files(out / "ct"):
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        _assert_synthetic(ds, "rflow-ct/tiny", 3)
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        source = pydicom.dcmread(sources[ds.ImagePositionPatient[2]], stop_before_pixels=True)  # the slice it came from
        # --keep-patient: the source's patient and frame of reference, each slice referencing its source slice.
        assert ds.IssuerOfPatientID == source.IssuerOfPatientID == "2.16.756.5.30.1.149.1.2.1.1"
        assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        reference = ds.SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == source.file_meta.MediaStorageSOPInstanceUID
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    seg_labels = read_volume(out / "labels.dcm")  # anatomy + the tumour, as a SEG on the CT's grid
    assert seg_labels.same_grid(back, atol_mm=1e-4)
    assert {1, 26, 200} <= set(np.unique(seg_labels.array).tolist())


@pytest.fixture(scope="module")
def oblique_mask(tmp_path_factory) -> Path:
    """A MAISI mask (liver, left kidney, body) on a 32³ grid at 3 mm, turned 15° about S."""
    labels = np.zeros((32, 32, 32), np.int16)
    labels[3:29, 3:29, 2:30] = 200
    labels[6:17, 7:20, 6:24] = 1
    labels[19:25, 10:17, 8:20] = 14
    turn = np.deg2rad(15.0)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]]) * 3.0
    affine[:3, 3] = (-60.0, 40.0, -300.0)
    path = tmp_path_factory.mktemp("mask") / "mask.nii.gz"
    write_volume(path, Volume(labels, affine))
    return path


@pytest.mark.slow
def test_generated_ct_as_dicom_reads_back_as_the_nifti(tiny_weights, oblique_mask, tmp_path, maisi):
    import highdicom as hd
    import SimpleITK as sitk

    common = ["generate", "--model", tiny_weights["rflow-ct"], "--mask", oblique_mask, "--allow-any-size",
              "--steps", "2", "--seed", "5", "--device", "cpu"]
    nifti, nifti_labels = tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz"
    assert maisi(*common, "--out", nifti, "--label-out", nifti_labels).returncode == 0
    # The same request through `maisi run` (the machine contract): "format": "dicom".
    import json

    from maisicore.pipelines.requests import GenerateRequest, write_request

    out = tmp_path / "synthetic"
    request = GenerateRequest(model=str(tiny_weights["rflow-ct"]), mask=str(oblique_mask), allow_any_size=True,
                              steps=2, seed=5, device="cpu", out=str(out), format="dicom")
    write_request(tmp_path / "request.json", request)
    result = maisi("run", tmp_path / "request.json")
    assert result.returncode == 0, result.stderr
    [event] = [e for e in map(json.loads, result.stdout.splitlines()) if e["event"] == "result"]
    assert event["files"] == {"ct": str(out / "ct"), "seg": str(out / "labels.dcm")}
    assert sorted(p.name for p in out.iterdir()) == ["ct", "labels.dcm"]
    expected = read_volume(nifti)

    # pydicom through maisicore, SimpleITK, and raw pydicom pixels: the NIfTI's voxels and geometry.
    back = read_volume(out / "ct", modality="CT")
    np.testing.assert_array_equal(back.array, expected.array)
    np.testing.assert_allclose(back.affine, expected.affine, rtol=0, atol=1e-4)
    theirs = _simpleitk(out / "ct")
    np.testing.assert_array_equal(theirs.array, expected.array)
    np.testing.assert_allclose(theirs.affine, expected.affine, rtol=0, atol=1e-4)
    files = _files(out / "ct")
    assert len(files) == 32
    datasets = [pydicom.dcmread(f) for f in files]
    for k, ds in enumerate(sorted(datasets, key=lambda d: int(d.InstanceNumber))):
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, expected.array[:, :, k].T)

    # The synthetic markers, and an identity that cannot be a real patient's.
    series_uids = {ds.SeriesInstanceUID for ds in datasets}
    assert len(series_uids) == 1 and len({ds.SOPInstanceUID for ds in datasets}) == 32
    for ds in datasets:
        _assert_synthetic(ds, "rflow-ct/tiny", 5)
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert ds.PatientName == "SYNTHETIC^MAISI" and ds.PatientID.startswith("SYNTHETIC-")
        assert ds.IssuerOfPatientID.startswith("SlicerMAISI synthetic")
        assert "seed 5" in ds.DerivationDescription and "rflow-ct/tiny" in ds.DerivationDescription
        assert "SourceImageSequence" not in ds
    assert len({(ds.PatientID, ds.StudyInstanceUID) for ds in datasets}) == 1

    # The SEG: valid for highdicom, referencing every CT slice, holding the labels on the CT's grid.
    seg = hd.seg.segread(out / "labels.dcm")
    _assert_synthetic(seg, "rflow-ct/tiny", 5)
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID in series_uids
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in datasets}
    assert (seg.StudyInstanceUID, seg.PatientID) == (datasets[0].StudyInstanceUID, datasets[0].PatientID)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "left kidney", "body"]
    labels = read_volume(out / "labels.dcm")
    np.testing.assert_array_equal(labels.array, read_volume(nifti_labels).array)
    np.testing.assert_allclose(labels.affine, expected.affine, rtol=0, atol=1e-4)
    assert sitk.ReadImage(str(files[0])).GetSize()[:2] == (32, 32)

    # The SEG as --mask: the labels the NIfTI mask gave, on the same grid.
    from maisicore.pipelines.generate import prepare_generation
    from maisicore.pipelines.requests import GenerateRequest

    from_seg = prepare_generation(
        GenerateRequest(model=str(tiny_weights["rflow-ct"]), allow_any_size=True, mask=str(out / "labels.dcm")))
    from_nifti = prepare_generation(
        GenerateRequest(model=str(tiny_weights["rflow-ct"]), allow_any_size=True, mask=str(oblique_mask)))
    np.testing.assert_array_equal(from_seg.mask.array, from_nifti.mask.array)
    np.testing.assert_allclose(from_seg.mask.affine, from_nifti.mask.affine, rtol=0, atol=1e-4)


def test_seg_segments_match_by_terminology_and_unknown_ones_are_refused(tiny_weights, oblique_mask, tmp_path, maisi):
    from maisicore.io.dicom import Provenance, write_dicom

    labels = read_volume(oblique_mask)
    ct = Volume(np.where(labels.array > 0, 40, -1000).astype(np.int16), labels.affine)
    written = write_dicom(tmp_path / "dicom", ct, labels, Provenance("rflow-ct/tiny", 0, 1))
    # Every write is a new patient, study and series, with new UIDs.
    second = write_dicom(tmp_path / "second", ct, labels, Provenance("rflow-ct/tiny", 0, 1))
    first, again = (pydicom.dcmread(_files(w["ct"])[0], stop_before_pixels=True) for w in (written, second))
    for key in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
        assert getattr(first, key) != getattr(again, key), key
    seg = pydicom.dcmread(written["seg"])
    seg.SegmentSequence[0].SegmentLabel = "Leber"  # no MAISI name: matched by its SNOMED codes (liver)
    renamed = tmp_path / "dicom" / "renamed.dcm"  # beside its CT (in dicom/ct/): read on its whole grid
    seg.save_as(renamed)
    np.testing.assert_array_equal(read_volume(renamed).array, labels.array)
    code = seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0]
    code.CodeValue, code.CodeMeaning = "91723000", "Anatomical structure"  # no MAISI label has it
    seg.SegmentSequence[1].SegmentLabel = "thing"
    unknown = tmp_path / "unknown.dcm"
    seg.save_as(unknown)
    line = _error(maisi("generate", "--model", tiny_weights["rflow-ct"], "--mask", unknown, "--allow-any-size",
                        "--out", tmp_path / "x.nii.gz"))
    assert "segment(s) 2 'thing' match no MAISI label" in line
    assert not (tmp_path / "x.nii.gz").exists()


def test_bad_dicom_inputs_are_one_line_exit_2(real_data, tiny_weights, tmp_path, maisi):
    from maisicore.io.dicom import Provenance, write_dicom

    series = real_data / SERIES
    autoencoder = tiny_weights["rflow-ct"] / "models" / "autoencoder_v1.pt"
    encode = ["vae", "encode", "--weights", autoencoder, "--out", tmp_path / "latent.nii.gz", "--image"]

    # Two series in one folder: both listed, and FOLDER#UID picks one.
    mixed = tmp_path / "mixed"
    shutil.copytree(series, mixed)
    small = Volume(np.arange(32 * 32 * 4, dtype=np.int16).reshape(32, 32, 4), np.diag([2.0, 2.0, 3.0, 1.0]))
    write_dicom(tmp_path / "small", small, None, Provenance("rflow-ct/tiny", 0, 1))
    for file in _files(tmp_path / "small" / "ct"):
        shutil.copy(file, mixed / file.name)
    uid = pydicom.dcmread(_files(tmp_path / "small" / "ct")[0]).SeriesInstanceUID
    line = _error(maisi(*encode, mixed))
    assert "holds 2 DICOM series" in line and "(no SeriesInstanceUID) (CT, 20 files, 'CT Body 3.0')" in line
    assert f"{uid} (CT, 4 files" in line and f"{mixed}#SeriesInstanceUID" in line
    picked = read_volume(f"{mixed}#{uid}")
    np.testing.assert_array_equal(picked.array, small.array)
    np.testing.assert_allclose(picked.affine, small.affine, atol=1e-6)

    # A missing slice.
    gap = tmp_path / "gap"
    shutil.copytree(series, gap)
    _files(gap)[10].unlink()
    line = _error(maisi(*encode, gap))
    assert "missing slices: a gap of 4 mm" in line and "about 1 slice(s) absent" in line

    # Not a CT, for a CT model.
    mr = tmp_path / "mr"
    mr.mkdir()
    for file in _files(series)[:3]:
        ds = pydicom.dcmread(file)
        ds.Modality = "MR"
        ds.save_as(mr / file.name)
    assert "a series of modality MR; the MAISI models are CT models" in _error(maisi(*encode, mr))
    assert not (tmp_path / "latent.nii.gz").exists()

    # DICOM output: a folder that is not empty, --keep-patient without a DICOM source.
    inpaint = ["inpaint", "--image", real_data / "example_ct_sm.nii.gz", "--tumor-center", "0", "0", "0",
               "--tumor-diameter", "10", "--tumor-type", "hepatic tumor", "--model", tiny_weights["rflow-ct"]]
    assert "exists and is not an empty folder" in _error(maisi(*inpaint, "--format", "dicom", "--out", mixed))
    line = _error(maisi(*inpaint, "--format", "dicom", "--keep-patient", "--out", tmp_path / "new"))
    assert "--keep-patient copies the patient of a DICOM --image" in line
    assert "--format dicom writes a folder" in _error(maisi(*inpaint, "--format", "dicom", "--out", tmp_path / "a.nii.gz"))
    assert not (tmp_path / "new").exists()


def test_prepare_indexes_dicom_series(real_data, tmp_path, maisi):
    import json

    images = tmp_path / "images"
    images.mkdir()
    shutil.copytree(real_data / SERIES, images / "case1")
    (images / "empty").mkdir()
    out = tmp_path / "data.json"
    result = maisi("prepare", "--images", images, "--out", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    [case] = data["training"]
    assert (case["image"], case["dim"]) == ("images/case1", [512, 512, 20])
    np.testing.assert_allclose(case["spacing"], [0.9765625, 0.9765625, 2.0], atol=1e-6)  # rounded to 6 digits
    assert data["problems"] == [{"file": "images/empty", "reason": "a folder without DICOM image files"}]


def test_tilted_gantry_series_keeps_its_shear(tmp_path):
    """Slices of a tilted gantry are offset along the table, not along the slice normal: the affine
    keeps that shear, so every slice stays where it was acquired (SimpleITK's normal stacking does not)."""
    from maisicore.io.dicom import Provenance, write_dicom

    tilt = np.deg2rad(12.0)
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    affine[:3, 2] = (0.0, 2.5 * np.sin(tilt), 2.5 * np.cos(tilt))  # each slice 2.5 mm on, tilted 12° towards A
    ct = Volume(np.arange(24 * 20 * 6, dtype=np.int16).reshape(24, 20, 6), affine)
    written = write_dicom(tmp_path / "tilted", ct, None, Provenance("rflow-ct/tiny", 0, 1))
    back = read_volume(written["ct"])
    np.testing.assert_array_equal(back.array, ct.array)
    np.testing.assert_allclose(back.affine, affine, rtol=0, atol=1e-4)
    last = np.array([0, 0, 5, 1.0])
    assert np.linalg.norm((_simpleitk(written["ct"]).affine @ last - affine @ last)[:3]) > 2.0  # mm
