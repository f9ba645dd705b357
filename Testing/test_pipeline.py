"""One request → pipeline → result path: the CLI, the Python API and `maisi run REQUEST.json` give
the same files; masks on any grid are fitted and mapped back; one conditioning function for training
and inference; the mask-database default is the one the download writes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from maisicore import cli
from maisicore.errors import InputError
from maisicore.io.geometry import Volume
from maisicore.io.volumes import read_volume, write_volume
from maisicore.pipelines.generate import GeneratePipeline, plan_conditions, plan_generation, prepare_generation
from maisicore.pipelines.requests import GenerateRequest, InpaintRequest, read_request, request_from_dict, write_request


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def off_grid_mask(tmp_path_factory) -> tuple:
    """A 40×36×20 MAISI label file at 4 mm, oblique-free LPS-ordered (not a multiple of 32 voxels)."""
    folder = tmp_path_factory.mktemp("off-grid")
    labels = np.zeros((40, 36, 20), np.int16)
    labels[4:36, 4:32, 2:18] = 200
    labels[10:24, 10:22, 5:14] = 1  # liver
    labels[26:32, 12:20, 6:12] = 3  # spleen
    affine = np.diag([-4.0, -4.0, 4.0, 1.0])
    affine[:3, 3] = (70.0, 50.0, -30.0)
    path = folder / "mask.nii.gz"
    write_volume(path, Volume(labels, affine))
    return path, labels, affine


def _request(weights: dict, mask, out, label_out, **extra) -> GenerateRequest:
    return GenerateRequest(model="rflow-ct", weights_dir=str(weights["rflow-ct"]), mask=str(mask), out=str(out),
                           label_out=str(label_out), seed=3, steps=2, device="cpu", allow_any_size=True,
                           **{"precision": "fp32", **extra})


@pytest.mark.slow
def test_cli_python_api_and_run_request_write_identical_files(tiny_weights, off_grid_mask, tmp_path):
    mask, labels, affine = off_grid_mask
    # 1. The human command line, in-process.
    code = cli.main(["generate", "--model", "rflow-ct", "--weights-dir", str(tiny_weights["rflow-ct"]),
                     "--mask", str(mask), "--seed", "3", "--steps", "2", "--device", "cpu", "--allow-any-size",
                     "--precision", "fp32", "--out", str(tmp_path / "cli.nii.gz"), "--label-out", str(tmp_path / "cli_labels.nii.gz")])
    assert code == 0
    # 2. The Python API: request → pipeline → result → files.
    request = _request(tiny_weights, mask, tmp_path / "api.nii.gz", tmp_path / "api_labels.nii.gz")
    pipeline = GeneratePipeline.from_request(request)
    result = pipeline(request)
    written = result.write(request)
    assert set(written) == {"ct", "labels"} and result.seed_used == 3
    assert any("fitted onto 32×32×32" in note and "mapped back" in note for note in result.notes)
    # 3. The machine contract: a request file run by the real program, JSON-lines events on stdout.
    run_request = _request(tiny_weights, mask, tmp_path / "run.nii.gz", tmp_path / "run_labels.nii.gz")
    write_request(tmp_path / "request.json", run_request)
    assert read_request(tmp_path / "request.json") == run_request
    proc = subprocess.run([sys.executable, "-m", "maisicore", "run", str(tmp_path / "request.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[0]["kind"] == "generate"
    denoise = [e for e in events if e["event"] == "progress" and e["stage"] == "denoise"]
    assert [(e["done"], e["total"]) for e in denoise] == [(1, 2), (2, 2)]
    assert [e["event"] for e in events].count("result") == 1 and events[-1]["event"] == "result"
    assert events[-1]["files"] == {"ct": str(tmp_path / "run.nii.gz"), "labels": str(tmp_path / "run_labels.nii.gz")}
    assert events[-1]["seed_used"] == 3 and events[-1]["details"]["shape"] == [40, 36, 20]
    assert any(e["event"] == "note" and "fitted onto" in e["message"] for e in events)
    # Byte-identical files from the three front ends, on the mask's exact grid.
    for kind in ("", "_labels"):
        shas = {_sha(tmp_path / f"{front}{kind}.nii.gz") for front in ("cli", "api", "run")}
        assert len(shas) == 1, kind
    ct, out_labels = read_volume(tmp_path / "run.nii.gz"), read_volume(tmp_path / "run_labels.nii.gz")
    assert ct.shape == out_labels.shape == labels.shape
    np.testing.assert_array_equal(ct.affine, affine)
    np.testing.assert_array_equal(out_labels.array, labels)  # mapped back without losing a voxel
    assert ct.array.dtype == np.int16 and np.all(ct.array[labels == 0] == -1000) and ct.array[labels == 1].std() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{front}{kind}.nii.gz" for front in ("cli", "api", "run") for kind in ("", "_labels")] + ["request.json"])


def test_no_fit_refuses_an_off_grid_mask_naming_fit_grid(tiny_weights, off_grid_mask, tmp_path, capsys):
    mask = off_grid_mask[0]
    code = cli.main(["generate", "--model", "rflow-ct", "--weights-dir", str(tiny_weights["rflow-ct"]),
                     "--mask", str(mask), "--no-fit", "--allow-any-size", "--out", str(tmp_path / "ct.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "positive multiple of 32" in err[0] and "--fit-grid" in err[0] and "Traceback" not in err[0]
    assert list(tmp_path.iterdir()) == []


def test_fit_modes_and_their_grids(tiny_weights, off_grid_mask):
    mask, labels, _ = off_grid_mask
    base = dict(model="rflow-ct", weights_dir=str(tiny_weights["rflow-ct"]), mask=str(mask), allow_any_size=True)
    auto = prepare_generation(GenerateRequest(**base))
    assert auto.plan.size == (32, 32, 32) and auto.plan.spacing == (4.0, 4.0, 4.0)
    assert auto.original_grid.shape == labels.shape and auto.request.maps_back
    # --fit-grid: the fitted grid is kept unless --on-mask-grid; the same grid as auto.
    always = prepare_generation(GenerateRequest(**base, fit="always"))
    assert not always.request.maps_back and always.plan.size == (32, 32, 32)
    np.testing.assert_array_equal(always.mask.array, auto.mask.array)
    # Size and spacing with a mask: generated on that grid around the labels, then mapped back.
    sized = prepare_generation(GenerateRequest(**base, size=[64, 64, 32], spacing=[2.0, 2.0, 2.5]))
    assert sized.plan.size == (64, 64, 32) and sized.plan.spacing == (2.0, 2.0, 2.5) and sized.request.maps_back
    # A mask already on a grid the model takes is not touched.
    on_grid = Volume(np.pad(labels, ((0, 24), (0, 28), (0, 12))), np.diag([4.0, 4.0, 4.0, 1.0]))
    prepared = prepare_generation(GenerateRequest(**{**base, "mask": None}), mask=on_grid)
    assert prepared.original_grid is None and prepared.plan.size == (64, 64, 32) and prepared.notes[:1] != ["mask grid"]


@pytest.mark.slow
def test_the_demo_model_takes_a_real_segmentation_as_it_is(real_data, tmp_path):
    """The quick start's one line: TotalSegmentator's example converted, then `--model demo --mask`."""
    labels = tmp_path / "labels.nii.gz"
    assert cli.main(["labels", "convert", "--from", "totalsegmentator", str(real_data / "example_seg.nii.gz"),
                     "--ct", str(real_data / "example_ct_sm.nii.gz"), "--out", str(labels)]) == 0
    mask = read_volume(labels)
    assert mask.shape == (122, 101, 30)
    # The default request plans exactly what the old five-flag quick start asked for.
    default = prepare_generation(GenerateRequest(model="demo", mask=str(labels)))
    old = prepare_generation(GenerateRequest(model="demo", mask=str(labels), fit="always", size=[128, 96, 32],
                                             spacing=[3.0, 3.0, 3.0], allow_any_size=True, on_mask_grid=True))
    assert default.plan.size == old.plan.size == (128, 96, 32) and default.plan.spacing == old.plan.spacing
    np.testing.assert_array_equal(default.plan.labels, old.plan.labels)
    np.testing.assert_array_equal(default.mask.affine, old.mask.affine)
    assert not [n for n in default.notes if "allow-any-size" in n]  # the card's grid is the model's own
    out = tmp_path / "ct.nii.gz"
    assert cli.main(["generate", "--model", "demo", "--mask", str(labels), "--steps", "2", "--out", str(out)]) == 0
    ct = read_volume(out)
    assert ct.shape == mask.shape
    np.testing.assert_array_equal(ct.affine, mask.affine)
    # Without a mask the demo model uses the grid it was trained on (its card), not 256³.
    plan = prepare_generation(GenerateRequest(model="demo")).plan
    assert plan.size == (128, 96, 32) and plan.spacing == (3.0, 3.0, 3.0)


def test_ddpm_anatomy_looks_in_the_database_the_download_writes(tiny_weights, tmp_path, monkeypatch):
    from maisicore.anatomy.maskdb import default_mask_database
    from maisicore.models.download import OFFICIAL_MODELS

    home = tmp_path / "home"
    monkeypatch.setenv("MAISI_HOME", str(home))
    for model in ("rflow-ct", "ddpm-ct"):  # what `weights download MODEL --include-datasets` writes
        index, folder = default_mask_database(model)
        downloaded = {home / d.repo_path for d in OFFICIAL_MODELS[model].datasets}
        unpacked = {home / d.unpacked_folder for d in OFFICIAL_MODELS[model].datasets if d.unpack}
        assert index in downloaded and folder in unpacked
    index, folder = default_mask_database("ddpm-ct")
    assert index.name == "candidate_masks_flexible_size_and_spacing_3000.json"
    labels = np.zeros((64, 64, 32), np.int16)
    labels[8:56, 8:56, 2:30] = 200
    labels[20:40, 20:40, 8:20] = 1
    (folder / "sub").mkdir(parents=True)
    write_volume(folder / "sub" / "mask_7.nii.gz", Volume(labels, np.diag([6.0, 6.0, 3.0, 1.0])))
    index.write_text(json.dumps([{"pseudo_label_filename": "sub/mask_7.nii.gz", "label_list": [1, 200],
                                  "dim": [64, 64, 32], "spacing": [6.0, 6.0, 3.0],
                                  "top_region_index": [0, 0, 1, 0], "bottom_region_index": [0, 0, 1, 0]}]))
    said = []
    prepared = prepare_generation(GenerateRequest(model="ddpm-ct", weights_dir=str(tiny_weights["ddpm-ct"]),
                                                  anatomy=["liver"], size=[64, 64, 32], spacing=[6.0, 6.0, 3.0],
                                                  allow_any_size=True), log=said.append)
    assert said == ["mask from database: mask_7.nii.gz"]
    assert prepared.plan.body_region == ("abdomen", "abdomen") and (prepared.plan.labels == 1).sum() > 0
    index.unlink()
    with pytest.raises(InputError, match="weights download ddpm-ct --include-datasets"):
        prepare_generation(GenerateRequest(model="ddpm-ct", weights_dir=str(tiny_weights["ddpm-ct"]),
                                           anatomy=["liver"], allow_any_size=True))


@pytest.mark.parametrize("model", ["rflow-ct", "ddpm-ct"])
def test_training_and_inference_build_the_same_conditioning(model):
    from maisicore.models.presets import get_preset
    from maisicore.training.config import load_config
    from maisicore.training.data import Sample
    from maisicore.training.datalist import Case
    from maisicore.training.stages import ControlNetStage

    preset = get_preset(model, "tiny")
    labels = np.zeros((64, 64, 32), np.int64)
    labels[10:50, 10:50, 4:28] = 200
    labels[20:40, 20:40, 8:20] = 1
    labels[30:36, 30:36, 10:14] = 26
    plan = plan_generation(preset, mask=Volume(labels, np.diag([2.0, 1.5, 4.0, 1.0])), allow_any_size=True)
    unet_kwargs, condition = plan_conditions(preset, plan, torch.device("cpu"), torch.float32)
    # A training sample of the same case (spacings that float16 holds exactly: the rounding that
    # inference does, as the reference, changes nothing for them).
    case = Case(None, None, None, (64, 64, 32), plan.spacing, "ct", plan.body_region, 0)
    sample = Sample(case, labels=torch.from_numpy(labels)[None], generator=torch.Generator().manual_seed(0))
    stage = ControlNetStage.__new__(ControlNetStage)  # the conditioning methods need no networks
    stage.preset, stage.device = preset, torch.device("cpu")
    stage.config = load_config("controlnet", None)
    training = stage.conditions([sample], train=False)
    assert set(training) == set(unet_kwargs)
    for name, tensor in unet_kwargs.items():
        assert torch.equal(training[name], tensor), name
    from maisicore.diffusion.conditioning import controlnet_condition

    assert torch.equal(controlnet_condition(torch.stack([sample.labels]), preset), condition)
    assert condition.shape == (1, 8, 64, 64, 32) and int(condition[0, 1].sum()) == int((labels & 2 > 0).sum())


def test_request_json_round_trip_and_refusals():
    request = GenerateRequest(model="demo", mask="m.nii.gz", size=[64, 64, 32], spacing=[3, 3, 3], seed=7)
    assert request_from_dict(json.loads(request.to_json())) == GenerateRequest(
        model="demo", mask="m.nii.gz", size=[64, 64, 32], spacing=[3.0, 3.0, 3.0], seed=7)
    inpaint = InpaintRequest(image="ct.nii.gz", tumor_type="hepatic tumor", tumor_center=[1, 2, 3], tumor_diameter=20)
    assert request_from_dict(inpaint.to_dict()) == inpaint
    cases = {
        "kind": ({"kind": "segment"}, "\"kind\" 'segment' must be one of generate, inpaint, weights"),
        "unknown key": ({"kind": "generate", "sizes": [1, 2, 3]}, "unknown key 'sizes' for a generate request"),
        "type": ({"kind": "generate", "seed": "7"}, "'seed' must be an integer"),
        "list type": ({"kind": "generate", "size": [64, 64.5, 32]}, "'size' must be a list of int values"),
    }
    for data, message in cases.values():
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            request_from_dict(data)
    checks = {
        "seed range": (GenerateRequest(seed=2**63), r"from 0 to 2\^63-1"),
        "spacing nan": (GenerateRequest(spacing=[float("nan"), 1.0, 1.0]), "positive finite"),
        "anatomy and mask": (GenerateRequest(mask="m.nii.gz", anatomy=["liver"]), "leave out --mask"),
        "fit without mask": (GenerateRequest(fit="always"), "--fit-grid needs --mask"),
        "labels without mask": (GenerateRequest(label_out="l.nii.gz"), "--label-out writes the labels of a mask"),
        "tumour twice": (InpaintRequest(image="a", tumor_type="lung tumor", tumor_mask="m", tumor_center=[0, 0, 0],
                                        tumor_diameter=3.0), "give either --tumor-mask"),
    }
    for request, message in checks.values():
        with pytest.raises(InputError, match=message):
            request.check()
