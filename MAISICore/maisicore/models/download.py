"""NVIDIA's official MAISI weights: where they are published, their licence, and a safe download.

What lives here:
- ``OFFICIAL_MODELS``: per model, the three checkpoints (names from ``maisicore.models.presets``) in the
  Hugging Face repo ``nvidia/NV-Generate-CT`` (revision ``main``), approximate sizes, the licence,
  and the optional candidate-mask database (``--include-datasets``).
- Licence acceptance, remembered per model in ``$MAISI_HOME/licenses_accepted.json``.
- ``download_model``: free-disk check first, then resumable HTTP downloads (``Range`` into
  ``NAME.part``), each file renamed into place only when complete, its sha256 recorded in
  ``hashes.json`` at the first download (the publisher gives none) and checked on later ones.
- ``verify_model``, ``model_status``, ``remove_model`` for ``maisi weights verify | list | remove``.

What is NOT here: reading checkpoints (``maisicore.models.weights``), argparse (``maisicore.cli``).

Layout: ``$MAISI_HOME/weights/MODEL/models/NAME.pt`` plus ``maisi_model.json`` (the card
``maisicore.models.weights`` reads) and ``hashes.json``; datasets in ``$MAISI_HOME/datasets/``, where
``maisi generate --anatomy`` looks by default. HTTP is the standard library's ``urllib`` (which
honours ``https_proxy``/``no_proxy``); ``--base-url`` or ``MAISI_WEIGHTS_BASE_URL`` names a mirror
that serves ``{base}/{repo}/resolve/{revision}/{path}`` like Hugging Face.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from http.client import HTTPException
from pathlib import Path, PurePosixPath

from .. import __version__
from ..anatomy.maskdb import CANDIDATE_MASK_INDEX, MASK_FILES_FOLDER
from ..errors import InputError
from ..io.volumes import atomic_write
from ..paths import DATASETS_SUBDIR, maisi_home
from .presets import MODEL_NAMES, get_preset
from .weights import MODEL_CARD, MODELS_SUBDIR, default_weights_root

HF_REPO = "nvidia/NV-Generate-CT"
HF_REVISION = "main"
DEFAULT_BASE_URL = "https://huggingface.co"
URL_PATTERN = "{base_url}/{repo}/resolve/{revision}/{path}"
BASE_URL_ENV = "MAISI_WEIGHTS_BASE_URL"
DISK_FREE_ENV = "MAISI_DISK_FREE_BYTES"  # simulated free disk space, bytes (tests)
HASHES_FILE = "hashes.json"
LICENSES_FILE = "licenses_accepted.json"
PART_SUFFIX = ".part"
VALIDATOR_SUFFIX = ".validator"  # beside NAME.part: the ETag/Last-Modified it was started from
LOCK_FILE = ".download.lock"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class License:
    """A licence the user accepts before downloading: name, where to read it, a short summary."""

    name: str
    url: str
    summary: str


NVIDIA_OPEN_MODEL_LICENSE = License(
    name="NVIDIA Open Model License",
    url="https://www.nvidia.com/en-us/agreements/enterprise-software/nvidia-open-model-license/",
    summary=(
        f"NVIDIA publishes the MAISI CT weights ({HF_REPO} on Hugging Face) under the NVIDIA Open Model "
        "License Agreement. By NVIDIA's own summary, models under it are commercially usable, you may create "
        "and distribute derivative models, and NVIDIA claims no ownership of the outputs you generate; the "
        "agreement sets conditions (among them keeping its notices) and ends your rights if you break them or "
        "circumvent the model's safety guardrails. Read the full text before accepting; the model card "
        f"https://huggingface.co/{HF_REPO} says which licence covers each file."
    ),
)


@dataclass(frozen=True)
class RemoteFile:
    """One published file: its path in the repo (also its path under the local root) and sizes.

    Sizes are approximate (bytes, None when unknown), used only until the server reports the real
    size. ``unpack`` marks a zip that is unpacked into the folder named after it.
    """

    repo_path: str
    approx_bytes: int | None = None
    unpack: bool = False
    approx_unpacked_bytes: int | None = None

    @property
    def name(self) -> str:
        return PurePosixPath(self.repo_path).name

    @property
    def unpacked_folder(self) -> str:
        """Relative folder the zip is unpacked into (``datasets/NAME`` without ``.zip``)."""
        return self.repo_path.removesuffix(".zip")


@dataclass(frozen=True)
class OfficialModel:
    """Where one model's weights are published, under which licence, and its optional datasets."""

    name: str
    files: dict[str, RemoteFile]  # role (autoencoder, diffusion_unet, controlnet) -> file
    datasets: tuple[RemoteFile, ...]
    license: License
    repo: str = HF_REPO
    revision: str = HF_REVISION


