"""ModelManager: the one owner of every loaded model.

Loads lazily, pins a model while a call uses it, evicts the least recently used unpinned models
when a load would exceed the memory budget, and verifies on every unload that the memory came back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator

from models import memory, sources
from models.catalog import Catalog, ModelSpec
from models.errors import Busy, Unavailable
from models.limits import format_bytes
from models.prepare import Preparation
from models.quantization import Precision, choose
from models.settings import Settings

log = logging.getLogger(__name__)

# Allocator rounding and cuBLAS workspaces may leave a little behind; more than this is a leak.
CUDA_LEAK_TOLERANCE = 8 * 1024**2
IDLE_CHECK_SECONDS = 30.0  # how often --idle-unload looks for models no call has used for its timeout


class ModelTooLargeError(Unavailable):
    """The model cannot fit in the memory budget even with everything else unloaded."""


class BudgetBusyError(Busy):
    """The model would fit, but models that are in use right now hold the budget."""


class ModelBusyError(Busy):
    """An unload was asked for a model that a running call has pinned."""


class ModelLoadError(Unavailable):
    """Loading failed; nothing was kept."""


@dataclasses.dataclass
class _Entry:
    spec: ModelSpec
    handle: object
    precision: Precision
    nbytes: int
    load_seconds: float
    last_used: float
    cuda_bytes: int  # this model's own CUDA memory, which its unload must give back
    refs: list[weakref.ref]
    pins: int = 0


Loader = Callable[[ModelSpec, Precision, Settings], object]
Progress = Callable[[float, str], None]
Releaser = Callable[[ModelSpec, object], None]


def _default_loader(spec: ModelSpec, precision: Precision, settings: Settings) -> object:
    from models import families

    return families.load(spec, precision, settings)


def _default_releaser(spec: ModelSpec, handle: object) -> None:
    from models import families

    families.release(spec, handle)


class ModelManager:
    """Thread-safe registry of loaded models under one memory budget.

    Args:
        catalog: where model ids are looked up.
        settings: budget, device and cache folders.
        loader: ``(spec, precision, settings) -> handle``; the real families by default.
        releaser: ``(spec, handle) -> None`` that drops hooks before an unload.
        measure: ``handle -> bytes``; tensor bytes reachable from the handle by default.
    """

    def __init__(self, catalog: Catalog, settings: Settings, *, loader: Loader | None = None,
                 releaser: Releaser | None = None, measure: Callable[[object], int] | None = None):
        self.catalog = catalog
        self.settings = settings
        self.budget = settings.memory_budget_bytes
        self._loader = loader or _default_loader
        self._releaser = releaser or _default_releaser
        self._measure = measure or memory.module_bytes
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._reserved: dict[str, int] = {}
        self._load_locks: dict[str, threading.Lock] = {}
        self._device: str | None = None
        self.load_count: dict[str, int] = {}
        self.leaks: list[str] = []
        self.preparation = Preparation(catalog, settings)
        # One model call at a time on the device, held by tabs.common.model_call until the work has ended
        # (a plain Lock: a generator may resume in another thread than the one that took it).
        self.call_lock = threading.Lock()
        self._idle_thread: threading.Thread | None = None
        self._idle_stop = threading.Event()

    # ---- public API -------------------------------------------------------------------------

    @property
    def device(self) -> str:
        """The resolved device; resolving it imports torch, so it happens on the first load."""
        if self._device is None:
            self._device = memory.resolve_device(self.settings.device)
        return self._device

    @contextlib.contextmanager
    def use(self, model_id: str, quant: str | None = None, progress: Progress | None = None) -> Iterator[object]:
        """Yield a loaded handle for ``model_id``, pinned (never evicted) until the block ends.

        ``progress(fraction, words)`` is told when the model must be prepared or loaded first.
        """
        spec = self.catalog.get(model_id)
        entry = self._acquire(spec, quant, progress)
        try:
            yield entry.handle
        finally:
            with self._lock:
                entry.pins -= 1
                entry.last_used = time.time()

    def preload(self, model_ids: tuple[str, ...] | list[str]) -> threading.Thread | None:
        """Load ``model_ids`` in a daemon thread (after any first-use preparation); returns the thread.

        "defaults" stands for the voice tab's default speech, chat and voice models, those of them
        that work offline (a hub model would start a download nobody asked for); "none" for none.
        Failures are logged: a model that cannot be preloaded gets its clear message when it is used.
        """
        ids: list[str] = []
        for model_id in model_ids:
            if model_id == "defaults":
                defaults = [self.catalog.get(self.catalog.default_for(task, self.settings.offline))
                            for task in ("speech-to-text", "chat", "text-to-speech")]
                ids += [spec.id for spec in defaults if spec.works_offline]
            elif model_id != "none":
                self.catalog.get(model_id)  # an unknown id is a start-up mistake: say so now
                ids.append(model_id)
        if not ids:
            return None

        def run() -> None:
            for model_id in dict.fromkeys(ids):
                try:
                    with self.use(model_id):
                        pass
                except Exception as exc:  # noqa: BLE001 - logged; the app keeps serving
                    log.warning("could not preload %s: %s", model_id, exc)

        thread = threading.Thread(target=run, name="preload-models", daemon=True)
        thread.start()
        return thread

    def is_loaded(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._entries

    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values()) + sum(self._reserved.values())

    def unload(self, model_id: str) -> bool:
        """Unload one model. Returns False when it was not loaded. Raises ModelBusyError if pinned."""
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None:
                return False
            if entry.pins:
                raise ModelBusyError(f"{model_id} is answering a request right now; unload it when it is done")
            del self._entries[model_id]
        self._release(entry)
        return True

    def unload_all(self) -> list[str]:
        """Unload every model that is not in use; returns the ids unloaded."""
        with self._lock:
            idle = [mid for mid, e in self._entries.items() if not e.pins]
            entries = [self._entries.pop(mid) for mid in idle]
        for entry in entries:
            self._release(entry)
        return idle

    def unload_idle(self, idle_seconds: float) -> list[str]:
        """Unload every model no call has used for ``idle_seconds``; returns the ids unloaded.

        A model in use (pinned) stays however long its call takes: idleness counts from the end of
        the last call, never from its start.
        """
        cutoff = time.time() - idle_seconds
        with self._lock:
            idle = [mid for mid, e in self._entries.items() if not e.pins and e.last_used <= cutoff]
            entries = [self._entries.pop(mid) for mid in idle]
        for entry in entries:
            log.info("unloading %s: no call has used it for %.0f s (--idle-unload)", entry.spec.id,
                     time.time() - entry.last_used)
            self._release(entry)
        return idle

    def start_idle_unload(self, idle_seconds: float | None = None,
                          check_seconds: float = IDLE_CHECK_SECONDS) -> threading.Thread | None:
        """Unload idle models from a daemon thread, checking every ``check_seconds``, so a shared GPU is given back.

        ``idle_seconds`` defaults to ``--idle-unload`` (minutes); returns None when that is off.
        Calling it again while the thread runs returns the same thread.
        """
        if idle_seconds is None:
            idle_seconds = self.settings.idle_unload_minutes * 60
        if not idle_seconds or idle_seconds <= 0:
            return None
        with self._lock:
            if self._idle_thread is not None and self._idle_thread.is_alive():
                return self._idle_thread
            self._idle_stop = stop = threading.Event()

            def run() -> None:
                while not stop.wait(check_seconds):
                    try:
                        self.unload_idle(idle_seconds)
                    except Exception:  # the watchdog must outlive one failed unload
                        log.exception("idle unload failed; trying again in %.0f s", check_seconds)

            self._idle_thread = threading.Thread(target=run, name="idle-unload", daemon=True)
        self._idle_thread.start()
        log.info("idle unload: models unused for %.0f s are freed (checked every %.0f s)", idle_seconds,
                 check_seconds)
        return self._idle_thread

    def stop_idle_unload(self) -> None:
        """Stop the idle-unload thread (idempotent); loaded models stay loaded."""
        self._idle_stop.set()
        thread, self._idle_thread = self._idle_thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def snapshot(self) -> list[dict]:
        """Plain-data view of every loaded model, most recently used first."""
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.last_used, reverse=True)
            return [
                {
                    "id": e.spec.id,
                    "task": e.spec.task,
                    "device": e.precision.device,
                    "precision": e.precision.name,
                    "bytes": e.nbytes,
                    "load_seconds": round(e.load_seconds, 3),
                    "last_used": e.last_used,
                    "pinned": e.pins > 0,
                }
                for e in entries
            ]

    # ---- loading ----------------------------------------------------------------------------

    def _acquire(self, spec: ModelSpec, quant: str | None, progress: Progress | None = None) -> _Entry:
        with self._lock:
            entry = self._pin_if_loaded(spec.id, quant)
            if entry is not None:
                return entry
            load_lock = self._load_locks.setdefault(spec.id, threading.Lock())
        with load_lock:
            with self._lock:
                entry = self._pin_if_loaded(spec.id, quant)
                if entry is not None:
                    return entry
            existing = self._entries.get(spec.id)
            if existing is not None:  # loaded at another precision: swap it out first
                self.unload(spec.id)
            if progress is not None:
                progress(0.0, self._load_words(spec))
            return self._load(spec, quant)

    def _load_words(self, spec: ModelSpec) -> str:
        if not sources.is_prepared(spec, self.settings):
            return (f"Preparing {spec.id} for first use (once, about {sources.first_use_seconds(spec)} s), "
                    "then loading it…")
        return f"Loading {spec.id}…"

    def _pin_if_loaded(self, model_id: str, quant: str | None) -> _Entry | None:
        entry = self._entries.get(model_id)
        if entry is None or (quant is not None and entry.precision.name != quant):
            return None
        entry.pins += 1
        entry.last_used = time.time()
        return entry

    def _load(self, spec: ModelSpec, quant: str | None) -> _Entry:
        precision = choose(spec, self.device, quant)
        estimate = spec.estimate_bytes(precision.name)
        with self._lock:
            evicted = self._make_room(spec.id, estimate)
            self._reserved[spec.id] = estimate
        self._release_all(evicted)
        cuda_before = memory.cuda_allocated()
        started = time.perf_counter()
        handle = None
        try:
            handle = self._loader(spec, precision, self.settings)
            nbytes = int(self._measure(handle))
            cuda_bytes = _own_cuda_bytes(precision, cuda_before, nbytes)
        except BaseException as exc:
            handle = None
            with self._lock:
                self._reserved.pop(spec.id, None)
            memory.free_device_memory()
            if isinstance(exc, (ValueError, ModelTooLargeError, BudgetBusyError)) or not isinstance(exc, Exception):
                raise
            raise ModelLoadError(f"Could not load {spec.id}: {exc}") from exc
        entry = _Entry(spec=spec, handle=handle, precision=precision, nbytes=nbytes,
                       load_seconds=time.perf_counter() - started, last_used=time.time(),
                       cuda_bytes=cuda_bytes, refs=self._weakrefs(handle), pins=1)
        with self._lock:
            self._reserved.pop(spec.id, None)
            self._entries[spec.id] = entry
            self.load_count[spec.id] = self.load_count.get(spec.id, 0) + 1
            try:  # the measured size may exceed the estimate: evict more, or give this model up
                evicted = self._make_room(spec.id, 0)
            except (ModelTooLargeError, BudgetBusyError):
                del self._entries[spec.id]
                evicted = None
        del handle
        if evicted is None:
            self._release(entry)
            raise ModelTooLargeError(
                f"{spec.id} takes {format_bytes(nbytes)} once loaded, more than the free part of the "
                f"{format_bytes(self.budget)} budget. Raise --memory-budget or pick a smaller model or precision.")
        self._release_all(evicted)
        log.info("loaded %s (%s on %s, %s) in %.2fs", spec.id, precision.name, precision.device,
                 format_bytes(nbytes), entry.load_seconds)
        return entry

    def _make_room(self, model_id: str, incoming: int) -> list[_Entry]:
        """Pop LRU unpinned entries until ``incoming`` more bytes fit. Caller holds the lock."""
        if incoming > self.budget:
            raise ModelTooLargeError(
                f"{model_id} needs about {format_bytes(incoming)}, more than the whole memory budget of "
                f"{format_bytes(self.budget)}. Raise --memory-budget or choose a smaller model or a 4-bit precision.")
        evicted: list[_Entry] = []
        candidates = sorted((e for mid, e in self._entries.items() if mid != model_id and not e.pins),
                            key=lambda e: e.last_used)
        while self.used_bytes() + incoming > self.budget:
            if not candidates:
                for entry in evicted:  # put them back: nothing is released when we fail
                    self._entries[entry.spec.id] = entry
                busy = [mid for mid, e in self._entries.items() if e.pins and mid != model_id]
                holders = ", ".join(busy) or "loads in progress"
                raise BudgetBusyError(
                    f"{model_id} needs about {format_bytes(incoming)} but models in use ({holders}) "
                    f"hold the {format_bytes(self.budget)} budget. Try again when they finish.")
            victim = candidates.pop(0)
            del self._entries[victim.spec.id]
            evicted.append(victim)
            log.info("evicting %s (least recently used) to make room for %s", victim.spec.id, model_id)
        return evicted

    # ---- unloading --------------------------------------------------------------------------

    @staticmethod
    def _weakrefs(handle: object) -> list[weakref.ref]:
        refs = []
        with contextlib.suppress(TypeError):
            refs.append(weakref.ref(handle))
        if memory.torch_loaded():
            refs.extend(weakref.ref(m) for m in memory.iter_modules(handle))
        return refs

    def _release_all(self, entries: list[_Entry]) -> None:
        for entry in entries:
            self._release(entry)

    def _release(self, entry: _Entry) -> None:
        """Drop the workbench's references, free memory, and check that it really came back."""
        if entry.cuda_bytes:
            gc.collect()  # garbage left by earlier calls must not count as this model's freed memory
        cuda_before = memory.cuda_allocated()
        handle, entry.handle = entry.handle, None
        try:
            self._releaser(entry.spec, handle)
        except Exception:  # a failing hook must not stop the unload
            log.exception("releasing %s raised; continuing the unload", entry.spec.id)
        del handle
        memory.free_device_memory()
        alive = sum(1 for ref in entry.refs if ref() is not None)
        # Compare what this unload gave back with this model's own bytes: other models loaded or
        # unloaded since its load change the process-wide total and must not hide or fake a leak.
        not_freed = entry.cuda_bytes - (cuda_before - memory.cuda_allocated()) if entry.cuda_bytes else 0
        if alive or not_freed > CUDA_LEAK_TOLERANCE:
            detail = (f"{alive} object(s) still referenced" if alive else
                      f"{format_bytes(not_freed)} of its {format_bytes(entry.cuda_bytes)} on CUDA not freed")
            log.warning("Potential memory leak detected: %s still holds memory after unload (%s)",
                        entry.spec.id, detail)
            self.leaks.append(entry.spec.id)
        else:
            log.info("unloaded %s", entry.spec.id)


def _own_cuda_bytes(precision: Precision, allocated_before: int, measured: int) -> int:
    """The CUDA bytes a model's load added, capped at its measured tensors (0 off CUDA).

    The cap matters when two models load at once: the allocator's growth then includes the other's.
    """
    if precision.device != "cuda":
        return 0
    return max(0, min(memory.cuda_allocated() - allocated_before, measured))
