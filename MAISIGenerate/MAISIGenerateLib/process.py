"""Child processes for the MAISI modules: ``maisi run REQUEST.json`` run by Slicer's Python, its
JSON-lines events read as they come, and the whole process tree killed on cancel; and a warm
``maisi serve`` worker kept between runs (``ServeWorker``), whose runs (``ServeRun``) are read and
cancelled like a ``WorkerProcess``.

What lives here: the worker's command line and environment, a ``WorkerProcess`` (own
session/process group, output read on a thread), a ``ServeWorker`` and reading the worker's events
(the protocol of ``maisicore.pipelines.runner`` and ``maisicore.pipelines.serve``). What is NOT
here: anything Qt. The module widgets poll ``read_lines()`` from a timer; batch scripts and tests
call ``run_to_end``.
"""

from __future__ import annotations

import atexit
import importlib.util
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path


def parse_event(line: str) -> dict | None:
    """The event of one output line of ``maisi run`` (a JSON object with an ``"event"``), else None
    (other output, e.g. a library's warning on stderr)."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def worker_python() -> list[str]:
    """The Python that runs the worker: ``PythonSlicer`` inside Slicer (Slicer's own environment,
    where torch and MONAI are installed), else this interpreter (headless, tests)."""
    import slicer

    if hasattr(slicer, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return [found]
    return [sys.executable]


def maisicore_parent() -> Path:
    """Folder that holds the ``maisicore`` package (found without importing it, so torch is not
    loaded in Slicer's process just to start a worker)."""
    spec = importlib.util.find_spec("maisicore")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the maisicore package is not installed; reinstall the MAISI extension")
    return Path(next(iter(spec.submodule_search_locations))).parent


def worker_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a worker: unbuffered output, ``maisicore`` importable, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    paths = [str(maisicore_parent())] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra or {})
    return env


def run_command(python: Sequence[str], request_file: str | os.PathLike) -> list[str]:
    """The worker's command: ``python -m maisicore run REQUEST.json`` (JSON-lines events on stdout)."""
    return [*python, "-m", "maisicore", "run", str(request_file)]


def serve_command(python: Sequence[str]) -> list[str]:
    """The warm worker's command: ``python -m maisicore serve`` (JSON-lines requests on stdin)."""
    return [*python, "-m", "maisicore", "serve"]


def _popen_group_kwargs() -> dict:
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    return {"start_new_session": True}  # the child leads a new process group: killpg reaches its children


