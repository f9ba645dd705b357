"""MAISITrain's logic: the `maisi prepare` / `maisi train` command lines, a training job run in a
child process (torchrun for several GPUs), and the live loss curve from the run's metrics file.

What lives here: ``TrainRequest`` (what to train), ``train_commands`` (the command lines),
``TrainJob`` (runs them one after the other; stop kills the process tree; resume continues from the
run folder's checkpoint), ``MetricsReader`` (reads RUN_DIR/metrics.jsonl incrementally, tolerating a
half-written last line), ``LossPlot`` (MRML table, plot series and chart nodes) and ``TrainMonitor``
(what the widget's timer does: job output and metrics into the plot, surviving a scene close).
What is NOT here: Qt. The worker process helpers are MAISIGenerate's (``MAISIGenerateLib.process``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
from maisicore.models.presets import MODEL_NAMES, WIDTHS
from maisicore.training.config import STAGES as TRAINING_STAGES
from MAISIGenerateLib.process import WorkerProcess, worker_environment, worker_python


def maisi_command(python, *args) -> list[str]:
    """``python -m maisicore ARGS``: training runs keep the command line, whose run folder
    (metrics.jsonl, checkpoints) is their machine contract."""
    return [*python, "-m", "maisicore", *(str(a) for a in args)]


# `maisi train`'s stages, plus the ControlNet stage started from a weight folder with its loss
# weighted on a new tumour class (run as `maisi train controlnet --init ... --weighted-labels ...`).
STAGES = (*TRAINING_STAGES, "controlnet-finetune")
STAGE_TITLES = {
    "vae": "VAE (autoencoder)",
    "diffusion": "Diffusion UNet",
    "controlnet": "ControlNet",
    "controlnet-finetune": "ControlNet fine-tune (new tumour class)",
}
METRICS_FILE = "metrics.jsonl"
WEIGHTS_SUBDIR = "weights"
DATALIST_FILE = "datalist.json"  # `maisi prepare` output in the run folder
LATENTS_FILE = "latents.json"  # `maisi prepare latents` output in the run folder
LATENTS_SUBDIR = "latents"


@dataclass
class TrainRequest:
    """One training run.

    stage: vae, diffusion, controlnet, or controlnet-finetune (ControlNet from ``init_weights``,
        with the loss weighted on ``weighted_labels``: the new tumour class's MAISI ids or names).
    out_dir: the run folder (metrics.jsonl, checkpoint/, weights/).
    datalist: a datalist JSON (for the diffusion and ControlNet stages: one of latents, as
        ``maisi prepare latents`` writes). Without it ``images_dir`` (and ``labels_dir``) are listed
        into ``out_dir/datalist.json`` (``maisi prepare``) and, for those stages, encoded into
        ``out_dir/latents.json`` with ``autoencoder`` (default: ``init_weights``).
    patch_size: (x, y, z) voxels; lr: learning rate; checkpoint_every: steps between checkpoints
        (what Stop loses at most); gpus: >1 runs torchrun with one process per GPU.
    """

    stage: str
    out_dir: str
    datalist: str | None = None
    images_dir: str | None = None
    labels_dir: str | None = None
    model: str = "rflow-ct"
    width: str = "official"
    init_weights: str | None = None
    autoencoder: str | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    patch_size: tuple[int, int, int] | None = None
    device: str = "auto"
    seed: int = 0
    weighted_labels: tuple = ()
    checkpoint_every: int | None = None
    gpus: int = 1

    def check(self) -> None:
        """Raise ValueError naming the field when the request cannot run."""
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r}: choose one of {', '.join(STAGES)}")
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model {self.model!r}: choose one of {', '.join(MODEL_NAMES)}")
        if self.width not in WIDTHS:
            raise ValueError(f"width {self.width!r}: choose one of {', '.join(WIDTHS)}")
        if not self.out_dir:
            raise ValueError("choose an output folder")
        if not self.datalist and not self.images_dir:
            raise ValueError("choose an images folder (and a labels folder) or a datalist JSON")
        if self.stage in ("controlnet", "controlnet-finetune") and not self.datalist and not self.labels_dir:
            raise ValueError(f"the {STAGE_TITLES[self.stage]} stage needs labels: choose a labels folder or a datalist")
        if self.stage != "vae" and not self.datalist and not (self.autoencoder or self.init_weights):
            raise ValueError(f"the {STAGE_TITLES[self.stage]} stage trains on latents: choose the initial weights "
                             "(their autoencoder encodes the images) or a latents datalist")
        if self.stage == "controlnet-finetune":
            if not self.init_weights:
                raise ValueError("fine-tuning starts from a weight folder: choose the initial weights")
            if not self.weighted_labels:
                raise ValueError("fine-tuning for a new tumour class: give its label (MAISI id or name)")
        if self.gpus < 1:
            raise ValueError(f"number of GPUs {self.gpus}: must be 1 or more")
        if self.patch_size is not None and len(self.patch_size) != 3:
            raise ValueError(f"patch size {self.patch_size}: give 3 numbers (x, y, z voxels)")

    @property
    def needs_latents(self) -> bool:
        """Whether the run encodes images into latents first (diffusion/ControlNet from folders)."""
        return self.stage != "vae" and not self.datalist

    @property
    def prepared_datalist(self) -> Path:
        """Where ``maisi prepare`` writes the images' datalist."""
        return Path(self.out_dir) / DATALIST_FILE

    @property
    def datalist_path(self) -> Path:
        """The datalist the training reads: the given one, else the prepared images' (VAE) or
        latents' (other stages) datalist in the run folder."""
        if self.datalist:
            return Path(self.datalist)
        return Path(self.out_dir) / (LATENTS_FILE if self.needs_latents else DATALIST_FILE)

    @property
    def metrics_path(self) -> Path:
        return Path(self.out_dir) / METRICS_FILE

    @property
    def weights_path(self) -> Path:
        """The weight folder the run writes (``maisi generate --model`` loads it)."""
        return Path(self.out_dir) / WEIGHTS_SUBDIR


def weighted_label_ids(values) -> list[int]:
    """MAISI ids from ids or names (names resolved with the label table)."""
    ids = []
    for value in values:
        text = str(value).strip()
        if not text:
            continue
        if text.isdigit():
            ids.append(int(text))
            continue
        from maisicore.anatomy.labels import label_table

        info = label_table().resolve(text)
        if info is None:
            raise ValueError(f"{text!r} is not a MAISI label name (see `maisi labels list`)")
        ids.append(info.id)
    return ids


def prepare_commands(request: TrainRequest, python: list[str]) -> list[list[str]]:
    """``maisi prepare`` (and ``maisi prepare latents`` for the diffusion and ControlNet stages)
    for a request without a datalist; [] with one."""
    if request.datalist:
        return []
    args = ["prepare", "--images", request.images_dir]
    if request.labels_dir:
        args += ["--labels", request.labels_dir]
    commands = [maisi_command(python, *args, "--out", request.prepared_datalist)]
    if request.needs_latents:
        commands.append(maisi_command(
            python, "prepare", "latents", "--datalist", request.prepared_datalist,
            "--weights", request.autoencoder or request.init_weights, "--out-dir", Path(request.out_dir) / LATENTS_SUBDIR,
            "--out", request.datalist_path, "--device", "cuda" if request.gpus > 1 else (request.device or "auto")))
    return commands


def train_command(request: TrainRequest, python: list[str], resume: bool = False) -> list[str]:
    """``maisi train STAGE ...`` (``python -m torch.distributed.run --nproc_per_node N -m maisicore
    train ...`` with more than one GPU)."""
    request.check()
    stage = "controlnet" if request.stage == "controlnet-finetune" else request.stage
    args: list = ["train", stage, "--datalist", request.datalist_path, "--out", request.out_dir,
                  "--model", request.model, "--width", request.width]
    if request.init_weights:
        args += ["--init", request.init_weights]
    if resume:
        args.append("--resume")
    if request.max_steps:
        args += ["--max-steps", int(request.max_steps)]
    if request.batch_size:
        args += ["--batch-size", int(request.batch_size)]
    if request.lr:
        args += ["--lr", f"{float(request.lr):g}"]
    if request.patch_size:
        args += ["--patch-size", *(int(v) for v in request.patch_size)]
    if request.checkpoint_every:
        args += ["--checkpoint-every", int(request.checkpoint_every)]
    device = "cuda" if request.gpus > 1 else (request.device or "auto")
    args += ["--device", device, "--seed", int(request.seed)]
    ids = weighted_label_ids(request.weighted_labels)
    if ids:
        args += ["--weighted-labels", *ids]
    if request.gpus > 1:
        launcher = [*python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(int(request.gpus))]
        return [*launcher, "-m", "maisicore", *(str(a) for a in args)]
    return maisi_command(python, *args)


def train_commands(request: TrainRequest, python: list[str], resume: bool = False) -> list[list[str]]:
    """The commands a run executes in order: preparation (when needed; skipped when resuming onto
    a prepared datalist), then training."""
    request.check()
    commands = []
    if not (resume and request.datalist_path.is_file()):
        commands += prepare_commands(request, python)
    commands.append(train_command(request, python, resume))
    return commands


class TrainJob:
    """Runs a request's commands one after the other in child processes. ``poll()`` returns new
    output lines and starts the next command when one succeeds; ``stop()`` kills the process tree
    (the run folder keeps its last checkpoint: start again with ``resume=True``)."""

    def __init__(self, commands: list[list[str]]):
        self.commands = [list(c) for c in commands]
        self.log: list[str] = []
        self.returncode: int | None = None
        self.stopped = False
        self._index = 0
        self.worker = WorkerProcess(self.commands[0], env=worker_environment())
        self.log.append("$ " + " ".join(self.commands[0]))

    @property
    def done(self) -> bool:
        return self.returncode is not None

    def poll(self) -> list[str]:
        """New output lines; advances to the next command (or finishes) when the current one ends."""
        if self.done:
            return []
        finished = self.worker.finished_reading()
        new = self.worker.read_lines()
        if finished:
            new += self.worker.read_lines()
            code = self.worker.wait()
            if code == 0 and self._index + 1 < len(self.commands):
                self._index += 1
                self.worker = WorkerProcess(self.commands[self._index], env=worker_environment())
                new.append("$ " + " ".join(self.commands[self._index]))
            else:
                self.returncode = code
        self.log += new
        return new

    def stop(self) -> None:
        """Kill the running command's whole process tree (all torchrun workers too)."""
        self.stopped = True
        self.worker.cancel()
        self.poll()
        if self.returncode is None:
            self.returncode = self.worker.returncode if self.worker.returncode is not None else -1


class MetricsReader:
    """Reads a metrics.jsonl file as it grows: each ``read()`` returns the complete new lines'
    objects (a half-written last line waits for the next call; malformed lines are skipped)."""

    def __init__(self, path):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        rows = []
        for line in lines:
            try:
                row = json.loads(line.decode("utf-8"))
            except ValueError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
        return rows


VALIDATION_KEYS = ("val_l1", "val_loss")  # VAE: L1 on validation images; other stages: validation loss


class LossPlot:
    """The loss curve as MRML nodes: a table "loss" (step, loss, lr, time_s) of the training lines,
    a table "validation" (step, validation = val_l1 or val_loss) of the validation lines, one plot
    series each (x = step) and a chart showing both."""

    LOSS_COLUMNS = ("step", "loss", "lr", "time_s")
    VALIDATION_COLUMNS = ("step", "validation")

    def __init__(self, name: str = "MAISI training"):
        scene = slicer.mrmlScene
        self.rows: list[dict] = []
        self.loss_table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} loss")
        self.validation_table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} validation")
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
        self.chart.SetTitle(name)
        self.chart.SetXAxisTitle("step")
        self.chart.SetYAxisTitle("loss")
        self.loss_series = self._series(f"{name} loss", self.loss_table, "loss", (0.1, 0.4, 0.8))
        self.validation_series = self._series(f"{name} validation", self.validation_table, "validation", (0.9, 0.4, 0.1))
        self.update([])

    def _series(self, name, table, column, color):
        series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("step")
        series.SetYColumnName(column)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetColor(*color)
        self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
        return series

    def update(self, new_rows: list[dict]) -> None:
        """Append metrics rows (dicts with "step" and "loss" or a validation value) and refresh the
        tables. A step seen again (a resumed run repeats the steps after its last checkpoint) keeps
        its latest values."""
        self.rows += list(new_rows)
        loss, validation = {}, {}
        for row in self.rows:
            step = int(row["step"])
            if row.get("loss") is not None:
                loss[step] = row
            value = next((row[k] for k in VALIDATION_KEYS if row.get(k) is not None), None)
            if value is not None:
                validation[step] = {"step": step, "validation": value}
        self._fill(self.loss_table, self.LOSS_COLUMNS, [loss[s] for s in sorted(loss)])
        self._fill(self.validation_table, self.VALIDATION_COLUMNS, [validation[s] for s in sorted(validation)])

    @staticmethod
    def _fill(table, columns, rows) -> None:
        arrays = [np.array([float(r.get(c, np.nan)) for r in rows], dtype=np.float64) for c in columns]
        slicer.util.updateTableFromArray(table, arrays, list(columns))

    def nodes(self) -> list:
        return [self.loss_table, self.validation_table, self.loss_series, self.validation_series, self.chart]


