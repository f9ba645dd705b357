"""Latent → image decoding behind one function, so the decoder can be swapped.

``decode_latents`` returns the VAE output on the [0, 1] intensity scale (CT: clip(HU, −1000, 1000)
mapped linearly). Methods:

- ``exact`` (default): our tensor-splitting engine (``maisicore.vae.tsp``), equal to the unsplit decode,
  in memory bounded by ``memory_budget_bytes`` (default: what the device has free); ``devices``
  spreads its slabs over several devices (``--devices``).
- ``sliding-window``: the reference's fallback, MONAI's ``SlidingWindowInferer`` over latent
  windows with Gaussian blending; each window has its own GroupNorm statistics, hence seams.
- ``plain``: MONAI's ``decode_stage_2_outputs`` on the whole latent.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from ..devices import check_decode_method
from ..errors import InputError
from ..precision import autocast_for  # the precision rule; callers import it from here too

DECODERS = ("exact", "sliding-window", "plain")
SLIDING_WINDOW = (48, 48, 48)  # latent voxels (reference config_infer.json)
SLIDING_OVERLAP = 0.6666


@contextlib.contextmanager
def vae_norms_for(autoencoder: torch.nn.Module, numerics=None):
    """The VAE's GroupNorms as ``numerics`` needs them: their float16 output (``norm_float16``, set on
    CUDA from the preset) only under the reference's float16 autocast, which takes it; switched off
    for the duration otherwise (a float32 or bfloat16 decode on CUDA), then restored."""
    if numerics is None or numerics.vae_norm_float16:
        yield
        return
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D

    norms = [m for m in autoencoder.modules() if isinstance(m, MaisiGroupNorm3D) and m.norm_float16]
    for norm in norms:
        norm.norm_float16 = False
    try:
        yield
    finally:
        for norm in norms:
            norm.norm_float16 = True


@torch.no_grad()
def decode_latents(
    autoencoder: torch.nn.Module,
    latents: torch.Tensor,
    scale_factor: float,
    method: str = "exact",
    memory_budget_bytes: int | None = None,
    window: Sequence[int] = SLIDING_WINDOW,
    overlap: float = SLIDING_OVERLAP,
    log: Callable[[str], None] | None = None,
    clip_max: float | None = 1.0,
    devices: Sequence[str | torch.device] | None = None,
    numerics=None,
) -> torch.Tensor:
    """Decode ``latents`` (1, 4, X/4, Y/4, Z/4) to an image (1, 1, X, Y, Z), float32 on CPU, clipped to
    [0, ``clip_max``] (None: only below, as the reference does for MR).

    The latents are divided by ``scale_factor`` first (diffusion works on scaled latents).
    ``devices``: the exact decode's devices (``maisicore.vae.tsp.decode_exact``); default the latents'.
    ``numerics`` (``maisicore.precision.Numerics``): the exact decode's convolution format and the
    other decodes' autocast; default the reference's (float16 autocast on CUDA, float32 on the CPU).
    """
    if method not in DECODERS:
        raise InputError(f"--decode {method!r}: choose one of {', '.join(DECODERS)}")
    check_decode_method(devices, method)
    z = latents / scale_factor
    if method == "exact":
        from .tsp import decode_exact

        try:
            with vae_norms_for(autoencoder, numerics):
                image = decode_exact(autoencoder, z.float(), memory_budget_bytes, device=latents.device, log=log,
                                     devices=devices, numerics=numerics)
        except MemoryError as exc:
            raise InputError(str(exc)) from exc
    elif method == "sliding-window":
        from monai.inferers import SlidingWindowInferer

        roi = [min(w, n) for w, n in zip(window, z.shape[2:])]
        inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=overlap, mode="gaussian",
                                       sw_device=latents.device, device=torch.device("cpu"))
        with vae_norms_for(autoencoder, numerics), autocast_for(latents.device, numerics):
            image = inferer(inputs=z, network=autoencoder.decode_stage_2_outputs)
    else:
        with vae_norms_for(autoencoder, numerics), autocast_for(latents.device, numerics):
            image = autoencoder.decode_stage_2_outputs(z)
    return torch.clip(image.float(), 0.0, clip_max).cpu()


def unit_to_hu(image01):
    """[0, 1] VAE scale → HU: 0 ↦ −1000, 1 ↦ 1000."""
    return image01 * 2000.0 - 1000.0


def unit_to_mr(image01):
    """VAE scale → MR intensity as the reference writes MR images: 0 ↦ 0, 1 ↦ 1000, not clipped above."""
    return image01 * 1000.0


def hu_to_unit(hu):
    """HU → [0, 1] VAE scale, clipped to [−1000, 1000] HU first (how MAISI was trained)."""
    import numpy as np

    return (np.clip(hu, -1000.0, 1000.0) + 1000.0) / 2000.0
