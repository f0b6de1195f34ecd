"""Providers: the services that annotate a round of a shard, behind one small interface.

The shared pipeline (``moonbatch.workers.tasks``: planning, leases, rounds, merging, outputs, resume,
reconcile, cancel) never names a provider. It drives every round through four calls:

    submit_round(ctx)   under the shard's lease: send the round (or its first part); True when
                        something is now at the provider, False when no item was sendable
    poll_round(ctx)     once per poll (under the lease unless ``polls_only_look``):
                        ``Poll(done, countdown, progress)``
    collect_round(ctx)  the round's item-indexed results, or ``Resend`` / None (not ready)
    cancel_run(run)     stop what is in flight at the provider (``moonbatch cancel``)

and answers what the shared code asks before and after: ``settings_class`` (its own variables,
read through ``Settings.section``), ``credential`` and ``check_credentials`` (preflight),
``complete_spec``/``check_spec``/``check_model``/``limits`` (a new run), ``estimate`` (a dry
run), ``describe`` and ``Wording`` (status, summary, dry-run and cancel text), ``reject_merge`` and
``duplicate_submissions`` (a round's merge and a shard's counts). Its metric labels are its own:
it passes them to ``moonbatch.workers.metrics`` (``api_call(name, label, ...)``).

A round's results are **result lines** of the Batch API's output line shape (seed 002,
"Output format"), whatever the provider: ``{"line_index": int, "id": str | None, "status":
"ok", "result": {...}, "usage": {...}}`` or ``{"line_index", "id", "status": "error", "error":
{"code", "message"}}``, each given as a dict, or as JSONL text: bytes of one or more whole
lines (the Batch API provider hands over its result files' text unparsed, a piece at a time:
the merge decodes the usual lines in bulk, faster than a dict per line could be built).
``line_index`` indexes ``ShardBuild.lines`` (the round's sendable items in order). The shared
merge (``moonbatch.workers.merge``) turns them into output rows.

A provider is one package under ``workers/providers/`` with a class implementing ``Provider``
plus one entry in ``PROVIDERS``; shared code names no provider (``tests/test_layering.py``). Its
own state documents live under the round's prefix (``ctx.doc(name)``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from moonbatch.workers import layout
from moonbatch.workers.storage import get_json, get_json_or_none

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

    from moonbatch.config import Settings
    from moonbatch.workers.merge import MergeStats
    from moonbatch.workers.models import BatchRecord, PlanItem, RunSpec, SkillOptions
    from moonbatch.workers.runstate import Run
    from moonbatch.workers.storage import Store

#: Provider name → ``"module:Class"`` (imported on first use, so the producer's planning never
#: imports a provider's HTTP stack it does not use).
PROVIDERS: dict[str, str] = {
    "moondream": "moonbatch.workers.providers.moondream:MoondreamBatchProvider",
    "fal": "moonbatch.workers.providers.fal:FalProvider",
    "moondream-realtime": "moonbatch.workers.providers.realtime:RealtimeProvider",
}
#: The provider of ``MOONBATCH_PROVIDER`` unset, and of runs recorded before providers existed.
DEFAULT_PROVIDER = "moondream"


class ProviderError(Exception):
    """A call to a provider failed; the message names the action and the HTTP status, never a
    key or a presigned URL. Pickles with its class and attributes (Celery otherwise reports a
    subclass with a keyword-only constructor as its nearest picklable base)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore_error, (self.__class__, str(self), self.__dict__.copy())


def _restore_error(cls: type[ProviderError], message: str, state: dict[str, Any]
                   ) -> ProviderError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class TransientProviderError(ProviderError):
    """A provider call that may succeed later (network, 429, 5xx): the task retries it."""


