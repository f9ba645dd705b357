"""Benchmark: train the tiny VAE on the real TotalSegmentator CT (example_ct.nii.gz) on 32³ patches
and print its validation L1 curve (fixed patches, [0, 1] scale) with the wall time.

    python benchmarks/train_vae.py                       # 150 steps, lr 1e-3, validation every 10
    python benchmarks/train_vae.py --steps 300 --runs 3  # several runs: min/median of the drop and time

Runs the real programs: `maisi prepare`, `maisi weights init --width tiny`, `maisi train vae`. The
test data come from `python Testing/fetch_test_data.py` (cached). A run passes when the last
validation L1 is at most half the first one and the whole run took at most 10 minutes.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from maisicore.training.run import read_metrics

REPO = Path(__file__).resolve().parent.parent


def _maisi(*args) -> None:
    subprocess.run([sys.executable, "-m", "maisicore", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def one_run(data: Path, steps: int, lr: float, validate_every: int, seed: int) -> tuple[list[tuple[int, float, float]], float]:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "images").mkdir()
        shutil.copy(data / "example_ct.nii.gz", root / "images")
        _maisi("prepare", "--images", root / "images", "--out", root / "datalist.json")
        _maisi("weights", "init", "--preset", "rflow-ct", "--width", "tiny", "--seed", seed, "--out", root / "start")
        started = time.monotonic()
        _maisi("train", "vae", "--datalist", root / "datalist.json", "--out", root / "run", "--width", "tiny",
               "--init", root / "start", "--patch-size", 32, 32, 32, "--max-steps", steps, "--lr", lr,
               "--validate-every", validate_every, "--checkpoint-every", steps, "--seed", seed, "--device", "cpu")
        wall = time.monotonic() - started
        curve = [(r["step"], r["val_l1"], r["time_s"]) for r in read_metrics(root / "run" / "metrics.jsonl") if "val_l1" in r]
        return curve, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--validate-every", type=int, default=10)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    data = Path(subprocess.run([sys.executable, str(REPO / "Testing" / "fetch_test_data.py")], check=True,
                               capture_output=True, text=True).stdout.strip().splitlines()[-1])
    drops, walls = [], []
    for run in range(args.runs):
        curve, wall = one_run(data, args.steps, args.lr, args.validate_every, seed=run)
        print(f"run {run + 1} (seed {run}): step  val_l1   time_s")
        for step, value, seconds in curve:
            print(f"  {step:>5}  {value:.4f}  {seconds:7.1f}")
        drop = 1 - curve[-1][1] / curve[0][1]
        drops.append(drop)
        walls.append(wall)
        print(f"  validation L1 {curve[0][1]:.4f} → {curve[-1][1]:.4f}: −{100 * drop:.1f} % in {wall:.0f} s "
              f"({'PASS' if drop >= 0.5 and wall <= 600 else 'FAIL'}: ≥ 50 % within 600 s)")
    print(f"drop min/median {100 * min(drops):.1f}/{100 * statistics.median(drops):.1f} %, "
          f"wall min/median {min(walls):.0f}/{statistics.median(walls):.0f} s over {args.runs} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
