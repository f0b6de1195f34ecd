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
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import dataclasses
import functools
import io
import logging
import math
import posixpath
import re
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import orjson

from moonbatch.workers import layout, metrics, slots
from moonbatch.workers.lines import ItemError, PreparedImage, prepare_image, skill_line_id
from moonbatch.workers.models import BatchRecord, PlanItem, RunSpec, ShardBuild, SkillOptions
from moonbatch.workers.pool import ordered_map
from moonbatch.workers.providers import (
    Estimate,
    Limits,
    Poll,
    RoundContext,
    RoundResults,
    estimate_input_tokens,
    estimate_output_tokens,
)
from moonbatch.workers.providers.fal_queue import (
    FalAuthError,
    FalBadRequestId,
    FalError,
    FalGone,
    FalLimited,
    FalQueueClient,
    FalRequestError,
    FalTransient,
    Submitted,
)
from moonbatch.workers.readers import item_options, read_item, unexpected_error
from moonbatch.workers.storage import NotFound, StorageError, get_json_or_none, put_json

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FalEndpoint:
    """One fal endpoint: the ``skills`` it serves, how it takes images (``"single"``: one
    ``image_url``; ``"inputs"``: a list of ``{image_url, prompt}``; ``"archive"``: a ZIP in
    ``images_data_url``), images per request, the options it accepts, and its price."""

    id: str
    skills: frozenset[str]
    kind: str
    max_images: int = 1
    options: frozenset[str] = frozenset()  # of SkillOptions' tuning fields
    max_tokens_range: tuple[int, int] | None = None
    usd_per_m_input: float | None = None
    usd_per_m_output: float | None = None
    usd_per_second: float | None = None


_M3 = dict(usd_per_m_input=0.40, usd_per_m_output=3.50)  # FACTS.md prices
ENDPOINTS: dict[str, FalEndpoint] = {e.id: e for e in (
    FalEndpoint("fal-ai/moondream3-preview/caption", frozenset({"caption"}), "single",
                options=frozenset({"length", "temperature", "top_p"}), **_M3),
    FalEndpoint("fal-ai/moondream3-preview/query", frozenset({"query"}), "single",
                options=frozenset({"question", "reasoning", "temperature", "top_p"}), **_M3),
    FalEndpoint("fal-ai/moondream3-preview/detect", frozenset({"detect"}), "single",
                options=frozenset({"object"}), **_M3),
    FalEndpoint("fal-ai/moondream3-preview/point", frozenset({"point"}), "single",
                options=frozenset({"object"}), **_M3),
    FalEndpoint("fal-ai/moondream2/visual-query", frozenset({"query", "caption"}), "single",
                options=frozenset({"question", "length"})),
    FalEndpoint("fal-ai/moondream/batched", frozenset({"query", "caption"}), "inputs",
                max_images=32, options=frozenset({"question", "length", "max_tokens",
                                                  "temperature", "top_p"}),
                max_tokens_range=(32, 1024)),
    FalEndpoint("fal-ai/moondream-next/batch", frozenset({"caption", "query"}), "archive",
                max_images=32, options=frozenset({"question", "length", "max_tokens"}),
                max_tokens_range=(1, 512), usd_per_second=0.0011),
)}

#: What a prompt-only endpoint is asked for a caption of each length.
CAPTION_PROMPTS = {"short": "Describe this image in one sentence.",
                   "normal": "Describe this image.",
                   "long": "Describe this image in detail."}
RETRYABLE_CODES = frozenset({"result_expired", "request_failed"})
MAX_IMAGE_BYTES = 10_000_000  # per image; bigger ones are re-encoded or downscaled
MAX_REQUEST_BYTES = 32_000_000  # data URIs of one request of the batched endpoints
PRESIGN_SECONDS = 6 * 3600  # a queued request fetches its image when it runs
RESULT_LIFETIME = 360.0  # fal keeps results of 10 KB or more this long (FACTS.md)
FIRST_ESTIMATE = 2.0  # seconds a request takes, until the round has measured it
SECONDS_PER_IMAGE = 1.0  # for the dry run's compute estimate (an estimate)


def default_endpoint(skill: str) -> str:
    """``fal-ai/moondream3-preview/<skill>``: the endpoint for a skill when none is given."""
    return f"fal-ai/moondream3-preview/{skill}"


def endpoint_of(spec: RunSpec) -> FalEndpoint:
    """The run's endpoint; ``ValueError`` naming the known ones for an unknown id."""
    name = spec.endpoint or default_endpoint(spec.options.skill)
    if name not in ENDPOINTS:
        raise ValueError(f"unknown fal endpoint {name!r}: use one of {', '.join(ENDPOINTS)}")
    return ENDPOINTS[name]


def skill_endpoints(spec: RunSpec) -> list[FalEndpoint]:
    """The endpoint of each of the run's skills (``spec.all_options`` order): the run's
    endpoint for a single skill; ``fal-ai/moondream3-preview/<skill>`` for each skill of a
    multi-skill run. Raises ``ValueError`` (one line with the fix) for a multi-skill run with
    another ``--endpoint``."""
    if not spec.multi_skill:
        return [endpoint_of(spec)]
    if spec.endpoint not in (None, default_endpoint(spec.options.skill)):
        raise ValueError(f"several skills on fal use fal-ai/moondream3-preview/<skill> for each: "
                         f"leave --endpoint {spec.endpoint} out, or run one skill")
    return [ENDPOINTS[default_endpoint(o.skill)] for o in spec.all_options]


