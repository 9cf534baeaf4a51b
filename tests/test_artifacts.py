"""Broken and crafted re-ranker and head files: each is one line naming the file, refused before any
weight is built; a valid file still loads and answers exactly as it was saved."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from vqa_search.align.reranker import CrossAttentionReranker, RerankerConfig, load_reranker, save_reranker
from vqa_search.cli import app
from vqa_search.core.errors import UserError
from vqa_search.core.models import Clip, load_clip
from vqa_search.core.identity import TINY_MODEL, ModelIdentity, resolve_identity
from vqa_search.vqa.answerer import Answerer, load_answerer
from vqa_search.vqa.answers import AnswerVocab
from vqa_search.vqa.features import LocalEncoder
from vqa_search.vqa.heads import AnswerHead, HeadConfig

from conftest import write_photo

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
TINY_CLIP = {"model": TINY_MODEL, "pretrained": "none", "sha256": None}
RERANKER = RerankerConfig(token_dim=12, region_dim=9, attention_dim=5, lam=0.7, regions="clip-patches",
                          clip=TINY_CLIP)
HEAD_HIDDEN, HEAD_ANSWERS = 8, 3
Edit = Callable[[dict, dict], None]  # (metadata, tensors), changed in place


def randomized(module: nn.Module, seed: int) -> nn.Module:
    """Weights unlike a fresh module's, so a load that silently kept the fresh ones would show."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.3)
    return module


@pytest.fixture(scope="module")
def valid_reranker(tmp_path_factory) -> tuple[Path, CrossAttentionReranker]:
    model = randomized(CrossAttentionReranker(RERANKER), seed=0)
    return save_reranker(model, tmp_path_factory.mktemp("reranker") / "valid.safetensors"), model


def tiny_answerer(local_width: int | None = None) -> Answerer:
    """A dual-attention head on the tiny CLIP, its local encoder's last block trained (here: randomized)."""
    identity = resolve_identity(TINY_MODEL, "none")
    clip = load_clip(identity, CPU)
    local = LocalEncoder(load_clip(identity, CPU), unfreeze_last=1)
    randomized(local.model, seed=1)
    head = randomized(AnswerHead(HeadConfig(
        "dual-attention", answers=HEAD_ANSWERS, embed_dim=64, local_width=local_width or local.width,
        local_pooled_dim=local.pooled_dim, hidden=HEAD_HIDDEN, dropout=0.0, attention_heads=2)), seed=2)
    answerer = Answerer(head, AnswerVocab(["yes", "no", "2"]), clip, local, "bce")
    answerer.train(False)
    return answerer


@pytest.fixture(scope="module")
def valid_head(tmp_path_factory) -> tuple[Path, Answerer]:
    answerer = tiny_answerer()
    return answerer.save(tmp_path_factory.mktemp("head") / "valid.safetensors", record={"epoch": 1}), answerer


