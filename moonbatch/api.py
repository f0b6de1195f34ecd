"""The Python API: start, follow and repair runs from Python (an Airflow task, a Dagster asset,
a notebook) as the ``moonbatch`` command line does, without a shell. README "Python API".

Settings come from the environment as for the command line (``MOONBATCH_BROKER_URL``,
``MOONBATCH_STATE_URL``, ``MOONDREAM_API_KEY``, ``FAL_KEY``...; README "Configuration").
Options go by the command line's names in Python spelling: ``question``, ``object``,
``length``, ``reasoning``, ``temperature``, ``top_p``, ``max_tokens``, ``spatial_refs`` (a list
of ``[x, y]`` points and ``[x_min, y_min, x_max, y_max]`` boxes, normalised 0..1), ``shard_size``,
``max_pixels``, ``endpoint``, ``input_format``, ``id_column``, ``image_column`` (a name, or a list of
names: several images per row, a multi-image query), ``base``,
``format`` (``jsonl`` or ``parquet``), ``skip_existing``, ``model`` (default
``MOONBATCH_MODEL``; refused where the provider cannot run it), fal's queue controls
``priority`` (``"normal"``/``"low"``), ``fal_store_io`` (bool; default
``MOONBATCH_FAL_STORE_IO``, off) and ``queue_timeout`` (seconds), which other providers refuse,
and ``exports`` (a list of ``coco``, ``label-studio``, ``yolo``, written under
OUTPUT/annotations/ when the run completes; default: ``["coco"]`` for a detect, point or
segment run; ``[]``: none),
the stops ``max_cost`` (dollars), ``max_error_rate`` (0..1) and ``error_sample``;
``cache`` (False: ``--no-cache``; default ``MOONBATCH_CACHE``), ``cache_sampled``
(``--cache-sampled``).

Nothing here prints, installs a signal handler or exits; failures raise
``moonbatch.errors`` classes (``InvalidOption``, ``PreflightError``, ``OutputConflict``,
``RunNotFound``, ``RunFailed``, ``RunStopped``, ``Timeout``, ``NoConsumer``; all
``MoonbatchError``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from moonbatch.errors import translated

ProgressFn = Callable[[dict[str, Any]], None]
NoticeFn = Callable[[str, bool], None]


def _settings():
    from moonbatch.config import get_settings

    return get_settings()


class Run:
    """A run, found by its id or OUTPUT (``open_run``) or returned by ``submit``/``run``.

    ``id`` is the run id, ``output`` its OUTPUT URL (normalised, ending in ``/``), ``plan`` the
    plan document when this process planned it (None when it was found, or already complete;
    ``note`` then says so), ``final`` its final ``status()`` when ``run`` followed it to its
    end (None otherwise: ask ``status()``).
    Every method reads the run's state from storage: a ``Run`` may be rebuilt anywhere from
    its id (another Airflow task, another machine with the same ``MOONBATCH_STATE_URL``).
    """

    def __init__(self, run_id: str, output: str, *, plan: dict[str, Any] | None = None,
                 note: str | None = None, final: dict[str, Any] | None = None) -> None:
        self.id, self.output, self.plan, self.note = run_id, output, plan, note
        self.final = final

    def __repr__(self) -> str:
        return f"Run({self.id!r}, {self.output!r})"

    def status(self) -> dict[str, Any]:
        """The run's progress now, the shape of ``run.json``: ``status`` (``planning``,
        ``running``, ``completed``, ``failed``, ``cancelled``, ``stopped``), ``counts``
        (``total``, ``done``, ``ok``, ``error``, ``in_flight``, ``skipped``), ``shards``,
        ``failure``, ``stop_reason`` (``{"code", "reason"}`` of a stopped run), ``spend``
        (``actual_usd``, ``estimated_usd``, ``in_flight_usd``, ``max_cost_usd``), ``usage``,
        ``timings``... One look at storage; no broker needed."""
        from moonbatch.producer import ops

        return ops.snapshot(self.output, _settings())

    def wait(self, timeout: float | None = None, *, workers: int | None = None,
             on_progress: ProgressFn | None = None,
             on_notice: NoticeFn | None = None) -> dict[str, Any]:
        """Block until the run is complete; return its final ``status()``. ``timeout`` in
        seconds (None: no limit); ``workers``: local worker processes on the run's own queue
        while waiting (default none: a fleet does the work); ``on_progress(status)`` after each
        look; ``on_notice(text, warning)`` for what a user should know (default: logged).
        Raises ``RunFailed`` (failed or cancelled), ``RunStopped`` (stopped at its budget or
        error rate), ``Timeout`` (the run goes on)."""
        from moonbatch.producer.local import follow_with_workers

        return follow_with_workers(self.output, _settings(), workers, timeout=timeout,
                                   on_progress=on_progress, on_notice=on_notice)

    def cancel(self) -> dict[str, Any]:
        """Stop the run (queued work becomes a no-op; the provider cancels what it can).
        Returns ``{"run_id", "provider", "stopped", "done"}``. Raises ``MoonbatchError`` if
        the run is already complete."""
        from moonbatch.producer import ops

        return ops.cancel(self.output, _settings())

    def resume(self, *, workers: int | None = None, timeout: float | None = None
               ) -> dict[str, Any]:
        """Re-enqueue whatever the run still needs on its own queue (a start that stopped
        before its plan was complete is planned again). Returns ``producer.ops.requeue``'s
        dict; with ``workers``, also follows the run to the end with that many local workers
        and adds its final status as ``"final"``. Raises ``MoonbatchError`` (cancelled),
        ``OutputConflict``, ``PreflightError``, ``RunFailed``, ``Timeout``."""
        from moonbatch.producer import ops
        from moonbatch.producer.local import follow_with_workers

        settings = _settings()
        done = ops.requeue(self.output, settings)
        if workers and not done.get("complete"):
            done["final"] = follow_with_workers(self.output, settings, workers, timeout=timeout)
        return done

    def retry_failed(self, codes: Sequence[str] | None = None, *, workers: int | None = None,
                     timeout: float | None = None, dry_run: bool = False,
                     max_cost: float | None = None) -> dict[str, Any]:
        """Send the run's error rows again (only those with ``codes``, default all), into the
        same OUTPUT. Returns ``producer.ops.retry``'s dict (``action``: ``started``,
        ``continued``, ``nothing``, ``would_retry``, ``under_way``); with ``workers``, follows
        the run to the end with that many local workers and adds ``"final"``. Without
        ``workers``, a run whose queues no worker consumes is refused (``NoConsumer``) before
        anything changes. ``max_cost``: the run's new budget in dollars (spend so far counts),
        to carry on a run that stopped at its budget. Raises ``MoonbatchError``,
        ``PreflightError``, ``RunFailed``, ``RunStopped``, ``Timeout``."""
        from moonbatch.producer import ops
        from moonbatch.producer.local import follow_with_workers

        settings = _settings()
        done = ops.retry(self.output, settings, list(codes) if codes else None,
                         dry_run=dry_run, local_workers=bool(workers), max_cost=max_cost)
        if workers and done["action"] in ("started", "continued"):
            done["final"] = follow_with_workers(self.output, settings, workers, timeout=timeout)
        return done

    def results(self) -> Iterator[dict[str, Any]]:
        """Every result row merged so far, shard by shard in plan order, as dicts (one per
        item: ``id``, ``image``, ``status`` ``ok`` or ``error``, the skill's result or
        ``error``), from the run's JSONL or Parquet files alike."""
        from moonbatch.workers import layout, writers
        from moonbatch.workers.runstate import open_output, open_run

        settings = _settings()
        with translated():
            spec = open_run(self.output, settings).spec
        store = open_output(self.output, settings)
        suffix = writers.module(spec.output_format).SUFFIX
        # The results files there (a user's own file under results/ is left out), by shard.
        parsed = (layout.parse_results(o.key) for o in store.iter_objects(layout.RESULTS))
        shards = sorted(p[0] for p in parsed if p is not None and p[1] == suffix)
        for got in writers.read_results(store, spec.output_format, shards):
            yield from got.rows()

    def report(self, sample: int = 60, out: str | None = None) -> str:
        """Write the run's report (``moonbatch report``): one self-contained HTML file a
        browser opens with no server, showing the run (input, output, provider, model,
        options, status, timings, counts, tokens and cost), every error code with its count
        and examples, and ``sample`` rows (0 to 1000, chosen reproducibly, error rows
        included) as thumbnails with each skill's answer drawn over the image. ``out``: a
        local file path or an ``s3://`` URL (default ``OUTPUT/report.html``). Returns where
        it was written (a path or an ``s3://`` URL). Works on a running run (the rows merged
        so far). Raises ``InvalidOption`` (``sample``, ``out``), ``RunNotFound``; storage
        errors of OUTPUT or ``out``. Images that cannot be read are tiles saying why."""
        from moonbatch.producer import report

        with translated():
            return report.write(self.output, _settings(), sample=sample, out=out)


def open_run(ref: str | None = None) -> Run:
    """The run ``ref`` names: a run id (looked up in the registry at ``MOONBATCH_STATE_URL``)
    or its OUTPUT URL; None: the newest run in the registry. Raises ``RunNotFound``."""
    from moonbatch.producer import ops
    from moonbatch.workers.runstate import open_run as open_state

    settings = _settings()
    output = ops.resolve(ref, settings)
    with translated():
        spec = open_state(output, settings).spec
    return Run(spec.run_id, spec.output)


def _spec(input: str, output: str, skill: str | Sequence[str], provider: str | None,
          options: dict[str, Any]):
    from moonbatch.producer import submit as starting

    return starting.new_spec(str(input), str(output), _settings(), skill=skill,
                             provider=provider, **options)


def submit(input: str, output: str, *, skill: str | Sequence[str] = "caption",
           provider: str | None = None, allow_empty: bool = False, force: bool = False,
           **options: Any) -> Run:
    """Check, plan and enqueue a run for a worker fleet (``moonbatch submit``); returns at once.

    ``input``/``output``: ``s3://bucket/prefix/`` or a local directory (INPUT may also be a
    manifest, a WebDataset ``.tar`` or a Parquet file); ``skill``: one name or a list;
    ``provider``: ``moondream`` or ``fal`` (default ``MOONBATCH_PROVIDER``); ``options``: see
    the module docstring. ``force``: OUTPUT holding another run starts this one in
    OUTPUT/<run id>/. The same call again after the run completed returns that run.

    Runs the same checks as the command line first (broker, the provider's key, INPUT,
    OUTPUT, the state location). Raises ``InvalidOption``, ``PreflightError``,
    ``OutputConflict``, ``RunNotFound`` (``skip_existing``).
    """
    from moonbatch.producer import submit as starting
    from moonbatch.producer.local import no_embedded
    from moonbatch.producer.runs import AlreadyComplete

    settings = _settings()
    spec = _spec(input, output, skill, provider, options)
    no_embedded(settings, "submit")
    try:
        spec = starting.prepare(spec, settings, allow_empty=allow_empty, force=force)
        # A dead start taken over keeps its run id; prepare checked OUTPUT.
        plan = starting.start(spec, settings, output_checked=True)
        return Run(plan["run_id"], spec.output, plan=plan)
    except AlreadyComplete as done:
        return Run(done.run_id, spec.output, note=str(done))


