"""Fine-tuning data and config: the broken-JSONL corpus, safe unzipping, split, label masking, YAML."""

from __future__ import annotations

import json
import math
import zipfile

import pytest

from finetune import data
from finetune.config import PRESETS, RunConfig, cli_command, parse_config, with_preset
from models.errors import TooLarge


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def png(path, color=(255, 0, 0)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


GOOD_INSTRUCTION = {"instruction": "Say hi.", "output": "Hi!"}

# name -> (lines, [(line number, words expected in its problem)])
BROKEN_CORPUS = {
    "invalid_json": ([GOOD_INSTRUCTION, '{"instruction": "x", "output": '], [(2, "invalid JSON")]),
    "not_an_object": ([GOOD_INSTRUCTION, "[1, 2]"], [(2, "expected a JSON object")]),
    "missing_field": ([GOOD_INSTRUCTION, {"instruction": "No answer here"}], [(2, "missing field 'output'")]),
    "empty_field": ([GOOD_INSTRUCTION, {"instruction": "Q", "output": "  "}], [(2, "field 'output' is empty")]),
    "wrong_type": ([GOOD_INSTRUCTION, {"instruction": "Q", "output": 42}], [(2, "must be a string, got int")]),
    "unknown_format": ([GOOD_INSTRUCTION, {"text": "free text"}], [(2, "unknown row format")]),
    "duplicate": ([GOOD_INSTRUCTION, {"instruction": "Other", "output": "x"}, GOOD_INSTRUCTION],
                  [(3, "duplicate of line 1")]),
    "mixed_formats": ([GOOD_INSTRUCTION, {"messages": [{"role": "user", "content": "a"},
                                                      {"role": "assistant", "content": "b"}]}],
                      [(2, "formats cannot be mixed")]),
    "bad_role": ([{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}],
                 [(1, "message 0 must be {'role': system | user | assistant")]),
    "no_assistant": ([{"messages": [{"role": "user", "content": "a"}]}], [(1, "no assistant turn")]),
    "empty_content": ([{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}]}],
                      [(1, "messages[0].content is empty")]),
    "messages_not_list": ([{"messages": "hello"}], [(1, "messages must be a list")]),
    "messages_empty": ([{"messages": []}], [(1, "messages must not be empty")]),
    "vqa_missing_image": ([{"image": "nowhere.png", "question": "q", "answer": "a"}], [(1, "is missing")]),
    "vqa_escaping_path": ([{"image": "../outside.png", "question": "q", "answer": "a"}],
                          [(1, "escapes the dataset folder")]),
    "vqa_absolute_path": ([{"image_path": "/etc/passwd", "question": "q", "answer": "a"}],
                          [(1, "must be relative")]),
    "vqa_unreadable_image": ([{"image": "broken.png", "question": "q", "answer": "a"}], [(1, "unreadable")]),
    "vqa_image_wrong_type": ([{"image": 7, "question": "q", "answer": "a"}], [(1, "'image' must be a string")]),
    "empty_file": ([""], [(0, "no rows")]),
}


@pytest.mark.parametrize("name", sorted(BROKEN_CORPUS))
def test_broken_corpus_reports_every_problem_with_its_line(tmp_path, name):
    lines, expected = BROKEN_CORPUS[name]
    folder = tmp_path / name
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    png(tmp_path / "outside.png")
    report = data.validate(write_jsonl(folder / "data.jsonl", lines))
    assert report["ok"] is False
    found = [(p["line"], p["message"]) for p in report["problems"]]
    for line, words in expected:
        assert any(at == line and words in message for at, message in found), found
    with pytest.raises(data.DatasetError, match="nothing was started"):
        data.require_valid(data.parse_dataset(folder / "data.jsonl"))


def test_invalid_utf8_and_several_problems_in_one_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n\xff\xfe\n{"prompt": "", "response": "b"}\n')
    report = data.validate(path)
    assert [p["line"] for p in report["problems"]] == [2, 3]
    assert "not UTF-8 text (byte 0xFF at character 1)" in report["problems"][0]["message"]
    assert report["valid_rows"] == 1 and report["problem_count"] == 2


