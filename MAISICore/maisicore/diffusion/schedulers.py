"""Noise schedulers behind one interface, so the sampling loop never branches on their type.

MONAI's ``RFlowScheduler.step`` needs the next timestep and ``set_timesteps`` the latent's voxel
count; ``DDPMScheduler.step`` draws noise. ``Schedule`` hides both differences and keeps MONAI's
arithmetic unchanged (the published models were trained and evaluated with it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.networks import build_scheduler
from ..models.presets import ModelPreset


@dataclass(frozen=True)
class Step:
    """One denoising step: current timestep ``t`` and the next one (0 after the last)."""

    index: int
    t: torch.Tensor  # 0-d tensor, scheduler units (0..num_train_timesteps)
    next_t: torch.Tensor


class Schedule:
    """A MONAI scheduler set up for one sampling run.

    Args:
        preset: the model preset (which scheduler, with which arguments).
        num_steps: number of denoising steps (rflow-ct: 30; ddpm-ct: 1000 as trained).
        latent_spatial_shape: (X, Y, Z) of the latent, voxels; RFlow shifts its timesteps by it.
    """

    def __init__(self, preset: ModelPreset, num_steps: int, latent_spatial_shape: tuple[int, int, int]):
        self.kind = preset.scheduler.kind
        self.scheduler = build_scheduler(preset)
        if self.kind == "rflow":
            numel = torch.prod(torch.tensor(latent_spatial_shape))
            self.scheduler.set_timesteps(num_inference_steps=num_steps, input_img_size_numel=numel)
        else:
            self.scheduler.set_timesteps(num_inference_steps=num_steps)
        timesteps = self.scheduler.timesteps
        next_timesteps = torch.cat((timesteps[1:], torch.tensor([0], dtype=timesteps.dtype)))
        self.steps = [Step(i, t, n) for i, (t, n) in enumerate(zip(timesteps, next_timesteps))]

    def __len__(self) -> int:
        return len(self.steps)

    def step(
        self, model_output: torch.Tensor, step: Step, x: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Return the latent after ``step`` given the model's prediction (velocity or noise)."""
        if self.kind == "rflow":
            x_next, _ = self.scheduler.step(model_output, step.t, x, step.next_t)
        else:
            x_next, _ = self.scheduler.step(model_output, step.t, x, generator=generator)
        return x_next

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``clean`` diffused to timestep ``t`` with ``noise`` (the training forward process);
        ``t`` = 0 gives ``clean``."""
        if float(t) <= 0:
            return clean
        if self.kind == "rflow":
            timesteps = torch.full((clean.shape[0],), float(t), device=clean.device)
        else:
            timesteps = torch.full((clean.shape[0],), int(t), dtype=torch.long, device=clean.device)
        return self.scheduler.add_noise(original_samples=clean, noise=noise, timesteps=timesteps).to(clean.dtype)
