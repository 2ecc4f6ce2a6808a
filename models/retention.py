"""Disk retention: the files the workbench generates are kept up to ``--retention-gb``, oldest removed first.

Three areas grow with use: generated images (``outputs/``), training runs (``runs/<id>/``) and
uploaded or validated datasets (``<cache>/uploads``, ``<cache>/validation``). Each top-level file
or folder in them is one item. Adapters and offline models are never removed; ``disk_usage``
shows them next to the others.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

RUN_LOG = "log.jsonl"  # written by finetune/train.py; its last record says how the run ended
TERMINAL_EVENTS = ("done", "error")
FINISHED_MARKERS = ("finished", "adapter")
# A run folder without config.yaml is a start that failed while checking its dataset (the runner
# copies the data first); once this old, nothing is still writing it.
ABANDONED_SECONDS = 3600.0
LOG_TAIL_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class _Item:
    path: Path
    nbytes: int
    newest: float  # the latest modification time of anything in it
    removable: bool


def upload_dirs(settings) -> list[Path]:
    """Where uploaded and validated datasets are copied."""
    return [settings.cache_dir / "uploads", settings.cache_dir / "validation"]


def disk_usage(settings) -> dict[str, int]:
    """Bytes on disk per area: outputs, runs, uploads, adapters, offline_models (0 for a missing folder)."""
    return {
        "outputs": _measure(settings.outputs_dir)[0],
        "runs": _measure(settings.runs_dir)[0],
        "uploads": sum(_measure(folder)[0] for folder in upload_dirs(settings)),
        "adapters": _measure(settings.adapters_dir)[0],
        "offline_models": _measure(settings.offline_models_dir)[0],
    }


def enforce(settings, protect: Iterable[Path] = (), is_running: Callable[[str], bool] | None = None) -> list[Path]:
    """Remove the oldest generated items until they total at most ``settings.retention_gb``.

    Never removed: anything in the adapters folder; the paths in ``protect`` (and the items that
    hold them); a run that is not finished or that ``is_running(run_id)`` says is running; the
    newest item of each area (what the user is looking at right now).

    Args:
        settings: the folders and ``retention_gb``.
        protect: paths in use (images on screen, the dataset being validated).
        is_running: ``run_id -> bool``, e.g. ``lambda run_id: run_id == runner.active_run()``.

    Returns:
        The paths removed, oldest first.
    """
    limit = int(settings.retention_gb * 1024**3)
    items = _items(settings, protect, is_running)
    total = sum(item.nbytes for item in items)
    removed = []
    for item in sorted((item for item in items if item.removable), key=lambda item: item.newest):
        if total <= limit:
            break
        if _remove(item.path):
            total -= item.nbytes
            removed.append(item.path)
    if removed:
        log.info("retention: removed %d old item(s) to keep generated files under %.2f GB",
                 len(removed), settings.retention_gb)
    return removed


def _items(settings, protect: Iterable[Path], is_running: Callable[[str], bool] | None) -> list[_Item]:
    """Every item of every area, each marked removable or not."""
    kept = [Path(path).resolve() for path in protect] + [settings.adapters_dir.resolve()]
    areas = {"outputs": [settings.outputs_dir], "runs": [settings.runs_dir], "uploads": upload_dirs(settings)}
    items = []
    for area, folders in areas.items():
        found = [(path, *_measure(path)) for folder in folders for path in _children(folder)]
        newest = max(found, key=lambda entry: entry[2])[0] if found else None
        for path, nbytes, mtime in found:
            removable = (path != newest and not _touches(path, kept)
                         and (area != "runs" or _finished_run(path, mtime, is_running)))
            items.append(_Item(path, nbytes, mtime, removable))
    return items


def _children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _touches(path: Path, kept: list[Path]) -> bool:
    """Whether ``path`` is a kept path, lies inside one, or holds one."""
    resolved = path.resolve()
    return any(resolved == other or other in resolved.parents or resolved in other.parents for other in kept)


def _finished_run(run_dir: Path, newest: float, is_running: Callable[[str], bool] | None) -> bool:
    if is_running is not None and is_running(run_dir.name):
        return False
    if any((run_dir / marker).exists() for marker in FINISHED_MARKERS):
        return True
    if not (run_dir / "config.yaml").exists() and not (run_dir / RUN_LOG).exists():
        return time.time() - newest > ABANDONED_SECONDS
    return _last_event(run_dir / RUN_LOG) in TERMINAL_EVENTS


def _last_event(path: Path) -> str | None:
    """The event of a log's last line; None when it is missing or half-written (the run is mid-write)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - LOG_TAIL_BYTES))
            lines = handle.read().decode("utf-8", "replace").strip().splitlines()
        record = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
    return record.get("event") if isinstance(record, dict) else None


def _measure(path: Path) -> tuple[int, float]:
    """(bytes of the files in ``path``, their newest modification time); links are counted, not followed.

    A folder's own time is used only when it holds no file: it changes whenever an entry is added.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return 0, 0.0
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size, info.st_mtime
    total, newest = 0, 0.0
    for root, _, files in os.walk(path):  # os.walk does not descend into linked folders
        for name in files:
            try:
                file_info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:  # removed while we walk
                continue
            total += file_info.st_size
            newest = max(newest, file_info.st_mtime)
    return total, newest or info.st_mtime


def _remove(path: Path) -> bool:
    """Delete a file, link or folder; False (logged) when the file system refuses."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:  # another enforce got there first
        pass
    except OSError as exc:  # a full clean-up matters less than the request that triggered it
        log.warning("retention: could not remove %s: %s", path, exc)
        return False
    log.info("retention: removed %s", path)
    return True
