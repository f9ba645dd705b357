"""``maisi serve``: a warm worker that keeps its networks loaded between requests.

Standard input is read line by line (JSON lines), standard output answers with events (JSON lines):

- a request line is a ``maisi run`` request plus an ``"id"`` (a string or an integer, unique among
  the requests waiting or running): ``{"id": "a1", "kind": "generate", "model": "rflow-ct", ...}``;
- a cancel line is ``{"cancel": ID}``: the running request stops at its next step (its ``error``
  event with code 130 follows), a waiting one is dropped (its ``error`` event at once);
- every event of a request carries its ``"id"`` and ``"elapsed_s"`` (seconds since the worker read
  the request's line): the runner's ``start``, ``info``, ``note``, ``progress``, ``result`` and
  ``error`` (``pipelines.runner``); the worker's own first event is ``{"event": "ready", "pid",
  "version", "protocol"}`` (sent once torch is imported); a request's ``start`` adds ``waited_s``
  (time spent behind other requests) and ``models_loaded`` (networks kept loaded when it starts);
- a line the worker cannot take (not JSON, not an object, no id, an id in use, unknown keys, a
  request that fails its one-line checks such as an output that names an input, a cancel of an
  unknown id) gets an ``error`` event (code 2, with the id when one was readable) and the worker
  reads on.

Requests run one at a time, in the order they came. The loaded networks are kept, keyed by model
(preset and width), weight folder (and its checkpoint files' sizes and times: new weights are
loaded again), device and attention (``reference_numerics``: MONAI's own attention); the precision
is applied per call. Before a model is loaded, or a generation is admitted
(``pipelines.admission``), the least recently used other models are unloaded until the request
fits: the worker keeps at most the models that fit.

The worker ends when standard input closes (the running request is cancelled; exit 0), on SIGTERM
or SIGINT (exit 130), and when its parent process dies (Linux: ``PR_SET_PDEATHSIG``; everywhere: a
watchdog on the parent's pid), so a crashed Slicer leaves no worker behind.
"""

from __future__ import annotations

import gc
import io
import json
import os
import queue
import signal
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, TextIO

from ..errors import Cancelled, InputError
from .runner import EventReport, attention_for

SERVE_PROTOCOL = 1
MAX_LINE_CHARS = 1 << 20  # a request is a few hundred characters; a longer line is refused unread
MAX_ID_CHARS = 200
PARENT_POLL_S = 0.5
PARENT_GONE_GRACE_S = 5.0  # after SIGTERM to itself, the watchdog ends the process outright


