"""The Hugging Face cache: what each catalog model has on disk, downloading a hub model, deleting one, adding one.

Downloads go into the normal Hugging Face cache (``HF_HUB_CACHE``), file by file with
``hf_hub_download`` pinned to one commit, so that:

* progress is counted in bytes against a total known before the first byte (the repo's file list
  and sizes come from ``HfApi.model_info(files_metadata=True)``);
* Stop takes effect at the next chunk: the progress bar handed to ``hf_hub_download`` raises, and
  huggingface_hub removes the file it was writing (each download goes to a temporary file that is
  renamed only when complete). Files stored with Xet come over plain HTTP meanwhile (``_plain_http``):
  hf_xet's transfers report progress from Rust threads, where raising stops nothing;
* nothing incomplete looks complete: the ``refs/main`` entry that offline loads go through and the
  cached file listing are written only once every file is there and verified (size, and sha256
  or git blob hash), by a last ``snapshot_download`` that finds everything cached.

huggingface_hub is imported inside the functions, and its settings (``HF_HUB_CACHE``,
``HF_ENDPOINT``, ``HF_HUB_OFFLINE``) are read when a function runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from models.catalog import TASK_LABELS, TASKS, ModelSpec, user_models_file
from models.errors import Busy, InvalidRequest, Unavailable, quote
from models.limits import format_bytes

log = logging.getLogger(__name__)

# The families that load a hub model for each task (text to speech comes from Coqui or a Piper file instead).
HUB_FAMILIES = {"vqa": ("vlm",), "text-to-image": ("diffusion",), "speech-to-text": ("asr",), "chat": ("chat",)}
# organisation/name: letters, digits, "-", "_", "."; at most 96 characters (the hub's own rule).
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_REPO_ID = 96
DISK_BYTES_PER_PARAM = 2.0  # hub checkpoints are mostly fp16/bf16 safetensors: a rough size before a download
PROGRESS_EVERY = 0.25  # seconds between progress reports

DOWNLOADED, PARTIAL, MISSING = "downloaded", "partial", "not downloaded"


class CorruptDownloadError(Unavailable):
    """A downloaded file is not what the hub listed (size, sha256 or git hash); it was removed."""


class ModelLoadedError(Busy):
    """The model's files are in use by a loaded model."""


class DownloadStopped(Exception):  # a signal rather than an error: raised by the progress bar on Stop
    """Raised inside huggingface_hub's download loop when Stop was pressed."""


# ---- what is in the cache (no network) --------------------------------------------------------------

