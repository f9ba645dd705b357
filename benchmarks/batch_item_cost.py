"""Per-item cost of `maisi batch` with one worker against one `maisi generate` minus its model load.

Both run the demo model on the same real mask (a 96×96×32 crop of TotalSegmentator's example
segmentation at 3 mm, conftest's ``body_mask_from_real_data``) with the same steps and the same torch
threads. ``maisi generate`` runs through ``maisicore.cli.main`` in this process, its model load timed
by wrapping ``maisicore.models.weights.load_model`` (after one warm-up run for the first imports); the batch runs N copies with ``--workers 1`` and
reports each item's seconds (``status.jsonl`` timings). Prints seconds; the batch's per-item cost
should be within 10 % of generate − load (the models are loaded once per worker).

    python benchmarks/batch_item_cost.py [--items 4] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "Testing"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="single `maisi generate` runs")
    args = parser.parse_args()

    import fetch_test_data
    import torch
    from conftest import body_mask_from_real_data
    from maisicore.cli import main as maisi
    from maisicore.io.geometry import Volume
    from maisicore.io.volumes import write_volume
    from maisicore.models import weights
    from maisicore.pipelines.batch import BatchOptions, read_status, run_batch

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="maisi-batch-bench-"))
    labels, affine = body_mask_from_real_data(fetch_test_data.reference_files())
    mask = folder / "mask.nii.gz"
    write_volume(mask, Volume(labels, affine))

    loads: list[float] = []
    original = weights.load_model

    def timed_load(*a, **k):
        started = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            loads.append(time.perf_counter() - started)

    weights.load_model = timed_load
    single = []
    for repeat in range(-1, args.repeats):  # -1: a warm-up (first imports, allocator), not counted
        started = time.perf_counter()
        code = maisi(["generate", "--model", "demo", "--mask", str(mask), "--steps", str(args.steps), "--device", "cpu",
                      "--seed", str(repeat + 1), "--label-out", str(folder / f"l{repeat}.nii.gz"),
                      "--out", str(folder / f"g{repeat}.nii.gz")])
        assert code == 0
        if repeat >= 0:
            single.append((time.perf_counter() - started, loads[-1]))
        torch.set_num_threads(args.threads)
    weights.load_model = original

    manifest = folder / "manifest.jsonl"
    manifest.write_text(json.dumps({"model": "demo", "mask": str(mask), "steps": args.steps, "count": args.items}) + "\n")
    started = time.perf_counter()
    summary = run_batch(manifest, folder / "set", BatchOptions(device="cpu", threads=args.threads, montage=0))
    batch_wall = time.perf_counter() - started
    assert summary.done == args.items, summary
    done = [r for r in read_status(folder / "set" / "status.jsonl") if r["state"] == "done"]
    per_item = [r["timings"]["total_s"] - r["timings"]["load_s"] for r in done]
    load_once = sum(r["timings"]["load_s"] for r in done)

    generate_total = statistics.median(t for t, _ in single)
    generate_load = statistics.median(load for _, load in single)
    generate_net = statistics.median(t - load for t, load in single)
    batch_item = statistics.median(per_item)
    print(f"demo model, 96x96x32 mask, {args.steps} steps, {args.threads} torch threads, {args.items} batch items")
    print(f"maisi generate: {generate_total:.2f} s total, {generate_load:.2f} s model load, "
          f"{generate_net:.2f} s without the load (median of {args.repeats})")
    print(f"maisi batch --workers 1: {batch_item:.2f} s per item (median; items {', '.join(f'{s:.2f}' for s in per_item)}), "
          f"model loaded once ({load_once:.2f} s), wall {batch_wall:.2f} s for {args.items} items")
    print(f"per-item cost / (generate - load) = {batch_item / generate_net:.3f}")
    print(json.dumps({"generate_total_s": generate_total, "generate_load_s": generate_load,
                      "generate_without_load_s": generate_net, "batch_per_item_s": batch_item,
                      "ratio": batch_item / generate_net, "batch_wall_s": batch_wall, "loads_in_batch": sum(
                          1 for r in done if r["timings"]["load_s"] > 0)}))


if __name__ == "__main__":
    main()
