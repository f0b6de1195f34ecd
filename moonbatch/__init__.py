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
