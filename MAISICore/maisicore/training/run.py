"""One training run: checks, the step loop, metrics, atomic checkpoints, resume, weight export.

A run folder holds::

    RUN_DIR/metrics.jsonl        one JSON object per line: {"step", "loss", ..., "lr", "time_s"};
                                 validation lines carry "val_l1" (VAE) or "val_loss"
    RUN_DIR/checkpoint/last.pt   training state: networks, optimisers, LR schedulers, grad scaler,
                                 step, scale factor, RNG state (tensors only, weights_only-loadable)
    RUN_DIR/weights/             a weight set in the reference layout with a maisi_model.json card:
                                 `maisi generate --model RUN_DIR/weights` loads it

Checkpoints and weights are written through temporary files and renamed, every
``checkpoint_every`` steps and at the end; a killed run resumed with ``resume=True`` continues from
the last checkpoint and, batches depending only on (seed, step), ends with the same weights as a run
that was never interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..io.volumes import atomic_write
from ..models.presets import ModelPreset
from ..models.weights import (
    MODEL_CARD,
    MODELS_SUBDIR,
    init_weights,
    load_checkpoint,
    read_model_card,
    save_checkpoint,
    weight_file,
)
from . import distributed
from .config import TrainConfig
from .data import SampleSource
from .datalist import Case, read_datalist, read_entry_files
from .stages import ControlNetStage, DiffusionStage, VAEStage, validation_samples

STAGE_CLASSES = {"vae": VAEStage, "diffusion": DiffusionStage, "controlnet": ControlNetStage}
STATE_FORMAT = "maisi-train-state"


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint" / "last.pt"

    @property
    def weights(self) -> Path:
        return self.root / "weights"


@dataclass
class RunResult:
    steps: int
    last: dict
    weights_dir: Path
    seconds: float


def _split_cases(cases: list[Case], validation_fold: int | None) -> tuple[list[Case], list[Case]]:
    if validation_fold is None:
        return cases, cases
    train = [c for c in cases if c.fold != validation_fold]
    val = [c for c in cases if c.fold == validation_fold]
    if not train or not val:
        raise InputError(f"--validation-fold {validation_fold}: leaves {len(train)} training and {len(val)} validation cases; "
                         "both need at least one")
    return train, val


def _check_cases(stage: str, preset: ModelPreset, config: TrainConfig, cases: list[Case]) -> None:
    if stage != "vae" and preset.uses_body_region:
        missing = [c for c in cases if not c.body_region]
        if missing:
            raise InputError(f"{missing[0].latent}: no body region; {preset.name} is conditioned on it "
                             "(prepare the datalist with --labels so it is derived from the labels)")
    if stage != "vae" and config.patch_size is None and config.batch_size > 1:
        shapes = {c.dim for c in cases}
        if len(shapes) > 1:
            raise InputError(f"latents of {len(shapes)} different sizes cannot share a batch of {config.batch_size}; "
                             "use --batch-size 1 or --patch-size X Y Z (crops)")


def _check_init(init: Path | None, preset: ModelPreset) -> Path | None:
    if init is None:
        return None
    init = Path(init)
    if not init.is_dir():
        raise InputError(f"--init {init}: not a folder (give a weight folder, e.g. from `maisi weights init` or a run's weights/)")
    card = read_model_card(init)
    if card and (card["model"] != preset.name or card.get("width", "official") != preset.width):
        raise InputError(f"--init {init} holds {card['model']}/{card.get('width', 'official')} weights, not {preset.key}; "
                         f"use --model {card['model']} --width {card.get('width', 'official')}")
    return init


class MetricsLog:
    """Append-only JSON lines (rank 0); on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        if keep_until_step is not None:
            kept = []
            if path.is_file():
                for line in path.read_text().splitlines():
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a line cut by a kill
                    if record.get("step", 0) <= keep_until_step:
                        kept.append(line)
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))
        else:
            path.write_text("")

    def write(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file (incomplete lines skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _prepare_weights_dir(paths: RunPaths, preset: ModelPreset, init: Path | None, seed: int) -> None:
    """The run's weight folder starts as a copy of --init (else a random initialisation)."""
    target = paths.weights / MODELS_SUBDIR
    target.mkdir(parents=True, exist_ok=True)
    names = preset.weight_files.as_dict()
    missing = {role: name for role, name in names.items() if not (target / name).is_file()}
    if not missing:
        return
    with tempfile.TemporaryDirectory(dir=paths.root) as scratch:
        fresh = None
        for name in missing.values():
            source = weight_file(init, name) if init else None
            if source is None or not source.is_file():
                if fresh is None:
                    fresh = Path(scratch)
                    init_weights(preset, fresh, seed=seed)
                source = fresh / MODELS_SUBDIR / name
            atomic_write(target / name, lambda tmp, source=source: shutil.copyfile(source, tmp))


def _write_card(paths: RunPaths, preset: ModelPreset, stage: str, step: int, init: Path | None, metrics: dict) -> None:
    card = {"model": preset.name, "width": preset.width,
            "origin": f"maisi train {stage}, step {step}" + (f", from {init}" if init else ", from random initialisation"),
            "last_metrics": metrics}
    atomic_write(paths.weights / MODEL_CARD, lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2) + "\n"))


