"""Starts, follows, lists, stops and resumes the training process for the UI and the API; one run at a time.

A run lives in ``<runs_dir>/<run_id>/``: ``config.yaml``, ``data/`` (the dataset copy),
``log.jsonl`` (written by the training process), ``process.log`` (its stdout/stderr) and
``checkpoints/``. The state of a run is derived from its log and the process's exit code, so the list
of runs is rebuilt from disk after a page reload or an app restart.

Before each launch the runner appends a ``launch`` record to the log: how the run (re)starts (from
which checkpoint, to how many steps) and which models it unloaded to make room. A process that ends
without saying how (killed, crashed before logging) gets an ``error`` record from the runner.

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
from models.catalog import models_file_to_load
from models.checks import check_number
from models.errors import Busy, InvalidRequest, quote
from models.limits import format_bytes

ROOT = Path(__file__).resolve().parent.parent
ACTIVE_STATES = ("starting", "running", "stopping", "finishing")
LOG_NAME = "log.jsonl"
LOG_TAIL_LINES = 12
STOP_GRACE_SECONDS = 60
RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")  # what new_run_id makes: 20250131-235959-a1b2c3
CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # the Trainer's folder names, one per saved step
LATEST = "latest"
MAX_LISTED_RUNS = 100
MAX_STEPS = 10_000_000
# A CPU training process besides its base model: Python with torch, transformers and peft, the
# tokenizer, the trainer. Measured on 2 CPU cores: 0.85 GB peak RSS for tiny-chat (a few thousand
# parameters), 1.74 GB for smollm2-135m in nf4 (0.59 GB in fp32).
TRAINING_PROCESS_BYTES = int(0.9 * 1024**3)


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


def started_at(run_id: str) -> str:
    """When a run was started, from its id: ``2025-01-31 23:59``."""
    stamp = time.strptime(run_id[:15], "%Y%m%d-%H%M%S")
    return time.strftime("%Y-%m-%d %H:%M", stamp)


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


def append_log(path: Path, event: str, **fields) -> None:
    """Add one record to a run log (only while no training process writes to it)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16_384))
            return handle.read().decode("utf-8", "replace").splitlines()[-lines:]
    except FileNotFoundError:
        return []


def checkpoints_in(run_dir: Path) -> list[dict]:
    """The run's complete checkpoints, oldest first: ``{"name": "checkpoint-10", "step": 10}``.

    A folder without ``trainer_state.json`` is being written (or was cut off) and cannot be resumed.
    """
    found = []
    for folder in _children(run_dir / "checkpoints"):
        match = CHECKPOINT.fullmatch(folder.name)
        if match and (folder / "trainer_state.json").is_file():
            found.append({"name": folder.name, "step": int(match.group(1))})
    return sorted(found, key=lambda c: c["step"])


def _children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _exit_words(exit_code: int) -> str:
    how = f"killed by signal {signal.Signals(-exit_code).name}" if exit_code < 0 else f"exit code {exit_code}"
    return f"the training process ended without finishing ({how})"


def _ended(records: list[dict]) -> bool:
    """Whether the latest launch of a run has logged how it ended (done or error)."""
    for record in reversed(records):
        event = record.get("event")
        if event in ("done", "error"):
            return True
        if event in ("launch", "process"):
            return False
    return False


