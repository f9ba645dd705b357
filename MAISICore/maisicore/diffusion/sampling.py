"""The one denoising loop: every condition is folded into ``denoise_fn`` by the pipeline."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import Cancelled
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
        t = torch.Tensor((step.t,)).to(x.device)
        model_output = denoise_fn(x, t)
        x = schedule.step(model_output, step, x, generator)
        if after_step is not None:
            x = after_step(x, step)
        if callback is not None:
            callback(step.index + 1, total)
    return x
