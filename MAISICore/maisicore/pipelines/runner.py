"""Run a request to the end and report what happens: the one path behind ``maisi generate``,
``maisi inpaint``, ``maisi run REQUEST.json`` and the Slicer modules' worker.

A ``Report`` receives what a run says: ``info`` (status lines), ``note`` (warnings), ``progress``
(stage, done, total), ``result`` (a ``RunSummary`` and the one-line human message). Two reports:
``HumanReport`` (tqdm bars and lines on stderr, the result line on stdout: the ``maisi`` command)
and ``EventReport`` (JSON lines, one object per event, for programs: ``maisi run``).

Events (one JSON object per line, each with ``"event"``):
- ``{"event": "start", "kind": "generate", "version": "..."}``
- ``{"event": "info", "message": "..."}``, ``{"event": "note", "message": "..."}``
- ``{"event": "progress", "stage": "denoise", "done": 3, "total": 30}``
- ``{"event": "result", "files": {"ct": PATH, "labels": PATH}, "seed_used": 0, "qc": [...],
  "notes": [...], "timings": {...}, "details": {...}, "message": "..."}``
- ``{"event": "error", "code": 2, "message": "..."}`` (2: bad input, 1: failure, 130: cancelled)
"""

from __future__ import annotations

import json
import sys
from typing import Callable, TextIO

from .requests import GenerateRequest, InpaintRequest, Request, RunSummary, WeightsRequest

EVENT_PROTOCOL_VERSION = 1


