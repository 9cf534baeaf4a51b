"""Read an image folder and its captions: Flickr8k/Flickr30k/COCO layouts, any folder of pictures, or
webdataset tar shards (what img2dataset writes: 00000.tar, ... holding {key}.jpg, {key}.txt, {key}.json).

Caption files often describe more images than are on disk (partial downloads, samples), so names
are matched against a directory scan and the unmatched ones are counted rather than treated as
errors. Malformed caption files, on the other hand, fail loudly with the file and line to fix.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import os
import re
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Iterable, Iterator, TextIO

from vqa_search.core.errors import UserError
from vqa_search.core.files import not_regular_reason, open_regular, os_error_reason
from vqa_search.core.identity import sha256_file
from vqa_search.core.images import TarMember, read_member
from vqa_search.core.store import FileState

if TYPE_CHECKING:
    from vqa_search.core.image_stream import ImageRef

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})

IMAGE_DIR_NAMES = ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "images")
KARPATHY_PATTERN = "dataset_*.json"
CSV_CAPTIONS_NAME = "captions.txt"
TOKEN_CAPTIONS_NAME = "Flickr8k.token.txt"
CSV_HEADER = ["image", "caption"]
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
SPLIT_ALIASES = {"restval": "train", "dev": "val"}
# Flickr8k.token.txt names one image "2258277193_586949ec62.jpg.1": a copy suffix after the extension.
_COPY_SUFFIX = re.compile(r"(\.(?:jpe?g|png|webp|bmp|gif))\.\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class Caption:
    image: str  # image path relative to images_dir, posix style
    text: str


@dataclass
class Dataset:
    root: Path
    images_dir: Path
    images: list[str]  # relative posix paths of image files on disk, sorted, recursive
    captions: list[Caption]  # only captions whose image is on disk, in file order
    splits: dict[str, list[str]]  # "train"/"val"/"test" -> relative image paths on disk; {} when unknown
    caption_source: Path | None  # the caption file used
    missing_images: int  # distinct images named by captions/splits but not on disk
    missing_captions: int  # captions dropped because their image is missing
    split_missing: dict[str, int] = field(default_factory=dict)  # per split, images it names not on disk
    unreadable: dict[str, str] = field(default_factory=dict)  # image-named entries that are not readable files
    # webdataset shards: image path ("00000.tar/key.jpg") -> where its bytes are; {} for files on disk
    members: dict[str, TarMember] = field(default_factory=dict)

    # Where an image's bytes are, for the builder: a file below images_dir, or a member of a tar there.

    def file_state(self, path: str) -> FileState:
        """What says whether the image changed without reading it: the file's size and mtime, or for a
        tar member its size and the tar's mtime (a rewritten tar re-hashes its members; equal content
        is still found by hash and not embedded again). OSError when the file is gone."""
        member = self.members.get(path)
        if member is not None:
            return FileState(path, member.size, member.tar_mtime_ns)
        stat = (self.images_dir / path).stat()
        return FileState(path, stat.st_size, stat.st_mtime_ns)

    def content_sha256(self, path: str) -> str:
        member = self.members.get(path)
        if member is not None:
            tar = self.images_dir / _tar_of(path)
            return hashlib.sha256(read_member(tar, member)).hexdigest()
        return sha256_file(self.images_dir / path)

    def image_ref(self, path: str, key) -> ImageRef:
        from vqa_search.core.image_stream import ImageRef  # imports torch: only when something is decoded

        member = self.members.get(path)
        if member is not None:
            return ImageRef(self.images_dir / _tar_of(path), key, member)
        return ImageRef(self.images_dir / path, key)


@dataclass
class _Named:
    """What a caption file names, before it is matched against the images on disk."""

    captions: list[Caption]
    splits: dict[str, list[str]] = field(default_factory=dict)


def read_dataset(root: Path | str, captions: Path | str | None = None,
                 images: Path | str | None = None) -> Dataset:
    """Find the images and captions of a dataset folder; explicit paths override the detection."""
    root = Path(root)
    if not root.is_dir():
        if root.exists():
            raise UserError(f"the dataset must be a folder, and {root} is not one: pass the folder that holds the "
                            "images (a caption file goes to --captions)")
        raise UserError(f"dataset folder not found: {root}")
    if images is None and captions is None and is_webdataset(root):
        return read_webdataset(root)
    images_dir = _existing_dir(Path(images)) if images is not None else find_images_dir(root)
    caption_source = _existing_file(Path(captions)) if captions is not None else find_caption_file(root)
    named = _read_caption_file(caption_source) if caption_source else _Named([])
    splits = named.splits or read_split_files(root)
    return _match(root, images_dir, caption_source, named.captions, splits)


def find_images_dir(root: Path) -> Path:
    """The usual Flickr image subfolders, else the root itself (any folder of pictures)."""
    return next((root / name for name in IMAGE_DIR_NAMES if (root / name).is_dir()), root)


def find_caption_file(root: Path) -> Path | None:
    """Karpathy json first because it also carries splits, then the two Flickr8k text formats."""
    candidates = [*sorted(root.glob(KARPATHY_PATTERN)), root / CSV_CAPTIONS_NAME, root / TOKEN_CAPTIONS_NAME]
    return next((path for path in candidates if path.is_file()), None)


def scan_images(images_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Image files below images_dir, and the image-named entries that cannot be read (shown path -> reason).

    Hidden entries (such as the .vqa-search index) are skipped. Symlinks to regular files are followed
    wherever they point; symlinked folders are not entered, so nothing loops or is found twice. Every
    problem a file name or file type can cause is found here, before any work is done.
    """
    found, unreadable = [], {}
    for folder, subfolders, files in os.walk(images_dir):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative_folder = PurePosixPath(Path(folder).relative_to(images_dir).as_posix())
        for name in filter(_is_image_name, files):
            relative = str(relative_folder / name)
            reason = _unreadable_reason(Path(folder) / name, relative)
            if reason is None:
                found.append(relative)
            else:
                unreadable[printable_path(relative)] = reason
    return sorted(found), dict(sorted(unreadable.items()))


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def printable_path(path: str) -> str:
    """A path as text that can be written anywhere: undecodable bytes shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _unreadable_reason(path: Path, relative: str) -> str | None:
    """Why a file cannot be indexed, judged from its name and type alone; None when it can."""
    if printable_path(relative) != relative:
        return "file name is not valid UTF-8 (rename the file to index it)"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "broken symlink (its target does not exist)" if path.is_symlink() else "vanished during the scan"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symlink loop"
        return os_error_reason(error)
    return not_regular_reason(mode)


def _read_caption_file(path: Path) -> _Named:
    """Pick the parser by name, then by content: a renamed token file still has a tab on line one."""
    if path.suffix.lower() == ".json":
        return _read_karpathy_json(path)
    if path.name.endswith("token.txt") or "\t" in _first_line(path):
        return _Named(list(_read_token_captions(path)))
    return _Named(list(_read_csv_captions(path)))


def read_split_files(root: Path) -> dict[str, list[str]]:
    """Flickr8k split lists (one file name per line), keyed train/val/test."""
    return {split: [name for _, name in _lines(root / file)]
            for split, file in SPLIT_FILES.items() if (root / file).is_file()}


def _read_csv_captions(path: Path) -> Iterator[Caption]:
    with _open_text(path) as handle:
        rows = csv.reader(handle)
        header = next(rows, [])
        if [cell.strip().lower() for cell in header] != CSV_HEADER:
            raise UserError(f'{path.name}:1: expected header "image,caption", got "{",".join(header)}"')
        line_number = rows.line_num + 1
        for row in rows:
            if any(cell.strip() for cell in row):
                if len(row) != 2:
                    raise UserError(f'{path.name}:{line_number}: expected 2 fields "image,caption", got {len(row)}')
                yield Caption(_image_name(row[0], path, line_number), row[1].strip())
            line_number = rows.line_num + 1


def _read_token_captions(path: Path) -> Iterator[Caption]:
    for line_number, line in _lines(path):
        reference, tab, text = line.partition("\t")
        name, hash_sign, _ = reference.rpartition("#")
        if not tab or not hash_sign:
            missing = "tab" if not tab else '"#"'
            raise UserError(f'{path.name}:{line_number}: expected "name.jpg#i<TAB>caption", no {missing} found')
        yield Caption(_image_name(_COPY_SUFFIX.sub(r"\1", name.strip()), path, line_number), text.strip())


def _read_karpathy_json(path: Path) -> _Named:
    named = _Named([])
    for position, entry in enumerate(_karpathy_entries(path)):
        try:
            image = "/".join(filter(None, [entry.get("filepath"), entry["filename"]]))
            texts = [sentence["raw"].strip() for sentence in entry["sentences"]]
            split = SPLIT_ALIASES.get(entry.get("split"), entry.get("split"))
        except (KeyError, TypeError, AttributeError):
            raise UserError(f'{path.name}: images[{position}]: expected "filename" and "sentences": '
                            '[{"raw": ...}]') from None
        named.captions += [Caption(image, text) for text in texts]
        if split:
            named.splits.setdefault(split, []).append(image)
    return named


def _karpathy_entries(path: Path) -> list:
    with _open_text(path) as handle:
        try:
            document = json.load(handle)
        except json.JSONDecodeError as error:
            raise UserError(f"{path.name}:{error.lineno}: not valid JSON: {error.msg}") from None
    entries = document.get("images") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise UserError(f'{path.name}: expected an object with an "images" list')
    return entries


def _image_name(name: str, path: Path, line_number: int) -> str:
    name = name.strip()
    if not name:
        raise UserError(f"{path.name}:{line_number}: empty image name")
    return name


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered non-blank lines, so error messages can point at the line to fix."""
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                yield line_number, line.strip()


