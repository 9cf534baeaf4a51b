"""Model loading: local checkpoints round-trip exactly; every failure is a one-line UserError."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from vqa_search.core.errors import UserError
from vqa_search.core.models import load_clip
from vqa_search.core.identity import TINY_MODEL, resolve_identity


def _random_tiny(seed: int) -> torch.nn.Module:
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model(TINY_MODEL)


def _assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    loaded, expected = model.state_dict(), reference.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_checkpoint_file_round_trip(tmp_path, suffix):
    reference = _random_tiny(seed=7)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": reference.state_dict()}, path)
    identity = resolve_identity(TINY_MODEL, str(path))
    assert identity.sha256 and len(identity.sha256) == 64
    _assert_same_weights(load_clip(identity, torch.device("cpu")).model, reference)


def test_openai_style_state_dict_with_extra_keys(tmp_path):
    reference = _random_tiny(seed=3)
    state = {**reference.state_dict(), "input_resolution": torch.tensor(64), "context_length": torch.tensor(77),
             "vocab_size": torch.tensor(49408)}
    path = tmp_path / "openai.pt"
    torch.save(state, path)
    _assert_same_weights(load_clip(resolve_identity(TINY_MODEL, str(path)), torch.device("cpu")).model, reference)


def test_loaded_weights_are_not_drawn_at_random_first(tmp_path, monkeypatch):
    """Random initialisation is most of building a ViT-B-32: skipped when a checkpoint replaces it at once."""
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in _random_tiny(seed=5).state_dict().items()}, str(path))
    drawn = []
    normal = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda tensor, *a, **k: drawn.append(1) or normal(tensor, *a, **k))
    load_clip(resolve_identity(TINY_MODEL, str(path)), torch.device("cpu"))
    assert drawn == []
    load_clip(resolve_identity(TINY_MODEL, "none"), torch.device("cpu"))  # random weights are drawn, of course
    assert drawn
    assert torch.nn.init.normal_ is not normal  # the test's stand-in is back in place, not the no-op


def test_random_init_is_seeded():
    first = load_clip(resolve_identity(TINY_MODEL, "none"), torch.device("cpu")).model
    second = load_clip(resolve_identity(TINY_MODEL, "none"), torch.device("cpu")).model
    _assert_same_weights(first, second)


def test_checkpoint_holding_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"weight": _NotATensor()}}, path)
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_clip(resolve_identity(TINY_MODEL, str(path)), torch.device("cpu"))


class _NotATensor:
    pass


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"visual.something": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="does not fit model vqa-tiny"):
        load_clip(resolve_identity(TINY_MODEL, str(path)), torch.device("cpu"))


def test_missing_checkpoint_file():
    with pytest.raises(UserError, match="checkpoint file not found"):
        resolve_identity(TINY_MODEL, "/nowhere/model.pt")


def test_unknown_tag_and_model():
    with pytest.raises(UserError, match="unknown pretrained tag 'nonsense'"):
        resolve_identity("ViT-B-32", "nonsense")
    with pytest.raises(UserError, match="unknown model 'ViT-Z-99'"):
        resolve_identity("ViT-Z-99", "none")


def test_offline_tag_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(UserError) as error:
        load_clip(resolve_identity("ViT-B-32", "laion2b_s34b_b79k"), torch.device("cpu"))
    message = str(error.value)
    assert "laion2b_s34b_b79k" in message and "ViT-B-32" in message and "--pretrained /path" in message
    assert "\n" not in message
    assert time.perf_counter() - started < 10
