"""Hostile inputs through the running app: small uploads that expand to gigabytes or minutes of CPU.

Each case (tests/helpers.py ``hostile_cases``) must get its clear message (or, for the long chat
history, a normal answer), and while it runs the app's memory may grow by less than 1 GB; it must
answer within 60 s; afterwards /health answers 200, /models shows nothing pinned, and the app's
cache holds no file the request left behind.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from helpers import HOSTILE_CASES, hostile_cases, raw_call, unencodable

pytestmark = pytest.mark.slow

MAX_RSS_GROWTH = 1024**3
MAX_SECONDS = 60
# Folders whose content is the app's own, not left behind by a request
KEPT = ("logs", "offline-models", "examples", "outputs", "adapters")


class PeakRss:
    """The peak resident memory of this process (the app runs in it) while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")
            if path.is_file() and path.relative_to(folder).parts[0] not in KEPT}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return {case.name: case for case in hostile_cases(tmp_path_factory.mktemp("hostile"))}


def call(client, url: str, case):
    from gradio_client import handle_file

    if any(isinstance(value, str) and unencodable(value) for value in case.kwargs.values()):
        return raw_call(client, url, case.api_name, case.kwargs)
    kwargs = {key: handle_file(str(value)) if isinstance(value, Path) else value for key, value in case.kwargs.items()}
    return client.predict(**kwargs, api_name=case.api_name)


@pytest.mark.parametrize("name", HOSTILE_CASES)
def test_hostile_input_is_refused_cheaply_and_leaves_nothing(client, app_server, cases, name):
    from gradio_client.exceptions import AppError

    url, manager, settings = app_server
    case = cases[name]
    before = files_under(settings.cache_dir)
    started = time.monotonic()
    with PeakRss() as rss:
        if case.message:
            with pytest.raises(AppError) as excinfo:
                call(client, url, case)
            message = str(excinfo.value)
            assert re.search(case.message, message, re.S), message
            assert "/tmp/" not in message and str(settings.cache_dir) not in message, "a server path was shown"
            assert "Traceback" not in message and len(message) < 2000
        else:
            assert call(client, url, case) is not None
    seconds = time.monotonic() - started
    print(f"{name}: {seconds:.1f} s, peak RSS growth {rss.growth / 1024**2:.0f} MB")
    assert seconds < MAX_SECONDS
    assert rss.growth < MAX_RSS_GROWTH, f"RSS grew by {rss.growth / 1024**2:.0f} MB"
    with urllib.request.urlopen(url + "health", timeout=10) as response:
        assert response.status == 200 and json.load(response)["status"] == "ok"
    assert not any(entry["pinned"] for entry in client.predict(api_name="/models")["models"])
    assert files_under(settings.cache_dir) - before == set(), "the request left files behind"
    assert manager.snapshot() is not None
