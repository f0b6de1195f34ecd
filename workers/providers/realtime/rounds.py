"""A step of a real-time round: send the round's next lines as fast as the fleet-wide rate and
concurrency allow, and await every answer before the step ends (the API answers in seconds:
nothing is in flight between steps). Every ``STEP_SECONDS`` a step with lines left to send
records the round (a checkpoint, ``stepped.Checkpoint``: its finished lines, and its ledger
with the requests in flight and the lines read ahead to send again) and sends on, without
draining, for up to ``CHECKPOINT_SECONDS`` in all: a worker lost mid-step costs at most
``STEP_SECONDS`` of answers, and the API's concurrency does not idle between steps.

Each line is one ``POST {base}/<skill>``. Before a request leaves, the step takes one of the
fleet's concurrency slots (``moonbatch.workers.slots.Slots``, named after the API's origin) and
one send of the fleet's rate window (``slots.Rate``, requests per second). Answers:

- 2xx: the line's result (``payloads.result_of``) with the answer's token usage;
- 429: the line goes back, the step stops sending, and the round backs off (``Retry-After``
  honoured, else full-jitter exponential back-off from 0.5 s up to 30 s);
- 5xx, 408, network errors, an answer without its result: the line is sent again after a
  full-jitter back-off (in this step when it fits, else a later one), at most ``MAX_TRIES``
  times, then ends as ``request_failed`` (which a later round retries);
- 401/403: the run cannot go on (``RealtimeAuthError`` fails the task);
- any other 4xx: the line ends as an error row with the API's code and message.

A step that dies before recording its ledger leaves its lines (since its last checkpoint) to be
sent again by the next step (if it had written its results document, the merge keeps one row
per line all the same). A step that loses the ledger race (at a checkpoint or at its end) stops
sending and counts what it answered since its last record as possible duplicates.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import itertools
import logging
import random
import time
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import orjson

from moonbatch.workers import layout, metrics, origins, slots, stops
from moonbatch.workers.lines import ItemError, PreparedImage, data_uri
from moonbatch.workers.models import ShardBuild, SkillOptions
from moonbatch.workers.providers import RoundContext
from moonbatch.workers.providers.realtime.client import (
    PROVIDER,
    RealtimeAuthError,
    RealtimeClient,
    RealtimeError,
    RealtimeLimited,
    RealtimeTransient,
)
from moonbatch.workers.providers.realtime.payloads import (
    MAX_IMAGE_BYTES,
    BadAnswer,
    request_payload,
    result_of,
)
from moonbatch.workers.providers.realtime.settings import RealtimeSettings
from moonbatch.workers.readers import item_options
from moonbatch.workers.stepped import (
    Checkpoint,
    SteppedRounds,
    end_unsent,
    error_lines,
    finish_line,
    ledger_done,
    load_images,
    pending_lines,
    progress,
    recorded_ledger,
)

log = logging.getLogger(__name__)

# A step records what it has every this long (a checkpoint, or its end): a worker lost mid-step
# costs at most this long of answers, sent again by the next step. A checkpoint is three
# storage writes (results, ledger, progress) while requests stay in flight.
STEP_SECONDS = 15.0
# A step that still has lines to send sends on through checkpoints up to this long in all, then
# ends (its worker slot goes back to the queue, to other shards' work). Between two steps the
# round pays a dozen storage round trips and a queue hop while no request is in flight.
CHECKPOINT_SECONDS = 60.0
MAX_TRIES = 6  # sends of one line on transient errors before it ends as request_failed
BACKOFF_BASE, BACKOFF_MAX = 0.5, 30.0  # the official fine-tuning client's policy (FACTS.md)
PREPARE_AHEAD = 64  # most lines read and reserved ahead of their slots (refilled at half)
CANCEL_LOOK = 1.0  # seconds between looks at the run's cancel marker while sending


def backoff(tries: int) -> float:
    """Full-jitter exponential back-off after the ``tries``-th failure (seconds)."""
    return random.uniform(0, min(BACKOFF_MAX, BACKOFF_BASE * 2 ** max(0, tries - 1)))


class Ready(NamedTuple):
    """A line read and reserved, waiting for its slot: its ``options`` and ``image``."""

    line: int
    options: SkillOptions
    image: PreparedImage


@dataclasses.dataclass
class Prepared:
    """A batch of lines prepared for sending: those ``ready``, those that cannot go
    (``errors``: line, error ``{"code", "message"}``) and those ``refused`` by the budget with
    the ``refusal`` (the error they end with)."""

    ready: list[Ready] = dataclasses.field(default_factory=list)
    errors: list[tuple[int, dict[str, str]]] = dataclasses.field(default_factory=list)
    refused: list[int] = dataclasses.field(default_factory=list)
    refusal: dict[str, str] | None = None


def leave(ledger: dict[str, Any], unsent: list[int], prepaid: set[int],
          later: list[tuple[float, int]], resume_in: float) -> None:
    """What a step leaves in ``ledger`` for the next one: ``unsent`` lines first (taken and
    not answered), of which ``prepaid`` are reserved already (the next step does not reserve
    them again), the transient failures (``later``: (not before, line)) last, with the
    back-off to the first of them; the next step due in ``resume_in`` seconds."""
    ledger["resume_at"] = time.time() + resume_in
    ledger["resend"][:0] = [[li] for li in unsent]
    if prepaid:
        ledger["prepaid"] = sorted(prepaid)
    for _, li in sorted(later):
        ledger["resend"].append([li])
    if later and ledger["backoff_until"] < time.time():
        ledger["backoff_until"] = min(nb for nb, _ in later)


def slot_look(settings: Any) -> float:
    """Seconds to the next step of a round whose step found the fleet's slots all held: at
    most the poll interval, at least every second (slots free within a step's time)."""
    return min(settings.poll_min_interval, 1.0)


def fleet_name(settings: RealtimeSettings) -> str:
    """The name of the API's fleet-wide slots and rate window: its origin (no secret)."""
    scheme, host, port = origins.origin(settings.realtime_url)
    return f"realtime:{scheme}://{host}:{port}"


class RealtimeSteps(SteppedRounds):
    """The step machinery of ``RealtimeProvider`` (see the module docstring)."""

    #: ``tries``: line → transient failures so far; ``transient``: their count in the round;
    #: ``resume_at`` (unix s, written by every step that sends): when the next step is due.
    ledger_extra: ClassVar[Mapping[str, Any]] = {"tries": {}, "transient": 0}
    checkpoints: ClassVar[bool] = True

    def next_step_in(self, ledger: Mapping[str, Any], settings: Any) -> float:
        """When the last step said to step again (``resume_at``: right away after a step that
        spent its time sending, when the rate window reopens, or soon when the fleet's slots
        were all held), or after a back-off when one runs."""
        now = time.time()
        resume = ledger.get("resume_at")
        if resume is None:  # a ledger no step has recorded yet
            resume = now + slot_look(settings)
        return max(0.0, ledger["backoff_until"] - now, resume - now)

    def first_poll_in(self, ctx: RoundContext) -> float:
        """Seconds from the round's first step (``submit_round``) to its next one
        (``next_step_in``); 0 when the round is done."""
        ledger = recorded_ledger(ctx)
        if ledger is None or ledger_done(ledger):
            return 0.0
        return self.next_step_in(ledger, ctx.settings)

    def round_stats(self, ledger: Mapping[str, Any]) -> dict[str, int]:
        """The stepped rounds' counts plus ``transient_errors`` (5xx and network errors)."""
        return {**super().round_stats(ledger), "transient_errors": ledger.get("transient", 0)}

    def _lost_race(self, ctx: RoundContext, sent: Any) -> int:
        """Answered requests cannot be cancelled: they count as possible duplicates."""
        return int(sent or 0)

    def _advance(self, ctx: RoundContext, build: ShardBuild, ledger: dict[str, Any],
                 out: list[bytes], record: Checkpoint | None = None) -> int:
        """Send for up to ``STEP_SECONDS``, then, with ``record`` and lines still to send,
        record the round (``record``, ``ctx.checkpointed``) and send on without waiting for
        the requests in flight, up to ``CHECKPOINT_SECONDS`` in all; returns how many requests
        were answered since the last record."""
        now = time.time()
        if now < ledger["backoff_until"] or not pending_lines(ledger):
            return 0
        settings = ctx.settings
        rs = settings.section(RealtimeSettings)
        ctx.renew(force=False)  # sends bill: only while the lease is surely ours
        name = fleet_name(rs)
        cap = slots.Slots(settings, name, rs.realtime_concurrency,
                          ttl=settings.http_timeout + 2 * STEP_SECONDS)
        rate = slots.Rate(settings, name, rs.realtime_rate)
        client = realtime_client()
        spec = ctx.run.spec
        token = uuid.uuid4().hex
        holder = f"{spec.run_id}/{ctx.shard}/{ctx.rnd}/{token}/"
        serial = itertools.count()  # a slot per request: its holder name is never reused
        tries: dict[str, int] = ledger.setdefault("tries", {})
        later: list[tuple[float, int]] = []  # (not before, line) of transient failures
        images: dict[int, PreparedImage | ItemError] = {}
        running: dict[cf.Future, tuple[int, str]] = {}
        freed: list[str] = []  # slots of answered requests, not given back yet
        # Lines read and reserved ahead of their slots by a thread of their own
        # (``_prepare``), so that a freed slot sends at once and the reads and the budget's
        # books are paid once per batch, while the requests sent are answered.
        ready: list[Ready] = []
        ahead = min(4 * rs.realtime_concurrency, PREPARE_AHEAD)
        prepaid: set[int] = set(ledger.pop("prepaid", []))  # reserved by an earlier step
        preparing: list[Any] = [None, 0, []]  # the batch's future, its line count, its lines
        answered = 0
        stop_at = time.monotonic() + STEP_SECONDS
        last_at = time.monotonic() + (CHECKPOINT_SECONDS if record is not None else 0.0)
        stop_sending = False
        looked = time.monotonic()
        resume_in = 0.0  # to the next step: right away, unless slots or the rate say later

        def take(n: int) -> list[int]:
            """Up to ``n`` lines to send now: due retries, resends, then new lines."""
            got: list[int] = []
            t = time.time()
            for entry in sorted(later):
                if len(got) < n and entry[0] <= t:
                    later.remove(entry)
                    got.append(entry[1])
            while ledger["resend"] and len(got) < n:
                got.extend(ledger["resend"].pop(0))
            while ledger["cursor"] < ledger["lines"] and len(got) < n:
                got.append(ledger["cursor"])
                ledger["cursor"] += 1
            return got

        def wanted() -> int:
            t = time.time()
            due = sum(1 for nb, _ in later if nb <= t)
            return (len(ready) + preparing[1] + due + sum(len(u) for u in ledger["resend"])
                    + ledger["lines"] - ledger["cursor"])

        def prepare(n: int) -> None:
            """Start preparing the next ``n`` lines (one batch at a time)."""
            lines = take(n)
            if lines:
                preparing[:] = [prep_pool.submit(self._prepare, ctx, build, lines, images,
                                                 frozenset(prepaid)), len(lines), lines]

        def prepared() -> None:
            """Take the finished batch in: its lines to ``ready``, its errors to ``out``."""
            batch: Prepared = preparing[0].result()
            preparing[:] = [None, 0, []]
            for li, error in batch.errors:
                prepaid.discard(li)
                finish_line(ctx, build, ledger, out, {"line_index": li, "status": "error",
                                                      "error": error})
            if batch.refusal is not None:
                prepaid.difference_update(batch.refused)
                end_unsent(ctx, build, ledger, out, batch.refused, batch.refusal)
            prepaid.difference_update(r.line for r in batch.ready)
            ready.extend(batch.ready)

        def checkpoint() -> bool:
            """Record the round as a step ending now would leave it, with the lines in flight
            and being prepared to send again, and go on: False when another step recorded
            the ledger first (this one must stop sending)."""
            nonlocal answered
            snapshot = orjson.loads(orjson.dumps(ledger))
            unsent = [li for li, _ in running.values()] + [r.line for r in ready] + preparing[2]
            leave(snapshot, unsent, prepaid | {r.line for r in ready}, later, 0.0)
            if not record(snapshot, out):
                return False
            ledger["steps"] = snapshot["steps"]
            out.clear()
            answered = 0
            ctx.checkpointed(progress(snapshot), STEP_SECONDS)
            ctx.renew(force=False)  # sends bill: only while the lease is surely ours
            return True

        def finished(fut: cf.Future) -> None:
            nonlocal answered, stop_sending
            li, slot = running.pop(fut)
            freed.append(slot)  # given back with the next take (one Redis call for both)
            skill = spec.all_options[build.skills[li] if build.skills else 0].skill
            try:
                answer = fut.result()
                answered += 1
                result, usage = result_of(skill, answer)
            except RealtimeLimited as exc:
                metrics.requests(PROVIDER, skill, "rate_limited")
                ledger["rate_limited"] += 1
                ledger["limited_streak"] += 1
                wait = max(exc.retry_after or 0.0, backoff(ledger["limited_streak"]))
                ledger["backoff_until"] = max(ledger["backoff_until"], time.time() + wait)
                ledger["resend"].insert(0, [li])
                stop_sending = True
                return
            except (RealtimeTransient, BadAnswer) as exc:
                ledger["transient"] = ledger.get("transient", 0) + 1
                metrics.requests(PROVIDER, skill, "failed")
                n = tries[str(li)] = tries.get(str(li), 0) + 1
                if n >= MAX_TRIES:
                    tries.pop(str(li), None)
                    message = (f"the real-time API failed {n} times: {exc}" if isinstance(
                        exc, RealtimeError) else f"the real-time API answered {n} times "
                        f"without a result ({exc})")
                    for line in error_lines([li], "request_failed", message):
                        finish_line(ctx, build, ledger, out, line)
                else:
                    later.append((time.time() + backoff(n), li))
                return
            except RealtimeAuthError:
                raise
            except RealtimeError as exc:  # the API refused this request
                answered += 1
                metrics.requests(PROVIDER, skill, "failed")
                tries.pop(str(li), None)
                code = exc.code or f"http_{exc.status}"
                for line in error_lines([li], code, f"the real-time API refused the request "
                                        f"(HTTP {exc.status}): {exc.detail}"):
                    finish_line(ctx, build, ledger, out, line)
                return
            metrics.requests(PROVIDER, skill, "completed")
            ledger["limited_streak"] = 0
            tries.pop(str(li), None)
            line = {"line_index": li, "status": "ok", "result": result, "usage": usage}
            image = images.get(build.lines[li])
            if isinstance(image, PreparedImage):
                line["dims"] = image.dims()
            finish_line(ctx, build, ledger, out, line)

        pool = cf.ThreadPoolExecutor(max_workers=max(1, min(32, rs.realtime_concurrency)),
                                     thread_name_prefix="realtime")
        prep_pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="realtime-prepare")
        try:
            while True:
                ctx.heartbeat()
                if preparing[0] is not None and preparing[0].done():
                    prepared()
                if time.monotonic() - looked >= CANCEL_LOOK:
                    looked = time.monotonic()
                    if ctx.store.exists(layout.CANCELLED):
                        stop_sending = True  # cancel stops sending at once
                if not stop_sending and time.monotonic() >= stop_at:
                    if time.monotonic() < last_at and wanted() and checkpoint():
                        stop_at = time.monotonic() + STEP_SECONDS
                    else:
                        stop_sending = True
                want = 0 if stop_sending else min(wanted(), rs.realtime_concurrency - len(running))
                wait = 0.5
                if want <= 0 and freed:
                    cap.release(freed)
                    freed.clear()
                if want > 0:
                    # Slots and sends first: a line is only taken once it may go.
                    holders = [f"{holder}{next(serial)}" for _ in range(want)]
                    granted, wait = slots.take_paced(cap, rate, holders,
                                                     token + uuid.uuid4().hex[:6], freed)
                    freed.clear()
                    if granted and not ready and preparing[0] is None:
                        # The step's first batch: only what goes now (the rest is read
                        # ahead below, while these are answered).
                        prepare(len(granted))
                        cf.wait([preparing[0]])
                        prepared()
                    elif len(ready) < len(granted) and preparing[0] is None:
                        prepare(max(len(granted), ahead) - len(ready))
                    go = min(len(granted), len(ready))
                    freed.extend(granted[go:])
                    self._send(ctx, ready[:go], granted[:go], running, pool, client, ledger)
                    del ready[:go]
                    if not granted and not running and preparing[0] is None and (
                            not wait or wait > stop_at - time.monotonic()):
                        # The fleet's slots are all held, or the rate window opens after this
                        # step's time: the next step sends (no worker slot waits meanwhile).
                        resume_in = wait or slot_look(settings)
                        break
                    wait = max(0.05, wait) if not granted else 0.0
                elif not running and preparing[0] is None:
                    if stop_sending or not later:
                        break
                    wait = max(0.05, min(nb for nb, _ in later) - time.time())
                    if time.monotonic() + wait >= stop_at:
                        break
                if (not stop_sending and preparing[0] is None and len(ready) <= ahead // 2
                        and wanted() > len(ready)):
                    # While the requests sent are answered; early enough that the lines left
                    # ready outlast a batch's reads and reservations on a busy store, late
                    # enough that a batch is big: each costs two reads, a write and a thread
                    # besides its images, CPU the step's sends and the store share.
                    prepare(ahead - len(ready))
                if running or preparing[0] is not None:
                    done, _ = cf.wait([*running, *preparing[:1]] if preparing[0] else
                                      list(running), timeout=max(0.05, min(wait or 0.5, 1.0)),
                                      return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        if fut in running:
                            finished(fut)
                elif wait:
                    time.sleep(min(wait, max(0.0, stop_at - time.monotonic()), 1.0))
        finally:
            # Await what was sent (answers bill); a step that raised leaves its lines to the
            # next step, which sends them again.
            for fut in cf.as_completed(list(running)):
                try:
                    finished(fut)
                except RealtimeAuthError:
                    pass
            try:
                cap.release(freed)
            except slots.SlotsUnavailable:
                pass  # they expire after their ttl
            pool.shutdown(wait=True)
            prep_pool.shutdown(wait=True)
        if preparing[0] is not None:
            prepared()  # its lines go back below, reserved
        leave(ledger, [r.line for r in ready], prepaid | {r.line for r in ready}, later,
              resume_in)
        return answered

    def _prepare(self, ctx: RoundContext, build: ShardBuild, lines: list[int],
                 images: dict[int, PreparedImage | ItemError], prepaid: frozenset[int]
                 ) -> Prepared:
        """Read the images of ``lines`` (once per item, into ``images``) and reserve the
        estimates of those that can go and are not in ``prepaid`` (reserved by an earlier
        step that did not send them). A line that cannot go (bad image, bad per-row options)
        is among the errors; the lines past the budget are ``refused`` (``stops.reserve_step``:
        the run stops). Runs in the step's preparing thread: it changes no ledger."""
        spec = ctx.run.spec
        todo = [li for li in lines if build.lines[li] not in images]
        # The reservation's reads (the stop record, the budget) beside the images' reads:
        # one storage round trip less before a batch is ready (the step's first one waits
        # for it). Not when every line is reserved already (nothing to book).
        look = stops.budget_look(ctx) if any(li not in prepaid for li in lines) else None
        if todo:
            images.update(load_images(ctx, build, todo, limit=MAX_IMAGE_BYTES))
        batch = Prepared()
        for li in lines:
            item = ctx.items[build.lines[li]]
            k = build.skills[li] if build.skills else 0
            image = images[build.lines[li]]
            try:
                options = item_options(spec.all_options[k], item)
            except ItemError as exc:
                image = exc
            if isinstance(image, ItemError):
                batch.errors.append((li, image.as_dict()))
            else:
                batch.ready.append(Ready(li, options, image))
        # Each request's estimate is reserved before it is sent: none goes past the budget.
        fresh = [r for r in batch.ready if r.line not in prepaid]
        n, batch.refusal = stops.reserve_step(ctx, [self.line_estimate(  # type: ignore[attr-defined]
            spec, ctx.items[build.lines[r.line]].size, build.skills[r.line] if build.skills
            else 0) for r in fresh], look() if look else None) if fresh else (0, None)
        if batch.refusal is not None:
            batch.refused = [r.line for r in fresh[n:]]
            batch.ready = [r for r in batch.ready if r.line not in set(batch.refused)]
        return batch

    def _send(self, ctx: RoundContext, lines: list[Ready], granted: list[str],
              running: dict[cf.Future, tuple[int, str]], pool: cf.ThreadPoolExecutor,
              client: RealtimeClient, ledger: dict[str, Any]) -> None:
        """Send each of ``lines`` (prepared and reserved), holding its slot of ``granted``."""
        for r, slot in zip(lines, granted, strict=True):
            uri = data_uri(r.image.data, f"image/{r.image.format.lower()}")
            payload = request_payload(r.options, uri, ctx.run.spec.model)
            metrics.upload_bytes(PROVIDER, len(uri))
            metrics.requests(PROVIDER, r.options.skill, "sent")
            ledger["requests"] += 1
            running[pool.submit(client.call, r.options.skill, payload)] = (r.line, slot)


@functools.cache
def realtime_client() -> RealtimeClient:
    """This process's client (URL and key from settings; the key only when one is set)."""
    from moonbatch.config import get_settings

    s = get_settings()
    rs = s.section(RealtimeSettings)
    return RealtimeClient(rs.realtime_url, rs.key(), timeout=s.http_timeout)
