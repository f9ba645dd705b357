"""Every bad input: exit code 2, one line on stderr saying what to change, no traceback, nothing written.

The cases run `maisi` in this process (the ``maisi`` fixture: ``maisicore.cli.main``); a few run the
real program in a child process, as a user would."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_maisi
from maisicore.io.geometry import Volume
from maisicore.io.volumes import read_volume, write_volume
from maisicore.models.presets import get_preset
from maisicore.pipelines.generate import plan_generation


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("masks")
    good = np.zeros((64, 64, 64), np.int16)
    good[8:56, 8:56, 8:56] = 200
    good[20:40, 20:40, 20:40] = 1
    unknown = good.copy()
    unknown[0, 0, 0] = 150
    unknown[1, 0, 0] = 999
    no_region = np.where(good > 0, 200, 0).astype(np.int16)
    paths = {}
    for name, array in (("good", good), ("unknown", unknown), ("no_region", no_region)):
        paths[name] = folder / f"{name}.nii.gz"
        write_volume(paths[name], Volume(array, np.diag([4.0, 4.0, 4.0, 1.0])))
    for name, array in (("good", good), ("no_region", no_region)):  # 32³ at 8 mm: cheap to generate
        paths[f"{name}_32"] = folder / f"{name}_32.nii.gz"
        write_volume(paths[f"{name}_32"], Volume(np.ascontiguousarray(array[::2, ::2, ::2]), np.diag([8.0, 8.0, 8.0, 1.0])))
    return paths


CASES = {
    "size not in the published set": (["--size", 64, 64, 64, "--spacing", 4, 4, 4], "X and Y must be equal and one of (256, 384, 512)"),
    "spacing out of range": (["--size", 256, 256, 128, "--spacing", 0.2, 0.2, 1], "within 0.5–3.0 mm"),
    "field of view too small": (["--size", 256, 256, 128, "--spacing", 0.5, 0.5, 1], "in-plane field of view 128 mm"),
    "any size not a multiple of 32": (["--size", 48, 64, 64, "--allow-any-size"], "positive multiple of 32"),
    "mask shape differs from size, --no-fit": (["--mask", "{good}", "--no-fit", "--size", 96, 96, 64, "--allow-any-size"], "differs from the mask's 64×64×64"),
    "mask spacing differs, --no-fit": (["--mask", "{good}", "--no-fit", "--spacing", 2, 2, 2, "--allow-any-size"], "differs from the mask's 4×4×4 mm"),
    "mask fitted onto a size without spacing": (["--mask", "{good}", "--size", 96, 96, 64, "--allow-any-size"], "give both --size and --spacing, or neither"),
    "mask off the published grid, --no-fit": (["--mask", "{good}", "--no-fit"], "(or use --fit-grid) to fit the mask onto a valid grid"),
    "--no-fit with --fit-grid": (["--mask", "{good}", "--no-fit", "--fit-grid"], "not allowed with argument"),
    "unknown label ids": (["--mask", "{unknown}", "--allow-any-size"], "label ids 150, 999 are not in the MAISI dictionary"),
    "mask file missing": (["--mask", "{missing}", "--allow-any-size"], "file not found"),
    "unknown output extension": (["--allow-any-size", "--size", 64, 64, 64, "--out-override", "{tmp}/ct.mha"], "unknown extension"),
    "output folder missing": (["--allow-any-size", "--size", 64, 64, 64, "--out-override", "{tmp}/no/ct.nii.gz"], "does not exist"),
    "non-integer size": (["--size", 64, "x", 64], "argument --size: invalid int value"),
    "unknown body region": (["--body-region", "foot"], "argument --body-region: invalid choice"),
    "steps out of range": (["--size", 64, 64, 64, "--allow-any-size", "--steps", 5000], "--steps 5000: must be between 1 and 1000"),
    "device cuda without CUDA": (["--size", 64, 64, 64, "--allow-any-size", "--device", "cuda"], "CUDA is not available"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_generate_input(case, masks, tiny_weights, tmp_path, maisi):
    if case == "device cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, expected = CASES[case]
    values = {"good": masks["good"], "unknown": masks["unknown"], "missing": tmp_path / "none.nii.gz", "tmp": tmp_path}
    args = [str(a).format(**{k: str(v) for k, v in values.items()}) for a in args]
    out = tmp_path / "ct.nii.gz"
    if "--out-override" in args:
        i = args.index("--out-override")
        out = args[i + 1]
        del args[i : i + 2]
    result = maisi("generate", "--model", "rflow-ct", "--weights-dir", tiny_weights["rflow-ct"], *args, "--out", out)
    _assert_one_line_error(result, expected)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


@pytest.mark.parametrize("case", ["spacing out of range", "unknown body region"])
def test_bad_generate_input_in_a_real_process(case, tiny_weights, tmp_path):
    """The same refusal from the real program (`python -m maisicore`): one checked in the pipeline,
    one by argparse."""
    args, expected = CASES[case]
    result = run_maisi("generate", "--model", "rflow-ct", "--weights-dir", tiny_weights["rflow-ct"], *args,
                       "--out", tmp_path / "ct.nii.gz")
    _assert_one_line_error(result, expected)
    assert list(tmp_path.iterdir()) == []


def _assert_one_line_error(result, expected):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("maisi: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_missing_weight_files(tmp_path, maisi):
    (tmp_path / "empty").mkdir()
    result = maisi("generate", "--model", "rflow-ct", "--weights-dir", tmp_path / "empty", "--out", tmp_path / "ct.nii.gz")
    _assert_one_line_error(result, "missing weight file(s) for rflow-ct/official: ")
    assert "autoencoder_v1.pt" in result.stderr


def test_unknown_model(tmp_path, maisi):
    result = maisi("generate", "--model", "nothing-here", "--out", tmp_path / "ct.nii.gz")
    _assert_one_line_error(result, "--model nothing-here: not a model name (rflow-ct, ddpm-ct, rflow-mr, rflow-mr-brain) nor a weight folder")


def test_weights_of_the_other_model(tiny_weights, tmp_path, maisi):
    result = maisi("generate", "--model", "rflow-ct", "--weights-dir", tiny_weights["ddpm-ct"], "--out", tmp_path / "ct.nii.gz")
    _assert_one_line_error(result, "holds ddpm-ct weights, not rflow-ct; use --model ddpm-ct")


def test_ddpm_mask_without_region_anatomy(tiny_weights, masks, tmp_path, maisi):
    result = maisi("generate", "--model", "ddpm-ct", "--weights-dir", tiny_weights["ddpm-ct"], "--mask", masks["no_region"],
                   "--allow-any-size", "--out", tmp_path / "ct.nii.gz")
    _assert_one_line_error(result, "give --body-region")
    # With the region given it runs (and derives nothing from the mask).
    result = maisi("generate", "--model", "ddpm-ct", "--weights-dir", tiny_weights["ddpm-ct"], "--mask", masks["no_region_32"],
                   "--body-region", "abdomen", "--steps", 2, "--allow-any-size", "--device", "cpu",
                   "--out", tmp_path / "ct.nii.gz")
    assert result.returncode == 0, result.stderr
    assert "body region abdomen→abdomen" in result.stderr


def test_ddpm_region_from_mask(tiny_weights, masks, tmp_path, maisi):
    plan = plan_generation(get_preset("ddpm-ct", "tiny"), mask=read_volume(masks["good"]), allow_any_size=True)
    assert plan.body_region == ("abdomen", "abdomen")  # liver present: abdomen (reference rule)
    # The command line derives the same region and runs with it (the same mask at half the resolution).
    result = maisi("generate", "--model", "ddpm-ct", "--weights-dir", tiny_weights["ddpm-ct"], "--mask", masks["good_32"],
                   "--steps", 2, "--allow-any-size", "--device", "cpu", "--out", tmp_path / "ct.nii.gz")
    assert result.returncode == 0, result.stderr
    assert "body region abdomen→abdomen" in result.stderr


def test_no_command_and_help(maisi):
    result = run_maisi()  # the real program
    assert result.returncode == 2 and "usage: maisi" in result.stderr
    result = maisi("generate", "--help")
    assert result.returncode == 0 and "--allow-any-size" in result.stdout and "--preview PNG" in result.stdout
