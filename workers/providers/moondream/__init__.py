"""The Moondream Batch API provider (seed ``002_b16f4baad5ce048b.txt``): a round is one batch.

    submit_round   upload: JSONL lines → a multipart upload → mpu-complete → batch.json
    poll_round     GET /batch/{id}: status and progress, an adaptive countdown (polling)
    collect_round  download: the result files, verified → their result lines as sent
    cancel_run     abort the multipart uploads still open (the API cannot cancel a batch)

Modules: ``client`` (the HTTP client, with ``errors`` and ``answers``), ``upload`` (a round's
lines and its multipart upload), ``recovery`` (the round's claim of ``mpu-complete`` and
lost-answer recovery), ``download`` (result files), ``lines`` (JSONL lines and the API's
limits), ``polling``, ``records`` (its round documents and batch claims), ``settings`` (its
environment variables). Result lines are the API's own output lines.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from moonbatch.config import Settings, get_settings
from moonbatch.workers import layout, metrics, registry
from moonbatch.workers.models import (
    BatchRecord,
    RunSpec,
    provider_options_refusal,
    realtime_only_refusal,
)
from moonbatch.workers.providers import (
    Estimate,
    Limits,
    Poll,
    Resend,
    RoundContext,
    RoundResults,
    Wording,
    estimate_input_tokens,
    estimate_output_tokens,
)
from moonbatch.workers.providers.moondream import records
from moonbatch.workers.providers.moondream.client import METRIC_ACTIONS, BatchClient
from moonbatch.workers.providers.moondream.download import fetch_results
from moonbatch.workers.providers.moondream.lines import (
    API_MAX_FILE_BYTES,
    API_MAX_LINES,
    estimate_line_bytes,
)
from moonbatch.workers.providers.moondream.polling import next_poll_interval
from moonbatch.workers.providers.moondream.settings import MoondreamSettings
from moonbatch.workers.providers.moondream.upload import build_and_submit
from moonbatch.workers.providers.prices import DEFAULT_MODEL, REALTIME_USD_PER_M, model_price
from moonbatch.workers.providers.prices import SOURCE as PRICE_SOURCE
from moonbatch.workers.storage import get_json, get_json_or_none

if TYPE_CHECKING:
    from moonbatch.workers.merge import MergeStats

log = logging.getLogger(__name__)

# Batch-level codes worth a resubmission; the others (validation_error, limit_exceeded,
# empty_batch, invalid_model) would fail the same way again (seed 002, "Batch-level errors").
TRANSIENT_BATCH_CODES = frozenset({"processing_failed", "timeout"})
LINE_OVERHEAD_BYTES = 200  # id and skill fields of a line, besides the base64 image
KEY_CHECK_SECONDS = 8.0  # the whole API-key check (three tries at most)
API_KEYS_PAGE = "https://moondream.ai/c/cloud/api-keys"
KNOWN_MODELS = tuple(REALTIME_USD_PER_M)  # the models the price table knows


@functools.cache
def batch_client() -> BatchClient:
    """This process's Batch API client (key and URL from settings)."""
    s = get_settings()
    own = s.section(MoondreamSettings)
    return BatchClient(own.moondream_url, own.api_key(), timeout=s.http_timeout,
                       max_attempts=s.http_max_attempts, backoff_initial=s.http_backoff_initial,
                       backoff_max=s.http_backoff_max)


def check_api_key(settings: Settings, timeout: float = KEY_CHECK_SECONDS) -> str | None:
    """One authenticated call, ``GET /batch?limit=1``: 401/403 means the key is wrong. A 429 or
    5xx proves nothing either way and is let through (the run's own calls retry them)."""
    own = settings.section(MoondreamSettings)
    key = own.moondream_api_key.get_secret_value() if own.moondream_api_key else ""
    if not key:
        return ("API key: MOONDREAM_API_KEY is not set: export MOONDREAM_API_KEY=<your key> "
                f"(create one at {API_KEYS_PAGE})")
    url = own.moondream_url
    response = None
    with httpx.Client(timeout=httpx.Timeout(timeout / 3),
                      headers={"X-Moondream-Auth": key, "User-Agent": "moonbatch"}) as client:
        for attempt in range(3):
            try:
                response = client.get(f"{url}/batch", params={"limit": 1})
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Nothing answers there; str(exc) may quote the URL: the type says enough.
                return (f"API key: cannot reach the Moondream Batch API at {url} "
                        f"({type(exc).__name__}): check the network, or MOONBATCH_MOONDREAM_URL")
            except httpx.TransportError:
                response = None  # a dropped connection or a slow answer: inconclusive
            if response is not None and response.status_code not in (408, 425, 429) \
                    and response.status_code < 500:
                break
            if attempt < 2:
                time.sleep(0.3)
    if response is None:
        return None  # the service is there but flaky: the run's own calls retry
    if response.status_code in (401, 403):
        return (f"API key: the Moondream Batch API at {url} refused the key in "
                f"MOONDREAM_API_KEY (HTTP {response.status_code}): set a valid key "
                f"(see {API_KEYS_PAGE})")
    if response.status_code == 404:
        return (f"API key: {url}/batch does not exist (HTTP 404): MOONBATCH_MOONDREAM_URL must "
                "be the Batch API's base URL, e.g. https://api.moondream.ai/v1")
    if 400 <= response.status_code < 500 and response.status_code not in (408, 425, 429):
        return (f"API key: the Moondream Batch API at {url} answered HTTP "
                f"{response.status_code} to a batch listing: check MOONBATCH_MOONDREAM_URL")
    return None


