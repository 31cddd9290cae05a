"""Headless Chromium for looking at pages as a person would: a screenshot and the rendered DOM."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1600,1000", "--virtual-time-budget=20000"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, screenshot: Path) -> str:
    """Save a screenshot of `url` and return its DOM after scripts ran."""
    binary = chromium()
    assert binary, "chromium is not installed (apt-get install chromium)"
    with tempfile.TemporaryDirectory() as profile:
        common = [binary, *FLAGS, f"--user-data-dir={profile}"]
        subprocess.run([*common, f"--screenshot={screenshot}", url], check=True,
                       capture_output=True, timeout=180)
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                             check=True, capture_output=True, text=True, timeout=180)
    return dom.stdout
