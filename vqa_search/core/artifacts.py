"""The project's own safetensors files, written one way (re-rankers, answer heads, fine-tuned
checkpoints) and, where a module is built from their metadata (re-rankers, answer heads), read one way.

A file handed to a loader may be broken or crafted. Before a module is built from it, its format
tag, its metadata (types and ranges, field by field) and its tensor header (names, shapes, dtypes)
are checked against what the module would be, so any mistake is one line naming the file, never a
traceback or a huge allocation. The expected shapes come from the module built on the meta device
(`expected_state`), which allocates nothing however large the metadata says it is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import sys
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from vqa_search.core.atomic import atomic_path
from vqa_search.core.errors import UserError

FORMAT_KEY = "format"
MAX_DIM = 65536  # far above any CLIP width; refuses 2^40 before anything is built
FLOATING_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
INTEGER_DTYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})
_TYPE_NOUNS = {int: "an integer", float: "a number", str: "a string", dict: "an object", type(None): "null"}
_SHOWN = reprlib.Repr()  # a hostile value can be megabytes long or nested deep: show its start
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = 60


@dataclass(frozen=True)
class ArtifactKind:
    """How messages name one kind of file, and the format tag that marks it."""

    format: str  # the metadata's "format" value
    noun: str  # "re-ranker file"
    description: str  # "a vqa-search re-ranker"
    remedy: str  # "train one with `vqa-search train rerank`"


@dataclass(frozen=True)
class Rule:
    """A range a field's value must fall in, and the words a message says it with."""

    holds: Callable[[Any], bool]
    words: str  # completes "must be an integer ..."


def between(low: int, high: int) -> Rule:
    return Rule(lambda value: low <= value <= high, f"in {low}..{high}")


def at_least(low: int) -> Rule:
    return Rule(lambda value: value >= low, f"at least {low}")


def one_of(choices: Iterable[str]) -> Rule:
    choices = tuple(choices)
    return Rule(lambda value: value in choices, f"naming one of {', '.join(choices)}")


DIMENSION = between(1, MAX_DIM)
OPTIONAL_DIMENSION = between(0, MAX_DIM)  # 0: the part is absent
FINITE = Rule(math.isfinite, "that is finite")
DROPOUT = Rule(lambda value: 0 <= value < 1, "in [0, 1)")


def save_artifact(path: Path | str, format_tag: str, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str]) -> Path:
    """Atomically, with the format tag a loader checks before anything else; no pickle."""
    path = Path(path)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata={FORMAT_KEY: format_tag, **metadata})
    return path


