"""models.images.load_image on good and bad files, each built in the test with PIL or raw bytes."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import pytest
from PIL import Image

from models import images
from models.errors import TooLarge
from models.images import load_image
from models.limits import Limits


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


def bmp_header(width: int, height: int) -> bytes:
    """A BMP that declares any size (no pixel data): a format whose size load_image does not parse itself."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any pixel data is decoded (the limits must refuse from the header)."""
    from PIL import ImageFile

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.usefixtures("no_decoding")
def test_thin_strip_is_refused_before_decoding(tmp_path):
    # the /vqa report: a 1.6 KB PNG of 1 x 400,000 pixels took 4.5 GB once a processor scaled its short side up
    path = tmp_path / "strip.png"
    Image.new("RGB", (400_000, 1), (200, 30, 30)).save(path)
    assert path.stat().st_size < 4_000
    with pytest.raises(TooLarge, match=r"'strip.png' is 400000x1 pixels; each side may be at most 12000 pixels"):
        load_image(path)
    with pytest.raises(TooLarge, match="each side may be at most 100 pixels"):
        load_image(Image.new("L", (101, 100)), limits=Limits(image_side=100))


def test_aspect_ratio_is_limited(tmp_path):
    path = tmp_path / "banner.png"
    Image.new("RGB", (2_000, 50), (0, 90, 0)).save(path)
    with pytest.raises(TooLarge, match=r"2000x50 pixels, 40 times wider than it is tall; the limit is 20 to 1"):
        load_image(path)
    with pytest.raises(TooLarge, match="40 times taller than it is wide"):
        load_image(Image.new("RGB", (50, 2_000)))
    image, _ = load_image(path, limits=Limits(image_aspect=50))
    assert image.size == (2_000, 50)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns above the limit too
@pytest.mark.usefixtures("no_decoding")
def test_pixel_limit_is_checked_from_the_header(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(7_000, 7_000, idat=zlib.compress(b"\0" * 64)))
    with pytest.raises(TooLarge, match=r"'big.png' is 7000x7000 pixels \(49.0 megapixels\); the limit is 40 mega"):
        load_image(path)
    with pytest.raises(TooLarge, match="the limit is 0.01 megapixels"):
        load_image(Image.new("RGB", (101, 100)), limits=Limits(image_pixels=10_000))


@pytest.mark.parametrize("content, message", [
    (png_bytes(30_000, 30_000, idat=zlib.compress(b"\0" * 64)), r"'bomb.img' is 30000x30000 pixels; each side"),
    (bmp_header(11_000, 11_000), r"'bomb.img' declares more than 40 megapixels \(possibly a decompression bomb\)"),
], ids=["png-30000x30000", "bmp-11000x11000"])
def test_pillow_decompression_bomb_gets_a_clear_message(tmp_path, content, message):
    # both are over twice Pillow's MAX_IMAGE_PIXELS, so Pillow itself refuses them in Image.open
    path = tmp_path / "bomb.img"
    path.write_bytes(content)
    with pytest.raises(TooLarge, match=message):
        load_image(path)
    assert Image.MAX_IMAGE_PIXELS == Limits().image_pixels, "Pillow's threshold follows the limit, not its default"


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


def test_max_pixels_must_be_positive():
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(Image.new("RGB", (2, 2)), max_pixels=0)


def test_open_errors_never_show_the_server_path(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (4, 4)), tmp_path / "locked.png")

    def denied(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(ValueError, match="^'locked.png' could not be opened as an image: Permission denied$"):
        load_image(path)
