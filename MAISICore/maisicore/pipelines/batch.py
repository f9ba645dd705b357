"""Batches: many cases from a manifest, resumable, on local processes, torchrun or Ray.

``maisi batch MANIFEST --out DIR``. The manifest is JSON lines (or CSV with a header row) of requests
in the request format (``maisicore.pipelines.requests``: ``{"kind": "generate" | "inpaint", ...}``,
``kind`` defaults to generate) plus two batch fields: ``count`` (copies of the line, default 1) and
``id`` (the case name stem, default ``itemNNNN`` from the line number). Paths are relative to the
manifest's folder. Outputs (``out``, ``label_out``, ``preview``, ``format``) and ``device`` are chosen
by the batch and refused in a line. ``prepare_batch`` checks the whole batch before any work: every
line prepared as its worker would (inputs read and checked, memory admission), every input of every
line and the manifest against every file the batch writes (one-line ``InputError``, nothing written).

Every case has a stable id ``ID-CCC`` (CCC: copy number) and a seed derived from (the line's ``seed``
or ``--seed``, line index, copy number), so its bytes do not depend on how many workers ran or in
which order. One code path: ``BatchWorker.run(item)`` loads each model once per worker, runs the
item, writes its files (temporary file + rename) and appends its record to ``DIR/status.jsonl``
(``started``, then ``done`` / ``failed`` / ``rejected``; one JSON line each, flushed and fsynced). The
backends only hand out items: ``--workers N`` local processes, ``torchrun`` ranks (one device each,
items claimed from the rendezvous store), or Ray actors (``--backend ray``). Rerunning the same
command skips finished items (record done, same fingerprint, files present), redoes the rest (failed
ones included; each run gives an item 1 + ``--retries`` attempts); a SIGKILL loses only the items in flight.

Units: seconds in timings; HU in images.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import Cancelled, InputError
from .batch_layouts import Layout, parse_label_set
from .requests import MAX_SEED, GenerateRequest, InpaintRequest, request_from_dict
from .runner import Report

STATUS = "status.jsonl"
SUMMARY = "summary.json"
MONTAGE = "montage.png"
BACKENDS = ("local", "ray")  # torchrun: started by torchrun (WORLD_SIZE in the environment)
BATCH_KINDS = ("generate", "inpaint")
BATCH_FIELDS = ("count", "id")
CHOSEN_BY_BATCH = ("out", "label_out", "preview", "format", "dry_run", "device")
PATH_FIELDS = ("mask", "mask_db", "mask_dir", "weights_dir", "image", "tumor_mask", "labels")
MONTAGE_CASES = 4
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def item_seed(base: int, index: int, copy: int) -> int:
    """The seed of copy ``copy`` of manifest line ``index`` (both from 0): 63 bits of
    sha256("base:index:copy"), independent of workers and order."""
    digest = hashlib.sha256(f"maisi-batch:{base}:{index}:{copy}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % MAX_SEED


@dataclass(frozen=True)
class BatchItem:
    """One case: its id, where it comes from (line index, copy), its seed and its request as JSON
    data (``kind`` and fields; no outputs, no device)."""

    id: str
    index: int
    copy: int
    seed: int
    request: dict
    line: int = field(default=0, compare=False)  # its number in the manifest file (for messages)

    def build(self, device: str, out: Path | None = None, label_out: Path | None = None):
        """The request to run, with this worker's device and the outputs."""
        data = dict(self.request, seed=self.seed, device=device)
        if out is not None:
            data["out"] = str(out)
        if label_out is not None:
            data["label_out"] = str(label_out)
        return request_from_dict(data, where=f"item {self.id}")

    @property
    def labelled(self) -> bool:
        """Whether the case has labels (inpainting, or generation from a mask, anatomy or anatomy sizes)."""
        return self.request["kind"] == "inpaint" or bool(self.request.get("mask") or self.request.get("anatomy")
                                                          or self.request.get("anatomy_size"))

    def fingerprint(self, layout: Layout, qc_retries: int) -> str:
        """Changes when anything that makes the item's bytes changes (request, seed, layout, QC)."""
        text = json.dumps({"request": self.request, "seed": self.seed, "layout": layout.key, "qc": qc_retries},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- the manifest --------------------------------------------------------------------------------


def _csv_value(cls, name: str, text: str, where: str):
    """A CSV cell as the request field's JSON type: lists split on spaces (``anatomy``/``body_region``
    on ``;``), numbers and true/false parsed; a cell starting with ``[`` is read as JSON."""
    text = text.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise InputError(f"{where}: {name!r} is not a JSON list ({exc})") from exc
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    kind = {"count": "int"}.get(name, fields.get(name, "str"))
    try:
        if kind.startswith("list[str]"):
            return [v.strip() for v in text.split(";") if v.strip()]
        if kind.startswith("list[int]"):
            return [int(v) for v in text.split()]
        if kind.startswith("list[float]"):
            return [float(v) for v in text.split()]
        if kind.startswith("bool"):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError as exc:
        raise InputError(f"{where}: {name!r} value {text!r} is not a {kind.split(' ')[0]}") from exc
    return text


def _manifest_rows(path: Path) -> list[tuple[int, str, dict]]:
    """(line number, where, row) for each request line of a JSON-lines or CSV manifest; a CSV row
    with more or fewer cells than the header is refused (``csv.DictReader`` would drop or blank them)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"manifest {path}: cannot be read ({exc.strerror or exc})") from exc
    rows = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        for row in reader:
            number = reader.line_num
            where = f"{path} line {number}"
            if None in row or None in row.values():
                cells = len(reader.fieldnames) + len(row.get(None) or ()) - sum(v is None for v in row.values())
                raise InputError(f"{where}: {cells} cells but the header has {len(reader.fieldnames)}; give every "
                                 "row one cell per header column (empty cells for fields left out)")
            kind = (row.get("kind") or "generate").strip()
            cls = {"generate": GenerateRequest, "inpaint": InpaintRequest}.get(kind, GenerateRequest)
            rows.append((number, where, {k.strip(): _csv_value(cls, k.strip(), v, where)
                                         for k, v in row.items() if k and v.strip()}))
        return rows
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path} line {number}"
        try:
            rows.append((number, where, json.loads(line)))
        except ValueError as exc:
            raise InputError(f"{where}: not valid JSON ({exc}); the manifest is one JSON object per line") from exc
    return rows


def read_manifest(path: str | os.PathLike, base_seed: int = 0, precision: str = "auto") -> list[BatchItem]:
    """The items of a manifest, checked (one-line ``InputError`` naming the line; nothing read but
    the manifest and the existence of its input files). ``precision`` (``--precision``): the
    ``precision`` of lines without their own."""
    from ..precision import check_precision
    from .requests import _check_seed

    _check_seed(base_seed, "--seed")
    check_precision(precision)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path}: file not found")
    items: list[BatchItem] = []
    seen: dict[str, str] = {}
    rows = _manifest_rows(path)
    if not rows:
        raise InputError(f"manifest {path}: no requests in it (one JSON object per line, or CSV with a header)")
    for index, (number, where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"{where}: must be a JSON object (a request with a \"kind\")")
        data = dict(row)
        count = data.pop("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100000:
            raise InputError(f"{where}: \"count\" {count!r} must be a whole number from 1 to 100000")
        line_id = str(data.pop("id", f"item{index:04d}"))
        if not ID_PATTERN.match(line_id):
            raise InputError(f"{where}: \"id\" {line_id!r}: use letters, digits, '-', '_' or '.', at most 64")
        if line_id in seen:
            raise InputError(f"{where}: \"id\" {line_id!r} is already used by {seen[line_id]}; ids must be unique")
        seen[line_id] = where
        data.setdefault("kind", "generate")
        if data["kind"] not in BATCH_KINDS:
            raise InputError(f"{where}: \"kind\" {data['kind']!r}: a batch runs {' or '.join(BATCH_KINDS)} requests")
        chosen = [k for k in CHOSEN_BY_BATCH if k in data]
        if chosen:
            raise InputError(f"{where}: {chosen[0]!r} is chosen by maisi batch (outputs under --out, --device, "
                             "--format); remove it from the line")
        for name in PATH_FIELDS:
            if isinstance(data.get(name), str) and not Path(data[name]).is_absolute():
                data[name] = str(path.parent / data[name])
        model = data.get("model")
        if isinstance(model, str) and ("/" in model or os.sep in model) and not Path(model).is_absolute():
            data["model"] = str(path.parent / model)
        if "precision" not in data and not data.get("reference_numerics"):
            data["precision"] = precision
        request = request_from_dict(data, where)  # types and unknown keys
        request.check()
        base = request.seed if "seed" in row else base_seed
        for option, name in request.input_paths().items():
            if not Path(str(name).split("#")[0]).exists():
                raise InputError(f"{where}: {option.lstrip('-').replace('-', '_')} {name}: no such file or folder")
        clean = {k: v for k, v in request.to_dict().items() if k not in CHOSEN_BY_BATCH and k != "seed"}
        for copy in range(count):
            items.append(BatchItem(f"{line_id}-{copy:03d}", index, copy, item_seed(base, index, copy), clean, number))
    return items


# ---- status.jsonl --------------------------------------------------------------------------------


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line to ``path`` and fsync it (one ``write``: records of several processes
    never interleave; a line cut by a crash is ignored when read)."""
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_status(path: str | os.PathLike) -> list[dict]:
    """The records of ``status.jsonl`` in order; lines that are not whole JSON objects (cut by a
    SIGKILL) are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "id" in record:
            records.append(record)
    return records


def _repair_status(path: Path) -> None:
    """End a last line cut by a crash, so the next record starts on its own line."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                append_record_raw(path, b"\n")


def append_record_raw(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def finished(records: Iterable[dict], items: list[BatchItem], layout: Layout, qc_retries: int) -> dict[str, dict]:
    """Id → the ``done`` record of every item that is finished: same fingerprint, files present."""
    wanted = {item.id: item.fingerprint(layout, qc_retries) for item in items}
    done = {}
    for record in records:
        if record.get("state") == "done" and wanted.get(record["id"]) == record.get("fingerprint"):
            if all(Path(layout.root / f).is_file() for f in record.get("files", {}).values()):
                done[record["id"]] = record
    return done


# ---- the worker: one code path for every backend ---------------------------------------------------


@dataclass
class WorkerConfig:
    """What every worker needs to run items (plain data: pickled to processes and Ray actors)."""

    root: str
    format: str = "nifti"
    label_set: tuple = ()
    device: str = "auto"
    retries: int = 0
    qc_retries: int = -1  # -1: no quality check; N: check, regenerate with the next seed up to N times
    threads: int = 1  # torch CPU threads per worker: the same for every backend, so the same bytes
    name: str = ""

    @property
    def layout(self) -> Layout:
        return Layout(Path(self.root), self.format, tuple(tuple(p) for p in self.label_set))


class BatchWorker:
    """Runs items on one device; each model (model, weight folder) is loaded once and kept."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.layout = config.layout
        self.status = Path(config.root) / STATUS
        self._models: dict = {}
        import torch

        torch.set_num_threads(config.threads)

    def model(self, request):
        """The loaded networks for ``request`` (loaded on first use, then reused)."""
        from ..models.weights import check_weight_files, load_model, resolve_model
        from ..precision import resolve_precision
        from ..validation import resolve_device

        preset, weights_dir = resolve_model(request.model, request.weights_dir)
        device = resolve_device(self.config.device)
        # The attention is built into the loaded networks (--reference-numerics: MONAI's own); the
        # precision is not (autocast is per call), so it is no part of the key.
        attention = resolve_precision(request.precision, device, request.reference_numerics).attention
        key = (preset.key, str(Path(weights_dir).resolve()), attention)
        if key not in self._models:
            check_weight_files(preset, weights_dir)
            self._models[key] = load_model(preset, weights_dir, device, attention=attention)
        return self._models[key]

    def _record(self, item: BatchItem, state: str, **fields) -> dict:
        record = {"id": item.id, "index": item.index, "copy": item.copy, "seed": item.seed, "state": state,
                  "fingerprint": item.fingerprint(self.layout, self.config.qc_retries), "worker": self.config.name,
                  "pid": os.getpid(), "time": round(time.time(), 3), **fields}
        append_record(self.status, record)
        return record

    def run(self, item: BatchItem) -> dict:
        """Run ``item`` (retrying failures up to ``retries`` times); returns its last record."""
        self._record(item, "started")
        attempts = self.config.retries + 1
        for attempt in range(1, attempts + 1):
            started = time.perf_counter()
            try:
                return self._run_once(item, started, attempt)
            except (Cancelled, KeyboardInterrupt):
                raise
            except InputError as exc:  # bad input: the same on every attempt
                return self._record(item, "failed", reason=str(exc).splitlines()[0], attempt=attempt, retryable=False)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                record = self._record(item, "failed", reason=reason, attempt=attempt, retryable=True,
                                      seconds=round(time.perf_counter() - started, 3))
                if attempt == attempts:
                    return record
        raise AssertionError("unreachable")

    def _run_once(self, item: BatchItem, started: float, attempt: int) -> dict:
        from .safety import check_distinct

        layout = self.layout
        image_path = layout.image(item.id)
        label_path = layout.label(item.id) if item.labelled else None
        for folder in layout.folders():
            folder.mkdir(parents=True, exist_ok=True)
        request = item.build(self.config.device)
        outputs = {"image": str(image_path), **({"label": str(label_path)} if label_path else {})}
        check_distinct(outputs, request.input_paths())
        if request.kind == "generate" and self.config.qc_retries >= 0 and item.labelled:
            request.qc_retries = self.config.qc_retries
        prepare_started = time.perf_counter()
        if request.kind == "generate":  # read and check the inputs before any network
            from ..precision import resolve_precision
            from ..validation import resolve_device
            from .admission import check_admission
            from .generate import prepare_generation

            prepared = prepare_generation(request)
            device = resolve_device(request.device)
            check_admission(prepared, device.type,  # this worker's device
                            precision=resolve_precision(request.precision, device, request.reference_numerics))
        else:
            from .inpaint import prepare_inpaint

            prepared = prepare_inpaint(request)
        prepare_s = time.perf_counter() - prepare_started
        loaded_before = len(self._models)
        load_started = time.perf_counter()
        model = self.model(request)
        load_s = time.perf_counter() - load_started if len(self._models) > loaded_before else 0.0
        run_started = time.perf_counter()
        qc = None
        if request.kind == "generate":
            from .generate import GeneratePipeline

            result = GeneratePipeline(model)(prepared)
            ct, labels, seed_used = result.ct, result.labels, result.seed_used
            if result.qc is not None:
                passed = all(c.passed for c in result.qc)
                qc = {"passed": passed, "seed_used": seed_used, "failed": [c.organ for c in result.qc if not c.passed]}
        else:
            from .inpaint import InpaintPipeline

            result = InpaintPipeline(model)(prepared)
            ct, labels, seed_used = result.ct, result.labels, item.seed
        run_s = time.perf_counter() - run_started
        timings = {"prepare_s": round(prepare_s, 3), "load_s": round(load_s, 3), "run_s": round(run_s, 3)}
        if qc is not None and not qc["passed"]:
            return self._record(item, "rejected", reason=f"quality check failed after {self.config.qc_retries} "
                                f"retries ({', '.join(qc['failed'])})", qc=qc, attempt=attempt, timings=timings)
        from ..io.geometry import Volume
        from ..io.volumes import write_volume

        write_started = time.perf_counter()
        files = {}
        if label_path is not None and labels is not None:
            write_volume(label_path, Volume(layout.remap(labels.array), labels.affine))
            files["label"] = str(label_path.relative_to(layout.root))
        write_volume(image_path, ct)
        files["image"] = str(image_path.relative_to(layout.root))
        timings["write_s"] = round(time.perf_counter() - write_started, 3)
        timings["total_s"] = round(time.perf_counter() - started, 3)
        return self._record(item, "done", files=files, seed_used=seed_used, qc=qc, attempt=attempt, timings=timings,
                            kind=request.kind)


# ---- backends: they only hand out items --------------------------------------------------------------


_process_worker: BatchWorker | None = None


def _init_process(config: WorkerConfig, slots) -> None:
    """Process-pool initializer: this process's worker, on device slot ``slots.get()``."""
    global _process_worker
    slot = slots.get()
    config = dataclasses.replace(config, device=_slot_device(config.device, slot), name=f"process{slot}")
    _process_worker = BatchWorker(config)


def _run_in_process(item: BatchItem) -> dict:
    return _process_worker.run(item)


def _slot_device(device: str, slot: int) -> str:
    """Worker ``slot``'s device: ``cuda:slot`` (modulo the GPUs) for auto/cuda on a GPU machine."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu" if device == "auto" else device
    return f"cuda:{slot % torch.cuda.device_count()}"


def _run_local(items: list[BatchItem], config: WorkerConfig, workers: int):
    """Yield each item's last record, on ``workers`` local processes (1: this process)."""
    if workers == 1:
        import torch

        threads = torch.get_num_threads()
        try:
            worker = BatchWorker(dataclasses.replace(config, device=_slot_device(config.device, 0), name="process0"))
            for item in items:
                yield worker.run(item)
        finally:
            torch.set_num_threads(threads)  # this process's setting, as it was
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for slot in range(workers):
        slots.put(slot)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_process, initargs=(config, slots)) as pool:
        futures = [pool.submit(_run_in_process, item) for item in items]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _run_ray(items: list[BatchItem], config: WorkerConfig, workers: int, address: str | None):
    """Yield each item's last record from ``workers`` Ray actors (one device each, the model loaded
    once per actor); a crashed actor is restarted and its item retried by Ray (``retries``)."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as exc:
        raise InputError("--backend ray needs Ray: pip install \"maisicore[ray]\"") from exc
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address)
    gpus = ray.cluster_resources().get("GPU", 0) if config.device != "cpu" else 0
    resources = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
    actor = ray.remote(max_restarts=config.retries, max_task_retries=config.retries, **resources)(BatchWorker)
    device = "cpu" if not gpus and config.device == "auto" else ("cuda" if gpus and config.device == "auto" else config.device)
    actors = [actor.remote(dataclasses.replace(config, device=device, name=f"ray{n}"))
              for n in range(workers)]
    try:
        yield from ActorPool(actors).map_unordered(lambda a, item: a.run.remote(item), items)
    finally:
        for a in actors:
            ray.kill(a)
        if started_here:
            ray.shutdown()


def _run_torchrun(items: list[BatchItem], config: WorkerConfig, processes):
    """Yield this rank's records: items claimed one by one from the rendezvous store's counter, so
    a fast rank takes more items (no static sharding)."""
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    worker = BatchWorker(dataclasses.replace(config, device=str(processes.device), name=f"rank{processes.rank}"))
    while True:
        claimed = store.add("maisi_batch_next", 1) - 1
        if claimed >= len(items):
            return
        yield worker.run(items[claimed])


# ---- the run ------------------------------------------------------------------------------------------


@dataclass
class BatchOptions:
    """``maisi batch``'s options (see ``build_parser``)."""

    format: str = "nifti"
    label_set: str | None = None
    workers: int = 1
    backend: str = "local"
    ray_address: str | None = None
    retries: int = 0
    qc: bool = False
    qc_retries: int = 3
    device: str = "auto"
    seed: int = 0
    montage: int = MONTAGE_CASES
    threads: int = 1  # torch CPU threads per worker; bytes are identical across backends for equal threads
    precision: str = "auto"  # lines without their own "precision" field (maisicore.precision)


@dataclass
class BatchSummary:
    """What a batch run reports (also ``DIR/summary.json``); seconds in ``seconds_per_item``."""

    items: int
    done: int
    failed: int
    rejected: int
    skipped: int
    ran: int
    seconds_per_item: float | None
    qc_checked: int
    qc_passed: int
    wall_s: float
    backend: str
    workers: int
    format: str
    failures: list[dict] = field(default_factory=list)

    @property
    def qc_pass_rate(self) -> float | None:
        return self.qc_passed / self.qc_checked if self.qc_checked else None

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), qc_pass_rate=self.qc_pass_rate)

    def line(self) -> str:
        rate = f", QC pass rate {self.qc_pass_rate:.0%}" if self.qc_pass_rate is not None else ""
        per = f", {self.seconds_per_item:.2f} s per item" if self.seconds_per_item is not None else ""
        return (f"batch: {self.done} of {self.items} done ({self.skipped} skipped as already done, {self.ran} run), "
                f"{self.failed} failed, {self.rejected} rejected by QC{per}{rate}")