# Approximate published sizes (bytes); the server's Content-Length replaces them at download time.
_APPROX_BYTES = {
    "autoencoder_v1.pt": 84_000_000,
    "diff_unet_3d_rflow-ct.pt": 2_200_000_000,
    "controlnet_3d_rflow-ct.pt": 288_000_000,
    "all_anatomy_size_conditions.json": 300_000,
}
_ANATOMY_SIZES = RemoteFile(f"{DATASETS_SUBDIR}/all_anatomy_size_conditions.json", _APPROX_BYTES[
    "all_anatomy_size_conditions.json"])
_MASK_ARCHIVE = RemoteFile(
    f"{DATASETS_SUBDIR}/{MASK_FILES_FOLDER}.zip",
    approx_bytes=11_600_000_000,
    unpack=True,
    approx_unpacked_bytes=14_000_000_000,
)
# The candidate-mask index each model's reference configuration uses (anatomy.maskdb).
_MASK_INDEX = {name: f"{DATASETS_SUBDIR}/{index}" for name, index in CANDIDATE_MASK_INDEX.items()}


def _official_model(name: str) -> OfficialModel:
    names = get_preset(name).weight_files.as_dict()
    files = {role: RemoteFile(f"{MODELS_SUBDIR}/{file}", _APPROX_BYTES.get(file)) for role, file in names.items()}
    datasets = (_ANATOMY_SIZES, RemoteFile(_MASK_INDEX[name]), _MASK_ARCHIVE)
    return OfficialModel(name=name, files=files, datasets=datasets, license=NVIDIA_OPEN_MODEL_LICENSE)


OFFICIAL_MODELS: dict[str, OfficialModel] = {name: _official_model(name) for name in MODEL_NAMES}


def official_model(name: str) -> OfficialModel:
    """The registry entry of ``name``; one-line ``InputError`` for an unknown model."""
    if name not in OFFICIAL_MODELS:
        raise InputError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    return OFFICIAL_MODELS[name]


# ---- places -------------------------------------------------------------------------------------


def model_dir(name: str) -> Path:
    """Cache folder of a downloaded model: ``$MAISI_HOME/weights/MODEL``."""
    return default_weights_root() / official_model(name).name


def datasets_root() -> Path:
    """Root the dataset files' repo paths are relative to (``$MAISI_HOME``; files in ``datasets/``)."""
    return maisi_home()


def resolve_base_url(base_url: str | None = None) -> str:
    """The mirror to download from: ``base_url``, else ``$MAISI_WEIGHTS_BASE_URL``, else Hugging Face."""
    chosen = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    source = "--base-url" if base_url else (BASE_URL_ENV if os.environ.get(BASE_URL_ENV) else "default base URL")
    if not re.match(r"^https?://[^/\s]+", chosen):
        raise InputError(f"{source} {chosen!r}: must be an http:// or https:// URL (e.g. {DEFAULT_BASE_URL})")
    return chosen.rstrip("/")


def file_url(base_url: str, model: OfficialModel, remote: RemoteFile) -> str:
    """URL of ``remote`` on the mirror: ``{base_url}/{repo}/resolve/{revision}/{path}``."""
    return URL_PATTERN.format(base_url=base_url, repo=model.repo, revision=model.revision, path=remote.repo_path)


# ---- licence acceptance -------------------------------------------------------------------------


def _read_json(path: Path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); fix or delete it") from exc


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def license_accepted(name: str) -> bool:
    """Whether the user accepted this model's current licence (same name and URL) before."""
    model = official_model(name)
    entry = _read_json(maisi_home() / LICENSES_FILE, {}).get(name) or {}
    return entry.get("license") == model.license.name and entry.get("license_url") == model.license.url


