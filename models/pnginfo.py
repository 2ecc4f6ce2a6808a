"""A generation recipe stored in, and read back from, a PNG text chunk.

Every image the workbench saves carries one ``iTXt`` chunk named ``workbench-recipe`` whose text
is JSON (UTF-8, so emoji and any language survive), plus a human-readable ``parameters`` chunk in
the style other Stable Diffusion tools write. Reading accepts only the workbench chunk.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
from pathlib import Path

from models.errors import InvalidRequest

RECIPE_KEY = "workbench-recipe"
RECIPE_FORMAT = "workbench-recipe/1"
# Fields a recipe must hold to reproduce an image; the order is the order of the ``parameters`` text.
RECIPE_FIELDS = ("prompt", "negative_prompt", "style", "model", "scheduler", "steps", "guidance", "seed",
                 "width", "height", "workbench_version")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SLUG = 40


def make_recipe(**values) -> dict:
    """A recipe dict with every field in RECIPE_FIELDS (extra keys are kept)."""
    missing = [name for name in RECIPE_FIELDS if name not in values]
    if missing:
        raise InvalidRequest(f"recipe is missing {', '.join(missing)}")
    return {"format": RECIPE_FORMAT, **values}


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


def read_recipe(path: str | os.PathLike) -> dict:
    """The recipe stored in a workbench PNG.

    Raises:
        ValueError: the file is missing, is not a PNG, is corrupt, or carries no workbench recipe.
    """
    from PIL import Image, UnidentifiedImageError

    if path is None or str(path) == "":
        raise InvalidRequest("Drop a PNG made by the workbench to read its settings.")
    path = Path(path)
    name = path.name
    try:
        with open(path, "rb") as handle:
            signature = handle.read(len(PNG_SIGNATURE))
    except OSError as exc:
        raise InvalidRequest(f"Cannot open {name}: {exc.strerror or exc}") from exc
    if signature != PNG_SIGNATURE:
        raise InvalidRequest(f"{name} is not a PNG file. PNG Info reads the PNGs the workbench saves.")
    try:
        with Image.open(path) as image:
            image.load()  # reads every chunk, so a truncated or damaged file fails here
            text = dict(getattr(image, "text", {}) or {})
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidRequest(f"{name} is a damaged PNG and cannot be read ({exc}).") from exc
    raw = text.get(RECIPE_KEY)
    if raw is None:
        hint = " It has generation 'parameters' from another tool, which the workbench does not import." \
            if "parameters" in text else ""
        raise InvalidRequest(f"{name} carries no workbench recipe: it was not made by the workbench, or its "
                         f"metadata was removed.{hint}")
    try:
        recipe = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{name}: the workbench recipe in this PNG is damaged ({exc.msg}).") from exc
    found = recipe.get("format") if isinstance(recipe, dict) else type(recipe).__name__
    if found != RECIPE_FORMAT:
        raise InvalidRequest(f"{name}: unsupported recipe format {found!r}; this workbench reads {RECIPE_FORMAT}.")
    missing = [field for field in RECIPE_FIELDS if field not in recipe]
    if missing:
        raise InvalidRequest(f"{name}: the workbench recipe lacks {', '.join(missing)}.")
    return recipe
