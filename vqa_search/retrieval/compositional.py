"""`bench compositional`: does a model tell a caption from the same words in another order?

Two public formats are read:

- SugarCrepe (Hsieh et al. 2023): a folder of files such as `swap_att.json`, each
  `{"id": {"filename", "caption", "negative_caption"}}`, one category per file. An item is correct
  when the image scores the true caption strictly above the hard negative; chance is 50 %.
- Winoground (Thrush et al. 2022): JSON lines (its own release) or a JSON list of
  `{"id", "caption_0", "caption_1", "image_0", "image_1"}`, image names with or without extension.
  With s(c, i) the score of caption c and image i: text score = s(c0,i0) > s(c1,i0) and
  s(c1,i1) > s(c0,i1); image score = s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0); group = both.
  Chance: 25 %, 25 %, 16.7 %.

This module reads the files, scores given pair scores and formats results; it needs no model
(`align/compositional.py` computes the scores, with the global CLIP and with the re-ranker). Ties
count as failures, as in both benchmarks' own evaluation code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vqa_search.core.errors import UserError

SUGARCREPE, WINOGROUND = "sugarcrepe", "winoground"
KIND = "compositional"  # the `kind` of a results-file line written by `bench compositional --append`
SUGARCREPE_CHANCE = 50.0
WINOGROUND_CHANCE = {"text": 25.0, "image": 25.0, "group": 100 / 6}
IMAGE_SUFFIXES = ("", ".png", ".jpg", ".jpeg")
REQUIRED_KEYS = ("kind", "benchmark", "name", "data", "scores", "counts", "chance")


@dataclass
class CompositionalData:
    """A benchmark as pairs to score: texts and images by position, items referring to them."""

    benchmark: str
    source: Path
    images_dir: Path
    texts: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    # SugarCrepe: (category, text of caption, text of negative, image); Winoground: (c0, c1, i0, i1)
    items: list[tuple] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)  # SugarCrepe, in file order

    def pairs(self) -> np.ndarray:
        """(P, 2) text and image positions of every score the benchmark needs, item by item."""
        if self.benchmark == SUGARCREPE:
            rows = [(text, image) for _, caption, negative, image in self.items
                    for text in (caption, negative)]
        else:
            rows = [(caption, image) for c0, c1, i0, i1 in self.items for caption in (c0, c1) for image in (i0, i1)]
        return np.asarray(rows, dtype=np.int64).reshape(-1, 2)

    def evaluate(self, pair_scores: np.ndarray) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
        """Scores (percent), counts and chance per category, from the scores of `pairs()` in order."""
        pair_scores = np.asarray(pair_scores, dtype=np.float64)
        if self.benchmark == SUGARCREPE:
            correct = sugarcrepe_correct(pair_scores.reshape(-1, 2))
            categories = np.array([item[0] for item in self.items])
            scores, counts = {}, {}
            for category in self.categories:
                mine = correct[categories == category]
                scores[category], counts[category] = 100 * float(mine.mean()), int(len(mine))
            return scores, counts, {category: SUGARCREPE_CHANCE for category in self.categories}
        scores = winoground_scores(pair_scores.reshape(-1, 2, 2))
        return scores, {label: len(self.items) for label in scores}, dict(WINOGROUND_CHANCE)


def sugarcrepe_correct(scores: np.ndarray) -> np.ndarray:
    """scores (n, 2): the true caption's and the negative's score with the image; True where the true one wins."""
    return scores[:, 0] > scores[:, 1]


def winoground_outcomes(scores: np.ndarray) -> dict[str, np.ndarray]:
    """scores (n, 2, 2) as s[item, caption, image]: per item, whether the text, image and group scores hold."""
    text = (scores[:, 0, 0] > scores[:, 1, 0]) & (scores[:, 1, 1] > scores[:, 0, 1])
    image = (scores[:, 0, 0] > scores[:, 0, 1]) & (scores[:, 1, 1] > scores[:, 1, 0])
    return {"text": text, "image": image, "group": text & image}


def winoground_scores(scores: np.ndarray) -> dict[str, float]:
    return {label: 100 * float(held.mean()) for label, held in winoground_outcomes(scores).items()}


# ---------------------------------------------------------------- reading


def read_compositional(path: Path | str, images: Path | str | None = None) -> CompositionalData:
    """A folder of SugarCrepe files, one SugarCrepe file, or a Winoground file (.jsonl, or .json holding a list).

    Image names are relative to `images`; by default to the folder holding the SugarCrepe folder,
    or to the Winoground file's folder (where `make-shapes` writes them).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"not found: {path} (give a folder of SugarCrepe files or a Winoground .jsonl/.json file)")
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise UserError(f"{path} holds no SugarCrepe files (*.json such as swap_att.json)")
        default_images = path.parent
        documents = [(file, _load_json(file)) for file in files]
    elif path.suffix.lower() == ".jsonl":
        return _winoground(path, _load_json_lines(path), Path(images) if images else path.parent)
    else:
        document = _load_json(path)
        if isinstance(document, list):
            return _winoground(path, document, Path(images) if images else path.parent)
        default_images = path.parent
        documents = [(path, document)]
    images_dir = Path(images) if images else default_images
    data = CompositionalData(SUGARCREPE, path, images_dir)
    texts, image_ids = _Interner(data.texts), _Interner(data.images)
    for file, document in documents:
        if not isinstance(document, dict):
            raise UserError(f"{file}: not a SugarCrepe file (a JSON object of id -> filename, caption, "
                            "negative_caption)")
        category = file.stem
        if not document:
            continue
        data.categories.append(category)
        for key, item in document.items():
            caption, negative, filename = _fields(file, key, item, ("caption", "negative_caption", "filename"))
            data.items.append((category, texts(caption), texts(negative),
                               image_ids(resolve_image(images_dir, filename, file))))
    if not data.items:
        raise UserError(f"{path} holds no SugarCrepe items")
    return data


