"""Which model and weights: the defaults, and the identity every index records. No torch, no open_clip.

A model is identified by (name, weights); the identity is written into every index so that a query
with different weights is refused instead of silently returning nonsense. This module is what the
command line and the index's up-to-date check read, so importing it costs nothing: open_clip is
imported only to check a name or tag that no index has recorded yet (`core/models.py` loads models
and re-exports everything here).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from vqa_search.core.errors import UserError
from vqa_search.core.files import open_regular

DEFAULT_MODEL = "ViT-B-32"
# laion2b_s34b_b79k beats the `openai` weights by about 8 R@1 points on Flickr30k at the same cost.
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
# A few-layer, narrow CLIP for tests and the offline shapes world. Never the default.
TINY_MODEL = "vqa-tiny"
NO_WEIGHTS = "none"


@dataclass(frozen=True)
class ModelIdentity:
    """What an index records about the model that embedded it."""

    model: str
    pretrained: str  # an open_clip tag, "none", or the checkpoint's path as given
    sha256: str | None = None  # of the checkpoint file, when weights came from a file

    def to_json(self) -> dict:
        return {"model": self.model, "pretrained": self.pretrained, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: dict) -> "ModelIdentity":
        return cls(model=data["model"], pretrained=data["pretrained"], sha256=data.get("sha256"))

    def same_weights(self, other: "ModelIdentity") -> bool:
        """Files are compared by content, tags by name: a moved checkpoint is still the same model."""
        if self.model != other.model:
            return False
        if self.sha256 or other.sha256:
            return self.sha256 == other.sha256
        return self.pretrained == other.pretrained

    def describe(self) -> str:
        weights = f"{self.pretrained} (sha256 {self.sha256[:12]})" if self.sha256 else self.pretrained
        return f"{self.model} with weights {weights}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_identity(model: str, pretrained: str | None,
                     known: ModelIdentity | Iterable[ModelIdentity | None] | None = ()) -> ModelIdentity:
    """Identity without loading the model: cheap enough to decide whether an index is up to date.

    The model name and a pretrained tag are checked against open_clip, unless they are those of a
    `known` identity (one an index recorded, checked when it was made): an unchanged re-index or a
    query naming the index's own weights then imports neither open_clip nor torch.
    """
    known = (known,) if isinstance(known, ModelIdentity) else tuple(k for k in known or () if k is not None)
    pretrained = pretrained or NO_WEIGHTS
    if not any(model == k.model for k in known):
        _check_model_name(model)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return ModelIdentity(model=model, pretrained=str(path.resolve()), sha256=sha256_file(path))
    if pretrained != NO_WEIGHTS and _looks_like_path(pretrained):
        raise UserError(f"checkpoint file not found: {pretrained}")
    if pretrained != NO_WEIGHTS and not any((model, pretrained, None) == (k.model, k.pretrained, k.sha256)
                                            for k in known):
        tags = _open_clip().list_pretrained_tags_by_model(model)
        if pretrained not in tags:
            raise UserError(
                f"unknown pretrained tag {pretrained!r} for {model}; known tags: {', '.join(tags) or 'none'}; "
                "or pass a checkpoint file path, or 'none' for random weights"
            )
    return ModelIdentity(model=model, pretrained=pretrained)


def find_recorded_weights(recorded: ModelIdentity, owner: str, if_missing: str = "", if_changed: str = "",
                          accept_changed: bool = False) -> ModelIdentity:
    """The weights `owner` ("the index at X", "head Y") recorded, found again: a tag by its name, a
    checkpoint by its path and content. A missing or changed file is one line, with the caller's advice.

    Embeddings or heads of another checkpoint's space would give plausible-looking nonsense, so every
    reader of a recorded identity (the index, queries, answer heads) comes through here.
    """
    if not recorded.sha256:
        return resolve_identity(recorded.model, recorded.pretrained, known=recorded)
    path = Path(recorded.pretrained)
    if not path.is_file():
        raise UserError(f"{owner} was made with checkpoint {path}, which no longer exists{if_missing}")
    current = resolve_identity(recorded.model, str(path), known=recorded)
    if not current.same_weights(recorded) and not accept_changed:
        raise UserError(f"checkpoint {path} changed since {owner} was made with it (sha256 {recorded.sha256[:12]} "
                        f"then, {current.sha256[:12]} now){if_changed}")
    return current


def _open_clip():
    """open_clip with this package's model configs (vqa-tiny) registered, which importing models does."""
    from vqa_search.core import models

    return models.open_clip


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _check_model_name(model: str) -> None:
    if model not in _open_clip().list_models():
        raise UserError(f"unknown model {model!r}; see open_clip.list_models() (e.g. {DEFAULT_MODEL}, {TINY_MODEL})")
