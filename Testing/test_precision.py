"""``--precision`` and ``--reference-numerics`` (``maisicore.precision``): the rule per device (CUDA
decisions checked without a GPU), the refusals, what bfloat16 changes on the demo model, that fp32 is
today's numbers byte for byte, and that ``--reference-numerics`` through the request path gives
NVIDIA's latents bit for bit on the CPU (``nvidia_reference`` says how the reference is run)."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import body_mask_from_real_data
from maisicore.errors import InputError
from maisicore.io.geometry import Volume
from maisicore.io.volumes import read_volume, write_volume
from maisicore.precision import (
    choose_precision,
    cpu_bf16_native,
    cpu_flags,
    numerics_for,
    reference_numerics_for,
    resolve_precision,
)

CPUINFO_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
CPUINFO_BF16 = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16\n"


# ---- the rule -----------------------------------------------------------------------------------


def test_choose_precision_per_device(monkeypatch):
    monkeypatch.delenv("MAISI_CPU_BF16", raising=False)
    assert cpu_bf16_native(cpu_flags(CPUINFO_AVX2)) is None
    assert cpu_bf16_native(cpu_flags(CPUINFO_BF16)) == "avx512_bf16"
    # auto
    assert choose_precision("auto", "cpu", None).name == "fp32"
    assert choose_precision("auto", "cpu", "avx512_bf16").name == "bf16"
    cuda = choose_precision("auto", "cuda")  # no GPU needed: a pure function of the device type
    assert cuda.name == "fp16" and cuda.attention == "sdpa" and "float16" in cuda.describe()
    # asked for
    assert choose_precision("fp32", "cuda").name == "fp32"
    assert choose_precision("bf16", "cuda").name == "bf16"
    slow = choose_precision("bf16", "cpu", None)
    assert slow.name == "bf16" and "no native bfloat16" in slow.reason
    with pytest.raises(InputError, match="CUDA's float16"):
        choose_precision("fp16", "cpu", "avx512_bf16")
    # --reference-numerics: the reference's precision and MONAI's attention
    ref_cpu, ref_cuda = choose_precision("auto", "cpu", "amx_bf16", True), choose_precision("auto", "cuda", None, True)
    assert (ref_cpu.name, ref_cpu.attention) == ("fp32", "monai")
    assert (ref_cuda.name, ref_cuda.attention) == ("fp16", "monai")
    with pytest.raises(InputError, match="leave out --precision bf16"):
        choose_precision("bf16", "cpu", None, True)
    with pytest.raises(InputError, match="choose one of auto, fp32, bf16, fp16"):
        choose_precision("fp8", "cpu")
    # this machine's flags decide auto (the override makes both answers testable anywhere)
    monkeypatch.setenv("MAISI_CPU_BF16", "0")
    assert resolve_precision("auto", torch.device("cpu")).name == "fp32"
    monkeypatch.setenv("MAISI_CPU_BF16", "1")
    assert resolve_precision("auto", "cpu").name == "bf16"


def test_numerics_per_stage_without_a_gpu():
    # CUDA fp16: exactly the path of every CUDA run before --precision (the reference's)
    fp16 = numerics_for(choose_precision("auto", "cuda"), "cuda")
    assert (fp16.loop_autocast, fp16.network_autocast, fp16.decode_conv, fp16.decode_autocast) == (
        "float16", None, "float32", "float16")
    assert fp16.float16_inputs and fp16.vae_norm_float16 and fp16.encode == "float32"
    assert reference_numerics_for("cuda").loop_autocast == "float16"
    # bf16 (CPU or CUDA): per-call network autocast, float32 loop and noise, bf16 decoder convolutions
    for device_type in ("cpu", "cuda"):
        bf16 = numerics_for(choose_precision("bf16", device_type, "avx512_bf16"), device_type)
        assert (bf16.loop_autocast, bf16.network_autocast, bf16.decode_conv, bf16.decode_autocast) == (
            None, "bfloat16", "bfloat16", "bfloat16")
        assert not bf16.float16_inputs and not bf16.vae_norm_float16 and bf16.encode == "float32"
    # fp32 anywhere: nothing reduced (on CUDA the VAE's float16 norm is switched off for the decode)
    for device_type in ("cpu", "cuda"):
        fp32 = numerics_for(choose_precision("fp32", device_type), device_type)
        assert (fp32.loop_autocast, fp32.network_autocast, fp32.decode_conv, fp32.decode_autocast) == (
            None, None, "float32", None)
        assert not fp32.vae_norm_float16
    assert reference_numerics_for("cpu") == numerics_for(choose_precision("auto", "cpu", None, True), "cpu")


# ---- refusals (one line, exit 2) ----------------------------------------------------------------


@pytest.mark.parametrize("args,words", [
    (("--precision", "fp16", "--device", "cpu"), "--precision fp16 is CUDA's float16"),
    (("--precision", "fp8"), "fp8"),
    (("--reference-numerics", "--precision", "bf16"), "leave out --precision bf16"),
])
def test_precision_refusals(maisi, tmp_path, tiny_weights, args, words):
    out = tmp_path / "ct.nii.gz"
    result = maisi("generate", "--model", "rflow-ct", "--weights-dir", tiny_weights["rflow-ct"], "--size", "32", "32",
                   "32", "--allow-any-size", "--steps", "1", "--device", "cpu", *args, "--out", out)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("usage")]
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert not out.exists()


def test_inpaint_and_vae_take_precision(maisi, tmp_path):
    result = maisi("inpaint", "--image", tmp_path / "none.nii.gz", "--tumor-type", "hepatic tumor", "--tumor-center",
                   "0", "0", "0", "--tumor-diameter", "10", "--reference-numerics", "--precision", "fp32",
                   "--device", "cpu", "--out", tmp_path / "o.nii.gz")
    assert result.returncode == 2 and "leave out --precision fp32" in result.stderr, result.stderr
    result = maisi("vae", "decode", "--weights", tmp_path / "ae.pt", "--latent", tmp_path / "z.nii.gz",
                   "--precision", "fp16", "--device", "cpu", "--out", tmp_path / "ct.nii.gz")
    assert result.returncode == 2 and "CUDA's float16" in result.stderr, result.stderr


# ---- the split decoder and the VAE norms ----------------------------------------------------------


def test_split_decoder_in_bfloat16(tiny_weights):
    """Convolutions in bfloat16 (weights cast once per engine), norms in float32: close to float32."""
    from maisicore.models.presets import get_preset
    from maisicore.models.weights import load_model
    from maisicore.vae.decode import decode_latents, vae_norms_for
    from maisicore.vae.tsp import Engine

    model = load_model(get_preset("rflow-ct", "tiny"), tiny_weights["rflow-ct"], "cpu")
    conv = model.autoencoder.post_quant_conv
    conv = conv if isinstance(conv, torch.nn.Conv3d) else next(m for m in conv.modules() if isinstance(m, torch.nn.Conv3d))
    engine = Engine("cpu", torch.device("cpu"), conv_dtype=torch.bfloat16)
    assert engine.parameters(conv)[0].dtype == torch.bfloat16 and engine.parameters(conv)[0] is engine.parameters(conv)[0]
    z = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    bf16 = numerics_for(choose_precision("bf16", "cpu"), "cpu")
    fp32 = numerics_for(choose_precision("fp32", "cpu"), "cpu")
    exact32 = decode_latents(model.autoencoder, z, 0.5, numerics=fp32)
    assert torch.equal(exact32, decode_latents(model.autoencoder, z, 0.5))  # fp32: today's numbers
    from maisicore.vae.tsp import decode_exact

    split32 = decode_exact(model.autoencoder, z / 0.5, mode="exact", numerics=fp32)
    split16 = decode_exact(model.autoencoder, z / 0.5, mode="exact", numerics=bf16)
    assert torch.equal(split32, decode_exact(model.autoencoder, z / 0.5, mode="exact"))
    assert split16.dtype == torch.float32 and not torch.equal(split16, split32)
    assert (split16 - split32).abs().max() < 0.05 * split32.abs().max()
    whole16 = decode_latents(model.autoencoder, z, 0.5, "plain", numerics=bf16)  # under CPU bfloat16 autocast
    assert not torch.equal(whole16, decode_latents(model.autoencoder, z, 0.5, "plain", numerics=fp32))
    # The VAE's float16 norm output (CUDA presets) only under the reference's float16 autocast
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D

    norms = [m for m in model.autoencoder.modules() if isinstance(m, MaisiGroupNorm3D)]
    for norm in norms:
        norm.norm_float16 = True
    try:
        with vae_norms_for(model.autoencoder, fp32):
            assert not any(n.norm_float16 for n in norms)
        assert all(n.norm_float16 for n in norms)
        with vae_norms_for(model.autoencoder, numerics_for(choose_precision("auto", "cuda"), "cuda")):
            assert all(n.norm_float16 for n in norms)
    finally:
        for norm in norms:
            norm.norm_float16 = False


def test_admission_counts_reduced_activations_at_two_bytes(tiny_weights):
    from maisicore.pipelines.admission import estimate_generation_memory
    from maisicore.pipelines.generate import prepare_generation
    from maisicore.pipelines.requests import GenerateRequest

    prepared = prepare_generation(GenerateRequest(model="rflow-ct", weights_dir=str(tiny_weights["rflow-ct"]),
                                                  size=[256, 256, 128], allow_any_size=True, dry_run=True))
    parts = {name: estimate_generation_memory(prepared, "cpu", 2**40, choose_precision(name, "cpu")).parts
             for name in ("fp32", "bf16")}
    from maisicore.pipelines.admission import DENOISE_FIXED_BYTES

    assert parts["bf16"]["denoise_activations"] - DENOISE_FIXED_BYTES == (
        parts["fp32"]["denoise_activations"] - DENOISE_FIXED_BYTES) // 2
    monai = estimate_generation_memory(prepared, "cpu", 2**40, choose_precision("auto", "cpu", None, True)).parts
    assert monai["attention"] >= parts["fp32"]["attention"]


def test_batch_precision_default_and_model_cache(tmp_path):
    from maisicore.pipelines.batch import read_manifest

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"model": "demo", "size": [64, 64, 32], "allow_any_size": True}) + "\n"
                        + json.dumps({"model": "demo", "size": [64, 64, 32], "allow_any_size": True,
                                      "precision": "fp32"}) + "\n"
                        + json.dumps({"model": "demo", "size": [64, 64, 32], "allow_any_size": True,
                                      "reference_numerics": True}) + "\n")
    items = read_manifest(manifest, 0, "bf16")
    assert [i.request["precision"] for i in items] == ["bf16", "fp32", "auto"]
    assert items[2].request["reference_numerics"] is True
    assert [i.request["precision"] for i in read_manifest(manifest)] == ["auto", "fp32", "auto"]
    with pytest.raises(InputError):
        read_manifest(manifest, 0, "fp64")
    # A worker keeps one loaded model per attention; the precision (autocast per call) is no part of the key.
    from maisicore.pipelines.batch import BatchWorker, WorkerConfig

    threads = torch.get_num_threads()
    worker = BatchWorker(WorkerConfig(str(tmp_path), device="cpu", threads=threads))  # keeps this process's threads
    fp32, bf16, reference = (item.build("cpu") for item in read_manifest(manifest, 0, "bf16"))
    assert worker.model(fp32) is worker.model(bf16) and worker.model(fp32).attention == "sdpa"
    assert worker.model(reference) is not worker.model(fp32) and worker.model(reference).attention == "monai"
    assert len(worker._models) == 2


# ---- the demo model: bfloat16 against float32; fp32 is today's output ----------------------------


def _run(request, monkeypatch=None):
    from maisicore.pipelines.runner import Report, run_request

    lines = []

    class Lines(Report):
        def info(self, message):
            lines.append(message)

    summary = run_request(request, Lines())
    return summary, lines


def test_demo_bf16_against_fp32(real_data, tmp_path):
    from maisicore.pipelines.requests import GenerateRequest

    labels, affine = body_mask_from_real_data(real_data)
    mask = tmp_path / "labels.nii.gz"
    write_volume(mask, Volume(labels, affine))
    outputs = {}
    for name in ("fp32", "bf16", "auto"):
        out = tmp_path / f"{name}.nii.gz"
        summary, lines = _run(GenerateRequest(model="demo", mask=str(mask), seed=0, steps=10, device="cpu",
                                              precision=name, out=str(out)))
        assert summary.details["precision"] == (name if name != "auto" else resolve_precision("auto", "cpu").name)
        assert any(line.startswith(f"precision {summary.details['precision']} (") for line in lines), lines
        outputs[name] = read_volume(out).array
    body = labels > 0
    delta = np.abs(outputs["bf16"].astype(np.float64) - outputs["fp32"])[body]
    print(f"demo model, bf16 vs fp32 inside the body: mean |ΔHU| {delta.mean():.2f}, max {delta.max():.0f}, "
          f"{body.sum()} voxels")
    assert delta.max() > 0
    assert delta.mean() <= 10.0
    if resolve_precision("auto", "cpu").name == "fp32":  # this machine: no native bfloat16
        assert np.array_equal(outputs["auto"], outputs["fp32"])

    # fp32 through the request is today's code path byte for byte (the pipeline with no numerics)
    from maisicore.models.weights import demo_weights_dir, load_model
    from maisicore.pipelines.generate import generate, prepare_generation

    prepared = prepare_generation(GenerateRequest(model="demo", mask=str(mask), steps=10))
    model = load_model(prepared.preset, demo_weights_dir(), "cpu")
    today = generate(model, prepared.plan, seed=0)
    assert np.array_equal(today.array, outputs["fp32"])


# ---- --reference-numerics: NVIDIA's latents, bit for bit, through the request path --------------


def _reference_scripts(tmp_path_factory):
    """NVIDIA's scripts as ``nvidia_reference`` finds them ($MAISI_REFERENCE_REPO, else
    ../shared/reference/nv-generate-ctmr, else the mirror); imported, never copied into maisicore."""
    import nvidia_reference

    return nvidia_reference.import_reference(tmp_path_factory.mktemp("nvidia"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference_scripts(tmp_path_factory)


def _mask() -> np.ndarray:
    labels = np.zeros((64, 64, 32), np.int16)
    labels[4:60, 4:60, :] = 200
    labels[10:34, 10:40, 4:20] = 1  # liver
    labels[38:54, 30:46, 8:24] = 14  # left kidney
    labels[36:58, 6:28, 16:32] = 28  # a lung lobe
    return labels


def _nvidia_model(preset, weights):
    """The networks as NVIDIA's code runs them on the CPU: MONAI's attention and MONAI's forward."""
    from maisicore.models.networks import configure_for_device
    from maisicore.models.weights import load_model

    model = load_model(preset, weights, "cpu", attention="monai")
    configure_for_device(model.diffusion_unet, preset.diffusion_unet, "cpu", "monai", forward="monai")
    configure_for_device(model.controlnet, preset.controlnet, "cpu", "monai", forward="monai")
    return model


