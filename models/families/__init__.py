"""Model families behind one small interface.

Each family is a module ``models/families/<family>.py`` that defines:

* ``load(spec, location, precision) -> handle``: load from a hub id, a local folder or a Coqui
  name. The handle is a plain object (a dataclass) whose attributes hold the torch modules, so
  the manager can measure and weak-reference them.
* ``build_tiny(folder, arch="")``: write a deterministic random-weight model into ``folder`` with
  ``save_pretrained`` (only families that have an offline ``tiny-*`` entry); ``arch`` names the
  architecture of a twin (the offline entry's ``repo``).
* ``release(handle)`` (optional): drop hooks or caches before an unload.
* the task functions the tabs call (``answer``, ``generate``, ``transcribe``, ``reply``, ``speak``).

Heavy imports happen inside those functions, never at module import.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

from models import sources
from models.catalog import ModelSpec
from models.quantization import Precision
from models.settings import Settings
from models.sources import ModelUnavailableError

__all__ = ["ModelUnavailableError", "family_module", "load", "release", "resolve_location"]


def family_module(name: str) -> ModuleType:
    return importlib.import_module(f"models.families.{name}")


def resolve_location(spec: ModelSpec, settings: Settings) -> str:
    """Where the family should load ``spec`` from (see ``models.sources.resolve``).

    An offline entry's ``repo`` names the architecture its family's ``build_tiny`` builds ("" for
    the family's default tiny model).
    """
    builder = None
    if spec.source == "offline":
        build_tiny = family_module(spec.family).build_tiny
        builder = functools.partial(build_tiny, arch=spec.repo) if spec.repo else build_tiny
    return sources.resolve(spec, settings, builder)


def load(spec: ModelSpec, precision: Precision, settings: Settings) -> object:
    location = resolve_location(spec, settings)
    return family_module(spec.family).load(spec, location, precision)


def release(spec: ModelSpec, handle: object) -> None:
    hook = getattr(family_module(spec.family), "release", None)
    if hook is not None:
        hook(handle)
