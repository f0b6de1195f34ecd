"""Every option and argument of the command line, declared once (typer ``Annotated`` types),
and the help texts the commands share (examples, environment, exit codes)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

EXIT_CODES = """\b
Exit codes:
  0    done: the run is complete (or was already), or the command did what it says
  1    the run failed, was cancelled or cannot complete (the message says why)
  2    usage: a bad option, argument or setting
  3    a check before work failed (broker, API key, INPUT, OUTPUT, state location),
       or OUTPUT holds another or an unfinished run; nothing was written
  4    --timeout reached; the run goes on (moonbatch wait RUN_ID)
  5    the run stopped: --max-cost or --max-error-rate; every item has a row
       (moonbatch retry-failed RUN_ID --max-cost USD carries on)
  130  interrupted (Ctrl-C); the run goes on (moonbatch resume RUN_ID --workers N)"""

ENVIRONMENT = """\b
Environment (README "Configuration" lists every variable):
  MOONBATCH_PROVIDER         the default --provider: moondream (default) or fal
  MOONDREAM_API_KEY          the Moondream API key (--provider moondream)
  FAL_KEY                    the fal.ai key (--provider fal)
  MOONBATCH_BROKER_URL       Celery broker (default redis://127.0.0.1:6379/0)
  MOONBATCH_STATE_URL        run registry: a directory or s3://bucket/prefix/ (~/.moonbatch/)
  MOONBATCH_S3_ENDPOINT_URL  S3-compatible endpoint (MinIO, R2); AWS credentials as boto3 reads them"""

SkillOpt = Annotated[Optional[list[str]], typer.Option(
    "--skill", metavar="SKILL", help="caption | query | detect | point | segment (default "
    "caption; segment: --provider moondream-realtime only); "
    "repeat it for several skills in one run: each image is sent once per skill and its row "
    "holds every skill's result under the skill's name")]
LengthOpt = Annotated[Optional[str], typer.Option(
    "--length", metavar="TEXT", help="caption length: short | normal | long (caption; default "
    "normal)")]
QuestionOpt = Annotated[Optional[str], typer.Option(
    "--question", metavar="TEXT", help="the question to ask of each image (query; required)")]
ObjectOpt = Annotated[Optional[str], typer.Option(
    "--object", metavar="TEXT", help="what to find, e.g. \"face\" (detect, point, segment; "
    "required)")]
SpatialRefsOpt = Annotated[Optional[str], typer.Option(
    "--spatial-refs", metavar="JSON", help="where to look: a JSON list of [x, y] points and "
    "[x_min, y_min, x_max, y_max] boxes, normalised 0..1, e.g. '[[0.5, 0.5]]' (query, point, "
    "segment; --provider moondream-realtime only)")]
ReasoningOpt = Annotated[Optional[bool], typer.Option(
    "--reasoning/--no-reasoning", help="chain of thought before the answer (query; default: the "
    "API's, on)")]
TemperatureOpt = Annotated[Optional[float], typer.Option(
    "--temperature", metavar="FLOAT", help="sampling temperature, 0 to 1 (caption, query; "
    "default: the API's)")]
TopPOpt = Annotated[Optional[float], typer.Option(
    "--top-p", metavar="FLOAT", help="nucleus sampling probability, 0 to 1 (caption, query; "
    "default: the API's)")]
MaxTokensOpt = Annotated[Optional[int], typer.Option(
    "--max-tokens", metavar="INTEGER", help="most tokens in an answer (caption, query; default: "
    "the API's)")]
ShardSizeOpt = Annotated[Optional[int], typer.Option(
    "--shard-size", metavar="INTEGER", help="most images per shard (a batch of the Batch API), "
    "1 to 100000 (default 10000, or MOONBATCH_SHARD_SIZE)")]
ProviderOpt = Annotated[Optional[str], typer.Option(
    "--provider", metavar="NAME", help="who annotates: moondream (the Moondream Batch API) | "
    "fal (fal.ai's queue API) | moondream-realtime (the real-time Moondream API: Moondream "
    "Cloud, or a Moondream Station at MOONBATCH_REALTIME_URL) (default: MOONBATCH_PROVIDER, "
    "else moondream)")]
EndpointOpt = Annotated[Optional[str], typer.Option(
    "--endpoint", metavar="ID", help="the fal endpoint (--provider fal only; default "
    "fal-ai/moondream3-preview/<skill>; README \"Providers\" lists them and their options)")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", metavar="NAME", help="the model: for the Batch API e.g. moondream3.1 or "
    "moondream3-preview or a finetune moondream3-preview/<id>@<step> (default: MOONBATCH_MODEL, "
    "else the API's, moondream3-preview); fal's endpoints run a fixed model (--model only "
    "picks fal-ai/moondream/batched's model_id: vikhyatk/moondream2 | fal-ai/moondream2-docci)")]
PriorityOpt = Annotated[Optional[str], typer.Option(
    "--priority", metavar="LEVEL", help="fal's queue priority: normal | low (a backfill that "
    "may wait; X-Fal-Queue-Priority) (--provider fal only; default normal)")]
FalStoreIoOpt = Annotated[Optional[bool], typer.Option(
    "--fal-store-io/--no-fal-store-io", help="let fal keep each request's inputs and outputs "
    "(30 days; the images included) (--provider fal only; default off, X-Fal-Store-IO: 0, or "
    "MOONBATCH_FAL_STORE_IO)", show_default=False)]
QueueTimeoutOpt = Annotated[Optional[float], typer.Option(
    "--queue-timeout", metavar="SECONDS", help="a fal request that has not started after "
    "SECONDS fails (X-Fal-Request-Timeout) and is retried in the next round (--provider fal "
    "only; default: no limit)")]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="list and plan INPUT as a run would and print items, shards, requests, "
    "bytes, tokens and the estimated cost; write nothing, send nothing, need no key")]
NoCacheOpt = Annotated[bool, typer.Option(
    "--no-cache", help="neither read nor write the result cache: send every item, even "
    "identical images (default: cache on, unless MOONBATCH_CACHE=0)")]
CacheSampledOpt = Annotated[bool, typer.Option(
    "--cache-sampled", help="let a sampling run (--temperature above 0) take answers from the "
    "result cache and from identical images of the run")]
CacheCheckOpt = Annotated[bool, typer.Option(
    "--cache-check", help="with --dry-run: read every image and count how many the result "
    "cache would serve, and the cost saved")]
DryRunJsonOpt = Annotated[bool, typer.Option(
    "--json", help="with --dry-run: print the estimate as JSON")]
MaxPixelsOpt = Annotated[Optional[int], typer.Option(
    "--max-pixels", metavar="INTEGER", help="downscale images above this many pixels; 0 sends "
    "full resolution (default 2000000, or MOONBATCH_MAX_PIXELS)")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", metavar="INTEGER", help="local worker processes started for the duration of "
    "the command (default: one per core); 0 uses a running fleet")]
FollowWorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", metavar="INTEGER", help="start INTEGER local worker processes and follow the "
    "run to the end, as `run` does (default: none; a running fleet does the work)")]
TimeoutOpt = Annotated[Optional[float], typer.Option(
    "--timeout", metavar="SECONDS", help="stop waiting after SECONDS and exit 4; the run goes "
    "on (follow it with `moonbatch wait RUN_ID`) (default: wait until it is final)")]
EmbeddedBrokerOpt = Annotated[bool, typer.Option(
    "--embedded-broker", help="start a private broker (a redis-server of this command's own) for "
    "the local workers: no Redis needed (same as MOONBATCH_BROKER_URL=embedded)")]
AllowEmptyOpt = Annotated[bool, typer.Option(
    "--allow-empty", help="accept an INPUT with no objects (a run of 0 images) instead of "
    "failing the check before work")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="if OUTPUT holds a run of another command (or a cancelled or failed one), "
    "start a new run in OUTPUT/<new run id>/ instead of refusing")]


InputFormatOpt = Annotated[str, typer.Option(
    "--input-format", metavar="FORMAT", help="how INPUT is read: auto (by its form: a prefix "
    "of images, a .csv/.jsonl/.parquet manifest, a WebDataset .tar, a Parquet file of image "
    "bytes) | prefix | manifest | webdataset | parquet (e.g. webdataset for a prefix of .tar "
    "shards)")]
IdColumnOpt = Annotated[Optional[str], typer.Option(
    "--id-column", metavar="NAME", help="manifest or Parquet input: the column of item ids "
    "(default id)")]
ImageColumnOpt = Annotated[Optional[list[str]], typer.Option(
    "--image-column", metavar="NAME", help="manifest or Parquet input: the column of images "
    "(default image): an s3:// URI, a key relative to --base, a local path or an http(s) URL "
    "(or a list of them: a multi-image query); for Parquet, the image bytes. Repeat it for "
    "several images per row (--skill query on the Batch API only)")]
BaseOpt = Annotated[Optional[str], typer.Option(
    "--base", metavar="URL", help="manifest input: where relative image keys are (default: "
    "the manifest's folder)")]
SkipExistingOpt = Annotated[Optional[str], typer.Option(
    "--skip-existing", metavar="PREVIOUS_OUTPUT", help="annotate only items without an ok row "
    "in the results of the run at PREVIOUS_OUTPUT (its OUTPUT URL or run id), e.g. images "
    "added since")]
FormatOpt = Annotated[str, typer.Option(
    "--format", metavar="FORMAT", help="results format: jsonl | parquet (results/*.parquet, "
    "one row per item)")]

ExportOpt = Annotated[Optional[list[str]], typer.Option(
    "--export", metavar="FORMAT", help="annotations written under OUTPUT/annotations/ when the "
    "run completes: coco | label-studio | yolo | none; repeat it for several (default: coco "
    "for a detect, point or segment run, none otherwise)")]


class URL(str):
    """A store URL argument (its type name is what help shows: ``<URL>``)."""


class TEXT(str):
    """A text argument (help shows ``<TEXT>``)."""


InputArg = Annotated[URL, typer.Argument(metavar="INPUT", parser=URL, help="where the images "
                                         "are: s3://bucket/prefix/ or a local directory")]
OutputArg = Annotated[URL, typer.Argument(metavar="OUTPUT", parser=URL, help="where results "
                                          "go: s3://bucket/prefix/ or a local directory")]
RunRefArg = Annotated[TEXT, typer.Argument(metavar="RUN_ID", parser=TEXT, help="a run id (from "
                                           "the registry at MOONBATCH_STATE_URL) or the run's "
                                           "OUTPUT")]
NewestRunRefArg = Annotated[Optional[TEXT], typer.Argument(
    metavar="[RUN_ID]", parser=TEXT, show_default=False, help="a run id (from the registry at "
    "MOONBATCH_STATE_URL) or the run's OUTPUT (default: the newest run in the registry)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]
ReportOpt = Annotated[bool, typer.Option(
    "--report", help="once the run is final (completed, stopped, failed or cancelled), write its "
    "report to OUTPUT/report.html: the run, its errors and a sample of rows with their images "
    "and answers, one HTML file a browser opens with no server (as `moonbatch report RUN_ID`)")]
SampleOpt = Annotated[int, typer.Option(
    "--sample", metavar="N", help="rows shown with their image and answers, 0 to 1000, chosen "
    "reproducibly (the same run shows the same rows), error rows included")]
ReportOutOpt = Annotated[Optional[str], typer.Option(
    "--out", metavar="FILE", help="where to write the report: a local file or an s3:// URL "
    "(default: OUTPUT/report.html)")]


def epilog(*examples: str) -> str:
    """A command's help epilog: its examples (``\\b`` keeps click from rewrapping them), then
    the environment variables and the exit codes."""
    lines = "\n".join(f"  {e}" for e in examples)
    return f"\b\nExamples:\n{lines}\n\n{ENVIRONMENT}\n\n{EXIT_CODES}"


CodesArg = Annotated[Optional[list[str]], typer.Argument(
    metavar="[CODE]...", help="retry only error rows with these codes, e.g. object_not_found "
    "read_failed (default: every error row)", show_default=False)]
RetryDryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="print how many error rows of each code would be retried; change "
    "nothing")]


DemoShardSizeOpt = Annotated[int, typer.Option(
    "--shard-size", metavar="INTEGER", help="most images per batch (small, to show several)")]
DemoWorkersOpt = Annotated[int, typer.Option(
    "--workers", metavar="INTEGER", help="local worker processes (at least 1)")]
DemoTimeoutOpt = Annotated[float, typer.Option(
    "--timeout", metavar="SECONDS", help="stop waiting after SECONDS (exit 4)")]
MaxCostOpt = Annotated[Optional[float], typer.Option(
    "--max-cost", metavar="USD", help="budget in dollars: nothing is sent that would take the "
    "run's spend (reported usage x price, plus estimates in flight) past it; items not sent "
    "end as budget_exceeded error rows and the run ends stopped (exit 5)")]
MaxErrorRateOpt = Annotated[Optional[float], typer.Option(
    "--max-error-rate", metavar="RATE", help="stop sending once the share of provider-side "
    "errors (0..1; not the items' own input errors) passes RATE after --error-sample results "
    "(default off)")]
ErrorSampleOpt = Annotated[Optional[int], typer.Option(
    "--error-sample", metavar="N", help="results in before --max-error-rate is judged "
    "(default 20)")]
RetryMaxCostOpt = Annotated[Optional[float], typer.Option(
    "--max-cost", metavar="USD", help="the run's new budget in dollars (spend so far counts): "
    "carries on a run that stopped at its budget")]
