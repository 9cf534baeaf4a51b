"""The length-bucketed caption path must equal open_clip's padded-to-77 encode_text."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vqa_search.core.encode import encode_texts, supports_trimmed_text, token_embeddings
from vqa_search.core.models import load_clip
from vqa_search.core.identity import TINY_MODEL, resolve_identity

WORDS = "a dog runs on the beach while two children in red jackets play with a ball near water".split()


def _captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    captions = [" ".join(rng.choices(WORDS, k=rng.randint(1, 30))) for _ in range(n)]
    return captions + ["", "one", " ".join(WORDS * 6)]  # empty, single word, longer than the context


def _reference(clip, texts: list[str]) -> np.ndarray:
    with torch.inference_mode():
        return F.normalize(clip.model.encode_text(clip.tokenizer(texts)), dim=-1).numpy()


@pytest.mark.parametrize("model", [TINY_MODEL, pytest.param("ViT-B-32", marks=pytest.mark.slow)])
def test_trimmed_batches_equal_padded_encode_text(model):
    clip = load_clip(resolve_identity(model, "none"), torch.device("cpu"))
    assert supports_trimmed_text(clip.model)
    texts = _captions(40)
    fast = encode_texts(clip, texts, batch_size=8)
    np.testing.assert_allclose(fast, _reference(clip, texts), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)


def test_order_is_the_input_order():
    clip = load_clip(resolve_identity(TINY_MODEL, "none"), torch.device("cpu"))
    texts = _captions(10, seed=1)
    together = encode_texts(clip, texts, batch_size=3)
    one_by_one = np.concatenate([encode_texts(clip, [text]) for text in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_token_embeddings_end_with_the_caption_embedding():
    clip = load_clip(resolve_identity(TINY_MODEL, "none"), torch.device("cpu"))
    texts = ["a dog", "two children in red jackets play with a ball", "one"]
    tokens = clip.tokenizer(texts)
    with torch.inference_mode():
        embeddings, mask = token_embeddings(clip.model, tokens)
        reference = clip.model.encode_text(tokens)

    lengths = mask.sum(dim=1)
    assert mask.shape[1] == int(lengths.max()) and embeddings.shape[:2] == mask.shape
    assert torch.equal(mask, torch.arange(mask.shape[1])[None, :] < lengths[:, None])  # real tokens, then padding
    end_of_text = embeddings[torch.arange(len(texts)), lengths - 1]
    torch.testing.assert_close(end_of_text, reference, atol=1e-5, rtol=0)
