"""Run a CLIP's towers as a `Plan` says: PyTorch (fp32, fp16/bf16 autocast, int8 dynamic quantisation)
or ONNX Runtime (fp32, int8) on graphs exported from the same weights.

`core/encode.py` keeps the batching, ordering and normalisation and asks `Towers` for unnormalised
features; PyTorch stays the reference and the training path (nothing here trains).

ONNX exports are cached per user, keyed by the weights' identity (`export_key`), under
$VQA_SEARCH_CACHE, else $XDG_CACHE_HOME/vqa-search, else ~/.cache/vqa-search: onnx/<key>/<tower>-<precision>/
model.onnx (+ model.onnx.data). Exporting ViT-B-32 takes a minute or more, so a cache per index would
pay it again for every new folder; the key changes whenever the weights do (a checkpoint's sha256, a
tag's name, or for random weights the open_clip and torch versions that drew them), so a changed
checkpoint is exported again. Each directory appears whole or not at all (`core/atomic.atomic_directory`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import torch

from vqa_search.core.atomic import atomic_directory, write_json
from vqa_search.core.encode import encode_text_trimmed, supports_trimmed_text
from vqa_search.core.inference import Plan
from vqa_search.core.models import Clip

log = logging.getLogger("vqa_search")

CACHE_VARIABLE = "VQA_SEARCH_CACHE"
EXPORT_VERSION = 1  # of the graphs below: a change re-exports
OPSET = 18


def cache_root() -> Path:
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "vqa-search"


def export_key(clip: Clip) -> str:
    """Names the weights and everything the graphs depend on; the same weights under another path share it."""
    import open_clip

    identity = clip.identity
    weights = identity.sha256 or identity.pretrained
    facts = {"model": identity.model, "weights": weights, "export": EXPORT_VERSION, "opset": OPSET,
             "torch": torch.__version__, "open_clip": open_clip.__version__}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def export_dir(clip: Clip) -> Path:
    return cache_root() / "onnx" / export_key(clip)


class Towers:
    """Unnormalised image and text features, each tower run as the plan says."""

    def __init__(self, clip: Clip, plan: Plan):
        self.clip = clip
        self.plan = plan
        self._runners: dict[str, object] = {}

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._runner("image")(pixels)

    def text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens cut to the batch's longest caption when the model allows it (encode.supports_trimmed_text)."""
        return self._runner("text")(tokens)

    def _runner(self, tower: str):
        if tower not in self._runners:
            run = self.plan.tower(tower)
            runner = _OnnxTower if run.backend == "onnx" else _TorchTower
            self._runners[tower] = runner(self.clip, tower, run.precision)
        return self._runners[tower]


class _TorchTower:
    def __init__(self, clip: Clip, tower: str, precision: str):
        self.tower = tower
        self.device = clip.device
        self.precision = precision
        self.model = clip.model if precision != "int8" else _quantized(clip.model, tower)

    @torch.inference_mode()
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.to(self.device, non_blocking=True)
        with _autocast(self.device, self.precision):
            features = self.model.encode_image(inputs) if self.tower == "image" else _text_features(self.model, inputs)
        return features.float()


def _text_features(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return encode_text_trimmed(model, tokens) if supports_trimmed_text(model) else model.encode_text(tokens)


def _autocast(device: torch.device, precision: str):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _quantized(model: torch.nn.Module, tower: str) -> torch.nn.Module:
    """A copy with the tower's Linear layers in dynamic int8 (weights int8, activations quantised per
    batch); attention's in-projection is a plain parameter and its out_proj is left in fp32 by PyTorch."""
    target = copy.copy(model)  # shallow: the other tower is shared, not copied
    target._modules = dict(model._modules)
    name = "visual" if tower == "image" else "transformer"
    with warnings.catch_warnings():  # torch.ao.quantization says it moves to torchao; it still works in 2.14
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        quantized = quantize_dynamic(copy.deepcopy(model._modules[name]).cpu(), {torch.nn.Linear}, dtype=torch.qint8)
    for module in quantized.modules():  # open_clip reads the blocks' float type from c_fc, as it does for
        if module is not None and hasattr(module, "_packed_params"):  # bitsandbytes' int8 layers
            module.int8_original_dtype = torch.float32
    target._modules[name] = quantized
    return target


class _ImageGraph(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class _TextGraph(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return _text_features(self.model, tokens)


class _OnnxTower:
    def __init__(self, clip: Clip, tower: str, precision: str):
        import onnxruntime

        path = ensure_export(clip, tower, precision)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # what core/threads.py planned for torch
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        array = inputs.cpu().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: array})[0])


def ensure_export(clip: Clip, tower: str, precision: str) -> Path:
    """The tower's ONNX file in the cache: exported (fp32) or quantised from the fp32 one (int8) if missing."""
    folder = export_dir(clip)
    target = folder / f"{tower}-{precision}" / "model.onnx"
    if target.is_file():
        return target
    if precision == "int8":
        source = ensure_export(clip, tower, "fp32")
        with atomic_directory(target.parent) as temp:
            _quantize_onnx(source, temp / target.name)
        return target
    log.info("exporting the %s tower of %s to ONNX, once for these weights (cached in %s)", tower,
             clip.identity.describe(), folder)
    with atomic_directory(target.parent) as temp:
        _export(clip, tower, temp / target.name)
    write_json(folder / "export.json", {"identity": clip.identity.to_json(), "key": export_key(clip),
                                        "export_version": EXPORT_VERSION, "opset": OPSET,
                                        "torch": torch.__version__})
    return target


def _export(clip: Clip, tower: str, path: Path) -> None:
    from torch.export import Dim

    model = copy.deepcopy(clip.model).float().cpu().eval()
    batch = Dim("batch", min=1, max=65536)
    if tower == "image":
        size = model.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        graph, example, name = _ImageGraph(model), torch.zeros(2, 3, *size), "pixels"
        dynamic = {"pixels": {0: batch}}
    else:
        example = clip.tokenizer(["a photo of a dog", "two children"])
        length = int(example.ne(0).sum(dim=1).max())
        if supports_trimmed_text(model):  # any length: encode.encode_texts cuts batches to their longest caption
            example = example[:, :length]
            dynamic = {"tokens": {0: batch, 1: Dim("length", min=2, max=model.context_length)}}
        else:
            dynamic = {"tokens": {0: batch}}
        graph, name = _TextGraph(model), "tokens"
    torch.onnx.export(graph.eval(), (example,), str(path), input_names=[name], output_names=["features"],
                      dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True, verbose=False)


def _quantize_onnx(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic quantisation: MatMul weights int8 (per channel), activations per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
