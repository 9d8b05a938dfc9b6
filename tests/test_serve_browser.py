"""End to end in a real browser: `headstart serve` on a loopback port in a subprocess, its page driven in headless
Chromium (Debian's `chromium` and `chromium-driver`, through Selenium, started by tests/helpers_browser.py), a real
photo uploaded, the label shown checked, screenshots saved.

The tiny test model labels the photo with one of its own classes; the test checks that the page shows what the
API answers for that photo. HEADSTART_SERVE_MODEL=<a model directory with model.onnx trained on hymenoptera>
checks the real label instead (e.g. `bees`). Without a browser the test skips, saying why, except under CI=true,
where it fails: CI must have one (`make test` installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_cli import cli_env
from helpers_serve import tiny_model
from helpers_browser import browser_paths as find_browser, headless_chromium

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera" / "val"
RECORD_COPY = Path("/tmp/serve-page.png")
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    """Checked before the service starts: without a browser nothing else is worth building."""
    return find_browser()


@pytest.fixture(scope="module")
def served(browser_paths, tmp_path_factory, tiny_weights, tiny_onnx):
    """(base URL, model directory, whether it is a real hymenoptera model) of a running `headstart serve`."""
    import httpx

    real = os.environ.get("HEADSTART_SERVE_MODEL")
    if real:
        model, env = Path(real), dict(os.environ)
    else:
        model, _, cache = tiny_model(tmp_path_factory, tiny_weights, tiny_onnx)
        env = cli_env(cache)
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "headstart", "serve", str(model), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, f"headstart serve exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"headstart serve did not answer in {START_TIMEOUT_S}s: {log.read_text()}"
            time.sleep(0.3)
        yield url, model, bool(real)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def browser(browser_paths):
    with headless_chromium((1280, 900), 30, browser_paths) as driver:
        yield driver


def test_page_shows_the_label_of_a_real_photo(browser, served, tmp_path: Path) -> None:
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, model, real = served
    photo = sorted((PHOTOS / "bees").glob("*.jpg"))[0]
    assert photo.is_file(), f"no real photo at {PHOTOS}"
    classes = httpx.get(f"{url}/model").json()["classes"]
    answer = httpx.post(f"{url}/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}).json()
    expected = "bees" if real else answer["results"][0]["label"]

    browser.get(url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#classes li")) == len(classes))
    assert [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#classes li")] == classes
    browser.find_element(By.ID, "picker").send_keys(str(photo))
    card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".result.done"))
    assert "error" not in card.get_attribute("class"), card.text
    assert card.get_attribute("data-file") == photo.name
    assert card.find_element(By.CSS_SELECTOR, ".label").text == expected
    bars = card.find_elements(By.CSS_SELECTOR, ".bar")
    assert len(bars) == min(3, len(classes)) and bars[0].find_element(By.CSS_SELECTOR, ".cls").text == expected
    assert browser.execute_script("return arguments[0].naturalWidth", card.find_element(By.TAG_NAME, "img")) > 0
    # Nothing was fetched from anywhere but the server itself.
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) <= {url, "null"}, origins

    shot = tmp_path / "serve-page.png"
    browser.save_screenshot(str(shot))
    browser.set_window_size(390, 844)  # a phone's width: one column, nothing wider than the screen
    time.sleep(0.3)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.save_screenshot(str(tmp_path / "serve-page-phone.png"))
    assert shot.stat().st_size > 10_000
    try:
        shutil.copy2(shot, RECORD_COPY)  # for the record: inspected by people, not by the test
    except OSError:
        pass


def test_page_names_an_unreadable_file(browser, served, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = served
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    browser.get(url + "/")
    browser.find_element(By.ID, "picker").send_keys(str(bad))
    card = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, ".result.done"))
    assert "error" in card.get_attribute("class") and card.get_attribute("data-file") == "notes.jpg"
    assert "cannot identify" in card.find_element(By.CSS_SELECTOR, ".label").text
