"""Load open_clip models by name and pretrained tag, or from a local checkpoint file.

A model is identified by (name, weights); the identity is written into every index so that a query
with different weights is refused instead of silently returning nonsense.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError  # what torch raises when weights_only refuses a file
from typing import Callable, Iterator

import open_clip
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from vqa_search.core.errors import UserError
from vqa_search.core.identity import NO_WEIGHTS, TINY_MODEL, ModelIdentity
from vqa_search.core.inference import REFERENCE, Plan, choose_plan

RANDOM_INIT_SEED = 0

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)

_HUB_HOST = "huggingface.co"
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# What reading a crafted or damaged checkpoint raises (torch.load with weights_only, safetensors, zip).
# Any file that is not a checkpoint (a text file, a JPEG, a cut-off pickle) ends up in the legacy
# unpickler, which fails with whatever the first odd byte provokes: KeyError, IndexError, struct.error...
_READ_ERRORS = (RuntimeError, OSError, ValueError, EOFError, UnpicklingError, zipfile.BadZipFile, SafetensorError,
                KeyError, IndexError, TypeError, AttributeError, AssertionError, OverflowError, struct.error)
# open_clip reads a cached file with fewer checks: a crafted one can also fail in its own code.
_TAG_LOAD_ERRORS = (*_READ_ERRORS, StopIteration)
# What open_clip logs (on the root logger) when it builds a model without weights of its own.
_RANDOM_INIT_WARNING = "No pretrained weights loaded for model"


@dataclass
class Clip:
    """An open_clip model ready for inference, with its preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    identity: ModelIdentity
    device: torch.device
    plan: Plan = REFERENCE  # how core/encode.py runs the towers (core/inference.py)
    _towers: object = field(default=None, repr=False)

    @property
    def towers(self):
        """core/backends.Towers for the plan, built on first use (an ONNX tower exports or opens its graph then)."""
        if self._towers is None:
            from vqa_search.core.backends import Towers

            self._towers = Towers(self, self.plan)
        return self._towers


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_clip(identity: ModelIdentity, device: torch.device | None = None, plan: Plan | None = None) -> Clip:
    """Build the model and load its weights: open_clip tag, local checkpoint, or seeded random init.

    `plan` is how encode.py runs the towers (default: PyTorch, fp16 autocast on CUDA, fp32 on the CPU);
    the model itself is always the PyTorch reference, which training uses."""
    device = device or default_device()
    plan = plan or (choose_plan("torch", "auto", "cuda") if device.type == "cuda" else REFERENCE)
    if identity.sha256:
        with _without_random_init_warning(), without_weight_init():  # the weights come from the file, next line
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
    return Clip(model=model, preprocess=preprocess, tokenizer=tokenizer, identity=identity, device=device, plan=plan)


def _create(model_name: str, pretrained: str | None):
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    return model, preprocess


# torch.nn.init's in-place initialisers: what layer constructors and open_clip's init_parameters call
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextmanager
def without_weight_init() -> Iterator[None]:
    """Build a model without drawing random weights that loaded ones replace at once.

    A ViT-B-32's random initialisation is most of building it (1.9 s of CPU against 0.05 s without,
    on a busy 2-core machine; benchmarks/cold_start.py times both). Only for models
    whose every weight is then loaded strictly (a missing one is an error there): the initialisers
    leave the tensors as allocated. Buffers computed in code (the text tower's attention mask) are
    built as usual.
    """
    originals = {getattr(torch.nn.init, name) for name in _INITIALISERS if hasattr(torch.nn.init, name)}
    # torch.nn.init itself, and the layer modules that imported its functions by name (MultiheadAttention's)
    holders = [torch.nn.init, *(module for name, module in list(sys.modules.items())
                                if name.startswith("torch.nn.modules.") and module is not None)]
    saved = [(holder, name, getattr(holder, name)) for holder in holders for name in _INITIALISERS
             if getattr(holder, name, None) in originals]
    for holder, name, _ in saved:
        setattr(holder, name, _leave_as_is)
    try:
        yield
    finally:
        for holder, name, function in saved:
            setattr(holder, name, function)