def _winoground(path: Path, records: list, images_dir: Path) -> CompositionalData:
    data = CompositionalData(WINOGROUND, path, images_dir)
    texts, image_ids = _Interner(data.texts), _Interner(data.images)
    for number, record in enumerate(records):
        key = record.get("id", number) if isinstance(record, dict) else number
        c0, c1, i0, i1 = _fields(path, key, record, ("caption_0", "caption_1", "image_0", "image_1"))
        data.items.append((texts(c0), texts(c1), image_ids(resolve_image(images_dir, i0, path)),
                           image_ids(resolve_image(images_dir, i1, path))))
    if not data.items:
        raise UserError(f"{path} holds no Winoground pairs")
    return data


class _Interner:
    """Position of a value in `values`, appending new ones: each text and image is embedded once."""

    def __init__(self, values: list):
        self.values, self.position = values, {}

    def __call__(self, value) -> int:
        if value not in self.position:
            self.position[value] = len(self.values)
            self.values.append(value)
        return self.position[value]


def _fields(file: Path, key, item, names: tuple[str, ...]) -> list[str]:
    if not isinstance(item, dict):
        raise UserError(f"{file}, item {key}: not a JSON object")
    values = []
    for name in names:
        value = item.get(name)
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{file}, item {key}: no {name!r} text")
        values.append(value.strip() if not name.startswith(("image", "filename")) else value)
    return values


def resolve_image(images_dir: Path, name: str, file: Path) -> Path:
    """The file `name` names under `images_dir`: as given, else with .png / .jpg (Winoground leaves them out)."""
    for suffix in IMAGE_SUFFIXES:
        candidate = images_dir / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    raise UserError(f"{file}: image {name!r} not found in {images_dir} (pass --images FOLDER)")


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not JSON ({error.msg}, line {error.lineno})") from None
    except (UnicodeDecodeError, IsADirectoryError) as error:
        raise UserError(f"{path}: cannot be read as JSON ({error})") from None


def _load_json_lines(path: Path) -> list:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise UserError(f"{path}, line {number}: not JSON ({error.msg})") from None
    return records


# ---------------------------------------------------------------- results


def is_compositional(run: dict) -> bool:
    return run.get("kind") == KIND


def text_table(run: dict) -> str:
    """One run as people read it in a terminal: every category with its chance level."""
    lines = [f"{run['benchmark']} on {run['data']}: {run['name']}", "",
             f"{'':<16}{'score %':>9}{'chance %':>10}{'n':>7}"]
    for label, score in run["scores"].items():
        lines.append(f"{label:<16}{score:>9.1f}{run['chance'][label]:>10.1f}{run['counts'][label]:>7}")
    return "\n".join(lines) + "\n"


def markdown_table(runs: list[dict]) -> str:
    """One table per benchmark, one row per run and a chance row after the last run on each data set."""
    tables = []
    for benchmark in dict.fromkeys(run["benchmark"] for run in runs):
        mine = [run for run in runs if run["benchmark"] == benchmark]
        labels = list(dict.fromkeys(label for run in mine for label in run["scores"]))
        header = [f"{benchmark} run", "data"] + labels
        rows = [header, ["---"] * 2 + ["---:"] * len(labels)]
        sources = [run["data"] for run in mine]
        for position, run in enumerate(mine):
            rows.append([run["name"], run["data"]] + _cells(run["scores"], labels))
            if run["data"] not in sources[position + 1:]:
                rows.append(["*chance*", run["data"]] + _cells(run["chance"], labels))
        tables.append("\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n")
    return "\n".join(tables)


def _cells(values: dict, labels: list[str]) -> list[str]:
    return [f"{values[label]:.1f}" if label in values else "" for label in labels]
