"""MAISIGenerate's logic: MRML nodes in, the `maisi` program run in a child process, new nodes out.

What lives here: matching segments to MAISI labels (name, then terminology, then the user's
overrides), building the label volume the model follows (with the body envelope), suggesting an
output grid, the command lines of the three modes, a ``GenerationJob`` that streams the worker's
output and turns its files into new nodes, drafts and updates of the edited region (the previous
result of each segmentation kept in a folder of the logic's own; ``plan_apply`` decides), weights
status and time estimates.
What is NOT here: Qt, dialogs, views. Errors are raised (``ValueError`` for bad requests,
``RuntimeError`` for failed runs); the widget shows them. Rules and constants (presets, tumour
region, label table) are imported from maisicore, never copied: from its torch-free modules only
(presets and tumour rules at file scope, the rest inside functions), so importing this module and
matching segments stay cheap and torch is never loaded in Slicer's process (the worker runs the models).

Arrays handed to maisicore are (x, y, z) with the nodes' IJKToRAS as affine (see ``mrml.py``).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
from maisicore.anatomy.tumors import ball_roi_size
from maisicore.models.presets import MODEL_NAMES, get_preset

from . import mrml
from .parameters import FromSegmentation, InpaintTumor, RandomAnatomy, RunOptions
from .process import ServeWorker, WorkerProcess, parse_event, run_command, run_to_end, worker_environment, worker_python

# ---- segments -> MAISI labels -------------------------------------------------------------------


@dataclass
class SegmentMatch:
    """How one segment maps to a MAISI label. ``matched_by``: override, name, terminology,
    skipped (override to nothing) or unresolved (``label_id`` None)."""

    segment_id: str
    segment_name: str
    label_id: int | None
    label_name: str | None
    matched_by: str


@dataclass
class LabelBuild:
    """The label volume built from a segmentation, with how each segment was matched.

    labels: ``maisicore.io.geometry.Volume``, int16 MAISI ids, array (x, y, z), affine index -> RAS.
    grid_node: the volume node whose grid the labels are on (the reference volume), or None.
    """

    labels: object
    matches: list[SegmentMatch]
    body_voxels_added: int = 0
    grid_node: object | None = None

    @property
    def unresolved(self) -> list[SegmentMatch]:
        return [m for m in self.matches if m.matched_by == "unresolved"]

    def summary(self) -> str:
        used = [m for m in self.matches if m.label_id is not None]
        text = f"{len(used)} of {len(self.matches)} segments matched to MAISI labels"
        if self.unresolved:
            text += "; unresolved: " + ", ".join(repr(m.segment_name) for m in self.unresolved)
        if self.body_voxels_added:
            text += f"; body envelope (label 200) added on {self.body_voxels_added} voxels"
        return text


def resolve_label(value) -> tuple[int | None, str | None]:
    """A MAISI label from an override value: an id (int or digits), a name/synonym or a terminology
    string. 0, '' or None mean "skip". Raises ValueError for anything unknown."""
    from maisicore.anatomy.labels import label_table

    table = label_table()
    if value is None or (isinstance(value, str) and not value.strip()) or value == 0:
        return None, None
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.strip().isdigit()):
        try:
            info = table.by_id(int(value))
        except KeyError:
            raise ValueError(f"{value!r} is not a MAISI label id (see `maisi labels list`)") from None
        return info.id, info.name
    info = table.resolve(str(value))
    if info is None:
        raise ValueError(f"{value!r} is not a MAISI label name (see `maisi labels list`)")
    return info.id, info.name


def match_segments(segmentation_node, overrides: dict | None = None) -> list[SegmentMatch]:
    """Match every segment of ``segmentation_node`` to a MAISI label.

    Order: the user's override (keyed by segment id or segment name), then the segment name (MAISI
    names, synonyms such as "kidney left", TotalSegmentator class names), then the segment's
    terminology entry (SNOMED codes as Slicer writes them). Nothing is dropped silently: segments
    that match nothing are returned with ``matched_by == "unresolved"``."""
    from maisicore.anatomy.labels import label_table

    table = label_table()
    overrides = dict(overrides or {})
    matches = []
    for segment_id in mrml.segment_ids(segmentation_node):
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        name = segment.GetName()
        key = segment_id if segment_id in overrides else (name if name in overrides else None)
        if key is not None:
            label_id, label_name = resolve_label(overrides[key])
            matches.append(SegmentMatch(segment_id, name, label_id, label_name, "override" if label_id else "skipped"))
            continue
        info = table.by_segment_name(name)
        matched_by = "name"
        if info is None:
            entry = mrml.segment_terminology(segment)
            info = table.by_terminology(entry) if entry else None
            matched_by = "terminology"
        if info is None:
            matches.append(SegmentMatch(segment_id, name, None, None, "unresolved"))
        else:
            matches.append(SegmentMatch(segment_id, name, info.id, info.name, matched_by))
    return matches


def labels_from_segmentation(
    segmentation_node, reference_volume=None, overrides: dict | None = None, add_body: bool = True,
    progress: Callable[[int, int], None] | None = None, body_options=None,
) -> LabelBuild:
    """The MAISI label volume of a segmentation, on the reference volume's grid (exactly its
    IJKToRAS and shape) or, without one, on the segmentation's reference geometry.

    One int16 array is filled segment by segment, read slice by slice from the segmentation's
    layers: the extra memory is a few slices, whatever the number of segments. Overlapping segments
    resolve as ``maisicore.anatomy.labelmap.paint_priority`` orders them (tumours over organs over
    body, the smaller over the larger). With ``add_body`` the body envelope (label 200) fills the
    body around the labels: from the reference volume's CT (HU, read in place, not copied) when given,
    by NVIDIA's ``add_body_envelope`` algorithm with ``body_options``
    (``maisicore.anatomy.body.BodyOptions``; None: the reference's defaults), else from the labels.
    ``progress(done, total)``: slices painted, then the envelope's steps, for a progress bar: the
    envelope's memory is about 7 bytes per voxel and each of its steps takes well under a second per
    10 M voxels (``maisicore.anatomy.body``), so the GUI repaints between them."""
    from maisicore.anatomy.labelmap import ConversionReport, paint_priority, with_body_envelope
    from maisicore.anatomy.labels import label_table
    from maisicore.io.geometry import Volume

    matches = match_segments(segmentation_node, overrides)
    used = [m for m in matches if m.label_id is not None]
    if not used:
        names = ", ".join(repr(m.segment_name) for m in matches) or "none"
        raise ValueError(
            f"no segment of {segmentation_node.GetName()!r} matches a MAISI label (segments: {names}); "
            "rename the segments, set their terminology, or map them in the segment table"
        )
    shape, affine, grid_node = mask_grid_geometry(segmentation_node, reference_volume)
    ids = [m.segment_id for m in used]
    readable = mrml.segment_layers(segmentation_node, ids, shape, affine, grid_node)
    if readable is not None:
        layers, where = readable
        voxels = mrml.count_segment_voxels(layers, where, shape[2])
    else:  # a non-linear transform: Slicer's export applies it
        voxels = {segment_id: int(mask.sum()) for segment_id, mask in mrml.exported_segment_masks(
            segmentation_node, ids, reference_volume)}
    # Several segments may map to one label: they are painted together, as one mask of their size.
    size_of_label: dict[int, int] = {}
    for match in used:
        size_of_label[match.label_id] = size_of_label.get(match.label_id, 0) + voxels[match.segment_id]
    table = label_table()
    ranked = sorted(used, key=lambda m: paint_priority(table.by_id(m.label_id), size_of_label[m.label_id]))
    order = [(m.segment_id, m.label_id) for m in ranked]
    if readable is not None:
        array = mrml.paint_segments(layers, where, order, shape, progress)
    else:
        array = np.zeros(shape, dtype=np.int16, order="F")
        label_of = dict(order)
        masks = dict(mrml.exported_segment_masks(segmentation_node, [s for s, _ in order], reference_volume))
        for segment_id, _label in order:
            array[masks.pop(segment_id)] = label_of[segment_id]
    labels = Volume(array, affine)
    body_voxels = 0
    if add_body:
        report = ConversionReport()
        ct = mrml.volume_view(reference_volume) if reference_volume is not None else None
        labels = with_body_envelope(labels, report, ct, body_options, progress)
        labels = Volume(labels.array.astype(np.int16, copy=False), affine)
        body_voxels = report.body_voxels_added
    return LabelBuild(labels, matches, body_voxels, reference_volume)


def mask_grid_geometry(segmentation_node, reference_volume=None):
    """(shape (x, y, z) voxels, IJKToRAS, node whose coordinates the IJKToRAS is in) of the grid the
    segmentation's labels take: the reference volume's, else the segmentation's reference geometry."""
    if reference_volume is not None:
        shape = tuple(int(d) for d in reference_volume.GetImageData().GetDimensions())
        return shape, mrml.ijk_to_ras(reference_volume), reference_volume
    grid = mrml.segmentation_grid(segmentation_node)
    if grid is None:
        raise ValueError(f"segmentation {segmentation_node.GetName()!r} has no geometry: choose a reference volume")
    return grid[0], grid[1], segmentation_node


def mask_grid(segmentation_node, reference_volume=None):
    """An empty ``Volume`` (uint8 zeros, (x, y, z)) on the grid the segmentation's labels would take:
    the reference volume's, else the segmentation's reference geometry."""
    from maisicore.io.geometry import Volume

    shape, affine, _node = mask_grid_geometry(segmentation_node, reference_volume)
    return Volume(np.zeros(shape, np.uint8), affine)


def inpaint_region_size(volume_node, diameter_mm: float) -> tuple[int, int, int]:
    """Voxels (x, y, z) of the region ``maisi inpaint`` regenerates around a ball tumour of
    ``diameter_mm`` (mm) in ``volume_node``: ``maisicore.anatomy.tumors.ball_roi_size`` at the
    volume's spacing."""
    spacing = np.linalg.norm(mrml.ijk_to_ras(volume_node)[:3, :3], axis=0)
    return ball_roi_size(diameter_mm, spacing)


def _preset_for(model: str):
    """The preset of a named model; rflow-ct's for ``demo`` (a tiny rflow-ct) and weight folders
    (whose card only the worker reads)."""
    return get_preset(model if model in MODEL_NAMES else "rflow-ct")


def suggest_grid(labels, model: str = "rflow-ct") -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """The published output grid closest to the labels' field of view: (size (x, y, z) voxels,
    spacing (x, y, z) mm), axes along the labels' closest RAS axes (``maisicore.anatomy.grids``)."""
    from maisicore.anatomy.grids import closest_valid_grid

    grid = closest_valid_grid(labels, _preset_for(model).grid)
    return tuple(int(s) for s in grid.shape), tuple(round(float(s), 4) for s in grid.spacing)


# ---- time estimate ----------------------------------------------------------------------------

# Rough cost of the official-width networks on 2 CPU cores (this project's CI machine): one UNet +
# ControlNet pass ~1e-4 s per latent voxel (measured: 1.3 s for a 24^3 latent), the exact VAE decode
# ~1.6e-5 s per image voxel (docs/memory-and-speed.md: 33 s for 128^3). CUDA: an assumed 50x speed-up.
# Shown to the user as an order of magnitude only.
SECONDS_PER_LATENT_VOXEL_STEP = {"cpu": 1.0e-4, "cuda": 2e-6}
SECONDS_PER_IMAGE_VOXEL_DECODE = {"cpu": 1.6e-5, "cuda": 3.2e-7}


def estimate_seconds(size, steps: int | None, model: str = "rflow-ct", device: str = "cpu") -> float:
    """Order-of-magnitude run time (s) of one generation at ``size`` (x, y, z) voxels with the
    official-width model on ``device`` ('cpu' or 'cuda'); ``steps`` None: the model's default."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    preset = _preset_for(model)
    steps = steps or preset.scheduler.default_steps
    voxels = float(np.prod(size))
    latent_voxels = voxels / preset.vae_downsample**3
    return steps * latent_voxels * SECONDS_PER_LATENT_VOXEL_STEP[kind] + voxels * SECONDS_PER_IMAGE_VOXEL_DECODE[kind]


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '3.2 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---- drafts and updates: the interactive loop -----------------------------------------------------

# An edit that changes this fraction of the mask's voxels or more is generated again, not updated:
# the update's region (changed voxels + margin + context) would be most of the volume anyway.
UPDATE_MAX_FRACTION = 0.25
DRAFT_SUFFIX = " (draft)"
UPDATE_SUFFIX = " (updated)"


@dataclass
class PreviousResult:
    """The last (non-draft) result of a segmentation, as files in the logic's own folder: the CT and
    the labels it was generated from (the request's mask), both on the mask's grid; ``model``: the
    model, weights and modality it came from (an update with another model generates again)."""

    ct: Path
    labels: Path
    model: tuple | None = None


def _model_key(options: RunOptions | None) -> tuple | None:
    if options is None:
        return None
    return (options.model, options.weights_dir or None, options.modality if options.modality != "auto" else None)


@dataclass
class ApplyPlan:
    """What Apply on a segmentation does: ``action`` "draft", "update" (regenerate only where the
    labels changed since ``previous``) or "generate"; ``changed_fraction``: the fraction of the mask's
    voxels whose label changed (None when there is nothing to compare with); ``reason``: one line for
    the log."""

    action: str
    changed_fraction: float | None
    reason: str
    build: LabelBuild | None = None
    previous: PreviousResult | None = None


def labels_changed(previous_labels_file: Path, labels) -> tuple[int, int] | None:
    """(changed voxels, all voxels) between the labels in ``previous_labels_file`` and ``labels``
    (a ``Volume``), or None when they are not on the same grid (shape, or affine beyond 1 µm)."""
    from maisicore.io.volumes import read_volume

    old = read_volume(previous_labels_file)
    if old.array.shape != labels.array.shape or not np.allclose(old.affine, labels.affine, rtol=0, atol=1e-3):
        return None
    changed = np.count_nonzero(np.rint(old.array).astype(np.int16) != labels.array)
    return int(changed), int(labels.array.size)


# ---- runs ---------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """New nodes of a finished run: the CT volume node and the label segmentation node (None when
    the run had no labels), plus the worker's output lines."""

    volume_node: object
    segmentation_node: object | None
    log: list[str] = field(default_factory=list)


class GenerationJob:
    """One worker run: a request sent to the warm worker (``serve``: a ``ServeWorker``, ``maisi
    serve``) or, without one, a ``maisi run REQUEST.json`` process. Poll it (``poll``), then call
    ``finish`` once ``done``; or ``cancel`` (``begin_cancel`` + ``cancel_overdue`` to cancel without
    blocking).

    The job owns a temporary folder with the request, the worker's inputs and outputs; ``finish`` and
    ``cancel`` delete it. No node is created before ``finish``, so a cancelled or failed run leaves the
    scene as it was. The worker's events (``maisicore.pipelines.runner``) update ``progress``, ``log``,
    ``result_event`` and ``error_event``."""

    def __init__(self, request, python: list[str], workdir: Path,
                 make_result: Callable[[GenerationJob], GenerationResult] | None = None,
                 serve: ServeWorker | None = None):
        from maisicore.pipelines.requests import write_request

        self.request = request
        self.workdir = workdir
        self.request_file = workdir / "request.json"  # the run's request as `maisi run` takes it
        write_request(self.request_file, request)
        self.command = serve.command if serve is not None else run_command(python, self.request_file)
        self._make_result = make_result
        self.log: list[str] = []
        self.progress: tuple[str, int, int] | None = None
        self.result_event: dict | None = None
        self.error_event: dict | None = None
        self.label_build: LabelBuild | None = None  # from-segmentation runs: how the segments were matched
        self.plan: ApplyPlan | None = None  # from-segmentation runs: draft, update or generate, and why
        self.worker = serve.submit(request) if serve is not None else WorkerProcess(self.command, env=worker_environment())

    @property
    def done(self) -> bool:
        """The worker has exited and its output has been read."""
        return self.worker.finished_reading()

    def handle(self, event: dict) -> str | None:
        """Take one event; returns the line to show the user, if any."""
        kind = event.get("event")
        if kind == "progress":
            self.progress = (str(event["stage"]), int(event["done"]), int(event["total"]))
            return None
        if kind == "result":
            self.result_event = event
            return event.get("message")
        if kind == "error":
            self.error_event = event
            return f"error: {event.get('message')}"
        if kind == "note":
            return f"note: {event.get('message')}"
        if kind == "info":
            return event.get("message")
        return None

    def poll(self) -> list[str]:
        """New lines to show since the last call (events are taken; progress updates ``progress``)."""
        new = []
        for line in self.worker.read_lines():
            event = parse_event(line)
            text = self.handle(event) if event is not None else line
            if text:
                new.append(text)
        self.log += new
        return new

    def fraction(self) -> float:
        """Overall progress 0..1: denoising counts 90 %, decoding 10 %."""
        if self.progress is None:
            return 0.0
        stage, done, total = self.progress
        part = done / max(total, 1)
        return 0.9 * part if stage == "denoise" else (0.9 + 0.1 * part if stage == "decode" else part)

    def finish(self) -> GenerationResult:
        """Wait for the worker, then read its outputs into new nodes. Raises RuntimeError with the
        worker's error (or last lines) when it failed. Always deletes the temporary folder."""
        try:
            code = self.worker.wait()
            self.poll()
            if self.worker.cancelled:
                raise RuntimeError("the run was cancelled")
            if code != 0 or self.result_event is None:
                if self.error_event is not None:
                    raise RuntimeError(f"maisi failed (exit code {code}): {self.error_event.get('message')}")
                tail = "\n".join(self.log[-8:]) or "(no output)"
                raise RuntimeError(f"maisi failed (exit code {code}):\n{tail}")
            result = self._make_result(self) if self._make_result else GenerationResult(None, None)
            result.log = list(self.log)
            return result
        finally:
            self.cleanup()

    def cancel(self) -> None:
        """Stop the run and delete the temporary folder; no node is created. A warm worker is asked to
        stop (killed only when it does not answer within its grace period); a one-shot worker's process
        tree is killed."""
        try:
            self.worker.cancel()
        finally:
            self.cleanup()

    def begin_cancel(self) -> None:
        """Ask the run to stop without waiting (a one-shot worker is killed at once); poll until
        ``done``, or call ``cancel`` when ``cancel_overdue``; then ``cleanup``."""
        if isinstance(self.worker, WorkerProcess):
            self.worker.cancel()
        else:
            self.worker.request_cancel()

    @property
    def cancel_overdue(self) -> bool:
        """A cancel was asked for and the worker has not answered within its grace period."""
        return bool(getattr(self.worker, "cancel_overdue", False))

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _model_label(options: RunOptions) -> str:
    return options.model if options.model in MODEL_NAMES else Path(options.model).name


def _model_options(options: RunOptions) -> dict:
    """The request fields every mode shares."""
    return {"model": options.model, "weights_dir": options.weights_dir, "seed": int(options.seed),
            "steps": int(options.steps) if options.steps else None, "device": options.device or "auto",
            "modality": options.modality if options.modality not in (None, "", "auto") else None,
            "reference_numerics": bool(getattr(options, "reference_numerics", False))}


def _unique_name(base: str) -> str:
    return slicer.mrmlScene.GenerateUniqueName(base)


class GenerateLogic:
    """MAISIGenerate's logic (no Qt). ``python``: the interpreter command that runs the worker
    (default: PythonSlicer inside Slicer, else this interpreter)."""

    def __init__(self, python: list[str] | None = None, warm: bool = True):
        self.python = list(python) if python else worker_python()
        # One warm `maisi serve` worker for every run (started at the first, kept while it lives):
        # only the first run pays for starting Python, importing torch and loading the weights.
        self.warm = warm
        self._serve: ServeWorker | None = None
        # Called with (slices done, total) while a segmentation is turned into labels: the widget
        # moves its progress bar and repaints (no user input) during the seconds a large one takes.
        self.label_progress: Callable[[int, int], None] | None = None
        # The last non-draft result of each segmentation (by node ID): files in a folder of our own,
        # so an edit can be answered with an update of the changed region.
        self._previous: dict[str, PreviousResult] = {}
        self._previous_dir: Path | None = None

    # segments
    match_segments = staticmethod(match_segments)
    labels_from_segmentation = staticmethod(labels_from_segmentation)
    mask_grid = staticmethod(mask_grid)
    suggest_grid = staticmethod(suggest_grid)
    inpaint_region_size = staticmethod(inpaint_region_size)
    estimate_seconds = staticmethod(estimate_seconds)

    # ---- the warm worker
    def serve_worker(self) -> ServeWorker | None:
        """The warm worker, started when there is none (or it ended); None when ``warm`` is off."""
        if not self.warm:
            return None
        if self._serve is None or not self._serve.alive:
            self._serve = ServeWorker(self.python, env=worker_environment())
        return self._serve

    def shutdown(self) -> None:
        """End the warm worker (module cleanup, scene close, Slicer exit); the next run starts a new
        one. The previous results kept for updates are forgotten too (their nodes go with the scene)."""
        worker, self._serve = self._serve, None
        try:
            if worker is not None:
                worker.close()
        finally:
            self.forget_results()

    # ---- previous results (updates of the edited region)
    def previous_result(self, segmentation_node) -> PreviousResult | None:
        """The last non-draft result generated from ``segmentation_node``, or None."""
        if segmentation_node is None:
            return None
        return self._previous.get(segmentation_node.GetID())

    def forget_results(self) -> None:
        """Forget every previous result and delete their files."""
        folder, self._previous_dir = self._previous_dir, None
        self._previous.clear()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def _remember(self, segmentation_node, ct_file: Path, labels_file: Path, options: RunOptions | None = None) -> None:
        """Keep copies of a result's CT and of the labels it was generated from."""
        if self._previous_dir is None or not self._previous_dir.is_dir():
            self._previous_dir = Path(tempfile.mkdtemp(prefix="maisi-previous-"))
        key = segmentation_node.GetID()
        old = self._previous.get(key)
        folder = old.ct.parent if old is not None else Path(tempfile.mkdtemp(dir=self._previous_dir))
        ct, labels = folder / ("ct" + ct_file.suffix), folder / ("labels" + labels_file.suffix)
        shutil.copyfile(ct_file, ct)
        shutil.copyfile(labels_file, labels)
        self._previous[key] = PreviousResult(ct, labels, _model_key(options))

    def plan_apply(self, source: FromSegmentation, build: LabelBuild | None = None,
                   options: RunOptions | None = None) -> ApplyPlan:
        """What Apply does with ``source`` (see ``ApplyPlan``): a draft when ``source.draft``; an
        update when a previous result of the segmentation exists (from the same model, weights and
        modality as ``options``, when given), the new labels are on its grid, differ from its labels
        and less than ``UPDATE_MAX_FRACTION`` of the voxels changed, and ``source.update_changed``;
        else a full generation. ``build``: the labels already built (else they are built here)."""
        if source.draft:
            return ApplyPlan("draft", None, "draft: a quick look, not a final result", build)
        previous = self.previous_result(source.segmentation)
        if previous is None or not (previous.ct.is_file() and previous.labels.is_file()):
            return ApplyPlan("generate", None, "generating (no earlier result of this segmentation)", build)
        if options is not None and previous.model is not None and _model_key(options) != previous.model:
            return ApplyPlan("generate", None, "generating again (the model changed since the last result)", build)
        if build is None:
            build = labels_from_segmentation(source.segmentation, source.reference_volume, source.overrides,
                                             source.add_body, progress=self.label_progress,
                                             body_options=source.body_options)
        counts = labels_changed(previous.labels, build.labels)
        if counts is None:
            return ApplyPlan("generate", None, "generating again (the labels' grid changed since the last result)", build)
        changed, total = counts
        fraction = changed / max(total, 1)
        if changed == 0:
            return ApplyPlan("generate", 0.0, "generating again (the labels did not change)", build)
        share = f"{changed} voxels ({100 * fraction:.2g} %) changed"
        if fraction >= UPDATE_MAX_FRACTION:
            return ApplyPlan("generate", fraction, f"generating again ({share}: too many to update)", build)
        if not source.update_changed:
            return ApplyPlan("generate", fraction, f"generating again ({share}; as chosen)", build)
        return ApplyPlan("update", fraction, f"updating the changed region ({share})", build, previous)

    def __del__(self) -> None:  # a logic dropped without shutdown (scripts, tests) ends its worker too
        try:
            self.shutdown()
        except Exception:
            pass

    # ---- starting runs
    def start(self, source, options: RunOptions) -> GenerationJob:
        """Prepare the inputs of ``source`` (FromSegmentation, RandomAnatomy or InpaintTumor) in a
        temporary folder and start the worker. Raises ValueError for a request that cannot run."""
        starters = {FromSegmentation: self._start_from_segmentation, RandomAnatomy: self._start_random,
                    InpaintTumor: self._start_inpaint}
        starter = starters.get(type(source))
        if starter is None:
            raise TypeError(f"unknown generation source {type(source).__name__}")
        workdir = Path(tempfile.mkdtemp(prefix="maisi-generate-"))
        try:
            return starter(source, options, workdir)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise

    def run(self, source, options: RunOptions, log: Callable[[str], None] | None = None,
            progress: Callable[[str, int, int], None] | None = None,
            should_cancel: Callable[[], bool] | None = None) -> GenerationResult | None:
        """Blocking run (batch scripts, tests, self-tests): start, stream, finish. Returns None when
        ``should_cancel`` stopped it (nothing added to the scene)."""
        job = self.start(source, options)

        def on_event(event: dict) -> None:
            text = job.handle(event)
            if text:
                job.log.append(text)
                if log is not None:
                    log(text)
            if progress is not None and event.get("event") == "progress":
                progress(*job.progress)

        def on_line(line: str) -> None:
            job.log.append(line)
            if log is not None:
                log(line)

        run_to_end(job.worker, on_event, on_line, should_cancel)
        if job.worker.cancelled:
            job.cleanup()
            return None
        return job.finish()

    def _start_from_segmentation(self, source: FromSegmentation, options: RunOptions, workdir: Path) -> GenerationJob:
        from maisicore.io.volumes import write_volume
        from maisicore.pipelines.requests import DRAFT_MAX_STEPS, GenerateRequest

        if source.segmentation is None:
            raise ValueError("choose a segmentation")
        if (source.size is None) != (source.spacing is None):
            raise ValueError("give both the output size and spacing, or neither")
        build = labels_from_segmentation(source.segmentation, source.reference_volume, source.overrides, source.add_body,
                                         progress=self.label_progress, body_options=source.body_options)
        plan = self.plan_apply(source, build, options)
        mask_file, labels_file, ct_file = workdir / "mask.nrrd", workdir / "labels.nrrd", workdir / "ct.nrrd"
        write_volume(mask_file, build.labels)
        name = f"MAISI {_model_label(options)} seed {options.seed}"
        shared = _model_options(options)
        if plan.action == "update":  # the previous CT's grid, which is the mask's: no size, spacing or fit
            request = GenerateRequest(
                **shared, mask=str(mask_file), label_out=str(labels_file), out=str(ct_file),
                update=str(plan.previous.ct), previous_labels=str(plan.previous.labels),
                allow_any_size=bool(options.allow_any_size),
            )
            name += UPDATE_SUFFIX
        else:
            if plan.action == "draft":
                if shared["steps"] is not None and shared["steps"] > DRAFT_MAX_STEPS - 1:
                    shared["steps"] = None  # a draft's own (at most DRAFT_MAX_STEPS network evaluations)
                name += DRAFT_SUFFIX
            sized = source.fit_grid and source.size is not None
            request = GenerateRequest(
                **shared, mask=str(mask_file), label_out=str(labels_file), out=str(ct_file),
                fit="always" if source.fit_grid else "auto", on_mask_grid=True,  # results always on the mask's grid
                size=[int(s) for s in source.size] if sized else None,
                spacing=[float(s) for s in source.spacing] if sized else None,
                allow_any_size=bool(options.allow_any_size), draft=plan.action == "draft",
            )
        request.check()  # refuse a request the worker would refuse, here, with its one line
        reference = source.reference_volume
        segmentation = source.segmentation

        def make_result(job: GenerationJob) -> GenerationResult:
            result = self._read_outputs(ct_file, labels_file, name, reference)
            if plan.action != "draft":  # the next edit of this segmentation can update this result
                self._remember(segmentation, ct_file, mask_file, options)
            return result

        job = GenerationJob(request, self.python, workdir, make_result, serve=self.serve_worker())
        job.log.append(build.summary())
        job.log.append(plan.reason)
        job.label_build = build
        job.plan = plan
        return job

    def _start_random(self, source: RandomAnatomy, options: RunOptions, workdir: Path) -> GenerationJob:
        from maisicore.pipelines.requests import GenerateRequest

        ct_file, labels_file = workdir / "ct.nrrd", workdir / "labels.nrrd"
        anatomy = [a.strip() for a in source.anatomy if a.strip()]
        if anatomy:
            from maisicore.anatomy.labels import label_table

            unknown = [a for a in anatomy if label_table().by_segment_name(a) is None]
            if unknown:
                raise ValueError(f"not MAISI anatomy names: {', '.join(map(repr, unknown))} (see `maisi labels list`)")
        sizes = None
        if source.anatomy_sizes:  # the mask generated with these sizes: maisicore's text and rules
            from maisicore.anatomy.maskgen import format_anatomy_sizes

            sizes = format_anatomy_sizes(source.anatomy_sizes)
        has_labels = bool(anatomy) or sizes is not None
        request = GenerateRequest(
            **_model_options(options), out=str(ct_file), size=[int(s) for s in source.size],
            spacing=[float(s) for s in source.spacing], anatomy=anatomy or None,
            label_out=str(labels_file) if has_labels else None, mask_db=source.mask_db if anatomy else None,
            body_region=list(source.body_regions) or None, allow_any_size=bool(options.allow_any_size),
            anatomy_size=sizes, anatomy_size_db=source.anatomy_size_db if sizes else None,
            mask_steps=source.mask_steps if sizes else None,
        )
        request.check()  # refuse contradictions (anatomy with sizes...) here, with the worker's one line
        name = f"MAISI {_model_label(options)} seed {options.seed}"

        def make_result(job: GenerationJob) -> GenerationResult:
            return self._read_outputs(ct_file, labels_file if has_labels else None, name, None)

        return GenerationJob(request, self.python, workdir, make_result, serve=self.serve_worker())

    def _start_inpaint(self, source: InpaintTumor, options: RunOptions, workdir: Path) -> GenerationJob:
        from maisicore.io.geometry import Volume
        from maisicore.io.volumes import write_volume
        from maisicore.pipelines.requests import InpaintRequest

        if source.volume is None:
            raise ValueError("choose the CT volume to inpaint")
        image_file, ct_file, labels_file = workdir / "image.nrrd", workdir / "ct.nrrd", workdir / "labels.nrrd"
        write_volume(image_file, mrml.volume_from_node(source.volume))
        tumor = {}
        if source.tumor_segmentation is not None and source.tumor_segment_id:
            masks, affine = mrml.segment_masks(source.tumor_segmentation, [source.tumor_segment_id], source.volume)
            mask = masks[source.tumor_segment_id]
            if not mask.any():
                raise ValueError(f"the tumour segment {source.tumor_segment_id!r} is empty on the CT's grid")
            write_volume(workdir / "tumor.nrrd", Volume(mask.astype(np.uint8), affine))
            tumor["tumor_mask"] = str(workdir / "tumor.nrrd")
        elif source.center_ras is not None:
            if not source.diameter_mm or source.diameter_mm <= 0:
                raise ValueError("give the tumour diameter (mm) with the tumour point")
            tumor.update(tumor_center=[float(c) for c in source.center_ras], tumor_diameter=float(source.diameter_mm))
        else:
            raise ValueError("give a tumour segment, or a point and a diameter")
        if source.anatomy_segmentation is not None:
            build = labels_from_segmentation(source.anatomy_segmentation, source.volume, source.overrides, True)
            write_volume(workdir / "anatomy.nrrd", build.labels)
            tumor["labels"] = str(workdir / "anatomy.nrrd")
        shared = _model_options(options)
        shared.pop("modality")  # inpainting is CT only: the request has no modality
        request = InpaintRequest(image=str(image_file), tumor_type=source.tumor_type, **tumor, **shared,
                                 out=str(ct_file), label_out=str(labels_file))
        name = f"{source.volume.GetName()} + {source.tumor_type} (MAISI {_model_label(options)} seed {options.seed})"
        reference = source.volume

        def make_result(job: GenerationJob) -> GenerationResult:
            return self._read_outputs(ct_file, labels_file, name, reference)

        return GenerationJob(request, self.python, workdir, make_result, serve=self.serve_worker())

    @staticmethod
    def _read_outputs(ct_file: Path, labels_file: Path | None, name: str, reference) -> GenerationResult:
        """New nodes from the worker's files: the CT (on ``reference``'s exact IJKToRAS when given)
        and, when written, the label segmentation."""
        from maisicore.io.volumes import read_volume

        ct = read_volume(ct_file)
        volume_node = mrml.add_volume_node(ct, _unique_name(name), like=reference)
        segmentation_node = None
        if labels_file is not None and labels_file.is_file():
            labels = read_volume(labels_file)
            labels.array = np.rint(labels.array).astype(np.int16)
            try:
                segmentation_node = mrml.add_label_segmentation(labels, _unique_name(f"{name} labels"), volume_node)
            except BaseException:
                mrml.remove_nodes(volume_node)
                raise
        return GenerationResult(volume_node, segmentation_node)

    # ---- weights (through the same worker and events)
    def _weights_job(self, action: str, model: str | None = None) -> GenerationJob:
        from maisicore.pipelines.requests import WeightsRequest

        request = WeightsRequest(action=action, model=model, accept_license=action == "download")
        return GenerationJob(request, self.python, Path(tempfile.mkdtemp(prefix="maisi-weights-")))

    def _weights_result(self, action: str, model: str | None, timeout_s: float) -> dict:
        job = self._weights_job(action, model)
        try:
            deadline = time.monotonic() + timeout_s
            run_to_end(job.worker, job.handle, job.log.append,
                       should_cancel=lambda: time.monotonic() > deadline)
            if job.worker.cancelled:
                raise RuntimeError(f"`maisi weights {action}` took longer than {timeout_s:g} s")
            if job.result_event is None:
                message = (job.error_event or {}).get("message") or (job.log[-1] if job.log else "(no output)")
                raise RuntimeError(f"`maisi weights {action}` failed: {message}")
            return job.result_event
        finally:
            job.cleanup()

    def weights_status(self, timeout_s: float = 60) -> list[dict]:
        """Every official model's status ({"model", "installed", "path", "license", "license_url",
        "license_accepted", ...}), waiting for the worker (batch use). Raises RuntimeError when it fails."""
        return list(self._weights_result("list", None, timeout_s)["details"]["models"])

    def start_weights_status(self) -> GenerationJob:
        """Start asking the worker for the models' status without waiting (it imports torch: seconds);
        poll the job like a generation, then ``weights_rows(job)`` once it is ``done``."""
        return self._weights_job("list")

    @staticmethod
    def weights_rows(job: GenerationJob) -> list[dict]:
        """The status rows of a finished ``start_weights_status`` job (as ``weights_status``);
        RuntimeError when it failed. Deletes the job's folder."""
        try:
            job.worker.wait()
            job.poll()
            if job.result_event is None:
                message = (job.error_event or {}).get("message") or (job.log[-1] if job.log else "(no output)")
                raise RuntimeError(f"`maisi weights list` failed: {message}")
            return list(job.result_event["details"]["models"])
        finally:
            job.cleanup()

    def start_weights_download(self, model: str) -> GenerationJob:
        """Start downloading ``model``'s official weights, the licence accepted by the user (the
        request says so); poll it like a generation (``poll``, ``done``, ``finish``, ``cancel``)."""
        return self._weights_job("download", model)

    def remove_weights(self, model: str, timeout_s: float = 120) -> str:
        """Delete a downloaded model from the cache (after the user confirmed). Returns the worker's
        result line; RuntimeError when it fails."""
        return str(self._weights_result("remove", model, timeout_s).get("message", ""))
