"""A trained head with everything it reads: its CLIP, its local encoder, its answer vocabulary.

The head file is safetensors: the head's weights, the local encoder's trained blocks (under
`local.`), and in the metadata the head config, the vocabulary and which CLIP weights it was
trained on. Those base weights are loaded from their own tag or checkpoint, so a head file stays
small, and a head is refused when they are not the same weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vqa_search.atomic import atomic_path
from vqa_search.errors import UserError
from vqa_search.models import Clip, ModelIdentity, load_clip, resolve_identity
from vqa_search.vqa.answers import AnswerVocab
from vqa_search.vqa.features import ImageFeatures, LocalEncoder
from vqa_search.vqa.heads import AnswerHead, HeadConfig

FORMAT = "vqa-search-vqa-head/1"
LOSSES = ("bce", "ce")
LOCAL_PREFIX = "local."


@dataclass
class Answerer:
    head: AnswerHead
    vocab: AnswerVocab
    clip: Clip  # g and q
    local: LocalEncoder | None  # dual variants
    loss: str  # bce: independent sigmoid per answer; ce: one softmax over the vocabulary

    def logits(self, global_vectors: torch.Tensor, question_vectors: torch.Tensor,
               local_streams: torch.Tensor | None, inverse: torch.Tensor) -> torch.Tensor:
        """Answer logits per question; `local_streams` per distinct image, `inverse` maps questions to them."""
        device = self.clip.device
        patches = pooled = None
        if self.local is not None:
            patches, pooled = self.local(local_streams)
            patches, pooled = patches[inverse.to(device)], pooled[inverse.to(device)]
        return self.head(global_vectors.to(device), question_vectors.to(device), patches, pooled)

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
            global_vectors, streams, inverse = features.take(images[start:start + batch_size])
            logits = self.logits(global_vectors, question_vectors[start:start + batch_size], streams, inverse)
            probs = self.probabilities(logits)
            top = probs.topk(min(k, probs.shape[1]), dim=-1)
            probabilities.append(top.values.float().cpu())
            answers += [[self.vocab.answers[i] for i in row] for row in top.indices.tolist()]
        return answers, torch.cat(probabilities) if probabilities else torch.zeros((0, k))

    def save(self, path: Path | str, record: dict) -> Path:
        """Head weights, the local encoder's trained weights, and in the metadata what to load them with."""
        path = Path(path)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.head.state_dict().items()}
        if self.local is not None:
            tensors |= {LOCAL_PREFIX + name: tensor.detach().cpu().contiguous()
                        for name, tensor in self.local.trainable_state().items()}
        metadata = {
            "format": FORMAT,
            "head": json.dumps(asdict(self.head.config)),
            "vocab": json.dumps(self.vocab.to_json()),
            "loss": self.loss,
            "clip": json.dumps(self.clip.identity.to_json()),
            "local": json.dumps(None if self.local is None else
                                {**self.local.clip.identity.to_json(), "unfreeze_last": self.local.unfreeze_last}),
            "record": json.dumps(record),
        }
        with atomic_path(path) as temp:
            save_file(tensors, str(temp), metadata=metadata)
        return path


def load_answerer(path: Path | str, device: torch.device | None = None) -> Answerer:
    """A head file and the CLIP weights it names; a moved or changed checkpoint is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"head file not found: {path} (train one with `vqa-search train vqa`)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise UserError(f"cannot read head file {path}: {str(error).splitlines()[0]}") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not a vqa-search answer head (train one with `vqa-search train vqa`)")
    clip = load_clip(_same_weights(ModelIdentity.from_json(json.loads(metadata["clip"])), path), device)
    local = None
    if local_json := json.loads(metadata["local"]):
        local_clip = load_clip(_same_weights(ModelIdentity.from_json(local_json), path), device)
        local = LocalEncoder(local_clip, local_json["unfreeze_last"])
        local.model.load_state_dict({name[len(LOCAL_PREFIX):]: tensor for name, tensor in tensors.items()
                                     if name.startswith(LOCAL_PREFIX)}, strict=False)
    head = AnswerHead(HeadConfig(**json.loads(metadata["head"])))
    head.load_state_dict({name: tensor for name, tensor in tensors.items() if not name.startswith(LOCAL_PREFIX)})
    answerer = Answerer(head.to(clip.device), AnswerVocab.from_json(json.loads(metadata["vocab"])), clip, local,
                        metadata["loss"])
    answerer.train(False)
    return answerer


def _same_weights(recorded: ModelIdentity, head_path: Path) -> ModelIdentity:
    """The recorded weights, found again: a tag by name, a checkpoint by its path and content hash."""
    try:
        current = resolve_identity(recorded.model, recorded.pretrained)
    except UserError:
        current = None
    if current is None or not current.same_weights(recorded):
        raise UserError(f"head {head_path} was trained on {recorded.describe()}, which is not at "
                        f"{recorded.pretrained} any more (moved or changed?)")
    return current
