"""The HTML report in a real browser: headless Chromium (Debian chromium + chromium-driver).

Skipped when Chromium, chromedriver or selenium is missing, except under ``CI``, where it
fails instead (``scripts/setup.sh`` installs the Debian packages when run as root).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spectrim.diagnostics import PLOT_TITLES, CompressibilityReport

CHROMIUM = os.environ.get("SPECTRIM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SPECTRIM_CHROMEDRIVER", "/usr/bin/chromedriver")


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    why = _missing()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"headless browser test cannot run under CI: {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # no background networking: the sandbox has no internet and Chromium would retry forever
    args = (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        "--window-size=1280,1600",
    )
    for arg in args:
        options.add_argument(arg)
    # an explicit driver path: selenium-manager never downloads anything
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_html_report_renders_table_and_images(
    browser: Any, r20_written: dict[str, Path], r20_report: CompressibilityReport
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(r20_written["html"].resolve().as_uri())
    assert "Compressibility report" in browser.title

    table = browser.find_element(By.ID, "groups")
    assert table.is_displayed()
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == [
        g.name for g in r20_report.groups
    ]
    header = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert header[0] == "layer" and "held-out err" in header
    assert len(table.find_elements(By.CSS_SELECTOR, "tbody td")) == len(rows) * len(header)

    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == len(PLOT_TITLES)
    for img in images:
        loaded = browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", img
        )
        assert loaded and int(loaded) > 0, img.get_attribute("alt")
        assert img.size["width"] > 100 and img.size["height"] > 100
    headings = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
    assert {"Findings", "Layers (unit groups)", "Plots", "Weight matrices"} <= set(headings)
