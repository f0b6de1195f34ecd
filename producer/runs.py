"""Producer: record a run, plan it shard by shard while listing, and enqueue each shard's work.

Planning streams: a shard's plan file is written as soon as the shard is full, so a
10-million-object prefix never sits in memory. Nothing is enqueued before the whole plan is
durable (every shard's file, then ``plan.json``): a planning that stops part-way (a reader
error, a crash) leaves no work in the queue and no batch billed, and the same command takes it
over. Workers start once the listing ends; enqueueing the shards then takes milliseconds.
A key that cannot be an item (a name that is not valid UTF-8, an id JSON cannot hold, an
object whose type cannot be read) is skipped with its reason, never a failed plan.
Run ids map to their OUTPUT location through the registry in the state store
(``moonbatch.workers.registry``), so ``moonbatch status RUN_ID`` finds a run from any machine of the fleet
even after Redis lost everything; the OUTPUT URL itself works everywhere too.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from moonbatch.config import Settings, get_settings
from moonbatch.producer.existing import ExistingOk
from moonbatch.producer.planner import Shard, plan_shards
from moonbatch.workers import cache, canary, layout, registry, stops
from moonbatch.workers.enqueue import BUILD_SHARD, FINALIZE_RUN, enqueue
from moonbatch.workers.lease import Lease, LeaseLost
from moonbatch.workers.models import PlanItem, RunSpec, SkillOptions, default_exports
from moonbatch.workers.readers import ListingStats, input_root, normalize_input, open_reader
from moonbatch.workers.runstate import Run, RunNotFound, open_output
from moonbatch.workers.storage import Store, get_json_or_none, normalize_url, put_json

log = logging.getLogger(__name__)


class RunExists(Exception):
    """OUTPUT holds a run this command cannot start over. ``run_id`` names it, ``state`` says
    what it is (``completed``, ``running``, ``failed``, ``cancelled``, ``planning``,
    ``unplanned``, ``unreadable``) and ``same`` whether the same command started it."""

    def __init__(self, message: str, *, run_id: str | None = None, state: str = "",
                 same: bool = False) -> None:
        super().__init__(message)
        self.run_id, self.state, self.same = run_id, state, same


class AlreadyComplete(RunExists):
    """The same command already ran to completion at OUTPUT; ``summary`` is its ``run.json``."""

    def __init__(self, message: str, *, run_id: str, summary: dict[str, Any]) -> None:
        super().__init__(message, run_id=run_id, state="completed", same=True)
        self.summary = summary


# A producer renews its planning lease every quarter of this while it lists and plans; a
# start whose lease expired (or was released) is dead and the same command takes it over.
PLANNING_LEASE_SECONDS = 30.0
# ``provider_options`` (fal's priority, payload retention, queue timeout) change how a run is
# sent, not its rows: the same command with other ones is still the same command.
_COMPARED = ("input", "output", "provider", "endpoint", "shard_size", "max_pixels", "model",
             "skip_existing", "input_kind", "input_options", "output_format", "more_options",
             "exports")


def _default_exports_of_both(held: RunSpec, wanted: RunSpec) -> bool:
    """True when each spec's exports are its skills' default (``--export`` not given): then
    a difference in exports only follows the skills', which is named on its own."""
    return all(spec.exports == default_exports(o.skill for o in spec.all_options)
               for spec in (held, wanted))