def rewrite(valid: Path, out: Path, edit: Edit) -> Path:
    """`valid`'s metadata and tensors, changed by `edit`, written as a plain safetensors file."""
    with safe_open(str(valid), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    edit(metadata, tensors)
    save_file(tensors, str(out), metadata=metadata)
    return out


def in_json(key: str, change: Callable[[dict], object]) -> Edit:
    """An edit of the JSON object in the metadata's `key`."""
    def edit(metadata: dict, tensors: dict) -> None:
        value = json.loads(metadata[key])
        change(value)
        metadata[key] = json.dumps(value)
    return edit


def set_text(key: str, text: str) -> Edit:
    return lambda metadata, tensors: metadata.__setitem__(key, text)


def drop(key: str) -> Edit:
    return lambda metadata, tensors: metadata.pop(key)


def set_tensor(name: str, tensor: torch.Tensor) -> Edit:
    return lambda metadata, tensors: tensors.__setitem__(name, tensor)


def drop_tensor(name: str) -> Edit:
    return lambda metadata, tensors: tensors.pop(name)


def all_of(edits: list[Edit]) -> Edit:
    def edit(metadata: dict, tensors: dict) -> None:
        for each in edits:
            each(metadata, tensors)
    return edit


@pytest.fixture
def real_weights_built(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of the Linear layers built off the meta device: every model here is made of them."""
    built = []
    reset = nn.Linear.reset_parameters

    def recording(layer: nn.Linear) -> None:
        if layer.weight.device.type != "meta":
            built.append(tuple(layer.weight.shape))
        reset(layer)

    monkeypatch.setattr(nn.Linear, "reset_parameters", recording)
    return built


def refused(load: Callable[[], object], path: Path, fragment: str) -> str:
    with pytest.raises(UserError) as error:
        load()
    message = str(error.value)
    assert "\n" not in message and str(path) in message and fragment in message, message
    return message


RERANKER_FILES = [
    pytest.param(drop("config"), 'the metadata has no "config"', id="missing-config"),
    pytest.param(set_text("config", '{"token_dim": 12,'), '"config" is not valid JSON', id="bad-json"),
    pytest.param(set_text("config", "[12, 9]"), "config must be a JSON object (got [12, 9])", id="not-an-object"),
    pytest.param(in_json("config", lambda c: c.update(heads=4)), "unknown field 'heads'", id="unknown-field"),
    pytest.param(in_json("config", lambda c: c.pop("token_dim")), 'config has no field "token_dim"',
                 id="missing-field"),
    pytest.param(drop_tensor("W_o.weight"), "tensor 'W_o.weight' is missing", id="missing-tensor"),
    pytest.param(set_tensor("extra", torch.zeros(2)), "unexpected tensor 'extra'", id="unexpected-tensor"),
    pytest.param(set_tensor("W_q.weight", torch.zeros(5, 13)), "'W_q.weight' has shape [5, 13], expected [5, 12]",
                 id="wrong-tensor-shape"),
    pytest.param(in_json("config", lambda c: c.update(token_dim=13)),
                 "'W_o.weight' has shape [12, 12], expected [13, 13]", id="config-and-tensors-disagree"),
    pytest.param(set_tensor("W_k.weight", torch.zeros(5, 9, dtype=torch.int64)),
                 "'W_k.weight' has dtype I64, expected a floating-point one", id="integer-tensor"),
    pytest.param(in_json("config", lambda c: c.update(region_dim="9")),
                 'config field "region_dim" must be an integer (got \'9\')', id="dimension-as-string"),
    pytest.param(in_json("config", lambda c: c.update(region_dim=True)), 'field "region_dim" must be an integer',
                 id="dimension-as-bool"),
    pytest.param(in_json("config", lambda c: c.update(region_dim=9.0)), 'field "region_dim" must be an integer',
                 id="dimension-as-float"),
    pytest.param(in_json("config", lambda c: c.update(attention_dim=2 ** 40)),
                 'config field "attention_dim" must be an integer in 1..65536 (got 1099511627776)',
                 id="attention-dim-2^40"),
    pytest.param(in_json("config", lambda c: c.update(region_hidden=-1)), '"region_hidden" must be an integer in 0..',
                 id="negative-hidden"),
    pytest.param(set_text("config", json.dumps(dataclasses.asdict(RERANKER)).replace("0.7", "NaN")),
                 '"lam" must be a number that is finite (got nan)', id="lambda-nan"),
    pytest.param(in_json("config", lambda c: c.update(lam=10 ** 400)), '"lam" must be a number that is finite',
                 id="lambda-beyond-float"),
    pytest.param(in_json("config", lambda c: c.update(regions="../../elsewhere")), "naming a region set",
                 id="regions-outside-the-index"),
    pytest.param(in_json("config", lambda c: c.update(clip={})), 'config "clip" has no field "model"',
                 id="clip-unnamed"),
    pytest.param(in_json("config", lambda c: c["clip"].update(sha256=5)),
                 'field "sha256" must be a string or null (got 5)', id="clip-sha256-number"),
    pytest.param(set_text("format", "vqa-search-reranker/2"), "is not a vqa-search re-ranker", id="other-format"),
    pytest.param(drop("format"), "is not a vqa-search re-ranker", id="no-format"),
]


@pytest.mark.parametrize("edit, fragment", RERANKER_FILES)
def test_crafted_reranker_files_are_one_line_errors_before_any_weight(valid_reranker, tmp_path, real_weights_built,
                                                                      edit, fragment):
    path = rewrite(valid_reranker[0], tmp_path / "crafted.safetensors", edit)
    started = time.perf_counter()
    refused(lambda: load_reranker(path), path, fragment)
    assert time.perf_counter() - started < 1.0
    assert real_weights_built == []


@pytest.mark.parametrize("content, fragment", [
    (None, "re-ranker file not found"),
    (b"", "cannot read re-ranker file"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "cannot read re-ranker file"),
])
def test_missing_and_unreadable_reranker_files(tmp_path, content, fragment):
    path = tmp_path / "reranker.safetensors"
    if content is not None:
        path.write_bytes(content)
    refused(lambda: load_reranker(path), path, fragment)


def test_a_truncated_reranker_file(valid_reranker, tmp_path):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(valid_reranker[0].read_bytes()[:-8])
    refused(lambda: load_reranker(path), path, "cannot read re-ranker file")


@torch.no_grad()
def test_a_valid_reranker_loads_with_identical_scores(valid_reranker):
    path, model = valid_reranker
    loaded = load_reranker(path)
    assert loaded.config == model.config
    tokens, mask, regions = torch.randn(2, 4, 12), torch.ones(2, 4, dtype=torch.bool), torch.randn(1, 3, 5, 9)
    global_scores = torch.zeros(2, 3)
    assert torch.equal(loaded(global_scores, tokens, mask, regions), model(global_scores, tokens, mask, regions))


HEAD_FILES = [
    pytest.param(drop("clip"), 'the metadata has no "clip"', id="missing-clip"),
    pytest.param(in_json("clip", lambda c: c.pop("pretrained")), 'clip has no field "pretrained"',
                 id="clip-without-weights"),
    pytest.param(in_json("local", lambda c: c.pop("unfreeze_last")), 'local has no field "unfreeze_last"',
                 id="missing-unfreeze-last"),
    pytest.param(in_json("local", lambda c: c.update(unfreeze_last=-1)),
                 '"unfreeze_last" must be an integer at least 0', id="negative-unfreeze-last"),
    pytest.param(set_text("vocab", '["yes", "no"]'), "the vocabulary has 2 answers, the head 3", id="vocab-too-short"),
    pytest.param(set_text("vocab", '"yes no 2"'), '"vocab" must be a JSON list of answer strings',
                 id="vocab-not-a-list"),
    pytest.param(set_text("vocab", "[1, 2, 3]"), '"vocab" must be a JSON list of answer strings',
                 id="vocab-of-numbers"),
    pytest.param(in_json("head", lambda c: c.update(variant="triple")),
                 '"variant" must be a string naming one of baseline, dual-concat, dual-attention, regions '
                 '(got \'triple\')',
                 id="unknown-variant"),
    pytest.param(set_text("loss", "mse"), '"loss" must be one of bce, ce', id="loss-mse"),
    pytest.param(in_json("head", lambda c: c.update(hidden=HEAD_HIDDEN + 1)),
                 f"'classifier.0.bias' has shape [{HEAD_HIDDEN}], expected [{HEAD_HIDDEN + 1}]",
                 id="config-and-tensors-disagree"),
    pytest.param(set_tensor("W_q.weight", torch.zeros(64, 63)), "'W_q.weight' has shape [64, 63], expected [64, 64]",
                 id="wrong-tensor-shape"),
    pytest.param(drop_tensor("classifier.4.weight"), "tensor 'classifier.4.weight' is missing", id="missing-tensor"),
    pytest.param(in_json("head", lambda c: c.update(attention_heads=3)), "attention_heads (3) must divide",
                 id="heads-not-dividing"),
    pytest.param(in_json("head", lambda c: c.update(dropout=1)), '"dropout" must be a number in [0, 1)',
                 id="dropout-one"),
    pytest.param(in_json("head", lambda c: c.update(answers=0)), '"answers" must be an integer at least 1',
                 id="no-answers"),
    pytest.param(in_json("head", lambda c: c.update(embed_dim=2 ** 40)), '"embed_dim" must be an integer in 1..65536',
                 id="embed-dim-2^40"),
    pytest.param(set_text("local", "null"), "a dual-attention head needs a local encoder", id="local-missing"),
    pytest.param(set_text("format", "vqa-search-reranker/1"), "is not a vqa-search answer head", id="other-format"),
]


@pytest.mark.parametrize("edit, fragment", HEAD_FILES)
def test_crafted_head_files_are_one_line_errors_before_any_weight(valid_head, tmp_path, real_weights_built, edit,
                                                                  fragment):
    path = rewrite(valid_head[0], tmp_path / "crafted.safetensors", edit)
    started = time.perf_counter()
    refused(lambda: load_answerer(path, CPU), path, fragment)
    assert time.perf_counter() - started < 1.0
    assert real_weights_built == []  # not even the CLIPs were loaded


LOCAL_BLOCK = "visual.transformer.resblocks.1.mlp.c_fc.weight"


@pytest.mark.parametrize("edit, fragment", [
    pytest.param(set_tensor("local." + LOCAL_BLOCK, torch.zeros(256, 63)), "has shape [256, 63], expected [256, 64]",
                 id="local-tensor-shape"),
    pytest.param(drop_tensor("local." + LOCAL_BLOCK), f"tensor 'local.{LOCAL_BLOCK}' is missing",
                 id="local-tensor-missing"),
    pytest.param(set_tensor("local.visual.transformer.resblocks.0.mlp.c_fc.weight", torch.zeros(256, 64)),
                 "unexpected tensor 'local.visual.transformer.resblocks.0", id="frozen-block-in-the-file"),
    pytest.param(in_json("local", lambda c: c.update(unfreeze_last=5)), "its local encoder: --unfreeze-last must be",
                 id="unfreeze-more-blocks-than-there-are"),
])
def test_local_encoder_tensors_are_checked_against_the_loaded_encoder(valid_head, tmp_path, edit, fragment):
    path = rewrite(valid_head[0], tmp_path / "crafted.safetensors", edit)
    refused(lambda: load_answerer(path, CPU), path, fragment)


def test_a_head_and_local_encoder_that_disagree(tmp_path):
    path = tiny_answerer(local_width=32).save(tmp_path / "narrow.safetensors", record={})
    refused(lambda: load_answerer(path, CPU), path, "the head's local_width is 32, but its local encoder gives 64")


def test_a_baseline_head_with_a_local_encoder(valid_head, tmp_path):
    path = rewrite(valid_head[0], tmp_path / "crafted.safetensors",
                   in_json("head", lambda c: c.update(variant="baseline")))
    refused(lambda: load_answerer(path, CPU), path, "a baseline head needs no local encoder")


@torch.no_grad()
def test_a_valid_head_loads_with_identical_answers(valid_head):
    path, answerer = valid_head
    loaded = load_answerer(path, CPU)
    assert loaded.head.config == answerer.head.config and loaded.vocab.answers == answerer.vocab.answers
    torch.manual_seed(3)
    streams = answerer.local.prefix(torch.randn(2, 3, 64, 64))
    inputs = (torch.randn(3, 64), torch.randn(3, 64), streams, torch.tensor([0, 1, 1]))
    assert torch.equal(loaded.logits(*inputs), answerer.logits(*inputs))


# Property: whatever the metadata says, a loader returns a model or raises a UserError, nothing else.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 70) | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def edited_object(valid: dict) -> st.SearchStrategy[dict]:
    """`valid` with a few fields set to arbitrary JSON values, some removed, or none changed."""
    names = st.sampled_from(sorted(valid)) | st.text(max_size=6)
    return st.builds(lambda updates, removed: {key: value for key, value in {**valid, **updates}.items()
                                               if key not in removed},
                     st.dictionaries(names, json_values, max_size=2),
                     st.sets(st.sampled_from(sorted(valid)), max_size=1))


def metadata_text(valid: dict) -> st.SearchStrategy[str]:
    return edited_object(valid).map(json.dumps) | json_values.map(json.dumps) | st.text(max_size=12)


def tensor_edit(names: list[str]) -> st.SearchStrategy[Edit]:
    """One tensor dropped, reshaped or made integer."""
    name = st.sampled_from(names)
    return st.one_of(
        name.map(drop_tensor),
        st.builds(lambda n, shape: set_tensor(n, torch.zeros(shape)), name, st.lists(st.integers(0, 3), max_size=3)),
        name.map(lambda n: set_tensor(n, torch.zeros(2, dtype=torch.int32))),
    )


def reranker_metadata_key(key: str) -> st.SearchStrategy[Edit]:
    if key == "format":
        return st.sampled_from(["vqa-search-reranker/1", "vqa-search-reranker/2", ""]).map(lambda v: set_text(key, v))
    return metadata_text(dataclasses.asdict(RERANKER)).map(lambda text: set_text(key, text)) | st.just(drop(key))


PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(st.data())
def test_any_reranker_metadata_loads_or_is_a_user_error(valid_reranker, scratch, data):
    path, model = valid_reranker
    edits = [data.draw(reranker_metadata_key(key)) for key in data.draw(st.sets(st.sampled_from(["config", "format"])))]
    edits += data.draw(st.lists(tensor_edit(sorted(model.state_dict())), max_size=1))
    crafted = rewrite(path, scratch / "reranker.safetensors", all_of(edits))
    try:
        assert isinstance(load_reranker(crafted), CrossAttentionReranker)
    except UserError as error:
        assert "\n" not in str(error) and str(crafted) in str(error)


def head_metadata_key(key: str, valid: dict) -> st.SearchStrategy[Edit]:
    if key == "loss":
        return (st.sampled_from(["bce", "ce", "mse"]) | st.text(max_size=4)).map(lambda v: set_text(key, v))
    original = json.loads(valid[key])
    if isinstance(original, dict):
        text = metadata_text(original)
    elif key == "vocab":
        text = st.lists(st.text(max_size=3), max_size=4).map(json.dumps) | json_values.map(json.dumps)
    else:
        text = json_values.map(json.dumps)
    return text.map(lambda value: set_text(key, value)) | st.just(drop(key))


@pytest.fixture(scope="module")
def clip_copies() -> Callable[[ModelIdentity, torch.device | None], Clip]:
    """`load_clip` at the cost of a copy: the tiny CLIP takes 0.16 s to build, and a head example that
    gets that far loads two. A copy, as the local encoder changes the model it is given."""
    built = {}

    def load_copy(identity: ModelIdentity, device: torch.device | None = None) -> Clip:
        if identity not in built:
            built[identity] = load_clip(identity, device)
        return dataclasses.replace(built[identity], model=copy.deepcopy(built[identity].model))

    return load_copy


@PROPERTY_SETTINGS
@given(st.data())
def test_any_head_metadata_loads_or_is_a_user_error(valid_head, scratch, clip_copies, data):
    path = valid_head[0]
    with safe_open(str(path), framework="pt") as handle:
        metadata, names = handle.metadata(), sorted(handle.keys())
    keys = data.draw(st.sets(st.sampled_from(["head", "vocab", "loss", "clip", "local"]), max_size=2))
    edits = [data.draw(head_metadata_key(key, metadata)) for key in sorted(keys)]
    edits += data.draw(st.lists(tensor_edit(names), max_size=1))
    crafted = rewrite(path, scratch / "head.safetensors", all_of(edits))
    try:
        with mock.patch("vqa_search.vqa.answerer.load_clip", clip_copies):
            assert isinstance(load_answerer(crafted, CPU), Answerer)
    except UserError as error:
        assert "\n" not in str(error) and str(crafted) in str(error)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for every example of a property test (hypothesis re-runs the test, not the fixture)."""
    return tmp_path_factory.mktemp("crafted")


def test_cli_ask_with_a_crafted_head_is_one_error_line(valid_head, tmp_path):
    head = rewrite(valid_head[0], tmp_path / "crafted.safetensors", set_text("loss", "mse"))
    image = write_photo(tmp_path / "photo.png", (200, 30, 30))
    result = CliRunner().invoke(app, ["ask", str(image), "what colour is it?", "--head", str(head)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: head file {head}: "), result.stderr
    assert "Traceback" not in result.output
