"""Open the files users point at without hanging: regular files only.

A folder of photos can hold a FIFO named `x.jpg` or a link to `/dev/zero`; opening the first blocks
forever and reading the second never ends. Every file vqa-search reads on a user's behalf (photos,
checkpoints) is opened here, non-blocking, and refused unless it is a regular file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


class NotARegularFile(OSError):
    """str() is the reason, e.g. "not a regular file (a FIFO)"."""


def not_regular_reason(mode: int) -> str | None:
    """Why a file of this st_mode cannot be read as data; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'a special file')})"


def open_regular(path: Path | str) -> BinaryIO:
    """Open for reading, following symlinks; a FIFO or device raises NotARegularFile instead of blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        reason = not_regular_reason(os.fstat(fd).st_mode)
        if reason:
            raise NotARegularFile(reason)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def os_error_reason(error: OSError) -> str:
    """The file system's own words, as a skip reason: "permission denied"."""
    return (error.strerror or str(error)).lower()
