"""The transformers loader shared by the chat and vision-language families.

Both load a tokenizer or processor and a model with ``from_pretrained`` at a precision, place the
model, and need a chat template; only the auto classes differ.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.catalog import ModelSpec
from models.errors import InvalidRequest
from models.quantization import Precision, fit_4bit_for_cpu, transformers_kwargs
from models.sources import ModelUnavailableError


def load_pretrained(spec: ModelSpec, location: str, precision: Precision, model_class, processor_class,
                    kind: str) -> tuple[object, object]:
    """Load ``(model, processor)`` from ``location``, ready for inference.

    Args:
        spec: the catalog entry (its id names the model in messages; ``trust_remote_code``).
        location: hub id or local folder.
        precision: device and precision; bitsandbytes precisions are placed by ``device_map``.
        model_class: a transformers auto class, e.g. ``AutoModelForCausalLM``.
        processor_class: ``AutoTokenizer`` or ``AutoProcessor``.
        kind: what the model should be, for the message when it has no chat template ("chat model").

    Raises:
        InvalidRequest: the model has no chat template (checked before the weights are read).
    """
    processor = processor_class.from_pretrained(location, trust_remote_code=spec.trust_remote_code)
    require_chat_template(processor, f"{spec.id} has no chat template; it is not an instruct/{kind}")
    kwargs = transformers_kwargs(precision)
    model = model_class.from_pretrained(location, trust_remote_code=spec.trust_remote_code, **kwargs)
    if "quantization_config" not in kwargs:
        model.to(precision.device)
    elif precision.device == "cpu":
        fit_4bit_for_cpu(model)
    model.eval()
    return model, processor


def require_chat_template(processor, message: str) -> None:
    """Make sure ``processor`` has a chat template, taking its tokenizer's when only that one has one."""
    if getattr(processor, "chat_template", None) is not None:
        return
    template = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    if template is None:
        raise InvalidRequest(message)
    processor.chat_template = template


def folder_config(spec: ModelSpec, location: str, wanted: str, missing_config: str = "") -> dict | None:
    """The ``config.json`` of a local model folder as a dict (None for a hub id), before any weights are read.

    A folder without one, or with one that cannot be read, gets a message saying what the folder
    holds and what ``wanted`` (the family's kind of model, "a chat model...") needs.
    """
    folder = Path(location)
    if not folder.is_dir():
        return None
    config_file = folder / "config.json"
    if not config_file.is_file():
        what = missing_config or ("a diffusers pipeline" if (folder / "model_index.json").is_file()
                                  else "no config.json")
        raise ModelUnavailableError(f"{spec.id}: {folder} holds {what}, not {wanted}.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"{spec.id}: cannot read {config_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelUnavailableError(f"{spec.id}: {config_file} is not a JSON object; it holds no model config.")
    return config
