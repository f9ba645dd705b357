"""NVIDIA's official MAISI weights: where they are published, their licence, and their download
through ``huggingface_hub``.

What lives here:
- ``OFFICIAL_MODELS``: per model, its checkpoints (names from ``maisicore.models.presets``; the MR models'
  in their own repos, under their own licences, see ``_MR_REPOS``) in the
  Hugging Face repo ``nvidia/NV-Generate-CT`` (revision ``main``), approximate sizes, the licence,
  and the optional candidate-mask database, anatomy size database and mask generation networks
  (``--include-datasets``: what ``--anatomy`` and ``--anatomy-size`` need).
- Licence acceptance, remembered per model in ``$MAISI_HOME/licenses_accepted.json``.
- ``download_model``: the Hub's metadata of every file first (size, sha256), the free-disk check, then
  ``huggingface_hub.hf_hub_download`` into the model folder; each file is checked against the sha256
  the Hub publishes for LFS files (the git blob sha1 for small files) and recorded in ``hashes.json``.
- ``verify_model``, ``model_status``, ``remove_model`` for ``maisi weights verify | list | remove``.

What is NOT here: HTTP, redirects, retries and resuming a cut connection (``huggingface_hub``: it
also honours ``HF_TOKEN`` and proxies, and uses Xet storage when the Hub offers it), reading
checkpoints (``maisicore.models.weights``), argparse (``maisicore.cli``).

Layout: ``$MAISI_HOME/weights/MODEL/models/NAME.pt`` plus ``maisi_model.json`` (the card
``maisicore.models.weights`` reads) and ``hashes.json``; datasets in ``$MAISI_HOME/datasets/``, where
``maisi generate --anatomy`` looks by default (huggingface_hub keeps its own download metadata in
``.cache/huggingface/`` beside them). The server: ``--base-url``, else ``$MAISI_WEIGHTS_BASE_URL``,
else ``$HF_ENDPOINT``, else https://huggingface.co; any of them serves
``{base}/{repo}/resolve/{revision}/{path}`` as the Hub does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from ..anatomy.maskdb import CANDIDATE_MASK_INDEX, MASK_FILES_FOLDER
from ..errors import InputError
from ..io.volumes import atomic_write
from ..paths import DATASETS_SUBDIR, maisi_home
from .presets import MODEL_NAMES, get_mask_generation_preset, get_preset
from .weights import MODEL_CARD, MODELS_SUBDIR, default_weights_root

HF_REPO = "nvidia/NV-Generate-CT"
HF_REVISION = "main"
DEFAULT_BASE_URL = "https://huggingface.co"
BASE_URL_ENV = "MAISI_WEIGHTS_BASE_URL"  # a mirror for maisi only; HF_ENDPOINT is huggingface_hub's
HF_ENDPOINT_ENV = "HF_ENDPOINT"
DISK_FREE_ENV = "MAISI_DISK_FREE_BYTES"  # simulated free disk space, bytes (tests)
HASHES_FILE = "hashes.json"
LICENSES_FILE = "licenses_accepted.json"
HF_METADATA_FOLDER = ".cache"  # huggingface_hub's download metadata inside a local_dir
CHUNK_BYTES = 1 << 22
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")

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
    repo: str | None = None  # the Hugging Face repo holding it when not the model's (rflow-mr-brain's VAE)

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
    # The mask generation networks (``--anatomy-size``), into the model's folder with the datasets
    # (``--include-datasets``): what the paired modes need beyond image-from-mask.
    mask_files: tuple[RemoteFile, ...] = ()


# Approximate published sizes (bytes); the server's Content-Length replaces them at download time.
_APPROX_BYTES = {
    "autoencoder_v1.pt": 84_000_000,
    "diff_unet_3d_rflow-ct.pt": 2_200_000_000,
    "controlnet_3d_rflow-ct.pt": 288_000_000,
    "all_anatomy_size_conditions.json": 300_000,
    "mask_generation_autoencoder.pt": 84_000_000,
    "mask_generation_diffusion_unet.pt": 700_000_000,
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


NVIDIA_NONCOMMERCIAL_LICENSE = License(
    name="NVIDIA One-Way Noncommercial License",
    url="https://developer.download.nvidia.com/licenses/NVIDIA-OneWay-Noncommercial-License-22Mar2022.pdf",
    summary=(
        "NVIDIA publishes the rflow-mr weights (nvidia/NV-Generate-MR on Hugging Face) under its One-Way "
        "Noncommercial License: NON-COMMERCIAL USE ONLY (research or evaluation). You may use, reproduce and "
        "distribute the work and derivatives under the same licence with its notices kept; commercial use is "
        "not allowed (except by NVIDIA). This is a different licence from the CT weights' and is accepted on "
        "its own. Read the full text before accepting."
    ),
)

# The MR models (reference scripts/download_model_data.py): their own Hugging Face repos, no
# datasets; rflow-mr-brain takes the CT VAE from NV-Generate-CT.
_MR_REPOS = {"rflow-mr": ("nvidia/NV-Generate-MR", NVIDIA_NONCOMMERCIAL_LICENSE),
             "rflow-mr-brain": ("nvidia/NV-Generate-MR-Brain", NVIDIA_OPEN_MODEL_LICENSE)}
_MR_FILES_ELSEWHERE = {("rflow-mr-brain", "autoencoder"): HF_REPO}


def _official_mr_model(name: str) -> OfficialModel:
    repo, license = _MR_REPOS[name]
    files = {role: RemoteFile(f"{MODELS_SUBDIR}/{file}", _APPROX_BYTES.get(file), repo=_MR_FILES_ELSEWHERE.get((name, role)))
             for role, file in get_preset(name).weight_files.as_dict().items()}
    return OfficialModel(name=name, files=files, datasets=(), license=license, repo=repo)


def _official_model(name: str) -> OfficialModel:
    if name in _MR_REPOS:
        return _official_mr_model(name)
    names = get_preset(name).weight_files.as_dict()
    files = {role: RemoteFile(f"{MODELS_SUBDIR}/{file}", _APPROX_BYTES.get(file)) for role, file in names.items()}
    datasets = (_ANATOMY_SIZES, RemoteFile(_MASK_INDEX[name]), _MASK_ARCHIVE)
    mask_files = tuple(RemoteFile(f"{MODELS_SUBDIR}/{file}", _APPROX_BYTES.get(file))
                       for file in get_mask_generation_preset("official").weight_files)
    return OfficialModel(name=name, files=files, datasets=datasets, license=NVIDIA_OPEN_MODEL_LICENSE,
                         mask_files=mask_files)


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
    """The server to download from: ``base_url``, else ``$MAISI_WEIGHTS_BASE_URL``, else
    ``$HF_ENDPOINT``, else Hugging Face."""
    source, chosen = "default base URL", DEFAULT_BASE_URL
    for name, value in (("--base-url", base_url), (BASE_URL_ENV, os.environ.get(BASE_URL_ENV)),
                        (HF_ENDPOINT_ENV, os.environ.get(HF_ENDPOINT_ENV))):
        if value:
            source, chosen = name, value
            break
    if not re.match(r"^https?://[^/\s]+", chosen):
        raise InputError(f"{source} {chosen!r}: must be an http:// or https:// URL (e.g. {DEFAULT_BASE_URL})")
    return chosen.rstrip("/")


def file_url(base_url: str, model: OfficialModel, remote: RemoteFile) -> str:
    """URL of ``remote`` on the server: ``{base_url}/{repo}/resolve/{revision}/{path}``."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(remote.repo or model.repo, remote.repo_path, revision=model.revision, endpoint=base_url)


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
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """Git's blob id of a file (sha1 of ``blob SIZE\\0`` + content): the Hub's ETag of a non-LFS file."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # noqa: S324 - git's id, not a security hash
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def read_hashes(folder: Path) -> dict[str, dict]:
    """``folder/hashes.json``: relative path -> {"sha256", "size", "recorded", "url", "published"[, "unpacked_to"]}."""
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


# ---- the Hub ------------------------------------------------------------------------------------


@dataclass
class Transfer:
    """One file to fetch into ``root/remote.repo_path``, with what the Hub says of it: ``size``
    (bytes) and ``etag`` (the sha256 of an LFS file, the git blob sha1 of a small one)."""

    remote: RemoteFile
    url: str
    root: Path
    size: int | None = None
    etag: str | None = None

    @property
    def target(self) -> Path:
        return self.root / self.remote.repo_path

    @property
    def published_sha256(self) -> str | None:
        return self.etag if self.etag and _SHA256.fullmatch(self.etag) else None

    def bytes_needed(self) -> int:
        """Disk space needed (bytes): the file, plus its unpacked size for a zip."""
        size = self.size if self.size is not None else (self.remote.approx_bytes or 0)
        unpacked = 0
        if self.remote.unpack and self.remote.approx_bytes and self.remote.approx_unpacked_bytes:
            unpacked = size * self.remote.approx_unpacked_bytes // self.remote.approx_bytes  # published ratio
        return size + unpacked


def _hub_error(exc: BaseException, url: str, name: str) -> InputError:
    """One line for a failed request to the Hub: what the server said and what to do."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError) or status in (401, 403):
        return InputError(
            f"{url}: the server refused access ({status}); the repository is gated or private for you: accept its "
            f"terms on the Hub and set HF_TOKEN to a token of that account (or run `hf auth login`)"
        )
    if status == 404:
        return InputError(f"{url}: the server answered 404 (no such file): check --base-url, "
                          f"{BASE_URL_ENV} or {HF_ENDPOINT_ENV}")
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, HfHubHTTPError):
        return InputError(f"the weights server answered {status} for {url} ({reason[:200]}); try again later, then "
                          f"run `maisi weights download {name}` again")
    return InputError(f"cannot reach the weights server ({type(exc).__name__}: {reason[:200]}); check the network, "
                      f"--base-url or {HF_ENDPOINT_ENV}, then run `maisi weights download {name}` again")


