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
    """A MONAI scheduler set up for one sampling run, or for training.

    Args:
        preset: the model preset (which scheduler, with which arguments).
        num_steps: number of denoising steps (rflow-ct: 30; ddpm-ct: 1000 as trained); None for a
            training schedule (``training_timesteps``, ``training_target``, ``noised``).
        latent_spatial_shape: (X, Y, Z) of the latent, voxels; RFlow shifts its timesteps by it.
    """

    def __init__(self, preset: ModelPreset, num_steps: int | None = None,
                 latent_spatial_shape: tuple[int, int, int] | None = None):
        self.kind = preset.scheduler.kind
        self.scheduler = build_scheduler(preset)
        self.steps: list[Step] = []
        if num_steps is None:
            return
        if self.kind == "rflow":
            numel = torch.prod(torch.tensor(latent_spatial_shape))
            self.scheduler.set_timesteps(num_inference_steps=num_steps, input_img_size_numel=numel)
        else:
            self.scheduler.set_timesteps(num_inference_steps=num_steps)
        timesteps = self.scheduler.timesteps
        next_timesteps = torch.cat((timesteps[1:], torch.tensor([0], dtype=timesteps.dtype)))
        self.steps = [Step(i, t, n) for i, (t, n) in enumerate(zip(timesteps, next_timesteps))]

    def training_timesteps(self, generators: list[torch.Generator], latent_shape) -> torch.Tensor:
        """One training timestep per sample, each drawn from that sample's generator (so a batch
        split over processes draws the same values). RFlow: uniform in [0, T) then MONAI's timestep
        transform for the latent's voxel count (``latent_shape`` = (C, X, Y, Z)), as MONAI's
        ``sample_timesteps`` does with the global RNG; DDPM: integers in [0, T)."""
        scheduler = self.scheduler
        if self.kind == "rflow":
            from monai.networks.schedulers.rectified_flow import timestep_transform

            u = torch.cat([torch.rand((1,), generator=g) for g in generators])
            t = u * scheduler.num_train_timesteps
            if scheduler.use_discrete_timesteps:
                t = t.long()
            if scheduler.use_timestep_transform:
                t = timestep_transform(t, input_img_size_numel=torch.prod(torch.tensor(latent_shape[1:])),
                                       base_img_size_numel=scheduler.base_img_size_numel,
                                       num_train_timesteps=scheduler.num_train_timesteps, spatial_dim=3)
            return t
        return torch.cat([torch.randint(0, scheduler.num_train_timesteps, (1,), generator=g) for g in generators]).long()

    def training_target(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network learns to predict: the velocity x0 − ε (RFlow) or the noise (DDPM)."""
        return clean - noise if self.kind == "rflow" else noise

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