def _first_line(path: Path) -> str:
    return next((line for _, line in _lines(path)), "")


@contextmanager
def _open_text(path: Path) -> Iterator[TextIO]:
    """UTF-8 text, BOM tolerated; a decoding failure is the user's file to fix, not a crash."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        try:
            yield handle
        except UnicodeDecodeError as error:
            raise UserError(f"{path.name}: not UTF-8 text ({error.reason})") from None


def _match(root: Path, images_dir: Path, caption_source: Path | None, captions: list[Caption],
           splits: dict[str, list[str]]) -> Dataset:
    """Keep what is on disk and count what is not: partial downloads are normal, not errors."""
    images, unreadable = scan_images(images_dir)
    on_disk = set(images)
    named = {caption.image for caption in captions}.union(*splits.values())
    located = {name: _locate(name, on_disk) for name in named}
    kept = [Caption(located[c.image], c.text) for c in captions if located[c.image] and c.text]  # "" finds nothing
    return Dataset(
        root=root,
        images_dir=images_dir,
        images=images,
        captions=kept,
        splits={split: _unique(located[n] for n in names if located[n]) for split, names in splits.items()},
        caption_source=caption_source,
        missing_images=sum(1 for path in located.values() if path is None),
        missing_captions=sum(1 for c in captions if located[c.image] is None),
        split_missing={split: sum(1 for n in set(names) if located[n] is None) for split, names in splits.items()},
        unreadable=unreadable,
    )


def _locate(name: str, on_disk: set[str]) -> str | None:
    """The name as given, else its bare file name: COCO's "val2014/x.jpg" when images= is val2014 itself."""
    bare = PurePosixPath(name).name
    return name if name in on_disk else bare if bare in on_disk else None