class Later(TransientProviderError):
    """The round cannot move yet; look again in ``countdown`` seconds (the task re-enqueues
    itself and holds no worker slot meanwhile)."""

    def __init__(self, message: str, countdown: float = 0.0) -> None:
        super().__init__(message)
        self.countdown = countdown


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one shard may hold for a provider: ``max_lines`` items and ``max_bytes`` of
    estimated request bytes, ``item_bytes(key, size, fragment_len)`` being the planning
    estimate of one item's (an object of ``size`` bytes; ``fragment_len``: bytes of the skill's
    options in the request); ``reason`` says where ``max_lines`` comes from (for the
    ``--shard-size`` message)."""

    max_lines: int
    max_bytes: int
    item_bytes: Callable[[str, int, int], int]
    reason: str


@dataclasses.dataclass(frozen=True)
class Wording:
    """How the CLI and status documents speak of a provider's work: ``unit``/``units`` (one
    round's unit of work: a batch, a request), ``at`` (where work in flight is: "the API"),
    ``cancelled`` (what ``cancel_run``'s count counts, plural form: "open upload(s) aborted")."""

    unit: str
    units: str
    at: str
    cancelled: str


@dataclasses.dataclass
class RoundContext:
    """Everything a provider needs about one round of one shard: the run (spec and stores),
    ``id_prefix`` (prefix of every id the round sends; unique to the round), ``heartbeat``
    (call it between slow steps: it renews the lease and raises to stop the round), ``renew``
    (renews the shard's lease at once, raising ``LeaseLost`` if another execution holds it:
    call it right before a call that bills; ``renew(force=False)`` skips the renewal when the
    lease was renewed within the last quarter of its life, for calls made at every step),
    ``checkpointed(progress, next_in)`` (a poll that runs long and records the round as it goes
    calls it at each record: ``Poll.progress``'s fields, its next record due in ``next_in``
    seconds, so the round's poll chain shows alive meanwhile; raises storage errors),
    ``progress`` (a poll's: the round's ``progress.json`` as the poll read it, holding what
    the chain's last poll recorded; None: not read), ``ledger`` (a provider that moves in
    steps, ``moonbatch.workers.stepped``: the round's ledger as this task's step recorded it or
    its merge read it, so a look right after need not read it again; None: not known),
    ``batch`` (the round's ``batch.json`` as the task read it, written once: a collect need
    not read it again; None: not read), and, read from
    storage on first use (a Batch API poll needs neither), the shard's ``items`` (plan order)
    and ``todo`` (this round's item indices; None: all)."""

    run: Run
    shard: int
    rnd: int
    settings: Settings
    id_prefix: str
    heartbeat: Callable[[], None] = lambda: None
    renew: Callable[..., None] = lambda force=True: None
    checkpointed: Callable[[dict[str, Any], float], None] = lambda progress, next_in: None
    progress: Mapping[str, Any] | None = None
    ledger: dict[str, Any] | None = None
    batch: Mapping[str, Any] | None = None

    @functools.cached_property
    def items(self) -> Sequence[PlanItem]:
        """The shard's planned items, in plan order."""
        return self.run.items(self.shard)

    @functools.cached_property
    def todo(self) -> Sequence[int] | None:
        """The item indices of this round (None: every item, round 0; with the result cache
        on, round 0's are those its cache pass left to send: ``cache.json``'s ``send``)."""
        if self.rnd == 0:
            if not self.run.spec.cache:
                return None
            doc = get_json_or_none(self.store, self.doc("cache"))
            return None if doc is None else doc["send"]
        return get_json(self.store, self.doc("todo"))["items"]

    @property
    def store(self) -> Store:
        """The run's OUTPUT store, where the round's state documents live."""
        return self.run.output

    def doc(self, name: str) -> str:
        """Key of one of this round's state documents."""
        return layout.round_doc(self.shard, self.rnd, name)

    def indices(self) -> Sequence[int]:
        """The item indices of this round, in plan order."""
        return range(len(self.items)) if self.todo is None else self.todo


@dataclasses.dataclass
class Poll:
    """One poll of a round: ``done`` (results can be collected), ``countdown`` (seconds to the
    next poll when not done) and ``progress`` (``status``, ``total``, ``completed``, ``failed``
    and provider fields, stored in ``progress.json``; no URLs).

    ``paced``: the countdown is the provider's own pace between steps that send (a real-time
    round whose lines wait), not a look at work in flight at the service: it is kept as is (at
    most ``poll_max_interval``), not raised to ``poll_min_interval``."""

    done: bool
    countdown: float
    progress: dict[str, Any]
    paced: bool = False


@dataclasses.dataclass
class RoundResults:
    """A finished round: its result ``lines`` (see the module docstring), the error of a whole
    failed submission (``batch_error``, ``{"code", "message"}``: every sent item gets it), and
    ``stats`` the provider adds to ``merged.json`` (ints)."""

    lines: Iterable[Any]
    batch_error: dict[str, str] | None = None
    stats: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Resend:
    """The whole round failed in a way a new round may fix (``reason`` is recorded)."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A dry run's estimate for ``items`` images of ``image_bytes`` in all: ``requests``
    (batches or HTTP requests), ``upload_bytes`` sent, ``input_tokens``/``output_tokens`` or
    ``seconds`` of compute, ``cost_usd``, ``basis`` (how the price was reckoned), ``details``
    (one line each of what the run would send besides images: its model and price, its
    provider's own options) and ``warnings`` (one line each of what a user should look at
    before running it, e.g. a model name the price table does not know)."""

    items: int
    requests: int
    upload_bytes: int
    input_tokens: int | None
    output_tokens: int | None
    seconds: float | None
    cost_usd: float | None
    basis: str
    details: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


class Provider(Protocol):
    """The interface every provider implements (see the module docstring)."""

    name: ClassVar[str]
    #: Per-item error codes a later round may fix (they go into the next round).
    retryable_codes: ClassVar[frozenset[str]]
    #: Its own settings (a pydantic-settings class; ``settings.section(settings_class)``).
    settings_class: ClassVar[type[BaseSettings]]
    #: The credential the preflight checks, for messages: ``"API key (MOONDREAM_API_KEY)"``.
    credential: ClassVar[str]
    wording: ClassVar[Wording]
    #: Its client's actions → the ``endpoint`` label of ``moonbatch_api_requests_total`` (a
    #: closed set; ``metrics.endpoint_label``). Its calls record ``metrics.api_call(name, ...)``.
    metric_actions: ClassVar[Mapping[str, str]]
    #: True when ``poll_round`` only looks (one status call: nothing sent, no document
    #: written but the progress the task writes): the task polls without the shard's lease
    #: and keeps one chain by compare-and-swap on ``progress.json``. False: each poll is a
    #: step under the lease (it may send, and record as it goes).
    polls_only_look: ClassVar[bool]
    #: Whether one request may carry several images (a query's ``images``; seed 002, "Common
    #: fields"); ``check_multi_image`` refuses multi-image input on a provider without it.
    multi_image: ClassVar[bool]

    def complete_spec(self, spec: RunSpec) -> RunSpec:
        """``spec`` with this provider's defaults resolved (e.g. fal's endpoint for the skill),
        so the stored spec says what the run calls. Pure."""

    def describe(self, doc: Mapping[str, Any]) -> str:
        """One phrase naming the provider and what it calls, for a snapshot, summary or dry
        run (``doc``: a run's spec, ``run.json`` or dry-run report): ``"moondream (Batch
        API)"``, ``"fal (fal-ai/moondream3-preview/caption)"``."""

    def upload_note(self, report: Mapping[str, Any]) -> str:
        """A remark on a dry run's upload bytes (``""``: none), e.g. that images go as URLs."""

    def count_units(self, shards: Sequence[Mapping[str, Any]]) -> int:
        """How many units of work (``wording.units``) a run sent, from the shard entries of
        its snapshot or ``run.json`` (``"batches"``: one per shard, with ``requests``)."""

    def check_spec(self, spec: RunSpec) -> None:
        """Refuse a run this provider cannot serve before anything is sent: ``ValueError`` with
        one line naming the cause and the fix (e.g. a skill the endpoint does not serve)."""

    def check_model(self, spec: RunSpec) -> list[str]:
        """Refuse ``spec.model`` (``--model``/``MOONBATCH_MODEL``; None: the service's default)
        where this provider cannot send it, before anything is sent: ``ValueError`` with one
        line naming the models it can run. Returns warnings (one line each) about a model it
        sends but cannot vouch for (e.g. a name missing from the price table)."""

    def limits(self, spec: RunSpec) -> Limits:
        """How big a shard may be."""

    def check_credentials(self, settings: Settings) -> str | None:
        """One cheap authenticated call: None when the key works (or the answer proves
        nothing), else one line naming the problem and the fix."""

    def estimate(self, spec: RunSpec, items: int, image_bytes: int, shards: int,
                 images: int | None = None) -> Estimate:
        """What the run would send and cost (``moonbatch submit --dry-run``). ``images``: the
        images of all items (None: one per item; more for multi-image items)."""

    def submit_round(self, ctx: RoundContext) -> bool:
        """Send round ``ctx.rnd`` (idempotent: a round already sent is not sent again). Writes
        ``build.json`` (``ShardBuild``) and ``batch.json`` (``BatchRecord``) when something was
        sent. Returns False when no item was sendable (only error rows). Raises ``Later``,
        ``ProviderError`` kinds and storage errors."""

    def poll_round(self, ctx: RoundContext, last: tuple[float, int] | None) -> Poll:
        """Look at the round once (and move it on, for providers that send in steps); ``last``
        is ``(time, finished)`` of the chain's earliest poll that saw progress, else of the
        previous poll (``shard.rate_since``; None: the chain's first poll). Raises
        ``ProviderError`` kinds."""

    def first_poll_in(self, ctx: RoundContext) -> float | None:
        """Seconds from ``submit_round`` to the round's first poll when the provider keeps its
        own pace (a round sent in steps says when its next step is due); None: the fleet's poll
        interval (``poll_min_interval``)."""

    def done_at_submit(self, ctx: RoundContext) -> dict[str, Any] | None:
        """The round's progress (``progress.json``'s fields, as ``Poll.progress``) when
        ``submit_round`` finished it (every line answered within the build): the build then
        goes straight to the merge, with no poll. None: the round goes on, or is looked at by
        polls."""

    def progress_at_submit(self, ctx: RoundContext) -> dict[str, Any] | None:
        """Asked of a provider whose polls only look (``polls_only_look``), after
        ``submit_round`` sent the round: its progress then (``Poll.progress``'s fields, what
        the first poll needs, e.g. the batch's id), recorded as its poll chain's start, so
        that poll reads nothing. None: the first poll reads what it needs."""

    def collect_round(self, ctx: RoundContext) -> RoundResults | Resend | None:
        """The finished round's results; ``Resend`` when the round must be sent again; None
        when it is not finished (poll again)."""

    def cancel_run(self, run: Run) -> int:
        """Cancel what the run has in flight at the provider; returns how many things were
        cancelled (``wording.cancelled``). Best effort."""

    def reject_merge(self, ctx: RoundContext, record: BatchRecord | None,
                     stats: MergeStats) -> str | None:
        """A reason to send the round again rather than keep its merge (``stats``: what the
        merge counted), e.g. a submission adopted after a lost answer that returned other
        items' ids; None: keep it."""

    def duplicate_submissions(self, ctx: RoundContext) -> int:
        """Submissions the round may have paid for twice (a lost answer sent again), counted
        in the shard's ``duplicate_batches``."""

    # -- spend (``moonbatch.workers.stops``) ---------------------------------------------------
    #: True when a round is sent in steps that reserve their own spend
    #: (``stops.reserve_step``); False: the whole round is reserved before it is sent.
    spends_in_steps: ClassVar[bool]
    #: Per-item error codes that are the item's own input's fault (never counted by
    #: ``--max-error-rate``), besides ``stops.INPUT_CODES``.
    input_error_codes: ClassVar[frozenset[str]]

    def round_estimate(self, ctx: RoundContext) -> float:
        """Dollars the round would cost if every item of it were sent (an upper estimate,
        reserved against the budget before anything is sent)."""

    def cost(self, usage: Mapping[str, float], spec: RunSpec) -> float:
        """Dollars of results whose usage sums to ``usage`` (``input_tokens``,
        ``output_tokens``, ``items``: ok results, and any other numeric usage field the
        provider reports, e.g. ``billable_units``)."""


_instances: dict[str, Provider] = {}

#: The skills whose request takes several images (seed 002, "Common fields": ``images``, for query).
MULTI_IMAGE_SKILLS = frozenset({"query"})


def check_multi_image(provider: Provider, spec: RunSpec, *, several: bool | None = None) -> None:
    """Refuse a run whose items have several images (``several``; None: whether the spec names
    several image columns, ``--image-column`` repeated) when ``provider`` cannot send several
    images in one request (``Provider.multi_image``) or a skill of the run cannot take them
    (only query can: seed 002, "Common fields"). Raises ``ValueError``: one line naming the
    cause and the fix. Call it where specs are checked, and again once the input shows a
    list-valued image column, before anything is sent."""
    from moonbatch.workers.readers import image_columns

    if several is None:
        several = len(image_columns(spec.input_options)) > 1
    if not several:
        return
    if not getattr(provider, "multi_image", False):
        raise ValueError(f"--provider {provider.name} sends one image per request, and INPUT's "
                         "rows name several images: use --provider moondream (the Batch API "
                         "takes several images per query), or one --image-column")
    others = [o.skill for o in spec.all_options if o.skill not in MULTI_IMAGE_SKILLS]
    if others:
        raise ValueError(f"--skill {others[0]} takes one image per request, and INPUT's rows "
                         "name several images: use --skill query alone (only a query "
                         "compares several images), or one --image-column")


# -- estimates shared by the providers' dry runs (labelled estimates: no service publishes
# per-image token counts) ----------------------------------------------------------------------
CROP_TOKENS = 729  # one 378x378 crop (27x27 patches); the model sees at most 12 crops + 1 global
BYTES_TO_PIXELS = 5  # a photograph's JPEG holds about 1.6 bits per pixel
# segment: an SVG path of a few dozen points and curves (docs.moondream.ai/skills/segment).
OUTPUT_TOKENS = {"caption:short": 20, "caption:normal": 60, "caption:long": 150,
                 "query": 40, "query+reasoning": 100, "detect": 30, "point": 30, "segment": 200}


def estimate_input_tokens(image_bytes: int, max_pixels: int) -> int:
    """Estimated input tokens of one image of ``image_bytes`` (sent at most ``max_pixels``; 0:
    no cap): 729 per 378x378 crop, at most 12 crops, plus the global view (FACTS.md)."""
    import math

    pixels = image_bytes * BYTES_TO_PIXELS
    if max_pixels:
        pixels = min(pixels, max_pixels)
    return CROP_TOKENS * (min(12, max(1, math.ceil(pixels / 378 ** 2))) + 1)


def estimate_output_tokens(options: SkillOptions) -> int:
    """Estimated output tokens of one answer for ``options`` (capped by ``max_tokens``)."""
    if options.skill == "caption":
        n = OUTPUT_TOKENS[f"caption:{options.length or 'normal'}"]
    elif options.skill == "query":
        n = OUTPUT_TOKENS["query" if options.reasoning is False else "query+reasoning"]
    else:
        n = OUTPUT_TOKENS[options.skill]
    return min(n, options.max_tokens) if options.max_tokens else n


def get_provider(name: str) -> Provider:
    """The provider called ``name`` (one instance per process). ``ValueError`` names the known
    providers for an unknown name."""
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}: choose one of {', '.join(PROVIDERS)}")
    if name not in _instances:
        module, _, cls = PROVIDERS[name].partition(":")
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]


def provider_for(spec: RunSpec) -> Provider:
    """The provider of a run."""
    return get_provider(spec.provider)


def provider_of(doc: Mapping[str, Any]) -> Provider:
    """The provider of a recorded run's document (a spec, ``run.json``, a dry-run report):
    its ``provider`` field, ``DEFAULT_PROVIDER`` for runs recorded before providers existed."""
    return get_provider(doc.get("provider") or DEFAULT_PROVIDER)
