"""The one denoising loop: every condition is folded into ``denoise_fn`` by the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import Cancelled
from ..models.presets import ModelPreset
from .schedulers import Schedule, Step

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int], None]


def sample(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    schedule: Schedule,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    cancel: Callable[[], bool] | None = None,
    after_step: Callable[[torch.Tensor, Step], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the reverse diffusion from noise ``x``.

    Args:
        denoise_fn: ``(x, t) -> prediction``; ``x`` is (B, C, X, Y, Z), ``t`` a (B,) float tensor.
        x: initial noise latent, (B, C, X, Y, Z).
        schedule: the scheduler and its timesteps.
        generator: random source for stochastic schedulers (DDPM).
        callback: called as ``callback(done_steps, total_steps)`` after each step.
        cancel: checked before each step; returning True raises ``Cancelled``.
        after_step: ``(x, step) -> x`` applied after each step (inpainting puts the known latent back).

    Returns:
        The denoised latent, same shape as ``x``.
    """
    total = len(schedule)
    step: Step
    for step in schedule.steps:
        if cancel is not None and cancel():
            raise Cancelled("cancelled by the user")
        x = schedule.advance(denoise_fn, step, x, generator)  # the schedule's sampler (default: MONAI's Euler step)
        if after_step is not None:
            x = after_step(x, step)
        if callback is not None:
            callback(step.index + 1, total)
    return x


def initial_noise(latent_shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Standard normal latent (1, *latent_shape), rounded to float16 like the reference, on CPU."""
    return torch.randn((1, *latent_shape), generator=generator).half()


@dataclass
class SamplingStart:
    """Where a sampling run starts: the noise latent on its device, the schedule, and the random
    source of stochastic steps (DDPM)."""

    noise: torch.Tensor
    schedule: Schedule
    step_generator: torch.Generator


def start_sampling(
    preset: ModelPreset, device: torch.device, latent_shape: Sequence[int], steps: int, seed: int,
    sampler: str = "euler", float16_noise: bool | None = None,
) -> SamplingStart:
    """The one sampler set-up of generation and inpainting, deterministic for ``seed``.

    Noise is drawn on the CPU from ``seed`` and rounded to float16 as the reference does; on CUDA it
    stays float16 (the reference's dtype under autocast), on CPU it is float32 (CPU runs in float32).
    DDPM's per-step noise comes from the same CPU generator on CPU, from a CUDA generator seeded
    ``seed + 1`` on CUDA. Presets with ``noise_half_rounded=False`` (the MR models, whose only
    reference path, ``diff_model_infer``, draws float32 noise) keep the float32 draw on every device.
    ``float16_noise``: hand the rounded noise over as float16 (default: on CUDA, the reference's
    float16 autocast path); False: as float32 holding the same values (``--precision`` fp32/bf16).
    """
    if float16_noise is None:
        float16_noise = device.type == "cuda"
    generator = torch.Generator("cpu").manual_seed(int(seed))
    if not preset.noise_half_rounded:
        noise = torch.randn((1, *latent_shape), generator=generator).to(device)
    else:
        noise = initial_noise(latent_shape, generator)
        noise = noise.to(device) if float16_noise else noise.float().to(device)
    step_generator = generator if device.type == "cpu" else torch.Generator(device).manual_seed(int(seed) + 1)
    return SamplingStart(noise, Schedule(preset, steps, tuple(latent_shape[1:]), sampler), step_generator)
