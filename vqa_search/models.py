"""Load open_clip models by name and pretrained tag, or from a local checkpoint file.

A model is identified by (name, weights); the identity is written into every index so that a query
with different weights is refused instead of silently returning nonsense.
"""

from __future__ import annotations

import hashlib
import os
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError  # what torch raises when weights_only refuses a file
from typing import Callable

import open_clip
import torch
from safetensors import SafetensorError

from vqa_search.errors import UserError

DEFAULT_MODEL = "ViT-B-32"
# laion2b_s34b_b79k beats the `openai` weights by about 8 R@1 points on Flickr30k at the same cost.
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
# A few-layer, narrow CLIP for tests and the offline shapes world. Never the default.
TINY_MODEL = "vqa-tiny"
NO_WEIGHTS = "none"
RANDOM_INIT_SEED = 0

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)

_HUB_HOST = "huggingface.co"
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


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


@dataclass
class Clip:
    """An open_clip model ready for inference, with its preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    identity: ModelIdentity
    device: torch.device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_identity(model: str, pretrained: str | None) -> ModelIdentity:
    """Identity without loading the model: cheap enough to decide whether an index is up to date."""
    _check_model_name(model)
    pretrained = pretrained or NO_WEIGHTS
    path = Path(pretrained).expanduser()
    if path.is_file():
        return ModelIdentity(model=model, pretrained=str(path.resolve()), sha256=sha256_file(path))
    if pretrained != NO_WEIGHTS and _looks_like_path(pretrained):
        raise UserError(f"checkpoint file not found: {pretrained}")
    if pretrained != NO_WEIGHTS and pretrained not in open_clip.list_pretrained_tags_by_model(model):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise UserError(
            f"unknown pretrained tag {pretrained!r} for {model}; known tags: {tags}; "
            "or pass a checkpoint file path, or 'none' for random weights"
        )
    return ModelIdentity(model=model, pretrained=pretrained)


def load_clip(identity: ModelIdentity, device: torch.device | None = None) -> Clip:
    """Build the model and load its weights: open_clip tag, local checkpoint, or seeded random init."""
    device = device or default_device()
    if identity.sha256:
        model, preprocess = _create(identity.model, pretrained=None)
        _load_checkpoint_file(model, Path(identity.pretrained), identity.model)
    elif identity.pretrained == NO_WEIGHTS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, preprocess = _create(identity.model, pretrained=None)
    else:
        model, preprocess = _create_from_tag(identity.model, identity.pretrained)
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(identity.model)
    return Clip(model=model, preprocess=preprocess, tokenizer=tokenizer, identity=identity, device=device)


def _create(model_name: str, pretrained: str | None):
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    return model, preprocess


def _create_from_tag(model_name: str, tag: str):
    if not _weights_cached(model_name, tag) and not _hub_reachable():
        raise UserError(_offline_message(model_name, tag))
    try:
        return _create(model_name, pretrained=tag)
    except RuntimeError as error:
        if "download" in str(error).lower():
            raise UserError(_offline_message(model_name, tag)) from None
        raise


def _offline_message(model_name: str, tag: str) -> str:
    return (
        f"cannot load the pretrained weights {tag!r} of {model_name}: they are not in the local cache "
        "and cannot be downloaded from here (offline?). Download them once on a connected machine "
        "(open_clip caches them under ~/.cache/huggingface), or pass a local checkpoint file with "
        "--pretrained /path/to/open_clip_pytorch_model.bin (.pt, .bin or .safetensors; open_clip or "
        f"OpenAI format). For an offline demo with no weights at all: --model {TINY_MODEL} --pretrained none."
    )


def _weights_cached(model_name: str, tag: str) -> bool:
    """True when open_clip would find the weights without the network."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    hub_id = cfg.get("hf_hub", "")
    if not hub_id:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    repo_id = "/".join(hub_id.rstrip("/").split("/")[:2])
    for filename in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
        if isinstance(try_to_load_from_cache(repo_id, filename), str):
            return True
    return False


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    return host_reachable(_HUB_HOST)


def host_reachable(host: str) -> bool:
    """A name lookup answers at once offline; a download would retry for about a minute."""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _load_checkpoint_file(model: torch.nn.Module, path: Path, model_name: str) -> None:
    state_dict = read_state_dict(path)
    state_dict = open_clip.factory.convert_state_dict(model, state_dict)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(
            f"checkpoint {path} does not fit model {model_name}: {len(missing)} missing and "
            f"{len(unexpected)} unexpected weights (e.g. {example!r}); pass the --model it was trained with"
        )


def read_state_dict(path: Path) -> dict:
    """open_clip, OpenAI (TorchScript archive or plain) and this project's checkpoints, never unpickling code."""
    try:
        if _is_torchscript_archive(path):
            # OpenAI's released .pt files are TorchScript archives; jit.load restores tensors, not Python objects.
            state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state_dict = open_clip.factory.load_state_dict(str(path), weights_only=True)
    except (RuntimeError, OSError, ValueError, UnpicklingError, zipfile.BadZipFile, SafetensorError) as error:
        raise UserError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(state_dict, dict) or not state_dict:
        raise UserError(f"checkpoint {path} holds no model weights")
    state_dict = dict(state_dict)
    for key in _OPENAI_EXTRA_KEYS:
        state_dict.pop(key, None)
    return state_dict


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _check_model_name(model: str) -> None:
    if model not in open_clip.list_models():
        raise UserError(f"unknown model {model!r}; see open_clip.list_models() (e.g. {DEFAULT_MODEL}, {TINY_MODEL})")