def summarize(records: list[dict], exit_code: int | None, stop_requested: bool = False) -> dict:
    """State, progress and loss history of one run from its log records and exit code.

    A run may have been launched several times (stopped and resumed, trained more): its step, speed
    and ETA are those of the latest launch, which starts at the step of the checkpoint it resumed
    from. Steps logged past that point by an earlier launch are left out until they are trained again.
    """
    steps: dict[int, dict] = {}
    evals: dict[int, float] = {}
    total = 0
    done = error = None
    checkpoint = None
    launch: dict = {}
    live: dict = {}  # the latest launch's last step record: its speed and ETA are current
    resumed_at = None  # the step the latest launch started from, until it logs a step
    started = False  # the latest launch's trainer has begun (start or step records)
    for record in records:
        event = record.get("event")
        if event in ("launch", "process"):
            done = error = None  # a resumed run starts a new process in the same folder
            live, started = {}, False
        if event == "launch":
            launch = record
            resumed_at = record.get("from_step")
            total = record.get("total_steps") or total
        elif event in ("start", "step"):
            total = record.get("total_steps") or total
            started = True
            if event == "start" and record.get("step") is not None:
                resumed_at = record["step"]
        if event == "step":
            steps[record["step"]] = record
            live, resumed_at = record, None
        elif event == "eval":
            evals[record["step"]] = record["eval_loss"]
        elif event == "checkpoint":
            checkpoint = record.get("path")
        elif event == "done":
            done, error = record, None
        elif event == "error":
            error, done = record, None
    if live:
        step = live["step"]
    elif resumed_at is not None:
        step = resumed_at
    else:
        step = max(steps) if steps else 0
    last = steps.get(step, {})
    if exit_code is None and (done is not None or error is not None):
        state = "finishing"  # the outcome is logged; the process is still writing files and exiting
    elif done is not None:
        state = done["state"]
    elif error is not None:
        state = "failed"
    elif exit_code is None:
        state = "stopping" if stop_requested else ("running" if started else "starting")
    else:
        state = "failed"  # ended without logging how, even with exit code 0: nothing says it finished
    message = ""
    if error is not None:
        message = error.get("message", "")
    elif state == "failed":
        message = _exit_words(exit_code)
    return {
        "state": state,
        "step": step,
        "total": total,
        "loss": last.get("loss"),
        "learning_rate": last.get("learning_rate"),
        "tokens_per_s": live.get("tokens_per_s"),
        "eta_s": live.get("eta_s"),
        "loss_history": [{"step": s, "loss": steps[s]["loss"]} for s in sorted(steps) if s <= step],
        "eval_history": [{"step": s, "eval_loss": v} for s, v in sorted(evals.items()) if s <= step],
        "adapter": (done or {}).get("adapter"),
        "checkpoint": (done or {}).get("checkpoint") or checkpoint,
        "metrics": (done or {}).get("metrics", {}),
        "message": message,
        "unloaded": launch.get("unloaded", []),
        "memory_note": launch.get("note", ""),
    }


# ---- memory for training --------------------------------------------------------------------------

def training_need_bytes(spec, processes: int = 1) -> int:
    """About the RAM a CPU training run of ``spec`` holds: per process, its own footprint and twice the
    base model in fp32 (the CPU computes in fp32, and a 4-bit base is read in full precision first)."""
    return processes * (TRAINING_PROCESS_BYTES + 2 * spec.estimate_bytes("fp32"))


def plan_unloads(loaded: list[dict], device: str, budget: int, used: int, need: int) -> tuple[list[str], list[str]]:
    """Which loaded models training must unload: (to unload, in use although they should go).

    ``loaded`` is the manager's snapshot. On a GPU (or MPS) training needs the device's memory, and
    the manager cannot know how much the training process will take: every model on that device
    goes. On the CPU, models and training share the RAM that ``budget`` stands for: the least recently
    used models go until ``need`` more bytes fit beside the rest, and only then.
    """
    if device != "cpu":
        on_device = [m for m in loaded if m["device"] == device]
        return [m["id"] for m in on_device if not m["pinned"]], [m["id"] for m in on_device if m["pinned"]]
    unload = []
    for model in sorted(loaded, key=lambda m: m["last_used"]):
        if used + need <= budget:
            break
        if model["pinned"] or not model["bytes"]:
            continue
        unload.append(model["id"])
        used -= model["bytes"]
    in_use = [m["id"] for m in loaded if m["pinned"]] if used + need > budget else []
    return unload, in_use


def _names(ids: list[str]) -> str:
    return ids[0] if len(ids) == 1 else ", ".join(ids[:-1]) + f" and {ids[-1]}"


def unload_note(device: str, unloaded: list[str], in_use: list[str], need: int, budget: int) -> str:
    """One sentence on what starting training did to the loaded models, and why."""
    if device != "cpu":
        where = "the GPU" if device == "cuda" else device.upper()
        again = "it loads" if len(unloaded) == 1 else "they load"
        text = (f"Unloaded {_names(unloaded)} from {where}: training needs its memory ({again} again on next use)."
                if unloaded else f"No model was on {where}; none was unloaded.")
        if in_use:
            text += f" Kept {_names(in_use)}: answering a request, so training may run short of memory."
        return text
    share = f"about {format_bytes(need)} of the {format_bytes(budget)} memory budget"
    if unloaded:
        text = (f"Unloaded {_names(unloaded)} (least recently used) so that training fits in the budget: it takes "
                f"{share}.")
    else:
        text = f"No model was unloaded: training on the CPU takes {share}, and that fits with what is loaded."
    if in_use:
        stay = "stays" if len(in_use) == 1 else "stay"
        text += f" {_names(in_use)} {stay} loaded (answering a request), over the budget."
    return text


