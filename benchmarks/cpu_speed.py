"""Where a mask-conditioned generation spends its time on this CPU, side by side: today's path
(``--precision fp32``, Euler 30 steps, the planner's exact decode) against the new defaults
(``--precision auto``) and ``--sampler ab2 --steps 10``, in one run, each configuration in its own
process (peak RSS from the OS), interleaved run by run.

    python benchmarks/cpu_speed.py                      # 256×256×128, official width, random weights, 2 runs
    python benchmarks/cpu_speed.py --size 128 128 64 --runs 1 --allow-any-size   # a quick look

Prints: the machine's matmul peak (float32; bfloat16 when the CPU runs it natively, else a short
measure of the emulated rate), the work per stage (TFLOP, counted by torch's FlopCounterMode on meta
tensors), then per configuration and stage the seconds (min / median over runs), the achieved GFLOPS
and their share of the matmul peak of that precision, end-to-end seconds, peak RSS (GiB), the ratio to
today's path run by run (min / median), and the mean |ΔHU| inside the mask against today's output.
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
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CONFIGS = {  # name: (precision, sampler, steps)
    "today": ("fp32", "euler", 30),
    "defaults": ("auto", "euler", 30),
    "ab2-10": ("auto", "ab2", 10),
}


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def matmul_gflops(dtype_name: str, n: int, repeats: int = 3) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def stage_tflop(size) -> tuple[float, float]:
    """(UNet + ControlNet per evaluation, VAE decode) in TFLOP at official width, counted on meta tensors."""
    import torch
    from maisicore.models.networks import build_autoencoder, build_controlnet, build_diffusion_unet
    from maisicore.models.presets import get_preset
    from torch.utils.flop_counter import FlopCounterMode

    preset = get_preset("rflow-ct", "official")
    latent = [s // 4 for s in size]
    with torch.device("meta"):
        unet, controlnet, autoencoder = (build_diffusion_unet(preset, "meta"), build_controlnet(preset, "meta"),
                                         build_autoencoder(preset, "meta"))
    meta = {"device": "meta"}
    x, t = torch.empty(1, 4, *latent, **meta), torch.empty(1, **meta)
    labels = torch.zeros(1, dtype=torch.long, **meta)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        down, mid = controlnet(x=x, timesteps=t, controlnet_cond=torch.empty(1, 8, *size, **meta), class_labels=labels)
        unet(x=x, timesteps=t, spacing_tensor=torch.empty(1, 3, **meta), class_labels=labels,
             down_block_additional_residuals=down, mid_block_additional_residual=mid)
    denoise = counter.get_total_flops() / 1e12
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        autoencoder.decode(torch.empty(1, 4, *latent, **meta))
    return denoise, counter.get_total_flops() / 1e12


def run_child(args) -> None:
    """One generation in this process; prints one JSON line of stage times, peak RSS and the choices."""
    started = time.perf_counter()
    from maisicore.pipelines.requests import GenerateRequest
    from maisicore.pipelines.runner import Report, run_generate

    precision, sampler, steps = CONFIGS[args.child]
    marks: dict[str, float] = {"imported": time.perf_counter()}
    lines: list[str] = []

    class Timing(Report):
        def info(self, message: str) -> None:
            lines.append(message)
            if " steps, seed " in message:
                marks.setdefault("loaded", time.perf_counter())

        def progress(self, stage: str, done: int, total: int) -> None:
            if stage == "decode":
                marks.setdefault("decode_started" if done == 0 else "decoded", time.perf_counter())

    request = GenerateRequest(model="rflow-ct", weights_dir=args.weights_dir, mask=args.mask, seed=0, steps=steps,
                              sampler=sampler, precision=precision, out=args.out,
                              allow_any_size=args.allow_any_size)
    run_generate(request, Timing())
    end = time.perf_counter()
    print(json.dumps({
        "config": args.child, "import_s": marks["imported"] - started,
        "prepare_load_s": marks["loaded"] - marks["imported"],
        "denoise_s": marks["decode_started"] - marks["loaded"], "decode_s": marks["decoded"] - marks["decode_started"],
        "write_s": end - marks["decoded"], "total_s": end - started, "peak_rss_gib": peak_rss_bytes() / 2**30,
        "plan": [line for line in lines if "precision" in line or "decode" in line or "estimated" in line],
    }))


def synthetic_mask_file(folder: Path, size, spacing) -> Path:
    sys.path.insert(0, str(HERE))
    from maisicore.io.volumes import write_volume
    from memory_model import synthetic_mask

    return write_volume(folder / "mask.nii.gz", synthetic_mask(tuple(size), tuple(spacing)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-dir", help="official-width rflow-ct weights (default: random ones made here)")
    parser.add_argument("--size", nargs=3, type=int, default=(256, 256, 128))
    parser.add_argument("--spacing", nargs=3, type=float, default=(1.5, 1.5, 2.0))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {','.join(CONFIGS)}")
    parser.add_argument("--allow-any-size", action="store_true")
    parser.add_argument("--child", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--mask", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    from maisicore.precision import cpu_bf16_native

    configs = [c.strip() for c in args.configs.split(",")]
    work = Path(tempfile.mkdtemp(prefix="maisi-cpu-speed-"))
    weights = args.weights_dir
    if weights is None:
        weights = str(work / "weights")
        subprocess.run([sys.executable, "-m", "maisicore", "weights", "init", "--preset", "rflow-ct", "--out", weights,
                        "--nonzero-init"], check=True, stdout=subprocess.DEVNULL)
    mask = synthetic_mask_file(work, args.size, args.spacing)
    native = cpu_bf16_native()
    peaks = {"fp32": matmul_gflops("fp32", 2048)}
    peaks["bf16"] = matmul_gflops("bf16", 2048 if native else 256, repeats=1)
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOPS, bf16 {peaks['bf16']:.1f} GFLOPS "
          f"({'native: ' + native if native else 'NOT native on this CPU: emulated'})")
    denoise_tflop, decode_tflop = stage_tflop(args.size)
    print(f"work: UNet + ControlNet {denoise_tflop:.2f} TFLOP per evaluation, VAE decode {decode_tflop:.1f} TFLOP "
          f"({'×'.join(map(str, args.size))} voxels)")
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for run in range(args.runs):
        for config in configs:
            out = work / f"ct_{config}_{run}.nii.gz"
            command = [sys.executable, __file__, "--child", config, "--weights-dir", weights, "--mask", str(mask),
                       "--out", str(out)] + (["--allow-any-size"] if args.allow_any_size else [])
            child = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
            if child.returncode:
                sys.exit(f"{config}: exit {child.returncode}: {child.stderr.strip().splitlines()[-1:]}")
            record = json.loads(child.stdout.strip().splitlines()[-1])
            record["out"] = str(out)
            results[config].append(record)
            print(f"run {run + 1} {config}: {record['total_s']:.1f} s, peak RSS {record['peak_rss_gib']:.2f} GiB; "
                  + "; ".join(record["plan"]), flush=True)
    report(results, configs, peaks, denoise_tflop, decode_tflop, mask)


def report(results, configs, peaks, denoise_tflop, decode_tflop, mask) -> None:
    from maisicore.io.volumes import read_volume

    def mm(values):
        return f"{min(values):.1f} / {statistics.median(values):.1f}"

    body = np.asarray(read_volume(mask).array) > 0
    today = results.get("today")
    print("\n| config | precision, sampler, steps | denoise s (GFLOPS, % peak) | decode s (GFLOPS, % peak) | "
          "end to end s | peak RSS GiB | ratio to today min / median | mean abs dHU vs today |")
    print("|---|---|---|---|---|---|---|---|")
    for config in configs:
        rows = results[config]
        precision, sampler, steps = CONFIGS[config]
        chosen = next((line.split("precision ", 1)[1].split(" ")[0] for row in rows for line in row["plan"]
                       if line.startswith("precision ") or " precision " in line), precision)
        evaluations = steps + (1 if sampler == "ab2" else 0)
        peak = peaks["bf16" if chosen == "bf16" else "fp32"]
        best_denoise, best_decode = min(r["denoise_s"] for r in rows), min(r["decode_s"] for r in rows)
        denoise_rate = denoise_tflop * evaluations * 1e3 / best_denoise
        decode_rate = decode_tflop * 1e3 / best_decode
        ratio = "—"
        delta = "—"
        if today and config != "today":
            ratios = [r["total_s"] / t["total_s"] for r, t in zip(rows, today)]
            ratio = f"{min(ratios):.2f} / {statistics.median(ratios):.2f}"
            a = np.asarray(read_volume(rows[0]["out"]).array, np.float32)
            b = np.asarray(read_volume(today[0]["out"]).array, np.float32)
            delta = f"{np.abs(a - b)[body].mean():.2f}"
        print(f"| {config} | {chosen}, {sampler}, {steps} | {mm([r['denoise_s'] for r in rows])} "
              f"({denoise_rate:.0f}, {100 * denoise_rate / peak:.0f} %) | {mm([r['decode_s'] for r in rows])} "
              f"({decode_rate:.0f}, {100 * decode_rate / peak:.0f} %) | {mm([r['total_s'] for r in rows])} | "
              f"{max(r['peak_rss_gib'] for r in rows):.2f} | {ratio} | {delta} |")


if __name__ == "__main__":
    main()
