"""The parts of open_clip vqa-search relies on beyond its documented API, checked by name.

pyproject.toml declares open_clip_torch>=3.1: the whole suite passed with 3.1.0 (and 3.3.0, CI's pin);
3.0.0 fails on text_global_pool(eos_token_id=). A version that drops or renames one of these fails
here with its name, not deep inside a feature.
"""

from __future__ import annotations

import inspect

import open_clip
from open_clip.transformer import VisionTransformer, text_global_pool


def test_private_helpers_the_tower_split_and_text_pooling_use():
    assert "eos_token_id" in inspect.signature(text_global_pool).parameters
    assert callable(VisionTransformer._embeds) and callable(VisionTransformer._pool)
    assert callable(open_clip.factory.convert_state_dict)


def test_public_intermediates_clip_patches_use():
    parameters = inspect.signature(VisionTransformer.forward_intermediates).parameters
    assert {"indices", "normalize_intermediates", "intermediates_only", "output_fmt"} <= set(parameters)
