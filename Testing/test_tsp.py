"""Tensor splitting: the split decoder/encoder equal MONAI's unsplit networks; the planner's choices."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_maisi
from maisicore.models.networks import build_autoencoder
from maisicore.models.presets import get_preset
from maisicore.vae.tsp import decode_exact, decoder_graph, encode_exact, make_plan

TOLERANCE = 1e-4  # on the [0, 1] image scale


@pytest.fixture(scope="module")
def tiny_ae():
    torch.manual_seed(0)
    return build_autoencoder(get_preset("rflow-ct", "tiny"))


@pytest.fixture(scope="module")
def official_ae():
    torch.manual_seed(0)
    return build_autoencoder(get_preset("rflow-ct", "official"))


def _latent(shape, seed=1):
    return torch.randn((1, 4, *shape), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "shape,mode,slabs",
    [
        # sizes not divisible by the split counts
        pytest.param((13, 15, 17), "exact", (1, 3, 8), marks=pytest.mark.slow),
        # the other axis order: the long axis is the split one
        pytest.param((29, 9, 11), "exact", (2, 5), marks=pytest.mark.slow),
        ((5, 6, 7), "exact", (1, 2, 3, 4, 5, 6, 7, 8)),  # 20 output slices: 20 down to 3 slabs
        pytest.param((9, 7, 11), "bounded", (1, 4), marks=pytest.mark.slow),
        ((5, 6, 7), "bounded", (3, 8)),
    ],
)
def test_decode_equals_unsplit_any_size(tiny_ae, shape, mode, slabs):
    z = _latent(shape)
    with torch.no_grad():
        reference = tiny_ae.decode(z)
    for slab in slabs:  # output slices per slab: many split counts, uneven last slabs
        out = decode_exact(tiny_ae, z, mode=mode, slab=slab)
        assert out.shape == reference.shape
        assert (out - reference).abs().max().item() <= TOLERANCE, (slab, mode)


@pytest.mark.slow
def test_official_width_decode_and_encode_exact(official_ae):
    z = _latent((4, 4, 5))
    with torch.no_grad():
        reference = official_ae.decode(z)
    for mode in ("exact", "bounded"):
        out = decode_exact(official_ae, z, mode=mode, slab=3)
        assert (out - reference).abs().max().item() <= TOLERANCE
    image = torch.rand((1, 1, 16, 16, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mu, sigma = official_ae.encode(image)
    ours_mu, ours_sigma = encode_exact(official_ae, image, slab=2)
    assert (ours_mu - mu).abs().max().item() <= TOLERANCE
    assert (ours_sigma - sigma).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("mode", ["exact", pytest.param("bounded", marks=pytest.mark.slow)])
def test_encode_equals_unsplit(tiny_ae, mode):
    image = torch.rand((1, 1, 36, 44, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mu, sigma = tiny_ae.encode(image)
    for slab in (1, 4):
        ours_mu, ours_sigma = encode_exact(tiny_ae, image, mode=mode, slab=slab)
        assert (ours_mu - mu).abs().max().item() <= TOLERANCE
        assert (ours_sigma - sigma).abs().max().item() <= TOLERANCE


def test_planner_choices_and_refusal(official_ae):
    _, output = decoder_graph(official_ae, _latent((40, 40, 40)))
    roomy = make_plan(output, 64 * 2**30)
    assert roomy.mode == "exact" and roomy.convolution_passes == 1.0
    tight = make_plan(output, int(1.1 * 2**30))  # the lower levels layered, the top one streamed
    assert tight.mode == "partial" and tight.estimated_bytes <= 1.1 * 2**30
    assert 1.0 < tight.convolution_passes < 5
    assert roomy.estimated_bytes > tight.estimated_bytes
    # 256³ output in 2 GiB: only the latent level stored, everything above streamed.
    _, big = decoder_graph(official_ae, _latent((64, 64, 64)))
    tighter = make_plan(big, 2 * 2**30)
    assert tighter.mode == "bounded" and tighter.estimated_bytes <= 2 * 2**30
    assert tighter.convolution_passes > tight.convolution_passes
    assert make_plan(big, None, "exact").estimated_bytes > 4 * tighter.estimated_bytes
    # The bounded estimate does not grow with the volume the way the exact one does.
    _, small = decoder_graph(official_ae, _latent((24, 24, 24)))
    exact_small, exact_large = make_plan(small, None, "exact"), make_plan(output, None, "exact")
    bounded_small, bounded_large = make_plan(small, None, "bounded", 1), make_plan(output, None, "bounded", 1)
    assert exact_large.estimated_bytes / exact_small.estimated_bytes > 4
    assert bounded_large.estimated_bytes / bounded_small.estimated_bytes < 3
    with pytest.raises(MemoryError) as info:
        make_plan(output, 10 * 2**20)
    assert "more than the 0.01 GiB budget; raise --memory-budget" in str(info.value)


@pytest.mark.slow
def test_nothing_assumes_cuda(tiny_ae, monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA touched on a CPU run")

    for name in ("is_available", "mem_get_info", "memory_allocated", "empty_cache", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    z = _latent((7, 9, 5))
    # The split engine (an explicit mode: the default plan takes MONAI's whole-volume decode when it fits).
    assert decode_exact(tiny_ae, z, memory_budget_bytes=8 * 2**30, mode="exact").shape == (1, 1, 28, 36, 20)
    assert decode_exact(tiny_ae, z, mode="exact").shape == (1, 1, 28, 36, 20)
    mu, _ = encode_exact(tiny_ae, torch.rand(1, 1, 16, 16, 16))
    assert mu.shape == (1, 4, 4, 4, 4)
    from maisicore.vae.decode import decode_latents

    monkeypatch.undo()  # MONAI's own MAISI decoder (used by the sliding window) asks torch.cuda; it runs on CPU

    assert decode_latents(tiny_ae, z, 1.0, "sliding-window", window=(4, 4, 4), overlap=0.5).shape == (1, 1, 28, 36, 20)
    assert decode_exact(tiny_ae, z).shape == (1, 1, 28, 36, 20)  # the default plan: MONAI's whole-volume decode


@pytest.mark.slow
def test_sliding_window_shows_seams_exact_does_not(tiny_ae):
    from maisicore.vae.decode import decode_latents

    z = _latent((10, 10, 10), seed=4)
    with torch.no_grad():
        reference = torch.clip(tiny_ae.decode(z), 0, 1)
    exact = decode_latents(tiny_ae, z, 1.0, "exact")
    window = decode_latents(tiny_ae, z, 1.0, "sliding-window", window=(8, 8, 8), overlap=0.25)
    exact_error = (exact - reference).abs().max().item()
    window_error = (window - reference).abs().max().item()
    assert exact_error <= TOLERANCE
    assert window_error > 100 * max(exact_error, 1e-7)


@pytest.mark.slow
def test_vae_encode_decode_cli_on_real_ct(tiny_weights, real_data, tmp_path, maisi):
    from maisicore.pipelines.vae import latent_affine

    weights = tiny_weights["rflow-ct"] / "models" / "autoencoder_v1.pt"
    latent_path, ct_path = tmp_path / "latent.nii.gz", tmp_path / "decoded.nrrd"
    result = maisi("vae", "encode", "--weights", weights, "--image", real_data / "example_ct_sm.nii.gz",
                   "--device", "cpu", "--out", latent_path)
    assert result.returncode == 0, result.stderr
    assert "padded (122, 101, 30) to (124, 104, 32) with air" in result.stderr
    latent = nib.load(latent_path)
    assert latent.shape == (31, 26, 8, 4) and latent.get_data_dtype() == np.float32
    sidecar = json.loads((tmp_path / "latent.nii.gz.json").read_text())
    assert sidecar["dim"] == [124, 104, 32] and sidecar["spacing"] == [3.0, 3.0, 3.0] and sidecar["modality"] == "ct"
    ct = nib.load(real_data / "example_ct_sm.nii.gz")
    np.testing.assert_allclose(latent.affine, latent_affine(ct.affine))
    # The latent equals MONAI's unsplit encoder on the same preprocessing.
    from maisicore.pipelines.vae import load_autoencoder

    ae = load_autoencoder(weights, torch.device("cpu"))
    hu = np.asanyarray(ct.dataobj).astype(np.float32)
    unit = np.pad((np.clip(hu, -1000, 1000) + 1000) / 2000, [(0, 2), (0, 3), (0, 2)])
    with torch.no_grad():
        mu, _ = ae.encode(torch.from_numpy(unit)[None, None])
    assert np.abs(np.asanyarray(latent.dataobj) - mu[0].permute(1, 2, 3, 0).numpy()).max() <= TOLERANCE
    # Decode back in a fresh process (the memory budget counts what the process holds): the image
    # grid of the (padded) CT, exactly.
    result = run_maisi("vae", "decode", "--weights", weights, "--latent", latent_path, "--memory-budget", 8,
                       "--device", "cpu", "--out", ct_path)
    assert result.returncode == 0, result.stderr
    assert "whole-volume decode" in result.stderr  # it fits the 8 GB budget: the default plan takes it
    from maisicore.io.volumes import read_volume

    decoded = read_volume(ct_path)
    assert decoded.shape == (124, 104, 32) and decoded.array.dtype == np.int16
    np.testing.assert_allclose(decoded.affine, ct.affine, atol=1e-9)
    with torch.no_grad():
        expected = np.rint(torch.clip(ae.decode(mu), 0, 1)[0, 0].numpy() * 2000 - 1000)
    assert np.abs(decoded.array - expected).max() <= 1  # int16 rounding of equal floats


def test_vae_decode_refuses_a_budget_below_what_the_process_holds(tiny_weights, tmp_path, maisi):
    from maisicore.pipelines.vae import write_latent

    write_latent(tmp_path / "z.nii.gz", np.zeros((8, 8, 8, 4), np.float32), np.eye(4), {})
    result = maisi("vae", "decode", "--weights", tiny_weights["rflow-ct"] / "models" / "autoencoder_v1.pt",
                   "--latent", tmp_path / "z.nii.gz", "--memory-budget", 0.05, "--device", "cpu",
                   "--out", tmp_path / "ct.nii.gz")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("maisi: error: the process already holds")
    assert "raise --memory-budget" in result.stderr and not (tmp_path / "ct.nii.gz").exists()


@pytest.mark.slow
def test_generate_decodes_exactly_by_default(tiny_weights):
    from maisicore.models.weights import load_model
    from maisicore.pipelines.generate import generate, plan_generation

    model = load_model(get_preset("rflow-ct", "tiny"), tiny_weights["rflow-ct"])
    plan = plan_generation(model.preset, size=(64, 96, 32), spacing=(4, 4, 4), steps=3, allow_any_size=True)
    exact = generate(model, plan, seed=2).array.astype(int)
    plain = generate(model, plan, seed=2, decode="plain").array.astype(int)
    window = generate(model, plan, seed=2, decode="sliding-window").array.astype(int)
    assert np.abs(exact - plain).max() <= 1
    assert exact.shape == window.shape == (64, 96, 32)


def test_split_decode_over_several_devices_equals_one_device(tiny_ae):
    """``--devices``: each sweep's slabs cut into one run per device, run in threads, the GroupNorm
    statistics combined in slab order: the same result as one device. Two CPU "devices" take the
    multi-device code path (threads, one engine and weight copy each) on a machine without GPUs."""
    z = _latent((4, 5, 6), seed=5)  # 16 output slices: 8 slabs over 2 workers, 4 over 3 (1, 1, 2)
    with torch.no_grad():
        reference = tiny_ae.decode(z)
    for mode, slab, devices in (("exact", 2, ["cpu", "cpu"]), ("bounded", 4, ["cpu", "cpu", "cpu"])):
        one = decode_exact(tiny_ae, z, mode=mode, slab=slab)
        lines = []
        several = decode_exact(tiny_ae, z, mode=mode, slab=slab, devices=devices, log=lines.append)
        assert f"split decode: slabs of {slab} slices" in lines[0]
        assert lines[0].endswith(f"slabs spread over {len(devices)} workers ({', '.join(devices)})")
        # Measured: bit-identical (max |Δ| 0), each slab's convolutions see the same inputs.
        assert (several - one).abs().max().item() <= 1e-5, mode
        assert (several - reference).abs().max().item() <= TOLERANCE
    # When the whole-volume decode fits, it runs on the first device alone (the fastest exact decode).
    lines = []
    whole = decode_exact(tiny_ae, z, devices=["cpu", "cpu"], log=lines.append)
    assert torch.equal(whole, reference) and lines[0].endswith("on cpu (the first of --devices)")
    # The planner counts each worker's slab temporaries and inputs kept to the sweep's end.
    _, output = decoder_graph(tiny_ae, z)
    assert make_plan(output, None, "bounded", 4, workers=2).estimated_bytes > make_plan(output, None, "bounded", 4).estimated_bytes
