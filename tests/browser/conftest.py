"""The app in a real browser: Playwright on the system Chromium (Debian's `chromium` package).

The tests skip, saying why, when Playwright, Gradio or a Chromium is missing. Chromium is found
at $SAMED2_CHROMIUM, else `chromium` / `chromium-browser` / `google-chrome` on PATH. To run them
locally: `sudo apt-get install chromium` (or point SAMED2_CHROMIUM at any Chrome), then
`.venv/bin/python -m pytest -m "" tests/browser`. Screenshots of every step go to the test's tmp
folder (`pytest --basetemp=shots` keeps them in ./shots).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    env = os.environ.get("SAMED2_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("gradio", reason='the app extra is missing: pip install -e ".[app]"')
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason='playwright is missing: pip install -e ".[dev]"'
    )
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium found: apt-get install chromium, or set SAMED2_CHROMIUM")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()
