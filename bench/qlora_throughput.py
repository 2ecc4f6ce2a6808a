"""QLoRA throughput: the workbench's training process vs a plain peft + Trainer script, same run.

Both train the same 4-bit NF4 base (tiny-chat by default) with the same LoRA, data, batch size and
steps, each in its own process. Steps/s come from the per-step timestamps each process logs,
from step ``--skip`` on: process start-up (imports, model load) dominates on tiny models and is
excluded on purpose. Peak RSS (from wait4) compares a 4-bit base with a full-precision one,
on smollm2-135m when its package is installed (tiny-chat is too small to show a difference).

    .venv/bin/python bench/qlora_throughput.py [--steps 40] [--model tiny-chat] [--memory-model smollm2-135m]

Prints ratios; never fails on a slow machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ROWS = [{"prompt": f"Question number {i}: what is {i} plus {i}?", "response": f"The answer is {2 * i}."}
        for i in range(16)]

# The baseline: what someone would write by hand with transformers + peft, no workbench code.
PLAIN_SCRIPT = r'''
import json, sys, time
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainerCallback,
                          TrainingArguments)

location, data_path, log_path, steps, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
tokenizer = AutoTokenizer.from_pretrained(location)
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(location, quantization_config=quant, device_map="cpu",
                                             dtype=torch.float32)
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
items = []
for line in open(data_path):
    row = json.loads(line)
    prompt = [{"role": "user", "content": row["prompt"]}]
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": row["response"]}], tokenize=False)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"][:128]
    items.append({"input_ids": ids, "labels": [-100] * len(head_ids) + ids[len(head_ids):]})

def collate(batch_items):
    width = max(len(i["input_ids"]) for i in batch_items)
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([i["input_ids"] + [pad] * (width - len(i["input_ids"])) for i in batch_items]),
            "labels": torch.tensor([i["labels"] + [-100] * (width - len(i["labels"])) for i in batch_items]),
            "attention_mask": torch.tensor([[1] * len(i["input_ids"]) + [0] * (width - len(i["input_ids"]))
                                            for i in batch_items])}

class Times(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        with open(log_path, "a") as handle:
            handle.write(json.dumps({"event": "step", "step": state.global_step, "time": time.time()}) + "\n")

args = TrainingArguments(output_dir=log_path + ".out", per_device_train_batch_size=batch, max_steps=steps,
                         learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                         report_to=[], disable_tqdm=True, use_cpu=True, remove_unused_columns=False, seed=42)
Trainer(model=model, args=args, train_dataset=items, data_collator=collate, callbacks=[Times()]).train()
'''


def run_process(command: list[str], env: dict) -> tuple[float, int]:
    """(wall seconds, peak RSS in MB) of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed ({process.returncode}):\n{stderr[-3000:]}")
    return time.perf_counter() - started, usage.ru_maxrss // 1024


def step_times(log_path: Path, skip: int) -> list[float]:
    """Seconds per optimizer step from step ``skip`` on, from the per-step timestamps in a log."""
    times = {}
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "step":
            times[record["step"]] = record["time"]
    steps = sorted(step for step in times if step >= skip)
    return [times[b] - times[a] for a, b in zip(steps, steps[1:], strict=False)]


def steps_per_second(samples: list[float]) -> float:
    """1 / the lower-quartile step time: other processes on shared cores only ever add time, in bursts."""
    ordered = sorted(samples)
    return 1.0 / ordered[len(ordered) // 4]


def log_records(log_path: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, log_path.read_text().splitlines()) if r.get("event") == event]