class TrainLogic:
    """MAISITrain's logic (no Qt). ``python``: interpreter command for the workers (PythonSlicer in
    Slicer, else this interpreter)."""

    def __init__(self, python: list[str] | None = None):
        self.python = list(python) if python else worker_python()

    def commands(self, request: TrainRequest, resume: bool = False) -> list[list[str]]:
        return train_commands(request, self.python, resume)

    def start(self, request: TrainRequest, resume: bool = False) -> TrainJob:
        """Create the run folder and start the run (``resume``: continue from its checkpoint)."""
        commands = self.commands(request, resume)
        Path(request.out_dir).mkdir(parents=True, exist_ok=True)
        return TrainJob(commands)


@dataclass
class TrainStatus:
    """What one ``TrainMonitor.tick`` saw: new output ``lines``, the last metrics row (None before
    the first), whether the job has ended (``returncode``, ``stopped``), and ``plot_created`` when
    the loss plot was made anew (show its chart)."""

    lines: list
    last_row: dict | None
    done: bool
    returncode: int | None
    stopped: bool
    plot_created: bool


class TrainMonitor:
    """A running ``TrainJob`` with its loss plot: what the MAISITrain widget's timer calls, Qt-free.

    ``tick()`` takes the job's new output and the run's new metrics rows into the plot. The plot's
    nodes live in the scene: when the scene closes (``StartCloseEvent``) the monitor lets go of them
    and the next tick makes the plot again in the new scene from every row read so far, so closing
    the scene during a run neither raises nor stops the run. ``plot``: a plot to extend (Resume)."""

    def __init__(self, job: TrainJob, request: TrainRequest, plot: LossPlot | None = None, name: str | None = None):
        self.job = job
        self.request = request
        self.name = name or f"MAISI {request.stage} {Path(request.out_dir).name}"
        self.metrics = MetricsReader(request.metrics_path)
        self.rows: list[dict] = list(plot.rows) if plot is not None else []
        self.plot = plot if plot is not None and plot.chart.GetScene() is slicer.mrmlScene else None
        self._scene = slicer.mrmlScene
        self._observer = self._scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, self._on_scene_close)

    def _on_scene_close(self, caller=None, event=None) -> None:
        self.plot = None  # its nodes are being removed with the scene's content

    def tick(self) -> TrainStatus:
        lines = self.job.poll()
        new = self.metrics.read()
        self.rows += new
        created = False
        if self.plot is None and self.rows:
            self.plot = LossPlot(self.name)
            self.plot.update(self.rows)
            created = True
        elif new:
            self.plot.update(new)
        return TrainStatus(lines, self.rows[-1] if self.rows else None, self.job.done, self.job.returncode,
                           self.job.stopped, created)

    def close(self) -> None:
        """Stop watching the scene (the job is left as it is)."""
        if self._observer is not None:
            self._scene.RemoveObserver(self._observer)
            self._observer = None
