"""--idle-unload: models no call has used for a while are freed; a model answering a request never is.

LocalAI's watchdog unloaded models in the middle of long requests (its users reported it as a bug):
here idleness counts from the end of a model's last call, and a pinned model is skipped however long
its call takes. The watchdog runs with a 0.5 s timeout checked every 0.1 s.
"""

from __future__ import annotations

import logging
import time
import weakref

import pytest
from conftest import make_settings

from models.catalog import Catalog, ModelSpec
from models.manager import ModelManager

IDLE = 0.5
CHECK = 0.1


class Handle:
    def __init__(self, model_id: str):
        self.model_id = model_id
        self.nbytes = 1024**2


@pytest.fixture
def manager(tmp_path):
    specs = [ModelSpec(id=name, task="chat", family="chat", source="offline") for name in ("a", "b")]
    released: list[str] = []
    mgr = ModelManager(Catalog(specs), make_settings(tmp_path), loader=lambda spec, *_: Handle(spec.id),
                       releaser=lambda spec, _handle: released.append(spec.id), measure=lambda h: h.nbytes)
    mgr._device = "cpu"
    mgr.released = released
    yield mgr
    mgr.stop_idle_unload()
    mgr.unload_all()


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_an_idle_model_is_unloaded(manager, caplog):
    with manager.use("a"):
        pass
    with caplog.at_level(logging.INFO, logger="models.manager"):
        thread = manager.start_idle_unload(IDLE, CHECK)
        assert thread is not None and thread.daemon and thread.name == "idle-unload"
        time.sleep(IDLE / 2)  # a few checks happen meanwhile
        assert manager.is_loaded("a"), "not before its time"
        assert wait_until(lambda: not manager.is_loaded("a"), IDLE + 1.0)
    assert manager.released == ["a"] and manager.used_bytes() == 0 and manager.leaks == []
    assert any("no call has used it" in record.getMessage() for record in caplog.records)


def test_a_model_busy_for_longer_than_the_timeout_stays(manager):
    manager.start_idle_unload(IDLE, CHECK)
    with manager.use("b"):  # a call that takes three times the timeout
        with manager.use("a"):
            pass
        assert wait_until(lambda: not manager.is_loaded("a"), IDLE + 1.0), "the watchdog runs meanwhile"
        time.sleep(3 * IDLE)
        assert manager.is_loaded("b") and manager.snapshot()[0]["pinned"]
        assert manager.released == ["a"]
    ended = time.monotonic()
    assert manager.is_loaded("b"), "idleness counts from the end of the call, not its start"
    assert wait_until(lambda: not manager.is_loaded("b"), IDLE + 1.0)
    assert time.monotonic() - ended >= IDLE - CHECK
    assert manager.released == ["a", "b"]


def test_unload_idle_skips_pinned_and_recent_models(manager):
    with manager.use("a"):
        pass
    assert manager.unload_idle(60) == [], "used a moment ago"
    with manager.use("b"):
        assert manager.unload_idle(0) == ["a"], "b is answering a request"
    assert manager.unload_idle(0) == ["b"]
    assert manager.snapshot() == []


def test_idle_unload_is_off_by_default_and_set_by_flag_or_environment(manager, tmp_path, monkeypatch):
    from models.settings import Settings, settings_from_args

    assert Settings().idle_unload_minutes == 0
    assert manager.start_idle_unload() is None, "off: no thread"
    monkeypatch.delenv("WORKBENCH_IDLE_UNLOAD", raising=False)
    assert settings_from_args([]).idle_unload_minutes == 0
    assert settings_from_args(["--idle-unload", "15"]).idle_unload_minutes == 15
    monkeypatch.setenv("WORKBENCH_IDLE_UNLOAD", "2.5")
    assert settings_from_args([]).idle_unload_minutes == 2.5
    assert settings_from_args(["--idle-unload", "0"]).idle_unload_minutes == 0
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit, match="--idle-unload must be a number of minutes"):
            settings_from_args(["--idle-unload", bad])

    minutes = ModelManager(manager.catalog, make_settings(tmp_path, idle_unload_minutes=0.5 / 60),
                           loader=lambda spec, *_: Handle(spec.id), releaser=lambda *_: None,
                           measure=lambda h: h.nbytes)
    minutes._device = "cpu"
    thread = minutes.start_idle_unload(check_seconds=CHECK)  # the app's call: the timeout comes from the settings
    assert minutes.start_idle_unload(check_seconds=CHECK) is thread, "started once"
    with minutes.use("a"):
        pass
    assert wait_until(lambda: not minutes.is_loaded("a"), IDLE + 1.0)
    minutes.stop_idle_unload()
    assert not thread.is_alive()
    with minutes.use("a"):
        pass
    time.sleep(IDLE + 3 * CHECK)
    assert minutes.is_loaded("a"), "stopped: nothing more is unloaded"
    minutes.unload_all()


def test_a_real_tiny_model_is_freed(settings, catalog):
    manager = ModelManager(catalog, settings)
    with manager.use("tiny-chat") as handle:
        model = weakref.ref(handle.model)
    del handle
    manager.start_idle_unload(IDLE, CHECK)
    try:
        assert wait_until(lambda: not manager.is_loaded("tiny-chat"), IDLE + 2.0)
        assert manager.leaks == [] and model() is None, "the weights are gone, not just forgotten"
    finally:
        manager.stop_idle_unload()


def test_a_failing_unload_does_not_stop_the_watchdog(manager, monkeypatch, caplog):
    calls = []
    original = manager.unload_idle

    def flaky(idle_seconds):
        calls.append(idle_seconds)
        if len(calls) == 1:
            raise RuntimeError("releaser exploded")
        return original(idle_seconds)

    monkeypatch.setattr(manager, "unload_idle", flaky)
    with manager.use("a"):
        pass
    with caplog.at_level(logging.ERROR, logger="models.manager"):
        manager.start_idle_unload(IDLE, CHECK)
        assert wait_until(lambda: not manager.is_loaded("a"), IDLE + 1.0)
    assert len(calls) >= 2 and any("idle unload failed" in r.getMessage() for r in caplog.records)