def workbench_config(work: Path, name: str, model: str, steps: int, batch: int, quantization: str,
                     settings) -> Path:
    from finetune.config import RunConfig

    config = RunConfig(base_model=model, adapter_name=name, quantization=quantization, lora_r=8, lora_alpha=16,
                       lora_dropout=0.0, learning_rate=1e-3, max_steps=steps, batch_size=batch, max_length=128,
                       scheduler="constant", gradient_checkpointing=False, val_fraction=0.0, save_steps=0,
                       dataset=str(work / "data.jsonl"), run_dir=str(work / name), cache_dir=str(settings.cache_dir),
                       models_dir=str(settings.offline_models_dir), offline=True, device="cpu")
    return config.save(work / name / "config.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-chat")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--skip", type=int, default=5, help="steps excluded as warm-up")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each side counts")
    parser.add_argument("--memory-model", default="smollm2-135m", help="'' to skip the memory comparison")
    args = parser.parse_args()

    import importlib.util

    from models.catalog import Catalog
    from models.families import resolve_location
    from models.settings import Settings

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        work = Path(tmp)
        settings = Settings(cache_dir=work / "cache", models_dir=ROOT / ".cache" / "offline-models", offline=True,
                            device="cpu")
        catalog = Catalog.load()
        location = resolve_location(catalog.get(args.model), settings)
        (work / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
        (work / "plain.py").write_text(PLAIN_SCRIPT)

        # 1. Throughput: the two runs alternate (A B, then B A) so that drift on shared cores hits both
        def workbench(round_index: int) -> tuple[list[float], float]:
            config = workbench_config(work, f"workbench-{round_index}", args.model, args.steps, args.batch, "nf4",
                                      settings)
            wall, _ = run_process([sys.executable, "-m", "finetune.train", str(config)], env)
            return step_times(work / f"workbench-{round_index}" / "log.jsonl", args.skip), wall

        def plain(round_index: int) -> tuple[list[float], float]:
            plain_log = work / f"plain-{round_index}.jsonl"
            wall, _ = run_process([sys.executable, str(work / "plain.py"), location, str(work / "data.jsonl"),
                                   str(plain_log), str(args.steps), str(args.batch)], env)
            return step_times(plain_log, args.skip), wall

        results = {"workbench": [], "plain": []}
        for round_index in range(args.rounds):
            order = [("workbench", workbench), ("plain", plain)]
            for name, run in order if round_index % 2 == 0 else order[::-1]:
                results[name].append(run(round_index))
        if args.rounds:
            print(f"model {args.model}, {args.steps} steps, batch {args.batch}, {args.rounds} alternating round(s); "
                  f"steps/s = 1 / lower-quartile step time over all rounds, from step {args.skip} on (process "
                  "start-up excluded: it dominates on tiny models)")
            rates = {}
            for name in ("workbench", "plain"):
                samples = [t for times, _ in results[name] for t in times]
                rates[name] = steps_per_second(samples)
                per_round = ", ".join(f"{steps_per_second(times):.1f}" for times, _ in results[name])
                walls = ", ".join(f"{wall:.1f}" for _, wall in results[name])
                print(f"{name}: {rates[name]:.2f} steps/s (per round {per_round}; process wall s {walls})")
            print(f"throughput ratio (workbench / plain): {rates['workbench'] / rates['plain']:.2f} (goal >= 0.95)")

        # 2. Memory: 4-bit base vs full-precision base, two training steps each
        memory_model = args.memory_model
        if memory_model and catalog.get(memory_model).source == "package":
            package = catalog.get(memory_model).location.partition(":")[0]
            if importlib.util.find_spec(package) is None:
                print(f"memory: {memory_model} needs the {package} package; using {args.model} instead")
                memory_model = args.model
        if memory_model:
            figures = {}
            for quantization in ("nf4", "none"):
                name = f"mem-{quantization}"
                config = workbench_config(work, name, memory_model, 2, 2, quantization, settings)
                _, peak = run_process([sys.executable, "-m", "finetune.train", str(config)], env)
                model = log_records(work / name / "log.jsonl", "model")[0]
                training = max(r["rss_mb"] for r in log_records(work / name / "log.jsonl", "step"))
                figures[quantization] = (peak, training, model["weights_mb"])
                done = log_records(work / name / "log.jsonl", "done")[0]
                if "cuda_peak_mb" in done["metrics"]:
                    print(f"{memory_model} {quantization}: CUDA peak allocated {done['metrics']['cuda_peak_mb']} MB")
            for quantization, label in (("nf4", "4-bit NF4 base"), ("none", "full-precision fp32 base")):
                peak, training, weights = figures[quantization]
                print(f"{memory_model} {label}: weights {weights:.0f} MB, RSS while training {training:.0f} MB, "
                      f"peak RSS incl. loading {peak} MB")
            print(f"memory ratio 4-bit / full precision: weights {figures['nf4'][2] / figures['none'][2]:.2f}, "
                  f"RSS while training {figures['nf4'][1] / figures['none'][1]:.2f}, "
                  f"peak RSS {figures['nf4'][0] / figures['none'][0]:.2f} (the peak includes reading the fp32 "
                  "checkpoint before quantizing)")


if __name__ == "__main__":
    main()
