"""Errors a user can fix. The CLI prints their message on one line and exits with code 2."""

from __future__ import annotations

import errno
import os

# Failures of the disk rather than of vqa-search: told in one line, not a traceback.
OUT_OF_SPACE = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large"}
NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


class UserError(Exception):
    """A mistake in the user's input or environment (bad path, missing index, offline weights, full disk)."""


def storage_failure(error: OSError, target: str) -> str | None:
    """What a full or read-only disk did while writing `target`, in words; None for any other error."""
    if error.errno in OUT_OF_SPACE:
        return f"{OUT_OF_SPACE[error.errno]} ({os.strerror(error.errno)}) writing {target}"
    if error.errno in NOT_WRITABLE:
        return f"cannot write {target} ({os.strerror(error.errno)})"
    return None