def _leave_as_is(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_RANDOM_INIT_WARNING)


@contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """open_clip's "No pretrained weights loaded ... initialized randomly", only while a model whose
    weights come from a checkpoint file is created.

    open_clip logs it with logging.warning(), which configures the root logger when it has no handler
    (so that every later root warning is printed too): a null handler stands in for the call.
    """
    root = logging.getLogger()
    dropped = _DropRandomInitWarning()
    stand_in = logging.NullHandler() if not root.handlers else None
    root.addFilter(dropped)
    if stand_in is not None:
        root.addHandler(stand_in)
    try:
        yield
    finally:
        root.removeFilter(dropped)
        if stand_in is not None:
            root.removeHandler(stand_in)


def _create_from_tag(model_name: str, tag: str):
    cached = _cached_weights(model_name, tag)
    if cached is None and not _hub_reachable():
        raise UserError(_offline_message(model_name, tag))
    if cached is not None and _is_torchscript_archive(cached):
        raise UserError(_torchscript_message(cached))
    try:
        with without_weight_init():  # open_clip loads the tag's weights strictly right after building the model
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
    state_dict = read_state_dict(path, model_name)
    advice = "pass the --model it was trained with"
    try:  # renames Apple MobileCLIP layouts, found by key; odd values under those keys break it
        state_dict = open_clip.factory.convert_state_dict(model, state_dict)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, RuntimeError) as error:
        raise UserError(f"checkpoint {path} does not fit model {model_name}: cannot convert its weights "
                        f"({type(error).__name__}: {_first_line(error)}); {advice}") from None
    expected = model.state_dict()
    mismatched = [key for key, value in state_dict.items() if key in expected and value.shape != expected[key].shape]
    if mismatched:  # another size or architecture, e.g. ViT-B-16 weights for ViT-L-14
        key = mismatched[0]
        raise UserError(
            f"checkpoint {path} does not fit model {model_name}: "
            f"{'1 weight has another shape' if len(mismatched) == 1 else f'{len(mismatched)} weights have other shapes'} "
            f"(e.g. {key!r}: {list(state_dict[key].shape)} in the file, {list(expected[key].shape)} in "
            f"{model_name}); {advice}"
        )
    try:  # not strict: load hooks (batch norm's num_batches_tracked) may fill in what old files lack
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # anything the check above did not foresee, still one line
        raise UserError(f"checkpoint {path} does not fit model {model_name}: "
                        f"{_last_line(error)}; {advice}") from None
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(
            f"checkpoint {path} does not fit model {model_name}: {len(missing)} missing and "
            f"{len(unexpected)} unexpected weights (e.g. {example!r}); {advice}"
        )


def read_state_dict(path: Path, model_name: str | None = None) -> dict[str, torch.Tensor]:
    """open_clip, OpenAI (plain) and this project's checkpoints, read without running anything inside them.

    `model_name` (what the weights are for) is named in the one-line errors.
    """
    if _is_torchscript_archive(path):
        raise UserError(_torchscript_message(path))
    path_for = f"{path} (for {model_name})" if model_name else str(path)
    try:
        if path.suffix == ".safetensors":
            checkpoint = load_safetensors(str(path), device="cpu")
        else:
            with warnings.catch_warnings():  # a file that is no checkpoint gets one line, not a warning too
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except _READ_ERRORS as error:
        raise UserError(f"cannot read checkpoint {path_for}: {_read_failure(error)}") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise UserError(f"checkpoint {path_for} holds no model weights")
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in checkpoint.items()):
        raise UserError(f"checkpoint {path_for} is not a state dict (names to tensors)")
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


def _read_failure(error: BaseException) -> str:
    """What torch.load or safetensors said; the unpickler's stray KeyError: 101 means "not a checkpoint"."""
    if isinstance(error, (OSError, UnpicklingError, zipfile.BadZipFile, SafetensorError, RuntimeError)):
        return _first_line(error)
    return f"not a PyTorch or safetensors checkpoint ({type(error).__name__}: {_first_line(error)})"


def _last_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[-1].strip()
