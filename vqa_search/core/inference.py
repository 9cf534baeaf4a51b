"""Which backend and precision each CLIP tower runs with: the choice rule and its record. No torch.

`--backend auto|torch|onnx` and `--precision auto|fp32|fp16|bf16|int8` resolve, per device, into a
`Plan`: one (backend, precision) per tower, because the towers win with different ones. The index
records the plan in its manifest and queries run the recorded text (or image) tower, so a query is
embedded the way the index's captions were. `core/backends.py` runs a plan.

`auto` must be both faster than fp32 PyTorch and faithful (cosine with fp32 >= 0.999 for every
embedding, shapes-world R@1 within 0.5 of fp32), as measured by benchmarks/precision.py on the
machine. That run is still missing, so until it is made `auto` keeps the reference, fp32 PyTorch, on
the CPU, and every faster plan is opt-in: ONNX Runtime fp32 (`--backend onnx`: ViT-B-32's features
within 4e-6 of PyTorch's), ONNX Runtime or PyTorch int8, bf16 autocast. On CUDA `auto` is fp16
autocast for both towers (not measured here: no GPU; the tensor cores' usual choice).

A plan changes vectors only within those bounds, and the weights stay the same, so it is no part
of the weights' identity (`core/identity.py`): an index embedded in int8 answers fp32 queries, and
one identity check still refuses other weights.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from vqa_search.core.errors import UserError

BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
TOWERS = ("image", "text")


@dataclass(frozen=True)
class TowerRun:
    """How one tower runs: a backend and a precision."""

    backend: str  # torch | onnx
    precision: str  # fp32 | fp16 | bf16 | int8

    def describe(self) -> str:
        return f"{self.backend} {self.precision}"


@dataclass(frozen=True)
class Plan:
    """What each tower runs with, and what the user asked for (the default of the next run)."""

    image: TowerRun
    text: TowerRun
    requested: tuple[str, str] = ("auto", "auto")  # (backend, precision) as given

    def tower(self, name: str) -> TowerRun:
        return self.image if name == "image" else self.text

    def uses_onnx(self) -> bool:
        return "onnx" in (self.image.backend, self.text.backend)

    def describe(self) -> str:
        if self.image == self.text:
            return self.image.describe()
        return f"images {self.image.describe()}, text {self.text.describe()}"

    def to_json(self) -> dict:
        return {"requested": {"backend": self.requested[0], "precision": self.requested[1]},
                "image": {"backend": self.image.backend, "precision": self.image.precision},
                "text": {"backend": self.text.backend, "precision": self.text.precision}}

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        requested = data.get("requested") or {}
        return cls(TowerRun(**data["image"]), TowerRun(**data["text"]),
                   (requested.get("backend", "auto"), requested.get("precision", "auto")))


# What every index made before backends existed was embedded with; the reference of the benchmark.
REFERENCE = Plan(TowerRun("torch", "fp32"), TowerRun("torch", "fp32"), ("torch", "fp32"))

# per device and precision: (image, text). The CPU's auto is the reference until measured (module docstring).
_AUTO_CPU_ONNX = {"auto": (TowerRun("onnx", "fp32"), TowerRun("onnx", "fp32")),
                  "fp32": (TowerRun("onnx", "fp32"), TowerRun("onnx", "fp32")),
                  "int8": (TowerRun("onnx", "int8"), TowerRun("onnx", "int8"))}
_AUTO_CPU_TORCH = {"auto": (TowerRun("torch", "fp32"), TowerRun("torch", "fp32"))}
_AUTO_CUDA = {"auto": (TowerRun("torch", "fp16"), TowerRun("torch", "fp16"))}


ONNX_PACKAGES = ("onnxruntime", "onnx", "onnxscript")  # runs the graphs; torch's exporter needs the other two


def onnx_available() -> bool:
    """The ONNX packages are installed (found without importing them: the command line must stay light)."""
    return all(importlib.util.find_spec(package) is not None for package in ONNX_PACKAGES)


def check_names(backend: str, precision: str) -> None:
    """The spelling, before anything is loaded."""
    if backend not in BACKENDS:
        raise UserError(f"unknown --backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def choose_plan(backend: str = "auto", precision: str = "auto", device: str = "cpu",
                has_onnx: bool | None = None) -> Plan:
    """The plan for `device` ("cpu" or "cuda"); a combination that cannot run there is a UserError."""
    check_names(backend, precision)
    has_onnx = onnx_available() if has_onnx is None else has_onnx
    requested = (backend, precision)
    if precision == "fp16" and device != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU (none here); on the CPU use int8, bf16 or fp32")
    if precision == "int8" and device == "cuda":
        raise UserError("--precision int8 runs on the CPU only; on a CUDA GPU use fp16")
    if backend == "onnx":
        if not has_onnx:
            raise UserError("--backend onnx needs onnxruntime, onnx and onnxscript, which are not all installed: "
                            f"pip install {' '.join(ONNX_PACKAGES)}")
        if device == "cuda":
            raise UserError("--backend onnx runs on the CPU; on a CUDA GPU use --backend torch (fp16)")
        if precision in ("fp16", "bf16"):
            raise UserError(f"--backend onnx runs fp32 or int8; {precision} runs with --backend torch")
    if backend == "torch" or (backend == "auto" and precision == "bf16"):
        if precision != "auto":
            return Plan(TowerRun("torch", precision), TowerRun("torch", precision), requested)
        table = _AUTO_CUDA if device == "cuda" else _AUTO_CPU_TORCH
        return Plan(*table["auto"], requested)
    if device == "cuda":  # backend auto, precision auto or fp16 or fp32
        runs = _AUTO_CUDA["auto"] if precision == "auto" else (TowerRun("torch", precision),) * 2
        return Plan(*runs, requested)
    if backend == "onnx":
        return Plan(*_AUTO_CPU_ONNX[precision], requested)
    if precision == "auto":
        return Plan(*_AUTO_CPU_TORCH["auto"], requested)
    return Plan(TowerRun("torch", precision), TowerRun("torch", precision), requested)


def plan_for_queries(recorded: Plan | None, device: str) -> Plan:
    """The index's plan where it runs here; else what its request means on this device, else its
    precision with any backend, else auto (an index embedded on a GPU in fp16, queried on a laptop;
    onnxruntime uninstalled). Within the measured bounds either way."""
    if recorded is None:
        return REFERENCE  # an index from before backends existed: what it was embedded with
    try:
        for run in (recorded.image, recorded.text):
            choose_plan(run.backend, run.precision, device)
        return recorded
    except UserError:
        pass
    for backend, precision in (recorded.requested, ("auto", recorded.requested[1])):
        try:
            return choose_plan(backend, precision, device)
        except UserError:
            pass
    return choose_plan("auto", "auto", device)
