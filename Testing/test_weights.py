"""Weight sets in the reference layout: round trips, and refusal of files that don't fit or that
carry code."""

from __future__ import annotations

import pickle

import pytest
import torch
from maisicore.errors import InputError
from maisicore.models.presets import get_preset
from maisicore.models.weights import (
    init_weights,
    load_checkpoint,
    load_model,
    save_checkpoint,
)


def _assert_same_state(a: torch.nn.Module, b: dict):
    state = a.state_dict()
    assert state.keys() == b.keys()
    for key, value in b.items():
        assert torch.equal(state[key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("model", ["rflow-ct", "ddpm-ct"])
def test_official_width_round_trips_through_reference_layout(tmp_path, model):
    preset = get_preset(model, "official")
    files = init_weights(preset, tmp_path, seed=3)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in files.values()) == sorted(
        f"models/{name}" for name in preset.weight_files.as_dict().values()
    )
    # The files hold exactly the reference layout.
    ae = load_checkpoint(files["autoencoder"])
    unet = load_checkpoint(files["diffusion_unet"])
    cn = load_checkpoint(files["controlnet"])
    assert set(unet) == {"unet_state_dict", "scale_factor"} and set(cn) == {"controlnet_state_dict"}
    assert "unet_state_dict" not in ae
    loaded = load_model(preset, tmp_path, "cpu")
    _assert_same_state(loaded.autoencoder, ae)
    _assert_same_state(loaded.diffusion_unet, unet["unet_state_dict"])
    _assert_same_state(loaded.controlnet, cn["controlnet_state_dict"])
    assert loaded.scale_factor == 1.0
    del loaded, ae, unet, cn


def test_older_nested_autoencoder_file_loads(tiny_weights, tmp_path):
    import shutil

    folder = tmp_path / "w"
    shutil.copytree(tiny_weights["rflow-ct"], folder)
    path = folder / "models" / "autoencoder_v1.pt"
    state = torch.load(path, weights_only=True)
    torch.save({"unet_state_dict": state}, path)
    loaded = load_model(get_preset("rflow-ct", "tiny"), folder)
    _assert_same_state(loaded.autoencoder, state)


def test_mismatched_checkpoint_is_refused_with_one_line(tiny_weights, tmp_path):
    # tiny files read as the official preset: one line naming file, preset and first keys.
    with pytest.raises(InputError) as info:
        load_model(get_preset("rflow-ct", "official"), tiny_weights["rflow-ct"])
    message = str(info.value)
    assert "\n" not in message
    assert "autoencoder_v1.pt" in message and "rflow-ct/official" in message
    assert "shape mismatches (first: " in message
    # ddpm-ct UNet file under rflow-ct's name: missing/unexpected keys are named.
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(tiny_weights["rflow-ct"], folder)
    shutil.copy(
        tiny_weights["ddpm-ct"] / "models" / "diff_unet_3d_ddpm-ct.pt", folder / "models" / "diff_unet_3d_rflow-ct.pt"
    )
    with pytest.raises(InputError) as info:
        load_model(get_preset("rflow-ct", "tiny"), folder)
    message = str(info.value)
    assert "diff_unet_3d_rflow-ct.pt does not fit preset rflow-ct/tiny" in message
    assert "missing keys (first: " in message and "\n" not in message


class _RunsCodeWhenUnpickled:
    """A pickle payload that would create a marker file if it were ever executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_checkpoint_is_refused_and_not_executed(tiny_weights, tmp_path, maisi):
    import shutil

    folder = tmp_path / "tampered"
    shutil.copytree(tiny_weights["rflow-ct"], folder)
    marker = tmp_path / "code-was-executed"
    path = folder / "models" / "controlnet_3d_rflow-ct.pt"
    with open(path, "wb") as f:
        pickle.dump({"controlnet_state_dict": _RunsCodeWhenUnpickled(marker)}, f)
    result = maisi(
        "generate", "--model", "rflow-ct", "--weights-dir", folder, "--size", 64, 64, 64, "--spacing", 4, 4, 4,
        "--allow-any-size", "--device", "cpu", "--out", tmp_path / "x.nii.gz",
    )
    assert result.returncode == 2, result.stderr
    assert not marker.exists()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("maisi: error: ") and "controlnet_3d_rflow-ct.pt: refused: the file holds code" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.nii.gz").exists()


def test_weights_init_cli_writes_card_and_layout(tmp_path, maisi):
    result = maisi("weights", "init", "--preset", "ddpm-ct", "--width", "tiny", "--out", tmp_path / "w", "--seed", 5)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("wrote ddpm-ct/tiny random weights, seed 5,")
    import json

    assert json.loads((tmp_path / "w" / "maisi_model.json").read_text())["width"] == "tiny"
    assert sorted(p.name for p in (tmp_path / "w" / "models").iterdir()) == [
        "autoencoder_v1.pt", "controlnet_3d_ddpm-ct.pt", "diff_unet_3d_ddpm-ct.pt"
    ]


def test_equal_weights_give_byte_identical_files(tmp_path):
    """Checkpoints are written through a temp file, yet the archive inside carries no random name:
    equal tensors give equal bytes (the demo model's rerun is checked with a byte comparison)."""
    state = {"unet_state_dict": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, "scale_factor": torch.tensor(1.0)}
    first, second = tmp_path / "a" / "diff_unet.pt", tmp_path / "b" / "diff_unet.pt"
    for path in (first, second):
        path.parent.mkdir()
        save_checkpoint(path, state)
    assert first.read_bytes() == second.read_bytes()
    assert not list(tmp_path.rglob(".*.tmp"))  # no temp file left behind
    assert torch.equal(load_checkpoint(first)["unet_state_dict"]["w"], state["unet_state_dict"]["w"])