def _ours(monkeypatch, tmp_path, request):
    """Latents of OUR request path (check → load → generate → decode → write), recorded at the decode."""
    import maisicore.pipelines.plan as generate_module  # where generate() finds latents_to_ct

    seen = []
    original = generate_module.latents_to_ct

    def recording(model, latents, *args, **kwargs):
        seen.append((latents.detach().clone(), model.attention))
        return original(model, latents, *args, **kwargs)

    monkeypatch.setattr(generate_module, "latents_to_ct", recording)
    summary, lines = _run(request)
    monkeypatch.setattr(generate_module, "latents_to_ct", original)
    assert len(seen) == 1 and Path(summary.files["ct"]).is_file()
    return seen[0][0], seen[0][1], lines


@pytest.mark.parametrize("model_name,with_mask,steps", [("rflow-ct", True, 3), ("rflow-ct", False, 3), ("ddpm-ct", True, 6)])
def test_reference_numerics_latents_equal_nvidias(reference, reference_dir, tiny_weights, tmp_path, monkeypatch,
                                                  model_name, with_mask, steps):
    from maisicore.models.presets import get_preset
    from maisicore.pipelines.requests import GenerateRequest
    from monai.bundle import ConfigParser

    preset = get_preset(model_name, "tiny")
    weights = tiny_weights[model_name]
    mask_path = tmp_path / "labels.nii.gz"
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    write_volume(mask_path, Volume(_mask(), affine))
    region = ["chest", "abdomen"] if model_name == "ddpm-ct" else None
    common = dict(model=model_name, weights_dir=str(weights), seed=7, steps=steps, device="cpu", allow_any_size=True,
                  body_region=region, **({"mask": str(mask_path)} if with_mask else {"size": [64, 64, 32],
                                                                                     "spacing": [4.0, 4.0, 4.0]}))
    ours, attention, lines = _ours(monkeypatch, tmp_path, GenerateRequest(out=str(tmp_path / "ref.nii.gz"),
                                                                          reference_numerics=True, **common))
    assert attention == "monai" and any("--reference-numerics" in line for line in lines), lines
    default, default_attention, _ = _ours(monkeypatch, tmp_path, GenerateRequest(out=str(tmp_path / "default.nii.gz"),
                                                                                 precision="fp32", **common))
    assert default_attention == "sdpa"

    # NVIDIA's loop on the same weights and noise
    model = _nvidia_model(preset, weights)
    config = "config_network_ddpm.json" if model_name == "ddpm-ct" else "config_network_rflow.json"
    spacing = torch.FloatTensor([4.0, 4.0, 4.0]).unsqueeze(0).half().float() * 1e2
    regions = {}
    if region:
        one_hot = {"head": 0, "chest": 1, "abdomen": 2, "lower": 3}
        regions = {f"{k}_region_index_tensor": torch.nn.functional.one_hot(torch.tensor([one_hot[r]]), 4).float() * 1e2
                   for k, r in zip(("top", "bottom"), region)}
    latent_shape = [4, 16, 16, 8]
    if with_mask:
        scheduler = ConfigParser(json.loads((reference_dir / config).read_text())).get_parsed_content("noise_scheduler")
        from nvidia_reference import capture_latents, cpu_noise

        seen = capture_latents(reference.utils_infer)
        cpu_noise(reference.utils_infer)
        cond = reference.utils.binarize_labels(torch.from_numpy(_mask().astype(np.int64))[None, None]).float()
        modality = {"modality_tensor": torch.tensor([1])} if preset.uses_modality else {}
        torch.manual_seed(7)
        reference.utils_infer.run_controlnet_conditioned_image_dm(
            model.autoencoder, model.diffusion_unet, model.controlnet, scheduler, model.scale_factor,
            torch.device("cpu"), cond, spacing, latent_shape, (64, 64, 32), 1.0, num_inference_steps=steps,
            **regions, **modality)
        nvidia = seen[-1]
    else:  # NVIDIA's image-only loop; its draw rounded to float16 as its CT path (initialize_noise_latents) rounds it
        from nvidia_reference import capture_latents

        args = Namespace(**json.loads((reference_dir / config).read_text()))
        args.diffusion_unet_inference = {"num_inference_steps": steps}
        args.cfg_guidance_scale = 0.0
        seen = capture_latents(reference.diff_model_infer)
        randn = torch.randn
        monkeypatch.setattr(torch, "randn", lambda *a, **k: randn(*a, **k).half().float())
        torch.manual_seed(7)
        try:
            import logging

            reference.diff_model_infer.run_inference(
                args, torch.device("cpu"), model.autoencoder, model.diffusion_unet, model.scale_factor,
                regions.get("top_region_index_tensor"), regions.get("bottom_region_index_tensor"), spacing,
                torch.tensor([1]), (64, 64, 32), 4, logging.getLogger("reference"))
        finally:
            monkeypatch.setattr(torch, "randn", randn)
        nvidia = seen[-1]
    assert ours.dtype == nvidia.dtype == torch.float32
    assert torch.equal(ours, nvidia), (ours - nvidia).abs().max().item()
    delta = (default - nvidia).abs().max().item()
    print(f"{model_name} {'mask' if with_mask else 'image only'}: default (SDPA, fp32) vs NVIDIA max |Δ| {delta:.2e}, "
          f"|latent| max {nvidia.abs().max().item():.2f}")
    assert delta < 1e-4


