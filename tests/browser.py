"""Headless Chromium for page tests: Debian's ``chromium`` driven through its own
``chromium-driver`` with Selenium.

Why Selenium and not Playwright: Debian builds chromium and chromium-driver from one
source, so the driver always speaks the browser's version, and nothing is downloaded at
run time (Playwright wants its own browser build, or a Node driver that may lag behind
Debian's Chromium).  Selenium's calls block, and the proxy under test usually runs in the
test's own event loop, so every call goes through :meth:`Browser.call` (a worker thread).

Each browser gets a fresh profile (empty localStorage), so tests cannot see each other's
resume entries.  On failure the ``browser`` fixture (tests/conftest.py) saves a screenshot,
the page's HTML and the console log into a temporary directory and prints its path.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
DESKTOP = (1280, 900)
PHONE = (390, 844)

T = TypeVar("T")


def missing() -> str | None:
    """Why a browser cannot start here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is not installed (make test-deps installs chromium, chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


class Browser:
    """One Chromium with a fresh profile.  Blocking methods are plain; async ones poll."""

    def __init__(self, *, size: tuple[int, int] = DESKTOP) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.add_argument(f"--window-size={size[0]},{size[1]}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # The page asks before leaving while uploads run; reload tests accept that prompt.
        options.unhandled_prompt_behavior = "accept"
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.driver.set_script_timeout(30)
        self.console: list[dict[str, Any]] = []

    def stop(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    # -- async wrappers (the proxy shares the test's event loop) ---------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def get(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def js(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body: use ``return``) in the page."""
        return await self.call(self.driver.execute_script, script, *args)

    async def wait_for(
        self, script: str, *args: Any, timeout_s: float, what: str, interval_s: float = 0.1
    ) -> Any:
        """Poll ``script`` until it returns something truthy; return that.  Timeouts are
        generous bounds for a loaded 2-core machine, not measurements."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.js(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            await asyncio.sleep(interval_s)

    async def choose_files(self, selector: str, paths: Iterable[Path]) -> None:
        """Give a file input files, as a person choosing them in the picker would."""
        from selenium.webdriver.common.by import By

        def send() -> None:
            field = self.driver.find_element(By.CSS_SELECTOR, selector)
            field.send_keys("\n".join(str(p) for p in paths))

        await self.call(send)

    async def network(self, *, offline: bool = False, upload_bytes_s: int | None = None) -> None:
        """Emulate a network: offline, or an uplink of ``upload_bytes_s`` (DevTools
        throttling; None lifts it)."""
        throughput = -1 if upload_bytes_s is None else upload_bytes_s
        await self.call(
            lambda: self.driver.execute_cdp_cmd(
                "Network.emulateNetworkConditions",
                {
                    "offline": offline,
                    "latency": 0,
                    "downloadThroughput": -1,
                    "uploadThroughput": throughput,
                },
            )
        )

    async def size(self, size: tuple[int, int]) -> None:
        await self.call(self.driver.set_window_size, *size)

    async def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        await self.call(self.driver.save_screenshot, str(path))
        return path

    # -- diagnostics ------------------------------------------------------------------------

    def console_log(self) -> list[dict[str, Any]]:
        """Browser console entries since the start (Chromium hands each out once)."""
        self.console += self.driver.get_log("browser")
        return self.console

    def csp_violations(self) -> list[str]:
        return [
            e["message"] for e in self.console_log() if "Content Security Policy" in e["message"]
        ]

    def dump(self, name: str) -> Path:
        """Screenshot, HTML and console log of the page, in a fresh directory."""
        out = Path(tempfile.mkdtemp(prefix=f"browser-{name[:60]}-"))
        try:
            self.driver.save_screenshot(str(out / "page.png"))
            (out / "page.html").write_text(self.driver.page_source)
            (out / "console.json").write_text(json.dumps(self.console_log(), indent=1))
        except Exception as e:  # the browser may be what broke
            (out / "error.txt").write_text(repr(e))
        return out


def start_browser(size: tuple[int, int] = DESKTOP) -> Browser:
    why = missing()
    if why:
        pytest.skip(why)
    return Browser(size=size)