class Output:
    """JSON lines on ``stream``, one writer at a time (the request loop and the reader thread both
    write). A closed stream (the parent went away) is remembered, later writes are dropped."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.lock = threading.Lock()
        self.closed = False

    def emit(self, event: str, **fields) -> None:
        line = json.dumps({"event": event, **fields}, default=str) + "\n"
        with self.lock:
            if self.closed:
                return
            try:
                self.stream.write(line)
                self.stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                self.closed = True


class ServeReport(EventReport):
    """The runner's events for one request, each with the request's ``id`` and ``elapsed_s``."""

    def __init__(self, output: Output, request_id, received: float):
        super().__init__(None)
        self.output, self.request_id, self.received = output, request_id, received

    def emit(self, event: str, **fields) -> None:
        self.output.emit(event, id=self.request_id, elapsed_s=round(time.monotonic() - self.received, 4), **fields)


# ---- the loaded networks ---------------------------------------------------------------------------


def _stamps(preset, weights_dir: Path) -> tuple:
    """(name, size, mtime) of the preset's checkpoint files: a new training run's weights in the
    same folder are loaded again."""
    from ..models.weights import check_weight_files

    stamps = []
    for path in check_weight_files(preset, weights_dir).values():
        stat = path.stat()
        stamps.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(stamps))


class ModelCache:
    """Loaded networks by (preset key, weight folder, device, attention), least recently used first.
    ``log`` receives a line when a model is unloaded to make room."""

    def __init__(self, log: Callable[[str], None] | None = None):
        self._models: OrderedDict[tuple, tuple[tuple, object, int]] = OrderedDict()  # key → (stamps, model, bytes)
        self.log = log

    @staticmethod
    def key(preset, weights_dir, device, attention: str) -> tuple:
        return (preset.key, str(Path(weights_dir).resolve()), str(device), attention)

    def loaded(self) -> list[tuple]:
        """The keys of the loaded models, least recently used first."""
        return list(self._models)

    def held_bytes(self, key: tuple) -> int:
        """The checkpoint bytes of ``key``'s loaded model (0 when not loaded)."""
        entry = self._models.get(key)
        return entry[2] if entry else 0

    def evict(self, key: tuple, why: str = "to make room") -> None:
        if self._models.pop(key, None) is None:
            return
        gc.collect()
        if key[2].startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        if self.log:
            self.log(f"unloaded {key[0]} from {key[1]} ({key[2]}) {why}")

    def clear(self) -> None:
        for key in list(self._models):
            self.evict(key, "to free memory")

    def _oldest_other(self, key: tuple) -> tuple | None:
        return next((k for k in self._models if k != key), None)

    def _drop_stale(self, key: tuple, stamps: tuple) -> None:
        entry = self._models.get(key)
        if entry is not None and entry[0] != stamps:
            self.evict(key, "(its weight files changed)")

    def _victims(self, key: tuple, excess: int) -> list[tuple] | None:
        """The least recently used other models whose weights free at least ``excess`` bytes (none
        when ``excess`` <= 0), or None when unloading them all would not."""
        victims, freed = [], 0
        for other in self._models:
            if freed >= excess:
                break
            if other != key:
                victims.append(other)
                freed += self.held_bytes(other)
        return victims if freed >= excess else None

    def make_room(self, preset, weights_dir, device) -> None:
        """Unload the least recently used models when loading ``preset`` (its checkpoints are held
        twice while loading) would not fit in what the device has free; when unloading them all would
        not make it fit, nothing is unloaded (the load itself reports the failure)."""
        from .admission import LOAD_OVERHEAD_BYTES, _resident_bytes, _weights_bytes, default_budget_bytes

        weights, loading = _weights_bytes(preset, Path(weights_dir))
        free = default_budget_bytes(device.type) - (_resident_bytes() if device.type != "cuda" else 0)
        for victim in self._victims(self.key(preset, weights_dir, device, ""), weights + loading + LOAD_OVERHEAD_BYTES - free) or ():
            self.evict(victim)

    def model(self, preset, weights_dir, device, attention: str = "sdpa"):
        """The loaded networks (``models.weights.LoadedModel``), loaded on first use."""
        from ..models.weights import load_model

        key = self.key(preset, weights_dir, device, attention)
        stamps = _stamps(preset, Path(weights_dir))
        self._drop_stale(key, stamps)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key][1]
        self.make_room(preset, weights_dir, device)
        loaded = load_model(preset, weights_dir, device, attention=attention)
        self._models[key] = (stamps, loaded, sum(s[1] for s in stamps))
        return loaded

    def admit(self, prepared, device, precision=None):
        """Admission control for a generation (``pipelines.admission``) with the loaded models: this
        request's model, when loaded, counts once (its weights are in what the process holds); when
        the request does not fit, the least recently used other models are unloaded, as few as make
        it fit (their checkpoint bytes count as freed). One-line ``InputError``, nothing unloaded,
        when it would not fit with every other model unloaded."""
        from .admission import GiB, default_budget_bytes, estimate_generation_memory

        request = prepared.request
        key = self.key(prepared.preset, prepared.weights_dir, device, attention_for(request))
        self._drop_stale(key, _stamps(prepared.preset, Path(prepared.weights_dir)))
        budget = int(request.memory_budget_gb * GiB) if request.memory_budget_gb else default_budget_bytes(device.type)
        held = self.held_bytes(key)
        estimate = estimate_generation_memory(prepared, device.type, budget + held, precision=precision)
        estimate.budget_bytes = budget
        estimate.peak_bytes -= held
        if held:
            estimate.parts["weights"] = estimate.parts["loading"] = 0  # loaded already: in the baseline
        victims = self._victims(key, estimate.peak_bytes - budget)
        if victims is None:
            size = "×".join(map(str, prepared.plan.size))
            others = len(self._models) - (1 if held else 0)
            unloading = f" even with the {others} other loaded model(s) unloaded" if others else ""
            raise InputError(
                f"{size} voxels need an estimated {estimate.peak_bytes / GiB:.1f} GiB at the {estimate.peak_phase} "
                f"peak on {estimate.device}, more than the {budget / GiB:.1f} GiB budget{unloading}; ask for a smaller "
                "--size, use another device (--device cuda), or raise --memory-budget")
        for victim in victims:
            estimate.peak_bytes -= self.held_bytes(victim)
            self.evict(victim)
        return estimate


