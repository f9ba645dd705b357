"""The MR models (rflow-mr, rflow-mr-brain): networks as NVIDIA's config builds them (the reference
runs both with config_network_rflow.json), modality codes by name, image only, MR intensities out,
and their download entries with their own licences."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from maisicore.errors import InputError
from maisicore.models.networks import build_autoencoder, build_diffusion_unet
from maisicore.models.presets import CT_MODEL_NAMES, MODALITY_CODES, MR_MODEL_NAMES, get_preset, modality_code


@pytest.mark.parametrize("model", MR_MODEL_NAMES)
def test_mr_networks_match_reference_config(reference_dir, model):
    """Every constructor argument of the VAE and UNet equals the official file's, as MONAI's config
    parser resolves it (the reference runs the MR models with config_network_rflow.json); same MONAI
    classes, so the same parameters one for one (test_networks builds the identical rflow-ct networks
    from that file and compares them tensor by tensor and with the published counts)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(json.loads((reference_dir / "config_network_rflow.json").read_text()))
    preset = get_preset(model, "official")
    for ours, key in ((preset.autoencoder, "autoencoder_def"), (preset.diffusion_unet, "diffusion_unet_def")):
        component = parser.get_parsed_content(key, instantiate=False)
        assert ours == component.resolve_args(), key
    assert build_autoencoder.__module__ == build_diffusion_unet.__module__ == "maisicore.models.networks"
    assert preset.autoencoder == get_preset("rflow-ct").autoencoder
    assert preset.diffusion_unet == get_preset("rflow-ct").diffusion_unet
    # Tiny width: the same layers, few channels.
    tiny = get_preset(model, "tiny")
    unet = build_diffusion_unet(tiny)
    assert unet.num_class_embeds == 128 and not unet.include_top_region_index_input
    assert sum(p.numel() for p in unet.parameters()) < 2e6


@pytest.mark.parametrize("model", MR_MODEL_NAMES)
def test_mr_presets_follow_reference_configs(reference_dir, model):
    preset = get_preset(model, "official")
    assert preset.image_only and preset.controlnet is None and "controlnet" not in preset.weight_files.as_dict()
    assert get_preset(model, "tiny").controlnet is None
    # The weight files and inference defaults of the reference's configs for this model.
    env = {"rflow-mr": "environment_maisi_diff_model_rflow-mr.json",
           "rflow-mr-brain": "environment_maisi_diff_model_rflow-mr-brain.json"}[model]
    environment = json.loads((reference_dir / env).read_text())
    assert preset.weight_files.diffusion_unet == environment["model_filename"]
    assert "models/" + preset.weight_files.autoencoder == environment["trained_autoencoder_path"]
    inference = json.loads((reference_dir / f"config_maisi_diff_model_{model}.json").read_text())["diffusion_unet_inference"]
    assert preset.default_guidance_scale == inference["cfg_guidance_scale"]
    assert MODALITY_CODES[preset.default_modality] == inference["modality"]
    assert list(preset.default_size) == inference["dim"] and list(preset.default_spacing) == inference["spacing"]


def test_modality_codes_by_name(reference_dir):
    assert MODALITY_CODES == json.loads((reference_dir / "modality_mapping.json").read_text())
    assert modality_code(get_preset("rflow-mr-brain"), "mri_flair_skull_stripped") == 31
    assert modality_code(get_preset("rflow-mr"), None) == 9
    assert modality_code(get_preset("rflow-ct"), None) == 1
    for model in CT_MODEL_NAMES:
        with pytest.raises(InputError, match="CT model"):
            modality_code(get_preset(model), "mri_t1")
    for model in MR_MODEL_NAMES:
        with pytest.raises(InputError, match="MR model"):
            modality_code(get_preset(model), "ct")
    with pytest.raises(InputError, match="choose one of"):
        modality_code(get_preset("rflow-mr"), "mri_swi")  # a brain-model code


@pytest.fixture(scope="module")
def mr_weights(tmp_path_factory):
    from conftest import run_maisi_in_process

    folder = tmp_path_factory.mktemp("mr") / "w"
    result = run_maisi_in_process("weights", "init", "--preset", "rflow-mr-brain", "--width", "tiny", "--out", folder,
                                  "--nonzero-init")
    assert result.returncode == 0, result.stderr
    return folder


