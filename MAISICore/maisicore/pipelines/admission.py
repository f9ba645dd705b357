"""Admission control: the peak memory of a whole generation, estimated before any network is built,
against the memory budget (``--memory-budget`` or what the machine has free).

The model (bytes; V = latent voxels, I = image voxels = 64 V):
- ``baseline``: what the process holds now (interpreter, torch), plus the libraries and buffers the
  model load adds (``LOAD_OVERHEAD_BYTES``);
- ``weights``: the three checkpoint files (float32 tensors, as loaded);
- loading: while the UNet and ControlNet are loaded their checkpoint tensors are held beside the
  networks' own (``loading`` = the UNet and ControlNet files);
- denoising: ``activations`` = ``DENOISE_BYTES_PER_LATENT_VOXEL × V`` (UNet + ControlNet forward at
  no_grad: skip connections, ControlNet residuals, and the ControlNet's condition embedding at image
  resolution, which dominates; measured, see below) +
  ``attention`` = 2 × heads × N² × 4 for the largest attention level, only with MONAI's own attention
  (N = tokens at that level; it holds the N × N score matrix and its softmax); 0 with the default
  ``scaled_dot_product_attention`` on CPU and CUDA + ``condition`` = the
  ControlNet's 8 bit planes (float32, 32 B per image voxel) + the mask (int64, 8 B per image voxel);
- decoding: the decode's own planned peak (``maisicore.vae.tsp.make_plan``: MONAI's whole-volume
  decode when it fits, else a split plan) + the image
  arrays (float32 decode, HU, int16 CT, the mask: 18 B per image voxel) + mapping back onto the
  mask's grid when fitted.
Peak = baseline + weights + the largest of the three phases. On CUDA the device memory is estimated
(weights, activations in float16, flash attention: no N² term; the decode's plan).

The per-width constants were measured on CPU with ``benchmarks/memory_model.py`` (peak RSS of each
phase, read from /proc/self/status VmHWM) at sizes other than the ones docs/memory-and-speed.md validates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

GiB = 2**30
# Measured on CPU (float32, torch 2.13, MONAI 1.6): peak RSS of one UNet + ControlNet forward at
# no_grad above the built networks: tiny width 109 MiB at latent 32×32×16 and 301 MiB at 48×48×16,
# i.e. a fixed 56 MiB (first-call workspaces) + 7.0 kB per latent voxel; official width 269 MiB at
# 32³ (7.0 kB with the same fixed part). The image-resolution condition embedding, alike in both
# widths, dominates. The validation runs in docs/memory-and-speed.md are whole generations at other sizes.
DENOISE_BYTES_PER_LATENT_VOXEL = 7_000
DENOISE_FIXED_BYTES = 56 * 2**20
LOAD_OVERHEAD_BYTES = 32 * 2**20  # the networks' module objects and allocator slack beyond the tensors
CONDITION_BYTES_PER_VOXEL = 32 + 8  # float32 bit planes + int64 mask
IMAGE_BYTES_PER_VOXEL = 4 + 4 + 2 + 8  # decoded float32, HU float32, int16 CT, int64 mask
SAFETY_MARGIN_BYTES = 512 * 2**20  # left free for the rest of the machine


@dataclass
class MemoryEstimate:
    """Estimated peak memory of one generation (bytes) and its parts, against a budget."""

    device: str
    parts: dict[str, int] = field(default_factory=dict)
    peak_bytes: int = 0
    peak_phase: str = ""
    budget_bytes: int = 0
    decode_plan: str = ""

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def describe(self) -> str:
        """One line: the estimate, its largest parts and the budget."""
        parts = ", ".join(f"{name} {value / GiB:.2f}" for name, value in self.parts.items() if value >= 0.005 * GiB)
        return (f"estimated peak memory {self.peak_bytes / GiB:.2f} GiB on {self.device} ({self.peak_phase}; GiB: "
                f"{parts}) within a budget of {self.budget_bytes / GiB:.2f} GiB")


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def default_budget_bytes(device_type: str) -> int:
    """What the process may hold: on CPU what it holds now plus the host's available memory, on CUDA
    the device's free memory, less a margin."""
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return max(int(free) - SAFETY_MARGIN_BYTES, 0)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = 8 * GiB
    return max(_resident_bytes() + available - SAFETY_MARGIN_BYTES, 0)


