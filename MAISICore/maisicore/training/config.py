"""Training settings: the reference recipes' defaults, a JSON config in the reference format, flags.

Precedence: defaults (NVIDIA's ``config_maisi_vae_train.json``, ``config_maisi_diff_model_rflow-ct.json``,
``config_maisi_controlnet_train_rflow-ct.json``) < ``--config FILE`` < command-line flags.

A config file uses the reference's section names (``autoencoder_train``, ``diffusion_unet_train``,
``controlnet_train``; ``data_option`` for the VAE) or is a flat object of one stage's keys. Any key
this program does not know is refused before training starts; reference keys that change nothing
here (caching, augmentation switches) are accepted and listed as ignored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..errors import InputError
from ..io.volumes import read_json

STAGES = ("vae", "diffusion", "controlnet")
SECTION = {"vae": "autoencoder_train", "diffusion": "diffusion_unet_train", "controlnet": "controlnet_train"}

# Reference keys accepted but without effect here (memory caching is the OS page cache's job;
# val_interval counts epochs where --validate-every counts steps; the VAE's random spacing
# augmentation and the region-contrastive loss are not implemented).
IGNORED_KEYS = {
    "vae": {"cache", "val_interval", "val_batch_size", "val_patch_size", "val_sliding_window_patch_size", "random_aug",
            "spacing_type", "spacing", "select_channel", "recon_loss"},
    "diffusion": {"cache_rate"},
    "controlnet": {"cache_rate", "fold", "use_region_contrasive_loss", "region_contrasive_loss_delta",
                   "region_contrasive_loss_weight"},
}
# Keys of other sections of the reference files that are not training settings.
OTHER_SECTIONS = {"diffusion_unet_inference", "controlnet_infer"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs besides data and weights.

    ``batch_size`` is per process; ``max_steps`` counts optimiser steps (None: ``n_epochs`` passes
    over the training cases). ``patch_size`` is in image voxels (x, y, z): VAE patches, or latent
    crops (÷4) for the diffusion stages (None: whole latents).
    """

    stage: str
    lr: float
    batch_size: int
    n_epochs: int
    max_steps: int | None = None
    patch_size: tuple[int, int, int] | None = None
    seed: int = 0
    checkpoint_every: int = 100
    validate_every: int = 10
    amp: bool = True
    # VAE
    kl_weight: float = 1e-7
    adv_weight: float = 0.1
    perceptual_weight: float = 0.3
    perceptual_weights: str | None = None
    # VAE, bone-aware fine-tuning: train only the decoder (the encoder, hence the latent space and the
    # diffusion models trained on it, stay as they are) and weigh the L1 of voxels whose real value is
    # at least ``bone_threshold_hu`` by ``bone_weight`` (1: plain L1)
    decoder_only: bool = False
    bone_weight: float = 1.0
    bone_threshold_hu: float = 200.0
    validation_samples: int = 4  # fixed VAE patches or latent batches per validation
    # diffusion / ControlNet
    modality_dropout: float = 0.1
    # ControlNet
    weighted_loss: float = 100.0
    weighted_loss_label: tuple[int, ...] = ()
    ignored: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULTS = {
    "vae": TrainConfig("vae", lr=1e-4, batch_size=1, n_epochs=1, patch_size=(64, 64, 64), validate_every=10),
    "diffusion": TrainConfig("diffusion", lr=1e-5, batch_size=2, n_epochs=1000),
    "controlnet": TrainConfig("controlnet", lr=1e-5, batch_size=1, n_epochs=100, weighted_loss=100.0,
                              weighted_loss_label=(23,)),
}

_FIELD_NAMES = {f.name for f in fields(TrainConfig)} - {"stage", "ignored"}


def _coerce(key: str, value, source: str):
    if key in ("patch_size",) and value is not None:
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) for v in value)):
            raise InputError(f"{source}: '{key}' must be three integers (x, y, z voxels), got {value!r}")
        return tuple(value)
    if key == "weighted_loss_label":
        if not (isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value)):
            raise InputError(f"{source}: 'weighted_loss_label' must be a list of MAISI label ids, got {value!r}")
        return tuple(value)
    return value


