"""moonbatch workers: the Celery app, the shard pipeline (build → upload → poll → merge), and the
pieces it is made of (storage, lines, merge) and the providers (``moonbatch.workers.providers``).

Importing this package (or its pure modules: lines, models, layout, merge, storage, ...) does not
build the Celery app: the producer's planning and listing import them without Celery. The app is
``moonbatch.workers.app.app``; ``celery -A moonbatch.workers`` finds it through ``moonbatch.workers.celery``.
"""

if __name__ != "moonbatch.workers":  # one module, one name: never two Celery apps or two Settings
    raise ImportError(f"import moonbatch.workers, not {__name__}")