# ---- the loop ----------------------------------------------------------------------------------------


def _check_id(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"\"id\" {value!r}: must be a string or an integer")
    if isinstance(value, str) and not 0 < len(value) <= MAX_ID_CHARS:
        raise InputError(f"\"id\": a string of 1 to {MAX_ID_CHARS} characters")


def _readable_id(value):
    """``value`` when it can be an id (to answer with), else None."""
    try:
        _check_id(value)
    except InputError:
        return None
    return value


class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.queue: queue.Queue = queue.Queue()
        self.waiting: dict = {}  # id → received (monotonic s)
        self.running = None  # the id of the running request
        self.cancel = threading.Event()
        self.ended = False


def _read_line(stream) -> str | None:
    """The next line (without its end), None at the end of the stream; a line over
    ``MAX_LINE_CHARS`` is read to its end and returned as ``"\\0"`` (refused by the caller)."""
    line = stream.readline(MAX_LINE_CHARS + 1)
    if not line:
        return None
    if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
        while True:
            rest = stream.readline(MAX_LINE_CHARS)
            if not rest or rest.endswith("\n"):
                return "\0"
    return line.rstrip("\r\n")


def _take_line(line: str, number: int, state: _State, output: Output) -> None:
    """One input line: a cancel, or a request checked and queued; anything else an error event."""
    from .requests import request_from_dict
    from .safety import check_output_paths

    received = time.monotonic()
    where = f"line {number}"
    if line == "\0":
        output.emit("error", id=None, code=2, message=f"{where}: longer than {MAX_LINE_CHARS} characters; refused")
        return
    try:
        data = json.loads(line)
    except ValueError as exc:
        output.emit("error", id=None, code=2, message=f"{where}: not valid JSON ({exc})")
        return
    if not isinstance(data, dict):
        output.emit("error", id=None, code=2, message=f"{where}: must be a JSON object (a request with \"id\", or "
                                                        "{\"cancel\": ID})")
        return
    if "cancel" in data:
        target = _readable_id(data["cancel"])
        if set(data) != {"cancel"} or target is None:
            output.emit("error", id=target, code=2, message=f"{where}: a cancel line is {{\"cancel\": ID}} with the "
                                                             "id of a request (a string or an integer), nothing else")
            return
        with state.lock:
            if state.running == target:
                state.cancel.set()  # the request's own error event (130) follows at its next step
                return
            if target in state.waiting:
                waited = state.waiting.pop(target)
                output.emit("error", id=target, elapsed_s=round(time.monotonic() - waited, 4), code=130,
                            message="cancelled before it started; nothing was written")
                return
        output.emit("error", id=target, code=2, message=f"cancel: no request {target!r} is running or waiting")
        return
    if "id" not in data:
        output.emit("error", id=None, code=2, message=f"{where}: a request needs an \"id\" (a string or an integer) "
                                                        "that its events will carry")
        return
    request_id = data.pop("id")
    try:
        _check_id(request_id)
    except InputError as exc:
        output.emit("error", id=None, code=2, message=f"{where}: {exc}")
        return
    with state.lock:
        in_use = request_id == state.running or request_id in state.waiting
    if in_use:
        output.emit("error", id=request_id, code=2, message=f"{where}: id {request_id!r} is in use by a request "
                                                              "running or waiting; give each request its own id")
        return
    try:
        request = request_from_dict(data, f"request {request_id!r}")
        request.check()
        check_output_paths(request)  # an output that names an input: refused before it waits
    except InputError as exc:
        output.emit("error", id=request_id, elapsed_s=round(time.monotonic() - received, 4), code=2, message=str(exc))
        return
    with state.lock:
        if state.ended:
            return
        state.waiting[request_id] = received
        state.queue.put((request_id, request, received))


