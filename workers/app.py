"""The Celery application of moonbatch workers (``celery -A moonbatch.workers worker``).

Broker and result backend come from settings (Redis). ``MOONBATCH_BROKER_URL=embedded`` asks
``moonbatch run``/``demo`` for a private ``redis-server`` of their own (``moonbatch.workers.embedded``);
they put its URL in the settings before any worker starts. Kombu's filesystem transport is not
offered: a worker can read a message file before it is fully written.
Delivery is at-least-once (FACTS.md, "Celery with Redis"): late acks, redelivery of a lost
worker's task, prefetch of one, JSON only.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals
from kombu import Exchange, Queue

from moonbatch.config import Settings, get_settings
from moonbatch.workers import logs, metrics
from moonbatch.workers.enqueue import RECONCILE
from moonbatch.workers.runstate import control_queue


def fleet_queues(settings: Settings) -> list[Queue]:
    """The fleet's queues: ``settings.queue`` (heavy I/O steps) and its control queue (polls,
    finalising, the reconciler), each bound as Celery binds a queue it creates on demand (a
    direct exchange and routing key of the queue's name), so messages already queued and
    every publisher agree. A worker started without ``-Q`` consumes exactly these."""
    names = dict.fromkeys((settings.queue, control_queue(settings.queue, settings)))
    return [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in names]


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (a dict for ``app.conf.update``)."""
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.queue,
        # `celery -A moonbatch.workers worker` without -Q serves both fleet queues (Celery consumes every
        # queue of task_queues by default); -Q still picks some. Run-private queues
        # (moonbatch-run-<id>) stay out of it: only their own local workers consume them,
        # and publishing to them (or -Q naming them) relies on queues created on demand.
        "task_queues": fleet_queues(settings),
        "task_create_missing_queues": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        # A task past the soft limit gets SoftTimeLimitExceeded (a clean retry, see
        # workers.tasks); past the hard one its process is killed (a lost attempt,
        # workers.attempts).
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        "result_expires": settings.run_registry_ttl,
        # Flower needs task events; arguments carry no secret (see workers.tasks). No
        # task-sent events: their sender is each publishing process ("gen<pid>@host": every
        # CLI and pool process), and Flower's /metrics grew a series for each one. Flower
        # shows a task from the worker's received/started/succeeded events.
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        # The reconciler: run a beat (celery -A moonbatch.workers beat, or a worker with -B) to use it.
        "beat_schedule": {"moonbatch-reconcile": {
            "task": RECONCILE, "schedule": settings.reconcile_interval,
            "options": {"queue": control_queue(settings.queue, settings)}}},
    }


app = Celery("moonbatch", include=["moonbatch.workers.tasks"])
app.conf.update(celery_config(get_settings()))
metrics.connect_signals()  # /metrics when MOONBATCH_METRICS_PORT is set (workers.metrics)


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    """``MOONBATCH_LOG_FORMAT=json``: the worker's handlers write JSON lines (workers.logs)."""
    if get_settings().log_format == "json":
        logs.use_json(logger)


@signals.worker_init.connect
def _warm_up(**_: Any) -> None:
    """Build the S3 client the tasks use (``runstate.open_output``'s) and import numpy once, in
    the worker's main process before its pool forks: every child inherits both rather than
    spending a second of CPU loading botocore's models and ~0.17 s importing numpy in its first
    tasks. A client opens no connection until its first request, so the children share none."""
    from moonbatch.workers.runstate import open_output

    open_output("s3://moonbatch-warm-up/", get_settings())
    import numpy  # noqa: F401  (the merge's and the spool's)


@signals.task_prerun.connect
def _log_context(task_id: str, task: Any, args: tuple[Any, ...] | None = None,
                 kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    """A task's log context from its arguments (``output``, ``run``, ``shard``, ``round``)."""
    fields: dict[str, Any] = {"task": task.name, "task_id": task_id}
    call = {**dict(zip(("output", "run", "shard", "round"), args or (), strict=False)),
            **(kwargs or {})}
    fields.update({k: call[k] for k in ("run", "shard", "round") if k in call})
    if "shard" in fields:
        fields.setdefault("round", 0)  # a shard's first build is enqueued without its round
    logs.context.set(fields)


@signals.task_postrun.connect
def _log_context_done(**_: Any) -> None:
    logs.context.set({})


def reconfigure(settings: Settings) -> None:
    """Apply changed settings to the app (before it first connects)."""
    app.conf.update(celery_config(settings))