def command_differences(held: RunSpec, wanted: RunSpec) -> list[str]:
    """What differs between the command that started ``held`` and ``wanted``, as
    ``"name: held → wanted"`` strings (empty: the same command)."""
    diffs = [f"{k}: {getattr(held, k)} → {getattr(wanted, k)}" for k in _COMPARED
             if getattr(held, k) != getattr(wanted, k) and not (
                 k == "exports" and _default_exports_of_both(held, wanted))]
    a, b = held.options.model_dump(), wanted.options.model_dump()
    diffs += [f"{k}: {a.get(k)} → {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return diffs


def describe_output(store: Store, now: float | None = None, *, own_lease: bool = False
                    ) -> dict[str, Any]:
    """What OUTPUT holds, read from storage: ``{"spec": RunSpec | None, "raw_spec": dict |
    None, "state": str | None, "summary": dict | None, "failure": dict | None,
    "lease": dict | None}``. ``state`` is None when no run is there, else one of ``completed``,
    ``failed``, ``cancelled``, ``running`` (planned, not final), ``planning`` (a live producer
    is listing), ``unplanned`` (a start that stopped before its plan was complete),
    ``unreadable`` (a spec this version cannot read). ``own_lease``: the caller holds the
    planning lease (it does not count as another live producer). Raises storage errors."""
    now = time.time() if now is None else now
    raw = get_json_or_none(store, layout.SPEC)
    info: dict[str, Any] = {"spec": None, "raw_spec": raw, "state": None, "summary": None,
                            "failure": None, "lease": None}
    if raw is None:
        lease = get_json_or_none(store, layout.PLANNING)
        if lease is not None and lease.get("expires", 0) > now:
            info.update(state="planning", lease=lease)  # a producer about to write its spec
        return info
    try:
        info["spec"] = RunSpec.model_validate(raw)
    except ValueError:
        info["state"] = "unreadable"
        return info
    info["failure"] = get_json_or_none(store, layout.FAILED)
    if store.exists(layout.CANCELLED):
        info["state"] = "cancelled"
    elif store.exists(layout.PLAN):
        summary = get_json_or_none(store, layout.SUMMARY) or {}
        info["summary"] = summary
        final = store.exists(layout.FINALIZED) and summary.get("status") in ("completed", "failed",
                                                                       "stopped")
        info["state"] = summary["status"] if final else "failed" if info["failure"] else "running"
    else:
        lease = get_json_or_none(store, layout.PLANNING)
        live = not own_lease and lease is not None and lease.get("expires", 0) > now
        info.update(state="planning" if live else "unplanned", lease=lease)
    return info


def check_output_for(store: Store, spec: RunSpec, now: float | None = None, *,
                     own_lease: bool = False) -> str:
    """May ``spec`` start at ``store`` (its OUTPUT)? Returns ``"empty"`` (no run there: start
    it) or ``"takeover"`` (the same command's start stopped before its plan was complete and no
    live producer is planning it: plan it again, under its run id).

    Raises ``AlreadyComplete`` if the same command completed there, ``RunExists`` with a
    message saying what to do for anything else. Raises storage errors.
    """
    info = describe_output(store, now, own_lease=own_lease)
    state, held = info["state"], info["spec"]
    out = spec.output
    if state is None:
        return "empty"
    if state == "unreadable" or held is None:
        rid = (info["raw_spec"] or {}).get("run_id") if state == "unreadable" else None
        if state == "planning":
            raise RunExists(f"{out} is being planned by a live producer: wait for it, or choose "
                            "a new OUTPUT", state=state)
        raise RunExists(f"{out} holds run {rid} that this version cannot read: choose a new "
                        f"OUTPUT, or `moonbatch clean {out} --force`", run_id=rid, state=state)
    rid = held.run_id
    diffs = command_differences(held, spec)
    same = not diffs
    elsewhere = f"choose a new OUTPUT, or pass --force to start a new run in {out}<new run id>/"
    if not same:
        raise RunExists(f"{out} holds run {rid} ({state}) of another command "
                        f"({'; '.join(diffs)}): {elsewhere}", run_id=rid, state=state)
    failure = info["failure"] or {}
    why = f"{failure.get('where')}: {str(failure.get('error'))[:200]}" if failure else ""
    if state == "completed":
        raise AlreadyComplete(f"run {rid} at {out} is already complete (same input and "
                              "options): nothing to do", run_id=rid, summary=info["summary"])
    if state == "unplanned":
        return "takeover"
    messages = {
        "running": f"{out} holds run {rid}, not complete yet: continue it with `moonbatch resume "
                   f"{rid} --workers N` (or `moonbatch wait {rid}` while a fleet runs it)",
        "failed": f"{out} holds run {rid}, which failed ({why}): fix the cause and `moonbatch "
                  f"resume {rid} --workers N`, or `moonbatch clean {out}` to start again",
        "cancelled": f"{out} holds run {rid}, which was cancelled: `moonbatch clean {out}` to "
                     f"start again, or {elsewhere}",
        "planning": f"{out} holds run {rid}, being planned by a live producer (heartbeat "
                    f"{max(0.0, time.time() - (info['lease'] or {}).get('heartbeat', 0)):.0f}s "
                    f"ago): follow it with `moonbatch wait {rid}`",
    }
    reason = ((info["summary"] or {}).get("stop_reason") or {}).get("reason", "")
    messages["stopped"] = (f"{out} holds run {rid}, which stopped ({reason}): carry on with "
                           f"`moonbatch retry-failed {rid} --max-cost USD --workers N`, or "
                           f"{elsewhere}")
    if state == "failed" and info["summary"] and info["summary"].get("status") == "failed":
        messages["failed"] = (f"{out} holds run {rid}, which failed ({why}): `moonbatch clean "
                              f"{out}` to start again, or {elsewhere}")
    raise RunExists(messages[state], run_id=rid, state=state, same=True)


def new_run_id() -> str:
    """A sortable, unique run id: ``YYYYmmdd-HHMMSS-<6 hex>`` (UTC)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def local_queue(run_id: str) -> str:
    """The private broker queue of a run whose workers ``moonbatch run`` starts itself:
    ``moonbatch-run-<run_id>``, consumed by no fleet."""
    return f"moonbatch-run-{run_id}"


def register_run(spec: RunSpec, settings: Settings) -> None:
    """Record the run in the state store's registry and on its list of active runs, and arm
    the broker canary that lets a reconciler notice a broker that lost the run's messages.

    Raises storage errors when the state store cannot be written (the run id would be
    useless); a broker that cannot be reached only loses the canary (logged).
    """
    state = registry.open_state(settings)
    registry.record_run(state, run_id=spec.run_id, output=spec.output, input=spec.input,
                        skill=spec.skill_names, created_at=spec.created_at)
    registry.mark_active(state, spec.run_id, spec.output)
    try:
        canary.arm(settings, spec.run_id)
    except Exception as exc:
        log.warning("run %s: could not set the broker canary: %s", spec.run_id, exc)


def looks_like_url(ref: str) -> bool:
    """True if ``ref`` is a store URL or path rather than a run id."""
    return ref.startswith(("s3://", "file://", ".", "~")) or "/" in ref or "\\" in ref


def resolve_run(ref: str, settings: Settings) -> str:
    """The OUTPUT URL of a run given its id or its OUTPUT URL.

    Raises ``RunNotFound`` if the id is not in the registry of ``settings.state_url``.
    """
    if looks_like_url(ref):
        return normalize_url(ref)
    state = registry.open_state(settings)
    entry = registry.lookup_run(state, ref)
    if entry is None:
        raise RunNotFound(f"run {ref} is not in the registry at {state.url}: pass its OUTPUT "
                          "URL, or set MOONBATCH_STATE_URL to the state location it was "
                          "submitted with")
    return entry["output"]


def new_spec(input_url: str, output_url: str, options: SkillOptions | Sequence[SkillOptions],
             settings: Settings, *,
             shard_size: int | None = None, max_pixels: int | None = None,
             run_id: str | None = None, queue: str | None = None,
             provider: str | None = None, endpoint: str | None = None,
             input_format: str = "auto", **fields: Any) -> RunSpec:
    """The spec of a new run (URLs normalised, defaults from ``settings``; ``queue``: the broker
    queue of every step of the run, default ``settings.queue``, the fleet's; ``provider``:
    default ``settings.provider``; ``endpoint``: the provider's, resolved by
    ``Provider.complete_spec`` so the spec says what it calls).

    The provider checks the spec (``Provider.check_spec``) before it is returned, and the
    shard limits are the provider's (``Provider.limits``). Raises ``ValueError`` (one line
    naming the cause and the fix) for bad URLs, INPUT and OUTPUT at the same location, an
    unknown provider or endpoint, a skill or option the endpoint cannot serve, ``--endpoint``
    without fal, or a shard size beyond the provider's limit; ``RunNotFound`` for a
    ``skip_existing`` run id the registry does not know (an OUTPUT URL is kept as given).
    """
    from moonbatch.workers.providers import check_multi_image, get_provider

    if not isinstance(options, SkillOptions):
        options, *more = options
        fields["more_options"] = more
    if fields.get("skip_existing"):
        fields["skip_existing"] = resolve_run(fields["skip_existing"], settings)
    if fields.get("cache") is None:
        fields["cache"] = settings.cache
    if fields["cache"]:
        from moonbatch.workers.cache import resolve_url

        fields["cache_url"] = resolve_url(settings)
    (input_url, input_kind), output_url = normalize_input(input_url, input_format), \
        normalize_url(output_url)
    if input_url == output_url:
        raise ValueError("INPUT and OUTPUT must be different locations")
    name = provider or settings.provider
    chosen = get_provider(name)  # ValueError naming the known providers
    model = fields.pop("model", None) or settings.model
    spec = RunSpec(run_id=run_id or new_run_id(), input=input_url, output=output_url,
                   options=options, model=model, provider=name, endpoint=endpoint,
                   shard_size=settings.shard_size if shard_size is None else shard_size,
                   max_shard_bytes=settings.max_shard_bytes,
                   max_pixels=settings.max_pixels if max_pixels is None else max_pixels,
                   created_at=time.time(), queue=queue or settings.queue,
                   input_kind=input_kind, **fields)
    spec = chosen.complete_spec(spec)
    chosen.check_spec(spec)
    chosen.check_model(spec)  # refusals here; its warnings are the start's and the dry run's
    check_multi_image(chosen, spec)  # several --image-column
    limits = chosen.limits(spec)
    if not 1 <= spec.shard_size <= limits.max_lines:
        raise ValueError(f"--shard-size must be within 1..{limits.max_lines} ({limits.reason})")
    if spec.max_shard_bytes > limits.max_bytes:
        spec = spec.model_copy(update={"max_shard_bytes": limits.max_bytes})
    return spec


def submit_run(input_url: str, output_url: str, options: SkillOptions, settings: Settings, *,
               shard_size: int | None = None, max_pixels: int | None = None,
               run_id: str | None = None, queue: str | None = None,
               provider: str | None = None, endpoint: str | None = None,
               on_shard: Callable[[Shard], None] | None = None) -> dict[str, Any]:
    """Record a run at ``output_url``, plan ``input_url`` into shards and enqueue them on the
    run's broker ``queue`` (default ``settings.queue``, the fleet's; ``moonbatch run`` with
    local workers passes ``local_queue(run_id)``), which every later step of the run uses.

    Returns the plan document (``run_id``, ``shards``, ``items``, ``skipped``...). Raises
    ``AlreadyComplete`` if the same command completed there, ``RunExists`` if OUTPUT holds
    another run (or this one, unfinished), ``ValueError`` for bad URLs or limits, or a run the
    provider cannot serve (see ``new_spec``), storage errors if the stores cannot be reached.
    See ``start_run``.
    """
    spec = new_spec(input_url, output_url, options, settings, shard_size=shard_size,
                    max_pixels=max_pixels, run_id=run_id, queue=queue, provider=provider,
                    endpoint=endpoint)
    return start_run(spec, settings, on_shard=on_shard)


def printable(key: str) -> str:
    """``key`` as valid UTF-8 text: a local name that is not valid UTF-8 (Python's
    ``surrogateescape`` str of it) shows its bad bytes as ``\\xff``; anything else as it is."""
    try:
        key.encode()
        return key
    except UnicodeEncodeError:
        try:
            return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate that no file name decoded to
            return key.encode("utf-8", "backslashreplace").decode()


class _SkippedKeys:
    """Writes every skipped key to ``_moonbatch/skipped/part-NNNNN.jsonl`` (``{"key"}`` for an
    object that is not an image, ``{"key", "reason", "detail"}`` for one that cannot be an
    item), a part per ``layout.SKIPPED_PART_KEYS`` keys, so the list never sits in memory
    whole."""

    def __init__(self, store: Store) -> None:
        self.store, self.buffer, self.parts = store, [], 0

    def add(self, key: str, reason: str | None = None, detail: str | None = None) -> None:
        record = {"key": printable(key)}
        if reason is not None:
            record["reason"] = reason
            if detail:
                record["detail"] = printable(detail)
        self.buffer.append(record)
        if len(self.buffer) >= layout.SKIPPED_PART_KEYS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            import orjson

            body = b"".join(orjson.dumps(record) + b"\n" for record in self.buffer)
            self.store.put(layout.skipped_part(self.parts), body)
            self.parts += 1
            self.buffer = []

    def close(self, takeover: bool) -> int:
        """Write what is buffered and, when this start took a dead one's over
        (``takeover``), drop the parts it left beyond ours; returns the parts. (A new start
        wrote the spec to an OUTPUT without one: no earlier start's parts are there.)"""
        self.flush()
        extra = self.parts
        while takeover and self.store.exists(layout.skipped_part(extra)):
            self.store.delete(layout.skipped_part(extra))
            extra += 1
        return self.parts


def start_run(spec: RunSpec, settings: Settings, *,
              on_shard: Callable[[Shard], None] | None = None,
              output_checked: bool = False) -> dict[str, Any]:
    """Start ``spec`` at its OUTPUT: write its spec, plan its INPUT into shards and enqueue them.

    The producer holds a planning lease (``_moonbatch/planning.json``, renewed in the
    background) from before it writes the spec until its shards are enqueued, so a start that
    died (Ctrl-C, a crash, a reader error) is told apart from a live one: the same command met
    again takes a dead start over, under its run id, and plans it again. A start that died
    before ``plan.json`` enqueued nothing (see ``_plan``), so the takeover plans from scratch
    (plan files are deterministic: one it finds must match, ``_check_replan``); one that died
    after it is a run whose shards ``moonbatch resume`` enqueues.

    ``output_checked``: the caller ran ``check_output_for`` on this OUTPUT just before
    (``producer.submit.prepare``), so it is not read again here; what changed since is met
    under the lease, where the spec's create-if-absent fails and ``check_output_for`` says
    what OUTPUT holds, with the same errors.

    Returns the plan document. Raises ``AlreadyComplete``, ``RunExists`` (see
    ``check_output_for``), storage errors.
    """
    out = open_output(spec.output, settings)
    inp = open_output(input_root(spec), settings)
    if not output_checked:
        check_output_for(out, spec)  # read-only: say what OUTPUT holds before writing anything
    check_input_items(spec, inp, settings)  # e.g. duplicate manifest ids: before any write
    lease = Lease(out, layout.PLANNING, f"{spec.run_id}-{uuid.uuid4().hex[:8]}",
                  PLANNING_LEASE_SECONDS)
    if not lease.acquire():
        raise RunExists(f"{spec.output} is being planned by a live producer: follow it with "
                        "`moonbatch status`, or choose a new OUTPUT", state="planning")
    try:
        with lease.kept_alive() as lease_check:
            takeover = False
            if not put_json(out, layout.SPEC, spec.model_dump(), if_absent=True):
                if check_output_for(out, spec, own_lease=True) != "takeover":  # or raises
                    raise RunExists(f"{spec.output} already holds a run", state="running")
                spec = RunSpec.model_validate(get_json_or_none(out, layout.SPEC))
                takeover = True
                log.warning("run %s: its start stopped before the plan was complete; planning "
                            "it again", spec.run_id)
            return _plan(spec, settings, out, inp, takeover=takeover, on_shard=on_shard,
                         lease_check=lease_check)
    except LeaseLost:
        raise RunExists(f"{spec.output}: another producer took the planning of run "
                        f"{spec.run_id} over", run_id=spec.run_id, state="planning") from None
    finally:
        lease.release()


def _plan(spec: RunSpec, settings: Settings, out: Store, inp: Store, *, takeover: bool,
          on_shard: Callable[[Shard], None] | None, lease_check: Callable[[], None]
          ) -> dict[str, Any]:
    """Record the run (its summary, then the registry: ``register_run``) while listing INPUT
    and writing each shard's plan file as it fills, then the plan document, and only then
    enqueue every shard: a planning that raises part-way leaves nothing enqueued."""
    input_url, output_url = spec.input, spec.output

    def record() -> None:
        put_json(out, layout.SUMMARY, {"run_id": spec.run_id, "status": "running",
                                       "input": input_url, "output": output_url,
                                       "skill": spec.skill_names})
        register_run(spec, settings)
        # No round has reserved yet (the builds are enqueued after the plan, and a start
        # taken over had enqueued none): the books open empty, so the first builds need
        # not each list the run's state to load them. A broker out of reach leaves that to
        # them, as before.
        try:
            stops.Books(Run(spec, out, inp, settings), settings).open_empty()
        except stops.BooksUnavailable as exc:
            log.info("run %s: spend books not opened (%s); its builds open them", spec.run_id,
                     exc)

    skipped = _SkippedKeys(out)
    stats = PlanStats(on_skip=skipped.add)
    n_shards = 0
    # The records' round trips overlap the listing's (four in a row, before the first LIST
    # on their own); a record that failed stops the planning at its next shard.
    with cf.ThreadPoolExecutor(1, thread_name_prefix="record") as pool:
        recorded = pool.submit(record)
        for shard in iter_plan(spec, inp, stats, settings):
            lease_check()
            if recorded.done():
                recorded.result()  # raises its storage error
            body = b"".join(item.to_json() + b"\n" for item in shard.items)
            if takeover:
                _check_replan(out, shard.index, body)
            out.put(layout.plan_items(shard.index), body)
            n_shards += 1
            if on_shard:
                on_shard(shard)
        recorded.result()  # recorded before the plan is
    plan = {"run_id": spec.run_id, "shards": n_shards, "items": stats.items,
            "listed": stats.listed, "skipped": stats.skipped,
            "skipped_examples": [printable(k) for k in stats.skipped_examples],
            "skipped_reasons": stats.reasons, "skipped_parts": skipped.close(takeover),
            "skipped_existing": stats.skipped_existing, "planned_at": time.time()}
    lease_check()
    put_json(out, layout.PLAN, plan, if_absent=True)
    # The plan is durable: from here a stop is a run that `moonbatch resume` carries on.
    for index in range(n_shards):
        enqueue(BUILD_SHARD, (output_url, spec.run_id, index), queue=spec.queue)
    if not n_shards:
        # No shard will merge, so no merge finalises: a worker does. A plan with shards needs
        # no such message: plan.json precedes every build, so the merge of the last shard
        # finds the run complete and finalises it (a finalize_run beside the builds would
        # only take a worker slot from one of them).
        enqueue(FINALIZE_RUN, (output_url, spec.run_id), queue=spec.queue)
    # A producer that dies before this marker (its planning lease then lapses) leaves shards
    # nobody enqueued: the reconciler's next pass enqueues every step (workers.reconcile).
    out.put(layout.ENQUEUED, b"", if_absent=True)
    return plan


def check_input_items(spec: RunSpec, inp: Store, settings: Settings | None = None) -> None:
    """The reader's pre-pass, for readers that have one (``Reader.check()``, e.g. the
    manifest's: every row valid, no duplicate id), so an INPUT that cannot be run whole fails
    before anything is written or enqueued; and rows naming several images on a provider or
    skill that takes one (``check_multi_image``). Raises ``InputError``, ``ValueError``,
    storage errors."""
    from moonbatch.workers.providers import check_multi_image, provider_for

    reader = open_reader(spec, inp, settings)
    check = getattr(reader, "check", None)
    if check is not None:
        check()
    if getattr(reader, "several_images", False):  # e.g. a list-valued image column
        check_multi_image(provider_for(spec), spec, several=True)


@dataclasses.dataclass
class PlanStats(ListingStats):
    """``ListingStats`` of a planning: ``items`` are the items planned, and
    ``skipped_existing`` those left out for their ok row in ``spec.skip_existing``."""

    skipped_existing: int = 0


def _plannable(items: Iterator[PlanItem], stats: PlanStats) -> Iterator[PlanItem]:
    """``items`` without those a plan file cannot hold, each counted in ``stats`` as a
    skipped key with its reason: ``name_not_utf8`` (a local name that is not valid UTF-8: no
    JSON text, no row id can carry it) or ``not_serializable`` (e.g. an integer id beyond 64
    bits). One odd key never stops the plan."""
    for item in items:
        try:
            item.to_json()
            item.key.encode()
        except (TypeError, ValueError) as exc:  # orjson's JSONEncodeError, UnicodeEncodeError
            stats.items -= 1
            text = str(exc)
            utf8 = isinstance(exc, UnicodeError) or "surrogates" in text or "UTF-8" in text
            stats.skip(_shown_id(item.id), "name_not_utf8" if utf8 else "not_serializable",
                       " ".join(text.split())[:200])
            continue
        yield item


def _single_unless_allowed(items: Iterator[PlanItem], spec: RunSpec) -> Iterator[PlanItem]:
    """``items``, raising ``ValueError`` (``check_multi_image``) at the first with several
    images when the run's provider or skill cannot send them: a reader without a pre-pass
    shows a list-valued image column only here, still before anything is sent."""
    from moonbatch.workers.providers import check_multi_image, provider_for

    checked = False
    for item in items:
        if item.more and not checked:
            check_multi_image(provider_for(spec), spec, several=True)
            checked = True
        yield item


def _shown_id(item_id: Any) -> str:
    return printable(item_id) if isinstance(item_id, str) else printable(repr(item_id))[:200]


def _without_existing(items: Iterator[PlanItem], existing: ExistingOk, stats: PlanStats
                      ) -> Iterator[PlanItem]:
    """``items`` without those whose id has an ok row in ``existing`` (counted in ``stats``)."""
    for item in items:
        if item.id in existing:
            stats.items -= 1
            stats.skipped_existing += 1
            continue
        yield item


def iter_plan(spec: RunSpec, inp: Store, stats: PlanStats, settings: Settings | None = None
              ) -> Iterator[Shard]:
    """INPUT's shards as the run plans them: the reader's items (``moonbatch.workers.readers``; ``inp``
    is the store at ``input_root(spec)``, and OUTPUT is hidden when it lies inside it), less
    those with an ok row in the run at ``spec.skip_existing`` (read first, see
    ``producer.existing``), cut by ``plan_shards`` within the spec's shard size and the
    provider's limits. ``stats`` counts what the reader saw and what was left out. Raises
    storage errors, ``InputError`` for an INPUT its reader cannot read, and ``ValueError`` for
    limits the provider refuses or a ``skip_existing`` location without a run. Items a plan
    cannot hold are skipped with their reason (``_plannable``)."""
    from moonbatch.workers.providers import provider_for

    root, output_url = inp.url, spec.output
    exclude = output_url[len(root):] if output_url.startswith(root) else None
    reader = open_reader(spec, inp, settings)
    items = _plannable(reader.iter_items(stats, exclude_prefix=exclude), stats)
    items = _single_unless_allowed(items, spec)
    if spec.skip_existing:
        existing = ExistingOk.load(spec.skip_existing, settings or get_settings())
        items = _without_existing(items, existing, stats)
    return plan_shards(items,
                       max_lines=spec.shard_size, max_bytes=spec.max_shard_bytes,
                       fragment_len=len(spec.options.line_fragment()),
                       limits=provider_for(spec).limits(spec))


def dry_run(spec: RunSpec, settings: Settings, *, cache_check: bool = False
            ) -> dict[str, Any]:
    """What ``spec`` would do, without doing any of it: list and plan INPUT exactly as a run
    does (``iter_plan``) and ask the provider for its estimate (``Provider.estimate``: for the
    whole run, and per planned shard for the request count, as each shard packs its own
    requests). Writes nothing, reaches no
    broker, registry or provider, needs no credentials.

    Returns ``{"dry_run": True, "provider", "endpoint", "model", "provider_options", "exports",
    "input",
    "output", "skill", "listed",
    "items", "skipped", "skipped_examples", "skipped_reasons", "skip_existing",
    "skipped_existing", "shards", "images", "images_per_item",
    "image_bytes", "requests", "upload_bytes", "input_tokens", "output_tokens",
    "compute_seconds", "cost_usd", "basis", "details", "warnings"}`` (``details`` and
    ``warnings``: the provider's lines, ``Estimate``; ``skipped_existing``: items left out for
    their ok row at ``skip_existing``; ``items`` counts the others; ``images``: the images of
    all items, ``images_per_item``: ``{"<images in an item>": <items>}``, e.g. ``{"2": 40}``
    for a manifest of pairs), and ``"cache"``: with ``cache_check`` (reads every image, looks
    it up in the result cache, writes nothing) ``{"checked": True, "items", "served", "hits",
    "copies", "saved_usd"}`` (``saved_usd``: the estimate's share of the served items; None
    without a price), else ``{"checked": False, "note"}``.
    (token, second and cost fields are None where the provider has no such figure). Raises
    storage errors when INPUT cannot be listed, ``InputError`` when it cannot be run (see
    ``check_input_items``).
    """
    from moonbatch.workers.providers import provider_for

    provider = provider_for(spec)
    stats = PlanStats()
    shards = image_bytes = requests = 0
    inp = open_output(input_root(spec), settings)
    check_input_items(spec, inp, settings)
    per_item: dict[int, int] = {}  # images in an item → items
    checking = cache_check and cache.reads(spec)
    if checking:
        from moonbatch.workers.readers import ItemFetcher

        fetcher = ItemFetcher(inp, settings, local_input=not spec.input.startswith("s3://"))
        store = cache.open_cache(spec, settings)
        scans: list[dict[str, Any]] = []
        claimed: dict[str, list[int]] = {}  # key → [shard, index]: the run's claims, in memory

        def claim_in(number: int) -> Any:
            def claim(key: str, index: int) -> list[int] | None:
                holder = claimed.setdefault(key, [number, index])
                return holder if holder[0] < number else None
            return claim
    for shard in iter_plan(spec, inp, stats, settings):
        if checking:
            scans.append(cache.scan(shard.items, spec, fetcher.get, store,
                                    concurrency=settings.fetch_concurrency,
                                    claim=claim_in(shards)))
        size = sum(item.size for item in shard.items)
        for item in shard.items:
            n = 1 + len(item.more) if item.more else 1
            per_item[n] = per_item.get(n, 0) + 1
        shards += 1
        image_bytes += size
        # Each shard packs its own requests (fal's batched endpoints: 32 images a request).
        requests += provider.estimate(spec, len(shard.items), size, 1).requests
    whole = provider.estimate(spec, stats.items, image_bytes, shards,
                              images=sum(n * k for n, k in per_item.items()))
    return {"dry_run": True, "provider": spec.provider, "endpoint": spec.endpoint,
            "model": spec.model, "provider_options": spec.provider_options,
            "exports": spec.exports,
            "input": spec.input, "output": spec.output, "skill": spec.skill_names,
            "listed": stats.listed, "items": stats.items, "skipped": stats.skipped,
            "skipped_examples": [printable(k) for k in stats.skipped_examples],
            "skipped_reasons": stats.reasons,
            "skip_existing": spec.skip_existing, "skipped_existing": stats.skipped_existing,
            "shards": shards,
            "images": sum(n * c for n, c in per_item.items()),
            "images_per_item": {str(n): per_item[n] for n in sorted(per_item)},
            "image_bytes": image_bytes, "requests": requests,
            "upload_bytes": whole.upload_bytes, "input_tokens": whole.input_tokens,
            "output_tokens": whole.output_tokens, "compute_seconds": whole.seconds,
            "cost_usd": whole.cost_usd, "basis": whole.basis,
            "details": list(whole.details), "warnings": list(whole.warnings),
            "cache": _cache_report(spec, cache_check, cache.summarize(scans) if checking
                                   else None, whole.cost_usd)}


def _cache_report(spec: RunSpec, checked: bool, counts: dict[str, int] | None,
                  cost: float | None) -> dict[str, Any]:
    """A dry run's ``cache`` entry (see ``dry_run``)."""
    if counts is None:
        note = ("off (--no-cache or MOONBATCH_CACHE=0)" if not spec.cache
                else "not read: the run samples (temperature > 0); add --cache-sampled"
                if checked else "not checked (add --cache-check: reads every image)")
        return {"checked": False, "note": note}
    copies = counts["copies"] + counts.get("waits", 0)  # in the shard, or in another one
    served = counts["hits"] + copies
    items = counts["items"]
    return {"checked": True, "items": items, "served": served, "hits": counts["hits"],
            "copies": copies, "lookups": counts["lookups"],
            "saved_usd": None if cost is None or not items else cost * served / items}


def _check_replan(out: Store, shard: int, body: bytes) -> None:
    """A taken-over start may rewrite a shard's plan only if it is the same, or if no worker
    started the shard yet. Raises ``RunExists`` when INPUT changed under a started shard."""
    old = out.get(layout.plan_items(shard)) if out.exists(layout.plan_items(shard)) else None
    if old is None or old == body:
        return
    if next(iter(out.iter_objects(layout.shard_prefix(shard))), None) is not None:
        raise RunExists(f"{out.url}: INPUT changed since the stopped start of this run, whose "
                        f"shard {shard} is already under way: `moonbatch clean {out.url} "
                        "--force` then run again, or choose a new OUTPUT", state="unplanned")