def test_mr_generate_writes_float_mr_volume(maisi, tmp_path, mr_weights):
    out = tmp_path / "mr.nii.gz"
    result = maisi("generate", "--model", "rflow-mr-brain", "--weights-dir", mr_weights, "--modality", "mri_t1",
                   "--size", "32", "32", "32", "--spacing", "2", "2", "2", "--steps", "2", "--decode", "plain",
                   "--device", "cpu", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "MR float32" in result.stdout
    image = nib.load(out)
    data = np.asanyarray(image.dataobj)
    assert image.get_data_dtype() == np.float32 and data.shape == (32, 32, 32)
    np.testing.assert_allclose(np.abs(np.diag(image.affine)[:3]), 2.0)
    assert data.min() >= 0 and np.ptp(data) > 0  # MR intensities: 0 below, not clipped above (no HU)


def test_mr_refusals(maisi, tmp_path, mr_weights, tiny_weights):
    out = tmp_path / "x.nii.gz"
    mask = tmp_path / "labels.nii.gz"
    labels = np.zeros((32, 32, 32), np.int16)
    labels[4:28, 4:28, 4:28] = 200
    nib.save(nib.Nifti1Image(labels, np.diag([2.0, 2, 2, 1])), mask)
    cases = [
        (("--model", "rflow-mr-brain", "--weights-dir", mr_weights, "--mask", mask), "image-only"),
        (("--model", "rflow-mr-brain", "--weights-dir", mr_weights, "--anatomy", "liver"), "image-only"),
        (("--model", "rflow-mr-brain", "--weights-dir", mr_weights, "--modality", "ct", "--size", "32", "32", "32"),
         "MR model"),
        (("--model", "rflow-ct", "--weights-dir", tiny_weights["rflow-ct"], "--modality", "mri_t1", "--size", "32", "32",
          "32", "--allow-any-size"), "CT model"),
        (("--model", "rflow-mr-brain", "--weights-dir", mr_weights, "--size", "1024", "1024", "128"), "voxels"),
    ]
    for args, words in cases:
        result = maisi("generate", *args, "--dry-run", "--out", out)  # refused before the dry run's estimate
        assert result.returncode == 2, (args, result.stderr)
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists()


def test_mask_without_body_gets_a_note(maisi, tmp_path, tiny_weights):
    mask = tmp_path / "labels.nii.gz"
    labels = np.zeros((32, 32, 32), np.int16)
    labels[8:24, 8:24, 8:24] = 1
    nib.save(nib.Nifti1Image(labels, np.diag([4.0, 4, 4, 1])), mask)
    result = maisi("generate", "--model", "rflow-ct", "--weights-dir", tiny_weights["rflow-ct"], "--mask", mask,
                   "--allow-any-size", "--dry-run", "--out", tmp_path / "ct.nii.gz")
    assert result.returncode == 0, result.stderr
    assert "note: the mask has no body label (200)" in result.stderr and "maisi labels convert" in result.stderr
    labels[2:30, 2:30, 2:30][labels[2:30, 2:30, 2:30] == 0] = 200
    nib.save(nib.Nifti1Image(labels, np.diag([4.0, 4, 4, 1])), mask)
    result = maisi("generate", "--model", "rflow-ct", "--weights-dir", tiny_weights["rflow-ct"], "--mask", mask,
                   "--allow-any-size", "--dry-run", "--out", tmp_path / "ct.nii.gz")
    assert result.returncode == 0 and "body label" not in result.stderr


def test_mr_download_entries_have_their_own_licences():
    from maisicore.models import download

    ct, mr, brain = (download.official_model(n) for n in ("rflow-ct", "rflow-mr", "rflow-mr-brain"))
    assert mr.repo == "nvidia/NV-Generate-MR" and brain.repo == "nvidia/NV-Generate-MR-Brain"
    assert "Noncommercial" in mr.license.name and "NON-COMMERCIAL" in mr.license.summary
    assert mr.license != ct.license and brain.license == ct.license
    assert {r.repo_path for r in mr.files.values()} == {"models/autoencoder_v2.pt", "models/diff_unet_3d_rflow-mr.pt"}
    assert brain.files["autoencoder"].repo == "nvidia/NV-Generate-CT"  # the CT VAE, from the CT repo
    assert download.file_url("https://hub.example", brain, brain.files["autoencoder"]).startswith(
        "https://hub.example/nvidia/NV-Generate-CT/resolve/main/models/autoencoder_v1.pt")
    assert not mr.datasets and not brain.datasets


def test_maisi_generate_module_offers_mr_models():
    """The Slicer module's choices are maisicore's: the MR models and their modalities, passed on in
    the request."""
    from maisicore.models.presets import MODEL_MODALITIES
    from MAISIGenerateLib.logic import _model_options
    from MAISIGenerateLib.parameters import MODALITIES, MODELS, RunOptions

    assert set(MR_MODEL_NAMES) <= set(MODELS)
    assert MODALITIES[0] == "auto" and set(MODALITIES[1:]) == {m for names in MODEL_MODALITIES.values() for m in names}
    assert _model_options(RunOptions(model="rflow-mr-brain", modality="mri_t2"))["modality"] == "mri_t2"
    assert _model_options(RunOptions(model="rflow-ct", modality="auto"))["modality"] is None
