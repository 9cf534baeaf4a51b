"""Plots are drawn to files by every trainer and report; matplotlib is an optional extra."""

from __future__ import annotations

from vqa_search.core.errors import UserError


def pyplot():
    """matplotlib.pyplot drawing to files only (Agg); plots are an optional extra, so say how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'vqa-search[plot]'") from None
    return plt
