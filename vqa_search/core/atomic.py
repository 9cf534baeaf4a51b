"""Write files so that a reader sees the old version or the new one, never half of either."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


def _umask_from_proc() -> int | None:
    """Linux says it in /proc/self/status (since 4.7) without changing it."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_swapping() -> int:
    """os.umask can only be read by setting it, for the whole process: only ever done at import."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_from_proc()
if _UMASK_AT_IMPORT is None:
    _UMASK_AT_IMPORT = _umask_by_swapping()


def current_umask() -> int:
    """The process's umask now where /proc says it, else as it was at import."""
    mask = _umask_from_proc()
    return _UMASK_AT_IMPORT if mask is None else mask


def new_file_mode() -> int:
    """The mode open() gives a new file: rw for whom the umask allows."""
    return 0o666 & ~current_umask()


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is fsynced and renamed over `target`.

    The file gets the mode a plain open() would give it (0o666 less the umask), not mkstemp's 0o600.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        os.chmod(temp, new_file_mode())  # after the writer: one that recreated the file is covered too
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, target)
    except OSError as error:
        if error.filename is None:  # a failed write names no file: say which one, for the one-line error
            error.filename = str(target)
        raise
    finally:
        temp.unlink(missing_ok=True)


def write_text(target: Path | str, text: str) -> None:
    with atomic_path(target) as temp:
        temp.write_text(text, encoding="utf-8")


def write_json(target: Path | str, data: object) -> None:
    write_text(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_json_lines(target: Path | str, records: Iterable[object]) -> None:
    """One compact JSON document per line, streamed: ranks files run to tens of thousands of lines."""
    with atomic_path(target) as temp, open(temp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


@contextmanager
def atomic_directory(target: Path | str) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it is renamed to `target`, whole.

    For files written by libraries that add companions beside them (an ONNX graph and its external
    weights). If another process made `target` meanwhile, its copy is kept and ours is dropped.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield temp
        os.chmod(temp, 0o777 & ~current_umask())
        for written in temp.iterdir():
            os.chmod(written, new_file_mode())
            with open(written, "rb") as handle:
                os.fsync(handle.fileno())
        try:
            os.rename(temp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
