"""Network conditioning: how label masks, spacing, modality and body region become the UNet/ControlNet inputs, for inference and training alike."""

from __future__ import annotations

from typing import Sequence

import torch

from ..anatomy.labels import region_one_hot
from ..models.presets import ModelPreset


def binarize_labels(labels: torch.Tensor, bits: int = 8, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """ControlNet condition: label ids (B, 1, X, Y, Z) integer -> (B, bits, X, Y, Z) 0/1 bit planes of
    ``dtype``, least significant bit first (reference encoding). Filled plane by plane: beyond the
    result it holds one plane of temporaries (not ``bits`` × int64 copies of the volume).

    The result is laid out channels-last (``torch.channels_last_3d``), as the reference's
    ``binarize_labels`` (a permuted view) hands it to the ControlNet: its first convolution then runs
    on the same memory layout and gives the reference's float rounding (a contiguous layout differs by
    up to ~1e-5 in the latents after a few steps, measured on the CPU)."""
    if labels.ndim != 5 or labels.shape[1] != 1:
        raise ValueError(f"labels must be (B, 1, X, Y, Z), got {tuple(labels.shape)}")
    out = torch.empty((labels.shape[0], bits, *labels.shape[2:]), dtype=dtype, device=labels.device,
                      memory_format=torch.channels_last_3d)
    for bit in range(bits):
        out[:, bit] = labels[:, 0].bitwise_right_shift(bit).bitwise_and(1)
    return out


def unet_inputs(
    preset: ModelPreset,
    spacings_mm: Sequence[Sequence[float]],
    modality_codes: Sequence[int] | None = None,
    body_regions: Sequence[Sequence[str]] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    half_rounded: bool,
) -> dict[str, torch.Tensor]:
    """Keyword inputs of the diffusion UNet (and ``class_labels`` of the ControlNet) for a batch.

    Args:
        spacings_mm: one (x, y, z) voxel size per sample, mm; the UNet takes them ×100 (0.01 mm units).
        modality_codes: one code per sample (``modality_mapping.json``; CT = 1, 0 = dropped in
            training) for models conditioned on the modality; ignored by the others.
        body_regions: one (top, …, bottom) region list per sample for models conditioned on the body
            region (ddpm-ct); the UNet takes one-hot vectors ×100.
        half_rounded: round spacing and region vectors through float16 first. The reference does so
            at inference (``torch.FloatTensor(spacing).half() * 1e2``) but not in training, and we
            follow it in both places so that latents stay bit-identical with NVIDIA's code.
        dtype: the dtype of the float inputs on ``device`` (float16 under CUDA autocast, as the reference).
    """

    def scaled(rows) -> torch.Tensor:
        values = torch.tensor([list(map(float, r)) for r in rows], dtype=torch.float32)
        return ((values.half() if half_rounded else values) * 100).to(device, dtype)

    inputs = {"spacing_tensor": scaled(spacings_mm)}
    if preset.uses_modality:
        if modality_codes is None:
            raise ValueError(f"{preset.name} is conditioned on the modality: give modality_codes")
        inputs["class_labels"] = torch.tensor([int(c) for c in modality_codes], dtype=torch.long, device=device)
    if preset.uses_body_region:
        if body_regions is None:
            raise ValueError(f"{preset.name} is conditioned on the body region: give body_regions")
        inputs["top_region_index_tensor"] = scaled([region_one_hot(r[0]) for r in body_regions])
        inputs["bottom_region_index_tensor"] = scaled([region_one_hot(r[-1]) for r in body_regions])
    return inputs


def controlnet_condition(labels: torch.Tensor, preset: ModelPreset, device=None, dtype=torch.float32) -> torch.Tensor:
    """The ControlNet's condition for label ids (B, 1, X, Y, Z): 8 bit planes as ``dtype`` on ``device``."""
    return binarize_labels(labels.to(device or labels.device), preset.label_bits, dtype)


def guided_denoise_fn(diffusion_unet, controlnet, unet_kwargs: dict, condition: torch.Tensor | None,
                      uncond_condition: torch.Tensor | None, scale: float):
    """``denoise_fn(x, t)`` with classifier-free guidance, computed as the reference does
    (``diff_model_infer.run_inference`` without a mask, ``utils_infer.run_controlnet_conditioned_image_dm``
    with one): one batch of two, the conditional half first; the unconditional half has modality
    class label 0 and, with a mask, the ControlNet condition ``uncond_condition`` (the mask without
    tumours); prediction = uncond + ``scale`` · (cond − uncond).

    Args:
        unet_kwargs: the UNet's condition inputs for one sample (``unet_inputs``).
        condition, uncond_condition: ControlNet conditions (1, 8, X, Y, Z), or None without a mask.
    """
    doubled = {k: torch.cat([v, torch.zeros_like(v)]) if k == "class_labels" else torch.cat([v, v])
               for k, v in unet_kwargs.items()}
    if condition is not None and uncond_condition is None:
        raise ValueError("guidance with a mask needs its unconditional ControlNet condition")

    def denoise_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x2, t2 = torch.cat([x, x]), torch.cat([t, t])
        residuals = {}
        if condition is not None:
            extra = {"class_labels": doubled["class_labels"]} if "class_labels" in doubled else {}
            down, mid = controlnet(x=x2, timesteps=t2, controlnet_cond=torch.cat([condition, uncond_condition]),
                                   **extra)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        cond, uncond = diffusion_unet(x=x2, timesteps=t2, **doubled, **residuals).chunk(2)
        return uncond + scale * (cond - uncond)

    return denoise_fn
