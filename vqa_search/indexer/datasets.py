"""Read an image folder and its captions: Flickr8k/Flickr30k/COCO layouts, or any folder of pictures.

Caption files often describe more images than are on disk (partial downloads, samples), so names
are matched against a directory scan and the unmatched ones are counted rather than treated as
errors. Malformed caption files, on the other hand, fail loudly with the file and line to fix.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, TextIO

from vqa_search.core.errors import UserError
from vqa_search.core.files import not_regular_reason, os_error_reason

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
