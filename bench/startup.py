"""Start-up cost of the workbench against a bare Gradio app and an eager "tutorial-style" app.

Measures, for each app, the seconds from process start to the first HTTP 200 on / and the idle
resident memory (RSS) two seconds later. Each app runs BENCH_RUNS times (default 3), interleaved
so that a busy moment of the machine hits all three alike; the medians are compared.

    python bench/startup.py

Goal: app.py within 1.3x of the bare app on both. This is a measurement, not a test: it never fails
because the machine is slow.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
from common import free_port

ROOT = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
TIMEOUT = 300
SETTLE_SECONDS = 2.0

BARE_APP = """
import sys
import gradio as gr

with gr.Blocks(title="bare") as demo:
    gr.Markdown("# Bare Gradio app")
    box = gr.Textbox(label="text")
    gr.Button("Echo").click(lambda text: text, inputs=box, outputs=box)
demo.queue()
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), ssr_mode=False)
"""

# What tutorial scripts do: import the whole model stack and load every model before serving.
EAGER_APP = """
import contextlib, importlib.util, sys
import torch, transformers, diffusers, peft, bitsandbytes  # noqa: F401
with contextlib.suppress(ImportError):
    import TTS.api  # noqa: F401
import app

settings, manager, demo = app.create(["--offline", "--device", "cpu", "--port", sys.argv[1],
                                      "--cache-dir", sys.argv[2], "--memory-budget", "16"])
for spec in manager.catalog:
    if spec.works_offline and importlib.util.find_spec(f"models.families.{{spec.family}}") is not None:
        with manager.use(spec.id):
            pass
print("eager app loaded", [m["id"] for m in manager.snapshot()], flush=True)
demo.queue(default_concurrency_limit=4)
demo.launch(**app.launch_kwargs(settings, manager))
"""


def command(kind: str, port: int, cache: str, scripts: dict[str, Path]) -> list[str]:
    if kind == "app.py":
        return [sys.executable, str(ROOT / "app.py"), "--offline", "--device", "cpu", "--port", str(port),
                "--cache-dir", cache]
    return [sys.executable, str(scripts[kind]), str(port), cache]


def measure(kind: str, scripts: dict[str, Path], env: dict) -> tuple[float, float]:
    """Start one app; return (seconds to first HTTP 200, idle RSS in MB)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache:
        started = time.perf_counter()
        process = subprocess.Popen(command(kind, port, cache, scripts), cwd=ROOT, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{kind} exited with {process.returncode}: {process.stderr.read()[-2000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.perf_counter() - started > TIMEOUT:
                    raise RuntimeError(f"{kind} did not answer within {TIMEOUT}s")
                time.sleep(0.05)
            seconds = time.perf_counter() - started
            time.sleep(SETTLE_SECONDS)
            rss = psutil.Process(process.pid).memory_info().rss / 1024**2
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(15)
    return seconds, rss


def main() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}
    models_dir = ROOT / ".cache" / "offline-models"
    if "WORKBENCH_MODELS_DIR" not in env and models_dir.is_dir():
        env["WORKBENCH_MODELS_DIR"] = str(models_dir)  # reuse the prebuilt tiny models: no build in the timing
    kinds = ["app.py", "bare", "eager"]
    results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="bench-scripts-") as folder:
        scripts = {"bare": Path(folder) / "bare_app.py", "eager": Path(folder) / "eager_app.py"}
        scripts["bare"].write_text(BARE_APP)
        scripts["eager"].write_text(EAGER_APP.format(root=str(ROOT)))
        for run in range(RUNS):
            for kind in kinds:
                seconds, rss = measure(kind, scripts, env)
                results[kind].append((seconds, rss))
                print(f"run {run + 1}/{RUNS} {kind:7s} first HTTP 200 after {seconds:6.2f} s, idle RSS {rss:7.1f} MB",
                      flush=True)

    medians = {kind: (statistics.median(s for s, _ in values), statistics.median(r for _, r in values))
               for kind, values in results.items()}
    print(f"\nmedians over {RUNS} runs (2 shared CPU cores):")
    print(f"{'app':8s} {'first 200 (s)':>14s} {'idle RSS (MB)':>14s}")
    for kind, (seconds, rss) in medians.items():
        print(f"{kind:8s} {seconds:14.2f} {rss:14.1f}")
    bare_s, bare_rss = medians["bare"]
    for kind in ("app.py", "eager"):
        seconds, rss = medians[kind]
        print(f"{kind} / bare: start-up ratio {seconds / bare_s:.2f}, idle RSS ratio {rss / bare_rss:.2f}")
    app_s, app_rss = medians["app.py"]
    verdict = "met" if app_s / bare_s <= 1.3 and app_rss / bare_rss <= 1.3 else "NOT met"
    print(f"goal app.py <= 1.3x bare on both: {verdict}")


if __name__ == "__main__":
    main()
