"""The web page in a real headless Chromium (Debian's /usr/bin/chromium; Playwright's own browser
download cannot work offline): search, upload, re-rank, explain, ask, keyboard and phone width."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import running_server

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no {CHROMIUM} (apt-get install -y chromium)")]


@pytest.fixture(scope="module")
def page_url(serve_world):
    from vqa_search.serve import create_app
    from vqa_search.serve.run import build_server

    app = create_app(build_server([serve_world], head=serve_world / "head.safetensors"), warm_in_background=False)
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield launched
        launched.close()


def _open(browser, url, **context):
    page = browser.new_context(**context).new_page()
    seen = []
    page.on("request", lambda request: seen.append(request.url))
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=20_000)
    return page, seen, errors


def _search(page, text):
    page.fill("#query", text)
    page.press("#query", "Enter")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith(document.querySelector("
                           "'#k').value + ' results')", timeout=20_000)


def test_search_upload_rerank_explain_and_ask(browser, page_url, serve_world, tmp_path):
    page, seen, errors = _open(browser, page_url, viewport={"width": 1100, "height": 900})

    _search(page, "a red circle")
    cards = page.locator("#results li.card")
    assert cards.count() == 12
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")

    upload = serve_world / "Images" / "shape_000013.png"
    page.set_input_files("#image-file", str(upload))
    page.wait_for_function("document.querySelector('#summary').textContent.includes('shape_000013.png')")
    assert cards.first.get_attribute("data-image-id") == "13"  # itself first

    query = "a red circle to the left of a blue square"
    _search(page, query)
    plain = [cards.nth(i).get_attribute("data-image-id") for i in range(12)]
    page.check("#rerank")
    _search(page, query)
    reranked = [cards.nth(i).get_attribute("data-image-id") for i in range(12)]
    assert reranked != plain  # the re-ranker's random weights reorder the top 12 of the global top 50
    page.uncheck("#rerank")
    page.check("#explain")  # implies re-rank
    assert page.is_checked("#rerank")
    _search(page, query)
    page.locator("#results button.explain").first.click()
    page.wait_for_selector("#explain-view[open]")
    page.wait_for_function("document.querySelectorAll('#explain-boxes rect').length > 0")
    page.locator("#explain-words button").nth(1).click()
    page.screenshot(path=str(tmp_path / "explain.png"))
    if keep := os.environ.get("VQA_SEARCH_SCREENSHOTS"):
        shutil.copy(tmp_path / "explain.png", Path(keep) / "serve-explain.png")
    assert page.locator("#explain-boxes rect.active").count() == 1
    page.keyboard.press("Escape")
    page.wait_for_selector("#explain-view[open]", state="detached")

    page.locator("#results button.ask").first.click()
    page.fill("#question", "what color is the circle?")
    page.press("#question", "Enter")
    page.wait_for_selector("#head-answers li")
    page.wait_for_selector("#evidence li")
    assert page.locator("#head-answers li").count() == 5

    shot = page.screenshot(full_page=True)
    (tmp_path / "page.png").write_bytes(shot)
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=np.float64)
    assert pixels.std() > 10, "the screenshot is blank"
    assert errors == []
    assert all(url.startswith(page_url) for url in seen), [url for url in seen if not url.startswith(page_url)]
    if keep := os.environ.get("VQA_SEARCH_SCREENSHOTS"):  # to look at the page: a folder to copy it to
        shutil.copy(tmp_path / "page.png", Path(keep) / "serve-page.png")


def test_keyboard_and_phone_width(browser, page_url):
    page, _, errors = _open(browser, page_url, viewport={"width": 375, "height": 740}, is_mobile=True,
                            has_touch=True)
    page.focus("#query")
    page.keyboard.type("two squares")
    page.keyboard.press("Enter")
    page.wait_for_selector("#results li.card")
    first = page.locator("#results li.card button.more").first
    first.focus()
    image_id = page.locator("#results li.card").first.get_attribute("data-image-id")
    page.keyboard.press("Enter")  # more like this, from the keyboard
    page.wait_for_function("document.querySelector('#summary').textContent.includes('pictures like') || "
                           "document.querySelector('#summary').textContent.startsWith('Query: shape_')")
    assert page.locator("#results li.card").first.get_attribute("data-image-id") == image_id
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # nothing wider than a phone
    assert errors == []