def _kill_tree(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the process group, SIGKILL after ``grace_s`` seconds to whatever is left (Windows:
    ``taskkill /T /F``); returns once the child is reaped."""
    if os.name == "nt":
        if process.poll() is None:
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True, check=False,
                           creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))  # no console flashes up
        process.wait()
        return
    pgid = process.pid  # start_new_session: the child's pid is its process group id
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (process.poll() is None or group_alive(pgid)):
        time.sleep(0.02)
    if process.poll() is None or group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)
    process.wait()


def drain(lines: queue.Queue) -> list[str]:
    """Everything ``lines`` holds now, in order (never blocks)."""
    out = []
    while True:
        try:
            out.append(lines.get_nowait())
        except queue.Empty:
            return out


class WorkerProcess:
    """A child process in its own session (POSIX) / process group (Windows) whose stdout and
    stderr, merged, are read line by line on a thread (``\\r`` progress updates count as lines).

    Not thread-safe: one owner polls ``read_lines()`` and calls ``cancel()``.
    """

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None):
        self.command = [str(c) for c in command]
        self._process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, text=True, encoding="utf-8", errors="replace", **_popen_group_kwargs(),
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="maisi-worker-output", daemon=True)
        self._reader.start()
        self.cancelled = False

    def _read(self) -> None:
        for line in self._process.stdout:  # universal newlines: "\r" ends a line too
            line = line.rstrip("\n")
            if line.strip():
                self._lines.put(line)
        self._process.stdout.close()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once finished (``poll``), else None."""
        return self._process.poll()

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def read_lines(self) -> list[str]:
        """Output lines that arrived since the last call (never blocks)."""
        return drain(self._lines)

    def finished_reading(self) -> bool:
        """True when the process has exited and all its output has been read by the thread."""
        return not self.running and not self._reader.is_alive()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit (and the last output), return the exit status."""
        code = self._process.wait(timeout)
        self._reader.join(timeout=5)
        return code

    def cancel(self, grace_s: float = 1.0) -> None:
        """Kill the whole process tree: SIGTERM to the process group, SIGKILL after ``grace_s``
        seconds to whatever is left (Windows: ``taskkill /T /F``); returns once the child is reaped."""
        self.cancelled = True
        _kill_tree(self._process, grace_s)
        self.wait()


CANCEL_GRACE_S = 5.0  # a cancelled run must answer within this, or twice its longest step so far
CLOSE_GRACE_S = 5.0  # after its stdin closes, the worker must exit within this


class ServeRun:
    """One request run by a ``ServeWorker``, read and cancelled like a ``WorkerProcess``:
    ``read_lines()`` gives the run's output lines (its events, and lines the worker printed while it
    ran), ``finished_reading()`` is true once its ``result`` or ``error`` event came (or the worker
    ended), ``returncode`` is then 0 (result), the error's code, or the worker's exit status.

    ``cancel()`` sends a cancel line and waits for the run's answer; only a worker that does not
    answer within the grace period is killed (the next run then starts a new worker)."""

    def __init__(self, worker: ServeWorker, request_id: str):
        self.worker, self.id = worker, request_id
        self._lines: queue.Queue[str] = queue.Queue()
        self._finished = threading.Event()
        self._code: int | None = None
        self.cancelled = False
        self.cancel_sent: float | None = None  # monotonic time of the cancel line
        self.killed = False  # the worker had to be killed to stop this run
        self._last_progress: float | None = None
        self.longest_step_s = 0.0

    @property
    def pid(self) -> int:
        return self.worker.pid

    @property
    def returncode(self) -> int | None:
        return self._code if self._finished.is_set() else None

    @property
    def running(self) -> bool:
        return not self._finished.is_set()

    def _put(self, line: str, event: dict | None) -> None:
        if event is not None and event.get("event") == "progress":
            now = time.monotonic()
            if self._last_progress is not None:
                self.longest_step_s = max(self.longest_step_s, now - self._last_progress)
            self._last_progress = now
        self._lines.put(line)

    def _finish(self, code: int) -> None:
        if not self._finished.is_set():
            self._code = int(code)
            self._finished.set()

    def read_lines(self) -> list[str]:
        """Output lines that arrived since the last call (never blocks)."""
        return drain(self._lines)

    def finished_reading(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the run's last event and return its code (``TimeoutError`` after ``timeout``)."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"run {self.id} still running after {timeout:g} s")
        return int(self._code)

    def grace_s(self) -> float:
        """How long a cancelled run may take to answer: the cancel is read between denoising steps."""
        return max(CANCEL_GRACE_S, 2.0 * self.longest_step_s)

    def request_cancel(self) -> None:
        """Ask the worker to stop this run at its next step; returns at once."""
        if self.cancelled:
            return
        self.cancelled = True
        self.cancel_sent = time.monotonic()
        if self.running:
            self.worker.send({"cancel": self.id})

    @property
    def cancel_overdue(self) -> bool:
        """Cancelled, still running, and past its grace period."""
        return (self.cancel_sent is not None and self.running
                and time.monotonic() - self.cancel_sent > self.grace_s())

    def cancel(self, grace_s: float | None = None) -> None:
        """Stop the run: a cancel line, then wait for its answer; kill the worker's process tree
        only when it has not answered after ``grace_s`` (default ``grace_s()``)."""
        self.request_cancel()
        try:
            self.wait(self.grace_s() if grace_s is None else grace_s)
        except TimeoutError:
            self.killed = True
            self.worker.kill()
            self.wait(5)


class ServeWorker:
    """A warm ``maisi serve`` worker (own session/process group) kept between runs: ``submit`` sends
    a request and returns its ``ServeRun``; events are routed to runs by their id on a reader
    thread. ``close()`` closes its stdin (it exits), ``kill()`` kills the process tree. Workers
    still alive when this interpreter exits are closed; the worker also ends by itself when this
    process dies (``maisicore.pipelines.serve``)."""

    def __init__(self, python: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None):
        self.command = serve_command([str(c) for c in python])
        self._process = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **_popen_group_kwargs(),
        )
        self._lock = threading.Lock()
        self._runs: dict[str, ServeRun] = {}
        self._current: ServeRun | None = None  # the run whose start came last: it gets stray lines
        self._ids = itertools.count(1)
        self.ready: dict | None = None  # the worker's ready event (pid, version, protocol)
        self.log: list[str] = []  # lines that belong to no run (the worker's own messages)
        self._reader = threading.Thread(target=self._read, name="maisi-serve-output", daemon=True)
        self._reader.start()
        _LIVE_WORKERS.add(self)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.poll() is None and self._reader.is_alive()

    @property
    def returncode(self) -> int | None:
        return self._process.poll()

    def _read(self) -> None:
        for line in self._process.stdout:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            event = parse_event(line)
            with self._lock:
                if event is not None and event.get("event") == "ready" and "id" not in event:
                    self.ready = event
                    continue
                run = self._runs.get(str(event.get("id"))) if event is not None and event.get("id") is not None else None
                if run is None and event is None:
                    run = self._current
                if run is None:
                    self.log.append(line)
                    continue
                if event is not None and event.get("event") == "start":
                    self._current = run
                run._put(line, event)
                if event is not None and event.get("event") in ("result", "error"):
                    run._finish(0 if event["event"] == "result" else int(event.get("code", 1)))
                    self._runs.pop(run.id, None)
                    if self._current is run:
                        self._current = None
        self._process.stdout.close()
        code = self._process.wait()
        with self._lock:
            runs, self._runs = list(self._runs.values()), {}
        for run in runs:  # the worker ended under them
            run._put(f"the maisi worker ended (exit code {code}) before the run finished", None)
            run._finish(code if code else 1)

    def send(self, message: dict) -> bool:
        """Write one JSON line to the worker; False when it is gone."""
        try:
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def submit(self, request) -> ServeRun:
        """Send ``request`` (a ``maisicore.pipelines.requests`` request) and return its run."""
        run = ServeRun(self, f"{os.getpid()}-{next(self._ids)}")
        with self._lock:
            self._runs[run.id] = run
        if not self.send({"id": run.id, **request.to_dict()}):
            with self._lock:
                self._runs.pop(run.id, None)
            run._put("the maisi worker is not running", None)
            run._finish(self.returncode or 1)
        return run

    def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """End the worker: close its stdin (it cancels what runs and exits); kill it after ``grace_s``."""
        _LIVE_WORKERS.discard(self)
        try:
            self._process.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            self._process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reader.join(timeout=5)

    def kill(self, grace_s: float = 1.0) -> None:
        """Kill the worker's whole process tree (its runs finish with its exit status)."""
        _LIVE_WORKERS.discard(self)
        _kill_tree(self._process, grace_s)
        self._reader.join(timeout=5)


