"""``moonbatch run`` and ``moonbatch submit`` (and their ``--dry-run``): start a run through
the Python API and show it."""

from __future__ import annotations

import json
import os
from typing import Any

from moonbatch.producer.cli import app
from moonbatch.producer.cli.console import Fail, cli_errors, err, interruptible, notice
from moonbatch.producer.cli.inspect import reporting
from moonbatch.producer.cli.options import (
    AllowEmptyOpt,
    BaseOpt,
    CacheCheckOpt,
    CacheSampledOpt,
    DryRunJsonOpt,
    DryRunOpt,
    EmbeddedBrokerOpt,
    EndpointOpt,
    ErrorSampleOpt,
    ExportOpt,
    FalStoreIoOpt,
    ForceOpt,
    FormatOpt,
    IdColumnOpt,
    ImageColumnOpt,
    InputArg,
    InputFormatOpt,
    LengthOpt,
    MaxCostOpt,
    MaxErrorRateOpt,
    MaxPixelsOpt,
    MaxTokensOpt,
    ModelOpt,
    NoCacheOpt,
    ObjectOpt,
    OutputArg,
    PriorityOpt,
    ProviderOpt,
    QuestionOpt,
    QueueTimeoutOpt,
    ReasoningOpt,
    ReportOpt,
    ShardSizeOpt,
    SkillOpt,
    SkipExistingOpt,
    SpatialRefsOpt,
    TemperatureOpt,
    TimeoutOpt,
    TopPOpt,
    WorkersOpt,
    epilog,
)
from moonbatch.producer.cli.render import ProgressView, planned, print_dry_run, print_summary


def _dry_run(input: str, output: str, options: dict[str, Any], allow_empty: bool,
             as_json: bool, cache_check: bool = False) -> None:
    """``--dry-run``: print ``moonbatch.dry_run``'s estimate (a table, or JSON)."""
    from moonbatch.api import dry_run

    report = dry_run(input, output, allow_empty=allow_empty, cache_check=cache_check,
                     **options)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print_dry_run(report)


@app.command(epilog=epilog(
    "moonbatch run s3://photos/2024/ s3://annotations/2024/ --skill caption --length short",
    "moonbatch run ./images ./out --skill query --question \"Is there a dog?\" --workers 4",
    "moonbatch run s3://b/in/ s3://b/out/ --skill detect --object face --workers 0  # a fleet",
    "moonbatch run s3://b/in/ s3://b/out/ --timeout 3600 || moonbatch wait RUN_ID",
    "moonbatch run s3://b/in/ s3://b/out/ --skill detect --object car --export label-studio "
    "--export yolo",
    "moonbatch run s3://b/in/ s3://b/out/ --provider fal --endpoint fal-ai/moondream/batched "
    "--skill query --question \"Is it a cat?\"",
    "moonbatch run s3://b/in/ s3://b/out/ --provider fal --dry-run   # what it would cost",
    "moonbatch run s3://b/in/ s3://b/out/ --model moondream3.1 --dry-run  # its price",
    "moonbatch run s3://b/in/ s3://b/out/ --provider fal --priority low --queue-timeout 600",
    "moonbatch run s3://b/in/ s3://b/out/ --max-cost 20 --max-error-rate 0.5  # exit 5: stopped",
    "moonbatch run ./images ./out --skill detect --object car --report  # ./out/report.html"))
def run(input: InputArg, output: OutputArg,
        skill: SkillOpt = None, length: LengthOpt = None, question: QuestionOpt = None,
        object: ObjectOpt = None, reasoning: ReasoningOpt = None,
        temperature: TemperatureOpt = None, top_p: TopPOpt = None,
        max_tokens: MaxTokensOpt = None, spatial_refs: SpatialRefsOpt = None,
        shard_size: ShardSizeOpt = None,
        max_pixels: MaxPixelsOpt = None, provider: ProviderOpt = None,
        endpoint: EndpointOpt = None, input_format: InputFormatOpt = "auto",
        id_column: IdColumnOpt = None, image_column: ImageColumnOpt = None,
        base: BaseOpt = None, output_format: FormatOpt = "jsonl",
        skip_existing: SkipExistingOpt = None, model: ModelOpt = None,
        priority: PriorityOpt = None, fal_store_io: FalStoreIoOpt = None,
        queue_timeout: QueueTimeoutOpt = None, export: ExportOpt = None,
        max_cost: MaxCostOpt = None, max_error_rate: MaxErrorRateOpt = None,
        error_sample: ErrorSampleOpt = None,
        workers: WorkersOpt = None,
        timeout: TimeoutOpt = None, allow_empty: AllowEmptyOpt = False,
        force: ForceOpt = False, embedded_broker: EmbeddedBrokerOpt = False,
        no_cache: NoCacheOpt = False, cache_sampled: CacheSampledOpt = False,
        cache_check: CacheCheckOpt = False, report: ReportOpt = False,
        dry_run: DryRunOpt = False, as_json: DryRunJsonOpt = False) -> None:
    """Annotate every image under INPUT and write the results under OUTPUT; exit 0 when every
    image has a result (ok or error).

    Checks the broker, the provider's key, INPUT and OUTPUT before writing anything. The same
    command again after success exits 0 ("already complete"); after an interrupted start it
    starts again; for an unfinished run it says to `moonbatch resume RUN_ID`. With --dry-run,
    only lists and plans INPUT and prints what the run would send and cost. Without a
    terminal, prints a progress line every MOONBATCH_PROGRESS_INTERVAL seconds (30).
    """
    from moonbatch.api import run as start

    options = dict(skill=skill, length=length, question=question, object=object,
                   reasoning=reasoning, temperature=temperature, top_p=top_p,
                   max_tokens=max_tokens, spatial_refs=spatial_refs, shard_size=shard_size,
                   max_pixels=max_pixels,
                   provider=provider, endpoint=endpoint, input_format=input_format,
                   id_column=id_column, image_column=image_column, base=base,
                   format=output_format, skip_existing=skip_existing, model=model,
                   priority=priority, fal_store_io=fal_store_io, queue_timeout=queue_timeout,
                   exports=export,
                   max_cost=max_cost, max_error_rate=max_error_rate,
                   error_sample=error_sample, cache=False if no_cache else None,
                   cache_sampled=cache_sampled or None)
    where: dict[str, Any] = {"workers": workers if workers is not None else os.cpu_count()}
    finished: dict[str, Any] = {}  # the run's OUTPUT once it is final, for --report
    with cli_errors(), interruptible(where), reporting(report, finished):
        if as_json and not dry_run:
            raise Fail("--json applies to --dry-run only: add --dry-run, or leave --json out",
                       code=2)
        if cache_check and not dry_run:
            raise Fail("--cache-check applies to --dry-run only: add --dry-run", code=2)
        if report and dry_run:
            raise Fail("--report applies to a run, not to --dry-run: leave one out", code=2)
        if dry_run:
            _dry_run(input, output, options, allow_empty, as_json, cache_check)
            return

        from moonbatch.workers.storage import normalize_url

        where["output"] = normalize_url(output)  # for Ctrl-C's note (--force: a folder under it)

        def on_plan(plan: dict[str, Any]) -> None:
            err.print(f"run [bold]{plan['run_id']}[/bold]: {planned(plan)}")

        with ProgressView() as view:
            done = start(input, output, workers=workers, timeout=timeout,
                         embedded_broker=embedded_broker, allow_empty=allow_empty, force=force,
                         on_plan=on_plan, on_progress=view.update, on_notice=notice,
                         **options)
        if done.note:  # already complete: nothing was done
            err.print(done.note, highlight=False, soft_wrap=True)
        print_summary(done.final or done.status())  # final: as followed, not read again
        finished["output"] = done.output


