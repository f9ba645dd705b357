"""`maisi weights download | list | verify | path | remove` against a real HTTP server on 127.0.0.1.

The server serves small random files in Hugging Face's URL layout, answers HEAD and Range requests,
can cut a connection after N bytes or ignore ranges, and logs every request with the bytes it sent.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import run_maisi, run_maisi_in_process
from maisicore.models.presets import get_preset

REPO_PREFIX = "nvidia/NV-Generate-CT/resolve/main"
MODEL = "rflow-ct"
WEIGHT_NAMES = list(get_preset(MODEL).weight_files.as_dict().values())  # autoencoder, UNet, ControlNet
SIZES = {WEIGHT_NAMES[0]: 200_003, WEIGHT_NAMES[1]: 300_007, WEIGHT_NAMES[2]: 250_001}
MASK_INDEX = "candidate_masks_flexible_size_and_spacing_4000.json"
MASK_ARCHIVE = "all_masks_flexible_size_and_spacing_4000.zip"


class FileServer:
    """ThreadingHTTPServer in a thread serving ``root`` (paths as in the URL)."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[dict] = []
        self.cut_after: dict[str, int] = {}  # URL path -> bytes to send before closing (used once)
        self.ignore_range = False  # answer 200 with the whole file even to a Range request
        self.redirect = False  # send /REPO/resolve/... to /cdn/... with a 302, as Hugging Face does
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def gets(self, name: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == "GET" and r["path"].endswith("/" + name)]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_HEAD(self):
                self._serve(send_body=False)

            def do_GET(self):
                self._serve(send_body=True)

            def _serve(self, send_body: bool):
                record = {"method": self.command, "path": self.path, "range": self.headers.get("Range"),
                          "status": None, "bytes_sent": 0}
                server.requests.append(record)
                if server.redirect and self.path.startswith(f"/{REPO_PREFIX}/"):
                    record["status"] = 302
                    self.send_response(302)
                    self.send_header("Location", "/cdn/" + self.path[len(REPO_PREFIX) + 2:])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                url_path = self.path
                if url_path.startswith("/cdn/"):
                    url_path = f"/{REPO_PREFIX}/" + url_path[len("/cdn/"):]
                path = (server.root / unquote(url_path.lstrip("/"))).resolve()
                if server.root.resolve() not in path.parents or not path.is_file():
                    record["status"] = 404
                    self.send_error(404)
                    return
                data = path.read_bytes()
                etag = f'"{hashlib.sha256(data).hexdigest()}"'
                record["if_range"] = self.headers.get("If-Range")
                start, status = 0, 200
                asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                unchanged = record["if_range"] in (None, etag)  # If-Range: a range only of this version
                if asked and unchanged and not server.ignore_range:
                    start, status = int(asked.group(1)), 206
                    if start >= len(data):
                        record["status"] = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                record["status"] = status
                self.send_response(status)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", etag)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not send_body:
                    return
                body = data[start:]
                cut = server.cut_after.pop(url_path, None)
                if cut is not None:
                    body = body[:cut]  # then the connection closes (HTTP/1.0) short of Content-Length
                self.wfile.write(body)
                self.wfile.flush()
                record["bytes_sent"] = len(body)

        return Handler


@pytest.fixture
def published(tmp_path) -> dict[str, bytes]:
    """The three checkpoints as the server publishes them (random bytes, a few hundred KB)."""
    rng = random.Random(8)
    contents = {name: rng.randbytes(size) for name, size in SIZES.items()}
    for name, data in contents.items():
        target = tmp_path / "server" / REPO_PREFIX / "models" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return contents


