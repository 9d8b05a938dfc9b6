"""The report as a person sees it: report.html opened from disk in headless Chromium (Debian's `chromium` and
`chromium-driver`, through Selenium, started by tests/helpers_browser.py as for the serve page's test). The
confusion matrix shows, a gallery photo and its heat map load, a click on a cell lists that cell's images, and
nothing is fetched from anywhere. A screenshot is saved in the test's tmp dir and copied to /tmp/report-page.png.

HEADSTART_REPORT_FILE=<a report.html> (e.g. one from hymenoptera) is looked at instead of the tiny model's.
Without a browser the test skips, saying why, except under CI=true, where it fails: CI must have one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_evaluate_report import tiny_report_model
from helpers_browser import headless_chromium

RECORD_COPY = Path("/tmp/report-page.png")


@pytest.fixture
def browser():
    with headless_chromium((1280, 2400), 60) as driver:
        yield driver


@pytest.fixture
def report_file(tmp_path_factory, tiny_weights, tiny_onnx, monkeypatch) -> Path:
    given = os.environ.get("HEADSTART_REPORT_FILE")
    if given:
        return Path(given)
    model, held_out, cache = tiny_report_model(tmp_path_factory, tiny_weights, tiny_onnx)
    monkeypatch.setenv("HEADSTART_CACHE", str(cache))
    from headstart import ImageClassifier
    from headstart.tasks.report import write_report

    out = tmp_path_factory.mktemp("report-page") / "report.html"
    return write_report(ImageClassifier.load(model, device="cpu"), model, held_out, out)


def test_report_page_in_chromium(report_file: Path, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(report_file.resolve().as_uri())
    cells = browser.find_elements(By.CSS_SELECTOR, "#confusion td.cell")
    k = len(browser.find_elements(By.CSS_SELECTOR, "#per-class tr")) - 1
    assert k >= 2 and len(cells) == k * k
    assert all(c.is_displayed() for c in cells)
    assert browser.find_element(By.ID, "confusion").size["height"] > 20 * k

    photo = browser.find_element(By.CSS_SELECTOR, "#gallery img.photo")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", photo) > 0
    heat = browser.find_elements(By.CSS_SELECTOR, "#gallery img.heat")
    assert heat and browser.execute_script("return arguments[0].naturalWidth", heat[0]) > 0
    plots = browser.find_elements(By.CSS_SELECTOR, "img.plot")
    assert len(plots) >= 2 and all(browser.execute_script("return arguments[0].naturalWidth", p) > 0 for p in plots)

    # An off-diagonal cell when there is one with images (the mistakes are what a user clicks), else the fullest.
    counts = [int(c.text) for c in cells]
    off = [i for i, c in enumerate(cells) if c.get_attribute("data-true") != c.get_attribute("data-pred") and counts[i]]
    pick = off[0] if off else max(range(len(cells)), key=counts.__getitem__)
    cells[pick].click()
    listed = browser.find_elements(By.CSS_SELECTOR, "#cell-list figure.listed")
    assert len(listed) == counts[pick] > 0
    assert browser.find_element(By.ID, "cell-caption").text.startswith(f"{counts[pick]} image(s)")
    first = listed[0].find_element(By.TAG_NAME, "img")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", first) > 0
    assert "selected" in cells[pick].get_attribute("class")

    # Nothing fetched from anywhere: every resource the page used is a data: URI.
    names = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(n.startswith("data:") for n in names), names
    logs = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert logs == [], logs

    # The whole page in one picture: the window as tall as the page, the clicked cell's list open.
    browser.set_window_size(1280, min(8000, browser.execute_script("return document.documentElement.scrollHeight")))
    shot = tmp_path / "report-page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    try:
        shutil.copy2(shot, RECORD_COPY)  # for the record: inspected by people, not by the test
    except OSError:
        pass
