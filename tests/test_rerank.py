"""Stage 2 end to end on a small shapes world: training, query-time re-ranking, the recall rows.

Re-ranked results are compared with a naive reference that re-scores each query's global top N
pair by pair with the model's forward and sorts them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vqa_search.align import train_rerank
from vqa_search.align.region_store import RegionSet, compute_regions
from vqa_search.align.regions import RegionConfig
from vqa_search.align.reranker import CrossAttentionReranker, RerankerConfig, load_reranker, save_reranker
from vqa_search.align.train_rerank import RerankTrainConfig, mine_negatives, train_reranker
from vqa_search.cli import app
from vqa_search.core.errors import UserError
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.core.models import load_clip
from vqa_search.core.identity import TINY_MODEL, resolve_identity
from vqa_search.retrieval.recall import Gallery, RecallConfig, run_recall
from vqa_search.align.rerank import (FineInputs, QueryReranker, caption_tokens, gallery_regions, reranked_ranks,
                                         reranked_run)
from vqa_search.retrieval.searcher import Index
from vqa_search.shapes import ShapesConfig, make_shapes

from conftest import tiny_config

TOP = 7


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """120 shapes images, indexed by the tiny random CLIP, with its patch tokens as regions."""
    root = tmp_path_factory.mktemp("rerank") / "shapes"
    make_shapes(root, ShapesConfig(images=120, size=32, seed=3))
    build_index(root, BuildConfig(**tiny_config()))
    compute_regions(root, RegionConfig(source="clip-patches", workers=0, progress=False))
    return root


def trained_like(index: Index, regions: RegionSet, seed: int = 0) -> CrossAttentionReranker:
    """Random weights everywhere (W_o too, which a fresh model keeps at zero), for the index's CLIP."""
    torch.manual_seed(seed)
    model = CrossAttentionReranker(RerankerConfig(
        token_dim=index.embeddings().shape[1], region_dim=regions.feature_dim, attention_dim=16,
        lam=0.8, regions=regions.name, clip=index.identity.to_json()))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    return model.eval()


def exact_tokens(index: Index, text: str) -> torch.Tensor:
    return caption_tokens(index.clip, [text], dtype=torch.float32)[0]


@torch.no_grad()
def naive_pair_score(model, tokens: torch.Tensor, global_score: float, regions: np.ndarray) -> float:
    """s for one caption (M, D) and one image (K, F), through the model's forward."""
    tokens = tokens.float()[None]
    return float(model(torch.tensor([[global_score]]), tokens, torch.ones(tokens.shape[:2], dtype=torch.bool),
                       torch.as_tensor(regions).float()[None, None])[0, 0])


def test_text_query_rerank_equals_rescoring_the_top_pair_by_pair(world, tmp_path):
    index = Index.open(world)
    regions = RegionSet.open(world)
    model = trained_like(index, regions)
    path = save_reranker(model, tmp_path / "reranker.safetensors")
    query = "a red circle to the left of a blue square"

    result = QueryReranker(index, path, top=TOP).search(text=query, k=10, explain=True)

    plain = index.search(text=query, k=10)
    query_tokens = exact_tokens(index, query)
    expected = sorted(
        ((naive_pair_score(model, query_tokens, hit.score, regions.features([regions.row_of(hit.image)])[0]), hit.image)
         for hit in plain.results[:TOP]), reverse=True)
    assert [hit.image for hit in result.results[:TOP]] == [image for _, image in expected]
    assert [hit.score for hit in result.results[:TOP]] == pytest.approx([score for score, _ in expected], rel=1e-5)
    assert [hit.image for hit in result.results[TOP:]] == [hit.image for hit in plain.results[TOP:]]
    assert [hit.rank for hit in result.results] == list(range(1, 11))
    words = [item["word"] for item in result.results[0].explanation]
    assert words == ["a", "red", "circle", "to", "the", "left", "of", "a", "blue", "square"]
    boxes = regions.boxes([regions.row_of(result.results[0].image)])[0]
    assert all(item["box"] == pytest.approx(boxes[item["region"]].tolist(), abs=0.05)
               for item in result.results[0].explanation)


def test_image_query_reranks_captions_with_the_query_images_regions(world, tmp_path):
    index = Index.open(world)
    regions = RegionSet.open(world)
    model = trained_like(index, regions, seed=1)
    path = save_reranker(model, tmp_path / "reranker.safetensors")
    query = world / "Images" / index.image_paths[5]

    result = QueryReranker(index, path, top=TOP).search(image=query, k=TOP, target="captions")

    query_regions = regions.features([regions.row_of(index.image_paths[5])])[0]  # the extractor recomputes these
    plain = index.search(image=query, k=TOP, target="captions")
    expected = sorted(((naive_pair_score(model, exact_tokens(index, hit.caption), hit.score, query_regions),
                        hit.caption_id) for hit in plain.results), reverse=True)
    assert [hit.caption_id for hit in result.results] == [caption for _, caption in expected]


