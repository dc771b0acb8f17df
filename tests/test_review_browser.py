"""The review page in a real browser (Debian's Chromium driven by Selenium through chromedriver), on a real
daemon: a review image labelled with a key ends in `classes/<label>/`, a retrain follows, undo restores it;
the suspects and model views render. Skipped, saying why, where Chromium or its driver is not installed
(`.ci/run` installs both: `apt-get install chromium chromium-driver`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import seed_classes, wait_for, write_image
from tests.test_review import ALL_TO_REVIEW, first_model, in_review

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                                reason="Debian's chromium and chromium-driver are not installed "
                                       "(apt-get install chromium chromium-driver)")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def snapshot(driver: Any, name: str) -> None:
    """With RETRAIND_SCREENSHOTS=<folder>, keep a PNG of the page as it is now (for a person to look at)."""
    folder = os.environ.get("RETRAIND_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def press(driver: Any, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def test_label_with_a_key_retrain_and_undo(tmp_path: Path, run_app: Any, browser: Any) -> None:
    """Kind: the keyboard path a reviewer uses: 2 labels the most doubtful image with the second label, the
    daemon retrains on it, U undoes it; S and M show the suspects and the model."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    seed_classes(tmp_path)
    with run_app(**ALL_TO_REVIEW) as app:
        version = first_model(app)
        write_image(app.config.folder("inbox") / "odd.jpg", "red", 42)
        in_review(app, 1)
        browser.get(f"http://127.0.0.1:{app.http.port}/ui/")
        wait_for(lambda: browser.execute_script(
            "const img = document.querySelector('#queue .card.selected img');"
            "return img !== null && img.complete && img.naturalWidth > 0;"), what="a card with its thumbnail")
        legend = [node.text for node in browser.find_elements(By.CSS_SELECTOR, "#legend span")]
        assert legend == ["1 blue", "2 red"]
        snapshot(browser, "review-queue")
        press(browser, "2")
        taught = app.config.folder("classes") / "red" / "odd.jpg"
        wait_for(taught.exists, what="the image moved into classes/red/")
        wait_for(lambda: browser.find_element(By.ID, "queue-empty").is_displayed(), what="an empty queue")
        wait_for(lambda: app.serving.version.number > version, what="a retrain that learns from it")
        press(browser, "u")
        wait_for((app.config.folder("review") / "odd.jpg").exists, what="undo back to review/")
        assert not taught.exists()
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#queue .card"), what="the card again")
        press(browser, Keys.ENTER)  # the top suggestion
        wait_for(lambda: not (app.config.folder("review") / "odd.jpg").exists(), what="Enter to file it")
        press(browser, "s")
        wait_for(lambda: browser.find_element(By.ID, "view-suspects").is_displayed(), what="the suspects view")
        snapshot(browser, "suspects")
        press(browser, "m")
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#model table td.diag"), what="the confusion matrix")
        assert browser.find_element(By.CSS_SELECTOR, "#model h2").text.startswith("Model ")
        snapshot(browser, "model")
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors


def test_the_page_of_a_daemon_with_a_token_loads_and_asks_for_it(tmp_path: Path, run_app: Any, browser: Any) -> None:
    """KIND: with `http.token_file` the page's own files needed the bearer token, which a browser cannot send
    when it opens a page: `/ui/` was a 401 JSON body, so the page that asks for the token never loaded. INPUT:
    a daemon with a token and an image in review, opened at the server's own address (`/` redirects to the page
    without the token too); the page loads, asks for the token, and shows the card with its thumbnail (fetched
    with the token), while the API still refuses a call without it."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    token = "review-page-token-0123456789"
    (tmp_path / "token").write_text(token)
    seed_classes(tmp_path)
    with run_app(http={"token_file": str(tmp_path / "token")}, **ALL_TO_REVIEW) as app:
        first_model(app)
        write_image(app.config.folder("inbox") / "odd.jpg", "red", 42)
        wait_for(lambda: (app.config.folder("review") / "odd.jpg.json").exists(), what="the image in review")
        browser.get(f"http://127.0.0.1:{app.http.port}/")
        asked = WebDriverWait(browser, 30).until(expected_conditions.alert_is_present())
        asked.send_keys(token)
        asked.accept()
        assert browser.current_url == f"http://127.0.0.1:{app.http.port}/ui/"
        wait_for(lambda: browser.execute_script(
            "const img = document.querySelector('#queue .card.selected img');"
            "return img !== null && img.complete && img.naturalWidth > 0;"), what="a card with its thumbnail")
        assert browser.execute_script(
            "return fetch('/v1/review').then((r) => r.status);") == 401
