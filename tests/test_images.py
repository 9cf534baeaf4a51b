"""A zoo of awkward files, built with PIL, that photo folders really contain."""

from __future__ import annotations

import pickle
import random
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, features

from vqa_search.core import images
from vqa_search.core.images import ImageSkipped, LoadedImage, load_rgb

RED = (220, 30, 30)
BLUE = (30, 60, 220)


def noisy_photo(size: tuple[int, int] = (160, 120)) -> Image.Image:
    """Random pixels compress badly, so cutting the file in half lands inside the pixel data."""
    rng = random.Random(0)
    return Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims a size in its IHDR chunk but holds no pixels: a bomb costs nothing to make."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", b""))
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def skip_reason(path: Path) -> str:
    with pytest.raises(ImageSkipped) as skipped:
        load_rgb(path)
    return str(skipped.value)


def test_empty_file_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.touch()
    assert skip_reason(path) == "empty file"


def test_missing_file_is_skipped(tmp_path: Path) -> None:
    assert skip_reason(tmp_path / "gone.jpg") == "no such file or directory"


def test_text_with_image_extension_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("shopping list: milk, eggs\n")
    assert skip_reason(path) == "not an image"


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file_is_skipped_not_padded(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"half{suffix}"
    noisy_photo().save(path)
    assert skip_reason(cut_in_half(path)) == "truncated file"


def test_bomb_over_our_limit_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 10), RED).save(path)
    assert skip_reason(path) == "decompression bomb (200 pixels > limit 100)"


@pytest.mark.parametrize("side", [10_000, 30_000])  # below and above PIL's own hard limit (2 x MAX_PIXELS)
def test_bomb_header_is_refused(tmp_path: Path, side: int) -> None:
    path = png_header_only(tmp_path / "bomb.png", side, side)
    assert skip_reason(path) == f"decompression bomb ({side * side} pixels > limit 89478485)"


def test_plain_rgb_keeps_pixels_and_size(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (30, 20), RED).save(path)
    loaded = load_rgb(path)
    assert isinstance(loaded, LoadedImage)
    assert (loaded.image.mode, loaded.width, loaded.height) == ("RGB", 30, 20)
    assert loaded.image.getpixel((5, 5)) == RED


def test_cmyk_jpeg_becomes_rgb_with_its_colour(tmp_path: Path) -> None:
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red ink
    loaded = load_rgb(path)
    red, green, blue = loaded.image.getpixel((8, 8))
    assert loaded.image.mode == "RGB"
    assert red > 230 and green < 25 and blue < 25


def test_palette_png_without_transparency(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    Image.new("RGB", (10, 10), BLUE).convert("P").save(path)
    assert load_rgb(path).image.getpixel((3, 3)) == Image.new("RGB", (1, 1), BLUE).convert("P").convert("RGB").getpixel((0, 0))


def test_palette_png_transparent_index_becomes_white(tmp_path: Path) -> None:
    path = tmp_path / "logo.png"
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0] + list(RED))
    image.paste(1, (0, 0, 5, 10))
    image.save(path, transparency=0)
    loaded = load_rgb(path).image
    assert loaded.getpixel((2, 5)) == RED
    assert loaded.getpixel((8, 5)) == (255, 255, 255)


def test_half_transparent_rgba_is_composited_over_white(tmp_path: Path) -> None:
    path = tmp_path / "glass.png"
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    image.paste((255, 0, 0, 128), (0, 0, 5, 10))
    image.save(path)
    loaded = load_rgb(path).image
    assert loaded.getpixel((2, 5)) == (255, 127, 127)
    assert loaded.getpixel((8, 5)) == (255, 255, 255)


def test_grey_with_alpha_is_composited_over_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    image = Image.new("LA", (10, 10), (0, 0))
    image.paste((0, 255), (0, 0, 5, 10))
    image.save(path)
    loaded = load_rgb(path).image
    assert (loaded.getpixel((2, 5)), loaded.getpixel((8, 5))) == ((0, 0, 0), (255, 255, 255))


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    image = Image.new("I;16", (3, 1))
    image.putdata([0, 128 * 257, 65535])
    image.save(path)
    loaded = load_rgb(path).image
    assert [loaded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_32bit_int_grey_is_stretched(tmp_path: Path) -> None:
    path = tmp_path / "sensor.tif"
    image = Image.new("I", (3, 1))
    image.putdata([-1000, 0, 1000])
    image.save(path)
    loaded = load_rgb(path).image
    assert [loaded.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_one_bit_image(tmp_path: Path) -> None:
    path = tmp_path / "fax.png"
    image = Image.new("1", (10, 10), 0)
    image.paste(1, (0, 0, 5, 10))
    image.save(path)
    loaded = load_rgb(path).image
    assert (loaded.getpixel((2, 5)), loaded.getpixel((8, 5))) == ((255, 255, 255), (0, 0, 0))


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    Image.new("RGB", (40, 20), RED).save(path, exif=exif)
    loaded = load_rgb(path)
    assert (loaded.width, loaded.height) == (20, 40)
    assert loaded.image.size == (20, 40)


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (10, 10), colour) for colour in (RED, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    loaded = load_rgb(path).image
    assert loaded.mode == "RGB"
    assert loaded.getpixel((5, 5)) == RED


@pytest.mark.parametrize("suffix", [".bmp", pytest.param(".webp", marks=pytest.mark.skipif(
    not features.check("webp"), reason="Pillow built without WebP"))])
def test_other_formats(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"photo{suffix}"
    Image.new("RGB", (12, 8), BLUE).save(path, lossless=True)
    loaded = load_rgb(path)
    assert (loaded.width, loaded.height) == (12, 8)
    assert loaded.image.getpixel((6, 4)) == BLUE


def test_loaded_image_does_not_need_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gone_soon.png"
    Image.new("RGB", (8, 8), RED).save(path)
    loaded = load_rgb(path)
    path.unlink()
    assert loaded.image.getpixel((0, 0)) == RED


def test_survives_the_trip_to_dataloader_workers(tmp_path: Path) -> None:
    assert pickle.loads(pickle.dumps(load_rgb)) is load_rgb
    assert str(pickle.loads(pickle.dumps(ImageSkipped("truncated file")))) == "truncated file"
