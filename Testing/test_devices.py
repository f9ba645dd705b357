"""Networks configured for the device they run on: the decision is made from the target device
(so the CUDA settings are checked without a GPU), and the attention through
``scaled_dot_product_attention`` equals MONAI's own attention on the CPU."""

from __future__ import annotations

import pytest
import torch
from maisicore.models.networks import (
    build_autoencoder,
    build_controlnet,
    build_diffusion_unet,
    configure_for_device,
    device_settings,
    set_sdpa_attention,
)
from maisicore.models.presets import get_preset
from maisicore.models.weights import fill_zero_initialised, load_model


def _attention_flags(module):
    from monai.networks.blocks.selfattention import SABlock

    return [block.use_flash_attention for block in module.modules() if isinstance(block, SABlock)]


def _norm_float16_flags(module):
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D

    return [norm.norm_float16 for norm in module.modules() if isinstance(norm, MaisiGroupNorm3D)]


def test_cuda_target_gets_flash_attention_and_float16_norm():
    preset = get_preset("rflow-ct", "official")
    assert preset.diffusion_unet["use_flash_attention"] and preset.autoencoder["norm_float16"]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert device_settings(preset.diffusion_unet, cuda) == {"sdpa": True, "norm_float16": False}
    assert device_settings(preset.autoencoder, cuda) == {"sdpa": False, "norm_float16": True}
    assert device_settings(preset.autoencoder, cpu)["norm_float16"] is False
    assert device_settings(preset.diffusion_unet, cpu, attention="monai")["sdpa"] is False
    tiny = get_preset("rflow-ct", "tiny")
    unet = configure_for_device(build_diffusion_unet(tiny, "cpu", attention="monai"), tiny.diffusion_unet, cuda)
    flags = _attention_flags(unet)
    assert len(flags) == 11 and all(flags)  # 2 levels × 2 down, the middle, 2 levels × 3 up
    autoencoder = configure_for_device(build_autoencoder(tiny, "cpu"), tiny.autoencoder, cuda)
    assert _norm_float16_flags(autoencoder) and all(_norm_float16_flags(autoencoder))
    configure_for_device(autoencoder, tiny.autoencoder, cpu)
    assert not any(_norm_float16_flags(autoencoder))


def test_load_model_decides_from_the_target_device(tiny_weights):
    """The bug of issue 15: networks loaded on the CPU for a CUDA run lost flash attention and the
    float16 norm. ``move=False`` keeps them on the CPU, configured for CUDA."""
    preset = get_preset("rflow-ct", "tiny")
    model = load_model(preset, tiny_weights["rflow-ct"], torch.device("cuda"), move=False)
    assert model.device.type == "cuda"
    assert all(_attention_flags(model.diffusion_unet)) and all(_attention_flags(model.controlnet))
    assert _attention_flags(model.controlnet) and all(_norm_float16_flags(model.autoencoder))
    on_cpu = load_model(preset, tiny_weights["rflow-ct"], "cpu")
    assert all(_attention_flags(on_cpu.diffusion_unet)) and not any(_norm_float16_flags(on_cpu.autoencoder))
    monai = load_model(preset, tiny_weights["rflow-ct"], "cpu", attention="monai")
    assert not any(_attention_flags(monai.diffusion_unet)) and not any(_attention_flags(monai.controlnet))


@pytest.fixture(scope="module")
def official_unet_and_controlnet():
    """Official-width rflow-ct UNet and ControlNet, MONAI's initialisation with the zero-started
    layers filled (so every block acts), built once with MONAI's attention."""
    preset = get_preset("rflow-ct", "official")
    torch.manual_seed(0)
    unet = build_diffusion_unet(preset, attention="monai")
    controlnet = build_controlnet(preset, attention="monai")
    generator = torch.Generator().manual_seed(1)
    fill_zero_initialised(unet, generator)
    fill_zero_initialised(controlnet, generator)
    yield unet, controlnet


@pytest.mark.slow  # official-width networks
def test_sdpa_attention_equals_monai_attention_at_official_width(official_unet_and_controlnet):
    unet, controlnet = official_unet_and_controlnet
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 16, 16, 8, generator=generator)  # attention over 4×4×2 and 2×2×1 tokens
    condition = (torch.rand(1, 8, 64, 64, 32, generator=generator) > 0.5).float()
    t = torch.tensor([600.0])
    spacing = torch.tensor([[150.0, 150.0, 200.0]])
    labels = torch.tensor([1])

    def run():
        with torch.no_grad():
            down, mid = controlnet(x, t, condition, conditioning_scale=1.0, class_labels=labels)
            out = unet(x, t, spacing_tensor=spacing, class_labels=labels,
                       down_block_additional_residuals=down, mid_block_additional_residual=mid)
        return down, mid, out

    assert set_sdpa_attention(unet, False) == set_sdpa_attention(controlnet, False) + 6  # the UNet's up blocks
    reference = run()
    assert set_sdpa_attention(unet) == 11 and set_sdpa_attention(controlnet) == 5
    ours = run()
    pairs = list(zip(reference[0], ours[0])) + [(reference[1], ours[1]), (reference[2], ours[2])]
    assert reference[2].abs().mean() > 0.1  # the networks act
    for expected, got in pairs:
        # Float32 rounding in a different summation order: within 1e-5 of the tensor's own scale.
        # Measured: UNet output 2.5e-6 (values up to 4.6); the ControlNet's mid residual 1.1e-5
        # (values up to 14.4, 8e-7 relative); the residuals above the attention levels 0.
        scale = max(1.0, expected.abs().max().item())
        assert (expected - got).abs().max().item() <= 1e-5 * scale


