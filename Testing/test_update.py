"""`maisi generate --update`: only the voxels whose label changed, plus the margin, are regenerated;
every other voxel is the previous CT's, bit for bit. Refusals: one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest
from maisicore.io.geometry import Volume
from maisicore.io.volumes import read_volume, write_volume
from maisicore.pipelines.update import DEFAULT_MARGIN_MM, within_margin

W = ["--allow-any-size", "--device", "cpu", "--steps", "3"]
SPACING = 4.0


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def loop(tmp_path_factory, tiny_weights):
    """Old labels, the CT generated from them (tiny rflow-ct, 3 steps), and new labels where the liver
    grew by a block (a local edit): {name: path}."""
    from conftest import run_maisi_in_process

    folder = tmp_path_factory.mktemp("update")
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = [-120.0, -90.0, 15.0]
    old = np.zeros((64, 64, 32), np.int16)
    old[6:58, 6:58, 1:31] = 200
    old[14:34, 14:34, 8:22] = 1  # liver
    old[40:52, 20:30, 10:18] = 3  # spleen
    new = old.copy()
    new[34:40, 16:26, 10:16] = 1  # the liver grows by a 24×40×24 mm block
    paths = {"old": folder / "old.nii.gz", "new": folder / "new.nii.gz", "ct": folder / "ct.nii.gz"}
    write_volume(paths["old"], Volume(old, affine))
    write_volume(paths["new"], Volume(new, affine))
    result = run_maisi_in_process("generate", "--model", tiny_weights["rflow-ct"], "--mask", paths["old"], *W,
                                  "--seed", 5, "--out", paths["ct"])
    assert result.returncode == 0, result.stderr
    return paths


def test_update_regenerates_the_change_and_keeps_the_rest_bit_identical(loop, tiny_weights, tmp_path, maisi):
    out, label_out = tmp_path / "updated.nii.gz", tmp_path / "labels.nii.gz"
    before = {k: _sha(v) for k, v in loop.items()}
    result = maisi("generate", "--model", tiny_weights["rflow-ct"], "--mask", loop["new"], "--update", loop["ct"],
                   "--previous-labels", loop["old"], "--update-margin", 8, *W, "--seed", 5, "--out", out,
                   "--label-out", label_out)
    assert result.returncode == 0, result.stderr
    assert {k: _sha(v) for k, v in loop.items()} == before  # inputs untouched
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"wrote {out}") and "only the changed region was regenerated" in line
    assert "UPDATE: 360 changed voxels and 8 mm around them" in result.stderr
    previous, updated = read_volume(loop["ct"]), read_volume(out)
    assert updated.shape == previous.shape and np.array_equal(updated.affine, previous.affine)
    assert updated.array.dtype == previous.array.dtype == np.int16
    new, old = read_volume(loop["new"]).array, read_volume(loop["old"]).array
    changed = new != old
    # Every voxel whose centre is farther than 8 mm from a changed voxel's is the previous CT's, bit for bit
    # (the distance computed here on the whole grid, independently of the pipeline's boxed computation).
    from scipy import ndimage

    far = ndimage.distance_transform_edt(~changed, sampling=(SPACING,) * 3) > 8.0
    assert np.array_equal(updated.array[far], previous.array[far])
    assert np.array_equal(far, ~within_margin(changed, (SPACING,) * 3, 8.0))
    assert np.mean(updated.array[changed] != previous.array[changed]) > 0.5  # the change was regenerated
    assert np.array_equal(read_volume(label_out).array, new)  # the labels followed are the new ones
    assert nib.load(out).header["descrip"].tobytes().startswith(b"MAISI UPDATE rflow-ct/tiny seed 5 3 steps")


def test_update_is_deterministic_and_the_default_margin_is_10_mm(loop, tiny_weights, tmp_path, maisi):
    outs = []
    for run in range(2):
        outs.append(tmp_path / f"u{run}.nii.gz")
        result = maisi("generate", "--model", tiny_weights["rflow-ct"], "--mask", loop["new"], "--update", loop["ct"],
                       "--previous-labels", loop["old"], *W, "--seed", 5, "--out", outs[-1])
        assert result.returncode == 0, result.stderr
    assert DEFAULT_MARGIN_MM == 10.0 and "and 10 mm around them" in result.stderr
    assert _sha(outs[0]) == _sha(outs[1])
    previous, updated = read_volume(loop["ct"]).array, read_volume(outs[0]).array
    changed = read_volume(loop["new"]).array != read_volume(loop["old"]).array
    region = within_margin(changed, (SPACING,) * 3, 10.0)
    assert np.array_equal(updated[~region], previous[~region])
    assert not np.array_equal(updated[region], previous[region])


def _other_grid(path, tmp_path):
    volume = read_volume(path)
    affine = volume.affine.copy()
    affine[0, 3] += SPACING  # shifted by one voxel
    moved = tmp_path / "inputs" / "moved.nii.gz"
    moved.parent.mkdir(exist_ok=True)
    write_volume(moved, Volume(volume.array, affine))
    return moved


@pytest.mark.parametrize("case,expected", [
    ("previous CT on another grid", "--update {moved}: not on --mask's grid"),
    ("previous labels on another grid", "--previous-labels {moved}: not on --mask's grid"),
    ("nothing changed", "nothing changed, nothing to regenerate"),
    ("out = previous CT", "is the input --update"),
    ("out = previous labels", "is the input --previous-labels"),
])
def test_update_refusals(case, expected, loop, tiny_weights, tmp_path, maisi):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "ct.nii.gz"
    ct, old, new = loop["ct"], loop["old"], loop["new"]
    if case == "previous CT on another grid":
        ct = moved = _other_grid(loop["ct"], tmp_path)
    elif case == "previous labels on another grid":
        old = moved = _other_grid(loop["old"], tmp_path)
    elif case == "nothing changed":
        new = old
    elif case == "out = previous CT":
        out = ct
    elif case == "out = previous labels":
        out = old
    expected = expected.format(moved=locals().get("moved"))
    before = {k: _sha(v) for k, v in loop.items()}
    result = maisi("generate", "--model", tiny_weights["rflow-ct"], "--mask", new, "--update", ct,
                   "--previous-labels", old, *W, "--out", out)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("maisi: error: ") and expected in lines[0], result.stderr
    assert {k: _sha(v) for k, v in loop.items()} == before
    assert list(out_dir.iterdir()) == []  # nothing written


def test_a_previous_ct_in_another_axis_order_is_the_same_update(loop, tiny_weights, tmp_path, maisi):
    """The same voxels stored flipped (as a DICOM series may be) are put into the mask's order."""
    previous = read_volume(loop["ct"])
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = previous.shape[0] - 1
    flipped = tmp_path / "flipped.nii.gz"
    write_volume(flipped, Volume(previous.array[::-1].copy(), previous.affine @ flip))
    outs = []
    for source in (loop["ct"], flipped):
        outs.append(tmp_path / f"u{len(outs)}.nii.gz")
        result = maisi("generate", "--model", tiny_weights["rflow-ct"], "--mask", loop["new"], "--update", source,
                       "--previous-labels", loop["old"], *W, "--seed", 5, "--out", outs[-1])
        assert result.returncode == 0, result.stderr
    a, b = read_volume(outs[0]), read_volume(outs[1])
    assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine)
