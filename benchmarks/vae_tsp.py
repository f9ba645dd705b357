"""Benchmark: MAISI VAE decode, MONAI's decodes vs our tensor-splitting engine (official width).

Each (method, run) runs in its own process, so peak RSS (``resource.getrusage``, the OS's
high-water mark of the process) is that method's alone. Weights are MONAI's random initialisation
under a fixed seed; the latent is a fixed-seed normal tensor. Every output is compared with MONAI's
unsplit decode on the [0, 1] scale (outputs clipped as the pipeline does).

    python benchmarks/vae_tsp.py --latent 32 32 32 --runs 3
    python benchmarks/vae_tsp.py --latent 40 40 40 --methods ours-bounded --memory-budget 1.5 --runs 3
    python benchmarks/vae_tsp.py --latent 24 24 24 --methods ours-bounded --memory-budget 1.5

Methods: monai (unsplit), monai-split4 (MONAI's TSP, num_splits=4, dim_split=1 as published),
sliding-window (reference SlidingWindowInferer on latent windows, gaussian blending),
ours-exact, ours-bounded, ours-auto (the default plan for --memory-budget: MONAI's whole-volume decode
when it fits, else the split plan that fits).

    python benchmarks/vae_tsp.py --model demo --latent 59 42 48 --methods monai,ours-auto --runs 3
    python benchmarks/vae_tsp.py --latent 32 32 32 --methods monai,ours-auto --memory-budget 2.5 --runs 3
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

METHODS = ("monai", "monai-split4", "sliding-window", "ours-exact", "ours-bounded", "ours-auto")


def _worker(args) -> None:
    import resource

    import numpy as np
    import torch
    from maisicore.models.networks import build_autoencoder
    from maisicore.models.presets import get_preset

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "demo":  # the bundled trained tiny-width model
        from maisicore.models.weights import demo_weights_dir, load_model

        autoencoder = load_model(get_preset("rflow-ct", "tiny"), demo_weights_dir(), "cpu").autoencoder
    else:
        autoencoder = build_autoencoder(get_preset("rflow-ct", "official"), "cpu")
    if args.method == "monai-split4":
        for module in autoencoder.modules():
            if hasattr(module, "num_splits"):
                module.num_splits = 4
    latent = torch.randn((1, 4, *args.latent), generator=torch.Generator().manual_seed(1))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.no_grad():
        if args.method in ("monai", "monai-split4"):
            image = autoencoder.decode(latent)
        elif args.method == "sliding-window":
            from monai.inferers import SlidingWindowInferer

            inferer = SlidingWindowInferer(
                roi_size=args.window, sw_batch_size=1, overlap=args.overlap, mode="gaussian", progress=False
            )
            image = inferer(inputs=latent, network=autoencoder.decode)
        else:
            from maisicore.vae.tsp import decode_exact

            budget = int(args.memory_budget * 2**30) if args.memory_budget else None
            mode = args.method.split("-", 1)[1]
            image = decode_exact(autoencoder, latent, budget, mode=mode, log=print)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    image = torch.clip(image.float(), 0, 1)[0, 0].numpy()
    np.save(args.save, image)
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "rss_before": rss_before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", nargs=3, type=int, default=[32, 32, 32])
    parser.add_argument("--model", choices=("official", "demo"), default="official",
                        help="official width with random weights, or the bundled demo autoencoder")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-budget", type=float, help="GiB, for ours-*")
    parser.add_argument("--window", nargs=3, type=int, default=[16, 16, 16], help="sliding window (latent voxels)")
    parser.add_argument("--overlap", type=float, default=0.4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    import numpy as np

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    order = ["monai"] + [m for m in methods if m != "monai"]  # the reference output first
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for method in order:
            runs = []
            for run in range(args.runs if method in methods else 1):
                save = os.path.join(tmp, f"{method}.npy")
                command = [sys.executable, __file__, "--worker", "1", "--method", method, "--save", save,
                           "--latent", *map(str, args.latent), "--threads", str(args.threads), "--model", args.model,
                           "--window", *map(str, args.window), "--overlap", str(args.overlap)]
                if args.memory_budget:
                    command += ["--memory-budget", str(args.memory_budget)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stdout + done.stderr, file=sys.stderr)
                    raise SystemExit(f"{method} failed")
                plan = [line for line in done.stdout.splitlines() if "decode:" in line or "decode (" in line]
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]) | {"plan": plan[0] if plan else ""})
                print(f"{method} run {run + 1}: {runs[-1]['seconds']:.1f} s, peak RSS {runs[-1]['peak_rss'] / 1e9:.2f} GB",
                      file=sys.stderr, flush=True)
            image = np.load(save)
            if method == "monai":
                reference = image
            delta = float(np.abs(image - reference).max())
            mean_delta = float(np.abs(image - reference).mean())
            results[method] = (runs, delta, mean_delta)

    size = "×".join(str(4 * n) for n in args.latent)
    print(f"\nVAE decode, {args.model} width, latent {'×'.join(map(str, args.latent))} → image {size}, "
          f"{args.threads} threads, {args.runs} runs each (min / median)")
    print(f"{'method':<15} {'peak RSS GB':>16} {'wall s':>16} {'max |Δ|':>10} {'mean |Δ|':>10}  plan")
    base = results.get("monai")
    for method in order:
        if method not in methods:
            continue
        runs, delta, mean_delta = results[method]
        rss = [r["peak_rss"] / 1e9 for r in runs]
        secs = [r["seconds"] for r in runs]
        print(f"{method:<15} {min(rss):7.2f} / {statistics.median(rss):6.2f} {min(secs):7.1f} / {statistics.median(secs):6.1f} "
              f"{delta:10.2e} {mean_delta:10.2e}  {runs[0]['plan']}")
    if base and len(methods) > 1:
        ref_rss = statistics.median(r["peak_rss"] for r in base[0])
        ref_s = statistics.median(r["seconds"] for r in base[0])
        print("\nratios to monai (medians):")
        for method in methods:
            if method == "monai":
                continue
            runs = results[method][0]
            print(f"  {method:<15} peak RSS {statistics.median(r['peak_rss'] for r in runs) / ref_rss:.2f}×, "
                  f"wall {statistics.median(r['seconds'] for r in runs) / ref_s:.2f}×")
    print(f"baseline RSS before decoding (interpreter, torch, MONAI, weights): "
          f"{min(r['rss_before'] for m in results.values() for r in m[0]) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
