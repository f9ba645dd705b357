"""Batch: a synthetic CT that follows a segmentation file, through MAISIGenerate's logic, no GUI.

The script form of ``MAISIGenerateLib.batch`` (which Slicer users run from the installed extension,
see its docstring and the README). Inside Slicer:

    Slicer --no-main-window --python-script Examples/maisi_generate_batch.py \\
        --segmentation seg.seg.nrrd [--reference ct.nrrd] --out synthetic.nrrd [--labels-out labels.seg.nrrd] \\
        [--model rflow-ct|ddpm-ct|demo|DIR] [--weights-dir DIR] [--seed N] [--steps N] [--device auto|cpu|cuda] \\
        [--fit-grid] [--allow-any-size]

Many cases from a manifest (``maisi batch``: the same command and options, resumable):

    Slicer --no-main-window --python-script Examples/maisi_generate_batch.py \
        --manifest cases.jsonl --out trainset [--format nifti|monai|nnunet] [--label-set NAMES] [--workers N]

Without Slicer, with a plain Python that has the ``slicer-core`` wheel and maisicore installed
(from this repository), the same command line works with ``python Examples/maisi_generate_batch.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import slicer

if not hasattr(slicer, "app"):  # plain Python: the module's Qt-free library from this repository
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "MAISIGenerate"))

from MAISIGenerateLib.batch import run  # noqa: E402  (after the sys.path line above)

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
