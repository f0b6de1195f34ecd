"""moonbatch workers: the Celery app, the shard pipeline (build → upload → poll → merge), and the
pieces it is made of (storage, lines, Batch API client, merge).

Importing this package (or its pure modules: lines, models, layout, merge, storage, ...) does not
build the Celery app: the producer's planning and listing import them without Celery. The app is
``workers.app.app``; ``celery -A workers`` finds it through ``workers.celery``.
"""
