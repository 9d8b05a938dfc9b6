"""The one way the browser tests (the service's page, the HTML report) drive a browser: Debian's headless chromium
through chromedriver and Selenium. A test that cannot have a browser says so loudly, and fails instead of skipping
under CI=true."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-extensions", "--disable-background-networking")


def _no_browser(reason: str) -> None:
    message = f"BROWSER TEST NOT RUN: {reason}; install it with `apt-get install chromium chromium-driver`"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI=true: CI must run the browser test)")
    pytest.skip(message)


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver) found on PATH, with selenium installed; otherwise the test skips (fails on CI)."""
    try:
        import selenium  # noqa: F401  (only whether it is installed)
    except ImportError:
        _no_browser("selenium is not installed (pip install -e '.[dev]')")
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        _no_browser(f"no {'chromium' if not browser else 'chromedriver'} on PATH")
    return browser, driver


@contextmanager
def headless_chromium(window: tuple[int, int], page_load_timeout_s: float,
                      paths: tuple[str, str] | None = None) -> Iterator:
    """A Selenium driver for headless chromium with a `window` (width, height) and a page-load timeout, quit on
    exit. `paths`: what `browser_paths()` found, for a caller that checked before building anything else."""
    browser_path, driver_path = paths or browser_paths()
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser_path
    for arg in (*CHROMIUM_ARGS, f"--window-size={window[0]},{window[1]}"):
        opts.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    except WebDriverException as exc:
        _no_browser(f"chromium would not start ({exc.msg})")
    try:
        driver.set_page_load_timeout(page_load_timeout_s)
        yield driver
    finally:
        driver.quit()
