"""The errors the Python API raises, one class per failure kind a caller tells apart.

Each carries the exit code the command line maps it to (``exit_code``; see ``moonbatch
--help``): 1 the run failed or cannot go on, 2 a bad option, 3 a check before work failed or
OUTPUT holds another run, 4 a timeout. Messages are one line and hold no secret.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class MoonbatchError(Exception):
    """Base of every error of the Python API; ``exit_code`` is the command line's."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InvalidOption(MoonbatchError, ValueError):
    """An option's value is not allowed (exit 2). ``option`` names it as the command line
    spells it (``--format``) when one option is at fault, ``value`` is what was given and
    ``allowed`` what it may be (empty when a range or rule, not a list, decides)."""

    exit_code = 2

    def __init__(self, message: str, *, option: str | None = None, value: Any = None,
                 allowed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.option, self.value, self.allowed = option, value, allowed


class PreflightError(MoonbatchError):
    """A check before work failed (exit 3): broker, provider key, INPUT, OUTPUT or the state
    location. ``problems`` holds one line per failed check; nothing was written."""

    exit_code = 3

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class OutputConflict(MoonbatchError):
    """OUTPUT holds another run, or this one unfinished, or one a live producer is planning
    (exit 3). ``run_id`` names the run there (None if unknown), ``state`` what it is
    (``running``, ``failed``, ``cancelled``, ``planning``, ``completed``, ...)."""

    exit_code = 3

    def __init__(self, message: str, *, run_id: str | None = None, state: str = "") -> None:
        super().__init__(message)
        self.run_id, self.state = run_id, state


class RunNotFound(MoonbatchError, LookupError):
    """No run with this id in the registry, or no run at this OUTPUT (exit 1)."""


class RunFailed(MoonbatchError):
    """The run failed, was cancelled, or its local workers died for good (exit 1).
    ``status`` is ``failed`` or ``cancelled``; ``failure`` the recorded ``{"where", "error"}``
    (None when none was recorded)."""

    def __init__(self, message: str, *, run_id: str, status: str = "failed",
                 failure: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.run_id, self.status, self.failure = run_id, status, failure


class RunStopped(MoonbatchError):
    """The run stopped sending before it was done (exit 5): its budget (``--max-cost``) or
    its error rate (``--max-error-rate``) stopped it; every item has a row, those not sent an
    error row with the stop's code. ``stop_reason`` is run.json's ``{"code", "reason"}``;
    ``moonbatch retry-failed RUN_ID --max-cost USD`` carries on."""

    exit_code = 5

    def __init__(self, message: str, *, run_id: str, stop_reason: dict[str, Any],
                 status: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.run_id, self.stop_reason, self.status = run_id, stop_reason, status


class Timeout(MoonbatchError, TimeoutError):
    """Waiting stopped after the timeout (exit 4); the run goes on (``Run.wait`` again)."""

    exit_code = 4

    def __init__(self, message: str, *, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class NoConsumer(MoonbatchError):
    """Work would be enqueued on queues no worker consumes, so the run would stay running with
    nobody to process it (exit 3); the message gives the command that works."""

    exit_code = 3


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Re-raise the producer's and the workers' own errors as this module's: the preflight's
    ``PreflightFailed``, ``RunExists``, the registry's ``RunNotFound`` and ``ValueError`` (a
    bad option or URL; pydantic's too) from building a spec."""
    from moonbatch.producer.preflight import PreflightFailed
    from moonbatch.producer.runs import RunExists
    from moonbatch.workers.runstate import RunNotFound as MissingRun

    try:
        yield
    except MoonbatchError:
        raise
    except PreflightFailed as exc:
        raise PreflightError(exc.problems) from None
    except RunExists as exc:
        raise OutputConflict(str(exc), run_id=exc.run_id, state=exc.state) from None
    except MissingRun as exc:
        raise RunNotFound(str(exc)) from None
    except ValueError as exc:
        raise InvalidOption(" ".join(str(exc).split())) from None
