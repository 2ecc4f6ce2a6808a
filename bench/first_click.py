"""First click on a fresh start: time to the first token of a /chat request, against the same request warm.

After the README's setup (`make run` prepares the offline models into .cache once), it starts
`python app.py` as a user would, waits for its first HTTP 200, sends a /chat request to
smollm2-135m and measures the time to its first streamed token; then sends the same request again
(warm). It does this for the app as started by default and with `--preload defaults` (the voice
tab's models loaded in the background right after start-up; the "user" clicks once /health shows
them loaded, or after 60 s). Apps run in turn, BENCH_RUNS times each (default 2).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/first_click.py

Prints the medians and the ratio first / warm (goal <= 1.5). Not a test: never fails on a slow day.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("BENCH_RUNS", "2"))
MESSAGE = "What is the capital of France?"


def first_token_seconds(client) -> float:
    started = time.perf_counter()
    job = client.submit(MESSAGE, [], "smollm2-135m", "Answer briefly.", 24, 0.0, "none", api_name="/chat")
    for output in job:
        if output:
            seconds = time.perf_counter() - started
            break
    else:
        raise RuntimeError("the chat request streamed nothing")
    job.result()
    return seconds


def one_run(preload: bool) -> tuple[float, float, float]:
    """(first-click seconds, warm seconds, seconds from HTTP 200 to the preload being done)."""
    from gradio_client import Client

    port = free_port()
    cache = tempfile.mkdtemp(prefix="first-click-")
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               WORKBENCH_MODELS_DIR=str(ROOT / ".cache" / "offline-models"))
    command = [sys.executable, "app.py", "--offline", "--device", "cpu", "--port", str(port), "--cache-dir", cache]
    if preload:
        command += ["--preload", "defaults"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http(url)
        ready = time.perf_counter()
        waited = 0.0
        if preload:
            while time.perf_counter() - ready < 60:
                with urllib.request.urlopen(url + "health", timeout=5) as response:
                    if "smollm2-135m" in json.load(response)["loaded"]:
                        break
                time.sleep(0.5)
            waited = time.perf_counter() - ready
        client = Client(url, verbose=False)
        first = first_token_seconds(client)
        warm = first_token_seconds(client)
        return first, warm, waited
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    results: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    for _ in range(RUNS):
        for preload in (False, True):
            results[preload].append(one_run(preload))
    median = statistics.median
    print(f"/chat to smollm2-135m, time to first streamed token, {RUNS} runs per app, medians")
    for preload, label in ((False, "app.py (default)"), (True, "app.py --preload defaults")):
        runs = results[preload]
        first, warm = median(r[0] for r in runs), median(r[1] for r in runs)
        extra = f", preload done {median(r[2] for r in runs):.1f} s after the first HTTP 200" if preload else ""
        print(f"  {label:28s} first click {first:.3f} s, warm {warm:.3f} s, ratio {first / warm:.2f} "
              f"(goal <= 1.5){extra}")


if __name__ == "__main__":
    main()
