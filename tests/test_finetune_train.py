"""QLoRA training for real on CPU: bitsandbytes 4-bit tiny models, in the training process.

Covers: loss goes down on a memorisation set, the adapter loads back through the manager and
changes the answer, stop with checkpoint and resume, a SIGKILLed run, one run at a time, tiny-vlm.
"""

from __future__ import annotations

import json
import os
import signal
import time
import zipfile

import pytest

from finetune.runner import ACTIVE_STATES, RunBusyError

MEMORISE = [
    {"prompt": "What is the capital of France?", "response": "Paris is the capital of France."},
    {"prompt": "Say hello.", "response": "Hello! How can I help you today?"},
    {"prompt": "What does LoRA train?", "response": "Small adapter matrices."},
    {"prompt": "Name a shape.", "response": "A green triangle."},
]
FAST = dict(base_model="tiny-chat", lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=1e-2,
            batch_size=4, scheduler="constant", gradient_checkpointing=False, val_fraction=0.0, max_length=128)
TIMEOUT = 150


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def wait_for(runner, run_id, condition, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = runner.status(run_id)
        if condition(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"timed out; last status: {json.dumps(status)[:2000]}")


def finished(status):
    return status["state"] not in ACTIVE_STATES


def test_tiny_chat_learns_and_its_adapter_changes_the_answer(tmp_path, runner, manager, settings):
    from models import adapters
    from models.families import chat
    from models.generation import GenerationParams

    with manager.use("tiny-chat"):
        pass
    dataset = write_jsonl(tmp_path / "memorise.jsonl", MEMORISE)
    run_id = runner.start(str(dataset), {**FAST, "adapter_name": "memorise", "max_steps": 20})
    # On the CPU, training and tiny-chat fit in the 4 GB budget together: nothing is unloaded, and the run says so
    assert manager.is_loaded("tiny-chat"), "training on the CPU unloads only what the memory budget requires"
    assert runner.status(run_id)["unloaded"] == []
    assert runner.status(run_id)["memory_note"].startswith("No model was unloaded: training on the CPU takes about")
    status = wait_for(runner, run_id, finished)
    assert status["state"] == "completed", status["message"] + "\n" + "\n".join(status["log_tail"])
    losses = [point["loss"] for point in status["loss_history"]]
    assert status["step"] == status["total"] == 20 and len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert status["tokens_per_s"] > 0 and status["eta_s"] == 0

    folder = adapters.resolve(settings.adapters_dir, "memorise", "tiny-chat")
    assert str(folder) == status["adapter"]
    card = json.loads((folder / "workbench.json").read_text())
    assert card["base_model"] == "tiny-chat" and card["steps"] == 20 and card["state"] == "completed"
    assert "tiny-chat" in (folder / "README.md").read_text()
    assert adapters.list_adapters(settings.adapters_dir, "tiny-chat") == ["memorise"]

    params = GenerationParams(max_new_tokens=8, temperature=0.0)
    messages = [{"role": "user", "content": MEMORISE[0]["prompt"]}]
    with manager.use("tiny-chat") as handle:
        inputs, _ = chat.encode(handle, messages, params)

        def greedy():
            out = handle.model.generate(**inputs, max_new_tokens=8, do_sample=False)
            return out[0, inputs["input_ids"].shape[-1]:].tolist()

        adapters.activate(handle.model, None)
        base = greedy()
        adapters.activate(handle.model, folder)
        tuned = greedy()
        adapters.activate(handle.model, None)
        assert greedy() == base
    assert tuned != base


def test_sigkill_is_reported_and_the_next_run_stops_gracefully_then_resumes(tmp_path, runner, settings):
    dataset = write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    killed = runner.start(str(dataset), {**FAST, "adapter_name": "killed", "max_steps": 100000})
    with pytest.raises(RunBusyError, match="one run at a time"):
        runner.start(str(dataset), {**FAST, "adapter_name": "second"})
    wait_for(runner, killed, lambda s: s["step"] >= 1)
    pid = runner._current.popen.pid
    os.killpg(pid, signal.SIGKILL)
    status = wait_for(runner, killed, finished)
    assert status["state"] == "failed" and "SIGKILL" in status["message"]
    assert status["loss_history"], "the steps before the crash stay visible"
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of the killed run is left behind

    # the next run works; stop it in the middle: it saves a checkpoint (and the adapter so far)
    run_id = runner.start(str(dataset), {**FAST, "adapter_name": "stopped", "max_steps": 30, "save_steps": 0})
    wait_for(runner, run_id, lambda s: s["step"] >= 2)
    runner.stop(run_id)
    status = wait_for(runner, run_id, finished)
    assert status["state"] == "stopped", status
    stopped_at = status["step"]
    assert 2 <= stopped_at < 30
    assert status["checkpoint"].endswith(f"checkpoint-{stopped_at}")
    assert (settings.adapters_dir / "stopped" / "adapter_config.json").is_file()
    records = [json.loads(line) for line in (settings.runs_dir / run_id / "log.jsonl").read_text().splitlines()]
    assert any(r["event"] == "stopping" and r["signal"] == "SIGTERM" for r in records)

    # resume from the checkpoint: it continues at the next step and finishes
    assert runner.resume(run_id) == run_id
    status = wait_for(runner, run_id, finished)
    assert status["state"] == "completed", status["message"] + "\n".join(status["log_tail"])
    steps = [p["step"] for p in status["loss_history"]]
    assert steps == list(range(1, 31)) and status["step"] == 30
    records = [json.loads(line) for line in (settings.runs_dir / run_id / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "start"] == [0, stopped_at]


def test_a_finished_run_trains_more_and_trains_again_from_a_chosen_checkpoint(tmp_path, runner, settings):
    from finetune.config import RunConfig

    dataset = write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    run_id = runner.start(str(dataset), {**FAST, "adapter_name": "more", "max_steps": 4, "save_steps": 2})
    status = wait_for(runner, run_id, finished)
    assert status["state"] == "completed", status["message"] + "\n".join(status["log_tail"])
    # the last step is saved too (save_steps 2 would have saved it anyway; see the next run): train more starts there
    assert [c["name"] for c in status["checkpoints"]] == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(ValueError, match="has trained all its 4 steps"):
        runner.resume(run_id)

    # train more: 2 steps past the end, from checkpoint-4; no ETA of the finished process is shown meanwhile
    assert runner.train_more(run_id, 2) == run_id
    relaunched = runner.status(run_id)
    assert relaunched["state"] in ("starting", "running") and relaunched["step"] == 4 and relaunched["total"] == 6
    assert relaunched["eta_s"] is None and relaunched["tokens_per_s"] is None
    status = wait_for(runner, run_id, finished)
    assert status["state"] == "completed" and status["step"] == status["total"] == 6, status["message"]
    assert [p["step"] for p in status["loss_history"]] == [1, 2, 3, 4, 5, 6]
    assert RunConfig.load(settings.runs_dir / run_id / "config.yaml").max_steps == 6
    card = json.loads((settings.adapters_dir / "more" / "workbench.json").read_text())
    assert card["steps"] == 6

    # train again from the chosen checkpoint-2, up to the run's 6 steps
    assert runner.resume(run_id, "checkpoint-2") == run_id
    assert runner.status(run_id)["step"] == 2 and [p["step"] for p in runner.status(run_id)["loss_history"]] == [1, 2]
    status = wait_for(runner, run_id, finished)
    assert status["state"] == "completed" and status["step"] == 6, status["message"]
    records = [json.loads(line) for line in (settings.runs_dir / run_id / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2, 3, 4, 5, 6, 3, 4, 5, 6]
    assert [(r["kind"], r["checkpoint"], r["from_step"], r["total_steps"]) for r in records
            if r["event"] == "launch"] == [("start", None, 0, 4), ("train_more", "checkpoint-4", 4, 6),
                                           ("resume", "checkpoint-2", 2, 6)]
    assert [r["step"] for r in records if r["event"] == "start"] == [0, 4, 2]


def test_a_run_without_save_steps_still_keeps_its_last_step(tmp_path, runner):
    run_id = runner.start(str(write_jsonl(tmp_path / "d.jsonl", MEMORISE)), {**FAST, "adapter_name": "last",
                                                                             "max_steps": 3, "save_steps": 0})
    status = wait_for(runner, run_id, finished)
    assert status["state"] == "completed" and [c["name"] for c in status["checkpoints"]] == ["checkpoint-3"]
    assert status["checkpoint"].endswith("checkpoint-3")


def test_bad_dataset_and_bad_config_start_nothing(tmp_path, runner, settings):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        runner.start(str(broken), FAST)
    good = write_jsonl(tmp_path / "good.jsonl", MEMORISE)
    with pytest.raises(ValueError, match="lora_r"):
        runner.start(str(good), {**FAST, "lora_r": 0})
    with pytest.raises(ValueError, match="below the prompt length"):
        runner.start(str(good), {**FAST, "max_length": 10})
    with pytest.raises(ValueError, match="Unknown model"):
        runner.start(str(good), {**FAST, "base_model": "gpt-17"})
    assert runner.active_run() is None
    assert not settings.runs_dir.exists() or list(settings.runs_dir.iterdir()) == []  # refused runs leave nothing


def test_tiny_vlm_trains_on_images_with_the_vision_tower_frozen(tmp_path, runner, settings, manager):
    from PIL import Image
    from safetensors import safe_open

    from models import adapters

    rows = []
    for index, (color, name) in enumerate([((255, 0, 0), "red"), ((0, 0, 255), "blue"), ((0, 255, 0), "green")]):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        Image.new("RGB", (40, 40), color).save(tmp_path / "imgs" / f"{index}.png")
        rows.append({"image": f"imgs/{index}.png", "question": "What color is this?", "answer": f"It is {name}."})
    write_jsonl(tmp_path / "colors.jsonl", rows)
    dataset = tmp_path / "colors.zip"
    with zipfile.ZipFile(dataset, "w") as bundle:
        for path in [tmp_path / "colors.jsonl", *sorted((tmp_path / "imgs").iterdir())]:
            bundle.write(path, path.relative_to(tmp_path))
    config = {**FAST, "base_model": "tiny-vlm", "adapter_name": "colors", "max_steps": 4, "batch_size": 2,
              "gradient_checkpointing": True, "val_fraction": 0.34, "eval_steps": 2}
    run_id = runner.start(str(dataset), config)
    status = wait_for(runner, run_id, finished)
    assert status["state"] == "completed", status["message"] + "\n".join(status["log_tail"])
    assert status["step"] == 4 and status["eval_history"] and status["metrics"]["format"] == "vqa"
    with safe_open(str(settings.adapters_dir / "colors" / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert names and all("language_model" in name for name in names), names

    # the adapter loads on the VQA family's model from the manager and changes its output
    folder = adapters.resolve(settings.adapters_dir, "colors", "tiny-vlm")
    with manager.use("tiny-vlm") as handle:
        image = Image.open(tmp_path / "imgs" / "0.png").convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is this?"}]}]
        prompt = handle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = handle.processor(images=[image], text=prompt, return_tensors="pt")
        adapters.activate(handle.model, None)
        base = handle.model(**inputs).logits
        adapters.activate(handle.model, folder)
        tuned = handle.model(**inputs).logits
        adapters.activate(handle.model, None)
    assert not base.allclose(tuned)


@pytest.mark.gpu
def test_cuda_qlora_uses_less_gpu_memory_than_a_full_precision_base(tmp_path):
    """On CUDA the 4-bit NF4 base must take clearly less GPU memory than bf16 while training."""
    import subprocess
    import sys

    from conftest import MODELS_DIR, ROOT

    from finetune.config import RunConfig

    write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    peaks = {}
    for quantization in ("nf4", "none"):
        run_dir = tmp_path / quantization
        config = RunConfig(base_model="smollm2-135m", adapter_name=f"gpu-{quantization}", quantization=quantization,
                           max_steps=3, batch_size=2, max_length=128, val_fraction=0.0,
                           dataset=str(tmp_path / "d.jsonl"), run_dir=str(run_dir), cache_dir=str(tmp_path / "cache"),
                           models_dir=str(MODELS_DIR), offline=True, device="cuda").save(run_dir / "config.yaml")
        subprocess.run([sys.executable, "-m", "finetune.train", str(config)], cwd=ROOT, check=True, timeout=600)
        done = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()][-1]
        assert done["event"] == "done" and done["state"] == "completed"
        peaks[quantization] = done["metrics"]["cuda_peak_mb"]
    assert peaks["nf4"] < 0.75 * peaks["none"], peaks
