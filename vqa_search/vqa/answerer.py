"""A trained head with everything it reads: its CLIP, its local encoder or region set, its answer vocabulary.

The head file is safetensors: the head's weights, the local encoder's trained blocks (under
`local.`), and in the metadata the head config, the vocabulary and which CLIP weights it was
trained on. Those base weights are loaded from their own tag, checkpoint or Hugging Face folder,
so a head file stays small, and a head is refused when they are not the same weights. A regions
head records its region set (index, name and the extractor's identity key) and is refused when
the set is missing or was recomputed with another extractor.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import open_clip
import torch

from vqa_search.align.region_store import RegionSet, identity_key
from vqa_search.align.reranker import REGION_SET_NAME
from vqa_search.core.artifacts import (DIMENSION, DROPOUT, OPTIONAL_DIMENSION, Artifact, ArtifactKind, at_least,
                                  expected_state, one_of, open_artifact, save_artifact)
from vqa_search.core.errors import UserError
from vqa_search.core.identity import find_recorded_weights
from vqa_search.core.models import Clip, load_clip
from vqa_search.core.identity import ModelIdentity
from vqa_search.vqa.answers import AnswerVocab
from vqa_search.vqa.features import ImageFeatures, LocalEncoder, LocalTower
from vqa_search.vqa.heads import LOCAL_VARIANTS, VARIANTS, AnswerHead, HeadConfig
from vqa_search.vqa.hf_local import HfLocalEncoder, is_hf_model, read_hf_vit

FORMAT = "vqa-search-vqa-head/1"
HEAD_FILE = ArtifactKind(FORMAT, "head file", "a vqa-search answer head", "train one with `vqa-search train vqa`")
LOSSES = ("bce", "ce")
LOCAL_PREFIX = "local."
HEAD_RULES = {"variant": one_of(VARIANTS), "answers": at_least(1), "embed_dim": DIMENSION,
              "local_width": OPTIONAL_DIMENSION, "local_pooled_dim": OPTIONAL_DIMENSION, "hidden": DIMENSION,
              "region_dim": OPTIONAL_DIMENSION, "dropout": DROPOUT, "attention_heads": DIMENSION}


@dataclass
class LocalRecord:
    """The metadata's "local": the local encoder's base weights and how many of its blocks the file holds."""

    model: str
    pretrained: str
    unfreeze_last: int
    sha256: str | None = None

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.model, self.pretrained, self.sha256)


@dataclass
class RegionsRecord:
    """The metadata's "regions": the region set a regions head was trained on."""

    index: str  # the index directory; `ask --index` / `bench vqa --index` may name another
    name: str  # the set's folder under INDEX/regions/
    key: str  # region_store.identity_key of its extractor: equal keys, equal features for an image

    @classmethod
    def of(cls, regions: RegionSet) -> "RegionsRecord":
        return cls(str(regions.dir.path.parent.parent), regions.name, identity_key(regions.manifest["extractor"]))


