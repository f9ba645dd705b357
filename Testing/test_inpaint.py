"""Inpainting a tumour into the real CT: untouched outside the tumour region, cost follows the region."""

from __future__ import annotations

import hashlib
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import run_maisi
from maisicore.io.geometry import Volume
from maisicore.io.volumes import read_volume
from maisicore.models.presets import get_preset
from maisicore.models.weights import load_model
from maisicore.pipelines.inpaint import ball_tumor, check_host, inpaint

LIVER_POINT = (64.0, 185.0, 150.0)  # RAS mm, inside the liver of example_ct_sm


@pytest.fixture
def anatomy(converted_labels):
    """The real segmentation as MAISI labels (conftest's session-wide ``converted_labels``)."""
    return converted_labels[0]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_inpaint_changes_only_the_tumour_region(tiny_weights, real_data, anatomy, tmp_path):
    from scipy import ndimage

    image = real_data / "example_ct_sm.nii.gz"
    before = _sha(image)
    out, label_out = tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz"
    result = run_maisi("inpaint", "--image", image, "--labels", anatomy, "--tumor-center", *LIVER_POINT,
                       "--tumor-diameter", 20, "--tumor-type", "hepatic tumor", "--model", tiny_weights["rflow-ct"],
                       "--steps", 4, "--seed", 3, "--device", "cpu", "--out", out, "--label-out", label_out)
    assert result.returncode == 0, result.stderr
    assert _sha(image) == before  # the input is untouched
    original, inpainted = nib.load(image), nib.load(out)
    assert inpainted.shape == original.shape and np.array_equal(inpainted.affine, original.affine)
    assert inpainted.get_data_dtype() == original.get_data_dtype() == np.int16
    labels = np.asanyarray(nib.load(label_out).dataobj)
    tumour = labels == 26
    assert 60 < tumour.sum() < 250  # a 20 mm ball at 3 mm voxels is ~155 voxels, irregular and clipped
    anatomy_labels = np.asanyarray(nib.load(anatomy).dataobj)
    assert np.all(anatomy_labels[tumour] == 1)  # inside the liver
    assert np.array_equal(labels[~tumour], anatomy_labels[~tumour])  # the anatomy used, plus the tumour
    region = ndimage.binary_dilation(tumour, iterations=2)
    a, b = np.asanyarray(original.dataobj), np.asanyarray(inpainted.dataobj)
    assert np.array_equal(a[~region], b[~region])  # bit-identical outside the dilated tumour
    assert np.mean(a[tumour] != b[tumour]) > 0.5  # and the tumour was regenerated


@pytest.mark.slow
def test_inpaint_api_with_a_user_mask_and_no_labels(tiny_weights, real_data):
    ct = read_volume(real_data / "example_ct_sm.nii.gz")
    model = load_model(get_preset("rflow-ct", "tiny"), tiny_weights["rflow-ct"])
    mask = ball_tumor(ct, LIVER_POINT, 15.0, seed=1)
    seen = []
    result = inpaint(model, ct, mask, "hepatic tumor", None, seed=1, steps=3,
                     progress=lambda stage, done, total: seen.append(stage))
    assert "no --labels" in result.notes[0]
    assert result.ct.array.dtype == np.int16 and result.ct.shape == ct.shape
    assert np.array_equal(result.ct.affine, ct.affine)
    assert seen.count("denoise") == 3 and seen[-1] == "decode"
    assert (result.labels.array == 26).sum() == mask.sum()
    # A float CT keeps its dtype and its values outside the tumour region.
    from scipy import ndimage

    floating = Volume(ct.array.astype(np.float32) + 0.25, ct.affine)
    result = inpaint(model, floating, mask, "hepatic tumor", None, seed=1, steps=2)
    outside = ~ndimage.binary_dilation(mask, iterations=2)
    assert result.ct.array.dtype == np.float32
    assert np.array_equal(result.ct.array[outside], floating.array[outside])


@pytest.mark.slow
def test_cost_follows_the_region_not_the_scan(tiny_weights, real_data):
    ct = read_volume(real_data / "example_ct.nii.gz")  # 122×101×112
    padded = np.full((244, 202, 112), -1024, ct.array.dtype)  # 4× the voxels, same anatomy
    padded[61:183, 50:151, :] = ct.array
    affine = ct.affine.copy()
    affine[:3, 3] -= ct.affine[:3, :3] @ [61, 50, 0]
    big = Volume(padded, affine)
    model = load_model(get_preset("rflow-ct", "tiny"), tiny_weights["rflow-ct"])
    point = (64.0, 185.0, 150.0)

    masks = {id(volume): ball_tumor(volume, point, 20.0, seed=0) for volume in (ct, big)}

    def timed(volume):
        start = time.perf_counter()
        result = inpaint(model, volume, masks[id(volume)], "hepatic tumor", None, seed=0, steps=4)
        return time.perf_counter() - start, result

    # Interleaved runs, best of four each: a burst of load from other processes hits both sizes alike.
    small_times, big_times = [], []
    for _ in range(4):
        elapsed, small = timed(ct)
        small_times.append(elapsed)
        elapsed, large = timed(big)
        big_times.append(elapsed)
    small_time, big_time = min(small_times), min(big_times)
    assert small.roi_shape == large.roi_shape
    assert big_time <= 1.3 * small_time, (small_time, big_time)
    # Same region, same result.
    assert np.array_equal(large.ct.array[61:183, 50:151, :], small.ct.array)


def test_tumour_shape_and_host_clipping(real_data, anatomy):
    ct = read_volume(real_data / "example_ct_sm.nii.gz")
    mask = ball_tumor(ct, LIVER_POINT, 30.0, seed=2)
    sphere = 4 / 3 * np.pi * 15**3 / 27  # voxels of a 30 mm ball at 3 mm
    assert 0.6 * sphere < mask.sum() < 1.4 * sphere
    assert not np.array_equal(mask, ball_tumor(ct, LIVER_POINT, 30.0, seed=3))  # irregular, seeded
    labels = read_volume(anatomy)
    clipped = check_host(labels, mask, "hepatic tumor", LIVER_POINT)
    assert clipped.sum() <= mask.sum() and np.all(labels.array[clipped] == 1)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--tumor-center", 500, 0, 0, "--tumor-diameter", 20, "--tumor-type", "hepatic tumor"], "lies outside the image"),
        (["--tumor-center", 0, 150, 150, "--tumor-diameter", 20, "--tumor-type", "hepatic tumor", "--labels", "{labels}"],
         "--tumor-center is outside its host organ (liver) in --labels"),
        (["--tumor-center", *LIVER_POINT, "--tumor-diameter", 20, "--tumor-type", "kidney stone"], "not a tumour type"),
        (["--tumor-center", *LIVER_POINT, "--tumor-diameter", 900, "--tumor-type", "hepatic tumor"],
         "too large for the inpainting region"),
        (["--tumor-type", "hepatic tumor"], "give either --tumor-mask, or --tumor-center with --tumor-diameter"),
    ],
)
def test_inpaint_errors(args, expected, tiny_weights, real_data, anatomy, tmp_path, maisi):
    args = [str(a).format(labels=anatomy) for a in args]
    result = maisi("inpaint", "--image", real_data / "example_ct_sm.nii.gz", "--model", tiny_weights["rflow-ct"],
                   "--device", "cpu", *args, "--out", tmp_path / "x.nii.gz")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maisi: error: ") and expected in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []
