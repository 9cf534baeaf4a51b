"""Indexed images and their thumbnails, by id only.

A client never names a path: it names an image id of a generation, and the server reads the path
that generation recorded. The bytes are served only when they are the bytes that were indexed (the
same size and SHA-256 as `images.parquet` records), read through `core/files.open_regular`, so a
file replaced after indexing by another one, or by a symlink to anything outside the collection,
is refused instead of served. Thumbnails are made once from those checked bytes and kept under
INDEX_DIR/thumbnails/, named by the content hash (so they outlive generations and never go stale),
each written atomically.
"""

from __future__ import annotations

import hashlib
import io
import logging
import mimetypes
from pathlib import Path

from vqa_search.core.atomic import atomic_path
from vqa_search.core.files import open_regular
from vqa_search.core.images import ImageSkipped, load_rgb_bytes
from vqa_search.serve.state import THUMBNAIL_DIR, ApiError, Served

log = logging.getLogger("vqa_search")

_NOT_KEPT: set[Path] = set()  # thumbnail folders already said to be unwritable
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".bmp": "image/bmp", ".gif": "image/gif"}


def etag_of(served: Served, image_id: int, suffix: str = "") -> str:
    """The indexed content hash: an id names another picture after a re-index, its tag changes with it."""
    return f'"{_indexed_sha256(served, image_id)}{suffix}"'


def _indexed_sha256(served: Served, image_id: int) -> str:
    served.check_image_id(image_id)
    sha = served.index.image_sha256[image_id]
    if not sha or not all(c in "0123456789abcdef" for c in sha):
        raise ApiError(404, f"image {image_id} of index {served.name!r} has no content hash (re-index the collection)")
    return sha


def indexed_bytes(served: Served, image_id: int) -> tuple[bytes, str]:
    """The image's bytes and content type, refused unless they are exactly what was indexed."""
    expected_sha = _indexed_sha256(served, image_id)
    index = served.index
    path = index.image_file(image_id)
    expected_size = index.image_states[image_id].bytes
    try:
        with open_regular(path) as handle:
            data = handle.read(expected_size + 1)
    except OSError:
        raise ApiError(404, f"image {image_id} of index {served.name!r} is no longer readable on disk "
                            "(re-index the collection)") from None
    if len(data) != expected_size or hashlib.sha256(data).hexdigest() != expected_sha:
        raise ApiError(404, f"image {image_id} of index {served.name!r} changed on disk since it was indexed "
                            "(re-index the collection)")
    media_type = IMAGE_TYPES.get(Path(index.image_paths[image_id]).suffix.lower()) or \
        mimetypes.guess_type(index.image_paths[image_id])[0] or ""
    return data, media_type if media_type.startswith("image/") else "application/octet-stream"


def thumbnail_bytes(served: Served, image_id: int, size: int) -> bytes:
    """A JPEG at most `size` pixels on its longest side: from INDEX_DIR/thumbnails/ when made before."""
    sha = _indexed_sha256(served, image_id)
    cached = served.index.dir.path / THUMBNAIL_DIR / sha[:2] / f"{sha}-{size}.jpg"
    try:
        with open_regular(cached) as handle:
            return handle.read()
    except OSError:
        pass
    data, _ = indexed_bytes(served, image_id)
    try:
        picture = load_rgb_bytes(data).image
    except ImageSkipped as skipped:
        raise ApiError(404, f"image {image_id} of index {served.name!r} cannot be read: {skipped}") from None
    picture.thumbnail((size, size))
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=85)
    thumbnail = out.getvalue()
    try:
        with atomic_path(cached) as temp:
            temp.write_bytes(thumbnail)
    except OSError as error:  # a read-only index: serve it anyway, made again next time
        if cached.parent.parent not in _NOT_KEPT:
            _NOT_KEPT.add(cached.parent.parent)
            log.warning("thumbnails are not kept (%s: %s); each is made again on every request",
                        error.strerror or error, error.filename or cached)
    return thumbnail
