"""Finding Debian's chromium and chromedriver for the browser tests (the service's page, the HTML report): a test
that cannot have a browser says so loudly, and fails instead of skipping under CI=true."""

from __future__ import annotations

import os
import shutil

import pytest


def _no_browser(reason: str) -> None:
    message = f"BROWSER TEST NOT RUN: {reason}; install it with `apt-get install chromium chromium-driver`"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI=true: CI must run the browser test)")
    pytest.skip(message)


def _browser_paths() -> tuple[str, str]:
    try:
        import selenium  # noqa: F401  (only whether it is installed)
    except ImportError:
        _no_browser("selenium is not installed (pip install -e '.[dev]')")
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        _no_browser(f"no {'chromium' if not browser else 'chromedriver'} on PATH")
    return browser, driver