def _state(stage, step: int, elapsed: float, config: TrainConfig, preset: ModelPreset, global_batch: int) -> dict:
    state = {
        "format": STATE_FORMAT,
        "stage": stage.name,
        "model": preset.name,
        "width": preset.width,
        "step": step,
        "elapsed_s": elapsed,
        "global_batch": global_batch,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "modules": {name: module.state_dict() for name, module in stage.modules.items()},
        "optimizers": {name: opt.state_dict() for name, opt in stage.optimizers.items()},
        "schedulers": {name: sch.state_dict() for name, sch in stage.schedulers.items()},
        "scale_factor": stage.scale_factor,
        "torch_rng": torch.get_rng_state(),
    }
    if stage.scaler.is_enabled():
        state["scaler"] = stage.scaler.state_dict()
    return state


def _restore(stage, state: dict, preset: ModelPreset, global_batch: int, path: Path) -> tuple[int, float]:
    if state.get("format") != STATE_FORMAT:
        raise InputError(f"{path}: not a maisi training checkpoint")
    if (state["stage"], state["model"], state["width"]) != (stage.name, preset.name, preset.width):
        raise InputError(f"{path}: a {state['model']}/{state['width']} {state['stage']} run; resume it with the same "
                         "stage, --model and --width")
    if state["global_batch"] != global_batch:
        raise InputError(f"{path}: the run used {state['global_batch']} samples per step (batch × processes), this one "
                         f"{global_batch}; resume with the same --batch-size and number of processes")
    for name, module in stage.modules.items():
        module.load_state_dict(state["modules"][name])
    for name, optimizer in stage.optimizers.items():
        optimizer.load_state_dict(state["optimizers"][name])
    for name, scheduler in stage.schedulers.items():
        scheduler.load_state_dict(state["schedulers"][name])
    if "scaler" in state and stage.scaler.is_enabled():
        stage.scaler.load_state_dict(state["scaler"])
    stage.scale_factor = state.get("scale_factor")
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), float(state.get("elapsed_s", 0.0))


def train(
    stage_name: str,
    datalist: str | os.PathLike,
    out: str | os.PathLike,
    preset: ModelPreset,
    config: TrainConfig,
    init: str | os.PathLike | None = None,
    resume: bool = False,
    device: str = "auto",
    validation_fold: int | None = None,
    controlnet_from_unet: bool = False,
    log=print,
    progress: bool = True,
) -> RunResult:
    """Train one stage (``vae``, ``diffusion``, ``controlnet``) on ``datalist`` into run folder ``out``.

    Every input is checked before the first step (one-line ``InputError``). Under ``torchrun`` each
    process takes its share of every global batch and only rank 0 writes.
    """
    processes = distributed.start(device)
    try:
        return _train(stage_name, Path(datalist), Path(out), preset, config, init, resume, processes,
                      validation_fold, controlnet_from_unet, log if processes.is_main else (lambda *_: None),
                      progress and processes.is_main)
    finally:
        distributed.stop(processes)


