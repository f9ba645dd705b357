"""From a real TotalSegmentator segmentation to a MAISI condition: mapping, body envelope, grids,
paired generation from a candidate database, quality check."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from maisicore.anatomy.body import body_from_ct, fill_holes, largest_component
from maisicore.anatomy.grids import (
    Grid,
    closest_valid_grid,
    image_on_grid,
    labels_on_grid,
)
from maisicore.anatomy.labelmap import labels_from_masks, read_totalsegmentator
from maisicore.anatomy.labels import label_table
from maisicore.io.geometry import Volume
from maisicore.io.volumes import read_volume, write_volume


def _array(path):
    return np.asanyarray(nib.load(path).dataobj)


@pytest.fixture
def converted(converted_labels):
    """`maisi labels convert` of the real multi-label segmentation with the CT's body envelope
    (conftest's session-wide ``converted_labels``): (label file, report)."""
    return converted_labels


def test_every_totalsegmentator_class_is_mapped_or_reported(real_data, converted):
    out, report = converted
    seg = _array(real_data / "example_seg.nii.gz")
    labels = _array(out)
    names = label_table().totalsegmentator_v2_names()
    present = {names[int(v)] for v in np.unique(seg) if v}
    assert present == {m["source"] for m in report["mapped"]} | {u["source"] for u in report["unmapped"]}
    # Voxel counts of mapped organs are kept exactly, at the dictionary ids.
    for ts_id, ts_name, maisi_id in ((5, "liver", 1), (3, "kidney_left", 14), (31, "vertebrae_L1", 37), (1, "spleen", 3)):
        assert names[ts_id] == ts_name
        assert int((labels == maisi_id).sum()) == int((seg == ts_id).sum()) > 0
    for entry in report["mapped"]:
        ts_id = next(k for k, v in names.items() if v == entry["source"])
        assert entry["voxels"] == int((seg == ts_id).sum())
    # The geometry is the segmentation's.
    assert np.array_equal(nib.load(out).affine, nib.load(real_data / "example_seg.nii.gz").affine)


def test_body_envelope_covers_the_patient(real_data, converted):
    out, report = converted
    labels = _array(out)
    ct = _array(real_data / "example_ct_sm.nii.gz")
    patient = largest_component(ct > -500)  # the patient's tissue
    assert (labels[patient] != 0).mean() >= 0.98  # measured 0.990 (the rest: the skin's outer voxels)
    # Outside the patient: the surrounding air (the largest region below -800 HU; lungs and bowel gas
    # are inside the patient and keep their organ labels) and the table (test_body_envelope.py).
    outside = largest_component(ct < -800, full_connectivity=True)
    assert outside.sum() > 0.25 * ct.size  # 30 % of this scan is outside air
    assert (labels[outside] != 0).mean() < 0.002  # measured 0.0007: voxels the air's closing leaves out
    # The skin between -800 and -500 HU is body: the envelope reaches past the tissue region.
    assert (labels[~fill_holes(patient)] != 0).sum() > 1000
    assert report["body_voxels_added"] == int((labels == 200).sum()) > 0
    # The envelope never overwrites a TotalSegmentator label.
    seg = _array(real_data / "example_seg.nii.gz")
    assert np.all(labels[seg > 0] != 200)


def test_body_envelope_from_labels_alone(real_data, tmp_path, maisi):
    out = tmp_path / "labels.nrrd"
    result = maisi("labels", "convert", "--from", "totalsegmentator", real_data / "example_seg.nii.gz", "--out", out)
    assert result.returncode == 0, result.stderr
    labels = read_volume(out).array
    ct = _array(real_data / "example_ct_sm.nii.gz")
    seg = _array(real_data / "example_seg.nii.gz")
    assert np.array_equal(labels != 0, (labels == 200) | (seg > 0))
    body = labels != 0
    # The closed union of organs stays inside the patient and covers most of it (measured 64 %: no
    # skin, fat or muscle outside the labelled structures).
    patient = body_from_ct(ct)
    assert (body & patient).sum() / body.sum() > 0.97
    assert 0.6 * patient.sum() < body.sum() < 0.7 * patient.sum()


def test_folder_of_fast_masks_converts_with_counts_kept(real_data, tmp_path):
    folder = real_data / "example_seg_fast"
    labels, report = read_totalsegmentator(folder)
    table = label_table()
    assert report.unmapped == []
    masks = sorted(folder.glob("*.nii.gz"))
    assert len(masks) == 117  # the folder also holds a preview PNG and statistics JSON, skipped
    for path in masks:
        name = path.name[: -len(".nii.gz")]
        info = table.by_totalsegmentator(name)
        assert info is not None, name
        count = int((_array(path) > 0).sum())
        assert int((labels.array == info.id).sum()) == count, name


def test_named_masks_priority_and_unmapped_report():
    shape = (20, 20, 20)
    liver = np.zeros(shape, bool)
    liver[2:15, 2:15, 2:15] = True
    tumour = np.zeros(shape, bool)
    tumour[5:9, 5:9, 5:9] = True
    vessel = np.zeros(shape, bool)
    vessel[10:12, 3:14, 6:8] = True
    other = np.zeros(shape, bool)
    other[16:18, 16:18, 16:18] = True
    table = label_table()
    entry = table.by_name("hepatic tumor").terminology_entry()
    labels, report = labels_from_masks(
        {"Liver": liver, entry: tumour, "hepatic vessel": vessel, "Mystery blob": other}, np.eye(4)
    )
    assert (labels.array == 26).sum() == tumour.sum()  # tumour over organ
    assert (labels.array == 25).sum() == vessel.sum()  # smaller structure over larger
    assert (labels.array == 1).sum() == liver.sum() - tumour.sum() - (vessel & liver).sum()
    assert report.unmapped == [{"source": "Mystery blob", "voxels": int(other.sum())}]
    assert report.overlap_voxels == int((tumour & liver).sum() + (vessel & liver).sum())
    assert (labels.array[other] == 0).all()


def test_closest_valid_grid_keeps_the_extent_and_maps_back_exactly(converted):
    labels = read_volume(converted[0])  # 122×101×30 at 3 mm
    grid = closest_valid_grid(labels)
    assert grid.shape == (256, 256, 128)
    fov = np.asarray(labels.shape) * np.asarray(labels.spacing)
    new_fov = np.asarray(grid.shape) * np.asarray(grid.spacing)
    assert abs(new_fov[0] - max(fov[0], fov[1])) <= grid.spacing[0]
    assert abs(new_fov[2] - fov[2]) <= grid.spacing[2]
    assert new_fov[1] >= fov[1]
    resampled = labels_on_grid(labels, grid)
    for maisi_id in (1, 14, 37):  # organs survive with their volume (±10 % from nearest sampling)
        before = (labels.array == maisi_id).sum() * np.prod(labels.spacing)
        after = (resampled.array == maisi_id).sum() * np.prod(grid.spacing)
        assert after == pytest.approx(before, rel=0.1)
    # A generated image on that grid, mapped back, has the input's exact grid.
    image = Volume(np.where(resampled.array > 0, 40, -1000).astype(np.int16), resampled.affine)
    back = image_on_grid(image, Grid(labels.shape, labels.affine))
    assert back.shape == labels.shape and np.array_equal(back.affine, labels.affine)
    assert back.array.dtype == np.int16
    assert np.mean((back.array > -500) == (labels.array > 0)) > 0.97


@pytest.mark.slow
def test_generate_fit_grid_and_back_on_the_mask_grid(tiny_weights, converted, tmp_path, maisi):
    mask_path = converted[0]
    out, label_out = tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz"
    result = maisi("generate", "--model", tiny_weights["rflow-ct"], "--mask", mask_path, "--fit-grid",
                   "--size", 128, 128, 32, "--spacing", 3, 3, 3, "--allow-any-size", "--on-mask-grid",
                   "--steps", 3, "--device", "cpu", "--out", out, "--label-out", label_out)
    assert result.returncode == 0, result.stderr
    mask = nib.load(mask_path)
    for path in (out, label_out):
        image = nib.load(path)
        assert image.shape == mask.shape and np.array_equal(image.affine, mask.affine)
    # Same spacing, grid aligned on the mask's voxels: the labels come back unchanged.
    assert np.array_equal(_array(label_out), np.asanyarray(mask.dataobj))
    ct = _array(out)
    assert np.all(ct[np.asanyarray(mask.dataobj) == 0] == -1000)


def _candidate_database(converted_labels: Volume, folder):
    """Three candidates from the real example: plain, with a hepatic tumour, with a bone lesion."""
    table = label_table()
    labels = converted_labels.array
    liver = np.argwhere(labels == 1)
    centre = liver.mean(axis=0).round().astype(int)
    entries = []
    variants = {"plain": None, "hepatic": table.by_name("hepatic tumor").id, "bone": table.by_name("bone lesion").id}
    for name, tumour_id in variants.items():
        array = labels.copy()
        if tumour_id is not None:
            host = 1 if name == "hepatic" else 37
            grid = np.indices(array.shape)
            c = centre if name == "hepatic" else np.argwhere(labels == 37).mean(axis=0).round().astype(int)
            ball = sum((g - v) ** 2 for g, v in zip(grid, c)) <= (3 if name == "hepatic" else 1) ** 2
            array[ball & (labels == host)] = tumour_id
        padded = np.zeros((128, 128, 32), np.int16)
        padded[3:125, 13:114, 1:31] = array
        affine = converted_labels.affine.copy()
        affine[:3, 3] -= affine[:3, :3] @ [3, 13, 1]
        write_volume(folder / f"{name}.nii.gz", Volume(padded, affine))
        entries.append({
            "pseudo_label_filename": f"{name}.nii.gz",
            "label_list": sorted(int(v) for v in np.unique(padded) if v),
            "dim": [128, 128, 32], "spacing": [3.0, 3.0, 3.0],
            "top_region_index": [0, 0, 1, 0], "bottom_region_index": [0, 0, 0, 1],
        })
    (folder / "candidates.json").write_text(json.dumps(entries))
    return folder / "candidates.json"


@pytest.mark.slow
def test_paired_generation_from_a_candidate_database(tiny_weights, converted, tmp_path, maisi):
    db = _candidate_database(read_volume(converted[0]), tmp_path)
    out, label_out = tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz"
    result = maisi("generate", "--model", tiny_weights["rflow-ct"], "--anatomy", "liver,hepatic tumor",
                   "--body-region", "abdomen", "--mask-db", db, "--size", 128, 128, 32, "--spacing", 3, 3, 3,
                   "--allow-any-size", "--steps", 3, "--seed", 5, "--device", "cpu",
                   "--out", out, "--label-out", label_out)
    assert result.returncode == 0, result.stderr
    assert "mask from database: hepatic.nii.gz" in result.stderr
    labels, ct = _array(label_out), _array(out)
    assert labels.shape == ct.shape == (128, 128, 32)
    assert (labels == 26).sum() > 0 and (labels == 1).sum() > 1000  # dictionary ids, not re-indexed
    assert (labels == 128).sum() == 0  # the bone-lesion candidate was not taken
    assert np.all(ct[labels == 0] == -1000)
    # Resampled to another grid when no candidate is on it.
    result = maisi("generate", "--model", tiny_weights["rflow-ct"], "--anatomy", "liver", "--mask-db", db,
                   "--size", 64, 64, 32, "--spacing", 6, 6, 3, "--allow-any-size", "--steps", 2, "--device", "cpu",
                   "--out", tmp_path / "small.nii.gz", "--label-out", tmp_path / "small_labels.nii.gz")
    assert result.returncode == 0, result.stderr
    assert "(resampled)" in result.stderr and "plain.nii.gz" in result.stderr
    small = _array(tmp_path / "small_labels.nii.gz")
    assert small.shape == (64, 64, 32) and (small == 1).sum() > 0 and not np.isin(small, [26, 128]).any()
    # No candidate holds a lung tumour: one clear line.
    result = maisi("generate", "--model", tiny_weights["rflow-ct"], "--anatomy", "lung tumor", "--mask-db", db,
                   "--size", 128, 128, 32, "--spacing", 3, 3, 3, "--allow-any-size", "--out", tmp_path / "x.nii.gz")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "maisi: error: no candidate mask in the database contains lung tumor without other tumours; "
        "change --anatomy or --body-region"
    )
    result = maisi("generate", "--model", tiny_weights["rflow-ct"], "--anatomy", "kidney stone", "--mask-db", db,
                   "--out", tmp_path / "x.nii.gz")
    assert result.returncode == 2 and "--anatomy 'kidney stone': not a MAISI anatomy name" in result.stderr


