"""Start-up: `python app.py` answers HTTP 200 with nothing loaded and without importing torch."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import MODELS_DIR, ROOT, free_port

HEAVY_MODULES = ("torch", "transformers", "diffusers", "TTS", "peft", "bitsandbytes", "accelerate")
STARTUP_TIMEOUT = 120


def app_env(cache: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKBENCH_", "GRADIO_SERVER"))}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               WORKBENCH_CACHE_DIR=str(cache), WORKBENCH_MODELS_DIR=str(MODELS_DIR), **extra)
    return env


class RunningApp:
    """`python app.py ARGS` in a subprocess, with its combined output collected in a thread."""

    def __init__(self, args: list[str], cache: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(self.port), *args], cwd=ROOT,
            env=env or app_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared; output:\n{self.output}")
            time.sleep(0.1)

    def wait_until_ready(self, timeout: float = STARTUP_TIMEOUT) -> float:
        """Poll until any HTTP answer arrives; return the seconds it took."""
        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"app exited with {self.process.returncode}:\n{self.output}")
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                return time.monotonic() - started
            except urllib.error.HTTPError:
                return time.monotonic() - started
            except OSError:
                if time.monotonic() - started > timeout:
                    raise AssertionError(f"no HTTP answer after {timeout}s:\n{self.output}") from None
                time.sleep(0.2)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=10) as response:
                return response.status, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode("utf-8", "replace")

    def mapped_libraries(self) -> str:
        return Path(f"/proc/{self.process.pid}/maps").read_text()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)


@contextlib.contextmanager
def running_app(args: list[str], cache: Path, env: dict | None = None):
    app = RunningApp(args, cache, env)
    try:
        yield app
    finally:
        app.stop()


def test_app_answers_http_200_with_nothing_loaded_and_no_torch(tmp_path):
    with running_app(["--offline"], tmp_path) as app:
        seconds = app.wait_until_ready()
        status, body = app.get("/")
        assert status == 200 and "<html" in body.lower()
        status, body = app.get("/health")
        health = json.loads(body)
        assert status == 200 and health["status"] == "ok" and health["loaded"] == [] and health["used_bytes"] == 0
        maps = app.mapped_libraries()
        assert "libtorch" not in maps, "the running app has loaded torch before any model was asked for"
        assert "offline mode: --offline was given" in app.output
        print(f"first HTTP answer after {seconds:.1f}s")
    assert not (tmp_path / "offline-models").exists() or not any((tmp_path / "offline-models").iterdir())


def test_create_imports_no_model_stack(tmp_path):
    code = (
        "import json, sys\n"
        "import app\n"
        f"settings, manager, demo = app.create(['--offline', '--cache-dir', {str(tmp_path)!r}])\n"
        "app.launch_kwargs(settings, manager)\n"
        f"print(json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=app_env(tmp_path), capture_output=True,
                            text=True, timeout=STARTUP_TIMEOUT)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert imported == [], f"building the app imported {imported}"


def test_importing_app_does_no_work():
    code = "import sys, app; print('gradio' in sys.modules, 'models.manager' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("args, message", [
    (["--memory-budget", "-1"], "--memory-budget must be a positive number"),
    (["--auth", "nopassword"], "--auth must look like user:password"),
])
def test_bad_flags_stop_the_app_with_a_clear_message(tmp_path, args, message):
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), *args], cwd=ROOT, env=app_env(tmp_path),
                            capture_output=True, text=True, timeout=STARTUP_TIMEOUT)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