def check_options(endpoint: FalEndpoint, options: SkillOptions) -> None:
    """Refuse a skill or an option ``endpoint`` cannot serve: ``ValueError`` with one line
    naming the endpoint, the cause and the fix."""
    if options.skill not in endpoint.skills:
        serving = [e.id for e in ENDPOINTS.values() if options.skill in e.skills]
        raise ValueError(f"fal endpoint {endpoint.id} serves --skill "
                         f"{' or '.join(sorted(endpoint.skills))}, not {options.skill}: use "
                         f"--endpoint {' or '.join(serving)}")
    given = {k for k in ("length", "reasoning", "temperature", "top_p", "max_tokens")
             if getattr(options, k) is not None}
    refused = sorted(given - endpoint.options)
    if refused:
        names = ", ".join("--" + k.replace("_", "-") for k in refused)
        raise ValueError(f"fal endpoint {endpoint.id} does not take {names}: leave "
                         f"{'it' if len(refused) == 1 else 'them'} out")
    if options.temperature is not None and options.temperature > 1:
        raise ValueError(f"fal endpoint {endpoint.id} takes --temperature within 0..1")
    lo_hi = endpoint.max_tokens_range
    if options.max_tokens is not None and lo_hi and not lo_hi[0] <= options.max_tokens <= lo_hi[1]:
        raise ValueError(f"fal endpoint {endpoint.id} takes --max-tokens within "
                         f"{lo_hi[0]}..{lo_hi[1]}")


def prompt_of(options: SkillOptions) -> str:
    """The prompt a prompt-taking endpoint is sent: the question, or a caption request."""
    if options.skill == "query":
        return options.question or ""
    if options.skill == "caption":
        return CAPTION_PROMPTS[options.length or "normal"]
    return options.object or ""


def request_payload(endpoint: FalEndpoint, options: SkillOptions, images: Sequence[str]
                    ) -> dict[str, Any]:
    """The JSON body of one request for ``images`` (URLs or data URIs; for ``"archive"`` one
    data URI of the ZIP). Strict: only fields the endpoint's schema names, only options set."""
    tuning = {k: getattr(options, k) for k in ("temperature", "top_p", "max_tokens")
              if k in endpoint.options and getattr(options, k) is not None}
    if endpoint.kind == "inputs":
        prompt = prompt_of(options)
        return {"inputs": [{"image_url": url, "prompt": prompt} for url in images], **tuning}
    if endpoint.kind == "archive":
        return {"images_data_url": images[0], "prompt": prompt_of(options), **tuning}
    body: dict[str, Any] = {"image_url": images[0]}
    if endpoint.id.endswith("/caption"):
        body["length"] = options.length or "normal"
    elif options.skill in ("detect", "point") or endpoint.id.endswith("visual-query") \
            or endpoint.id.endswith("/query"):
        body["prompt"] = prompt_of(options)
    if options.reasoning is not None and "reasoning" in endpoint.options:
        body["reasoning"] = options.reasoning
    return {**body, **tuning}


def _answer(skill: str, text: Any) -> dict[str, Any]:
    """A prompt endpoint's text under the Moondream name of the skill."""
    return {"caption": text} if skill == "caption" else {"answer": text}


def _usage(output: dict[str, Any]) -> dict[str, int]:
    info = output.get("usage_info")
    if not isinstance(info, dict):
        return {}
    usage = {}
    for k in ("input_tokens", "output_tokens"):
        try:
            usage[k] = int(info[k])
        except (KeyError, TypeError, ValueError):
            pass
    return usage


def normalize_single(endpoint: FalEndpoint, skill: str, output: dict[str, Any]
                     ) -> tuple[dict[str, Any], dict[str, int]]:
    """One single-image request's output → ``(result, usage)``: the Moondream names
    (``caption``, ``answer``, ``reasoning`` as ``{"text"}``, ``objects``, ``points``) and the
    output itself under ``raw`` (``scrub_echoes``: without echoed inputs, presigned URLs or data
    URIs). Liberal: missing fields become None or empty lists."""
    if skill in ("detect", "point"):
        key = "objects" if skill == "detect" else "points"
        found = output.get(key)
        result: dict[str, Any] = {key: found if isinstance(found, list) else []}
    else:
        result = _answer(skill, output.get("output"))
        reasoning = output.get("reasoning")
        if reasoning is not None:  # a string on fal, an object in Moondream's API
            result["reasoning"] = reasoning if isinstance(reasoning, dict) else {"text": reasoning}
    raw = scrub_echoes({k: v for k, v in output.items() if k != "usage_info"})
    return {**result, "raw": raw}, _usage(output)


#: Output fields that echo a request's inputs: a presigned URL, a data URI, a ZIP of images.
ECHOED_INPUTS = frozenset({"image_url", "image_urls", "images_data_url", "inputs"})
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _carries_secret(value: Any) -> bool:
    """A ``data:`` URI, or a URL with a query, a fragment or credentials (a presigned URL's
    signature lives there); a URL that does not even parse counts too."""
    if not isinstance(value, str):
        return False
    if value[:5].lower() == "data:":
        return True
    if not _URL_SCHEME.match(value):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return True
    return bool(parts.query or parts.fragment or "@" in parts.netloc)