def load_config(stage: str, path: str | Path | None = None, **overrides) -> TrainConfig:
    """The stage's defaults updated by the JSON file ``path`` and then by non-None ``overrides``."""
    if stage not in STAGES:
        raise InputError(f"unknown training stage {stage!r}; use one of {', '.join(STAGES)}")
    config = DEFAULTS[stage]
    ignored: list[str] = []
    if path is not None:
        values = _read_section(stage, Path(path))
        updates = {}
        for key, value in values.items():
            if key in IGNORED_KEYS[stage]:
                ignored.append(key)
            elif key in _FIELD_NAMES:
                updates[key] = _coerce(key, value, str(path))
            else:
                raise InputError(
                    f"{path}: unknown key {key!r} for {stage} training; known keys: "
                    f"{', '.join(sorted(_FIELD_NAMES | IGNORED_KEYS[stage]))}"
                )
        config = replace(config, **updates)
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None}, ignored=tuple(ignored))
    _check(config)
    return config


def _read_section(stage: str, path: Path) -> dict:
    data = read_json(path, "--config")
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a JSON object")
    sections = {name for name in data if name in set(SECTION.values()) | {"data_option"} | OTHER_SECTIONS}
    if not sections:
        return data  # flat: the stage's keys directly
    unknown = [name for name in data if name not in sections]
    if unknown:
        raise InputError(f"--config {path}: unknown key {unknown[0]!r} beside the sections {', '.join(sorted(sections))}")
    if SECTION[stage] not in data:
        raise InputError(f"--config {path}: no '{SECTION[stage]}' section for {stage} training")
    values = dict(data[SECTION[stage]])
    if stage == "vae":
        values.update(data.get("data_option", {}))
    return values


def _check(config: TrainConfig) -> None:
    if config.lr <= 0:
        raise InputError(f"learning rate must be positive, got {config.lr}")
    if config.batch_size < 1 or config.n_epochs < 1:
        raise InputError("batch_size and n_epochs must be at least 1")
    if config.max_steps is not None and config.max_steps < 1:
        raise InputError(f"--max-steps must be at least 1, got {config.max_steps}")
    if config.checkpoint_every < 1 or config.validate_every < 1:
        raise InputError("--checkpoint-every and --validate-every must be at least 1")
    if not isinstance(config.decoder_only, bool):
        raise InputError(f"decoder_only must be true or false, got {config.decoder_only!r}")
    for key in ("bone_weight", "bone_threshold_hu"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{key} must be a finite number, got {value!r}")
    if config.bone_weight <= 0:
        raise InputError(f"--bone-weight (bone_weight) must be positive (1: plain L1), got {config.bone_weight:g}")
    if not -1000.0 < config.bone_threshold_hu < 1000.0:
        raise InputError(f"--bone-threshold-hu (bone_threshold_hu) must lie between -1000 and 1000 HU (the VAE's clipped range), "
                         f"got {config.bone_threshold_hu:g}")
    if config.stage != "vae" and (config.decoder_only or config.bone_weight != 1.0
                                  or config.bone_threshold_hu != DEFAULTS["vae"].bone_threshold_hu):
        raise InputError(f"--train-decoder-only, --bone-weight and --bone-threshold-hu are VAE settings; "
                         f"{config.stage} training does not take them")
    if config.patch_size is not None:
        multiple, smallest = (4, 32) if config.stage == "vae" else (32, 32)
        if any(p < smallest or p % multiple for p in config.patch_size):
            why = ("the VAE quarters it and the adversarial discriminator halves it three times" if config.stage == "vae"
                   else "the UNet halves the latent, a quarter of the image, three times")
            raise InputError(
                f"--patch-size {' '.join(map(str, config.patch_size))}: each side must be a multiple of {multiple} "
                f"and at least {smallest} voxels for {config.stage} training ({why})"
            )