def attention_bytes(preset, latent_shape, device_type: str, attention: str = "sdpa") -> int:
    """Transient bytes of the largest attention layer: MONAI's own attention (``attention="monai"``)
    holds the heads × N × N score matrix and its softmax (float32 on CPU); the default
    ``scaled_dot_product_attention`` path (``models.networks``, CPU and CUDA) works in blocks and
    holds no N × N matrix (its workspace is within the activations' constants)."""
    from ..models.networks import device_settings

    if device_settings(preset.diffusion_unet, device_type, attention)["sdpa"]:
        return 0
    unet = preset.diffusion_unet
    voxels = int(np.prod(latent_shape))
    largest = 0
    for level, (channels, with_attention, head_channels) in enumerate(
        zip(unet["num_channels"], unet["attention_levels"], unet["num_head_channels"])
    ):
        if not with_attention or not head_channels:
            continue
        tokens = voxels // (8**level)
        heads = channels // head_channels
        largest = max(largest, 2 * heads * tokens * tokens * 4)
    return largest


def _weights_bytes(preset, weights_dir: Path) -> tuple[int, int]:
    """(all three checkpoint files, the UNet's and ControlNet's: held twice while loading), bytes."""
    from ..models.weights import weight_file

    sizes = {}
    for role, name in preset.weight_files.as_dict().items():
        path = weight_file(Path(weights_dir), name)
        sizes[role] = path.stat().st_size if path.is_file() else 0
    return sum(sizes.values()), sizes["diffusion_unet"] + sizes.get("controlnet", 0)


def _decode_estimate(preset, latent_shape, budget_bytes: int | None, workers: int = 1) -> tuple[int, str]:
    """The exact split decode's planned peak (bytes) for this latent within ``budget_bytes`` and the
    plan in words; with no budget, the smallest plan's. ``InputError`` when no plan fits.
    ``workers``: the devices of ``--devices`` (each holds its own slab temporaries)."""
    import torch

    from ..models.networks import build_autoencoder
    from ..vae.tsp import decoder_graph, make_plan

    with torch.device("meta"):
        autoencoder = build_autoencoder(preset, "meta")
    _, output = decoder_graph(autoencoder, torch.empty((1, preset.latent_channels, *latent_shape), device="meta"))
    if budget_bytes is None:
        plan = make_plan(output, None, mode="bounded", slab=1, workers=workers)
        return int(plan.estimated_bytes), plan.describe()
    try:
        plan = make_plan(output, budget_bytes, whole=True, workers=workers)
    except MemoryError as exc:
        raise InputError(str(exc)) from exc
    return int(plan.estimated_bytes), plan.describe()