_LIVE_WORKERS: weakref.WeakSet[ServeWorker] = weakref.WeakSet()


@atexit.register
def _close_live_workers() -> None:
    for worker in list(_LIVE_WORKERS):
        worker.close(grace_s=2.0)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process of process group ``pgid`` is left (POSIX).

    Linux: read from /proc, so orphaned zombies that nobody reaps (containers without an init)
    do not count; elsewhere ``killpg(pgid, 0)``."""
    proc = Path("/proc")
    if sys.platform.startswith("linux") and proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()  # state, ppid, pgrp, ...
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_to_end(
    worker: WorkerProcess,
    on_event: Callable[[dict], None] | None = None,
    log: Callable[[str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    poll_s: float = 0.05,
) -> int:
    """Block until ``worker`` ends, passing each event to ``on_event`` and every other output line to
    ``log``; cancel (kill the tree) as soon as ``should_cancel()`` is true. Returns the exit status."""
    while True:
        done = worker.finished_reading()
        for line in worker.read_lines():
            event = parse_event(line)
            if event is not None:
                if on_event is not None:
                    on_event(event)
            elif log is not None:
                log(line)
        if done:
            return worker.wait()
        if should_cancel is not None and should_cancel():
            worker.cancel()
            return worker.wait()
        time.sleep(poll_s)