def record_license_acceptance(name: str) -> Path:
    """Remember that the user accepted this model's licence; returns the file it is kept in."""
    model = official_model(name)
    path = maisi_home() / LICENSES_FILE
    accepted = _read_json(path, {})
    accepted[name] = {
        "license": model.license.name,
        "license_url": model.license.url,
        "accepted_at": _now(),
    }
    _write_json(path, accepted)
    return path


def check_license(name: str, accept: bool) -> bool:
    """Refuse (one line, how to accept) unless accepted before or ``accept`` is given.

    Returns True when the acceptance is new and still has to be recorded.
    """
    model = official_model(name)
    if license_accepted(name):
        return False
    if not accept:
        raise InputError(
            f"the {name} weights are under the {model.license.name} ({model.license.url}); read it, then run "
            f"`maisi weights download {name} --accept-license` to accept it (remembered in "
            f"{maisi_home() / LICENSES_FILE})"
        )
    return True


# ---- hashes -------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(4 * CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def read_hashes(folder: Path) -> dict[str, dict]:
    """``folder/hashes.json``: relative path -> {"sha256", "size", "recorded", "url"[, "unpacked_to"]}."""
    return _read_json(Path(folder) / HASHES_FILE, {})


def _hash_place(root: Path, remote: RemoteFile) -> tuple[Path, str]:
    """Folder whose ``hashes.json`` records ``remote``, and its key there: the model folder with
    ``models/NAME``, or ``$MAISI_HOME/datasets`` with ``NAME`` for dataset files."""
    top, _, rest = remote.repo_path.partition("/")
    return (root / DATASETS_SUBDIR, rest) if top == DATASETS_SUBDIR else (root, remote.repo_path)


def recorded_hash(root: Path, remote: RemoteFile) -> dict | None:
    """The hash entry recorded for ``remote`` under ``root``, or None."""
    folder, key = _hash_place(root, remote)
    return read_hashes(folder).get(key)


def _record_hash(root: Path, remote: RemoteFile, entry: dict) -> None:
    folder, key = _hash_place(root, remote)
    hashes = read_hashes(folder)
    hashes[key] = entry
    _write_json(folder / HASHES_FILE, hashes)


# ---- HTTP -----------------------------------------------------------------------------------------


class _Interrupted(Exception):
    """The connection broke or the server answered wrongly; carries a one-line reason."""


class _RedirectKeepingHead(urllib.request.HTTPRedirectHandler):
    """Follow redirects (Hugging Face sends large files to a CDN) without turning HEAD into GET,
    which Python before 3.12 does."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and req.get_method() == "HEAD":
            new.method = "HEAD"
        return new


_OPENER = urllib.request.build_opener(_RedirectKeepingHead)


def _request(url: str, method: str = "GET", start: int = 0, if_range: str | None = None):
    headers = {"User-Agent": f"maisi/{__version__} (SlicerMAISI)", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
        if if_range:  # the server sends the whole file (200) if it changed since the part was started
            headers["If-Range"] = if_range
    try:
        return _OPENER.open(urllib.request.Request(url, headers=headers, method=method), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:
            return exc  # range past the end: the caller reads Content-Range
        if exc.code >= 500 or exc.code == 429:  # the server's trouble: worth trying again later
            raise _Interrupted(f"{url}: the server answered {exc.code} {exc.reason}") from None
        hint = {401: "the mirror needs credentials", 403: "access refused", 404: "no such file: check --base-url"}
        raise InputError(
            f"{url}: the server answered {exc.code} {exc.reason} ({hint.get(exc.code, 'check --base-url')})"
        ) from None
    except (urllib.error.URLError, HTTPException, OSError) as exc:
        raise _Interrupted(f"{url}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def remote_size(url: str) -> int | None:
    """Content-Length of a HEAD request (after redirects), or None when the server gives none."""
    with _request(url, "HEAD") as response:
        length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _validator_of(response) -> str | None:
    """What identifies this version of the file for ``If-Range``: a strong ETag, else Last-Modified."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def validator_path(part: Path) -> Path:
    """Sidecar of ``NAME.part`` holding the validator of the version being downloaded."""
    return part.with_name(part.name + VALIDATOR_SUFFIX)


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")  # 206: first-last/total
_RANGE_TOTAL = re.compile(r"/(\d+)\s*$")  # 416: */total