def _ask_hub(transfer: Transfer, name: str) -> None:
    """Fill ``size`` and ``etag`` from a HEAD request (``huggingface_hub.get_hf_file_metadata``)."""
    from huggingface_hub import get_hf_file_metadata

    try:
        metadata = get_hf_file_metadata(transfer.url)
    except Exception as exc:  # the library's HTTP and transport errors: one line, nothing written
        raise _hub_error(exc, transfer.url, name) from None
    transfer.size, transfer.etag = metadata.size, (metadata.etag or "").strip('"').lower() or None


# ---- download -----------------------------------------------------------------------------------


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
    """The files still missing (model files, then datasets and mask networks when asked), with their URLs."""
    model = official_model(name)
    transfers = [Transfer(r, file_url(base_url, model, r), model_dir(name)) for r in model.files.values()]
    if include_datasets:
        transfers += [Transfer(r, file_url(base_url, model, r), datasets_root()) for r in model.datasets]
        transfers += [Transfer(r, file_url(base_url, model, r), model_dir(name)) for r in model.mask_files]
    return [t for t in transfers if not _is_present(t.root, t.remote)]


def _check_unchanged(transfer: Transfer, name: str) -> None:
    """Refuse a file whose published sha256 differs from the one recorded at the first download."""
    recorded = recorded_hash(transfer.root, transfer.remote) or {}
    published = transfer.published_sha256
    if published and recorded.get("sha256") and recorded["sha256"] != published:
        hashes_file = _hash_place(transfer.root, transfer.remote)[0] / HASHES_FILE
        forget = f"`maisi weights remove {name} --yes`, or edit {hashes_file}"
        if transfer.remote.repo_path.startswith(DATASETS_SUBDIR + "/"):
            forget = f"edit {hashes_file}"
        raise InputError(
            f"{transfer.target}: the published file's sha256 {published[:16]}… differs from {recorded['sha256'][:16]}… "
            f"recorded at the first download (the file changed on the Hub); to accept the new file, forget the old "
            f"hash ({forget}) and download again"
        )


