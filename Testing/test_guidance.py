"""Classifier-free guidance side by side with NVIDIA's reference loops, run on the CPU on the same
tiny random networks and the same noise (``nvidia_reference`` says how the reference is run):

- image only (the MR models' path): ``scripts/diff_model_infer.run_inference``, guidance on the
  modality (unconditional half: class label 0);
- with a mask: ``scripts/utils_infer.run_controlnet_conditioned_image_dm``, guidance on the tumours
  (unconditional ControlNet input: the reference's ``remove_tumors`` of the mask).
"""

from __future__ import annotations

import json
import logging
from argparse import Namespace

import numpy as np
import pytest
import torch
from maisicore.anatomy.tumors import tumor_free_labels
from maisicore.io.geometry import Volume
from maisicore.models.presets import get_preset
from maisicore.models.weights import init_weights, load_model
from maisicore.pipelines.generate import generate_latents, latents_to_ct, plan_generation
from nvidia_reference import capture_latents, cpu_noise, import_reference


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return import_reference(tmp_path_factory.mktemp("nvidia"))


@pytest.fixture(scope="module")
def mr_brain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mr-brain")
    init_weights(get_preset("rflow-mr-brain", "tiny"), folder, seed=3, nonzero=True)
    return load_model(get_preset("rflow-mr-brain", "tiny"), folder, "cpu")


def _tumour_mask() -> np.ndarray:
    """64×64×32 labels: body, liver with a hepatic tumour, two lung lobes with a lung tumour
    between them, a pancreas with its tumour."""
    labels = np.zeros((64, 64, 32), np.int64)
    labels[4:60, 4:60, 0:32] = 200
    labels[8:30, 8:40, 2:16] = 1
    labels[14:20, 14:22, 6:10] = 26
    labels[34:58, 6:30, 16:32] = 28
    labels[34:58, 30:58, 16:32] = 29
    labels[44:50, 26:34, 22:28] = 23
    labels[30:44, 40:56, 4:12] = 4
    labels[34:38, 44:48, 6:9] = 24
    return labels


def test_image_only_guidance_matches_reference(reference, reference_dir, mr_brain):
    """rflow-mr-brain, guidance 2 (its reference config's), modality mri_t2: latents and the written
    MR intensities equal the reference's."""
    plan = plan_generation(mr_brain.preset, size=(32, 32, 32), spacing=(0.94, 0.94, 1.36), steps=3,
                           modality="mri_t2", guidance_scale=2.0)
    assert plan.modality_code == 10 and plan.guidance_scale == 2.0
    ours = generate_latents(mr_brain, plan, seed=5)

    args = Namespace(**json.loads((reference_dir / "config_network_rflow.json").read_text()))
    args.diffusion_unet_inference = {"num_inference_steps": 3}
    args.cfg_guidance_scale = 2.0
    seen = capture_latents(reference.diff_model_infer)
    spacing = torch.from_numpy(np.array([[0.94, 0.94, 1.36]]) * 1e2).half().float()  # prepare_tensors, as float32
    torch.manual_seed(5)
    data = reference.diff_model_infer.run_inference(
        args, torch.device("cpu"), mr_brain.autoencoder, mr_brain.diffusion_unet, mr_brain.scale_factor, None, None,
        spacing, torch.tensor([10]), (32, 32, 32), 4, logging.getLogger("reference"))
    delta = (ours - seen[0]).abs().max().item()
    assert delta <= 1e-6, delta
    # The output: MR intensities, not clipped above; the reference truncates them to int16.
    mr = latents_to_ct(mr_brain, ours, plan, decode="plain").array
    assert mr.dtype == np.float32 and mr.min() >= 0
    assert np.array_equal(np.int16(mr), data)
    # Guidance acts: the unguided latents differ.
    unguided = generate_latents(mr_brain, plan_generation(mr_brain.preset, size=(32, 32, 32), spacing=(0.94, 0.94, 1.36),
                                                          steps=3, modality="mri_t2", guidance_scale=0.0), seed=5)
    assert (unguided - ours).abs().max() > 1e-3


def test_tumour_free_labels_are_the_reference_remove_tumors(reference):
    labels = _tumour_mask()
    labels[0:3, 0:6, 20:26] = 23  # a lung tumour on the volume's face (the reference's padding counts)
    labels[0:6, 0:10, 18:28][labels[0:6, 0:10, 18:28] == 0] = 29
    expected = reference.augmentation.remove_tumors(torch.from_numpy(labels)[None])[0].numpy()
    ours = tumor_free_labels(labels)
    assert np.array_equal(ours, expected)
    assert not np.isin(ours, [23, 24, 26]).any()


def test_mask_guidance_matches_reference(reference, reference_dir, tiny_weights):
    """rflow-ct with a mask holding tumours, guidance 3: the reference's ControlNet loop gives the
    same latents."""
    model = load_model(get_preset("rflow-ct", "tiny"), tiny_weights["rflow-ct"], "cpu")
    plan = plan_generation(model.preset, mask=Volume(_tumour_mask(), np.diag([4.0, 4.0, 4.0, 1.0])), steps=3,
                           allow_any_size=True, guidance_scale=3.0)
    ours = generate_latents(model, plan, seed=7)

    from monai.bundle import ConfigParser

    scheduler = ConfigParser(json.loads((reference_dir / "config_network_rflow.json").read_text())).get_parsed_content(
        "noise_scheduler")
    labels = torch.from_numpy(plan.labels)[None, None]
    cond = reference.utils.binarize_labels(labels).float()
    uncond = reference.utils.binarize_labels(reference.augmentation.remove_tumors(labels.squeeze(0)).unsqueeze(0)).float()
    seen = capture_latents(reference.utils_infer)
    cpu_noise(reference.utils_infer)
    spacing = torch.FloatTensor(plan.spacing).unsqueeze(0).half().float() * 1e2
    torch.manual_seed(7)
    reference.utils_infer.run_controlnet_conditioned_image_dm(
        model.autoencoder, model.diffusion_unet, model.controlnet, scheduler, model.scale_factor, torch.device("cpu"),
        cond, spacing, plan.latent_shape, plan.size, 1.0, modality_tensor=torch.tensor([1]), num_inference_steps=3,
        cfg_guidance_scale=3.0, controlnet_uncond_tensor=uncond)
    delta = (ours - seen[0]).abs().max().item()
    assert delta <= 1e-6, delta
    plain = generate_latents(model, plan_generation(model.preset, mask=Volume(_tumour_mask(), np.diag([4.0, 4.0, 4.0, 1.0])),
                                                    steps=3, allow_any_size=True), seed=7)
    assert (plain - ours).abs().max() > 1e-3


def test_guidance_defaults_and_refusals(maisi, tmp_path, tiny_weights):
    assert get_preset("rflow-ct").default_guidance_scale == 0.0  # CT: the unguided loop, bit-identical as before
    assert get_preset("rflow-mr-brain").default_guidance_scale == 2.0
    assert get_preset("rflow-mr").default_guidance_scale == 15.0
    out = tmp_path / "ct.nii.gz"
    result = maisi("generate", "--model", "rflow-ct", "--weights-dir", tiny_weights["rflow-ct"], "--size", "32", "32", "32",
                   "--allow-any-size", "--guidance-scale", "-1", "--out", out)
    assert result.returncode == 2 and "--guidance-scale" in result.stderr and not out.exists()