def _check_options(options: BatchOptions) -> None:
    from .requests import _check_seed

    if options.backend not in BACKENDS:
        raise InputError(f"--backend {options.backend!r}: choose one of {', '.join(BACKENDS)} (torchrun: start "
                         "`torchrun --nproc_per_node N -m maisicore batch ...`)")
    for name, value, low in (("--workers", options.workers, 1), ("--retries", options.retries, 0),
                             ("--qc-retries", options.qc_retries, 0), ("--montage", options.montage, 0),
                             ("--threads", options.threads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} {value!r}: must be a whole number of at least {low}")
    if options.ray_address and options.backend != "ray":
        raise InputError("--ray-address goes with --backend ray")
    _check_seed(options.seed, "--seed")


def prepare_batch(manifest: str | os.PathLike, out_dir: str | os.PathLike, options: BatchOptions):
    """Check everything before any work: (items, layout). One-line ``InputError``; nothing written."""
    _check_options(options)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder; give a folder for the batch")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist; create it first")
    layout = Layout(out, options.format, tuple(parse_label_set(options.label_set)))
    items = read_manifest(manifest, options.seed, options.precision)
    if options.format != "nifti":
        unlabelled = next((i for i in items if not i.labelled), None)
        if unlabelled is not None:
            raise InputError(f"item {unlabelled.id}: --format {options.format} needs labels; give the line a mask "
                             "or anatomy (or use --format nifti)")
    if options.qc and any(i.request["kind"] == "generate" and not i.labelled for i in items):
        raise InputError("--qc checks organs of a mask: every generate line needs a mask or anatomy")
    _check_paths(items, layout, Path(manifest))
    _prepare_lines(items, Path(manifest), options.device)
    return items, layout