def download_model(
    name: str,
    accept_license: bool = False,
    base_url: str | None = None,
    include_datasets: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> DownloadReport:
    """Download the official weights of ``name`` into ``$MAISI_HOME/weights/NAME`` (see module doc).

    Order: licence, the Hub's metadata of every missing file (a file that changed since its first
    download is refused), free disk, then each file; nothing is written before these checks pass.
    A failed transfer raises a one-line ``InputError`` saying to run the command again (complete
    files are kept; huggingface_hub resumes a cut connection itself within a run).
    """
    # 1. Check everything before writing anything.
    model = official_model(name)
    base_url = resolve_base_url(base_url)
    new_acceptance = check_license(name, accept_license)
    folder = model_dir(name)
    free = free_disk_bytes(folder)
    transfers = plan_download(name, base_url, include_datasets)
    for transfer in transfers:
        _ask_hub(transfer, name)
        _check_unchanged(transfer, name)
    needed = sum(t.bytes_needed() for t in transfers)
    if needed > free:
        simulated = f" (${DISK_FREE_ENV})" if os.environ.get(DISK_FREE_ENV) is not None else ""
        raise InputError(
            f"not enough free disk space for {name}: {human_bytes(needed)} to download, {human_bytes(free)} free"
            f"{simulated} under {maisi_home()}; free some space or set MAISI_HOME to a larger disk"
        )

    # 2. Remember the licence, then fetch, check and record each file.
    if new_acceptance:
        path = record_license_acceptance(name)
        log(f"{model.license.name} ({model.license.url}): {model.license.summary}")
        log(f"{model.license.name} accepted for {name} (remembered in {path})")
    fetched, received = _fetch_all(name, model, base_url, transfers, show_progress, log)

    # 3. The card `maisi generate --model NAME` reads, once all three checkpoints are in place.
    if all((folder / r.repo_path).is_file() for r in model.files.values()):
        card = {"model": name, "width": "official", "origin": f"{base_url}/{model.repo}@{model.revision}",
                "license": model.license.name, "license_url": model.license.url}
        _write_json(folder / MODEL_CARD, card)
    skipped = [folder / r.repo_path for r in model.files.values() if folder / r.repo_path not in fetched]
    return DownloadReport(name, folder, fetched, skipped, received, new_acceptance)


def _fetch_all(name: str, model: OfficialModel, base_url: str, transfers: list[Transfer], show_progress: bool,
               log) -> tuple[list[Path], int]:
    """``hf_hub_download`` each transfer into its root, check and record it; returns the placed
    paths and the bytes received."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    again = f"run `maisi weights download {name}` again to resume (complete files are kept)"
    bars_were_off = are_progress_bars_disabled()
    if not show_progress:
        disable_progress_bars()
    fetched, received = [], 0
    try:
        for transfer in transfers:
            log(f"downloading {transfer.remote.repo_path} ({human_bytes(transfer.size)}) from {transfer.url}")
            try:
                hf_hub_download(transfer.remote.repo or model.repo, transfer.remote.repo_path, revision=model.revision,
                                local_dir=transfer.root, endpoint=base_url)
            except KeyboardInterrupt:
                log(f"{transfer.remote.name}: download stopped; {again}")
                raise
            except Exception as exc:  # the library's HTTP, transport and size-check errors
                if isinstance(exc, InputError):
                    raise
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if status in (401, 403, 404):
                    raise _hub_error(exc, transfer.url, name) from None
                raise InputError(f"download of {transfer.remote.repo_path} interrupted ({type(exc).__name__}: "
                                 f"{reason[:200]}); {again}") from None
            received += transfer.target.stat().st_size
            _check_and_place(transfer, name)
            fetched.append(transfer.target)
    finally:
        if not show_progress and not bars_were_off:
            enable_progress_bars()
    return fetched, received


def _forget_download(transfer: Transfer) -> None:
    """Delete a placed file and huggingface_hub's metadata of it, so the next run fetches it again."""
    transfer.target.unlink(missing_ok=True)
    metadata = transfer.root / HF_METADATA_FOLDER / "huggingface" / "download" / f"{transfer.remote.repo_path}.metadata"
    metadata.unlink(missing_ok=True)


def _check_and_place(transfer: Transfer, name: str) -> None:
    """Check the downloaded file against the Hub's sha256 (LFS) or git blob sha1, record its
    sha256 in ``hashes.json``, and unpack a zip."""
    target = transfer.target
    digest = sha256_of(target)
    published, kind = transfer.published_sha256, "sha256"
    actual = digest
    if published is None and transfer.etag and _GIT_SHA1.fullmatch(transfer.etag):
        published, kind, actual = transfer.etag, "git blob sha1", git_blob_sha1(target)
    if published is not None and actual != published:
        _forget_download(transfer)
        raise InputError(
            f"{target}: the downloaded file's {kind} {actual[:16]}… differs from the {published[:16]}… the server "
            f"publishes (corrupted on the way, or the mirror serves another file); deleted: run "
            f"`maisi weights download {name}` again"
        )
    entry = {"sha256": digest, "size": target.stat().st_size, "url": transfer.url,
             "recorded": (recorded_hash(transfer.root, transfer.remote) or {}).get("recorded", _now()),
             "published": kind if published is not None else None}
    _record_hash(transfer.root, transfer.remote, entry)
    if transfer.remote.unpack:
        entry["unpacked_to"] = _unpack(target, transfer.root / transfer.remote.unpacked_folder)
        target.unlink()
        _record_hash(transfer.root, transfer.remote, entry)


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
        checks += [_check_file(model_dir(name), r) for r in model.mask_files if recorded_hash(model_dir(name), r)]
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
    """Delete a downloaded model's files (checkpoints, card, hashes, huggingface_hub's download
    metadata) and its folder when nothing else is left in it. Datasets and licence acceptance are
    kept. Returns the files deleted."""
    model = official_model(name)
    folder = model_dir(name)
    removed = []
    candidates = [folder / MODEL_CARD, folder / HASHES_FILE] + [folder / r.repo_path for r in model.files.values()]
    metadata = folder / HF_METADATA_FOLDER
    candidates += sorted(p for p in metadata.rglob("*") if p.is_file()) if metadata.is_dir() else []
    candidates += [*folder.glob(".*.tmp*"), *folder.glob(f"{MODELS_SUBDIR}/.*.tmp*")]  # interrupted atomic writes
    for path in candidates:
        if path.is_file():
            path.unlink()
            removed.append(path)
    if metadata.is_dir():
        shutil.rmtree(metadata)
    for empty in (folder / MODELS_SUBDIR, folder):
        if empty.is_dir() and not any(empty.iterdir()):
            empty.rmdir()
    return removed
