"""Stage 2 at query time: re-score the global top N with s = s_global + λ·s_fine.

Only the N best global candidates are re-scored (the re-ranker costs far more per pair than a dot
product); they keep their place above everything the global search ranked lower. Text queries
re-rank images, image queries re-rank captions: both read caption tokens against image regions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from vqa_search.align.constants import DEFAULT_TOP, RERANKER_FILE  # light: the CLI and `info` read them too
from vqa_search.align.region_store import RegionSet
from vqa_search.align.reranker import CrossAttentionReranker, load_reranker
from vqa_search.core.encode import token_embeddings, token_lengths
from vqa_search.core.errors import UserError
from vqa_search.core.images import load_named_image
from vqa_search.core.models import Clip, load_clip
from vqa_search.core.identity import ModelIdentity
from vqa_search.retrieval.metrics import first_correct_ranks, recall_curve, summarize
from vqa_search.retrieval.recall import RecallRun
from vqa_search.retrieval.searcher import Hit, Index, SearchResult


@torch.no_grad()
def caption_tokens(clip: Clip, texts: list[str], batch_size: int = 256,
                   dtype: torch.dtype = torch.float16) -> list[torch.Tensor]:
    """t_1..t_M of each caption, cut to its own length: (M_i, D), float16 by default to keep 30k captions small.

    The last row (end of text) is the caption's unnormalised global embedding.
    """
    tokens = clip.tokenizer(texts)
    lengths = token_lengths(tokens).tolist()
    out: list[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        batch = tokens[start:start + batch_size].to(clip.device)
        embeddings, _ = token_embeddings(clip.model, batch)
        out += [row[:length].to(dtype).cpu() for row, length in zip(embeddings, lengths[start:start + batch_size])]
    return out


def padded(tokens: list[torch.Tensor], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of captions as (C, M, D) float32 and the mask of real tokens."""
    lengths = torch.tensor([len(t) for t in tokens])
    batch = pad_sequence(tokens, batch_first=True).float().to(device)
    return batch, (torch.arange(batch.shape[1])[None, :] < lengths[:, None]).to(device)


def promote(scores: np.ndarray, top: np.ndarray, rescored: np.ndarray) -> np.ndarray:
    """Row-wise: the re-scored top candidates first, in their new order, then the rest as before."""
    out = scores.astype(np.float64, copy=True)
    rows = np.arange(len(scores))[:, None]
    lifted = rescored - rescored.min(axis=1, keepdims=True) + scores.max(axis=1, keepdims=True) + 1.0
    out[rows, top] = lifted
    return out


