"""Celery tasks of the shard pipeline: thin wrappers that load state, call the pure pieces, save.

    build_shard ──► poll_batch ──(countdown, re-enqueued)──► merge_shard ──► finalize
                     (never sleeps in a worker slot)

Arguments are ``(output_url, run_id, shard, ...)`` and small numbers: no API key, no presigned
URL, no payload (Flower shows arguments; FACTS.md). Every task is idempotent, so a redelivered or
retried message changes nothing: see ``workers.builder.build_and_submit`` and the write-once
results in ``merge_shard``.
"""

from __future__ import annotations

import functools
import logging
import time

from celery import Task

from config import get_settings
from workers import layout
from workers.app import app
from workers.builder import build_and_submit
from workers.merge import merge_rows, next_poll_interval
from workers.models import BatchRecord, ShardBuild, ShardDone
from workers.moondream import BatchClient, TransientError
from workers.runstate import maybe_finalize, open_output, open_run, record_failure
from workers.storage import StorageError, get_json, get_json_or_none, put_json

log = logging.getLogger(__name__)

RETRYABLE = (TransientError, StorageError, ConnectionError, TimeoutError, OSError)


@functools.cache
def batch_client() -> BatchClient:
    """This process's Batch API client (key and URL from settings)."""
    s = get_settings()
    return BatchClient(s.moondream_url, s.api_key(), timeout=s.http_timeout,
                       max_attempts=s.http_max_attempts, backoff_initial=s.http_backoff_initial,
                       backoff_max=s.http_backoff_max)


class RunTask(Task):
    """Base of pipeline tasks: a failure that outlasts its retries marks the run failed, with a
    message naming the shard and the error (errors of this project never carry secrets)."""

    abstract = True
    autoretry_for = RETRYABLE
    retry_backoff = 2
    retry_backoff_max = 300
    retry_jitter = True
    max_retries = 8
    acks_late = True

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # noqa: D401, ANN001
        try:
            output = args[0]
            where = f"{self.name} shard {args[2]}" if len(args) > 2 else self.name
            store = open_output(output, get_settings())
            record_failure(store, where=where,
                           error=f"{type(exc).__name__}: {exc}")
        except Exception:
            log.exception("could not record the failure of %s", self.name)


@app.task(bind=True, base=RunTask, name="moonbatch.build_shard")
def build_shard(self: Task, output: str, run_id: str, shard: int) -> None:
    """Build, upload and submit the shard's batch, then schedule its first poll."""
    settings = get_settings()
    run = open_run(output, settings, run_id)
    build, batch = build_and_submit(
        shard=shard, items=run.items(shard), options=run.spec.options, model=run.spec.model,
        input_store=run.input, state=run.output, client=batch_client(),
        part_size=settings.part_size, concurrency=settings.fetch_concurrency,
        max_pixels=run.spec.max_pixels, upload_concurrency=settings.upload_concurrency,
    )
    if batch is None:  # nothing sendable: only error rows to write
        merge_shard.delay(output, run_id, shard)
    else:
        poll_batch.apply_async((output, run_id, shard), countdown=settings.poll_min_interval)


@app.task(bind=True, base=RunTask, name="moonbatch.poll_batch")
def poll_batch(self: Task, output: str, run_id: str, shard: int, polls: int = 0,
               last: list[float] | None = None) -> None:
    """Poll the shard's batch once; re-enqueue itself with an adaptive countdown until the batch
    is ``completed`` or ``failed``, then hand over to ``merge_shard``."""
    settings = get_settings()
    store = open_output(output, settings)
    if store.exists(layout.shard_doc(shard, "done")):
        return
    record = BatchRecord.model_validate(get_json(store, layout.shard_doc(shard, "batch")))
    status = batch_client().get_batch(record.batch_id)
    now = time.time()
    prog = status.progress
    put_json(store, layout.shard_doc(shard, "progress"), {
        "batch_id": status.id, "status": status.status, "polls": polls + 1, "polled_at": now,
        "total": prog.get("total", record.lines), "completed": prog.get("completed", 0),
        "failed": prog.get("failed", 0)})
    if status.done:
        merge_shard.delay(output, run_id, shard, polls + 1)
        return
    completed = int(prog.get("completed", 0)) + int(prog.get("failed", 0))
    countdown = next_poll_interval(
        elapsed=now - record.submitted_at, total=int(prog.get("total", record.lines)),
        completed=completed, last=(last[0], int(last[1])) if last else None, now=now,
        min_interval=settings.poll_min_interval,
        max_interval=min(settings.poll_max_interval, settings.visibility_timeout / 4))
    poll_batch.apply_async((output, run_id, shard, polls + 1, [now, completed]),
                           countdown=countdown)


@app.task(bind=True, base=RunTask, name="moonbatch.merge_shard")
def merge_shard(self: Task, output: str, run_id: str, shard: int, polls: int = 0) -> None:
    """Download the batch's result files (fresh URLs from a new status call), merge them with
    the shard's plan into ``results/shard-N.jsonl`` (written once), record the shard done, and
    finalise the run if it was the last one."""
    settings = get_settings()
    run = open_run(output, settings, run_id)
    store = run.output
    if not store.exists(layout.shard_doc(shard, "done")):
        items = run.items(shard)
        build = ShardBuild.model_validate(get_json(store, layout.shard_doc(shard, "build")))
        raw_batch = get_json_or_none(store, layout.shard_doc(shard, "batch"))
        record = BatchRecord.model_validate(raw_batch) if raw_batch else None
        status = batch_client().get_batch(record.batch_id) if record else None
        files: list[bytes] = []
        batch_error = None
        if status is not None and status.status == "failed":
            batch_error = {"code": status.error_code(),
                           "message": f"batch {status.id} failed: {status.error_message()}"}
        elif status is not None:
            files = [batch_client().download(o) for o in sorted(status.outputs, key=lambda o: o.index)]
        data, stats = merge_rows(items, build, files, run.input.url_for, batch_error=batch_error)
        if data:
            store.put(layout.results(shard), data, if_absent=True)
        done = ShardDone(
            shard=shard, batch_id=record.batch_id if record else None,
            batch_status=status.status if status else None, total=len(items), ok=stats.ok,
            error=stats.error, input_tokens=stats.input_tokens, output_tokens=stats.output_tokens,
            duplicate_rows=stats.duplicate, missing_rows=stats.missing, polls=polls,
            submitted_at=record.submitted_at if record else None, completed_at=time.time(),
            merged_at=time.time())
        put_json(store, layout.shard_doc(shard, "done"), done.model_dump(), if_absent=True)
        log.info("shard %d merged: %d ok, %d error", shard, stats.ok, stats.error)
    maybe_finalize(store)


@app.task(bind=True, base=RunTask, name="moonbatch.finalize_run")
def finalize_run(self: Task, output: str, run_id: str, shard: int = -1) -> None:
    """Finalise the run if every shard is merged (idempotent; see ``maybe_finalize``)."""
    maybe_finalize(open_output(output, get_settings()))