def _train(stage_name, datalist, out, preset, config, init, resume, processes, validation_fold,
           controlnet_from_unet, log, progress) -> RunResult:
    stage_cls = STAGE_CLASSES[stage_name]
    cases = read_datalist(datalist, needs=stage_cls.needs)
    _check_cases(stage_name, preset, config, cases)
    train_cases, val_cases = _split_cases(cases, validation_fold)
    init = _check_init(init, preset)
    paths = RunPaths(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if resume and not paths.checkpoint.is_file():
        raise InputError(f"--resume: no checkpoint at {paths.checkpoint}; start the run without --resume")
    if not resume and paths.checkpoint.is_file():
        raise InputError(f"--out {out} already holds a run (checkpoint/last.pt); add --resume to continue it, or choose another --out")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist")
    for number, case in enumerate(cases):  # every file the stage reads, read once: a bad one costs seconds
        read_entry_files(case, stage_cls.needs, f"--datalist {datalist}, entry {number}")

    global_batch = config.batch_size * processes.world_size
    source = SampleSource(train_cases, stage_name, config.patch_size, config.seed, global_batch)
    max_steps = config.max_steps or config.n_epochs * source.order.steps_per_epoch()
    kwargs = {"init_dir": init}
    if stage_name == "controlnet":
        kwargs["from_unet"] = controlnet_from_unet
    stage = stage_cls(preset, config, processes, max_steps, **kwargs)
    for note in stage.notes:
        log(note)
    for key in config.ignored:
        log(f"config key {key!r} is accepted for compatibility with the reference and has no effect here")

    start_step, elapsed_before = 0, 0.0
    if resume:
        state = load_checkpoint(paths.checkpoint, map_location=processes.device)
        start_step, elapsed_before = _restore(stage, state, preset, global_batch, paths.checkpoint)
        log(f"resumed {paths.checkpoint} at step {start_step} of {max_steps}")
    elif stage_name == "diffusion" or (stage_name == "controlnet" and stage.init_scale_factor is None):
        factor = stage.set_scale_factor(source.local_batch(0, processes.rank, config.batch_size),
                                        processes.rank * config.batch_size, global_batch)
        log(f"scale factor 1/std of the first batch's latents: {factor:.6f}")
    elif stage_name == "controlnet":
        stage.scale_factor = stage.init_scale_factor

    if processes.is_main:
        out.mkdir(exist_ok=True)
        paths.checkpoint.parent.mkdir(exist_ok=True)
        for stale in paths.checkpoint.parent.glob(".last.pt.*"):
            stale.unlink()  # a temporary file of a killed run's checkpoint write
        _prepare_weights_dir(paths, preset, init, config.seed)
        (out / "config.json").write_text(json.dumps(
            {"stage": stage_name, "model": preset.name, "width": preset.width, "datalist": str(datalist.resolve()),
             "init": str(init) if init else None, "processes": processes.world_size, **config.to_dict()}, indent=2) + "\n")
    metrics = MetricsLog(paths.metrics, start_step if resume else None) if processes.is_main else None
    started = time.monotonic()

    def elapsed() -> float:
        return round(elapsed_before + time.monotonic() - started, 3)

    def validate(step: int) -> dict:
        if not processes.is_main:
            return {}
        values = stage.validate(validation_samples(source, val_cases, config.validation_samples, config.seed))
        metrics.write({"step": step, **values, "time_s": elapsed()})
        log(f"step {step}/{max_steps}: " + ", ".join(f"{k} {v:.5f}" for k, v in values.items()))
        return values

    last = {}
    if start_step == 0:
        last = validate(0)
        distributed.barrier(processes)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, initial=start_step, desc=f"train {stage_name}", unit="step", file=sys.stderr)
    for step in range(start_step, max_steps):
        lr = stage.learning_rate()
        values = stage.mean_over_processes(stage.train_step(source.local_batch(step, processes.rank, config.batch_size)))
        done = step + 1
        if processes.is_main:
            metrics.write({"step": done, **values, "lr": lr, "time_s": elapsed()})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
        if done % config.validate_every == 0 or done == max_steps:
            last = validate(done) or last
        if done % config.checkpoint_every == 0 or done == max_steps:
            if processes.is_main:
                stage_state = _state(stage, done, elapsed(), config, preset, global_batch)
                save_checkpoint(paths.weights / MODELS_SUBDIR / preset.weight_files.as_dict()[stage.weight_role], stage.export())
                _write_card(paths, preset, stage_name, done, init, {**values, **last})
                save_checkpoint(paths.checkpoint, stage_state)
            distributed.barrier(processes)
    if bar is not None:
        bar.close()
    log(f"done: {max_steps} steps in {elapsed():.1f} s; weights in {paths.weights}")
    return RunResult(max_steps, last, paths.weights, elapsed())
