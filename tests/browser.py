"""Headless Chromium (Debian's chromium and chromium-driver) driven through Selenium: the one browser driver
of the tests that look at a web page (OHIF Viewer, the node's dashboard).

One browser, one window, a fresh profile in a temp folder; nothing reaches beyond what the page is pointed at
(no background networking, sync, component updates or QUIC). The page's console messages and uncaught
exceptions are collected, so a test can say what the page complained about.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.peers import wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# headless Chromium as root on a machine with no network but loopback
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--no-default-browser-check",
    "--mute-audio",
    # WebGL on the CPU: OHIF renders with it (SwiftShader, part of Debian's chromium)
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
)


class Browser:
    """``driver`` is the Selenium WebDriver, for tests that find elements themselves; the helpers below serve
    tests that script a page by JavaScript expressions (OHIF's DOM has few stable ids)."""

    def __init__(self, width: int = 1600, height: int = 1000) -> None:
        self.width, self.height = width, height
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
        self.driver: Any = None
        self._console: list[str] = []

    def start(self) -> Browser:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}"):
            opts.add_argument(flag)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        return self

    @property
    def console(self) -> list[str]:
        """ "level: text" of every console message and uncaught exception so far."""
        if self.driver is not None:
            self._console += [f"{e['level'].lower()}: {e['message'][:2000]}" for e in self.driver.get_log("browser")]
        return self._console

    def goto(self, url: str) -> None:
        self.driver.get(url)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        return self.driver.execute_script(f"return ({expression});")

    def wait_js(self, expression: str, timeout: float, what: str) -> Any:
        return wait_for(lambda: self.evaluate(expression), timeout, what, interval=0.5)

    def click(self, element_js: str, *, double: bool = False) -> bool:
        """Click, as a mouse does, the element that ``element_js`` evaluates to; False if there is none."""
        from selenium.webdriver.common.action_chains import ActionChains

        element = self.evaluate(element_js)
        if element is None:
            return False
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        actions = ActionChains(self.driver).move_to_element(element)
        (actions.double_click() if double else actions.click()).perform()
        return True

    def text(self) -> str:
        return str(self.evaluate("document.body ? document.body.innerText : ''"))

    def screenshot(self, path: Path, *, full_page: bool = False) -> Path:
        """A PNG of the window; ``full_page``: the window first grown to the page's height (at most 4000 px)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if full_page:
            height = int(self.evaluate("document.documentElement.scrollHeight"))
            self.driver.set_window_size(self.width, max(self.height, min(height + 40, 4000)))
        self.driver.save_screenshot(str(path))
        return path

    def settle(self, seconds: float) -> None:
        """Let the page work for a while, collecting its console messages."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            _ = self.console
            time.sleep(0.2)

    def stop(self) -> None:
        if self.driver is not None:
            try:
                self.driver.quit()
            finally:
                self.driver = None
        shutil.rmtree(self.profile, ignore_errors=True)
