"""realtime: moonbatch's real-time provider against a user's script on the official client.

The same ``N`` = 1000 small distinct photographs (320x240 JPEGs, ``end_to_end.small_photos``) in
moto's S3; the emulator's real-time routes answer every caption after a fixed ``LATENCY`` = 0.2 s
(``RealtimeConfig.processing_seconds``), with no rate limit; both sides keep at most ``C`` = 8
requests in flight.

Baseline, in the same run: what a user writes without moonbatch (``client_script``): the
official ``moondream`` client (2.6.1, ``md.vl(endpoint=..., api_key=...)``) in a
``ThreadPoolExecutor(max_workers=C)``, each task downloading its image with boto3, opening it
with Pillow and calling ``model.caption(image)``; the rows written as one JSONL object to S3 at
the end. Timed as the user runs it, like moonbatch: ``python script.py`` (``CLIENT_COMMAND``: the
function's own source written to a temporary file, with a ``__main__`` that makes a plain
``boto3.client("s3")`` on moto's endpoint), its wall time from starting the interpreter to its
exit (imports of moondream, boto3 and Pillow included), with the same environment, credentials,
images and concurrency as moonbatch's command. Also shown, with no target: the same function
called inside the benchmark process (no interpreter start; the modules already imported; the S3
client already made), as measured before; and beside it moonbatch the same way: the Python
API's ``moonbatch.run`` in a warm process (``end_to_end.moonbatch_warm``: after a warm-up run
in the same process, so its modules are imported and its clients made).

moonbatch: ``moonbatch run s3://…/in/ s3://…/out/ --provider moondream-realtime --workers 0``
with ``MOONBATCH_REALTIME_CONCURRENCY`` = C and a rate far above what C requests of LATENCY can
use, through a running fleet of one ``celery -A moonbatch.workers worker -c 4`` process (a
private redis-server, warmed up by a run of 4 images), with durability on: the run registry in
S3 (``MOONBATCH_STATE_URL``), every step's ledger and results in the output, as always.
moonbatch's modules have their bytecode written first (``end_to_end.compile_moonbatch``), as
installing it would and as the script's packages (moondream, boto3, Pillow) have theirs: this
machine's ``PYTHONDONTWRITEBYTECODE=1`` would otherwise have each command compile moonbatch's
source at its start.

Measured: items/s both ways (wall time of each command: for ``moonbatch run`` starting the CLI,
the checks, planning, every step, the merge; for the script starting the interpreter, its
imports, listing, every caption, the JSONL put); target: moonbatch >= 1.0x the script's.
Also reported: the run's own ``run.json`` wall time, the ideal ``C / LATENCY`` items/s, and where
each one's time went (the start before the first answer and the end after the last, the
answering between them), from the emulator's record of when each request was answered.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import inspect
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import Result, Servers, emulator, median
from bench.end_to_end import (
    compile_moonbatch,
    fleet_env,
    flush_redis,
    moonbatch,
    moonbatch_warm,
    small_photos,
    worker_fleet,
)

N, C, LATENCY = 1000, 8, 0.2
# --smoke: a few images at a tiny latency (checks that the benchmark runs, measures nothing)
SMOKE_N, SMOKE_LATENCY = 8, 0.01
WARM = 4
TARGET = 1.0


def client_script(s3: Any, bucket: str, prefix: str, out_key: str, url: str, key: str,
                  concurrency: int) -> int:
    """A user's script: caption every image under ``prefix`` with the official client in a
    thread pool of ``concurrency``, write the rows as JSONL to ``out_key``; returns the rows."""
    import moondream as md
    from PIL import Image

    model = md.vl(endpoint=url, api_key=key)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])]

    def caption(k: str) -> dict[str, Any]:
        image = Image.open(io.BytesIO(s3.get_object(Bucket=bucket, Key=k)["Body"].read()))
        return {"id": k, **model.caption(image)}

    with cf.ThreadPoolExecutor(max_workers=concurrency) as pool:
        rows = list(pool.map(caption, keys))
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    s3.put_object(Bucket=bucket, Key=out_key, Body=body)
    return len(rows)


# ``python script.py``: ``client_script``'s own source (not a second copy) and what a user's
# script adds around it: the imports, an S3 client, the arguments.
CLIENT_COMMAND = """\
from __future__ import annotations

import concurrent.futures as cf
import io
import json
import sys
from typing import Any

import boto3

{function}

if __name__ == "__main__":
    endpoint, bucket, prefix, out_key, url, key, concurrency = sys.argv[1:]
    s3 = boto3.client("s3", endpoint_url=endpoint)
    print(client_script(s3, bucket, prefix, out_key, url, key, int(concurrency)))
