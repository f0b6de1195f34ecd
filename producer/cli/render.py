"""What the command line shows of a run: the progress of a followed run (a bar on a terminal,
a line at a steady interval otherwise), its summary, a dry run's estimate, the status line and
the skipped keys. Text only: the data comes from the Python API below."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moonbatch.producer.cli.console import Fail, err, out

#: Seconds between progress lines when stderr is not a terminal (Airflow's logs, CI, a pipe).
PROGRESS_INTERVAL = float(os.environ.get("MOONBATCH_PROGRESS_INTERVAL", "30"))


def planned(plan: dict[str, Any]) -> str:
    """What a plan holds, for the line ``run``/``submit`` print."""
    text = (f"{plan['items']} images in {plan['shards']} shard(s); {plan['skipped']} other "
            "objects skipped")
    if plan.get("skipped_existing"):
        text += f"; {plan['skipped_existing']} already with an ok row (--skip-existing) left out"
    return text


def provider_text(doc: dict[str, Any]) -> str:
    """The provider's own phrase for a snapshot, summary or dry run (``Provider.describe``)."""
    from moonbatch.workers.providers import provider_of

    return provider_of(doc).describe(doc)


def at(doc: dict[str, Any]) -> str:
    """Where a run's work in flight is, in the provider's words (``Wording.at``)."""
    from moonbatch.workers.providers import provider_of

    return provider_of(doc).wording.at


def print_summary(snap: dict[str, Any]) -> None:
    """The run's summary as a two-column table on stdout; paths fold, never cut."""
    c = snap["counts"]
    skipped = c["skipped"]
    if skipped:
        skipped = f"{skipped} (list them: moonbatch status {snap['run_id']} --skipped)"
    out_of = sum(1 for b in snap["batches"] if not b.get("merged", True))
    from moonbatch.workers.providers import provider_of

    provider = provider_of(snap)
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for k, v in (("run", snap["run_id"]), ("status", snap["status"]),
                 ("provider", provider_text(snap)), ("skill", snap["skill"]),
                 ("items", c["total"]), ("ok", c["ok"]), ("error", c["error"]),
                 *([("cached (not sent)", c["cached"])] if c.get("cached") else []),
                 ("skipped (not images)", skipped),
                 (provider.wording.units, provider.count_units(snap["batches"]) if not out_of
                  else f"{provider.count_units(snap['batches'])} ({out_of} at {at(snap)})"),
                 ("tokens in/out", f"{snap['usage']['input_tokens']}/{snap['usage']['output_tokens']}"),
                 ("spend", spend_text(snap["spend"]) if snap.get("spend") else None),
                 ("stopped", (snap.get("stop_reason") or {}).get("reason")),
                 ("wall time", f"{snap['timings'].get('wall_seconds', 0):.1f}s"),
                 ("results", snap["output"] + "results/"), ("summary", snap["output"] + "run.json")):
        if k in ("spend", "stopped") and v is None:
            continue
        table.add_row(str(k), str(v))
    out.print(table)


def size(n: int) -> str:
    """Bytes as ``1,234,567 (1.2 MB)``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.1f} {unit})"
    return f"{n:,}"


def cache_text(c: dict[str, Any]) -> str:
    """A dry run's cache check as one phrase: what the result cache would serve and save."""
    if not c.get("checked"):
        return c.get("note") or "not checked (add --cache-check)"
    saved = c.get("saved_usd")
    return (f"{c['served']:,} of {c['items']:,} item(s) served without sending "
            f"({c['hits']:,} from the cache, {c['copies']:,} copies in the run); "
            + ("saves no published price" if saved is None else f"saves ${saved:,.4f}"))


