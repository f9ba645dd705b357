"""`maisi weights download | list | verify | path | remove` against real HTTP servers on 127.0.0.1
that speak the Hugging Face Hub's download protocol as huggingface_hub uses it.

The "Hub" answers HEAD/GET on /{repo}/resolve/{revision}/{path} with X-Repo-Commit; small files (JSON)
come back directly with their git blob sha1 as ETag; LFS files (checkpoints, zips) are a 302 to a
"CDN" on another port, with X-Linked-Etag (their sha256) and X-Linked-Size, as the Hub sends them.
The CDN serves Range requests and can cut a connection after N bytes, refuse the next request,
ignore ranges or corrupt the bytes. Both log every request with the bytes they sent. Last, `weights
verify --load` on a tiny weight set: key mismatches reported, the allow-list honoured.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from conftest import run_maisi_in_process
from maisicore.models.presets import get_preset

REPO = "nvidia/NV-Generate-CT"
REPO_PREFIX = f"{REPO}/resolve/main"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL = "rflow-ct"
WEIGHT_NAMES = list(get_preset(MODEL).weight_files.as_dict().values())  # autoencoder, UNet, ControlNet
SIZES = {WEIGHT_NAMES[0]: 200_003, WEIGHT_NAMES[1]: 300_007, WEIGHT_NAMES[2]: 250_001}
MASK_NETWORKS = ["mask_generation_autoencoder.pt", "mask_generation_diffusion_unet.pt"]  # NVIDIA's names
MASK_INDEX = "candidate_masks_flexible_size_and_spacing_4000.json"
MASK_ARCHIVE = "all_masks_flexible_size_and_spacing_4000.zip"
TOKEN = "hf_test_token_of_an_account_that_accepted_the_terms"


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FileServer:
    """The Hub and its CDN: two ThreadingHTTPServers in threads serving ``root`` (paths as in the
    Hub's URLs: ``root/REPO/resolve/main/PATH``)."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[dict] = []
        self.cut_after: dict[str, int] = {}  # repo path -> bytes the CDN sends before closing (used once)
        self.refuse_after_cut: set[str] = set()  # repo paths whose next CDN request after a cut gets a 503
        self._refuse_next: set[str] = set()
        self.corrupt: set[str] = set()  # repo paths whose CDN bytes differ from the published sha256
        self.ignore_range = False  # the CDN answers 200 with the whole file even to a Range request
        self.token: str | None = None  # when set, the Hub wants "Authorization: Bearer TOKEN" (a gated repo)
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("hub"))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("cdn"))
        self.threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
                        for s in (self.hub, self.cdn)]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    def gets(self, name: str) -> list[dict]:
        """The CDN's GETs of LFS file ``name`` (or the Hub's GETs of a small file)."""
        return [r for r in self.requests if r["method"] == "GET" and r["path"].endswith("/" + name)]

    def _handler(self, role: str):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_HEAD(self):
                self._serve(send_body=False)

            def do_GET(self):
                self._serve(send_body=True)

            def _reply(self, record: dict, status: int, headers: dict, body: bytes = b"", send_body: bool = True):
                record["status"] = status
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Connection", "close")
                self.end_headers()
                if send_body and body:
                    self.wfile.write(body)
                    record["bytes_sent"] = len(body)
                self.close_connection = True

            def _serve(self, send_body: bool):
                path = urlsplit(self.path).path
                record = {"server": role, "method": self.command, "path": path, "range": self.headers.get("Range"),
                          "authorization": self.headers.get("Authorization"), "status": None, "bytes_sent": 0}
                server.requests.append(record)
                prefix = f"/{REPO_PREFIX}/" if role == "hub" else f"/cdn/{REPO}/"
                repo_path = unquote(path[len(prefix):]) if path.startswith(prefix) else None
                file = (server.root / REPO_PREFIX / repo_path).resolve() if repo_path else None
                if file is None or server.root.resolve() not in file.parents or not file.is_file():
                    self._reply(record, 404, {"Content-Length": "0", "X-Error-Code": "EntryNotFound"})
                    return
                data = file.read_bytes()
                lfs = not repo_path.endswith(".json")
                if role == "hub":
                    if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                        self._reply(record, 401, {"Content-Length": "0", "X-Error-Code": "GatedRepo",
                                                  "X-Error-Message": "Access to this model is restricted."})
                        return
                    headers = {"X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes"}
                    if lfs:  # the Hub sends LFS files to its CDN; the metadata is on the 302 itself
                        cdn = f"http://127.0.0.1:{server.cdn.server_address[1]}/cdn/{REPO}/{repo_path}?signed=1"
                        headers.update({"Location": cdn, "Content-Length": "0", "ETag": f'"{_git_blob_sha1(b"pointer")}"',
                                        "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                                        "X-Linked-Size": str(len(data))})
                        self._reply(record, 302, headers)
                        return
                    headers["ETag"] = f'"{_git_blob_sha1(data)}"'
                else:
                    if repo_path in server._refuse_next:
                        server._refuse_next.discard(repo_path)
                        self._reply(record, 503, {"Content-Length": "0"})
                        return
                    if repo_path in server.corrupt:
                        data = bytes([data[0] ^ 0xFF]) + data[1:]
                    headers = {"Accept-Ranges": "bytes", "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                start, status = 0, 200
                asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if asked and not server.ignore_range:
                    start, status = int(asked.group(1)), 206
                    if start >= len(data):
                        self._reply(record, 416, {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"})
                        return
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                headers["Content-Length"] = str(len(data) - start)
                body = data[start:]
                cut = server.cut_after.pop(repo_path, None) if send_body else None
                if cut is not None:
                    body = body[:cut]  # then the connection closes short of Content-Length
                    if repo_path in server.refuse_after_cut:
                        server._refuse_next.add(repo_path)
                self._reply(record, status, headers, body, send_body)

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
    for thread in served.threads:
        thread.start()
    yield served
    for httpd in (served.hub, served.cdn):
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh $MAISI_HOME; no proxy, mirror, token or disk-budget settings leak in from the caller."""
    folder = tmp_path / "maisi-home"
    monkeypatch.setenv("MAISI_HOME", str(folder))
    for name in ("MAISI_WEIGHTS_BASE_URL", "HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MAISI_DISK_FREE_BYTES",
                 "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return folder


def _download(server: FileServer, *extra) -> object:
    """`maisi weights download MODEL --base-url SERVER ...` in this process."""
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
    # Files byte-identical, in the reference layout, each fetched once from the CDN with no refetch.
    for name, data in published.items():
        assert (folder / "models" / name).read_bytes() == data
        gets = server.gets(name)
        assert [(g["server"], g["range"], g["status"], g["bytes_sent"]) for g in gets] == [("cdn", None, 200, len(data))]
    # The Hub sees only HEADs (ours for the size and sha256, then huggingface_hub's); each is a 302
    # to the CDN carrying the metadata, and the CDN is never asked with HEAD.
    hub = [(r["method"], r["status"]) for r in server.requests if r["server"] == "hub"]
    assert hub == [("HEAD", 302)] * 6
    assert sorted(p.name for p in (folder / "models").iterdir()) == sorted(published)  # no partial file left
    hashes = json.loads((folder / "hashes.json").read_text())
    assert {k: (v["sha256"], v["size"], v["published"]) for k, v in hashes.items()} == {
        f"models/{name}": (_sha256(data), len(data), "sha256") for name, data in published.items()
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
    assert set(rows) == {"rflow-ct", "ddpm-ct", "rflow-mr", "rflow-mr-brain"}
    row = rows[MODEL]
    assert (row["installed"], row["path"], row["license_accepted"]) == (True, str(folder), True)
    assert row["size_bytes"] == sum(SIZES.values())
    assert [f["name"] for f in row["files"]] == WEIGHT_NAMES and all(f["present"] for f in row["files"])
    assert row["license"] == "NVIDIA Open Model License" and row["license_url"].startswith("https://www.nvidia.com/")
    assert (rows["ddpm-ct"]["installed"], rows["ddpm-ct"]["license_accepted"]) == (False, False)

    # A second run asks nothing.
    requests_before = len(server.requests)
    again = _download(server)
    assert again.returncode == 0 and "already downloaded" in again.stdout
    assert server.requests[requests_before:] == []


def test_cut_connection_resumes_with_a_range_request(server, home, published, tmp_path):
    from huggingface_hub import constants

    unet = WEIGHT_NAMES[1]
    chunk = constants.DOWNLOAD_CHUNK_SIZE  # huggingface_hub writes whole read chunks (10 MiB)
    big = random.Random(10).randbytes(chunk + 2 * 2**20)
    (tmp_path / "server" / REPO_PREFIX / "models" / unet).write_bytes(big)
    cut = chunk + 2**20
    server.cut_after[f"models/{unet}"] = cut
    result = _download(server, "--accept-license")
    assert result.returncode == 0, result.stderr
    gets = server.gets(unet)  # resumed in the same run after the last whole chunk it had written
    assert [(g["range"], g["status"], g["bytes_sent"]) for g in gets] == [
        (None, 200, cut), (f"bytes={chunk}-", 206, len(big) - chunk)]
    assert (home / "weights" / MODEL / "models" / unet).read_bytes() == big
    hashes = json.loads((home / "weights" / MODEL / "hashes.json").read_text())
    assert hashes[f"models/{unet}"]["sha256"] == _sha256(big)


def test_interrupted_run_keeps_complete_files_and_the_next_run_fetches_the_rest(server, home, published, monkeypatch):
    unet = WEIGHT_NAMES[1]
    server.cut_after[f"models/{unet}"] = 50_000
    server.refuse_after_cut.add(f"models/{unet}")  # the retry fails too: the run gives up
    first = _download(server, "--accept-license")
    assert first.returncode == 2
    message = _error_line(first.stderr)
    assert "interrupted" in message and "run `maisi weights download rflow-ct` again to resume" in message
    models = home / "weights" / MODEL / "models"
    assert (models / WEIGHT_NAMES[0]).read_bytes() == published[WEIGHT_NAMES[0]]
    assert not (models / unet).exists() and not (models / WEIGHT_NAMES[2]).exists()
    assert not (home / "weights" / MODEL / "maisi_model.json").exists()
    assert [p for p in (home / "weights" / MODEL).rglob("*.incomplete")] == []  # no partial file left behind

    # The disk check counts only what is still missing: exactly that much free space is enough.
    monkeypatch.setenv("MAISI_DISK_FREE_BYTES", str(SIZES[unet] + SIZES[WEIGHT_NAMES[2]]))
    second = _download(server)
    assert second.returncode == 0, second.stderr
    assert len(server.gets(WEIGHT_NAMES[0])) == 1  # the finished file is not asked for again
    assert [(g["range"], g["status"]) for g in server.gets(unet)] == [(None, 200), (None, 503), (None, 200)]
    for name, data in published.items():
        assert (models / name).read_bytes() == data
    assert run_maisi_in_process("weights", "verify", MODEL).returncode == 0


def test_server_ignoring_range_restarts_the_file_cleanly(server, home, published, tmp_path):
    from huggingface_hub import constants

    unet = WEIGHT_NAMES[1]
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    big = random.Random(11).randbytes(chunk + 2 * 2**20)
    (tmp_path / "server" / REPO_PREFIX / "models" / unet).write_bytes(big)
    cut = chunk + 2**20
    server.cut_after[f"models/{unet}"] = cut
    server.ignore_range = True
    result = _download(server, "--accept-license")
    assert result.returncode == 0, result.stderr
    gets = server.gets(unet)
    assert [(g["range"], g["status"], g["bytes_sent"]) for g in gets] == [
        (None, 200, cut), (f"bytes={chunk}-", 200, len(big))
    ]
    assert (home / "weights" / MODEL / "models" / unet).read_bytes() == big  # no mix of the two replies


def test_corruption_on_the_way_is_caught_against_the_hubs_sha256(server, home, published):
    controlnet = WEIGHT_NAMES[2]
    server.corrupt.add(f"models/{controlnet}")
    result = _download(server, "--accept-license")
    assert result.returncode == 2
    line = _error_line(result.stderr)
    assert "differs from the" in line and controlnet in line and "publishes" in line
    models = home / "weights" / MODEL / "models"
    assert not (models / controlnet).exists()
    hashes = json.loads((home / "weights" / MODEL / "hashes.json").read_text())
    assert f"models/{controlnet}" not in hashes and len(hashes) == 2
    server.corrupt.clear()
    assert _download(server).returncode == 0
    assert (models / controlnet).read_bytes() == published[controlnet]
    assert [g["bytes_sent"] for g in server.gets(WEIGHT_NAMES[0])] == [SIZES[WEIGHT_NAMES[0]]]


def test_gated_repository_needs_hf_token(server, home, published, monkeypatch):
    server.token = TOKEN
    refused = _download(server, "--accept-license")
    assert refused.returncode == 2
    line = _one_line(refused.stderr)
    assert "401" in line and "HF_TOKEN" in line
    assert not home.exists()  # nothing written, not even the licence acceptance
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    accepted = _download(server, "--accept-license")
    assert accepted.returncode == 0, accepted.stderr
    hub = [r for r in server.requests if r["server"] == "hub" and r["status"] == 302]
    assert len(hub) == 6 and {r["authorization"] for r in hub} == {f"Bearer {TOKEN}"}
    for name, data in published.items():
        assert (home / "weights" / MODEL / "models" / name).read_bytes() == data


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
    gets_before = len([r for r in server.requests if r["method"] == "GET"])
    result = _download(server)
    assert result.returncode == 2
    line = _error_line(result.stderr)
    assert "differs from" in line and ae_name in line and "recorded at the first download" in line
    assert len([r for r in server.requests if r["method"] == "GET"]) == gets_before  # refused before fetching
    assert not (home / "weights" / MODEL / "models" / ae_name).exists()


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

    on_disk = [p for p in (home / "weights" / MODEL).rglob("*") if p.is_file()]  # + huggingface_hub's metadata
    removed = run_maisi_in_process("weights", "remove", MODEL, "--yes")
    assert removed.returncode == 0, removed.stderr
    assert f"{len(on_disk)} file(s) deleted" in removed.stdout and len(on_disk) > 5
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
    mask_networks = {name: random.Random(name).randbytes(1000) for name in MASK_NETWORKS}  # --anatomy-size's
    for name, data in mask_networks.items():
        (tmp_path / "server" / REPO_PREFIX / "models" / name).write_bytes(data)
    with zipfile.ZipFile(datasets / MASK_ARCHIVE, "w") as archive:
        archive.writestr("all_masks_flexible_size_and_spacing_4000/a/mask_1.nii.gz", b"mask bytes")
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)  # the mirror huggingface_hub's variable names

    result = run_maisi_in_process("weights", "download", MODEL, "--accept-license", "--include-datasets")
    assert result.returncode == 0, result.stderr
    local = home / "datasets"
    assert (local / MASK_INDEX).read_bytes() == index
    assert (local / "all_masks_flexible_size_and_spacing_4000" / "a" / "mask_1.nii.gz").read_bytes() == b"mask bytes"
    assert not (local / MASK_ARCHIVE).exists()  # unpacked, then deleted
    assert list(home.rglob("*.incomplete")) == []
    hashes = json.loads((local / "hashes.json").read_text())
    assert sorted(hashes) == sorted([MASK_INDEX, MASK_ARCHIVE, "all_anatomy_size_conditions.json"])
    assert hashes[MASK_INDEX]["sha256"] == _sha256(index)
    assert hashes[MASK_ARCHIVE]["sha256"] == _sha256((datasets / MASK_ARCHIVE).read_bytes())
    assert hashes[MASK_ARCHIVE]["unpacked_to"] == "all_masks_flexible_size_and_spacing_4000"
    # Small files are checked against their git blob id (the Hub's ETag), LFS files against their sha256.
    assert (hashes[MASK_INDEX]["published"], hashes[MASK_ARCHIVE]["published"]) == ("git blob sha1", "sha256")
    verify = run_maisi_in_process("weights", "verify", MODEL)
    models = home / "weights" / MODEL / "models"
    assert {name: (models / name).read_bytes() for name in MASK_NETWORKS} == mask_networks  # beside the model's
    model_hashes = json.loads((home / "weights" / MODEL / "hashes.json").read_text())
    assert sorted(model_hashes) == sorted(f"models/{name}" for name in WEIGHT_NAMES + MASK_NETWORKS)
    assert all(model_hashes[f"models/{name}"]["sha256"] == _sha256(data) for name, data in mask_networks.items())
    assert verify.returncode == 0 and verify.stdout.splitlines()[-1] == "ok: 8 file(s) match their recorded sha256"


def test_archive_member_outside_its_folder_is_refused(server, home, published, tmp_path, monkeypatch):
    datasets = tmp_path / "server" / REPO_PREFIX / "datasets"
    datasets.mkdir(parents=True)
    (datasets / MASK_INDEX).write_bytes(b"[]")
    (datasets / "all_anatomy_size_conditions.json").write_bytes(b"[]")
    for name in MASK_NETWORKS:
        (tmp_path / "server" / REPO_PREFIX / "models" / name).write_bytes(b"weights")
    with zipfile.ZipFile(datasets / MASK_ARCHIVE, "w") as archive:
        archive.writestr("../escaped.txt", b"no")
    result = _download(server, "--accept-license", "--include-datasets")
    assert result.returncode == 2 and "points outside the archive" in _error_line(result.stderr)
    assert not (home / "escaped.txt").exists() and not (home / "datasets" / "escaped.txt").exists()
    assert not (home / "datasets" / "all_masks_flexible_size_and_spacing_4000").exists()


def test_verify_load_reports_key_mismatches_and_honours_the_allow_list(home, tiny_weights):
    import shutil

    import torch
    from maisicore.models.weights import load_model, resolve_model

    folder = home / "weights" / MODEL
    shutil.copytree(tiny_weights[MODEL], folder)
    ok = run_maisi_in_process("weights", "verify", MODEL, "--load")
    assert ok.returncode == 0, ok.stderr
    loads = [line for line in ok.stdout.splitlines() if line.startswith("loads")]
    assert len(loads) == 3 and all("into the rflow-ct/tiny" in line for line in loads)
    assert ok.stdout.splitlines()[-1].endswith("every checkpoint loads")

    # An extra tensor in the ControlNet's state dict: reported, exit 1.
    path = folder / "models" / WEIGHT_NAMES[2]
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["controlnet_state_dict"]["ema.shadow.weight"] = torch.zeros(2)
    torch.save(checkpoint, path)
    bad = run_maisi_in_process("weights", "verify", MODEL, "--load")
    assert bad.returncode == 1
    assert f"mismatch   {path} (1 unexpected key(s) (first: ema.shadow.weight))" in bad.stdout
    assert "verify --load failed" in _one_line(bad.stderr) and "allowed_extra_keys" in bad.stderr

    # Allowed in the weight folder's card: ignored by verify and by loading alike.
    card_path = folder / "maisi_model.json"
    card = json.loads(card_path.read_text())
    card["allowed_extra_keys"] = {"controlnet": ["ema.*"]}
    card_path.write_text(json.dumps(card))
    allowed = run_maisi_in_process("weights", "verify", MODEL, "--load")
    assert allowed.returncode == 0, allowed.stderr
    assert f"loads      {path} (" in allowed.stdout and "1 allowed extra key(s) ignored" in allowed.stdout
    preset, resolved = resolve_model(MODEL, None)
    assert load_model(preset, resolved).controlnet is not None
