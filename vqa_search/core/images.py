"""Decode user photos into plain RGB for CLIP, turning every unreadable file into a reason instead of a crash.

Photo folders hold empty files, half-copied JPEGs, renamed documents, 16-bit scans and decompression bombs;
one of them must not stop an index of thousands. Everything here is a module-level function so DataLoader
workers can pickle it.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from vqa_search.core.errors import UserError
from vqa_search.core.files import NotARegularFile, open_regular

MAX_PIXELS = 89_478_485  # PIL's own default limit, about 9500 x 9500
# Longer images are center-cropped to this ratio when decoded. Preprocessing scales the short side up
# to the model's size, so without a bound a 1 x 20000 PNG of 166 bytes became 224 x 4.5 million
# pixels (+4 GB). CLIP's center crop sees only the middle square, so panoramas up to 8:1 are untouched
# and longer ones lose nothing CLIP would have seen.
MAX_ASPECT_RATIO = 8
WHITE = (255, 255, 255)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
MAX_REASON_LENGTH = 100

# What PIL's format plugins raise on malformed input, besides the OSError family.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError, KeyError,
                  ZeroDivisionError, Image.DecompressionBombError)
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class ImageSkipped(Exception):
    """A file that is not indexed; str() is a short reason for the user, e.g. "truncated file"."""


@dataclass
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied, detached from the file
    width: int  # after EXIF transpose (as people see the photo) and the aspect-ratio bound
    height: int


def load_rgb(path: Path) -> LoadedImage:
    """Open, fully decode and normalise one photo; raises ImageSkipped for anything unreadable."""
    try:
        with open_regular(path) as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise ImageSkipped("empty file")
            image = _decode(handle)
    except _DECODE_ERRORS as error:
        raise ImageSkipped(_reason(error)) from error
    return LoadedImage(image, image.width, image.height)


def load_rgb_bytes(data: bytes) -> LoadedImage:
    """`load_rgb` for a photo already in memory (bytes a server read and checked); same reasons."""
    if not data:
        raise ImageSkipped("empty file")
    try:
        image = _decode(io.BytesIO(data))
    except _DECODE_ERRORS as error:
        raise ImageSkipped(_reason(error)) from error
    return LoadedImage(image, image.width, image.height)


@dataclass(frozen=True)
class TarMember:
    """Where a tar member's bytes sit in its (uncompressed) tar, and the tar's state when it was listed:
    a tar rewritten since then is refused rather than read at stale offsets."""

    offset: int
    size: int
    tar_bytes: int
    tar_mtime_ns: int


def load_rgb_member(tar: Path, member: TarMember) -> LoadedImage:
    """`load_rgb` for a member of an uncompressed tar (webdataset shards), read in place, never extracted."""
    try:
        data = read_member(tar, member)
    except OSError as error:
        raise ImageSkipped(_reason(error)) from error
    return load_rgb_bytes(data)


def read_member(tar: Path, member: TarMember) -> bytes:
    """A tar member's bytes; OSError when the tar is gone, unreadable or changed since it was listed."""
    with open_regular(tar) as handle:
        stat = os.fstat(handle.fileno())
        if (stat.st_size, stat.st_mtime_ns) != (member.tar_bytes, member.tar_mtime_ns):
            raise OSError(0, "tar file changed since it was read: index again")
        handle.seek(member.offset)
        data = handle.read(member.size)
    if len(data) != member.size:
        raise OSError(0, "truncated tar member")
    return data


def load_named_image(path: Path | str, what: str = "image") -> Image.Image:
    """A photo the user named (a query, a question's image): missing or unreadable is a one-line error."""
    path = Path(path)
    if not path.exists():
        link = " (a broken symlink or a symlink loop)" if path.is_symlink() else ""
        raise UserError(f"{what} not found: {path}{link}")
    try:
        return load_rgb(path).image
    except ImageSkipped as skipped:
        raise UserError(f"cannot read {what} {path}: {skipped}") from None


def _decode(handle: BinaryIO) -> Image.Image:
    """Check the size before decoding pixels, then load eagerly so truncation surfaces here.

    ImageFile.LOAD_TRUNCATED_IMAGES is left False: a half-copied photo must be reported, not padded with grey.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is enforced below
        with Image.open(handle) as opened:
            _refuse_bombs(opened.width * opened.height)
            opened.load()  # the first frame of an animation
            upright = ImageOps.exif_transpose(opened)  # always a copy, so the file can close
    return _to_rgb(_bound_aspect_ratio(upright))


def _bound_aspect_ratio(image: Image.Image) -> Image.Image:
    """The middle of an extremely long image, at most MAX_ASPECT_RATIO times as long as it is wide."""
    width, height = image.size
    longest = MAX_ASPECT_RATIO * min(width, height)
    if max(width, height) <= longest:
        return image
    if width > height:
        left = (width - longest) // 2
        return image.crop((left, 0, left + longest, height))
    top = (height - longest) // 2
    return image.crop((0, top, width, top + longest))


def _refuse_bombs(pixels: int) -> None:
    if pixels > MAX_PIXELS:
        raise ImageSkipped(_bomb_reason(pixels))


def _bomb_reason(pixels: int) -> str:
    return f"decompression bomb ({pixels} pixels > limit {MAX_PIXELS})"


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB whatever the source mode: wide greys scaled down, transparency shown as white paper."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _wide_grey_to_8bit(image)
    if _has_transparency(image):
        return _over_white(image.convert("RGBA"))
    return image.convert("RGB")


def _wide_grey_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit values map 65535 -> 255 (a plain convert would clip everything above 255 to white)."""
    values = np.asarray(image, dtype=np.float64)
    if _holds_16bit_values(image, values):
        scaled = values / 257
    else:  # 32-bit ints or floats have no fixed range: stretch what is there
        low, high = values.min(), values.max()
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.round(scaled).astype(np.uint8), "L")


def _holds_16bit_values(image: Image.Image, values: np.ndarray) -> bool:
    """PIL opens 16-bit PNGs as "I;16" now and as "I" in older versions; both hold 0..65535."""
    if image.mode.startswith("I;16"):
        return True
    return image.mode == "I" and values.min() >= 0 and values.max() <= 65535


def _has_transparency(image: Image.Image) -> bool:
    """An alpha band, or a palette / grey / RGB value marked transparent (PNG tRNS, GIF)."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def _over_white(rgba: Image.Image) -> Image.Image:
    """Transparent pixels turn black under a plain convert; CLIP should see the paper they sit on."""
    paper = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(paper, rgba).convert("RGB")


def _reason(error: Exception) -> str:
    if isinstance(error, Image.DecompressionBombError):
        match = _BOMB_PIXELS.search(str(error))
        return _bomb_reason(int(match.group(1))) if match else "decompression bomb"
    if isinstance(error, NotARegularFile):
        return str(error)
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image"
    if "truncated" in str(error).lower():
        return "truncated file"
    if isinstance(error, OSError) and error.strerror:  # the file system's own words: "permission denied"
        return error.strerror.lower()
    return _shorten(f"cannot decode ({type(error).__name__}: {error})")


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_REASON_LENGTH else text[: MAX_REASON_LENGTH - 3] + "..."
