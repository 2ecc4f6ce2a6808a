"""The runner's requests without training: run ids are ids, refused or failed starts leave nothing on
disk, validation folders do not pile up, errors never show a server path; the runs list is built from
disk, resume and train more start from the right checkpoint (or say why not), and the training
process tree's memory is counted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from finetune import data
from finetune.config import RunConfig
from finetune.runner import TrainingRunner, _Process, check_run_id
from models.errors import InvalidRequest

ROWS = [{"prompt": "What is the capital of France?", "response": "Paris."},
        {"prompt": "Say hello.", "response": "Hello!"}]
CONFIG = {"base_model": "tiny-chat", "max_length": 64, "val_fraction": 0.0, "max_steps": 1}


@pytest.fixture
def runner(settings, catalog):
    runner = TrainingRunner(settings, catalog=catalog)
    yield runner
    current = runner._current
    if current is not None and current.popen.poll() is None:
        runner.kill()


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def files_under(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ---- run ids ---------------------------------------------------------------------------------------

@pytest.fixture
def running(runner, settings):
    """A run folder with a live process registered as the current run (a sleeping Python, not training)."""
    run_id = "20250131-235959-a1b2c3"
    run_dir = settings.runs_dir / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("base_model: tiny-chat\n")
    popen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    runner._current = _Process(run_id=run_id, popen=popen, run_dir=run_dir)
    return run_id


@pytest.mark.parametrize("spell", ["../runs/{id}", "./{id}", "{id}/", "{id}/../{id}", "{id} ", "{id}\n", "..", "/",
                                   "{id}{id}", "x" * 5000])
def test_status_and_stop_refuse_anything_but_a_run_id(runner, running, spell):
    wrong = spell.format(id=running)
    for endpoint in (runner.status, runner.stop):
        with pytest.raises(InvalidRequest, match="run_id must be a run id such as") as refused:
            endpoint(wrong)
        assert len(str(refused.value)) < 300
    assert runner.status(running)["state"] == "starting"  # the spelled-out run is untouched, still running
    assert runner._current.popen.poll() is None and not runner._current.stop_requested


def test_the_run_id_itself_reaches_the_running_process(runner, running):
    assert runner.status(running)["state"] == "starting"
    assert runner.stop(running, wait=10)["state"] in ("stopping", "failed")
    assert runner._current.popen.poll() is not None  # SIGTERM reached the process group


@pytest.mark.parametrize("value", [None, "", 20250131, ["20250131-235959-a1b2c3"], "20250131-235959-A1B2C3"])
def test_run_ids_of_other_types_or_shapes_are_refused(value):
    with pytest.raises(InvalidRequest, match="run_id"):
        check_run_id(value)


def test_an_unknown_run_id_is_refused_by_name(runner):
    with pytest.raises(InvalidRequest, match="Unknown run 20250131-235959-000000: this app has no run"):
        runner.status("20250131-235959-000000")


# ---- nothing left behind ---------------------------------------------------------------------------

def bad_zip(path, extra_bytes: int = 0):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("set/data.jsonl", json.dumps(ROWS[0]) + "\n{broken\n")
        bundle.writestr("set/padding.bin", b"\0" * extra_bytes)
    return path


def test_a_refused_start_removes_what_it_extracted(tmp_path, runner, settings):
    upload = bad_zip(tmp_path / "bad.zip", extra_bytes=5 * 1024**2)
    for _ in range(3):
        with pytest.raises(data.DatasetError, match="line 2: invalid JSON") as refused:
            runner.start(str(upload), CONFIG)
        assert str(settings.cache_dir) not in str(refused.value) and str(tmp_path) not in str(refused.value)
    assert files_under(settings.runs_dir) == []


@pytest.mark.parametrize("config, words", [({**CONFIG, "lora_r": 0}, "lora_r"),
                                           ("lora_r: &a 4\nlora_alpha: *a\n", "anchor or alias"),
                                           ({**CONFIG, "max_length": 9}, "below the prompt length")])
def test_a_refused_config_leaves_nothing(tmp_path, runner, settings, config, words):
    upload = write_jsonl(tmp_path / "good.jsonl", ROWS)
    with pytest.raises(InvalidRequest, match=words):
        runner.start(str(upload), config)
    assert files_under(settings.runs_dir) == []


def test_a_start_whose_process_cannot_launch_leaves_nothing(tmp_path, runner, settings, monkeypatch):
    def no_process(*args, **kwargs):
        raise OSError("cannot start a process")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    with pytest.raises(OSError, match="cannot start a process"):
        runner.start(str(write_jsonl(tmp_path / "good.jsonl", ROWS)), CONFIG)
    assert files_under(settings.runs_dir) == [] and runner.active_run() is None


def test_validation_removes_its_folder_and_keeps_the_previews(tmp_path, runner, settings):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "imgs" / "red.png")
    write_jsonl(tmp_path / "d.jsonl", [{"image": "imgs/red.png", "question": "Colour?", "answer": "Red."}])
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as bundle:
        bundle.write(tmp_path / "d.jsonl", "d.jsonl")
        bundle.write(tmp_path / "imgs" / "red.png", "imgs/red.png")
    for _ in range(3):
        validation = runner.validate(str(tmp_path / "set.zip"), "tiny-vlm", 256)
        assert validation.report["ok"] and validation.report["preview"][0]["image"] == "imgs/red.png"
        assert [caption for _, caption in validation.thumbnails] == ["line 1"]
        assert validation.thumbnails[0][0].getpixel((0, 0)) == (255, 0, 0)
    refused = runner.validate(str(bad_zip(tmp_path / "bad.zip")), "tiny-chat", 256)
    assert refused.report["problems"] == [{"line": 2, "message": "invalid JSON (Expecting property name enclosed "
                                                                 "in double quotes at column 2)"}]
    assert files_under(settings.cache_dir / "validation") == []
    assert not settings.adapters_dir.exists()


# ---- the runs list, resume and train more, without training -----------------------------------------

def fake_run(settings, run_id, records, checkpoints=(), adapter_name="a", max_steps=4) -> Path:
    """A run folder as the runner and finetune.train leave it: config, log and checkpoint folders."""
    run_dir = settings.runs_dir / run_id
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"base_model: tiny-chat\nadapter_name: {adapter_name}\n"
                                         f"max_steps: {max_steps}\nrun_dir: {run_dir}\n")
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step in checkpoints:
        (run_dir / "checkpoints" / f"checkpoint-{step}").mkdir()
        (run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    return run_dir


def steps(*numbers, total=4):
    return [{"event": "step", "step": s, "total_steps": total, "loss": 1.0 / s, "eta_s": 1.0} for s in numbers]


COMPLETED = "20250101-120000-aaaaaa"
STOPPED = "20250102-120000-bbbbbb"
ORPHAN = "20250103-120000-cccccc"


@pytest.fixture
def runs_on_disk(settings):
    """Three runs an earlier app left: completed, stopped, and one cut off when the app was restarted."""
    fake_run(settings, COMPLETED, [{"event": "launch", "from_step": 0, "total_steps": 4}, *steps(1, 2, 3, 4),
                                   {"event": "done", "state": "completed", "adapter": "/ad/done"}], (2, 4), "done")
    fake_run(settings, STOPPED, [*steps(1, 2, total=10), {"event": "done", "state": "stopped", "adapter": "/ad/st"}],
             (2,), "st", max_steps=10)
    fake_run(settings, ORPHAN, steps(1), (), "cut")
    (settings.runs_dir / ORPHAN / "checkpoints" / "checkpoint-3").mkdir()  # half-written: no trainer_state.json
    (settings.runs_dir / "saved-configs").mkdir()  # not runs
    (settings.runs_dir / "20250104-120000-dddddd").mkdir()


@pytest.mark.usefixtures("runs_on_disk")
def test_the_runs_list_is_built_from_the_runs_folder(settings, catalog):
    runs = TrainingRunner(settings, catalog=catalog).list_runs()  # a new runner: as after an app restart
    assert [(r["run_id"], r["state"], r["step"], r["total"], r["adapter_name"], r["adapter"], r["checkpoints"])
            for r in runs] == [
        (ORPHAN, "failed", 1, 4, "cut", None, []),
        (STOPPED, "stopped", 2, 10, "st", "/ad/st", ["checkpoint-2"]),
        (COMPLETED, "completed", 4, 4, "done", "/ad/done", ["checkpoint-2", "checkpoint-4"])]
    assert runs[0]["message"].startswith("this run did not finish: the app was restarted")
    assert runs[2]["loss"] == 0.25 and runs[2]["started"] == "2025-01-01 12:00" and runs[2]["base_model"] == "tiny-chat"
    assert [r["run_id"] for r in TrainingRunner(settings, catalog=catalog).list_runs(limit=2)] == [ORPHAN, STOPPED]


@pytest.fixture
def launched(monkeypatch):
    """Popen replaced by a recorder: the command lines a resume would run, and no training."""
    commands, real = [], subprocess.Popen

    def recorded(command, **kwargs):
        commands.append(command)
        return real([sys.executable, "-c", "pass"], start_new_session=True)

    monkeypatch.setattr(subprocess, "Popen", recorded)
    return commands


def log_of(settings, run_id) -> list[dict]:
    return [json.loads(line) for line in (settings.runs_dir / run_id / "log.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("runs_on_disk")
def test_resume_starts_from_the_chosen_checkpoint(runner, settings, launched):
    assert runner.resume(COMPLETED, "checkpoint-2") == COMPLETED
    runner._current.popen.wait()
    assert launched[-1][1:] == ["-m", "finetune.train", str(settings.runs_dir / COMPLETED / "config.yaml"),
                                "--resume", str(settings.runs_dir / COMPLETED / "checkpoints" / "checkpoint-2")]
    launch = [r for r in log_of(settings, COMPLETED) if r["event"] == "launch"][-1]
    assert (launch["kind"], launch["checkpoint"], launch["from_step"], launch["total_steps"]) == (
        "resume", "checkpoint-2", 2, 4)
    assert runner.resume(STOPPED) == STOPPED  # latest by default
    assert launched[-1][-1].endswith("checkpoint-2")


@pytest.mark.usefixtures("runs_on_disk")
def test_train_more_continues_from_the_last_checkpoint_with_a_higher_step_total(runner, settings, launched):
    assert runner.train_more(COMPLETED, 3) == COMPLETED
    assert launched[-1][-1] == str(settings.runs_dir / COMPLETED / "checkpoints" / "checkpoint-4")
    assert RunConfig.load(settings.runs_dir / COMPLETED / "config.yaml").max_steps == 7
    launch = [r for r in log_of(settings, COMPLETED) if r["event"] == "launch"][-1]
    assert (launch["kind"], launch["from_step"], launch["total_steps"]) == ("train_more", 4, 7)
    runner._current.popen.wait()
    status = runner.status(COMPLETED)  # the process ended without a word: the runner says so
    assert status["state"] == "failed" and status["step"] == 4 and status["total"] == 7 and status["eta_s"] is None


@pytest.mark.parametrize("run_id, checkpoint, more, words", [
    (COMPLETED, "latest", None, "has trained all its 4 steps at checkpoint-4: choose an earlier checkpoint"),
    (COMPLETED, "checkpoint-3", None, "has no checkpoint 'checkpoint-3'; it has checkpoint-2, checkpoint-4"),
    (COMPLETED, "../../etc", None, "has no checkpoint '../../etc'"),
    (ORPHAN, "latest", None, "has no checkpoint to resume from"),
    (ORPHAN, None, 5, "has no checkpoint to resume from"),
    (COMPLETED, None, 0, "more steps must be between 1"),
    ("", "latest", None, "run_id is required"),
    ("20250105-000000-eeeeee", "latest", None, "Unknown run"),
])
@pytest.mark.usefixtures("runs_on_disk")
def test_resume_and_train_more_refuse_with_what_to_do(runner, launched, run_id, checkpoint, more, words):
    with pytest.raises(InvalidRequest, match=re.escape(words)):
        if more is None:
            runner.resume(run_id, checkpoint)
        else:
            runner.train_more(run_id, more)
    assert launched == [] and runner.active_run() is None


def test_a_process_that_dies_without_a_word_gets_an_error_record(runner, running, settings):
    os.killpg(runner._current.popen.pid, signal.SIGKILL)
    runner._current.popen.wait()
    status = runner.status(running)
    assert status["state"] == "failed" and "killed by signal SIGKILL" in status["message"]
    assert log_of(settings, running)[-1]["event"] == "error"  # retention now sees a finished run
    assert TrainingRunner(settings, catalog=runner.catalog).list_runs()[0]["state"] == "failed"


def test_training_memory_counts_the_whole_process_tree(runner, settings):
    """A live "training" process whose child holds 64 MB: both are counted, the child's memory included."""
    run_id = "20250131-235959-a1b2c3"
    run_dir = settings.runs_dir / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("base_model: tiny-chat\n")
    child = "import time; block = bytearray(64 * 1024**2); block[::4096] = b'x' * len(block[::4096]); time.sleep(60)"
    leader = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)")
    assert runner.training_memory() is None
    popen = subprocess.Popen([sys.executable, "-c", leader], start_new_session=True)
    runner._current = _Process(run_id=run_id, popen=popen, run_dir=run_dir)
    deadline = time.monotonic() + 30
    while (memory := runner.training_memory())["processes"] < 2 or memory["rss_bytes"] < 64 * 1024**2:
        assert time.monotonic() < deadline, memory
        time.sleep(0.1)
    import psutil

    alone = psutil.Process(popen.pid).memory_info().rss
    assert memory["run_id"] == run_id and memory["pid"] == popen.pid
    assert memory["rss_bytes"] >= alone + 64 * 1024**2
    runner.kill()
    assert runner.training_memory() is None
