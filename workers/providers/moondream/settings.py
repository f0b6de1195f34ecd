"""Settings only the Batch API provider reads, from the environment (and ``.env``) like
``moonbatch.config.Settings``: the key, the API's URL and the multipart upload's shape.

Variables: ``MOONDREAM_API_KEY`` (also ``MOONBATCH_API_KEY``), ``MOONBATCH_MOONDREAM_URL``,
``MOONBATCH_PART_SIZE`` (bytes of every part but the last; below the API's 100 MB part limit),
``MOONBATCH_UPLOAD_CONCURRENCY`` (parts in flight per shard). A value out of range raises
``pydantic.ValidationError`` naming the variable.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from moonbatch.workers.providers.moondream.lines import API_MAX_PART_BYTES


class MoondreamSettings(BaseSettings):
    """The Batch API provider's settings (see the module docstring)."""

    model_config = SettingsConfigDict(
        env_prefix="MOONBATCH_", env_file=".env", extra="ignore", populate_by_name=True
    )

    moondream_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("MOONDREAM_API_KEY", "MOONBATCH_API_KEY")
    )
    moondream_url: str = "https://api.moondream.ai/v1"
    part_size: int = Field(default=50 * 1024 * 1024, ge=1024, lt=API_MAX_PART_BYTES)
    upload_concurrency: int = Field(default=2, ge=1, le=16)  # parts in flight per shard

    @field_validator("moondream_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    def api_key(self) -> str:
        """The Moondream API key as plain text.

        Raises ``RuntimeError`` when ``MOONDREAM_API_KEY`` is unset.
        """
        if self.moondream_api_key is None or not self.moondream_api_key.get_secret_value():
            raise RuntimeError("MOONDREAM_API_KEY is not set: workers need it to call the Batch API")
        return self.moondream_api_key.get_secret_value()
