"""Build MONAI's MAISI networks from a preset, adapted to the device they run on.

The parameters (and so the weight files) are those of the preset. Only settings that hold no
weights are adapted:

- ``use_flash_attention``: MONAI refuses it without CUDA; it is switched off on CPU.
- VAE ``num_splits``: MONAI's one-axis splitting loses the remainder of lengths not divisible by
  the split count and crashes on chunks smaller than its halo; the plain decode runs unsplit
  (``num_splits=1``). Memory-bounded decoding is the job of the decode function.
- VAE ``norm_float16``: the GroupNorm hands float16 to a float32 convolution, which only works
  under CUDA autocast; on CPU the norm output stays float32.
- ControlNet ``use_checkpointing``: a training memory saver, off for inference.
"""

from __future__ import annotations

from typing import Any

import torch

from .presets import ModelPreset


def _network_kwargs(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(kwargs)
    if "use_flash_attention" in out and device.type != "cuda":
        out["use_flash_attention"] = False
    return out


def build_autoencoder(preset: ModelPreset, device: torch.device | str = "cpu") -> torch.nn.Module:
    """MONAI ``AutoencoderKlMaisi`` with the preset's hyper-parameters, on ``device``, eval mode."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
        AutoencoderKlMaisi,
    )

    device = torch.device(device)
    kwargs = _network_kwargs(preset.autoencoder, device)
    kwargs["num_splits"] = 1
    if device.type != "cuda":
        kwargs["norm_float16"] = False
    return AutoencoderKlMaisi(**kwargs).to(device).eval()


def build_diffusion_unet(preset: ModelPreset, device: torch.device | str = "cpu") -> torch.nn.Module:
    """MONAI ``DiffusionModelUNetMaisi`` with the preset's hyper-parameters, on ``device``, eval mode."""
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import (
        DiffusionModelUNetMaisi,
    )

    device = torch.device(device)
    return DiffusionModelUNetMaisi(**_network_kwargs(preset.diffusion_unet, device)).to(device).eval()


def build_controlnet(preset: ModelPreset, device: torch.device | str = "cpu") -> torch.nn.Module:
    """MONAI ``ControlNetMaisi`` with the preset's hyper-parameters, on ``device``, eval mode."""
    from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi

    device = torch.device(device)
    kwargs = _network_kwargs(preset.controlnet, device)
    kwargs["use_checkpointing"] = False
    return ControlNetMaisi(**kwargs).to(device).eval()


def build_scheduler(preset: ModelPreset):
    """A fresh MONAI noise scheduler (``RFlowScheduler`` or ``DDPMScheduler``) as the model was trained."""
    from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

    cls = {"rflow": RFlowScheduler, "ddpm": DDPMScheduler}[preset.scheduler.kind]
    return cls(**preset.scheduler.kwargs)