def run(input: str, output: str, *, skill: str | Sequence[str] = "caption",
        provider: str | None = None, workers: int | None = None, timeout: float | None = None,
        embedded_broker: bool = False, allow_empty: bool = False, force: bool = False,
        on_progress: ProgressFn | None = None, on_notice: NoticeFn | None = None,
        on_plan: Callable[[dict[str, Any]], None] | None = None, **options: Any) -> Run:
    """Check and start a run, with ``workers`` local worker processes on its own queue (default
    one per core; 0: a running fleet), and block until it is final (``moonbatch run``).
    ``embedded_broker``: a private broker for those workers (no Redis needed). Arguments as for
    ``submit``; ``timeout`` in seconds; ``on_plan(plan)`` once planned, ``on_progress(status)``
    after each look, ``on_notice(text, warning)`` as for ``Run.wait``.

    Returns the complete run (``Run.status()`` is its ``run.json``). Raises what ``submit``
    does, and ``RunFailed``, ``RunStopped`` (``--max-cost``/``--max-error-rate``),
    ``Timeout`` (the run goes on: ``Run.wait``/``Run.resume``).
    """
    from moonbatch.producer import submit as starting
    from moonbatch.producer.local import check_fleet_ahead, start_and_follow
    from moonbatch.producer.runs import AlreadyComplete
    from moonbatch.workers.embedded import EMBEDDED

    settings = _settings()
    spec = _spec(input, output, skill, provider, options)
    embedded = embedded_broker or settings.broker_url == EMBEDDED
    # A fleet's ping beside the checks below (awaited before anything is written); an
    # embedded broker has no fleet (start_and_follow refuses --workers 0 with it).
    fleet = check_fleet_ahead(settings) if workers == 0 and not embedded else None
    plans: list[dict[str, Any]] = []
    try:
        spec = starting.prepare(spec, settings, allow_empty=allow_empty, force=force,
                                broker=not embedded)  # an embedded one is checked once started
        final = start_and_follow(
            spec, workers=workers, timeout=timeout, embedded=embedded,
            on_plan=lambda plan: (plans.append(plan), on_plan and on_plan(plan)),
            on_progress=on_progress, on_notice=on_notice, output_checked=True, fleet=fleet)
    except AlreadyComplete as done:
        return Run(done.run_id, spec.output, note=str(done))
    return Run(plans[0]["run_id"], spec.output, plan=plans[0], final=final)


def dry_run(input: str, output: str, *, skill: str | Sequence[str] = "caption",
            provider: str | None = None, allow_empty: bool = False, cache_check: bool = False,
            **options: Any) -> dict[str, Any]:
    """List and plan INPUT as a run would and return the estimate (``moonbatch run
    --dry-run --json``): ``items``, ``skipped``, ``shards``, ``requests``, ``image_bytes``,
    ``upload_bytes``, ``input_tokens``, ``output_tokens``, ``compute_seconds``, ``cost_usd``
    (None: no published price), ``basis``, ``model``, ``provider_options``, ``details`` (the
    model and the provider's controls, one line each) and ``warnings``... Writes nothing,
    sends nothing, needs no key or broker. With ``cache_check`` it also reads every image and
    looks it up in the result cache: ``cache`` tells how many items would not be sent and the
    cost saved (``served``, ``hits``, ``copies``, ``saved_usd``). Raises ``InvalidOption``,
    ``PreflightError`` (INPUT)."""
    from moonbatch.producer import submit as starting

    spec = _spec(input, output, skill, provider, options)
    return starting.estimate(spec, _settings(), allow_empty=allow_empty,
                             cache_check=cache_check)
