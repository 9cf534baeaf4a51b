"""Contact sheets: the grid has the promised size, thumbnails show their photos, bad files show a placeholder."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from conftest import COLOURS, write_photo
from vqa_search.core.errors import UserError
from vqa_search.retrieval import sheet as layout
from vqa_search.retrieval.sheet import SheetItem, SheetLayout, write_contact_sheet

THUMB = 64


def sheet_items(folder: Path, count: int) -> list[SheetItem]:
    """Photos 48 x 40, wider than tall, so the thumbnails get letterbox bars above and below."""
    return [
        SheetItem(write_photo(folder / f"photo_{i}.png", COLOURS[i]), rank=i + 1, score=0.9 - i / 10,
                  label=f"photo number {i} with a caption far too long to fit under a small thumbnail")
        for i in range(count)
    ]


def centre_of_cell(cell: int, columns: int, title_height: int) -> tuple[int, int]:
    row, column = divmod(cell, columns)
    x = layout.MARGIN + column * (THUMB + layout.GAP) + THUMB // 2
    y = layout.MARGIN + title_height + row * (THUMB + layout.CAPTION_HEIGHT + layout.GAP) + THUMB // 2
    return x, y


def test_seven_results_in_five_columns(tmp_path: Path) -> None:
    out = write_contact_sheet(sheet_items(tmp_path / "photos", 7), tmp_path / "sheet.png", title="red things",
                              thumb_size=THUMB, columns=5)
    with Image.open(out) as drawn:
        sheet = drawn.convert("RGB")
    width = 2 * layout.MARGIN + 5 * THUMB + 4 * layout.GAP
    height = 2 * layout.MARGIN + layout.TITLE_HEIGHT + 2 * (THUMB + layout.CAPTION_HEIGHT) + layout.GAP
    assert out == tmp_path / "sheet.png"
    assert sheet.size == (width, height)
    for cell in (0, 6):
        assert sheet.getpixel(centre_of_cell(cell, 5, layout.TITLE_HEIGHT)) == COLOURS[cell]


def test_thumbnail_keeps_aspect_with_light_bars(tmp_path: Path) -> None:
    out = write_contact_sheet(sheet_items(tmp_path, 1), tmp_path / "one.png", thumb_size=THUMB)
    with Image.open(out) as drawn:
        sheet = drawn.convert("RGB")
    x, y = centre_of_cell(0, 1, 0)
    assert sheet.getpixel((x, y - THUMB // 2 + 1)) == layout.THUMB_BACKGROUND  # 48 x 40 leaves bars of ~5 px
    assert sheet.getpixel((x - THUMB // 2 + 1, y)) != layout.THUMB_BACKGROUND  # but none at the sides


def test_rank_and_label_are_drawn_under_the_thumbnail(tmp_path: Path) -> None:
    out = write_contact_sheet(sheet_items(tmp_path, 1), tmp_path / "one.png", thumb_size=THUMB)
    with Image.open(out) as drawn:
        sheet = drawn.convert("L")
    top = layout.MARGIN + THUMB + layout.TEXT_PADDING
    for line in range(2):
        text_band = sheet.crop((layout.MARGIN, top + line * layout.LINE_HEIGHT,
                                layout.MARGIN + THUMB, top + (line + 1) * layout.LINE_HEIGHT))
        assert text_band.getextrema()[0] < 100  # dark text on white


def test_fewer_results_than_columns_make_a_narrower_sheet(tmp_path: Path) -> None:
    assert SheetLayout.for_items(3, THUMB, 5, has_title=False).size == (
        2 * layout.MARGIN + 3 * THUMB + 2 * layout.GAP, 2 * layout.MARGIN + THUMB + layout.CAPTION_HEIGHT)


def test_unreadable_file_gets_a_placeholder(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a photo")
    items = [*sheet_items(tmp_path, 1), SheetItem(broken, rank=2, score=0.1, label="broken")]
    out = write_contact_sheet(items, tmp_path / "sheet.png", thumb_size=THUMB)
    with Image.open(out) as drawn:
        sheet = drawn.convert("RGB")
    x, y = centre_of_cell(1, 2, 0)
    assert sheet.getpixel((x - THUMB // 2 + 2, y - THUMB // 2 + 2)) == layout.PLACEHOLDER
    assert sheet.getpixel(centre_of_cell(0, 2, 0)) == COLOURS[0]


def test_jpeg_output_in_new_folders_leaves_no_temp_files(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "sheet.JPG"
    write_contact_sheet(sheet_items(tmp_path / "photos", 2), out, thumb_size=THUMB)
    with Image.open(out) as drawn:
        assert drawn.format == "JPEG"
    assert [path.name for path in out.parent.iterdir()] == ["sheet.JPG"]


def test_unsupported_suffix_is_a_user_error(tmp_path: Path) -> None:
    out = tmp_path / "sheet.gif"
    with pytest.raises(UserError, match=r"'sheet.gif': use a .png or .jpg file name"):
        write_contact_sheet(sheet_items(tmp_path, 1), out)
    assert not out.exists()


def test_no_results_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no results"):
        write_contact_sheet([], tmp_path / "sheet.png")
