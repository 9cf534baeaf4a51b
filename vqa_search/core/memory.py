"""Memory sizes people type ("4G", "512M") and print; no FAISS, so the CLI checks them at once."""

from __future__ import annotations

from vqa_search.core.errors import UserError

UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory(text: str, option: str = "--max-index-memory") -> int:
    """'4G', '512M', '1.5GiB' (powers of 1024), or bytes; a one-line UserError otherwise."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned[-1:].isalpha() else (cleaned, "")
    try:
        value = float(number) * UNITS[unit]
    except (ValueError, KeyError):
        raise UserError(f"{option} takes a size such as 4G or 512M (got {text!r})") from None
    if not value >= 1:
        raise UserError(f"{option} must be at least 1 byte (got {text!r})")
    return int(value)


def format_memory(n_bytes: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n_bytes >= UNITS[unit]:
            return f"{n_bytes / UNITS[unit]:.3g}{unit}"
    return f"{n_bytes}B"
