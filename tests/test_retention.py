"""Disk retention on small files: oldest first, under the limit, and what must never be removed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from conftest import make_settings

from models import retention

KB = 1024


def write(path: Path, nbytes: int, age_s: float) -> Path:
    """A file of ``nbytes`` last modified ``age_s`` seconds ago (its folders are created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * nbytes)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def write_run(runs: Path, run_id: str, last_event: str | None, age_s: float, nbytes: int = KB) -> Path:
    """A run folder as finetune/runner.py lays it out, whose log ends with ``last_event``."""
    run = runs / run_id
    write(run / "config.yaml", 10, age_s)
    write(run / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors", nbytes, age_s)
    if last_event is not None:
        records = [{"event": "process"}, {"event": "step", "step": 1}, {"event": last_event}]
        (run / "log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        stamp = time.time() - age_s
        os.utime(run / "log.jsonl", (stamp, stamp))
    return run


def settings_with(tmp_path, limit_bytes: float):
    return make_settings(tmp_path, retention_gb=limit_bytes / 1024**3)


def test_oldest_items_go_first_until_the_total_is_under_the_limit(tmp_path):
    settings = settings_with(tmp_path, 2.5 * KB)
    ages = {"a": 300, "b": 200, "c": 100}
    images = [write(settings.outputs_dir / f"{name}.png", KB, age_s) for name, age_s in ages.items()]
    assert retention.enforce(settings) == [images[0]]
    assert [path.exists() for path in images] == [False, True, True]
    assert retention.enforce(settings) == []  # already under the limit: nothing more goes


def test_a_tiny_limit_keeps_adapters_running_runs_and_the_newest_of_each_area(tmp_path):
    settings = make_settings(tmp_path, retention_gb=1e-6)  # about 1 KB
    adapter = write(settings.adapters_dir / "memorise" / "adapter_model.safetensors", 50 * KB, age_s=9000)
    models = write(settings.offline_models_dir / "tiny-x" / "model.safetensors", 10 * KB, age_s=9000)
    old_image = write(settings.outputs_dir / "old.png", KB, age_s=500)
    new_image = write(settings.outputs_dir / "new.png", KB, age_s=10)
    runs = settings.runs_dir
    finished = write_run(runs, "finished", "done", age_s=800)
    failed = write_run(runs, "failed", "error", age_s=700)
    training = write_run(runs, "training", "step", age_s=9000)  # oldest, but its log says it still runs
    resumed = write_run(runs, "resumed", "done", age_s=600)  # its log says done; the runner says it runs again
    marked = write_run(runs, "marked", None, age_s=650)
    write(marked / "finished", 0, age_s=650)
    newest_run = write_run(runs, "newest", "done", age_s=20)
    upload = write(settings.cache_dir / "uploads" / "data.jsonl", KB, age_s=400)
    validation = write(settings.cache_dir / "validation" / "abc" / "data.jsonl", KB, age_s=30)

    removed = retention.enforce(settings, is_running=lambda run_id: run_id == "resumed")

    assert removed == [finished, failed, marked, old_image, upload]  # oldest first
    assert adapter.exists() and models.exists()
    assert training.exists() and resumed.exists()
    assert new_image.exists() and newest_run.exists() and validation.exists()


def test_protected_paths_and_the_folders_holding_them_survive(tmp_path):
    settings = make_settings(tmp_path, retention_gb=1e-6)
    shown = write(settings.outputs_dir / "shown.png", KB, age_s=300)
    other = write(settings.outputs_dir / "other.png", KB, age_s=200)
    write(settings.outputs_dir / "newest.png", KB, age_s=10)
    dataset = write(settings.cache_dir / "validation" / "in-use" / "data.jsonl", KB, age_s=300)
    write(settings.cache_dir / "uploads" / "later.jsonl", KB, age_s=10)
    removed = retention.enforce(settings, protect={shown, dataset})
    assert removed == [other]
    assert shown.exists() and dataset.exists()


def test_a_run_log_cut_mid_line_counts_as_running(tmp_path):
    settings = make_settings(tmp_path, retention_gb=1e-6)
    run = write_run(settings.runs_dir, "writing", "done", age_s=500)
    with open(run / "log.jsonl", "a") as log:
        log.write('{"event": "process", "pi')  # a resume has started writing
    stamp = time.time() - 500
    os.utime(run / "log.jsonl", (stamp, stamp))
    write_run(settings.runs_dir, "newest", "done", age_s=10)
    assert retention.enforce(settings) == []
    assert run.exists()


def test_an_abandoned_run_preparation_goes_once_it_is_old(tmp_path):
    settings = make_settings(tmp_path, retention_gb=1e-6)
    abandoned = write(settings.runs_dir / "bad-dataset" / "data" / "data.jsonl", KB, age_s=2 * 3600)
    preparing = write(settings.runs_dir / "checking-now" / "data" / "data.jsonl", KB, age_s=60)
    write_run(settings.runs_dir, "newest", "done", age_s=10)
    assert retention.enforce(settings) == [abandoned.parent.parent]
    assert preparing.exists()


def test_disk_usage_reports_bytes_per_area(tmp_path):
    settings = make_settings(tmp_path, models_dir=tmp_path / "offline-models")
    write(settings.outputs_dir / "a.png", 3 * KB, 0)
    write_run(settings.runs_dir, "run", "done", 0, nbytes=2 * KB)
    write(settings.cache_dir / "uploads" / "u.jsonl", KB, 0)
    write(settings.cache_dir / "validation" / "v" / "data.jsonl", KB, 0)
    write(settings.adapters_dir / "x" / "adapter_model.safetensors", 5 * KB, 0)
    write(settings.offline_models_dir / "tiny" / "model.safetensors", 7 * KB, 0)
    usage = retention.disk_usage(settings)
    log_bytes = (settings.runs_dir / "run" / "log.jsonl").stat().st_size
    assert usage == {"outputs": 3 * KB, "runs": 2 * KB + 10 + log_bytes, "uploads": 2 * KB,
                     "adapters": 5 * KB, "offline_models": 7 * KB}
    empty = make_settings(tmp_path / "fresh", models_dir=tmp_path / "none")
    assert retention.disk_usage(empty) == dict.fromkeys(usage, 0)