def hub_cache_dir() -> Path:
    """The Hugging Face cache folder in use now (``HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_folder(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")


@dataclasses.dataclass(frozen=True)
class CacheState:
    """A hub model in the local cache: ``downloaded``, ``partial`` or ``not downloaded``, and its bytes on disk."""

    state: str
    disk_bytes: int = 0
    commit: str = ""

    @property
    def downloaded(self) -> bool:
        return self.state == DOWNLOADED


def cache_state(repo_id: str, measure: bool = True) -> CacheState:
    """Whether ``repo_id``'s files are in the cache, read from the disk only (a few stat calls).

    Downloaded means: ``refs/main`` names a commit whose snapshot folder has files, and, when the
    commit's file listing is cached (``hf download``, ``snapshot_download`` and this module write
    it), every listed file is there. A model fetched file by file by transformers has no listing;
    its snapshot counts as downloaded.
    """
    folder = repo_folder(repo_id)
    if not folder.is_dir():
        return CacheState(MISSING)
    disk = _folder_bytes(folder / "blobs") if measure else 0
    ref = folder / "refs" / "main"
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else ""
    snapshot = folder / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir() or not any(snapshot.iterdir()):
        return CacheState(PARTIAL if disk or _has_files(folder / "snapshots") else MISSING, disk)
    missing = _missing_files(repo_id, commit, snapshot)
    return CacheState(PARTIAL if missing else DOWNLOADED, disk, commit)


def _missing_files(repo_id: str, commit: str, snapshot: Path) -> list[str]:
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        listing = get_cached_repo_tree(repo_id, revision=commit, cache_dir=hub_cache_dir())
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return []
    return [entry.path for entry in listing if not (snapshot / entry.path).is_file()]


def _folder_bytes(folder: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def _tree_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (symlinks not followed)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                path = Path(root) / name
                if not path.is_symlink():
                    total += path.stat().st_size
    return total


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(files for _root, _dirs, files in os.walk(folder))


def approx_download(spec: ModelSpec) -> str:
    """About how much a hub model downloads, from its parameter count ("~1 GB", "~80 MB"; "" when unknown)."""
    nbytes = spec.params_b * 1e9 * DISK_BYTES_PER_PARAM
    if nbytes <= 0:
        return ""
    gib = nbytes / 1024**3
    if gib >= 0.95:
        return f"~{gib:.0f} GB"
    return f"~{gib:.1f} GB" if gib >= 0.1 else f"~{max(1, round(nbytes / 1024**2, -1)):.0f} MB"


def choice_label(spec: ModelSpec, settings) -> str:
    """A model menu's label: the spec's own, plus a mark on a hub model whose files are not in the cache."""
    label = spec.label
    if spec.source != "hub" or cache_state(spec.location, measure=False).downloaded:
        return label
    if settings.offline:
        return f"{label} — not downloaded (offline: unavailable)"
    size = approx_download(spec)
    return f"{label} — not downloaded (downloads {size} on first use)" if size else \
        f"{label} — not downloaded (downloads on first use)"


# ---- the catalog view -------------------------------------------------------------------------------

def files_state(spec: ModelSpec, settings) -> dict:
    """Where a model's files are: ``{"files": words, "state": token, "disk_bytes": int | None, "url": str}``."""
    from models import sources

    if spec.source == "openai":
        return {"files": f"remote engine at {spec.base_url}", "state": "remote", "disk_bytes": None,
                "url": spec.base_url}
    if spec.source in ("offline", "package"):
        prepared = sources.is_prepared(spec, settings)
        folder = settings.offline_models_dir / spec.id
        built = "built by the project (random weights)" if spec.source == "offline" else "from a pip package"
        state = ("built" if spec.source == "offline" else "prepared") if prepared else "on first use"
        words = built if prepared else f"{built}, prepared on first use"
        return {"files": words, "state": state, "disk_bytes": _tree_bytes(folder) if prepared else None, "url": ""}
    if spec.source == "local":
        exists = Path(spec.location).expanduser().exists()
        return {"files": "local folder" if exists else "local folder (missing)",
                "state": "local" if exists else "missing", "disk_bytes": None, "url": ""}
    if spec.source == "coqui":
        folder = sources.coqui_folder(spec)
        if not folder.is_dir():
            return {"files": "not downloaded (Coqui)", "state": MISSING, "disk_bytes": None, "url": ""}
        return {"files": "Coqui model folder", "state": DOWNLOADED, "disk_bytes": _tree_bytes(folder), "url": ""}
    state = cache_state(spec.location)
    words = {DOWNLOADED: "hub cache", PARTIAL: "hub cache, incomplete (Download finishes it)",
             MISSING: "not downloaded"}[state.state]
    return {"files": words, "state": state.state, "disk_bytes": state.disk_bytes or None, "url": ""}


def catalog_entries(manager, settings, downloads: Downloads | None = None) -> list[dict]:
    """Every model of the catalog except architecture twins, as plain data (the /catalog endpoint).

    Each entry: id, task, family, license, params_b, source, where its files are (``files``,
    ``state``, ``disk_bytes``, ``url``), whether it is loaded (``loaded``, ``in_use``,
    ``memory_bytes``) and for how long no call has used it (``idle_seconds``, None unless loaded
    and idle), and a download in progress (``download``: done and total bytes).
    """
    loaded = {entry["id"]: entry for entry in manager.snapshot()}
    now = time.time()
    entries = []
    for spec in manager.catalog:
        if spec.twin_of:
            continue
        model = loaded.get(spec.id)
        entry = {"id": spec.id, "task": spec.task, "family": spec.family, "license": spec.license,
                 "params_b": spec.params_b, "source": spec.source, **files_state(spec, settings),
                 "loaded": model is not None, "in_use": bool(model and model["pinned"]),
                 "memory_bytes": model["bytes"] if model else 0,
                 "idle_seconds": round(now - model["last_used"], 1) if model and not model["pinned"] else None,
                 "download": downloads.progress(spec.id) if downloads else None}
        entries.append(entry)
    return entries


# ---- downloads --------------------------------------------------------------------------------------