def test_a_fresh_reranker_leaves_recall_exactly_as_it_was(world, tmp_path):
    index = Index.open(world)
    regions = RegionSet.open(world)
    fresh = CrossAttentionReranker(RerankerConfig(
        token_dim=index.embeddings().shape[1], region_dim=regions.feature_dim, regions=regions.name,
        clip=index.identity.to_json()))
    path = save_reranker(fresh, tmp_path / "fresh.safetensors")
    run = run_recall(world, RecallConfig(split="test", model=TINY_MODEL, pretrained="none", workers=0, progress=False))

    reranked = reranked_run(run, path, world / ".vqa-search", top=TOP)

    assert reranked.name.endswith("+ re-ranker")
    for direction in ("t2i", "i2t"):
        np.testing.assert_array_equal(reranked.ranks[direction], run.ranks[direction])


def test_reranked_ranks_match_a_naive_loop(world):
    index = Index.open(world)
    regions = RegionSet.open(world)
    model = trained_like(index, regions, seed=2)
    run = run_recall(world, RecallConfig(split="test", model=TINY_MODEL, pretrained="none", workers=0, progress=False))
    gallery = run.gallery
    inputs = FineInputs(caption_tokens(index.clip, gallery.caption_texts), gallery_regions(regions, gallery.images))
    scores = gallery.caption_vectors @ gallery.image_vectors.T

    ranks = reranked_ranks(model, scores, inputs, gallery.caption_image, top=TOP)

    for caption in range(0, len(scores), 7):
        order = list(np.argsort(-scores[caption], kind="stable"))
        top = order[:TOP]
        rescored = [naive_pair_score(model, inputs.tokens[caption], scores[caption, image],
                                     inputs.regions[image].numpy()) for image in top]
        new_order = [top[i] for i in np.argsort(-np.array(rescored), kind="stable")] + order[TOP:]
        assert ranks["t2i"][caption] == new_order.index(gallery.caption_image[caption]) + 1


def test_mined_negatives_are_the_best_wrong_images():
    gallery = Gallery(images=["a", "b", "c", "d"], caption_texts=["red", "blue", "red", "green"],
                      caption_image=np.array([0, 1, 2, 3]), image_vectors=np.eye(4, dtype=np.float32),
                      caption_vectors=np.array([[0.9, 0.1, 0.8, 0.5], [0.2, 0.9, 0.3, 0.4], [0.7, 0.6, 0.9, 0.1],
                                                [0.1, 0.2, 0.3, 0.9]], dtype=np.float32),
                      missing=0, skipped={}, source="test")
    same_text = train_rerank._images_sharing_text(gallery)

    negatives = mine_negatives(gallery, 2, same_text)

    assert same_text == {0: {2}, 2: {0}}  # "red" fits images a and c: neither is the other's negative
    assert negatives.tolist() == [[3, 1], [3, 2], [1, 3], [2, 1]]


def test_training_scores_equal_the_models_forward():
    torch.manual_seed(0)
    images, captions = 6, 12
    gallery = Gallery([f"{i}.png" for i in range(images)], [f"caption {c}" for c in range(captions)],
                      np.repeat(np.arange(images), 2), np.random.default_rng(0).standard_normal((images, 8), np.float32),
                      np.random.default_rng(1).standard_normal((captions, 8), np.float32), 0, {}, "test")
    tokens = [torch.randn(length, 8).half() for length in (3, 5, 2, 4, 6, 1, 3, 2, 5, 4, 3, 2)]
    regions = torch.randn(images, 4, 5).half()
    model = CrossAttentionReranker(RerankerConfig(token_dim=8, region_dim=5, attention_dim=3, lam=0.6, region_hidden=7))
    with torch.no_grad():
        model.W_o.weight.normal_()
    trainer = train_rerank.RerankTrainer(model, train_rerank.TrainingSplit(gallery, FineInputs(tokens, regions)), 10.0,
                                         RerankTrainConfig(negatives=2, progress=False), torch.Generator())
    batch = torch.tensor([0, 5, 7])  # captions of images 0, 2 and 3
    # as `loss` builds them: own image, hard negatives (repeats allowed), then the batch's own images
    candidates = torch.tensor([[0, 3, 1, 0, 2, 3], [2, 4, 4, 0, 2, 3], [3, 3, 0, 0, 2, 3]])

    scores = trainer.scores(batch, candidates)

    padded_tokens = torch.nn.utils.rnn.pad_sequence([tokens[c].float() for c in batch.tolist()], batch_first=True)
    mask = torch.arange(padded_tokens.shape[1])[None] < torch.tensor([len(tokens[c]) for c in batch.tolist()])[:, None]
    global_scores = torch.einsum("cd,cnd->cn", torch.as_tensor(gallery.caption_vectors)[batch],
                                 torch.as_tensor(gallery.image_vectors)[candidates])
    expected = model(global_scores, padded_tokens, mask, regions[candidates].float())
    torch.testing.assert_close(scores, expected)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """Two epochs of stage 2 with the CLIP it reads held, to check it was not touched."""
    out = tmp_path_factory.mktemp("trained") / "reranker.safetensors"
    clip = load_clip(resolve_identity(TINY_MODEL, "none"))
    before = {name: value.clone() for name, value in clip.model.state_dict().items()}
    patch = pytest.MonkeyPatch()
    patch.setattr(train_rerank, "load_clip", lambda identity: clip)
    try:
        result = train_reranker(world, RerankTrainConfig(model=TINY_MODEL, pretrained="none", out=out, lam=None,
                                                         negatives=4, epochs=2, batch_size=32, attention_dim=16,
                                                         top=TOP, progress=False))
    finally:
        patch.undo()
    return result, clip, before


