"""BENCHMARKS.md: the results of a run, the machine, and what each benchmark measures (its module
docstring, so the description lives next to the code)."""

from __future__ import annotations

import importlib
import inspect
import time
from pathlib import Path

from bench.common import Result, verdict


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _targets(results: list[Result]) -> list[str]:
    """One line per measurement that has a target: met or MISSED at a glance."""
    rows = [(r.name, row) for r in results for row in r.rows if row.met is not None]
    if not rows:
        return ["No measurement of this run has a target."]
    missed = sum(1 for _, row in rows if not row.met)
    return [f"{len(rows) - missed} of {len(rows)} targets met.", "",
            "| benchmark | measurement | ratio | target | |", "|---|---|---|---|---|",
            *(f"| {name} | {_cell(row.measurement)} | {_cell(row.ratio)} | {_cell(row.target)} | "
              f"{verdict(row.met)} |" for name, row in rows)]


def write_report(path: Path, results: list[Result], machine: dict[str, str], seconds: float,
                 complete: bool) -> None:
    """Rewrite ``path`` with ``results`` (``complete``: every benchmark ran)."""
    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m bench --write` (run `python -m bench [NAME ...]` to print the same "
        "numbers without writing). Every number is compared with a baseline measured in the same "
        "run, on the same local servers: moto's S3 server and the Batch API emulator in the "
        "benchmark process, a private redis-server (databases 14 and 15), Celery workers and "
        "probes in child processes. Generated inputs are cached under `/tmp/moonbatch-bench-cache` "
        "(`MOONBATCH_BENCH_CACHE`).",
        "",
        f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        + ("all benchmarks" if complete else "only " + ", ".join(r.name for r in results))
        + f", {seconds:.0f} s in all ("
        + ", ".join(f"{r.name} {r.seconds:.0f} s" for r in results) + ").",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {_cell(v)} |" for k, v in machine.items()),
        "",
        "## Targets",
        "",
        *_targets(results),
        "",
        "## Results",
        "",
        "| benchmark | measurement | value | baseline | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.name} | skipped | {_cell(r.skipped)} | | | |")
        for row in r.rows:
            target = f"{row.target} ({verdict(row.met)})" if row.met is not None else row.target
            lines.append(f"| {r.name} | {_cell(row.measurement)} | {_cell(row.value)} | "
                         f"{_cell(row.baseline)} | {_cell(row.ratio)} | {_cell(target)} |")
    for r in results:
        doc = inspect.getdoc(importlib.import_module(f"bench.{r.name}")) or ""
        lines += ["", f"## {r.name}", "", doc]
        if r.skipped:
            lines += ["", f"Skipped: {r.skipped}"]
        if r.notes:
            lines += ["", *(f"- {note}" for note in r.notes)]
    path.write_text("\n".join(lines) + "\n")
