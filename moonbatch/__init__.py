"""moonbatch: annotate image datasets in object storage with Moondream, on a Celery worker fleet.

The only top-level name moonbatch installs. Its parts keep the design card's folders
(``workers/``, ``producer/``, ``config/``, ``emulator/``) and are imported as
``moonbatch.workers``, ``moonbatch.producer``, ``moonbatch.config`` and ``moonbatch.emulator``:
a wheel maps the folders there (``package-dir`` in pyproject.toml); in a checkout (an editable
install, or tests run from the repository) this package's path is extended to the checkout root.
"""

from __future__ import annotations

import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_here)
if (_os.path.isfile(_os.path.join(_checkout, "pyproject.toml"))
        and _os.path.isfile(_os.path.join(_checkout, "workers", "__init__.py"))
        and not _os.path.isdir(_os.path.join(_here, "workers"))):
    __path__.append(_checkout)  # noqa: F821 - a package's own __path__

# The Python API (README "Python API"), imported on first use: ``import moonbatch`` stays cheap
# and never builds the Celery app.
_API = {"submit": "api", "run": "api", "dry_run": "api", "open_run": "api", "Run": "api",
        "MoonbatchError": "errors", "InvalidOption": "errors", "PreflightError": "errors",
        "OutputConflict": "errors", "RunNotFound": "errors", "RunFailed": "errors",
        "RunStopped": "errors", "Timeout": "errors", "NoConsumer": "errors"}
__all__ = sorted(_API)


def __getattr__(name: str):
    """``moonbatch.submit`` and the rest of ``__all__``, from ``moonbatch.api`` and
    ``moonbatch.errors`` on first access."""
    if name not in _API:
        raise AttributeError(f"module 'moonbatch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"moonbatch.{_API[name]}"), name)
    globals()[name] = value
    return value
