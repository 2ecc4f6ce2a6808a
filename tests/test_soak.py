"""Bounded concurrency soak: 8 gradio_client clients across the tabs against the launched app.

Checks: zero failed requests; model calls serialized by the shared "gpu" queue (never two models
pinned at once); loaded memory within the budget (shrunk for the soak to the largest model, so that
the LRU evicts and reloads all the time); /models and GET /health keep answering quickly while models run.
Prints requests, failures, peak memory and latency percentiles, and writes them to
.cache/soak-report.json. SOAK_SECONDS (default 30) sets the duration.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from collections import defaultdict

import httpx
import pytest
from conftest import ROOT

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "30"))
CLIENTS = 8
LIGHT_CLIENTS = 2  # clients that only poll /models and /health, measuring their latency under load
REPORT = ROOT / ".cache" / "soak-report.json"


def make_inputs(folder):
    """A small PNG and a one-second WAV for the image and audio endpoints."""
    import numpy as np
    import soundfile
    from PIL import Image

    image = folder / "square.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    audio = folder / "tone.wav"
    seconds = np.arange(16000) / 16000
    soundfile.write(audio, (0.3 * np.sin(2 * np.pi * 440 * seconds)).astype("float32"), 16000)
    return image, audio


def model_workloads(image, audio) -> dict:
    """endpoint -> (kwargs for client.predict, model ids it loads)."""
    from gradio_client import handle_file

    return {
        "/vqa": (dict(image=handle_file(str(image)), question="What is in this image?", model="tiny-vlm",
                      max_new_tokens=8), ["tiny-vlm"]),
        "/txt2img": (dict(prompt="a red square", negative_prompt="", model="tiny-sd", width=64, height=64, steps=2,
                          seed=7, num_images=1), ["tiny-sd"]),
        "/chat": (dict(message="Hello, who are you?", history=[], model="tiny-chat", max_new_tokens=8), ["tiny-chat"]),
        "/speak": (dict(text="Hello there.", model="tiny-tts", reference=None), ["tiny-tts"]),
        "/transcribe": (dict(audio=handle_file(str(audio)), model="tiny-whisper"), ["tiny-whisper"]),
    }


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


class PinCounter:
    """Wraps manager.use on the instance to record how many models are pinned at once."""

    def __init__(self, manager):
        self.manager = manager
        self.original = manager.use
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.uses = 0

    @contextlib.contextmanager
    def use(self, *args, **kwargs):
        with self.original(*args, **kwargs) as handle:
            with self.lock:
                self.active += 1
                self.uses += 1
                self.peak = max(self.peak, self.active)
            try:
                yield handle
            finally:
                with self.lock:
                    self.active -= 1

    def __enter__(self):
        self.manager.use = self.use
        return self

    def __exit__(self, *exc):
        del self.manager.use  # back to the class's method


@pytest.mark.slow
def test_concurrent_clients_soak(app_server, tmp_path):
    from gradio_client import Client

    url, manager, _ = app_server
    offered = Client(url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
    workloads = model_workloads(*make_inputs(tmp_path))
    missing = sorted(set(workloads) - set(offered))
    assert missing == [], f"model endpoints missing from the app: {missing}"

    # 1. Warm up: build and load each tiny model once, and measure it under the normal budget.
    manager.unload_all()
    warm = Client(url, verbose=False)
    sizes = {}
    for name, (kwargs, _) in workloads.items():
        warm.predict(api_name=name, **kwargs)
        sizes.update({m["id"]: m["bytes"] for m in manager.snapshot()})
    largest = sorted((max(sizes.get(mid, 0), manager.catalog.get(mid).estimate_bytes("fp32"))
                      for _, ids in workloads.values() for mid in ids), reverse=True)
    original_budget = manager.budget
    # 2. Room for the largest model and little else, so the soak evicts and reloads constantly.
    soak_budget = largest[0] + 1
    manager.unload_all()  # the budget is only enforced on loads: start from empty
    manager.budget = soak_budget

    latencies: dict[str, list[float]] = defaultdict(list)
    failures: list[str] = []
    memory_samples: list[int] = []
    over_budget: list[int] = []
    stop = threading.Event()
    record_lock = threading.Lock()

    def record(name: str, started: float, error: Exception | None = None):
        with record_lock:
            if error is None:
                latencies[name].append(time.perf_counter() - started)
            else:
                failures.append(f"{name}: {error.__class__.__name__}: {error}")

    def model_client(index: int):
        client = Client(url, verbose=False)
        names = list(workloads)
        turn = index
        while not stop.is_set():
            name = names[turn % len(names)]
            turn += 1
            started = time.perf_counter()
            try:
                client.predict(api_name=name, **workloads[name][0])
                record(name, started)
            except Exception as exc:  # every failure is counted and reported
                record(name, started, exc)

    def light_client(index: int):
        client = Client(url, verbose=False)
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    if index % 2:
                        assert http.get("health").json()["status"] == "ok"
                        record("GET /health", started)
                    else:
                        assert "models" in client.predict(api_name="/models")
                        record("/models", started)
                except Exception as exc:  # every failure is counted and reported
                    record("GET /health" if index % 2 else "/models", started, exc)
                time.sleep(0.1)

    def sample_memory():
        while not stop.is_set():
            used = manager.used_bytes()
            memory_samples.append(used)
            if used > manager.budget:
                over_budget.append(used)
            time.sleep(0.02)

    loads_before = sum(manager.load_count.values())
    with PinCounter(manager) as pins:
        threads = [threading.Thread(target=model_client, args=(i,)) for i in range(CLIENTS - LIGHT_CLIENTS)]
        threads += [threading.Thread(target=light_client, args=(i,)) for i in range(LIGHT_CLIENTS)]
        threads.append(threading.Thread(target=sample_memory))
        started = time.perf_counter()
        try:
            for thread in threads:
                thread.start()
            time.sleep(SOAK_SECONDS)
        finally:
            stop.set()
            for thread in threads:
                thread.join(120)
            manager.budget = original_budget
        elapsed = time.perf_counter() - started
    reloads = sum(manager.load_count.values()) - loads_before

    model_requests = sum(len(latencies[name]) for name in workloads)
    light = latencies["/models"] + latencies["GET /health"]
    report = {
        "seconds": round(elapsed, 1), "clients": CLIENTS, "requests": sum(map(len, latencies.values())),
        "failures": len(failures), "model_requests": model_requests, "model_loads_during_soak": reloads,
        "peak_pinned_models": pins.peak, "peak_used_mb": round(max(memory_samples, default=0) / 1024**2, 2),
        "soak_budget_mb": round(soak_budget / 1024**2, 2),
        "latency_s": {name: {"n": len(values), "p50": round(percentile(values, 0.5), 3),
                             "p95": round(percentile(values, 0.95), 3), "p99": round(percentile(values, 0.99), 3),
                             "mean": round(statistics.fmean(values), 3) if values else None}
                      for name, values in sorted(latencies.items())},
    }
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2))
    print("\nsoak report:", json.dumps(report, indent=2))

    assert failures == [], failures[:5]
    assert all(latencies[name] for name in workloads), f"an endpoint never completed: {report['latency_s']}"
    assert pins.uses >= model_requests, "model calls bypassed manager.use"
    assert pins.peak == 1, f"{pins.peak} models were pinned at once: the gpu queue did not serialize model calls"
    assert over_budget == [], f"used bytes exceeded the budget: {max(over_budget)}"
    assert reloads > 0, "the shrunk budget never made the manager evict and reload"
    assert len(light) >= SOAK_SECONDS, "the Models endpoint and /health stopped answering under load"
    # generous bounds: 2 shared cores; the point is that they keep answering while models run
    assert percentile(latencies["GET /health"], 0.95) < 5.0
    assert percentile(latencies["/models"], 0.95) < 5.0
    manager.unload_all()
    assert manager.used_bytes() == 0 and manager.leaks == []
