"""The model catalog: one ModelSpec per model, from catalog.yaml plus an optional user file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from models.errors import UnknownModel

# text-to-video entries are AnimateDiff motion adapters (family diffusion): the manager loads, measures
# and evicts them like any model; each request pairs one with an SD 1.5-family text-to-image model.
TASKS = ("vqa", "text-to-image", "text-to-video", "speech-to-text", "chat", "text-to-speech")
TASK_LABELS = {"vqa": "Image VQA", "text-to-image": "Text-to-image",
               "text-to-video": "Text-to-video (motion adapters)", "speech-to-text": "Speech-to-text",
               "chat": "Chat", "text-to-speech": "Text-to-speech"}
FAMILIES = ("vlm", "diffusion", "asr", "chat", "tts", "piper", "remote")
SOURCES = ("hub", "local", "offline", "package", "coqui", "openai")
QUANTS = ("nf4", "int8", "fp16", "bf16", "fp32")
BUILTIN_FILE = Path(__file__).with_name("catalog.yaml")

# Per-device default precision for each family: 4-bit NF4 for language models on CUDA,
# fp16 diffusion on CUDA, fp32 on CPU, fp16 on MPS where the family supports it.
# Families that are never quantized (speech, voices, remote engines) run in fp32 locally.
_UNQUANTIZED = {"asr": "fp32", "tts": "fp32", "piper": "fp32", "remote": "fp32"}
DEFAULT_QUANT = {
    "cuda": {"vlm": "nf4", "chat": "nf4", "diffusion": "fp16", **_UNQUANTIZED, "asr": "fp16"},
    "mps": {"vlm": "fp16", "chat": "fp16", "diffusion": "fp16", **_UNQUANTIZED, "asr": "fp16"},
    "cpu": {"vlm": "fp32", "chat": "fp32", "diffusion": "fp32", **_UNQUANTIZED},
}
BYTES_PER_PARAM = {"nf4": 0.56, "int8": 1.05, "fp16": 2.0, "bf16": 2.0, "fp32": 4.0}
OFFLINE_SOURCES = ("offline", "package", "local")


class UnknownModelError(UnknownModel):
    """Raised for a model id that is not in the catalog."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model the workbench can load."""

    id: str
    task: str
    family: str
    source: str
    repo: str = ""
    params_b: float = 0.0
    license: str = "unknown"
    notes: str = ""
    variant: str = ""
    quant: dict[str, str] = dataclasses.field(default_factory=dict)
    trust_remote_code: bool = False
    base_url: str = ""  # source openai: the engine's OpenAI-compatible endpoint (http://host:8000/v1)
    api_key_env: str = ""  # source openai: the environment variable that holds the engine's API key
    twin: str = ""  # hub and Coqui entries: the offline random-weight model of the same architecture
    twin_of: str = ""  # a twin: the entry it stands in for (twins are left out of the tabs' menus)

    @property
    def location(self) -> str:
        """Hub id, folder, Coqui name or package reference the family loads from."""
        return self.repo or self.id

    @property
    def works_offline(self) -> bool:
        return self.source in OFFLINE_SOURCES

    @property
    def label(self) -> str:
        tag = " — random weights, for smoke tests" if self.source == "offline" else ""
        return f"{self.id}{tag}"

    def default_quant(self, device: str) -> str:
        return self.quant.get(device) or DEFAULT_QUANT.get(device, DEFAULT_QUANT["cpu"])[self.family]

    def estimate_bytes(self, quant: str) -> int:
        """Rough size before a load: parameters x bytes per parameter, plus 10% for buffers."""
        return int(self.params_b * 1e9 * BYTES_PER_PARAM.get(quant, 4.0) * 1.1)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def spec_from_dict(raw: dict, where: str) -> ModelSpec:
    """A checked ModelSpec from one entry of a models file or of the Models tab's "Add a model".

    Raises ValueError, naming ``where``, for an entry that is not valid.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: each model entry must be a mapping, got {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = set(raw) - fields
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(fields)}")
    for key in ("id", "task", "family", "source"):
        if not raw.get(key):
            raise ValueError(f"{where}: entry {raw.get('id', '?')!r} is missing {key!r}")
    for key, allowed in (("task", TASKS), ("family", FAMILIES), ("source", SOURCES)):
        if raw[key] not in allowed:
            raise ValueError(f"{where}: {raw['id']}: {key} must be one of {allowed}, got {raw[key]!r}")
    if raw["task"] == "text-to-video" and raw["family"] != "diffusion":
        raise ValueError(f"{where}: {raw['id']}: a text-to-video entry is a motion adapter (family diffusion)")
    if (raw["source"] == "openai") != (raw["family"] == "remote"):
        raise ValueError(f"{where}: {raw['id']}: a remote engine has source openai and family remote (both or neither)")
    if raw["source"] == "openai" and (raw["task"] not in ("chat", "vqa") or not raw.get("base_url")):
        raise ValueError(f"{where}: {raw['id']}: a remote engine is a chat or vqa model with a base_url "
                         "(http://host:8000/v1)")
    for device, quant in (raw.get("quant") or {}).items():
        if quant not in QUANTS:
            raise ValueError(f"{where}: {raw['id']}: quant for {device} must be one of {QUANTS}")
    return ModelSpec(**{**raw, "quant": dict(raw.get("quant") or {})})


def _read(path: Path) -> list[ModelSpec]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read model file {path}: {exc}") from exc
    entries = data.get("models", []) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list under 'models:'")
    return [spec_from_dict(raw, str(path)) for raw in entries]


USER_MODELS_FILE = "models.yaml"  # in the cache folder, when no --models-file is given


def user_models_file(settings) -> Path:
    """The user's models file: ``--models-file`` when given, else ``models.yaml`` in the cache folder
    (where the Models tab's "Add a model" writes)."""
    return Path(settings.models_file) if settings.models_file else settings.cache_dir / USER_MODELS_FILE


def models_file_to_load(settings) -> Path | None:
    """The user's models file to read at start-up: ``--models-file``, else the cache folder's when it exists."""
    path = user_models_file(settings)
    return path if settings.models_file or path.is_file() else None


class Catalog:
    """Lookup of ModelSpecs (read-only but for ``add``); user entries override built-in ones with the same id."""

    def __init__(self, specs: list[ModelSpec]):
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            self._specs[spec.id] = spec
        for spec in self._specs.values():
            twin = self._specs.get(spec.twin) if spec.twin else None
            if spec.twin and (twin is None or twin.source != "offline" or (twin.task, twin.family) != (
                    spec.task, spec.family)):
                raise ValueError(f"{spec.id}: its twin {spec.twin!r} must be an offline entry of the same task "
                                 "and family")

    @classmethod
    def load(cls, user_file: Path | None = None) -> Catalog:
        specs = _read(BUILTIN_FILE)
        if user_file is not None:
            specs += _read(Path(user_file))
        return cls(specs)

    @classmethod
    def for_settings(cls, settings) -> Catalog:
        """The built-in catalog plus the user's models file (``models_file_to_load``): what the app and
        the training process read."""
        return cls.load(models_file_to_load(settings))

    def add(self, spec: ModelSpec) -> None:
        """Add one entry at run time (the Models tab's "Add a model"); an id already in the catalog is refused.

        The lookup table is replaced, not changed in place, so a thread iterating the catalog meanwhile
        sees either the old entries or the new ones.
        """
        if spec.id in self._specs:
            raise ValueError(f"{spec.id} is already in the catalog")
        self._specs = {**self._specs, spec.id: spec}

    def get(self, model_id: str) -> ModelSpec:
        if not isinstance(model_id, str) or model_id not in self._specs:
            raise UnknownModelError(f"Unknown model {model_id!r}. Known models: {', '.join(self._specs)}")
        return self._specs[model_id]

    def for_task(self, task: str, twins: bool = False) -> list[ModelSpec]:
        """Models for ``task`` in catalog order; architecture twins only when asked for."""
        return [spec for spec in self._specs.values() if spec.task == task and (twins or not spec.twin_of)]

    def ids(self, task: str) -> list[str]:
        return [spec.id for spec in self.for_task(task)]

    def twins(self) -> list[tuple[ModelSpec, ModelSpec]]:
        """(entry, its twin) for every hub or Coqui entry that names one."""
        return [(spec, self._specs[spec.twin]) for spec in self._specs.values() if spec.twin]

    def default_for(self, task: str, offline: bool) -> str:
        """First offline-capable model when offline; first hub model otherwise."""
        specs = self.for_task(task)
        if not specs:
            raise UnknownModelError(f"no model in the catalog for task {task!r}")
        preferred = [s for s in specs if s.works_offline] if offline else [s for s in specs if not s.works_offline]
        return (preferred or specs)[0].id

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._specs

    def __iter__(self):
        return iter(self._specs.values())
