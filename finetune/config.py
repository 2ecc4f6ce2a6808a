"""QLoRA run configuration: one dataclass, validated, saved and loaded as YAML.

The same YAML file drives the UI and the command line: ``python -m finetune.train run.yaml``.
The runner fills the ``paths`` part (dataset, run folder, cache) before it starts a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
from pathlib import Path

import yaml

from models.errors import InvalidRequest

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
QUANTIZATIONS = ("nf4", "int8", "none")
TRAINABLE_TASKS = ("chat", "vqa")
ALL_LINEAR = "all-linear"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Presets only set training knobs; the model, dataset and adapter name stay the user's.
PRESETS: dict[str, dict] = {
    "quick test (tiny models)": dict(lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=1e-2, max_steps=30,
                                     batch_size=2, grad_accum=1, max_length=256, warmup_steps=0,
                                     scheduler="constant", gradient_checkpointing=False, eval_steps=10,
                                     save_steps=10),
    "balanced": dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, learning_rate=2e-4, max_steps=0, epochs=3.0,
                     batch_size=4, grad_accum=4, max_length=1024, warmup_steps=10, scheduler="cosine",
                     gradient_checkpointing=True, eval_steps=50, save_steps=100),
    "low memory": dict(lora_r=8, lora_alpha=16, lora_dropout=0.05, learning_rate=2e-4, max_steps=0, epochs=2.0,
                       batch_size=1, grad_accum=16, max_length=512, warmup_steps=10, scheduler="cosine",
                       gradient_checkpointing=True, eval_steps=100, save_steps=100),
}


@dataclasses.dataclass
class RunConfig:
    """Everything one QLoRA run needs.

    ``max_steps`` > 0 wins over ``epochs``. ``eval_steps``/``save_steps`` of 0 mean "only at the end".
    ``target_modules`` is ``"all-linear"`` (every linear layer of the language model; the vision
    tower, projector and output head stay frozen) or a list of module names such as ``[q_proj, v_proj]``.
    """

    base_model: str = "tiny-chat"
    adapter_name: str = "my-adapter"
    quantization: str = "nf4"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = ALL_LINEAR
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int = 512
    warmup_steps: int = 0
    scheduler: str = "linear"
    seed: int = 42
    gradient_checkpointing: bool = True
    eval_steps: int = 0
    save_steps: int = 0
    val_fraction: float = 0.1
    # paths, filled by the runner (or by hand for the command line)
    dataset: str = ""
    run_dir: str = ""
    cache_dir: str = ".cache"
    models_dir: str = ""
    offline: bool = False
    device: str = "auto"
    resume_from: str = ""

    # ---- validation ---------------------------------------------------------------------------

    def validate(self, catalog=None) -> RunConfig:
        """Raise ValueError with every problem found; return self when the config is usable."""
        problems = []

        def number(name, low, high, integer=False, low_inclusive=True):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"{name} must be a number, got {value!r}")
                return
            if isinstance(value, float) and math.isnan(value):
                problems.append(f"{name} must be a number, got NaN")
                return
            if integer and value != int(value):
                problems.append(f"{name} must be a whole number, got {value!r}")
                return
            below = value < low if low_inclusive else value <= low
            if below or value > high:
                bound = "≥" if low_inclusive else ">"
                problems.append(f"{name} must be {bound} {low} and ≤ {high}, got {value!r}")

        number("lora_r", 1, 1024, integer=True)
        number("lora_alpha", 1, 4096, integer=True)
        number("lora_dropout", 0, 0.9)
        number("learning_rate", 0, 1.0, low_inclusive=False)
        number("epochs", 0, 1000, low_inclusive=False)
        number("max_steps", 0, 10_000_000, integer=True)
        number("batch_size", 1, 4096, integer=True)
        number("grad_accum", 1, 4096, integer=True)
        number("max_length", 8, 131_072, integer=True)
        number("warmup_steps", 0, 1_000_000, integer=True)
        number("seed", 0, 2**32 - 1, integer=True)
        number("eval_steps", 0, 10_000_000, integer=True)
        number("save_steps", 0, 10_000_000, integer=True)
        number("val_fraction", 0, 0.5)
        if self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if not isinstance(self.adapter_name, str) or not NAME_PATTERN.match(self.adapter_name):
            problems.append("adapter_name must be 1-64 letters, digits, '.', '_' or '-' (a folder name), "
                            f"got {self.adapter_name!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            problems.append("gradient_checkpointing must be true or false")
        targets = self.target_modules
        if targets != ALL_LINEAR and not (isinstance(targets, list) and targets
                                          and all(isinstance(t, str) and t.strip() for t in targets)):
            problems.append(f"target_modules must be {ALL_LINEAR!r} or a non-empty list of module names")
        if catalog is not None:
            if not isinstance(self.base_model, str) or self.base_model not in catalog:
                trainable = [s.id for s in catalog if s.task in TRAINABLE_TASKS]
                problems.append(f"Unknown model {self.base_model!r}; choose one of: {', '.join(trainable)}")
            elif catalog.get(self.base_model).task not in TRAINABLE_TASKS:
                problems.append(f"{self.base_model} is a {catalog.get(self.base_model).task} model; "
                                "fine-tuning supports chat and VQA models")
        if problems:
            raise InvalidRequest("Invalid training config: " + "; ".join(problems) + ".")
        return self

    # ---- (de)serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def training_dict(self) -> dict:
        """The knobs a user sets (no paths): what the UI shows and a model card records."""
        paths = {"dataset", "run_dir", "cache_dir", "models_dir", "offline", "device", "resume_from"}
        return {k: v for k, v in self.to_dict().items() if k not in paths}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, raw: dict) -> RunConfig:
        if not isinstance(raw, dict):
            raise InvalidRequest(f"config must be a mapping of settings, got {type(raw).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise InvalidRequest(f"unknown config keys {unknown}; allowed: {sorted(fields)}")
        return cls(**raw)

    @classmethod
    def from_text(cls, text: str) -> RunConfig:
        """Parse YAML (JSON is valid YAML) text into a config."""
        if not isinstance(text, str):
            raise InvalidRequest("config must be YAML text or a JSON object")
        try:
            raw = yaml.safe_load(text) if text.strip() else {}
        except yaml.YAMLError as exc:
            raise InvalidRequest(f"config is not valid YAML: {exc}") from None
        return cls.from_dict(raw or {})

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidRequest(f"cannot read config {path}: {exc.strerror}") from None
        return cls.from_text(text)


def parse_config(value) -> RunConfig:
    """A RunConfig from what the API accepts: YAML text, JSON text, a dict, or a RunConfig."""
    if isinstance(value, RunConfig):
        return value
    if isinstance(value, dict):
        return RunConfig.from_dict(value)
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("{"):
            try:
                return RunConfig.from_dict(json.loads(stripped))
            except json.JSONDecodeError:
                pass  # YAML flow mappings also start with "{"; let the YAML parser report
        return RunConfig.from_text(value)
    if value is None:
        return RunConfig()
    raise InvalidRequest(f"config must be YAML text or a JSON object, got {type(value).__name__}")


def with_preset(config: RunConfig, preset: str) -> RunConfig:
    if preset not in PRESETS:
        raise InvalidRequest(f"Unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(config, **PRESETS[preset])


def cli_command(config_path: str | Path, accelerate: bool = False) -> str:
    """The shell command that runs this config outside the UI."""
    module = ["-m", "finetune.train", str(config_path)]
    if accelerate:
        return shlex.join(["accelerate", "launch", *module])
    return shlex.join(["python", *module])
