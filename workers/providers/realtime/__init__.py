"""The real-time Moondream API as a provider (``--provider moondream-realtime``): a round of a
shard as one HTTP request per image and skill, answered in seconds.

Protocol: FACTS.md "Moondream real-time API" and the official client's ``CloudVL``
(``moondream`` 2.6.1): ``POST {base}/caption|query|detect|point|segment`` with
``X-Moondream-Auth``, a JSON body with ``image_url`` (a data URI), the skill's fields,
``settings``, ``reasoning``, ``spatial_refs`` and ``stream: false``. The same protocol is served
by Moondream Cloud (``https://api.moondream.ai/v1``, a key, twice the batch price, 2 or 10
requests/s per key) and by Moondream Station (``http://localhost:2020/v1``, no key, no token
cost): ``MOONBATCH_REALTIME_URL`` chooses.

A round moves in steps like fal's (``moonbatch.workers.stepped``; ``rounds`` has the step):
each step sends the next lines within the fleet-wide rate (``MOONBATCH_REALTIME_RATE``
requests/s) and concurrency (``MOONBATCH_REALTIME_CONCURRENCY``), for up to 15 s
(``rounds.STEP_SECONDS``), and records the finished lines and its ledger. Every skill the API
serves works here, ``segment`` included; each line carries one image (``multi_image = False``).

Modules: ``settings`` (its variables), ``client`` (the HTTP client), ``payloads`` (bodies and
answers), ``rounds`` (a step of a round).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from moonbatch.workers import layout
from moonbatch.workers.models import RunSpec, provider_options_refusal
from moonbatch.workers.providers import (
    Estimate,
    Limits,
    Poll,
    RoundContext,
    Wording,
    estimate_input_tokens,
    estimate_output_tokens,
)
from moonbatch.workers.providers.prices import SOURCE as PRICE_SOURCE
from moonbatch.workers.providers.prices import model_price
from moonbatch.workers.providers.realtime.client import (
    METRIC_ACTIONS,
    PROVIDER,
    RealtimeAuthError,
    RealtimeClient,
    RealtimeError,
    RealtimeTransient,
)
from moonbatch.workers.providers.realtime.payloads import estimate_request_bytes
from moonbatch.workers.providers.realtime.rounds import RealtimeSteps
from moonbatch.workers.providers.realtime.settings import RealtimeSettings
from moonbatch.workers.stepped import ledger_done, progress
from moonbatch.workers.storage import get_json_or_none

MAX_SHARD_LINES = 10_000  # images per shard: a shard's ledger stays small, many shards share the rate
RETRYABLE_CODES = frozenset({"request_failed"})


def _duration(seconds: float) -> str:
    """``"40 s"``, ``"12.5 min"``, ``"3.2 h"``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:,.1f} h"


