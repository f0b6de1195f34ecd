"""Where ``celery -A workers`` finds the app (Celery looks up ``<package>.celery``)."""

from workers.app import app

__all__ = ["app"]
