"""Build MONAI's MAISI networks from a preset, adapted to the device they run on.

The parameters (and so the weight files) are those of the preset. Only settings that hold no
weights are adapted:

- ``use_flash_attention``: the published configs set it, and the reference runs it on CUDA. MONAI's
  constructors refuse it when CUDA is absent (they check ``torch.cuda.is_available()``, not the
  device), so the networks are always constructed with it off and ``configure_for_device`` then sets
  the public ``use_flash_attention`` attribute of every MONAI ``SABlock`` (read at each forward): the
  block then calls ``torch.nn.functional.scaled_dot_product_attention`` (SDPA) with the same q, k, v
  and scale instead of materialising the heads × N × N score matrix. This is done on every device
  (CUDA: flash/memory-efficient kernels, as the reference; CPU: PyTorch's CPU flash kernel), so CPU
  runs are no longer limited by attention memory. ``attention="monai"`` keeps MONAI's N × N path.
- VAE ``num_splits``: MONAI's one-axis splitting loses the remainder of lengths not divisible by
  the split count and crashes on chunks smaller than its halo; the plain decode runs unsplit
  (``num_splits=1``). Memory-bounded decoding is the job of the decode function.
- VAE ``norm_float16``: the GroupNorm hands float16 to a float32 convolution, which only works
  under CUDA autocast; kept as the preset says on CUDA, off elsewhere.

The decision is made from the *target* device (``device_settings``), never from where a network was
constructed: ``maisicore.models.weights.load_model`` builds on the CPU, loads the checkpoints, then
calls ``configure_for_device`` for the device the networks will run on.
- ControlNet ``use_checkpointing``: a training memory saver, off for inference.
"""

from __future__ import annotations

from typing import Any

import torch

from .presets import ModelPreset

ATTENTION_MODES = ("sdpa", "monai")


def _network_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments MONAI accepts on any machine: flash attention is switched on after
    construction (``configure_for_device``), never at construction."""
    out = dict(kwargs)
    if "use_flash_attention" in out:
        out["use_flash_attention"] = False
    return out


def device_settings(preset_kwargs: dict[str, Any], device: torch.device | str, attention: str = "sdpa") -> dict[str, bool]:
    """Run-time settings (no weights) for a network with the preset's ``preset_kwargs`` on ``device``.

    Returns ``{"sdpa": bool, "norm_float16": bool}``: ``sdpa`` — attention blocks use
    ``scaled_dot_product_attention`` (the preset has attention and ``attention == "sdpa"``; the
    preset's ``use_flash_attention`` is honoured on CUDA, and on CPU too: the same mathematics
    without the N × N matrix); ``norm_float16`` — the VAE's GroupNorm outputs float16 (only where
    the preset says so and the device is CUDA, whose autocast takes it).
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"unknown attention {attention!r}: choose one of {', '.join(ATTENTION_MODES)}")
    device = torch.device(device)
    return {
        "sdpa": attention == "sdpa" and bool(preset_kwargs.get("use_flash_attention", False)),
        "norm_float16": device.type == "cuda" and bool(preset_kwargs.get("norm_float16", False)),
    }


def set_sdpa_attention(module: torch.nn.Module, enabled: bool = True) -> int:
    """Switch every MONAI ``SABlock`` in ``module`` to (or off) PyTorch's
    ``scaled_dot_product_attention``, in place; returns how many blocks were set.

    MONAI's ``SABlock.forward`` reads its public ``use_flash_attention`` attribute at each call;
    that path is valid only without ``save_attn``, relative positional embeddings or causal masks,
    which the MAISI networks never use (checked here).
    """
    from monai.networks.blocks.selfattention import SABlock

    count = 0
    for block in module.modules():
        if isinstance(block, SABlock):
            if enabled and (block.save_attn or block.rel_positional_embedding is not None or block.causal):
                raise ValueError("scaled_dot_product_attention cannot replace an attention block that saves its "
                                 "attention, has relative positions or is causal")
            block.use_flash_attention = bool(enabled)
            count += 1
    return count


