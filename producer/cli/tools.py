"""``moonbatch demo``, ``moonbatch emulator`` and ``moonbatch flower``: the tools around runs
(a run with no account and no servers, the emulators of both providers, Flower on the
fleet's broker)."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Annotated, Optional

import typer

from moonbatch.producer.cli import app
from moonbatch.producer.cli.console import Fail, cli_errors, err, notice, out
from moonbatch.producer.cli.inspect import write_report
from moonbatch.producer.cli.options import (
    DemoShardSizeOpt,
    DemoTimeoutOpt,
    DemoWorkersOpt,
    EndpointOpt,
    FalStoreIoOpt,
    LengthOpt,
    ModelOpt,
    ObjectOpt,
    PriorityOpt,
    ProviderOpt,
    QuestionOpt,
    QueueTimeoutOpt,
    ReasoningOpt,
    ReportOpt,
    SkillOpt,
    epilog,
)
from moonbatch.producer.cli.render import ProgressView, planned, print_summary


def skimage_data_dir() -> Path:
    """The folder of sample photographs that scikit-image ships (``skimage/data``)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise Fail("scikit-image is not installed: pip install 'moonbatch[demo]' installs it")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@app.command(epilog=epilog("moonbatch demo", "moonbatch demo --skill query --question "
                            "\"What is in the picture?\" --output /tmp/demo",
                            "moonbatch demo --provider fal --endpoint fal-ai/moondream/batched",
                            "moonbatch demo --model moondream3.1"))
def demo(output: Annotated[Path, typer.Option(
             "--output", metavar="DIRECTORY",
             help="each run goes into DIRECTORY/<run id>/")] = Path("moonbatch-demo"),
         skill: SkillOpt = None, length: LengthOpt = None, question: QuestionOpt = None,
         object: ObjectOpt = None, reasoning: ReasoningOpt = None,
         provider: ProviderOpt = None, endpoint: EndpointOpt = None, model: ModelOpt = None,
         priority: PriorityOpt = None, fal_store_io: FalStoreIoOpt = None,
         queue_timeout: QueueTimeoutOpt = None, shard_size: DemoShardSizeOpt = 8, workers: DemoWorkersOpt = 2,
         timeout: DemoTimeoutOpt = 300.0, report: ReportOpt = False) -> None:
    """Annotate scikit-image's sample photographs with no account and no servers: an embedded
    broker (a private redis-server), local storage and the emulator of the Batch API or (with
    --provider fal) of fal's queue API."""
    from moonbatch.config import get_settings, reload_settings
    from moonbatch.emulator.fal import FalConfig
    from moonbatch.emulator.server import EmulatorConfig, EmulatorServer
    from moonbatch.producer.local import start_and_follow
    from moonbatch.producer.runs import new_run_id
    from moonbatch.producer.submit import new_spec
    from moonbatch.workers.app import reconfigure

    with cli_errors():
        run_id = new_run_id()
        target = (output / run_id).resolve()
        source = skimage_data_dir()
        # The skill, provider, endpoint and shard size are checked before anything starts.
        spec = new_spec(str(source), str(target), get_settings(), skill=skill, run_id=run_id,
                        length=length, question=question, object=object, reasoning=reasoning,
                        shard_size=shard_size, provider=provider, endpoint=endpoint,
                        model=model, priority=priority, fal_store_io=fal_store_io,
                        queue_timeout=queue_timeout)
        key, fal_key = uuid.uuid4().hex, uuid.uuid4().hex
        config = EmulatorConfig(api_key=key, chunking_seconds=0.5, processing_seconds=1.0,
                                lines_per_second=50, fal_key=fal_key,
                                fal=FalConfig(concurrency=8, processing_seconds=0.1))
        with EmulatorServer(config) as emu:
            os.environ.update({
                "MOONBATCH_PROVIDER": spec.provider,
                "MOONBATCH_MOONDREAM_URL": emu.url, "MOONDREAM_API_KEY": key,
                "MOONBATCH_FAL_QUEUE_URL": emu.fal_url, "FAL_KEY": fal_key,
                "MOONBATCH_REALTIME_URL": emu.url, "MOONBATCH_REALTIME_RATE": "10",
                "MOONBATCH_POLL_MIN_INTERVAL": "0.5", "MOONBATCH_POLL_MAX_INTERVAL": "2",
            })
            reconfigure(reload_settings())
            from moonbatch.workers.providers import provider_of

            what = f"emulated {provider_of(spec.model_dump()).describe(spec.model_dump())} at {emu.url}"
            err.print(f"demo: {source} → {target} ({what})")
            with ProgressView() as view:
                snap = start_and_follow(
                    spec, workers=max(1, workers or 1), timeout=timeout, embedded=True,
                    on_plan=lambda plan: err.print(f"run [bold]{plan['run_id']}[/bold]: "
                                                   f"{planned(plan)}"),
                    on_progress=view.update, on_notice=notice)
        print_summary(snap)
        from moonbatch.workers import writers

        writer = writers.module(spec.output_format)
        first = next(iter(sorted((target / "results").glob(f"*.{writer.SUFFIX}"))), None)
        row = next(writer.decode(first.read_bytes()), None) if first is not None else None
        if row is not None:
            out.print(f"first row of {first.name}: {json.dumps(row, ensure_ascii=False)[:300]}")
        out.print(f"results are in {target / 'results'}")
        if report:
            write_report(str(target))


