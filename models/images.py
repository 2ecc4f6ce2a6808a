"""Loading user images safely: validation, RGB conversion, EXIF orientation and size limits.

``load_image`` is shared by the VQA tab and the fine-tuning data validator. It either returns an
RGB ``PIL.Image`` ready for a processor, plus the notices a user should see about what was done to
it, or raises ``InvalidRequest`` (``TooLarge`` for the limits) with a message that says what is
wrong with the file.

The size a file declares is checked before any pixel is decoded, against ``Limits``: decoded
pixels, each side, and the aspect ratio. A tiny file can declare a huge canvas (a "decompression
bomb"), and a thin strip is as dangerous: processors scale its short side up to their input size,
so a 1 x 400,000 PNG of 1.6 KB grew to gigabytes inside a VLM processor.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

from models.errors import InvalidRequest, TooLarge
from models.limits import Limits

# Larger images are downscaled (with a notice); the processors resize to a few hundred pixels anyway.
DEFAULT_MAX_PIXELS = 4_000_000
SUPPORTED_HINT = "PNG, JPEG, WebP, GIF, BMP or TIFF"
EXIF_ORIENTATION = 0x0112


def load_image(source, max_pixels: int = DEFAULT_MAX_PIXELS, limits: Limits | None = None) -> tuple[object, list[str]]:
    """Open ``source`` (a path or a PIL image) as an RGB image of at most ``max_pixels`` pixels.

    Args:
        source: a file path (str or Path) or an already opened ``PIL.Image.Image``.
        max_pixels: images with more pixels are downscaled, keeping their aspect ratio.
        limits: what an uploaded image may declare (default ``Limits()``; the app passes
            ``settings.limits``).

    Returns:
        ``(image, notices)``: the RGB image and short sentences about conversions that were made
        (first frame of an animation, transparency flattened, downscaled, rotated...).

    Raises:
        InvalidRequest: the file is missing, empty, not an image, corrupt or truncated, or has a
            side of 0 pixels.
        TooLarge: it declares more pixels, a longer side or a larger aspect ratio than ``limits``
            allow (checked from the header, before decoding).
    """
    limits = limits or Limits()
    Image = _pillow(limits)
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise InvalidRequest(f"max_pixels must be a positive whole number, got {max_pixels!r}")
    if isinstance(source, Image.Image):
        return _prepare(source, max_pixels, "the image", limits)
    if source is None or (isinstance(source, str) and not source.strip()):
        raise InvalidRequest("No image given. Upload, paste or capture an image first.")
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidRequest(f"image must be a file path or a PIL image, got {type(source).__name__}")
    path = Path(source)
    name = repr(path.name)
    if not path.is_file():
        raise InvalidRequest(f"Image file {name} does not exist.")
    if path.stat().st_size == 0:
        raise InvalidRequest(f"{name} is an empty file (0 bytes), not an image.")
    try:
        image = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as exc:
        raise _bomb_error(name, _declared_size(path), limits) from exc
    except Image.UnidentifiedImageError as exc:
        size = _declared_size(path)
        if size is not None and 0 in size:
            raise InvalidRequest(f"{name} has a side of 0 pixels ({size[0]}x{size[1]}); it holds no picture."
                                 ) from exc
        raise InvalidRequest(f"{name} is not an image file this app can read ({SUPPORTED_HINT}).") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.filename else exc  # never the server's path
        raise InvalidRequest(f"{name} could not be opened as an image: {detail}") from exc
    with image:
        return _prepare(image, max_pixels, name, limits)


def _pillow(limits: Limits):
    """``PIL.Image`` with its decompression-bomb threshold set from ``limits.image_pixels``.

    Pillow raises ``DecompressionBombError`` on open above twice ``MAX_IMAGE_PIXELS`` and only
    warns below that; its default (89 MP) is unrelated to ours. Setting it to our limit makes
    Pillow's hard stop 2x ours, and its warning fire only for files that ``check_size`` refuses
    right after the open. The value is process-wide, so it is set on every call, to the same number.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = limits.image_pixels
    return Image


def check_size(width: int, height: int, name: str, limits: Limits) -> None:
    """Refuse a declared size over ``limits``, before anything is decoded.

    Raises:
        InvalidRequest: a side of 0 pixels.
        TooLarge: a side over ``image_side``, more than ``image_pixels`` pixels, or a long side
            more than ``image_aspect`` times the short one.
    """
    if width <= 0 or height <= 0:
        raise InvalidRequest(f"{name} has a side of 0 pixels ({width}x{height}); it holds no picture.")
    if max(width, height) > limits.image_side:
        raise TooLarge(f"{name} is {width}x{height} pixels; each side may be at most {limits.image_side} "
                       "pixels. Resize it and try again.")
    if width * height > limits.image_pixels:
        raise TooLarge(f"{name} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); the limit "
                       f"is {limits.image_pixels / 1e6:g} megapixels (a small file can declare a huge picture: a "
                       "decompression bomb). Resize it and try again.")
    aspect = max(width, height) / min(width, height)
    if aspect > limits.image_aspect:
        shape = "wider than it is tall" if width > height else "taller than it is wide"
        raise TooLarge(f"{name} is {width}x{height} pixels, {aspect:,.0f} times {shape}; the limit is "
                       f"{limits.image_aspect:g} to 1 (models scale the short side up, which takes gigabytes). "
                       "Crop it closer to a square.")


