"""What a worker installs: flask and scikit-image are the demo extra's (the emulator's and the
demo's), and nothing a worker or the producer imports needs them. (The wheel itself, its one
top-level name and README's first command on CPython 3.13 are checked by .ci/package-check.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_ONLY = ("flask", "skimage")

# An import of a demo-only package fails, as where the demo extra is not installed.
BLOCK = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {DEMO_ONLY!r}:
            raise ImportError(f"{{name}} is not installed (blocked)")
sys.meta_path.insert(0, Block())
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_flask_and_scikit_image_are_the_demo_extra():
    tomllib = pytest.importorskip("tomllib")  # CPython 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[\[<>=;! ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]]
    assert "flask" not in names and "scikit-image" not in names
    extras = project["optional-dependencies"]
    assert {re.split(r"[<>=]", d)[0] for d in extras["demo"]} == {"flask", "scikit-image"}
    assert "moonbatch[demo]" in extras["test"]


def test_workers_and_the_producer_import_without_the_demo_extra():
    proc = run_python(
        "import moonbatch.workers.tasks, moonbatch.workers.celery, moonbatch.producer.cli, "
        "moonbatch.producer.runs, moonbatch.workers.embedded\n"
        f"assert not [m for m in sys.modules if m.split('.')[0] in {DEMO_ONLY!r}]\n"
        "print('ok')")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_the_emulator_without_the_demo_extra_names_the_install():
    proc = run_python("import moonbatch.emulator")
    assert proc.returncode != 0
    assert "pip install 'moonbatch[demo]'" in proc.stderr.strip().splitlines()[-1], proc.stderr
