"""Show search results to people: a plain-text table, or a contact sheet of thumbnails."""

from __future__ import annotations

import shutil
from pathlib import Path

from vqa_search.retrieval.searcher import Hit, Index, SearchResult
from vqa_search.retrieval.sheet import SheetItem, write_contact_sheet

MIN_TEXT_WIDTH = 20


def results_table(result: SearchResult, width: int | None = None) -> str:
    """rank, score, image path and caption, cut to the terminal width."""
    if not result.results:
        return "no results"
    width = width or shutil.get_terminal_size((120, 24)).columns
    path_width = max(len("image"), *(len(hit.image) for hit in result.results))
    text_width = max(MIN_TEXT_WIDTH, width - path_width - 17)
    text_header = "caption" if result.target == "captions" else "first caption"
    lines = [f"{'rank':>4}  {'score':>6}  {'image':<{path_width}}  {text_header}"]
    for hit in result.results:
        lines.append(f"{hit.rank:>4}  {hit.score:>6.3f}  {hit.image:<{path_width}}  {_cut(hit.caption or '', text_width)}")
        if hit.explanation:
            attended = "  ".join(f"{item['word']}→#{item['region']} ({item['weight']:.2f})" for item in hit.explanation)
            lines.append(f"{'':>14}{_cut(attended, width - 14)}")
    return "\n".join(lines)


def write_result_sheet(index: Index, result: SearchResult, out: Path) -> Path:
    items = [
        SheetItem(path=index.image_file(hit.image_id), rank=hit.rank, score=hit.score, label=hit.caption or hit.image,
                  boxes=_attended_boxes(hit) if result.target == "images" else ())
        for hit in result.results
    ]
    return write_contact_sheet(items, out, title=f"{result.query}  ->  {result.target}")


def _attended_boxes(hit: Hit) -> tuple:
    """With --explain, the hit image's regions that query words attended to most, labelled with those words."""
    words_of: dict[tuple, list[str]] = {}
    for item in hit.explanation or ():
        words_of.setdefault(tuple(item["box"]), []).append(item["word"])
    return tuple((" ".join(words), box) for box, words in words_of.items())


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
