"""Child processes for the MAISI modules: ``maisi run REQUEST.json`` run by Slicer's Python, its
JSON-lines events read as they come, and the whole process tree killed on cancel.

What lives here: the worker's command line and environment, a ``WorkerProcess`` (own
session/process group, output read on a thread), and reading the worker's events (the protocol of
``maisicore.pipelines.runner``). What is NOT here: anything Qt. The module widgets poll
``WorkerProcess.read_lines()`` from a timer; batch scripts and tests call ``run_to_end``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
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


class WorkerProcess:
    """A child process in its own session (POSIX) / process group (Windows) whose stdout and
    stderr, merged, are read line by line on a thread (``\\r`` progress updates count as lines).

    Not thread-safe: one owner polls ``read_lines()`` and calls ``cancel()``.
    """

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None):
        self.command = [str(c) for c in command]
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # the child leads a new process group: killpg reaches its children
        self._process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, text=True, encoding="utf-8", errors="replace", **kwargs,
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
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines

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
        if os.name == "nt":
            if self.running:
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.pid)], capture_output=True, check=False,
                               creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))  # no console flashes up
            self.wait()
            return
        pgid = self.pid  # start_new_session: the child's pid is its process group id
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self.running or group_alive(pgid)):
            time.sleep(0.02)
        if self.running or group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
        self.wait()


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
