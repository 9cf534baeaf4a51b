"""A Hugging Face ViT as the dual heads' local encoder: `--local-model hf:NAME_OR_PATH`.

NAME_OR_PATH is a folder written by `save_pretrained` or a hub repository (e.g.
`hf:google/vit-base-patch16-224`, the seed report's ViT-B/16), read from the hub cache and
downloaded into it only when online (HF_HUB_OFFLINE=1 is honoured). Weights are read from
safetensors files only, never from pickles. Pixels are prepared as the folder's saved image
processor says, or else at the config's image size with mean and std 0.5 (ViT's own defaults).

The contract is `LocalTower`'s: the frozen first layers run once per image, the last
`unfreeze_last` layers and the final LayerNorm on cached streams; the patch tokens are the
final states after the class token, the pooled output the class token's (what
ViTForImageClassification classifies; checkpoints rarely hold trained pooler weights).
transformers is imported here only, so the command line starts without it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from vqa_search.core.encode import autocast
from vqa_search.core.errors import UserError
from vqa_search.core.files import open_regular
from vqa_search.core.identity import ModelIdentity
from vqa_search.core.models import default_device
from vqa_search.vqa.features import LocalTower

HF_PREFIX = "hf:"
# what a ViT needs from a hub repository; never its pickled weights
HUB_FILES = ["config.json", "preprocessor_config.json", "*.safetensors", "model.safetensors.index.json"]


def is_hf_model(model: str) -> bool:
    return model.startswith(HF_PREFIX)


class HfLocalEncoder(LocalTower):
    def __init__(self, vit, preprocess, identity: ModelIdentity, unfreeze_last: int = 0,
                 device: torch.device | None = None):
        super().__init__()
        depth = len(vit.layers)
        if not 0 <= unfreeze_last <= depth:
            raise UserError(f"--unfreeze-last must be between 0 and {depth}, the layers of {identity.model} "
                            f"(got {unfreeze_last})")
        self.device = device or default_device()
        self.model = vit.to(self.device).eval()
        self.identity, self.preprocess, self.unfreeze_last = identity, preprocess, unfreeze_last
        self.frozen_blocks = depth - unfreeze_last
        self.width = self.pooled_dim = vit.config.hidden_size
        self.model.requires_grad_(False)
        if unfreeze_last:
            for module in (*vit.layers[self.frozen_blocks:], vit.layernorm):
                module.requires_grad_(True)

    @torch.no_grad()
    def prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the first trainable layer: embeddings, then the frozen layers."""
        with autocast(self.device):
            stream = self.model.embeddings(pixels.to(self.device))
            for layer in self.model.layers[:self.frozen_blocks]:
                stream = layer(stream)
        return stream

    def forward(self, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = stream.to(self.device, torch.float32)
        for layer in self.model.layers[self.frozen_blocks:]:
            states = layer(states)
        states = self.model.layernorm(states)
        return states[:, 1:], states[:, 0]


def load_hf_local(model: str, unfreeze_last: int = 0, device: torch.device | None = None) -> HfLocalEncoder:
    """`hf:NAME_OR_PATH` as a local encoder; a missing model or a model that is no ViT is one line."""
    vit, preprocess, identity = read_hf_vit(model)
    return HfLocalEncoder(vit, preprocess, identity, unfreeze_last, device)


def read_hf_vit(model: str):
    """(ViTModel, preprocess, identity): the identity's sha256 covers every weights file, so a head
    refuses a folder or snapshot whose weights changed since it was trained."""
    from transformers import AutoConfig, ViTModel
    from transformers.utils import logging as hf_logging

    folder = _model_folder(model[len(HF_PREFIX):])
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise UserError(f"{model}: no .safetensors weights in {folder} (vqa-search reads no pickled weights; "
                        "save the model with save_pretrained(..., safe_serialization=True))")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise UserError(f"{model}: cannot read its config in {folder}: {_first_line(error)}") from None
    if config.model_type != "vit":
        raise UserError(f"{model} is a {config.model_type} model; --local-model hf: takes a ViT (model_type vit)")
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load: tiny models flash it, `ask` would print it every time
    try:
        vit = ViTModel.from_pretrained(folder, add_pooling_layer=False, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{model}: cannot load its weights from {folder}: {_first_line(error)}") from None
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    identity = ModelIdentity(model=model, pretrained=str(folder), sha256=_weights_digest(weights))
    return vit, _preprocess(folder, config), identity


def _model_folder(name: str) -> Path:
    """A local folder as it is; a hub repository's cached snapshot, downloaded first when online."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise UserError(f"Hugging Face model folder not found: {name}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise UserError(f"hf:{name} is not in the Hugging Face cache and cannot be downloaded from here "
                        "(offline, or HF_HUB_OFFLINE=1): download it once on a connected machine, or pass "
                        "hf:/path/to/a/save_pretrained/folder") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise UserError(f"cannot get hf:{name} from the Hugging Face hub: {_first_line(error)}") from None


def _preprocess(folder: Path, config):
    """The saved image processor, or resize to the config's size with mean and std 0.5."""
    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        try:
            return _Processed(AutoImageProcessor.from_pretrained(folder))
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read the image processor in {folder}: {_first_line(error)}") from None
    size = config.image_size
    return transforms.Compose([transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR),
                               transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])


class _Processed:
    """An image processor as a picklable PIL image -> (3, H, W) tensor, for the decoding workers."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def _weights_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open_regular(path) as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