def _fetch_into(url: str, part: Path, name: str, expected: int | None, show_progress: bool) -> tuple[int, int]:
    """Bring ``part`` to the whole file, resuming from its current size; returns the file size and
    the bytes received.

    A 206 reply is appended; a 200 reply to a range request (the server ignores ranges, or the file
    changed since the part was started: ``If-Range``) restarts the file from byte 0; 416 means the
    part is already whole (or wrong, then it restarts).
    """
    start = part.stat().st_size if part.exists() else 0
    if expected is not None and start > expected:
        start = 0
    sidecar = validator_path(part)
    started_from = sidecar.read_text().strip() if start and sidecar.is_file() else None
    response = _request(url, "GET", start, if_range=started_from)
    with response:
        status = getattr(response, "status", None) or response.code
        range_header = response.headers.get("Content-Range", "") or ""
        content_range = _CONTENT_RANGE.match(range_header)
        length = response.headers.get("Content-Length")
        if status == 416:
            total = _RANGE_TOTAL.search(range_header)
            if total and start == int(total.group(1)):
                return start, 0
            part.unlink(missing_ok=True)
            return _fetch_into(url, part, name, expected, show_progress)
        if status == 206:
            if not content_range or int(content_range.group(1)) != start:
                part.unlink(missing_ok=True)  # not the range asked for: start over cleanly
                return _fetch_into(url, part, name, expected, show_progress)
            offset = start
            total = int(content_range.group(3)) if content_range.group(3) != "*" else expected
        else:  # 200: the whole file, whatever was asked
            offset = 0
            total = int(length) if length and length.isdigit() else expected
        if offset == 0:
            validator = _validator_of(response)
            if validator:
                sidecar.write_text(validator + "\n")
            else:
                sidecar.unlink(missing_ok=True)
        received = _stream(response, url, part, offset, total, name, show_progress)
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Interrupted(f"{url}: the connection ended after {size} of {total} bytes")
    return size, received


def _stream(response, url: str, part: Path, offset: int, total: int | None, name: str, show_progress: bool) -> int:
    """Copy the response body into ``part`` from ``offset`` (append or fresh), with a progress bar;
    returns the bytes received."""
    from tqdm import tqdm

    received = 0
    bar = tqdm(total=total, initial=offset, desc=name, unit="B", unit_scale=True, unit_divisor=1000,
               file=sys.stderr, dynamic_ncols=True, mininterval=0.5, disable=not show_progress)
    try:
        with open(part, "ab" if offset else "wb") as out:
            out.truncate(offset)
            out.seek(offset)
            while True:
                try:
                    block = response.read(CHUNK_BYTES)
                except (HTTPException, OSError) as exc:
                    raise _Interrupted(f"{url}: {_reason(exc)}") from exc
                if not block:
                    break
                out.write(block)
                received += len(block)
                bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
    finally:
        bar.close()
    return received


# ---- download -----------------------------------------------------------------------------------


@dataclass
class Transfer:
    """One file to fetch: from ``url`` to ``root/remote.repo_path``; ``size`` from HEAD (bytes)."""

    remote: RemoteFile
    url: str
    root: Path
    size: int | None = None

    @property
    def target(self) -> Path:
        return self.root / self.remote.repo_path

    @property
    def part(self) -> Path:
        return self.target.with_name(self.target.name + PART_SUFFIX)

    def bytes_needed(self) -> int:
        """Disk space still needed (bytes): the rest of the file, plus its unpacked size for a zip."""
        size = self.size if self.size is not None else (self.remote.approx_bytes or 0)
        have = self.part.stat().st_size if self.part.is_file() else 0
        unpacked = 0
        if self.remote.unpack and self.remote.approx_bytes and self.remote.approx_unpacked_bytes:
            unpacked = size * self.remote.approx_unpacked_bytes // self.remote.approx_bytes  # published ratio
        return max(size - have, 0) + unpacked


