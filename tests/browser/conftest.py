"""A real browser on the console: Debian's chromium driven by Playwright, against a dev-style run in this loop.

The dev run (`listenerd.dev.DevStack`: simulators, daemon, demo publishers) lives in the test's event
loop, so a test can drop a simulator's sockets or make the engine refuse a batch while the browser
watches. Playwright drives /usr/bin/chromium (`executable_path`); it never downloads a browser.
Set CONSOLE_SCREENSHOTS=<dir> to keep the screenshots the tests take (the README's come from there).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from listenerd.dev import DEV_TOKEN, DevStack

CHROMIUM = os.environ.get("LISTENERD_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture
async def dev_stack(tmp_path):
    async with DevStack("127.0.0.1:0", tmp_path, rate=5.0, stream=open(os.devnull, "w")) as stack:  # noqa: SIM115, ASYNC230
        yield stack


@pytest.fixture
async def page():
    """A fresh headless Chromium page (1280x800), closed with its browser at teardown."""
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have {CHROMIUM} (.ci/run installs Debian's chromium)")
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                   args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 800})
            page = await context.new_page()
            page.set_default_timeout(20_000)
            yield page
        finally:
            await browser.close()


async def sign_in(page, stack: DevStack, token: str = DEV_TOKEN) -> None:
    await page.goto(f"{stack.daemon.api_url}/console/")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()


def screenshot_path(tmp_path: Path, name: str) -> Path:
    directory = os.environ.get("CONSOLE_SCREENSHOTS")
    return Path(directory) / name if directory else tmp_path / name
