"""Local workers and a private broker for the duration of one command or API call
(``moonbatch run``, ``moonbatch.run()``, ``--workers N``): the worker processes consume only
the run's own queues, so they never take a fleet's work and a fleet never takes theirs."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from moonbatch.errors import InvalidOption, MoonbatchError, PreflightError
from moonbatch.producer.preflight import safe_url

#: Every ``LocalWorkers`` running in this process: the command line's second Ctrl-C kills
#: them before it exits at once.
RUNNING: set[LocalWorkers] = set()



class LocalWorkers:
    """``N`` worker processes (one ``celery -A moonbatch.workers worker`` with concurrency N) for the
    duration of a command, consuming only ``queue`` (the run's private one) and its control
    queue; they inherit
    this process's environment and, on Linux, get SIGTERM if this process dies. ``revive()`` starts them
    again after they died (say, a broker restart kombu did not survive): the run's state is in
    storage, so the new workers carry on where the old ones stopped."""

    max_revivals = 3

    def __init__(self, n: int, queue: str, env: dict[str, str] | None = None) -> None:
        self.n = n
        from moonbatch.workers.runstate import control_queue

        self.cmd = [sys.executable, "-m", "celery", "-A", "moonbatch.workers", "worker", "--concurrency",
                    str(n), "--queues", f"{queue},{control_queue(queue)}", "--loglevel",
                    "WARNING", "--without-mingle",
                    "--without-gossip", "--hostname", f"moonbatch-local-{uuid.uuid4().hex[:8]}@%h"]
        self.env = {**os.environ, **(env or {})}
        self.revivals = 0
        self.log = tempfile.NamedTemporaryFile(prefix="moonbatch-workers-", suffix=".log",
                                               delete=False)
        try:
            self.proc = self._spawn()
        except BaseException:
            self._remove_log()
            raise
        RUNNING.add(self)  # a second Ctrl-C kills them before exiting

    def _spawn(self) -> subprocess.Popen:
        from moonbatch.workers.embedded import child_setup

        return subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=child_setup())

    def revive(self) -> bool:
        """Start the workers again if they died and revivals are left; True if started."""
        if self.revivals >= self.max_revivals:
            return False
        self.revivals += 1
        self.proc = self._spawn()
        return True

    def dead(self) -> bool:
        """True if the worker process has exited."""
        return self.proc.poll() is not None

    def tail(self, n: int = 20) -> str:
        """The last ``n`` lines of the workers' log."""
        with open(self.log.name, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL after 20 s."""
        RUNNING.discard(self)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._remove_log()

    def _remove_log(self) -> None:
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


def check_fleet(settings) -> None:
    """Fail fast when ``--workers 0`` and no worker answers."""
    from moonbatch.workers.app import app as celery_app

    try:
        replies = celery_app.control.ping(timeout=2.0, limit=1)  # returns on the first reply
    except Exception as exc:
        raise PreflightError([f"cannot reach the broker at {safe_url(settings.broker_url)}: "
                              f"{exc}"]) from None
    if not replies:
        raise MoonbatchError("no worker answered: start a fleet (celery -A moonbatch.workers "
                             "worker) or use --workers N")


def check_fleet_ahead(settings) -> concurrent.futures.Future:
    """``check_fleet`` started now in a thread of its own (daemon: an abandoned one never holds
    the interpreter's exit; the ping gives up within 2 s): a ``--workers 0`` start pings the
    fleet (Celery's imports, a connection and a reply, 0.1-0.2 s) while it checks OUTPUT,
    INPUT and the key instead of after them; ``start_and_follow(fleet=...)`` awaits it. The
    future holds None, or the ``PreflightError``/``MoonbatchError`` ``check_fleet`` raised."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def ping() -> None:
        try:
            check_fleet(settings)
        except BaseException as exc:  # handed to the one who awaits it
            future.set_exception(exc)
        else:
            future.set_result(None)

    threading.Thread(target=ping, name="moonbatch-fleet-check", daemon=True).start()
    return future


def check_broker(settings) -> None:
    """Fail fast, with the way out, when the configured broker cannot be reached."""
    from moonbatch.workers.app import app as celery_app

    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
    except Exception as exc:
        raise PreflightError([f"cannot reach the broker at {safe_url(settings.broker_url)} "
                   f"({type(exc).__name__}): start it, or run with a private broker of this "
                   "command's own: --embedded-broker (or MOONBATCH_BROKER_URL=embedded)"]
                             ) from None


def no_embedded(settings, what: str) -> None:
    """``embedded`` names a broker private to one ``moonbatch run``: nothing else can use it."""
    from moonbatch.workers.embedded import EMBEDDED

    if settings.broker_url == EMBEDDED:
        raise InvalidOption(f"MOONBATCH_BROKER_URL=embedded is a broker private to one "
                            f"`moonbatch run` with local workers; {what} needs a shared broker "
                            "(a redis:// URL)")


@contextlib.contextmanager
def embedded_broker(on_notice=None) -> Iterator[None]:
    """Start a private ``redis-server`` (``moonbatch.workers.embedded``) and point this process's
    settings, and the workers it starts, at it; stop it and delete its folder on exit. The one
    line saying a fallback broker was started goes to ``on_notice(text)`` (else a warning log)."""
    from moonbatch.config import reload_settings
    from moonbatch.workers.app import reconfigure
    from moonbatch.workers.embedded import EmbeddedRedis, NoRedisServer

    saved = {k: os.environ.get(k) for k in ("MOONBATCH_BROKER_URL", "MOONBATCH_RESULT_BACKEND")}
    server = EmbeddedRedis()
    try:
        server.start()
    except NoRedisServer as exc:
        raise MoonbatchError(str(exc)) from None
    if server.note:
        if on_notice is not None:
            on_notice(server.note)
        else:
            logging.getLogger(__name__).warning("%s", server.note)
    try:
        os.environ.update(MOONBATCH_BROKER_URL=server.url(0), MOONBATCH_RESULT_BACKEND=server.url(1))
        reconfigure(reload_settings())
        yield
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reconfigure(reload_settings())


def start_and_follow(spec, *, workers: int | None = None, timeout: float | None = None,
                     embedded: bool = False, on_plan=None, on_progress=None,
                     on_notice=None, output_checked: bool = False,
                     fleet: concurrent.futures.Future | None = None) -> dict[str, Any]:
    """Start ``spec`` (checked by ``producer.submit.prepare``) and follow it to its end, as
    ``moonbatch run`` does: with ``workers`` > 0 (default: one per core) start that many local
    worker processes on the run's private queue, and with ``embedded`` (or
    ``MOONBATCH_BROKER_URL=embedded``) a private broker for them; 0 uses a running fleet.
    ``on_plan(plan)`` is called once the run is planned and enqueued; ``on_progress`` and
    ``on_notice`` as ``producer.follow.follow`` takes them. ``output_checked``: as
    ``producer.submit.start`` takes it. ``fleet``: with ``workers`` 0, the fleet's check
    started earlier (``check_fleet_ahead``), awaited here instead of a check of its own.

    Returns the final snapshot. Raises ``InvalidOption`` (negative ``workers``, an embedded
    broker without workers), ``PreflightError`` (broker out of reach), ``MoonbatchError`` (no
    fleet answers), ``RunFailed``, ``Timeout``, ``AlreadyComplete``, ``OutputConflict``.
    """
    from moonbatch.config import get_settings
    from moonbatch.producer import submit
    from moonbatch.producer.follow import follow
    from moonbatch.producer.runs import local_queue
    from moonbatch.workers.embedded import EMBEDDED
    from moonbatch.workers.runstate import open_run, run_queue

    settings = get_settings()
    n = (os.cpu_count() or 1) if workers is None else workers
    if n < 0:
        raise InvalidOption(f"--workers {n}: must be >= 0", option="--workers", value=n)
    embedded = embedded or settings.broker_url == EMBEDDED
    if embedded and n == 0:
        raise InvalidOption("an embedded broker serves only this command's own workers: use "
                            "--workers N (N > 0), or a shared broker for a fleet")
    with embedded_broker(on_notice) if embedded else contextlib.nullcontext():
        settings = get_settings()
        if n == 0 and fleet is not None:
            fleet.result()  # raises what check_fleet raised
        elif n == 0:
            check_fleet(settings)
        else:
            check_broker(settings)
        # Local workers consume only this run's queue: they never take a fleet's work, and a
        # fleet never takes theirs (with credentials or an API key it may not have).
        queue = local_queue(spec.run_id) if n > 0 else None
        local = LocalWorkers(n, queue) if queue else None
        try:
            plan = submit.start(spec.model_copy(update={"queue": queue}) if queue else spec,
                                settings, output_checked=output_checked)
            if local is not None and plan["run_id"] != spec.run_id:
                # A dead start of the same command was taken over: its spec names its queue.
                local.stop()
                local = LocalWorkers(n, run_queue(open_run(spec.output, settings).spec, settings))
            if on_plan is not None:
                on_plan(plan)
            return follow(spec.output, settings, workers=local, timeout=timeout,
                          on_progress=on_progress, on_notice=on_notice,
                          started=plan["run_id"])
        finally:
            if local is not None:
                local.stop()


def follow_with_workers(output: str, settings, workers: int | None, *,
                        timeout: float | None = None, on_progress=None,
                        on_notice=None) -> dict[str, Any]:
    """Follow the run at ``output`` to its end with ``workers`` local worker processes on the
    run's own queue (None or 0: a fleet does the work); see ``producer.follow.follow`` for the
    callbacks, the result and the errors. A run on the fleet's shared queue is said so
    (``on_notice``): these workers take any run's work there while they run."""
    from moonbatch.producer.follow import follow
    from moonbatch.workers.runstate import open_run, run_queue

    if workers is not None and workers < 0:
        raise InvalidOption(f"--workers {workers}: must be >= 0", option="--workers",
                            value=workers)
    local = None
    if workers:
        from moonbatch.errors import translated

        with translated():
            queue = run_queue(open_run(output, settings).spec, settings)
        if queue == settings.queue and on_notice is not None:
            on_notice(f"the run's work is on the shared queue {queue}: these {workers} local "
                      "worker(s) take any run's work on it while they run", False)
        local = LocalWorkers(workers, queue)
    try:
        return follow(output, settings, workers=local, timeout=timeout,
                      on_progress=on_progress, on_notice=on_notice)
    finally:
        if local is not None:
            local.stop()