def _is_present(root: Path, remote: RemoteFile) -> bool:
    if remote.unpack:
        entry = recorded_hash(root, remote) or {}
        return bool(entry.get("unpacked_to")) and (root / remote.unpacked_folder).is_dir()
    return (root / remote.repo_path).is_file()


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the disk holding ``folder`` (its nearest existing parent); ``$MAISI_DISK_FREE_BYTES``
    replaces the measurement when set."""
    simulated = os.environ.get(DISK_FREE_ENV)
    if simulated is not None:
        if not simulated.strip().isdigit():
            raise InputError(f"{DISK_FREE_ENV}={simulated!r}: must be a whole number of bytes")
        return int(simulated)
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def human_bytes(count: int | None) -> str:
    """``1.2 GB`` style (powers of 1000); ``?`` for None."""
    if count is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return "?"


@dataclass
class DownloadReport:
    """What ``download_model`` did: files fetched and skipped (paths), bytes received."""

    model: str
    folder: Path
    fetched: list[Path]
    skipped: list[Path]
    bytes_received: int
    license_recorded: bool


def plan_download(name: str, base_url: str, include_datasets: bool) -> list[Transfer]:
    """The files still missing (model files, then datasets when asked), with their URLs."""
    model = official_model(name)
    transfers = [Transfer(r, file_url(base_url, model, r), model_dir(name)) for r in model.files.values()]
    if include_datasets:
        transfers += [Transfer(r, file_url(base_url, model, r), datasets_root()) for r in model.datasets]
    return [t for t in transfers if not _is_present(t.root, t.remote)]


def download_model(
    name: str,
    accept_license: bool = False,
    base_url: str | None = None,
    include_datasets: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> DownloadReport:
    """Download the official weights of ``name`` into ``$MAISI_HOME/weights/NAME`` (see module doc).

    Order: licence, free disk, then each file (resuming ``.part`` files); nothing is written before
    the licence and the disk check pass. Network failures raise a one-line ``InputError`` saying to
    re-run the command, which resumes.
    """
    # 1. Check everything before writing anything.
    model = official_model(name)
    base_url = resolve_base_url(base_url)
    new_acceptance = check_license(name, accept_license)
    folder = model_dir(name)
    free = free_disk_bytes(folder)
    transfers = plan_download(name, base_url, include_datasets)
    try:
        for transfer in transfers:
            transfer.size = remote_size(transfer.url)
    except _Interrupted as exc:
        raise InputError(f"cannot reach the weights server ({exc}); check the network or --base-url, then "
                         f"run `maisi weights download {name}` again") from None
    needed = sum(t.bytes_needed() for t in transfers)
    if needed > free:
        simulated = f" (${DISK_FREE_ENV})" if os.environ.get(DISK_FREE_ENV) is not None else ""
        raise InputError(
            f"not enough free disk space for {name}: {human_bytes(needed)} to download, {human_bytes(free)} free"
            f"{simulated} under {maisi_home()}; free some space or set MAISI_HOME to a larger disk"
        )

    # 2. Remember the licence, then fetch each file through NAME.part (one download at a time).
    with _download_lock(maisi_home()):
        if new_acceptance:
            path = record_license_acceptance(name)
            log(f"{model.license.name} ({model.license.url}): {model.license.summary}")
            log(f"{model.license.name} accepted for {name} (remembered in {path})")
        fetched, received = _fetch_all(name, transfers, show_progress, log)

    # 3. The card `maisi generate --model NAME` reads, once all three checkpoints are in place.
    if all((folder / r.repo_path).is_file() for r in model.files.values()):
        card = {"model": name, "width": "official", "origin": f"{base_url}/{model.repo}@{model.revision}",
                "license": model.license.name, "license_url": model.license.url}
        _write_json(folder / MODEL_CARD, card)
    skipped = [folder / r.repo_path for r in model.files.values() if folder / r.repo_path not in fetched]
    return DownloadReport(name, folder, fetched, skipped, received, new_acceptance)


@contextmanager
def _download_lock(home: Path) -> Iterator[None]:
    """Hold ``$MAISI_HOME/.download.lock`` (released when the process ends); refuse when another
    download holds it."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / LOCK_FILE
    with open(path, "a+b") as handle:
        try:
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(
                f"another `maisi weights download` is writing under {home} (it holds {path}); wait for it to finish"
            ) from None
        yield  # closing the file releases the lock