class RealtimeProvider(RealtimeSteps):
    """The real-time Moondream API (Moondream Cloud or a Moondream Station) as a provider."""

    name: ClassVar[str] = PROVIDER
    multi_image: ClassVar[bool] = False
    polls_only_look: ClassVar[bool] = False  # a poll step sends and records
    spends_in_steps: ClassVar[bool] = True  # each step reserves the requests it sends
    #: The API's 4xx codes for a request it cannot take (its own fault, not the service's).
    input_error_codes: ClassVar[frozenset[str]] = frozenset({"http_400", "http_413", "http_422"})
    retryable_codes: ClassVar[frozenset[str]] = RETRYABLE_CODES
    settings_class: ClassVar[type[RealtimeSettings]] = RealtimeSettings
    credential: ClassVar[str] = "Moondream API key (MOONDREAM_API_KEY)"
    metric_actions: ClassVar[Mapping[str, str]] = METRIC_ACTIONS
    wording: ClassVar[Wording] = Wording(unit="request", units="requests",
                                         at="the real-time API",
                                         cancelled="shard(s) stopped sending")

    def complete_spec(self, spec: RunSpec) -> RunSpec:
        """Nothing to resolve: the model is ``spec.model`` (None: the API's default)."""
        return spec

    def describe(self, doc: Mapping[str, Any]) -> str:
        """``moondream-realtime (real-time API at <url>)``."""
        from moonbatch.config import get_settings

        url = get_settings().section(RealtimeSettings).realtime_url
        return f"{self.name} (real-time API at {url})"

    def upload_note(self, report: Mapping[str, Any]) -> str:
        """Images go inline, one request each."""
        return "each image goes inline in its own request"

    # -- before the run --------------------------------------------------------------------------
    def check_spec(self, spec: RunSpec) -> None:
        """Every skill is served; ``--endpoint`` is fal's."""
        if spec.endpoint:
            raise ValueError("--endpoint applies to --provider fal only: leave it out (the "
                             "real-time API is MOONBATCH_REALTIME_URL)")
        refusal = provider_options_refusal(spec, self.name,
                                           "the real-time API has no such control")
        if refusal:
            raise ValueError(refusal)

    def check_model(self, spec: RunSpec) -> list[str]:
        """Any model is sent as given in each request's ``model`` (the API's list of models
        is not published where we could read it, so none is refused); one not in the price
        table (``prices.model_price``) gets a warning."""
        if spec.model is None or model_price(spec.model, "realtime").known:
            return []
        return [f"--model {spec.model}: not in moonbatch's price table: sent as given (the "
                "API answers invalid_model if it does not serve it) and priced as the dearest "
                "known model"]

    def limits(self, spec: RunSpec) -> Limits:
        """No batch file: a shard is bounded by its line count (requests are sent one by
        one; the bytes bound is far above what a shard sends)."""
        return Limits(max_lines=MAX_SHARD_LINES, max_bytes=2_000_000_000,
                      item_bytes=estimate_request_bytes,
                      reason=f"the most images moonbatch puts in one shard for --provider "
                             f"{self.name}")

    def check_credentials(self, settings: Any) -> str | None:
        """A key is set where the URL needs one; then one call without an image: 401/403
        means the key was refused, no answer means the URL is wrong; any other answer (400:
        no image) means the API took the request."""
        rs = settings.section(RealtimeSettings)
        missing = rs.missing_key()
        if missing:
            return missing
        client = RealtimeClient(rs.realtime_url, rs.key(), timeout=10)
        try:
            client.call("caption", {"stream": False})
        except RealtimeAuthError:
            if rs.key() is None:
                return (f"Moondream API key: the real-time API at {rs.realtime_url} asks for a "
                        "key: export MOONDREAM_API_KEY=<your key>")
            return (f"Moondream API key: the real-time API at {rs.realtime_url} refused the "
                    "key in MOONDREAM_API_KEY: set a valid key")
        except RealtimeTransient as exc:
            if exc.status is None:
                return (f"real-time API: cannot reach {rs.realtime_url}: check the network, "
                        "or MOONBATCH_REALTIME_URL (a Moondream Station is "
                        "http://localhost:2020/v1)")
        except RealtimeError:
            pass  # 400 and friends: the request was taken
        finally:
            client.close()
        return None

    def estimate(self, spec: RunSpec, items: int, image_bytes: int, shards: int,
                 images: int | None = None) -> Estimate:
        """A request per image and skill; images go as data URIs; the model's real-time
        price (``moonbatch.workers.providers.prices``), none for a URL off moondream.ai (a
        Moondream Station runs on your own GPUs); the time at the fleet's rate."""
        from moonbatch.config import get_settings

        rs = get_settings().section(RealtimeSettings)
        k = len(spec.all_options)
        requests = k * items
        avg = image_bytes // items if items else 0
        in_tok = k * items * estimate_input_tokens(avg, spec.max_pixels)
        out_tok = items * sum(estimate_output_tokens(o) for o in spec.all_options)
        upload = k * math.ceil(image_bytes * 4 / 3)
        pace = (f"at MOONBATCH_REALTIME_RATE={rs.realtime_rate:g} requests/s: at least "
                f"{_duration(requests / rs.realtime_rate)}")
        if not rs.billed():
            return Estimate(items, requests, upload, in_tok, out_tok, None, 0.0,
                            f"no token cost: {rs.realtime_url} is not Moondream Cloud (a "
                            f"Moondream Station on your own GPUs); {pace}")
        price = model_price(spec.model, "realtime")
        return Estimate(items, requests, upload, in_tok, out_tok, None,
                        price.cost(in_tok, out_tok),
                        f"{price.label()} ({PRICE_SOURCE}); token counts are estimates; {pace}")

    # -- spend -----------------------------------------------------------------------------------
    def line_estimate(self, spec: RunSpec, size: int, skill: int = 0) -> float:
        """Dollars of one request: an image of ``size`` bytes and the run's ``skill``-th
        skill, at the model's real-time price; 0 for a Moondream Station (no token cost)."""
        from moonbatch.config import get_settings

        if not get_settings().section(RealtimeSettings).billed():
            return 0.0
        return model_price(spec.model, "realtime").cost(
            estimate_input_tokens(size, spec.max_pixels),
            estimate_output_tokens(spec.all_options[skill]))

    def round_estimate(self, ctx: RoundContext) -> float:
        """The dollars of every request of the round (``line_estimate`` per item and skill)."""
        spec, items = ctx.run.spec, ctx.items
        return sum(self.line_estimate(spec, items[i].size, k)
                   for i in ctx.indices() for k in range(len(spec.all_options)))

    def cost(self, usage: Mapping[str, float], spec: RunSpec) -> float:
        """Tokens the API reported (each answer's ``metrics``) at the model's real-time price;
        0 for a Moondream Station."""
        from moonbatch.config import get_settings

        if not get_settings().section(RealtimeSettings).billed():
            return 0.0
        return model_price(spec.model, "realtime").cost(int(usage.get("input_tokens", 0)),
                                                        int(usage.get("output_tokens", 0)))

    # -- a round (submit_round, collect_round, abandon_unsent: moonbatch.workers.stepped) ---------
    def poll_round(self, ctx: RoundContext, last: tuple[float, int] | None) -> Poll:
        """One step (see ``rounds``)."""
        ledger, countdown = self.step_poll(ctx)
        return Poll(done=ledger_done(ledger), countdown=countdown, progress=progress(ledger),
                    paced=True)

    def cancel_run(self, run: Any) -> int:
        """Nothing waits at the API (every request is answered within its step), and the
        run's cancel marker stops every step's sending within a second: returns how many
        shards had lines left to send (the latest round of each)."""
        latest: dict[int, tuple[int, str]] = {}
        for obj in run.output.iter_objects(layout.SHARDS):
            key = layout.parse_shard_key(obj.key)
            if key is None or key.name != "requests":
                continue
            rnd = key.round or 0
            if key.shard not in latest or rnd > latest[key.shard][0]:
                latest[key.shard] = (rnd, obj.key)
        stopped = 0
        for _, doc in latest.values():
            ledger = get_json_or_none(run.output, doc)
            if isinstance(ledger, dict) and not ledger_done(ledger):
                stopped += 1
        return stopped

    def count_units(self, shards: Sequence[Mapping[str, Any]]) -> int:
        """The requests every shard sent (its ``requests`` count)."""
        return sum(s.get("requests") or 0 for s in shards)
