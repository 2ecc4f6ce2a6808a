"""models.images.load_image on good and bad files, each built in the test with PIL or raw bytes."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import pytest
from PIL import Image

from models import images
from models.images import load_image


def png_bytes(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header declares any size (the pixel data need not match)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_plain_rgb_png_is_returned_unchanged(tmp_path):
    path = save(Image.new("RGB", (40, 30), (10, 20, 30)), tmp_path / "ok.png")
    image, notices = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30) and notices == []
    assert image.getpixel((5, 5)) == (10, 20, 30)


def test_pil_image_input_is_accepted():
    image, notices = load_image(Image.new("L", (8, 8), 128))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (128, 128, 128)
    assert notices == []


@pytest.mark.parametrize("source, message", [(None, "Upload"), ("", "Upload"), ("   ", "Upload"),
                                             (42, "file path or a PIL image")])
def test_missing_source(source, message):
    with pytest.raises(ValueError, match=message):
        load_image(source)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_image(tmp_path / "nothing.png")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is text, not pixels")
    with pytest.raises(ValueError, match="not an image file"):
        load_image(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty file \(0 bytes\)"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, fmt):
    buffer = io.BytesIO()
    noise = Image.effect_noise((64, 64), 64).convert("RGB")
    noise.save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_image(path)


def test_corrupt_pixel_data(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(png_bytes(16, 16, idat=b"not zlib data at all"))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_image(path)


@pytest.mark.parametrize("size", [(0, 10), (10, 0)])
def test_zero_side_png(tmp_path, size):
    path = tmp_path / "flat.png"
    path.write_bytes(png_bytes(*size, idat=zlib.compress(b"\0")))
    with pytest.raises(ValueError, match="side of 0 pixels"):
        load_image(path)


def test_zero_side_pil_image():
    with pytest.raises(ValueError, match="side of 0 pixels"):
        load_image(Image.new("RGB", (0, 5)))


@pytest.mark.parametrize("size", [(100_000, 100_000), (9_000, 8_000)])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, size):
    # the first is above Pillow's own bomb limit, the second only above ours
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(*size, idat=zlib.compress(b"\0" * 64)))
    with pytest.raises(ValueError, match="megapixel limit"):
        load_image(path)


def test_large_image_is_downscaled_with_notice(tmp_path):
    path = save(Image.new("RGB", (400, 100), (0, 0, 255)), tmp_path / "wide.png")
    image, notices = load_image(path, max_pixels=10_000)
    assert image.width * image.height <= 10_000
    assert image.size == (200, 50)  # aspect ratio kept
    assert any("downscaled from 400x100 to 200x50" in note for note in notices)


def test_large_jpeg_uses_reduced_decoding(tmp_path):
    path = save(Image.new("RGB", (800, 600), (200, 100, 50)), tmp_path / "big.jpg", quality=90)
    image, notices = load_image(path, max_pixels=20_000)
    assert image.width * image.height <= 20_000 and abs(image.width / image.height - 4 / 3) < 0.05
    assert notices and "downscaled" in notices[-1]


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), color) for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    image, notices = load_image(path)
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((10, 10))
    assert red > 200 and green < 50 and blue < 50
    assert any("first of its 3 frames" in note for note in notices)


def test_rgba_is_flattened_on_white(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    path = save(rgba, tmp_path / "alpha.png")
    image, notices = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((5, 5)) == (255, 0, 0)
    assert any("Transparent" in note for note in notices)


def test_cmyk_jpeg_is_converted(tmp_path):
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "print.jpg")
    image, notices = load_image(path)
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((8, 8))
    assert red > 200 and green < 60 and blue < 60
    assert any("CMYK" in note for note in notices)


def test_palette_images(tmp_path):
    plain = Image.new("P", (10, 10), 0)
    plain.putpalette([0, 128, 0] + [0] * 765)
    image, _ = load_image(save(plain, tmp_path / "palette.png"))
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (0, 128, 0)
    with_transparency = Image.new("P", (10, 10), 1)
    with_transparency.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    with_transparency.info["transparency"] = 0
    with_transparency.putpixel((0, 0), 0)
    image, notices = load_image(save(with_transparency, tmp_path / "palette-alpha.png", transparency=0))
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((5, 5)) == (0, 0, 255)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    gray = Image.new("I;16", (4, 1))
    for x, value in enumerate([0, 256 * 64, 32768, 65535]):
        gray.putpixel((x, 0), value)
    path = save(gray, tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    image, notices = load_image(path)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]
    assert any("8-bit" in note for note in notices)


def test_exif_orientation_is_honoured(tmp_path):
    picture = Image.new("RGB", (40, 20), (255, 255, 255))
    picture.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6  # "rotate 90 CW to display"
    path = save(picture, tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    image, notices = load_image(path)
    assert image.size == (20, 40)
    red, green, _ = image.getpixel((10, 3))  # the left strip is now on top
    assert red > 200 and green < 60
    assert any("EXIF" in note for note in notices)


def test_examples_are_drawn_deterministically(tmp_path):
    first = images.ensure_examples(tmp_path / "a")
    second = images.ensure_examples(tmp_path / "b")
    assert len(first) == len(images.EXAMPLES) >= 3
    for (path_a, question), (path_b, _) in zip(first, second, strict=True):
        assert question.endswith("?")
        image, notices = load_image(path_a)
        assert image.mode == "RGB" and notices == []
        assert hashlib.sha256(image.tobytes()).digest() == hashlib.sha256(load_image(path_b)[0].tobytes()).digest()
    with pytest.raises(ValueError, match="unknown example"):
        images.draw_example("nope.png")


def test_max_pixels_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(Image.new("RGB", (2, 2)), max_pixels=0)