def _fetch_all(name: str, transfers: list[Transfer], show_progress: bool, log) -> tuple[list[Path], int]:
    """Fetch and place each transfer; returns the placed paths and the bytes received."""
    resume_hint = f"run `maisi weights download {name}` again to resume"
    fetched, received = [], 0
    for transfer in transfers:
        transfer.target.parent.mkdir(parents=True, exist_ok=True)
        kept = transfer.part.stat().st_size if transfer.part.is_file() else 0
        log(f"downloading {transfer.remote.repo_path} ({human_bytes(transfer.size)}) from {transfer.url}"
            + (f", resuming at byte {kept}" if kept else ""))
        try:
            size, streamed = _fetch_into(transfer.url, transfer.part, transfer.remote.name, transfer.size,
                                         show_progress)
        except _Interrupted as exc:
            have = transfer.part.stat().st_size if transfer.part.is_file() else 0
            raise InputError(
                f"download interrupted ({exc}); {have} bytes kept in {transfer.part}; {resume_hint}"
            ) from None
        except KeyboardInterrupt:
            log(f"partial download kept in {transfer.part}; {resume_hint}")
            raise
        received += streamed
        _place(transfer, size, name)
        validator_path(transfer.part).unlink(missing_ok=True)
        fetched.append(transfer.target)
    return fetched, received


def _place(transfer: Transfer, size: int, name: str) -> None:
    """Hash the complete ``.part``, compare with the hash recorded earlier (or record it: first
    download), then rename it into place (or unpack a zip)."""
    digest = sha256_of(transfer.part)
    recorded = recorded_hash(transfer.root, transfer.remote)
    if recorded and recorded.get("sha256") != digest:
        transfer.part.unlink()
        validator_path(transfer.part).unlink(missing_ok=True)
        hashes_file = _hash_place(transfer.root, transfer.remote)[0] / HASHES_FILE
        forget = f"`maisi weights remove {name} --yes`, or edit {hashes_file}"
        if transfer.remote.repo_path.startswith(DATASETS_SUBDIR + "/"):
            forget = f"edit {hashes_file}"
        raise InputError(
            f"{transfer.target}: the downloaded file's sha256 {digest[:16]}… differs from "
            f"{recorded['sha256'][:16]}… recorded at the first download (the published file changed, or the copy "
            f"was altered); to accept the new file, forget the old hash ({forget}) and download again"
        )
    entry = {"sha256": digest, "size": size, "recorded": (recorded or {}).get("recorded", _now()), "url": transfer.url}
    _record_hash(transfer.root, transfer.remote, entry)  # before placing: a placed file always has its hash
    if transfer.remote.unpack:
        entry["unpacked_to"] = _unpack(transfer.part, transfer.root / transfer.remote.unpacked_folder)
        transfer.part.unlink()
        _record_hash(transfer.root, transfer.remote, entry)
    else:
        os.replace(transfer.part, transfer.target)


def _unpack(archive: Path, folder: Path) -> str:
    """Unpack a zip into ``folder`` through a temporary folder and a rename; returns the folder's
    name. Members outside the archive's root (absolute, ``..``) are refused."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if m.filename]
            for member in members:
                parts = PurePosixPath(member.filename).parts
                if member.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                    raise InputError(f"{archive}: refused: member {member.filename!r} points outside the archive")
            unpacked = sum(m.file_size for m in members)
            free = free_disk_bytes(folder.parent)
            if unpacked > free:
                raise InputError(f"not enough free disk space to unpack {archive.name}: {human_bytes(unpacked)} "
                                 f"needed, {human_bytes(free)} free; free some space and re-run (the archive is kept)")
            # Members either all sit under one top folder named like the archive, or directly at its root.
            top = {PurePosixPath(m.filename).parts[0] for m in members}
            nested = top == {folder.name} and all(len(PurePosixPath(m.filename).parts) > 1 or m.is_dir()
                                                  for m in members)
            staging = folder.parent / f".{folder.name}.unpacking"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                zipped.extractall(staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except zipfile.BadZipFile as exc:
        archive.unlink()
        raise InputError(f"{archive}: not a valid zip ({exc}); deleted, run the download again") from exc
    source = staging / folder.name if nested else staging
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(source, folder)
    shutil.rmtree(staging, ignore_errors=True)
    return folder.name


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: UP017 - datetime.UTC is 3.11+


# ---- verify, list, remove -------------------------------------------------------------------------


@dataclass(frozen=True)
class FileCheck:
    """Result of checking one file: ``state`` is ok, mismatch, missing or unrecorded (no hash yet)."""

    path: Path
    state: str
    detail: str = ""


def verify_model(name: str, include_datasets: bool = True) -> list[FileCheck]:
    """Check the model's three checkpoints (and its downloaded datasets) against ``hashes.json``."""
    model = official_model(name)
    folder = model_dir(name)
    checks = [_check_file(folder, remote) for remote in model.files.values()]
    if include_datasets:
        checks += [_check_file(datasets_root(), r) for r in model.datasets if recorded_hash(datasets_root(), r)]
    return checks