def test_tumour_augmentation_stays_in_its_organ(converted):
    from maisicore.anatomy.maskdb import augment_tumors

    labels = read_volume(converted[0]).array.astype(np.int16)
    liver = np.argwhere(labels == 1).mean(axis=0).round().astype(int)
    grid = np.indices(labels.shape)
    ball = (sum((g - v) ** 2 for g, v in zip(grid, liver)) <= 9) & (labels == 1)
    labels[ball] = 26
    rng = np.random.default_rng(0)
    out = augment_tumors(labels, rng)
    tumour = out == 26
    assert tumour.sum() >= 0.8 * ball.sum()
    assert not np.array_equal(tumour, ball)  # it moved or changed shape
    assert np.all(np.isin(labels[tumour], [1, 26]))  # inside the liver
    assert np.array_equal(out[~np.isin(labels, [1, 26])], labels[~np.isin(labels, [1, 26])])


def test_qc_passes_on_real_ct_and_fails_readably(real_data, converted, tmp_path, maisi):
    result = maisi("qc", real_data / "example_ct_sm.nii.gz", "--label", converted[0], "--json", tmp_path / "qc.json")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["organ"]: r for r in json.loads((tmp_path / "qc.json").read_text())}
    for organ in ("liver", "spleen", "pancreas", "kidney", "bone"):
        assert rows[organ]["checked"] and rows[organ]["passed"], organ
    assert rows["brain"]["checked"] is False
    assert rows["liver"]["median_hu"] == pytest.approx(46.0)
    # A CT whose liver is set to −500 HU fails with a readable table.
    ct = read_volume(real_data / "example_ct_sm.nii.gz")
    labels = read_volume(converted[0]).array
    ct.array[labels == 1] = -500
    write_volume(tmp_path / "bad.nii.gz", ct)
    result = maisi("qc", tmp_path / "bad.nii.gz", "--label", converted[0])
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["organ", "voxels", "median", "HU", "range", "HU", "result"]
    liver_line = next(line for line in lines if line.startswith("liver"))
    assert "-500.0" in liver_line and liver_line.endswith("OUT OF RANGE")
    assert lines[-1] == "quality check failed: liver outside the range of real CTs"


def test_labels_list_cli(maisi):
    result = maisi("labels", "list")
    assert result.returncode == 0
    rows = result.stdout.splitlines()
    assert len(rows) == 1 + 133
    assert rows[1].split()[:2] == ["1", "liver"] and "kidney_left" in next(r for r in rows if " left kidney " in r)
    result = maisi("labels", "list", "--json")
    data = json.loads(result.stdout)
    assert {d["id"] for d in data if d["tumor"]} == {23, 24, 26, 27, 128}


def test_labels_convert_errors(tmp_path, real_data, maisi):
    result = maisi("labels", "convert", "--from", "totalsegmentator", tmp_path / "none.nii.gz", "--out", tmp_path / "o.nii.gz")
    assert result.returncode == 2 and "file not found" in result.stderr and "Traceback" not in result.stderr
    result = maisi("labels", "convert", "--from", "totalsegmentator", real_data / "example_seg.nii.gz",
                   "--ct", real_data / "example_ct.nii.gz", "--out", tmp_path / "o.nii.gz")
    assert result.returncode == 2 and "--ct is not on the segmentation's grid" in result.stderr
    assert not (tmp_path / "o.nii.gz").exists()
