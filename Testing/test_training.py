"""Training on the real TotalSegmentator CT with tiny networks: datalists, cached latents, the three
stages (losses fall on fixed batches), torchrun equivalence, SIGKILL + resume, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_maisi_in_process
from maisicore.io.geometry import Volume
from maisicore.io.volumes import read_volume, write_volume
from maisicore.training.run import read_metrics

SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _env(**extra) -> dict:
    return {**os.environ, **SINGLE_THREAD, **extra}


def _maisi(*args, timeout=600, env=None):
    """The real `maisi` program in a child process, single-threaded (training runs)."""
    return subprocess.run([sys.executable, "-m", "maisicore", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env or _env())


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("unet_state_dict") or checkpoint.get("controlnet_state_dict") or checkpoint
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def _val(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records if key in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory, real_data, converted_labels, training_start_weights):
    """The real CT (full and 30-slice crop with its converted TotalSegmentator labels) as datalists
    and as latents of the tiny VAE (prepared by `maisi prepare` in this process)."""
    root = tmp_path_factory.mktemp("train-data")
    (root / "images").mkdir()
    shutil.copy(real_data / "example_ct.nii.gz", root / "images" / "example_ct.nii.gz")
    (root / "sm" / "images").mkdir(parents=True)
    (root / "sm" / "labels").mkdir()
    shutil.copy(real_data / "example_ct_sm.nii.gz", root / "sm" / "images" / "case.nii.gz")
    shutil.copy(converted_labels[0], root / "sm" / "labels" / "case.nii.gz")  # `maisi labels convert` of the crop
    for args in (["--images", root / "images", "--out", root / "ct.json"],
                 ["--images", root / "sm" / "images", "--labels", root / "sm" / "labels", "--out", root / "sm.json"]):
        result = run_maisi_in_process("prepare", *args)
        assert result.returncode == 0, result.stderr
    weights = training_start_weights["rflow-ct"]
    result = run_maisi_in_process("prepare", "latents", "--datalist", root / "sm.json",
                                  "--weights", weights / "models" / "autoencoder_v1.pt", "--out-dir", root / "latents",
                                  "--out", root / "sm_latents.json", "--round-to", 32, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return {"root": root, "ct": root / "ct.json", "sm": root / "sm.json", "latents": root / "sm_latents.json",
            "weights": weights, "ddpm_weights": training_start_weights["ddpm-ct"]}


def test_prepare_records_real_geometry_and_region(data):
    entries = json.loads(data["sm"].read_text())["training"]
    assert len(entries) == 1
    entry = entries[0]
    assert entry["dim"] == [122, 101, 30] and entry["spacing"] == [3.0, 3.0, 3.0]
    assert entry["body_region"] == ["chest", "abdomen"] and entry["label"] == "sm/labels/case.nii.gz"


def test_prepare_reports_problems_without_stopping(data, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    shutil.copy(data["root"] / "sm" / "images" / "case.nii.gz", tmp_path / "images" / "good.nii.gz")
    shutil.copy(data["root"] / "sm" / "labels" / "case.nii.gz", tmp_path / "labels" / "good.nii.gz")
    shutil.copy(data["root"] / "sm" / "images" / "case.nii.gz", tmp_path / "images" / "shifted.nii.gz")
    labels = read_volume(data["root"] / "sm" / "labels" / "case.nii.gz")
    write_volume(tmp_path / "labels" / "shifted.nii.gz", Volume(labels.array[:, :, :20], labels.affine))
    (tmp_path / "images" / "broken.nii.gz").write_bytes(b"not a nifti file")
    result = run_maisi_in_process("prepare", "--images", tmp_path / "images", "--labels", tmp_path / "labels",
                                  "--out", tmp_path / "dl.json")
    assert result.returncode == 0, result.stderr
    listing = json.loads((tmp_path / "dl.json").read_text())
    assert [e["image"] for e in listing["training"]] == ["images/good.nii.gz"]
    reasons = {Path(p["file"]).name: p["reason"] for p in listing["problems"]}
    assert set(reasons) == {"broken.nii.gz", "shifted.nii.gz"}
    assert "not on the image's grid" in reasons["shifted.nii.gz"]


def test_latents_are_cached_with_labels_on_their_grid(data):
    entry = json.loads(data["latents"].read_text())["training"][0]
    root = data["latents"].parent
    import nibabel as nib  # latents are 4-channel NIfTI

    array = np.asanyarray(nib.load(root / entry["latent"]).dataobj)
    labels = read_volume(root / entry["label"])
    assert entry["dim"] == [128, 96, 32] and array.shape == (32, 24, 8, 4)
    assert labels.shape == (128, 96, 32)
    assert set(np.unique(labels.array)) >= {0, 1, 3, 200}  # liver, spleen, body kept by nearest resizing
    sidecar = json.loads((root / f"{entry['latent']}.json").read_text())
    assert sidecar["dim"] == [128, 96, 32]
    again = run_maisi_in_process("prepare", "latents", "--datalist", data["sm"], "--weights", data["weights"],
                                 "--out-dir", root / "latents", "--out", root / "again.json", "--round-to", 32,
                                 "--device", "cpu")
    assert again.returncode == 0 and "already encoded, skipped" in again.stdout


def vae_run_args(data) -> list:
    """`maisi train vae` of 8 steps on the real CT, checkpointed every 2 steps (without --out)."""
    return ["train", "vae", "--datalist", data["ct"], "--width", "tiny", "--init", data["weights"], "--patch-size", 32, 32, 32,
            "--max-steps", 8, "--checkpoint-every", 2, "--validate-every", 4, "--lr", 1e-3, "--device", "cpu"]


@pytest.fixture(scope="module")
def stage_runs(request, data, tmp_path_factory):
    """The loss-falls runs of the three stages, started together in child processes two at a time
    (each child is single-threaded, so two use both cores of a small machine): {name: future of
    (CompletedProcess, run folder)}. Only the runs of the tests selected in this session start."""
    root = tmp_path_factory.mktemp("stage-runs")

    def vae():  # also the uninterrupted run that the SIGKILL test compares with
        run = root / "vae"
        return _maisi(*vae_run_args(data), "--out", run), run

    def diffusion(model):
        run = root / f"diffusion-{model}"
        weights = data["weights"] if model == "rflow-ct" else data["ddpm_weights"]
        return _maisi("train", "diffusion", "--datalist", data["latents"], "--out", run, "--model", model,
                      "--width", "tiny", "--init", weights, "--max-steps", 6, "--validate-every", 3, "--batch-size", 1,
                      "--lr", 1e-3, "--device", "cpu"), run

    def controlnet():  # on a diffusion model trained for 2 steps: (base result, result or None, run)
        diffusion = root / "controlnet-base"
        base = _maisi("train", "diffusion", "--datalist", data["latents"], "--out", diffusion, "--width", "tiny",
                      "--init", data["weights"], "--max-steps", 2, "--batch-size", 1, "--lr", 1e-3, "--device", "cpu")
        if base.returncode != 0:
            return base, None, None
        run = root / "controlnet"
        return base, _maisi("train", "controlnet", "--datalist", data["latents"], "--out", run, "--width", "tiny",
                            "--init", diffusion / "weights", "--max-steps", 6, "--validate-every", 3, "--lr", 1e-3,
                            "--weighted-labels", 1, "--label-weight", 10, "--device", "cpu"), run

    wanted = set()
    for item in request.session.items:
        name = getattr(item, "originalname", item.name)
        if name == "test_diffusion_loss_falls_on_a_fixed_batch":
            wanted.add(f"diffusion-{item.callspec.params['model']}")
        elif name == "test_controlnet_loss_falls_with_weighted_label":
            wanted.add("controlnet")
        elif name in ("test_vae_validation_l1_falls_and_weights_load_in_generate",
                      "test_sigkill_then_resume_gives_the_uninterrupted_weights"):
            wanted.add("vae")
    jobs = {"controlnet": controlnet, "vae": vae,  # the longest first
            "diffusion-rflow-ct": lambda: diffusion("rflow-ct"), "diffusion-ddpm-ct": lambda: diffusion("ddpm-ct")}
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {name: pool.submit(job) for name, job in jobs.items() if name in wanted}


@pytest.mark.slow
def test_vae_validation_l1_falls_and_weights_load_in_generate(stage_runs, data, tmp_path):
    result, run = stage_runs["vae"].result()
    assert result.returncode == 0, result.stderr
    assert "perceptual loss OFF" in result.stdout
    curve = _val(read_metrics(run / "metrics.jsonl"), "val_l1")
    assert len(curve) == 3 and curve[-1] < 0.85 * curve[0], curve
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9)) and all(r["lr"] == 1e-3 for r in records)
    out = tmp_path / "ct.nii.gz"
    generated = run_maisi_in_process("generate", "--model", run / "weights", "--size", 64, 64, 64,
                                     "--spacing", 4, 4, 4, "--allow-any-size", "--steps", 2, "--device", "cpu",
                                     "--out", out)
    assert generated.returncode == 0, generated.stderr
    trained = _tensors(run / "weights" / "models" / "autoencoder_v1.pt")
    start = _tensors(data["weights"] / "models" / "autoencoder_v1.pt")
    assert not all(torch.equal(trained[k], start[k]) for k in start)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["rflow-ct", "ddpm-ct"])
def test_diffusion_loss_falls_on_a_fixed_batch(stage_runs, data, model):
    result, run = stage_runs[f"diffusion-{model}"].result()
    assert result.returncode == 0, result.stderr
    curve = _val(read_metrics(run / "metrics.jsonl"), "val_loss")
    assert len(curve) == 3 and curve[-1] < curve[0], curve
    checkpoint = torch.load(run / "weights" / "models" / f"diff_unet_3d_{model}.pt", weights_only=True)
    latent = np.asanyarray(__import__("nibabel").load(data["latents"].parent / "latents" / "case_emb.nii.gz").dataobj)
    assert float(checkpoint["scale_factor"]) == pytest.approx(1 / latent.std(ddof=1), rel=1e-4)


@pytest.mark.slow
def test_controlnet_loss_falls_with_weighted_label(stage_runs):
    base, result, run = stage_runs["controlnet"].result()
    assert base.returncode == 0, base.stderr
    assert result.returncode == 0, result.stderr
    diffusion = run.parent / "controlnet-base"
    curve = _val(read_metrics(run / "metrics.jsonl"), "val_loss")
    assert len(curve) == 3 and curve[-1] < curve[0], curve
    # the frozen UNet is exported unchanged, the ControlNet changed
    unet_before = _tensors(diffusion / "weights" / "models" / "diff_unet_3d_rflow-ct.pt")
    unet_after = _tensors(run / "weights" / "models" / "diff_unet_3d_rflow-ct.pt")
    assert all(torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    cn_before = _tensors(diffusion / "weights" / "models" / "controlnet_3d_rflow-ct.pt")
    cn_after = _tensors(run / "weights" / "models" / "controlnet_3d_rflow-ct.pt")
    assert not all(torch.equal(cn_before[k], cn_after[k]) for k in cn_before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vae", "diffusion"])
def test_two_processes_equal_one_process_with_twice_the_batch(data, tmp_path, stage):
    datalist = data["ct"] if stage == "vae" else data["latents"]
    common = ["train", stage, "--datalist", datalist, "--width", "tiny", "--init", data["weights"], "--max-steps", 3,
              "--lr", 1e-3, "--device", "cpu", "--validate-every", 100]
    if stage == "vae":
        common += ["--patch-size", 32, 32, 32]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), "-m", "maisicore"]
    with ThreadPoolExecutor(max_workers=1) as pool:  # the single process (this one) runs beside the two
        single = pool.submit(run_maisi_in_process, *common, "--batch-size", 2, "--out", tmp_path / "one")
        double = subprocess.run([*torchrun, *map(str, common), "--batch-size", "1", "--out", str(tmp_path / "two")],
                                capture_output=True, text=True, timeout=600, env=_env())
        single = single.result()
    assert single.returncode == 0, single.stderr
    assert double.returncode == 0, double.stderr[-3000:]
    name = "autoencoder_v1.pt" if stage == "vae" else "diff_unet_3d_rflow-ct.pt"
    one, two = (_tensors(tmp_path / run / "weights" / "models" / name) for run in ("one", "two"))
    start = _tensors(data["weights"] / "models" / name)
    assert one.keys() == two.keys()
    assert max(float((one[k].float() - two[k].float()).abs().max()) for k in one) <= 1e-5
    assert max(float((one[k].float() - start[k].float()).abs().max()) for k in one) > 1e-4  # it did train
    records = read_metrics(tmp_path / "two" / "metrics.jsonl")  # written once, by rank 0
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_weights(stage_runs, data, tmp_path):
    args = vae_run_args(data)
    run = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "maisicore", *map(str, args), "--out", str(run)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        steps = [r["step"] for r in read_metrics(metrics) if "loss" in r] if metrics.is_file() else []
        if steps and steps[-1] >= 5:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    whole, whole_run = stage_runs["vae"].result()  # the same command, not interrupted
    assert whole.returncode == 0, whole.stderr
    assert process.returncode == -signal.SIGKILL
    state = torch.load(run / "checkpoint" / "last.pt", weights_only=True)  # complete, loadable
    assert state["step"] in (4, 6)
    assert [p.name for p in (run / "checkpoint").iterdir() if not p.name.startswith(".")] == ["last.pt"]

    resumed = _maisi(*args, "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {run / 'checkpoint' / 'last.pt'} at step {state['step']}" in resumed.stdout
    for name in ("autoencoder_v1.pt",):
        a, b = _tensors(whole_run / "weights" / "models" / name), _tensors(run / "weights" / "models" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    final_a = torch.load(whole_run / "checkpoint" / "last.pt", weights_only=True)
    final_b = torch.load(run / "checkpoint" / "last.pt", weights_only=True)
    for key in final_a["modules"]["discriminator"]:
        assert torch.equal(final_a["modules"]["discriminator"][key], final_b["modules"]["discriminator"][key])
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9))  # lines after the checkpoint were replaced, none doubled


def _bad(tmp_path, *args):
    run = tmp_path / "run"
    result = run_maisi_in_process("train", *args, "--out", run, "--width", "tiny", "--max-steps", 1, "--device", "cpu")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maisi: error: ") and "Traceback" not in result.stderr
    assert not run.exists()  # refused before training started: nothing written
    return lines[0]


def test_refuses_a_datalist_naming_a_missing_file(data, tmp_path):
    listing = json.loads(data["ct"].read_text())
    listing["training"][0]["image"] = "images/missing.nii.gz"
    bad = data["ct"].parent / "missing_file.json"
    bad.write_text(json.dumps(listing))
    assert "does not exist" in _bad(tmp_path, "vae", "--datalist", bad) and "missing.nii.gz" in _bad(tmp_path, "vae", "--datalist", bad)


def test_refuses_labels_of_another_shape(data, tmp_path):
    labels = read_volume(data["root"] / "sm" / "labels" / "case.nii.gz")
    write_volume(data["root"] / "short_labels.nii.gz", Volume(labels.array[:, :, :20], labels.affine))
    listing = json.loads(data["sm"].read_text())
    listing["training"][0]["label"] = "short_labels.nii.gz"
    bad = data["root"] / "short.json"
    bad.write_text(json.dumps(listing))
    message = _bad(tmp_path, "vae", "--datalist", bad)
    assert "has shape (122, 101, 20), its image" in message and "(122, 101, 30)" in message


def test_refuses_a_config_with_an_unknown_key(data, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"autoencoder_train": {"batch_size": 1, "learning_rate_typo": 0.1}}))
    assert "unknown key 'learning_rate_typo'" in _bad(tmp_path, "vae", "--datalist", data["ct"], "--config", config)


def test_accepts_the_reference_config_files(reference_dir, data, tmp_path):
    from maisicore.training.config import load_config

    vae = load_config("vae", reference_dir / "config_maisi_vae_train.json")
    assert (vae.lr, vae.batch_size, vae.patch_size, vae.kl_weight, vae.adv_weight) == (1e-4, 1, (64, 64, 64), 1e-7, 0.1)
    diffusion = load_config("diffusion", reference_dir / "config_maisi_diff_model_rflow-ct.json", max_steps=5)
    assert (diffusion.lr, diffusion.batch_size, diffusion.n_epochs, diffusion.max_steps) == (1e-5, 2, 1000, 5)
    controlnet = load_config("controlnet", reference_dir / "config_maisi_controlnet_train_rflow-ct.json")
    assert controlnet.weighted_loss_label == (23,) and controlnet.weighted_loss == 100
    assert "use_region_contrasive_loss" in controlnet.ignored


@pytest.mark.slow
def test_resume_needs_a_checkpoint_and_a_run_is_never_overwritten(data, tmp_path):
    assert "no checkpoint" in _bad(tmp_path, "vae", "--datalist", data["ct"], "--resume")
    run = tmp_path / "done"
    assert "at least 32 voxels" in _bad(tmp_path, "vae", "--datalist", data["ct"], "--patch-size", 16, 16, 16)
    first = run_maisi_in_process("train", "vae", "--datalist", data["ct"], "--out", run, "--width", "tiny",
                                 "--patch-size", 32, 32, 32, "--max-steps", 1, "--device", "cpu")
    assert first.returncode == 0, first.stderr
    again = run_maisi_in_process("train", "vae", "--datalist", data["ct"], "--out", run, "--width", "tiny",
                                 "--max-steps", 1, "--device", "cpu")
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_bone_weighted_l1_weighs_the_voxels_at_or_above_the_threshold():
    from maisicore.training.stages import hu_threshold_unit, weighted_l1

    rng = np.random.default_rng(0)
    image = rng.random((1, 1, 8, 8, 8)).astype(np.float32)
    reconstruction = rng.random((1, 1, 8, 8, 8)).astype(np.float32)
    threshold = hu_threshold_unit(150.0)
    assert threshold == pytest.approx(0.575)
    expected = np.mean(np.abs(reconstruction - image) * np.where(image >= threshold, 7.0, 1.0))
    got = weighted_l1(torch.from_numpy(reconstruction), torch.from_numpy(image), 7.0, threshold)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    plain = weighted_l1(torch.from_numpy(reconstruction), torch.from_numpy(image), 1.0, threshold)
    assert float(plain) == pytest.approx(float(np.mean(np.abs(reconstruction - image))), rel=1e-6)


@pytest.mark.slow
def test_decoder_only_bone_aware_run_keeps_the_encoder(data, tmp_path):
    run = tmp_path / "decoder"
    result = run_maisi_in_process("train", "vae", "--datalist", data["ct"], "--out", run, "--width", "tiny",
                                  "--init", data["weights"], "--patch-size", 32, 32, 32, "--max-steps", 2,
                                  "--validate-every", 2, "--lr", 1e-3, "--device", "cpu", "--train-decoder-only",
                                  "--bone-weight", 5, "--bone-threshold-hu", 150)
    assert result.returncode == 0, result.stderr
    assert "decoder only" in result.stdout and "voxels at or above 150 HU weigh 5" in result.stdout
    trained = _tensors(run / "weights" / "models" / "autoencoder_v1.pt")
    start = _tensors(data["weights"] / "models" / "autoencoder_v1.pt")
    encoder = [k for k in start if not k.startswith(("decoder.", "post_quant_conv."))]
    decoder = [k for k in start if k.startswith("decoder.")]
    assert encoder and decoder and "quant_conv_mu.conv.weight" in encoder
    assert all(torch.equal(trained[k], start[k]) for k in encoder)  # same encoder: same latents
    assert not all(torch.equal(trained[k], start[k]) for k in decoder)
    records = read_metrics(run / "metrics.jsonl")
    assert len(_val(records, "val_bone_l1")) == 2 and all(np.isfinite(_val(records, "val_bone_l1")))
    assert all(r["recon_weighted"] >= r["recon_l1"] for r in records if "loss" in r)


def test_refuses_bad_bone_aware_settings(data, tmp_path):
    assert "needs --init" in _bad(tmp_path, "vae", "--datalist", data["ct"], "--train-decoder-only")
    assert "--bone-weight 0: must be a positive finite number" in _bad(
        tmp_path, "vae", "--datalist", data["ct"], "--bone-weight", 0)
    assert "between -1000 and 1000 HU" in _bad(tmp_path, "vae", "--datalist", data["ct"], "--bone-threshold-hu", 1500)
    assert "are VAE settings" in _bad(tmp_path, "diffusion", "--datalist", data["latents"], "--bone-weight", 3)
    config = tmp_path / "bone.json"
    config.write_text(json.dumps({"bone_weight": "heavy"}))
    assert "bone_weight must be a finite number" in _bad(tmp_path, "vae", "--datalist", data["ct"], "--config", config)
