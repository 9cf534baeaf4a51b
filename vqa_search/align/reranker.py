"""Stage 2: a cross-attention re-ranker aligning caption tokens with image regions, CLIP frozen.

For a caption with token embeddings t_1..t_M (CLIP's final token states in the joint space,
padding masked) and an image with region features r_1..r_K:

    α_mk   = softmax_k( t_mᵀ W_qᵀ W_k r_k )
    v_m    = Σ_k α_mk W_v r_k
    s_fine = (1/M) Σ_m t_mᵀ W_o v_m
    s      = s_global + λ · s_fine

Only W_q, W_k, W_v, W_o and a LayerNorm on the regions (detector features come at any scale)
train. W_o starts at zero, so an untrained re-ranker leaves CLIP's ranking exactly as it was.
Weights are stored as safetensors with the config in the metadata: no pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vqa_search.atomic import atomic_path
from vqa_search.errors import UserError

FORMAT = "vqa-search-reranker/1"


@dataclass
class RerankerConfig:
    token_dim: int  # D: CLIP's joint embedding space
    region_dim: int  # F: detector box features + geometry, or CLIP patch width
    attention_dim: int = 256  # the space where W_q t_m meets W_k r_k
    lam: float = 1.0  # λ, the weight of s_fine; may be chosen on val and saved here


class CrossAttentionReranker(nn.Module):
    def __init__(self, config: RerankerConfig):
        super().__init__()
        self.config = config
        self.region_norm = nn.LayerNorm(config.region_dim)
        self.W_q = nn.Linear(config.token_dim, config.attention_dim, bias=False)
        self.W_k = nn.Linear(config.region_dim, config.attention_dim, bias=False)
        self.W_v = nn.Linear(config.region_dim, config.token_dim, bias=False)
        self.W_o = nn.Linear(config.token_dim, config.token_dim, bias=False)
        nn.init.zeros_(self.W_o.weight)

    def attention(self, tokens: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """α[c, i, m, k]: how much token m of caption c attends to region k of image i.

        tokens (C, M, D), regions (I, K, F).
        """
        queries = self.W_q(tokens)  # (C, M, A): W_q t_m
        keys = self.W_k(self.region_norm(regions))  # (I, K, A): W_k r_k
        logits = torch.einsum("cma,ika->cimk", queries, keys)
        return logits.softmax(dim=-1)

    def fine_scores(self, tokens: torch.Tensor, token_mask: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """s_fine for every caption x image pair: (C, I).

        token_mask (C, M) is True for real tokens; padding neither attends nor counts in 1/M.
        """
        alpha = self.attention(tokens, regions)  # (C, I, M, K)
        values = self.W_v(self.region_norm(regions))  # (I, K, D): W_v r_k
        attended = torch.einsum("cimk,ikd->cimd", alpha, values)  # v_m for each pair
        # t_mᵀ W_o v_m = (W_oᵀ t_m) · v_m; nn.Linear computes x W_oᵀ, so W_oᵀ t_m is t_m @ W_o.
        read_out = tokens @ self.W_o.weight  # (C, M, D)
        per_token = torch.einsum("cmd,cimd->cim", read_out, attended)
        mask = token_mask.to(per_token.dtype)
        return (per_token * mask[:, None, :]).sum(dim=-1) / mask.sum(dim=-1, keepdim=True).clamp(min=1)

    def forward(self, global_scores: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                regions: torch.Tensor) -> torch.Tensor:
        """s = s_global + λ · s_fine, for every caption x image pair."""
        return global_scores + self.config.lam * self.fine_scores(tokens, token_mask, regions)


def save_reranker(model: CrossAttentionReranker, path: Path | str) -> Path:
    path = Path(path)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata={"format": FORMAT, "config": json.dumps(asdict(model.config))})
    return path


def load_reranker(path: Path | str, device: torch.device | str = "cpu") -> CrossAttentionReranker:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"re-ranker file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except (OSError, SafetensorError) as error:
        raise UserError(f"cannot read re-ranker {path}: {str(error).splitlines()[0]}") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not a vqa-search re-ranker (train one with `vqa-search train rerank`)")
    model = CrossAttentionReranker(RerankerConfig(**json.loads(metadata["config"])))
    model.load_state_dict(tensors)
    return model.to(device)
