"""Training on several processes: a 2-process CPU run (DDP over gloo, through torchrun) of a tiny-chat LoRA."""

from __future__ import annotations

import json

import pytest
from test_finetune_train import FAST, MEMORISE, finished, wait_for, write_jsonl

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_two_processes_train_one_adapter_and_one_log(tmp_path, runner, manager, settings, quantization):
    from helpers import chat

    rows = [{"prompt": f"{row['prompt']} ({index})", "response": row["response"]}
            for index in range(4) for row in MEMORISE]  # 16 distinct rows: 8 per process per epoch
    dataset = write_jsonl(tmp_path / "memorise.jsonl", rows)
    config = {**FAST, "adapter_name": f"ddp-{quantization}", "quantization": quantization, "processes": 2,
              "max_steps": 4, "batch_size": 2}
    run_id = runner.start(str(dataset), config)
    status = wait_for(runner, run_id, finished, timeout=300)
    assert status["state"] == "completed", status["message"] + "\n".join(status["log_tail"])
    run_dir = settings.runs_dir / run_id
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    events = [record["event"] for record in records]
    # Exactly one log, written by rank 0 only: one process record, one start, one done, one record per step
    assert events.count("process") == 1 and events.count("start") == 1 and events.count("done") == 1
    steps = [record["step"] for record in records if record["event"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 4
    start = next(record for record in records if record["event"] == "start")
    assert start["processes"] == 2, "the trainer ran on two processes"
    assert status["command"].startswith("torchrun --standalone --nproc_per_node 2")
    adapters = [p for p in settings.adapters_dir.iterdir() if (p / "adapter_config.json").is_file()]
    assert [p.name for p in adapters] == [f"ddp-{quantization}"], "exactly one adapter"
    assert not list(settings.adapters_dir.glob(".*")), "no half-written adapter folders left by other ranks"
    assert chat(manager, settings, "What is the capital of France?", model="tiny-chat", adapter=f"ddp-{quantization}",
                temperature=0.0, max_new_tokens=8, system_prompt="")
