"""MAISIGenerate's logic end to end on real MRML (slicer-core wheel), the real `maisi` worker
process and tiny random weights (`maisi weights init --width tiny --nonzero-init`).

- From a segmentation on an oblique, flipped grid: a new volume on exactly the reference's grid,
  voxel for voxel what the `maisi` CLI writes for the same labels and seed; inputs untouched; the
  label segmentation carries MAISI names, colours and terminology.
- Inpainting a tumour at a point, and random anatomy without a mask: new nodes, right geometry.
- Random anatomy with anatomy sizes (the "Anatomy sizes" sliders): the mask networks generate the
  mask; a CT on the requested grid and its labels; sizes with anatomy names are refused in one line.
- One warm worker (`maisi serve`) for every Apply: two Applies and a cancelled one then another
  run in the same process; a cancel is answered (error 130) and nothing is added to the scene.
- Cancel of a one-shot worker (`warm=False`, `maisi run`): its process group is gone within 2 s.
- The interactive loop: Draft gives a "(draft)" node on the mask's grid that never becomes the
  previous result; Apply after a small edit of the segmentation updates only the changed region
  (a request with `update`/`previous_labels`, every voxel beyond the margin the first result's, bit
  for bit, in the same warm worker); "Generate again", big edits and unchanged labels generate.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import slicer
from maisicore.anatomy.labels import label_table
from maisicore.io.geometry import kji_to_ijk
from maisicore.io.volumes import read_volume, write_volume
from MAISIGenerateLib import mrml
from MAISIGenerateLib.logic import GenerateLogic
from MAISIGenerateLib.parameters import (
    FromSegmentation,
    InpaintTumor,
    RandomAnatomy,
    RunOptions,
)
from MAISIGenerateLib.process import WorkerProcess
from slicer_headless import (
    add_segmentation,
    add_volume,
    live_process_group,
    node_checksum,
    node_ids,
    oblique_flipped_ijk_to_ras,
    paint_segment,
    process_alive,
)

N = 32  # voxels per side: the smallest grid the models accept (--allow-any-size)


def _body_ct() -> np.ndarray:
    """An (x, y, z) int16 CT: air around an elliptic soft-tissue body."""
    i, j, _k = np.meshgrid(np.arange(N), np.arange(N), np.arange(N), indexing="ij")
    return np.where(((i - 15.5) / 14) ** 2 + ((j - 15.5) / 12) ** 2 < 1, 40, -1000).astype(np.int16)


def _ball(center, radius) -> np.ndarray:
    i, j, k = np.meshgrid(np.arange(N), np.arange(N), np.arange(N), indexing="ij")
    return (i - center[0]) ** 2 + (j - center[1]) ** 2 + (k - center[2]) ** 2 < radius**2


@pytest.fixture
def sphere_case(scene):
    """A reference CT on an oblique, flipped 4 mm grid and a segmentation painted on it: a liver
    sphere with a tumour inside, named as a user would."""
    ijk_to_ras = oblique_flipped_ijk_to_ras(spacing=(4.0, 4.0, 4.0))
    reference = add_volume(_body_ct(), ijk_to_ras, "CT")
    segmentation = add_segmentation("Painted", reference)
    paint_segment(segmentation, "Liver", _ball((12, 14, 16), 7), reference)
    paint_segment(segmentation, "liver tumour", _ball((11, 14, 16), 2.5), reference)
    return reference, segmentation


def _options(tiny_weights, **kwargs) -> RunOptions:
    values = dict(model="rflow-ct", weights_dir=str(tiny_weights["rflow-ct"]), seed=7, steps=2, device="cpu",
                  allow_any_size=True)
    values.update(kwargs)
    return RunOptions(**values)


def _with_display_nodes(*nodes) -> set[str]:
    """IDs of ``nodes`` and of their display nodes."""
    ids = set()
    for node in nodes:
        ids.add(node.GetID())
        ids |= {node.GetNthDisplayNode(i).GetID() for i in range(node.GetNumberOfDisplayNodes())}
    return ids


def _maisi_temp_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("maisi-generate-*")}


@pytest.mark.slow
def test_generation_from_segmentation_matches_the_cli_on_the_reference_grid(scene, sphere_case, tiny_weights, tmp_path,
                                                                            maisi):
    reference, segmentation = sphere_case
    before = {node.GetID(): node_checksum(node) for node in (reference, segmentation)}
    nodes_before = node_ids(scene)
    temp_before = _maisi_temp_dirs()
    logic = GenerateLogic()
    lines = []

    job = logic.start(FromSegmentation(segmentation, reference), _options(tiny_weights))
    assert job.command[-2:] == ["maisicore", "serve"] and job.request_file.is_file()  # a request to the warm worker
    deadline = time.monotonic() + 600
    while not job.done and time.monotonic() < deadline:
        lines += job.poll()
        time.sleep(0.05)
    lines += job.poll()
    worker_files = {name: (job.workdir / name).read_bytes() for name in ("ct.nrrd", "labels.nrrd")}
    result = job.finish()

    # A new volume node, named with model and seed, on exactly the reference's grid.
    volume = result.volume_node
    assert volume.GetID() not in nodes_before and volume is not reference
    assert volume.GetName() == "MAISI rflow-ct seed 7"
    np.testing.assert_array_equal(mrml.ijk_to_ras(volume), mrml.ijk_to_ras(reference))
    ct = kji_to_ijk(slicer.util.arrayFromVolume(volume))
    assert ct.shape == (N, N, N) and ct.dtype == np.int16

    # Voxel for voxel what the maisi CLI writes for the same labels, weights and seed.
    labels = logic.labels_from_segmentation(segmentation, reference).labels
    write_volume(tmp_path / "mask.nrrd", labels)
    cli = maisi("generate", "--model", "rflow-ct", "--weights-dir", tiny_weights["rflow-ct"],
                "--mask", tmp_path / "mask.nrrd", "--seed", 7, "--steps", 2, "--device", "cpu",
                "--allow-any-size", "--out", tmp_path / "ct.nrrd", "--label-out", tmp_path / "labels.nrrd")
    assert cli.returncode == 0, cli.stderr
    expected = read_volume(tmp_path / "ct.nrrd")
    np.testing.assert_array_equal(ct, expected.array)
    assert ct.std() > 0
    # The worker wrote the very bytes the CLI writes for the same request.
    for name, data in worker_files.items():
        assert data == (tmp_path / name).read_bytes(), name

    # The inputs are unchanged and nothing else was added or left behind.
    assert {node.GetID(): node_checksum(node) for node in (reference, segmentation)} == before
    assert node_ids(scene) - nodes_before == _with_display_nodes(volume, result.segmentation_node)
    assert _maisi_temp_dirs() <= temp_before
    assert any(line.startswith("wrote ") for line in lines)

    # The label segmentation: one segment per label used, MAISI names, colours and terminology.
    table = label_table()
    labels_node = result.segmentation_node
    assert labels_node.GetName() == "MAISI rflow-ct seed 7 labels"
    segments = {}
    for segment_id in mrml.segment_ids(labels_node):
        segment = labels_node.GetSegmentation().GetSegment(segment_id)
        info = table.by_name(segment.GetName())
        segments[info.id] = segment_id
        assert mrml.segment_terminology(segment) == info.terminology_entry()
        np.testing.assert_allclose(segment.GetColor(), np.array(info.color) / 255.0)
    assert set(segments) == {1, 26, 200}  # liver, hepatic tumor, body
    for label_id, segment_id in segments.items():
        mask = kji_to_ijk(slicer.util.arrayFromSegmentBinaryLabelmap(labels_node, segment_id, volume))
        np.testing.assert_array_equal(mask != 0, labels.array == label_id)


@pytest.mark.slow
def test_inpainting_a_tumour_at_a_point_gives_a_new_volume_on_the_input_grid(scene, tiny_weights):
    ijk_to_ras = oblique_flipped_ijk_to_ras(spacing=(2.0, 2.0, 2.0))
    ct_array = _body_ct()
    ct = add_volume(ct_array, ijk_to_ras, "Patient CT")
    checksum = node_checksum(ct)
    center = (ijk_to_ras @ [15.5, 15.5, 15.5, 1.0])[:3]

    result = GenerateLogic().run(
        InpaintTumor(ct, "hepatic tumor", center_ras=tuple(center), diameter_mm=8.0), _options(tiny_weights, seed=3)
    )

    assert result.volume_node.GetName() == "Patient CT + hepatic tumor (MAISI rflow-ct seed 3)"
    np.testing.assert_array_equal(mrml.ijk_to_ras(result.volume_node), mrml.ijk_to_ras(ct))
    out = kji_to_ijk(slicer.util.arrayFromVolume(result.volume_node))
    assert out.shape == ct_array.shape and out.dtype == ct_array.dtype
    changed = out != ct_array
    assert changed.any()
    assert not changed[_ball((15.5, 15.5, 15.5), 12) == 0].any()  # only around the tumour
    assert node_checksum(ct) == checksum
    names = {labels.GetName() for labels in [result.segmentation_node.GetSegmentation().GetNthSegment(i)
                                             for i in range(result.segmentation_node.GetSegmentation().GetNumberOfSegments())]}
    assert "hepatic tumor" in names


@pytest.mark.slow
def test_random_anatomy_without_a_mask_gives_a_volume_and_no_labels(scene, tiny_weights):
    result = GenerateLogic().run(RandomAnatomy(size=(N, N, N), spacing=(5.0, 5.0, 5.0)), _options(tiny_weights, seed=1))
    assert result.segmentation_node is None
    np.testing.assert_allclose(np.linalg.norm(mrml.ijk_to_ras(result.volume_node)[:3, :3], axis=0), 5.0)
    assert slicer.util.arrayFromVolume(result.volume_node).shape == (N, N, N)


MASKGEN_FIXTURE = Path(__file__).resolve().parent / "data" / "tiny_maskgen"  # benchmarks/train_tiny_maskgen.py


@pytest.fixture
def maskgen_folder(request, tmp_path, maisi) -> tuple[Path, Path]:
    """(weight folder, size database): tiny rflow-ct weights with the tiny trained mask networks of
    Testing/data/tiny_maskgen beside them (as test_maskgen.py's ``maskgen_weights``); without that
    fixture, `maisi weights init --mask-networks --nonzero-init` and a small random size database."""
    import json
    import shutil

    folder = tmp_path / "weights"
    if MASKGEN_FIXTURE.is_dir():
        shutil.copytree(request.getfixturevalue("tiny_weights")["rflow-ct"], folder)
        for path in (MASKGEN_FIXTURE / "models").iterdir():
            shutil.copyfile(path, folder / "models" / path.name)
        card = json.loads((folder / "maisi_model.json").read_text())
        card["mask_generation"] = json.loads((MASKGEN_FIXTURE / "maisi_model.json").read_text())["mask_generation"]
        (folder / "maisi_model.json").write_text(json.dumps(card))
        return folder, MASKGEN_FIXTURE / "all_anatomy_size_conditions.json"
    result = maisi("weights", "init", "--preset", "rflow-ct", "--width", "tiny", "--mask-networks", "--nonzero-init",
                   "--out", folder)
    assert result.returncode == 0, result.stderr
    rng = np.random.default_rng(0)
    database = tmp_path / "all_anatomy_size_conditions.json"
    database.write_text(json.dumps([{"organ_size": [float(v) for v in rng.random(10)]} for _ in range(20)]))
    return folder, database


@pytest.mark.slow
def test_random_anatomy_with_anatomy_sizes_generates_the_mask(scene, maskgen_folder):
    """The sliders' request: the mask networks generate the mask (liver size 0.8); the CT is on the
    requested grid and its labels (liver, body) come back as a segmentation."""
    weights, database = maskgen_folder
    nodes_before = node_ids(scene)
    source = RandomAnatomy(size=(N, N, N), spacing=(12.0, 12.0, 12.0), anatomy_sizes=(("liver", 0.8),),
                           anatomy_size_db=str(database), mask_steps=5)
    job = GenerateLogic().start(source, RunOptions(model=str(weights), seed=3, steps=2, device="cpu",
                                                   allow_any_size=True))
    assert (job.request.anatomy_size, job.request.anatomy, job.request.mask_steps) == ("liver=0.8", None, 5)
    assert job.request.label_out and job.request.anatomy_size_db == str(database)
    deadline = time.monotonic() + 600
    while not job.done and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    result = job.finish()

    assert result.volume_node is not None and result.segmentation_node is not None
    assert any("mask generated with anatomy sizes liver=0.8" in line for line in result.log), result.log
    ijk_to_ras = mrml.ijk_to_ras(result.volume_node)
    np.testing.assert_allclose(np.linalg.norm(ijk_to_ras[:3, :3], axis=0), 12.0)
    assert slicer.util.arrayFromVolume(result.volume_node).shape == (N, N, N)
    segmentation = result.segmentation_node.GetSegmentation()
    table = label_table()
    ids = {table.by_name(segmentation.GetSegment(s).GetName()).id for s in mrml.segment_ids(result.segmentation_node)}
    assert {1, 200} <= ids  # liver and body
    assert node_ids(scene) - nodes_before == _with_display_nodes(result.volume_node, result.segmentation_node)


def test_anatomy_sizes_with_anatomy_names_are_refused_in_one_line(scene, tmp_path):
    """Anatomy names pick a mask from the database, sizes generate one: not both (the request's own
    rule and words); nothing is started or left behind."""
    temp_before = _maisi_temp_dirs()
    source = RandomAnatomy(anatomy=("liver",), anatomy_sizes=(("liver", 0.8),), size=(N, N, N))
    with pytest.raises(ValueError, match="--anatomy-size generates the mask; leave out --mask and --anatomy") as error:
        GenerateLogic().start(source, RunOptions(model="rflow-ct", weights_dir=str(tmp_path), device="cpu"))
    assert "\n" not in str(error.value)
    assert _maisi_temp_dirs() <= temp_before
    # The sizes are maisicore's rules too: a class without a size control, two tumours.
    for sizes, words in [((("spleen", 0.5),), "'spleen' has no size control"),
                         ((("hepatic tumor", 0.1), ("bone lesion", 0.2)), "at most one tumour")]:
        with pytest.raises(ValueError, match=words):
            GenerateLogic().start(RandomAnatomy(anatomy_sizes=sizes), RunOptions(device="cpu"))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; Windows uses taskkill /T")
def test_cancel_kills_the_worker_within_2_s_and_adds_nothing(scene, sphere_case, tiny_weights):
    reference, segmentation = sphere_case
    nodes_before = node_ids(scene)
    temp_before = _maisi_temp_dirs()
    # 1000 denoising steps on a 128³ grid: minutes of work for the (one-shot) worker.
    job = GenerateLogic(warm=False).start(RandomAnatomy(size=(128, 128, 128), spacing=(2.0, 2.0, 2.0)),
                                _options(tiny_weights, steps=1000))
    deadline = time.monotonic() + 180
    while job.progress is None:  # wait for the first progress line: the model is loaded and running
        job.poll()
        assert not job.done, "\n".join(job.log)
        assert time.monotonic() < deadline, "no progress line from the worker"
        time.sleep(0.05)
    pid = job.worker.pid
    assert pid in live_process_group(pid)

    started = time.monotonic()
    job.cancel()
    while live_process_group(pid) and time.monotonic() - started < 2.0:
        time.sleep(0.01)
    assert not live_process_group(pid), "worker process group still alive 2 s after cancel"
    assert time.monotonic() - started < 2.0
    assert job.worker.returncode is not None and job.worker.returncode != 0
    assert node_ids(scene) == nodes_before
    assert not job.workdir.exists() and _maisi_temp_dirs() <= temp_before

    # The blocking path (batch scripts) cancels the same way and returns None.
    seen = []
    result = GenerateLogic(warm=False).run(FromSegmentation(segmentation, reference), _options(tiny_weights, steps=1000),
                                 progress=lambda *p: seen.append(p), should_cancel=lambda: bool(seen))
    assert result is None and seen
    assert node_ids(scene) == nodes_before


def _run_job(job, deadline_s: float = 600):
    deadline = time.monotonic() + deadline_s
    while not job.done:
        job.poll()
        assert time.monotonic() < deadline, "\n".join(job.log)
        time.sleep(0.05)
    return job.finish()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_one_warm_worker_serves_every_apply_and_survives_a_cancel(scene, tiny_weights):
    """Apply twice: one worker process for both, the second run on the loaded networks; Cancel of a
    long run is answered by the worker (error 130, nothing added) and the next Apply runs in the
    same process; shutdown (module cleanup, scene close) ends it."""
    logic = GenerateLogic()
    source = RandomAnatomy(size=(N, N, N), spacing=(5.0, 5.0, 5.0))
    first = logic.start(source, _options(tiny_weights, seed=1))
    pid = first.worker.pid
    result = _run_job(first)
    assert result.volume_node.GetName() == "MAISI rflow-ct seed 1" and process_alive(pid)
    second = logic.start(source, _options(tiny_weights, seed=2))
    assert second.worker.pid == pid
    _run_job(second)
    assert any(line.startswith("rflow-ct/tiny on cpu") for line in second.log)
    assert logic.serve_worker() is second.worker.worker and second.worker.worker.ready["pid"] == pid

    nodes_before = node_ids(scene)
    long = logic.start(RandomAnatomy(size=(64, 64, 64), spacing=(4.0, 4.0, 4.0)), _options(tiny_weights, steps=1000))
    assert long.worker.pid == pid
    deadline = time.monotonic() + 180
    while long.progress is None:
        long.poll()
        assert not long.done and time.monotonic() < deadline, "\n".join(long.log)
        time.sleep(0.05)
    started = time.monotonic()
    long.cancel()
    assert time.monotonic() - started < long.worker.grace_s()
    assert long.worker.returncode == 130 and not long.worker.killed  # answered, not killed
    assert process_alive(pid) and not long.workdir.exists() and node_ids(scene) == nodes_before

    after = logic.start(source, _options(tiny_weights, seed=3))
    assert after.worker.pid == pid
    assert _run_job(after).volume_node.GetName() == "MAISI rflow-ct seed 3"

    logic.shutdown()
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; Windows uses taskkill /T")
def test_cancel_kills_grandchildren_too():
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; print(\"grandchild\", flush=True); time.sleep(120)'])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    worker = WorkerProcess([sys.executable, "-c", script])
    lines, deadline = [], time.monotonic() + 30
    while len(lines) < 2 and time.monotonic() < deadline:
        lines += worker.read_lines()
        time.sleep(0.02)
    grandchild = int(next(line.split()[1] for line in lines if line.startswith("child")))
    started = time.monotonic()
    worker.cancel()
    assert time.monotonic() - started < 2.0
    assert not live_process_group(worker.pid)
    assert not process_alive(grandchild)


def test_weights_status_and_download_command(monkeypatch, tmp_path):
    """What the Model panel shows comes from `maisi weights list --json`; the download runs only
    with --accept-license, which the panel passes after the user accepted the licence."""
    monkeypatch.setenv("MAISI_HOME", str(tmp_path))
    logic = GenerateLogic()
    rows = {row["model"]: row for row in logic.weights_status()}
    assert set(rows) == {"rflow-ct", "ddpm-ct", "rflow-mr", "rflow-mr-brain"}
    for model, row in rows.items():
        assert row["installed"] is False and row["license_accepted"] is False
        assert row["license"] and row["license_url"].startswith("https://")
        assert row["path"] == str(tmp_path / "weights" / model)
    assert logic.remove_weights("rflow-ct").startswith("rflow-ct: nothing to remove")
    # The download is a request whose licence acceptance the panel sets after the user accepted.
    monkeypatch.setenv("MAISI_WEIGHTS_BASE_URL", "http://127.0.0.1:9")  # nothing listens: fails at once
    job = logic.start_weights_download("rflow-ct")
    assert job.request.to_dict() == {"kind": "weights", "action": "download", "model": "rflow-ct",
                                     "accept_license": True, "include_datasets": False}
    assert job.command[-3:] == ["maisicore", "run", str(job.request_file)]
    deadline = time.monotonic() + 60
    while not job.done and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    with pytest.raises(RuntimeError, match="cannot reach the weights server"):
        job.finish()
    assert not job.workdir.exists() and not (tmp_path / "weights" / "rflow-ct" / "models").exists()


def test_weights_status_is_polled_not_waited_for(monkeypatch, tmp_path):
    """The panel starts `maisi weights list` and returns at once (the worker takes seconds to load
    torch); the timer polls the job and reads the same rows as the blocking call."""
    monkeypatch.setenv("MAISI_HOME", str(tmp_path))
    logic = GenerateLogic()
    started = time.monotonic()
    job = logic.start_weights_status()
    assert time.monotonic() - started < 1.0 and not job.done  # nothing waited for
    deadline = time.monotonic() + 120
    while not job.done:
        job.poll()
        assert time.monotonic() < deadline, job.log
        time.sleep(0.05)
    rows = {row["model"]: row for row in logic.weights_rows(job)}
    assert set(rows) == {"rflow-ct", "ddpm-ct", "rflow-mr", "rflow-mr-brain"} and rows["rflow-ct"]["path"] == str(tmp_path / "weights" / "rflow-ct")
    assert not job.workdir.exists()


@pytest.mark.slow
def test_draft_gives_a_draft_node_on_the_mask_grid_and_is_never_the_previous_result(scene, sphere_case, tiny_weights):
    reference, segmentation = sphere_case
    logic = GenerateLogic()
    job = logic.start(FromSegmentation(segmentation, reference, draft=True), _options(tiny_weights))
    assert job.plan.action == "draft" and job.request.draft is True and job.request.update is None
    result = _run_job(job)
    assert result.volume_node.GetName() == "MAISI rflow-ct seed 7 (draft)"
    assert result.segmentation_node.GetName() == "MAISI rflow-ct seed 7 (draft) labels"
    np.testing.assert_array_equal(mrml.ijk_to_ras(result.volume_node), mrml.ijk_to_ras(reference))
    assert kji_to_ijk(slicer.util.arrayFromVolume(result.volume_node)).shape == (N, N, N)
    assert any("DRAFT" in line for line in result.log), result.log
    # A draft is never mistaken for a result: the next Apply generates, it does not update the draft.
    assert logic.previous_result(segmentation) is None
    assert logic.plan_apply(FromSegmentation(segmentation, reference)).action == "generate"
    logic.shutdown()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_apply_after_an_edit_updates_only_the_changed_region_in_the_same_worker(scene, sphere_case, tiny_weights):
    from scipy import ndimage

    reference, segmentation = sphere_case
    before = node_checksum(reference)
    logic = GenerateLogic()
    source = FromSegmentation(segmentation, reference)
    first_job = logic.start(source, _options(tiny_weights))
    assert first_job.plan.action == "generate" and first_job.request.update is None
    pid = first_job.worker.pid
    first = _run_job(first_job)
    previous = logic.previous_result(segmentation)
    assert previous is not None and previous.ct.is_file() and previous.labels.is_file()
    first_ct = kji_to_ijk(slicer.util.arrayFromVolume(first.volume_node)).copy()
    old_labels = read_volume(previous.labels).array.copy()

    # Unchanged labels: nothing to update, a new generation.
    assert logic.plan_apply(source).action == "generate" and logic.plan_apply(source).changed_fraction == 0.0

    # The user grows the liver by a small block (the Segment Editor's job, done with the same call).
    liver = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Liver")
    grown = _ball((12, 14, 16), 7)
    grown[18:22, 12:16, 14:18] = True
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.ascontiguousarray(np.transpose(grown, (2, 1, 0))).astype(np.uint8),
                                                     segmentation, liver, reference)
    plan = logic.plan_apply(source)
    assert plan.action == "update" and 0 < plan.changed_fraction < 0.25
    assert logic.plan_apply(FromSegmentation(segmentation, reference, update_changed=False)).action == "generate"

    second_job = logic.start(source, _options(tiny_weights))
    assert second_job.worker.pid == pid  # the same warm worker
    request = second_job.request
    assert second_job.plan.action == "update"
    assert (request.update, request.previous_labels) == (str(previous.ct), str(previous.labels))
    assert request.mask and request.draft is False and request.size is None
    second = _run_job(second_job)
    assert second.volume_node.GetName() == "MAISI rflow-ct seed 7 (updated)"
    np.testing.assert_array_equal(mrml.ijk_to_ras(second.volume_node), mrml.ijk_to_ras(reference))
    second_ct = kji_to_ijk(slicer.util.arrayFromVolume(second.volume_node))
    new_labels = logic.labels_from_segmentation(segmentation, reference).labels.array
    changed = new_labels != old_labels
    assert changed.any() and not changed[~grown].any()  # only the block's voxels changed label
    # Every voxel farther than the margin (10 mm) from a changed voxel is the first result's, bit for bit.
    spacing = np.linalg.norm(mrml.ijk_to_ras(reference)[:3, :3], axis=0)
    far = ndimage.distance_transform_edt(~changed, sampling=spacing) > 10.0
    assert far.sum() > 0.8 * far.size
    assert np.array_equal(second_ct[far], first_ct[far])
    assert not np.array_equal(second_ct, first_ct)  # the edited region was regenerated
    assert any("UPDATE" in line for line in second.log), second.log
    assert node_checksum(reference) == before
    # The update is now the previous result; a big edit (a third of the volume) generates again.
    assert logic.previous_result(segmentation).ct == previous.ct
    big = np.zeros((N, N, N), bool)
    big[:, :, :12] = True
    paint_segment(segmentation, "spleen", big, reference)
    plan = logic.plan_apply(source)
    assert plan.action == "generate" and plan.changed_fraction >= 0.25

    logic.shutdown()
    assert not previous.ct.exists() and logic.previous_result(segmentation) is None


def test_plan_apply_updates_small_edits_on_the_same_grid_only(scene, sphere_case, tmp_path):
    """The decision alone (no worker): no previous result, unchanged labels, "Generate again", another
    model, another grid and an edit of a quarter of the voxels or more generate; a small edit updates."""
    reference, segmentation = sphere_case
    logic = GenerateLogic()
    source = FromSegmentation(segmentation, reference)
    options = RunOptions(model="rflow-ct", seed=7, device="cpu")
    assert logic.plan_apply(source, options=options).action == "generate"  # nothing to update yet
    write_volume(tmp_path / "labels.nrrd", logic.labels_from_segmentation(segmentation, reference).labels)
    (tmp_path / "ct.nrrd").write_bytes(b"a CT")
    logic._remember(segmentation, tmp_path / "ct.nrrd", tmp_path / "labels.nrrd", options)
    previous = logic.previous_result(segmentation)
    assert previous.ct.parent != tmp_path and previous.ct.read_bytes() == b"a CT"  # the logic's own copies
    assert logic.plan_apply(source, options=options).changed_fraction == 0.0

    liver = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Liver")
    grown = _ball((12, 14, 16), 7)
    grown[18:22, 12:16, 14:18] = True
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.ascontiguousarray(np.transpose(grown, (2, 1, 0))).astype(np.uint8),
                                                     segmentation, liver, reference)
    plan = logic.plan_apply(source, options=options)
    assert plan.action == "update" and plan.previous == previous and 0 < plan.changed_fraction < 0.01
    assert "updating the changed region" in plan.reason
    assert logic.plan_apply(FromSegmentation(segmentation, reference, update_changed=False)).action == "generate"
    assert logic.plan_apply(FromSegmentation(segmentation, reference, draft=True)).action == "draft"
    assert logic.plan_apply(source, options=RunOptions(model="ddpm-ct")).action == "generate"
    other = add_volume(_body_ct(), oblique_flipped_ijk_to_ras(spacing=(3.0, 3.0, 3.0)), "CT 3 mm")
    plan = logic.plan_apply(FromSegmentation(segmentation, other), options=options)
    assert plan.action == "generate" and "grid changed" in plan.reason
    big = np.zeros((N, N, N), bool)
    big[:, :, :12] = True
    paint_segment(segmentation, "spleen", big, reference)
    plan = logic.plan_apply(source, options=options)
    assert plan.action == "generate" and plan.changed_fraction >= 0.25
    folder = previous.ct.parent.parent
    logic.shutdown()
    assert not folder.exists() and logic.previous_result(segmentation) is None