def _read_input(stream, state: _State, output: Output) -> None:
    """The reader thread: every line of ``stream``; at its end the running request is cancelled,
    the waiting ones are dropped and the loop is told to end."""
    number = 0
    try:
        while True:
            line = _read_line(stream)
            if line is None:
                break
            number += 1
            if line.strip():
                _take_line(line, number, state, output)
    except Exception as exc:  # an unreadable stream ends the worker as its end would
        output.emit("error", id=None, code=1, message=f"reading standard input: {type(exc).__name__}: {exc}")
    _end(state, output, "standard input closed")


def _end(state: _State, output: Output, why: str) -> None:
    with state.lock:
        if state.ended:
            return
        state.ended = True
        state.cancel.set()
        for request_id, received in state.waiting.items():
            output.emit("error", id=request_id, elapsed_s=round(time.monotonic() - received, 4), code=130,
                        message=f"cancelled before it started ({why}); nothing was written")
        state.waiting.clear()
    state.queue.put(None)


def _run_one(request_id, request, received: float, state: _State, output: Output, models: ModelCache) -> None:
    from .. import __version__
    from .runner import run_request

    report = ServeReport(output, request_id, received)
    models.log = report.note
    report.emit("start", kind=request.kind, version=__version__, protocol=SERVE_PROTOCOL,
                waited_s=round(time.monotonic() - received, 4), models_loaded=len(models.loaded()))
    try:
        run_request(request, report, cancel=state.cancel.is_set, models=models)
    except InputError as exc:
        report.emit("error", code=2, message=str(exc))
    except Cancelled:
        report.emit("error", code=130, message="cancelled; nothing was written")
    except KeyboardInterrupt:
        report.emit("error", code=130, message="cancelled (the worker was stopped); nothing was written")
        raise
    except Exception as exc:  # the worker stays usable; a failure for want of memory frees the loaded models
        report.emit("error", code=1, message=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
            models.clear()


def serve(stdin: TextIO, stdout: TextIO, watch_parent: bool = True) -> int:
    """Run the worker on ``stdin``/``stdout`` until ``stdin`` ends (returns 0); see the module
    docstring for the protocol."""
    output = Output(stdout)
    state = _State()
    models = ModelCache()
    if watch_parent:
        watch_parent_process()
    reader = threading.Thread(target=_read_input, args=(stdin, state, output), name="maisi-serve-input", daemon=True)
    reader.start()
    from .. import __version__
    from . import generate  # noqa: F401  (torch and MONAI imported before "ready": the first request is warm)

    output.emit("ready", pid=os.getpid(), version=__version__, protocol=SERVE_PROTOCOL)
    while True:
        try:
            item = state.queue.get(timeout=1.0)  # a timeout keeps SIGTERM/SIGINT deliverable
        except queue.Empty:
            if output.closed:
                _end(state, output, "standard output closed")
            continue
        if item is None:
            return 0
        request_id, request, received = item
        with state.lock:
            if request_id not in state.waiting:  # cancelled while waiting
                continue
            del state.waiting[request_id]
            state.running = request_id
            if not state.ended:
                state.cancel.clear()
        try:
            _run_one(request_id, request, received, state, output, models)
        finally:
            with state.lock:
                state.running = None
        if output.closed:
            _end(state, output, "standard output closed")


def watch_parent_process(interval_s: float = PARENT_POLL_S) -> None:
    """End this process when its parent dies: Linux sends SIGTERM (``PR_SET_PDEATHSIG``); everywhere
    a thread notices the parent's pid change, sends SIGTERM to this process and, if it is still
    running ``PARENT_GONE_GRACE_S`` later, ends it outright."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(PARENT_GONE_GRACE_S)
        os._exit(137)

    threading.Thread(target=watch, name="maisi-serve-parent", daemon=True).start()


def serve_main() -> int:
    """``maisi serve``: events on the process's standard output, which is kept for them alone (fd 1
    then points at stderr, so a library's stray print cannot break a JSON line)."""
    events = io.TextIOWrapper(os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0), encoding="utf-8",
                              line_buffering=True, write_through=True)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline=None)
    return serve(stdin, events)