def _declared_size(path: Path) -> tuple[int, int] | None:
    """Width and height from a PNG or GIF header, for files Pillow refuses to open."""
    with open(path, "rb") as handle:
        head = handle.read(32)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return struct.unpack("<HH", head[6:10])
    return None


def _bomb_error(name: str, size: tuple[int, int] | None, limits: Limits) -> TooLarge:
    """The message for Pillow's ``DecompressionBombError``: ours when the size is known."""
    if size is not None:
        try:
            check_size(*size, name, limits)
        except TooLarge as exc:
            return exc
    return TooLarge(f"{name} declares more than {limits.image_pixels / 1e6:g} megapixels (possibly a "
                    "decompression bomb). Resize it and try again.")


def _prepare(image, max_pixels: int, name: str, limits: Limits) -> tuple[object, list[str]]:
    """Validate, decode, orient, convert to RGB and downscale an opened image."""
    from PIL import Image

    notices: list[str] = []
    # 1. Check the declared size before decoding anything.
    width, height = image.size
    check_size(width, height, name, limits)
    # 2. Animated images: answer about the first frame.
    frames = getattr(image, "n_frames", 1) if getattr(image, "is_animated", False) else 1
    if frames > 1:
        image.seek(0)
        notices.append(f"Animated image: using the first of its {frames} frames.")
    # 3. Decode now so that truncated or corrupt data fails here, with a clear message.
    if width * height > max_pixels and image.format == "JPEG":
        image.draft("RGB", _fit(width, height, max_pixels))  # JPEG can decode at a reduced scale
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise _bomb_error(name, (width, height), limits) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest(f"{name} is corrupt or truncated and cannot be decoded ({exc}). "
                             "Re-save or re-export it and try again.") from exc
    # 4. Orientation, then colour mode, then size.
    image = _apply_exif_orientation(image, notices)
    image = _to_rgb(image, notices)
    if image.width * image.height > max_pixels:
        new_size = _fit(image.width, image.height, max_pixels)
        notices.append(f"Large image downscaled from {image.width}x{image.height} to {new_size[0]}x{new_size[1]}.")
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    return image, notices


def _fit(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _apply_exif_orientation(image, notices: list[str]):
    from PIL import ImageOps

    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError):  # unreadable EXIF is ignored, the pixels are fine
        return image
    if orientation in (None, 1):
        return image
    notices.append("Rotated according to the photo's EXIF orientation.")
    return ImageOps.exif_transpose(image)


def _to_rgb(image, notices: list[str]):
    """Convert any PIL mode to 8-bit RGB; transparency is flattened onto white."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        notices.append(f"High bit-depth image ({mode}) scaled to 8-bit.")
        return _high_depth_to_rgb(image)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        if image.getextrema()[3][0] < 255:
            notices.append("Transparent areas were filled with white.")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    if mode == "CMYK":
        notices.append("CMYK image converted to RGB.")
    return image.convert("RGB")


def _high_depth_to_rgb(image):
    import numpy as np
    from PIL import Image

    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = (values.astype(np.uint32) >> 8).astype(np.uint8)
    else:  # 32-bit integer or float: stretch the actual range to 0..255
        values = values.astype(np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = np.zeros(values.shape, np.uint8) if high <= low else \
            ((values - low) * (255.0 / (high - low))).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L").convert("RGB")


# ---- examples the project draws itself (no downloads, same pixels on every machine) -------------

EXAMPLES = (
    ("red-square.png", "What color is the square?"),
    ("shapes.png", "How many shapes are in this picture?"),
    ("traffic-light.png", "Which light is on?"),
    ("sign.png", "What does the sign say?"),
)


def draw_example(name: str):
    """Draw one example image by name (see ``EXAMPLES``)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (256, 256), "white")
    draw = ImageDraw.Draw(image)
    if name == "red-square.png":
        draw.rectangle((64, 64, 192, 192), fill=(220, 20, 30))
    elif name == "shapes.png":
        draw.ellipse((20, 20, 110, 110), fill=(30, 80, 220))
        draw.polygon([(180, 20), (240, 110), (120, 110)], fill=(30, 170, 60))
        draw.rectangle((90, 150, 170, 230), fill=(240, 200, 20))
    elif name == "traffic-light.png":
        draw.rectangle((96, 16, 160, 240), fill=(40, 40, 40))
        for index, color in enumerate([(90, 0, 0), (90, 70, 0), (0, 230, 60)]):
            top = 28 + index * 72
            draw.ellipse((104, top, 152, top + 48), fill=color)
    elif name == "sign.png":
        draw.rectangle((28, 88, 228, 168), fill=(200, 20, 20))
        draw.text((128, 128), "STOP", fill="white", font=_example_font(44), anchor="mm")
    else:
        raise InvalidRequest(f"unknown example image {name!r}; known: {', '.join(n for n, _ in EXAMPLES)}")
    return image


def _example_font(size: int):
    """Pillow's bundled scalable font (wheels ship FreeType); the small bitmap font otherwise."""
    from PIL import ImageFont, features

    return ImageFont.load_default(size=size) if features.check("freetype2") else ImageFont.load_default()


def ensure_examples(folder: Path) -> list[tuple[str, str]]:
    """Write the example images into ``folder`` (once) and return ``(path, question)`` pairs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for name, question in EXAMPLES:
        path = folder / name
        if not path.is_file():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            draw_example(name).save(tmp, format="PNG")
            os.replace(tmp, path)
        pairs.append((str(path), question))
    return pairs
