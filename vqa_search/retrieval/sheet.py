"""A contact sheet of search results: thumbnails with rank, score and caption, for people who would rather look."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from vqa_search.core.atomic import atomic_path
from vqa_search.core.errors import UserError
from vqa_search.core.images import ImageSkipped, load_rgb

MARGIN = 16  # around the whole sheet
GAP = 12  # between cells
TITLE_HEIGHT = 28  # only when there is a title
LINE_HEIGHT = 14  # PIL's default font is about 11 pixels tall
TEXT_PADDING = 4  # between a thumbnail and its text
CAPTION_HEIGHT = TEXT_PADDING + 2 * LINE_HEIGHT  # "#rank  score" and the label

SHEET_BACKGROUND = (255, 255, 255)
THUMB_BACKGROUND = (236, 236, 236)  # the letterbox bars, light so photos stand out
PLACEHOLDER = (150, 150, 150)
TEXT_COLOUR = (30, 30, 30)
ELLIPSIS = "..."  # the bitmap fallback font has no "…"

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
SAVE_OPTIONS = {"JPEG": {"quality": 90}}

BOX_COLOUR = (255, 64, 0)
LABEL_BACKGROUND = (255, 255, 255)  # behind a box's word, so it reads on any photo
LABEL_PADDING = 1
LABEL_X_STEP = 8  # horizontal spacing of the places a label may move to when its own spot is taken
LABEL_GAP = 4  # between labels side by side, so two words never read as one

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont  # load_default() gives either, depending on FreeType


@dataclass(frozen=True)
class SheetItem:
    path: Path  # absolute image path
    rank: int
    score: float
    label: str = ""  # e.g. the first caption, drawn truncated under the thumbnail
    boxes: tuple[tuple[str, tuple[float, float, float, float]], ...] = ()  # (word, box in image pixels)


@dataclass(frozen=True)
class SheetLayout:
    """Where everything goes; shared by the drawing and by anyone checking the size."""

    thumb_size: int
    columns: int
    rows: int
    title_height: int

    @classmethod
    def for_items(cls, count: int, thumb_size: int, columns: int, has_title: bool) -> SheetLayout:
        """A sheet with 3 results is 3 cells wide, not `columns`."""
        used_columns = min(columns, count)
        rows = -(-count // used_columns)
        return cls(thumb_size, used_columns, rows, TITLE_HEIGHT if has_title else 0)

    @property
    def cell_height(self) -> int:
        return self.thumb_size + CAPTION_HEIGHT

    @property
    def size(self) -> tuple[int, int]:
        width = 2 * MARGIN + self.columns * self.thumb_size + (self.columns - 1) * GAP
        height = 2 * MARGIN + self.title_height + self.rows * self.cell_height + (self.rows - 1) * GAP
        return width, height

    def cell_origin(self, index: int) -> tuple[int, int]:
        """Top-left corner of the thumbnail of the index-th item, filled row by row."""
        row, column = divmod(index, self.columns)
        x = MARGIN + column * (self.thumb_size + GAP)
        y = MARGIN + self.title_height + row * (self.cell_height + GAP)
        return x, y


def write_contact_sheet(
    items: Sequence[SheetItem], out: Path, title: str = "", thumb_size: int = 224, columns: int = 5
) -> Path:
    """Draw the results as a grid of thumbnails and write it atomically as PNG or JPEG (from out's suffix)."""
    out = Path(out)
    image_format = _format_for(out)
    if not items:
        raise UserError("no results to draw on a contact sheet")
    if thumb_size < 1 or columns < 1:
        raise UserError(f"contact sheet needs a positive thumb size and column count, got {thumb_size} and {columns}")
    layout = SheetLayout.for_items(len(items), thumb_size, columns, bool(title))
    sheet = _draw_sheet(items, layout, title)
    with atomic_path(out) as temp:
        sheet.save(temp, format=image_format, **SAVE_OPTIONS.get(image_format, {}))
    return out


def _format_for(out: Path) -> str:
    image_format = FORMATS.get(out.suffix.lower())
    if image_format is None:
        raise UserError(f"cannot write a contact sheet as {out.name!r}: use a .png or .jpg file name")
    return image_format


def _draw_sheet(items: Sequence[SheetItem], layout: SheetLayout, title: str) -> Image.Image:
    sheet = Image.new("RGB", layout.size, SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    if title:
        draw.text((MARGIN, MARGIN), _fit(title, layout.size[0] - 2 * MARGIN, font), fill=TEXT_COLOUR, font=font)
    for index, item in enumerate(items):
        x, y = layout.cell_origin(index)
        sheet.paste(_thumbnail(item.path, layout.thumb_size, font, item.boxes), (x, y))
        _draw_caption(draw, item, (x, y + layout.thumb_size + TEXT_PADDING), layout.thumb_size, font)
    return sheet


def _thumbnail(path: Path, size: int, font: Font, boxes: Sequence = ()) -> Image.Image:
    """The photo scaled to fit, aspect kept, centred on light bars; a grey tile when it cannot be read.

    Labelled boxes (the re-ranker's attended regions) are drawn in the scaled picture's coordinates.
    """
    try:
        original = load_rgb(path).image
    except ImageSkipped as skipped:
        return _placeholder(size, str(skipped), font)
    picture = ImageOps.contain(original, (size, size))
    scale = picture.width / original.width
    tile = Image.new("RGB", (size, size), THUMB_BACKGROUND)
    left, top = (size - picture.width) // 2, (size - picture.height) // 2
    tile.paste(picture, (left, top))
    if boxes:
        scaled = [(word, (x1 * scale + left, y1 * scale + top, x2 * scale + left, y2 * scale + top))
                  for word, (x1, y1, x2, y2) in boxes]
        draw = ImageDraw.Draw(tile)
        for _, box in scaled:
            draw.rectangle(box, outline=BOX_COLOUR, width=2)
        for word, (x1, y1, x2, y2) in place_labels(scaled, font, (size, size)):
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=LABEL_BACKGROUND)  # PIL includes the far edges
            draw.text((x1 + LABEL_PADDING, y1 + LABEL_PADDING), word, fill=BOX_COLOUR, font=font)
    return tile


Rect = tuple[int, int, int, int]  # x1, y1, x2, y2; x2 and y2 exclusive


def place_labels(boxes: Sequence[tuple[str, tuple[float, float, float, float]]], font: Font,
                 area: tuple[int, int]) -> list[tuple[str, Rect]]:
    """Where each box's word goes: no two labels overlap, and each lies inside `area` (width, height).

    A label's own spot is just inside its box's top-left corner. Words of one box (or of boxes that
    share a corner) are stacked below it in order, or above when the picture ends; failing that the
    nearest free spot in the picture is taken. A word with no free spot left is not drawn (its box is).
    """
    width, height = area
    h = _label_text_size("Agjpqy|", font)[1] + 2 * LABEL_PADDING  # one height for all: stacks line up
    placed: list[tuple[str, Rect]] = []
    for word, (x1, y1, _, _) in boxes:
        w = _label_text_size(word, font)[0] + 2 * LABEL_PADDING
        if w > width or h > height:
            continue
        home_x = min(max(0, round(x1) + 2), width - w)
        home_y = min(max(0, round(y1) + 1), height - h)
        rows = range(home_y % h, height - h + 1, h)  # whole lines above and below the home spot
        columns = {home_x, *range(home_x % LABEL_X_STEP, width - w + 1, LABEL_X_STEP)}
        spots = sorted(((x, y) for x in columns for y in rows),
                       key=lambda spot: (_distance(spot, (home_x, home_y), h), spot[1], spot[0]))
        for x, y in spots:
            rect = (x, y, x + w, y + h)
            if not any(_overlap(rect, other, LABEL_GAP) for _, other in placed):
                placed.append((word, rect))
                break
    return placed


def _label_text_size(word: str, font: Font) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(word)
    return max(1, round(right)), max(1, round(bottom))  # drawn from (0, 0): the offsets are part of the size


def _distance(spot: tuple[int, int], home: tuple[int, int], line: int) -> int:
    """How far a label strays from its spot: sideways counts four times, and going up costs three
    lines more than going down, so one box's words read top to bottom under its corner."""
    dx, dy = spot[0] - home[0], spot[1] - home[1]
    return 4 * abs(dx) + (dy if dy >= 0 else 3 * line - dy)


def _overlap(a: Rect, b: Rect, gap: int = 0) -> bool:
    """Whether two rectangles share a pixel, or come closer than `gap` side by side."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] and b[1] < a[3]


def _placeholder(size: int, reason: str, font: Font) -> Image.Image:
    tile = Image.new("RGB", (size, size), PLACEHOLDER)
    draw = ImageDraw.Draw(tile)
    middle = size // 2
    for line, y in (("unreadable", middle - LINE_HEIGHT), (_fit(reason, size - 2 * TEXT_PADDING, font), middle)):
        draw.text(((size - font.getlength(line)) / 2, y), line, fill=TEXT_COLOUR, font=font)
    return tile


def _draw_caption(draw: ImageDraw.ImageDraw, item: SheetItem, origin: tuple[int, int], width: int,
                  font: Font) -> None:
    x, y = origin
    draw.text((x, y), _fit(f"#{item.rank}  score {item.score:.3f}", width, font), fill=TEXT_COLOUR, font=font)
    draw.text((x, y + LINE_HEIGHT), _fit(item.label, width, font), fill=TEXT_COLOUR, font=font)


def _fit(text: str, width: float, font: Font) -> str:
    """One line no wider than `width` pixels, cut with an ellipsis; newlines in captions become spaces."""
    text = " ".join(text.split())
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + ELLIPSIS) > width:
        text = text[:-1]
    return text.rstrip() + ELLIPSIS