@app.command(epilog=epilog(
    "RUN_ID=$(moonbatch submit s3://photos/ s3://out/captions/ --skill caption | tail -n1)",
    "moonbatch wait $RUN_ID --timeout 7200",
    "moonbatch submit s3://photos/ s3://out/c/ --provider fal --dry-run --json"))
def submit(input: InputArg, output: OutputArg,
           skill: SkillOpt = None, length: LengthOpt = None, question: QuestionOpt = None,
           object: ObjectOpt = None, reasoning: ReasoningOpt = None,
           temperature: TemperatureOpt = None, top_p: TopPOpt = None,
           max_tokens: MaxTokensOpt = None, spatial_refs: SpatialRefsOpt = None,
           shard_size: ShardSizeOpt = None,
           max_pixels: MaxPixelsOpt = None, provider: ProviderOpt = None,
           endpoint: EndpointOpt = None, input_format: InputFormatOpt = "auto",
           id_column: IdColumnOpt = None, image_column: ImageColumnOpt = None,
           base: BaseOpt = None, output_format: FormatOpt = "jsonl",
           skip_existing: SkipExistingOpt = None, model: ModelOpt = None,
           priority: PriorityOpt = None, fal_store_io: FalStoreIoOpt = None,
           queue_timeout: QueueTimeoutOpt = None, export: ExportOpt = None,
           max_cost: MaxCostOpt = None, max_error_rate: MaxErrorRateOpt = None,
           error_sample: ErrorSampleOpt = None,
           allow_empty: AllowEmptyOpt = False, force: ForceOpt = False,
           no_cache: NoCacheOpt = False, cache_sampled: CacheSampledOpt = False,
           cache_check: CacheCheckOpt = False,
           dry_run: DryRunOpt = False, as_json: DryRunJsonOpt = False) -> None:
    """Plan and enqueue a run for a worker fleet; print its run id on the last line of stdout.

    Runs the same checks as `run` first. The same command again after the run completed exits
    0 and prints the run id again. With --dry-run, only lists and plans INPUT and prints what
    the run would send and cost.
    """
    from moonbatch.api import submit as start

    options = dict(skill=skill, length=length, question=question, object=object,
                   reasoning=reasoning, temperature=temperature, top_p=top_p,
                   max_tokens=max_tokens, spatial_refs=spatial_refs, shard_size=shard_size,
                   max_pixels=max_pixels,
                   provider=provider, endpoint=endpoint, input_format=input_format,
                   id_column=id_column, image_column=image_column, base=base,
                   format=output_format, skip_existing=skip_existing, model=model,
                   priority=priority, fal_store_io=fal_store_io, queue_timeout=queue_timeout,
                   exports=export,
                   max_cost=max_cost, max_error_rate=max_error_rate,
                   error_sample=error_sample, cache=False if no_cache else None,
                   cache_sampled=cache_sampled or None)
    with cli_errors():
        if as_json and not dry_run:
            raise Fail("--json applies to --dry-run only: add --dry-run, or leave --json out",
                       code=2)
        if cache_check and not dry_run:
            raise Fail("--cache-check applies to --dry-run only: add --dry-run", code=2)
        if dry_run:
            _dry_run(input, output, options, allow_empty, as_json, cache_check)
            return
        done = start(input, output, allow_empty=allow_empty, force=force, **options)
        if done.note:
            err.print(done.note, highlight=False, soft_wrap=True)
        else:
            err.print(f"{planned(done.plan)}; results: {done.output}", highlight=False,
                      soft_wrap=True)
        print(done.id)
