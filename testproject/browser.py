"""Headless Chromium for the admin's browser tests and the screenshot script.

Playwright drives the distribution's ``chromium`` (Debian package): Playwright's own
browser download is not used. ``FULLDB_CHROMIUM`` points at another executable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

LAUNCH_ARGS = [
    "--no-sandbox",  # tests often run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def executable() -> str | None:
    """The Chromium to drive: ``FULLDB_CHROMIUM``, else ``chromium`` on the PATH."""
    configured = os.environ.get("FULLDB_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing() -> str | None:
    """Why no browser can be started here, or None when one can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[browser]')"
    if executable() is None:
        where = os.environ.get("FULLDB_CHROMIUM") or "chromium on the PATH"
        return f"no Chromium executable ({where}); Debian: apt-get install chromium"
    return None


def launch(playwright: Any) -> Any:
    """A headless Chromium browser started through ``playwright`` (a sync Playwright)."""
    return playwright.chromium.launch(executable_path=executable(), args=LAUNCH_ARGS)
