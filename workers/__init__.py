"""moonbatch workers: the Celery app, the shard pipeline (build → upload → poll → merge), and the
pieces it is made of (storage, lines, Batch API client, merge)."""

from workers.app import app

__all__ = ["app"]
