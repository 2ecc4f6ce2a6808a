"""LoRA adapters saved by the fine-tuning tab, and switching them on a loaded model.

An adapter is a folder ``<adapters_dir>/<name>/`` holding a PEFT ``adapter_config.json`` and
weights, plus ``workbench.json`` with at least ``{"base_model": "<catalog id>"}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.checks import check_name
from models.errors import InvalidRequest

NONE = "none"


def list_adapters(adapters_dir: Path, base_model: str | None = None) -> list[str]:
    """Names of saved adapters, optionally only those trained on ``base_model``."""
    if not adapters_dir.is_dir():
        return []
    names = []
    for folder in sorted(adapters_dir.iterdir()):
        if not (folder / "adapter_config.json").is_file():
            continue
        if base_model is not None and adapter_base(folder) not in (None, base_model):
            continue
        names.append(folder.name)
    return names


def adapter_base(folder: Path) -> str | None:
    try:
        return json.loads((folder / "workbench.json").read_text()).get("base_model")
    except (OSError, ValueError, AttributeError):
        return None


def resolve(adapters_dir: Path, name: str | None, base_model: str) -> Path | None:
    """The folder of adapter ``name`` (None for 'none'); refuses names that leave the folder."""
    if name is None or name == "" or name == NONE:
        return None
    # A name as the fine-tune tab saves them: no path, no alias, no name the file system refuses
    check_name("adapter", name, "adapter names")
    root = adapters_dir.resolve()
    folder = (root / name).resolve()
    if folder.parent != root:
        raise InvalidRequest(f"adapter {name!r} is not a folder name inside the adapters folder")
    if not (folder / "adapter_config.json").is_file():
        known = ", ".join(list_adapters(adapters_dir)) or "none saved yet"
        raise InvalidRequest(f"Unknown adapter {name!r}. Saved adapters: {known}")
    base = adapter_base(folder)
    if base is not None and base != base_model:
        raise InvalidRequest(f"adapter {name!r} was trained on {base}, not on {base_model}")
    return folder


def loaded_adapters(model) -> list[str]:
    """Names of the adapters loaded on ``model``; none before the first ``activate`` with a folder."""
    # transformers sets ``peft_config`` at the first load_adapter and deletes it with the last adapter.
    return list(getattr(model, "peft_config", None) or {})


def activate(model, folder: Path | None) -> None:
    """Make ``folder``'s adapter the active one on ``model``, or run the bare base model (None).

    Uses the transformers PEFT integration, so it works on 4-bit bitsandbytes models too. An
    adapter is loaded once per model and kept next to the base weights for later switches.
    ``activate(model, None)`` on a model that never had an adapter does nothing.
    """
    loaded = loaded_adapters(model)
    if folder is None:
        if loaded:
            model.disable_adapters()
        return
    name = folder.name
    if name not in loaded:
        model.load_adapter(str(folder), adapter_name=name)
    model.set_adapter(name)
    model.enable_adapters()
