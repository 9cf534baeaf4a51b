"""Turn captions and decoded images into L2-normalised CLIP embeddings.

Captions take a fast path: CLIP's text transformer is causal and pools at the end-of-text token, so
tokens after it never influence the embedding. Sorting captions by length and cutting each batch to
its longest caption gives the same vectors as open_clip's padded-to-77 `encode_text`, several times
faster on short captions.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool

from vqa_search.core.models import Clip

PAD_TOKEN = 0


def autocast(device: torch.device):
    """Half precision on CUDA; exact float32 on CPU, where autocast would only slow things down."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def supports_trimmed_text(model: torch.nn.Module) -> bool:
    """The fast path needs open_clip's own causal text tower with end-of-text pooling."""
    return (
        isinstance(model, CLIP)
        and model.attn_mask is not None
        and model.text_pool_type in ("argmax", "eos")
    )


def text_input(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """Token plus position embeddings: the residual stream entering the first text block."""
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    return x + model.positional_embedding[: tokens.shape[1]].to(cast_dtype)


def text_token_states(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """Final-layer token states (after ln_final) for tokens cut to any length L <= context length."""
    length = tokens.shape[1]
    x = model.transformer(text_input(model, tokens), attn_mask=model.attn_mask[:length, :length])
    return model.ln_final(x)


def project_text(model: CLIP, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's pooling and projection, applied to token states."""
    # text_global_pool is open_clip's own pooling; its eos_token_id argument needs open_clip >= 3.1.
    pooled = text_global_pool(states, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    return to_joint_space(model, pooled)


def to_joint_space(model: CLIP, states: torch.Tensor) -> torch.Tensor:
    """CLIP's text projection, for pooled states (B, W) or per-token states (B, L, W)."""
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(states)
    return states @ model.text_projection


def token_embeddings(model: CLIP, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2's t_1..t_M: every token's final state in the joint space, and the mask of real tokens.

    Cut to the batch's longest caption like the fast path; the end-of-text token's row is exactly
    the caption's (unnormalised) `encode_text` feature.
    """
    tokens = tokens[:, : int(token_lengths(tokens).max())]
    return to_joint_space(model, text_token_states(model, tokens)), tokens != PAD_TOKEN


def encode_text_trimmed(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """Unnormalised text features equal to `model.encode_text(tokens)` for a batch cut to its longest item."""
    return project_text(model, text_token_states(model, tokens), tokens)


def token_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens up to and including end-of-text; padding is id 0 for open_clip's tokenizers."""
    return (tokens != PAD_TOKEN).sum(dim=1).clamp(min=1)


@torch.inference_mode()
def encode_texts(
    clip: Clip,
    texts: Sequence[str],
    batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embeddings (len(texts), dim) float32, L2-normalised, in the order of `texts`."""
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    tokens = clip.tokenizer(list(texts))
    fast = supports_trimmed_text(clip.model)
    lengths = token_lengths(tokens)
    order = torch.argsort(lengths, stable=True) if fast else torch.arange(len(texts))
    chunks = []
    for start in range(0, len(texts), batch_size):
        index = order[start : start + batch_size]
        batch = tokens[index]
        if fast:
            batch = batch[:, : int(lengths[index].max())]
        features = clip.towers.text(batch)  # core/backends.py: the plan's backend and precision
        chunks.append(F.normalize(features.float(), dim=-1).cpu())
        if on_batch:
            on_batch(len(index))
    embeddings = torch.empty((len(texts), chunks[0].shape[1]), dtype=torch.float32)
    embeddings[order] = torch.cat(chunks)
    return embeddings.numpy()


@torch.inference_mode()
def encode_image_batch(clip: Clip, pixels: torch.Tensor) -> np.ndarray:
    """Preprocessed pixels (B, 3, H, W) -> (B, dim) float32, L2-normalised."""
    features = clip.towers.image(pixels)  # core/backends.py: the plan's backend and precision
    return F.normalize(features.float(), dim=-1).cpu().numpy()


def encode_images(clip: Clip, images: Iterable) -> np.ndarray:
    """PIL images (already RGB) -> embeddings; for queries, where there are only a few."""
    pixels = torch.stack([clip.preprocess(image) for image in images])
    return encode_image_batch(clip, pixels)