@pytest.fixture
def server(tmp_path, published):
    served = FileServer(tmp_path / "server")
    served.thread.start()
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh $MAISI_HOME; no proxy, mirror or disk-budget settings leak in from the caller."""
    folder = tmp_path / "maisi-home"
    monkeypatch.setenv("MAISI_HOME", str(folder))
    for name in ("MAISI_WEIGHTS_BASE_URL", "MAISI_DISK_FREE_BYTES", "http_proxy", "HTTP_PROXY", "https_proxy",
                 "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return folder


def _download(server: FileServer, *extra, real_process: bool = False) -> object:
    """`maisi weights download MODEL` from the server: in this process, or as the real program."""
    if real_process:
        return run_maisi("weights", "download", MODEL, "--base-url", server.base_url, *extra, timeout=300)
    return run_maisi_in_process("weights", "download", MODEL, "--base-url", server.base_url, *extra)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def _error_line(stderr: str) -> str:
    """The one `maisi: error:` line (progress lines may come before it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("maisi: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_full_download_then_verify_path_and_list(server, home, published):
    result = _download(server, "--accept-license")
    assert result.returncode == 0, result.stderr
    folder = home / "weights" / MODEL
    assert "downloaded rflow-ct" in result.stdout
    # Files byte-identical, in the reference layout, each fetched once with no refetch.
    for name, data in published.items():
        assert (folder / "models" / name).read_bytes() == data
        gets = server.gets(name)
        assert len(gets) == 1 and gets[0]["range"] is None and gets[0]["bytes_sent"] == len(data)
    assert sorted(p.name for p in (folder / "models").iterdir()) == sorted(published)  # no .part left
    hashes = json.loads((folder / "hashes.json").read_text())
    assert {k: (v["sha256"], v["size"]) for k, v in hashes.items()} == {
        f"models/{name}": (_sha256(data), len(data)) for name, data in published.items()
    }
    card = json.loads((folder / "maisi_model.json").read_text())
    assert (card["model"], card["width"]) == (MODEL, "official")
    accepted = json.loads((home / "licenses_accepted.json").read_text())
    assert accepted[MODEL]["license"] == "NVIDIA Open Model License"

    # `maisi generate --model rflow-ct` resolves this folder (the weights.py view of it).
    from maisicore.models.weights import check_weight_files, resolve_model

    preset, resolved = resolve_model(MODEL, None)
    assert (preset.key, resolved) == ("rflow-ct/official", folder)
    assert {p.name for p in check_weight_files(preset, resolved).values()} == set(published)

    verify = run_maisi_in_process("weights", "verify", MODEL)
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.splitlines()[-1] == "ok: 3 file(s) match their recorded sha256"

    where = run_maisi_in_process("weights", "path", MODEL)
    assert (where.returncode, where.stdout.strip()) == (0, str(folder))

    listing = run_maisi_in_process("weights", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {row["model"]: row for row in json.loads(listing.stdout)}
    assert set(rows) == {"rflow-ct", "ddpm-ct"}
    row = rows[MODEL]
    assert (row["installed"], row["path"], row["license_accepted"]) == (True, str(folder), True)
    assert row["size_bytes"] == sum(SIZES.values())
    assert [f["name"] for f in row["files"]] == WEIGHT_NAMES and all(f["present"] for f in row["files"])
    assert row["license"] == "NVIDIA Open Model License" and row["license_url"].startswith("https://www.nvidia.com/")
    assert (rows["ddpm-ct"]["installed"], rows["ddpm-ct"]["license_accepted"]) == (False, False)

    # A second run fetches nothing.
    requests_before = len(server.requests)
    again = _download(server)
    assert again.returncode == 0 and "already downloaded" in again.stdout
    assert [r for r in server.requests[requests_before:] if r["method"] == "GET"] == []


def test_redirects_are_followed_and_head_stays_head(server, home, published, monkeypatch):
    server.redirect = True
    monkeypatch.setenv("MAISI_DISK_FREE_BYTES", "10")
    refused = _download(server, "--accept-license")
    assert refused.returncode == 2 and "not enough free disk space" in _one_line(refused.stderr)
    assert [(r["method"], r["status"]) for r in server.requests] == [("HEAD", 302), ("HEAD", 200)] * 3
    monkeypatch.delenv("MAISI_DISK_FREE_BYTES")
    server.cut_after[f"/{REPO_PREFIX}/models/{WEIGHT_NAMES[1]}"] = 1000
    assert _download(server, "--accept-license").returncode == 2
    assert _download(server).returncode == 0  # resumed through the redirect
    resumed = [r for r in server.requests if r["method"] == "GET" and r["path"].startswith("/cdn/")][-2]
    expected = ("bytes=1000-", 206, SIZES[WEIGHT_NAMES[1]] - 1000)
    assert (resumed["range"], resumed["status"], resumed["bytes_sent"]) == expected
    for name, data in published.items():
        assert (home / "weights" / MODEL / "models" / name).read_bytes() == data


def test_cut_connection_resumes_with_a_range_request(server, home, published, monkeypatch):
    unet = WEIGHT_NAMES[1]
    unet_url_path = f"/{REPO_PREFIX}/models/{unet}"
    cut = 123_457
    server.cut_after[unet_url_path] = cut

    first = _download(server, "--accept-license")
    assert first.returncode == 2
    message = _error_line(first.stderr)
    assert "interrupted" in message and "run `maisi weights download rflow-ct` again to resume" in message
    models = home / "weights" / MODEL / "models"
    part = models / f"{unet}.part"
    assert part.read_bytes() == published[unet][:cut]
    assert not (models / unet).exists() and not (models / WEIGHT_NAMES[2]).exists()
    assert not (home / "weights" / MODEL / "maisi_model.json").exists()

    # The disk check counts only what is still missing: exactly that much free space is enough.
    remaining = SIZES[unet] - cut + SIZES[WEIGHT_NAMES[2]]
    monkeypatch.setenv("MAISI_DISK_FREE_BYTES", str(remaining))
    second = _download(server)
    assert second.returncode == 0, second.stderr
    gets = server.gets(unet)
    assert [(g["range"], g["status"]) for g in gets] == [(None, 200), (f"bytes={cut}-", 206)]
    assert [g["bytes_sent"] for g in gets] == [cut, SIZES[unet] - cut]
    assert sum(g["bytes_sent"] for g in gets) == SIZES[unet]  # nothing fetched twice
    assert len(server.gets(WEIGHT_NAMES[0])) == 1  # the finished file is not asked for again
    for name, data in published.items():
        assert (models / name).read_bytes() == data
    assert not part.exists()
    hashes = json.loads((home / "weights" / MODEL / "hashes.json").read_text())
    assert hashes[f"models/{unet}"]["sha256"] == _sha256(published[unet])


def test_server_ignoring_range_restarts_the_file_cleanly(server, home, published):
    unet = WEIGHT_NAMES[1]
    cut = 50_000
    server.cut_after[f"/{REPO_PREFIX}/models/{unet}"] = cut
    assert _download(server, "--accept-license").returncode == 2
    server.ignore_range = True
    result = _download(server)
    assert result.returncode == 0, result.stderr
    gets = server.gets(unet)
    assert [(g["range"], g["status"], g["bytes_sent"]) for g in gets] == [
        (None, 200, cut), (f"bytes={cut}-", 200, SIZES[unet])
    ]
    assert (home / "weights" / MODEL / "models" / unet).read_bytes() == published[unet]


def test_file_changed_on_the_server_between_runs_restarts_with_if_range(server, home, published, tmp_path):
    unet = WEIGHT_NAMES[1]
    cut = 70_000
    server.cut_after[f"/{REPO_PREFIX}/models/{unet}"] = cut
    assert _download(server, "--accept-license").returncode == 2
    part = home / "weights" / MODEL / "models" / f"{unet}.part"
    old_etag = f'"{_sha256(published[unet])}"'
    assert part.with_name(part.name + ".validator").read_text().strip() == old_etag
    new_version = random.Random(9).randbytes(SIZES[unet])
    (tmp_path / "server" / REPO_PREFIX / "models" / unet).write_bytes(new_version)

    result = _download(server)
    assert result.returncode == 0, result.stderr
    gets = server.gets(unet)
    assert [(g["range"], g["if_range"], g["status"], g["bytes_sent"]) for g in gets] == [
        (None, None, 200, cut), (f"bytes={cut}-", old_etag, 200, SIZES[unet])
    ]
    placed = home / "weights" / MODEL / "models" / unet
    assert placed.read_bytes() == new_version  # no mix of the two versions
    assert json.loads((home / "weights" / MODEL / "hashes.json").read_text())[f"models/{unet}"]["sha256"] == (
        _sha256(new_version))
    assert sorted(p.name for p in placed.parent.iterdir()) == sorted(published)  # no .part, no .validator


@pytest.mark.skipif(sys.platform == "win32", reason="the test holds the lock with fcntl")
def test_second_download_at_the_same_time_is_refused(server, home, published):
    import fcntl

    home.mkdir()
    with open(home / ".download.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = _download(server, "--accept-license")  # another process
    assert result.returncode == 2 and "another `maisi weights download`" in _one_line(result.stderr)
    assert not (home / "weights").exists() and not (home / "licenses_accepted.json").exists()


def test_verify_names_a_corrupted_or_missing_file(server, home, published):
    assert _download(server, "--accept-license").returncode == 0
    controlnet = home / "weights" / MODEL / "models" / WEIGHT_NAMES[2]
    data = bytearray(controlnet.read_bytes())
    data[1000] ^= 0xFF  # same size, one byte flipped
    controlnet.write_bytes(bytes(data))
    result = run_maisi_in_process("weights", "verify")
    assert result.returncode == 1
    assert f"mismatch   {controlnet} (sha256 {_sha256(bytes(data))[:16]}…" in result.stdout
    assert str(controlnet) in _one_line(result.stderr) and "verify failed" in result.stderr

    # Deleting it and downloading again fetches just that file, checked against the first hash.
    controlnet.unlink()
    missing = run_maisi_in_process("weights", "verify", MODEL)
    assert missing.returncode == 1 and f"missing    {controlnet}" in missing.stdout
    assert _download(server).returncode == 0
    assert len(server.gets(WEIGHT_NAMES[2])) == 2 and len(server.gets(WEIGHT_NAMES[0])) == 1
    assert run_maisi_in_process("weights", "verify", MODEL).returncode == 0


def test_changed_server_file_is_refused_against_the_recorded_hash(server, home, published, tmp_path):
    assert _download(server, "--accept-license").returncode == 0
    ae_name = WEIGHT_NAMES[0]
    (home / "weights" / MODEL / "models" / ae_name).unlink()
    (tmp_path / "server" / REPO_PREFIX / "models" / ae_name).write_bytes(b"x" * SIZES[ae_name])
    result = _download(server)
    assert result.returncode == 2
    assert "differs from" in _error_line(result.stderr) and ae_name in result.stderr
    models = home / "weights" / MODEL / "models"
    assert not (models / ae_name).exists() and not (models / f"{ae_name}.part").exists()


def test_licence_refused_then_accepted_and_remembered_across_remove(server, home, published):
    refused = _download(server)
    assert refused.returncode == 2
    line = _one_line(refused.stderr)
    assert "NVIDIA Open Model License" in line and "--accept-license" in line and "nvidia.com" in line
    assert not home.exists() and server.requests == []  # nothing written, nothing asked

    assert _download(server, "--accept-license").returncode == 0
    no_confirm = run_maisi_in_process("weights", "remove", MODEL)  # stdin is not a terminal: needs --yes
    assert no_confirm.returncode == 2 and "--yes" in _one_line(no_confirm.stderr)
    assert (home / "weights" / MODEL / "models" / WEIGHT_NAMES[0]).is_file()

    removed = run_maisi_in_process("weights", "remove", MODEL, "--yes")
    assert removed.returncode == 0, removed.stderr
    assert "5 file(s) deleted" in removed.stdout  # 3 checkpoints, card, hashes.json
    assert not (home / "weights" / MODEL).exists()
    assert json.loads((home / "licenses_accepted.json").read_text())[MODEL]["license"] == "NVIDIA Open Model License"
    rows = {r["model"]: r for r in json.loads(run_maisi_in_process("weights", "list", "--json").stdout)}
    assert (rows[MODEL]["installed"], rows[MODEL]["license_accepted"]) == (False, True)

    again = _download(server)  # no --accept-license: remembered
    assert again.returncode == 0, again.stderr
    assert all(len(server.gets(name)) == 2 for name in WEIGHT_NAMES)


def test_disk_check_refuses_before_writing(server, home, published, monkeypatch):
    total = sum(SIZES.values())
    monkeypatch.setenv("MAISI_DISK_FREE_BYTES", str(total - 1))
    refused = _download(server, "--accept-license")
    assert refused.returncode == 2
    line = _one_line(refused.stderr)
    assert "not enough free disk space" in line and "MAISI_DISK_FREE_BYTES" in line
    assert _files_under(home) == []  # not even the licence acceptance
    assert {r["method"] for r in server.requests} == {"HEAD"} and len(server.requests) == 3

    monkeypatch.setenv("MAISI_DISK_FREE_BYTES", str(total))  # exactly enough
    assert _download(server, "--accept-license").returncode == 0

    monkeypatch.setenv("MAISI_DISK_FREE_BYTES", "lots")
    bad = run_maisi_in_process("weights", "download", "ddpm-ct", "--accept-license", "--base-url", server.base_url)
    assert bad.returncode == 2 and "MAISI_DISK_FREE_BYTES='lots'" in _one_line(bad.stderr)
    assert not (home / "weights" / "ddpm-ct").exists()


def test_bad_inputs_are_one_line_exit_2(server, home):
    for args, expected in [
        (("weights", "download", "rflow-ct", "--base-url", "ftp://mirror"), "must be an http:// or https:// URL"),
        (("weights", "download", "no-such-model"), "invalid choice"),
        (("weights", "path", "no-such-model"), "invalid choice"),
    ]:
        result = run_maisi_in_process(*args)
        assert result.returncode == 2 and expected in _one_line(result.stderr), result.stderr
    missing = run_maisi_in_process("weights", "download", MODEL, "--accept-license", "--base-url", server.base_url + "/nothing")
    assert missing.returncode == 2 and "404" in _one_line(missing.stderr)
    assert not (home / "weights").exists()


def test_datasets_are_downloaded_and_unpacked(server, home, published, tmp_path, monkeypatch):
    datasets = tmp_path / "server" / REPO_PREFIX / "datasets"
    datasets.mkdir(parents=True)
    index = json.dumps([{"pseudo_label_filename": "a/mask_1.nii.gz", "label_list": [1, 200]}]).encode()
    (datasets / MASK_INDEX).write_bytes(index)
    (datasets / "all_anatomy_size_conditions.json").write_bytes(b"[]")
    with zipfile.ZipFile(datasets / MASK_ARCHIVE, "w") as archive:
        archive.writestr("all_masks_flexible_size_and_spacing_4000/a/mask_1.nii.gz", b"mask bytes")
    monkeypatch.setenv("MAISI_WEIGHTS_BASE_URL", server.base_url)  # the mirror from the environment

    result = run_maisi_in_process("weights", "download", MODEL, "--accept-license", "--include-datasets")
    assert result.returncode == 0, result.stderr
    local = home / "datasets"
    assert (local / MASK_INDEX).read_bytes() == index
    assert (local / "all_masks_flexible_size_and_spacing_4000" / "a" / "mask_1.nii.gz").read_bytes() == b"mask bytes"
    assert not (local / MASK_ARCHIVE).exists() and not (local / f"{MASK_ARCHIVE}.part").exists()
    hashes = json.loads((local / "hashes.json").read_text())
    assert sorted(hashes) == sorted([MASK_INDEX, MASK_ARCHIVE, "all_anatomy_size_conditions.json"])
    assert hashes[MASK_INDEX]["sha256"] == _sha256(index)
    assert hashes[MASK_ARCHIVE]["sha256"] == _sha256((datasets / MASK_ARCHIVE).read_bytes())
    assert hashes[MASK_ARCHIVE]["unpacked_to"] == "all_masks_flexible_size_and_spacing_4000"
    verify = run_maisi_in_process("weights", "verify", MODEL)
    assert verify.returncode == 0 and verify.stdout.splitlines()[-1] == "ok: 6 file(s) match their recorded sha256"


def test_archive_member_outside_its_folder_is_refused(server, home, published, tmp_path, monkeypatch):
    datasets = tmp_path / "server" / REPO_PREFIX / "datasets"
    datasets.mkdir(parents=True)
    (datasets / MASK_INDEX).write_bytes(b"[]")
    (datasets / "all_anatomy_size_conditions.json").write_bytes(b"[]")
    with zipfile.ZipFile(datasets / MASK_ARCHIVE, "w") as archive:
        archive.writestr("../escaped.txt", b"no")
    result = _download(server, "--accept-license", "--include-datasets")
    assert result.returncode == 2 and "points outside the archive" in _error_line(result.stderr)
    assert not (home / "escaped.txt").exists() and not (home / "datasets" / "escaped.txt").exists()
    assert not (home / "datasets" / "all_masks_flexible_size_and_spacing_4000").exists()
