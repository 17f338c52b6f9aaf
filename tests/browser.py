"""A real headless Chromium for browser tests: Debian's `chromium` and `chromium-driver` (installed by
`make browser-tools`), driven by Selenium. Nothing is downloaded at run time: the driver and the browser
are named by path, so Selenium Manager never runs.

Use the `chromium` fixture; `console_errors(driver)` returns the page's console errors since the last call.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Flags for a closed network: without the background-networking ones Chromium keeps trying to reach
# Google's hosts; --no-sandbox because CI runs as root.
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,1600", "--autoplay-policy=no-user-gesture-required",
)


def new_driver(download_dir: Path | None = None):
    """A Selenium Chrome driver on Debian's Chromium, with a fresh profile and console logging on."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        raise RuntimeError(f"{CHROMIUM} / {CHROMEDRIVER} missing: run `make browser-tools` (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="i2s-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if download_dir is not None:
        options.add_experimental_option("prefs", {
            "download.default_directory": str(download_dir), "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver._i2s_profile = profile  # removed with the driver
    return driver


def close_driver(driver) -> None:
    try:
        driver.quit()
    finally:
        shutil.rmtree(getattr(driver, "_i2s_profile", ""), ignore_errors=True)


def console_errors(driver) -> list[str]:
    """Console entries of level SEVERE since the last call (Chromium hands each entry out once)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


@pytest.fixture
def chromium(tmp_path):
    """A fresh headless Chromium per test; downloads land in tmp_path / "downloads"."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = new_driver(downloads)
    driver.i2s_downloads = downloads
    try:
        yield driver
    finally:
        close_driver(driver)
