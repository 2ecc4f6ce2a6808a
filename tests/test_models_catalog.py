"""The Models tab as a catalog: where each model's files are, Delete, Add a model, the memory meter, menu marks.

Every test has its own Hugging Face cache folder (``huggingface_hub.constants.HF_HUB_CACHE``), filled
by hand in the cache's own layout (blobs, snapshots, refs) where a test needs a downloaded model.
Models are loaded through a fake family: these tests are about bookkeeping, not weights.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import yaml
from conftest import MODELS_DIR, make_settings

from models import hub
from models.catalog import Catalog, ModelSpec, models_file_to_load, user_models_file
from models.errors import Busy, InvalidRequest
from models.manager import ModelManager

MB = 1024**2
HUB_ID = "test-org/tiny-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def hf_cache(monkeypatch, tmp_path) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def cache_repo(repo_id: str, files: dict[str, bytes], ref: bool = True, listing: bool = False) -> Path:
    """Put ``files`` into the cache as a download would: blobs, a snapshot of symlinks, refs/main (and a listing)."""
    folder = hub.repo_folder(repo_id)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(COMMIT)
    if listing:
        from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

        write_tree_cache(str(folder), COMMIT, {name: TreeCacheEntry(size=len(data), blob_id="0" * 40)
                                               for name, data in {**files, "missing.bin": b"x"}.items()})
    return folder


class Handle:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes


def fake_manager(tmp_path, specs: list[ModelSpec], offline: bool = True, **settings) -> ModelManager:
    """A manager over ``specs`` whose loads make a Handle of 5 MB (no weights read)."""
    values = {"offline": offline, **({} if offline else {"offline_reason": ""}), **settings}
    manager = ModelManager(Catalog(specs), make_settings(tmp_path, **values), loader=lambda *_: Handle(5 * MB),
                           releaser=lambda *_: None, measure=lambda handle: handle.nbytes)
    manager._device = "cpu"
    return manager


def spec(model_id: str, source: str = "hub", **fields) -> ModelSpec:
    return ModelSpec(id=model_id, task=fields.pop("task", "chat"), family=fields.pop("family", "chat"),
                     source=source, **fields)


# ---- catalog rows, one per source --------------------------------------------------------------------

def test_catalog_rows_say_where_each_models_files_are(tmp_path, monkeypatch):
    from tabs.models_panel import catalog_rows

    coqui_home = tmp_path / "coqui"
    monkeypatch.setenv("TTS_HOME", str(coqui_home))
    (coqui_home / "tts" / "tts_models--en--x--vits").mkdir(parents=True)
    (coqui_home / "tts" / "tts_models--en--x--vits" / "model.pth").write_bytes(b"\0" * 3000)
    local = tmp_path / "my-chat"
    local.mkdir()
    cache_repo(HUB_ID, {"config.json": b"{}", "model.safetensors": b"\0" * (2 * MB)})
    cache_repo("test-org/half", {"config.json": b"{}"}, ref=False)
    cache_repo("test-org/listed", {"config.json": b"{}"}, listing=True)  # its listing names a file not there
    catalog = Catalog.load()
    specs = [catalog.get("tiny-chat"), catalog.get("smollm2-135m"), catalog.get("Qwen/Qwen2.5-0.5B-Instruct"),
             catalog.get("tiny-qwen2.5"),
             spec(HUB_ID, params_b=0.001, license="MIT"), spec("test-org/half"), spec("test-org/listed"),
             spec("tts_models/en/x/vits", "coqui", task="text-to-speech", family="tts"),
             spec("my-chat", "local", repo=str(local)), spec("gone", "local", repo=str(tmp_path / "nothing")),
             spec("engine", "openai", family="remote", base_url="http://gpu-box:8000/v1")]
    manager = fake_manager(tmp_path, specs, models_dir=MODELS_DIR)
    with manager.use(HUB_ID):
        pass
    with manager.use("my-chat"):
        entries = {e["id"]: e for e in hub.catalog_entries(manager, manager.settings)}

    assert "tiny-qwen2.5" not in entries, "architecture twins are hidden"
    assert list(entries) == [s.id for s in specs if not s.twin_of]
    expected = {"tiny-chat": "built", "Qwen/Qwen2.5-0.5B-Instruct": hub.MISSING, HUB_ID: hub.DOWNLOADED,
                "test-org/half": hub.PARTIAL, "test-org/listed": hub.PARTIAL,
                "tts_models/en/x/vits": hub.DOWNLOADED, "my-chat": "local", "gone": "missing", "engine": "remote"}
    assert {key: entries[key]["state"] for key in expected} == expected
    assert entries["smollm2-135m"]["state"] in ("prepared", "on first use")
    assert entries[HUB_ID]["disk_bytes"] == 2 * MB + 2 and entries["tts_models/en/x/vits"]["disk_bytes"] == 3000
    assert entries["tiny-chat"]["disk_bytes"] > 0 and entries["Qwen/Qwen2.5-0.5B-Instruct"]["disk_bytes"] is None
    assert entries["engine"]["url"] == "http://gpu-box:8000/v1" and "gpu-box:8000" in entries["engine"]["files"]
    assert str(tmp_path) not in str(entries), "no server path in what users see"
    hub_entry = entries[HUB_ID]
    assert hub_entry["loaded"] and not hub_entry["in_use"] and hub_entry["memory_bytes"] == 5 * MB
    assert hub_entry["idle_seconds"] is not None and 0 <= hub_entry["idle_seconds"] < 5
    assert entries["my-chat"]["in_use"] and entries["my-chat"]["idle_seconds"] is None
    assert not entries["tiny-chat"]["loaded"] and entries["tiny-chat"]["idle_seconds"] is None
    assert (hub_entry["license"], hub_entry["params_b"], hub_entry["task"], hub_entry["family"]) == (
        "MIT", 0.001, "chat", "chat")

    rows = {row[0]: row for row in catalog_rows(list(entries.values()))}
    assert rows[HUB_ID][3:] == ["MIT", "1 M", "hub cache", "2.0 MB", "yes", "5.0 MB", "0 s"]
    assert rows["my-chat"][7] == "in use" and rows["Qwen/Qwen2.5-0.5B-Instruct"][5] == "not downloaded"
    assert rows["Qwen/Qwen2.5-0.5B-Instruct"][4] == "0.49 B"


def test_a_download_in_progress_shows_in_the_catalog(tmp_path):
    from tabs.models_panel import catalog_rows

    manager = fake_manager(tmp_path, [spec(HUB_ID)], offline=False)
    downloads = hub.Downloads()
    job = downloads.begin(HUB_ID)
    job.total, job.done = 300 * MB, 30 * MB
    (row,) = catalog_rows(hub.catalog_entries(manager, manager.settings, downloads))
    assert row[5] == "Downloading 30.0 MB of 0.29 GB…"
    with pytest.raises(Busy, match="being downloaded already"):
        downloads.begin(HUB_ID)
    downloads.end(job)
    assert hub.catalog_entries(manager, manager.settings, downloads)[0]["download"] is None


# ---- delete ------------------------------------------------------------------------------------------

def test_delete_refuses_a_loaded_model_and_needs_confirmation(tmp_path):
    from huggingface_hub import scan_cache_dir

    folder = cache_repo(HUB_ID, {"config.json": b"{}", "model.safetensors": b"\0" * MB})
    manager = fake_manager(tmp_path, [spec(HUB_ID), spec("tiny-local", "local", repo=str(tmp_path))])
    with manager.use(HUB_ID):
        pass
    with pytest.raises(hub.ModelLoadedError, match="is loaded; unload it first"):
        hub.delete_cached(manager, HUB_ID, confirm=True)
    with pytest.raises(hub.ModelLoadedError):
        hub.delete_preview(manager, HUB_ID)
    assert folder.is_dir()
    manager.unload(HUB_ID)

    assert hub.delete_preview(manager, HUB_ID) == f"Delete {HUB_ID}? This removes 1.0 MB from the Hugging Face cache."
    for answer in (False, "true", 1, None):
        with pytest.raises(InvalidRequest, match="confirm to delete"):
            hub.delete_cached(manager, HUB_ID, confirm=answer)
    assert folder.is_dir() and hub.cache_state(HUB_ID).downloaded
    downloads = hub.Downloads()
    job = downloads.begin(HUB_ID)
    with pytest.raises(Busy, match="press Stop first"):
        hub.delete_cached(manager, HUB_ID, confirm=True, downloads=downloads)
    downloads.end(job)

    message = hub.delete_cached(manager, HUB_ID, confirm=True, downloads=downloads)
    assert message == f"Deleted {HUB_ID} from the Hugging Face cache (1.0 MB freed)."
    assert not folder.exists() and hub.cache_state(HUB_ID).state == hub.MISSING
    assert scan_cache_dir(hub.hub_cache_dir()).repos == frozenset()
    with pytest.raises(InvalidRequest, match="has no files in the Hugging Face cache"):
        hub.delete_cached(manager, HUB_ID, confirm=True)
    with pytest.raises(InvalidRequest, match="not a hub model"):
        hub.delete_cached(manager, "tiny-local", confirm=True)


def test_delete_removes_a_partial_download_too(tmp_path):
    stopped = cache_repo(HUB_ID, {"config.json": b"{}"}, ref=False)  # stopped after its first file
    crashed = hub.repo_folder("test-org/crashed")  # a process killed while writing its first file
    (crashed / "blobs").mkdir(parents=True)
    (crashed / "blobs" / "abc.1234.incomplete").write_bytes(b"\0" * 100)
    locks = hub.hub_cache_dir() / ".locks" / crashed.name
    locks.mkdir(parents=True)
    (locks / "abc.lock").touch()
    manager = fake_manager(tmp_path, [spec(HUB_ID), spec("test-org/crashed")])
    assert hub.cache_state(HUB_ID).state == hub.PARTIAL and hub.cache_state("test-org/crashed").state == hub.PARTIAL
    assert "Deleted" in hub.delete_cached(manager, HUB_ID, confirm=True)
    assert "Deleted" in hub.delete_cached(manager, "test-org/crashed", confirm=True)
    assert not stopped.exists() and not crashed.exists() and not locks.exists() and hub.hub_cache_dir().is_dir()


# ---- add a model -------------------------------------------------------------------------------------

@pytest.mark.parametrize("repo_id, task, family, message", [
    ("", "chat", "chat", "Enter the model's hub id"),
    ("no-slash", "chat", "chat", "is not a hub model id"),
    ("a/b/c", "chat", "chat", "is not a hub model id"),
    ("org/na me", "chat", "chat", "is not a hub model id"),
    ("org--x/name", "chat", "chat", "is not a hub model id"),
    ("../etc", "chat", "chat", "is not a hub model id"),
    ("org/name.git", "chat", "chat", "is not a hub model id"),
    ("org/" + "x" * 93, "chat", "chat", "at most 96 characters"),
    (["org/name"], "chat", "chat", "Enter the model's hub id"),
    ("org/name", "poetry", "chat", "task must be one of"),
    ("org/name", "chat", "vlm", "uses the chat family, not 'vlm'"),
    ("org/name", "vqa", "chat", "uses the vlm family"),
    ("org/name", "text-to-speech", "tts", "do not come from the hub here"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "chat", "chat", "in the catalog already"),
])
def test_add_a_model_is_validated(tmp_path, repo_id, task, family, message):
    manager = fake_manager(tmp_path, list(Catalog.load()))
    with pytest.raises(InvalidRequest, match=message):
        hub.add_model(manager, manager.settings, repo_id, task, family)
    assert not user_models_file(manager.settings).exists(), "nothing written for a refused entry"


def test_an_added_model_is_usable_at_once_and_after_a_restart(tmp_path):
    manager = fake_manager(tmp_path, list(Catalog.load()), offline=False)
    settings = manager.settings
    assert models_file_to_load(settings) is None, "no file yet, no --models-file: nothing extra to read"

    message = hub.add_model(manager, settings, "  my-org/My_Model-1.5B  ", "chat", "chat")
    assert message.startswith("Added my-org/My_Model-1.5B (Chat, family chat) to models.yaml; it is usable now")
    assert str(tmp_path) not in message
    added = manager.catalog.get("my-org/My_Model-1.5B")
    assert (added.task, added.family, added.source) == ("chat", "chat", "hub")
    assert "my-org/My_Model-1.5B" in [s.id for s in manager.catalog.for_task("chat")]
    from models.voice import ChatRequest
    from tabs.common import model_choices

    request = ChatRequest.build(manager.catalog, settings, message="hi", model="my-org/My_Model-1.5B")
    assert request.reply.model == "my-org/My_Model-1.5B", "the API's requests accept it at once"
    assert "my-org/My_Model-1.5B" in [value for _, value in model_choices(manager, "chat")]
    with manager.use("my-org/My_Model-1.5B") as handle:  # the running manager loads it without a restart
        assert handle.nbytes == 5 * MB

    path = models_file_to_load(settings)
    assert path == settings.cache_dir / "models.yaml"
    restarted = Catalog.load(path)
    assert restarted.get("my-org/My_Model-1.5B").family == "chat"
    hub.add_model(manager, settings, "my-org/speech", "speech-to-text", "asr")
    assert [m["id"] for m in yaml.safe_load(path.read_text())["models"]] == ["my-org/My_Model-1.5B", "my-org/speech"]
    with pytest.raises(InvalidRequest, match="in the catalog already"):
        hub.add_model(manager, settings, "my-org/speech", "speech-to-text", "asr")


def test_adding_keeps_the_users_own_models_file_and_its_comments(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("# my models\nmodels:\n  - {id: my-local, task: chat, family: chat, source: local, repo: /x}\n")
    manager = fake_manager(tmp_path, list(Catalog.load(own)), models_file=own)
    assert user_models_file(manager.settings) == own and models_file_to_load(manager.settings) == own
    hub.add_model(manager, manager.settings, "org/a", "chat", "chat")
    text = own.read_text()
    assert text.startswith("# my models\n") and "- {id: org/a, task: chat, family: chat, source: hub" in text
    assert [s.id for s in Catalog.load(own) if s.source != "offline"][-2:] == ["my-local", "org/a"]

    flow = tmp_path / "flow.yaml"
    flow.write_text("models: []\n")  # appending a line would not parse: the file is rewritten from its data
    other = fake_manager(tmp_path, list(Catalog.load()), models_file=flow)
    hub.add_model(other, other.settings, "org/b", "text-to-image", "diffusion")
    assert Catalog.load(flow).get("org/b").family == "diffusion"

    broken = tmp_path / "broken.yaml"
    broken.write_text("models: {id: x}\n")
    third = fake_manager(tmp_path, list(Catalog.load()), models_file=broken)
    with pytest.raises(InvalidRequest, match="no list under 'models:'"):
        hub.add_model(third, third.settings, "org/c", "chat", "chat")
    assert "org/c" not in third.catalog and broken.read_text() == "models: {id: x}\n"


# ---- the meter -----------------------------------------------------------------------------------------

class Runner:
    def __init__(self, answer):
        self.answer = answer

    def training_memory(self):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_the_meter_shows_budget_process_and_training_with_mb_for_small_sizes(tmp_path):
    from tabs.models_panel import memory_figures, meter_html

    manager = fake_manager(tmp_path, [spec(HUB_ID)])
    with manager.use(HUB_ID):
        pass
    figures = memory_figures(manager, Runner({"run_id": "run-7", "pid": 4242, "rss_bytes": 50 * MB, "processes": 3}))
    assert figures["models_bytes"] == 5 * MB and figures["budget_bytes"] == manager.budget
    assert figures["process_rss"] > 20 * MB, "the process itself is measured, not the models' estimate"
    html = meter_html(figures)
    assert "5.0 MB of the 4.00 GB budget (0.1%)" in html, html
    assert "0.00 GB" not in html
    from models.limits import format_bytes

    assert f"<b>This process</b>: {format_bytes(figures['process_rss'])} resident (RSS)" in html
    assert "<b>Training</b>: 50.0 MB resident (run run-7, 3 processes)" in html

    big = meter_html({**figures, "process_rss": int(1.27 * 1024**3), "cuda_allocated": 300 * MB,
                      "training": {"rss": 2 * 1024**3, "cuda": 60 * MB}})
    assert "1.27 GB resident (RSS), 0.29 GB CUDA allocated" in big and "2.00 GB resident, 60.0 MB CUDA" in big

    for runner in (None, object(), Runner(None), Runner(RuntimeError("psutil gone")), Runner({"rss": 0})):
        figures = memory_figures(manager, runner)
        assert "Training" not in meter_html(figures)


# ---- menus elsewhere ----------------------------------------------------------------------------------

def test_model_menus_mark_hub_models_that_are_not_downloaded(tmp_path):
    from tabs.common import model_choices

    online = fake_manager(tmp_path, list(Catalog.load()), offline=False)
    offline = fake_manager(tmp_path, list(Catalog.load()))
    cache_repo("Qwen/Qwen2.5-1.5B-Instruct", {"config.json": b"{}"})

    labels = dict((value, label) for label, value in model_choices(online, "chat"))
    assert labels["Qwen/Qwen2.5-0.5B-Instruct"] == \
        "Qwen/Qwen2.5-0.5B-Instruct — not downloaded (downloads ~0.9 GB on first use)"
    assert labels["Qwen/Qwen2.5-1.5B-Instruct"] == "Qwen/Qwen2.5-1.5B-Instruct", "downloaded: no mark"
    assert labels["smollm2-135m"] == "smollm2-135m"
    assert labels["tiny-chat"] == "tiny-chat — random weights, for smoke tests"
    whisper = dict((value, label) for label, value in model_choices(online, "speech-to-text"))
    assert whisper["openai/whisper-tiny"].endswith("— not downloaded (downloads ~70 MB on first use)")
    offline_labels = dict((value, label) for label, value in model_choices(offline, "chat"))
    assert offline_labels["Qwen/Qwen2.5-0.5B-Instruct"] == \
        "Qwen/Qwen2.5-0.5B-Instruct — not downloaded (offline: unavailable)"
    assert offline_labels["Qwen/Qwen2.5-1.5B-Instruct"] == "Qwen/Qwen2.5-1.5B-Instruct"
    coqui = dict((value, label) for label, value in model_choices(offline, "text-to-speech"))
    assert coqui["tts_models/en/ljspeech/vits"] == "tts_models/en/ljspeech/vits", "only hub models are marked"

    started = time.perf_counter()
    for _ in range(10):  # ten builds' worth of menus
        for task in ("vqa", "text-to-image", "speech-to-text", "chat", "text-to-speech"):
            model_choices(online, task)
    assert time.perf_counter() - started < 0.5, "menus are built from a few stat calls, no network"


def test_approximate_download_sizes():
    assert hub.approx_download(spec("a", params_b=3.8)) == "~7 GB"
    assert hub.approx_download(spec("a", params_b=0.49)) == "~0.9 GB"
    assert hub.approx_download(spec("a", params_b=0.039)) == "~70 MB"
    assert hub.approx_download(spec("a", params_b=0.0)) == ""


# ---- the tab and its endpoints -------------------------------------------------------------------------

def build_tab(manager, runner=None):
    import gradio as gr

    from tabs import models_panel

    with gr.Blocks() as demo:
        models_panel.build(manager, manager.settings, runner=runner)
    return demo


def test_the_tab_wires_its_endpoints_outside_the_gpu_queue(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs with HF_HUB_OFFLINE=1
    manager = fake_manager(tmp_path, list(Catalog.load()), offline=False)
    demo = build_tab(manager)
    functions = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name}
    assert {"catalog", "download", "stop_download", "delete_cached", "add_model", "models", "unload",
            "unload_all"} <= set(functions)
    assert functions["download"].concurrency_limit == 1 and functions["download"].concurrency_id != "gpu"
    assert functions["download"].queue, "progress comes through the queue's event stream"
    assert all(fn.concurrency_id != "gpu" for fn in demo.fns.values())
    config = demo.get_config_file()
    download = next(c for c in config["components"] if c["props"].get("elem_id") == "download")
    assert download["props"]["interactive"] is not False
    with manager.use("tiny-chat"):
        pass
    refresh = next(fn for fn in demo.fns.values() if fn.name == "refresh")  # the timer's: every few seconds
    values = refresh.fn("tiny-chat")
    assert len(values) == len(refresh.outputs)
    table, _meter, _choice, _prepared, catalog_table = values
    assert table[0][0] == "tiny-chat" and table[0][4] == "5.0 MB"
    assert next(row for row in catalog_table if row[0] == "tiny-chat")[7:] == ["yes", "5.0 MB", "0 s"]


def test_offline_the_download_button_is_off_and_says_why(tmp_path):
    manager = fake_manager(tmp_path, list(Catalog.load()), offline_reason="--offline was given")
    config = build_tab(manager).get_config_file()
    by_id = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c["props"].get("elem_id")}
    assert by_id["download"]["interactive"] is False
    assert by_id["download-offline"]["visible"] is not False
    assert "Download is off: the app is offline (--offline was given)" in by_id["download-offline"]["value"]


def test_the_endpoints_through_gradio_client(tmp_path):
    from conftest import free_port
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    cache_repo(HUB_ID, {"config.json": b"{}", "model.safetensors": b"\0" * MB})
    manager = fake_manager(tmp_path, [*Catalog.load(), spec(HUB_ID, params_b=0.001)])
    demo = build_tab(manager, Runner({"rss": 10 * MB}))
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, quiet=True, server_port=port)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        listing = client.predict(api_name="/catalog")["models"]
        entry = next(e for e in listing if e["id"] == HUB_ID)
        assert entry["state"] == "downloaded" and entry["disk_bytes"] == MB + 2
        assert all(not e["id"].startswith("tiny-qwen") for e in listing)
        memory = client.predict(api_name="/models")["memory"]
        assert memory["training"] == {"rss": 10 * MB} and memory["process_rss"] > 0
        with pytest.raises(AppError, match="Downloads are off"):
            client.predict(HUB_ID, api_name="/download")
        assert client.predict(HUB_ID, api_name="/stop_download") == f"No download of {HUB_ID} is running."
        with manager.use(HUB_ID):
            pass
        with pytest.raises(AppError, match="is loaded; unload it first"):
            client.predict(HUB_ID, True, api_name="/delete_cached")
        client.predict(HUB_ID, api_name="/unload")
        with pytest.raises(AppError, match="confirm to delete"):
            client.predict(HUB_ID, api_name="/delete_cached")
        assert client.predict(model_id=HUB_ID, confirm=True, api_name="/delete_cached").startswith("Deleted")
        with pytest.raises(AppError, match="is not a hub model id"):
            client.predict("nope", "chat", "chat", api_name="/add_model")
        assert client.predict("org/new", "chat", "chat", api_name="/add_model").startswith("Added org/new")
        assert any(e["id"] == "org/new" for e in client.predict(api_name="/catalog")["models"])
    finally:
        demo.close()