"""


def client_command(env: dict[str, str], endpoint: str, bucket: str, prefix: str, out_key: str,
                   url: str, key: str, concurrency: int) -> tuple[float, int]:
    """Run ``client_script`` as a user does, ``python script.py`` (``CLIENT_COMMAND``) with
    ``env``; returns the command's wall seconds (interpreter start to exit) and its rows.
    Raises ``RuntimeError`` if it failed, ``subprocess.TimeoutExpired`` after 600 s."""
    with tempfile.TemporaryDirectory(prefix="moonbatch-bench-client-") as folder:
        script = os.path.join(folder, "script.py")
        with open(script, "w") as f:
            f.write(CLIENT_COMMAND.format(function=inspect.getsource(client_script)))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, script, endpoint, bucket, prefix, out_key, url,
                               key, str(concurrency)], env=env, cwd=folder, capture_output=True,
                              text=True, timeout=600)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"client script exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return seconds, int(proc.stdout.split()[-1])


class Answers:
    """When each real-time request was answered with a result (``time.time()`` at the end of
    the emulator's handler, status 200: not the CLI's key check, which sends no image), in
    order; wraps ``RealtimeEmulation._serve`` of this process's emulator."""

    def __init__(self, realtime: Any) -> None:
        self.at: list[float] = []
        serve = realtime._serve

        @functools.wraps(serve)
        def timed(skill: str) -> Any:
            resp = serve(skill)
            if resp.status_code == 200:
                self.at.append(time.time())
            return resp

        realtime._serve = timed

    def since(self, t0: float) -> list[float]:
        """Answer times after ``t0``, sorted."""
        return sorted(t for t in self.at if t >= t0)


def gaps(times: list[float], latency: float) -> tuple[float, int]:
    """Seconds and count of the pauses in ``times`` longer than ``3 x latency`` (no answer for
    that long while requests were due: a step ending and the next one starting)."""
    pauses = [b - a for a, b in zip(times, times[1:], strict=False) if b - a > 3 * latency]
    return sum(pauses), len(pauses)