@app.command(epilog=epilog(
    "moonbatch emulator --port 8787 --api-key K",
    "moonbatch emulator --port 2020 --realtime-no-key   # real-time routes like Moondream Station",
    "MOONBATCH_MOONDREAM_URL=http://127.0.0.1:8787/v1 MOONDREAM_API_KEY=K moonbatch run ..."))
def emulator(port: Annotated[int, typer.Option(
                 "--port", metavar="INTEGER", help="TCP port to listen on (0: any free port)")] = 8787,
             host: Annotated[str, typer.Option(
                 "--host", metavar="TEXT", help="address to bind; keep the loopback default "
                 "unless other machines must reach it")] = "127.0.0.1",
             api_key: Annotated[Optional[str], typer.Option(
                 "--api-key", envvar="MOONDREAM_API_KEY", show_envvar=True, metavar="TEXT",
                 help="key clients must send in X-Moondream-Auth (default: a random key, "
                 "printed)")] = None,
             fal_key: Annotated[Optional[str], typer.Option(
                 "--fal-key", envvar="FAL_KEY", show_envvar=True, metavar="TEXT",
                 help="key fal clients must send (Authorization: Key <key>; default: a random "
                 "key, printed)")] = None,
             realtime_no_key: Annotated[bool, typer.Option(
                 "--realtime-no-key", help="serve the real-time routes (/v1/caption, /v1/query, "
                 "/v1/detect, /v1/point, /v1/segment) without a key, as Moondream Station does "
                 "(default: they need the API key, as Moondream Cloud does)")] = False) -> None:
    """Serve the Moondream Batch API emulator, the Moondream real-time API emulator and the fal
    queue API emulator on one port (for tests, benchmarks and offline work)."""
    from moonbatch.emulator.realtime import RealtimeConfig
    from moonbatch.emulator.server import EmulatorConfig, EmulatorServer

    key = api_key or uuid.uuid4().hex
    fkey = fal_key or uuid.uuid4().hex
    config = EmulatorConfig(api_key=key, fal_key=fkey,
                            realtime=RealtimeConfig(require_key=not realtime_no_key))
    server = EmulatorServer(config, host=host, port=port)
    err.print(f"Moondream Batch API emulator on {server.url}"
              + ("" if api_key else f" (API key: {key})") + f"; files in {server.emulator.dir}")
    err.print(f"Moondream real-time API emulator on {server.url} (MOONBATCH_REALTIME_URL="
              f"{server.url}; " + ("no key needed, as Moondream Station)" if realtime_no_key
                                   else "the same API key)"))
    err.print(f"fal queue emulator on {server.fal_url} (MOONBATCH_FAL_QUEUE_URL={server.fal_url})"
              + ("" if fal_key else f" (fal key: {fkey})"))
    try:
        server.serve_forever()  # SIGINT, SIGTERM and SIGHUP end it (see main)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()  # deletes its folder


@app.command(epilog=epilog(
    "FLOWER_BASIC_AUTH=ops:s3cret moonbatch flower",
    "FLOWER_BASIC_AUTH=ops:s3cret moonbatch flower --address 0.0.0.0 --port 5555  # a server"))
def flower(address: Annotated[str, typer.Option(
               "--address", metavar="HOST", help="interface to listen on (default: this machine "
               "only)")] = "127.0.0.1",
           port: Annotated[int, typer.Option("--port", metavar="PORT",
                                             help="port to listen on")] = 5555,
           no_auth: Annotated[bool, typer.Option(
               "--no-auth", help="serve without a password (only behind a proxy of your own "
               "that authenticates)")] = False) -> None:
    """Start Flower on the fleet's broker, with basic auth (FLOWER_BASIC_AUTH=user:password,
    comma-separated for several users). Task arguments show only OUTPUT URLs, run ids and shard
    and round numbers; Flower's /healthcheck and /metrics stay open, as Flower serves them."""
    from moonbatch.config import get_settings

    with cli_errors():
        auth = os.environ.get("FLOWER_BASIC_AUTH", "")
        if not auth and not no_auth:
            raise Fail("FLOWER_BASIC_AUTH is not set: export FLOWER_BASIC_AUTH=user:password, or "
                       "pass --no-auth to serve Flower without a password behind a proxy of "
                       "your own", code=2)
        if auth and not all(":" in pair and pair.split(":", 1)[0] and pair.split(":", 1)[1]
                            for pair in auth.split(",")):
            raise Fail("FLOWER_BASIC_AUTH must be user:password (several: comma-separated)",
                       code=2)
        if not 0 < port < 65536:
            raise Fail("--port must be within 1..65535", code=2)
        from moonbatch.producer.preflight import check_broker

        problem = check_broker(get_settings().broker_url)
        if problem:
            raise Fail(problem, code=3)
        # Flower reads FLOWER_BASIC_AUTH from the environment itself: the password never
        # appears in a command line (ps shows those).
        env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH" or not no_auth}
        # The task list shows each task's keyword arguments: run, shard, round.
        env.setdefault("FLOWER_TASKS_COLUMNS", "name,uuid,state,kwargs,received,runtime,worker")
        cmd = [sys.executable, "-m", "celery", "-A", "moonbatch.workers", "flower",
               f"--address={address}", f"--port={port}"]
        err.print(f"Flower on http://{address}:{port}/ "
                  + ("(no auth)" if no_auth else "(basic auth from FLOWER_BASIC_AUTH)"))
        os.execve(sys.executable, cmd, env)
