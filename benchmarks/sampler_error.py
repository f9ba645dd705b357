"""Benchmark: error of the final latent of each rectified-flow sampler against a 240-step Euler
solution, per number of network evaluations (``maisicore.diffusion.schedulers``).

Models: ``demo`` (the bundled trained tiny-width network, image-only on its training grid) and
``official`` (official-width rflow-ct UNet, MONAI's random initialisation under a fixed seed with
the zero-started output layer filled, a small latent). Same noise (seed 0) and conditions for all.

The 240-step reference integrates with the exact step lengths ``(t − t_next) / T`` on MONAI's
timesteps for 240 steps. MONAI's ``RFlowScheduler.step`` (our default ``euler``, the reference's)
truncates ``t_next`` to an integer, which lengthens every step by up to 1/T; over 240 steps this
alone moves the result, so the table also gives that 240-step MONAI Euler against the reference.

Error: RMS of (latent − reference) / RMS of the reference, and max |Δ|.

    python benchmarks/sampler_error.py --model demo
    python benchmarks/sampler_error.py --model official --size 64 64 32
"""

from __future__ import annotations

import argparse
import json
import time

EVALUATIONS = (10, 12, 15, 20)
REFERENCE_STEPS = 240


def _steps_for(sampler: str, evaluations: int) -> int:
    """Most steps whose evaluations (``Schedule.evaluations``) stay within ``evaluations``."""
    return {"euler": evaluations, "heun": (evaluations + 1) // 2, "ab2": evaluations - 1}[sampler]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "official"), default="demo")
    parser.add_argument("--size", nargs=3, type=int, help="image voxels (default: demo 128 96 32, official 64 64 32)")
    parser.add_argument("--samplers", default="heun,ab2")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    import torch
    from maisicore.diffusion.sampling import sample, start_sampling
    from maisicore.diffusion.schedulers import Schedule
    from maisicore.models.presets import get_preset
    from maisicore.pipelines.generate import make_denoise_fn, plan_generation

    if args.model == "demo":
        from maisicore.models.weights import demo_weights_dir, load_model

        model = load_model(get_preset("rflow-ct", "tiny"), demo_weights_dir(), "cpu")
        size = args.size or (128, 96, 32)
    else:
        import os
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gpu_check import build_model

        model = build_model(torch.device("cpu"))
        size = args.size or (64, 64, 32)
    preset = model.preset
    plan = plan_generation(preset, size=size, spacing=(3.0, 3.0, 3.0), allow_any_size=True, steps=30)
    denoise = make_denoise_fn(model, plan)
    calls = [0]

    def counted(x, t):
        calls[0] += 1
        return denoise(x, t)

    noise = start_sampling(preset, model.device, plan.latent_shape, 30, 0).noise

    def run(sampler: str, steps: int):
        calls[0] = 0
        started = time.perf_counter()
        with torch.no_grad():
            out = sample(counted, noise, Schedule(preset, steps, plan.latent_shape[1:], sampler))
        return out, calls[0], time.perf_counter() - started

    started = time.perf_counter()
    schedule = Schedule(preset, REFERENCE_STEPS, plan.latent_shape[1:])
    x = noise
    with torch.no_grad():
        for step in schedule.steps:
            h = (float(step.t) - float(step.next_t)) / schedule.scheduler.num_train_timesteps
            x = x + denoise(x, torch.Tensor((step.t,))) * h
    reference, reference_s = x, time.perf_counter() - started
    scale = float(reference.pow(2).mean().sqrt())

    def error(latent):
        return float((latent - reference).pow(2).mean().sqrt()) / scale, float((latent - reference).abs().max())

    rows = []
    cases = [("euler", 30), ("euler", REFERENCE_STEPS)]
    for sampler in [s.strip() for s in args.samplers.split(",") if s.strip()]:
        cases += [(sampler, _steps_for(sampler, n)) for n in EVALUATIONS]
    for sampler, steps in cases:
        latent, evaluations, seconds = run(sampler, steps)
        rel, peak = error(latent)
        rows.append({"sampler": sampler, "steps": steps, "evaluations": evaluations, "relative_rms_error": rel,
                     "max_abs_error": peak, "seconds": seconds})
        print(f"{sampler:<6} {steps:4d} steps {evaluations:4d} evaluations: relative RMS error {rel:.2e}, "
              f"max |Δ| {peak:.2e}, {seconds:.1f} s", flush=True)
    euler30 = rows[0]["relative_rms_error"]
    print(f"\n{args.model} ({preset.key}), image {'×'.join(map(str, size))}, latent "
          f"{'×'.join(map(str, plan.latent_shape[1:]))}; reference: {REFERENCE_STEPS} exact-length Euler steps "
          f"({reference_s:.0f} s)")
    for sampler in {r["sampler"] for r in rows[2:]}:
        reach = [r for r in rows[2:] if r["sampler"] == sampler and r["relative_rms_error"] <= euler30]
        first = min(reach, key=lambda r: r["evaluations"])["evaluations"] if reach else None
        print(f"  {sampler}: reaches the 30-step Euler error ({euler30:.2e}) with "
              f"{first if first else 'more than ' + str(max(EVALUATIONS))} evaluations")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "size": list(size), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
