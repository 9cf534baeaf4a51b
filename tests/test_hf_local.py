"""`--local-model hf:NAME_OR_PATH`: a Hugging Face ViT as the dual heads' local encoder, from a
save_pretrained folder or from the hub cache offline, with cached frozen layers and trained last ones."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import ViTConfig, ViTImageProcessor, ViTModel
from typer.testing import CliRunner

from vqa_search.cli import app
from vqa_search.core.identity import TINY_MODEL
from vqa_search.shapes import ShapesConfig, make_shapes
from vqa_search.vqa.answerer import load_answerer
from vqa_search.vqa.hf_local import load_hf_local
from vqa_search.vqa.train import VqaTrainConfig, train_vqa

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()
HUB_REPO = "tiny-org/tiny-vit"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def save_tiny_vit(folder: Path, seed: int = 0, processor: bool = False) -> Path:
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=16)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder, safe_serialization=True)
    if processor:
        ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("hf") / "tiny-vit")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """The tiny ViT (with its image processor) laid out as the hub cache keeps a download; offline."""
    repo = tmp_path / "hub" / f"models--{HUB_REPO.replace('/', '--')}"
    save_tiny_vit(repo / "snapshots" / REVISION, processor=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf-vqa") / "shapes"
    make_shapes(out, ShapesConfig(images=30, seed=7, size=64), progress=False)
    return out


@pytest.mark.parametrize("unfreeze_last", [0, 1, 2])
def test_cached_prefix_then_suffix_equals_the_full_forward(vit_folder, unfreeze_last):
    local = load_hf_local(f"hf:{vit_folder}", unfreeze_last, torch.device("cpu"))
    pixels = torch.randn(3, 3, 64, 64)
    tokens, pooled = local(local.prefix(pixels))
    full = local.model(pixel_values=pixels).last_hidden_state  # the library's own forward
    torch.testing.assert_close(tokens, full[:, 1:])
    torch.testing.assert_close(pooled, full[:, 0])
    trained = {name.split(".")[1] if name.startswith("layers.") else name for name in local.trainable_state()}
    assert trained == ({str(layer) for layer in range(2 - unfreeze_last, 2)} |
                       ({"layernorm.weight", "layernorm.bias"} if unfreeze_last else set()))


def test_pixels_follow_the_saved_processor_or_the_configs_size_with_mean_and_std_one_half(vit_folder, hub_cache):
    image = Image.new("RGB", (90, 40), (255, 0, 0))
    for local in (load_hf_local(f"hf:{vit_folder}"), load_hf_local(f"hf:{HUB_REPO}")):
        pixels = local.preprocess(image)
        assert pixels.shape == (3, 64, 64)
        torch.testing.assert_close(pixels[:, 10, 10], torch.tensor([1.0, -1.0, -1.0]))


@pytest.mark.parametrize("source", ["folder", "hub"])
def test_a_dual_attention_head_trains_the_last_layer_and_ask_reloads_it(world, vit_folder, request, tmp_path,
                                                                       source):
    model = f"hf:{vit_folder}" if source == "folder" else f"hf:{HUB_REPO}"
    if source == "hub":
        request.getfixturevalue("hub_cache")
    head = tmp_path / "head.safetensors"
    before = load_hf_local(model).model.state_dict()
    train_vqa(world, head, VqaTrainConfig(variant="dual-attention", model=TINY_MODEL, pretrained="none",
                                          local_model=model, unfreeze_last=1, epochs=1, batch_size=32, hidden=32,
                                          workers=0), progress=False)
    with safe_open(str(head), framework="pt") as handle:
        names, local = list(handle.keys()), json.loads(handle.metadata()["local"])
    assert local["model"] == model and local["unfreeze_last"] == 1 and local["sha256"]
    assert any(name.startswith("local.layers.1.") for name in names) and "local.layernorm.weight" in names
    assert not any(name.startswith(("local.layers.0.", "local.embeddings.")) for name in names)
    loaded = load_answerer(head, torch.device("cpu")).local.model.state_dict()
    assert torch.equal(loaded["layers.0.mlp.fc1.weight"], before["layers.0.mlp.fc1.weight"])
    assert not torch.equal(loaded["layers.1.mlp.fc1.weight"], before["layers.1.mlp.fc1.weight"])
    out = runner.invoke(app, ["ask", str(world / "Images" / "shape_000000.png"), "what color is the circle?",
                              "--head", str(head), "--json"])
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.stdout)["head"]) == 5


def test_changed_weights_and_a_missing_model_are_one_line_errors(world, tmp_path, hub_cache):
    folder = save_tiny_vit(tmp_path / "vit", seed=1)
    head = tmp_path / "head.safetensors"
    train_vqa(world, head, VqaTrainConfig(variant="dual-concat", model=TINY_MODEL, pretrained="none",
                                          local_model=f"hf:{folder}", epochs=1, batch_size=32, hidden=32, workers=0),
              progress=False)
    save_tiny_vit(folder, seed=2)
    image = str(world / "Images" / "shape_000000.png")
    out = runner.invoke(app, ["ask", image, "what color is the circle?", "--head", str(head)])
    assert out.exit_code == 2 and "changed since it was trained" in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1
    out = runner.invoke(app, ["train", "vqa", str(world), "--out", str(tmp_path / "h.safetensors"), "--model",
                              TINY_MODEL, "--pretrained", "none", "--local-model", "hf:nobody/absent-vit"])
    assert out.exit_code == 2 and "not in the Hugging Face cache" in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1
