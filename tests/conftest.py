"""Shared fixtures: offline settings, a real manager on tiny models, and one launched app.

Offline models live in .cache/offline-models, the app's own default, which `make test` prepares
before pytest starts (kept between local runs). Everything else a test writes goes to a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / ".cache" / "offline-models"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs the test process, an app server and training processes side by side on small CI
# machines; one compute thread each avoids oversubscription (measured 30-100x slowdowns on 2 cores
# without it). Tiny models gain nothing from more threads. Subprocesses inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    cuda = False
    if any("gpu" in item.keywords for item in items):
        import torch

        cuda = torch.cuda.is_available()
    chromium = shutil.which("chromium") or Path("/usr/bin/chromium").exists()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        if "browser" in item.keywords and not chromium and not os.environ.get("CI"):
            item.add_marker(pytest.mark.skip(reason="Debian's chromium is not installed (make test installs it)"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_settings(tmp: Path, **overrides):
    from models.settings import Settings

    values = dict(cache_dir=tmp, models_dir=MODELS_DIR, offline=True, offline_reason="tests run offline",
                  device="cpu", memory_budget_gb=4.0)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path)


@pytest.fixture
def catalog():
    from models.catalog import Catalog

    return Catalog.load()


@pytest.fixture
def manager(settings, catalog):
    """A real ModelManager on the real families; unloads everything at the end."""
    from models.manager import ModelManager

    mgr = ModelManager(catalog, settings)
    yield mgr
    mgr.unload_all()


@pytest.fixture
def runner(settings, manager):
    """A TrainingRunner over ``manager``; a run still going at the end is killed."""
    from finetune.runner import TrainingRunner

    runner = TrainingRunner(settings, manager)
    yield runner
    current = runner.active_run()
    if current:
        runner.kill(current)


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """The assembled app, launched once per session on a free port: (url, manager, settings)."""
    import app

    cache = tmp_path_factory.mktemp("app-cache")
    port = free_port()
    os.environ["WORKBENCH_MODELS_DIR"] = str(MODELS_DIR)
    settings, manager, demo = app.create(["--offline", "--cache-dir", str(cache), "--port", str(port),
                                          "--device", "cpu", "--memory-budget", "4"])
    demo.queue(default_concurrency_limit=4)
    kwargs = app.launch_kwargs(settings, manager)
    demo.launch(prevent_thread_lock=True, quiet=True, **kwargs)
    url = f"http://127.0.0.1:{port}/"
    yield url, manager, settings
    demo.close()
    manager.unload_all()


@pytest.fixture(scope="session")
def client(app_server):
    from gradio_client import Client

    return Client(app_server[0], verbose=False)


@pytest.fixture(scope="session")
def twin_catalog():
    """The catalog with every hub and Coqui entry pointed at its architecture twin's folder.

    Each entry keeps its id, family, variant and the rest, so loading it runs the same family code
    as the hub id would, offline. The twins are built into MODELS_DIR once (``make test`` prepares them).
    """
    import dataclasses
    import tempfile

    from models.catalog import Catalog
    from models.families import resolve_location

    catalog = Catalog.load()
    settings = make_settings(Path(tempfile.mkdtemp(prefix="twins-")))
    specs = []
    for spec in catalog:
        if spec.twin:
            folder = resolve_location(catalog.get(spec.twin), settings)
            spec = dataclasses.replace(spec, source="local", repo=folder)
        specs.append(spec)
    return Catalog(specs)


@pytest.fixture
def twin_manager(twin_catalog, settings):
    """A real ModelManager over ``twin_catalog``; unloads everything at the end.

    The entries keep the real models' sizes for their estimates (SDXL: 15 GB in fp32), so the
    budget is wide; once loaded, the twins are measured at their own few MB.
    """
    import dataclasses

    from models.manager import ModelManager

    mgr = ModelManager(twin_catalog, dataclasses.replace(settings, memory_budget_gb=64.0))
    yield mgr
    mgr.unload_all()