def print_dry_run(report: dict[str, Any]) -> None:
    """A dry run's report as a two-column table on stdout (see ``producer.runs.dry_run``)."""
    from moonbatch.workers.providers import provider_of

    provider = provider_of(report)
    note = provider.upload_note(report)
    cost = report["cost_usd"]
    rows: list[tuple[str, Any]] = [
        ("provider", provider_text(report)), ("skill", report["skill"]),
        *([("exports", ", ".join(report["exports"]) or "none")] if "exports" in report else []),
        ("input", report["input"]), ("items", f"{report['items']:,}"),
        ("skipped (not images)", f"{report['skipped']:,}"),
        *([("skipped (ok in " + report["skip_existing"] + ")", f"{report['skipped_existing']:,}")]
          if report.get("skip_existing") else []),
        *([("images per item", _images_per_item(report))]
          if set(report.get("images_per_item") or {"1": 0}) != {"1"} else []),
        ("shards", f"{report['shards']:,}"),
        (provider.wording.units, f"{report['requests']:,}"),
        ("image bytes", size(report["image_bytes"])),
        ("upload bytes", size(report["upload_bytes"]) + (f" ({note})" if note else ""))]
    if report["input_tokens"] is not None:
        rows.append(("input tokens (estimate)", f"{report['input_tokens']:,}"))
        rows.append(("output tokens (estimate)", f"{report['output_tokens']:,}"))
    if report["compute_seconds"] is not None:
        rows.append(("compute seconds (estimate)", f"{report['compute_seconds']:,.0f}"))
    rows.append(("cost (USD, estimate)", "no published price" if cost is None
                 else f"${cost:,.4f}" if cost < 1 else f"${cost:,.2f}"))
    rows.append(("basis", report["basis"]))
    # The provider's lines ("model: ...", "priority: ..."; older reports have none) go after
    # the skill: what the run asks for, before what it counts.
    details = [(k, v) if sep else ("", k) for k, sep, v in
               (str(line).partition(": ") for line in report.get("details") or ())]
    rows[2:2] = details
    if report.get("cache"):
        rows.append(("cache", cache_text(report["cache"])))
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for k, v in rows:
        table.add_row(k, str(v))
    err.print("dry run: nothing was written and nothing was sent", highlight=False)
    out.print(table)
    for warning in report.get("warnings") or ():
        err.print(f"[yellow]warning:[/yellow] {escape(str(warning))}", highlight=False,
                  soft_wrap=True)


def _images_per_item(report: dict[str, Any]) -> str:
    """``"2 (40 items), 3 (2 items); 86 images"``: how many items have how many images."""
    counts = report.get("images_per_item") or {}
    parts = [f"{n} ({c:,} item{'s' if c != 1 else ''})" for n, c in counts.items()]
    return f"{', '.join(parts)}; {report.get('images', 0):,} images"


def print_skipped(output: str, snap: dict[str, Any], settings) -> None:
    """Every key skipped, one per line on stdout, streamed from storage: a key skipped as not
    an image alone, one that cannot be an item with its reason after a tab."""
    from moonbatch.workers import layout
    from moonbatch.workers.runstate import open_output
    from moonbatch.workers.storage import get_json_or_none

    store = open_output(output, settings)
    plan = get_json_or_none(store, layout.PLAN)
    if plan is None:
        raise Fail(f"run {snap['run_id']} is still being planned: skipped objects are listed "
                   "once its plan is complete")
    why = "not images, or for the reason after a tab" if plan.get("skipped_reasons") else "not images"
    err.print(f"{plan['skipped']} object(s) under {snap['input']} skipped ({why}):",
              highlight=False, soft_wrap=True)
    if "skipped_parts" not in plan:  # a run planned before the full list was kept
        for key in plan.get("skipped_examples", []):
            print(key)
        if plan["skipped"] > len(plan.get("skipped_examples", [])):
            err.print("(this run kept only these examples)")
        return
    for part in range(plan["skipped_parts"]):
        for line in store.get(layout.skipped_part(part)).splitlines():
            if line.strip():
                record = json.loads(line)  # a key that cannot be an item has its reason
                print(record["key"] + (f"\t{record['reason']}" if record.get("reason") else ""))


def spend_text(spend: dict[str, Any]) -> str:
    """``spend $0.0123 (estimated $0.0150), in flight ~$0.0040, budget $1`` (README "Budget
    and stops")."""
    text = (f"spend ${spend.get('actual_usd', 0):.4f} (estimated "
            f"${spend.get('estimated_usd', 0):.4f}), in flight ~${spend.get('in_flight_usd', 0):.4f}")
    if spend.get("max_cost_usd") is not None:
        text += f", budget ${spend['max_cost_usd']:g}"
    return text


def status_line(snap: dict[str, Any]) -> str:
    """``run ID: running  3/9 items done (ok 3, error 0, in flight 2); provider ...`` (markup)."""
    c, s = snap["counts"], snap["shards"]
    return (f"run {snap['run_id']}: [bold]{snap['status']}[/bold]  "
            f"{c['done']}/{c['total'] if c['total'] is not None else '?'} items done "
            f"(ok {c['ok']}, error {c['error']}, in flight {c['in_flight']}); "
            f"provider {escape(provider_text(snap))}; "
            f"batches at {at(snap)} {s.get('in_flight', 0)}; shards merged "
            f"{s['merged']}/{s['total'] if s['total'] is not None else '?'}, "
            f"submitted {s['submitted']}")


