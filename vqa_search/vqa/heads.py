"""The four answer heads: one classifier over the answer vocabulary, four ways to fuse the inputs.

Inputs, all computed by CLIP towers that stay frozen unless `--unfreeze-last` says otherwise:
    g  (B, D)     the image's global CLIP embedding (L2-normalised, as in the index)
    q  (B, D)     the question's CLIP text embedding (L2-normalised)
    P  (B, N, W)  the local encoder's patch tokens (dual variants; N patches of width W)
    l  (B, W')    the local encoder's own pooled output (dual-concat)
    R  (B, K, F)  the image's K precomputed regions from a region set (regions): features + box geometry

    baseline        x = [g, q, g⊙q]
    dual-concat     x = [g, q, g⊙q, ℓ, q⊙ℓ]                with ℓ = W_ℓ l
    dual-attention  a = MultiHeadAttention(query = W_q q, keys = values = [W_p P ; W_g g])
                    x = [g, q, g⊙q, a, q⊙a]
    regions         a = MultiHeadAttention(query = W_q q, keys = values = [W_r LN(R) ; W_g g])
                    x = [g, q, g⊙q, a, q⊙a]

    logits = MLP(x): (Linear → BatchNorm → GELU → Dropout) × 2 → Linear over the answers.

The element-wise products are the cheap bilinear interaction that fusion papers found to help
over concatenation alone. In dual-attention the question reads the patch tokens, so the answer can
depend on one small object; the global vector is one more key, for questions about the whole image.
`regions` is Bottom-Up Top-Down attention (Anderson et al. 2018): the question reads detector (or
CLIP-crop, CLIP-patch) regions computed once by `vqa-search regions` instead of a second image tower.
LN is a LayerNorm without weights, as the re-ranker reads the same features: box-head outputs come
at any scale, and the last 7 columns (the box geometry) are read like the rest. A region set always
holds exactly K regions per image (detections filled up with the whole image and a grid), so no
key is ever padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("baseline", "dual-concat", "dual-attention", "regions")
LOCAL_VARIANTS = ("dual-concat", "dual-attention")  # the variants with a second image tower


@dataclass
class HeadConfig:
    variant: str
    answers: int  # size of the answer vocabulary
    embed_dim: int  # D: the CLIP joint space of g and q
    local_width: int = 0  # W: width of the local encoder's patch tokens (dual variants)
    local_pooled_dim: int = 0  # W': its pooled output (dual-concat)
    region_dim: int = 0  # F: a region's features + geometry (regions)
    hidden: int = 1024
    dropout: float = 0.3
    attention_heads: int = 8


class AnswerHead(nn.Module):
    def __init__(self, config: HeadConfig):
        super().__init__()
        if config.variant not in VARIANTS:
            raise ValueError(f"unknown head variant {config.variant!r}; one of {', '.join(VARIANTS)}")
        self.config = config
        dim = config.embed_dim
        if config.variant == "dual-concat":
            self.W_l = nn.Linear(config.local_pooled_dim, dim)
        elif config.variant == "dual-attention":
            self.W_q = nn.Linear(dim, dim)
            self.W_p = nn.Linear(config.local_width, dim)
            self.W_g = nn.Linear(dim, dim)
            self.attention = nn.MultiheadAttention(dim, config.attention_heads, batch_first=True)
        elif config.variant == "regions":
            self.W_q = nn.Linear(dim, dim)
            self.region_norm = nn.LayerNorm(config.region_dim, elementwise_affine=False)
            self.W_r = nn.Linear(config.region_dim, dim)
            self.W_g = nn.Linear(dim, dim)
            self.attention = nn.MultiheadAttention(dim, config.attention_heads, batch_first=True)
        fused = 3 * dim if config.variant == "baseline" else 5 * dim
        self.classifier = nn.Sequential(
            *_block(fused, config.hidden, config.dropout),
            *_block(config.hidden, config.hidden, config.dropout),
            nn.Linear(config.hidden, config.answers),
        )

    def forward(self, image: torch.Tensor, question: torch.Tensor, patches: torch.Tensor | None = None,
                local_pooled: torch.Tensor | None = None, regions: torch.Tensor | None = None) -> torch.Tensor:
        """Answer logits (B, answers)."""
        return self.classifier(self.fuse(image, question, patches, local_pooled, regions))

    def fuse(self, image: torch.Tensor, question: torch.Tensor, patches: torch.Tensor | None = None,
             local_pooled: torch.Tensor | None = None, regions: torch.Tensor | None = None) -> torch.Tensor:
        parts = [image, question, image * question]
        if self.config.variant == "dual-concat":
            local = self.W_l(local_pooled)
            parts += [local, question * local]
        elif self.config.variant in ("dual-attention", "regions"):
            attended = self.attend(question, patches if self.config.variant == "dual-attention" else regions, image)[0]
            parts += [attended, question * attended]
        return torch.cat(parts, dim=-1)

    def attend(self, question: torch.Tensor, tokens: torch.Tensor,
               image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The question's reading of [tokens; global], tokens being the local encoder's patches (dual-attention)
        or the image's regions (regions): (B, D), and its weights (B, N + 1) averaged over heads."""
        keys = torch.cat([self.project_tokens(tokens), self.W_g(image).unsqueeze(1)], dim=1)
        attended, weights = self.attention(self.W_q(question).unsqueeze(1), keys, keys)
        return attended.squeeze(1), weights.squeeze(1)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patches or regions as attention keys in the joint space D."""
        if self.config.variant == "regions":
            return self.W_r(self.region_norm(tokens))
        return self.W_p(tokens)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """BCE against the soft scores, summed over answers and averaged over questions (the VQA v2 recipe);
    or cross-entropy against the scores normalised into a distribution."""
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(logits)
    return F.cross_entropy(logits, targets / targets.sum(dim=1, keepdim=True))


def _block(inputs: int, outputs: int, dropout: float) -> list[nn.Module]:
    return [nn.Linear(inputs, outputs), nn.BatchNorm1d(outputs), nn.GELU(), nn.Dropout(dropout)]
