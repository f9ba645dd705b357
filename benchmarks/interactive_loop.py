"""Benchmark: the interactive loop of editing a mask — ``maisi generate --draft`` and ``--update``.

Measures, each once (run it alone: ``flock /tmp/maisi-heavy.lock python benchmarks/interactive_loop.py``):

- ``demo``: the bundled demo model on the quick-start mask (the real example scan's labels): a full
  generation, the liver grown by a 3 cm block, ``--update``; the updated CT's organ HU medians
  through ``maisi qc`` (``anatomy.qc.check_ct``) and the voxels outside the region compared.
- ``draft``: a 256×256×128 mask-conditioned draft at official width (``--weights``: ``maisi weights
  init --preset rflow-ct --out DIR --nonzero-init``): cold, a whole ``maisi generate --draft``
  process; warm, a second call of one ``GeneratePipeline`` with the networks loaded (prepare,
  sample, decode, resample, write).
- ``update``: a full generation of that request (``--steps``) and an ``--update`` after the liver
  grew by a 3 cm block, same steps, timed in one process.

    python benchmarks/interactive_loop.py --weights /tmp/official --work /tmp/loop [--stages demo draft update]

Prints one line per measurement and a JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LIVER, SPLEEN, RIGHT_KIDNEY, LEFT_KIDNEY, BODY = 1, 3, 5, 14, 200


def synthetic_mask(shape=(256, 256, 128), spacing=(1.5, 1.5, 2.5)):
    """An abdomen-like MAISI label volume (body, liver, spleen, kidneys) on a grid rflow-ct takes."""
    from maisicore.io.geometry import Volume, centered_affine

    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float32)
    mm = (index - (np.asarray(shape) - 1) / 2) * np.asarray(spacing, np.float32)

    def ellipsoid(centre, radii):
        return (((mm - np.asarray(centre, np.float32)) / np.asarray(radii, np.float32)) ** 2).sum(-1) <= 1

    labels = np.zeros(shape, np.int16)
    labels[(mm[..., 0] / 160) ** 2 + (mm[..., 1] / 110) ** 2 <= 1] = BODY
    labels[ellipsoid((-60, 10, 40), (70, 60, 70))] = LIVER
    labels[ellipsoid((80, 40, 40), (35, 30, 50))] = SPLEEN
    labels[ellipsoid((-50, 60, -40), (25, 25, 50))] = RIGHT_KIDNEY
    labels[ellipsoid((50, 60, -40), (25, 25, 50))] = LEFT_KIDNEY
    return Volume(labels, centered_affine(shape, spacing))


def grow_liver(labels, block_mm=30.0):
    """The labels with the liver grown by a ``block_mm`` cube centred on its rightmost-x boundary voxel
    (only body voxels become liver): a local edit of one organ."""
    from maisicore.io.geometry import Volume

    array = labels.array.copy()
    liver = np.argwhere(array == LIVER)
    edge = liver[np.argmax(liver[:, 0])]
    half = np.ceil(block_mm / 2 / np.asarray(labels.spacing)).astype(int)
    box = tuple(slice(max(c - h, 0), c + h) for c, h in zip(edge, half))
    region = array[box]
    region[region == BODY] = LIVER
    return Volume(array, labels.affine.copy())


def timed(what, fn):
    started = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - started
    print(f"{what}: {seconds:.1f} s", flush=True)
    return value, seconds


def run_pipeline(pipeline, request):
    result = pipeline(request)
    result.write(request)
    return result


def stage_draft(weights: Path, work: Path, numbers: dict) -> None:
    from maisicore.io.volumes import read_volume, write_volume
    from maisicore.pipelines.generate import GeneratePipeline
    from maisicore.pipelines.requests import GenerateRequest

    mask = work / "mask.nii.gz"
    if not mask.exists():
        write_volume(mask, synthetic_mask())
    cold_out = work / "draft_cold.nii.gz"
    cold_out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "maisicore", "generate", "--model", str(weights), "--mask", str(mask), "--draft",
               "--device", "cpu", "--out", str(cold_out)]
    done, numbers["draft_cold_s"] = timed("draft cold (a whole `maisi generate --draft` process)",
                                          lambda: subprocess.run(command, capture_output=True, text=True))
    assert done.returncode == 0, done.stderr
    print("  " + done.stdout.strip(), flush=True)
    request = GenerateRequest(model=str(weights), mask=str(mask), draft=True, device="cpu",
                              out=str(work / "draft_warm.nii.gz"))
    pipeline, numbers["load_s"] = timed("load the networks", lambda: GeneratePipeline.from_request(request))
    timed("draft, first call in the process", lambda: run_pipeline(pipeline, request))
    result, numbers["draft_warm_s"] = timed("draft warm (second call, networks loaded)",
                                            lambda: run_pipeline(pipeline, request))
    ct, labels = read_volume(work / "draft_warm.nii.gz"), read_volume(mask)
    assert ct.shape == labels.shape and np.array_equal(ct.affine, labels.affine)
    numbers["draft_grid"] = list(result.plan.size)
    numbers["draft_steps"] = result.plan.steps


def stage_update(weights: Path, work: Path, numbers: dict, steps: int | None) -> None:
    from maisicore.io.volumes import read_volume, write_volume
    from maisicore.pipelines.generate import GeneratePipeline
    from maisicore.pipelines.requests import GenerateRequest

    mask = work / "mask.nii.gz"
    if not mask.exists():
        write_volume(mask, synthetic_mask())
    grown = work / "mask_grown.nii.gz"
    write_volume(grown, grow_liver(read_volume(mask)))
    full = GenerateRequest(model=str(weights), mask=str(mask), device="cpu", steps=steps, out=str(work / "full.nii.gz"))
    pipeline, _ = timed("load the networks", lambda: GeneratePipeline.from_request(full))
    result, numbers["full_s"] = timed(f"full generation 256x256x128, {steps or 30} steps", lambda: run_pipeline(pipeline, full))
    update = GenerateRequest(model=str(weights), mask=str(grown), update=full.out, previous_labels=str(mask),
                             device="cpu", steps=steps, out=str(work / "updated.nii.gz"))
    result, numbers["update_s"] = timed("update after the liver grew by a 3 cm block", lambda: run_pipeline(pipeline, update))
    numbers["update_ratio"] = numbers["update_s"] / numbers["full_s"]
    numbers["update_note"] = result.notes[-1]
    print(f"update / full = {numbers['update_ratio']:.3f}; {result.notes[-1]}", flush=True)


def stage_demo(work: Path, numbers: dict) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "Testing"))
    import fetch_test_data
    from maisicore.anatomy.qc import check_ct
    from maisicore.cli import main
    from maisicore.io.volumes import read_volume, write_volume
    from maisicore.pipelines.generate import GeneratePipeline
    from maisicore.pipelines.requests import GenerateRequest
    from maisicore.pipelines.update import within_margin

    data = fetch_test_data.reference_files()
    labels = work / "demo_labels.nii.gz"
    if not labels.exists():
        assert main(["labels", "convert", "--from", "totalsegmentator", str(data / "example_seg.nii.gz"),
                     "--ct", str(data / "example_ct_sm.nii.gz"), "--out", str(labels)]) == 0
    grown = work / "demo_grown.nii.gz"
    write_volume(grown, grow_liver(read_volume(labels)))
    full = GenerateRequest(model="demo", mask=str(labels), device="cpu", seed=0, out=str(work / "demo_ct.nii.gz"))
    pipeline = GeneratePipeline.from_request(full)
    _, numbers["demo_full_s"] = timed("demo: full generation", lambda: run_pipeline(pipeline, full))
    update = GenerateRequest(model="demo", mask=str(grown), update=full.out, previous_labels=str(labels), device="cpu",
                             seed=0, out=str(work / "demo_updated.nii.gz"))
    _, numbers["demo_update_s"] = timed("demo: update after the liver grew by a 3 cm block",
                                        lambda: run_pipeline(pipeline, update))
    before, after = read_volume(full.out), read_volume(update.out)
    new, old = read_volume(grown).array, read_volume(labels).array
    region = within_margin(new != old, before.spacing, 10.0)
    numbers["demo_outside_identical"] = bool(np.array_equal(before.array[~region], after.array[~region]))
    checks = {c.organ: c for c in check_ct(after.array, new)}
    liver = checks["liver"]
    grown_voxels = (new == LIVER) & (old != LIVER)
    numbers["demo_liver_median_hu"] = liver.median_hu
    numbers["demo_grown_block_median_hu"] = float(np.median(after.array[grown_voxels]))
    numbers["demo_liver_qc_passed"] = bool(liver.passed)
    numbers["demo_qc_all_passed"] = all(c.passed for c in checks.values())
    print(f"demo: liver median {numbers['demo_liver_median_hu']} HU (qc passed: {liver.passed}), grown block median "
          f"{numbers['demo_grown_block_median_hu']:.0f} HU, all organs passed: {numbers['demo_qc_all_passed']}, "
          f"outside the region identical: {numbers['demo_outside_identical']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, help="official-width rflow-ct weights (draft and update stages)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the masks and results")
    parser.add_argument("--stages", nargs="+", default=["demo", "draft", "update"], choices=("demo", "draft", "update"))
    parser.add_argument("--steps", type=int, help="steps of the full generation and the update (default the model's 30)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    numbers: dict = {}
    if "demo" in args.stages:
        stage_demo(args.work, numbers)
    if "draft" in args.stages:
        stage_draft(args.weights, args.work, numbers)
    if "update" in args.stages:
        stage_update(args.weights, args.work, numbers, args.steps)
    print(json.dumps(numbers, indent=2), flush=True)


if __name__ == "__main__":
    main()
