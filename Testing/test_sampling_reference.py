"""Our sampling loop reproduces MONAI's own MAISI sampling bit for bit (CPU, float32): the same
noise through MONAI's ControlNetDiffusionInferer / DiffusionInferer with the reference
conditioning (spacing × 100, modality class or body-region one-hots × 100, 8-bit mask planes)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from maisicore.diffusion.conditioning import binarize_labels
from maisicore.io.geometry import Volume
from maisicore.models.networks import build_scheduler
from maisicore.models.presets import get_preset
from maisicore.models.weights import load_model
from maisicore.pipelines.generate import generate_latents, plan_generation
from maisicore.vae.decode import decode_latents


def _mask(shape=(64, 64, 64)):
    labels = np.zeros(shape, np.int64)
    labels[8:56, 8:56, 8:56] = 200
    labels[20:40, 16:36, 20:44] = 1  # liver
    labels[40:52, 30:44, 24:40] = 14  # left kidney
    return Volume(labels, np.diag([4.0, 4.0, 4.0, 1.0]))


def _reference_latents(model, plan, seed, with_mask):
    """MONAI's inferer with the reference conditioning, global RNG seeded like our generator."""
    from monai.inferers import ControlNetDiffusionInferer, DiffusionInferer

    preset = model.preset
    scheduler = build_scheduler(preset)
    latent_spatial = plan.latent_shape[1:]
    if preset.scheduler.kind == "rflow":
        scheduler.set_timesteps(num_inference_steps=plan.steps, input_img_size_numel=torch.prod(torch.tensor(latent_spatial)))
    else:
        scheduler.set_timesteps(num_inference_steps=plan.steps)
    torch.manual_seed(seed)
    noise = torch.randn((1, *plan.latent_shape)).half().float()
    conditions = {"spacing_tensor": torch.FloatTensor([plan.spacing]).half().float() * 100}
    cn_conditions = {}
    if preset.uses_modality:
        conditions["class_labels"] = cn_conditions["class_labels"] = torch.tensor([1])
    if preset.uses_body_region:
        one_hot = {"head": 0, "chest": 1, "abdomen": 2, "lower": 3}
        for key, region in zip(("top_region_index_tensor", "bottom_region_index_tensor"), plan.body_region):
            conditions[key] = torch.nn.functional.one_hot(torch.tensor([one_hot[region]]), 4).float() * 100
    unet = partial(model.diffusion_unet, **conditions)
    with torch.no_grad():
        if with_mask:
            cond = binarize_labels(torch.from_numpy(plan.labels)[None, None]).float()
            controlnet = partial(model.controlnet, **cn_conditions)
            return ControlNetDiffusionInferer(scheduler).sample(
                noise, unet, controlnet, cond, scheduler=scheduler, verbose=False
            )
        return DiffusionInferer(scheduler).sample(noise, unet, scheduler=scheduler, verbose=False)


@pytest.mark.parametrize(
    "model_name,steps,with_mask",
    [
        pytest.param("rflow-ct", 30, False, marks=pytest.mark.slow),
        pytest.param("rflow-ct", 30, True, marks=pytest.mark.slow),
        ("ddpm-ct", 6, False),
        pytest.param("ddpm-ct", 6, True, marks=pytest.mark.slow),
    ],
)
def test_latents_bit_identical_to_monai_inferer(tiny_weights, model_name, steps, with_mask):
    model = load_model(get_preset(model_name, "tiny"), tiny_weights[model_name], "cpu")
    mask = _mask() if with_mask else None
    plan = plan_generation(model.preset, size=(64, 64, 64) if not with_mask else None, spacing=(4, 4, 4) if not with_mask else None,
                           mask=mask, body_region=["chest", "abdomen"] if model_name == "ddpm-ct" else None,
                           steps=steps, allow_any_size=True)
    ours = generate_latents(model, plan, seed=11)
    reference = _reference_latents(model, plan, 11, with_mask)
    assert ours.dtype == reference.dtype == torch.float32
    assert torch.equal(ours, reference)
    # The networks act: the result is neither the initial noise nor what the other path gives.
    torch.manual_seed(11)
    noise = torch.randn((1, *plan.latent_shape)).half().float()
    assert (ours - noise).abs().mean() > 0.01


def test_decode_is_monai_decode(tiny_weights):
    """Latents / scale_factor through MONAI's decode, clipped to [0, 1]."""
    model = load_model(get_preset("rflow-ct", "tiny"), tiny_weights["rflow-ct"], "cpu")
    z = torch.randn(1, 4, 8, 12, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.clip(model.autoencoder.decode_stage_2_outputs(z / 0.5), 0, 1)
    assert torch.equal(decode_latents(model.autoencoder, z, 0.5, "plain"), expected)
    # The default plan (the whole-volume decode when it fits, else the split decode) equals it up to float rounding.
    assert (decode_latents(model.autoencoder, z, 0.5) - expected).abs().max().item() <= 1e-4
