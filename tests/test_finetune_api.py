"""The fine-tuning endpoints through gradio_client on the session app: validate, start, status, stop."""

from __future__ import annotations

import json
import time

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

ROWS = [{"prompt": "What is the capital of France?", "response": "Paris."},
        {"prompt": "Say hello.", "response": "Hello!"},
        {"prompt": "Name a color.", "response": "Blue."}]


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_validate_reports_broken_lines(client, tmp_path):
    broken = write_jsonl(tmp_path / "broken.jsonl", [ROWS[0], '{"prompt": ', {"prompt": "x", "response": 3},
                                                      ROWS[0], {"messages": []}])
    report = client.predict(handle_file(str(broken)), "tiny-chat", 256, api_name="/finetune_validate")
    assert report["ok"] is False and report["valid_rows"] == 1
    assert [(p["line"], p["message"].split(" (")[0]) for p in report["problems"]] == [
        (2, "invalid JSON"), (3, "field 'response' must be a string, got int"), (4, "duplicate of line 1"),
        (5, "a chat row starts here, but line 1 made this an instruction dataset; formats cannot be mixed in one "
            "file: keep one format per file")]


def test_validate_good_dataset_has_token_stats_and_preview(client, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    report = client.predict(handle_file(str(good)), "tiny-chat", 256, api_name="/finetune_validate")
    assert report["ok"] and report["format"] == "instruction" and report["valid_rows"] == 3
    assert report["tokens"]["max"] >= report["tokens"]["min"] > 0 and report["tokens"]["truncated_rows"] == 0
    assert report["preview"][0] == {"line": 1, "prompt": ROWS[0]["prompt"], "answer": "Paris.", "image": None}
    assert report["split"] == {"train": 2, "validation": 1, "seed": 42, "val_fraction": 0.1}


def test_validate_reads_utf16_and_refuses_json_arrays(client, tmp_path):
    utf16 = tmp_path / "excel.jsonl"
    utf16.write_bytes("\r\n".join(json.dumps(row) for row in ROWS).encode("utf-16"))  # with a byte-order mark
    report = client.predict(handle_file(str(utf16)), "tiny-chat", 256, api_name="/finetune_validate")
    assert report["ok"] and report["valid_rows"] == 3 and report["problems"] == []
    array = tmp_path / "export.json"
    array.write_text(json.dumps(ROWS, indent=2))
    with pytest.raises(AppError, match="JSON array of rows"):
        client.predict(handle_file(str(array)), "tiny-chat", 256, api_name="/finetune_validate")


@pytest.mark.parametrize("config, words", [
    ({"lora_r": 0}, "lora_r"),
    ("learning_rate: .nan", "NaN"),
    ({"batch_size": 0}, "batch_size"),
    ('{"base_model": "nope"}', "Unknown model"),
    ({"max_length": 9}, "below the prompt"),
])
def test_start_refuses_bad_configs(client, tmp_path, config, words):
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    with pytest.raises(AppError, match=words):
        client.predict(handle_file(str(good)), config, api_name="/finetune_start")


def test_start_follow_and_adapter_listed(client, app_server, tmp_path):
    from tabs.common import adapter_choices

    settings = app_server[2]
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    config = "base_model: tiny-chat\nadapter_name: api-run\nmax_steps: 3\nbatch_size: 2\nlearning_rate: 0.01\n" \
             "gradient_checkpointing: false\nval_fraction: 0\n"
    run_id = client.predict(handle_file(str(good)), config, api_name="/finetune_start")
    status = follow(client, run_id)
    assert status["state"] == "completed", status
    assert status["step"] == status["total"] == 3 and len(status["loss_history"]) == 3
    assert status["adapter"].endswith("api-run") and "api-run" in adapter_choices(settings)
    assert client.predict(run_id, api_name="/finetune_stop")["state"] == "completed"  # nothing left to stop
    listed = {run["run_id"]: run for run in client.predict(api_name="/finetune_runs")}
    assert listed[run_id]["state"] == "completed" and listed[run_id]["checkpoints"][-1] == "checkpoint-3"
    with pytest.raises(AppError, match="trained all its 3 steps"):  # a finished run is not restarted as is
        client.predict(run_id, "latest", 0, api_name="/finetune_resume")
    assert client.predict(run_id, "latest", 2, api_name="/finetune_resume") == run_id  # train 2 more steps
    status = follow(client, run_id)
    assert status["state"] == "completed" and status["step"] == status["total"] == 5, status
    for wrong in ("../../etc", f"../runs/{run_id}", f"./{run_id}"):
        with pytest.raises(AppError, match="run_id must be a run id"):
            client.predict(wrong, api_name="/finetune_status")
        with pytest.raises(AppError, match="run_id must be a run id"):
            client.predict(wrong, api_name="/finetune_stop")


def follow(client, run_id: str, seconds: float = 150) -> dict:
    """/finetune_status until the run has ended (or ``seconds`` have passed)."""
    deadline = time.time() + seconds
    while True:
        status = client.predict(run_id, api_name="/finetune_status")
        if status["state"] in ("completed", "stopped", "failed") or time.time() > deadline:
            return status
        time.sleep(0.5)


def test_tab_helpers_round_trip_the_form_and_draw_progress(tmp_path):
    from finetune.config import RunConfig
    from tabs import finetune as tab

    config = RunConfig(base_model="tiny-vlm", target_modules=["q_proj", "v_proj"], max_steps=7)
    values = tab.config_to_form(config)
    assert values[tab.FORM_FIELDS.index("target_modules")] == "q_proj, v_proj"
    values[tab.FORM_FIELDS.index("lora_r")] = 8.0  # gr.Number sends floats
    back = tab.form_to_config(*values)
    assert back.lora_r == 8 and isinstance(back.lora_r, int) and back.target_modules == ["q_proj", "v_proj"]
    assert "dataset" not in tab.config_yaml(back) and "max_steps: 7" in tab.config_yaml(back)
    status = {"run_id": "r1", "state": "running", "step": 5, "total": 20, "loss": 1.5, "tokens_per_s": 300.0,
              "eta_s": 12.0, "loss_history": [{"step": 5, "loss": 1.5}], "eval_history": [{"step": 5, "eval_loss": 2}]}
    assert "width:25.0%" in tab.progress_html(status) and "ETA 12 s" in tab.progress_html(status)
    assert tab.loss_frame(status)["series"].tolist() == ["train", "eval"]
    assert tab.loss_frame({"loss_history": [], "eval_history": []}) is None  # not an empty frame: see loss_frame
    failed = {**status, "state": "failed", "message": "out of memory"}
    assert "failed: out of memory" in tab.status_message(failed)
    outside = tmp_path / "secret.jsonl"
    outside.write_text("{}\n")
    with pytest.raises(ValueError, match="uploaded to this app"):
        tab.upload_path({"path": str(outside)})
