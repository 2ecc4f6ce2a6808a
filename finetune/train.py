"""``python -m finetune.train CONFIG.yaml [--resume latest|CHECKPOINT]``: one QLoRA run in its own process.

Works the same from a shell and under ``accelerate launch -m finetune.train CONFIG.yaml``. Writes
``log.jsonl`` in the run folder (one JSON object per line: start, step, eval, checkpoint, stopping,
done or error records), catches SIGTERM/SIGINT to stop at the end of the current step with a
checkpoint, saves a checkpoint at its last step too (a later run can continue it with more steps), and
saves the PEFT adapter, its ``workbench.json`` and a model card into the adapters folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

from finetune.config import ALL_LINEAR, RunConfig
from models.errors import InvalidRequest

# Parts of a multimodal model that stay frozen: only the language model gets LoRA. Substrings of module
# names: the vision towers (``vision_tower``: LLaVA; ``vision_model``: Idefics3/SmolVLM and Mllama;
# ``visual``: Qwen2-VL/2.5-VL, its merger included), the connectors that project image features into the
# language model (``multi_modal_projector``: LLaVA, Mllama; ``connector``: Idefics3/SmolVLM), the output
# head and embeddings.
FROZEN_PARTS = ("vision_tower", "vision_model", "multi_modal_projector", "connector", "visual", "image_newline",
                "lm_head", "embed_tokens", "audio_tower")
# Decoder layers that exist only to feed the image into the language model, by class: Mllama's
# cross-attention layers (cross-attention and an MLP, inserted between Llama 3.1's self-attention layers).
# Meta describes them as the vision adapter, trained with the image encoder while the Llama 3.1 weights
# stayed frozen; so they stay frozen, as the projectors do. They also run only when a batch has an
# image: on a text-only dataset their LoRA weights would get no gradient (an error under DDP).
VISION_ADAPTER_LAYERS = ("MllamaCrossAttentionDecoderLayer",)
# Image inputs aligned with the token sequence (batch, tokens, ...): cut and padded with the ids.
SEQUENCE_INPUTS = ("cross_attention_mask", "mm_token_type_ids", "token_type_ids")
LOG_NAME = "log.jsonl"


class RunLog:
    """Append-only JSONL log; every record gets a wall-clock ``time``."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": time.time(), **fields}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


class GracefulStop:
    """Turns SIGTERM/SIGINT into a flag that the trainer checks after each step."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name


def vision_adapter_layers(model) -> list[str]:
    """Names of the decoder layers that only read the image (``VISION_ADAPTER_LAYERS``), e.g. Mllama's."""
    return [name for name, module in model.named_modules() if type(module).__name__ in VISION_ADAPTER_LAYERS]


def target_modules_pattern(model, wanted: str | list[str]) -> str:
    """A regex over module names: the wanted linear layers of the language model only.

    Left out: ``FROZEN_PARTS`` (vision towers, projectors, head) and the layers of ``vision_adapter_layers``.
    """
    import re

    import torch

    adapters = vision_adapter_layers(model)

    def in_language_model(name: str) -> bool:
        return not any(part in name for part in FROZEN_PARTS) and not any(
            name.startswith(f"{layer}.") for layer in adapters)

    if wanted == ALL_LINEAR:
        leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear) and in_language_model(name)})
    else:
        leaves = sorted({str(name).strip() for name in wanted})
    if not leaves:
        raise InvalidRequest("no linear layer of the language model matches target_modules")
    frozen = "|".join(FROZEN_PARTS)
    skip_adapters = rf"(?!(?:{'|'.join(re.escape(layer) for layer in adapters)})\.)" if adapters else ""
    return rf"^{skip_adapters}(?!.*(?:{frozen})).*\.(?:{'|'.join(re.escape(leaf) for leaf in leaves)})$"


def _settings(config: RunConfig):
    from models.limits import Limits
    from models.settings import Settings

    # The app's WORKBENCH_LIMIT_* variables reach this process too: it applies the limits the app checked with.
    return Settings(cache_dir=Path(config.cache_dir), models_dir=Path(config.models_dir) if config.models_dir else None,
                    offline=config.offline, offline_reason="the run config says offline" if config.offline else "",
                    device=config.device, limits=Limits.from_env())