def configure_for_device(module: torch.nn.Module, preset_kwargs: dict[str, Any], device: torch.device | str,
                         attention: str = "sdpa") -> torch.nn.Module:
    """Apply ``device_settings`` to a built network (attention blocks, VAE GroupNorms) without
    moving it; returns ``module``."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D

    settings = device_settings(preset_kwargs, device, attention)
    set_sdpa_attention(module, settings["sdpa"])
    for norm in module.modules():
        if isinstance(norm, MaisiGroupNorm3D):
            norm.norm_float16 = settings["norm_float16"]
    return module


def build_autoencoder(preset: ModelPreset, device: torch.device | str = "cpu") -> torch.nn.Module:
    """MONAI ``AutoencoderKlMaisi`` with the preset's hyper-parameters, on ``device``, eval mode."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
        AutoencoderKlMaisi,
    )

    device = torch.device(device)
    kwargs = _network_kwargs(preset.autoencoder)
    kwargs["num_splits"] = 1
    kwargs["norm_float16"] = False
    network = configure_for_device(AutoencoderKlMaisi(**kwargs), preset.autoencoder, device)
    return network.to(device).eval()


def build_diffusion_unet(preset: ModelPreset, device: torch.device | str = "cpu",
                         attention: str = "sdpa") -> torch.nn.Module:
    """MONAI ``DiffusionModelUNetMaisi`` with the preset's hyper-parameters, on ``device``, eval mode;
    ``attention``: ``sdpa`` (default) or ``monai`` (MONAI's N × N attention)."""
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import (
        DiffusionModelUNetMaisi,
    )

    device = torch.device(device)
    network = DiffusionModelUNetMaisi(**_network_kwargs(preset.diffusion_unet))
    return configure_for_device(network, preset.diffusion_unet, device, attention).to(device).eval()


def build_controlnet(preset: ModelPreset, device: torch.device | str = "cpu",
                     attention: str = "sdpa") -> torch.nn.Module:
    """MONAI ``ControlNetMaisi`` with the preset's hyper-parameters, on ``device``, eval mode;
    ``attention`` as ``build_diffusion_unet``."""
    from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi

    if preset.controlnet is None:
        raise ValueError(f"{preset.key} is an image-only model: it has no ControlNet")
    device = torch.device(device)
    kwargs = _network_kwargs(preset.controlnet)
    kwargs["use_checkpointing"] = False
    network = ControlNetMaisi(**kwargs)
    return configure_for_device(network, preset.controlnet, device, attention).to(device).eval()


def build_scheduler(preset: ModelPreset):
    """A fresh MONAI noise scheduler (``RFlowScheduler`` or ``DDPMScheduler``) as the model was trained."""
    from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

    cls = {"rflow": RFlowScheduler, "ddpm": DDPMScheduler}[preset.scheduler.kind]
    return cls(**preset.scheduler.kwargs)


def build_mask_networks(preset, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module]:
    """The mask autoencoder (MONAI ``AutoencoderKlMaisi``) and mask diffusion UNet (MONAI
    ``DiffusionModelUNet``) of a ``presets.MaskGenerationPreset``, on ``device``, eval mode. As for
    the image networks only weight-free settings are adapted: no activation checkpointing, the VAE
    unsplit and its float16 norm and the UNet's flash attention only on CUDA."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
    from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet

    device = torch.device(device)
    cuda = device.type == "cuda"
    autoencoder = dict(preset.autoencoder, num_splits=1, use_checkpointing=False,
                       norm_float16=preset.autoencoder["norm_float16"] and cuda)
    unet = dict(preset.diffusion_unet, use_flash_attention=preset.diffusion_unet["use_flash_attention"] and cuda)
    return AutoencoderKlMaisi(**autoencoder).to(device).eval(), DiffusionModelUNet(**unet).to(device).eval()