def _line_inputs(item: BatchItem) -> dict[str, str]:
    """Field name → path of every file or folder the item's line reads (the request's inputs,
    its weight and mask folders)."""
    from .requests import REQUEST_TYPES

    data = item.request  # checked by read_manifest: no second pass through request_from_dict
    request = REQUEST_TYPES[data["kind"]](**{k: v for k, v in data.items() if k != "kind"})
    named = {option.lstrip("-").replace("-", "_"): path for option, path in request.input_paths().items()}
    for name in ("weights_dir", "mask_dir"):
        if getattr(request, name, None):
            named[name] = getattr(request, name)
    return named


def _check_paths(items: list[BatchItem], layout: Layout, manifest: Path) -> None:
    """Refuse (one line naming the manifest lines) an input of any line, or the manifest, that is a
    file the batch writes: any item's image or labels, the index files, status.jsonl, summary.json,
    montage.png. Resolved paths and (device, inode) keys in one dict, so links count and 10,000
    items cost one pass (no pairs)."""
    from .safety import file_keys

    writes: dict = {}  # key -> (what, item or None)
    for path in [layout.root / STATUS, layout.root / SUMMARY, layout.root / MONTAGE, *layout.index_files()]:
        for key in file_keys(path):
            writes.setdefault(key, (f"the batch's {path.name} in --out", None))
    folders = {}  # folder -> (resolved once, names in it): one listing instead of a stat per case
    for folder in layout.folders():
        folders[folder] = (folder.resolve(), set(os.listdir(folder)) if folder.is_dir() else set())
    for item in items:
        outputs = [layout.image(item.id)] + ([layout.label(item.id)] if item.labelled else [])
        for path in outputs:
            resolved, present = folders[path.parent]
            what = (f"the output of line {item.line} (case {item.id})", item)
            writes.setdefault(str(resolved / path.name), what)
            if path.name in present:  # an existing file (or link): its inode too
                for key in file_keys(path, resolved):
                    writes.setdefault(key, what)
    clash = next((writes[key] for key in file_keys(manifest) if key in writes), None)
    if clash is not None:
        raise InputError(f"manifest {manifest} is {clash[0]}; an output never replaces an input: "
                         "use another --out folder")
    keys: dict[str, set] = {}  # lines often share inputs (a weight folder, a CT)
    databases: dict = {}  # (mask_db, mask_dir) -> its candidate masks
    for item in {i.index: i for i in items}.values():  # copies share their line's inputs
        inputs = list(_line_inputs(item).items())
        if item.request.get("anatomy") and item.request.get("mask_db"):
            from ..anatomy.maskdb import load_database

            source = (item.request["mask_db"], item.request.get("mask_dir"))
            if source not in databases:
                try:
                    databases[source] = [str(c.path) for c in load_database(*source)]
                except InputError as exc:
                    raise InputError(f"{manifest} line {item.line}: {exc}") from exc
            inputs += [("mask_db candidate", path) for path in databases[source]]
        for name, path in inputs:
            if path not in keys:
                keys[path] = file_keys(path)
            clash = next((writes[key] for key in keys[path] if key in writes), None)
            if clash is not None:
                shown = _shown(path, manifest.parent)
                other = "" if clash[1] is None else " or rename that line's \"id\""
                raise InputError(f"{manifest} line {item.line}: {name} {shown} is {clash[0]}; an output never "
                                 f"replaces an input: use another --out folder{other}")


