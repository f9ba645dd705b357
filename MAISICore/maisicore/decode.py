"""Latent → image decoding behind one function, so the decoder can be swapped.

``decode_latents`` returns the VAE output on the [0, 1] intensity scale (CT: clip(HU, −1000, 1000)
mapped linearly). The ``plain`` decoder runs MONAI's ``decode_stage_2_outputs`` on the whole latent.
"""

from __future__ import annotations

import contextlib

import torch

DECODERS = ("plain",)


def autocast_for(device: torch.device):
    """Float16 autocast on CUDA (reference), nothing (float32) elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def decode_latents(
    autoencoder: torch.nn.Module, latents: torch.Tensor, scale_factor: float, method: str = "plain"
) -> torch.Tensor:
    """Decode ``latents`` (B, 4, X/4, Y/4, Z/4) to images (B, 1, X, Y, Z) float32 on CPU, clipped to [0, 1].

    The latents are divided by ``scale_factor`` first (they were scaled by it for diffusion).
    """
    if method not in DECODERS:
        raise ValueError(f"unknown decode method {method!r}: choose one of {', '.join(DECODERS)}")
    with autocast_for(latents.device):
        image = autoencoder.decode_stage_2_outputs(latents / scale_factor)
    return torch.clip(image.float(), 0.0, 1.0).cpu()


def unit_to_hu(image01):
    """[0, 1] VAE scale → HU: 0 ↦ −1000, 1 ↦ 1000."""
    return image01 * 2000.0 - 1000.0