class TrainingRunner:
    """Owns at most one training process at a time for one app.

    Args:
        settings: where runs, adapters and models live.
        manager: the models it holds make room for training (``plan_unloads``); None: nothing is unloaded.
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
                models_file=str(models_file_to_load(self.settings) or ""),
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

    def start(self, dataset, config) -> str:
        """Start a run in its own process group; returns its run id. Raises RunBusyError if one runs."""
        with self._lock:
            self._refuse_if_busy()
            config, run_id, run_dir = self.prepare(dataset, config)
            try:
                self._current = self._launch(run_id, run_dir, config, [], kind="start", from_step=0,
                                             total=config.max_steps)
            except BaseException:
                shutil.rmtree(run_dir, ignore_errors=True)  # a run that never started leaves nothing
                raise
        # Older finished runs and uploads make room, oldest first; this run and adapters are kept
        retention.enforce(self.settings, protect=[run_dir], is_running=lambda rid: rid == self.active_run())
        return run_id

    def resume(self, run_id: str, checkpoint: str = LATEST, max_steps: int | None = None) -> str:
        """Continue a run that is not training from one of its checkpoints (``latest`` by default).

        The run goes on to its own step total, or to ``max_steps`` when given (see ``train_more``).
        A run that has trained all its steps from that checkpoint is refused with what to do instead.
        """
        with self._lock:
            self._refuse_if_busy()
            run_dir = self._run_dir(run_id)
            chosen = self._checkpoint(run_id, run_dir, checkpoint)
            config = RunConfig.load(run_dir / "config.yaml")
            total = summarize(read_log(run_dir / LOG_NAME), 0)["total"] or config.max_steps
            kind = "resume"
            if max_steps is not None:
                max_steps = int(check_number("max steps", max_steps, 1, MAX_STEPS, integer=True))
                if max_steps <= chosen["step"]:
                    raise InvalidRequest(f"max steps must be more than the checkpoint's step {chosen['step']}, "
                                         f"got {max_steps}")
                config, total, kind = dataclasses.replace(config, max_steps=max_steps), max_steps, "train_more"
                config.save(run_dir / "config.yaml")  # the run's own config: a later resume keeps the new total
            elif total and chosen["step"] >= total:
                raise InvalidRequest(f"Run {run_id} has trained all its {total} steps at {chosen['name']}: choose "
                                     "an earlier checkpoint to train again from there, or train more steps.")
            path = run_dir / "checkpoints" / chosen["name"]
            try:
                self._current = self._launch(run_id, run_dir, config, ["--resume", str(path)], kind=kind,
                                             from_step=chosen["step"], total=total, checkpoint=chosen["name"])
            except OSError as exc:
                append_log(run_dir / LOG_NAME, "error", message=f"the training process could not start: {exc}")
                raise
        return run_id

    def train_more(self, run_id: str, more_steps: int) -> str:
        """Continue a run from its latest checkpoint for ``more_steps`` steps past its step total."""
        more = int(check_number("more steps", more_steps, 1, MAX_STEPS, integer=True))
        run_dir = self._run_dir(run_id)
        found = checkpoints_in(run_dir)
        total = max(summarize(read_log(run_dir / LOG_NAME), 0)["total"], found[-1]["step"] if found else 0)
        return self.resume(run_id, LATEST, max_steps=total + more)

    def _launch(self, run_id: str, run_dir: Path, config: RunConfig, args: list[str], kind: str, from_step: int,
                total: int, checkpoint: str | None = None) -> _Process:
        freed = self._make_room(config)
        append_log(run_dir / LOG_NAME, "launch", kind=kind, checkpoint=checkpoint, from_step=from_step,
                   total_steps=total, **freed)
        # Several processes (DDP) through torchrun; it forwards the stop signal to each of them
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(config.processes)] if config.processes > 1 else [sys.executable]
        with open(run_dir / "process.log", "ab") as output:
            popen = subprocess.Popen(
                [*launcher, "-m", "finetune.train", str(run_dir / "config.yaml"), *args],
                cwd=str(ROOT), stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
        return _Process(run_id=run_id, popen=popen, run_dir=run_dir)

    def _make_room(self, config: RunConfig) -> dict:
        """Unload what training must have (``plan_unloads``); what was unloaded, kept, and the sentence saying so."""
        if self.manager is None:
            return {"device": None, "unloaded": [], "kept": [], "note": ""}
        device = self.manager.device
        need = training_need_bytes(self.catalog.get(config.base_model), config.processes) if device == "cpu" else 0
        unload, in_use = plan_unloads(self.manager.snapshot(), device, self.manager.budget,
                                      self.manager.used_bytes(), need)
        unloaded = []
        for model_id in unload:
            try:
                if self.manager.unload(model_id):
                    unloaded.append(model_id)
            except Busy:  # a request pinned it since the snapshot
                in_use.append(model_id)
        return {"device": device, "unloaded": unloaded, "kept": in_use,
                "note": unload_note(device, unloaded, in_use, need, self.manager.budget)}

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

    def _checkpoint(self, run_id: str, run_dir: Path, name) -> dict:
        found = checkpoints_in(run_dir)
        if not found:
            raise InvalidRequest(f"Run {run_id} has no checkpoint to resume from (a run saves one when it is stopped, "
                                 "every 'save every N steps' and at its end).")
        if name in (None, "", LATEST):
            return found[-1]
        for item in found:
            if item["name"] == name:
                return item
        raise InvalidRequest(f"Run {run_id} has no checkpoint {quote(name, 60)}; it has "
                             f"{', '.join(item['name'] for item in found)}")

    def checkpoints(self, run_id: str) -> list[dict]:
        """The run's checkpoints a resume can start from, oldest first: ``{"name", "step"}``."""
        return checkpoints_in(self._run_dir(run_id))

    def _summary(self, run_id: str, run_dir: Path) -> dict:
        current = self._current
        following = current is not None and current.run_id == run_id
        exit_code, stop_requested = 0, False
        if following:
            exit_code, stop_requested = current.popen.poll(), current.stop_requested
            if exit_code is not None:
                self._reap(current)
        records = read_log(run_dir / LOG_NAME)
        orphan = not following and not _ended(records)
        summary = summarize(records, 1 if orphan else exit_code, stop_requested)
        if orphan:
            summary["message"] = "this run did not finish: the app was restarted while it ran; resume it"
        return summary

    def status(self, run_id: str) -> dict:
        """JSON-ready status: state, step, total, loss history, adapter path, checkpoints, last log lines,
        and which models its latest launch unloaded (``unloaded``, ``memory_note``)."""
        run_dir = self._run_dir(run_id)
        summary = self._summary(run_id, run_dir)
        summary.update(run_id=run_id, log_tail=tail(run_dir / "process.log"), checkpoints=checkpoints_in(run_dir),
                       command=cli_command(run_dir / "config.yaml", RunConfig.load(run_dir / "config.yaml").processes))
        return summary

    def list_runs(self, limit: int = MAX_LISTED_RUNS) -> list[dict]:
        """The runs in the runs folder, newest first, as the tab's list shows them.

        Built from the run folders alone, so it is the same after a page reload or an app restart.
        Each: run_id, state, step, total, loss, adapter_name, adapter (its folder once saved),
        base_model, started, checkpoints (names), message.
        """
        folders = sorted((p for p in _children(self.settings.runs_dir) if RUN_ID.fullmatch(p.name)),
                         key=lambda p: p.name, reverse=True)
        runs = []
        for folder in folders:
            if len(runs) >= limit:
                break
            try:
                config = RunConfig.load(folder / "config.yaml", self.settings.limits)
            except InvalidRequest:  # not a run (yet), or removed by retention while we list
                continue
            summary = self._summary(folder.name, folder)
            runs.append({"run_id": folder.name, "state": summary["state"], "step": summary["step"],
                         "total": summary["total"], "loss": summary["loss"], "adapter_name": config.adapter_name,
                         "adapter": summary["adapter"], "base_model": config.base_model,
                         "started": started_at(folder.name),
                         "checkpoints": [item["name"] for item in checkpoints_in(folder)],
                         "message": summary["message"]})
        return runs

    def active_run(self) -> str | None:
        current = self._current
        return current.run_id if current is not None and current.popen.poll() is None else None

    def training_memory(self) -> dict | None:
        """Resident memory of the running training process and every process under it, or None.

        For the Models tab's meter: ``{"run_id", "pid", "rss_bytes", "processes"}``, the launcher (python,
        or torchrun with its DDP ranks) and its children (data loader workers), read with psutil.
        """
        import psutil

        current = self._current
        if current is None or current.popen.poll() is not None:
            return None
        try:
            leader = psutil.Process(current.popen.pid)
            tree = [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        rss, counted = 0, 0
        for process in tree:
            try:
                rss += process.memory_info().rss
                counted += 1
            except psutil.NoSuchProcess:  # ended between the listing and the reading
                continue
        return {"run_id": current.run_id, "pid": current.popen.pid, "rss_bytes": rss, "processes": counted}

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
        """After the leader exits, end anything it left in its group (e.g. data loader workers), and log
        how it ended when it could not say so itself (killed, or crashed before logging)."""
        if process.reaped or process.popen.poll() is None:
            return
        process.reaped = True
        try:
            os.killpg(process.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        log = process.run_dir / LOG_NAME
        if not _ended(read_log(log)):
            append_log(log, "error", message=_exit_words(process.popen.returncode),
                       exit_code=process.popen.returncode)