def _shown(path: str, folder: Path) -> str:
    """``path`` as the manifest line wrote it: relative to the manifest's folder when inside it."""
    try:
        return str(Path(path).relative_to(folder))
    except ValueError:
        return str(path)


def _prepare_lines(items: list[BatchItem], manifest: Path, device: str) -> None:
    """Read and check every line's inputs before any work, as its worker will (generate:
    ``prepare_generation`` and the memory admission; inpaint: ``prepare_inpaint``); copies of a
    line differ only by seed, so each line is prepared once. One line naming the manifest line."""
    from ..validation import resolve_device
    from .admission import check_admission
    from .generate import prepare_generation
    from .inpaint import prepare_inpaint

    device_type = resolve_device(device).type
    for item in {i.index: i for i in items}.values():
        request = item.build(device)
        try:
            if request.kind == "generate":
                from ..precision import choose_precision, cpu_bf16_native

                precision = choose_precision(request.precision, device_type,
                                             cpu_bf16_native() if device_type == "cpu" else None,
                                             request.reference_numerics)
                check_admission(prepare_generation(request), device_type, precision=precision)
            else:
                prepare_inpaint(request)
        except InputError as exc:
            raise InputError(f"{manifest} line {item.line} (case {item.id}): {exc}") from exc


def run_batch(manifest: str | os.PathLike, out_dir: str | os.PathLike, options: BatchOptions | None = None,
              report: Report | None = None) -> BatchSummary | None:
    """Run (or resume) a batch; returns the summary (None on torchrun ranks other than 0)."""
    options = options or BatchOptions()
    report = report or Report()
    started = time.perf_counter()
    items, layout = prepare_batch(manifest, out_dir, options)
    qc_retries = options.qc_retries if options.qc else -1
    config = WorkerConfig(str(layout.root), layout.format, layout.label_set, options.device, options.retries,
                          qc_retries, options.threads)
    processes = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..training.distributed import start

        if options.backend == "ray":
            raise InputError("--backend ray is its own launcher: start it without torchrun")
        processes = start(options.device)
    is_main = processes is None or processes.is_main
    status = layout.root / STATUS
    if is_main:
        layout.root.mkdir(exist_ok=True)
        _repair_status(status)
    if processes is not None:
        from ..training.distributed import barrier

        barrier(processes)
    records = read_status(status)
    done_before = finished(records, items, layout, qc_retries)
    fingerprints = {item.id: item.fingerprint(layout, qc_retries) for item in items}
    rejected = {r["id"] for r in records if r.get("state") == "rejected" and fingerprints.get(r["id"]) == r.get("fingerprint")}
    pending = [item for item in items if item.id not in done_before and item.id not in rejected]  # QC: same seeds, same verdict
    if processes is not None:
        barrier(processes)  # every rank has read the same status before any rank appends to it
    workers = processes.world_size if processes else options.workers
    backend = "torchrun" if processes else options.backend
    if is_main:
        report.info(f"batch: {len(items)} items, {len(done_before)} already done, {len(pending)} to run on "
                    f"{workers} {backend} worker(s) into {layout.root} ({layout.format})")
    if processes is not None:
        records = _run_torchrun(pending, config, processes)
    elif options.backend == "ray":
        records = _run_ray(pending, config, options.workers, options.ray_address)
    else:
        records = _run_local(pending, config, options.workers)
    count = 0
    if processes is None and pending:
        report.progress("items", 0, len(pending))
    for record in records:
        count += 1
        what = record["state"]
        detail = (f"{record['timings']['total_s']:.1f} s, seed {record.get('seed_used', record['seed'])}"
                  if what == "done" else record.get("reason", ""))
        prefix = f"rank {processes.rank}: " if processes else ""
        report.info(f"{prefix}[{count}/{len(pending)}] {record['id']}: {what} ({detail})")
        if processes is None:
            report.progress("items", count, len(pending))
    if processes is not None:
        from ..training.distributed import barrier, stop

        barrier(processes)
        stop(processes)
        if not is_main:
            return None
    return _finish(items, layout, done_before, qc_retries, options, backend, workers, started, report)


