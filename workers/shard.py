"""A shard's state machine, as pure functions of its documents (keys in
``moonbatch.workers.layout``).

    round r:  todo? ─► build ─► batch ─► progress … (completed | failed) ─► merged + rows
                         │ (no line sendable)                                   │
                         └──────────────────────────► merge ◄───────────────────┘
    a merge waits for a build that stopped half-way, and sends the round again when build and
    batch come from different executions (``merge_blocker``); after a merge: retryable items
    left and attempts left ─► round r+1, else finish ─► done (``after_merge``)

No function here reads storage, enqueues or looks at the clock: callers load the documents
(a ``Mapping`` keyed ``(round, name)``, round None for the shard's own ``done`` and ``lease``;
see ``moonbatch.workers.reconcile.StoredShardDocs``), pass ``now``, and act on the ``Step``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from moonbatch.workers import layout
from moonbatch.workers.lease import is_live

#: A shard's documents: ``(round, name) → document`` (``(None, "done")``, ``(0, "batch")``…).
#: Only presence counts for ``rows`` (JSONL): its value is never read.
ShardDocs = Mapping[tuple[int | None, str], Any]


class Action(enum.Enum):
    """What a shard needs next."""

    DONE = "done"  # merged: nothing to do
    BUILD = "build"  # send the round (again)
    POLL = "poll"  # look at the round's batch at the provider
    MERGE = "merge"  # collect and merge the round's results
    FINISH = "finish"  # compose the shard's rows from its rounds and record it done
    WAIT = "wait"  # work is under way (queued, leased or on schedule): leave it


@dataclasses.dataclass(frozen=True)
class Step:
    """The next step of a shard: its ``action`` on round ``round``, and ``why`` (for logs)."""

    action: Action
    round: int
    why: str = ""


def grace(poll_min_interval: float) -> float:
    """Seconds a scheduled poll may be late before its chain counts as lost."""
    return max(3 * poll_min_interval, 30.0 if poll_min_interval >= 1 else 3.0)


def latest_round(docs: ShardDocs) -> int:
    """The shard's current round: the highest with any document (0 before any)."""
    return layout.latest_round(docs) or 0


def next_step(docs: ShardDocs, *, only_stale: bool, now: float,
              poll_min_interval: float) -> Step:
    """The next step of a shard from its documents (the recovery's view: what to enqueue).

    With ``only_stale`` (a reconciler while the broker still holds its messages) only work
    that should have moved and did not is named: a poll chain whose next poll is overdue
    (``grace``), a merge that never ran, a build whose lease expired; anything else is
    ``WAIT``. Without it (a resume, or a broker that lost its messages) every unfinished shard
    gets its step, a build even under a live lease (the build task waits for the lease
    itself). ``now`` and documents' times are epoch seconds."""
    if (None, "done") in docs:
        return Step(Action.DONE, latest_round(docs), "merged")
    rnd = latest_round(docs)
    if (rnd, "rows") in docs:
        return Step(Action.MERGE, rnd, "rows written, shard not finished")
    has_batch = (rnd, "batch") in docs
    if (rnd, "build") in docs and not has_batch:
        build = docs.get((rnd, "build"))
        if build is not None and not build["lines"]:
            return Step(Action.MERGE, rnd, "nothing was sendable: only error rows")
        # Otherwise the build stopped before its batch was recorded: build again (below).
    if has_batch:
        progress = docs.get((rnd, "progress"))
        if only_stale:
            late = grace(poll_min_interval)
            if progress is None:
                batch = docs.get((rnd, "batch")) or {}
                if batch.get("submitted_at", 0) + poll_min_interval + late > now:
                    return Step(Action.WAIT, rnd, "first poll not due yet")
            elif progress.get("next_at", 0) + late > now:
                return Step(Action.WAIT, rnd, "poll chain on schedule")
        if progress and progress.get("status") in ("completed", "failed"):
            return Step(Action.MERGE, rnd, f"batch {progress['status']}")
        return Step(Action.POLL, rnd, "batch at the provider")
    if only_stale:
        if (None, "lease") not in docs:
            return Step(Action.WAIT, rnd, "never started: its message is queued")
        if is_live(docs.get((None, "lease")), now):
            return Step(Action.WAIT, rnd, "a live builder holds the lease")
    return Step(Action.BUILD, rnd, "round not sent")


def poll_turn(progress: Mapping[str, Any] | None, *, chain: str, polls: int, now: float,
              poll_min_interval: float) -> str | None:
    """Whether poll number ``polls + 1`` of chain ``chain`` should run, given the round's
    last ``progress.json``: None if it should, else why it stops (another chain is alive, its
    next poll due within ``grace``; or this chain already made this poll: a redelivered copy
    must not fork the chain)."""
    if not progress:
        return None
    if progress.get("chain") != chain and \
            progress.get("next_at", 0) + grace(poll_min_interval) > now:
        return "another poll chain of the round is alive"
    if progress.get("chain") == chain and progress.get("polls", 0) > polls:
        return f"poll {polls + 1} of this chain already ran"
    return None


