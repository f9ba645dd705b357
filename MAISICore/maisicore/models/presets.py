"""Model presets: the one home of every MAISI network hyper-parameter and output-grid rule.

What lives here:
- ``ModelPreset``: network constructor arguments for MONAI's MAISI classes (VAE, diffusion UNet,
  ControlNet), the noise scheduler, the conditions the UNet takes and the reference weight file names.
- ``get_preset(name, width)``: ``rflow-ct`` (v2) and ``ddpm-ct`` (v1) at the ``official`` width,
  exactly as NVIDIA's ``config_network_{rflow,ddpm}.json``, and a ``tiny`` width of each (same
  architecture, fewer channels) for tests and small demos.
- ``OutputGridRules``: the sizes, spacings and field of view the reference accepts.
- The image-only MR models ``rflow-mr`` and ``rflow-mr-brain`` (rflow-ct's VAE and UNet, no ControlNet),
  the modality codes by name (``MODALITY_CODES``, ``MODEL_MODALITIES``, ``modality_code``) and the
  mask-generation networks (``get_mask_generation_preset``).

What is NOT here: building the networks (``maisicore.models.networks``), reading checkpoints
(``maisicore.models.weights``), checking a request against the rules (``maisicore.validation``).

Settings that change no parameter (MONAI's ``num_splits`` tensor splitting, ``norm_float16``,
flash attention, activation checkpointing) are recorded as published; ``maisicore.models.networks``
adapts them to the device at build time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from dataclasses import replace as dataclasses_replace
from typing import Any

CT_MODEL_NAMES = ("rflow-ct", "ddpm-ct")
# Image-only MR models (no ControlNet): the rflow-ct network definition (config_network_rflow.json)
# with other weights; NVIDIA's reference names.
MR_MODEL_NAMES = ("rflow-mr", "rflow-mr-brain")
MODEL_NAMES = CT_MODEL_NAMES + MR_MODEL_NAMES
DEMO_MODEL = "demo"  # the bundled tiny rflow-ct weights (``maisicore.models.weights.demo_weights_dir``)
WIDTHS = ("official", "tiny")
BODY_REGIONS = ("head", "chest", "abdomen", "lower")
CT_MODALITY = 1  # modality_mapping.json: "ct": 1
# The reference's modality codes (modality_mapping.json): the UNet's class label. 0 is the
# "unconditional" label of classifier-free guidance; codes 1-7 are CT, 8 and above MR.
MODALITY_CODES = {
    "unknown": 0, "ct": 1, "ct_wo_contrast": 2, "ct_contrast": 3, "mri": 8, "mri_t1": 9, "mri_t2": 10,
    "mri_flair": 11, "mri_pd": 12, "mri_dwi": 13, "mri_adc": 14, "mri_ssfp": 15, "mri_mra": 16, "mri_t1c": 17,
    "mri_swi": 20, "mri_t1_skull_stripped": 29, "mri_t2_skull_stripped": 30, "mri_flair_skull_stripped": 31,
    "mri_swi_skull_stripped": 32, "mri_mra_skull_stripped": 33,
}
# Modality names each model was trained on (reference docs/inference.md, "Modality codes").
MODEL_MODALITIES = {
    "rflow-ct": ("ct",),
    "ddpm-ct": ("ct",),
    "rflow-mr": ("mri", "mri_t1", "mri_t2", "mri_flair"),
    "rflow-mr-brain": ("mri_t1", "mri_t2", "mri_flair", "mri_swi", "mri_mra", "mri_t1_skull_stripped",
                       "mri_t2_skull_stripped", "mri_flair_skull_stripped", "mri_swi_skull_stripped",
                       "mri_mra_skull_stripped"),
}

# Tiny widths: same blocks, levels, attention placement and conditioning as the official
# networks, with fewer channels (norm groups scaled down so channels stay divisible).
_TINY_AUTOENCODER = {"num_channels": [8, 16, 32], "norm_num_groups": 8}
_TINY_UNET = {"num_channels": [8, 16, 24, 32], "num_head_channels": [0, 0, 8, 8], "norm_num_groups": 8}
_TINY_CONTROLNET = dict(_TINY_UNET, conditioning_embedding_num_channels=[8, 8, 16])


SAMPLERS = ("euler", "heun", "ab2")  # rectified flow; DDPM: euler (MONAI's step) only


def check_sampler(sampler: str, kind: str = "rflow") -> str:
    """``sampler`` if valid for a ``kind`` scheduler, else a one-line ``InputError``."""
    from ..errors import InputError

    if sampler not in SAMPLERS:
        raise InputError(f"--sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if kind != "rflow" and sampler != "euler":
        raise InputError(f"--sampler {sampler}: only for rectified-flow models (rflow-ct); DDPM models use MONAI's step")
    return sampler

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
    controlnet: str | None  # None: an image-only model (the MR models)

    def as_dict(self) -> dict[str, str]:
        """Role → file name of the checkpoints the model has (no ``controlnet`` for image-only models)."""
        files = {"autoencoder": self.autoencoder, "diffusion_unet": self.diffusion_unet, "controlnet": self.controlnet}
        return {role: name for role, name in files.items() if name is not None}


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
    # Models trained on free grids (MR): any size that is a multiple of ``any_size_multiple`` with
    # at most this many voxels (the reference's "max volume", e.g. 512×512×128) and any spacing;
    # None: the published CT grids above.
    max_voxels: int | None = None


GRID_RULES = OutputGridRules()


@dataclass(frozen=True)
class ModelPreset:
    """Everything needed to build and run one MAISI model variant.

    ``autoencoder``/``diffusion_unet``/``controlnet`` are keyword arguments of MONAI's
    ``AutoencoderKlMaisi``, ``DiffusionModelUNetMaisi`` and ``ControlNetMaisi``; ``controlnet`` is
    None for image-only models (MR), which take no mask.
    """

    name: str
    width: str
    autoencoder: dict[str, Any]
    diffusion_unet: dict[str, Any]
    controlnet: dict[str, Any] | None
    scheduler: SchedulerSpec
    weight_files: WeightFiles
    uses_body_region: bool
    uses_modality: bool
    latent_channels: int = 4
    vae_downsample: int = 4
    label_bits: int = 8  # ControlNet condition: label ids as 8 binary channels
    grid: OutputGridRules = field(default=GRID_RULES)
    # What the model makes: "ct" (HU, clipped to [-1000, 1000]) or "mr" (intensities 0-1000 and above,
    # not clipped above, as the reference's image-only MR path writes them).
    intensity: str = "ct"
    modalities: tuple[str, ...] = ("ct",)  # modality names (MODALITY_CODES) it takes
    default_modality: str = "ct"
    default_guidance_scale: float = 0.0  # classifier-free guidance of the reference's inference config
    default_size: tuple[int, int, int] = (256, 256, 256)  # voxels, without a mask or --size
    default_spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)  # mm
    # Initial noise rounded through float16 (the reference's CT paths) or kept float32 (its
    # image-only diff_model_infer path, the only one the MR models have).
    noise_half_rounded: bool = True

    @property
    def key(self) -> str:
        return f"{self.name}/{self.width}"

    @property
    def image_only(self) -> bool:
        """True for models without a ControlNet (no mask): the MR models."""
        return self.controlnet is None


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


# The image-only MR models (reference README, configs/config_maisi_diff_model_rflow-mr*.json and
# environment_*rflow-mr*.json): rflow-ct's VAE and UNet definitions, no ControlNet.
_MR_VARIANTS = {
    "rflow-mr": {
        "files": WeightFiles("autoencoder_v2.pt", "diff_unet_3d_rflow-mr.pt", None),
        "max_voxels": 512 * 512 * 128,
        "default_size": (128, 256, 256),
        "default_spacing": (1.25, 1.0, 1.0),
        "guidance": 15.0,
    },
    "rflow-mr-brain": {
        "files": WeightFiles("autoencoder_v1.pt", "diff_unet_3d_rflow-mr-brain_v1.pt", None),
        "max_voxels": 512 * 512 * 256,
        "default_size": (256, 256, 128),
        "default_spacing": (0.94, 0.94, 1.36),
        "guidance": 2.0,
    },
}


def _official_mr(name: str) -> ModelPreset:
    variant = _MR_VARIANTS[name]
    base = _official("rflow-ct")
    return dataclasses_replace(
        base,
        name=name,
        controlnet=None,
        weight_files=variant["files"],
        grid=OutputGridRules(max_voxels=variant["max_voxels"]),
        intensity="mr",
        modalities=MODEL_MODALITIES[name],
        default_modality="mri_t1",  # the reference configs' "modality": 9
        default_guidance_scale=variant["guidance"],
        default_size=variant["default_size"],
        default_spacing=variant["default_spacing"],
        noise_half_rounded=False,
    )


def _official(name: str) -> ModelPreset:
    if name in _MR_VARIANTS:
        return _official_mr(name)
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
    return dataclasses_replace(
        preset,
        width="tiny",
        autoencoder=dict(copy.deepcopy(preset.autoencoder), **_TINY_AUTOENCODER),
        diffusion_unet=dict(copy.deepcopy(preset.diffusion_unet), **_TINY_UNET),
        controlnet=None if preset.controlnet is None else dict(copy.deepcopy(preset.controlnet), **_TINY_CONTROLNET),
    )


def modality_code(preset: ModelPreset, modality: str | None) -> int:
    """The class label (``MODALITY_CODES``) of ``modality`` for ``preset`` (None: the model's default);
    ``InputError`` naming the choices when the model was not trained on it (e.g. an MR code for a CT model)."""
    from ..errors import InputError

    name = preset.default_modality if modality is None else str(modality)
    if name not in preset.modalities:
        kind = "CT" if preset.intensity == "ct" else "MR"
        raise InputError(f"--modality {name}: {preset.name} is a{'n' if kind == 'MR' else ''} {kind} model; "
                         f"choose one of {', '.join(preset.modalities)}")
    return MODALITY_CODES[name]


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


# ---- mask generation (the reference's controllable-anatomy-size path, maisicore.pipelines.maskgen) ----


@dataclass(frozen=True)
class MaskGenerationPreset:
    """The reference's mask networks (``mask_generation_*`` in config_network_{rflow,ddpm}.json, the
    same in both): a MONAI ``AutoencoderKlMaisi`` whose decoder gives 125 class logits (the 124-class
    label set + background, remapped to MAISI ids by label_dict_124_to_132.json) and a MONAI
    ``DiffusionModelUNet`` conditioned by cross-attention on the 10-entry size vector
    (``anatomy.maskgen.ANATOMY_SIZE_CLASSES``), sampled with DDPM on a (4, 64, 64, 64) latent that
    decodes to 256³ voxels at 1.5 mm."""

    width: str
    autoencoder: dict[str, Any]
    diffusion_unet: dict[str, Any]
    scheduler: SchedulerSpec
    scale_factor: float
    latent_shape: tuple[int, int, int, int]  # (4, X/4, Y/4, Z/4) of the generated mask
    spacing_mm: float = 1.5  # voxel size of the generated mask (isotropic)
    weight_files: tuple[str, str] = ("mask_generation_autoencoder.pt", "mask_generation_diffusion_unet.pt")
    default_steps: int = 1000  # config_infer.json mask_generation_num_inference_steps
    # The reference decodes the mask with the image decode's sliding window when the latent has more
    # voxels than the window (config_infer.json: 48³ latent voxels, overlap 0.6666, gaussian blending).
    decode_window: tuple[int, int, int] = (48, 48, 48)
    decode_overlap: float = 0.6666

    @property
    def key(self) -> str:
        return f"mask-generation/{self.width}"


# The tiny mask UNet's own DDPM (benchmarks/train_tiny_maskgen.py trains it): 50 train timesteps,
# all of them sampled (MONAI's DDPMScheduler.step takes ``alphas_cumprod[t - 1]`` as the previous
# step, exact only when every train timestep is sampled), linear betas ending with about the
# official schedule's remaining signal, and the network predicting the clean latent (``sample``):
# a network this small predicting the noise drifts away from the training latents over the steps.
_TINY_MASK_SCHEDULER = SchedulerSpec(
    kind="ddpm",
    kwargs={"num_train_timesteps": 50, "beta_start": 0.002, "beta_end": 0.25, "schedule": "linear_beta",
            "clip_sample": False, "prediction_type": "sample"},
    default_steps=50,
)


def get_mask_generation_preset(width: str = "official") -> MaskGenerationPreset:
    """The mask networks at ``width`` (``official``: the config files' arguments; ``tiny``: few channels)."""
    if width not in WIDTHS:
        raise ValueError(f"unknown width {width!r}: choose one of {', '.join(WIDTHS)}")
    autoencoder = {
        "spatial_dims": 3, "in_channels": 8, "out_channels": 125, "latent_channels": 4,
        "num_channels": [32, 64, 128], "num_res_blocks": [1, 2, 2], "norm_num_groups": 32, "norm_eps": 1e-06,
        "attention_levels": [False, False, False], "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False, "use_flash_attention": False, "use_checkpointing": True,
        "use_convtranspose": True, "norm_float16": True, "num_splits": 8, "dim_split": 1,
    }
    unet = {
        "spatial_dims": 3, "in_channels": 4, "out_channels": 4, "channels": [64, 128, 256, 512],
        "attention_levels": [False, False, True, True], "num_head_channels": [0, 0, 32, 32], "num_res_blocks": 2,
        "use_flash_attention": True, "with_conditioning": True, "upcast_attention": True, "cross_attention_dim": 10,
    }
    if width == "tiny":  # about 0.6 M parameters; a 64³ mask at 6 mm: the official 384 mm field of view
        autoencoder.update(num_channels=[8, 16, 16], norm_num_groups=8)
        unet.update(channels=[8, 16, 16, 16], num_head_channels=[0, 0, 8, 8], norm_num_groups=8)
        return MaskGenerationPreset(width, autoencoder, unet, _TINY_MASK_SCHEDULER, scale_factor=1.0,
                                    latent_shape=(4, 16, 16, 16), spacing_mm=6.0,
                                    default_steps=_TINY_MASK_SCHEDULER.default_steps)
    return MaskGenerationPreset(width, autoencoder, unet, _VARIANTS["ddpm-ct"]["scheduler"],
                                scale_factor=1.0055984258651733, latent_shape=(4, 64, 64, 64))