def test_training_writes_a_reranker_that_queries_load(world, trained):
    result, _, _ = trained
    model = load_reranker(result.path)

    assert model.config.lam == result.lam and result.lam in train_rerank.LAMBDA_GRID
    assert model.config.regions == "clip-patches"
    assert model.config.clip == resolve_identity(TINY_MODEL, "none").to_json()
    assert [epoch["epoch"] for epoch in result.history] == [1, 2]
    assert all(np.isfinite(epoch["loss"]) for epoch in result.history)
    # like stage 1 and the VQA heads: the history and the curve beside the file
    assert result.history_path == result.path.with_name("reranker.history.json")
    assert result.curve == result.path.with_name("reranker.curve.png")
    on_disk = json.loads(result.history_path.read_text())
    assert on_disk["best_epoch"] == result.best_epoch and on_disk["history"] == result.history
    assert on_disk["config"]["lam"] is None and on_disk["config"]["warmup"] == 0.05
    assert result.curve.read_bytes().startswith(b"\x89PNG")
    assert model.W_o.weight.abs().sum() > 0  # it learned something, starting from zero
    assert QueryReranker(Index.open(world), result.path).search(text="a red circle", k=3).results


def test_training_leaves_the_frozen_clip_unchanged(trained):
    _, clip, before = trained
    after = clip.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_a_crash_keeps_the_best_reranker_so_far(world, tmp_path, monkeypatch):
    out = tmp_path / "reranker.safetensors"
    real_batches = train_rerank.RerankTrainer.batches

    def crash_in_epoch_two(self, number):
        if number == 2:
            raise KeyboardInterrupt
        return real_batches(self, number)

    monkeypatch.setattr(train_rerank.RerankTrainer, "batches", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_reranker(world, RerankTrainConfig(model=TINY_MODEL, pretrained="none", out=out, negatives=4, epochs=3,
                                                batch_size=32, attention_dim=16, top=TOP, progress=False))
    assert load_reranker(out).config.regions == "clip-patches"
    history = json.loads(out.with_name("reranker.history.json").read_text())
    assert history["best_epoch"] == 1 and [record["epoch"] for record in history["history"]] == [1]


@pytest.mark.parametrize("args, message", [
    (["query", "x", "--explain"], "add --rerank"),
    (["query", "x", "--rerank", "--reranker", "missing.safetensors"], "no re-ranker at"),
    (["query", "x", "--rerank", "--target", "captions"], "text→image and image→caption"),
    (["train", "rerank", ".", "--model", TINY_MODEL, "--pretrained", "none", "--lambda", "big"], "--lambda takes"),
    (["train", "rerank", ".", "--model", TINY_MODEL, "--pretrained", "none", "--negatives", "0"], "--negatives"),
])
def test_cli_mistakes_are_one_line_errors(world, trained, monkeypatch, args, message):
    monkeypatch.chdir(world)
    if "--rerank" in args and "--reranker" not in args:
        args = args + ["--reranker", str(trained[0].path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.count("\n") == 1


def test_bench_recall_prints_both_rows(world, trained):
    result = CliRunner().invoke(app, ["bench", "recall", str(world), "--model", TINY_MODEL, "--pretrained", "none",
                                      "--workers", "0", "--quiet", "--reranker", str(trained[0].path),
                                      "--rerank-top", str(TOP), "--json", "-"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [row["name"] for row in rows] == [f"{TINY_MODEL} none", f"{TINY_MODEL} none + re-ranker"]


def test_a_reranker_for_other_weights_is_refused(world, tmp_path):
    index = Index.open(world)
    regions = RegionSet.open(world)
    model = trained_like(index, regions)
    model.config.clip = {"model": TINY_MODEL, "pretrained": "/elsewhere/ft.safetensors", "sha256": "0" * 64}
    path = save_reranker(model, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="reads tokens of"):
        QueryReranker(index, path)
