"""`maisi serve`, the warm worker, as a real process (`python -m maisicore serve`) with tiny random
weights (`maisi weights init --width tiny --nonzero-init`):

- two generate requests: the second starts warm (its first denoising step within 2 s of the worker
  reading its line, by the worker's own ``elapsed_s``; the networks loaded once), and both results
  are byte for byte what `maisi generate` writes for the same request;
- a cancel stops a long request at its next step (error 130) and the worker answers the next request;
- hostile lines (not JSON, not an object, no id, an id in use, unknown keys, a cancel of an unknown
  id, an output that names its input) each get one error event (with the id when readable) and the
  worker goes on;
- the worker exits 0 when its stdin closes, and is gone within seconds when its parent is killed.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from maisicore.io.geometry import Volume
from maisicore.io.volumes import write_volume

N = 32  # voxels per side (--allow-any-size)


class Worker:
    """A `maisi serve` process (or a command that starts one) with its events read on a thread."""

    def __init__(self, command: list[str] | None = None, cwd: Path | None = None):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(command or [sys.executable, "-m", "maisicore", "serve"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=cwd, env=env)
        self.events: queue.Queue[dict] = queue.Queue()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            self.events.put(json.loads(line))  # every stdout line is one JSON event

    def send(self, message) -> float:
        self.process.stdin.write((message if isinstance(message, str) else json.dumps(message)) + "\n")
        self.process.stdin.flush()
        return time.monotonic()

    def next_event(self, timeout: float = 300) -> dict:
        return self.events.get(timeout=timeout)

    def until(self, predicate, timeout: float = 300) -> list[dict]:
        """Events up to and including the first for which ``predicate`` is true."""
        seen, deadline = [], time.monotonic() + timeout
        while True:
            event = self.next_event(max(deadline - time.monotonic(), 0.01))
            seen.append(event)
            if predicate(event):
                return seen

    def finished(self, request_id, timeout: float = 300) -> list[dict]:
        """The events of ``request_id`` up to its result or error."""
        events = self.until(lambda e: e.get("id") == request_id and e["event"] in ("result", "error"), timeout)
        return [e for e in events if e.get("id") == request_id]

    def close(self, timeout: float = 30) -> int:
        self.process.stdin.close()
        return self.process.wait(timeout)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left for an absent init to reap does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _mask(path: Path) -> Path:
    """A 32³ MAISI label file at 4 mm: a liver ball with a tumour, inside a body."""
    i, j, k = np.meshgrid(np.arange(N), np.arange(N), np.arange(N), indexing="ij")
    labels = np.where(((i - 15.5) / 14) ** 2 + ((j - 15.5) / 12) ** 2 < 1, 200, 0).astype(np.int16)
    labels[(i - 12) ** 2 + (j - 14) ** 2 + (k - 16) ** 2 < 49] = 1
    labels[(i - 11) ** 2 + (j - 14) ** 2 + (k - 16) ** 2 < 6] = 26
    write_volume(path, Volume(labels, np.diag([4.0, 4.0, 4.0, 1.0])))
    return path


def _request(weights: Path, **fields) -> dict:
    base = {"kind": "generate", "model": "rflow-ct", "weights_dir": str(weights), "seed": 3, "steps": 2,
            "device": "cpu", "allow_any_size": True}
    return {**base, **fields}


@pytest.mark.slow
def test_a_second_request_starts_warm_matches_maisi_generate_and_survives_a_cancel(tiny_weights, tmp_path, maisi):
    weights = tiny_weights["rflow-ct"]
    mask = _mask(tmp_path / "mask.nrrd")
    worker = Worker(cwd=tmp_path)
    ready = worker.next_event(120)
    assert ready["event"] == "ready" and ready["pid"] == worker.process.pid and ready["protocol"] == 1

    # Two requests, one after the other: following a mask (ControlNet), then without one (the
    # diffusion UNet alone, the cheapest step: the warm start's own cost shows); the second finds
    # the networks loaded.
    outputs = {}
    for request_id, seed, follows in (("first", 3, mask), ("second", 4, None)):
        out = tmp_path / f"{request_id}-ct.nrrd"
        label_out = tmp_path / f"{request_id}-labels.nrrd" if follows else None
        extra = {"mask": str(follows), "label_out": str(label_out)} if follows else {"size": [N, N, N],
                                                                                    "spacing": [4.0, 4.0, 4.0]}
        worker.send(_request(weights, id=request_id, seed=seed, out=str(out), **extra))
        events = worker.finished(request_id)
        assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "result", events
        assert all(e["id"] == request_id and e["elapsed_s"] >= 0 for e in events)
        assert events[-1]["files"] == {"ct": str(out), **({"labels": str(label_out)} if follows else {})}
        assert events[-1]["seed_used"] == seed
        outputs[request_id] = (events, out, label_out, seed)

    first_events, second_events = outputs["first"][0], outputs["second"][0]
    assert first_events[0]["models_loaded"] == 0 and second_events[0]["models_loaded"] == 1
    denoise = [e for e in second_events if e["event"] == "progress" and e["stage"] == "denoise"]
    assert [(e["done"], e["total"]) for e in denoise] == [(1, 2), (2, 2)]
    warm_s = denoise[0]["elapsed_s"]  # the worker read the line → the first denoising step done
    assert warm_s <= 2.0, second_events
    cold_s = next(e for e in first_events if e["event"] == "progress")["elapsed_s"]
    print(f"first denoising step: first request {cold_s:.2f} s, second {warm_s:.2f} s after their lines were read")

    # Byte for byte what `maisi generate` writes for the same requests.
    for request_id, (_events, out, label_out, seed) in outputs.items():
        cli_out, cli_labels = tmp_path / f"cli-{request_id}-ct.nrrd", tmp_path / f"cli-{request_id}-labels.nrrd"
        source = ["--mask", mask, "--label-out", cli_labels] if label_out else ["--size", N, N, N, "--spacing", 4, 4, 4]
        result = maisi("generate", "--model", "rflow-ct", "--weights-dir", weights, *source, "--seed", seed,
                       "--steps", 2, "--device", "cpu", "--allow-any-size", "--out", cli_out)
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == cli_out.read_bytes(), request_id
        if label_out:
            assert label_out.read_bytes() == cli_labels.read_bytes(), request_id
    assert outputs["first"][1].read_bytes() != outputs["second"][1].read_bytes()

    # A long request cancelled after its first step: error 130 at the next step, nothing written.
    long_out = tmp_path / "long.nrrd"
    worker.send(_request(weights, id=7, steps=1000, size=[64, 64, 64], spacing=[4.0, 4.0, 4.0], out=str(long_out)))
    started = [e for e in worker.until(lambda e: e.get("id") == 7 and e["event"] == "progress") if e.get("id") == 7]
    sent = worker.send({"cancel": 7})
    events = started + worker.finished(7, timeout=60)  # the first step's progress event included
    assert events[-1]["event"] == "error" and events[-1]["code"] == 130, events
    assert time.monotonic() - sent < 10
    done = [e["done"] for e in events if e["event"] == "progress"]
    assert max(done) < 1000 and not long_out.exists()

    # The worker answers the next request, still warm, in the same process.
    after = tmp_path / "after.nrrd"
    worker.send(_request(weights, id="after", seed=3, mask=str(mask), out=str(after)))
    events = worker.finished("after")
    assert events[-1]["event"] == "result" and events[0]["models_loaded"] == 1
    assert after.read_bytes() == outputs["first"][1].read_bytes()  # same request as the first: same bytes
    assert worker.process.poll() is None

    # Standard input closed: the worker exits 0.
    assert worker.close() == 0


def test_hostile_lines_get_an_error_event_each_and_the_worker_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("MAISI_HOME", str(tmp_path / "home"))
    existing = tmp_path / "mask.nrrd"
    existing.write_bytes(b"not read: the paths are compared before anything is read")
    worker = Worker(cwd=tmp_path)
    assert worker.next_event(120)["event"] == "ready"
    hostile = [
        ("{not json", None, "not valid JSON"),
        ("[1, 2, 3]", None, "must be a JSON object"),
        (json.dumps({"kind": "generate"}), None, "needs an \"id\""),
        (json.dumps({"id": [1], "kind": "generate"}), None, "must be a string or an integer"),
        (json.dumps({"id": "u", "kind": "generate", "colour": "red"}), "u", "unknown key 'colour'"),
        (json.dumps({"id": "k", "kind": "paint"}), "k", "\"kind\" 'paint' must be one of"),
        (json.dumps({"cancel": "nobody"}), "nobody", "no request 'nobody' is running or waiting"),
        (json.dumps({"cancel": "x", "id": "y"}), "x", "a cancel line is"),
        (json.dumps({"id": "same", "kind": "generate", "mask": str(existing), "out": str(existing)}), "same",
         f"--out {existing} is the input --mask"),
        (json.dumps({"id": "seed", "kind": "generate", "seed": -1}), "seed", "--seed -1: must be an integer"),
        ("x" * (1 << 20 | 5), None, "longer than"),
    ]
    for line, request_id, words in hostile:
        worker.send(line)
        event = worker.next_event(30)
        assert event["event"] == "error" and event["code"] == 2, (line[:80], event)
        assert event["id"] == request_id and words in event["message"], (line[:80], event)
        assert "\n" not in event["message"]
    # The worker goes on: a request after all that is carried out (weights list: no network needed).
    worker.send({"id": "w", "kind": "weights", "action": "list"})
    events = worker.finished("w", timeout=60)
    assert [e["event"] for e in events] == ["start", "result"]
    assert {row["model"] for row in events[-1]["details"]["models"]} >= {"rflow-ct", "ddpm-ct"}
    assert worker.close() == 0
    assert existing.read_bytes().startswith(b"not read")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_worker_ends_when_its_parent_is_killed(tmp_path):
    # A parent shell that waits for the worker (the `echo` keeps bash from exec-ing it); the worker's
    # stdin stays open (this test holds it), so only the parent's death can end it.
    parent = Worker(["bash", "-c", f"{sys.executable} -m maisicore serve; echo parent-done"], cwd=tmp_path)
    ready = parent.next_event(120)
    assert ready["event"] == "ready"
    pid = ready["pid"]
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert int(stat[1]) == parent.process.pid  # the worker's parent is the shell
    parent.send({"cancel": "ping"})  # it answers: alive and reading
    assert parent.next_event(30)["id"] == "ping"

    os.kill(parent.process.pid, signal.SIGKILL)
    parent.process.wait(10)
    started = time.monotonic()
    while _alive(pid) and time.monotonic() - started < 5.0:
        time.sleep(0.05)
    assert not _alive(pid), "the worker outlived its parent by 5 s"
    print(f"worker gone {time.monotonic() - started:.2f} s after its parent was killed")
    parent.process.stdin.close()


@pytest.mark.slow
def test_a_second_model_unloads_the_first_when_both_do_not_fit(tiny_weights, tmp_path):
    """Two models: the second request's budget (``memory_budget_gb``) fits it with the first model
    unloaded, not beside it: the first is unloaded (a note says so) and the result comes; a request
    that fits with nothing else loaded either is refused in one line and unloads nothing."""
    rflow, ddpm = tiny_weights["rflow-ct"], tiny_weights["ddpm-ct"]
    grid = {"size": [N, N, N], "spacing": [4.0, 4.0, 4.0], "steps": 1}
    worker = Worker(cwd=tmp_path)
    assert worker.next_event(120)["event"] == "ready"
    worker.send(_request(rflow, id="a", out=str(tmp_path / "a.nrrd"), **grid))
    assert worker.finished("a")[-1]["event"] == "result"

    second = _request(ddpm, model="ddpm-ct", out=str(tmp_path / "b.nrrd"), **grid)
    worker.send({**second, "id": "estimate", "dry_run": True})
    events = worker.finished("estimate")
    assert events[-1]["event"] == "result" and events[0]["models_loaded"] == 1, events
    peak = events[-1]["details"]["memory"]["peak_bytes"]  # with the first model loaded beside it
    first_bytes = sum(path.stat().st_size for path in (rflow / "models").glob("*.pt"))
    budget_gb = (peak - first_bytes / 2) / 2**30  # fits only with the first model's weights freed
    worker.send({**second, "id": "b", "memory_budget_gb": budget_gb})
    events = worker.finished("b")
    assert events[-1]["event"] == "result", events
    assert events[0]["models_loaded"] == 1
    assert any(e["event"] == "note" and e["message"].startswith("unloaded rflow-ct/tiny from") for e in events), events

    # Too large even alone (the first model again, within 0.3 GiB): refused, the loaded model stays.
    worker.send(_request(rflow, id="huge", out=str(tmp_path / "huge.nrrd"), memory_budget_gb=0.3, **grid))
    events = worker.finished("huge")
    assert events[-1]["event"] == "error" and events[-1]["code"] == 2
    assert "more than the 0.3 GiB budget even with the 1 other loaded model(s) unloaded" in events[-1]["message"], events
    worker.send({**second, "id": "again"})
    events = worker.finished("again")
    assert events[-1]["event"] == "result" and events[0]["models_loaded"] == 1  # ddpm-ct only: rflow-ct was unloaded
    assert not any(e["event"] == "note" and e["message"].startswith("unloaded") for e in events)
    assert worker.close() == 0