def test_valid_formats_normalise_to_messages(tmp_path):
    png(tmp_path / "imgs" / "a.png")
    vqa = data.parse_dataset(write_jsonl(tmp_path / "vqa.jsonl", [
        {"image": "imgs/a.png", "question": "Color?", "answer": "Red."},
        {"image_path": "imgs/a.png", "question": "Shape?", "answer": "Square."}]))
    assert vqa.ok and vqa.format == "vqa" and vqa.examples[0].image == (tmp_path / "imgs" / "a.png").resolve()
    instruction = data.parse_dataset(write_jsonl(tmp_path / "ins.jsonl", [
        {"instruction": "Translate", "input": "bonjour", "output": "hello"}, {"prompt": "2+2?", "response": "4"}]))
    assert instruction.ok and instruction.examples[0].messages[0]["content"] == "Translate\n\nbonjour"
    assert instruction.examples[1].messages == [{"role": "user", "content": "2+2?"},
                                                {"role": "assistant", "content": "4"}]


def test_split_is_seeded_and_keeps_a_training_row(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)]
    examples = data.parse_dataset(write_jsonl(tmp_path / "d.jsonl", rows)).examples
    train, val = data.split_examples(examples, 0.2, seed=3)
    again_train, again_val = data.split_examples(examples, 0.2, seed=3)
    other = data.split_examples(examples, 0.2, seed=4)[1]
    assert len(val) == 4 and len(train) == 16
    assert [e.line for e in val] == [e.line for e in again_val] and [e.line for e in train] == [
        e.line for e in again_train]
    assert [e.line for e in other] != [e.line for e in val]
    assert data.split_examples(examples[:1], 0.5, seed=1) == (examples[:1], [])


# ---- zip uploads ---------------------------------------------------------------------------------

def make_zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as bundle:
        for name, content in members.items():
            bundle.writestr(name, content)
    return path


def test_zip_with_images_extracts_and_validates(tmp_path):
    image = png(tmp_path / "src.png").read_bytes()
    row = json.dumps({"image": "images/a.png", "question": "Color?", "answer": "Red."})
    archive = make_zip(tmp_path / "set.zip", {"set/data.jsonl": row + "\n", "set/images/a.png": image,
                                              "__MACOSX/set/._data.jsonl": b"junk"})
    jsonl = data.prepare_dataset(archive, tmp_path / "out")
    assert jsonl == (tmp_path / "out" / "set" / "data.jsonl").resolve()
    report = data.validate(jsonl)
    assert report["ok"] and report["preview"][0]["image"] == "images/a.png"  # as written, not a server path


@pytest.mark.parametrize("members, words", [
    ({"../evil.jsonl": b"{}"}, "points outside"),
    ({"/abs/evil.jsonl": b"{}"}, "points outside"),
    ({"a.jsonl": b"{}", "b.jsonl": b"{}"}, "several .jsonl"),
    ({"readme.txt": b"hi"}, "no .jsonl"),
])
def test_unsafe_or_unusable_zips_are_refused(tmp_path, members, words):
    archive = make_zip(tmp_path / "bad.zip", members)
    with pytest.raises(ValueError, match=words):
        data.prepare_dataset(archive, tmp_path / "out")
    assert not (tmp_path / "evil.jsonl").exists()


def test_zip_limits_and_symlinks(tmp_path):
    from models.limits import Limits

    many = make_zip(tmp_path / "many.zip", {f"f{i}.txt": b"x" for i in range(5)})
    with pytest.raises(TooLarge, match="5 entries; the limit is 3 files"):
        data.prepare_dataset(many, tmp_path / "o1", Limits(extracted_files=3))
    big = make_zip(tmp_path / "big.zip", {"d.jsonl": b"x" * 5000})
    with pytest.raises(TooLarge, match="unpacks to"):
        data.prepare_dataset(big, tmp_path / "o2", Limits(extracted_bytes=1000))
    assert list((tmp_path / "o1").iterdir()) == list((tmp_path / "o2").iterdir()) == []  # refused before writing
    link = zipfile.ZipInfo("d.jsonl")
    link.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as bundle:
        bundle.writestr(link, "/etc/passwd")
    with pytest.raises(ValueError, match="symbolic link"):
        data.prepare_dataset(tmp_path / "link.zip", tmp_path / "o3")
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a valid zip"):
        data.prepare_dataset(tmp_path / "junk.zip", tmp_path / "o4")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match=".jsonl file or a .zip"):
        data.prepare_dataset(tmp_path / "data.csv", tmp_path / "o5")


