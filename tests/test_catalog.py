"""The model catalog: required entries, user files, validation, safe defaults."""

from __future__ import annotations

import pytest

from models.catalog import FAMILIES, TASKS, Catalog, UnknownModelError

OFFLINE_MODELS = {"tiny-vlm": "vqa", "tiny-sd": "text-to-image", "tiny-whisper": "speech-to-text",
                  "tiny-chat": "chat", "smollm2-135m": "chat", "tiny-tts": "text-to-speech"}
HUB_MODELS = ["HuggingFaceTB/SmolVLM-256M-Instruct", "llava-hf/llava-1.5-7b-hf", "stabilityai/sd-turbo",
              "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0",
              "openai/whisper-tiny", "openai/whisper-large-v3-turbo", "Qwen/Qwen2.5-0.5B-Instruct",
              "tts_models/en/ljspeech/vits", "tts_models/multilingual/multi-dataset/xtts_v2"]


def write(tmp_path, text: str):
    path = tmp_path / "models.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_required_models_are_listed(catalog):
    for model_id, task in OFFLINE_MODELS.items():
        spec = catalog.get(model_id)
        assert spec.task == task and spec.works_offline, model_id
    for model_id in HUB_MODELS:
        assert model_id in catalog
        assert catalog.get(model_id).source in ("hub", "coqui")


def test_every_task_has_offline_and_online_models(catalog):
    for task in TASKS:
        specs = catalog.for_task(task)
        assert any(s.works_offline for s in specs), task
        assert any(not s.works_offline for s in specs), task
    assert {spec.family for spec in catalog} <= set(FAMILIES)


def test_offline_defaults_per_task(catalog):
    for task in TASKS:
        offline_default = catalog.get(catalog.default_for(task, offline=True))
        online_default = catalog.get(catalog.default_for(task, offline=False))
        assert offline_default.works_offline, task
        assert not online_default.works_offline, task
    assert catalog.default_for("vqa", offline=True) == "tiny-vlm"
    assert catalog.default_for("text-to-image", offline=True) == "tiny-sd"
    # Real packaged models, not the random tiny ones, where a package ships them
    assert catalog.default_for("speech-to-text", offline=True) == "whisper-tiny.en"
    assert catalog.default_for("text-to-speech", offline=True) == "piper-joe"
    assert catalog.default_for("chat", offline=True) == "smollm2-135m"


def test_tiny_models_are_labelled_as_random(catalog):
    assert "random weights" in catalog.get("tiny-sd").label
    assert catalog.get("smollm2-135m").label == "smollm2-135m"


def test_trust_remote_code_is_off_by_default(catalog, tmp_path):
    assert not any(spec.trust_remote_code for spec in catalog)
    path = write(tmp_path, "models:\n"
                 "  - {id: my/custom-vlm, task: vqa, family: vlm, source: hub, trust_remote_code: true}\n"
                 "  - {id: my/plain-vlm, task: vqa, family: vlm, source: hub}\n")
    user = Catalog.load(path)
    assert user.get("my/custom-vlm").trust_remote_code is True  # only an explicit opt-in
    assert user.get("my/plain-vlm").trust_remote_code is False


def test_user_file_adds_and_overrides(tmp_path, catalog):
    path = write(tmp_path, "models:\n"
                 "  - {id: my/whisper, task: speech-to-text, family: asr, source: local, repo: /models/w,"
                 " params_b: 0.04}\n"
                 "  - {id: tiny-chat, task: chat, family: chat, source: offline, params_b: 0.001, notes: mine}\n")
    user = Catalog.load(path)
    assert "my/whisper" in user and "my/whisper" not in catalog
    spec = user.get("my/whisper")
    assert spec.location == "/models/w" and spec.works_offline
    assert user.get("tiny-chat").notes == "mine"
    assert len(user.ids("chat")) == len(catalog.ids("chat"))  # overridden, not duplicated
    assert set(catalog.ids("vqa")) <= set(user.ids("vqa"))


def test_plain_list_file_is_accepted(tmp_path):
    path = write(tmp_path, "- {id: a/b, task: chat, family: chat, source: hub}\n")
    assert "a/b" in Catalog.load(path)


@pytest.mark.parametrize("entry, message", [
    ("{id: x, task: chat, family: chat, source: hub, colour: red}", "unknown keys"),
    ("{id: x, task: dance, family: chat, source: hub}", "task must be one of"),
    ("{id: x, task: chat, family: gpt, source: hub}", "family must be one of"),
    ("{id: x, task: chat, family: chat, source: ftp}", "source must be one of"),
    ("{task: chat, family: chat, source: hub}", "missing 'id'"),
    ("{id: x, family: chat, source: hub}", "missing 'task'"),
    ("{id: x, task: chat, family: chat, source: hub, quant: {cuda: int3}}", "quant for cuda"),
    ("just-a-string", "must be a mapping"),
])
def test_bad_entries_are_rejected_clearly(tmp_path, entry, message):
    path = write(tmp_path, f"models:\n  - {entry}\n")
    with pytest.raises(ValueError, match=message) as excinfo:
        Catalog.load(path)
    assert str(path) in str(excinfo.value)  # the message says which file to fix


def test_unreadable_files_are_rejected_clearly(tmp_path):
    with pytest.raises(ValueError, match="cannot read model file"):
        Catalog.load(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="cannot read model file"):
        Catalog.load(write(tmp_path, "models: [unclosed\n"))
    with pytest.raises(ValueError, match="expected a list"):
        Catalog.load(write(tmp_path, "models: {id: x}\n"))


def test_unknown_model_lists_known_ones(catalog):
    with pytest.raises(UnknownModelError, match="Known models: .*tiny-chat"):
        catalog.get("no/such-model")
    with pytest.raises(UnknownModelError):
        catalog.default_for("painting", offline=True)


def test_quant_defaults_per_device(catalog):
    chat = catalog.get("Qwen/Qwen2.5-0.5B-Instruct")
    assert chat.default_quant("cuda") == "nf4"
    assert chat.default_quant("cpu") == "fp32"
    assert catalog.get("stabilityai/sd-turbo").default_quant("cuda") == "fp16"
    assert chat.estimate_bytes("nf4") < chat.estimate_bytes("fp16") < chat.estimate_bytes("fp32")
