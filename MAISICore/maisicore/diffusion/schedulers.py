"""Noise schedulers behind one interface, so the sampling loop never branches on their type.

MONAI's ``RFlowScheduler.step`` needs the next timestep and ``set_timesteps`` the latent's voxel
count; ``DDPMScheduler.step`` draws noise. ``Schedule`` hides both differences and keeps MONAI's
arithmetic unchanged (the published models were trained and evaluated with it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.networks import build_scheduler
from ..models.presets import ModelPreset, check_sampler


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
        sampler: how ``advance`` integrates rectified flow over these timesteps (``SAMPLERS``);
            ``euler`` is MONAI's ``RFlowScheduler.step`` (the reference), the only one for DDPM.
    """

    def __init__(self, preset: ModelPreset, num_steps: int | None = None,
                 latent_spatial_shape: tuple[int, int, int] | None = None, sampler: str = "euler"):
        self.kind = preset.scheduler.kind
        self.sampler = check_sampler(sampler, self.kind)
        self._previous: tuple[torch.Tensor, float] | None = None  # ab2: (velocity, step length) of the last step
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

    def evaluations(self) -> int:
        """Network evaluations a sampling run makes (``heun``: two per step but the last; ``ab2``: one
        per step plus one for its Heun start)."""
        n = len(self.steps)
        if self.sampler == "heun" and n:
            return 2 * n - 1
        return n + 1 if self.sampler == "ab2" and n > 1 else n

    def advance(self, denoise_fn, step: Step, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The latent after ``step``, calling ``denoise_fn(x, t)`` (``t`` a (1,) float tensor, scheduler
        units) as the sampler needs.

        - ``euler``: one evaluation, then MONAI's step (bit-identical to the reference). MONAI's
          ``RFlowScheduler.step`` truncates the next timestep to an integer, so its step length is
          ``(t − ⌊t_next⌋) / T``.
        - ``heun`` (second order, trapezoidal): velocity at (x, t), Euler predictor to ``t_next``,
          velocity there, step with their mean; the last step (to t = 0) is plain Euler. Step
          length ``(t − t_next) / T`` in float, T = ``num_train_timesteps``.
        - ``ab2`` (second-order Adams–Bashforth on the non-uniform timesteps, one evaluation per
          step, like DPM-Solver++(2M) for a velocity model): ``x + h·((1 + r/2)·v_n − r/2·v_{n−1})``,
          ``r = h / h_prev``; the first step, the longest, is a Heun step (so N steps cost N + 1
          evaluations; an Euler start gave 6× the error on the ODE of Testing/test_samplers.py).
        """
        t = torch.Tensor((step.t,)).to(x.device)
        velocity = denoise_fn(x, t)
        if self.sampler == "euler":
            return self.step(velocity, step, x, generator)
        h = (float(step.t) - float(step.next_t)) / self.scheduler.num_train_timesteps
        previous, self._previous = self._previous if step.index > 0 else None, (velocity, h)
        if self.sampler == "heun" or previous is None:
            predicted = x + velocity * h
            if float(step.next_t) <= 0:
                return predicted
            velocity_next = denoise_fn(predicted, torch.Tensor((step.next_t,)).to(x.device))
            return x + (velocity + velocity_next) * (h / 2)
        ratio = h / previous[1]
        return x + (velocity * (1 + ratio / 2) - previous[0] * (ratio / 2)) * h

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
