"""The CLI's contract under hostile input: exit 2, exactly one stderr line saying what to change, no
traceback, no output or temporary file left, inputs byte for byte unchanged. In-process
(``maisi`` fixture) except the signal and pipe cases, which need a real process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from maisicore.io.geometry import Volume
from maisicore.io.volumes import write_volume


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Input files in their own folder: labels, a CT, a NaN CT, a fractional and an empty mask,
    a degenerate-affine CT, a latent (from `maisi vae encode` of the CT)."""
    folder = tmp_path_factory.mktemp("inputs")
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    labels = np.zeros((32, 32, 32), np.int16)
    labels[4:28, 4:28, 4:28] = 200
    labels[10:20, 10:20, 10:20] = 1
    ct = np.where(labels > 0, 40, -1000).astype(np.int16)
    nan_ct = ct.astype(np.float32)
    nan_ct[3, 4, 5] = np.nan
    nan_ct[6, 7, 8] = np.inf
    files = {
        "labels": Volume(labels, affine),
        "ct": Volume(ct, affine),
        "nan_ct": Volume(nan_ct, affine),
        "fractional": Volume(np.where(labels == 1, 0.6, 0.0).astype(np.float32), affine),
        "empty": Volume(np.zeros((32, 32, 32), np.uint8), affine),
        "degenerate": Volume(ct, np.diag([4.0, 0.0, 4.0, 1.0])),
    }
    paths = {}
    for name, volume in files.items():  # NRRD holds any affine; NIfTI refuses a singular one
        paths[name] = folder / (f"{name}.nrrd" if name == "degenerate" else f"{name}.nii.gz")
        write_volume(paths[name], volume)
    return folder, paths


