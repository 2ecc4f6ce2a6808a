"""Hostile requests against a running app: the peak memory growth and seconds of each, next to a normal request.

Starts ``python app.py --offline`` as a user would (offline models from .cache/offline-models),
then sends each hostile case of the test suite (tests/helpers.py ``hostile_cases``: a 1 x 400 000
PNG, 192 kHz x 8 channel audio, a zip of 60 MB of bad lines, YAML aliases, 10 000 history turns...)
and, where the case has one, a normal request of the same kind, one after the other. The app's
resident memory is sampled every 20 ms from outside its process.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/hostile.py

Prints one row per case: what came back, seconds, and peak RSS growth of the app, hostile vs normal.
Not a test: it prints numbers and never fails on a slow day.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from common import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent


def load_test_helpers():
    spec = importlib.util.spec_from_file_location("test_helpers", ROOT / "tests" / "helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(process: psutil.Process, send) -> tuple[float, int, str]:
    """(seconds, peak RSS growth in bytes, outcome) of ``send()``, sampling the app's RSS every 20 ms."""
    start = process.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        send()
        outcome = "answered"
    except Exception as exc:  # noqa: BLE001 - the app's refusal is the expected outcome
        outcome = "refused: " + str(exc).split("\n")[0][:90]
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return seconds, max(peak[0], process.memory_info().rss) - start, outcome


def main() -> None:
    from gradio_client import Client, handle_file

    helpers = load_test_helpers()
    work = Path(tempfile.mkdtemp(prefix="hostile-bench-"))
    cases = helpers.hostile_cases(work / "cases")
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               WORKBENCH_MODELS_DIR=str(ROOT / ".cache" / "offline-models"))
    app = subprocess.Popen([sys.executable, "app.py", "--offline", "--device", "cpu", "--port", str(port),
                            "--cache-dir", str(work / "cache")], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http(url)
        client = Client(url, verbose=False)
        process = psutil.Process(app.pid)

        def sender(case, kwargs):
            def send():
                if any(isinstance(value, str) and helpers.unencodable(value) for value in kwargs.values()):
                    return helpers.raw_call(client, url, case.api_name, kwargs)
                values = {k: handle_file(str(v)) if isinstance(v, Path) else v for k, v in kwargs.items()}
                return client.predict(**values, api_name=case.api_name)
            return send

        print(f"{'case':46s} {'hostile s':>9s} {'MB':>6s} | {'normal s':>8s} {'MB':>6s} | outcome")
        for case in cases:
            if case.normal:
                sender(case, case.normal)()  # warm: the model is loaded, so both sides time a warm app
            normal = measure(process, sender(case, case.normal)) if case.normal else None
            seconds, growth, outcome = measure(process, sender(case, case.kwargs))
            normal_text = f"{normal[0]:8.2f} {normal[1] / 1024**2:6.0f}" if normal else f"{'—':>8s} {'—':>6s}"
            print(f"{case.name:46s} {seconds:9.2f} {growth / 1024**2:6.0f} | {normal_text} | {outcome}", flush=True)
        print(f"app RSS at the end: {process.memory_info().rss / 1024**2:.0f} MB")
    finally:
        app.terminate()
        app.wait(30)


if __name__ == "__main__":
    main()
