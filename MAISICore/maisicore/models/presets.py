"""Model presets: the one home of every MAISI network hyper-parameter and output-grid rule.

What lives here:
- ``ModelPreset``: network constructor arguments for MONAI's MAISI classes (VAE, diffusion UNet,
  ControlNet), the noise scheduler, the conditions the UNet takes and the reference weight file names.
- ``get_preset(name, width)``: ``rflow-ct`` (v2) and ``ddpm-ct`` (v1) at the ``official`` width,
  exactly as NVIDIA's ``config_network_{rflow,ddpm}.json``, and a ``tiny`` width of each (same
  architecture, fewer channels) for tests and small demos.
- ``OutputGridRules``: the sizes, spacings and field of view the reference accepts.

What is NOT here: building the networks (``maisicore.models.networks``), reading checkpoints
(``maisicore.models.weights``), checking a request against the rules (``maisicore.validation``).

Settings that change no parameter (MONAI's ``num_splits`` tensor splitting, ``norm_float16``,
flash attention, activation checkpointing) are recorded as published; ``maisicore.models.networks``
adapts them to the device at build time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

MODEL_NAMES = ("rflow-ct", "ddpm-ct")
DEMO_MODEL = "demo"  # the bundled tiny rflow-ct weights (``maisicore.models.weights.demo_weights_dir``)
WIDTHS = ("official", "tiny")
BODY_REGIONS = ("head", "chest", "abdomen", "lower")
CT_MODALITY = 1  # modality_mapping.json: "ct": 1

# Tiny widths: same blocks, levels, attention placement and conditioning as the official
# networks, with fewer channels (norm groups scaled down so channels stay divisible).
_TINY_AUTOENCODER = {"num_channels": [8, 16, 32], "norm_num_groups": 8}
_TINY_UNET = {"num_channels": [8, 16, 24, 32], "num_head_channels": [0, 0, 8, 8], "norm_num_groups": 8}
_TINY_CONTROLNET = dict(_TINY_UNET, conditioning_embedding_num_channels=[8, 8, 16])


@dataclass(frozen=True)
class SchedulerSpec:
    """Which MONAI noise scheduler the diffusion model was trained with, and its arguments."""

    kind: str  # "rflow" | "ddpm"
    kwargs: dict[str, Any]
    default_steps: int


@dataclass(frozen=True)
class WeightFiles:
    """Reference checkpoint file names (under ``models/`` in NVIDIA's layout)."""

    autoencoder: str
    diffusion_unet: str
    controlnet: str

    def as_dict(self) -> dict[str, str]:
        return {"autoencoder": self.autoencoder, "diffusion_unet": self.diffusion_unet, "controlnet": self.controlnet}


@dataclass(frozen=True)
class OutputGridRules:
    """Output grids the published models were trained for (reference ``check_input_ct``).

    Sizes are voxels (x, y, z); spacings mm; field of view (FOV) = size × spacing, mm.
    """

    inplane_sizes: tuple[int, ...] = (256, 384, 512)
    slice_sizes: tuple[int, ...] = (128, 256, 384, 512, 640, 768)
    inplane_spacing_mm: tuple[float, float] = (0.5, 3.0)
    slice_spacing_mm: tuple[float, float] = (0.5, 5.0)
    min_inplane_fov_mm: float = 256.0  # below this the reference refuses
    recommended_inplane_fov_mm: float = 384.0  # below this (other than head) the reference warns
    # --allow-any-size: the VAE divides by 4 and the diffusion UNet halves the latent 3 times.
    any_size_multiple: int = 32


GRID_RULES = OutputGridRules()


@dataclass(frozen=True)
class ModelPreset:
    """Everything needed to build and run one MAISI model variant.

    ``autoencoder``/``diffusion_unet``/``controlnet`` are keyword arguments of MONAI's
    ``AutoencoderKlMaisi``, ``DiffusionModelUNetMaisi`` and ``ControlNetMaisi``.
    """

    name: str
    width: str
    autoencoder: dict[str, Any]
    diffusion_unet: dict[str, Any]
    controlnet: dict[str, Any]
    scheduler: SchedulerSpec
    weight_files: WeightFiles
    uses_body_region: bool
    uses_modality: bool
    latent_channels: int = 4
    vae_downsample: int = 4
    label_bits: int = 8  # ControlNet condition: label ids as 8 binary channels
    grid: OutputGridRules = field(default=GRID_RULES)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.width}"


def _autoencoder_official(num_splits: int) -> dict[str, Any]:
    return {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "latent_channels": 4,
        "num_channels": [64, 128, 256],
        "num_res_blocks": [2, 2, 2],
        "norm_num_groups": 32,
        "norm_eps": 1e-06,
        "attention_levels": [False, False, False],
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
        "use_checkpointing": False,
        "use_convtranspose": False,
        "norm_float16": True,
        "num_splits": num_splits,
        "dim_split": 1,
    }


