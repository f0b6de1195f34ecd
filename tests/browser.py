"""Debian's chromium, headless, for the tests that look at a page the way a user does (Flower's
task list, ``moonbatch report``'s page): its DOM after rendering, and a screenshot saved as a
test artifact (``ARTIFACTS``, kept by CI). A test skips, saying so, when chromium is not
installed (``.ci/run`` installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# Screenshots land here (CI keeps the folder as an artifact).
ARTIFACTS = Path(os.environ.get("MOONBATCH_TEST_ARTIFACTS",
                                Path(__file__).resolve().parent.parent / "test-artifacts"))

# A browser that talks to nothing but the page it is given: no first-run, sync, component or
# background requests, no QUIC; a profile of its own per call.
QUIET = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--force-device-scale-factor=1"]


def chromium() -> str:
    """The chromium executable; skips the test when there is none."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    return found


def _run(url: str, action: list[str], window: tuple[int, int], extra: list[str]
         ) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="moonbatch-chromium-") as profile:
        return subprocess.run([chromium(), *QUIET, f"--user-data-dir={profile}",
                               f"--window-size={window[0]},{window[1]}", *extra, *action, url],
                              capture_output=True, text=True, timeout=120)


def dump_dom(url: str, *, window: tuple[int, int] = (1400, 1800), extra: list[str] = ()) -> str:
    """The page's DOM after it rendered (``--dump-dom``)."""
    return _run(url, ["--dump-dom"], window, list(extra)).stdout


def screenshot(url: str, name: str, *, window: tuple[int, int] = (1400, 1800),
               extra: list[str] = ()) -> Path:
    """A screenshot of the page's first ``window`` pixels, saved as ``ARTIFACTS/name`` (a PNG);
    its path is printed and returned."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / name
    shot.unlink(missing_ok=True)
    proc = _run(url, [f"--screenshot={shot}"], window, list(extra))
    assert shot.is_file(), proc.stderr[-2000:]
    print(f"screenshot: {shot}")
    return shot
