"""The web chat at / in a real headless Chromium (Debian's `chromium`, driven by Playwright
pointed at that executable): upload an image, ask, watch the answer stream, ask a
follow-up, regenerate, clear; a screenshot is kept in test-artifacts/web_chat.png."""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from vistune.serve.app import ThreadedServer, create_app
from vistune.serve.engine import Engine
from vistune.serve.settings import ServeConfig

ARTIFACTS = Path(
    os.environ.get("VISTUNE_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser_path() -> str:
    path = os.environ.get("VISTUNE_CHROMIUM") or next(
        filter(None, map(shutil.which, BROWSERS)), None
    )
    if path is None:
        pytest.skip(
            "no Chromium for the browser test: install Debian's `chromium` package (apt-get install chromium)"
        )
    return path


@pytest.fixture(scope="module")
def page_url(tiny_model):
    engine = Engine(copy.deepcopy(tiny_model), dtype=torch.float32)
    decoder = engine.generator.fast_decoder()
    step = decoder.step

    def slow(*args, **kwargs):  # 25 ms a token: slow enough to see the answer grow
        time.sleep(0.025)
        return step(*args, **kwargs)

    decoder.step = slow
    with ThreadedServer(create_app(engine, ServeConfig(), "tiny")) as live:
        yield live.url, engine


def wait_done(page, count: int) -> list[int]:
    """Wait until `count` answers are complete; the lengths the last one had on the way."""
    seen, deadline = [], time.monotonic() + 60
    last = page.locator(".msg.assistant").nth(count - 1)
    while time.monotonic() < deadline:
        if page.locator(".msg.assistant").count() >= count:
            seen.append(len(last.text_content() or ""))
            if last.get_attribute("data-done") == "1":
                return seen
        if page.locator(".msg.error").count():
            pytest.fail(page.locator(".msg.error").last.text_content())
        time.sleep(0.01)
    pytest.fail("the answer did not finish")


def test_web_chat_in_headless_chromium(page_url, tmp_path):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright: pip install -e '.[dev]'"
    )
    executable = browser_path()
    url, engine = page_url
    image = tmp_path / "photo.png"
    g = torch.Generator().manual_seed(0)
    Image.fromarray(
        torch.randint(0, 256, (30, 40, 3), generator=g, dtype=torch.uint8).numpy()
    ).save(image)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#model:has-text('tiny')")
            page.set_input_files("#image-input", str(image))
            page.wait_for_selector("#preview", state="visible")
            page.fill("#max-tokens", "30")
            page.fill("#prompt", "What is in the image?")
            page.click("#send")
            lengths = wait_done(page, 1)
            growing = sorted({n for n in lengths if n > 0})
            assert len(growing) >= 3, f"the answer did not stream: lengths seen {lengths}"
            cached = engine.scheduler.stats["cached_tokens"]
            page.fill("#prompt", "And what colour is it?")
            page.click("#send")
            wait_done(page, 2)
            assert engine.scheduler.stats["cached_tokens"] > cached  # the follow-up reused turn 1
            assert page.locator(".msg.user").count() == 2
            page.screenshot(path=str(ARTIFACTS / "web_chat.png"), full_page=True)
            first = page.locator(".msg.assistant").nth(1).text_content()
            page.click("#regenerate")
            wait_done(page, 2)
            assert page.locator(".msg.assistant").count() == 2
            assert page.locator(".msg.assistant").nth(1).text_content() == first  # greedy
            page.click("#clear")
            assert page.locator(".msg").count() == 0
        finally:
            browser.close()
    assert (ARTIFACTS / "web_chat.png").stat().st_size > 1000