def _unet_common() -> dict[str, Any]:
    return {
        "spatial_dims": 3,
        "in_channels": 4,
        "num_channels": [64, 128, 256, 512],
        "attention_levels": [False, False, True, True],
        "num_head_channels": [0, 0, 32, 32],
        "num_res_blocks": 2,
        "use_flash_attention": True,
    }


# What differs between the two published models (config_network_{rflow,ddpm}.json).
_VARIANTS = {
    "rflow-ct": {
        "blocks": {"num_class_embeds": 128, "resblock_updown": True, "include_fc": True},
        "body_region": False,
        "vae_num_splits": 4,
        "scheduler": SchedulerSpec(
            kind="rflow",
            kwargs={
                "num_train_timesteps": 1000,
                "use_discrete_timesteps": False,
                "use_timestep_transform": True,
                "sample_method": "uniform",
                "scale": 1.4,
            },
            default_steps=30,
        ),
        "files": WeightFiles("autoencoder_v1.pt", "diff_unet_3d_rflow-ct.pt", "controlnet_3d_rflow-ct.pt"),
    },
    "ddpm-ct": {
        "blocks": {"include_fc": False, "resblock_updown": False},
        "body_region": True,
        "vae_num_splits": 8,
        "scheduler": SchedulerSpec(
            kind="ddpm",
            kwargs={
                "num_train_timesteps": 1000,
                "beta_start": 0.0015,
                "beta_end": 0.0195,
                "schedule": "scaled_linear_beta",
                "clip_sample": False,
            },
            default_steps=1000,
        ),
        "files": WeightFiles("autoencoder_v1.pt", "diff_unet_3d_ddpm-ct.pt", "controlnet_3d_ddpm-ct.pt"),
    },
}


def _official(name: str) -> ModelPreset:
    if name not in _VARIANTS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    variant = _VARIANTS[name]
    region = variant["body_region"]
    unet = dict(
        _unet_common(),
        out_channels=4,
        include_top_region_index_input=region,
        include_bottom_region_index_input=region,
        include_spacing_input=True,
        **variant["blocks"],
    )
    controlnet = dict(
        _unet_common(),
        conditioning_embedding_in_channels=8,
        conditioning_embedding_num_channels=[8, 32, 64],
        **variant["blocks"],
    )
    return ModelPreset(
        name=name,
        width="official",
        autoencoder=_autoencoder_official(num_splits=variant["vae_num_splits"]),
        diffusion_unet=unet,
        controlnet=controlnet,
        scheduler=variant["scheduler"],
        weight_files=variant["files"],
        uses_body_region=region,
        uses_modality="num_class_embeds" in variant["blocks"],
    )


def get_preset(name: str, width: str = "official") -> ModelPreset:
    """Return the preset for model ``name`` (``rflow-ct``/``ddpm-ct``) at ``width`` (``official``/``tiny``)."""
    if width not in WIDTHS:
        raise ValueError(f"unknown width {width!r}: choose one of {', '.join(WIDTHS)}")
    preset = _official(name)
    if width == "official":
        return preset
    return ModelPreset(
        name=preset.name,
        width="tiny",
        autoencoder=dict(copy.deepcopy(preset.autoencoder), **_TINY_AUTOENCODER),
        diffusion_unet=dict(copy.deepcopy(preset.diffusion_unet), **_TINY_UNET),
        controlnet=dict(copy.deepcopy(preset.controlnet), **_TINY_CONTROLNET),
        scheduler=preset.scheduler,
        weight_files=preset.weight_files,
        uses_body_region=preset.uses_body_region,
        uses_modality=preset.uses_modality,
    )


def discriminator_kwargs(width: str = "official") -> dict[str, Any]:
    """MONAI ``PatchDiscriminator`` arguments of the VAE's adversarial loss (reference VAE training:
    3 layers, 32 channels; ``tiny``: 8 channels)."""
    if width not in WIDTHS:
        raise ValueError(f"unknown width {width!r}: choose one of {', '.join(WIDTHS)}")
    return {"spatial_dims": 3, "num_layers_d": 3, "channels": 32 if width == "official" else 8,
            "in_channels": 1, "out_channels": 1, "norm": "INSTANCE"}


# Reference inference defaults (config_infer.json) when neither a mask nor a size is given.
DEFAULT_SIZE = (256, 256, 256)
DEFAULT_SPACING_MM = (1.5, 1.5, 2.0)
# ddpm-ct without --body-region or a mask: config_infer.json's body_region. On purpose not the
# chest→abdomen of the reference's image-only script (config_maisi_diff_model_ddpm-ct.json).
DEFAULT_BODY_REGION = ("chest",)
