"""Routing: every enqueue of a run's work goes through ``enqueue``, by task *name*, so the
producer, ``resume`` and the reconciler send work without importing the tasks.

A run's heavy I/O steps (builds and uploads, downloads and merges) go to its queue
(``runstate.run_queue``); its light steps (``CONTROL_TASKS``: polls, finalising) to the queue's
control queue (``runstate.control_queue``). Task names never change: queued work survives an
upgrade. Arguments are keyword arguments (what Flower shows an operator) and small values: no
API key, no presigned URL, no payload.
"""

from __future__ import annotations

import functools
from typing import Any

from moonbatch.config import get_settings
from moonbatch.workers import layout
from moonbatch.workers.models import RunSpec
from moonbatch.workers.runstate import control_queue, open_output, run_queue
from moonbatch.workers.storage import get_json

# The tasks' names (``workers.tasks`` registers them under these): never changed, so work
# queued by an earlier version still runs.
BUILD_SHARD = "moonbatch.build_shard"
POLL_ROUND = "moonbatch.poll_round"
MERGE_ROUND = "moonbatch.merge_round"
FINALIZE_RUN = "moonbatch.finalize_run"
RECONCILE = "moonbatch.reconcile"

#: Each pipeline task's parameters, in order: ``enqueue``'s positional ``args`` become these
#: keyword arguments (tests check them against the tasks' signatures in ``workers.tasks``).
PARAMS: dict[str, tuple[str, ...]] = {
    BUILD_SHARD: ("output", "run", "shard", "round"),
    POLL_ROUND: ("output", "run", "shard", "round", "chain", "polls", "last", "held"),
    MERGE_ROUND: ("output", "run", "shard", "round", "polls"),
    FINALIZE_RUN: ("output", "run"),
}

# Light steps go to the run's control queue; the rest, heavy on I/O, to its queue itself.
CONTROL_TASKS = frozenset({POLL_ROUND, FINALIZE_RUN})


@functools.lru_cache(maxsize=4096)
def spec_queue(output: str, run_id: str) -> str:
    """The queue of run ``run_id`` at ``output`` (its spec's). Raises ``NotFound`` if no spec
    is there, storage errors."""
    # A run's spec never changes once written: one read per run and process. Keyed by run id
    # too: a cleaned OUTPUT may hold a later run with another queue.
    settings = get_settings()
    spec = RunSpec.model_validate(get_json(open_output(output, settings), layout.SPEC))
    return run_queue(spec, settings)


def route(name: str, queue: str) -> str:
    """The queue task ``name`` of a run whose queue is ``queue`` goes to."""
    return control_queue(queue, get_settings()) if name in CONTROL_TASKS else queue


def enqueue(name: str, args: tuple[Any, ...], *, countdown: float | None = None,
            queue: str | None = None) -> None:
    """Publish task ``name`` (one of ``PARAMS``) with ``args`` on its run's queue, or for a
    light step on the run's control queue (``route``). ``args`` start with the run's OUTPUT URL
    and run id; ``queue`` (when the caller holds the spec: ``run_queue(spec, settings)``)
    saves reading the spec; ``countdown`` in seconds. Raises the broker's errors, ``KeyError``
    for an unknown task name and ``NotFound`` if no spec is at ``args[0]``."""
    params = PARAMS[name]
    queue = route(name, queue or spec_queue(args[0], args[1]))
    # Sending needs the broker's settings: the app, imported only now (it never imports the
    # tasks to send by name), so importing this module stays free of Celery.
    from moonbatch.workers.app import app

    app.send_task(name, kwargs=dict(zip(params, args, strict=False)), countdown=countdown,
                  queue=queue)
