"""Where ``celery -A moonbatch.workers`` finds the app (Celery looks up ``<package>.celery``)."""

from moonbatch.workers.app import app

__all__ = ["app"]
