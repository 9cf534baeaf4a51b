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
from safetensors.torch import load_file as load_safetensors

from vqa_search.core.errors import UserError
from vqa_search.core.files import open_regular

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
# What reading a crafted or damaged checkpoint raises (torch.load with weights_only, safetensors, zip).
_READ_ERRORS = (RuntimeError, OSError, ValueError, EOFError, UnpicklingError, zipfile.BadZipFile, SafetensorError)
# open_clip reads a cached file with fewer checks: a crafted one can also fail in its own code.
_TAG_LOAD_ERRORS = (*_READ_ERRORS, KeyError, AttributeError, StopIteration, TypeError)


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
    with open_regular(path) as handle:
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
    cached = _cached_weights(model_name, tag)
    if cached is None and not _hub_reachable():
        raise UserError(_offline_message(model_name, tag))
    if cached is not None and _is_torchscript_archive(cached):
        raise UserError(_torchscript_message(cached))
    try:
        return _create(model_name, pretrained=tag)
    except _TAG_LOAD_ERRORS as error:
        if "download" in str(error).lower():
            raise UserError(_offline_message(model_name, tag)) from None
        where = f" from {cached}" if cached else ""
        raise UserError(f"cannot load the pretrained weights {tag!r} of {model_name}{where}: {_first_line(error)}") from None


def _offline_message(model_name: str, tag: str) -> str:
    return (
        f"cannot load the pretrained weights {tag!r} of {model_name}: they are not in the local cache "
        "and cannot be downloaded from here (offline?). Download them once on a connected machine "
        "(open_clip caches them under ~/.cache/huggingface), or pass a local checkpoint file with "
        "--pretrained /path/to/open_clip_pytorch_model.bin (.pt, .bin or .safetensors; open_clip or "
        f"OpenAI format). For an offline demo with no weights at all: --model {TINY_MODEL} --pretrained none."
    )


def _cached_weights(model_name: str, tag: str) -> Path | None:
    """The file open_clip would load without the network, in the order it tries them; None if none is cached."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    hub_id = cfg.get("hf_hub", "")
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo_id = "/".join(hub_id.rstrip("/").split("/")[:2])
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return Path(cached)
    return None


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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """open_clip, OpenAI (plain) and this project's checkpoints, read without running anything inside them."""
    if _is_torchscript_archive(path):
        raise UserError(_torchscript_message(path))
    try:
        if path.suffix == ".safetensors":
            checkpoint = load_safetensors(str(path), device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except _READ_ERRORS as error:
        raise UserError(f"cannot read checkpoint {path}: {_first_line(error)}") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise UserError(f"checkpoint {path} holds no model weights")
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in checkpoint.items()):
        raise UserError(f"checkpoint {path} is not a state dict (names to tensors)")
    if all(key.startswith("module.") for key in checkpoint):  # saved from DistributedDataParallel
        checkpoint = {key[len("module."):]: value for key, value in checkpoint.items()}
    return {key: value for key, value in checkpoint.items() if key not in _OPENAI_EXTRA_KEYS}


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's released .pt files are TorchScript: loading one runs the Python-like code stored inside."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False  # torch.load says what is wrong with the file


def _torchscript_message(path: Path) -> str:
    return (
        f"checkpoint {path} is a TorchScript archive (OpenAI's original .pt format), and loading one runs the "
        "code inside it, so vqa-search refuses it. Use the same weights as a plain file: for OpenAI's CLIP, "
        "--pretrained openai (open_clip's tag); or, only if you trust the file, convert it once: python -c "
        f"\"import torch; from safetensors.torch import save_file; save_file(torch.jit.load('{path}').state_dict(), "
        f"'{path.with_suffix('.safetensors')}')\""
    )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _check_model_name(model: str) -> None:
    if model not in open_clip.list_models():
        raise UserError(f"unknown model {model!r}; see open_clip.list_models() (e.g. {DEFAULT_MODEL}, {TINY_MODEL})")
