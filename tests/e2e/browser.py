"""Headless Chromium for looking at pages as a person would: a screenshot and the rendered DOM."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=20000"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, screenshot: Path, window: tuple[int, int] = (1600, 1000),
           wait_for: str | tuple[str, ...] = (), attempts: int = 3) -> str:
    """Save a screenshot of `url` and return its DOM after scripts ran. Long tables render only
    the rows and columns in view: a larger `window` shows more of them. With `wait_for`, the page
    is loaded again (up to `attempts` times) until its DOM holds that text (each of them, for a
    tuple): a server's first answer for a page's large scripts can outlast the browser's time
    budget, and on a busy machine a page's charts can come in one by one."""
    binary = chromium()
    assert binary, "chromium is not installed (apt-get install chromium)"
    flags = [*FLAGS, f"--window-size={window[0]},{window[1]}"]
    expected = (wait_for,) if isinstance(wait_for, str) else wait_for
    for _ in range(attempts):
        with tempfile.TemporaryDirectory() as profile:
            common = [binary, *flags, f"--user-data-dir={profile}"]
            subprocess.run([*common, f"--screenshot={screenshot}", url], check=True,
                           capture_output=True, timeout=180)
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run([binary, *flags, f"--user-data-dir={profile}", "--dump-dom", url],
                                 check=True, capture_output=True, text=True, timeout=180).stdout
        if all(text in dom for text in expected):
            break
    return dom
