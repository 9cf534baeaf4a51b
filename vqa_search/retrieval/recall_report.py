"""Recall runs side by side: a results file of JSON lines, a table, and recall@K curves.

Each `bench recall --append RESULTS` adds one line, so zero-shot weights, a fine-tuned checkpoint
and the same checkpoint with the re-ranker land in one table and one plot. Every gallery in the
results gets a chance row, the recall of a random ordering of that gallery.
"""

from __future__ import annotations

import json
from pathlib import Path

from vqa_search.core.atomic import atomic_path, write_text
from vqa_search.core.errors import UserError
from vqa_search.core.plots import pyplot
from vqa_search.retrieval.compositional import REQUIRED_KEYS as COMPOSITIONAL_KEYS, is_compositional

DIRECTIONS = {"t2i": "text→image", "i2t": "image→text"}
CURVE_TICKS = (1, 2, 5, 10, 20, 50)
REQUIRED_KEYS = ("name", "split", "n_images", "n_captions", "t2i", "i2t", "chance", "curves")


def append_run(results: Path, run: dict) -> None:
    """Add a run to the results file, atomically: a crash leaves the old file whole."""
    lines = results.read_text(encoding="utf-8").splitlines() if results.is_file() else []
    write_text(results, "".join(line + "\n" for line in [*lines, json.dumps(run, ensure_ascii=False)]))


def read_runs(results: Path) -> list[dict]:
    if not results.is_file():
        raise UserError(f"results file not found: {results} (write one with `vqa-search bench recall --append`)")
    runs = []
    for number, line in enumerate(results.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            run = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{results}, line {number}: not JSON ({error.msg})") from None
        if isinstance(run, dict) and is_compositional(run):  # `bench compositional --append`: its own table
            if any(key not in run for key in COMPOSITIONAL_KEYS):
                raise UserError(f"{results}, line {number}: not a `bench compositional` result")
        elif not isinstance(run, dict) or any(key not in run for key in REQUIRED_KEYS):
            raise UserError(f"{results}, line {number}: not a `bench recall` result")
        runs.append(run)
    if not runs:
        raise UserError(f"{results} holds no runs")
    return runs


def _ks(runs: list[dict]) -> list[str]:
    """The R@K columns of the first run, in its order; later runs fill what they have."""
    return [key for key in runs[0]["t2i"] if key.startswith("R@")]


def _gallery(run: dict) -> str:
    return f"{run['split']}: {run['n_images']} images, {run['n_captions']} captions"


def markdown_table(runs: list[dict]) -> str:
    """One row per run, a chance row after the last run on each gallery; recalls in percent."""
    ks = _ks(runs)
    header = (["run", "gallery"] + [f"{DIRECTIONS['t2i']} {k}" for k in ks] + ["t2i MedR"]
              + [f"{DIRECTIONS['i2t']} {k}" for k in ks] + ["i2t MedR"])
    rows = [header, ["---"] * 2 + ["---:"] * (len(header) - 2)]
    galleries = [_gallery(run) for run in runs]
    for position, (run, gallery) in enumerate(zip(runs, galleries)):
        rows.append([run["name"], gallery] + _cells(run["t2i"], ks, True) + _cells(run["i2t"], ks, True))
        if gallery not in galleries[position + 1:]:
            chance = run["chance"]
            rows.append(["*chance*", gallery] + _cells(chance["t2i"], ks, False) + _cells(chance["i2t"], ks, False))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def _cells(summary: dict, ks: list[str], with_rank: bool) -> list[str]:
    cells = [f"{summary[k]:.1f}" if k in summary else "" for k in ks]
    return cells + [f"{summary['median_rank']:g}" if with_rank else ""]


def text_table(run: dict) -> str:
    """A single run as people read it in a terminal."""
    ks = _ks([run])
    lines = [
        f"recall on {run['dataset']} ({_gallery(run)}"
        + (f"; {run['missing_images']} split images not on disk" if run.get("missing_images") else "")
        + (f"; {run['skipped_images']} unreadable" if run.get("skipped_images") else "") + ")",
        f"{run['name']}: {run['index_type']} search, embeddings {run['embeddings']}",
        "",
        f"{'':<12}" + "".join(f"{k:>8}" for k in ks) + f"{'MedR':>8}{'MeanR':>8}",
    ]
    for direction, label in DIRECTIONS.items():
        summary, chance = run[direction], run["chance"][direction]
        lines.append(f"{label:<12}" + "".join(f"{summary[k]:>8.1f}" for k in ks)
                     + f"{summary['median_rank']:>8g}{summary['mean_rank']:>8.1f}")
        lines.append(f"{'  chance':<12}" + "".join(f"{chance[k]:>8.1f}" for k in ks))
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict], out: Path) -> Path:
    """Recall@K for K = 1..50, one line per run, one panel per direction."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, (direction, label) in zip(axes, DIRECTIONS.items()):
        for run in runs:
            curve = run["curves"][direction]
            axis.plot(range(1, len(curve) + 1), curve, label=f"{run['name']} ({_gallery(run)})")
        axis.set(title=label, xlabel="K", xscale="log", ylim=(0, 100))
        axis.set_xticks(CURVE_TICKS, labels=[str(k) for k in CURVE_TICKS])
        axis.minorticks_off()
        axis.grid(True, alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[0].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    with atomic_path(out) as temp:
        figure.savefig(temp, format=out.suffix.lstrip(".") or "png", dpi=120)
    plt.close(figure)
    return out
