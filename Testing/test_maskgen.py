"""Mask generation with controllable anatomy sizes (the reference's controllable_anatomy_size).

- The parts that need no network: parsing and checking the request (the reference's check_input_ct
  rules) and the size-vector selection, side by side with the reference's
  LDMSampler.prepare_anatomy_size_condition. NVIDIA's all_anatomy_size_conditions.json is not
  available offline, so the database is a seeded random one in its format.
- The mask networks against the official configs; the clean-up and the whole sampling path
  (ldm_conditional_sample_one_mask) side by side with the reference on tiny random networks:
  identical masks.
- ``--anatomy-size`` through ``maisi generate`` with tiny mask networks trained on synthetic masks
  (Testing/data/tiny_maskgen, made by benchmarks/train_tiny_maskgen.py): a larger liver when asked
  for one; bad requests exit 2 with one line and write nothing.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

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


# ---- mask generation: post-processing, sampling, --anatomy-size -------------------------------------

FIXTURE = Path(__file__).resolve().parent / "data" / "tiny_maskgen"  # made by benchmarks/train_tiny_maskgen.py


def _blob_volume(seed: int, n: int = 24) -> np.ndarray:
    """A MAISI label volume exercising every clean-up rule: body with holes, organs with a detached
    fragment, each tumour inside its host organ (and one stray piece), airway and hepatic vessel."""
    rng = np.random.default_rng(seed)
    grid = np.indices((n, n, n)).astype(np.float32)

    def ball(centre, radius):
        return sum((grid[i] - centre[i]) ** 2 for i in range(3)) <= radius**2

    volume = np.zeros((n, n, n), np.int64)
    volume[ball((n / 2, n / 2, n / 2), n * 0.47)] = 200
    hosts = {1: ((7, 8, 8), 4.5), 28: ((16, 8, 15), 4.5), 62: ((16, 16, 7), 3.5), 4: ((8, 16, 15), 3), 33: ((12, 18, 12), 2.5)}
    for label, (centre, radius) in hosts.items():
        volume[ball(centre, radius)] = label
        volume[ball(rng.uniform(5, n - 5, 3), 1.2)] = label  # a detached fragment
    # Each tumour in its host (the lung tumour at the lobe's edge: one the lobe's closing swallows
    # whole leaves the reference without a neighbouring label, and it stops with an error).
    for tumor, (host, shift, radius) in {26: (1, 0, 1.6), 23: (28, 3.5, 2.0), 27: (62, 0, 1.6), 24: (4, 0, 1.6),
                                         128: (33, 0, 1.6)}.items():
        volume[ball(np.add(hosts[host][0], (shift, 0, 0)), radius) & (volume > 0)] = tumor
        volume[ball(rng.uniform(5, n - 5, 3), 1.0)] = tumor
    for label in (12, 19, 3, 14, 25, 132):
        volume[ball(rng.uniform(5, n - 5, 3), rng.uniform(1.0, 2.5))] = label
    volume[(rng.random(volume.shape) < 0.02) & (volume > 0)] = 0  # holes
    return volume


def test_post_process_matches_reference(tmp_path):
    """Our clean-up of a generated mask equals the reference's general_mask_generation_post_process
    for no tumour and each tumour rule (scikit-image's labelling on the reference side)."""
    pytest.importorskip("skimage.measure")  # the real one (nvidia_reference may stub skimage)
    from maisicore.anatomy.maskpost import post_process_generated_mask

    reference = import_reference(tmp_path).utils
    volume = _blob_volume(0)
    for target in (None, 23, 24, 26, 27, 128):
        expected = reference.general_mask_generation_post_process(volume.copy(), target_tumor_label=target, device="cpu")
        ours = post_process_generated_mask(volume.copy(), target)
        assert ours.dtype == np.int64 and np.array_equal(ours, expected), target
        assert not np.array_equal(ours, volume)


def _random_mask_model(latent_shape, window=None, overlap=None, scheduler="tiny"):
    """Tiny random mask networks (zero-initialised layers filled so the UNet acts) as a MaskModel;
    ``scheduler``: the DDPM of the tiny preset or of the official one (the reference's config)."""
    import dataclasses

    import torch
    from maisicore.models.networks import build_mask_networks
    from maisicore.models.presets import get_mask_generation_preset
    from maisicore.models.weights import fill_zero_initialised
    from maisicore.pipelines.maskgen import MaskGenerationSettings, MaskModel

    preset = get_mask_generation_preset("tiny")
    if window is not None:
        preset = dataclasses.replace(preset, decode_window=window, decode_overlap=overlap)
    if scheduler == "official":
        preset = dataclasses.replace(preset, scheduler=get_mask_generation_preset("official").scheduler)
    torch.manual_seed(0)
    autoencoder, unet = build_mask_networks(preset)
    fill_zero_initialised(unet, torch.Generator().manual_seed(1))
    settings = MaskGenerationSettings(preset, Path("-"), Path("-"), latent_shape, 6.0)
    return MaskModel(settings, autoencoder, unet, torch.tensor(0.8), torch.device("cpu"))


@pytest.mark.parametrize("vector,window,scheduler", [
    # hepatic tumour, whole decode, the official DDPM (1000 train timesteps, noise prediction)
    ([0.1, 0.6, 0.3, 0.2, 0.4, -1, -1, 0.1, -1, -1], (48, 48, 48), "official"),
    # lung tumour, the reference's sliding window, the tiny preset's DDPM (50, clean-latent prediction)
    ([0.3, 0.2, 0.5, -1, 0.4, 0.5, -1, -1, -1, -1], (4, 4, 8), "tiny"),
])
def test_mask_generation_matches_reference(tmp_path, monkeypatch, vector, window, scheduler):
    """The reference's ldm_conditional_sample_one_mask and ours, same tiny random networks, same
    scheduler, same seed, 3 DDPM steps: the generated masks are identical."""
    pytest.importorskip("skimage.measure")  # the real one (nvidia_reference may stub skimage)
    import torch
    from maisicore.models.networks import build_scheduler
    from maisicore.pipelines import maskgen
    from nvidia_reference import cpu_noise, float_context

    reference = import_reference(tmp_path).sample_mask
    cpu_noise(reference)
    latent_shape, steps, seed = (4, 8, 8, 8), 3, 7
    model = _random_mask_model(latent_shape, window, 0.5, scheduler)
    ours = maskgen.generate_anatomy_mask(model, vector, steps, seed)
    torch.manual_seed(seed)  # the reference draws its noise and DDPM steps from the global generator
    remap = Path(maskgen.__file__).resolve().parent.parent / "data" / "label_dict_124_to_132.json"
    with pytest.warns(UserWarning):  # its warning about fewer steps than the scheduler's train timesteps
        theirs = reference.ldm_conditional_sample_one_mask(
            model.autoencoder, float_context(model.diffusion_unet), build_scheduler(model.settings.preset),
            model.scale_factor, vector, torch.device("cpu"), latent_shape, str(remap), num_inference_steps=steps,
            autoencoder_sliding_window_infer_size=list(window), autoencoder_sliding_window_infer_overlap=0.5)
    assert theirs.shape == (1, 1, 32, 32, 32)
    assert np.array_equal(ours, theirs[0, 0].numpy())
    assert len(np.unique(ours)) > 5  # random networks give many labels: a real comparison
    # The softmax over classes runs in slabs: one x-slice at a time gives the same classes.
    latent = maskgen.sample_mask_latent(model, vector, steps, seed)
    whole = maskgen.decode_mask_classes(model, latent)
    monkeypatch.setattr(maskgen, "SOFTMAX_CHUNK_BYTES", 1)
    assert np.array_equal(maskgen.decode_mask_classes(model, latent), whole)


def _fixture_vector(liver: float) -> list[float]:
    from maisicore.anatomy.maskgen import load_size_database

    database = load_size_database(FIXTURE / "all_anatomy_size_conditions.json")
    return select_size_condition(parse_anatomy_sizes(f"liver={liver}"), database)


def test_anatomy_size_moves_the_liver():
    """The tiny trained mask model (Testing/data/tiny_maskgen): a larger requested liver gives a
    larger liver, same seed, with the DDPM steps it was trained for (all 50 of its scheduler's; the
    fixture's report: about 150-220 liver voxels for 0.2, 1100-1200 for 0.8, the synthetic balls'
    180 and 1150)."""
    from maisicore.pipelines.maskgen import generate_anatomy_mask, load_mask_model, mask_generation_settings

    model = load_mask_model(mask_generation_settings(FIXTURE))
    steps = model.settings.preset.default_steps
    small, large = (int((generate_anatomy_mask(model, _fixture_vector(s), steps, seed=0) == 1).sum()) for s in (0.2, 0.8))
    assert 0 < small < 400 and large > 3 * small, (small, large)


@pytest.fixture
def maskgen_weights(tiny_weights, tmp_path) -> Path:
    """Tiny rflow-ct weights with the tiny trained mask networks of the fixture beside them."""
    import shutil

    folder = tmp_path / "weights"
    shutil.copytree(tiny_weights["rflow-ct"], folder)
    for path in (FIXTURE / "models").iterdir():
        shutil.copyfile(path, folder / "models" / path.name)
    card = json.loads((folder / "maisi_model.json").read_text())
    card["mask_generation"] = json.loads((FIXTURE / "maisi_model.json").read_text())["mask_generation"]
    (folder / "maisi_model.json").write_text(json.dumps(card))
    return folder


def test_generate_with_anatomy_size(maskgen_weights, tmp_path, maisi):
    """`maisi generate --anatomy-size`: the mask is generated, resampled onto the output grid, the CT
    follows it and --label-out writes it."""
    import nibabel as nib
    from maisicore.pipelines.maskgen import (
        generate_anatomy_mask,
        load_mask_model,
        mask_generation_settings,
        mask_on_grid,
    )

    out, labels = tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz"
    model = load_mask_model(mask_generation_settings(maskgen_weights))
    steps = model.settings.preset.default_steps  # the tiny mask model's DDPM: all its train timesteps
    result = maisi("generate", "--model", maskgen_weights, "--anatomy-size", "liver=0.8",
                   "--anatomy-size-db", FIXTURE / "all_anatomy_size_conditions.json", "--mask-steps", str(steps),
                   "--size", "32", "32", "64", "--spacing", "12", "12", "6", "--allow-any-size", "--steps", "2",
                   "--seed", "3", "--out", out, "--label-out", labels)
    assert result.returncode == 0, result.stderr
    assert "mask generated with anatomy sizes liver=0.8" in result.stderr
    written = nib.load(labels)
    mask = generate_anatomy_mask(model, _fixture_vector(0.8), steps, seed=3)
    expected = mask_on_grid(mask, 12.0, (32, 32, 64), (12, 12, 6))
    assert np.array_equal(np.asarray(written.dataobj), expected.array)
    assert np.allclose(written.affine, expected.affine) and np.allclose(nib.load(out).affine, expected.affine)
    ct = np.asarray(nib.load(out).dataobj)
    assert ct.shape == (32, 32, 64) and (ct[expected.array == 0] == -1000).all()
    assert (expected.array == 1).sum() > 0 and (expected.array == 200).sum() > 0


@pytest.mark.parametrize("options,words", [
    (["--anatomy-size", "spleen=0.5"], "'spleen' has no size control"),
    (["--anatomy-size", "liver=1.5"], "between 0 and 1"),
    (["--anatomy-size", "hepatic tumor=0.1,bone lesion=0.2"], "at most one tumour"),
    (["--anatomy-size", "liver=0.5", "--mask", "m.nii.gz"], "leave out --mask"),
    (["--mask-steps", "5"], "go with --anatomy-size"),
    (["--anatomy-size", "liver=0.5"], "download datasets/all_anatomy_size_conditions.json"),
    (["--anatomy-size", "liver=0.5", "--anatomy-size-db", "DB"], "needs the mask generation networks"),
])
def test_anatomy_size_errors(tiny_weights, tmp_path, monkeypatch, maisi, options, words):
    """Bad --anatomy-size requests: exit 2, one line, nothing written."""
    monkeypatch.setenv("MAISI_HOME", str(tmp_path / "home"))
    options = [str(FIXTURE / "all_anatomy_size_conditions.json") if o == "DB" else o for o in options]
    out = tmp_path / "ct.nii.gz"
    result = maisi("generate", "--model", tiny_weights["rflow-ct"], *options, "--out", out, "--label-out",
                   tmp_path / "labels.nii.gz")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maisi: error: ") and words in lines[0], result.stderr
    assert not out.exists() and not (tmp_path / "labels.nii.gz").exists()


def test_weights_init_writes_mask_networks(tmp_path, maisi):
    """`maisi weights init --mask-networks` writes loadable random mask networks (NVIDIA's names)."""
    from maisicore.pipelines.maskgen import load_mask_model, mask_generation_settings

    result = maisi("weights", "init", "--preset", "ddpm-ct", "--width", "tiny", "--mask-networks", "--out", tmp_path / "w")
    assert result.returncode == 0, result.stderr
    settings = mask_generation_settings(tmp_path / "w", "tiny")
    assert settings.autoencoder_path.name == "mask_generation_autoencoder.pt" and settings.mask_shape == (64, 64, 64)
    assert float(load_mask_model(settings).scale_factor) == 1.0
