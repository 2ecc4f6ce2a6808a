"""Every fine-tuning request is bounded: what a dataset, a zip, a row, an image or a config expands to
is checked against ``models.limits.Limits`` before or while the work is done, and what a refused or
finished request unpacked is removed."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zipfile
import zlib

import pytest

from finetune import data
from finetune.config import RunConfig, parse_config
from models.errors import InvalidRequest, TooLarge
from models.limits import Limits

GOOD = {"prompt": "What is the capital of France?", "response": "Paris."}


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def make_zip(path, members: dict[str, bytes], method=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", method) as bundle:
        for name, content in members.items():
            bundle.writestr(name, content)
    return path


# ---- many tiny problems, lines and bytes -----------------------------------------------------------

def test_only_the_first_problems_are_kept_and_the_rest_counted(tmp_path):
    path = tmp_path / "ones.jsonl"
    path.write_bytes(b"1\n" * 300_000)  # the shape of the 60 MB "1" file, smaller
    tracemalloc.start()
    try:
        report = data.validate(path, limits=Limits(dataset_rows=1_000_000, dataset_problems=50))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report["problem_count"] == 300_000 and len(report["problems"]) == 50
    assert report["problems"][-1] == {"line": 50, "message": "expected a JSON object, got int"}
    assert peak < 20 * 1024**2, f"{peak / 1024**2:.0f} MB for one report"  # every problem kept: ~80 MB


def test_reading_stops_past_the_line_limit(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD] + ["1"] * 10)
    assert data.validate(path, limits=Limits(dataset_rows=11))["problem_count"] == 10
    with pytest.raises(TooLarge, match="more than 10 lines, the limit"):
        data.validate(path, limits=Limits(dataset_rows=10))


def test_a_zip_of_tiny_lines_is_refused_at_the_line_limit(tmp_path):
    archive = make_zip(tmp_path / "ones.zip", {"data.jsonl": b"1\n" * 1_000_000})
    assert archive.stat().st_size < 10_000
    path = data.prepare_dataset(archive, tmp_path / "out")
    with pytest.raises(TooLarge, match="more than 200,000 lines"):
        data.parse_dataset(path)


def test_a_dataset_over_the_byte_limit_is_refused_before_it_is_copied_or_extracted(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD] * 10)
    limits = Limits(dataset_bytes=100)
    with pytest.raises(TooLarge, match=r"'d.jsonl' is 0.0 MB; the limit for a dataset file is"):
        data.prepare_dataset(path, tmp_path / "copy", limits)
    assert not (tmp_path / "copy" / "data.jsonl").exists()
    archive = make_zip(tmp_path / "d.zip", {"d.jsonl": path.read_bytes(), "img.png": b"x" * 10})
    with pytest.raises(TooLarge, match="'d.jsonl' is"):
        data.prepare_dataset(archive, tmp_path / "unzipped", limits)
    assert list((tmp_path / "unzipped").iterdir()) == []
    with pytest.raises(TooLarge, match="the limit for a dataset file"):
        data.parse_dataset(path, limits)


def test_a_line_too_long_for_any_row_is_a_problem_and_is_not_kept(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, json.dumps({"prompt": "x" * 50_000, "response": "y"}),
                                              {"prompt": "ok?", "response": "ok"}])
    report = data.validate(path, limits=Limits(history_chars=1000))
    assert [(p["line"], p["message"].split(" (")[0]) for p in report["problems"]] == [
        (2, "the line is longer than a row may be")]
    assert report["valid_rows"] == 2


# ---- zips ------------------------------------------------------------------------------------------

def test_too_many_zip_entries_are_refused_before_the_directory_is_read(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "many.zip", {f"f{i}.txt": b"" for i in range(50)})

    def directory_read(*args, **kwargs):
        raise AssertionError("the zip's directory was read before its entry count was checked")

    monkeypatch.setattr(zipfile, "ZipFile", directory_read)
    with pytest.raises(TooLarge, match="50 entries; the limit is 10 files"):
        data.prepare_dataset(archive, tmp_path / "out", Limits(extracted_files=10))


def test_writing_stops_at_the_budget_whatever_the_directory_said():
    sink = io.BytesIO()
    with pytest.raises(TooLarge, match="expands to more than its directory declares"):
        data.copy_bounded(io.BytesIO(b"x" * (3 * 1024**2)), sink, budget=2 * 1024**2)
    assert sink.tell() <= 2 * 1024**2
    assert data.copy_bounded(io.BytesIO(b"x" * 10), io.BytesIO(), budget=10) == 10


def test_a_zip_whose_directory_understates_a_size_writes_no_more_than_declared(tmp_path):
    archive = make_zip(tmp_path / "liar.zip", {"data.jsonl": b"x" * 100_000})
    raw = bytearray(archive.read_bytes())
    central = raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, 1000)  # the uncompressed size the directory declares
    archive.write_bytes(bytes(raw))
    with pytest.raises(InvalidRequest, match="not a valid zip file"):
        data.prepare_dataset(archive, tmp_path / "out")
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written <= 1000


# ---- rows: linear checks and size limits -----------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from conftest import make_settings

    from models.catalog import Catalog

    settings = make_settings(tmp_path_factory.mktemp("tok"))
    return {model: data.load_text_processor(model, settings, Catalog.load())[0]
            for model in ("tiny-chat", "smollm2-135m")}


def conversation(turns: int, system: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": "Answer briefly."}] if system else []
    for index in range(turns):
        messages += [{"role": "user", "content": f"Question {index}: what is {index} + {index}?"},
                     {"role": "assistant", "content": f" It is {2 * index}.\n"}]
    return messages


def test_a_long_conversation_is_encoded_in_linear_time(tmp_path, tokenizers, monkeypatch):
    tokenizer = tokenizers["tiny-chat"]
    path = write_lines(tmp_path / "d.jsonl", [{"messages": conversation(200)}])
    rendered = []
    render = data._render

    def counting_render(processor, messages, generation_prompt):
        text = render(processor, messages, generation_prompt)
        rendered.append(len(text))
        return text

    monkeypatch.setattr(data, "_render", counting_render)
    report = data.validate(path, processor=tokenizer, max_length=131072)
    assert report["ok"] and report["tokens"]["max"] > 5000
    assert len(report["preview"][0]["prompt"]) < 600 and report["preview"][0]["prompt"].endswith(" characters)")
    whole = max(rendered)
    # every prefix rendered (the old way) is ~200 full renderings' worth; linear stays within a few
    assert sum(rendered) < 10 * whole, f"{sum(rendered) / whole:.0f} renderings' worth of text"


@pytest.mark.parametrize("model", ["tiny-chat", "smollm2-135m"])
@pytest.mark.parametrize("system", [True, False])
def test_linear_labels_are_the_labels_of_rendering_every_prefix(tokenizers, model, system):
    tokenizer = tokenizers[model]
    messages = conversation(9, system)
    linear = data._answer_spans_linear(tokenizer, messages, is_vlm=False)
    exact = data._answer_spans_exact(tokenizer, messages, None, is_vlm=False)
    assert linear is not None
    assert linear[0] == exact[0] and linear[2] == exact[2] and len(linear[2]) == 9


def test_a_template_that_cannot_be_cut_into_turns_is_refused_for_long_rows_only(tokenizers, monkeypatch):
    tokenizer = tokenizers["tiny-chat"]
    monkeypatch.setattr(data, "_answer_spans_linear", lambda *args: None)
    short = data.Example(1, "chat", conversation(2))
    assert data.encode_example(short, tokenizer, 512, is_vlm=False)["prompt_tokens"] > 0
    long = data.Example(7, "chat", conversation(20))
    with pytest.raises(InvalidRequest, match="line 7: the row has 41 messages"):
        data.encode_example(long, tokenizer, 512, is_vlm=False)


@pytest.mark.parametrize("row, limits, words", [
    ({"messages": conversation(6)}, Limits(history_turns=10), "messages has 13 messages; the limit is 10. Split"),
    ({"messages": conversation(6)}, Limits(history_chars=100), "characters; the limit is 100. Split"),
    ({"messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]},
     Limits(text_chars=200), "messages message 0 is 300 characters; the limit is 200"),
    ({"prompt": "x" * 300, "response": "y"}, Limits(text_chars=200), "field 'prompt' is 300 characters"),
    ({"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "y"}]}, Limits(),
     "invalid Unicode"),
])
def test_rows_over_the_conversation_limits_are_problems(tmp_path, row, limits, words):
    good = {"messages": conversation(1, system=False)} if "messages" in row else GOOD
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    report = data.validate(path, limits=limits)
    assert report["valid_rows"] == 1 and [p["line"] for p in report["problems"]] == [2]
    assert words in report["problems"][0]["message"]


def test_token_statistics_stop_past_the_token_limit(tmp_path, tokenizers):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": f"Question {i}?", "response": "Answer."} for i in range(20)])
    assert data.validate(path, processor=tokenizers["tiny-chat"])["tokens"]["max"] < 50
    with pytest.raises(TooLarge, match="more than 100 tokens, the limit"):
        data.validate(path, processor=tokenizers["tiny-chat"], limits=Limits(dataset_tokens=100))
    examples = data.parse_dataset(path).examples
    with pytest.raises(TooLarge, match="more than 100 tokens"):
        data.encode_all(examples, tokenizers["tiny-chat"], 512, is_vlm=False, limits=Limits(dataset_tokens=100))


# ---- images ----------------------------------------------------------------------------------------

def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a canvas and holds no pixels: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def vqa_rows(folder, images: dict[str, bytes]):
    for name, content in images.items():
        (folder / name).write_bytes(content)
    return write_lines(folder / "d.jsonl", [{"image": name, "question": "Colour?", "answer": "Red."}
                                            for name in images])


def small_png(size=(16, 16)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (255, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_decompression_bomb_is_a_problem_on_its_line(tmp_path):
    path = vqa_rows(tmp_path, {"ok.png": small_png(), "bomb.png": png_header(30000, 30000)})
    report = data.validate(path)
    assert report["valid_rows"] == 1 and [p["line"] for p in report["problems"]] == [2]
    assert "image 'bomb.png' is larger than the limits" in report["problems"][0]["message"]


@pytest.mark.parametrize("value, words", [("a" * 5000 + ".png", "cannot be used (File name too long)"),
                                          (("d" * 200 + "/") * 30 + "x.png", "cannot be used (File name too long)"),
                                          ("imgs/x\x00.png", "NUL")])
def test_unusable_image_paths_are_problems_without_server_paths(tmp_path, value, words):
    rows = [{"image": value, "question": "Colour?", "answer": "Red."},
            {"image": "ok.png", "question": "Colour?", "answer": "Red."}]
    (tmp_path / "ok.png").write_bytes(small_png())
    report = data.validate(write_lines(tmp_path / "d.jsonl", rows))
    assert [p["line"] for p in report["problems"]] == [1] and words in report["problems"][0]["message"]
    assert report["valid_rows"] == 1
    assert str(tmp_path) not in json.dumps(report)


@pytest.mark.parametrize("limits, declared", [(Limits(image_pixels=100), (16, 16)), (Limits(image_side=10), (16, 16)),
                                              (Limits(), (12_001, 2))])
def test_images_over_the_pixel_limits_are_problems(tmp_path, limits, declared):
    content = small_png() if declared == (16, 16) else png_header(*declared)
    report = data.validate(vqa_rows(tmp_path, {"big.png": content}), limits=limits)
    assert [p["line"] for p in report["problems"]] == [1]
    assert f"(it is {declared[0]}x{declared[1]})" in report["problems"][0]["message"]


# ---- run configs -----------------------------------------------------------------------------------

def alias_bomb(levels: int = 8) -> str:
    items = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    items += [f"&a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "adapter_name: x\nlora_r: [" + ", ".join(items) + "]\n"


def test_yaml_aliases_are_refused_at_once_with_a_short_message():
    text = alias_bomb()
    assert len(text) < 520
    with pytest.raises(InvalidRequest, match="line 2 uses a YAML anchor or alias") as refused:
        parse_config(text)
    assert len(str(refused.value)) < 300
    with pytest.raises(InvalidRequest, match="anchor or alias"):
        parse_config("base: &b {lora_r: 4}\nlora_alpha: *b\n")


@pytest.mark.parametrize("text, error, words", [
    ("target_modules: [" + ", ".join(f"m{i}" for i in range(3000)) + "]\n", TooLarge, "more than 2,000 values"),
    ('{"target_modules": [' + ", ".join(f'"m{i}"' for i in range(3000)) + "]}", TooLarge, "more than 2,000 values"),
    ("lora_r: " + "[" * 50 + "]" * 50 + "\n", InvalidRequest, "nested more than 8 levels"),
    ("[" * 20_000 + "]" * 20_000, InvalidRequest, "nested more than 8 levels"),
    ("adapter_name: x\n" + "# padding\n" * 7000, TooLarge, "the limit is 65,536"),
])
def test_config_text_is_bounded(text, error, words):
    with pytest.raises(error, match=words) as refused:
        parse_config(text)
    assert len(str(refused.value)) < 400


def test_the_yaml_loader_stops_composing_past_the_node_limit(monkeypatch):
    from finetune import config

    composed = []
    compose = config._BoundedLoader.compose_node
    monkeypatch.setattr(config._BoundedLoader, "compose_node",
                        lambda self, parent, index: composed.append(1) or compose(self, parent, index))
    text = "target_modules: [" + ", ".join(f"m{i}" for i in range(5000)) + "]\n"
    with pytest.raises(TooLarge, match="more than 100 values"):
        config.load_text(text, Limits(yaml_nodes=100))
    assert len(composed) <= 101


def test_config_errors_quote_at_most_about_200_characters_of_a_value(catalog):
    for config in ({"lora_r": "9" * 100_000}, {"scheduler": "s" * 100_000}, {"base_model": "m" * 100_000},
                   {"x" * 100_000: 1}):
        with pytest.raises(InvalidRequest) as refused:
            parse_config(config).validate(catalog)
        assert len(str(refused.value)) < 1200, str(refused.value)[:300]


def test_a_long_adapter_name_is_refused_when_the_config_is_parsed():
    with pytest.raises(InvalidRequest, match="adapter_name must be 1 to 64 letters") as refused:
        parse_config({"adapter_name": "a" * 5000})
    assert "Errno" not in str(refused.value) and len(str(refused.value)) < 400
    with pytest.raises(InvalidRequest, match="adapter_name"):
        RunConfig.from_text("adapter_name: ../../etc\n")
    assert parse_config("adapter_name: my-adapter.v2\n").adapter_name == "my-adapter.v2"
