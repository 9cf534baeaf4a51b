"""No file a user passes may run code: a TorchScript archive whose __setstate__ creates a file is
refused by every loader, and the file never appears."""

from __future__ import annotations

import ast
import dataclasses
import warnings
from pathlib import Path
from typing import Tuple

import pytest
import torch
from typer.testing import CliRunner

import vqa_search
from vqa_search.align.regions import RegionConfig, load_extractor
from vqa_search.align.reranker import load_reranker
from vqa_search.cli import app
from vqa_search.core.errors import UserError
from vqa_search.core.models import load_clip
from vqa_search.core.identity import TINY_MODEL, ModelIdentity, resolve_identity, sha256_file
from vqa_search.vqa.answerer import Answerer, load_answerer
from vqa_search.vqa.answers import AnswerVocab
from vqa_search.vqa.heads import AnswerHead, HeadConfig

PACKAGE = Path(vqa_search.__file__).parent


class _Payload(torch.nn.Module):
    """Restoring this module from a TorchScript archive creates the file named by `marker`."""

    def __init__(self, marker: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return self.weight, self.marker, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.marker = state[1]
        self.training = state[2]
        # torch.from_file(shared=True) creates the file: a visible side effect of loading.
        created = torch.from_file(self.marker, shared=True, size=1, dtype=torch.float32)
        self.weight = state[0] + created.sum() * 0


@pytest.fixture
def payload(tmp_path) -> tuple[Path, Path]:
    """(archive, marker): the archive really runs its code under torch.jit.load, which the fixture proves."""
    proof, marker = tmp_path / "proof-it-runs", tmp_path / "code-ran"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script / load are deprecated, not gone
        torch.jit.script(_Payload(str(proof))).save(str(tmp_path / "proof.pt"))
        torch.jit.load(str(tmp_path / "proof.pt"))
        assert proof.exists(), "the payload must create its file when loaded as TorchScript"
        archive = tmp_path / "evil.pt"
        torch.jit.script(_Payload(str(marker))).save(str(archive))
    assert not marker.exists()
    return archive, marker


def _refused(load, marker: Path, match: str = "TorchScript archive") -> str:
    with pytest.raises(UserError, match=match) as error:
        load()
    assert not marker.exists(), "loading ran code from the file"
    message = str(error.value)
    assert "\n" not in message
    return message


def test_clip_checkpoint(payload, tmp_path):
    archive, marker = payload
    for name in ("evil.pt", "evil.bin", "evil.pth", "evil.safetensors"):
        renamed = tmp_path / name
        renamed.write_bytes(archive.read_bytes())
        message = _refused(lambda: load_clip(resolve_identity(TINY_MODEL, str(renamed)), torch.device("cpu")), marker)
        assert "--pretrained openai" in message and str(renamed) in message


def test_cli_index_with_the_archive_as_weights(payload, photos):
    archive, marker = payload
    result = CliRunner().invoke(app, ["index", str(photos), "--model", TINY_MODEL, "--pretrained", str(archive),
                                      "--workers", "0", "--quiet"])
    assert result.exit_code == 2
    assert result.output.startswith("error: checkpoint") and "TorchScript" in result.output
    assert not marker.exists()
    assert not (photos / ".vqa-search" / "manifest.json").exists()


def test_detector_weights(payload):
    archive, marker = payload
    extractor = load_extractor(RegionConfig(detector="frcnn-mobilenet", detector_weights=archive, min_size=64))
    _refused(lambda: extractor.model, marker)


def test_head_naming_the_archive_as_its_clip(payload, tmp_path):
    archive, marker = payload
    clip = load_clip(resolve_identity(TINY_MODEL, "none"), torch.device("cpu"))
    named = dataclasses.replace(clip, identity=ModelIdentity(TINY_MODEL, str(archive), sha256_file(archive)))
    vocab = AnswerVocab(["yes", "no"])
    head = AnswerHead(HeadConfig("baseline", answers=2, embed_dim=clip.model.text_projection.shape[1], hidden=8))
    path = Answerer(head, vocab, named, None, "bce").save(tmp_path / "head.safetensors", record={})
    _refused(lambda: load_answerer(path, torch.device("cpu")), marker)


def test_reranker_file(payload):
    archive, marker = payload
    _refused(lambda: load_reranker(archive), marker, match="cannot read re-ranker")


def _hub_cache(tmp_path, monkeypatch, weights: bytes) -> Path:
    """The default tag's weights file, laid out as the hub lays it out, holding `weights`."""
    import open_clip

    repo = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")["hf_hub"].strip("/")
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(weights)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    return snapshot / "open_clip_pytorch_model.bin"


def _load_default_tag():
    return load_clip(resolve_identity("ViT-B-32", "laion2b_s34b_b79k"), torch.device("cpu"))


def test_archive_in_the_hub_cache(payload, tmp_path, monkeypatch):
    """The default path: a tag whose cached file is an archive is refused before open_clip opens it."""
    archive, marker = payload
    cached = _hub_cache(tmp_path, monkeypatch, archive.read_bytes())
    assert str(cached) in _refused(_load_default_tag, marker)


def test_pickled_code_in_the_hub_cache(tmp_path, monkeypatch):
    marker = tmp_path / "unpickled"
    torch.save({"weight": _CreatesFileWhenUnpickled(str(marker))}, tmp_path / "pickled.bin")
    cached = _hub_cache(tmp_path, monkeypatch, (tmp_path / "pickled.bin").read_bytes())
    message = _refused(_load_default_tag, marker, match="cannot load the pretrained weights 'laion2b_s34b_b79k'")
    assert str(cached) in message


def test_pickled_code_in_a_plain_checkpoint(tmp_path):
    """torch.load(weights_only=True) refuses pickled objects; the refusal is one line too."""
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"weight": _CreatesFileWhenUnpickled(str(tmp_path / "unpickled"))}}, path)
    _refused(lambda: load_clip(resolve_identity(TINY_MODEL, str(path)), torch.device("cpu")),
             tmp_path / "unpickled", match="cannot read checkpoint")


class _CreatesFileWhenUnpickled:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("content", [[1, 2], {}, {"w": 3}, {3: torch.zeros(1)}, {"state_dict": {}}])
def test_checkpoints_that_are_not_state_dicts(tmp_path, content):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(UserError, match="holds no model weights|is not a state dict") as error:
        load_clip(resolve_identity(TINY_MODEL, str(path)), torch.device("cpu"))
    assert "\n" not in str(error.value)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_loader_in_the_package_can_run_code():
    """Every loader added later is held to the same rule: no TorchScript, no unpickling."""
    offenders = []
    for source in PACKAGE.rglob("*.py"):
        for call, name in _calls(ast.parse(source.read_text(encoding="utf-8"))):
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if (name.endswith(("jit.load", "pickle.load", "pickle.loads", "torch.package.PackageImporter"))
                    or (name == "torch.load" and keywords.get("weights_only") != "True")
                    or (name.endswith("np.load") and keywords.get("allow_pickle", "False") != "False")):
                offenders.append(f"{source.relative_to(PACKAGE)}:{call.lineno}: {name}")
    assert not offenders
