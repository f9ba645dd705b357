"""Benchmark: CPU memory and time of the official-width UNet + ControlNet forward, MONAI's default
path vs maisicore's.

Variants (``--variants``):

- ``monai``: MONAI's forward with its own N × N attention (``attention="monai", forward="monai"``);
- ``sdpa``: MONAI's forward, attention through ``scaled_dot_product_attention``
  (``maisicore.models.networks.set_sdpa_attention``; ``forward="monai"``);
- ``maisicore``: what maisicore runs (the defaults of ``build_diffusion_unet``/``build_controlnet``):
  SDPA attention and the lean inference forward (``set_lean_forward``: in-place activations, early
  frees, the ControlNet's conditioning embedding in depth slabs above ``STREAM_MIN_BYTES``).

Random official-width rflow-ct weights (MONAI's initialisation under a fixed seed, the zero-started
output layers filled so every block acts), a fixed-seed latent and a random 8-plane ControlNet
condition at image resolution (held by the caller in every variant, as the sampler holds it). One
forward of the ControlNet and of the UNet fed its residuals, at no_grad, float32. Each (variant,
run) runs in its own child process; its peak RSS is the child's VmHWM (/proc/self/status, the OS's
high-water mark), so it is that variant's alone. The UNet outputs are compared with the first
variant's.

    python benchmarks/attention_cpu.py --latent 96 96 96 --runs 2
    python benchmarks/attention_cpu.py --latent 16 16 16 --runs 1     # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {  # name: (attention, forward) of models.networks.build_*
    "monai": ("monai", "monai"),
    "sdpa": ("sdpa", "monai"),
    "maisicore": ("sdpa", "lean"),
}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _worker(args) -> None:
    import numpy as np
    import torch
    from maisicore.models.networks import build_controlnet, build_diffusion_unet
    from maisicore.models.presets import get_preset
    from maisicore.models.weights import fill_zero_initialised

    torch.set_num_threads(args.threads)
    preset = get_preset("rflow-ct", "official")
    torch.manual_seed(0)
    attention, forward = VARIANTS[args.variant]
    unet = build_diffusion_unet(preset, attention=attention, forward=forward)
    controlnet = build_controlnet(preset, attention=attention, forward=forward)
    generator = torch.Generator().manual_seed(1)
    fill_zero_initialised(unet, generator)
    fill_zero_initialised(controlnet, generator)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, *args.latent, generator=generator)
    image = [4 * n for n in args.latent]
    condition = torch.empty(1, 8, *image)
    for plane in range(8):  # bit planes drawn plane by plane (no float64 temporary of the whole)
        condition[0, plane] = (torch.rand(*image, generator=generator) > 0.5).float()
    t = torch.tensor([600.0])
    spacing = torch.tensor([[150.0, 150.0, 200.0]])
    labels = torch.tensor([1])
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        down, mid = controlnet(x, t, condition, conditioning_scale=1.0, class_labels=labels)
        cn_seconds = time.perf_counter() - start
        out = unet(x, t, spacing_tensor=spacing, class_labels=labels,
                   down_block_additional_residuals=down, mid_block_additional_residual=mid)
    seconds = time.perf_counter() - start
    np.save(args.save, out.numpy())
    print(json.dumps({"seconds": seconds, "controlnet_seconds": cn_seconds, "peak_rss": _status_bytes("VmHWM"),
                      "rss_before": rss_before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", nargs=3, type=int, default=[96, 96, 96], help="latent voxels (image: 4×)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["monai", "maisicore"],
                        help="the first is the reference of the ratios and of max |Δ|")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    import numpy as np

    variants = list(dict.fromkeys(args.variants))
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for variant in variants:  # alternated, so load on the machine affects all alike
                save = os.path.join(tmp, f"{variant}.npy")
                command = [sys.executable, __file__, "--worker", "1", "--variant", variant, "--save", save,
                           "--latent", *map(str, args.latent), "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stdout + done.stderr, file=sys.stderr)
                    raise SystemExit(f"{variant} failed (exit {done.returncode})")
                results[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
                r = results[variant][-1]
                print(f"{variant} run {run + 1}: {r['seconds']:.1f} s (ControlNet {r['controlnet_seconds']:.1f} s), "
                      f"peak RSS {r['peak_rss'] / 1e9:.2f} GB", file=sys.stderr, flush=True)
        outputs = {v: np.load(os.path.join(tmp, f"{v}.npy")) for v in variants}
    first = variants[0]
    reference = outputs[first]
    print(f"\nUNet + ControlNet forward, official width, random weights, latent {'×'.join(map(str, args.latent))} "
          f"(image {'×'.join(str(4 * n) for n in args.latent)}), {args.threads} threads, {args.runs} runs (min / median)")
    print(f"{'variant':<10} {'peak RSS GB':>16} {'wall s':>16} {'ControlNet s':>16} {'max |Δ| vs ' + first:>18}")
    for variant in variants:
        rss = [r["peak_rss"] / 1e9 for r in results[variant]]
        secs = [r["seconds"] for r in results[variant]]
        cn = [r["controlnet_seconds"] for r in results[variant]]
        delta = float(np.abs(outputs[variant] - reference).max())
        print(f"{variant:<10} {min(rss):7.2f} / {statistics.median(rss):6.2f} {min(secs):7.1f} / {statistics.median(secs):6.1f} "
              f"{min(cn):7.1f} / {statistics.median(cn):6.1f} {delta:18.2e}")
    med = {v: (statistics.median(r["peak_rss"] for r in results[v]), statistics.median(r["seconds"] for r in results[v]))
           for v in variants}
    for variant in variants[1:]:
        print(f"{variant} / {first} (medians): peak RSS {med[variant][0] / med[first][0]:.2f}×, "
              f"wall {med[variant][1] / med[first][1]:.2f}×")
    print(f"output max |value| {float(np.abs(reference).max()):.2f}; RSS before the forward (interpreter, torch, "
          f"MONAI, weights, inputs): {min(r['rss_before'] for v in variants for r in results[v]) / 1e9:.2f} GB")

if __name__ == "__main__":
    main()