@dataclasses.dataclass
class DownloadJob:
    """One download in progress: its byte counts and its stop flag."""

    model_id: str
    total: int = 0
    done: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    stop_requested: threading.Event = dataclasses.field(default_factory=threading.Event)
    report: Callable[[int, int], None] | None = None
    _reported: float = 0.0

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more (called by huggingface_hub for every chunk); raise when Stop was pressed."""
        self.done += nbytes
        if self.stop_requested.is_set():
            raise DownloadStopped(self.model_id)
        now = time.monotonic()
        if self.report is not None and now - self._reported >= PROGRESS_EVERY:
            self._reported = now
            self.report(self.done, self.total)

    def check_stop(self) -> None:
        if self.stop_requested.is_set():
            raise DownloadStopped(self.model_id)


class Downloads:
    """The app's downloads in progress, by model id, so that Stop (from any session) and the catalog find them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: dict[str, DownloadJob] = {}

    def begin(self, model_id: str, report: Callable[[int, int], None] | None = None) -> DownloadJob:
        with self._lock:
            if model_id in self._jobs:
                raise Busy(f"{model_id} is being downloaded already; wait for it or press Stop.")
            job = self._jobs[model_id] = DownloadJob(model_id, report=report)
            return job

    def end(self, job: DownloadJob) -> None:
        with self._lock:
            if self._jobs.get(job.model_id) is job:
                del self._jobs[job.model_id]

    def stop(self, model_id: str) -> bool:
        """Ask the download of ``model_id`` to stop at its next chunk; False when none is running."""
        with self._lock:
            job = self._jobs.get(model_id)
        if job is None:
            return False
        job.stop_requested.set()
        return True

    def active(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._jobs

    def progress(self, model_id: str) -> dict | None:
        with self._lock:
            job = self._jobs.get(model_id)
            return {"done_bytes": job.done, "total_bytes": job.total} if job else None


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    model_id: str
    stopped: bool
    done_bytes: int
    total_bytes: int
    seconds: float
    message: str


def progress_words(done: int, total: int) -> str:
    return f"Downloading {format_bytes(done)} of {format_bytes(total)}"


def offline_reason(settings) -> str:
    """Why downloads are off ("" when they are on): the app is offline, or huggingface_hub is (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    if settings.offline:
        return f"the app is offline ({settings.offline_reason or 'offline mode'})"
    return "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else ""


def hub_spec(catalog, model_id) -> ModelSpec:
    """The catalog entry of a hub model, or a message saying why ``model_id`` is not one."""
    if not isinstance(model_id, str) or not model_id.strip():
        raise InvalidRequest("Choose a hub model.")
    spec = catalog.get(model_id.strip())
    if spec.source != "hub":
        raise InvalidRequest(f"{spec.id} is not a hub model (its files are {_source_words(spec)}); only hub "
                             "models are downloaded or deleted here.")
    return spec


def _source_words(spec: ModelSpec) -> str:
    return {"offline": "built by the project", "package": "in a pip package", "local": "a local folder",
            "coqui": "Coqui's", "openai": "on a remote engine"}.get(spec.source, spec.source)


def download(catalog, settings, model_id: str, downloads: Downloads,
             progress: Callable[[int, int], None] | None = None) -> DownloadResult:
    """Fetch a hub model's files into the Hugging Face cache, file by file, until done or stopped.

    Args:
        catalog: where ``model_id`` is looked up (it must be a hub entry).
        settings: ``offline`` refuses the download with the reason.
        model_id: the catalog id.
        downloads: the app's registry; ``downloads.stop(model_id)`` stops this download.
        progress: ``(done_bytes, total_bytes)``, told a few times a second and at the end.

    Returns:
        What happened (done or stopped), with the bytes and a one-line message.

    Raises:
        Unavailable: offline, the hub cannot be reached, or a file arrived corrupted (it is removed).
        InvalidRequest: not a hub model, or not on the hub.
        Busy: this model is being downloaded already.
    """
    spec = hub_spec(catalog, model_id)
    offline = offline_reason(settings)
    if offline:
        raise Unavailable(f"Downloads are off: {offline}.")
    job = downloads.begin(spec.id, progress)
    try:
        return _download(spec, job)
    finally:
        downloads.end(job)


def _download(spec: ModelSpec, job: DownloadJob) -> DownloadResult:
    from huggingface_hub import hf_hub_download, snapshot_download

    repo = spec.location
    # 1. The file list and sizes at one commit, so the total is known and every file comes from that commit
    commit, files = _listing(spec)
    job.total = sum(size or 0 for _name, size, _sha, _blob in files)
    snapshot = repo_folder(repo) / "snapshots" / commit
    pending = [f for f in files if not (snapshot / f[0]).is_file()]
    job.done = job.total - sum(size or 0 for _name, size, _sha, _blob in pending)
    bar = _progress_bar_class(job)
    stopped = False
    before = job.done
    # 2. Each missing file; a stop raises inside huggingface_hub, which removes the file it was writing
    try:
        with _plain_http():
            for name, size, sha256, blob_id in pending:
                job.check_stop()
                before = job.done
                with _hub_errors(spec, name):
                    path = hf_hub_download(repo, name, revision=commit, tqdm_class=bar)
                job.done = before + _verify(spec, name, Path(path), size, sha256, blob_id)
        job.check_stop()
    except DownloadStopped:
        stopped, job.done = True, before  # what is kept: the finished files
    # 3. Only now: the listing and refs/main that make the snapshot count as complete, offline too
    if not stopped:
        with _hub_errors(spec):
            snapshot_download(repo, revision=commit)  # every file is cached: it only writes the listing
        _write_ref(repo, "main", commit)
    if job.report is not None:
        job.report(job.done, job.total)
    seconds = time.monotonic() - job.started
    if stopped:
        message = (f"Stopped downloading {spec.id}: {format_bytes(job.done)} of {format_bytes(job.total)} kept in "
                   "finished files; it does not count as downloaded (the file being written was removed). "
                   "Download again to finish.")
    else:
        message = f"Downloaded {spec.id}: {format_bytes(job.total)} in {seconds:.1f} s, into the Hugging Face cache."
    log.info(message)
    return DownloadResult(spec.id, stopped, job.done, job.total, round(seconds, 2), message)


def _listing(spec: ModelSpec) -> tuple[str, list[tuple[str, int | None, str, str]]]:
    """(commit, [(file name, size, lfs sha256 or "", git blob id or "")]) of the repo's main branch."""
    from huggingface_hub import HfApi

    with _hub_errors(spec):
        info = HfApi().model_info(spec.location, revision="main", files_metadata=True)
    if not info.sha or info.siblings is None:
        raise Unavailable(f"The hub sent no file list for {spec.location}; try again later.")
    files = [(s.rfilename, s.size, s.lfs.sha256 if s.lfs else "", s.blob_id or "") for s in info.siblings]
    return info.sha, files


@contextlib.contextmanager
def _plain_http():
    """Files stored with Xet come over plain HTTP while a download of ours runs (``HF_HUB_DISABLE_XET``).

    hf_xet reports progress from its Rust threads, where raising does not stop the transfer; over
    HTTP huggingface_hub feeds our progress bar chunk by chunk, so Stop takes effect at the next
    chunk. The hub serves every Xet file over HTTP as well (same bytes, same cache). The switch is
    process-wide for that time (downloads run one at a time), so a model loading meanwhile also
    fetches over HTTP.
    """
    from huggingface_hub import constants

    previous = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = previous


def _progress_bar_class(job: DownloadJob) -> type:
    """A stand-in for tqdm that huggingface_hub feeds with every chunk it writes: counts bytes, raises on Stop."""

    class Bar:
        def __init__(self, *args, **kwargs):
            self.n = kwargs.get("initial") or 0

        def update(self, n: int | float | None = 1) -> None:
            self.n += int(n or 0)
            job.advance(int(n or 0))

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> bool:
            return False

        def close(self) -> None:
            pass

        def refresh(self) -> None:
            pass

        def set_description(self, *args, **kwargs) -> None:
            pass

        def set_postfix_str(self, *args, **kwargs) -> None:
            pass

    return Bar


def _verify(spec: ModelSpec, name: str, path: Path, size: int | None, sha256: str, blob_id: str) -> int:
    """Check the file's size, and its sha256 (large files) or git blob hash (small ones), as the hub listed them.

    Returns its size. A mismatch removes the file and its blob, so nothing corrupt stays in the cache.
    """
    actual_size = path.stat().st_size
    problem = ""
    if size is not None and actual_size != size:
        problem = f"it has {actual_size:,} bytes instead of {size:,}"
    elif sha256 and _sha256(path) != sha256:
        problem = "its sha256 does not match the hub's"
    elif not sha256 and blob_id and _git_blob_sha1(path, actual_size) != blob_id:
        problem = "its git hash does not match the hub's"
    if not problem:
        return actual_size
    blob = path.resolve()
    path.unlink(missing_ok=True)
    if blob != path and blob.parent.name == "blobs":
        blob.unlink(missing_ok=True)
    raise CorruptDownloadError(f"{spec.id}: {name} arrived corrupted ({problem}). It was removed; Download again. "
                               "If it happens again, the hub or a proxy is serving a damaged copy.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_blob_sha1(path: Path, size: int) -> str:
    digest = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_ref(repo_id: str, revision: str, commit: str) -> None:
    ref = repo_folder(repo_id) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    temporary = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    temporary.write_text(commit, encoding="utf-8")
    os.replace(temporary, ref)


@contextlib.contextmanager
def _hub_errors(spec: ModelSpec, name: str = ""):
    """Turn what huggingface_hub or the network raises into the user's message; anything else passes unchanged."""
    try:
        yield
    except DownloadStopped:
        raise
    except Exception as exc:
        mapped = _download_error(spec, name, exc)
        if mapped is exc:
            raise
        raise mapped from exc


def _download_error(spec: ModelSpec, name: str, exc: Exception) -> Exception:
    """The user's message for what huggingface_hub or the network raised (a UserError passes unchanged)."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from models.errors import UserError

    what = f"{spec.id}" + (f" ({name})" if name else "")
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, GatedRepoError):
        return Unavailable(f"{spec.location} is gated: accept its licence on its hub page, log in on this machine "
                           "(`hf auth login`), then Download again.")
    if isinstance(exc, RepositoryNotFoundError):
        return InvalidRequest(f"{spec.location} is not on the hub (or it is private: log in with `hf auth login`).")
    if isinstance(exc, RevisionNotFoundError):
        return InvalidRequest(f"{spec.location} has no main branch on the hub.")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "no"
        return Unavailable(f"The hub refused the download of {what} (HTTP {status}); try again later.")
    if isinstance(exc, (httpx2.HTTPError, ConnectionError, TimeoutError, LocalEntryNotFoundError)):
        return Unavailable(f"The hub stopped answering while downloading {what} ({exc.__class__.__name__}). "
                           "Finished files are kept: Download again to resume.")
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return CorruptDownloadError(f"{what} arrived with the wrong size; nothing of it was kept. Download again.")
    if isinstance(exc, OSError):
        return Unavailable(f"Could not write {what} into the Hugging Face cache: "
                           f"{exc.strerror or exc.__class__.__name__} (is the disk full?).")
    return exc


# ---- deleting ---------------------------------------------------------------------------------------

def _deletable(manager, model_id, downloads: Downloads | None) -> tuple[ModelSpec, CacheState]:
    spec = hub_spec(manager.catalog, model_id)
    if manager.is_loaded(spec.id):
        raise ModelLoadedError(f"{spec.id} is loaded; unload it first, then delete its files.")
    if downloads is not None and downloads.active(spec.id):
        raise Busy(f"{spec.id} is being downloaded; press Stop first, then delete its files.")
    state = cache_state(spec.location)
    if state.state == MISSING and not repo_folder(spec.location).exists():
        raise InvalidRequest(f"{spec.id} has no files in the Hugging Face cache.")
    return spec, state


def delete_preview(manager, model_id, downloads: Downloads | None = None) -> str:
    """What deleting would remove (the question a confirmation asks); raises where deleting is refused."""
    spec, state = _deletable(manager, model_id, downloads)
    return f"Delete {spec.id}? This removes {format_bytes(state.disk_bytes)} from the Hugging Face cache."


def delete_cached(manager, model_id, confirm: bool = False, downloads: Downloads | None = None) -> str:
    """Remove a hub model's files from the Hugging Face cache; refused while it is loaded or downloading.

    Nothing is removed without ``confirm=True``: the message then says what would be.
    """
    spec, state = _deletable(manager, model_id, downloads)
    if confirm is not True:
        raise InvalidRequest(f"Deleting {spec.id} removes {format_bytes(state.disk_bytes)} from the Hugging Face "
                             "cache; confirm to delete (confirm=true).")
    freed = _delete_repo(spec.location)
    log.info("deleted %s from the Hugging Face cache (%s)", spec.location, format_bytes(freed))
    return f"Deleted {spec.id} from the Hugging Face cache ({format_bytes(freed)} freed)."


def _delete_repo(repo_id: str) -> int:
    """Delete ``repo_id``'s revisions with the cache's own strategy, then what it leaves (a partial download)."""
    from huggingface_hub import scan_cache_dir

    cache = hub_cache_dir()
    folder = repo_folder(repo_id)
    before = _tree_bytes(folder)
    info = scan_cache_dir(cache)
    revisions = [rev.commit_hash for repo in info.repos if repo.repo_id == repo_id and repo.repo_type == "model"
                 for rev in repo.revisions]
    if revisions:  # every revision: the strategy removes the repo's folder with them
        info.delete_revisions(*revisions).execute()
    elif folder.parent == cache and folder.is_dir():  # a download that never finished has no revision yet
        shutil.rmtree(folder)
    locks = cache / ".locks" / folder.name
    if locks.parent == cache / ".locks" and locks.is_dir():
        shutil.rmtree(locks)
    return before


# ---- adding a model ---------------------------------------------------------------------------------

def check_new_model(catalog, repo_id, task, family) -> dict:
    """The catalog entry (as a dict) for a hub model added by id, task and family, after every check."""
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise InvalidRequest("Enter the model's hub id, like Qwen/Qwen2.5-0.5B-Instruct.")
    repo_id = repo_id.strip()
    if len(repo_id) > MAX_REPO_ID or not REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id \
            or repo_id.endswith(".git"):
        raise InvalidRequest(f"{quote(repo_id, 120)} is not a hub model id: it looks like organisation/name (letters, "
                             "digits, '-', '_', '.'; at most 96 characters), for example Qwen/Qwen2.5-0.5B-Instruct.")
    if task not in TASKS:
        raise InvalidRequest(f"task must be one of {', '.join(TASKS)}, got {quote(task, 60)}.")
    families = HUB_FAMILIES.get(task, ())
    if not families:
        raise InvalidRequest(f"{TASK_LABELS[task]} models do not come from the hub here: add a Piper voice or a Coqui "
                             "model to your models file (README, 'Your own models').")
    if family not in families:
        raise InvalidRequest(f"A {TASK_LABELS[task]} model from the hub uses the {' or '.join(families)} family, "
                             f"not {quote(family, 60)}.")
    if repo_id in catalog:
        raise InvalidRequest(f"{repo_id} is in the catalog already.")
    return {"id": repo_id, "task": task, "family": family, "source": "hub", "notes": "added from the Models tab"}


def add_model(manager, settings, repo_id, task, family) -> str:
    """Add a hub model to the user's models file and to the running catalog (usable at once).

    Checks the id's form and the task/family pair, refuses an id already in the catalog, then
    appends the entry to ``user_models_file(settings)`` (read again at every start-up).
    """
    from models.catalog import spec_from_dict

    path = user_models_file(settings)
    with _locked(path):
        raw = check_new_model(manager.catalog, repo_id, task, family)
        spec = spec_from_dict(raw, "Add a model")
        append_entry(path, raw)
        manager.catalog.add(spec)
    log.info("added %s (%s, %s) to %s", spec.id, spec.task, spec.family, path)
    then = ("Download it below, or it downloads on first use." if not settings.offline else
            "Offline, it works once its files are in the Hugging Face cache.")
    return f"Added {spec.id} ({TASK_LABELS[spec.task]}, family {spec.family}) to {path.name}; it is usable now. {then}"


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock beside the models file: one writer at a time, threads and processes alike."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def append_entry(path: Path, raw: dict) -> None:
    """Add ``raw`` to the ``models:`` list of a YAML file, keeping the file's own text (comments) where possible.

    The entry is appended as one flow-style line when the result reads back as the old entries plus
    this one; otherwise the file is rewritten from its data. The write is atomic (temporary file, rename).
    """
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    data = yaml.safe_load(text) if text.strip() else None
    entries = _entries(data, path)
    line = "  - " + yaml.safe_dump(raw, default_flow_style=True, sort_keys=False, width=10_000).strip() + "\n"
    if data is None:
        candidate = "# Models added from the Models tab (and your own; format: README, 'Your own models')\nmodels:\n" \
            + line
    else:
        candidate = text + ("" if text.endswith("\n") else "\n") + line
    try:
        appended = _entries(yaml.safe_load(candidate), path)
    except (yaml.YAMLError, InvalidRequest):
        appended = None
    if appended != entries + [raw]:
        candidate = yaml.safe_dump({"models": entries + [raw]}, sort_keys=False)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(candidate, encoding="utf-8")
    os.replace(temporary, path)


def _entries(data, path: Path) -> list:
    entries = data.get("models", []) if isinstance(data, dict) else data if data is not None else []
    if not isinstance(entries, list):
        raise InvalidRequest(f"The models file {path.name} has no list under 'models:'; fix it before adding models.")
    return entries