def _finish(items, layout: Layout, done_before: dict, qc_retries: int, options: BatchOptions, backend: str,
            workers: int, started: float, report: Report) -> BatchSummary:
    """Summary, index files (datalist, dataset.json) and montage from ``status.jsonl``."""
    from ..io.volumes import atomic_write

    records = read_status(layout.root / STATUS)
    done = finished(records, items, layout, qc_retries)
    last: dict[str, dict] = {}
    for record in records:
        if record.get("state") != "started":
            last[record["id"]] = record
    ids = [item.id for item in items]
    failed = [last[i] for i in ids if i not in done and last.get(i, {}).get("state") == "failed"]
    rejected = [last[i] for i in ids if i not in done and last.get(i, {}).get("state") == "rejected"]
    ran = [done[i] for i in ids if i in done and i not in done_before]
    per_item = [r["timings"]["total_s"] for r in ran]
    qc_rows = [r.get("qc") for r in [*done.values(), *rejected] if r.get("qc")]
    summary = BatchSummary(
        items=len(items), done=len(done), failed=len(failed), rejected=len(rejected), skipped=len(done_before),
        ran=len(ran), seconds_per_item=round(sum(per_item) / len(per_item), 3) if per_item else None,
        qc_checked=len(qc_rows), qc_passed=sum(1 for q in qc_rows if q["passed"]),
        wall_s=round(time.perf_counter() - started, 3), backend=backend, workers=workers, format=layout.format,
        failures=[{"id": r["id"], "reason": r.get("reason", "")} for r in failed + rejected])
    cases = [i for i in ids if i in done]
    layout.write_index(cases, f"MAISI synthetic CT, {len(cases)} cases (maisi batch)")
    if options.montage and cases:
        write_montage(layout.root / MONTAGE, layout, cases[: options.montage])
    text = json.dumps(summary.to_dict(), indent=2) + "\n"
    atomic_write(layout.root / SUMMARY, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), suffix=".json")
    for failure in summary.failures:
        report.note(f"{failure['id']}: {failure['reason']}")
    return summary


def write_montage(path: Path, layout: Layout, cases: list[str]) -> Path:
    """A PNG with one row per case: its mid-planes with label contours (``io.preview``)."""
    import numpy as np
    from PIL import Image

    from ..io.geometry import Volume
    from ..io.preview import render_preview
    from ..io.volumes import atomic_write, read_volume

    rows = []
    for case in cases:
        ct = read_volume(layout.image(case))
        labels = None
        if layout.label(case).is_file():
            raw = read_volume(layout.label(case))
            labels = Volume(layout.to_maisi(np.asarray(raw.array)), raw.affine)
        rows.append(render_preview(ct, labels))
    width = max(r.shape[1] for r in rows)
    canvas = np.zeros((sum(r.shape[0] for r in rows) + 4 * (len(rows) - 1), width, 3), np.uint8)
    y = 0
    for row in rows:
        canvas[y : y + row.shape[0], : row.shape[1]] = row
        y += row.shape[0] + 4
    image = Image.fromarray(canvas)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), suffix=".png")