# ---- tokenisation with the real tiny-chat tokenizer -----------------------------------------------

@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from conftest import make_settings

    from models.catalog import Catalog

    settings = make_settings(tmp_path_factory.mktemp("tok"))
    return data.load_text_processor("tiny-chat", settings, Catalog.load())[0]


def test_labels_cover_answer_tokens_only(tmp_path, chat_tokenizer):
    example = data.parse_dataset(write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And China?"},
        {"role": "assistant", "content": "Beijing."}]}])).examples[0]
    item = data.encode_example(example, chat_tokenizer, 512, is_vlm=False)
    labelled = [token for token, label in zip(item["input_ids"], item["labels"], strict=True) if label != -100]
    text = chat_tokenizer.decode(labelled)
    assert "Paris." in text and "Beijing." in text
    assert "France" not in text and "China" not in text and "Be brief" not in text
    assert item["labels"][:item["prompt_tokens"]] == [-100] * item["prompt_tokens"]


def test_token_stats_and_max_length_below_prompt(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is the capital of France?",
                                               "response": "The capital of France is Paris. " * 4},
                                              {"prompt": "Hi", "response": "Hello"}])
    report = data.validate(path, processor=chat_tokenizer, max_length=40)
    assert report["ok"] and report["tokens"]["truncated_rows"] == 1
    assert report["tokens"]["min"] < report["tokens"]["max"]
    report = data.validate(path, processor=chat_tokenizer, max_length=8)
    assert not report["ok"] and "max_length 8 is below the prompt length" in report["problems"][-1]["message"]
    with pytest.raises(ValueError, match="below the prompt length"):
        data.encode_all(data.parse_dataset(path).examples, chat_tokenizer, 8, is_vlm=False)


# ---- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    ({"lora_r": 0}, "lora_r"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"learning_rate": math.nan}, "NaN"),
    ({"batch_size": 0}, "batch_size"),
    ({"base_model": "no-such-model"}, "Unknown model 'no-such-model'"),
    ({"base_model": "tiny-sd"}, "supports chat and VQA"),
    ({"scheduler": "sawtooth"}, "scheduler"),
    ({"adapter_name": "../escape"}, "adapter_name"),
    ({"adapter_name": "name\n"}, "adapter_name"),  # a trailing newline slipped past the old regex's "$"
    ({"max_length": 2}, "max_length"),
    ({"target_modules": []}, "target_modules"),
])
def test_config_errors_are_concise(catalog, change, words):
    with pytest.raises(ValueError, match=words):
        RunConfig(**change).validate(catalog)


def test_config_yaml_json_and_dict_round_trip(tmp_path, catalog):
    config = with_preset(RunConfig(base_model="tiny-vlm", adapter_name="colors"), "quick test (tiny models)")
    assert config.learning_rate == PRESETS["quick test (tiny models)"]["learning_rate"]
    loaded = RunConfig.load(config.save(tmp_path / "run.yaml"))
    assert loaded == config and loaded.validate(catalog) is loaded
    assert parse_config(json.dumps(config.to_dict())) == config
    assert parse_config(config.to_dict()) == config
    assert parse_config("lora_r: 4\nlearning_rate: 0.001").lora_r == 4
    with pytest.raises(ValueError, match="unknown config keys"):
        parse_config({"lora_rank": 4})
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_config("lora_r: [1,")
    with pytest.raises(ValueError, match="Unknown preset"):
        with_preset(config, "fastest")
    assert cli_command(tmp_path / "run.yaml") == f"python -m finetune.train {tmp_path / 'run.yaml'}"
    assert cli_command("run.yaml", 2, accelerate=True) == (
        "accelerate launch --num_processes 2 -m finetune.train run.yaml")
    assert cli_command("run.yaml", 4) == "torchrun --standalone --nproc_per_node 4 -m finetune.train run.yaml"
