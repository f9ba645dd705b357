"""The body envelope (label 200) from a CT side by side with NVIDIA's own ``add_body_envelope``
(NV-Generate-CTMR ``scripts/utils.py``, imported unchanged by ``nvidia_reference``; only its
``device`` argument is set to the CPU), on TotalSegmentator's real CTs with their segmentations
converted to MAISI ids as `maisi labels convert` converts them: the same voxels, the CT table left
out, an arm lying apart from the trunk kept."""

from __future__ import annotations

import numpy as np
import pytest
from maisicore.anatomy.body import BodyOptions, envelope_from_ct
from maisicore.anatomy.labelmap import read_totalsegmentator
from maisicore.io.geometry import onto_grid_of
from maisicore.io.volumes import read_volume
from nvidia_reference import import_reference
from scipy import ndimage

BODY = 200
CASES = {  # name: (TotalSegmentator segmentation, CT on its grid)
    "example_ct_sm": ("example_seg.nii.gz", "example_ct_sm.nii.gz"),  # 122×101×30, 3 mm, lungs labelled
    "dicom_series": ("example_seg_dicom.nii.gz", "example_ct_dicom"),  # 512×512×20, 0.98 mm, no lungs
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    pytest.importorskip("skimage.measure")  # the reference's largest-component step (MONAI) needs the real one
    return import_reference(tmp_path_factory.mktemp("nvidia")).utils


_LOADED: dict = {}


def _case(real_data, name):
    """(MAISI labels, CT HU) of ``name``, (x, y, z) on the segmentation's grid."""
    if name not in _LOADED:
        seg, ct = CASES[name]
        labels, _ = read_totalsegmentator(real_data / seg)
        hu = onto_grid_of(read_volume(real_data / ct, modality="CT"), labels)
        _LOADED[name] = labels.array, hu.array
    return _LOADED[name]


def _compare(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(Dice of the body (labels and envelope), fraction of the reference's body voxels that differ)."""
    a, b = theirs != 0, ours != 0
    return 2.0 * (a & b).sum() / (a.sum() + b.sum()), (a ^ b).sum() / a.sum()


@pytest.mark.parametrize("name", list(CASES))
def test_envelope_equals_nvidias_add_body_envelope(real_data, reference, name):
    labels, hu = _case(real_data, name)
    # Default options: the reference's defaults; the table-piece step runs when a lung lobe is labelled.
    has_lungs = name == "example_ct_sm"
    ours = envelope_from_ct(labels, hu, BODY)
    theirs = reference.add_body_envelope(labels, hu, device="cpu", seg_has_lung=has_lungs)
    dice, differ = _compare(ours, theirs)
    assert dice >= 0.995 and differ < 0.005
    np.testing.assert_array_equal(ours, theirs)  # measured: the same voxels, Dice 1.0
    assert ours.dtype == labels.dtype
    np.testing.assert_array_equal(ours[labels != 0], labels[labels != 0])  # labels are never overwritten
    assert int((ours == BODY).sum()) == {"example_ct_sm": 136_447, "dicom_series": 1_030_519}[name]
    if name == "dicom_series":  # no lungs labelled: with the step forced on, still the reference's voxels
        forced = envelope_from_ct(labels, hu, BODY, BodyOptions(labels_have_lungs=True))
        np.testing.assert_array_equal(forced, reference.add_body_envelope(labels, hu, device="cpu"))


@pytest.mark.parametrize("options", [
    BodyOptions(air_hu=-700.0, closing_voxels=5, bed_voxels=3, table_fraction=0.02, labels_have_lungs=True),
    BodyOptions(air_hu=-900.0, closing_voxels=1, bed_voxels=7, table_fraction=0.5, labels_have_lungs=False),
])
def test_envelope_options_are_the_references_parameters(real_data, reference, options):
    labels, hu = _case(real_data, "example_ct_sm")
    ours = envelope_from_ct(labels, hu, BODY, options)
    theirs = reference.add_body_envelope(
        labels, hu, hu_threshold=options.air_hu, closing_kernel=options.closing_voxels,
        bed_cleanup_kernel=options.bed_voxels, table_frac_thresh=options.table_fraction,
        seg_has_lung=options.labels_have_lungs, device="cpu")
    np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(ours, envelope_from_ct(labels, hu, BODY))  # the options change the envelope


def test_table_pieces_are_removed_as_the_reference_removes_them(reference):
    """A synthetic scan where the table is fused with the back and its shell holds air: the air
    pocket is not outside air and survives the bed cut-off, so it is body until the table-piece step
    (lungs labelled) takes it out; the lung's air, labelled, stays."""
    hu = np.full((64, 48, 12), -1000, np.int16)
    x, y = np.ogrid[:64, :48]
    trunk = ((x - 32) / 24.0) ** 2 + ((y - 28) / 14.0) ** 2 <= 1.0
    hu[trunk] = 40
    hu[8:56, 4:20][~trunk[8:56, 4:20]] = -100  # the table's plastic, touching the back from y = 14 ...
    hu[12:52, 6:12] = -1000  # ... around an air pocket (40×6×12 voxels)
    labels = np.zeros(hu.shape, np.int16)
    labels[26:38, 24:32, :] = 28  # a lung lobe (its id), filled with air
    hu[26:38, 24:32, :] = -900
    for lungs, pocket in ((True, 0), (False, 40 * 6 * 12)):
        ours = envelope_from_ct(labels, hu, BODY, BodyOptions(labels_have_lungs=lungs))
        np.testing.assert_array_equal(ours, reference.add_body_envelope(labels, hu, device="cpu", seg_has_lung=lungs))
        assert int((ours[12:52, 6:12] == BODY).sum()) == pocket
        assert np.all(ours[26:38, 24:32] == 28)
    np.testing.assert_array_equal(envelope_from_ct(labels, hu, BODY)[12:52, 6:12], 0)  # auto: a lobe is labelled


@pytest.mark.parametrize("name", list(CASES))
def test_envelope_keeps_the_separate_arm_and_leaves_the_table_out(real_data, name):
    labels, hu = _case(real_data, name)
    body = envelope_from_ct(labels, hu, BODY) != 0
    # Tissue regions (HU > -500, 6-connected), as the former rule saw them: the largest is the trunk.
    regions, _ = ndimage.label(hu > -500)
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    trunk = int(np.argmax(sizes))
    others = [i for i in np.nonzero(sizes >= 500)[0] if i != trunk]
    labelled = {i: bool((labels[regions == i] != 0).any()) for i in others}
    arms = [i for i in others if labelled[i]]  # apart from the trunk, with labelled bone and muscle
    tables = [i for i in others if not labelled[i]]  # apart from the patient, nothing labelled
    expected = {"example_ct_sm": ([], [935, 1122]), "dicom_series": ([116_942], [32_885, 70_785])}[name]
    assert (sorted(int(sizes[i]) for i in arms), sorted(int(sizes[i]) for i in tables)) == expected
    for i in arms:  # the arm is in the body (measured 99.86 %; the former rule dropped it whole)
        assert body[regions == i].mean() >= 0.998
    for i in tables:
        assert not body[regions == i].any()
    assert body[regions == trunk].mean() >= 0.985  # measured 98.97 % (example_ct_sm), 100.0 % (series)


def test_labels_convert_body_options(real_data, tmp_path, maisi):
    """`maisi labels convert --ct` writes ``envelope_from_ct`` with the ``--body-*`` options."""
    seg, ct = (real_data / f for f in CASES["example_ct_sm"])
    out = tmp_path / "labels.nii.gz"
    result = maisi("labels", "convert", "--from", "totalsegmentator", seg, "--ct", ct, "--out", out,
                   "--body-air-hu", "-700", "--body-closing", "5", "--body-bed", "3", "--body-table-fraction", "0.02",
                   "--body-lungs", "no")
    assert result.returncode == 0, result.stderr
    labels, hu = _case(real_data, "example_ct_sm")
    options = BodyOptions(-700.0, 5, 3, 0.02, False)
    np.testing.assert_array_equal(read_volume(out).array, envelope_from_ct(labels, hu, BODY, options))


@pytest.mark.parametrize("args, message", [
    (["--body-closing", "4"], "body closing kernel 4 voxels is invalid: give an odd whole number from 1 to 31"),
    (["--body-bed", "0"], "body bed kernel 0 voxels is invalid"),
    (["--body-air-hu", "100"], "body air threshold 100 HU is out of range: give a value in (-1024, 0] HU"),
    (["--body-air-hu", "nan"], "body air threshold nan HU is out of range"),
    (["--body-table-fraction", "0"], "body table fraction 0 is out of range: give a value in (0, 1]"),
    (["--body-lungs", "maybe"], "argument --body-lungs: invalid choice"),
    (["--no-body", "--body-bed", "3"], "the --body-* options shape the body envelope from --ct"),
    (["--body-bed", "3", "--no-ct"], "the --body-* options shape the body envelope from --ct: give --ct"),
])
def test_bad_body_options_one_line_exit_2_nothing_written(real_data, tmp_path, maisi, args, message):
    seg, ct = (real_data / f for f in CASES["example_ct_sm"])
    out = tmp_path / "labels.nii.gz"
    ct_args = [] if "--no-ct" in args else ["--ct", ct]
    result = maisi("labels", "convert", "--from", "totalsegmentator", seg, *ct_args, "--out", out,
                   *[a for a in args if a != "--no-ct"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()