def test_default_decode_plan_is_whole_volume_when_it_fits():
    """The planner picks MONAI's whole-volume decode when its estimate fits the budget (exact, the
    fastest), else a split plan, and says why in its line."""
    from maisicore.vae.tsp import WHOLE_VOLUME_FACTOR, decode_exact, decoder_graph, make_plan, whole_volume_bytes

    torch.manual_seed(0)
    autoencoder = build_autoencoder(get_preset("rflow-ct", "tiny"))
    z = torch.randn(1, 4, 6, 5, 7, generator=torch.Generator().manual_seed(3))
    _, output = decoder_graph(autoencoder, z)
    whole = whole_volume_bytes(output)
    largest = max(n.length * n.slice_bytes() for n in _graph_nodes(output))
    assert whole == int(WHOLE_VOLUME_FACTOR * largest) and WHOLE_VOLUME_FACTOR == 4.0
    roomy = make_plan(output, whole + 1, whole=True)
    assert roomy.mode == "whole" and "whole-volume decode" in roomy.describe()
    tight = make_plan(output, whole - 1, whole=True)
    assert tight.mode != "whole" and f"would need about {whole / 2**30:.2f} GiB" in tight.describe()
    assert make_plan(output, whole + 1).mode != "whole"  # encodes and explicit modes: split plans only
    lines = []
    with torch.no_grad():
        expected = autoencoder.decode(z)
    got = decode_exact(autoencoder, z, log=lines.append)  # default budget: free memory
    assert torch.equal(got, expected) and "whole-volume" in lines[0]


def _graph_nodes(output):
    from maisicore.vae.tsp import _walk

    return _walk(output)


def test_devices_rule_without_a_gpu():
    """``--devices``: a pure function of the text and the number of CUDA devices present."""
    from maisicore.devices import parse_devices
    from maisicore.errors import InputError

    assert parse_devices("cpu,cpu", cuda_count=0) == ["cpu", "cpu"]
    assert parse_devices("cuda:0, cuda:1", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert parse_devices(["cuda", "CUDA:1"], cuda_count=2) == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:7") == ["cuda:7"]  # spelling only (a request's check(), torch-free)
    refused = {
        "tpu:0": "unknown device type 'tpu'",
        "cpu,,cpu": "give one or more devices",
        "cpu:1": "the CPU takes no index",
        "cuda:x": "a CUDA index is a whole number",
        "cpu,cuda:0": "give devices of one type",
        "cuda:1": "cuda:1 is not available: 1 CUDA device(s) present (cuda:0 to cuda:0)",
    }
    for text, message in refused.items():
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_devices(text, cuda_count=1)
    with pytest.raises(InputError, match="CUDA is not available on this machine"):
        parse_devices("cuda:0,cuda:1", cuda_count=0)


def test_bad_devices_exit_2_with_one_line(tmp_path, maisi):
    out = tmp_path / "ct.nii.gz"
    cases = [
        (("--devices", "tpu:0"), "unknown device type 'tpu'"),
        (("--devices", "cpu,cuda:0"), "give devices of one type"),
        (("--devices", "cuda:99"), "cuda:99"),  # no CUDA here, or not 100 devices
        (("--devices", ""), "give one or more devices"),
        (("--devices", "cpu,cpu", "--decode", "plain"), "leave out --decode plain"),
    ]
    for extra, message in cases:
        result = maisi("generate", "--model", "demo", "--steps", "1", "--out", out, *extra)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (extra, result.stderr)
        assert lines[0].startswith("maisi: error: --devices") and message in lines[0], lines
        assert not out.exists() and not list(tmp_path.iterdir())
    result = maisi("vae", "decode", "--weights", tmp_path / "ae.pt", "--latent", tmp_path / "z.nii.gz",
                   "--devices", "gpu", "--out", out)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "maisi: error: --devices gpu: unknown device type 'gpu' in 'gpu'; use cpu, cuda or cuda:N"]


def test_generate_request_carries_devices_to_the_split_decode(tiny_weights, monkeypatch):
    """``GenerateRequest(devices=[...])`` reaches the exact decode: the same CT as one device."""
    import numpy as np
    from maisicore.pipelines.generate import GeneratePipeline
    from maisicore.pipelines.requests import GenerateRequest
    from maisicore.vae import tsp

    monkeypatch.setattr(tsp, "WHOLE_VOLUME_FACTOR", 1e9)  # the whole-volume decode never fits: a split plan
    base = dict(weights_dir=str(tiny_weights["rflow-ct"]), size=[32, 32, 32], spacing=[4.0, 4.0, 4.0], steps=1,
                allow_any_size=True, device="cpu")
    pipeline = GeneratePipeline.from_request(GenerateRequest(**base))
    lines = []
    one = pipeline(GenerateRequest(**base), log=lines.append).ct.array
    two = pipeline(GenerateRequest(**base, devices=["cpu", "cpu"]), log=lines.append).ct.array
    assert "split decode" in lines[-1] and lines[-1].endswith("slabs spread over 2 workers (cpu, cpu)")
    assert np.array_equal(one, two)
