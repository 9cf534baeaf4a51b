"""Decode users' photos into RGB, converting what can be converted and naming what cannot.

Photo folders hold zero-byte files, truncated downloads, text files named .jpg, CMYK scans,
16-bit PNGs, transparent logos, rotated phone pictures and the odd decompression bomb. Each one is
either turned into a correct RGB picture or skipped with a short reason for the report.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# PIL's own default: about 89 megapixels (a 9500 x 9500 image); larger headers are refused unread.
MAX_PIXELS = 89_478_485
# A truncated file must be reported, not padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
_BACKGROUND = (255, 255, 255)


class ImageSkipped(Exception):
    """str(error) is the short reason recorded in the manifest."""


@dataclass
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    width: int
    height: int


def load_rgb(path: Path) -> LoadedImage:
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageSkipped("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                _check_pixels(opened.size)
                opened.seek(0)  # first frame of an animation
                opened.load()
                image = _to_rgb(ImageOps.exif_transpose(opened))
    except ImageSkipped:
        raise
    except Image.UnidentifiedImageError:
        raise ImageSkipped("not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageSkipped(f"decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageSkipped(_reason(error)) from None
    return LoadedImage(image, image.width, image.height)


def _check_pixels(size: tuple[int, int]) -> None:
    pixels = size[0] * size[1]
    if pixels > MAX_PIXELS:
        raise ImageSkipped(f"decompression bomb ({pixels} pixels > limit {MAX_PIXELS})")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _high_bit_depth_to_rgb(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit grey to 8 bits; PIL's convert("L") would clip everything above 255 to white."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if values.max() > 255 or image.mode.startswith("I;16") else 255.0
    grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _reason(error: Exception) -> str:
    message = str(error).lower()
    if "truncated" in message or "image file is truncated" in message or isinstance(error, EOFError):
        return "truncated file"
    return f"cannot decode ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
