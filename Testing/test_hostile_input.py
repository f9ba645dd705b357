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


# ---- maisi batch and maisi run: every line and every path checked before any work ----------------------------


def _tree(folder: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _generate_line(weights, **fields) -> dict:
    return {"kind": "generate", "model": "rflow-ct", "weights_dir": str(weights), "size": [32, 32, 32],
            "spacing": [4.0, 4.0, 4.0], "allow_any_size": True, "steps": 1, **fields}


def _inpaint_line(weights, image, **fields) -> dict:
    return {"kind": "inpaint", "model": "rflow-ct", "weights_dir": str(weights), "image": str(image),
            "tumor_type": "hepatic tumor", "tumor_center": [60.0, 60.0, 60.0], "tumor_diameter": 10.0, "steps": 1,
            **fields}


def _refused(maisi, args, expected: list[str], *folders: Path) -> str:
    """Run ``maisi ARGS``; assert exit 2, one stderr line holding every ``expected`` text, and every
    file under ``folders`` byte for byte as before, nothing added (a missing folder stays missing)."""
    before = {folder: _tree(folder) if folder.exists() else None for folder in folders}
    result = maisi(*args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert {folder: _tree(folder) if folder.exists() else None for folder in folders} == before
    return lines[0]


@pytest.mark.parametrize("where", ["last", "middle"])
def test_batch_refuses_a_line_whose_input_is_another_line_s_output(where, inputs, tiny_weights, tmp_path, maisi):
    """The real CT at images/a-000.nii.gz is the input of line 2 and the output of line 1 under
    --out .: refused before any work naming both lines; the CT is unchanged, nothing written."""
    weights = tiny_weights["rflow-ct"]
    (tmp_path / "images").mkdir()
    real_ct = tmp_path / "images" / "a-000.nii.gz"
    real_ct.write_bytes(inputs[1]["ct"].read_bytes())
    lines = [_generate_line(weights, id="a"), _inpaint_line(weights, "images/a-000.nii.gz", id="b")]
    if where == "middle":
        lines.append(_generate_line(weights, id="c"))
    manifest = tmp_path / "cases.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    digest = _sha(real_ct)
    message = _refused(maisi, ["batch", manifest, "--out", tmp_path, "--device", "cpu"],
                       [f"{manifest} line 2: image", "is the output of line 1 (case a-000)", "--out"], tmp_path)
    assert "a-000.nii.gz" in message and _sha(real_ct) == digest


def test_batch_refuses_a_line_whose_input_is_a_file_of_the_batch(inputs, tiny_weights, tmp_path, maisi):
    """A mask at --out/summary.json's place (through a link): the batch would replace it."""
    out = tmp_path / "set"
    out.mkdir()
    (out / "summary.json").symlink_to(inputs[1]["labels"])
    manifest = tmp_path / "cases.jsonl"
    manifest.write_text(json.dumps(_generate_line(tiny_weights["rflow-ct"], mask=str(out / "summary.json"))) + "\n")
    _refused(maisi, ["batch", manifest, "--out", out, "--device", "cpu"],
             [f"{manifest} line 1: mask", "summary.json"], tmp_path, inputs[0])


def test_batch_refuses_a_case_that_would_replace_a_candidate_mask(inputs, tiny_weights, tmp_path, maisi):
    """Line 1 picks its mask from a database whose candidate is the file its own labels would be
    written to (--out/labels/a-000.nii.gz): refused, the candidate unchanged."""
    out = tmp_path / "set"
    (out / "labels").mkdir(parents=True)
    candidate = out / "labels" / "a-000.nii.gz"
    candidate.write_bytes(inputs[1]["labels"].read_bytes())
    (tmp_path / "db.json").write_text(json.dumps([{"pseudo_label_filename": "a-000.nii.gz", "label_list": [1, 200],
                                                   "dim": [32, 32, 32], "spacing": [4.0, 4.0, 4.0]}]))
    line = _generate_line(tiny_weights["rflow-ct"], id="a", anatomy=["liver"], mask_db="db.json",
                          mask_dir=str(out / "labels"))
    manifest = tmp_path / "cases.jsonl"
    manifest.write_text(json.dumps(line) + "\n")
    digest = _sha(candidate)
    _refused(maisi, ["batch", manifest, "--out", out, "--device", "cpu"],
             [f"{manifest} line 1: mask_db candidate", "is the output of line 1 (case a-000)"], tmp_path)
    assert _sha(candidate) == digest


@pytest.mark.parametrize("cells", ["extra", "missing"])
def test_batch_refuses_a_csv_row_whose_cells_do_not_match_the_header(cells, inputs, tiny_weights, tmp_path, maisi):
    """csv.DictReader drops a row's extra cell (here the mask) and fills missing ones with None: refused."""
    header = "id,model,weights_dir,size,spacing,allow_any_size,steps"
    row = f"a,rflow-ct,{tiny_weights['rflow-ct']},32 32 32,4 4 4,true,1"
    if cells == "extra":
        text = f"{header}\n{row},{inputs[1]['labels']}\n"
        expected = ["line 2", "8 cells", "header has 7"]
    else:
        text = f"{header},mask\n{row}\n"
        expected = ["line 2", "7 cells", "header has 8"]
    manifest = tmp_path / "cases.csv"
    manifest.write_text(text)
    out = tmp_path / "set"
    _refused(maisi, ["batch", manifest, "--out", out, "--device", "cpu"], expected, tmp_path, inputs[0])
    assert not out.exists()


@pytest.mark.parametrize("mask", ["nan_ct", "garbage"])
def test_batch_refuses_a_bad_mask_on_its_last_line_before_any_work(mask, inputs, tiny_weights, tmp_path, maisi):
    """Every line's inputs are read and checked before the first item runs: line 1 is fine, line 2's
    mask has NaN voxels (or is not a volume); exit 2 and nothing written, not line 1's case either."""
    weights = tiny_weights["rflow-ct"]
    path = inputs[1]["nan_ct"]
    if mask == "garbage":
        path = tmp_path / "garbage.nii.gz"
        path.write_bytes(b"not a volume at all")
    manifest = tmp_path / "cases.jsonl"
    manifest.write_text(json.dumps(_generate_line(weights, id="a")) + "\n"
                        + json.dumps(_generate_line(weights, id="b", mask=str(path), count=2)) + "\n")
    out = tmp_path / "set"
    _refused(maisi, ["batch", manifest, "--out", out, "--device", "cpu"], [f"{manifest} line 2"], tmp_path, inputs[0])
    assert not out.exists()


@pytest.mark.parametrize("case", ["out = mask (link)", "label_out = previous_labels", "out = update",
                                  "out = candidate mask"])
def test_maisi_run_refuses_a_request_whose_output_is_its_input(case, inputs, tiny_weights, tmp_path, maisi):
    """`maisi run REQUEST.json`: an output naming one of the request's inputs, through a link, the
    previous CT and labels of an update, or a candidate mask of --mask-db, is refused; nothing written."""
    folder = tmp_path / "data"
    folder.mkdir()
    mask, ct = folder / "mask.nii.gz", folder / "previous.nii.gz"
    mask.write_bytes(inputs[1]["labels"].read_bytes())
    ct.write_bytes(inputs[1]["ct"].read_bytes())
    weights = tiny_weights["rflow-ct"]
    request = _generate_line(weights, mask=str(mask), size=None, spacing=None)
    request = {k: v for k, v in request.items() if v is not None}
    if case == "out = mask (link)":
        (folder / "link.nii.gz").symlink_to(mask)
        request["out"], expected = str(folder / "link.nii.gz"), "is the input --mask"
    elif case == "label_out = previous_labels":
        request.update(mask=str(inputs[1]["labels"]), update=str(ct), previous_labels=str(mask),
                       out=str(tmp_path / "new.nii.gz"), label_out=str(mask))
        expected = "is the input --previous-labels"
    elif case == "out = update":
        request.update(update=str(ct), previous_labels=str(inputs[1]["labels"]), out=str(ct))
        expected = "is the input --update"
    else:
        (folder / "db.json").write_text(json.dumps([{"pseudo_label_filename": "mask.nii.gz", "label_list": [1, 200],
                                                     "dim": [32, 32, 32], "spacing": [4.0, 4.0, 4.0]}]))
        del request["mask"]
        request.update(anatomy=["liver"], mask_db=str(folder / "db.json"), size=[32, 32, 32], spacing=[4.0, 4.0, 4.0],
                       out=str(mask))
        expected = "candidate mask"
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    _refused(maisi, ["run", path], [expected], folder, inputs[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "request.json"]


# ---- Inputs checked before work, and safe refusals (issue 29) ----------------------------------------


def _one_error_line(result) -> str:
    """The refusal: exit 2, exactly one stderr line (no warning, no progress line before it)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maisi: error: "), result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    return lines[0]


def _truncated_nifti(path: Path) -> Path:
    """A NIfTI whose header reads but whose voxels end early (a copy cut short)."""
    noise = np.random.default_rng(0).integers(-1000, 1000, (32, 32, 32)).astype(np.int16)
    write_volume(path, Volume(noise, np.diag([4.0, 4.0, 4.0, 1.0])))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _datalist(folder: Path, images: list[str]) -> Path:
    entries = [{"image": name, "dim": [32, 32, 32], "spacing": [4.0, 4.0, 4.0], "modality": "ct", "fold": 0}
               for name in images]
    path = folder / "data.json"
    path.write_text(json.dumps({"format": "maisi-datalist", "version": 1, "training": entries}))
    return path


@pytest.fixture
def bad_last(inputs, tmp_path):
    """A folder with a good CT first and, sorted last, a bad one of each kind: truncated, NaN voxels."""
    _, paths = inputs
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "a_ct.nii.gz").write_bytes(paths["ct"].read_bytes())
    _truncated_nifti(folder / "z_truncated.nii.gz")
    (folder / "z_nan.nii.gz").write_bytes(paths["nan_ct"].read_bytes())
    return folder


def test_evaluate_refuses_an_unreadable_real_ct_last_before_any_reconstruction(bad_last, tiny_weights, tmp_path,
                                                                             maisi, monkeypatch):
    from maisicore.evaluation import measures

    calls = []
    monkeypatch.setattr(measures, "reconstruct", lambda *args, **kwargs: calls.append(args) or args[1])
    (bad_last / "z_nan.nii.gz").unlink()  # the truncated file is the last CT
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    (synthetic / "s.nii.gz").write_bytes((bad_last / "a_ct.nii.gz").read_bytes())
    ae = tiny_weights["rflow-ct"] / "models" / "autoencoder_v1.pt"
    started = time.perf_counter()
    result = maisi("evaluate", "--real", bad_last, "--synthetic", synthetic, "--metrics", "vae",
                   "--vae-weights", ae, "--device", "cpu", "--out", tmp_path / "report")
    seconds = time.perf_counter() - started
    line = _one_error_line(result)
    assert "z_truncated.nii.gz: cannot be read" in line
    assert calls == []  # the VAE metric never ran on the readable CT before it
    assert seconds < 20, seconds
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("bad", ["z_truncated.nii.gz", "z_nan.nii.gz"])
def test_train_refuses_a_bad_datalist_entry_last_before_any_step(bad, bad_last, tiny_weights, tmp_path, maisi):
    datalist = _datalist(bad_last, ["a_ct.nii.gz", bad])
    run = tmp_path / "run"
    result = maisi("train", "vae", "--datalist", datalist, "--out", run, "--width", "tiny", "--patch-size", 32, 32, 32,
                   "--max-steps", 1, "--device", "cpu")
    assert not run.exists()  # no run folder: refused before the first step
    line = _one_error_line(result)
    assert "entry 1" in line and bad in line
    assert ("cannot be read" if "truncated" in bad else "voxel(s) are NaN or infinite") in line


@pytest.mark.parametrize("bad", ["z_truncated.nii.gz", "z_nan.nii.gz"])
def test_prepare_latents_refuses_a_bad_entry_last_before_encoding_any(bad, bad_last, tiny_weights, tmp_path, maisi):
    datalist = _datalist(bad_last, ["a_ct.nii.gz", bad])
    out = tmp_path / "out"
    out.mkdir()
    result = maisi("prepare", "latents", "--datalist", datalist, "--weights", tiny_weights["rflow-ct"],
                   "--out-dir", out / "latents", "--out", out / "latents.json", "--round-to", 32, "--device", "cpu")
    assert list(out.iterdir()) == []  # no latent of the good first entry, no folder
    line = _one_error_line(result)
    assert "entry 1" in line and bad in line


class _RunsCodeWhenLoaded:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def code_weights(tiny_weights, tmp_path):
    """A weight folder whose autoencoder file holds pickled code (torch.save of an object that
    creates a marker file when unpickled)."""
    import shutil

    import torch

    folder = tmp_path / "code-weights"
    shutil.copytree(tiny_weights["rflow-ct"], folder)
    marker = tmp_path / "code-was-executed"
    torch.save({"encoder.weight": _RunsCodeWhenLoaded(marker)}, folder / "models" / "autoencoder_v1.pt")
    return folder, marker


@pytest.mark.parametrize("command", ["vae encode", "train --init", "prepare latents"])
def test_a_checkpoint_holding_code_is_refused_in_our_words(command, code_weights, inputs, tmp_path, maisi):
    folder, marker = code_weights
    ae = folder / "models" / "autoencoder_v1.pt"
    ct = inputs[1]["ct"]
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "a_ct.nii.gz").write_bytes(ct.read_bytes())
    args = {
        "vae encode": ["vae", "encode", "--weights", ae, "--image", ct, "--out", out / "latent.nii.gz"],
        "train --init": ["train", "vae", "--datalist", _datalist(tmp_path, ["a_ct.nii.gz"]), "--out", out / "run",
                         "--width", "tiny", "--init", folder, "--patch-size", 32, 32, 32, "--max-steps", 1,
                         "--device", "cpu"],
        "prepare latents": ["prepare", "latents", "--datalist", _datalist(tmp_path, ["a_ct.nii.gz"]), "--weights", ae,
                            "--out-dir", out / "latents", "--out", out / "latents.json", "--round-to", 32,
                            "--device", "cpu"],
    }[command]
    line = _one_error_line(maisi(*args))
    assert str(ae) in line and "holds code or objects other than tensors" in line and "was not loaded" in line
    assert "weights_only" not in line and "\x1b" not in line and "trust" not in line
    assert not marker.exists()  # nothing ran
    assert list(out.iterdir()) == []


def test_a_dicom_series_with_a_truncated_slice_is_named(real_data, tiny_weights, tmp_path, maisi):
    import shutil

    series = tmp_path / "series"
    shutil.copytree(real_data / "example_ct_dicom", series)
    cut = sorted(series.iterdir())[10]
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # a copy interrupted in the pixel data
    out = tmp_path / "out"
    out.mkdir()
    result = maisi("vae", "encode", "--weights", tiny_weights["rflow-ct"] / "models" / "autoencoder_v1.pt",
                   "--image", series, "--out", out / "latent.nii.gz")
    line = _one_error_line(result)
    assert f"{cut}: truncated or not a DICOM file" in line
    assert "ImageOrientationPatient" not in line and "warn" not in result.stderr.lower()
    assert list(out.iterdir()) == []


def _inpaint_args(tiny_weights, ct, centre, out):
    return ["inpaint", "--model", "rflow-ct", "--weights-dir", tiny_weights["rflow-ct"], "--image", ct,
            "--tumor-type", "hepatic tumor", "--tumor-center", *centre, "--tumor-diameter", "8", "--steps", "1",
            "--device", "cpu", "--out", out / "ct.nii.gz"]


def test_inpaint_refuses_a_tumour_outside_the_body(inputs, tiny_weights, tmp_path, maisi):
    out = tmp_path / "out"
    out.mkdir()
    # The body of the test CT spans voxels 4..27 (16 to 108 mm); voxel (1, 1, 16) is air beside it.
    line = _one_error_line(maisi(*_inpaint_args(tiny_weights, inputs[1]["ct"], ("4", "4", "64"), out)))
    assert "--tumor-center 4 4 64 (RAS mm) is outside the body" in line and "liver" in line
    assert list(out.iterdir()) == []


def test_inpaint_without_labels_notes_that_the_host_organ_was_not_checked(inputs, tiny_weights, tmp_path, maisi):
    out = tmp_path / "out"
    out.mkdir()
    result = maisi(*_inpaint_args(tiny_weights, inputs[1]["ct"], ("64", "64", "64"), out))
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert any("not checked against its host organ (liver)" in note for note in notes), result.stderr
    assert (out / "ct.nii.gz").is_file()


def test_inpaint_with_labels_notes_how_much_clipping_to_the_organ_kept(inputs, tiny_weights, tmp_path, maisi):
    out = tmp_path / "out"
    out.mkdir()
    # The liver (label 1) of the test labels spans voxels 10..19; a 16 mm ball centred on its edge voxel
    # (10, 15, 15) keeps about half its voxels inside it.
    args = _inpaint_args(tiny_weights, inputs[1]["ct"], ("40", "60", "60"), out)
    args[args.index("--tumor-diameter") + 1] = "16"
    result = maisi(*args, "--labels", inputs[1]["labels"])
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: the tumour was clipped")]
    assert len(notes) == 1 and "host organ (liver) in --labels" in notes[0], result.stderr
    kept, drawn = (int(n) for n in notes[0].split(": ")[-1].split(" voxels")[0].split(" of "))
    assert 0.25 * drawn <= kept < drawn