@dataclass
class Answerer:
    head: AnswerHead
    vocab: AnswerVocab
    clip: Clip  # g and q
    local: LocalTower | None  # dual variants
    loss: str  # bce: independent sigmoid per answer; ce: one softmax over the vocabulary
    regions: RegionSet | None = None  # regions variant

    def logits(self, global_vectors: torch.Tensor, question_vectors: torch.Tensor,
               local_streams: torch.Tensor | None, inverse: torch.Tensor,
               regions: torch.Tensor | None = None) -> torch.Tensor:
        """Answer logits per question; `local_streams` and `regions` per distinct image, `inverse` maps
        questions to them."""
        device = self.clip.device
        inverse = inverse.to(device)
        patches = pooled = None
        if self.local is not None:
            patches, pooled = self.local(local_streams)
            patches, pooled = patches[inverse], pooled[inverse]
        if regions is not None:
            regions = regions.to(device, torch.float32)[inverse]
        return self.head(global_vectors.to(device), question_vectors.to(device), patches, pooled, regions)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Per answer: sigmoid for the BCE head (its soft-score estimate), softmax for the CE head."""
        return logits.sigmoid() if self.loss == "bce" else logits.softmax(dim=-1)

    def train(self, mode: bool = True) -> None:
        self.head.train(mode)
        if self.local is not None:
            self.local.train(mode)

    @torch.inference_mode()
    def top_answers(self, features: ImageFeatures, images: Sequence[Path], question_vectors: torch.Tensor,
                    k: int = 1, batch_size: int = 256) -> tuple[list[list[str]], torch.Tensor]:
        """For each (image, question vector): the k most probable answers and their probabilities (n, k)."""
        self.train(False)
        answers, probabilities = [], []
        for start in range(0, len(images), batch_size):
            global_vectors, streams, inverse, regions = features.take(images[start:start + batch_size])
            logits = self.logits(global_vectors, question_vectors[start:start + batch_size], streams, inverse,
                                 regions)
            probs = self.probabilities(logits)
            top = probs.topk(min(k, probs.shape[1]), dim=-1)
            probabilities.append(top.values.float().cpu())
            answers += [[self.vocab.answers[i] for i in row] for row in top.indices.tolist()]
        return answers, torch.cat(probabilities) if probabilities else torch.zeros((0, k))

    def save(self, path: Path | str, record: dict) -> Path:
        """Head weights, the local encoder's trained weights, and in the metadata what to load them with."""
        tensors = dict(self.head.state_dict())
        if self.local is not None:
            tensors |= {LOCAL_PREFIX + name: tensor for name, tensor in self.local.trainable_state().items()}
        metadata = {
            "head": json.dumps(asdict(self.head.config)),
            "vocab": json.dumps(self.vocab.to_json()),
            "loss": self.loss,
            "clip": json.dumps(self.clip.identity.to_json()),
            "local": json.dumps(None if self.local is None else
                                {**self.local.identity.to_json(), "unfreeze_last": self.local.unfreeze_last}),
            "regions": json.dumps(None if self.regions is None else asdict(RegionsRecord.of(self.regions))),
            "record": json.dumps(record),
        }
        return save_artifact(path, FORMAT, tensors, metadata)


def load_answerer(path: Path | str, device: torch.device | None = None, index: Path | str | None = None) -> Answerer:
    """A head file and the CLIP weights it names; a moved or changed checkpoint is a clear error.

    Everything the file says is checked before the CLIPs load, and the head's tensors against the
    head its config describes; the local encoder's tensors once it exists to compare them with.
    A regions head reads its region set from `index` (an index or dataset folder), by default the
    index it was trained with.
    """
    with open_artifact(path, HEAD_FILE) as artifact:
        config, vocab, loss, clip_identity, local_record, regions_record = _read_metadata(artifact)
        regions = None if regions_record is None else _region_set(artifact, regions_record, config, index)
        head_names = [name for name in artifact.header if local_record is None or not name.startswith(LOCAL_PREFIX)]
        artifact.check_tensors(expected_state(lambda: AnswerHead(config)), head_names)
        clip = load_clip(_same_weights(clip_identity, artifact.path), device)
        _must_match(artifact, "embed_dim", config.embed_dim, "its CLIP",
                    open_clip.get_model_config(clip.identity.model)["embed_dim"])
        local = None if local_record is None else _local_encoder(artifact, local_record, config, device)
        head = AnswerHead(config)
        head.load_state_dict(artifact.load(head_names))
    answerer = Answerer(head.to(clip.device), vocab, clip, local, loss, regions)
    answerer.train(False)
    return answerer