# ---- torch-free rule, Slicer ----------------------------------------------------------------------


def test_precision_rule_imports_without_torch():
    from test_slicer_imports import _heavy_modules_after

    assert _heavy_modules_after("import maisicore.precision; maisicore.precision.resolve_precision('auto', 'cpu')") == []


def test_slicer_reference_numerics_checkbox_reaches_the_request():
    import sys
    from xml.etree import ElementTree

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "MAISIGenerate"))
    from maisicore.pipelines.requests import GenerateRequest, InpaintRequest
    from MAISIGenerateLib.logic import _model_options
    from MAISIGenerateLib.parameters import RunOptions

    ui = Path(__file__).resolve().parent.parent / "MAISIGenerate" / "Resources" / "UI" / "MAISIGenerate.ui"
    box = next(w for w in ElementTree.parse(ui).getroot().iter("widget") if w.get("name") == "referenceNumericsCheckBox")
    assert box.get("class") == "QCheckBox"
    assert next(p for p in box.findall("property") if p.get("name") == "SlicerParameterName").findtext("string") == \
        "referenceNumerics"
    assert "referenceNumerics: bool = False" in (ui.parent.parent.parent / "MAISIGenerate.py").read_text()
    shared = _model_options(RunOptions(model="demo", reference_numerics=True))
    assert GenerateRequest(**shared).reference_numerics is True
    shared.pop("modality")
    assert InpaintRequest(image="ct.nrrd", tumor_type="hepatic tumor", **shared).reference_numerics is True
    assert _model_options(RunOptions())["reference_numerics"] is False