def _duration(seconds: float) -> str:
    """``1h02m``, ``4m05s`` or ``12s``."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(snap: dict[str, Any], elapsed: float) -> str:
    """One line of a followed run's progress: items done, ok, error, in flight, rate, ETA."""
    c = snap["counts"]
    total = c["total"]
    if snap["shards"]["total"] is None and not c["done"]:
        return f"run {snap['run_id']}: planning ({_duration(elapsed)})"
    rate = c["done"] / elapsed if elapsed > 0 else 0.0
    eta = (_duration((total - c["done"]) / rate) if rate > 0 and total is not None
           else "unknown")
    return (f"run {snap['run_id']}: {c['done']}/{total if total is not None else '?'} items "
            f"done (ok {c['ok']}, error {c['error']}, in flight {c['in_flight']}); "
            f"{rate:.1f} items/s; ETA {eta}")


class ProgressView:
    """Shows a run being followed (pass ``update`` as ``on_progress``): a bar on stderr when it
    is a terminal; otherwise ``progress_line`` every ``interval`` seconds (default
    ``MOONBATCH_PROGRESS_INTERVAL``, 30), so a log shows the run moving."""

    def __init__(self, *, interval: float | None = None) -> None:
        self.interval = PROGRESS_INTERVAL if interval is None else interval
        self.start = self.last = time.time()
        self.bar: Progress | None = None
        self.task = None

    def __enter__(self) -> ProgressView:
        if err.is_terminal:
            # Items first: the bar counts images, the shards follow in the note.
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.fields[items]}"), TextColumn("{task.fields[note]}"),
                                TimeElapsedColumn(), console=err, transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("planning", total=None, items="", note="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, snap: dict[str, Any]) -> None:
        """Show ``snap`` (a run's status)."""
        c, s = snap["counts"], snap["shards"]
        if self.bar is not None:
            total = c["total"]
            self.bar.update(self.task, total=total, completed=c["done"] + c["in_flight"],
                            description="planning" if s["total"] is None else "annotating",
                            items=f"{c['done']}/{total if total is not None else '?'} items",
                            note=f"ok {c['ok']}  error {c['error']}  shards merged "
                                 f"{s['merged']}/{s['total'] if s['total'] is not None else '?'}")
            return
        now = time.time()
        if now - self.last >= self.interval:
            self.last = now
            err.print(progress_line(snap, now - self.start), highlight=False, soft_wrap=True)


def requeued_text(done: dict[str, Any]) -> str:
    """What ``resume`` did (``producer.ops.requeue``'s dict)."""
    rid = done["run_id"]
    if done.get("complete"):
        return f"run {rid} is already complete"
    if "replanned" in done:
        plan = done["replanned"]
        return (f"run {rid}: planned again: {plan['items']} images in {plan['shards']} "
                "shard(s)")
    return f"run {rid}: " + ", ".join(f"{n} shard(s) {a}" for a, n in sorted(done["counts"].items()))


def retried_text(done: dict[str, Any]) -> str:
    """What ``retry-failed`` did (``producer.ops.retry``'s dict)."""
    rid, action = done["run_id"], done["action"]
    counts = ", ".join(f"{c} {n}" for c, n in sorted((done.get("chosen") or {}).items()))
    others = ", ".join(f"{c} {n}" for c, n in sorted((done.get("others") or {}).items()))
    if action in ("under_way", "continued"):
        what = f"retry pass {done['pass']} of run {rid} ({done['items']} item(s))"
        if action == "under_way":
            return f"{what} is under way: follow it with `moonbatch wait {rid}`"
        return f"{what}: continued"
    if action == "nothing":
        why = (f"no error rows with code {', '.join(done['wanted'] or [])} (its error rows: "
               f"{others})" if others else "no error rows")
        return f"run {rid}: {why}: nothing to retry"
    if action == "would_retry":
        return (f"run {rid}: would retry {done['items']} error row(s) in {done['shards']} "
                f"shard(s): {counts}" + (f"; not retried: {others}" if others else "")
                + " (dry run: nothing changed)")
    return (f"run {rid}: retry pass {done['pass']}: {done['items']} item(s) of "
            f"{done['shards']} shard(s) sent again ({counts})")
