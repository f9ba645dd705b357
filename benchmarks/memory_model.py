"""Peak memory of a generation, phase by phase, next to the admission estimate
(``maisicore.pipelines.admission``). CPU; Linux (reads /proc/self/status VmHWM and resets it
through /proc/self/clear_refs between phases).

    python benchmarks/memory_model.py --model demo --size 128 96 32 --spacing 3 3 3 --mask
    python benchmarks/memory_model.py --weights-dir W_OFFICIAL --size 128 128 128 --spacing 3 3 3 --mask --steps 1

Prints, in GiB: the RSS before loading, after loading, the peak of denoising and of decoding, the
estimate of each part and the whole; and the per-latent-voxel activation bytes of the denoising
phase (what ``DENOISE_BYTES_PER_LATENT_VOXEL`` holds). Run each size in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

GiB = 2**30


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def synthetic_mask(size, spacing):
    """Body (200) with liver (1), spleen (3), left kidney (14) and a hepatic tumour (26)."""
    from maisicore.io.geometry import Volume, centered_affine

    grid = np.indices(size, dtype=np.float32)
    centre = (np.asarray(size, dtype=np.float32) - 1) / 2
    norm = [(g - c) / (s / 2) for g, c, s in zip(grid, centre, size)]
    labels = np.zeros(size, np.int16)
    labels[norm[0] ** 2 + norm[1] ** 2 < 0.8] = 200
    labels[((norm[0] + 0.3) / 0.35) ** 2 + (norm[1] / 0.3) ** 2 + (norm[2] / 0.5) ** 2 < 1] = 1
    labels[((norm[0] - 0.4) / 0.15) ** 2 + ((norm[1] - 0.3) / 0.15) ** 2 + (norm[2] / 0.3) ** 2 < 1] = 3
    labels[((norm[0] - 0.3) / 0.1) ** 2 + ((norm[1] + 0.4) / 0.1) ** 2 + (norm[2] / 0.2) ** 2 < 1] = 14
    labels[((norm[0] + 0.3) / 0.08) ** 2 + (norm[1] / 0.08) ** 2 + (norm[2] / 0.1) ** 2 < 1] = 26
    return Volume(labels, centered_affine(tuple(size), tuple(spacing)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rflow-ct")
    parser.add_argument("--weights-dir")
    parser.add_argument("--size", nargs=3, type=int, required=True)
    parser.add_argument("--spacing", nargs=3, type=float, default=(3.0, 3.0, 3.0))
    parser.add_argument("--mask", action="store_true", help="follow a synthetic mask (ControlNet)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    import torch
    from maisicore.pipelines.admission import attention_bytes, estimate_generation_memory
    from maisicore.pipelines.generate import GeneratePipeline, prepare_generation
    from maisicore.pipelines.requests import GenerateRequest

    torch.set_num_threads(torch.get_num_threads())
    request = GenerateRequest(model=args.model, weights_dir=args.weights_dir, size=None if args.mask else args.size,
                              spacing=None if args.mask else list(args.spacing), steps=args.steps, device="cpu",
                              allow_any_size=True, fit="never")
    mask = synthetic_mask(args.size, args.spacing) if args.mask else None
    prepared = prepare_generation(request, mask=mask)
    estimate = estimate_generation_memory(prepared, "cpu")
    before_load = status_kib("VmRSS")
    reset_peak()
    started = time.perf_counter()
    pipeline = GeneratePipeline.from_request(request)
    load_s = time.perf_counter() - started
    after_load = status_kib("VmRSS")
    load_peak = status_kib("VmHWM")
    phases: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "decode" and done == 0:
            phases["denoising"] = status_kib("VmHWM")
            reset_peak()

    reset_peak()
    started = time.perf_counter()
    pipeline(prepared, progress=progress)
    run_s = time.perf_counter() - started
    phases["decoding"] = status_kib("VmHWM")
    measured_peak = max(load_peak, *phases.values())
    preset = prepared.preset
    latent = [s // preset.vae_downsample for s in prepared.plan.size]
    latent_voxels = int(np.prod(latent))
    parts = estimate.parts
    activation_per_voxel = (phases["denoising"] - after_load - parts["attention"] - parts["condition"]) / latent_voxels
    numbers = {
        "model": preset.key, "size": list(prepared.plan.size), "latent": latent, "steps": args.steps,
        "rss_before_load_gib": before_load / GiB, "rss_after_load_gib": after_load / GiB,
        "peak_load_gib": load_peak / GiB, "peak_denoising_gib": phases["denoising"] / GiB,
        "peak_decoding_gib": phases["decoding"] / GiB, "measured_peak_gib": measured_peak / GiB,
        "estimated_peak_gib": estimate.peak_bytes / GiB, "estimated_phase": estimate.peak_phase,
        "estimate_over_measured": estimate.peak_bytes / measured_peak,
        "estimate_parts_gib": {k: v / GiB for k, v in parts.items()},
        "attention_gib": attention_bytes(preset, latent, "cpu") / GiB,
        "measured_denoise_bytes_per_latent_voxel": activation_per_voxel,
        "load_s": load_s, "run_s": run_s, "decode_plan": estimate.decode_plan,
    }
    print(json.dumps(numbers, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=2)


if __name__ == "__main__":
    main()
