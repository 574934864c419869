"""The web page end to end in headless Chromium (Debian's `chromium`, driven by Playwright's
Python package): upload an image, ask, watch the answer stream in, ask again (the server reuses
the conversation's cached prefix), click a word, see the heat map; a screenshot is kept."""

import os
import shutil
import struct

import pytest

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (scripts/setup.sh)")
pytest.importorskip("fastapi")

from test_serve_engine import image  # noqa: E402

from llava_core.checkpoints.loader import load_pretrained  # noqa: E402
from llava_core.model.processor import LlavaProcessor  # noqa: E402
from llava_core.runtime.batching import BatchEngine  # noqa: E402
from llava_core.serve.app import create_app  # noqa: E402
from llava_core.serve.server import ServerThread  # noqa: E402

CHROMIUM = os.environ.get("LLAVA_CORE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set LLAVA_CORE_CHROMIUM)")
    model, processor = load_pretrained(tiny_ckpt), LlavaProcessor.from_pretrained(tiny_ckpt)
    engine = BatchEngine(model, processor.tokenizer, max_batch=2, max_len=2048).start()
    srv = ServerThread(create_app(engine, processor, model_name="tiny")).start()
    yield srv.url, engine
    srv.stop()
    engine.stop()


def test_chat_about_an_image_and_see_its_heat_map(server, tmp_path):
    url, engine = server
    picture = tmp_path / "shapes.png"
    image(1, (320, 240)).save(picture)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
            page.set_input_files("#file", str(picture))
            page.wait_for_function("document.getElementById('view').width === 480")
            page.fill("#question", "What is in the image?")
            page.click("#send")
            page.wait_for_selector(".answer[data-state=done]", timeout=60_000)
            first = page.locator(".answer").first
            assert int(first.get_attribute("data-chunks")) >= 2  # it arrived in pieces
            page.wait_for_selector(".answer .word", timeout=60_000)
            assert int(first.get_attribute("data-words")) >= 1

            page.fill("#question", "And the colours?")  # a second turn about the same image
            page.press("#question", "Enter")
            page.wait_for_function("document.querySelectorAll('.answer[data-state=done]').length === 2",
                                   timeout=60_000)
            reused = int(page.locator("#status").get_attribute("data-reused"))
            assert reused > engine.model.cfg.num_image_tokens  # the first turn's prompt, image and all

            before = page.evaluate("document.getElementById('view').toDataURL()")
            word = first.locator(".word").first
            word.click()
            page.wait_for_function("document.getElementById('view').dataset.heat !== undefined")
            assert page.evaluate("document.getElementById('view').dataset.heat") == word.inner_text()
            assert page.evaluate("document.getElementById('view').toDataURL()") != before  # the map is drawn
            assert "looked" in page.inner_text("#heat-label")
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert struct.unpack(">II", data[16:24]) == (1200, 800)
