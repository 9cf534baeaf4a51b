"""A CLIP tower run in two halves, so frozen first blocks are computed once and only the trained
last blocks run every step (stage-1 `--unfreeze-last`, the VQA local encoder).

`*_prefix` gives the residual stream entering block `blocks`; `*_suffix` finishes the tower from it,
exactly as open_clip's own forward would (a test compares the two).
"""

from __future__ import annotations

import torch
from open_clip.model import CLIP
from torch import nn

from vqa_search.core.encode import project_text, text_input


# open_clip has no public API for a tower split between blocks: VisionTransformer._embeds and _pool
# (private, open_clip >= 3.1, pinned by tests/test_open_clip_api.py) are its own first and last steps.
def image_prefix(model: CLIP, pixels: torch.Tensor, blocks: int) -> torch.Tensor:
    """The residual stream entering image block `blocks`: patches, class token, positions, ln_pre, first blocks."""
    return _run_blocks(model.visual.transformer.resblocks[:blocks], model.visual._embeds(pixels))


def image_suffix(model: CLIP, stream: torch.Tensor, blocks: int) -> torch.Tensor:
    """Image features from the stream entering block `blocks`: the remaining blocks, pooling, projection."""
    return image_suffix_tokens(model, stream, blocks)[0]


def image_suffix_tokens(model: CLIP, stream: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """image_suffix, and the patch tokens after ln_post (B, patches, width) that the pooling leaves."""
    visual = model.visual
    pooled, tokens = visual._pool(_run_blocks(visual.transformer.resblocks[blocks:], stream))
    return (pooled @ visual.proj if visual.proj is not None else pooled), tokens


def text_prefix(model: CLIP, tokens: torch.Tensor, blocks: int) -> torch.Tensor:
    """The residual stream entering text block `blocks`, for tokens cut to any length."""
    return _run_blocks(model.transformer.resblocks[:blocks], text_input(model, tokens), _causal_mask(model, tokens))


def text_suffix(model: CLIP, stream: torch.Tensor, tokens: torch.Tensor, blocks: int) -> torch.Tensor:
    """Text features from the stream entering block `blocks`; rows after a caption's end may hold anything."""
    states = _run_blocks(model.transformer.resblocks[blocks:], stream, _causal_mask(model, tokens))
    return project_text(model, model.ln_final(states), tokens)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    for block in blocks:
        x = block(x, attn_mask=attn_mask)
    return x


def _causal_mask(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """The text tower is causal, so a caption's states never depend on the padding after it."""
    return model.attn_mask[: tokens.shape[1], : tokens.shape[1]]
