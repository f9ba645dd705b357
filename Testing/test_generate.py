"""`maisi generate` end to end with tiny weights: determinism, geometry, the mask path, real data."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest
from conftest import body_mask_from_real_data, run_maisi
from maisicore.io.geometry import Volume, centered_affine
from maisicore.io.volumes import read_volume, write_volume
from maisicore.models.presets import get_preset
from maisicore.models.weights import load_model
from maisicore.pipelines.generate import generate, plan_generation

# fp32 explicitly: the same numbers on a machine whose --precision auto picks bfloat16
GRID = ["--size", 64, 64, 32, "--spacing", 4, 4, 4, "--allow-any-size", "--device", "cpu", "--precision", "fp32"]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["training_start_weights", "tiny_weights"])
@pytest.mark.parametrize("model,extra", [("rflow-ct", ["--steps", 10]), ("ddpm-ct", ["--steps", 5])])
def test_generate_is_bit_identical_across_runs(request, tmp_path, model, extra, weights, maisi):
    folder = request.getfixturevalue(weights)[model]
    outs = []
    # The real program, then the same command in this process (one case; a child process costs seconds
    # of imports): the two give the same bytes. The other cases run the command twice in this process.
    first = run_maisi if (model, weights) == ("rflow-ct", "tiny_weights") else maisi
    for run, runner in enumerate((first, maisi)):
        out = tmp_path / f"run{run}.nii.gz"
        result = runner("generate", "--model", model, "--weights-dir", folder, *GRID,
                        "--seed", 1, *extra, "--out", out)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1].startswith(f"wrote {out}")
        outs.append(out)
    assert _sha(outs[0]) == _sha(outs[1])
    image = nib.load(outs[0])
    data = np.asanyarray(image.dataobj)
    assert data.dtype == np.int16 and data.shape == (64, 64, 32)
    assert data.min() >= -1000 and data.max() <= 1000 and data.std() > 0
    # A different seed gives a different image.
    other = tmp_path / "seed2.nii.gz"
    assert maisi("generate", "--model", model, "--weights-dir", folder, *GRID, "--seed", 2,
                 *extra, "--out", other).returncode == 0
    assert not np.array_equal(np.asanyarray(nib.load(other).dataobj), data)


@pytest.mark.slow
def test_output_geometry_without_mask(tiny_weights, tmp_path, maisi):
    out = tmp_path / "ct.nrrd"
    result = maisi("generate", "--model", "rflow-ct", "--weights-dir", tiny_weights["rflow-ct"],
                   "--size", 64, 32, 96, "--spacing", 1.5, 2.0, 3.0, "--allow-any-size", "--device", "cpu",
                   "--steps", 3, "--out", out)
    assert result.returncode == 0, result.stderr
    ct = read_volume(out)
    assert ct.shape == (64, 32, 96)
    np.testing.assert_allclose(ct.affine, centered_affine((64, 32, 96), (1.5, 2.0, 3.0)))
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    np.testing.assert_allclose(ct.affine[:3, :3] @ (np.array(ct.shape) - 1) / 2 + ct.affine[:3, 3], 0, atol=1e-9)


def _oblique_flipped(volume: Volume) -> Volume:
    """The same image on a grid with axes permuted (y, z, x), x flipped, rotated 10° about z and moved."""
    array = np.flip(np.transpose(volume.array, (1, 2, 0)), axis=2)
    perm = np.zeros((4, 4))
    perm[3, 3] = 1
    # new index (j, k, i') with i' = nx-1-i  ->  old index (i, j, k)
    n = volume.shape[0]
    perm[0, 2], perm[0, 3] = -1, n - 1
    perm[1, 0] = 1
    perm[2, 1] = 1
    theta = np.deg2rad(10)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    rot[:3, 3] = [12.5, -40.0, 7.25]
    return Volume(np.ascontiguousarray(array), rot @ volume.affine @ perm)


@pytest.mark.slow
def test_mask_geometry_is_kept_exactly_in_any_orientation(tiny_weights, tmp_path, real_data, maisi):
    labels, affine = body_mask_from_real_data(real_data)
    plain = Volume(labels, affine)
    oblique = _oblique_flipped(plain)
    outs = {}
    for name, mask in (("plain", plain), ("oblique", oblique)):
        mask_path = tmp_path / f"{name}.nii.gz"
        write_volume(mask_path, mask)
        before = _sha(mask_path)
        out = tmp_path / f"ct_{name}.nii.gz"
        result = maisi("generate", "--model", tiny_weights["rflow-ct"], "--mask", mask_path, "--allow-any-size",
                       "--device", "cpu", "--seed", 4, "--steps", 4, "--preview", tmp_path / f"{name}.png",
                       "--out", out)
        assert result.returncode == 0, result.stderr
        assert _sha(mask_path) == before  # the input is never modified
        ct = read_volume(out)
        written_mask = read_volume(mask_path)
        assert ct.shape == written_mask.shape
        assert np.array_equal(ct.affine, written_mask.affine)  # exactly the mask's geometry
        assert np.all(ct.array[written_mask.array == 0] == -1000)
        inside = ct.array[written_mask.array != 0]
        assert inside.min() >= -1000 and inside.max() <= 1000 and np.mean(inside > -1000) > 0.5
        outs[name] = ct
    # The oblique/flipped grid describes the same anatomy: the model sees the same RAS-ordered
    # input, so the image is the same voxel for voxel once put back on the plain grid.
    back = np.transpose(np.flip(outs["oblique"].array, axis=2), (2, 0, 1))
    assert np.array_equal(back, outs["plain"].array)
    from PIL import Image

    assert Image.open(tmp_path / "plain.png").size[0] > 256


@pytest.mark.slow
def test_controlnet_changes_only_the_labelled_result(tiny_weights):
    labels = np.zeros((64, 64, 64), np.int64)
    labels[8:56, 8:56, 8:56] = 200
    labels[20:40, 16:36, 20:44] = 1
    mask = Volume(labels, centered_affine((64, 64, 64), (4, 4, 4)))
    preset = get_preset("rflow-ct", "tiny")
    active_cn = load_model(preset, tiny_weights["rflow-ct"])
    zero_cn = load_model(preset, tiny_weights["rflow-ct"])
    for name, param in zero_cn.controlnet.named_parameters():  # as MONAI initialises them: adds nothing
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
            param.data.zero_()
    no_mask_plan = plan_generation(preset, size=(64, 64, 64), spacing=(4, 4, 4), steps=8, allow_any_size=True)
    mask_plan = plan_generation(preset, mask=mask, steps=8, allow_any_size=True)
    free = generate(zero_cn, no_mask_plan, seed=3).array
    with_zero_cn = generate(zero_cn, mask_plan, seed=3).array
    with_active_cn = generate(active_cn, mask_plan, seed=3).array
    inside, outside = labels != 0, labels == 0
    # Background is −1000 exactly; a ControlNet that adds nothing leaves the image as it was inside.
    assert np.all(with_zero_cn[outside] == -1000) and np.all(with_active_cn[outside] == -1000)
    assert np.array_equal(with_zero_cn[inside], free[inside])
    # A ControlNet that acts changes the image inside the body.
    changed = np.mean(with_active_cn[inside] != free[inside])
    assert changed > 0.5
    # A different mask (liver moved) gives a different image.
    labels2 = labels.copy()
    labels2[labels2 == 1] = 200
    labels2[30:50, 30:50, 20:44] = 1
    other = generate(active_cn, plan_generation(preset, mask=Volume(labels2, mask.affine), steps=8, allow_any_size=True), seed=3)
    assert not np.array_equal(other.array[inside & (labels2 != 0)], with_active_cn[inside & (labels2 != 0)])


@pytest.mark.slow
def test_progress_and_cancel(tiny_weights):
    from maisicore.errors import Cancelled

    model = load_model(get_preset("rflow-ct", "tiny"), tiny_weights["rflow-ct"])
    plan = plan_generation(model.preset, size=(64, 64, 64), spacing=(4, 4, 4), steps=6, allow_any_size=True)
    seen = []
    generate(model, plan, seed=0, progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert seen == [("denoise", i, 6) for i in range(1, 7)] + [("decode", 0, 1), ("decode", 1, 1)]
    calls = []

    def cancel_after_two():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        generate(model, plan, seed=0, cancel=cancel_after_two)
    assert len(calls) == 3


# ---- --draft ---------------------------------------------------------------------------------------


def test_draft_grid_rule_and_resampling():
    from maisicore.pipelines.draft import DRAFT_STEPS, draft_size, upsample
    from maisicore.pipelines.requests import DRAFT_MAX_STEPS

    assert draft_size((256, 256, 128)) == (64, 64, 32)  # the request: 4× fewer voxels per axis
    assert draft_size((512, 512, 256)) == (128, 128, 64)
    assert draft_size((64, 64, 32)) == (32, 32, 32) and draft_size((96, 160, 40)) == (32, 32, 32)
    assert DRAFT_STEPS + 1 <= DRAFT_MAX_STEPS == 10  # ab2: N steps cost N + 1 evaluations
    # Same field of view, edges aligned: a ramp along x on the draft grid stays a ramp on the full grid,
    # each full voxel centre at (j + 0.5) / 4 − 0.5 draft voxels.
    draft = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None], (8, 2, 2)).copy()
    full = upsample(draft, (32, 8, 8))
    expected = np.clip((np.arange(32) + 0.5) / 4 - 0.5, 0, 7)
    assert full.shape == (32, 8, 8) and np.allclose(full[:, 3, 5], expected, atol=1e-5)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_draft_is_on_the_mask_grid_and_says_draft(tiny_weights, tmp_path, maisi, suffix):
    from maisicore.io.geometry import Volume
    from maisicore.pipelines.generate import GeneratePipeline
    from maisicore.pipelines.requests import GenerateRequest

    affine = np.array([[0.0, -4.0, 0.0, 30.0], [4.0, 0.0, 0.0, -60.0], [0.0, 0.0, 4.0, 12.0], [0, 0, 0, 1]])  # rotated
    labels = np.zeros((64, 64, 32), np.int16)
    labels[6:58, 6:58, 1:31] = 200
    labels[14:34, 14:34, 8:22] = 1
    mask = tmp_path / "mask.nii.gz"
    write_volume(mask, Volume(labels, affine))
    out = tmp_path / f"draft{suffix}"
    result = maisi("generate", "--model", "rflow-ct", "--weights-dir", tiny_weights["rflow-ct"], "--mask", mask,
                   "--allow-any-size", "--device", "cpu", "--draft", "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(f"DRAFT (a quick look, not a final result): wrote {out}")
    assert "DRAFT: sampled at 32×32×32 voxels" in result.stderr and "9 steps (10 network evaluations)" in result.stderr
    ct = read_volume(out)
    assert ct.shape == labels.shape and np.allclose(ct.affine, affine, atol=1e-6)
    assert ct.array.dtype == np.int16 and np.all(ct.array[labels == 0] == -1000) and ct.array[labels > 0].std() > 0
    if suffix == ".nii.gz":
        assert nib.load(out).header["descrip"].tobytes().startswith(b"MAISI DRAFT rflow-ct/tiny seed 0 9 steps ab2")
    else:
        import nrrd

        assert nrrd.read_header(str(out))["content"].startswith("MAISI DRAFT rflow-ct/tiny")
    # The Python API: steps and evaluations within the draft's limit, the labels the user's full mask.
    request = GenerateRequest(model="rflow-ct", weights_dir=str(tiny_weights["rflow-ct"]), mask=str(mask),
                              allow_any_size=True, device="cpu", draft=True, steps=4)
    outcome = GeneratePipeline.from_request(request)(request)
    from maisicore.pipelines.draft import draft_evaluations

    assert outcome.action == "draft" and outcome.plan.sampler == "ab2" and outcome.plan.steps == 4
    assert draft_evaluations(get_preset("rflow-ct", "tiny"), outcome.plan) == 5 <= 10
    assert np.array_equal(outcome.labels.array, labels) and np.array_equal(outcome.ct.affine, ct.affine)


def test_draft_of_a_ddpm_model_is_refused(tiny_weights, tmp_path, maisi):
    result = maisi("generate", "--model", "ddpm-ct", "--weights-dir", tiny_weights["ddpm-ct"], *GRID, "--draft",
                   "--out", tmp_path / "d.nii.gz")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--draft samples with ab2" in lines[0] and "DDPM model" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []
