"""QLoRA run configuration: one dataclass, validated, saved and loaded as YAML.

The same YAML file drives the UI and the command line: ``python -m finetune.train run.yaml``.
The runner fills the ``paths`` part (dataset, run folder, cache) before it starts a run.

Config text is bounded before it is built: at most ``limits.yaml_bytes`` of text and
``limits.yaml_nodes`` nodes, a few levels deep, and no YAML anchors or aliases (a few hundred bytes of
nested aliases expand to gigabytes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
from pathlib import Path

import yaml

from models.checks import check_name
from models.errors import InvalidRequest, TooLarge, quote
from models.limits import Limits

MAX_PROCESSES = 64
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
QUANTIZATIONS = ("nf4", "int8", "none")
TRAINABLE_TASKS = ("chat", "vqa")
ALL_LINEAR = "all-linear"
# A run config is flat (one list at most); deeper nesting only costs recursion.
MAX_DEPTH = 8
# Filled in by the runner (or by hand for the command line), never shown in the tab's form.
PATH_FIELDS = ("dataset", "run_dir", "cache_dir", "models_dir", "models_file", "offline", "device", "resume_from")

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
    # For finetune/examples/invented-facts.jsonl: 30 one-word facts memorised in 32 steps (about 1.5 min
    # on 2 CPU cores); every row trains, since the point is to answer exactly these questions.
    "teach facts (smollm2-135m)": dict(lora_r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=2e-3, max_steps=0,
                                       epochs=8.0, batch_size=8, grad_accum=1, max_length=64, warmup_steps=0,
                                       scheduler="constant", gradient_checkpointing=False, eval_steps=0,
                                       save_steps=0, val_fraction=0.0),
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
    # Training processes (DDP): one per GPU through torchrun; on CPU several share the cores (gloo).
    # Only rank 0 writes the log, the checkpoints and the adapter.
    processes: int = 1
    # paths, filled by the runner (or by hand for the command line)
    dataset: str = ""
    run_dir: str = ""
    cache_dir: str = ".cache"
    models_dir: str = ""
    models_file: str = ""  # the app's --models-file, so a run can train on the user's own catalog entries
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
                problems.append(f"{name} must be a number, got {quote(value, 80)}")
                return
            if isinstance(value, float) and math.isnan(value):
                problems.append(f"{name} must be a number, got NaN")
                return
            if integer and value != int(value):
                problems.append(f"{name} must be a whole number, got {quote(value, 80)}")
                return
            below = value < low if low_inclusive else value <= low
            if below or value > high:
                bound = "≥" if low_inclusive else ">"
                problems.append(f"{name} must be {bound} {low} and ≤ {high}, got {quote(value, 80)}")

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
        number("processes", 1, MAX_PROCESSES, integer=True)
        if self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {quote(self.scheduler, 80)}")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization must be one of {', '.join(QUANTIZATIONS)}, "
                            f"got {quote(self.quantization, 80)}")
        try:
            check_name("adapter_name", self.adapter_name, "adapter folder names")
        except InvalidRequest as exc:
            problems.append(str(exc))
        if not isinstance(self.gradient_checkpointing, bool):
            problems.append("gradient_checkpointing must be true or false")
        targets = self.target_modules
        if targets != ALL_LINEAR and not (isinstance(targets, list) and targets
                                          and all(isinstance(t, str) and t.strip() for t in targets)):
            problems.append(f"target_modules must be {ALL_LINEAR!r} or a non-empty list of module names")
        if catalog is not None:
            if not isinstance(self.base_model, str) or self.base_model not in catalog:
                trainable = [s.id for s in catalog if s.task in TRAINABLE_TASKS]
                problems.append(f"Unknown model {quote(self.base_model, 100)}; choose one of: {', '.join(trainable)}")
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
        return {k: v for k, v in self.to_dict().items() if k not in PATH_FIELDS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, raw: dict, limits: Limits | None = None) -> RunConfig:
        """A config from a mapping of settings (bounded by ``limits``); the adapter name is checked at once."""
        if not isinstance(raw, dict):
            raise InvalidRequest(f"config must be a mapping of settings, got {type(raw).__name__}")
        check_nodes(raw, limits or Limits.from_env())
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = [key for key in raw if key not in fields]
        if unknown:
            raise InvalidRequest(f"unknown config keys {quote(unknown)}; allowed: {', '.join(sorted(fields))}")
        if "adapter_name" in raw:  # it becomes a folder name: refuse it before anything uses it
            check_name("adapter_name", raw["adapter_name"], "adapter folder names")
        return cls(**raw)

    @classmethod
    def from_text(cls, text: str, limits: Limits | None = None) -> RunConfig:
        """Parse YAML or JSON text into a config (empty text or ``null``: the defaults)."""
        raw = load_text(text, limits or Limits.from_env())
        return cls.from_dict({} if raw is None else raw, limits)

    @classmethod
    def load(cls, path: Path, limits: Limits | None = None) -> RunConfig:
        limits = limits or Limits.from_env()
        return cls.from_text(read_config_text(path, limits), limits)


def read_config_text(path: Path, limits: Limits) -> str:
    """A config file's text, read no further than one byte past ``limits.yaml_bytes`` (load_text refuses it)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(limits.yaml_bytes + 1)
    except OSError as exc:
        raise InvalidRequest(f"cannot read config {quote(path.name, 100)}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidRequest(f"config {quote(path.name, 100)} is not UTF-8 text") from None


def parse_training_text(text, limits: Limits | None = None) -> tuple[RunConfig, list[str]]:
    """The training knobs of YAML/JSON text, as the tab's form shows them: (config, ignored path keys).

    Keys the text leaves out take their defaults, as on the command line. Path keys (``dataset``,
    ``run_dir``...) are the runner's to fill in: they are returned by name, not applied.
    """
    limits = limits or Limits.from_env()
    raw = load_text(text, limits)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise InvalidRequest(f"config must be a mapping of settings (key: value lines), got {type(raw).__name__}")
    ignored = [key for key in raw if key in PATH_FIELDS]
    return RunConfig.from_dict({k: v for k, v in raw.items() if k not in PATH_FIELDS}, limits), ignored


def matching_preset(config: RunConfig) -> str | None:
    """The preset whose every setting ``config`` has, or None: what the preset menu shows for a config."""
    for name, values in PRESETS.items():
        if all(getattr(config, key) == value for key, value in values.items()):
            return name
    return None


def load_text(text, limits: Limits):
    """The value YAML or JSON text holds, refusing anchors and aliases, too many nodes and too much text."""
    if not isinstance(text, str):
        raise InvalidRequest("config must be YAML text or a JSON object")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.yaml_bytes:
        raise TooLarge(f"the config is {size:,} bytes; the limit is {limits.yaml_bytes:,}. A run config needs only "
                       "the settings it changes.")
    if not text.strip():
        return {}
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)  # JSON first: YAML 1.1 reads 1e-4 as a string
        except json.JSONDecodeError:
            pass  # YAML flow mappings also start with "{"; let the YAML parser report
        except RecursionError:
            raise InvalidRequest(f"config is nested more than {MAX_DEPTH} levels deep") from None
        else:
            check_nodes(value, limits)
            return value
    loader = _BoundedLoader(text, limits)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise InvalidRequest(f"config is not valid YAML: {yaml_problem(exc)}") from None
    finally:
        loader.dispose()


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line saying where and what PyYAML found wrong (its own text spans lines and draws a caret)."""
    mark = getattr(exc, "problem_mark", None)
    words = [part for part in (getattr(exc, "context", None), getattr(exc, "problem", None)) if part]
    text = ", ".join(words) if words else str(exc).splitlines()[0]
    return (f"line {mark.line + 1}, column {mark.column + 1}: " if mark else "") + text[:200]


def check_nodes(value, limits: Limits) -> None:
    """Refuse a parsed config of more than ``limits.yaml_nodes`` values or ``MAX_DEPTH`` levels."""
    count, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > limits.yaml_nodes:
            raise TooLarge(f"the config holds more than {limits.yaml_nodes:,} values, the limit")
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"config is nested more than {MAX_DEPTH} levels deep")
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item if isinstance(item, list) else []
        stack.extend((child, depth + 1) for child in children)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases, and stops past ``yaml_nodes`` nodes or ``MAX_DEPTH`` levels.

    It also reads ``1e-4`` as a number, as YAML 1.2 and JSON do: PyYAML's YAML 1.1 rules want a dot and a
    signed exponent (``1.0e-4``) and would hand a learning rate typed the usual way over as text.
    """

    def __init__(self, text: str, limits: Limits):
        super().__init__(text)
        self._limits, self._nodes, self._depth = limits, 0, 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise InvalidRequest(f"config line {event.start_mark.line + 1} uses a YAML anchor or alias (&name or "
                                 "*name); they are not accepted: write each value out")
        self._nodes += 1
        if self._nodes > self._limits.yaml_nodes:
            raise TooLarge(f"the config holds more than {self._limits.yaml_nodes:,} values, the limit")
        if self._depth >= MAX_DEPTH:
            raise InvalidRequest(f"config is nested more than {MAX_DEPTH} levels deep")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                     re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                     list("-+0123456789"))


def parse_config(value, limits: Limits | None = None) -> RunConfig:
    """A RunConfig from what the API accepts: YAML text, JSON text, a dict, or a RunConfig."""
    limits = limits or Limits.from_env()
    if isinstance(value, RunConfig):
        return value
    if isinstance(value, dict):
        return RunConfig.from_dict(value, limits)
    if isinstance(value, str):
        return RunConfig.from_text(value, limits)
    if value is None:
        return RunConfig()
    raise InvalidRequest(f"config must be YAML text or a JSON object, got {type(value).__name__}")


def with_preset(config: RunConfig, preset: str) -> RunConfig:
    if not isinstance(preset, str) or preset not in PRESETS:
        raise InvalidRequest(f"Unknown preset {quote(preset, 80)}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(config, **PRESETS[preset])


def cli_command(config_path: str | Path, processes: int = 1, accelerate: bool = False) -> str:
    """The shell command that runs this config outside the UI (``processes`` > 1: one per GPU, DDP)."""
    module = ["-m", "finetune.train", str(config_path)]
    if accelerate:
        return shlex.join(["accelerate", "launch", "--num_processes", str(processes), *module])
    if processes > 1:
        return shlex.join(["torchrun", "--standalone", "--nproc_per_node", str(processes), *module])
    return shlex.join(["python", *module])


def command_help(config: RunConfig) -> str:
    """What "Show command" prints: how to run this config outside the UI."""
    name = f"{config.adapter_name}.yaml"
    gpus = max(2, config.processes)
    return (f"# save the YAML above as {name} (add dataset: path/to/data.jsonl)\n"
            f"{cli_command(name, config.processes)}\n"
            f"# on {gpus} GPUs of one machine, one process each (DDP; only rank 0 writes the log and adapter)\n"
            f"{cli_command(name, gpus)}\n"
            f"# the same through accelerate (e.g. with --config_file finetune/accelerate/deepspeed_zero3.yaml)\n"
            f"{cli_command(name, gpus, accelerate=True)}")
