"""models/pnginfo.py: recipes checked field by field, and PNGs read without decoding pixels or unbounded text."""

from __future__ import annotations

import json
import struct
import time
import zlib

import pytest
from PIL import Image, ImageFile, PngImagePlugin

from models import pnginfo
from models.errors import InvalidRequest, TooLarge
from models.limits import Limits
from models.pnginfo import RECIPE_KEY, make_recipe, read_recipe, save_png

GOOD = dict(prompt="a cat 🐱 on a sofa", negative_prompt="blurry", style="none", model="tiny-sd",
            scheduler="Euler a", steps=2, guidance=5.0, seed=42, width=64, height=64, workbench_version="0.1.0")


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int = 8, height: int = 8, *chunks: bytes) -> bytes:
    """A PNG whose header declares any size, with ``chunks`` before an IDAT that holds no valid pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (pnginfo.PNG_SIGNATURE + chunk(b"IHDR", header) + b"".join(chunks) + chunk(b"IDAT", b"not pixels")
            + chunk(b"IEND", b""))


def itxt(key: str, text: str) -> bytes:
    return chunk(b"iTXt", key.encode() + b"\0\0\0\0\0" + text.encode())


def recipe_png(tmp_path, recipe, name: str = "made.png", **kwargs) -> str:
    """A real PNG (Pillow) carrying ``recipe`` as JSON (any dict, valid or not) in the workbench chunk."""
    info = PngImagePlugin.PngInfo()
    text = recipe if isinstance(recipe, str) else json.dumps(recipe, ensure_ascii=False)
    info.add_itxt(RECIPE_KEY, text, **kwargs)
    path = tmp_path / name
    Image.new("RGB", (8, 8), "red").save(path, pnginfo=info)
    return str(path)


@pytest.fixture
def no_decoding(monkeypatch):
    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.usefixtures("no_decoding")
def test_round_trip_reads_only_the_chunks_and_drops_unknown_keys(tmp_path):
    stored = make_recipe(**GOOD)
    path = save_png(Image.new("RGB", (8, 8), "red"), stored, tmp_path)
    assert read_recipe(path) == stored
    newer = recipe_png(tmp_path, {**stored, "sampler_eta": 0.5, "notes": ["from a newer workbench"]})
    assert read_recipe(newer) == stored, "unknown keys are ignored and left out"
    with pytest.raises(InvalidRequest, match="unknown fields notes"):
        make_recipe(**GOOD, notes="typo'd field")


def test_recipe_in_other_text_chunk_kinds_is_read(tmp_path):
    stored = make_recipe(**{**GOOD, "prompt": "plain latin text"})
    assert read_recipe(recipe_png(tmp_path, stored, "zipped-itxt.png", zip=True)) == stored
    for kind, compress in ((b"tEXt", False), (b"zTXt", True)):
        text = json.dumps(stored).encode("latin-1")
        body = RECIPE_KEY.encode() + b"\0" + (b"\0" + zlib.compress(text) if compress else text)
        path = tmp_path / f"{kind.decode()}.png"
        path.write_bytes(raw_png(8, 8, chunk(kind, body)))
        assert read_recipe(path) == stored


def test_every_field_set_to_a_list_is_refused(tmp_path):
    # the /png_info report: a recipe whose fields were all [1] was accepted and loaded into the controls
    path = recipe_png(tmp_path, {"format": pnginfo.RECIPE_FORMAT, **dict.fromkeys(pnginfo.RECIPE_FIELDS, [1])},
                      "lists.png")
    with pytest.raises(InvalidRequest, match=r"^lists.png: the recipe's prompt must be text, got list \[1\]$"):
        read_recipe(path)


def test_format_marker(tmp_path):
    fields = dict.fromkeys(pnginfo.RECIPE_FIELDS, [1])
    path = tmp_path / "no-format.png"  # written by hand as tEXt, without the format marker
    path.write_bytes(raw_png(8, 8, chunk(b"tEXt", RECIPE_KEY.encode() + b"\0" + json.dumps(fields).encode())))
    with pytest.raises(InvalidRequest, match=r"prompt must be text, got list \[1\]"):
        read_recipe(path)
    cases = {"unmarked.png": (GOOD, r"lacks its format \(workbench-recipe/1\)"),
             "future.png": ({**GOOD, "format": "workbench-recipe/2"}, "unsupported recipe format 'workbench-recipe/2'"),
             "list.png": ([GOOD], "is a JSON list, not an object")}
    for name, (recipe, message) in cases.items():
        with pytest.raises(InvalidRequest, match=message):
            read_recipe(recipe_png(tmp_path, recipe, name))


@pytest.mark.parametrize("field, value, message", [
    ("negative_prompt", None, "negative_prompt must be text, got NoneType None"),
    ("model", 123, "model must be text, got int 123"),
    ("style", "s" * 201, "style is 201 characters; the limit is 200"),
    ("prompt", "p" * 20_001, "prompt is 20,001 characters; the limit is 20,000"),
    ("workbench_version", {"v": 1}, r"workbench_version must be text, got dict \{'v': 1\}"),
    ("steps", "5", "steps must be a whole number from 1 to 1000, got '5'"),
    ("steps", 5.0, "steps must be a whole number from 1 to 1000, got 5.0"),
    ("steps", True, "steps must be a whole number from 1 to 1000, got True"),
    ("steps", 0, "steps must be a whole number from 1 to 1000, got 0"),
    ("seed", -1, r"seed must be a whole number from 0 to 4294967295, got -1"),
    ("seed", 2**32, r"seed must be a whole number from 0 to 4294967295, got 4294967296"),
    ("width", 20_000, "width must be a whole number from 1 to 12000, got 20000"),
    ("height", [64], r"height must be a whole number from 1 to 12000, got \[64\]"),
    ("guidance", "7.5", "guidance must be a number from 0.0 to 100.0, got '7.5'"),
    ("guidance", float("nan"), "guidance must be a number from 0.0 to 100.0, got nan"),
    ("guidance", float("inf"), "guidance must be a number from 0.0 to 100.0, got inf"),
    ("guidance", 10**400, r"guidance must be a number from 0.0 to 100.0, got 1000000000"),
])
def test_each_field_is_type_checked(tmp_path, field, value, message):
    path = recipe_png(tmp_path, {"format": pnginfo.RECIPE_FORMAT, **GOOD, field: value}, "bad.png")
    with pytest.raises(InvalidRequest, match=f"^bad.png: the recipe's {message}"):
        read_recipe(path)
    with pytest.raises(InvalidRequest, match=f"^The recipe's {message}"):
        make_recipe(**{**GOOD, field: value})


def test_messages_quote_at_most_about_200_characters(tmp_path):
    path = recipe_png(tmp_path, {"format": pnginfo.RECIPE_FORMAT, **GOOD, "steps": "9" * 50_000}, "long.png")
    with pytest.raises(InvalidRequest, match=r"got '99+… \(50,002 characters\)$") as caught:
        read_recipe(path)
    assert len(str(caught.value)) < 300
    path = recipe_png(tmp_path, {"format": {"nested": ["x" * 5000]}, **GOOD}, "format.png")
    with pytest.raises(InvalidRequest, match="unsupported recipe format") as caught:
        read_recipe(path)
    assert len(str(caught.value)) < 200


def test_field_limits_follow_the_limits_passed(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), make_recipe(**{**GOOD, "prompt": "x" * 500}), tmp_path)
    with pytest.raises(TooLarge, match="prompt is 500 characters; the limit is 100"):
        read_recipe(path, limits=Limits(text_chars=100))
    with pytest.raises(InvalidRequest, match="width must be a whole number from 1 to 32"):
        make_recipe(**GOOD, limits=Limits(image_side=32))


def test_enormous_recipe_chunk_is_refused_without_reading_it(tmp_path, monkeypatch):
    limit = pnginfo.max_recipe_bytes(Limits())
    huge = json.dumps({"format": pnginfo.RECIPE_FORMAT, **GOOD, "prompt": "x" * (2 * limit)})
    path = recipe_png(tmp_path, huge, "huge.png")
    monkeypatch.setattr(json, "loads", lambda *_: pytest.fail("the chunk was parsed"))
    with pytest.raises(TooLarge, match=rf"^huge.png: its workbench recipe is {len(huge) + 21:,} bytes; the limit "
                                       rf"is {limit:,}\."):
        read_recipe(path)


def test_compressed_recipe_is_inflated_only_up_to_the_cap(tmp_path):
    # 5 MB of JSON in a 5 KB chunk: inflating it whole is what a bound must prevent
    path = recipe_png(tmp_path, '{"prompt": "' + " " * 5_000_000 + '"}', "zip-bomb.png", zip=True)
    started = time.perf_counter()
    with pytest.raises(TooLarge, match=r"zip-bomb.png: its workbench recipe expands to more than [\d,]+ bytes"):
        read_recipe(path)
    assert time.perf_counter() - started < 1.0


def test_large_foreign_text_is_skipped_unread(tmp_path):
    stored = make_recipe(**GOOD)
    path = tmp_path / "annotated.png"
    path.write_bytes(raw_png(8, 8, itxt("Comment", "c" * 5_000_000), itxt(RECIPE_KEY, json.dumps(stored))))
    assert read_recipe(path) == stored
    path.write_bytes(raw_png(8, 8, chunk(b"tEXt", b"parameters\0a cat, Steps: 20")))
    with pytest.raises(InvalidRequest, match="no workbench recipe.*'parameters' from another tool"):
        read_recipe(path)


@pytest.mark.parametrize("size, message", [
    ((30_000, 30_000), "bomb.png is 30000x30000 pixels; each side may be at most 12000 pixels"),
    ((7_000, 7_000), r"bomb.png is 7000x7000 pixels \(49.0 megapixels\); the limit is 40 megapixels"),
    ((5_000, 100), "5000x100 pixels, 50 times wider than it is tall; the limit is 20 to 1"),
])
@pytest.mark.usefixtures("no_decoding")
def test_header_over_the_image_limits_gets_a_clear_message(tmp_path, size, message):
    # Pillow refused 30000x30000 with "could be decompression bomb DOS attack" and a traceback
    path = tmp_path / "bomb.png"
    path.write_bytes(raw_png(*size, itxt(RECIPE_KEY, json.dumps(make_recipe(**GOOD)))))
    with pytest.raises(TooLarge, match=message):
        read_recipe(path)


def test_damaged_files(tmp_path):
    good = save_png(Image.new("RGB", (8, 8)), make_recipe(**GOOD), tmp_path).read_bytes()
    cases = {
        "cut.png": (good[:60], "cut short"),
        "header.png": (good[:33], "ends before its image data"),
        "no-header.png": (pnginfo.PNG_SIGNATURE + good[33:], "does not start with its header"),
        "crc.png": (good.replace(b'"steps": 2', b'"steps": 3'), "its iTXt chunk fails its checksum"),
        "json.png": (raw_png(8, 8, itxt(RECIPE_KEY, "{not json")), "not valid JSON"),
        "deep.png": (raw_png(8, 8, itxt(RECIPE_KEY, "[" * 100_000)), "not valid JSON"),
        "digits.png": (raw_png(8, 8, itxt(RECIPE_KEY, "9" * 10_000)), "not valid JSON"),
        "utf8.png": (raw_png(8, 8, chunk(b"iTXt", RECIPE_KEY.encode() + b"\0\0\0\0\0\xff\xfe")), "malformed"),
        "chunks.png": (raw_png(8, 8, *[chunk(b"tIME", b"1234567")] * 1001), "more than 1000 chunks"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(InvalidRequest, match=message):
            read_recipe(path)


def test_lone_surrogate_is_refused(tmp_path):
    path = recipe_png(tmp_path, '{"format": "workbench-recipe/1", ' + json.dumps(GOOD)[1:].replace(
        '"blurry"', '"\\ud800"'), "surrogate.png")
    with pytest.raises(InvalidRequest, match="negative_prompt holds invalid Unicode"):
        read_recipe(path)
