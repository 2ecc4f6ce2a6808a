"""Prepare the models that work offline, once: build the tiny ones, verify and convert the packaged ones.

Nobody should wait on a conversion at their first click. ``make run`` and ``make test`` run
``python -m models.prepare`` after installing (it prints progress and is quick once done), and the
app prepares anything still missing in the background right after start-up (``Preparation``),
with the state shown in the Models tab. A request that arrives meanwhile waits on the same file
lock (``models.sources.build_once``) instead of starting a second conversion.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading
import time

from models.catalog import Catalog, ModelSpec
from models.settings import Settings

log = logging.getLogger(__name__)

WAITING, PREPARING, READY, FAILED = "waiting", "preparing", "ready", "failed"


def preparable(catalog: Catalog) -> list[ModelSpec]:
    """Catalog entries that need a one-time build or conversion.

    The offline default of each task comes first (what the first click will use), then the other
    packaged real models, then the tiny random ones.
    """
    from models.catalog import TASKS

    defaults = {catalog.default_for(task, offline=True) for task in TASKS if catalog.for_task(task)}
    specs = [spec for spec in catalog if spec.source in ("package", "offline")]
    return sorted(specs, key=lambda spec: (spec.id not in defaults or spec.source != "package",
                                           spec.source != "package"))


def prepare(spec: ModelSpec, settings: Settings) -> str:
    """Build or convert ``spec`` into the cache (no-op when done); returns its folder."""
    from models.families import resolve_location

    return resolve_location(spec, settings)


@dataclasses.dataclass
class PrepState:
    id: str
    state: str = WAITING
    seconds: float = 0.0
    message: str = ""


class Preparation:
    """The app's background preparation of offline models, and its state per model."""

    def __init__(self, catalog: Catalog, settings: Settings):
        self.settings = settings
        self._specs = preparable(catalog)
        self._lock = threading.Lock()
        self._states = {spec.id: PrepState(spec.id) for spec in self._specs}
        self._thread: threading.Thread | None = None
        self._refresh()

    def _refresh(self) -> None:
        from models.sources import is_prepared

        with self._lock:
            for spec in self._specs:
                state = self._states[spec.id]
                if state.state == WAITING and is_prepared(spec, self.settings):
                    state.state = READY

    def start(self) -> threading.Thread | None:
        """Prepare whatever is missing in a daemon thread; returns it (None when all is ready)."""
        self._refresh()
        with self._lock:
            if self._thread is not None or all(s.state == READY for s in self._states.values()):
                return self._thread
            self._thread = threading.Thread(target=self._run, name="prepare-offline-models", daemon=True)
        self._thread.start()
        return self._thread

    def _run(self) -> None:
        for spec in self._specs:
            with self._lock:
                state = self._states[spec.id]
                if state.state != WAITING:
                    continue
                state.state = PREPARING
            started = time.perf_counter()
            try:
                prepare(spec, self.settings)
            except Exception as exc:  # noqa: BLE001 - shown in the Models tab; the app keeps serving
                log.warning("could not prepare %s: %s", spec.id, exc)
                outcome, message = FAILED, str(exc)
            else:
                outcome, message = READY, ""
            with self._lock:
                state.state, state.message = outcome, message
                state.seconds = round(time.perf_counter() - started, 1)

    def snapshot(self) -> list[dict]:
        self._refresh()
        with self._lock:
            return [dataclasses.asdict(state) for state in self._states.values()]


def main(argv: list[str] | None = None) -> int:
    """``python -m models.prepare [--strict] [app flags]``: prepare every offline model, with progress."""
    from models.settings import settings_from_args

    parser = argparse.ArgumentParser(prog="python -m models.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="exit with an error when a model cannot be prepared")
    parser.add_argument("--only", action="append", default=[], metavar="MODEL_ID",
                        help="prepare only this model (repeatable); default: every model that works offline")
    own, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(rest)
    catalog = Catalog.for_settings(settings)
    from models.sources import first_use_seconds, is_prepared

    failures = 0
    specs = [spec for spec in preparable(catalog) if not own.only or spec.id in own.only]
    unknown = set(own.only) - {spec.id for spec in specs}
    if unknown:
        parser.error(f"not an offline model: {', '.join(sorted(unknown))}")
    for index, spec in enumerate(specs, 1):
        if is_prepared(spec, settings):
            print(f"[{index}/{len(specs)}] {spec.id}: ready", flush=True)
            continue
        print(f"[{index}/{len(specs)}] {spec.id}: preparing for first use (once, about "
              f"{first_use_seconds(spec)} s)...", flush=True)
        started = time.perf_counter()
        try:
            prepare(spec, settings)
        except Exception as exc:  # noqa: BLE001 - reported per model; the others still get prepared
            failures += 1
            print(f"[{index}/{len(specs)}] {spec.id}: FAILED: {exc}", flush=True)
            continue
        print(f"[{index}/{len(specs)}] {spec.id}: ready in {time.perf_counter() - started:.1f} s", flush=True)
    return 1 if failures and own.strict else 0


if __name__ == "__main__":
    sys.exit(main())
