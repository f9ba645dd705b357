"""Second-order rectified-flow samplers on MONAI's timesteps: the order shows on an ODE with a known
solution, the default stays MONAI's Euler step, and bad choices are refused with one line."""

from __future__ import annotations

import math

import pytest
import torch
from maisicore.diffusion.sampling import sample
from maisicore.diffusion.schedulers import Schedule
from maisicore.errors import InputError
from maisicore.models.presets import get_preset
from maisicore.pipelines.requests import GenerateRequest

PRESET = get_preset("rflow-ct", "tiny")
LATENT = (8, 8, 8)


def _velocity(x, t):
    """dx/ds = −v with s = t/T: v = x·cos(s) gives x(0) = x(s0)·exp(sin s0)."""
    return x * torch.cos(t / 1000.0).view(-1, 1, 1, 1, 1)


def _error(sampler, steps):
    schedule = Schedule(PRESET, steps, LATENT, sampler)
    x0 = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    calls = []

    def counted(x, t):
        calls.append(float(t))
        return _velocity(x, t.double())

    out = sample(counted, x0, schedule)
    s0 = float(schedule.steps[0].t) / 1000.0
    assert len(calls) == schedule.evaluations()
    return abs(float(out) - math.exp(math.sin(s0)))


def test_second_order_samplers_converge_at_second_order():
    # Halving the step divides a second-order error by 4, a first-order one by 2; measured from 20 to
    # 40 steps: heun 4.0, ab2 3.3 (the shifted timesteps are far from uniform).
    for sampler in ("heun", "ab2"):
        coarse, fine = _error(sampler, 20), _error(sampler, 40)
        assert coarse / fine > 3.0, sampler
    assert Schedule(PRESET, 10, LATENT, "heun").evaluations() == 19
    assert Schedule(PRESET, 10, LATENT, "ab2").evaluations() == 11
    # At 15 evaluations either is closer than 30 MONAI Euler steps.
    assert _error("ab2", 14) < _error("euler", 30)
    assert _error("heun", 8) < _error("euler", 30)


def test_euler_is_monais_step():
    schedule = Schedule(PRESET, 6, LATENT)
    x = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(0))
    expected = x
    for step in schedule.steps:
        expected, _ = schedule.scheduler.step(_velocity(expected, step.t.float().view(1)), step.t, expected, step.next_t)
    assert torch.equal(sample(_velocity, x, schedule), expected)


def test_bad_sampler_refused():
    with pytest.raises(InputError, match="--sampler 'rk4'"):
        GenerateRequest(model="demo", sampler="rk4").check()
    with pytest.raises(InputError, match="rectified-flow"):
        Schedule(get_preset("ddpm-ct", "tiny"), 4, LATENT, "heun")
