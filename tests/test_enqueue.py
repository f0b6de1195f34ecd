"""Routing and recovery without the tasks: ``moonbatch.workers.enqueue`` sends by task name and
``moonbatch.workers.reconcile`` recovers runs, so ``cancel``, ``clean`` and ``resume`` (and the
producer's planning) never build the Celery app to use them."""

from __future__ import annotations

import base64
import inspect
import json
import subprocess
import sys
import uuid

from moonbatch.workers.enqueue import CONTROL_TASKS, PARAMS


def test_recovery_and_routing_import_without_celery():
    """What ``cancel`` (``run_final``), ``clean`` (``run_final``), ``resume``
    (``reconcile_run``) and the producer (``start_run``) import has not imported celery."""
    modules = ("moonbatch.workers.enqueue", "moonbatch.workers.reconcile", "moonbatch.workers.shard",
               "moonbatch.workers.retries", "moonbatch.workers.runstate", "moonbatch.producer.runs")
    code = (f"import sys, {', '.join(modules)}; "
            "from moonbatch.workers.reconcile import advance_shard, reconcile_run, run_final; "
            "from moonbatch.workers.enqueue import enqueue; "
            "print(sorted(m for m in ('celery', 'kombu', 'moonbatch.workers.app', "
            "'moonbatch.workers.tasks') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_routing_table_matches_the_tasks():
    """``PARAMS`` names every pipeline task with its parameters in order (``enqueue`` turns
    positional arguments into these keyword arguments): a task whose signature changes fails
    here, not in a worker."""
    from moonbatch.workers import tasks

    registered = {name: task for name, task in tasks.app.tasks.items()
                  if name.startswith("moonbatch.")}
    # Names never change: work queued by an earlier version still finds its task.
    assert set(registered) == {"moonbatch.build_shard", "moonbatch.poll_round",
                               "moonbatch.merge_round", "moonbatch.finalize_run",
                               "moonbatch.reconcile"}
    assert set(PARAMS) == set(registered) - {"moonbatch.reconcile"}
    for name, params in PARAMS.items():
        assert tuple(inspect.signature(registered[name].run).parameters) == params, name
    assert CONTROL_TASKS == {"moonbatch.poll_round", "moonbatch.finalize_run"}


def test_enqueue_sends_by_name_to_the_right_queue_without_the_tasks(redis_server):
    """A process that never imported the tasks publishes a build on the run's queue and a poll
    on its control queue, as keyword arguments under the tasks' names (a queue of this test's
    own on the session's Redis, deleted afterwards)."""
    queue = "enqueue-" + uuid.uuid4().hex[:8]
    code = ("import sys; from moonbatch.workers.enqueue import BUILD_SHARD, POLL_ROUND, enqueue; "
            f"enqueue(BUILD_SHARD, ('s3://b/out/', 'run-1', 3), queue={queue!r}); "
            f"enqueue(POLL_ROUND, ('s3://b/out/', 'run-1', 3, 1, 'chain'), queue={queue!r}); "
            "print('moonbatch.workers.tasks' in sys.modules)")
    env = {"MOONBATCH_BROKER_URL": redis_server.url(0), "MOONBATCH_RESULT_BACKEND": redis_server.url(1),
           "PATH": "/usr/bin:/bin"}
    redis = redis_server.client(0)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=60, check=True)
        assert out.stdout.strip().splitlines()[-1] == "False"
        build = json.loads(redis.lpop(queue))
        poll = json.loads(redis.lpop(queue + "-control"))
        assert redis.llen(queue) == redis.llen(queue + "-control") == 0
        assert build["headers"]["task"] == "moonbatch.build_shard"
        assert poll["headers"]["task"] == "moonbatch.poll_round"
        # Celery's message protocol 2: the body is base64 of [args, kwargs, embed].
        assert json.loads(base64.b64decode(build["body"]))[:2] == [
            [], {"output": "s3://b/out/", "run": "run-1", "shard": 3}]
        assert json.loads(base64.b64decode(poll["body"]))[:2] == [
            [], {"output": "s3://b/out/", "run": "run-1", "shard": 3, "round": 1,
                 "chain": "chain"}]
    finally:
        redis.delete(queue, queue + "-control")