def load_base(config: RunConfig, catalog, settings, device: str):
    """(model, processor, is_vlm, precision): the base model through the same Auto* classes as the app."""
    import transformers

    from finetune.data import load_text_processor
    from models.families import resolve_location
    from models.quantization import choose, fit_4bit_for_cpu, transformers_kwargs

    spec = catalog.get(config.base_model)
    requested = {"nf4": "nf4", "int8": "int8"}.get(config.quantization, "bf16" if device == "cuda" else "fp32")
    precision = choose(spec, device, requested)
    kwargs = transformers_kwargs(precision)
    if "device_map" in kwargs and device == "cuda":
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}  # one GPU per accelerate process
    location = resolve_location(spec, settings)
    processor, is_vlm = load_text_processor(config.base_model, settings, catalog)
    auto = transformers.AutoModelForImageTextToText if is_vlm else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(location, trust_remote_code=spec.trust_remote_code, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    elif device == "cpu":
        fit_4bit_for_cpu(model, training=True)
    return model, processor, is_vlm, precision


def add_lora(model, config: RunConfig, precision):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpointing = {"use_reentrant": False}
    if precision.is_bnb:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
                      target_modules=target_modules_pattern(model, config.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


class Collator:
    """Right-pads ids (pad token) and labels (-100); batches the processor's image inputs.

    Image inputs differ by architecture: ``pixel_values`` per image (LLaVA), per tile with
    ``pixel_attention_mask`` (Idefics3: the tile count varies, all-zero tiles are padding), flattened
    patches with ``image_grid_thw`` (Qwen2-VL), tiles with aspect-ratio ids and a per-token
    ``cross_attention_mask`` (Mllama). ``SEQUENCE_INPUTS`` are cut and padded like the ids.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        import torch

        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            length = len(item["input_ids"])
            ids[row, :length] = torch.tensor(item["input_ids"])
            labels[row, :length] = torch.tensor(item["labels"])
            mask[row, :length] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        with_images = [item for item in items if item.get("image_inputs")]
        for key in with_images[0]["image_inputs"] if with_images else ():
            pairs = [(item["image_inputs"][key], item) for item in with_images
                     if item["image_inputs"].get(key) is not None]
            if key in SEQUENCE_INPUTS:
                values = [_pad_dim(value[:, :len(item["input_ids"])], 1, width) for value, item in pairs]
            else:
                values = [value for value, _ in pairs]
            if key not in SEQUENCE_INPUTS and any(value.shape[1:] != values[0].shape[1:] for value in values):
                values = [_pad_to(value, values) for value in values]
            batch[key] = torch.cat(values)
        return batch


def _pad_dim(value, dim: int, size: int):
    """``value`` zero-padded at the end of ``dim`` to ``size``."""
    import torch.nn.functional as F

    missing = size - value.shape[dim]
    if missing <= 0:
        return value
    pad = [0, 0] * (value.dim() - dim - 1) + [0, missing]
    return F.pad(value, pad)


def _pad_to(value, values):
    """``value`` zero-padded after its first dimension to the largest shape among ``values``."""
    for dim in range(1, value.dim()):
        value = _pad_dim(value, dim, max(other.shape[dim] for other in values))
    return value


def stop_agreed(requested: bool) -> bool:
    """Whether any process was asked to stop: under DDP every rank must stop at the same step, or the
    others would wait forever in the next gradient all-reduce."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return requested
    import torch

    flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def make_callbacks(log: RunLog, stopper: GracefulStop):
    from transformers import TrainerCallback

    class LogCallback(TrainerCallback):
        """Writes step/eval/checkpoint records with tokens/s and ETA; turns a stop request into save+stop."""

        def __init__(self):
            self.first_step_time = None
            self.first_step = 0
            self.last_time = None
            self.last_tokens = 0

        def on_train_begin(self, args, state, control, **kwargs):
            log.write("start", step=state.global_step, total_steps=state.max_steps, epochs=args.num_train_epochs,
                      rss_mb=current_rss_mb(), processes=args.world_size)
            self.last_time = time.time()
            self.last_tokens = state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            now = time.time()
            if "loss" in logs:
                tokens = state.num_input_tokens_seen
                tokens_per_s = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
                self.last_time, self.last_tokens = now, tokens
                if self.first_step_time is None:
                    self.first_step_time, self.first_step = now, state.global_step
                done = state.global_step - self.first_step
                eta = (now - self.first_step_time) / done * (state.max_steps - state.global_step) if done else None
                log.write("step", step=state.global_step, total_steps=state.max_steps, loss=logs["loss"],
                          rss_mb=current_rss_mb(),
                          learning_rate=logs.get("learning_rate"), epoch=logs.get("epoch"),
                          grad_norm=logs.get("grad_norm"), tokens_per_s=round(tokens_per_s, 1),
                          eta_s=None if eta is None else round(eta, 1))
            if "eval_loss" in logs:
                log.write("eval", step=state.global_step, eval_loss=logs["eval_loss"])

        def on_save(self, args, state, control, **kwargs):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            log.write("checkpoint", step=state.global_step, path=str(path))

        def on_step_end(self, args, state, control, **kwargs):
            if stop_agreed(stopper.requested) and not control.should_training_stop:
                log.write("stopping", step=state.global_step, signal=stopper.signal_name)
                control.should_training_stop = True
                control.should_save = True
            if state.global_step >= state.max_steps:
                control.should_save = True  # the last step's checkpoint is where "train more" continues
            return control

    return [LogCallback()]


def release_host_memory() -> None:
    """Hand freed heap pages back to the OS after loading: quantizing reads the full-precision
    checkpoint first, and glibc would otherwise keep that memory in the process for the whole run."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): nothing to trim


def current_rss_mb() -> float | None:
    """Resident memory of this process now (Linux), in MB."""
    try:
        with open("/proc/self/statm") as handle:
            return round(int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return checkpoints[-1] if checkpoints else None


def model_card(config: RunConfig, metrics: dict, spec) -> str:
    lines = [
        f"# {config.adapter_name}",
        "",
        f"A LoRA adapter for **{config.base_model}** trained with the Multimodal Workbench (QLoRA, "
        f"{config.quantization} base, peft).",
        "",
        f"- base model: `{config.base_model}` ({spec.license})",
        f"- trained: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- steps: {metrics.get('steps')}, final train loss: {metrics.get('train_loss')}, "
        f"eval loss: {metrics.get('eval_loss')}",
        f"- rows: {metrics.get('train_rows')} train / {metrics.get('validation_rows')} validation "
        f"({metrics.get('format')} format)",
        f"- LoRA r={config.lora_r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}, "
        f"targets={config.target_modules}",
        f"- learning rate {config.learning_rate}, scheduler {config.scheduler}, batch {config.batch_size} x "
        f"accumulation {config.grad_accum}, max length {config.max_length}, seed {config.seed}",
        "",
        "Load it in the workbench's Image VQA or Voice assistant tab (their adapter menus), or with "
        "`model.load_adapter(folder)` on the base model.",
    ]
    if spec.source == "offline":
        lines += ["", "The base model has random weights (smoke-test model); this adapter is not useful for real work."]
    return "\n".join(lines) + "\n"


def save_adapter(model, processor, config: RunConfig, metrics: dict, spec, adapters_dir: Path) -> Path:
    """Write the adapter folder atomically: PEFT files, workbench.json, README.md, run config."""
    adapters_dir.mkdir(parents=True, exist_ok=True)
    target = adapters_dir / config.adapter_name
    tmp = adapters_dir / f".{config.adapter_name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "workbench.json").write_text(json.dumps({"base_model": config.base_model, **metrics,
                                                    "config": config.training_dict()}, indent=2))
    (tmp / "README.md").write_text(model_card(config, metrics, spec), encoding="utf-8")
    (tmp / "training_config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def training_arguments(config: RunConfig, run_dir: Path, device: str, precision, evaluate: bool):
    """The Trainer's arguments for this config: log every step, save and evaluate as the config asks."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.scheduler,
        seed=config.seed,
        logging_steps=1,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=config.eval_steps if evaluate else None,
        save_strategy="steps" if config.save_steps > 0 else "no",
        save_steps=config.save_steps if config.save_steps > 0 else 500,
        save_total_limit=3,
        report_to=[],
        disable_tqdm=True,
        use_cpu=device == "cpu",
        bf16=device == "cuda" and torch.cuda.is_bf16_supported() and precision.name in ("nf4", "bf16"),
        dataloader_num_workers=0,
        # several processes (torchrun): gloo on CPU; LoRA leaves most parameters frozen, none unused
        ddp_backend="gloo" if device == "cpu" and config.processes > 1 else None,
        ddp_find_unused_parameters=False if config.processes > 1 else None,
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
    )


def run(config: RunConfig, run_dir: Path, log: RunLog, stopper: GracefulStop, resume: str = "") -> dict:
    """Train; returns the ``done`` record's fields."""
    import torch
    from transformers import Trainer, set_seed

    from finetune.data import encode_all, parse_dataset, prepare_dataset, require_valid, split_examples
    from models.catalog import Catalog
    from models.memory import resolve_device

    catalog = Catalog.load(Path(config.models_file) if config.models_file else None)
    config.validate(catalog)
    settings = _settings(config)
    device = resolve_device(config.device)
    set_seed(config.seed)

    # 1. Data: read and check every row again; the file may have changed since the UI validated it
    dataset_path = Path(config.dataset)
    if dataset_path.suffix.lower() == ".zip":
        dataset_path = prepare_dataset(dataset_path, run_dir / "data", settings.limits)
    parsed = parse_dataset(dataset_path, settings.limits)
    require_valid(parsed)
    train_rows, val_rows = split_examples(parsed.examples, config.val_fraction, config.seed)

    # 2. Model: quantized base, LoRA on the language model's linear layers
    log.write("loading", base_model=config.base_model, quantization=config.quantization, device=device)
    model, processor, is_vlm, precision = load_base(config, catalog, settings, device)
    release_host_memory()
    if stopper.requested:
        return {"state": "stopped", "adapter": None, "checkpoint": None, "metrics": {"steps": 0}}
    train_items = encode_all(train_rows, processor, config.max_length, is_vlm, settings.limits)
    val_items = encode_all(val_rows, processor, config.max_length, is_vlm, settings.limits) if val_rows else []
    model = add_lora(model, config, precision)
    trainable, total = model.get_nb_trainable_parameters()
    log.write("model", weights_mb=round(model.get_memory_footprint() / 1024**2, 2), rss_mb=current_rss_mb(),
              trainable_params=trainable, all_params=total, precision=precision.name)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # 3. Trainer
    evaluate = bool(val_items) and config.eval_steps > 0
    args = training_arguments(config, run_dir, device, precision, evaluate)
    trainer = Trainer(model=model, args=args, train_dataset=train_items, eval_dataset=val_items or None,
                      data_collator=Collator(pad_id), callbacks=make_callbacks(log, stopper))
    checkpoint = None
    if resume:
        checkpoint = latest_checkpoint(run_dir) if resume == "latest" else Path(resume)
        if checkpoint is None or not checkpoint.is_dir():
            raise InvalidRequest("no checkpoint to resume from in this run's checkpoints folder")
        log.write("resuming", checkpoint=str(checkpoint))
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    # 4. Output
    metrics = {"steps": trainer.state.global_step, "train_loss": round(result.training_loss, 6),
               "train_rows": len(train_items), "validation_rows": len(val_items), "format": parsed.format,
               "runtime_s": round(result.metrics.get("train_runtime", 0.0), 2)}
    if torch.cuda.is_available():
        metrics["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 1024**2, 1)
    if val_items and not stopper.requested:
        metrics["eval_loss"] = round(trainer.evaluate()["eval_loss"], 6)
        log.write("eval", step=trainer.state.global_step, eval_loss=metrics["eval_loss"])
    state = "stopped" if stopper.requested else "completed"
    adapter = None
    if trainer.is_world_process_zero():
        spec = catalog.get(config.base_model)
        adapter = save_adapter(model, processor, config, {**metrics, "state": state}, spec,
                               settings.adapters_dir)
    last = latest_checkpoint(run_dir)
    return {"state": state, "adapter": str(adapter) if adapter else None,
            "checkpoint": str(last) if last else None, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="run config YAML (see finetune/config.py)")
    parser.add_argument("--resume", default="", help="'latest' or a checkpoint folder to resume from")
    args = parser.parse_args(argv)
    # Library deprecation notices (transformers 5 renamed gradient checkpointing, for one) would fill the
    # tab's "last log lines" with noise that users cannot act on; real warnings still come through.
    warnings.filterwarnings("ignore", category=FutureWarning)
    stopper = GracefulStop()
    stopper.install()
    try:
        config = RunConfig.load(Path(args.config))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(config.run_dir) if config.run_dir else Path(args.config).resolve().parent
    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir / LOG_NAME, enabled=int(os.environ.get("RANK", "0")) == 0)
    log.write("process", pid=os.getpid(), argv=sys.argv, resume=args.resume or config.resume_from)
    try:
        done = run(config, run_dir, log, stopper, resume=args.resume or config.resume_from)
    except MemoryError:
        log.write("error", message="out of memory (host RAM); lower batch size or max length")
        return 1
    except Exception as exc:  # noqa: BLE001 - any failure ends the run; the log tells the UI why
        message = str(exc) or exc.__class__.__name__
        if exc.__class__.__name__ == "OutOfMemoryError":
            message = f"out of GPU memory; lower batch size or max length, or enable gradient checkpointing ({message})"
        log.write("error", message=message, kind=exc.__class__.__name__)
        traceback.print_exc()
        return 1
    log.write("done", **done)
    print(json.dumps(done), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
