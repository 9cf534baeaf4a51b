"""The four answer heads: shapes, what each one reads, and that a few steps of training lower the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqa_search.vqa.heads import VARIANTS, AnswerHead, HeadConfig, answer_loss

B, D, N, W, POOLED, ANSWERS = 6, 16, 9, 24, 12, 7
K, R = 5, 11  # regions per image, and their width: features + 7 geometry values

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def head(variant: str, **overrides) -> AnswerHead:
    torch.manual_seed(0)
    config = HeadConfig(variant=variant, answers=ANSWERS, embed_dim=D, local_width=W, local_pooled_dim=POOLED,
                        region_dim=R, hidden=32, dropout=0.0, attention_heads=4, **overrides)
    return AnswerHead(config)


def inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(B, D, generator=generator), dim=-1)
    question = F.normalize(torch.randn(B, D, generator=generator), dim=-1)
    return (image, question, torch.randn(B, N, W, generator=generator), torch.randn(B, POOLED, generator=generator),
            3 * torch.rand(B, K, R, generator=generator))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_gives_one_logit_per_answer(variant):
    logits = head(variant).eval()(*inputs())
    assert logits.shape == (B, ANSWERS)
    assert torch.isfinite(logits).all()


def test_fusion_widths_follow_the_equations():
    image, question, patches, pooled, regions = inputs()
    assert head("baseline").fuse(image, question).shape == (B, 3 * D)  # [g, q, g⊙q]
    assert head("dual-concat").fuse(image, question, patches, pooled).shape == (B, 5 * D)
    assert head("dual-attention").fuse(image, question, patches, pooled).shape == (B, 5 * D)
    assert head("regions").fuse(image, question, regions=regions).shape == (B, 5 * D)


def test_baseline_concatenates_the_element_wise_product():
    image, question, _, _, _ = inputs()
    fused = head("baseline").fuse(image, question)
    assert torch.equal(fused, torch.cat([image, question, image * question], dim=-1))


def test_dual_attention_reads_every_patch_and_the_global_vector():
    model = head("dual-attention").eval()
    image, question, patches, pooled, regions = inputs()
    attended, weights = model.attend(question, patches, image)
    assert weights.shape == (B, N + 1)  # N patches and the global feature
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(B))
    changed = patches.clone()
    changed[:, 4] += 3.0  # one patch: a small object somewhere in the picture
    assert not torch.allclose(model.attend(question, changed, image)[0], attended)
    # the second global vector of dual-concat is not what it reads
    assert torch.equal(model(image, question, patches, pooled), model(image, question, patches, pooled * 0))


def test_dual_concat_reads_the_local_pooled_vector_not_the_patches():
    model = head("dual-concat").eval()
    image, question, patches, pooled, regions = inputs()
    assert torch.equal(model(image, question, patches, pooled), model(image, question, patches * 0, pooled))
    assert not torch.allclose(model(image, question, patches, pooled), model(image, question, patches, pooled + 1))


@pytest.mark.parametrize("loss", ["bce", "ce"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_few_steps_reduce_the_loss(variant, loss):
    model = head(variant)
    image, question, patches, pooled, regions = inputs()
    targets = torch.zeros(B, ANSWERS)
    targets[torch.arange(B), torch.arange(B) % ANSWERS] = 1.0
    targets[0, 3] = 0.3  # a soft score: a minority of the humans gave answer 3
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        value = answer_loss(model(image, question, patches, pooled, regions), targets, loss)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < 0.5 * losses[0]


def test_regions_attention_equals_a_per_example_loop_of_the_equations():
    """a = softmax over heads of (W_q q)·[W_r LN(r_k) ; W_g g] / √d, one question at a time."""
    model = head("regions").eval()
    image, question, _, _, regions = inputs()
    attended, weights = model.attend(question, regions, image)
    attention = model.attention
    heads, d = attention.num_heads, D // attention.num_heads
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
    for b in range(B):
        r = regions[b]
        normalised = (r - r.mean(dim=1, keepdim=True)) / torch.sqrt(r.var(dim=1, unbiased=False, keepdim=True) + 1e-5)
        keys = torch.cat([model.W_r(normalised), model.W_g(image[b])[None]])  # (K + 1, D)
        query = model.W_q(question[b])
        q, k, v = query @ w_q.T + b_q, keys @ w_k.T + b_k, keys @ w_v.T + b_v
        alpha = [torch.softmax(k[:, h * d:(h + 1) * d] @ q[h * d:(h + 1) * d] / d ** 0.5, dim=0) for h in range(heads)]
        read = torch.cat([alpha[h] @ v[:, h * d:(h + 1) * d] for h in range(heads)])
        torch.testing.assert_close(attended[b], attention.out_proj(read))
        torch.testing.assert_close(weights[b], torch.stack(alpha).mean(dim=0))
        assert weights[b].shape == (K + 1,)


def test_regions_head_reads_the_regions_and_their_geometry_not_the_local_encoder():
    model = head("regions").eval()
    image, question, patches, pooled, regions = inputs()
    logits = model(image, question, regions=regions)
    assert torch.equal(model(image, question, patches * 0, pooled * 0, regions), logits)
    moved = regions.clone()
    moved[:, 2, -7:] = torch.tensor([0.5, 0.5, 0.9, 0.9, 0.4, 0.4, 0.16])  # one box elsewhere, same appearance
    assert not torch.allclose(model(image, question, regions=moved), logits)


def test_bce_loss_is_summed_over_answers_and_averaged_over_questions():
    logits, targets = torch.randn(4, 5), torch.rand(4, 5)
    naive = sum(-(t * torch.log(torch.sigmoid(x)) + (1 - t) * torch.log(1 - torch.sigmoid(x))).sum()
                for x, t in zip(logits, targets)) / 4
    torch.testing.assert_close(answer_loss(logits, targets, "bce"), naive)


def test_ce_loss_uses_the_scores_as_a_distribution():
    logits, targets = torch.randn(3, 4), torch.tensor([[1.0, 0, 0, 0], [0, 0.3, 0.3, 0], [0, 0, 0, 0.6]])
    naive = sum(-(t / t.sum() * torch.log_softmax(x, dim=0)).sum() for x, t in zip(logits, targets)) / 3
    torch.testing.assert_close(answer_loss(logits, targets, "ce"), naive)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="dual-attention"):
        head("triple")
