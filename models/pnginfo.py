"""A generation recipe stored in, and read back from, a PNG text chunk.

Every image the workbench saves carries one ``iTXt`` chunk named ``workbench-recipe`` whose text
is JSON (UTF-8, so emoji and any language survive), plus a human-readable ``parameters`` chunk in
the style other Stable Diffusion tools write. Reading accepts only the workbench chunk.

Reading never decodes pixels and is bounded: it walks the chunks before the image data (where
Pillow, and so the workbench, writes text), checks the size the header declares against the image
limits, refuses a recipe chunk over ``max_recipe_bytes`` before reading it, and type-checks every
field. Keys a recipe holds beyond ``RECIPE_FIELDS`` are ignored and left out of what is returned
(a newer workbench may add fields; nothing here reads them).
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import struct
import zlib
from pathlib import Path

from models.errors import InvalidRequest, TooLarge, quote
from models.limits import Limits

RECIPE_KEY = "workbench-recipe"
RECIPE_FORMAT = "workbench-recipe/1"
# Fields a recipe must hold to reproduce an image; the order is the order of the ``parameters`` text.
RECIPE_FIELDS = ("prompt", "negative_prompt", "style", "model", "scheduler", "steps", "guidance", "seed",
                 "width", "height", "workbench_version")
# Text fields other than the prompts: names, so short.
NAME_CHARS = {"style": 200, "model": 200, "scheduler": 200, "workbench_version": 50}
# Number fields: (integer, low, high). Wide enough for every model; txt2img checks a model's own limits.
NUMBER_RANGES = {"steps": (True, 1, 1000), "guidance": (False, 0.0, 100.0), "seed": (True, 0, 2**32 - 1),
                 "width": (True, 1, None), "height": (True, 1, None)}  # None: the image_side limit
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
MAX_KEYWORD = 80  # a PNG text keyword is 1 to 79 bytes, then a NUL
MAX_CHUNKS = 1000  # chunks read before the image data; Pillow writes a handful
MAX_SLUG = 40


def max_recipe_bytes(limits: Limits) -> int:
    """The largest recipe chunk accepted: two prompts of ``text_chars`` characters (6 bytes each at
    worst once JSON-escaped) and the short fields."""
    return 12 * limits.text_chars + 64 * 1024


def make_recipe(*, limits: Limits | None = None, **values) -> dict:
    """A recipe dict with every field in RECIPE_FIELDS, each checked as ``read_recipe`` checks it.

    Raises:
        InvalidRequest: a field is missing, unknown, of the wrong type or out of range.
    """
    require_exactly(values, RECIPE_FIELDS, "recipe")
    return {"format": RECIPE_FORMAT, **check_fields(values, limits or Limits())}


def require_exactly(values: dict, fields, what: str) -> None:
    """InvalidRequest unless ``values`` has every one of ``fields`` and nothing else (``what`` names it)."""
    missing = [name for name in fields if name not in values]
    if missing:
        raise InvalidRequest(f"{what} is missing {', '.join(missing)}")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InvalidRequest(f"{what} has unknown fields {', '.join(unknown)}; known: {', '.join(fields)}")


def check_fields(recipe: dict, limits: Limits, where: str = "The recipe's", fields=RECIPE_FIELDS,
                 number_ranges=NUMBER_RANGES, name_chars=NAME_CHARS) -> dict:
    """The ``fields`` of ``recipe`` (an image's RECIPE_FIELDS by default), in that order, each of the right
    type and in range: numbers by ``number_ranges`` (integer?, low, high; high None is the image side
    limit), text no longer than ``name_chars`` (the text limit for fields not named there).

    Raises:
        InvalidRequest: naming the first bad field and quoting (at most ~200 characters of) its value.
    """
    checked = {}
    for name in fields:
        value = recipe[name]
        if name in number_ranges:
            integer, low, high = number_ranges[name]
            high = limits.image_side if high is None else high
            kind = "a whole number" if integer else "a number"
            # bool is an int to Python, but not to a recipe; NaN and infinities fail the range
            ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float)) \
                and low <= value <= high
            if not ok:
                raise InvalidRequest(f"{where} {name} must be {kind} from {low} to {high}, got {quote(value)}")
        else:
            max_chars = name_chars.get(name, limits.text_chars)
            if not isinstance(value, str):
                raise InvalidRequest(f"{where} {name} must be text, got {type(value).__name__} {quote(value)}")
            if len(value) > max_chars:
                raise TooLarge(f"{where} {name} is {len(value):,} characters; the limit is {max_chars:,}.")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"{where} {name} holds invalid Unicode (a lone surrogate).") from None
        checked[name] = value
    return checked


def parameters_text(recipe: dict) -> str:
    """The recipe as one readable block (prompt, negative prompt, then key: value pairs)."""
    details = ", ".join(f"{name.replace('_', ' ').capitalize()}: {recipe[name]}"
                        for name in RECIPE_FIELDS if name not in ("prompt", "negative_prompt"))
    return f"{recipe['prompt']}\nNegative prompt: {recipe['negative_prompt']}\n{details}"


def png_bytes(image, recipe: dict) -> bytes:
    """Encode a PIL image as PNG with the recipe in its text chunks."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt(RECIPE_KEY, json.dumps(recipe, ensure_ascii=False))
    info.add_itxt("parameters", parameters_text(recipe))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def slug(text: str) -> str:
    """A short, safe file-name fragment from free text (ASCII letters, digits and dashes only)."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:MAX_SLUG].rstrip("-") or "untitled"


def save_png(image, recipe: dict, folder: Path, index: int = 0) -> Path:
    """Write ``image`` into ``folder`` under a new, generated file name and return the path.

    The name is ``<UTC time>-<seed>-<index>-<prompt slug>.png``; it never overwrites a file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = png_bytes(image, recipe)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    stem = f"{stamp}-{int(recipe['seed'])}-{index}-{slug(str(recipe['prompt']))}"
    for attempt in range(1000):
        path = folder / (f"{stem}.png" if attempt == 0 else f"{stem}-{attempt}.png")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return path
    raise RuntimeError(f"could not find a free file name for {stem}.png in {folder}")


def read_recipe(path: str | os.PathLike, limits: Limits | None = None) -> dict:
    """The recipe stored in a workbench PNG: ``format`` and the RECIPE_FIELDS, checked field by field.

    Raises:
        InvalidRequest: the file is missing, is not a PNG, is damaged, carries no workbench recipe,
            or a field is of the wrong type or out of range.
        TooLarge: the header declares an image over the limits (a decompression bomb), or the
            recipe chunk is over ``max_recipe_bytes``.
    """
    from models.images import check_size

    limits = limits or Limits()
    if path is None or str(path) == "":
        raise InvalidRequest("Drop a PNG made by the workbench to read its settings.")
    path = Path(path)
    name = path.name
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise InvalidRequest(f"Cannot open {name}: {exc.strerror or exc}") from exc
    with handle:
        if handle.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            raise InvalidRequest(f"{name} is not a PNG file. PNG Info reads the PNGs the workbench saves.")
        # 1. The header: refuse what the image limits refuse everywhere else, though no pixel is decoded here.
        kind, data = _read_chunk(handle, name, max_bytes=13)
        if kind != b"IHDR" or len(data) != 13:
            raise _damaged(name, "it does not start with its header")
        check_size(*struct.unpack(">II", data[:8]), name, limits)
        # 2. The text chunks before the image data: find the recipe's, read only that one.
        raw, foreign = _find_recipe(handle, name, max_recipe_bytes(limits))
    if raw is None:
        hint = " It has generation 'parameters' from another tool, which the workbench does not import." \
            if foreign else ""
        raise InvalidRequest(f"{name} carries no workbench recipe: it was not made by the workbench, or its "
                             f"metadata was removed.{hint}")
    # 3. The JSON, then every field.
    try:
        recipe = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, a number too long, nesting too deep
        raise _damaged(name, f"its workbench recipe is not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(recipe, dict):
        raise _damaged(name, f"its workbench recipe is a JSON {type(recipe).__name__}, not an object")
    found = recipe.get("format", RECIPE_FORMAT)
    if found != RECIPE_FORMAT:
        raise InvalidRequest(f"{name}: unsupported recipe format {quote(found, 80)}; this workbench reads "
                             f"{RECIPE_FORMAT}.")
    missing = [field for field in RECIPE_FIELDS if field not in recipe]
    if missing:
        raise InvalidRequest(f"{name}: the workbench recipe lacks {', '.join(missing)}.")
    checked = check_fields(recipe, limits, where=f"{name}: the recipe's")
    if "format" not in recipe:  # after the fields: a bad field says more than a missing marker
        raise InvalidRequest(f"{name}: the workbench recipe lacks its format ({RECIPE_FORMAT}).")
    return {"format": RECIPE_FORMAT, **checked}


def _damaged(name: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"{name} is a damaged PNG and cannot be read: {why}.")


def _read_chunk(handle, name: str, max_bytes: int | None = None) -> tuple[bytes, bytes]:
    """The next chunk's type and data, its CRC checked; only the type when over ``max_bytes``."""
    head = handle.read(8)
    if len(head) < 8:
        raise _damaged(name, "it ends before its image data")
    length, kind = struct.unpack(">I4s", head)
    if max_bytes is not None and length > max_bytes:
        handle.seek(length + 4, os.SEEK_CUR)
        return kind, b""
    data = handle.read(length)
    crc = handle.read(4)
    if len(data) < length or len(crc) < 4:
        raise _damaged(name, "it is cut short")
    if struct.unpack(">I", crc)[0] != zlib.crc32(kind + data):
        raise _damaged(name, f"its {kind.decode('latin-1')} chunk fails its checksum")
    return kind, data


def _find_recipe(handle, name: str, max_bytes: int) -> tuple[str | None, bool]:
    """``(recipe text or None, whether a foreign 'parameters' chunk was seen)`` from the chunks before IDAT."""
    foreign = False
    for _ in range(MAX_CHUNKS):
        start = handle.tell()
        head = handle.read(8 + MAX_KEYWORD)  # length, type and the keyword a text chunk starts with
        handle.seek(start)
        kind = head[4:8]
        if kind in (b"IDAT", b"IEND"):
            return None, foreign
        length = struct.unpack(">I", head[:4])[0] if len(head) >= 4 else 0
        keyword = head[8:8 + length].split(b"\0", 1)[0] if kind in TEXT_CHUNKS else b""
        if keyword == RECIPE_KEY.encode():
            if length > max_bytes:
                raise TooLarge(f"{name}: its workbench recipe is {length:,} bytes; the limit is {max_bytes:,}. "
                               "The workbench never writes one that large.")
            kind, data = _read_chunk(handle, name)
            return _chunk_text(kind, data[len(keyword) + 1:], name, max_bytes), foreign
        foreign = foreign or keyword == b"parameters"
        _read_chunk(handle, name, max_bytes=0)  # skipped unread
    raise _damaged(name, f"it has more than {MAX_CHUNKS} chunks before its image data")


def _chunk_text(kind: bytes, body: bytes, name: str, max_bytes: int) -> str:
    """The text of a tEXt, zTXt or iTXt chunk (``body`` follows its keyword); compressed text is capped too."""
    try:
        if kind == b"tEXt":
            return body.decode("latin-1")
        if kind == b"zTXt":
            return _inflate(body[1:], name, max_bytes).decode("latin-1")
        compressed, (_language, _translated, text) = body[0], body[2:].split(b"\0", 2)
        return (_inflate(text, name, max_bytes) if compressed else text).decode("utf-8")
    except TooLarge:
        raise
    except (ValueError, IndexError, zlib.error) as exc:  # UnicodeDecodeError is a ValueError
        raise _damaged(name, f"its workbench recipe chunk is malformed ({exc})") from None


def _inflate(data: bytes, name: str, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj()
    text = inflater.decompress(data, max_bytes)
    if inflater.unconsumed_tail:
        raise TooLarge(f"{name}: its workbench recipe expands to more than {max_bytes:,} bytes, the limit. "
                       "The workbench never writes one that large.")
    return text