def scrub_echoes(value: Any) -> Any:
    """fal's output as a row may keep it (``result.raw``): objects lose the fields that echo
    inputs (``ECHOED_INPUTS``) and every value that is a data URI or a URL with a query,
    fragment or credentials; such a value in a list becomes None. Plain file URLs (fal's CDN,
    e.g. a detect ``preview`` image) stay. Recursive; the input is not changed."""
    if isinstance(value, dict):
        return {k: scrub_echoes(v) for k, v in value.items()
                if k not in ECHOED_INPUTS and not _carries_secret(v)}
    if isinstance(value, list):
        return [None if _carries_secret(v) else scrub_echoes(v) for v in value]
    return value


def archive_answers(output: dict[str, Any], names: Sequence[str],
                    download: Callable[[str], bytes]) -> dict[str, Any]:
    """``moondream-next/batch``'s answers by archive member name (FACTS.md: ``images_data_url``
    is read as a ZIP of the images; ``captions_file`` as a JSON file of filename → caption).
    ``names`` are the members sent, in archive order. The ``captions_file`` is read first,
    matching names with or without directories; only if it is missing or unreadable are
    ``outputs`` taken in archive order. Names with no answer are left out."""
    captions: dict[str, Any] | None = None
    file = output.get("captions_file")
    url = file.get("url") if isinstance(file, dict) else file if isinstance(file, str) else None
    if url:
        try:
            loaded = orjson.loads(download(url))
            if isinstance(loaded, dict):
                captions = {posixpath.basename(str(k)): v for k, v in loaded.items()}
            elif isinstance(loaded, list):  # [{filename, caption}] pairs
                captions = {posixpath.basename(str(p.get("filename") or p.get("file_name"))):
                            p.get("caption") for p in loaded if isinstance(p, dict)}
        except (FalError, ValueError, AttributeError):
            log.warning("captions_file could not be read; using outputs in archive order")
    if captions is not None:
        return {n: captions[posixpath.basename(n)] for n in names
                if posixpath.basename(n) in captions}
    outputs = output.get("outputs")
    if not isinstance(outputs, list):
        return {}
    return dict(zip(names, outputs, strict=False))  # fewer outputs than images leaves the rest missing


def member_name(line_index: int, fmt: str) -> str:
    """The archive member name of a line: its line index and the image's extension."""
    ext = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp"}.get(fmt, fmt.lower())
    return f"{line_index:06d}.{ext}"


