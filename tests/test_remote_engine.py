"""A remote engine as a catalog entry: a second workbench serves /v1, the first uses it like a local model."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from conftest import MODELS_DIR, ROOT, free_port, make_settings

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(tmp_path):
    """A second workbench (`python app.py`) on another local port; yields its /v1 URL, stops it after."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", WORKBENCH_MODELS_DIR=str(MODELS_DIR))
    process = subprocess.Popen([sys.executable, "app.py", "--offline", "--device", "cpu", "--port", str(port),
                                "--cache-dir", str(tmp_path / "engine")], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "health", timeout=2)
            break
        except OSError:
            time.sleep(0.3)
    yield url + "v1", process
    process.terminate()
    process.wait(30)


def remote_manager(tmp_path, base_url: str):
    from models.catalog import Catalog, spec_from_dict
    from models.manager import ModelManager

    entries = [{"id": "remote-smollm", "task": "chat", "family": "remote", "source": "openai", "base_url": base_url,
                "repo": "smollm2-135m"},
               {"id": "remote-vlm", "task": "vqa", "family": "remote", "source": "openai", "base_url": base_url,
                "repo": "tiny-vlm"}]
    catalog = Catalog([*Catalog.load(), *(spec_from_dict(entry, "test") for entry in entries)])
    settings = make_settings(tmp_path / "first")
    return ModelManager(catalog, settings), settings


def test_remote_chat_and_vqa_stream_stop_and_report_a_dead_engine(tmp_path, engine):
    from PIL import Image

    from models import vqa
    from models.errors import Unavailable
    from models.families import remote
    from models.voice import ChatRequest, chat_reply

    base_url, process = engine
    manager, settings = remote_manager(tmp_path, base_url)
    request = ChatRequest.build(manager.catalog, settings, message="What is the capital of France?",
                                model="remote-smollm", temperature=0.0, max_new_tokens=30, system_prompt="")
    parts = list(chat_reply(manager, request))
    assert len(parts) >= 3 and "Paris" in parts[-1], "the engine's answer streams in pieces"
    assert manager.snapshot()[0]["bytes"] == 0, "a remote model takes no local memory"

    story = ChatRequest.build(manager.catalog, settings, message="Write a long story about a dragon.",
                              model="remote-smollm", temperature=0.0, max_new_tokens=400, system_prompt="")
    stop = threading.Event()
    texts = []
    with manager.use("remote-smollm") as handle:
        for text in remote.reply(handle, story.messages(), story.reply.params, stop=stop):
            texts.append(text)
            if len(texts) == 3:
                stop.set()
    assert len(texts) == 3, "Stop ended the remote stream"

    image = Image.new("RGB", (32, 32), "red")
    picture = tmp_path / "red.png"
    image.save(picture)
    ask = vqa.VqaRequest.build(manager.catalog, settings, image=picture, question="What colour?", model="remote-vlm",
                               max_new_tokens=6, temperature=0.0)
    turns = list(vqa.chat_turn(manager, ask))
    assert len(turns) >= 2 and turns[-1][0][-1]["role"] == "assistant"

    process.terminate()
    process.wait(30)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="refuses connections or cannot be reached"):
        list(chat_reply(manager, request))
    assert time.monotonic() - started < 15, "nothing hangs when the engine is gone"
    assert not any(entry["pinned"] for entry in manager.snapshot())


def test_a_remote_entry_needs_its_url_and_family():
    from models.catalog import spec_from_dict

    with pytest.raises(ValueError, match="source openai and family remote"):
        spec_from_dict({"id": "x", "task": "chat", "family": "chat", "source": "openai", "base_url": "http://h/v1"},
                        "models.yaml")
    with pytest.raises(ValueError, match="chat or vqa model with a base_url"):
        spec_from_dict({"id": "x", "task": "chat", "family": "remote", "source": "openai"}, "models.yaml")


def test_an_engine_that_refuses_connections_gets_a_clear_message_quickly(tmp_path):
    from models.errors import Unavailable
    from models.voice import ChatRequest, chat_reply

    manager, settings = remote_manager(tmp_path, f"http://127.0.0.1:{free_port()}/v1")
    request = ChatRequest.build(manager.catalog, settings, message="hi", model="remote-smollm", max_new_tokens=4)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="refuses connections"):
        list(chat_reply(manager, request))
    assert time.monotonic() - started < 10 and manager.snapshot() == []