def _unique(paths: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(paths))


def _existing_dir(path: Path) -> Path:
    if not path.is_dir():
        if path.exists():
            raise UserError(f"--images must be a folder, and {path} is not one: pass the folder that holds the images")
        raise UserError(f"images folder not found: {path}")
    return path


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        if path.is_dir():
            raise UserError(f"--captions must be a file, and {path} is a folder: pass the caption file in it "
                            "(captions.txt, Flickr8k.token.txt or dataset_*.json)")
        raise UserError(f"caption file not found: {path}")
    return path


# ---- webdataset shards ---------------------------------------------------------------------------
#
# Read with Python's tarfile, not the `webdataset` package: webdataset streams samples in order, but
# the index needs records that point into a tar (offset and size of each image's bytes) so that any
# image can be decoded, hashed or re-checked alone, on any worker, without extracting or re-reading
# the tar; listing a tar's headers gives exactly that, with no dependency.

TAR_PATTERN = "*.tar"
CAPTION_EXTENSION = "txt"


def is_webdataset(root: Path) -> bool:
    """A folder with .tar files at its top and no caption file: webdataset shards (img2dataset's output)."""
    return find_caption_file(root) is None and any(path.is_file() for path in root.glob(TAR_PATTERN))


def image_locator(images_dir: Path) -> Dataset:
    """Where an indexed image's bytes are (`file_state`, `image_ref`), without scanning for new images:
    the tars' members for webdataset shards (their headers are listed again), else files below images_dir."""
    if is_webdataset(images_dir):
        return read_webdataset(images_dir)
    return Dataset(images_dir, images_dir, images=[], captions=[], splits={}, caption_source=None,
                   missing_images=0, missing_captions=0)