def test_gpu_check_precision_column(tiny_weights, monkeypatch):
    """benchmarks/gpu_check.py (run on a GPU only): its CPU-side logic, the precisions it times and its
    table, and one timing pass on the tiny networks."""
    import importlib.util

    from maisicore.models.presets import get_preset
    from maisicore.models.weights import load_model
    from maisicore.pipelines.generate import plan_generation

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setenv("MAISI_CPU_BF16", "0")
    choices, notes = gpu_check.runnable_precisions("cpu")
    assert [c.name for c in choices] == ["fp32", "bf16"]
    assert any(n.startswith("fp16 skipped") for n in notes) and any("emulated" in n for n in notes)
    assert [c.name for c in gpu_check.runnable_precisions("cuda")[0]] == ["fp32", "fp16", "bf16"]
    model = load_model(get_preset("rflow-ct", "tiny"), tiny_weights["rflow-ct"], "cpu")
    labels = _mask().astype(np.int64)
    plan = plan_generation(model.preset, mask=Volume(labels, np.diag([4.0, 4.0, 4.0, 1.0])), steps=1, allow_any_size=True)
    rows = [row for choice in choices for row in gpu_check.time_networks(model, plan, choice, repeats=1)]
    assert [(r["precision"], r["network"]) for r in rows] == [
        (p, n) for p in ("fp32", "bf16") for n in ("controlnet", "diffusion_unet", "vae_decoder")]
    assert all(r["seconds"] > 0 for r in rows)
    table = gpu_check.format_precision_table(rows)
    assert table.splitlines()[0].split() == ["network", "fp32", "bf16"] and "×)" in table
