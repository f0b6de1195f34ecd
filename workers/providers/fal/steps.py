"""A step of a fal round: poll every request in flight and collect the finished ones, send the
next requests while the endpoint's fleet-wide cap allows, write the finished lines and then the
ledger by compare-and-swap (see ``moonbatch.workers.providers.fal``)."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import math
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from moonbatch.workers import metrics, slots, stops
from moonbatch.workers.models import ShardBuild
from moonbatch.workers.providers import (
    RoundContext,
)
from moonbatch.workers.providers.fal.client import (
    FalBadRequestId,
    FalError,
    FalGone,
    FalLimited,
    FalQueueClient,
    FalRequestError,
    FalTransient,
    Submitted,
    queue_headers,
)
from moonbatch.workers.providers.fal.endpoints import FalEndpoint, endpoint_of, entry_endpoint
from moonbatch.workers.providers.fal.ledger import (
    LEDGER_EXTRA,
    RESULT_LIFETIME,
    in_flight,
    next_step_in,
)
from moonbatch.workers.providers.fal.payloads import (
    MAX_REQUEST_BYTES,
    _answer,
    archive_answers,
    file_name,
    normalize_single,
    scrub_echoes,
)
from moonbatch.workers.providers.fal.prepare import (
    data_uri_bytes,
    payload_bytes,
    pre_send_error,
    prepare_lines,
    request_body,
)
from moonbatch.workers.providers.fal.settings import FalSettings
from moonbatch.workers.stepped import SteppedRounds, end_unsent, error_lines, finish_line

log = logging.getLogger(__name__)


class RoundSteps(SteppedRounds):
    """The step machinery of ``FalProvider`` (its rounds move one step per poll; the generic
    part is ``moonbatch.workers.stepped``)."""

    name: ClassVar[str]  # the provider's (``FalProvider.name``): its metric label

    ledger_extra: ClassVar[Mapping[str, Any]] = LEDGER_EXTRA

    def next_step_in(self, ledger: Mapping[str, Any], settings: Any) -> float:
        """When the round's next step is due (``ledger.next_step_in``)."""
        return next_step_in(dict(ledger), settings)

    def round_stats(self, ledger: Mapping[str, Any]) -> dict[str, int]:
        """The stepped rounds' counts plus ``expired_results`` (results fal forgot)."""
        return {**super().round_stats(ledger), "expired_results": ledger["expired"]}

    def _advance(self, ctx: RoundContext, build: ShardBuild, ledger: dict[str, Any],
                 out: list[bytes]) -> list[dict[str, Any]]:
        """Poll, collect, send (see ``moonbatch.workers.stepped``). Returns the entries of the
        requests this step sent (cancelled if the step loses the ledger race)."""
        endpoint = endpoint_of(ctx.run.spec)
        settings = ctx.settings
        # Holders refresh their slots at every step, at most ``hi`` apart: a dead step's slots
        # are free again within a few of them.
        hi = min(settings.poll_max_interval, RESULT_LIFETIME / 6)
        cap = slots.Slots(settings, endpoint.id, in_flight(ledger, settings), ttl=max(10.0, 3 * hi))
        client = queue_client()

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
        return [e for e in ledger["inflight"].values() if e.get("request_id") not in known]

    def _lost_race(self, ctx: RoundContext, sent: list[dict[str, Any]]) -> int:
        """The requests a step that lost the ledger race sent are cancelled (best effort)
        and counted as possible duplicates."""
        endpoint = endpoint_of(ctx.run.spec)
        client = queue_client()
        for entry in sent:  # this step's own answers: their ids were checked when they came
            try:
                client.cancel(entry_endpoint(entry, endpoint).id, entry.get("request_id"))
            except FalError as exc:
                log.warning("could not cancel request %s: %s", entry.get("request_id"), exc,
                            extra={"request_id": entry.get("request_id")})
        return len(sent)

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
            ep = entry_endpoint(entry, endpoint)
            try:
                status = client.status(ep.id, entry.get("request_id"))
                if not status.completed:
                    entry["queue_position"] = status.queue_position
                    entry["seen_running_at"] = time.time()
                    return "running", None
                failed = bool(status.error or status.error_type)
                try:
                    output, units = client.result_billed(ep.id, entry.get("request_id"))
                except FalTransient as exc:
                    if not failed:
                        raise
                    # COMPLETED with an error: the result GET answers that error (FACTS.md).
                    return "failed", error_lines(
                        entry["lines"], "request_failed", f"fal request {entry['request_id']} "
                        f"failed: {exc.error_type or status.error_type or status.error}")
                k = build.skills[entry["lines"][0]] if build.skills else 0
                lines = self._result_lines(ep, spec.all_options[k].skill, entry, output, client)
                if units is not None:  # what fal bills for the request, spread over its lines
                    for line in lines:
                        if line["status"] == "ok":
                            line["usage"] = {**(line.get("usage") or {}),
                                             "billable_units": units / len(lines)}
                return "ok", lines
            except FalGone:
                return "expired", error_lines(
                    entry["lines"], "result_expired",
                    f"fal forgot request {entry['request_id']} (its result outlived fal's "
                    "retention)")
            except FalRequestError as exc:
                if exc.fields:
                    return "failed", error_lines(entry["lines"], "invalid_input",
                                                  "fal rejected the input: " + "; ".join(exc.fields))
                code = "request_failed" if (exc.status or 0) >= 500 or exc.error_type and \
                    exc.error_type != "client_cancelled" else "request_rejected"
                return "failed", error_lines(entry["lines"], code, str(exc))
            except FalTransient:
                return "running", None  # look again next step
            except FalBadRequestId:
                return "failed", error_lines(
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
            metrics.requests(self.name, endpoint.id, "completed" if state == "ok" else state)
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
                finish_line(ctx, build, ledger, out, line)
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
            answers = {li: {"output": o, **({"filename": file_name(names[j])}
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
        halted = stops.stopped(ctx.store)
        if halted is not None:  # the run stopped: nothing more is sent
            end_unsent(ctx, build, ledger, out, [], stops.stop_error(halted))
            return
        # Slots are named after the first line of the request they are for, so a step that
        # died after taking them leaves nothing behind: the step that sends those lines again
        # takes the same slots.
        n = min(pending, in_flight(ledger, ctx.settings))
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
        prepared = prepare_lines(ctx, build, candidates)
        ctx.heartbeat()
        # Pack: resends as they were; new lines into requests of up to max_images images and
        # MAX_REQUEST_BYTES of data URIs. Lines past the last request are read again later.
        free = len(granted) - len(units)
        new_units: list[list[int]] = []
        cursor = new_from
        for li in range(new_from, new_to):
            p = prepared[li]
            if p.error is not None:  # bad input: its error line now, nothing sent
                finish_line(ctx, build, ledger, out, pre_send_error(p))
            elif new_units and len(new_units[-1]) < endpoint.max_images and \
                    p.options == prepared[new_units[-1][0]].options and \
                    payload_bytes(prepared, new_units[-1] + [li]) <= MAX_REQUEST_BYTES:
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
                    finish_line(ctx, build, ledger, out, pre_send_error(prepared[li]))
            if good:
                payload, names = request_body(ctx, [prepared[li] for li in good])
                requests.append((good, granted[len(requests)], payload, names))
        unused = granted[len(requests):]
        if requests:  # reserve each request's estimate; none is sent past the budget
            spec = ctx.run.spec
            usd = [sum(self.item_estimate(spec, ctx.items[build.lines[li]].size)  # type: ignore[attr-defined]
                       for li in req[0]) for req in requests]
            n, refusal = stops.reserve_step(ctx, usd)
            if refusal is not None:
                unused += [req[1] for req in requests[n:]]
                end_unsent(ctx, build, ledger, out,
                                 [li for req in requests[n:] for li in req[0]], refusal)
                requests = requests[:n]
        headers = queue_headers(ctx.run.spec.provider_options)

        def submit(req: tuple[list[int], str, dict[str, Any], list[str]]
                   ) -> tuple[Submitted | None, Exception | None]:
            metrics.upload_bytes(self.name, data_uri_bytes(req[2]))
            try:
                return client.submit(prepared[req[0][0]].endpoint.id, req[2], headers), None
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
                metrics.requests(self.name, endpoint.id, "sent")
                continue
            unused.append(token)
            if isinstance(exc, FalLimited):
                metrics.requests(self.name, endpoint.id, "rate_limited")
                limited = True
                ledger["rate_limited"] += 1
                ledger["resend"].insert(0, lines)
            elif isinstance(exc, FalTransient):
                ledger["possible_duplicates"] += bool(exc.maybe_sent)
                ledger["resend"].append(lines)
            elif isinstance(exc, FalRequestError):
                metrics.requests(self.name, endpoint.id, "failed")
                message = ("fal rejected the input: " + "; ".join(exc.fields)) if exc.fields \
                    else str(exc)
                for line in error_lines(lines, "invalid_input" if exc.fields
                                         else "request_rejected", message):
                    finish_line(ctx, build, ledger, out, line)
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


@functools.cache
def queue_client() -> FalQueueClient:
    """This process's fal queue client (key and URL from settings)."""
    from moonbatch.config import get_settings

    s = get_settings()
    fal = s.section(FalSettings)
    return FalQueueClient(fal.fal_queue_url, fal.fal_api_key(), timeout=s.http_timeout)
