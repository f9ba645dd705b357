"""MAISITrain's logic on real MRML (slicer-core wheel): the command lines it builds for each stage,
a metrics.jsonl file read as it grows into real table/plot nodes, and a real tiny training run
(`maisi prepare` then `maisi train vae`) streamed, resumed and stopped in child processes."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import slicer
from MAISITrainLib.logic import (
    LossPlot,
    MetricsReader,
    TrainLogic,
    TrainRequest,
    train_commands,
)
from slicer_headless import live_process_group

PY = ["PY"]
MAISI = [*PY, "-m", "maisicore"]


def test_commands_for_each_stage(tmp_path):
    run = str(tmp_path / "run")
    vae = TrainRequest("vae", run, images_dir="/data/images", max_steps=500, batch_size=2, lr=1e-4,
                       patch_size=(64, 64, 32), device="cpu", seed=3, checkpoint_every=50)
    assert train_commands(vae, PY) == [
        [*MAISI, "prepare", "--images", "/data/images", "--out", f"{run}/datalist.json"],
        [*MAISI, "train", "vae", "--datalist", f"{run}/datalist.json", "--out", run, "--model", "rflow-ct",
         "--width", "official", "--max-steps", "500", "--batch-size", "2", "--lr", "0.0001",
         "--patch-size", "64", "64", "32", "--checkpoint-every", "50", "--device", "cpu", "--seed", "3"],
    ]

    # Diffusion/ControlNet train on latents: the images are encoded with the initial weights' autoencoder.
    controlnet = TrainRequest("controlnet", run, images_dir="/i", labels_dir="/l", init_weights="/w")
    prepare, latents, train = train_commands(controlnet, PY)
    assert prepare == [*MAISI, "prepare", "--images", "/i", "--labels", "/l", "--out", f"{run}/datalist.json"]
    assert latents == [*MAISI, "prepare", "latents", "--datalist", f"{run}/datalist.json", "--weights", "/w",
                       "--out-dir", f"{run}/latents", "--out", f"{run}/latents.json", "--device", "auto"]
    assert train[:9] == [*MAISI, "train", "controlnet", "--datalist", f"{run}/latents.json", "--out", run]
    assert train[train.index("--init") + 1] == "/w"

    # Fine-tuning for a new tumour class on 4 GPUs: torchrun, the class by name, an existing datalist.
    finetune = TrainRequest("controlnet-finetune", run, datalist="/d/latents.json", init_weights="/w",
                            weighted_labels=("hepatic tumor", "27"), gpus=4)
    (command,) = train_commands(finetune, PY)
    assert command[:7] == [*PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m"]
    assert command[7:10] == ["maisicore", "train", "controlnet"]
    assert command[command.index("--device") + 1] == "cuda"
    assert command[command.index("--weighted-labels") + 1:] == ["26", "27"]

    # Resume: no preparation once the datalist exists, and --resume.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "datalist.json").write_text("{}")
    (command,) = train_commands(vae, PY, resume=True)
    assert "--resume" in command and "prepare" not in command


@pytest.mark.parametrize("change,message", [
    (dict(stage="gan"), "stage 'gan'"),
    (dict(out_dir=""), "output folder"),
    (dict(images_dir=None), "images folder"),
    (dict(stage="controlnet", labels_dir=None, init_weights="/w"), "needs labels"),
    (dict(stage="diffusion"), "trains on latents"),
    (dict(stage="controlnet-finetune", init_weights=None, datalist="/d.json"), "initial weights"),
    (dict(stage="controlnet-finetune", init_weights="/w", weighted_labels=()), "new tumour class"),
    (dict(stage="controlnet-finetune", init_weights="/w", weighted_labels=("flux capacitor",)), "not a MAISI label"),
    (dict(gpus=0), "GPUs"),
])
def test_requests_that_cannot_run_are_refused(change, message):
    values = dict(stage="vae", out_dir="/run", images_dir="/i", labels_dir="/l", weighted_labels=("hepatic tumor",))
    values.update(change)
    with pytest.raises(ValueError, match=message):
        train_commands(TrainRequest(**values), PY)


def test_metrics_file_is_read_as_it_grows_into_table_and_plot_nodes(scene, tmp_path):
    path = tmp_path / "metrics.jsonl"
    reader = MetricsReader(path)
    assert reader.read() == []  # no file yet
    lines = [{"step": s, "loss": 1.0 / s, "lr": 1e-4, "time_s": 0.5 * s} for s in (1, 2, 3)]
    lines.append({"step": 3, "val_l1": 0.4, "time_s": 1.6})  # a validation line at the same step
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "loss": 0.2')  # half-written line
    plot = LossPlot("Run 1")
    plot.update(reader.read())
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(plot.loss_table, "step"), [1, 2, 3])
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(plot.loss_table, "loss"), [1, 0.5, 1 / 3])
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(plot.validation_table, "validation"), [0.4])

    # The rest of the line arrives, a malformed line is skipped, a resumed run repeats step 4.
    with open(path, "a") as handle:
        handle.write(', "lr": 1e-4, "time_s": 2.0}\nnot json\n')
        handle.write(json.dumps({"step": 4, "loss": 0.25, "lr": 1e-4, "time_s": 2.5}) + "\n")
        handle.write(json.dumps({"step": 5, "val_loss": 0.3, "time_s": 3.0}) + "\n")
    plot.update(reader.read())
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(plot.loss_table, "step"), [1, 2, 3, 4])
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(plot.loss_table, "loss")[-1], 0.25)
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(plot.validation_table, "step"), [3, 5])

    # Real plot nodes: two series on the tables' columns, in one chart.
    assert plot.chart.GetNumberOfPlotSeriesNodes() == 2
    for series, table, column in ((plot.loss_series, plot.loss_table, "loss"),
                                  (plot.validation_series, plot.validation_table, "validation")):
        assert series.IsA("vtkMRMLPlotSeriesNode") and series.GetTableNode() is table
        assert (series.GetXColumnName(), series.GetYColumnName()) == ("step", column)
        assert plot.chart.HasPlotSeriesNodeID(series.GetID())
    assert all(node.GetScene() is scene for node in plot.nodes())


@pytest.fixture
def images(tmp_path, real_data) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(real_data / "example_ct_sm.nii.gz", folder / "case.nii.gz")
    return folder


def _run(job, plot, reader, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while not job.done:
        job.poll()
        plot.update(reader.read())
        assert time.monotonic() < deadline, "\n".join(job.log[-20:])
        time.sleep(0.1)
    plot.update(reader.read())


@pytest.mark.slow
def test_a_tiny_training_run_streams_its_loss_and_resumes(scene, tmp_path, images):
    request = TrainRequest("vae", str(tmp_path / "run"), images_dir=str(images), width="tiny", max_steps=2,
                           patch_size=(32, 32, 32), lr=1e-3, device="cpu")
    logic = TrainLogic()
    plot, reader = LossPlot("VAE"), MetricsReader(request.metrics_path)

    job = logic.start(request)
    _run(job, plot, reader)
    assert job.returncode == 0, "\n".join(job.log[-20:])
    assert [c[3] for c in job.commands] == ["prepare", "train"]
    assert request.prepared_datalist.is_file() and (request.weights_path / "maisi_model.json").is_file()
    np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(plot.loss_table, "step"), [1, 2])

    request.max_steps = 3  # Resume continues from the checkpoint to step 3, without preparing again.
    job = logic.start(request, resume=True)
    _run(job, plot, reader)
    assert job.returncode == 0, "\n".join(job.log[-20:])
    assert [c[3] for c in job.commands] == ["train"] and "--resume" in job.commands[0]
    np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(plot.loss_table, "step"), [1, 2, 3])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stop_kills_the_training_process_within_2_s(tmp_path, images):
    request = TrainRequest("vae", str(tmp_path / "run"), images_dir=str(images), width="tiny", max_steps=100000,
                           patch_size=(32, 32, 32), device="cpu")
    job = TrainLogic().start(request)
    reader, deadline = MetricsReader(request.metrics_path), time.monotonic() + 300
    while not reader.read():  # training is under way once the first metrics line is there
        job.poll()
        assert not job.done, "\n".join(job.log[-20:])
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pid = job.worker.pid
    started = time.monotonic()
    job.stop()
    assert time.monotonic() - started < 2.0
    assert job.done and job.stopped and job.returncode != 0
    assert live_process_group(pid) == []


def test_closing_the_scene_during_a_run_raises_nothing_and_the_plot_comes_back(scene, tmp_path):
    """The widget's timer handler (``TrainMonitor.tick``) while a real child process writes metrics:
    the scene is closed between two ticks (as File > Close Scene does), the next tick neither raises
    nor stops the run, and the loss plot is made again in the new scene with every row so far."""
    from MAISITrainLib.logic import TrainJob, TrainMonitor

    request = TrainRequest("vae", str(tmp_path), images_dir=str(tmp_path / "images"), max_steps=6)
    writer = (
        "import json, sys, time\n"
        "for step in range(1, 7):\n"
        "    with open(sys.argv[1], 'a') as f:\n"
        "        f.write(json.dumps({'step': step, 'loss': 1.0 / step, 'lr': 1e-4, 'time_s': step}) + '\\n')\n"
        "    print('step', step, flush=True)\n"
        "    time.sleep(0.3)\n"
    )
    monitor = TrainMonitor(TrainJob([[sys.executable, "-c", writer, str(request.metrics_path)]]), request)
    deadline = time.monotonic() + 60
    while monitor.plot is None:  # the first rows arrive
        status = monitor.tick()
        assert not status.done, monitor.job.log
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first_plot = monitor.plot
    assert status.plot_created and first_plot.loss_table.GetScene() is scene

    scene.Clear(False)  # StartCloseEvent, nodes removed, EndCloseEvent
    assert first_plot.loss_table.GetScene() is None and monitor.plot is None

    created = []
    while not status.done:
        status = monitor.tick()  # raised AttributeError on a None plot before
        created.append(status.plot_created)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    monitor.close()
    assert status.returncode == 0 and not status.stopped
    assert created.count(True) == 1 and monitor.plot is not first_plot
    assert monitor.plot.loss_table.GetScene() is scene
    np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(monitor.plot.loss_table, "step"), [1, 2, 3, 4, 5, 6])
    assert status.last_row["step"] == 6