def _check_file(root: Path, remote: RemoteFile) -> FileCheck:
    path = root / remote.repo_path
    entry = recorded_hash(root, remote)
    if remote.unpack and entry and entry.get("unpacked_to"):
        folder = root / remote.unpacked_folder
        if not folder.is_dir():
            return FileCheck(folder, "missing", "unpacked folder missing")
        return FileCheck(folder, "ok", "unpacked from an archive whose sha256 matched")
    if not path.is_file():
        return FileCheck(path, "missing", "file missing")
    if not entry:
        return FileCheck(path, "unrecorded", "no sha256 recorded (not downloaded by maisi)")
    size = path.stat().st_size
    if size != entry.get("size", size):
        return FileCheck(path, "mismatch", f"size {size} bytes, recorded {entry['size']}")
    digest = sha256_of(path)
    if digest != entry.get("sha256"):
        return FileCheck(path, "mismatch", f"sha256 {digest[:16]}…, recorded {entry.get('sha256', '')[:16]}…")
    return FileCheck(path, "ok")


def model_status(name: str) -> dict:
    """One row of ``maisi weights list --json`` (keys kept stable for the Slicer module).

    ``size_bytes`` is the size on disk when installed, else the approximate download size (None
    when unknown); each file row says whether it is present.
    """
    model = official_model(name)
    folder = model_dir(name)
    files = []
    for role, remote in model.files.items():
        path = folder / remote.repo_path
        present = path.is_file()
        files.append({"role": role, "name": remote.name, "path": str(path), "present": present,
                      "size_bytes": path.stat().st_size if present else remote.approx_bytes})
    sizes = [f["size_bytes"] for f in files]
    datasets = []
    for remote in model.datasets:
        present = _is_present(datasets_root(), remote)
        path = datasets_root() / (remote.unpacked_folder if remote.unpack else remote.repo_path)
        datasets.append({"name": remote.name, "path": str(path), "present": present,
                         "size_bytes": remote.approx_unpacked_bytes if remote.unpack else remote.approx_bytes})
    return {
        "model": name,
        "installed": all(f["present"] for f in files),
        "path": str(folder),
        "files": files,
        "size_bytes": None if None in sizes else sum(sizes),
        "license": model.license.name,
        "license_url": model.license.url,
        "license_accepted": license_accepted(name),
        "license_summary": model.license.summary,
        "repo": model.repo,
        "revision": model.revision,
        "datasets": datasets,
    }


def remove_model(name: str) -> list[Path]:
    """Delete a downloaded model's files (checkpoints, ``.part`` files, card, hashes) and its folder
    when nothing else is left in it. Datasets and licence acceptance are kept. Returns what was deleted."""
    model = official_model(name)
    folder = model_dir(name)
    removed = []
    candidates = [folder / MODEL_CARD, folder / HASHES_FILE]
    for remote in model.files.values():
        target = folder / remote.repo_path
        part = target.with_name(target.name + PART_SUFFIX)
        candidates += [target, part, validator_path(part)]
    for path in candidates:
        if path.is_file():
            path.unlink()
            removed.append(path)
    for leftover in [*folder.glob(".*.tmp*"), *folder.glob(f"{MODELS_SUBDIR}/.*.tmp*")]:
        leftover.unlink()  # temporary files of an interrupted atomic write
        removed.append(leftover)
    for empty in (folder / MODELS_SUBDIR, folder):
        if empty.is_dir() and not any(empty.iterdir()):
            empty.rmdir()
    return removed
