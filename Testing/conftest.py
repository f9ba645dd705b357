"""Shared fixtures: real CT data, tiny weight sets made by the real `maisi weights init`, the
reference configs beside the checkout, and two ways to run the `maisi` command: ``run_maisi`` (a real
child process) and the ``maisi`` fixture (``maisicore.cli.main`` in this process, same captured result).

Markers (registered in the root pyproject.toml): ``slow`` long end-to-end runs, ``gpu`` needs CUDA
(skipped without it), ``network`` needs the package registry (given automatically to every test that
uses ``real_data``: the CT data is downloaded on first use)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
for _module in ("MAISIGenerate", "MAISITrain"):  # the Slicer modules' Qt-free libraries (test_slicer_*)
    sys.path.insert(0, str(REPO / _module))

import fetch_test_data  # noqa: E402

# Parallel workers (pytest-xdist: `-n auto` in the root pyproject.toml) share the machine's cores:
# each worker, and every program it starts, gets an equal share of threads, so the thread pools of
# torch and NumPy do not oversubscribe the cores (a pool spinning on a busy core stalls everyone).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _THREADS = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_variable, str(_THREADS))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The files whose tests take longest, longest first: xdist hands files to workers in collection order
# (``--no-loadscope-reorder`` in pyproject.toml), so the long ones start at once and the short ones fill
# the gaps, instead of a long file starting last and running alone at the end.
LONGEST_FIRST = ("test_training.py", "test_batch.py", "test_tsp.py", "test_generate.py", "test_slicer_generate.py",
                 "test_slicer_train.py", "test_inpaint.py", "test_hostile_input.py")


def pytest_collection_modifyitems(config, items):
    """``network`` for every test that needs the real CT data; ``gpu`` tests skip without CUDA;
    files ordered by ``LONGEST_FIRST`` (a stable sort: the tests within a file keep their order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    cuda = None
    for item in items:
        if "real_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.network)
        if item.get_closest_marker("gpu"):
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """NVIDIA's published configs (../shared/reference/official-configs beside the checkout, or
    $MAISI_SHARED/reference/official-configs); the tests comparing with them skip when absent."""
    folder = Path(os.environ.get("MAISI_SHARED", REPO.parent / "shared")) / "reference" / "official-configs"
    if not folder.is_dir():
        pytest.skip(f"NVIDIA's published configs not found at {folder} (set MAISI_SHARED to the shared/ folder)")
    return folder


@pytest.fixture(scope="session")
def real_data() -> Path:
    """TotalSegmentator's real example CTs and segmentations (downloaded once into .cache)."""
    try:
        return fetch_test_data.reference_files()
    except fetch_test_data.RegistryUnreachable as exc:
        pytest.skip(f"real CT data unavailable: {exc}")


@pytest.fixture(scope="session")
def converted_labels(real_data, tmp_path_factory) -> tuple[Path, dict]:
    """`maisi labels convert` of the real multi-label segmentation with the CT's body envelope:
    (MAISI label file, the conversion report). Shared by several test files: read it, never write it."""
    import json

    folder = tmp_path_factory.mktemp("converted")
    out, report = folder / "labels.nii.gz", folder / "report.json"
    result = run_maisi_in_process("labels", "convert", "--from", "totalsegmentator", real_data / "example_seg.nii.gz",
                                  "--ct", real_data / "example_ct_sm.nii.gz", "--out", out, "--report", report)
    assert result.returncode == 0, result.stderr
    return out, json.loads(report.read_text())


@pytest.fixture
def scene():
    """A fresh headless MRML scene from the slicer-core wheel, installed as ``slicer.mrmlScene``
    (``slicer_headless``; imported only by the tests that use it)."""
    from slicer_headless import fresh_scene

    yield from fresh_scene()


def run_maisi(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """Run the real `maisi` program (``python -m maisicore``) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "maisicore", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


# Python's default warning filters hide these: what a user of `maisi` sees on stderr is the rest.
_HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def run_maisi_in_process(*args) -> subprocess.CompletedProcess:
    """Run `maisi ARGS` in this process through ``maisicore.cli.main``, with what ``run_maisi``
    returns (returncode, stdout, stderr) but no Python and torch start per call. stdin is empty and
    not a terminal (a child's /dev/null); warnings go to stderr where they happen, filtered as in a
    fresh Python (each shown once per place)."""
    from maisicore.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()

    def show(message, category, filename, lineno, file=None, line=None):
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    stdin, sys.stdin = sys.stdin, io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")
            for category in _HIDDEN_WARNINGS:
                warnings.simplefilter("ignore", category)
            warnings.showwarning = show  # restored by catch_warnings
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's --help and --version exit
                code = exc.code
    finally:
        sys.stdin = stdin
    return subprocess.CompletedProcess(["maisi", *argv], code, out.getvalue(), err.getvalue())


@pytest.fixture
def maisi():
    """``run_maisi_in_process``: the `maisi` command in this process (``maisi("generate", ...)``)."""
    return run_maisi_in_process


def _init_weights(folder: Path, model: str, *extra) -> Path:
    result = run_maisi_in_process("weights", "init", "--preset", model, "--width", "tiny", "--out", folder, *extra)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict[str, Path]:
    """Tiny random weight sets for both models whose networks act: `maisi weights init
    --nonzero-init` (MONAI starts the UNet's and ControlNet's output layers at zero)."""
    root = tmp_path_factory.mktemp("weights")
    return {model: _init_weights(root / model, model, "--nonzero-init") for model in ("rflow-ct", "ddpm-ct")}


@pytest.fixture(scope="session")
def training_start_weights(tmp_path_factory) -> dict[str, Path]:
    """Tiny weight sets exactly as `maisi weights init` writes them for training from scratch."""
    root = tmp_path_factory.mktemp("weights-plain")
    return {model: _init_weights(root / model, model) for model in ("rflow-ct", "ddpm-ct")}


def body_mask_from_real_data(real_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """A MAISI label volume on a 96×96×32 crop of the real example scan (3 mm, RAS).

    Liver (1), spleen (3) and left kidney (14) come from TotalSegmentator's per-class masks; every
    other voxel with HU > −500 is body (200). Returns (labels int16 (x, y, z), affine index → RAS).
    """
    import nibabel as nib

    ct = nib.load(real_data / "example_ct_sm.nii.gz")
    hu = np.asanyarray(ct.dataobj)
    labels = np.where(hu > -500, 200, 0).astype(np.int16)
    for name, maisi_id in (("liver", 1), ("spleen", 3), ("kidney_left", 14)):
        organ = np.asanyarray(nib.load(real_data / "example_seg_fast" / f"{name}.nii.gz").dataobj) > 0
        labels[organ] = maisi_id
    x0, y0 = 13, 2  # crop 122×101×30 to 96×96 in-plane, keep the body centred
    crop = np.zeros((96, 96, 32), np.int16)
    crop[:, :, :30] = labels[x0 : x0 + 96, y0 : y0 + 96, :]
    affine = ct.affine.copy()
    affine[:3, 3] = ct.affine[:3, :3] @ [x0, y0, 0] + ct.affine[:3, 3]
    return crop, affine