def expected_state(build: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
    """The state dict `build()` would have, built on the meta device: shapes and dtypes, no memory."""
    with torch.device("meta"):
        return build().state_dict()


class Artifact:
    """An open file of one kind: its metadata and tensor header are read; no tensor is until `load`."""

    def __init__(self, path: Path, kind: ArtifactKind, handle):
        self.path = path
        self.kind = kind
        self._handle = handle
        self.metadata: dict[str, str] = handle.metadata() or {}
        self.header: dict[str, tuple[list[int], str]] = {
            name: (handle.get_slice(name).get_shape(), handle.get_slice(name).get_dtype()) for name in handle.keys()}

    def error(self, detail: str) -> UserError:
        return UserError(f"{self.kind.noun} {self.path}: {detail}")

    def text(self, key: str) -> str:
        if key not in self.metadata:
            raise self.error(f'the metadata has no "{key}"')
        return self.metadata[key]

    def json_value(self, key: str) -> Any:
        try:
            return json.loads(self.text(key))
        except (ValueError, RecursionError) as error:
            raise self.error(f'the metadata\'s "{key}" is not valid JSON ({_first_line(error)})') from None

    def config(self, cls: type, key: str, rules: Mapping[str, Rule] | None = None) -> Any:
        """The dataclass `cls` from the metadata's JSON `key`."""
        return self.build(cls, self.json_value(key), key, rules)

    def build(self, cls: type, data: Any, label: str, rules: Mapping[str, Rule] | None = None) -> Any:
        """`cls(**data)` once every field has the type `cls` declares and passes its rule.

        Ints must be JSON integers (not true, "3" or 3.0); numbers may be integers; no field may be
        unknown or, without a default, missing.
        """
        if not isinstance(data, dict):
            raise self.error(f"{label} must be a JSON object (got {_shown(data)})")
        fields = dataclasses.fields(cls)
        if unknown := sorted(data.keys() - {field.name for field in fields}):
            raise self.error(f"{label} has an unknown field {_shown(unknown[0])}")
        for field in fields:
            if field.name not in data and field.default is field.default_factory is dataclasses.MISSING:
                raise self.error(f'{label} has no field "{field.name}"')
        annotations, rules = typing.get_type_hints(cls), rules or {}
        values = {}
        for name, value in data.items():
            annotation, rule = annotations[name], rules.get(name)
            if not _fits(value, annotation):
                raise self.error(f'{label} field "{name}" must be {_noun(annotation)} (got {_shown(value)})')
            values[name] = _as_float(value) if annotation is float else value
            if rule is not None and not rule.holds(values[name]):
                raise self.error(f'{label} field "{name}" must be {_noun(annotation)} {rule.words} '
                                 f'(got {_shown(value)})')
        return cls(**values)

    def check_tensors(self, expected: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> None:
        """The file's tensors (all, or those `names`) are exactly `expected`'s: names, shapes, kind of dtype."""
        present = set(self.header if names is None else names)
        if missing := sorted(expected.keys() - present):
            raise self.error(f"tensor {_shown(missing[0])} is missing")
        if unexpected := sorted(present - expected.keys()):
            raise self.error(f"unexpected tensor {_shown(unexpected[0])}")
        for name in sorted(present):
            shape, dtype = self.header[name]
            wanted = expected[name]
            if shape != list(wanted.shape):
                raise self.error(f"tensor {_shown(name)} has shape {_shown(shape)}, expected {list(wanted.shape)}")
            floating = wanted.is_floating_point()
            if dtype not in (FLOATING_DTYPES if floating else INTEGER_DTYPES):
                raise self.error(f"tensor {_shown(name)} has dtype {dtype}, expected "
                                 f"{'a floating-point' if floating else 'an integer'} one")

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors `names`, on the CPU; call after `check_tensors`."""
        try:
            return {name: self._handle.get_tensor(name) for name in names}
        except (OSError, SafetensorError) as error:
            raise self.error(f"cannot read its tensors: {_first_line(error)}") from None


@contextmanager
def open_artifact(path: Path | str, kind: ArtifactKind) -> Iterator[Artifact]:
    """The file at `path` if it is a safetensors file tagged as `kind`; else a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{kind.noun} not found: {path} ({kind.remedy})")
    try:
        handle = safe_open(str(path), framework="pt")
    except (OSError, SafetensorError) as error:
        raise UserError(f"cannot read {kind.noun} {path}: {_first_line(error)}") from None
    with handle:
        artifact = Artifact(path, kind, handle)
        if artifact.metadata.get(FORMAT_KEY) != kind.format:
            raise UserError(f"{path} is not {kind.description} ({kind.remedy})")
        yield artifact


def _fits(value: Any, annotation: Any) -> bool:
    """A JSON value of the declared type: bool is no int, and a float field also takes integers."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(annotation))
    if annotation is float:
        return type(value) in (int, float)
    return type(value) is annotation


def _noun(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_noun(option) for option in typing.get_args(annotation))
    return _TYPE_NOUNS[annotation]


def _as_float(value: int | float) -> float:
    """JSON integers beyond float's range become infinite rather than raising OverflowError."""
    if abs(value) > sys.float_info.max:
        return math.inf if value > 0 else -math.inf
    return float(value)


def _shown(value: Any) -> str:
    return _SHOWN.repr(value)


def _first_line(error: Exception) -> str:
    lines = str(error).splitlines()
    return lines[0] if lines else type(error).__name__
