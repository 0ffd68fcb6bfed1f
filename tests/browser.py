"""Headless Chromium for the tests that need a real browser (the /ui page, signing in)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# The flags under which Chromium runs on a machine without network: no sandbox (root), no
# GPU, and none of the background connections it would otherwise try. Its shared memory goes to
# /tmp: /dev/shm may be small (containers) or only root's (a chroot whose /dev was bound without
# the /dev/shm mount: "incorrect permissions on /dev/shm" for any other user).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1280,1100")


@contextlib.contextmanager
def chromium(directory: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a new empty profile in `directory`, quit at the end."""
    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), (
        "chromium and chromedriver are missing: ./test.sh installs them (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={directory / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER, log_output=str(directory / "driver.log")))
    try:
        yield driver
    finally:
        driver.quit()
