"""The cross-attention re-ranker against the equations written as a naive per-pair loop."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from vqa_search.align.reranker import CrossAttentionReranker, RerankerConfig, load_reranker, save_reranker
from vqa_search.core.errors import UserError

CONFIG = RerankerConfig(token_dim=12, region_dim=9, attention_dim=5, lam=0.7)
WITH_MLP = RerankerConfig(token_dim=12, region_dim=9, attention_dim=5, lam=0.7, region_hidden=7)


def trained_like(config: RerankerConfig = CONFIG, seed: int = 0) -> CrossAttentionReranker:
    """Random weights everywhere, W_o included (it starts at zero only for a fresh model)."""
    torch.manual_seed(seed)
    model = CrossAttentionReranker(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    return model


def naive_fine_score(model, tokens, n_tokens, regions) -> float:
    """s_fine = (1/M) Σ_m t_mᵀ W_o v_m, v_m = Σ_k α_mk W_v r_k, α_mk = softmax_k(t_mᵀ W_qᵀ W_k r_k)."""
    W_q, W_k, W_v, W_o = (layer.weight.double() for layer in (model.W_q, model.W_k, model.W_v, model.W_o))
    r = [model.region_proj(region).double() for region in regions]
    total = 0.0
    for m in range(n_tokens):
        t = tokens[m].double()
        logits = [float(t @ W_q.T @ W_k @ r_k) for r_k in r]
        peak = max(logits)
        weights = [math.exp(x - peak) for x in logits]
        alpha = [w / sum(weights) for w in weights]
        v = sum(a * (W_v @ r_k) for a, r_k in zip(alpha, r))
        total += float(t @ W_o @ v)
    return total / n_tokens


def lengths_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("n_captions, n_images, shared", [
    (3, 2, True),  # every caption against the same images
    (1, 7, True),  # a text query's top images: W folded into the caption's tokens
    (6, 1, True),  # an image query's top captions: the one image's regions projected
    (3, 4, False),  # training: each caption with its own candidates
])
@pytest.mark.parametrize("config", [CONFIG, WITH_MLP], ids=["layernorm", "mlp"])
@torch.no_grad()
def test_scores_match_the_equations_pair_by_pair(n_captions, n_images, shared, config):
    model = trained_like(config)
    torch.manual_seed(1)
    lengths = [4, 1, 6, 2, 5, 3][:n_captions]
    tokens = torch.randn(n_captions, 6, config.token_dim)
    mask = lengths_mask(lengths, 6)
    regions = torch.randn(1 if shared else n_captions, n_images, 5, config.region_dim)
    global_scores = torch.randn(n_captions, n_images)

    fine = model.fine_scores(tokens, mask, regions)
    scores = model(global_scores, tokens, mask, regions)

    assert fine.shape == (n_captions, n_images)
    for c, length in enumerate(lengths):
        for n in range(n_images):
            expected = naive_fine_score(model, tokens[c], length, regions[0 if shared else c, n])
            assert fine[c, n].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(scores, global_scores + config.lam * fine)


@torch.no_grad()
def test_padding_changes_nothing():
    model = trained_like()
    torch.manual_seed(2)
    tokens = torch.randn(1, 3, CONFIG.token_dim)
    regions = torch.randn(1, 4, 6, CONFIG.region_dim)
    padded = torch.cat([tokens, 1e3 * torch.randn(1, 5, CONFIG.token_dim)], dim=1)  # garbage in the padding
    padded_mask = torch.tensor([[True] * 3 + [False] * 5])

    torch.testing.assert_close(model.fine_scores(padded, padded_mask, regions),
                               model.fine_scores(tokens, torch.ones(1, 3, dtype=torch.bool), regions))


@torch.no_grad()
def test_attention_is_a_distribution_over_regions():
    model = trained_like()
    alpha = model.attention(torch.randn(2, 3, CONFIG.token_dim), torch.randn(1, 4, 5, CONFIG.region_dim))
    assert alpha.shape == (2, 4, 3, 5)
    torch.testing.assert_close(alpha.sum(dim=-1), torch.ones(2, 4, 3))


@torch.no_grad()
def test_a_fresh_reranker_keeps_the_global_ranking():
    model = CrossAttentionReranker(CONFIG)
    global_scores = torch.randn(3, 4)
    tokens, mask = torch.randn(3, 5, CONFIG.token_dim), torch.ones(3, 5, dtype=torch.bool)
    assert torch.equal(model(global_scores, tokens, mask, torch.randn(1, 4, 6, CONFIG.region_dim)), global_scores)


def test_only_the_reranker_weights_train():
    model = trained_like()
    tokens = torch.randn(2, 4, CONFIG.token_dim, requires_grad=True)  # stands for frozen CLIP outputs
    model(torch.zeros(2, 3), tokens, torch.ones(2, 4, dtype=torch.bool), torch.randn(1, 3, 5, CONFIG.region_dim)).sum().backward()
    names = {name for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert names == {"W_q.weight", "W_k.weight", "W_v.weight", "W_o.weight"}


@torch.no_grad()
def test_checkpoint_round_trip_keeps_weights_and_lambda(tmp_path):
    model = trained_like(RerankerConfig(token_dim=12, region_dim=9, attention_dim=5, lam=0.35, regions="clip-patches",
                                      clip={"model": "vqa-tiny", "pretrained": "none", "sha256": None}))
    path = save_reranker(model, tmp_path / "reranker.safetensors")
    loaded = load_reranker(path)

    assert loaded.config == model.config
    tokens, mask = torch.randn(2, 4, 12), torch.ones(2, 4, dtype=torch.bool)
    regions = torch.randn(1, 3, 5, 9)
    torch.testing.assert_close(loaded(torch.zeros(2, 3), tokens, mask, regions),
                               model(torch.zeros(2, 3), tokens, mask, regions))


@pytest.mark.parametrize("content, message", [(None, "not found"), (b"garbage", "cannot read re-ranker")])
def test_unreadable_reranker_files_are_user_errors(tmp_path, content, message):
    path = tmp_path / "reranker.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_reranker(path)


def test_other_safetensors_files_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match="not a vqa-search re-ranker"):
        load_reranker(path)
