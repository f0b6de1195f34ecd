"""``python -m bench [NAME ...] [--write | --smoke]``: run the benchmarks (all by default), print
each one's numbers and ratios, and with ``--write`` rewrite BENCHMARKS.md with them and the
machine. ``--smoke`` runs each one once at tiny sizes (seconds): it checks that every benchmark
still runs against today's code (tests/test_bench.py runs it), and its numbers mean nothing."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from bench.common import Result, Servers, machine
from bench.report import write_report

BENCHMARKS = ("shard_build", "downscale", "end_to_end", "fal_throughput", "merge", "memory",
              "cache", "realtime", "scale")
REPORT = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks; return 1 if one of them crashed."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--write", action="store_true", help=f"rewrite {REPORT.name} with the results")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one repeat: check that every benchmark runs (numbers mean nothing)")
    args = parser.parse_args(argv)
    if args.smoke and args.write:
        parser.error("--smoke numbers mean nothing: they cannot --write the report")
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = [n for n in BENCHMARKS if n in args.names] if args.names else list(BENCHMARKS)

    load = os.getloadavg()[0]
    if load > 0.5 and not args.smoke:
        print(f"warning: the 1-minute load average is {load:.2f} before the benchmarks start: other "
              "processes use the CPU, so the numbers will be noisy")
    started = time.perf_counter()
    servers = Servers()
    results: list[Result] = []
    crashed = False
    try:
        for name in names:
            module = importlib.import_module(f"bench.{name}")
            t0 = time.perf_counter()
            try:
                result = module.run(servers, smoke=args.smoke)
            except Exception as exc:
                traceback.print_exc()
                result = Result(name, skipped=f"crashed: {type(exc).__name__}: {exc}")
                crashed = True
            result.seconds = time.perf_counter() - t0
            result.print()
            results.append(result)
    finally:
        servers.close()
    total = time.perf_counter() - started
    print(f"== suite: {len(results)} benchmark(s) in {total:.1f} s")
    if args.write:
        info = machine()
        info["load average (1 min) at start / end"] = f"{load:.2f} / {os.getloadavg()[0]:.2f}"
        write_report(REPORT, results, info, total, names == list(BENCHMARKS))
        print(f"wrote {REPORT}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
