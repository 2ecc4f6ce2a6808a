"""Starts, follows and stops the training process for the UI and the API; one run at a time.

A run lives in ``<runs_dir>/<run_id>/``: ``config.yaml``, ``data/`` (the dataset copy),
``log.jsonl`` (written by the training process), ``process.log`` (its stdout/stderr) and
``checkpoints/``. The state of a run is derived from its log and the process's exit code.

The validator and a start judge a dataset by the same function (``_check_dataset``). A start that is
refused or fails removes its run folder; a validation removes its folder once the report is built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from finetune import data
from finetune.config import RunConfig, cli_command, parse_config
from models import retention
from models.errors import Busy, InvalidRequest, quote

ROOT = Path(__file__).resolve().parent.parent
ACTIVE_STATES = ("starting", "running", "stopping", "finishing")
LOG_TAIL_LINES = 12
STOP_GRACE_SECONDS = 60
RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")  # what new_run_id makes: 20250131-235959-a1b2c3


class RunBusyError(Busy):
    """A training run is already in progress."""


@dataclasses.dataclass(frozen=True)
class Validation:
    """What the validator returns: the JSON report and thumbnails of the preview rows' images."""

    report: dict
    thumbnails: list  # (PIL image, caption)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def check_run_id(run_id) -> str:
    """``run_id`` if it is exactly a run id; anything else (a path, '..', too long, not text) is refused."""
    if run_id is None or (isinstance(run_id, str) and not run_id.strip()):
        raise InvalidRequest("run_id is required (the value /finetune_start returned)")
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise InvalidRequest(f"run_id must be a run id such as 20250131-235959-a1b2c3 (the value /finetune_start "
                             f"returned), got {quote(run_id, 80)}")
    return run_id


def _require_upload(dataset) -> Path:
    if dataset is None or (isinstance(dataset, str) and not dataset.strip()):
        raise InvalidRequest("Upload a dataset (.jsonl, or .zip with the JSONL and its images).")
    return Path(dataset)


@dataclasses.dataclass
class _Process:
    run_id: str
    popen: subprocess.Popen
    run_dir: Path
    stop_requested: bool = False
    reaped: bool = False


