"""Settings only the real-time provider reads, from the environment (and ``.env``) like
``moonbatch.config.Settings``.

Variables: ``MOONBATCH_REALTIME_URL`` (the API's base, default Moondream Cloud's
``https://api.moondream.ai/v1``; a Moondream Station is ``http://localhost:2020/v1``),
``MOONDREAM_API_KEY`` (also ``MOONBATCH_API_KEY``; required only when the URL's host is
``moondream.ai`` or under it, sent only to that URL's origin), ``MOONBATCH_REALTIME_RATE``
(requests per second across the whole fleet: Moondream Cloud allows 2 per key, 10 for funded
accounts, FACTS.md), ``MOONBATCH_REALTIME_CONCURRENCY`` (requests awaiting their answer at once,
fleet-wide), ``MOONBATCH_REALTIME_BILLED`` (whether answers cost the real-time price; default:
the URL is Moondream Cloud's). A value out of range raises ``pydantic.ValidationError`` naming the variable.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from moonbatch.workers import origins

DEFAULT_URL = "https://api.moondream.ai/v1"
KEYED_DOMAIN = "moondream.ai"  # Moondream Cloud: its hosts need a key, a Station does not


class RealtimeSettings(BaseSettings):
    """The real-time provider's settings (see the module docstring)."""

    model_config = SettingsConfigDict(
        env_prefix="MOONBATCH_", env_file=".env", extra="ignore", populate_by_name=True
    )

    realtime_url: str = DEFAULT_URL
    realtime_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("MOONDREAM_API_KEY", "MOONBATCH_API_KEY"))
    realtime_rate: float = Field(default=2.0, gt=0, le=10_000)
    realtime_concurrency: int = Field(default=16, ge=1, le=1000)
    # Whether answers cost tokens at Moondream's real-time price: unset, a Moondream Cloud URL
    # bills and any other (a Station) does not; set it for a proxy in front of Moondream Cloud.
    realtime_billed: bool | None = None

    @field_validator("realtime_url")
    @classmethod
    def _http_base(cls, value: str) -> str:
        value = value.rstrip("/")
        origins.origin(value)  # ValueError: not an http(s) URL with a host
        return value

    def needs_key(self) -> bool:
        """True when the URL is Moondream Cloud's (its host is ``moondream.ai`` or under it)."""
        host = origins.origin(self.realtime_url)[1]
        return host == KEYED_DOMAIN or host.endswith("." + KEYED_DOMAIN)

    def billed(self) -> bool:
        """True when tokens cost the real-time price (``MOONBATCH_REALTIME_BILLED``, default:
        the URL is Moondream Cloud's)."""
        return self.needs_key() if self.realtime_billed is None else self.realtime_billed

    def key(self) -> str | None:
        """The key as plain text, None when none is set (a Station needs none)."""
        if self.realtime_api_key is None or not self.realtime_api_key.get_secret_value():
            return None
        return self.realtime_api_key.get_secret_value()

    def missing_key(self) -> str | None:
        """One line naming the problem and the fix when the URL needs a key and none is set."""
        if self.needs_key() and self.key() is None:
            return (f"Moondream API key: MOONDREAM_API_KEY is not set and "
                    f"MOONBATCH_REALTIME_URL ({self.realtime_url}) is Moondream Cloud: export "
                    "MOONDREAM_API_KEY=<your key> (https://moondream.ai/c/cloud/api-keys), or "
                    "point MOONBATCH_REALTIME_URL at your Moondream Station "
                    "(http://localhost:2020/v1)")
        return None
