"""Downloading a hub model for real, with no network: a local HTTP server answers the hub routes.

The server serves tiny-chat's folder (built by ``make test``) as the repo ``workbench-test/tiny-chat``
at one commit, on the routes huggingface_hub uses: the model info (``/api/models/{repo}/revision/{rev}``),
the tree listing (``/api/models/{repo}/tree/{rev}``) and the files (``/{repo}/resolve/{rev}/{file}``,
HEAD and GET, with ``X-Repo-Commit``, ``ETag``, ``Content-Length`` and, for the large file,
``X-Linked-Etag`` / ``X-Linked-Size`` as the hub sends them). huggingface_hub reads its endpoint,
cache folder and offline switch at import, so the tests set them in ``huggingface_hub.constants``
(and each test gets its own cache folder).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from conftest import MODELS_DIR, make_settings

from models import hub
from models.catalog import Catalog, ModelSpec

REPO = "workbench-test/tiny-chat"
COMMIT = hashlib.sha1(b"workbench-test/tiny-chat@1").hexdigest()
LFS_FILES = {"model.safetensors"}  # served the way the hub serves LFS files: etag = sha256, X-Linked-* headers
XET_HASH = "ab" * 32  # and stored with Xet: its HEAD names a Xet hash and a token route this hub does not offer
PIECE = 64 * 1024  # the server writes this much at a time, so a slow download has many chunks
SOURCE = MODELS_DIR / "tiny-chat"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub(http.server.ThreadingHTTPServer):
    """A hub with one repo at one commit. ``corrupt[name]`` = "sha" (altered bytes) or "size" (cut short)."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files = files
        self.corrupt: dict[str, str] = {}
        self.delay = 0.0  # seconds between pieces of a file body
        self.requests: list[tuple[str, str]] = []
        self.xet_disabled_during_gets: set[bool] = set()  # huggingface_hub's HF_HUB_DISABLE_XET when a file was sent
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if name in LFS_FILES else git_blob_sha1(data)

    def sibling(self, name: str) -> dict:
        data = self.files[name]
        entry = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
        if name in LFS_FILES:
            entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return entry

    def gets(self, name: str) -> int:
        return sum(1 for method, path in self.requests if method == "GET" and path.endswith(f"/resolve/{COMMIT}/{name}")
                   or method == "GET" and path.endswith(f"/resolve/main/{name}"))


class HubHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.route(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self.route(body=True)

    def reply(self, status: int, payload: bytes = b"", headers: dict | None = None, body: bool = True) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body and payload:
            self.wfile.write(payload)

    def not_found(self, code: str, body: bool) -> None:
        self.reply(404, b'{"error": "not found"}', {"X-Error-Code": code, "X-Repo-Commit": COMMIT,
                                                    "Content-Type": "application/json"}, body)

    def route(self, body: bool) -> None:
        hub_server = self.server
        path = unquote(urlsplit(self.path).path)
        hub_server.requests.append((self.command, path))
        models_api = f"/api/models/{REPO}"
        if path in (models_api, f"{models_api}/revision/main", f"{models_api}/revision/{COMMIT}"):
            info = {"id": REPO, "modelId": REPO, "sha": COMMIT, "private": False,
                    "siblings": [hub_server.sibling(name) for name in sorted(hub_server.files)]}
            return self.reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if path in (f"{models_api}/tree/main", f"{models_api}/tree/{COMMIT}"):
            tree = []
            for name in sorted(hub_server.files):
                sibling = hub_server.sibling(name)
                entry = {"type": "file", "path": name, "size": sibling["size"], "oid": sibling["blobId"]}
                if "lfs" in sibling:
                    entry["lfs"] = {"oid": sibling["lfs"]["sha256"], "size": sibling["size"], "pointerSize": 134}
                    entry["xetHash"] = XET_HASH
                tree.append(entry)
            return self.reply(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        if path.startswith(f"{models_api}/"):
            return self.not_found("EntryNotFound", body)
        prefix = f"/{REPO}/resolve/"
        if not path.startswith(prefix):
            return self.not_found("RepoNotFound", body)
        revision, _, name = path[len(prefix):].partition("/")
        if revision not in ("main", COMMIT):
            return self.not_found("RevisionNotFound", body)
        if name not in hub_server.files:
            return self.not_found("EntryNotFound", body)
        self.send_file(name, body)

    def send_file(self, name: str, body: bool) -> None:
        hub_server = self.server
        data = hub_server.files[name]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hub_server.etag(name)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if name in LFS_FILES:
            headers.update({"X-Linked-Etag": f'"{hub_server.etag(name)}"', "X-Linked-Size": str(len(data)),
                            "X-Xet-Hash": XET_HASH,
                            "X-Xet-Refresh-Route": f"/api/models/{REPO}/xet-read-token/{COMMIT}"})
        if not body:  # HEAD: the true size and etag, whatever the body will be
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        from huggingface_hub import constants

        hub_server.xet_disabled_during_gets.add(constants.HF_HUB_DISABLE_XET)
        kind = hub_server.corrupt.get(name)
        if kind == "sha":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        elif kind == "size":
            data = data[: len(data) // 2]
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for start in range(0, len(data), PIECE):
            try:
                self.wfile.write(data[start:start + PIECE])
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (Stop)
                return
            if hub_server.delay:
                time.sleep(hub_server.delay)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """The server, with huggingface_hub (and transformers' shared client) pointed at it and at a fresh cache."""
    import transformers.utils.hub
    from huggingface_hub import constants

    if not (SOURCE / "model.safetensors").is_file():
        pytest.skip("tiny-chat is not built (make test builds it)")
    files = {path.name: path.read_bytes() for path in sorted(SOURCE.iterdir())
             if path.is_file() and not path.name.startswith(".")}
    server = FakeHub(files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    cache = tmp_path / "hf-cache"
    for name, value in (("HF_HUB_CACHE", str(cache)), ("ENDPOINT", server.url), ("HF_HUB_OFFLINE", False),
                        ("HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"),
                        ("HF_HUB_DISABLE_IMPLICIT_TOKEN", True), ("HF_HUB_DISABLE_XET", False)):
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # its shared HfApi keeps the endpoint it was made with
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def online(tmp_path):
    """Settings of an app that is online (the endpoint is the local server)."""
    return make_settings(tmp_path, offline=False, offline_reason="")


@pytest.fixture
def hub_catalog():
    return Catalog([ModelSpec(id=REPO, task="chat", family="chat", source="hub", params_b=0.0005, license="test")])


def no_partial_files(cache: Path) -> list[Path]:
    """Files huggingface_hub writes while downloading (``*.incomplete``): none may stay behind."""
    return [path for path in cache.rglob("*") if path.name.endswith(".incomplete")]


def test_download_counts_bytes_up_to_the_total_and_the_cache_counts_it_downloaded(fake_hub, online, hub_catalog,
                                                                                   monkeypatch):
    monkeypatch.setattr(hub, "PROGRESS_EVERY", 3600.0)  # reports: the first chunk's, then the final one
    reports: list[tuple[int, int]] = []
    total = sum(len(data) for data in fake_hub.files.values())
    assert hub.cache_state(REPO).state == hub.MISSING

    result = hub.download(hub_catalog, online, REPO, hub.Downloads(), lambda done, whole: reports.append((done, whole)))

    assert not result.stopped and result.total_bytes == total and result.done_bytes == total
    assert len(reports) == 2 and reports[-1] == (total, total), "the last report says every byte arrived"
    assert all(whole == total for _, whole in reports), "the total is known before the first byte"
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    assert hub.progress_words(total // 2, total).startswith("Downloading ") and " of " in hub.progress_words(1, 2)
    state = hub.cache_state(REPO)
    assert state.state == hub.DOWNLOADED and state.commit == COMMIT and state.disk_bytes == total
    assert all(fake_hub.gets(name) == 1 for name in fake_hub.files), "each file fetched once"
    assert no_partial_files(hub.hub_cache_dir()) == []
    from huggingface_hub import constants

    assert fake_hub.xet_disabled_during_gets == {True} and constants.HF_HUB_DISABLE_XET is False, \
        "the Xet-stored weights came over plain HTTP (where Stop works), and the switch is back"
    # Offline, huggingface_hub's own lookup finds the snapshot complete (refs/main and the cached listing)
    from models import sources

    folder = Path(sources.cached_hub_folder(hub_catalog.get(REPO), make_settings(online.cache_dir)))
    assert sorted(p.name for p in folder.iterdir()) == sorted(fake_hub.files)
    assert (folder / "model.safetensors").read_bytes() == fake_hub.files["model.safetensors"]

    from huggingface_hub import get_cached_repo_tree

    assert sorted(f.path for f in get_cached_repo_tree(REPO)) == sorted(fake_hub.files), "the listing is cached"
    again = hub.download(hub_catalog, online, REPO, hub.Downloads())
    assert not again.stopped and all(fake_hub.gets(name) == 1 for name in fake_hub.files), "nothing fetched twice"
    (folder / "tokenizer.json").unlink()  # a file lost later: the cached listing shows the snapshot incomplete
    assert hub.cache_state(REPO).state == hub.PARTIAL


def test_stop_interrupts_the_download_and_nothing_looks_complete(fake_hub, online, hub_catalog, monkeypatch):
    from huggingface_hub import constants, snapshot_download

    from models import sources

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", PIECE)  # chunks as the server sends them
    fake_hub.delay = 0.1  # model.safetensors (~0.5 MB) takes about a second
    downloads = hub.Downloads()
    before_weights = sum(len(fake_hub.files[name]) for name in sorted(fake_hub.files) if name < "model.safetensors")
    stopped_at: list[float] = []

    def press_stop() -> None:  # another session presses Stop once the weights are half-way through
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            progress = downloads.progress(REPO)
            if progress and progress["done_bytes"] > before_weights + PIECE:
                stopped_at.append(time.monotonic())
                assert downloads.stop(REPO)
                return
            time.sleep(0.01)

    stopper = threading.Thread(target=press_stop)
    stopper.start()
    result = hub.download(hub_catalog, online, REPO, downloads)
    ended = time.monotonic()
    stopper.join()

    total = sum(len(data) for data in fake_hub.files.values())
    assert result.stopped and result.done_bytes == before_weights, "what is kept: the files finished before Stop"
    assert stopped_at and ended - stopped_at[0] < 1.0, "Stop takes effect at the next chunk"
    assert "Stopped downloading" in result.message and not downloads.active(REPO)
    assert fake_hub.gets("model.safetensors") == 1 and fake_hub.gets("tokenizer.json") == 0
    cache = hub.hub_cache_dir()
    assert no_partial_files(cache) == [], "the file being written was removed"
    weights_blob = cache / f"models--{REPO.replace('/', '--')}" / "blobs" / fake_hub.etag("model.safetensors")
    assert not weights_blob.exists()
    # Nothing looks complete: not to the catalog, not to huggingface_hub offline, not to the loader
    assert hub.cache_state(REPO).state == hub.PARTIAL
    with pytest.raises(Exception, match="[Cc]annot find|not in the local"):
        snapshot_download(REPO, local_files_only=True)
    with pytest.raises(sources.ModelUnavailableError, match="not in the local Hugging Face cache"):
        sources.cached_hub_folder(hub_catalog.get(REPO), make_settings(online.cache_dir))

    # Download again: finishes what is missing, without fetching the finished files a second time
    fake_hub.delay = 0.0
    finished = hub.download(hub_catalog, online, REPO, downloads)
    assert not finished.stopped and finished.done_bytes == total
    assert fake_hub.gets("config.json") == 1 and fake_hub.gets("model.safetensors") == 2
    assert hub.cache_state(REPO).state == hub.DOWNLOADED


@pytest.mark.parametrize("name, kind, message", [
    ("model.safetensors", "sha", "sha256 does not match"),
    ("config.json", "sha", "git hash does not match"),
    ("model.safetensors", "size", "wrong size"),
])
def test_a_corrupt_file_is_caught_with_a_clear_message_and_not_kept(fake_hub, online, hub_catalog, name, kind,
                                                                    message):
    fake_hub.corrupt[name] = kind
    downloads = hub.Downloads()
    with pytest.raises(hub.CorruptDownloadError, match=message) as excinfo:
        hub.download(hub_catalog, online, REPO, downloads)
    text = str(excinfo.value)
    assert name in text and "Download again" in text and str(hub.hub_cache_dir()) not in text
    cache = hub.hub_cache_dir()
    assert not (cache / f"models--{REPO.replace('/', '--')}" / "blobs" / fake_hub.etag(name)).exists()
    assert no_partial_files(cache) == [] and hub.cache_state(REPO).state != hub.DOWNLOADED
    assert not downloads.active(REPO)

    fake_hub.corrupt.clear()  # the hub serves a good copy again: the next download completes
    assert not hub.download(hub_catalog, online, REPO, downloads).stopped
    assert hub.cache_state(REPO).state == hub.DOWNLOADED


def test_the_downloaded_model_loads_through_the_manager_from_the_cache(fake_hub, online, hub_catalog, monkeypatch):
    from huggingface_hub import constants

    from models.families.chat import ChatHandle
    from models.manager import ModelManager

    hub.download(hub_catalog, online, REPO, hub.Downloads())

    with monkeypatch.context() as patch:  # offline, from the cache alone (downloaded online, used offline)
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        offline = ModelManager(hub_catalog, make_settings(online.cache_dir))
        requests_before = len(fake_hub.requests)
        with offline.use(REPO) as handle:
            assert isinstance(handle, ChatHandle) and handle.model.num_parameters() > 0
        assert len(fake_hub.requests) == requests_before, "offline: the hub was not asked"
        offline.unload_all()

    gets_before = sum(1 for method, path in fake_hub.requests if method == "GET" and "/resolve/" in path)
    manager = ModelManager(hub_catalog, online)
    with manager.use(REPO) as handle:  # online: transformers asks the (local) hub, and reads the files from the cache
        assert isinstance(handle, ChatHandle) and handle.model.num_parameters() > 0
    assert sum(1 for method, path in fake_hub.requests if method == "GET" and "/resolve/" in path) == gets_before, \
        "loading downloaded nothing more"
    manager.unload_all()


def test_download_is_refused_offline_and_for_models_that_are_not_on_the_hub(fake_hub, online, hub_catalog,
                                                                           monkeypatch):
    from models.errors import InvalidRequest, Unavailable

    offline = make_settings(online.cache_dir, offline_reason="--offline was given")
    with pytest.raises(Unavailable, match=r"Downloads are off: the app is offline \(--offline was given\)"):
        hub.download(hub_catalog, offline, REPO, hub.Downloads())
    with pytest.raises(InvalidRequest, match="not a hub model"):
        hub.download(Catalog.load(), online, "tiny-chat", hub.Downloads())
    with monkeypatch.context() as patch:
        from huggingface_hub import constants

        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(Unavailable, match="Downloads are off: HF_HUB_OFFLINE=1 is set"):
            hub.download(hub_catalog, online, REPO, hub.Downloads())
    assert fake_hub.requests == [], "refused before asking the hub"
    missing = Catalog([ModelSpec(id="workbench-test/missing", task="chat", family="chat", source="hub")])
    with pytest.raises(InvalidRequest, match="is not on the hub"):
        hub.download(missing, online, "workbench-test/missing", hub.Downloads())
    assert fake_hub.requests, "the server was asked"


def test_the_download_endpoint_reports_progress_and_stops(fake_hub, online, hub_catalog, monkeypatch):
    """/download through gradio_client: progress in bytes comes through the event; /stop_download stops it."""
    import gradio as gr
    from conftest import free_port
    from gradio_client import Client
    from huggingface_hub import constants

    from models.manager import ModelManager
    from tabs import models_panel

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", PIECE)
    fake_hub.delay = 0.1
    manager = ModelManager(hub_catalog, online)
    with gr.Blocks() as demo:
        models_panel.build(manager, online)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, quiet=True, server_port=port)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        job = client.submit(REPO, api_name="/download")
        descriptions = []
        deadline = time.monotonic() + 60
        while not job.done() and time.monotonic() < deadline:
            progress = job.status().progress_data or []
            descriptions += [unit.desc for unit in progress if unit.desc]
            if descriptions and fake_hub.gets("model.safetensors"):  # the weights are on their way: press Stop
                break
            time.sleep(0.05)
        assert any(desc.startswith("Downloading ") and desc.endswith(" of 0.5 MB") for desc in descriptions), \
            descriptions
        assert client.predict(REPO, api_name="/stop_download").startswith(f"Stopping the download of {REPO}")
        assert job.result(timeout=30).startswith(f"Stopped downloading {REPO}: ")
        assert hub.cache_state(REPO).state == hub.PARTIAL

        fake_hub.delay = 0.0
        assert client.predict(REPO, api_name="/download").startswith(f"Downloaded {REPO}: 0.5 MB in ")
        entry = next(e for e in client.predict(api_name="/catalog")["models"] if e["id"] == REPO)
        assert entry["state"] == hub.DOWNLOADED and entry["files"] == "hub cache"
    finally:
        demo.close()