#: The ``progress.json`` field where a poll keeps the round's batch record for the next poll.
RECORD = "record"


def _polled_record(progress: Mapping[str, Any] | None) -> BatchRecord | None:
    """The round's batch record as a poll kept it in ``progress`` (``RECORD``), or None when
    it holds none (or one not understood: then batch.json is read)."""
    kept = (progress or {}).get(RECORD)
    if not isinstance(kept, dict) or not kept.get("batch_id"):
        return None
    try:
        return BatchRecord(batch_id=kept["batch_id"], file_id=None,
                           submitted_at=kept["submitted_at"], lines=kept["lines"])
    except (KeyError, ValueError):
        return None


class MoondreamBatchProvider:
    """The Moondream Batch API as a provider (see the module docstring)."""

    name: ClassVar[str] = "moondream"
    retryable_codes: ClassVar[frozenset[str]] = frozenset({"processing_error"})
    settings_class: ClassVar[type[MoondreamSettings]] = MoondreamSettings
    credential: ClassVar[str] = "API key (MOONDREAM_API_KEY)"
    metric_actions: ClassVar[Mapping[str, str]] = METRIC_ACTIONS
    # A query line may carry ``images`` (seed 002, "Common fields").
    multi_image: ClassVar[bool] = True
    wording: ClassVar[Wording] = Wording(unit="batch", units="batches", at="the API",
                                         cancelled="open upload(s) aborted")
    polls_only_look: ClassVar[bool] = True  # a poll is one status GET
    spends_in_steps: ClassVar[bool] = False  # a round is one batch: reserved whole
    #: Seed 002's per-line codes that name the line's own input.
    input_error_codes: ClassVar[frozenset[str]] = frozenset(
        {"invalid_request", "image_decode_failed", "unknown_skill"})

    def complete_spec(self, spec: RunSpec) -> RunSpec:
        """Nothing to resolve: the API's model is ``spec.model`` (None: its default)."""
        return spec

    def describe(self, doc: Mapping[str, Any]) -> str:
        """``moondream (Batch API)``."""
        return f"{self.name} (Batch API)"

    def upload_note(self, report: Mapping[str, Any]) -> str:
        """Images always go inside the JSONL: nothing to add."""
        return ""

    def count_units(self, shards: Sequence[Mapping[str, Any]]) -> int:
        """One batch per shard entry."""
        return len(shards)

    def check_spec(self, spec: RunSpec) -> None:
        """Every skill of seed 002 is served, not what only the real-time API serves
        (``realtime_only``: segment, spatial refs); ``--endpoint`` and the provider options
        (``--priority``, ``--fal-store-io``, ``--queue-timeout``) are fal's."""
        refusal = realtime_only_refusal(spec, self.name)
        if refusal:
            raise ValueError(refusal)
        if spec.endpoint:
            raise ValueError("--endpoint applies to --provider fal only: leave it out, or add "
                             "--provider fal")
        refusal = provider_options_refusal(spec, self.name, "the Batch API has no such control")
        if refusal:
            raise ValueError(refusal)

    def check_model(self, spec: RunSpec) -> list[str]:
        """Any model is sent as given in ``mpu-complete``'s ``model`` (FACTS.md: the API's
        list of model identifiers is not published where we could read it, so none is
        refused); one not in the price table (``prices.model_price``) gets a warning."""
        if spec.model is None or model_price(spec.model, "batch").known:
            return []
        return [f"--model {spec.model}: not in moonbatch's price table (known: "
                f"{', '.join(KNOWN_MODELS)}; a finetune is moondream3-preview/<finetune_id>@"
                "<step>): sent as given (the Batch API fails the batch with invalid_model if "
                "it does not serve it) and priced as the dearest known model"]

    def limits(self, spec: RunSpec) -> Limits:
        """Seed 002, "Limits": 100,000 lines and 2 GB per batch file; an item's bytes are its
        line's (``estimate_line_bytes``)."""
        return Limits(max_lines=API_MAX_LINES, max_bytes=API_MAX_FILE_BYTES,
                      item_bytes=estimate_line_bytes, reason="the Batch API's line limit")

    def check_credentials(self, settings: Settings) -> str | None:
        """``GET /batch?limit=1`` with the key (see ``check_api_key``)."""
        return check_api_key(settings)

    def estimate(self, spec: RunSpec, items: int, image_bytes: int, shards: int,
                 images: int | None = None) -> Estimate:
        """One batch per shard; upload = base64 images plus line overhead; the model's batch
        price (``moonbatch.workers.providers.prices``); token counts are estimates."""
        images = items if images is None else images  # a multi-image item: each image's tokens
        avg = image_bytes // images if images else 0
        in_tok = images * estimate_input_tokens(avg, spec.max_pixels)
        out_tok = items * estimate_output_tokens(spec.options)
        upload = math.ceil(image_bytes * 4 / 3) + items * LINE_OVERHEAD_BYTES
        price = model_price(spec.model, "batch")
        model = f"{spec.model}, sent in each batch's mpu-complete" if spec.model else \
            f"{DEFAULT_MODEL} (the API's default: no model is sent)"
        return Estimate(items, shards, upload, in_tok, out_tok, None,
                        price.cost(in_tok, out_tok),
                        f"{price.label()} ({PRICE_SOURCE}); token counts are estimates",
                        details=[f"model: {model}"],
                        warnings=self.check_model(spec))

    def round_estimate(self, ctx: RoundContext) -> float:
        """The batch's dollars if every item of the round is sent: estimated tokens of each
        item (its own size) and skill at the model's batch price."""
        spec = ctx.run.spec
        items = ctx.items
        in_tok = sum(estimate_input_tokens(items[i].size, spec.max_pixels)
                     for i in ctx.indices()) * len(spec.all_options)
        out_tok = len(ctx.indices()) * sum(estimate_output_tokens(o) for o in spec.all_options)
        return model_price(spec.model, "batch").cost(in_tok, out_tok)

    def cost(self, usage: Mapping[str, float], spec: RunSpec) -> float:
        """Tokens the API reported (each result line's ``usage``) at the model's batch price."""
        return model_price(spec.model, "batch").cost(int(usage.get("input_tokens", 0)),
                                                     int(usage.get("output_tokens", 0)))

    def submit_round(self, ctx: RoundContext) -> bool:
        """Build the round's JSONL, upload it and submit the batch (``build_and_submit``)."""
        s = ctx.settings
        own = s.section(MoondreamSettings)
        spec = ctx.run.spec
        _, batch = build_and_submit(
            shard=ctx.shard, items=ctx.items, options=spec.options, model=spec.model,
            fetch=ctx.run.fetcher.get, state=ctx.store, client=batch_client(),
            part_size=own.part_size, concurrency=s.fetch_concurrency, max_pixels=spec.max_pixels,
            upload_concurrency=own.upload_concurrency, rnd=ctx.rnd, todo=ctx.todo,
            # The fences before the claim and before mpu-complete: a lease renewed within
            # the last quarter of its life (its keep-alive renews it every quarter) is
            # surely this execution's (no other takes it over before it expires), as fal's
            # sends rely on; an older one is renewed at once (a stalled or partitioned
            # execution finds it taken over). Two writes per build fewer.
            heartbeat=ctx.heartbeat, renew=lambda: ctx.renew(force=False),
            claims=records.BatchClaims(registry.open_state(s), output=spec.output,
                                        shard=ctx.shard, rnd=ctx.rnd),
            id_prefix=ctx.id_prefix, more=spec.more_options)
        if batch is not None:
            ctx.batch = batch.model_dump()  # batch.json as recorded: progress_at_submit's
        return batch is not None

    def poll_round(self, ctx: RoundContext, last: tuple[float, int] | None) -> Poll:
        """One status call; the next poll comes sooner as progress moves (see
        ``next_poll_interval``)."""
        s = ctx.settings
        record = _polled_record(ctx.progress)
        if record is None:  # the chain's first poll: the round's batch.json
            record = BatchRecord.model_validate(get_json(ctx.store, ctx.doc("batch")))
        status = batch_client().get_batch(record.batch_id or "")
        now = time.time()
        total = record.lines if status.total is None else status.total  # none while chunking
        finished = status.completed + status.failed
        countdown = 0.0 if status.done else next_poll_interval(
            elapsed=now - record.submitted_at, total=total, completed=finished, last=last,
            now=now, min_interval=s.poll_min_interval,
            max_interval=min(s.poll_max_interval, s.visibility_timeout / 4))
        return Poll(done=status.done, countdown=countdown, progress={
            "batch_id": status.id, "status": status.status, "total": total,
            "completed": status.completed, "failed": status.failed, "finished": finished,
            # batch.json's fields a poll needs, for the chain's next poll (write-once there)
            RECORD: {"batch_id": record.batch_id, "submitted_at": record.submitted_at,
                     "lines": record.lines}})

    def collect_round(self, ctx: RoundContext) -> RoundResults | Resend | None:
        """Download and verify the batch's result files (fresh URLs); a batch that failed
        transiently is sent again while attempts remain, else its error marks every line."""
        raw = ctx.batch if ctx.batch is not None else get_json_or_none(ctx.store,
                                                                        ctx.doc("batch"))
        if raw is None:
            return RoundResults(lines=())
        record = BatchRecord.model_validate(raw)
        status = batch_client().get_batch(record.batch_id or "")
        if not status.done:
            return None
        if status.status == "failed":
            metrics.batch(self.name, "failed")
            code = status.error_code()
            if code in TRANSIENT_BATCH_CODES and ctx.rnd + 1 < ctx.settings.max_item_attempts:
                log.warning("shard %d: batch %s failed (%s); resubmitting", ctx.shard,
                            status.id, code)
                metrics.batch(self.name, "resubmitted")
                return Resend(f"batch {status.id} failed: {code}")
            return RoundResults(lines=(), batch_error={
                "code": code, "message": f"batch {status.id} failed: {status.error_message()}"})
        files, dstats = fetch_results(batch_client(), status)
        metrics.batch(self.name, "completed")
        # The files' text as it is, in pieces of whole lines: the merge decodes them in bulk.
        return RoundResults(files, stats={
            "corrupt_downloads": dstats.corrupt, "url_refreshes": dstats.refreshes})

    def cancel_run(self, run: Any) -> int:
        """Abort every multipart upload the run left open (``upload.json``)."""
        if get_settings().section(MoondreamSettings).moondream_api_key is None:
            return 0
        aborted = 0
        for obj in run.output.iter_objects(layout.SHARDS):
            if (key := layout.parse_shard_key(obj.key)) and key.name == "upload":
                doc = get_json_or_none(run.output, obj.key)
                if doc:
                    batch_client().abort_upload(doc["file_id"], doc["upload_id"])
                    run.output.delete(obj.key)
                    aborted += 1
        return aborted

    def reject_merge(self, ctx: RoundContext, record: BatchRecord | None,
                     stats: MergeStats) -> str | None:
        """A batch adopted after a lost ``mpu-complete`` answer (``record.recovered``) whose
        results carry other items' ids was not this round's: send the round again rather
        than merge foreign results."""
        if record is not None and record.recovered and stats.id_mismatch:
            log.error("shard %d round %d: adopted batch %s returned %d foreign ids; sending the "
                      "round again", ctx.shard, ctx.rnd, record.batch_id, stats.id_mismatch)
            return f"adopted batch {record.batch_id} was not this round's"
        return None

    def first_poll_in(self, ctx: RoundContext) -> float | None:
        """None: a batch is first looked at after the poll interval (it needs chunking and
        processing time at the service)."""
        return None

    def progress_at_submit(self, ctx: RoundContext) -> dict[str, Any] | None:
        """The batch just recorded (``ctx.batch``, set by ``submit_round``), as a poll keeps
        it (``RECORD``): the chain's first poll then reads no batch.json."""
        raw = ctx.batch
        if not raw or not raw.get("batch_id"):
            return None
        return {"batch_id": raw["batch_id"], "status": "submitted", "total": raw["lines"],
                "completed": 0, "failed": 0, "finished": 0,
                RECORD: {"batch_id": raw["batch_id"], "submitted_at": raw["submitted_at"],
                         "lines": raw["lines"]}}

    def done_at_submit(self, ctx: RoundContext) -> None:
        """None: a batch submitted is never finished yet; polls look at it."""
        return None

    def duplicate_submissions(self, ctx: RoundContext) -> int:
        """Batches a lost answer may have made twice (``orphans.json``, written by
        ``upload``)."""
        return (get_json_or_none(ctx.store, ctx.doc("orphans")) or {"count": 0})["count"]
