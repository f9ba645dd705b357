"""Batch: a synthetic CT that follows a segmentation file, through MAISIGenerate's logic, no GUI.

Installed with the extension, so Slicer users run it without this repository:

    Slicer --no-main-window --python-code "from MAISIGenerateLib.batch import run; run(['--segmentation', \
        'seg.seg.nrrd', '--reference', 'ct.nrrd', '--out', 'synthetic.nrrd', '--labels-out', 'labels.seg.nrrd'])"

(``run`` exits Slicer with the exit code). In a plain Python with the ``slicer-core`` wheel and
maisicore, ``Examples/maisi_generate_batch.py`` takes the same options on its command line.

Many cases: ``--manifest MANIFEST --out DIR [maisi batch options]`` runs ``maisi batch`` (the same
command, ``maisicore.pipelines.batch``: resumable, ``DIR/status.jsonl``, nnU-Net/MONAI layouts):

    Slicer --no-main-window --python-code "from MAISIGenerateLib.batch import run; run(['--manifest', \
        'cases.jsonl', '--out', 'trainset', '--format', 'nnunet', '--label-set', 'liver,spleen'])"

Segments are matched to MAISI labels by name and terminology (unresolved ones are reported and
left out); the CT takes the reference volume's grid (else the segmentation's), and the label
segmentation is written with MAISI names, colours and terminology. Exit code 0 on success; on an
error one line ``maisi_generate_batch: error: ...`` and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import slicer

from .logic import GenerateLogic
from .parameters import FromSegmentation, RunOptions

IN_SLICER = hasattr(slicer, "app")


def load(path: str, class_name: str):
    """A node read from ``path``: Slicer's loaders in Slicer, the storage nodes headless."""
    if IN_SLICER:
        return slicer.util.loadSegmentation(path) if class_name == "vtkMRMLSegmentationNode" else slicer.util.loadVolume(path)
    node = slicer.mrmlScene.AddNewNodeByClass(class_name, Path(path).name.split(".")[0])
    storage_class = "vtkMRMLSegmentationStorageNode" if class_name == "vtkMRMLSegmentationNode" else "vtkMRMLVolumeArchetypeStorageNode"
    storage = slicer.mrmlScene.AddNewNodeByClass(storage_class)
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise RuntimeError(f"cannot read {path}")
    return node


def save(node, path: str) -> None:
    """Write ``node`` to ``path`` (format by extension)."""
    if IN_SLICER:
        if not slicer.util.saveNode(node, str(path)):
            raise RuntimeError(f"cannot write {path}")
        return
    storage = slicer.mrmlScene.AddNewNodeByClass(
        "vtkMRMLSegmentationStorageNode" if node.IsA("vtkMRMLSegmentationNode") else "vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise RuntimeError(f"cannot write {path}")


def run_manifest(argv: list[str]) -> int:
    """``--manifest MANIFEST`` and ``maisi batch``'s options: the ``maisi batch`` command itself."""
    from maisicore.cli import main as maisi_main

    rest = list(argv)
    at = rest.index("--manifest")
    if at + 1 >= len(rest):
        raise ValueError("--manifest needs a file (JSON lines or CSV of requests)")
    manifest = rest[at + 1]
    del rest[at : at + 2]
    return maisi_main(["batch", manifest, *rest])


def main(argv: list[str]) -> int:
    if "--manifest" in argv:
        return run_manifest(argv)
    parser = argparse.ArgumentParser(prog="maisi_generate_batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--segmentation", required=True, help="segmentation file (.seg.nrrd, or a labelmap)")
    parser.add_argument("--reference", help="reference volume: the grid of the result, and the body outline (CT)")
    parser.add_argument("--out", required=True, help="synthetic CT file (.nrrd, .nii.gz)")
    parser.add_argument("--labels-out", help="segmentation of the labels used (.seg.nrrd)")
    parser.add_argument("--model", default="rflow-ct")
    parser.add_argument("--weights-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fit-grid", action="store_true", help="generate on the closest published grid, map back")
    parser.add_argument("--allow-any-size", action="store_true")
    args = parser.parse_args(argv)

    if not IN_SLICER:
        from .headless import headless_scene

        headless_scene()
    segmentation = load(args.segmentation, "vtkMRMLSegmentationNode")
    reference = load(args.reference, "vtkMRMLScalarVolumeNode") if args.reference else None
    logic = GenerateLogic(warm=False)  # one run: a one-shot `maisi run` worker
    build = logic.labels_from_segmentation(segmentation, reference)
    print(build.summary(), flush=True)
    options = RunOptions(args.model, args.weights_dir, args.seed, args.steps, args.device, args.allow_any_size)
    result = logic.run(FromSegmentation(segmentation, reference, fit_grid=args.fit_grid), options,
                       log=lambda line: print(line, flush=True),
                       progress=lambda stage, done, total: print(f"{stage} {done}/{total}", flush=True))
    save(result.volume_node, args.out)
    if args.labels_out and result.segmentation_node is not None:
        save(result.segmentation_node, args.labels_out)
    print(f"saved {args.out}" + (f" and {args.labels_out}" if args.labels_out else ""), flush=True)
    return 0


def run(argv: list[str] | None = None) -> int:
    """``main`` with errors as one line on stderr; inside Slicer, exit Slicer with the code."""
    code = 1
    try:
        code = main(sys.argv[1:] if argv is None else list(argv))
    except Exception as exc:  # one line, like the maisi program
        print(f"maisi_generate_batch: error: {exc}", file=sys.stderr, flush=True)
    if IN_SLICER:
        slicer.util.exit(code)
    return code