class Report:
    """Receives what a run says; the default does nothing."""

    def info(self, message: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def progress(self, stage: str, done: int, total: int) -> None:
        pass

    def result(self, summary: RunSummary, message: str) -> None:
        pass


class HumanReport(Report):
    """The ``maisi`` command's output: lines and tqdm bars on stderr, the result line on stdout."""

    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.stdout, self.stderr = stdout or sys.stdout, stderr or sys.stderr
        self._bars: dict = {}

    def info(self, message: str) -> None:
        print(message, file=self.stderr, flush=True)

    def note(self, message: str) -> None:
        print(f"note: {message}", file=self.stderr, flush=True)

    def progress(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, desc=stage, unit="step" if stage in ("denoise", "mask") else "vol",
                                           file=self.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def result(self, summary: RunSummary, message: str) -> None:
        print(message, file=self.stdout, flush=True)


class EventReport(Report):
    """JSON-lines events on ``stream`` (see the module docstring), flushed one by one."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def emit(self, event: str, **fields) -> None:
        self.stream.write(json.dumps({"event": event, **fields}, default=str) + "\n")
        self.stream.flush()

    def info(self, message: str) -> None:
        self.emit("info", message=message)

    def note(self, message: str) -> None:
        self.emit("note", message=message)

    def progress(self, stage: str, done: int, total: int) -> None:
        self.emit("progress", stage=stage, done=int(done), total=int(total))

    def result(self, summary: RunSummary, message: str) -> None:
        self.emit("result", message=message, files=summary.files, seed_used=summary.seed_used, qc=summary.qc,
                  notes=summary.notes, timings=summary.timings, details=summary.details)


def attention_for(request) -> str:
    """The attention a request's networks run (``maisicore.precision.attention_for``)."""
    from ..precision import attention_for as rule

    return rule(bool(getattr(request, "reference_numerics", False)))


def _fmt(values, spec: str = "g") -> str:
    return "×".join(format(v, spec) for v in values)


def _qc_rows(checks) -> list[dict] | None:
    if checks is None:
        return None
    return [dict(vars(c), passed=c.passed, checked=c.checked) for c in checks]


def run_generate(request: GenerateRequest, report: Report, cancel: Callable[[], bool] | None = None,
                 models=None) -> RunSummary:
    """Check, load, generate and write a ``GenerateRequest``; raises ``InputError``/``Cancelled``.

    ``models``: where loaded networks come from instead of loading them for this request (``maisi
    serve``'s ``pipelines.serve.ModelCache``): ``models.admit(prepared, device)`` is the admission
    check (it may unload other models to make room) and ``models.model(preset, weights_dir, device,
    attention)`` the loaded networks."""
    from ..devices import resolve_devices
    from ..precision import resolve_precision
    from ..validation import resolve_device
    from .admission import check_admission
    from .generate import GeneratePipeline, prepare_generation

    if isinstance(request.device, str) and isinstance(request.precision, str):  # fp16 on the CPU: refused first
        resolve_precision(request.precision, resolve_device(request.device), request.reference_numerics)
    prepared = prepare_generation(request, log=report.info)  # every check before any network
    for note in prepared.notes:
        report.note(note)
    device = resolve_device(request.device)
    resolve_devices(request.devices)  # --devices present on this machine, before any network
    precision = resolve_precision(request.precision, device, request.reference_numerics)
    if models is None:  # too large → InputError before any network
        estimate = check_admission(prepared, device.type, precision=precision)
    else:
        estimate = models.admit(prepared, device, precision)
    plan = prepared.plan
    if request.dry_run:
        summary = RunSummary(notes=list(prepared.notes), details={
            "size": list(plan.size), "spacing": list(plan.spacing), "steps": plan.steps, "model": prepared.preset.key,
            "device": device.type, "precision": precision.name, "reference_numerics": precision.reference_numerics,
            "memory": {"peak_bytes": estimate.peak_bytes, "budget_bytes": estimate.budget_bytes,
                                              "phase": estimate.peak_phase, "parts": estimate.parts,
                                              "decode_plan": estimate.decode_plan}})
        report.result(summary, f"dry run: {prepared.preset.key}, {_fmt(plan.size, 'd')} voxels at {_fmt(plan.spacing)} mm, "
                               f"{plan.steps} steps; {estimate.describe()}; nothing was run or written")
        return summary
    report.info(estimate.describe())
    report.info(f"{precision.describe()}; attention: {precision.attention}")
    if models is None:
        pipeline = GeneratePipeline.from_request(request)
    else:
        pipeline = GeneratePipeline(models.model(prepared.preset, prepared.weights_dir, device, precision.attention))
    region = f", body region {plan.body_region[0]}→{plan.body_region[1]}" if plan.body_region else ""
    source = f", following {request.mask}" if request.mask else (
        f", anatomy {', '.join(request.anatomy)}" if request.anatomy else (
            f", mask generated with anatomy sizes {request.anatomy_size}" if request.anatomy_size else ""))
    if request.update:
        report.info(f"{prepared.preset.key} on {pipeline.model.device}: updating {request.update} where {request.mask} "
                    f"differs from {request.previous_labels}, {plan.steps} steps, seed {request.seed}")
    else:
        draft = "DRAFT of " if request.draft else ""
        report.info(f"{prepared.preset.key} on {pipeline.model.device}: {draft}{_fmt(plan.size, 'd')} voxels at "
                    f"{_fmt(plan.spacing)} mm, {plan.steps} steps, seed {request.seed}{source}{region}")
    result = pipeline(prepared, progress=report.progress, cancel=cancel, log=report.info)
    for note in result.notes[len(prepared.notes):]:
        report.note(note)
    written = result.write(request)
    files = {role: str(path) for role, path in written.items()}
    ct = result.ct
    summary = RunSummary(files=files, seed_used=result.seed_used, qc=_qc_rows(result.qc), notes=result.notes,
                         timings=result.timings,
                         details={"shape": list(ct.shape), "spacing": [float(s) for s in ct.spacing],
                                  "model": prepared.preset.key, "steps": result.plan.steps,
                                  "action": result.action, "precision": precision.name,
                                  "reference_numerics": precision.reference_numerics})
    what = ", ".join(files.values()) or "nothing (no --out)"
    kind = "MR float32 intensities" if prepared.preset.intensity == "mr" else "CT int16 HU"
    message = (f"wrote {what} ({kind}, {_fmt(ct.shape, 'd')} voxels, {_fmt(ct.spacing, '.4g')} mm; "
               f"seed {result.seed_used})")
    if result.action == "draft":
        message = f"DRAFT (a quick look, not a final result): {message}"
    elif result.action == "update":
        message = f"{message}; only the changed region was regenerated, every other voxel is {request.update}'s"
    report.result(summary, message)
    return summary


def run_inpaint(request: InpaintRequest, report: Report, cancel: Callable[[], bool] | None = None,
                models=None) -> RunSummary:
    """Check, load, inpaint and write an ``InpaintRequest`` (``models``: as for ``run_generate``)."""
    from ..precision import resolve_precision
    from ..validation import resolve_device
    from .inpaint import InpaintPipeline, prepare_inpaint, write_inpaint_result

    prepared = prepare_inpaint(request)
    device = resolve_device(request.device)
    precision = resolve_precision(request.precision, device, request.reference_numerics)
    report.info(f"{precision.describe()}; attention: {precision.attention}; the encoder runs in float32")
    if models is None:
        pipeline = InpaintPipeline.from_request(request)
    else:
        pipeline = InpaintPipeline(models.model(prepared.preset, prepared.weights_dir, device, precision.attention))
    report.info(f"{prepared.preset.key} on {pipeline.model.device}: inpainting {request.tumor_type} "
                f"({int(prepared.tumor_mask.sum())} voxels), seed {request.seed}")
    result = pipeline(prepared, progress=report.progress, cancel=cancel)
    for note in result.notes:
        report.note(note)
    written = write_inpaint_result(result, request)
    files = {role: str(path) for role, path in written.items()}
    summary = RunSummary(files=files, seed_used=request.seed, notes=list(result.notes),
                         details={"roi_shape": list(result.roi_shape), "precision": precision.name,
                                  "reference_numerics": precision.reference_numerics})
    what = ", ".join(files.values()) or "nothing (no --out)"
    report.result(summary, f"wrote {what} (region {_fmt(result.roi_shape, 'd')} voxels regenerated around the tumour)")
    return summary


def run_weights(request: WeightsRequest, report: Report, cancel: Callable[[], bool] | None = None,
                models=None) -> RunSummary:
    """``list`` the official models, ``download`` one (licence accepted in the request) or ``remove`` one."""
    from ..models import download

    request.check()
    if request.action == "list":
        rows = [download.model_status(name) for name in download.OFFICIAL_MODELS]
        summary = RunSummary(details={"models": rows})
        report.result(summary, json.dumps(rows, indent=2))
        return summary
    if request.action == "download":
        outcome = download.download_model(request.model, accept_license=request.accept_license,
                                          base_url=request.base_url, include_datasets=request.include_datasets,
                                          show_progress=isinstance(report, HumanReport), log=report.info)
        files = {path.name: str(path) for path in outcome.fetched}
        summary = RunSummary(files=files, details={"folder": str(outcome.folder), "bytes": outcome.bytes_received})
        report.result(summary, f"{request.model}: {len(files)} file(s) downloaded to {outcome.folder}")
        return summary
    folder = download.model_dir(request.model)
    if not folder.exists():
        summary = RunSummary(details={"removed": [], "folder": str(folder)})
        report.result(summary, f"{request.model}: nothing to remove ({folder} does not exist)")
        return summary
    removed = download.remove_model(request.model)
    left = f"; {folder} kept: it holds other files" if folder.exists() else ""
    summary = RunSummary(details={"removed": [str(p) for p in removed], "folder": str(folder)})
    report.result(summary, f"removed {request.model}: {len(removed)} file(s) deleted from {folder}{left}")
    return summary


RUNNERS = {"generate": run_generate, "inpaint": run_inpaint, "weights": run_weights}


def run_request(request: Request, report: Report, cancel: Callable[[], bool] | None = None,
                models=None) -> RunSummary:
    """Carry out any request (generate, inpaint, weights) and report on ``report``; ``models``: the
    loaded networks to use (see ``run_generate``), else each request loads its own."""
    return RUNNERS[request.kind](request, report, cancel, models)
