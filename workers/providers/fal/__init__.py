"""The fal.ai provider: a round of a shard as many requests to one fal queue endpoint.

Endpoints (seeds 000, 001, 003, 004; FACTS.md "fal queue API"):

    fal-ai/moondream3-preview/{caption,query,detect,point}   one image per request
    fal-ai/moondream2/visual-query                           one image, one prompt
    fal-ai/moondream/batched                                 up to 32 {image_url, prompt}
    fal-ai/moondream-next/batch                              a ZIP of up to 32 images, one prompt

A round moves in **steps** (``submit_round`` runs the first, every ``poll_round`` one more),
each under the shard's lease and none sleeping in a worker slot:

1. poll every request in flight; fetch a COMPLETED request's result at once (fal keeps results
   of 10 KB or more only 6 minutes) and turn it into result lines;
2. take slots of the endpoint's fleet-wide cap (``moonbatch.workers.slots``: fal's concurrency plus a
   queue ahead of it, so fal never waits for a step to start its next request) and send the
   next requests: the round's lines in order, resends first;
3. write the finished lines (``results-NNNNN.jsonl``, write-once) and then the ledger
   (``requests.json``: cursor, requests in flight with their ids, resends).

A request id is in storage before anyone waits on it: the ledger is written in the step that
sent it, before the next poll is scheduled. A request fal forgot (404: its result outlived the
retention while workers were down) ends as ``result_expired``, one that COMPLETED with an error
as ``request_failed``: both are retried in the next round (``MOONBATCH_MAX_ITEM_ATTEMPTS``).
A 422 ends as ``invalid_input`` naming the field. 429 puts the request back and backs off.
The ledger is in OUTPUT, which others may be able to write: its request ids are only ever
used through ``FalQueueClient``, which builds the URLs on the configured queue's origin (URL
fields that earlier versions stored are ignored); an id that cannot be fal's ends its lines as
``request_failed``, sent again in the next round.

Images reach fal as presigned GET URLs of the input store when the stored bytes are sent as they
are (no upload through the worker, small request bodies); as data URIs when fal could not reach
the object (a local INPUT) or the bytes sent are not the stored object's (converted or
downscaled images, and the ZIP archives moonbatch builds for ``moondream-next/batch``).

Modules: ``client`` (the queue client), ``endpoints`` (the endpoint table), ``payloads``
(request bodies, answers, archives), ``ledger`` (fal's fields of the round's ledger, when the
next step is due), ``steps`` (fal's part of a step), ``settings`` (its environment variables).
The round-in-steps machinery itself (ledger, results documents, the compare-and-swap step,
collect, abandon) is shared with the real-time provider: ``moonbatch.workers.stepped``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar

from moonbatch.workers import layout
from moonbatch.workers.models import RunSpec, realtime_only_refusal
from moonbatch.workers.providers import (
    Estimate,
    Limits,
    Poll,
    RoundContext,
    Wording,
    estimate_input_tokens,
    estimate_output_tokens,
)
from moonbatch.workers.providers.fal.client import (
    METRIC_ACTIONS,
    PRIORITIES,
    FalAuthError,
    FalBadRequestId,
    FalError,
    FalQueueClient,
    FalTransient,
    queue_headers,
)
from moonbatch.workers.providers.fal.client import OPTIONS as QUEUE_OPTIONS
from moonbatch.workers.providers.fal.endpoints import (
    check_model,
    check_options,
    default_endpoint,
    endpoint_of,
    entry_endpoint,
    skill_endpoints,
)
from moonbatch.workers.providers.fal.payloads import estimate_request_bytes
from moonbatch.workers.providers.fal.settings import FalSettings
from moonbatch.workers.providers.fal.steps import RoundSteps, queue_client
from moonbatch.workers.stepped import ledger_done, progress
from moonbatch.workers.storage import get_json_or_none

log = logging.getLogger(__name__)

MAX_SHARD_LINES = 100_000  # the most images moonbatch puts in one shard for fal
RETRYABLE_CODES = frozenset({"result_expired", "request_failed"})
SECONDS_PER_IMAGE = 1.0  # for the dry run's compute estimate (an estimate)


class FalProvider(RoundSteps):
    """fal.ai's queue API as a provider (see the module docstring)."""

    name: ClassVar[str] = "fal"
    retryable_codes: ClassVar[frozenset[str]] = RETRYABLE_CODES
    settings_class: ClassVar[type[FalSettings]] = FalSettings
    credential: ClassVar[str] = "FAL key (FAL_KEY)"
    metric_actions: ClassVar[Mapping[str, str]] = METRIC_ACTIONS
    # Every fal endpoint takes one image (or one image per entry) per prompt (seeds 000-004).
    multi_image: ClassVar[bool] = False
    wording: ClassVar[Wording] = Wording(unit="request", units="requests", at="fal",
                                         cancelled="request(s) in flight cancelled")
    polls_only_look: ClassVar[bool] = False  # a poll step sends and records
    spends_in_steps: ClassVar[bool] = True  # each step reserves what it sends
    #: A 422 names the input's field (``invalid_input``); fal's other errors are its own.
    input_error_codes: ClassVar[frozenset[str]] = frozenset({"invalid_input"})

    def complete_spec(self, spec: RunSpec) -> RunSpec:
        """The endpoint, default ``fal-ai/moondream3-preview/<skill>``, and ``store_io``
        (default ``MOONBATCH_FAL_STORE_IO``, off), stored resolved."""
        update: dict[str, Any] = {}
        if not spec.endpoint:
            update["endpoint"] = default_endpoint(spec.options.skill)
        if "store_io" not in spec.provider_options:
            from moonbatch.config import get_settings

            store = get_settings().section(FalSettings).fal_store_io
            update["provider_options"] = {**spec.provider_options, "store_io": store}
        return spec.model_copy(update=update) if update else spec

    def describe(self, doc: Mapping[str, Any]) -> str:
        """``fal (<endpoint>)``."""
        return f"{self.name} ({doc.get('endpoint') or 'default endpoint'})"

    def upload_note(self, report: Mapping[str, Any]) -> str:
        """S3 images that need no conversion go as presigned URLs: no upload bytes."""
        if not report.get("upload_bytes") and str(report.get("input", "")).startswith("s3://"):
            return "images go as presigned URLs"
        return ""

    # -- before the run --------------------------------------------------------------------------
    def check_spec(self, spec: RunSpec) -> None:
        """A skill or option only the real-time API serves (``realtime_only``), an unknown
        endpoint, a skill or option it cannot serve, a model it does not run
        (``check_model``), or a provider option fal does not take or a value out of range
        (``priority`` normal|low, ``store_io`` a bool, ``request_timeout`` seconds > 0):
        ``ValueError``."""
        refusal = realtime_only_refusal(spec, self.name)
        if refusal:
            raise ValueError(refusal)
        for endpoint, options in zip(skill_endpoints(spec), spec.all_options, strict=True):
            check_options(endpoint, options)
        self.check_model(spec)
        opts = spec.provider_options
        unknown = sorted(set(opts) - set(QUEUE_OPTIONS))
        if unknown:
            raise ValueError(f"provider option {unknown[0]!r} is not fal's: fal takes "
                             f"{', '.join(QUEUE_OPTIONS)}")
        if opts.get("priority") is not None and opts["priority"] not in PRIORITIES:
            raise ValueError(f"--priority {opts['priority']}: choose one of "
                             f"{', '.join(PRIORITIES)}")
        if not isinstance(opts.get("store_io", False), bool):
            raise ValueError("--fal-store-io is on or off (a bool)")
        timeout = opts.get("request_timeout")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"--queue-timeout {timeout}: must be a number of seconds > 0")

    def check_model(self, spec: RunSpec) -> list[str]:
        """fal's endpoints run a fixed model (``fal-ai/moondream/batched`` one of two, named
        in its ``model_id``, seed 001): ``--model`` is refused unless every endpoint of the
        run runs it (``endpoints.check_model``). No warnings."""
        for endpoint in skill_endpoints(spec):
            check_model(endpoint, spec.model)
        return []

    def limits(self, spec: RunSpec) -> Limits:
        """fal has no batch file: a shard is bounded by its line count only (the bytes bound
        is far above what a shard of that many images sends in requests)."""
        return Limits(max_lines=MAX_SHARD_LINES, max_bytes=2_000_000_000,
                      item_bytes=estimate_request_bytes,
                      reason=f"the most images moonbatch puts in one shard for --provider {self.name}")

    def check_credentials(self, settings: Any) -> str | None:
        """A status call on a request that cannot exist: 401/403 means the key is wrong; 404 (or
        any other answer) means fal took the key."""
        fal = settings.section(FalSettings)
        key = fal.fal_key.get_secret_value() if fal.fal_key else ""
        if not key:
            return ("FAL key: FAL_KEY is not set: export FAL_KEY=<your key> (create one at "
                    "https://fal.ai/dashboard/keys)")
        client = FalQueueClient(fal.fal_queue_url, key, timeout=10, get_attempts=2)
        try:
            client.status("fal-ai/moondream3-preview", str(uuid.uuid4()))
        except FalAuthError:
            return (f"FAL key: fal at {fal.fal_queue_url} refused the key in FAL_KEY: set "
                    "a valid key (https://fal.ai/dashboard/keys)")
        except FalTransient as exc:
            if exc.status is None and not exc.maybe_sent:
                return (f"FAL key: cannot reach fal's queue at {fal.fal_queue_url}: check "
                        "the network, or MOONBATCH_FAL_QUEUE_URL")
        except FalError:
            pass  # 404 and friends: the key was accepted
        finally:
            client.close()
        return None

    def estimate(self, spec: RunSpec, items: int, image_bytes: int, shards: int,
                 images: int | None = None) -> Estimate:
        """Requests, bytes, tokens or seconds and dollars; prices from FACTS.md, token and
        second counts are estimates; ``details`` name the model and the queue headers sent."""
        return dataclasses.replace(self._estimate(spec, items, image_bytes, shards),
                                   details=self.details(spec))

    def details(self, spec: RunSpec) -> list[str]:
        """What the run sends besides images: the endpoints' model and the queue headers."""
        eps = skill_endpoints(spec)
        model = spec.model or eps[0].models[0]
        field = eps[0].model_field
        out = [f"model: {model} " + (f"(sent as {field})" if field and spec.model else
                                     f"(the model of {', '.join(e.id for e in eps)})")]
        opts = spec.provider_options
        headers = queue_headers(opts)
        out.append("priority: " + (opts.get("priority") or "normal (fal's default)")
                   + (f" (X-Fal-Queue-Priority: {headers['X-Fal-Queue-Priority']})"
                      if "X-Fal-Queue-Priority" in headers else ""))
        out.append("payload retention: " + (
            "on: fal keeps inputs and outputs 30 days (X-Fal-Store-IO: 1)"
            if opts.get("store_io") else "off (X-Fal-Store-IO: 0; MOONBATCH_FAL_STORE_IO or "
            "--fal-store-io turns it on)"))
        out.append("queue timeout: " + (
            f"{headers['X-Fal-Request-Timeout']} s to start (X-Fal-Request-Timeout)"
            if "X-Fal-Request-Timeout" in headers else "none (a request waits in fal's queue "
            "until it starts)"))
        return out

    def _estimate(self, spec: RunSpec, items: int, image_bytes: int, shards: int) -> Estimate:
        ep = endpoint_of(spec)
        k = len(spec.all_options)  # a request per image and skill in a multi-skill run
        requests = k * sum(math.ceil(n / ep.max_images) for n in _split(items, shards))
        avg = image_bytes // items if items else 0
        in_tok = k * items * estimate_input_tokens(avg, spec.max_pixels)
        out_tok = items * sum(estimate_output_tokens(o) for o in spec.all_options)
        # Data URIs for a local INPUT and for archives; S3 images go as presigned URLs.
        presigned = spec.input.startswith("s3://") and spec.input_kind in ("prefix", "manifest")
        upload = image_bytes if not presigned or ep.kind == "archive" else 0
        if ep.usd_per_second is not None:
            seconds = items * SECONDS_PER_IMAGE
            return Estimate(items, requests, math.ceil(upload * 4 / 3), None, None, seconds,
                            seconds * ep.usd_per_second,
                            f"${ep.usd_per_second} per second of compute (fal); "
                            f"~{SECONDS_PER_IMAGE:g} s per image is an estimate")
        if ep.usd_per_m_input is not None:
            cost = in_tok / 1e6 * ep.usd_per_m_input + out_tok / 1e6 * (ep.usd_per_m_output or 0)
            return Estimate(items, requests, math.ceil(upload * 4 / 3), in_tok, out_tok, None,
                            cost, f"${ep.usd_per_m_input}/M input and ${ep.usd_per_m_output}/M "
                            "output tokens (fal); token counts are estimates")
        return Estimate(items, requests, math.ceil(upload * 4 / 3), in_tok, out_tok, None, None,
                        f"{ep.id} has no published price (FACTS.md)")

    # -- spend -----------------------------------------------------------------------------------
    def item_estimate(self, spec: RunSpec, size: int) -> float:
        """Dollars of one image of ``size`` bytes sent for every skill of the run: tokens at
        the endpoint's token price, or ``SECONDS_PER_IMAGE`` at its price per second; 0 for
        an endpoint without a published price."""
        ep = endpoint_of(spec)
        if ep.usd_per_second is not None:
            return SECONDS_PER_IMAGE * ep.usd_per_second * len(spec.all_options)
        if ep.usd_per_m_input is None:
            return 0.0
        in_tok = estimate_input_tokens(size, spec.max_pixels) * len(spec.all_options)
        out_tok = sum(estimate_output_tokens(o) for o in spec.all_options)
        return (in_tok * ep.usd_per_m_input + out_tok * (ep.usd_per_m_output or 0)) / 1e6

    def round_estimate(self, ctx: RoundContext) -> float:
        """The dollars of every item of the round (``item_estimate`` of each)."""
        spec, items = ctx.run.spec, ctx.items
        return sum(self.item_estimate(spec, items[i].size) for i in ctx.indices())

    def cost(self, usage: Mapping[str, float], spec: RunSpec) -> float:
        """Reported tokens at the endpoint's token price; ``billable_units`` at its price per
        unit (second) where fal reported them; else the estimate of ``items`` results (an
        endpoint that reports no usage)."""
        ep = endpoint_of(spec)
        if ep.usd_per_second is not None and usage.get("billable_units"):
            return float(usage["billable_units"]) * ep.usd_per_second
        if ep.usd_per_m_input is not None and (usage.get("input_tokens")
                                               or usage.get("output_tokens")):
            return (usage.get("input_tokens", 0) * ep.usd_per_m_input
                    + usage.get("output_tokens", 0) * (ep.usd_per_m_output or 0)) / 1e6
        return usage.get("items", 0) * self.item_estimate(spec, 0)

    # -- a round (submit_round, collect_round, abandon_unsent: moonbatch.workers.stepped) ---------
    def poll_round(self, ctx: RoundContext, last: tuple[float, int] | None) -> Poll:
        """One step (see the module docstring)."""
        ledger, countdown = self.step_poll(ctx)
        return Poll(done=ledger_done(ledger), countdown=countdown, progress=progress(ledger))

    def cancel_run(self, run: Any) -> int:
        """Cancel every request in flight (latest round of every shard): a PUT to the cancel
        URL built from the request id and endpoint on the configured queue (a ledger's own
        URL fields, written by earlier versions, are never called)."""
        client = queue_client()
        default = endpoint_of(run.spec)
        cancelled = 0
        for obj in run.output.iter_objects(layout.SHARDS):
            key = layout.parse_shard_key(obj.key)
            if key is None or key.name != "requests":
                continue
            ledger = get_json_or_none(run.output, obj.key) or {}
            for entry in (ledger.get("inflight") or {}).values():
                if not isinstance(entry, dict):
                    continue
                endpoint = entry_endpoint(entry, default)
                try:
                    if client.cancel(endpoint.id, entry.get("request_id")) == \
                            "CANCELLATION_REQUESTED":
                        cancelled += 1
                except FalBadRequestId:
                    log.warning("%s names a request id that is not fal's (the document was "
                                "altered): that request was not cancelled", obj.key)
                except FalError as exc:
                    rid = entry.get("request_id")
                    log.warning("could not cancel request %s: %s", rid, exc,
                                extra={"request_id": rid})
        return cancelled


def _split(items: int, shards: int) -> list[int]:
    """``items`` spread over ``shards`` as the planner fills them (all full but the last)."""
    if shards <= 0:
        return []
    per = math.ceil(items / shards)
    return [min(per, items - i * per) for i in range(shards) if items - i * per > 0]