def _run_case(maisi, args, expected, inputs, out_dir):
    folder, _ = inputs
    before = {p.name: _sha(p) for p in folder.iterdir()}
    result = maisi(*args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("maisi: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert {p.name: _sha(p) for p in folder.iterdir()} == before  # inputs unchanged, nothing added
    assert sorted(p.name for p in out_dir.iterdir()) == []  # no output, no temporary file


def _cases(paths, out, weights):
    w = ["--model", "rflow-ct", "--weights-dir", str(weights), "--allow-any-size", "--device", "cpu"]
    gen = ["generate", *w]
    ae = str(Path(weights) / "models" / "autoencoder_v1.pt")
    p = {k: str(v) for k, v in paths.items()}
    return {
        # An output that names an input or another output.
        "generate --out = --mask": ([*gen, "--mask", p["labels"], "--out", p["labels"]], "is the input --mask"),
        "generate --out = --label-out": ([*gen, "--mask", p["labels"], "--out", f"{out}/a.nii.gz",
                                          "--label-out", f"{out}/a.nii.gz"], "name the same file"),
        "inpaint --out = --image": (["inpaint", *w[:4], "--image", p["ct"], "--tumor-type", "hepatic tumor",
                                     "--tumor-center", "0", "0", "0", "--tumor-diameter", "10", "--out", p["ct"]],
                                    "is the input --image"),
        "inpaint --label-out = --labels": (["inpaint", *w[:4], "--image", p["ct"], "--labels", p["labels"],
                                            "--tumor-type", "hepatic tumor", "--tumor-center", "0", "0", "0",
                                            "--tumor-diameter", "10", "--out", f"{out}/ct.nii.gz",
                                            "--label-out", p["labels"]], "is the input --labels"),
        "labels convert --out = segmentation": (["labels", "convert", "--from", "names", f"liver={p['labels']}",
                                                 "--out", p["labels"]], "is the input segmentation"),
        "vae encode --out = --image": (["vae", "encode", "--weights", ae, "--image", p["ct"], "--out", p["ct"]],
                                       "is the input --image"),
        "vae decode --out = --latent": (["vae", "decode", "--weights", ae, "--latent", p["ct"], "--out", p["ct"]],
                                        "is the input --latent"),
        "--out is a folder": ([*gen, "--size", "32", "32", "32", "--out", str(out)], "is a folder; give a file name"),
        # --draft and --update (pipelines.draft, pipelines.update).
        "--update-margin nan": ([*gen, "--mask", p["labels"], "--update", p["ct"], "--previous-labels", p["labels"],
                                 "--update-margin", "nan", "--out", f"{out}/c.nii.gz"],
                                "--update-margin nan: must be a positive number of mm"),
        "--update-margin -5": ([*gen, "--mask", p["labels"], "--update", p["ct"], "--previous-labels", p["labels"],
                                "--update-margin", "-5", "--out", f"{out}/c.nii.gz"],
                               "--update-margin -5.0: must be a positive number of mm"),
        "--update without --previous-labels": ([*gen, "--mask", p["labels"], "--update", p["ct"], "--out",
                                                f"{out}/c.nii.gz"], "--update PREVIOUS_CT needs --previous-labels"),
        "--update with --anatomy": ([*gen, "--anatomy", "liver", "--update", p["ct"], "--previous-labels", p["labels"],
                                     "--out", f"{out}/c.nii.gz"], "give --mask NEW_LABELS (not --anatomy"),
        "--update-margin without --update": ([*gen, "--mask", p["labels"], "--update-margin", "5", "--out",
                                              f"{out}/c.nii.gz"], "--update-margin goes with --update"),
        "--update --out = --update": ([*gen, "--mask", p["labels"], "--update", p["ct"], "--previous-labels",
                                       p["empty"], "--out", p["ct"]], "is the input --update"),
        "--update a NaN CT": ([*gen, "--mask", p["labels"], "--update", p["nan_ct"], "--previous-labels", p["empty"],
                               "--out", f"{out}/c.nii.gz"], "2 voxel(s) are NaN or infinite"),
        "--draft --update": ([*gen, "--mask", p["labels"], "--draft", "--update", p["ct"], "--previous-labels",
                              p["labels"], "--out", f"{out}/c.nii.gz"], "--draft and --update: choose one"),
        "--draft --steps 12": ([*gen, "--mask", p["labels"], "--draft", "--steps", "12", "--out", f"{out}/c.nii.gz"],
                               "a draft runs at most 10 network evaluations"),
        "--draft --qc-retries": ([*gen, "--mask", p["labels"], "--draft", "--qc-retries", "2", "--out",
                                  f"{out}/c.nii.gz"], "leave it out of a --draft"),
        # Non-finite numbers and voxels.
        "NaN voxels to inpaint": (["inpaint", *w[:4], "--image", p["nan_ct"], "--tumor-type", "hepatic tumor",
                                   "--tumor-center", "0", "0", "0", "--tumor-diameter", "10", "--out",
                                   f"{out}/ct.nii.gz"], "2 voxel(s) are NaN or infinite"),
        "NaN voxels to vae encode": (["vae", "encode", "--weights", ae, "--image", p["nan_ct"], "--out",
                                      f"{out}/lat.nii.gz"], "2 voxel(s) are NaN or infinite"),
        "--scale-factor nan": (["vae", "decode", "--weights", ae, "--latent", p["ct"], "--scale-factor", "nan",
                                "--out", f"{out}/ct.nii.gz"], "--scale-factor nan: must be a positive finite number"),
        "--spacing nan": ([*gen, "--size", "32", "32", "32", "--spacing", "nan", "1", "1", "--out", f"{out}/c.nii.gz"],
                          "positive finite number"),
        "--spacing inf": ([*gen, "--size", "32", "32", "32", "--spacing", "1", "inf", "1", "--out", f"{out}/c.nii.gz"],
                          "positive finite number"),
        "--seed -1": ([*gen, "--seed", "-1", "--size", "32", "32", "32", "--out", f"{out}/c.nii.gz"], "0 to 2^63-1"),
        "--seed 2^64": ([*gen, "--seed", str(2**64), "--size", "32", "32", "32", "--out", f"{out}/c.nii.gz"],
                        "0 to 2^63-1"),
        "--seed 1e23": ([*gen, "--seed", "1e23", "--size", "32", "32", "32", "--out", f"{out}/c.nii.gz"],
                        "invalid int value: '1e23'"),
        "degenerate affine of a mask": ([*gen, "--mask", p["degenerate"], "--out", f"{out}/c.nii.gz"], "is singular"),
        "degenerate affine of a CT": (["inpaint", *w[:4], "--image", p["degenerate"], "--tumor-type", "hepatic tumor",
                                       "--tumor-center", "0", "0", "0", "--tumor-diameter", "10", "--out",
                                       f"{out}/ct.nii.gz"], "is singular"),
        "labels convert --report = --ct": (["labels", "convert", "--from", "names", f"liver={p['labels']}", "--ct",
                                            p["ct"], "--out", f"{out}/l.nii.gz", "--report", p["ct"]],
                                           "is the input --ct"),
        "huge request": ([*gen, "--size", "4096", "4096", "4096", "--out", f"{out}/c.nii.gz"],
                         "ask for a smaller --size"),
        "qc --json in a missing folder": (["qc", p["ct"], "--label", p["labels"], "--json", f"{out}/no/qc.json"],
                                          "does not exist"),
        "train --lr nan": (["train", "vae", "--datalist", p["labels"], "--out", f"{out}/run", "--lr", "nan"],
                           "--lr nan: must be a positive finite number"),
        "train --patch-size 4096": (["train", "vae", "--datalist", p["labels"], "--out", f"{out}/run",
                                     "--patch-size", "4096", "4096", "4096"], "each side must be 1 to 768"),
        # Masks that are not masks.
        "fractional named mask": (["labels", "convert", "--from", "names", f"liver={p['fractional']}", "--out",
                                   f"{out}/l.nii.gz"], "holds fractional values (e.g. 0.6)"),
        "empty named mask": (["labels", "convert", "--from", "names", f"liver={p['empty']}", "--out",
                              f"{out}/l.nii.gz"], "every voxel is 0"),
        "fractional qc labels": (["qc", p["ct"], "--label", p["fractional"]], "holds non-integer values"),
        "empty qc labels": (["qc", p["ct"], "--label", p["empty"]], "every voxel is background"),
        "fractional --tumor-mask": (["inpaint", *w[:4], "--image", p["ct"], "--tumor-type", "hepatic tumor",
                                     "--tumor-mask", p["fractional"], "--out", f"{out}/ct.nii.gz"],
                                    "holds fractional values"),
    }


CASE_NAMES = list(_cases({k: Path(k) for k in ("labels", "ct", "nan_ct", "fractional", "empty", "degenerate")},
                         Path("o"), Path("w")))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_hostile_input_is_refused_cleanly(case, inputs, tiny_weights, tmp_path, maisi):
    out = tmp_path / "out"
    out.mkdir()
    args, expected = _cases(inputs[1], out, tiny_weights["rflow-ct"])[case]
    _run_case(maisi, args, expected, inputs, out)


def test_huge_request_is_refused_fast_and_small(tiny_weights, tmp_path):
    """A 4096³ request: refused by the estimate before any network is built, in a real process."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c",
         # VmHWM, not ru_maxrss: the latter keeps the forking parent's (pytest's) size across exec.
         "import sys\nfrom maisicore.cli import main\n"
         "code = main(sys.argv[1:])\n"
         "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), flush=True)\n"
         "sys.exit(code)",
         "generate", "--model", "rflow-ct", "--weights-dir", str(tiny_weights["rflow-ct"]), "--allow-any-size",
         "--size", "4096", "4096", "4096", "--out", str(tmp_path / "ct.nii.gz")],
        capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    assert proc.returncode == 2 and "ask for a smaller --size" in proc.stderr
    peak_mib = int(proc.stdout.strip()) / 1024
    assert peak_mib < 1024, peak_mib
    assert seconds < 30, seconds  # the Done-when's 10 s is measured on a quiet machine (closing note)
    assert list(tmp_path.iterdir()) == []


def test_weights_init_refuses_an_existing_set_without_force(tiny_weights, tmp_path, maisi):
    folder = tmp_path / "w"
    assert maisi("weights", "init", "--preset", "rflow-ct", "--width", "tiny", "--out", folder).returncode == 0
    before = {p.relative_to(folder): _sha(p) for p in folder.rglob("*") if p.is_file()}
    result = maisi("weights", "init", "--preset", "rflow-ct", "--width", "tiny", "--out", folder, "--seed", "3")
    assert result.returncode == 2 and "already holds a weight set; add --force" in result.stderr
    assert {p.relative_to(folder): _sha(p) for p in folder.rglob("*") if p.is_file()} == before
    assert maisi("weights", "init", "--preset", "rflow-ct", "--width", "tiny", "--out", folder, "--seed", "3",
                 "--force").returncode == 0
    assert {p.relative_to(folder): _sha(p) for p in folder.rglob("*") if p.is_file()} != before


def test_dry_run_prints_the_estimate_and_writes_nothing(tmp_path, maisi):
    result = maisi("generate", "--model", "demo", "--dry-run", "--out", tmp_path / "ct.nii.gz")
    assert result.returncode == 0, result.stderr
    assert "estimated peak memory" in result.stdout and "nothing was run or written" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    from maisicore.io.volumes import write_volume

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ct.nii.gz.maisi-{dead.pid}.abc123.tmp.nii.gz"
    alive = tmp_path / f".ct.nii.gz.maisi-{os.getppid()}.def456.tmp.nii.gz"  # a live process's: kept
    foreign = tmp_path / ".notes.tmp"
    for path in (stale, alive, foreign):
        path.write_bytes(b"partial")
    write_volume(tmp_path / "other.nii.gz", Volume(np.zeros((4, 4, 4), np.int16), np.eye(4)))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, foreign.name, "other.nii.gz"])


def _start_generation(tiny_weights, out: Path):
    return subprocess.Popen(
        [sys.executable, "-m", "maisicore", "generate", "--model", "rflow-ct", "--weights-dir",
         str(tiny_weights["rflow-ct"]), "--size", "64", "64", "64", "--spacing", "4", "4", "4", "--allow-any-size",
         "--steps", "200", "--device", "cpu", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_run_leaves_nothing_and_says_so(sig, tiny_weights, tmp_path):
    proc = _start_generation(tiny_weights, tmp_path / "ct.nii.gz")
    deadline = time.monotonic() + 120
    seen = ""
    while "denoise" not in seen and time.monotonic() < deadline:  # wait until the networks run
        seen += proc.stderr.read(1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "maisi: cancelled; nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_the_interruption_message_names_files_already_complete(tmp_path):
    from maisicore.cli import _interrupted_message
    from maisicore.io.volumes import write_volume

    out = write_volume(tmp_path / "ct.nii.gz", Volume(np.zeros((4, 4, 4), np.int16), np.eye(4)))
    message = _interrupted_message()
    assert message.startswith("maisi: cancelled; already complete: ") and str(out) in message
    assert message.endswith("; nothing else was written")


def test_a_closed_stdout_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "maisicore", "labels", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, like `| head -1`
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode in (0, 141) and "Traceback" not in err and "BrokenPipe" not in err, err


def test_maisi_run_reports_refusals_as_an_error_event(tiny_weights, tmp_path):
    request = {"kind": "generate", "model": "rflow-ct", "weights_dir": str(tiny_weights["rflow-ct"]),
               "size": [4096, 4096, 4096], "allow_any_size": True, "out": str(tmp_path / "ct.nii.gz")}
    (tmp_path / "r.json").write_text(json.dumps(request))
    proc = subprocess.run([sys.executable, "-m", "maisicore", "run", str(tmp_path / "r.json")], capture_output=True,
                          text=True, timeout=120)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 2 and events[-1]["event"] == "error" and events[-1]["code"] == 2
    assert "ask for a smaller --size" in events[-1]["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