def top_candidates(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n best columns of each row (unordered; ranking comes later)."""
    n = min(n, scores.shape[1])
    return np.argpartition(-scores, n - 1, axis=1)[:, :n]


@dataclass
class FineInputs:
    """What s_fine reads for a gallery: each caption's tokens and each image's regions."""

    tokens: list[torch.Tensor]  # per caption (M_i, D)
    regions: torch.Tensor  # (I, K, F) float16, rows in gallery image order


@torch.no_grad()
def reranked_ranks(reranker: CrossAttentionReranker, global_scores: np.ndarray, inputs: FineInputs,
                   caption_image: np.ndarray, top: int = DEFAULT_TOP, chunk: int = 64) -> dict[str, np.ndarray]:
    """First-correct ranks of every caption (t2i) and image (i2t) after re-ranking the global top N.

    global_scores is (captions, images); the recall protocol of `bench recall`, with stage 2 on top.
    """
    lam = reranker.config.lam
    n_images = global_scores.shape[1]
    # Each image's regions through the region MLP once, not once per caption that ranks it in its top N.
    regions = reranker.project_regions(inputs.regions.float())
    t2i_top = top_candidates(global_scores, top)
    t2i_new = np.empty(t2i_top.shape, dtype=np.float64)
    for start in range(0, len(global_scores), chunk):
        rows = slice(start, start + chunk)
        tokens, mask = padded(inputs.tokens[rows])
        candidates = torch.as_tensor(t2i_top[rows])
        fine = reranker.projected_fine_scores(tokens, mask, regions[candidates]).numpy()
        t2i_new[rows] = np.take_along_axis(global_scores[rows], t2i_top[rows], axis=1) + lam * fine
    t2i = first_correct_ranks(promote(global_scores, t2i_top, t2i_new), caption_image, np.arange(n_images))

    image_scores = np.ascontiguousarray(global_scores.T)
    i2t_top = top_candidates(image_scores, top)
    i2t_new = np.empty(i2t_top.shape, dtype=np.float64)
    for image, candidates in enumerate(i2t_top):
        tokens, mask = padded([inputs.tokens[c] for c in candidates])
        fine = reranker.projected_fine_scores(tokens, mask, regions[image][None, None])[:, 0].numpy()
        i2t_new[image] = image_scores[image, candidates] + lam * fine
    i2t = first_correct_ranks(promote(image_scores, i2t_top, i2t_new), np.arange(n_images), caption_image)
    return {"t2i": t2i, "i2t": i2t}


class QueryReranker:
    """An index with its re-ranker and region set, answering re-ranked queries."""

    def __init__(self, index: Index, path: Path | str | None = None, top: int = DEFAULT_TOP):
        if top < 1:
            raise UserError(f"--rerank-top must be at least 1 (got {top})")
        self.index = index
        self.top = top
        path = Path(path) if path else index.dir.path / RERANKER_FILE
        if not path.is_file():
            raise UserError(f"no re-ranker at {path}: train one with `vqa-search train rerank DATASET`, "
                            "or pass --reranker FILE")
        self.model = load_reranker_for(path, index.identity)
        self.regions = RegionSet.open(index.dir.path, self.model.config.regions)
        if self.regions.feature_dim != self.model.config.region_dim:
            raise UserError(f"the re-ranker {path} expects {self.model.config.region_dim}-d regions, but the "
                            f"region set {self.regions.name!r} has {self.regions.feature_dim}-d ones")

    def search(self, text: str | None = None, image: Path | str | None = None, k: int = 10,
               target: str = "images", nprobe: int | None = None, explain: bool = False,
               top: int | None = None) -> SearchResult:
        """The global top `top` (default: the one this re-ranker was opened with) re-scored, then the rest."""
        top = self.top if top is None else top
        if top < 1:
            raise UserError(f"--rerank-top must be at least 1 (got {top})")
        if (text is not None and target != "images") or (image is not None and target != "captions"):
            raise UserError("--rerank re-scores text→image and image→caption queries only")
        if text is not None:
            if not text.strip():
                raise UserError("the query text is empty")
            # One text forward gives both the tokens and, at the end-of-text token, the global query.
            tokens = caption_tokens(self.index.clip, [text.strip()], dtype=torch.float32)
            query = F.normalize(tokens[0][-1], dim=-1)[None].numpy()
            result = self.index.search_vector(query, text.strip(), max(k, top), target, nprobe)
        else:
            result = self.index.search(image=image, k=max(k, top), target=target, nprobe=nprobe)
        candidates, rest = result.results[:top], result.results[top:]
        if not candidates:
            return result
        if text is not None:
            regions = gallery_regions(self.regions, [hit.image for hit in candidates])[None].float()
            boxes = self.regions.boxes([self.regions.row_of(hit.image) for hit in candidates])
        else:
            tokens = caption_tokens(self.index.clip, [hit.caption for hit in candidates], dtype=torch.float32)
            features, boxes = self._image_regions(image)
            regions = torch.as_tensor(features)[None, None]
        scores, alpha = self._score(candidates, tokens, regions, explain)
        order = np.argsort(-scores, kind="stable")
        reranked = []
        for rank, position in enumerate(order, start=1):
            hit = candidates[position]
            hit.rank, hit.score = rank, float(scores[position])
            if explain:
                hit.explanation = self._explain(result.query if text is not None else hit.caption,
                                                alpha[position], boxes[position if text is not None else 0])
            reranked.append(hit)
        for rank, hit in enumerate(rest, start=len(reranked) + 1):
            hit.rank = rank
        result.results = (reranked + rest)[:k]
        return result

    @torch.no_grad()
    def _score(self, candidates: list[Hit], tokens: list[torch.Tensor], regions: torch.Tensor, explain: bool):
        """s for every candidate, and with --explain α[candidate, m, k]."""
        batch, mask = padded(tokens)
        fine = self.model.fine_scores(batch, mask, regions).reshape(-1)
        global_scores = torch.tensor([hit.score for hit in candidates])
        scores = (global_scores + self.model.config.lam * fine).numpy()
        if not explain:
            return scores, None
        alpha = self.model.attention(batch, regions)  # (1, N, M, K) for a text, (N, 1, M, K) for an image
        return scores, alpha.reshape(len(candidates), *alpha.shape[2:])

    def _image_regions(self, image: Path | str) -> tuple[np.ndarray, np.ndarray]:
        features, boxes = self._extractor.extract([load_named_image(image, "query image")])
        return features[0], boxes

    @cached_property
    def _extractor(self):
        """Built on the first image query and kept: a detector takes a while to load."""
        return self.regions.extractor()

    def _explain(self, text: str, alpha: torch.Tensor, boxes: np.ndarray) -> list[dict]:
        """For each word of the caption, the region it attended to most (start/end tokens left out)."""
        explanation = []
        for m, word in enumerate(_words(self.index.clip, text)):
            if word is None:
                continue
            k = int(alpha[m].argmax())
            explanation.append({"word": word, "region": k, "weight": round(float(alpha[m, k]), 3),
                                "box": [round(float(v), 1) for v in boxes[k]]})
        return explanation


def _words(clip: Clip, text: str) -> list[str | None]:
    """The caption's tokens as text, position by position; None for the start and end tokens."""
    ids = clip.tokenizer([text])[0]
    ids = ids[: int(token_lengths(ids[None])[0])].tolist()
    decode = getattr(clip.tokenizer, "decode", None)
    words = [decode([i]).strip() if decode else f"token {m}" for m, i in enumerate(ids)]
    return [None] + words[1:-1] + [None]


def load_reranker_for(path: Path | str, identity: ModelIdentity) -> CrossAttentionReranker:
    """The re-ranker at `path`, refused unless it was trained on the tokens of the CLIP `identity`."""
    reranker = load_reranker(path).eval()
    trained_with = ModelIdentity.from_json(reranker.config.clip)
    if not trained_with.same_weights(identity):
        raise UserError(f"the re-ranker {path} reads tokens of {trained_with.describe()}, not of "
                        f"{identity.describe()} (the index's or the benchmark's model)")
    return reranker


def reranked_run(run: RecallRun, reranker_path: Path | str, index_dir: Path | str,
                 top: int = DEFAULT_TOP) -> RecallRun:
    """The same split and gallery as `run`, with the global top N re-ranked: the gain is stage 2's alone."""
    identity = ModelIdentity(run.model, run.pretrained, run.sha256)
    reranker = load_reranker_for(reranker_path, identity)
    started = time.perf_counter()
    regions = RegionSet.open(index_dir, reranker.config.regions)
    gallery = run.gallery
    tokens = caption_tokens(load_clip(identity), gallery.caption_texts)
    inputs = FineInputs(tokens, gallery_regions(regions, gallery.images))
    scores = gallery.caption_vectors @ gallery.image_vectors.T
    ranks = reranked_ranks(reranker, scores, inputs, gallery.caption_image, top)
    ks = tuple(int(key[2:]) for key in run.t2i if key.startswith("R@"))
    return replace(run, name=f"{run.name} + re-ranker", t2i=summarize(ranks["t2i"], ks),
                   i2t=summarize(ranks["i2t"], ks),
                   curves={direction: recall_curve(ranks[direction]) for direction in ranks}, ranks=ranks,
                   seconds=run.seconds + time.perf_counter() - started)


def gallery_regions(regions: RegionSet, paths: list[str]) -> torch.Tensor:
    """(I, K, F) float16 regions of the gallery's images, in gallery order."""
    rows = [regions.row_of(path) for path in paths]  # a UserError names an image without regions
    return torch.from_numpy(np.ascontiguousarray(regions.features(rows)))
