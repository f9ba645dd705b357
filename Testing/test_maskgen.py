"""Controllable anatomy sizes, the parts that need no network: parsing and checking the request
(the reference's check_input_ct rules) and the size-vector selection, side by side with the
reference's LDMSampler.prepare_anatomy_size_condition. NVIDIA's all_anatomy_size_conditions.json is
not available offline, so the database is a seeded random one in its format."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from maisicore.anatomy.labels import label_dict
from maisicore.anatomy.maskgen import ANATOMY_SIZE_CLASSES, parse_anatomy_sizes, select_size_condition
from maisicore.errors import InputError
from nvidia_reference import import_reference


def test_parse_anatomy_sizes():
    assert parse_anatomy_sizes("liver=0.6, Hepatic  Tumor=0.1") == [("liver", 0.6), ("hepatic tumor", 0.1)]
    assert parse_anatomy_sizes("colon=-1") == [("colon", -1.0)]
    assert set(ANATOMY_SIZE_CLASSES) <= set(label_dict())  # every class is a MAISI label name
    for text, words in [("spleen=0.5", "no size control"), ("liver=1.5", "between 0 and 1"), ("liver=-0.5", "between 0"),
                        ("liver=nan", "between 0"), ("liver=big", "must be a number"), ("liver", "NAME=SIZE"),
                        ("liver=0.2,liver=0.3", "twice"), ("hepatic tumor=0.1,bone lesion=0.2", "one tumour"), ("", "NAME=SIZE")]:
        with pytest.raises(InputError, match=words):
            parse_anatomy_sizes(text)


def test_size_selection_matches_reference(tmp_path):
    sample = import_reference(tmp_path).sample
    rng = np.random.default_rng(0)
    database = [{"organ_size": [float(v) if rng.random() > 0.2 else -1.0 for v in rng.random(10)]} for _ in range(300)]
    database.append(dict(database[7]))  # an exact tie: the first one wins in both
    path = tmp_path / "all_anatomy_size_conditions.json"
    path.write_text(json.dumps(database))
    sampler = types.SimpleNamespace(all_anatomy_size_conditions_json=str(path))
    for text in ("liver=0.6,hepatic tumor=0.1", "pancreas=0.3", "colon=-1,stomach=0.9,gallbladder=0.05",
                 "bone lesion=0.7,liver=0.2", "lung tumor=0"):
        pairs = parse_anatomy_sizes(text)
        expected = sample.LDMSampler.prepare_anatomy_size_condition(sampler, pairs)
        assert select_size_condition(pairs, database) == expected, text


@pytest.mark.parametrize("config", ["config_network_rflow.json", "config_network_ddpm.json"])
def test_mask_network_presets_match_reference_config(reference_dir, config):
    """Every constructor argument equals the official file's as MONAI's config parser resolves it."""
    from maisicore.models.networks import build_scheduler
    from maisicore.models.presets import get_mask_generation_preset, get_preset
    from monai.bundle import ConfigParser

    data = json.loads((reference_dir / config).read_text())
    parser = ConfigParser(data)
    preset = get_mask_generation_preset("official")
    assert preset.autoencoder == parser.get_parsed_content("mask_generation_autoencoder_def", instantiate=False).resolve_args()
    assert preset.diffusion_unet == parser.get_parsed_content("mask_generation_diffusion_def", instantiate=False).resolve_args()
    assert preset.scale_factor == data["mask_generation_scale_factor"]
    assert list(preset.latent_shape) == data["mask_generation_latent_shape"]
    assert {"_target_": "monai.networks.schedulers.ddpm.DDPMScheduler", **preset.scheduler.kwargs} == \
        data["mask_generation_noise_scheduler"]
    assert type(build_scheduler(get_preset("ddpm-ct"))).__name__ == "DDPMScheduler"


def test_tiny_mask_networks_run():
    """Tiny width: a latent with its size condition through the UNet (cross-attention on the
    10-vector) and the decoder's 125 class logits."""
    import torch
    from maisicore.models.networks import build_mask_networks
    from maisicore.models.presets import get_mask_generation_preset

    autoencoder, unet = build_mask_networks(get_mask_generation_preset("tiny"))
    x = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    size = torch.tensor([[[0.1, 0.6, 0.3, 0.2, 0.4, -1, -1, 0.1, -1, -1]]])
    with torch.no_grad():
        assert unet(x, timesteps=torch.tensor([999]), context=size).shape == x.shape
        assert autoencoder.decode_stage_2_outputs(x).shape == (1, 125, 32, 32, 32)
    assert sum(p.numel() for p in unet.parameters()) < 2e6