def _read_metadata(artifact: Artifact) -> tuple[HeadConfig, AnswerVocab, str, ModelIdentity, LocalRecord | None,
                                                RegionsRecord | None]:
    """The metadata, field by field, and how its parts must agree (vocabulary and head, variant and local
    encoder or region set)."""
    config = artifact.config(HeadConfig, "head", HEAD_RULES)
    if config.variant in ("dual-attention", "regions") and config.embed_dim % config.attention_heads:
        raise artifact.error(f"the head's attention_heads ({config.attention_heads}) must divide its embed_dim "
                             f"({config.embed_dim})")
    answers = artifact.json_value("vocab")
    if not isinstance(answers, list) or not all(isinstance(answer, str) for answer in answers):
        raise artifact.error('the metadata\'s "vocab" must be a JSON list of answer strings')
    if len(answers) != config.answers:
        raise artifact.error(f"the vocabulary has {len(answers)} answers, the head {config.answers}")
    loss = artifact.text("loss")
    if loss not in LOSSES:
        raise artifact.error(f'the metadata\'s "loss" must be one of {", ".join(LOSSES)} (got {loss[:40]!r})')
    clip_identity = artifact.config(ModelIdentity, "clip")
    local_json = artifact.json_value("local")
    local_record = None if local_json is None else artifact.build(LocalRecord, local_json, "local",
                                                                  {"unfreeze_last": at_least(0)})
    if (config.variant not in LOCAL_VARIANTS) != (local_record is None):
        raise artifact.error(f"a {config.variant} head {'needs no' if local_record else 'needs a'} local encoder, "
                             f"but \"local\" is {'set' if local_record else 'null'}")
    # files written before regions heads have no "regions": they are heads of the other variants
    regions_json = artifact.json_value("regions") if "regions" in artifact.metadata else None
    regions_record = None if regions_json is None else artifact.build(RegionsRecord, regions_json, "regions",
                                                                      {"name": REGION_SET_NAME})
    if (config.variant != "regions") != (regions_record is None):
        raise artifact.error(f"a {config.variant} head {'needs no' if regions_record else 'needs a'} region set, "
                             f"but \"regions\" is {'set' if regions_record else 'null'}")
    return config, AnswerVocab.from_json(answers), loss, clip_identity, local_record, regions_record


def _region_set(artifact: Artifact, record: RegionsRecord, config: HeadConfig, index: Path | str | None) -> RegionSet:
    """The recorded region set, refused unless its extractor is the one the head was trained on."""
    try:
        regions = RegionSet.open(index or record.index, record.name)
    except UserError as error:
        raise artifact.error(f"its region set {record.name!r}: {error}") from None
    key = identity_key(regions.manifest["extractor"])
    if key != record.key:
        raise artifact.error(f"its region set {record.name!r} at {regions.dir.path} was recomputed with another "
                             f"extractor since the head was trained (identity {record.key} then, {key} now): "
                             "train the head again, or pass --index with the index it was trained on")
    _must_match(artifact, "region_dim", config.region_dim, f"the region set {record.name!r}", regions.feature_dim)
    return regions


def _local_encoder(artifact: Artifact, record: LocalRecord, config: HeadConfig,
                   device: torch.device | None) -> LocalTower:
    """The local encoder with the file's trained blocks, once their names and shapes are its own."""
    if is_hf_model(record.model):
        vit, preprocess, identity = read_hf_vit(record.model)
        if not identity.same_weights(record.identity):
            raise artifact.error(f"the weights of its local encoder {record.model} changed since it was trained "
                                 f"(sha256 {(record.sha256 or '')[:12]} then, {identity.sha256[:12]} now)")
        build = partial(HfLocalEncoder, vit, preprocess, identity, device=device)
    else:
        build = partial(LocalEncoder, load_clip(_same_weights(record.identity, artifact.path), device))
    try:
        local = build(unfreeze_last=record.unfreeze_last)
    except UserError as error:
        raise artifact.error(f"its local encoder: {error}") from None
    if config.variant == "dual-attention":
        _must_match(artifact, "local_width", config.local_width, "its local encoder", local.width)
    else:
        _must_match(artifact, "local_pooled_dim", config.local_pooled_dim, "its local encoder", local.pooled_dim)
    local_names = [name for name in artifact.header if name.startswith(LOCAL_PREFIX)]
    artifact.check_tensors({LOCAL_PREFIX + name: tensor for name, tensor in local.trainable_state().items()},
                           local_names)
    local.model.load_state_dict({name[len(LOCAL_PREFIX):]: tensor
                                 for name, tensor in artifact.load(local_names).items()}, strict=False)
    return local


def _must_match(artifact: Artifact, field: str, value: int, model: str, actual: int) -> None:
    """A head dimension equals what the model feeding it produces, or the first answer would fail mid-forward."""
    if value != actual:
        raise artifact.error(f"the head's {field} is {value}, but {model} gives {actual}")


def _same_weights(recorded: ModelIdentity, head_path: Path) -> ModelIdentity:
    """The recorded weights, found again: a tag by name, a checkpoint by its path and content hash."""
    return find_recorded_weights(recorded, f"head {head_path}", if_missing=" (moved?)")