def read_log(path: Path) -> list[dict]:
    """Records of a run log; a half-written last line (the writer is mid-flush) is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16_384))
            return handle.read().decode("utf-8", "replace").splitlines()[-lines:]
    except FileNotFoundError:
        return []


def summarize(records: list[dict], exit_code: int | None, stop_requested: bool = False) -> dict:
    """State, progress and loss history of one run from its log records and exit code."""
    steps: dict[int, dict] = {}
    evals: dict[int, float] = {}
    total = 0
    done = error = None
    checkpoint = None
    for record in records:
        event = record.get("event")
        if event in ("start", "step"):
            total = record.get("total_steps") or total
        if event == "step":
            steps[record["step"]] = record
        elif event == "eval":
            evals[record["step"]] = record["eval_loss"]
        elif event == "checkpoint":
            checkpoint = record.get("path")
        elif event == "done":
            done, error = record, None
        elif event == "error":
            error, done = record, None
        elif event == "process":
            done = error = None  # a resumed run starts a new process in the same folder
    last = steps[max(steps)] if steps else {}
    if exit_code is None and (done is not None or error is not None):
        state = "finishing"  # the outcome is logged; the process is still writing files and exiting
    elif done is not None:
        state = done["state"]
    elif error is not None:
        state = "failed"
    elif exit_code is None:
        state = "stopping" if stop_requested else ("running" if steps or total else "starting")
    elif exit_code == 0:
        state = "completed"
    else:
        state = "failed"
    message = ""
    if error is not None:
        message = error.get("message", "")
    elif state == "failed":
        how = f"killed by signal {signal.Signals(-exit_code).name}" if exit_code < 0 else f"exit code {exit_code}"
        message = f"the training process ended without finishing ({how})"
    return {
        "state": state,
        "step": last.get("step", 0),
        "total": total,
        "loss": last.get("loss"),
        "learning_rate": last.get("learning_rate"),
        "tokens_per_s": last.get("tokens_per_s"),
        "eta_s": last.get("eta_s"),
        "loss_history": [{"step": s, "loss": steps[s]["loss"]} for s in sorted(steps)],
        "eval_history": [{"step": s, "eval_loss": v} for s, v in sorted(evals.items())],
        "adapter": (done or {}).get("adapter"),
        "checkpoint": (done or {}).get("checkpoint") or checkpoint,
        "metrics": (done or {}).get("metrics", {}),
        "message": message,
    }


class TrainingRunner:
    """Owns at most one training process at a time for one app.

    Args:
        settings: where runs, adapters and models live.
        manager: its models are unloaded before a run, so that training has the device to itself.
        catalog: model lookup (the manager's by default).
    """

    def __init__(self, settings, manager=None, catalog=None):
        self.settings = settings
        self.manager = manager
        self.catalog = catalog if catalog is not None else manager.catalog
        self._lock = threading.Lock()
        self._current: _Process | None = None

    # ---- start --------------------------------------------------------------------------------

    def prepare(self, dataset, config) -> tuple[RunConfig, str, Path]:
        """Validate config and dataset and write the run folder; (config, run_id, run_dir).

        Nothing is left behind when the config or the dataset is refused.
        """
        config = parse_config(config, self.settings.limits).validate(self.catalog)
        upload = _require_upload(dataset)
        run_id = new_run_id()
        run_dir = self.settings.runs_dir / run_id
        try:
            parsed, report = self._check_dataset(upload, run_dir / "data", config)
            data.require_ok(report)
            config = dataclasses.replace(
                config, dataset=str(parsed.path), run_dir=str(run_dir), cache_dir=str(self.settings.cache_dir),
                models_dir=str(self.settings.offline_models_dir), offline=self.settings.offline,
                models_file=str(self.settings.models_file or ""),
                device=self.settings.device, resume_from="")  # resuming is only offered for this app's own runs
            config.save(run_dir / "config.yaml")
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return config, run_id, run_dir

    def _check_dataset(self, upload: Path, folder: Path, config: RunConfig) -> tuple[data.ParsedDataset, dict]:
        """Unpack the upload into ``folder`` and judge it for ``config``: (parsed dataset, report).

        The one judgement of a dataset: the validator shows this report, and a start refuses unless it is ok.
        """
        limits = self.settings.limits
        path = data.prepare_dataset(upload, folder, limits)
        parsed = data.parse_dataset(path, limits)
        processor, is_vlm = data.load_text_processor(config.base_model, self.settings, self.catalog)
        report = data.report(parsed, config.val_fraction, config.seed, processor, is_vlm, config.max_length, limits,
                             base_model=config.base_model)
        return parsed, report

    def start(self, dataset, config, resume_run: str = "") -> str:
        """Start a run in its own process group; returns its run id. Raises RunBusyError if one runs."""
        with self._lock:
            self._refuse_if_busy()
            if resume_run:
                run_id, run_dir = resume_run, self._run_dir(resume_run)
                if not list((run_dir / "checkpoints").glob("checkpoint-*")):
                    raise InvalidRequest(f"run {run_id} has no checkpoint to resume from")
                self._current = self._launch(run_id, run_dir, ["--resume", "latest"])
                return run_id
            _, run_id, run_dir = self.prepare(dataset, config)
            try:
                self._current = self._launch(run_id, run_dir, [])
            except BaseException:
                shutil.rmtree(run_dir, ignore_errors=True)  # a run that never started leaves nothing
                raise
        # Older finished runs and uploads make room, oldest first; this run and adapters are kept
        retention.enforce(self.settings, protect=[run_dir], is_running=lambda rid: rid == self.active_run())
        return run_id

    def _launch(self, run_id: str, run_dir: Path, args: list[str]) -> _Process:
        if self.manager is not None:
            self.manager.unload_all()  # training takes the device; chat/VQA reload on their next call
        config = RunConfig.load(run_dir / "config.yaml")
        # Several processes (DDP) through torchrun; it forwards the stop signal to each of them
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(config.processes)] if config.processes > 1 else [sys.executable]
        with open(run_dir / "process.log", "ab") as output:
            popen = subprocess.Popen(
                [*launcher, "-m", "finetune.train", str(run_dir / "config.yaml"), *args],
                cwd=str(ROOT), stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
        return _Process(run_id=run_id, popen=popen, run_dir=run_dir)

    def validate(self, dataset, base_model: str, max_length: int = 512, val_fraction: float = 0.1,
                 seed: int = 42) -> Validation:
        """The dataset report for an upload, with token statistics from ``base_model``'s tokenizer.

        The upload is unpacked into a folder of its own, removed once the report and thumbnails are made.
        """
        probe = RunConfig(base_model=base_model, max_length=max_length, val_fraction=val_fraction, seed=seed)
        probe.validate(self.catalog)
        upload = _require_upload(dataset)
        folder = self.settings.cache_dir / "validation" / secrets.token_hex(8)
        try:
            parsed, report = self._check_dataset(upload, folder, probe)
            return Validation(report, data.preview_images(parsed.examples))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def resume(self, run_id: str) -> str:
        return self.start(None, None, resume_run=run_id)

    def _refuse_if_busy(self) -> None:
        current = self._current
        if current is not None and current.popen.poll() is None:
            raise RunBusyError(f"Run {current.run_id} is still training; stop it or wait for it to finish "
                               "(one run at a time).")
        if current is not None:
            self._reap(current)

    # ---- follow -------------------------------------------------------------------------------

    def _run_dir(self, run_id) -> Path:
        run_dir = self.settings.runs_dir / check_run_id(run_id)
        if not (run_dir / "config.yaml").is_file():
            raise InvalidRequest(f"Unknown run {run_id}: this app has no run of that id")
        return run_dir

    def status(self, run_id: str) -> dict:
        """JSON-ready status: state, step, total, loss history, adapter path, last log lines."""
        run_dir = self._run_dir(run_id)
        current = self._current
        exit_code, stop_requested = 0, False
        if current is not None and current.run_id == run_id:
            exit_code, stop_requested = current.popen.poll(), current.stop_requested
            if exit_code is not None:
                self._reap(current)
        records = read_log(run_dir / "log.jsonl")
        orphan = not (current is not None and current.run_id == run_id) and not any(
            r.get("event") in ("done", "error") for r in records[-3:])
        summary = summarize(records, 1 if orphan else exit_code, stop_requested)
        if orphan:
            summary["message"] = "this run did not finish: the app was restarted while it ran; resume it"
        summary.update(run_id=run_id, log_tail=tail(run_dir / "process.log"),
                       command=cli_command(run_dir / "config.yaml", RunConfig.load(run_dir / "config.yaml").processes))
        return summary

    def active_run(self) -> str | None:
        current = self._current
        return current.run_id if current is not None and current.popen.poll() is None else None

    # ---- stop ---------------------------------------------------------------------------------

    def stop(self, run_id: str, wait: float = 0.0) -> dict:
        """Ask the run's process group to stop (SIGTERM): it saves a checkpoint and the adapter, then exits."""
        self._run_dir(run_id)
        current = self._current
        if current is None or current.run_id != run_id or current.popen.poll() is not None:
            return self.status(run_id)
        current.stop_requested = True
        self._signal(current, signal.SIGTERM)
        if wait:
            try:
                current.popen.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        return self.status(run_id)

    def kill(self, run_id: str | None = None) -> None:
        """End the process group at once (app shutdown, or a run that ignores SIGTERM)."""
        current = self._current
        if current is None or (run_id is not None and current.run_id != run_id):
            return
        self._signal(current, signal.SIGKILL)
        current.popen.wait(timeout=30)
        self._reap(current)

    def close(self) -> None:
        """Stop a running training gracefully, then kill it if it does not end in time."""
        current = self._current
        if current is None or current.popen.poll() is not None:
            return
        self.stop(current.run_id, wait=STOP_GRACE_SECONDS)
        self.kill(current.run_id)

    @staticmethod
    def _signal(process: _Process, sig: int) -> None:
        try:
            os.killpg(process.popen.pid, sig)
        except ProcessLookupError:
            pass

    def _reap(self, process: _Process) -> None:
        """After the leader exits, end anything it left in its group (e.g. data loader workers)."""
        if process.reaped or process.popen.poll() is None:
            return
        process.reaped = True
        try:
            os.killpg(process.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