def run(servers: Servers, smoke: bool = False) -> Result:
    """Run the benchmark (see the module docstring); ``smoke``: tiny sizes, to check it runs."""
    from moonbatch.emulator.realtime import RealtimeConfig

    n, latency = (SMOKE_N, SMOKE_LATENCY) if smoke else (N, LATENCY)
    result = Result("realtime")
    flush_redis(servers)
    s3 = servers.s3_client()
    bucket = servers.new_bucket("bench-rt")
    state = servers.new_bucket("bench-rt-state")
    bodies = small_photos(n)
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda ib: s3.put_object(Bucket=bucket, Key=f"in/{ib[0]:04d}.jpg",
                                               Body=ib[1]), enumerate(bodies)))
        list(pool.map(lambda ib: s3.put_object(Bucket=bucket, Key=f"warm/{ib[0]:04d}.jpg",
                                               Body=ib[1]), enumerate(bodies[:WARM])))

    compile_moonbatch()
    with emulator() as emu:
        emu.config.realtime = RealtimeConfig(processing_seconds=latency)
        answers = Answers(emu.emulator.realtime)
        env = {**os.environ, **fleet_env(servers, state),
               "MOONDREAM_API_KEY": emu.config.api_key, "MOONBATCH_REALTIME_URL": emu.url,
               "MOONBATCH_REALTIME_CONCURRENCY": str(C),
               "MOONBATCH_REALTIME_RATE": str(10 * C / latency)}  # never the bound
        with worker_fleet(env):
            if not smoke:
                moonbatch(env, "run", f"s3://{bucket}/warm/", f"s3://{bucket}/warm-out/",
                          "--provider", "moondream-realtime", "--workers", "0")
            t0 = time.time()
            moonbatch_s = moonbatch(env, "run", f"s3://{bucket}/in/", f"s3://{bucket}/out/",
                                    "--provider", "moondream-realtime", "--workers", "0",
                                    "--timeout", "300")
            mb_answers = answers.since(t0)
            # The same through the Python API in a warm process (after a warm-up run there),
            # as the in-process client below runs without an interpreter start.
            options = {"provider": "moondream-realtime", "workers": 0, "timeout": 300}
            t3, api_s = moonbatch_warm(
                env, (f"s3://{bucket}/warm/", f"s3://{bucket}/warm-api-out/", options),
                (f"s3://{bucket}/in/", f"s3://{bucket}/api-out/", options))
            api_answers = answers.since(t3)
        summary = json.loads(s3.get_object(Bucket=bucket, Key="out/run.json")["Body"].read())
        if summary["counts"]["ok"] != n:
            raise RuntimeError(f"moonbatch run: {summary['counts']}")
        steps = [json.loads(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())["steps"]
                 for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/_moonbatch/shards/")[
                     "Contents"] if o["Key"].endswith("/requests.json")]

        t1 = time.time()
        client_s, rows = client_command(env, servers.s3(), bucket, "in/", "client-cmd/rows.jsonl",
                                        emu.url, emu.config.api_key, C)
        cl_answers = answers.since(t1)
        if rows != n:
            raise RuntimeError(f"client script (command): {rows} rows")

        t2 = time.time()
        rows = client_script(s3, bucket, "in/", "client-out/rows.jsonl", emu.url,
                             emu.config.api_key, C)
        inproc_s = time.time() - t2
        in_answers = answers.since(t2)
        if rows != n:
            raise RuntimeError(f"client script (in-process): {rows} rows")

    ideal = C / latency
    mb_rate, cl_rate, in_rate = n / moonbatch_s, n / client_s, n / inproc_s
    ratio = mb_rate / cl_rate
    result.add(f"{n} captions, C = {C}, {latency:g} s each: items/s (wall of each command)",
               f"{mb_rate:.1f} items/s ({moonbatch_s:.1f} s, moonbatch run)",
               f"{cl_rate:.1f} items/s ({client_s:.1f} s, python script.py: official client x "
               f"{C} threads)", f"{ratio:.2f}x the client's", f">= {TARGET:.1f}x", ratio >= TARGET)
    result.add(f"{n} captions: against the script called inside the benchmark process (no "
               "interpreter start, modules imported, S3 client made)",
               f"{mb_rate:.1f} items/s ({moonbatch_s:.1f} s, moonbatch run)",
               f"{in_rate:.1f} items/s ({inproc_s:.1f} s, client_script in-process)",
               f"{mb_rate / in_rate:.2f}x the client's")
    result.add(f"{n} captions: moonbatch.run in a warm process (modules imported, clients "
               "made) against the script called inside the benchmark process",
               f"{n / api_s:.1f} items/s ({api_s:.1f} s, moonbatch.run: Python API)",
               f"{in_rate:.1f} items/s ({inproc_s:.1f} s, client_script in-process)",
               f"{n / api_s / in_rate:.2f}x the client's")
    run_s = summary["timings"]["wall_seconds"]
    result.add("run.json wall (recorded to finalised)", f"{run_s:.1f} s ({n / run_s:.1f} items/s)",
               f"{client_s:.1f} s", f"{client_s / run_s:.2f}x faster")
    result.add("ideal (C / latency)", f"{ideal:.1f} items/s", "",
               f"moonbatch {mb_rate / ideal:.2f}x, client {cl_rate / ideal:.2f}x")
    rows_out = []
    for who, start, wall, times in (("moonbatch", t0, moonbatch_s, mb_answers),
                                    ("client (python script.py)", t1, client_s, cl_answers),
                                    ("moonbatch.run (warm process)", t3, api_s, api_answers),
                                    ("client (in-process)", t2, inproc_s, in_answers)):
        first, last = times[0] - start, start + wall - times[-1]
        pause, count = gaps(times, latency)
        span = times[-1] - times[0]
        rows_out.append(f"{who}: first answer after {first:.2f} s, last answer to the end "
                        f"{last:.2f} s; answering {span:.1f} s at {len(times) / span:.1f} "
                        f"answers/s ({len(times) / span / ideal:.0%} of the ideal), of which "
                        f"{pause:.1f} s in {count} pause(s) > {3 * latency:g} s")
    result.notes += rows_out
    mb_pause = median([b - a for a, b in zip(mb_answers, mb_answers[1:], strict=False)] or [0])
    cl_pause = median([b - a for a, b in zip(cl_answers, cl_answers[1:], strict=False)] or [0])
    result.notes += [
        f"{n} distinct 320x240 JPEGs in moto's S3; the emulator's real-time routes answer each "
        f"caption after {latency:g} s, no rate limit; moonbatch: one worker process with 4 slots "
        f"(warmed up by a {WARM}-image run), MOONBATCH_REALTIME_CONCURRENCY={C}, the default "
        "shard size and poll interval, run registry in S3",
        "moto and the emulator run in the benchmark process, as do the in-process client's "
        "threads; moonbatch's CLI and worker, and the script, are processes of their own: all "
        "share the machine's cores",
        f"moonbatch's steps per shard (ledgers' 'steps'): {', '.join(map(str, steps))}; the "
        "median pause between answers while answering: "
        f"moonbatch {mb_pause:.3f} s, client {cl_pause:.3f} s",
    ]
    return result
