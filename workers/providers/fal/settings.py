"""Settings only the fal provider reads, from the environment (and ``.env``) like
``moonbatch.config.Settings``.

Variables: ``FAL_KEY`` (also ``MOONBATCH_FAL_KEY``), ``MOONBATCH_FAL_QUEUE_URL``,
``MOONBATCH_FAL_CONCURRENCY`` (requests fal runs at once per endpoint for this account, across
the whole fleet: fal's concurrency limit), ``MOONBATCH_FAL_QUEUE_AHEAD`` (requests kept queued at
fal beyond that; unset: twice as many, more for requests shorter than the fleet's step
cadence: ``FalSettings.fal_in_flight``), ``MOONBATCH_FAL_STORE_IO`` (default off: every request
asks fal not to keep its payloads, ``X-Fal-Store-IO: 0``; on: fal keeps them 30 days, as it
does for requests without the header; ``--fal-store-io`` turns it on for one run). A value
out of range raises ``pydantic.ValidationError`` naming the variable.
"""

from __future__ import annotations

import math

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The unset queue ahead: at least this many times fal's limit (bench fal_throughput at T = 0.5 s
#: on 2 cores: 0.70x of the ideal rate with the limit once ahead, 0.97x with twice)...
MIN_AHEAD_TIMES = 2
#: ...growing with short requests up to this many times.
MAX_AHEAD_TIMES = 8


class FalSettings(BaseSettings):
    """The fal provider's settings (see the module docstring)."""

    model_config = SettingsConfigDict(
        env_prefix="MOONBATCH_", env_file=".env", extra="ignore", populate_by_name=True
    )

    fal_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("FAL_KEY", "MOONBATCH_FAL_KEY"))
    fal_queue_url: str = "https://queue.fal.run"
    # fal's default account limit is in this range.
    fal_concurrency: int = Field(default=10, ge=1, le=1000)
    # So a runner that frees never waits for moonbatch's next poll to send it work; fal starts
    # queued requests itself.
    fal_queue_ahead: int | None = Field(default=None, ge=0, le=10000)
    # Images go as data URIs or presigned URLs: fal should not keep them for 30 days.
    fal_store_io: bool = False

    @field_validator("fal_queue_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    def fal_in_flight(self, request_seconds: float | None = None,
                      refill_seconds: float = 0.0) -> int:
        """Most fal requests submitted and not yet collected, per endpoint, fleet-wide: the
        concurrency limit plus the queue ahead. Unset, the queue ahead is twice as many, or
        more when a request (``request_seconds``, as measured) is shorter than the fleet takes
        to send a freed runner its next one (``refill_seconds``: to the next step, plus the
        step's own calls): fal's runners empty a queue of N x the limit in N requests' time,
        so it must last until the fleet refills it (at most 8 x the limit)."""
        ahead = self.fal_queue_ahead
        if ahead is None:
            times = math.ceil(refill_seconds / request_seconds) if request_seconds else 1
            ahead = self.fal_concurrency * min(max(MIN_AHEAD_TIMES, times), MAX_AHEAD_TIMES)
        return self.fal_concurrency + ahead

    def fal_api_key(self) -> str:
        """The fal.ai key (``FAL_KEY``) as plain text.

        Raises ``RuntimeError`` when ``FAL_KEY`` is unset.
        """
        if self.fal_key is None or not self.fal_key.get_secret_value():
            raise RuntimeError("FAL_KEY is not set: workers need it to call fal.ai")
        return self.fal_key.get_secret_value()