def estimate_generation_memory(prepared, device_type: str = "cpu", budget_bytes: int | None = None,
                               precision=None) -> MemoryEstimate:
    """Peak memory of running ``prepared`` (a ``PreparedGeneration``) on ``device_type``; nothing heavy
    is built (the decode is planned on meta tensors). ``precision`` (``maisicore.precision.PrecisionChoice``):
    the denoising activations at 2 bytes for reduced precisions (bf16, fp16), 4 for fp32, and MONAI's
    N × N attention for ``--reference-numerics``; default the reference's (2 bytes on CUDA, 4 on the CPU)."""
    preset, plan = prepared.preset, prepared.plan
    request = prepared.request
    if budget_bytes is None:
        budget_bytes = (int(request.memory_budget_gb * GiB) if request.memory_budget_gb
                        else default_budget_bytes(device_type))
    latent = tuple(int(s) // preset.vae_downsample for s in plan.size)
    latent_voxels = int(np.prod(latent))
    image_voxels = int(np.prod(plan.size))
    cuda = device_type == "cuda"
    act_bytes = (2 if precision.reduced else 4) if precision is not None else (2 if cuda else 4)
    parts: dict[str, int] = {}
    weights, loading = _weights_bytes(preset, prepared.weights_dir)
    activations = DENOISE_FIXED_BYTES + DENOISE_BYTES_PER_LATENT_VOXEL * latent_voxels * act_bytes // 4
    attention = attention_bytes(preset, latent, device_type, precision.attention if precision is not None else "sdpa")
    mask_generation = getattr(prepared, "mask_generation", None)  # --anatomy-size: a mask is generated first
    condition = CONDITION_BYTES_PER_VOXEL * image_voxels if plan.labels is not None or mask_generation else 0
    if getattr(plan, "guidance_scale", 0) > 0:  # classifier-free guidance: a batch of two (and two conditions)
        activations, attention, condition = 2 * activations, 2 * attention, 2 * condition
    denoise = activations + attention + condition
    arrays = IMAGE_BYTES_PER_VOXEL * image_voxels
    if prepared.original_grid is not None and request.maps_back:
        arrays += 12 * int(np.prod(prepared.original_grid.shape))  # float32 resampling source and result + labels
    # The decode plan first: planning imports MONAI, which the baseline must include. It is planned
    # only when the other phases fit (a huge request is refused at once).
    workers = len(getattr(request, "devices", None) or ()) or 1
    so_far = _resident_bytes() + LOAD_OVERHEAD_BYTES + weights
    room = None if budget_bytes is None else budget_bytes - so_far - arrays
    if budget_bytes is not None and so_far + max(loading, denoise) > budget_bytes:
        decode_peak, decode_plan = 0, "not planned (the request does not fit before decoding)"
    else:
        try:
            decode_peak, decode_plan = _decode_estimate(preset, latent, max(room, 1) if room is not None else None,
                                                        workers)
        except InputError:  # no split plan fits: the smallest plan's need counts
            decode_peak, decode_plan = _decode_estimate(preset, latent, None, workers)[0], "no split plan fits the budget"
    decode = decode_peak + arrays
    parts["baseline"] = 0 if cuda else _resident_bytes() + LOAD_OVERHEAD_BYTES
    parts["weights"] = weights
    parts.update(loading=loading, denoise_activations=activations, attention=attention, condition=condition,
                 decode_activations=decode_peak, image_arrays=arrays)
    phases = [("loading", loading), ("denoising", denoise), ("decoding", decode)]
    if mask_generation is not None:
        parts["mask_generation"] = mask_generation.estimated_bytes(device_type)
        phases.append(("mask generation", parts["mask_generation"]))
    phase, larger = max(phases, key=lambda p: p[1])
    peak = parts["baseline"] + parts["weights"] + larger
    return MemoryEstimate("cuda" if cuda else "cpu", parts, peak, phase, budget_bytes, decode_plan)


def check_admission(prepared, device_type: str = "cpu", budget_bytes: int | None = None,
                    precision=None) -> MemoryEstimate:
    """The estimate, or a one-line ``InputError`` naming the estimate, the budget and what to change
    when the request would not fit."""
    estimate = estimate_generation_memory(prepared, device_type, budget_bytes, precision)
    if not estimate.fits:
        size = "×".join(map(str, prepared.plan.size))
        raise InputError(
            f"{size} voxels need an estimated {estimate.peak_bytes / GiB:.1f} GiB at the {estimate.peak_phase} peak "
            f"on {estimate.device}, more than the {estimate.budget_bytes / GiB:.1f} GiB budget; ask for a smaller "
            "--size, use another device (--device cuda), or raise --memory-budget"
        )
    return estimate
