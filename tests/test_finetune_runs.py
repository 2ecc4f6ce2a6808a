"""The runner's requests without training: run ids are ids, refused or failed starts leave nothing on
disk, validation folders do not pile up, and errors never show a server path."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

from finetune import data
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