def read_webdataset(root: Path) -> Dataset:
    """Every image member of the folder's tars, its caption from the sample's .txt member.

    A sample is the members that share a key (the name up to the first dot of its last part):
    {key}.jpg, {key}.txt, {key}.json. Image paths are "<tar>/<member>", relative to `root`. Members
    are never extracted; names that could escape a folder (absolute, or with ..) are refused and
    listed with the reason, as are links and other non-files.
    """
    tars = sorted(path for path in root.glob(TAR_PATTERN) if path.is_file() and not path.name.startswith("."))
    members: dict[str, TarMember] = {}
    captions: list[Caption] = []
    unreadable: dict[str, str] = {}
    for tar in tars:
        _read_tar(tar, root, members, captions, unreadable)
    loose = sorted(entry.name for entry in os.scandir(root) if entry.is_file() and _is_image_name(entry.name))
    if loose:
        logging.getLogger("vqa_search").warning(
            "%s holds webdataset tars: its %d loose image files (e.g. %s) are not indexed; index them as a "
            "folder of their own", root, len(loose), loose[0])
    images = sorted(members)
    return Dataset(root=root, images_dir=root, images=images, captions=captions, splits={}, caption_source=None,
                   missing_images=0, missing_captions=0, unreadable=dict(sorted(unreadable.items())),
                   members={path: members[path] for path in images})


def _read_tar(tar: Path, root: Path, members: dict[str, TarMember], captions: list[Caption],
              unreadable: dict[str, str]) -> None:
    name = tar.relative_to(root).as_posix()
    images: dict[str, str] = {}  # sample -> image path
    texts: dict[str, tarfile.TarInfo] = {}  # sample -> its .txt member
    try:
        with open_regular(tar) as handle:
            stat = os.fstat(handle.fileno())
            with tarfile.open(fileobj=handle, mode="r:") as archive:  # reads headers, seeks over the data
                for info in archive.getmembers():
                    member = PurePosixPath(info.name)
                    key, _, extension = member.name.partition(".")
                    is_image = _is_image_name(member.name)
                    if not (is_image or extension.lower() == CAPTION_EXTENSION):
                        continue  # .json and anything else: metadata the index does not use
                    shown = f"{name}/{printable_path(info.name)}"
                    reason = _unsafe_member_reason(info)
                    if reason is not None:
                        if is_image:
                            unreadable[shown] = reason
                        continue
                    sample = str(member.parent / key)
                    if is_image:
                        members[shown] = TarMember(info.offset_data, info.size, stat.st_size, stat.st_mtime_ns)
                        images[sample] = shown
                    else:
                        texts[sample] = info
                for sample, image in images.items():
                    text = _member_text(archive, texts[sample], f"{name}/{texts[sample].name}") if sample in texts else ""
                    if text:
                        captions.append(Caption(image, text))
    except (tarfile.TarError, EOFError) as error:
        raise UserError(f"{name}: not a readable uncompressed tar ({error})") from None
    except OSError as error:
        unreadable[name] = os_error_reason(error)


def _unsafe_member_reason(info: tarfile.TarInfo) -> str | None:
    """Why a member is refused: a name that could escape a folder, undecodable bytes, or not a plain file."""
    path = PurePosixPath(info.name)
    if path.is_absolute() or ".." in path.parts or "\\" in info.name:
        return "unsafe member name (absolute, or with ..): refused"
    if printable_path(info.name) != info.name:
        return "member name is not valid UTF-8"
    if not info.isreg():
        return "not a regular file in the tar (a link, folder or device)"
    return None


def _member_text(archive: tarfile.TarFile, info: tarfile.TarInfo, shown: str) -> str:
    """A sample's caption: the .txt member as UTF-8, read from the tar (never written to disk)."""
    handle = archive.extractfile(info)
    data = handle.read() if handle is not None else b""
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise UserError(f"{shown}: not UTF-8 text ({error.reason})") from None


def _tar_of(path: str) -> str:
    """The tar of a member's image path: "00000.tar/abc.jpg" -> "00000.tar" (tars sit at the dataset's top)."""
    return path.split("/", 1)[0]
