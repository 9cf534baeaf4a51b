"""Stage 2: a cross-attention re-ranker aligning caption tokens with image regions, CLIP frozen.

For a caption with token embeddings t_1..t_M (CLIP's final token states in the joint space,
padding masked) and an image with region features r_1..r_K:

    α_mk   = softmax_k( t_mᵀ W_qᵀ W_k r_k )
    v_m    = Σ_k α_mk W_v r_k
    s_fine = (1/M) Σ_m t_mᵀ W_o v_m
    s      = s_global + λ · s_fine

Only W_q, W_k, W_v and W_o train (and, optionally, a small MLP on r_k); the regions are normalised
first, as detector features come at any scale. W_o starts at zero, so an untrained re-ranker
leaves CLIP's ranking exactly as it was.
Weights are stored as safetensors with the config in the metadata: no pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from vqa_search.core.artifacts import (DIMENSION, FINITE, OPTIONAL_DIMENSION, ArtifactKind, Rule, expected_state,
                                  open_artifact, save_artifact)
from vqa_search.core.identity import ModelIdentity

FORMAT = "vqa-search-reranker/1"
RERANKER_FILE = ArtifactKind(FORMAT, "re-ranker file", "a vqa-search re-ranker",
                             "train one with `vqa-search train rerank`")
# `regions` names a folder under INDEX_DIR/regions/: one plain name, never a path out of it.
REGION_SET_NAME = Rule(lambda name: name not in ("", ".", "..") and not any(c in name for c in "/\\\0"),
                       "naming a region set (a folder name)")
CONFIG_RULES = {"token_dim": DIMENSION, "region_dim": DIMENSION, "attention_dim": DIMENSION,
                "region_hidden": OPTIONAL_DIMENSION, "lam": FINITE, "regions": REGION_SET_NAME}


@dataclass
class RerankerConfig:
    token_dim: int  # D: CLIP's joint embedding space
    region_dim: int  # F: detector box features + geometry, or CLIP patch tokens + geometry
    attention_dim: int = 256  # the space where W_q t_m meets W_k r_k
    region_hidden: int = 0  # > 0: a small MLP on r_k (F -> hidden -> F) before W_k and W_v; 0: LayerNorm only
    lam: float = 1.0  # λ, the weight of s_fine; may be chosen on val and saved here
    regions: str = ""  # the region set it was trained on (INDEX_DIR/regions/<name>)
    clip: dict = field(default_factory=dict)  # identity of the frozen CLIP whose tokens it reads


class CrossAttentionReranker(nn.Module):
    def __init__(self, config: RerankerConfig):
        super().__init__()
        self.config = config
        self.region_proj = _region_projection(config.region_dim, config.region_hidden)
        self.W_q = nn.Linear(config.token_dim, config.attention_dim, bias=False)
        self.W_k = nn.Linear(config.region_dim, config.attention_dim, bias=False)
        self.W_v = nn.Linear(config.region_dim, config.token_dim, bias=False)
        self.W_o = nn.Linear(config.token_dim, config.token_dim, bias=False)
        nn.init.zeros_(self.W_o.weight)

    # Shapes: tokens (C, M, D) for C captions; token_mask (C, M) True for real tokens; regions
    # (R, N, K, F) with R = C (N candidate images per caption) or R = 1 (the same N images for all).

    def attention(self, tokens: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """α[c, n, m, k]: how much token m of caption c attends to region k of its n-th image."""
        return self._attention(tokens, self.project_regions(regions))

    def project_regions(self, regions: torch.Tensor) -> torch.Tensor:
        """r_k as W_k and W_v read them; training projects each distinct image once per batch."""
        return self.region_proj(regions)

    def fine_scores(self, tokens: torch.Tensor, token_mask: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """s_fine for every caption and candidate image: (C, N). Padding neither attends nor counts in 1/M.

        t_mᵀ W_o v_m = Σ_k α_mk (W_oᵀ t_m)ᵀ (W_v r_k): the read-out is a second bilinear form of the
        same (token, region) pairs, weighted by the attention.
        """
        return self.projected_fine_scores(tokens, token_mask, self.project_regions(regions))

    def projected_fine_scores(self, tokens: torch.Tensor, token_mask: torch.Tensor,
                              regions: torch.Tensor) -> torch.Tensor:
        """fine_scores for regions already through `project_regions`."""
        alpha = self._attention(tokens, regions)
        read_out = _bilinear(tokens @ self.W_o.weight, self.W_v, regions)  # W_oᵀ t_m is t_m @ W_o
        per_token = (alpha * read_out).sum(dim=-1)  # (C, N, M): t_mᵀ W_o v_m
        mask = token_mask.to(per_token.dtype)[:, None, :]
        return (per_token * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)

    def _attention(self, tokens: torch.Tensor, projected_regions: torch.Tensor) -> torch.Tensor:
        return _bilinear(self.W_q(tokens), self.W_k, projected_regions).softmax(dim=-1)  # t_mᵀ W_qᵀ W_k r_k

    def forward(self, global_scores: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                regions: torch.Tensor) -> torch.Tensor:
        """s = s_global + λ · s_fine, for every caption and candidate image: (C, N)."""
        return global_scores + self.config.lam * self.fine_scores(tokens, token_mask, regions)


def _region_projection(region_dim: int, hidden: int) -> nn.Module:
    """Detector features come at any scale: normalise them; optionally let a small MLP re-mix them.

    Without the MLP the normalisation has no weights of its own (W_k and W_v absorb any scale), so
    training never back-propagates into the regions: on CPU that halves the cost of a step.
    """
    if hidden <= 0:
        return nn.LayerNorm(region_dim, elementwise_affine=False)
    return nn.Sequential(nn.LayerNorm(region_dim), nn.Linear(region_dim, hidden), nn.GELU(),
                         nn.Linear(hidden, region_dim))


def _bilinear(queries: torch.Tensor, region_map: nn.Linear, regions: torch.Tensor) -> torch.Tensor:
    """queries_mᵀ (W r_k) for every token m and region k: (C, N, M, K).

    Two association orders give the same numbers: project every region (cheap for one image and
    many captions, the image→caption query), or fold W into the queries and dot them with the raw
    regions (cheap for one caption and many images: re-ranking a text query's top 50 never projects
    50 x 36 detector features).
    """
    C, M, E = queries.shape
    R, N, K, F = regions.shape
    folded_cost = C * M * F * (E + N * K)
    projected_cost = R * N * K * F * E + C * N * M * K * E
    if folded_cost < projected_cost:
        left, right = queries @ region_map.weight, regions  # Wᵀ q_m against the raw r_k
    else:
        left, right = queries, region_map(regions)  # q_m against W r_k
    # One large matrix product per caption (all N·K regions at once) rather than N small ones.
    products = left @ right.reshape(R, N * K, -1).transpose(1, 2)  # (C, M, N·K)
    return products.reshape(C, M, N, K).transpose(1, 2)


def save_reranker(model: CrossAttentionReranker, path: Path | str) -> Path:
    return save_artifact(path, FORMAT, model.state_dict(), {"config": json.dumps(asdict(model.config))})


def load_reranker(path: Path | str, device: torch.device | str = "cpu") -> CrossAttentionReranker:
    """The re-ranker at `path`; its config and tensor header are checked before anything is built."""
    with open_artifact(path, RERANKER_FILE) as artifact:
        config = artifact.config(RerankerConfig, "config", CONFIG_RULES)
        artifact.build(ModelIdentity, config.clip, 'config "clip"')  # what `load_reranker_for` compares
        artifact.check_tensors(expected_state(lambda: CrossAttentionReranker(config)))
        tensors = artifact.load(artifact.header)
    model = CrossAttentionReranker(config)
    model.load_state_dict(tensors)
    return model.to(device)