def build_archive(members: Sequence[tuple[str, bytes]]) -> bytes:
    """A ZIP (stored, not compressed: images are compressed already) of ``(name, bytes)``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...``: a payload, never to be logged."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# -- the round's ledger ---------------------------------------------------------------------------
def _new_ledger(lines: int) -> dict[str, Any]:
    return {"lines": lines, "cursor": 0, "resend": [], "inflight": {}, "ok": 0, "failed": 0,
            "requests": 0, "possible_duplicates": 0, "rate_limited": 0, "expired": 0,
            "est": FIRST_ESTIMATE, "backoff_until": 0.0, "limited_streak": 0, "steps": 0}


def _done(ledger: dict[str, Any]) -> bool:
    return (ledger["cursor"] >= ledger["lines"] and not ledger["resend"]
            and not ledger["inflight"])


@dataclasses.dataclass
class _Prepared:
    line: int
    item: PlanItem
    endpoint: FalEndpoint  # the line's skill's
    image: PreparedImage | None = None
    options: SkillOptions | None = None  # the item's (the run's, with its own overrides)
    error: dict[str, str] | None = None


class FalProvider:
    """fal.ai's queue API as a provider (see the module docstring)."""

    name: ClassVar[str] = "fal"
    retryable_codes: ClassVar[frozenset[str]] = RETRYABLE_CODES

    # -- before the run --------------------------------------------------------------------------
    def check_spec(self, spec: RunSpec) -> None:
        """Unknown endpoint, or a skill or option it cannot serve: ``ValueError``."""
        for endpoint, options in zip(skill_endpoints(spec), spec.all_options, strict=True):
            check_options(endpoint, options)

    def limits(self, spec: RunSpec) -> Limits:
        """fal has no batch file: a shard is bounded by its line count only."""
        return Limits(max_lines=100_000, max_bytes=2_000_000_000)

    def check_credentials(self, settings: Any) -> str | None:
        """A status call on a request that cannot exist: 401/403 means the key is wrong; 404 (or
        any other answer) means fal took the key."""
        key = settings.fal_key.get_secret_value() if settings.fal_key else ""
        if not key:
            return ("FAL key: FAL_KEY is not set: export FAL_KEY=<your key> (create one at "
                    "https://fal.ai/dashboard/keys)")
        client = FalQueueClient(settings.fal_queue_url, key, timeout=10, get_attempts=2)
        try:
            client.status("fal-ai/moondream3-preview", str(uuid.uuid4()))
        except FalAuthError:
            return (f"FAL key: fal at {settings.fal_queue_url} refused the key in FAL_KEY: set "
                    "a valid key (https://fal.ai/dashboard/keys)")
        except FalTransient as exc:
            if exc.status is None and not exc.maybe_sent:
                return (f"FAL key: cannot reach fal's queue at {settings.fal_queue_url}: check "
                        "the network, or MOONBATCH_FAL_QUEUE_URL")
        except FalError:
            pass  # 404 and friends: the key was accepted
        finally:
            client.close()
        return None

    def estimate(self, spec: RunSpec, items: int, image_bytes: int, shards: int) -> Estimate:
        """Requests, bytes, tokens or seconds and dollars; prices from FACTS.md, token and
        second counts are estimates."""
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

    # -- a round ---------------------------------------------------------------------------------
    def submit_round(self, ctx: RoundContext) -> bool:
        """Record the round (``build.json``: every item is a line; an empty ledger;
        ``batch.json`` last) and run its first step. Idempotent: a recorded round only steps
        on. Each document is created once (the build is the same from any execution of the
        round): a second execution never resets a ledger that already records sends."""
        if get_json_or_none(ctx.store, ctx.doc("batch")) is None:
            k = len(ctx.run.spec.all_options)
            lines = [i for i in ctx.indices() for _ in range(k)]  # a line per item and skill
            skills = list(range(k)) * (len(lines) // k) if k > 1 else []
            put_json(ctx.store, ctx.doc("build"), ShardBuild(
                lines=lines, skills=skills, id_prefix=ctx.id_prefix).model_dump(), if_absent=True)
            put_json(ctx.store, ctx.doc("requests"), _new_ledger(len(lines)), if_absent=True)
            put_json(ctx.store, ctx.doc("batch"), BatchRecord(
                batch_id=None, file_id=None, submitted_at=time.time(),
                lines=len(lines)).model_dump(), if_absent=True)
        self._step(ctx)
        return True

    def poll_round(self, ctx: RoundContext, last: tuple[float, int] | None) -> Poll:
        """One step (see the module docstring)."""
        ledger = self._step(ctx)
        done = _done(ledger)
        countdown = 0.0 if done else _next_step_in(ledger, ctx.settings)
        finished = ledger["ok"] + ledger["failed"]
        return Poll(done=done, countdown=countdown, progress={
            "status": "completed" if done else "in_progress", "total": ledger["lines"],
            "completed": ledger["ok"], "failed": ledger["failed"], "finished": finished,
            "in_flight_requests": len(ledger["inflight"]), "requests": ledger["requests"]})

    def collect_round(self, ctx: RoundContext) -> RoundResults | None:
        """The round's result lines, from its ``results-*.jsonl`` documents; None until every
        line is finished."""
        ledger = get_json_or_none(ctx.store, ctx.doc("requests"))
        if ledger is None or not _done(ledger):
            return None
        folder = layout.round_prefix(ctx.shard, ctx.rnd)  # stores list folders, not name stems
        keys = sorted(o.key for o in ctx.store.iter_objects(folder)
                      if (k := layout.parse_shard_key(o.key))
                      and k.name.startswith(layout.RESULTS_PART))

        def lines() -> Iterator[Any]:
            # A round writes a document per step that finished lines: read them concurrently.
            n = ctx.settings.fetch_concurrency
            for data in ordered_map(ctx.store.get, keys, workers=n, window=2 * n):
                for raw in data.splitlines():
                    if raw.strip():
                        yield orjson.loads(raw)

        return RoundResults(lines(), stats={
            "requests": ledger["requests"], "possible_duplicate_requests":
                ledger["possible_duplicates"], "rate_limited": ledger["rate_limited"],
            "expired_results": ledger["expired"]})

    def cancel_run(self, run: Any) -> int:
        """Cancel every request in flight (latest round of every shard): a PUT to the cancel
        URL built from the request id and endpoint on the configured queue (a ledger's own
        URL fields, written by earlier versions, are never called)."""
        client = _client()
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
                endpoint = _entry_endpoint(entry, default)
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

    def abandon_unsent(self, ctx: RoundContext, error: dict[str, str]) -> int:
        """End the round's lines not sent yet (resends, and those past the cursor) as error
        lines with ``error``; if every line was sent, those still in flight (their requests
        are left to fal). Called when a step keeps losing its worker (``moonbatch.workers.attempts``):
        the next step sends nothing more. The ledger is written by compare-and-swap, as a
        step's is. Returns the lines ended; raises ``StorageError``."""
        build = ShardBuild.model_validate(orjson.loads(ctx.store.get(ctx.doc("build"))))
        for _ in range(8):
            try:
                raw, version = ctx.store.get_versioned(ctx.doc("requests"))
            except NotFound:
                return 0
            ledger = orjson.loads(raw)
            if _done(ledger):
                return 0
            lines = [li for unit in ledger["resend"] for li in unit]
            lines += range(ledger["cursor"], ledger["lines"])
            ledger["resend"], ledger["cursor"] = [], ledger["lines"]
            if not lines:  # the step dies polling or collecting: stop waiting for those
                lines = [li for entry in ledger["inflight"].values() for li in entry["lines"]]
                ledger["inflight"] = {}
            out: list[bytes] = []
            for line in _error_lines(lines, error["code"], error["message"]):
                _finish(ctx, build, ledger, out, line)
            written = self._write_lines(ctx, ledger, out) if out else None
            ledger["steps"] += 1
            if ctx.store.put_if_match(ctx.doc("requests"), orjson.dumps(ledger), version):
                return len(lines)
            if written is not None:  # another step recorded first: end what is left then
                ctx.store.delete(written)
        raise StorageError(f"{ctx.doc('requests')}: changed by other steps 8 times in a row")

    # -- the step --------------------------------------------------------------------------------
    def _step(self, ctx: RoundContext) -> dict[str, Any]:
        """Poll, collect, send; write the finished lines, then the ledger. Returns the ledger.

        The ledger is written by compare-and-swap on the version read at the step's start, so
        two steps that ran at once (a lease that expired under a stalled holder) never both
        record: the loser's sends are cancelled and counted (``_lost_ledger_race``)."""
        try:
            raw, version = ctx.store.get_versioned(ctx.doc("requests"))
        except NotFound:
            raise NotFound(f"{ctx.doc('requests')}: the round has no ledger") from None
        ledger = orjson.loads(raw)
        if _done(ledger):
            return ledger
        endpoint = endpoint_of(ctx.run.spec)
        settings = ctx.settings
        # Holders refresh their slots at every step, at most ``hi`` apart: a dead step's slots
        # are free again within a few of them.
        hi = min(settings.poll_max_interval, RESULT_LIFETIME / 6)
        cap = slots.Slots(settings, endpoint.id, settings.fal_in_flight(), ttl=max(10.0, 3 * hi))
        build = ShardBuild.model_validate(orjson.loads(ctx.store.get(ctx.doc("build"))))
        client = _client()
        out: list[bytes] = []

        finished, kept = self._poll(ctx, endpoint, build, ledger, client, out)
        cap.release([e["slot"] for e in finished if e.get("slot")])
        ledger["inflight"] = kept
        # Keep our slots alive, then send while the cap allows.
        cap.acquire([e["slot"] for e in kept.values() if e.get("slot")])
        ctx.heartbeat()
        known = {e.get("request_id") for e in kept.values()}
        if time.time() >= ledger["backoff_until"]:
            if ledger["resend"] or ledger["cursor"] < ledger["lines"]:
                # Sends bill: only while the lease is surely this execution's (renewed within
                # a quarter of its life; a renewal per step would double a step's writes).
                ctx.renew(force=False)
            self._send(ctx, endpoint, build, ledger, client, cap, out)
        written = self._write_lines(ctx, ledger, out) if out else None
        ledger["steps"] += 1
        if not ctx.store.put_if_match(ctx.doc("requests"), orjson.dumps(ledger), version):
            sent = [e for e in ledger["inflight"].values() if e.get("request_id") not in known]
            return self._lost_ledger_race(ctx, endpoint, client, sent, written)
        return ledger

    def _lost_ledger_race(self, ctx: RoundContext, endpoint: FalEndpoint, client: FalQueueClient,
                          sent: list[dict[str, Any]], written: str | None) -> dict[str, Any]:
        """Another step recorded the ledger since this one read it: this step's record is
        dropped, and nothing it did may vanish silently. Its finished lines are removed (every
        one of them is finished or still tracked in the other step's ledger, which started from
        the same state); the requests it sent are cancelled (best effort) and counted in the
        ledger's ``possible_duplicates``. Returns the ledger as recorded."""
        log.warning("shard %d round %d: another step recorded the round's ledger first; this "
                    "step's %d request(s) are cancelled and counted as possible duplicates",
                    ctx.shard, ctx.rnd, len(sent))
        if written is not None:
            ctx.store.delete(written)
        for entry in sent:  # this step's own answers: their ids were checked when they came
            try:
                client.cancel(_entry_endpoint(entry, endpoint).id, entry.get("request_id"))
            except FalError as exc:
                log.warning("could not cancel request %s: %s", entry.get("request_id"), exc,
                            extra={"request_id": entry.get("request_id")})
        for _ in range(8):
            raw, version = ctx.store.get_versioned(ctx.doc("requests"))
            ledger = orjson.loads(raw)
            if not sent:
                return ledger
            ledger["possible_duplicates"] += len(sent)
            if ctx.store.put_if_match(ctx.doc("requests"), orjson.dumps(ledger), version):
                return ledger
        log.error("shard %d round %d: could not count %d possible duplicate request(s)",
                  ctx.shard, ctx.rnd, len(sent))
        return ledger

    def _poll(self, ctx: RoundContext, endpoint: FalEndpoint, build: ShardBuild,
              ledger: dict[str, Any], client: FalQueueClient, out: list[bytes]
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Status of every request in flight; results of the COMPLETED ones into ``out``.
        Returns ``(finished entries, entries still in flight)``."""
        inflight: dict[str, Any] = ledger["inflight"]
        if not inflight:
            return [], {}
        spec = ctx.run.spec

        def look(entry: dict[str, Any]) -> tuple[str, list[dict[str, Any]] | None]:
            # The URLs come from the endpoint and the request id, never from the ledger's
            # fields (OUTPUT may have been rewritten; earlier versions stored URLs there).
            ep = _entry_endpoint(entry, endpoint)
            try:
                status = client.status(ep.id, entry.get("request_id"))
                if not status.completed:
                    entry["queue_position"] = status.queue_position
                    entry["seen_running_at"] = time.time()
                    return "running", None
                failed = bool(status.error or status.error_type)
                try:
                    output = client.result(ep.id, entry.get("request_id"))
                except FalTransient as exc:
                    if not failed:
                        raise
                    # COMPLETED with an error: the result GET answers that error (FACTS.md).
                    return "failed", _error_lines(
                        entry["lines"], "request_failed", f"fal request {entry['request_id']} "
                        f"failed: {exc.error_type or status.error_type or status.error}")
                k = build.skills[entry["lines"][0]] if build.skills else 0
                return "ok", self._result_lines(ep, spec.all_options[k].skill, entry, output,
                                                client)
            except FalGone:
                return "expired", _error_lines(
                    entry["lines"], "result_expired",
                    f"fal forgot request {entry['request_id']} (its result outlived fal's "
                    "retention)")
            except FalRequestError as exc:
                if exc.fields:
                    return "failed", _error_lines(entry["lines"], "invalid_input",
                                                  "fal rejected the input: " + "; ".join(exc.fields))
                code = "request_failed" if (exc.status or 0) >= 500 or exc.error_type and \
                    exc.error_type != "client_cancelled" else "request_rejected"
                return "failed", _error_lines(entry["lines"], code, str(exc))
            except FalTransient:
                return "running", None  # look again next step
            except FalBadRequestId:
                return "failed", _error_lines(
                    entry["lines"], "request_failed", "the round's requests.json names no fal "
                    "request for this line (its request id was altered); it is sent again")

        now = time.time()
        entries = list(inflight.items())
        with cf.ThreadPoolExecutor(max_workers=min(32, len(entries)),
                                   thread_name_prefix="fal-poll") as pool:
            answers = list(pool.map(lambda kv: look(kv[1]), entries))
        finished, kept = [], {}
        for (unit, entry), (state, lines) in zip(entries, answers, strict=True):
            if lines is None:
                kept[unit] = entry
                continue
            finished.append(entry)
            metrics.requests(endpoint.id, "completed" if state == "ok" else state)
            if state == "expired":
                ledger["expired"] += 1
            if state == "ok":
                # It ended between the last look that saw it running and this one.
                seen = max(entry.get("seen_running_at", entry["sent_at"]), entry["sent_at"])
                took = (seen + now) / 2 - entry["sent_at"]
                ledger["est"] = round(0.7 * ledger["est"] + 0.3 * took, 3)
            dims = dict(zip(entry["lines"], entry.get("dims") or (), strict=False))
            for line in lines:
                if dims.get(line["line_index"]):
                    line["dims"] = dims[line["line_index"]]
                _finish(ctx, build, ledger, out, line)
        return finished, kept

    def _result_lines(self, endpoint: FalEndpoint, skill: str, entry: dict[str, Any],
                      output: dict[str, Any], client: FalQueueClient) -> list[dict[str, Any]]:
        """A completed request's output → one result line per line it carried."""
        lines: list[int] = entry["lines"]
        if endpoint.kind == "single":
            result, usage = normalize_single(endpoint, skill, output)
            return [{"line_index": lines[0], "status": "ok", "result": result, "usage": usage}]
        if endpoint.kind == "inputs":
            outputs = output.get("outputs")
            outputs = outputs if isinstance(outputs, list) else []
            names = output.get("filenames") if isinstance(output.get("filenames"), list) else []
            answers = {li: {"output": o, **({"filename": _file_name(names[j])}
                                            if j < len(names) else {})}
                       for j, (li, o) in enumerate(zip(lines, outputs, strict=False))}
        else:
            by_name = archive_answers(output, entry["names"], client.download)
            answers = {li: {"output": by_name[n], "filename": n}
                       for li, n in zip(lines, entry["names"], strict=True) if n in by_name}
        out = []
        for li in lines:
            if li in answers:
                out.append({"line_index": li, "status": "ok", "usage": {},
                            "result": {**_answer(skill, answers[li]["output"]),
                                       "raw": scrub_echoes(answers[li])}})
            else:
                out.append({"line_index": li, "status": "error", "error": {
                    "code": "missing_result",
                    "message": f"fal request {entry['request_id']} returned no answer for it"}})
        return out

    def _send(self, ctx: RoundContext, endpoint: FalEndpoint, build: ShardBuild,
              ledger: dict[str, Any], client: FalQueueClient, cap: slots.Slots,
              out: list[bytes]) -> None:
        """Send resends first, then new lines from the cursor, while slots are free."""
        pending = len(ledger["resend"]) + math.ceil(
            (ledger["lines"] - ledger["cursor"]) / endpoint.max_images)
        if not pending:
            return
        # Slots are named after the first line of the request they are for, so a step that
        # died after taking them leaves nothing behind: the step that sends those lines again
        # takes the same slots.
        n = min(pending, ctx.settings.fal_in_flight())
        firsts = [u[0] for u in ledger["resend"][:n]]
        firsts += [ledger["cursor"] + k * endpoint.max_images for k in range(n - len(firsts))]
        prefix = f"{ctx.run.spec.run_id}/{ctx.shard}/{ctx.rnd}/"
        granted = cap.acquire([prefix + str(first) for first in firsts])
        if not granted:
            return
        units: list[list[int]] = []
        while ledger["resend"] and len(units) < len(granted):
            units.append(ledger["resend"].pop(0))
        new_from = ledger["cursor"]
        new_to = min(ledger["lines"], new_from + (len(granted) - len(units)) * endpoint.max_images)
        candidates = [li for u in units for li in u] + list(range(new_from, new_to))
        prepared = self._prepare_lines(ctx, build, candidates)
        ctx.heartbeat()
        # Pack: resends as they were; new lines into requests of up to max_images images and
        # MAX_REQUEST_BYTES of data URIs. Lines past the last request are read again later.
        free = len(granted) - len(units)
        new_units: list[list[int]] = []
        cursor = new_from
        for li in range(new_from, new_to):
            p = prepared[li]
            if p.error is not None:  # bad input: its error line now, nothing sent
                _finish(ctx, build, ledger, out, _pre_send_error(p))
            elif new_units and len(new_units[-1]) < endpoint.max_images and \
                    p.options == prepared[new_units[-1][0]].options and \
                    _payload_bytes(prepared, new_units[-1] + [li]) <= MAX_REQUEST_BYTES:
                new_units[-1].append(li)
            elif len(new_units) < free:
                new_units.append([li])
            else:
                break
            cursor = li + 1
        ledger["cursor"] = cursor
        requests: list[tuple[list[int], str, dict[str, Any], list[str]]] = []
        for unit in units + new_units:
            good = [li for li in unit if prepared[li].error is None]
            for li in unit:
                if prepared[li].error is not None and unit in units:  # a resend gone bad
                    _finish(ctx, build, ledger, out, _pre_send_error(prepared[li]))
            if good:
                payload, names = self._payload(ctx, [prepared[li] for li in good])
                requests.append((good, granted[len(requests)], payload, names))
        unused = granted[len(requests):]

        def submit(req: tuple[list[int], str, dict[str, Any], list[str]]
                   ) -> tuple[Submitted | None, Exception | None]:
            metrics.upload_bytes(self.name, _data_uri_bytes(req[2]))
            try:
                return client.submit(prepared[req[0][0]].endpoint.id, req[2]), None
            except FalError as exc:
                return None, exc

        with cf.ThreadPoolExecutor(max_workers=max(1, min(32, len(requests))),
                                   thread_name_prefix="fal-submit") as pool:
            answers = list(pool.map(submit, requests))
        now = time.time()
        limited = False
        for (lines, token, _, names), (sub, exc) in zip(requests, answers, strict=True):
            if sub is not None:
                # No URLs: they are built from the endpoint and the id at each use.
                ledger["inflight"][str(lines[0])] = {
                    "lines": lines, "request_id": sub.request_id, "sent_at": now, "slot": token,
                    **({"names": names} if names else {}),
                    **({"endpoint": prepared[lines[0]].endpoint.id} if build.skills else {}),
                    "dims": [prepared[li].image.dims() for li in lines]}  # type: ignore[union-attr]
                ledger["requests"] += 1
                metrics.requests(endpoint.id, "sent")
                continue
            unused.append(token)
            if isinstance(exc, FalLimited):
                metrics.requests(endpoint.id, "rate_limited")
                limited = True
                ledger["rate_limited"] += 1
                ledger["resend"].insert(0, lines)
            elif isinstance(exc, FalTransient):
                ledger["possible_duplicates"] += bool(exc.maybe_sent)
                ledger["resend"].append(lines)
            elif isinstance(exc, FalRequestError):
                metrics.requests(endpoint.id, "failed")
                message = ("fal rejected the input: " + "; ".join(exc.fields)) if exc.fields \
                    else str(exc)
                for line in _error_lines(lines, "invalid_input" if exc.fields
                                         else "request_rejected", message):
                    _finish(ctx, build, ledger, out, line)
            else:
                raise exc  # FalAuthError: the run cannot go on; the task records it
        cap.release(unused)
        if limited:
            ledger["limited_streak"] += 1
            wait = min(60.0, 1.0 * 2 ** (ledger["limited_streak"] - 1))
            ledger["backoff_until"] = now + wait
            log.warning("shard %d round %d: fal's concurrency limit (429); backing off %.0fs",
                        ctx.shard, ctx.rnd, wait)
        elif requests:
            ledger["limited_streak"] = 0

    def _prepare_lines(self, ctx: RoundContext, build: ShardBuild, lines: Sequence[int]
                       ) -> dict[int, _Prepared]:
        """Read and check the image of each of ``lines`` (once per item: a multi-skill run's
        lines of one item share it) and each line's options; errors become the line's error."""
        spec = ctx.run.spec
        endpoints = skill_endpoints(spec)
        items = sorted({build.lines[li] for li in lines})

        def load(i: int) -> tuple[int, PreparedImage | ItemError]:
            try:
                data = read_item(ctx.run.fetcher.get, ctx.items[i])
                return i, prepare_image(data, limit=MAX_IMAGE_BYTES, max_pixels=spec.max_pixels)
            except ItemError as exc:
                return i, exc
            except Exception as exc:  # the per-item boundary: one item never fails the round
                return i, unexpected_error(exc, "preparing", "image_decode_failed")

        n = ctx.settings.fetch_concurrency
        images = dict(ordered_map(load, items, workers=n, window=2 * n))
        out: dict[int, _Prepared] = {}
        for li in lines:
            item = ctx.items[build.lines[li]]
            k = build.skills[li] if build.skills else 0
            endpoint, image = endpoints[k], images[build.lines[li]]
            try:
                options = item_options(spec.all_options[k], item)
                if item.opts:
                    check_options(endpoint, options)
            except ItemError as exc:
                out[li] = _Prepared(li, item, endpoint, error=exc.as_dict())
                continue
            except ValueError as exc:  # an override the endpoint cannot serve
                out[li] = _Prepared(li, item, endpoint, error={"code": "invalid_options",
                                                               "message": str(exc)})
                continue
            if isinstance(image, ItemError):
                out[li] = _Prepared(li, item, endpoint, error=image.as_dict())
            else:
                out[li] = _Prepared(li, item, endpoint, image, options)
        return out

    def _payload(self, ctx: RoundContext, images: Sequence[_Prepared]
                 ) -> tuple[dict[str, Any], list[str]]:
        """The request body for prepared images, and the archive member names (if any)."""
        # A request's lines share their endpoint and options (see the packing in _send).
        endpoint, options = images[0].endpoint, images[0].options or ctx.run.spec.options
        if endpoint.kind == "archive":
            names = [member_name(p.line, p.image.format) for p in images]  # type: ignore[union-attr]
            archive = build_archive([(n, p.image.data) for n, p in zip(names, images, strict=True)])  # type: ignore[union-attr]
            return request_payload(endpoint, options, [data_uri(archive, "application/zip")]), names
        return request_payload(endpoint, options, [self._image_url(ctx, p) for p in images]), []

    def _image_url(self, ctx: RoundContext, p: _Prepared) -> str:
        """A URL fal can GET (a presigned S3 URL, a manifest's http URL) when the stored bytes
        go as they are, else a data URI."""
        image = p.image
        assert image is not None
        url = ctx.run.fetcher.presigned_url(p.item, PRESIGN_SECONDS) \
            if image.transform is None else None
        return url or data_uri(image.data, f"image/{image.format.lower()}")

    def _write_lines(self, ctx: RoundContext, ledger: dict[str, Any], out: list[bytes]) -> str:
        """Write this step's finished lines to the next free ``results-NNNNN.jsonl``; return
        its key."""
        body = b"\n".join(out) + b"\n"
        n = ledger["steps"]
        while not ctx.store.put(_results_key(ctx, n), body, if_absent=True):
            n += 1  # a step that died after writing its lines left this one
        ledger["steps"] = n
        return _results_key(ctx, n)


def _entry_endpoint(entry: dict[str, Any], default: FalEndpoint) -> FalEndpoint:
    """The endpoint a ledger entry's request went to: its ``endpoint`` (multi-skill rounds)
    when that names a known one, else ``default`` (the run's)."""
    name = entry.get("endpoint")
    return ENDPOINTS.get(name, default) if isinstance(name, str) else default


def _results_key(ctx: RoundContext, n: int) -> str:
    return layout.round_results_part(ctx.shard, ctx.rnd, n)


def _file_name(name: Any) -> str:
    """A file name as fal reports it, reduced to its last path segment: an echoed input URL
    must not carry a presigned query string into the results."""
    text = str(name)
    return posixpath.basename(urlsplit(text).path) if "://" in text else text


def _payload_bytes(prepared: dict[int, _Prepared], lines: Sequence[int]) -> int:
    """Bytes the images of ``lines`` add to a request as data URIs (URLs are small)."""
    return sum(len(prepared[li].image.data) * 4 // 3 for li in lines  # type: ignore[union-attr]
               if prepared[li].image is not None)


def _data_uri_bytes(payload: dict[str, Any]) -> int:
    """Bytes of the data URIs in a request body (images sent inline, ZIP archives)."""
    values = [payload.get("image_url"), payload.get("images_data_url")]
    values += [i.get("image_url") for i in payload.get("inputs") or () if isinstance(i, dict)]
    return sum(len(v) for v in values if isinstance(v, str) and v.startswith("data:"))


def _finish(ctx: RoundContext, build: ShardBuild, ledger: dict[str, Any], out: list[bytes],
            line: dict[str, Any]) -> None:
    """A line is final: give it the id it was sent under, count it, add it to ``out``."""
    line_id = build.id_prefix + ctx.items[build.lines[line["line_index"]]].key
    if build.skills:
        line_id = skill_line_id(line_id, ctx.run.spec.all_options[build.skills[line["line_index"]]].skill)
    line["id"] = line_id
    ledger["ok" if line["status"] == "ok" else "failed"] += 1
    out.append(orjson.dumps(line))


def _pre_send_error(p: _Prepared) -> dict[str, Any]:
    """The error line of an item that could not be sent (unreadable, not an image...)."""
    return {"line_index": p.line, "status": "error", "error": p.error}


def _error_lines(lines: Sequence[int], code: str, message: str) -> list[dict[str, Any]]:
    return [{"line_index": li, "status": "error", "error": {"code": code, "message": message}}
            for li in lines]


def _split(items: int, shards: int) -> list[int]:
    """``items`` spread over ``shards`` as the planner fills them (all full but the last)."""
    if shards <= 0:
        return []
    per = math.ceil(items / shards)
    return [min(per, items - i * per) for i in range(shards) if items - i * per > 0]


def _next_step_in(ledger: dict[str, Any], settings: Any) -> float:
    """Seconds to the next step: when the first request in flight is expected to finish (or a
    quarter of how late it is, once overdue), when a back-off ends, or soon when lines wait for slots;
    within the poll bounds and well within fal's 6-minute result retention."""
    now = time.time()
    hi = min(settings.poll_max_interval, RESULT_LIFETIME / 6)
    lo = settings.poll_min_interval
    waits = []
    for entry in ledger["inflight"].values():
        overdue = now - entry["sent_at"] - ledger["est"]
        waits.append(-overdue if overdue < 0 else max(lo, 0.25 * overdue))
    if ledger["backoff_until"] > now:
        waits.append(ledger["backoff_until"] - now)
    elif ledger["resend"] or ledger["cursor"] < ledger["lines"]:
        waits.append(max(lo, ledger["est"] / 4))  # slots held elsewhere may free soon
    return max(lo, min(hi, min(waits) if waits else lo))


@functools.cache
def _client() -> FalQueueClient:
    """This process's fal queue client (key and URL from settings)."""
    from moonbatch.config import get_settings

    s = get_settings()
    return FalQueueClient(s.fal_queue_url, s.fal_api_key(), timeout=s.http_timeout)
