"""``python -m bench.demo_soak [--runs 100] [--burners N]``: run ``moonbatch demo`` many times
in a row while every core is kept busy, and count the failures.

The demo's embedded broker once lost a race under load (kombu's filesystem transport handed a
worker a half-written message); this is the evidence that the private redis-server does not.
Each run is a fresh ``moonbatch demo`` process with its own HOME and TMPDIR; it fails if it exits
non-zero, if ``run.json`` is not ``completed``, if an image is missing or repeated in the
results, or if it leaves a ``moonbatch-*`` temporary file or folder behind. Prints one line per
run and a summary: runs, failures, wall time per run (min / median / max), load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _burn(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF


@dataclasses.dataclass
class Soak:
    """The outcome of ``soak``: ``walls`` in seconds per run, ``failures`` as
    ``(run number, reason)``."""

    runs: int = 0
    walls: list[float] = dataclasses.field(default_factory=list)
    failures: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    burners: int = 0
    loads: list[float] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """One line: runs, failures, wall times, burners and the mean 1-minute load."""
        w = self.walls or [0.0]
        load = statistics.mean(self.loads) if self.loads else 0.0
        return (f"demo soak: {self.runs} run(s), {len(self.failures)} failure(s); wall per run "
                f"min {min(w):.1f} s, median {statistics.median(w):.1f} s, max {max(w):.1f} s, "
                f"total {sum(w):.0f} s; {self.burners} CPU burner(s) on {os.cpu_count()} "
                f"core(s), mean 1-min load {load:.2f}")


def check_run(output: Path, tmp: Path, proc: subprocess.CompletedProcess) -> str | None:
    """Why one demo run failed, or None if it did not."""
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {(proc.stderr or '')[-400:]}"
    runs = list(output.iterdir()) if output.exists() else []
    if len(runs) != 1:
        return f"{len(runs)} run folders in {output}"
    summary = json.loads((runs[0] / "run.json").read_text())
    if summary.get("status") != "completed":
        return f"run.json status {summary.get('status')}"
    ids = [json.loads(line)["id"] for f in sorted((runs[0] / "results").glob("*.jsonl"))
           for line in f.read_text().splitlines()]
    if len(ids) != len(set(ids)) or len(ids) != summary["counts"]["total"]:
        return f"{len(ids)} rows for {summary['counts']['total']} images"
    left = sorted(p.name for p in tmp.iterdir() if p.name.startswith("moonbatch-"))
    if left:
        return f"left behind in TMPDIR: {left}"
    return None


def demo_env(home: Path, tmp: Path) -> dict[str, str]:
    """The environment of a demo on a fresh machine: no moonbatch, Moondream or AWS settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MOONBATCH_", "MOONDREAM_", "AWS_"))}
    env.update(HOME=str(home), TMPDIR=str(tmp))
    return env


def moonbatch_cmd() -> list[str]:
    """How to start the ``moonbatch`` command."""
    exe = shutil.which("moonbatch")
    return [exe] if exe else [sys.executable, "-m", "moonbatch"]


def soak(runs: int, burners: int | None = None, *, timeout: float = 300.0,
         max_seconds: float | None = None, verbose: bool = True) -> Soak:
    """Run the demo ``runs`` times in a row with ``burners`` busy processes (default: one per
    core); stop early after ``max_seconds`` (the result says how many ran)."""
    burners = (os.cpu_count() or 1) if burners is None else burners
    result = Soak(burners=burners)
    stop = multiprocessing.Event()
    procs = [multiprocessing.Process(target=_burn, args=(stop,), daemon=True)
             for _ in range(burners)]
    for p in procs:
        p.start()
    started = time.monotonic()
    try:
        for i in range(1, runs + 1):
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                break
            with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
                home, tmp = Path(scratch, "home"), Path(scratch, "tmp")
                home.mkdir()
                tmp.mkdir()
                output = Path(scratch, "demo")
                t0 = time.monotonic()
                try:
                    proc = subprocess.run(moonbatch_cmd() + ["demo", "--output", str(output)],
                                          env=demo_env(home, tmp), capture_output=True, text=True,
                                          timeout=timeout)
                    wall = time.monotonic() - t0
                    why = check_run(output, tmp, proc)
                except subprocess.TimeoutExpired:
                    wall, why = time.monotonic() - t0, f"no exit within {timeout:.0f} s"
            result.runs += 1
            result.walls.append(wall)
            result.loads.append(os.getloadavg()[0])
            if why:
                result.failures.append((i, why))
            if verbose:
                print(f"run {i:3d}: {'FAIL ' + why if why else 'ok'} ({wall:.1f} s, "
                      f"load {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        stop.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the soak; exit 1 if any run failed."""
    parser = argparse.ArgumentParser(prog="python -m bench.demo_soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--burners", type=int, default=None,
                        help="busy processes beside the demo (default: one per core)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop starting runs after this long")
    args = parser.parse_args(argv)
    result = soak(args.runs, args.burners,
                  max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    for i, why in result.failures:
        print(f"failure in run {i}: {why}")
    print(result.summary())
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