def chain_goes_on(progress: Mapping[str, Any] | None, *, run_id: str, chain: str,
                  polls: int) -> bool:
    """Whether the round's ``progress`` is what poll ``polls`` of chain ``chain`` of run
    ``run_id`` wrote (``run``, ``chain``, ``polls``), so that poll ``polls + 1`` needs no other
    look: the run is still there (a clean removes its documents), the chain is the round's
    (no other poll wrote since) and the round is not merged (a merge follows only a progress
    that says the round ended, or written rows, never this chain's going on)."""
    return bool(progress) and progress.get("run") == run_id and \
        progress.get("chain") == chain and progress.get("polls") == polls and \
        progress.get("status") not in ("completed", "failed")


def cancel_look_due(progress: Mapping[str, Any] | None, *, now: float, every: float) -> bool:
    """Whether a chain's next poll looks whether the run was cancelled: its last look
    (``progress``'s ``looked_at``) is ``every`` seconds old or more (or unknown)."""
    return now - float((progress or {}).get("looked_at") or 0.0) >= every


#: ``Poll.progress`` fields that count work done: a change in them alone is written with the
#: chain's next write that is due anyway (``progress_write_due``), not at once.
COUNTS = frozenset({"completed", "failed", "finished"})


def progress_write_due(stored: Mapping[str, Any] | None, fields: Mapping[str, Any], *,
                       next_poll: float) -> bool:
    """Whether a poll of a provider whose polls only look writes the round's progress: when
    what it records (``fields``, ``Poll.progress``) differs from the progress as the chain
    last wrote it (``stored``) in more than its counts (``COUNTS``: a status, a batch), or
    when its next poll (``next_poll``, epoch seconds) would come after the write that
    progress promises by its ``next_at``. A round that only counts on is written at most
    once per promise (``grace``), to show its chain alive (``next_step`` and ``poll_turn``
    go by ``next_at``) and its counts a little late."""
    if not stored or any(stored.get(k) != v for k, v in fields.items() if k not in COUNTS):
        return True
    return next_poll > float(stored.get("next_at") or 0.0)


def rate_since(last: list[float] | None, *, now: float, finished: int) -> list[float]:
    """What a poll chain hands its next poll as ``last``: ``[time, finished]`` of the chain's
    earliest poll that saw progress, else of this poll (``now``, ``finished``), so that a rate
    is taken over all the progress seen. Progress moves in steps, often not at all between two
    close polls, and a rate over the last interval alone was then unknown: the next poll came
    a quarter of the batch's age later (up to the poll interval's bound) even as the batch was
    about to end. A count lower than the one kept starts over."""
    if last is not None and 0 < last[1] <= finished:
        return [last[0], last[1]]
    return [now, finished]


def merge_blocker(rnd: int, build: Any, batch: Any | None) -> Step | None:
    """Why round ``rnd`` cannot be merged yet from its ``build`` (``ShardBuild``: ``lines``,
    ``attempt``) and ``batch`` (``BatchRecord`` or None: ``batch_id``, ``attempt``), or None
    if it can: lines built and no batch recorded is a build that stopped half-way (``BUILD``
    the same round); a batch recorded by another execution than the build's cannot be merged
    against it, as items would get others' results (``BUILD`` round ``rnd + 1``)."""
    if batch is None and build.lines:
        return Step(Action.BUILD, rnd, "the build stopped between build.json and batch.json")
    if batch is not None and batch.attempt and build.attempt != batch.attempt:
        # build.json must describe the batch recorded (the provider writes both in one execution).
        return Step(Action.BUILD, rnd + 1, f"build.json does not describe batch {batch.batch_id}")
    return None


def after_merge(retryable: list[int], *, rnd: int, base: int, max_item_attempts: int) -> Step:
    """The step after round ``rnd`` merged with ``retryable`` items (indices) left: round
    ``rnd + 1`` for them while the pass that began at round ``base`` has attempts left
    (``max_item_attempts`` rounds per pass), else finish the shard."""
    if retryable and rnd - base + 1 < max_item_attempts:
        return Step(Action.BUILD, rnd + 1, "retryable errors")
    return Step(Action.FINISH, rnd, "no round left to send")


def round_base(rnd: int, todo: Mapping[str, Any] | None) -> int:
    """The first round of the pass round ``rnd`` belongs to, from its ``todo.json``: 0 for the
    run's own rounds, the round a ``retry-failed`` pass started with for its rounds (``base``).
    Item attempts (``max_item_attempts``) are counted from it: each pass gets a fresh budget."""
    if rnd == 0:
        return 0
    return int((todo or {}).get("base", 0))
