"""Datasets as editors and spreadsheet exports write them: byte-order marks, UTF-16, CR/CRLF line ends,
blank lines, other encodings, JSON arrays, mixed formats; the validator and a start judge each alike."""

from __future__ import annotations

import codecs
import json

import pytest

from finetune import data
from finetune.runner import TrainingRunner
from models.errors import InvalidRequest

ROWS = [{"prompt": "What is the capital of France?", "response": "Paris."},
        {"prompt": "Say hello.", "response": "Hello!"},
        {"prompt": "Name a color.", "response": "Blue."}]
LINES = [json.dumps(row) for row in ROWS]


def write(tmp_path, content: bytes, name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def problems(report) -> list[tuple[int, str]]:
    return [(p["line"], p["message"]) for p in report["problems"]]


# Files that hold the same three good rows, as different tools save them.
GOOD_FILES = {
    "utf8_bom": codecs.BOM_UTF8 + "\n".join(LINES).encode() + b"\n",
    "crlf": "\r\n".join(LINES).encode() + b"\r\n",
    "lone_cr": "\r".join(LINES).encode() + b"\r",
    "utf16_le_bom": codecs.BOM_UTF16_LE + "\r\n".join(LINES).encode("utf-16-le"),
    "utf16_be_bom": codecs.BOM_UTF16_BE + "\r\n".join(LINES).encode("utf-16-be"),
    "utf32_le_bom": codecs.BOM_UTF32_LE + "\n".join(LINES).encode("utf-32-le"),
    "no_final_newline": "\n".join(LINES).encode(),
    "trailing_whitespace": "\n".join(line + " \t\u00a0" for line in LINES).encode() + b"\n",
}


@pytest.mark.parametrize("name", sorted(GOOD_FILES))
def test_files_from_other_platforms_are_read_as_written(tmp_path, name):
    report = data.validate(write(tmp_path, GOOD_FILES[name]))
    assert problems(report) == []
    assert report["ok"] and report["valid_rows"] == 3 and report["lines"] == 3
    assert report["preview"][0]["prompt"] == ROWS[0]["prompt"]  # no byte-order mark or \r left in the text


@pytest.mark.parametrize("name, newline", [("lf", "\n"), ("crlf", "\r\n"), ("lone_cr", "\r")])
def test_blank_lines_are_skipped_and_line_numbers_count_them(tmp_path, name, newline):
    lines = [LINES[0], "", "   \t", LINES[1], '{"prompt": "x"}', "", LINES[2]]
    report = data.validate(write(tmp_path, newline.join(lines).encode("utf-8")))
    assert problems(report) == [(5, "missing field 'response'")]
    assert report["valid_rows"] == 3 and report["lines"] == 7


def test_line_numbers_stay_right_in_utf16(tmp_path):
    content = codecs.BOM_UTF16_LE + "\r\n".join([LINES[0], "not json", LINES[1]]).encode("utf-16-le")
    report = data.validate(write(tmp_path, content))
    assert [line for line, _ in problems(report)] == [2] and report["valid_rows"] == 2


def test_crlf_cut_by_a_read_boundary_is_one_line_end(tmp_path):
    # The first line ends exactly where one 64 KiB read ends: its "\r" in one read, its "\n" in the next.
    first = json.dumps({"prompt": "x" * 10, "response": "y"})
    first = first[:-1] + " " * (data._READ_BYTES - len(first) - 1) + "}"
    content = (first + "\r\n" + "not json\r\n" + LINES[1] + "\r\n").encode()
    assert content.index(b"\r") == data._READ_BYTES - 1
    report = data.validate(write(tmp_path, content))
    assert [line for line, _ in problems(report)] == [2] and report["lines"] == 3


def test_unicode_line_separators_inside_strings_do_not_split_rows(tmp_path):
    row = {"prompt": "one\u2028two\u2029three\x85four", "response": "ok"}
    report = data.validate(write(tmp_path, (json.dumps(row, ensure_ascii=False) + "\n").encode()))
    assert report["ok"] and report["lines"] == 1 and report["preview"][0]["prompt"] == row["prompt"]


def test_windows_1252_text_gets_a_line_numbered_save_as_utf8_message(tmp_path):
    rows = [LINES[0], json.dumps({"prompt": "Café?", "response": "Oui."}, ensure_ascii=False), LINES[1]]
    report = data.validate(write(tmp_path, "\r\n".join(rows).encode("cp1252")))
    assert [line for line, _ in problems(report)] == [2]
    message = problems(report)[0][1]
    assert "not UTF-8 text (byte 0xE9" in message and "save the file as UTF-8" in message
    assert report["valid_rows"] == 2  # the encoding is not guessed: the row is not read as "Café"


def test_utf16_without_a_byte_order_mark_is_refused_clearly(tmp_path):
    with pytest.raises(InvalidRequest, match="UTF-16 without a byte-order mark"):
        data.validate(write(tmp_path, "\n".join(LINES).encode("utf-16-le")))


def test_utf16_with_a_broken_character_is_refused_with_its_line(tmp_path):
    content = codecs.BOM_UTF16_LE + (LINES[0] + "\n" + LINES[1] + "\n").encode("utf-16-le") + b"\x00\xd8{\x00"
    with pytest.raises(InvalidRequest, match="line 3 is not valid UTF-16-LE.*save the file as UTF-8"):
        data.validate(write(tmp_path, content))


@pytest.mark.parametrize("text", [json.dumps(ROWS), json.dumps(ROWS, indent=2), "[\n" + ",\n".join(LINES) + "\n]"])
def test_a_json_array_of_rows_is_refused_with_the_conversion(tmp_path, text):
    upload = write(tmp_path, text.encode(), "export.json")
    path = data.prepare_dataset(upload, tmp_path / "out")
    with pytest.raises(InvalidRequest, match=r"JSON array of rows.*jq -c '\.\[\]'"):
        data.parse_dataset(path)


def test_a_json_file_that_holds_json_lines_is_accepted(tmp_path):
    upload = write(tmp_path, "\n".join(LINES).encode(), "export.json")
    assert data.validate(data.prepare_dataset(upload, tmp_path / "out"))["ok"]


def test_a_zip_with_only_a_json_file_says_to_save_it_as_jsonl(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "set.zip", "w") as bundle:
        bundle.writestr("set/data.json", json.dumps(ROWS))
    with pytest.raises(InvalidRequest, match="found 'set/data.json': save it as JSON Lines"):
        data.prepare_dataset(tmp_path / "set.zip", tmp_path / "out")


def test_mixed_formats_are_reported_once_where_the_second_format_starts(tmp_path):
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    lines = [LINES[0], LINES[1]] + [json.dumps({**chat, "n": i}) for i in range(40)] + [LINES[2]]
    report = data.validate(write(tmp_path, "\n".join(lines).encode()))
    assert report["format"] == "instruction" and report["valid_rows"] == 3
    assert report["problem_count"] == 1
    assert problems(report) == [(3, "a chat row starts here (40 chat rows in all, the last at line 42), but line 1 "
                                    "made this an instruction dataset; formats cannot be mixed in one file: keep "
                                    "one format per file")]


# ---- one judgement: the validator and a start agree ---------------------------------------------

@pytest.fixture
def runner(settings, catalog):
    return TrainingRunner(settings, catalog=catalog)


START = {"base_model": "tiny-chat", "max_length": 64, "val_fraction": 0.0}


@pytest.mark.parametrize("name", ["utf8_bom", "utf16_le_bom", "lone_cr"])
def test_files_the_validator_accepts_start_a_run(tmp_path, runner, name):
    upload = write(tmp_path, GOOD_FILES[name])
    report = runner.validate(str(upload), "tiny-chat", max_length=64, val_fraction=0.0).report
    run_config, _, run_dir = runner.prepare(str(upload), START)
    assert report["ok"] and (run_dir / "config.yaml").is_file()
    assert data.validate(run_config.dataset)["valid_rows"] == report["valid_rows"] == 3


REFUSED = {
    "windows_1252": "\n".join([LINES[0], '{"prompt": "Café?", "response": "Oui."}']).encode("cp1252"),
    "mixed": "\n".join([LINES[0], '{"messages": [{"role": "user", "content": "a"}]}']).encode(),
    "prompt_over_max_length": "\n".join([LINES[0], json.dumps({"prompt": "word " * 80, "response": "ok"})]).encode(),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_files_the_validator_refuses_are_refused_by_start_with_the_same_problems(tmp_path, runner, settings, name):
    upload = write(tmp_path, REFUSED[name])
    report = runner.validate(str(upload), "tiny-chat", max_length=64, val_fraction=0.0).report
    with pytest.raises(data.DatasetError) as refused:
        runner.prepare(str(upload), START)
    assert not report["ok"] and report["problems"]
    assert [(p.line, p.message) for p in refused.value.problems] == problems(report)
    assert not settings.runs_dir.exists() or list(settings.runs_dir.iterdir()) == []
