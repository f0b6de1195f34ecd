"""moonbatch configuration, read from the environment (and a ``.env`` file) with pydantic-settings.

Every setting is an environment variable ``MOONBATCH_<NAME>``. Settings only one provider reads
(its key, its URL) are that provider's (``moonbatch.workers.providers.<name>.settings``), read
through ``Settings.section``. AWS credentials are read by boto3 the
standard way (environment, ``~/.aws``, instance roles); only the endpoint is ours, for MinIO, R2
or moto.
"""

from __future__ import annotations

if __name__ != "moonbatch.config":  # one module, one name: never two Celery apps or two Settings
    raise ImportError(f"import moonbatch.config, not {__name__}")

import functools
import ipaddress
from typing import Any, Literal, TypeVar

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound=BaseSettings)


class Settings(BaseSettings):
    """Process-wide settings; see README "Configuration" for the table of variables.

    Raises ``pydantic.ValidationError`` naming the variable when a value is out of range.
    """

    model_config = SettingsConfigDict(
        env_prefix="MOONBATCH_", env_file=".env", extra="ignore", populate_by_name=True
    )

    model: str | None = None  # None: the provider's default model

    # Which service annotates: a name of ``moonbatch.workers.providers.PROVIDERS`` (empty: the
    # registry's default). Each provider reads its own settings (``Settings.section``).
    provider: str = Field(default="", validate_default=True)

    _sections: dict[type, Any] = PrivateAttr(default_factory=dict)

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        from moonbatch.workers.providers import DEFAULT_PROVIDER, PROVIDERS

        if not value:
            return DEFAULT_PROVIDER
        if value not in PROVIDERS:
            raise ValueError(f"MOONBATCH_PROVIDER={value!r} is not a provider: choose one of "
                             f"{', '.join(PROVIDERS)}")
        return value

    def section(self, cls: type[S]) -> S:
        """The settings of one part that reads its own variables (a provider's
        ``BaseSettings`` class), read from the environment once per ``Settings`` object, so
        ``reload_settings()`` reads them again too. Raises ``pydantic.ValidationError``."""
        if cls not in self._sections:
            self._sections[cls] = cls()
        return self._sections[cls]

    # Where run ids, active runs and batch claims are recorded (a store URL: a local directory
    # for one machine, s3://bucket/prefix/ shared by a fleet). Redis is never the only copy.
    state_url: str = "~/.moonbatch/"
    # The result cache (workers.cache): on for new runs unless MOONBATCH_CACHE=0 or --no-cache;
    # its location (a store URL; None: cache/ in the state location).
    cache: bool = True
    cache_url: str | None = None
    # Bytes of images the cache pass keeps per build for the build to send without reading
    # them again (beyond it, images to send are read twice).
    cache_read_memory: int = Field(default=128 * 1024 * 1024, ge=0)

    # Worker logs: "text", or "json" (one object per line with run, shard, round, provider).
    log_format: Literal["text", "json"] = "text"

    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    queue: str = "moonbatch"  # the fleet's queue of heavy I/O steps (builds, merges)
    # The fleet's queue of light control steps (polls, finalising, the reconciler); None:
    # "<queue>-control". A run of local workers uses its own pair the same way.
    control_queue: str | None = None
    # Redis redelivers unacked messages after this many seconds (FACTS.md, Celery with Redis).
    visibility_timeout: int = Field(default=7200, ge=5)
    run_registry_ttl: int = Field(default=30 * 24 * 3600, ge=60)

    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    # Planning and building.
    # Images per shard and estimated request bytes per shard; each provider's limits
    # (``Provider.limits``) bound them when a run is made.
    shard_size: int = Field(default=10_000, ge=1)
    max_shard_bytes: int = Field(default=1_900_000_000, ge=1_000_000)
    fetch_concurrency: int = Field(default=16, ge=1, le=256)
    # Images above this many pixels are downscaled before sending (0: never). FACTS.md: the
    # model sees at most ~1.9 MP.
    max_pixels: int = Field(default=2_000_000, ge=0)

    # HTTP.
    http_timeout: float = Field(default=60.0, gt=0)
    http_max_attempts: int = Field(default=10, ge=1)
    http_backoff_initial: float = Field(default=0.5, ge=0)
    http_backoff_max: float = Field(default=30.0, ge=0)

    # Item references (untrusted input: workers.netguard, workers.readers.refs).
    # A manifest's or a Parquet file's image references are data written by others. Networks,
    # addresses or host names (comma-separated, each with an optional :port) item URLs may
    # reach although not public; empty: public addresses only.
    allow_private_hosts: str = ""
    # Folders (comma-separated absolute paths; "/" for any) whose files a manifest that is not
    # on the workers' own disk may name; a local INPUT's own manifest may name any file.
    allow_local_files: str = ""
    # Buckets s3:// references may name besides INPUT's own (comma-separated); empty: any
    # bucket the workers' credentials can read.
    item_buckets: str = ""
    # Bytes one item's read may hold (http bodies, S3 objects, local files, tar members).
    item_max_bytes: int = Field(default=100_000_000, ge=1024)
    # Seconds an item's http(s) read may take in all (connect, redirects, every read).
    item_deadline: float = Field(default=120.0, gt=0)

    @field_validator("allow_private_hosts")
    @classmethod
    def _check_hosts(cls, value: str) -> str:
        from moonbatch.workers.netguard import parse_rules

        parse_rules(value)  # ValueError naming the entry
        return value

    @field_validator("allow_local_files")
    @classmethod
    def _check_folders(cls, value: str) -> str:
        from moonbatch.workers.readers.refs import parse_folders

        parse_folders(value)
        return value

    @field_validator("item_buckets")
    @classmethod
    def _check_buckets(cls, value: str) -> str:
        from moonbatch.workers.readers.refs import parse_buckets

        parse_buckets(value)
        return value

    # Reliability.
    # A silent shard builder loses its lease after this; leases are renewed every quarter of it
    # from a background thread, so a short lease costs nothing and a dead builder's shard moves
    # on within about a minute.
    lease_seconds: float = Field(default=60.0, gt=0)
    max_item_attempts: int = Field(default=3, ge=1)  # batches an item may be sent in
    reconcile_interval: float = Field(default=60.0, gt=0)  # Celery beat: stale-work sweep
    task_retry_backoff_max: float = Field(default=300.0, gt=0)  # seconds between task retries

    # Polling a batch (seconds). The interval adapts between these bounds.
    poll_min_interval: float = Field(default=5.0, gt=0)
    poll_max_interval: float = Field(default=120.0, gt=0)

    # Prometheus metrics (workers.metrics): a worker serves /metrics on this port (None: off).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)

    # Where a worker's /metrics listens.
    # An IP address of this machine: 0.0.0.0 every IPv4 interface (containers, where the pod or
    # network is the boundary), 127.0.0.1 this machine only (the systemd units), :: every one.
    metrics_address: str = "0.0.0.0"

    @field_validator("metrics_address")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise ValueError(f"MOONBATCH_METRICS_ADDRESS={value!r} is not an IP address: use one of "
                             "this machine's, 0.0.0.0 for every interface or 127.0.0.1 for this "
                             "machine only") from None

    # Preflight (producer.preflight). Leases, batch claims and write-once documents
    # need conditional writes (If-None-Match: *, If-Match) on OUTPUT and the state store; the
    # preflight proves them with a probe object. True skips that proof for a store known to
    # lack them: unsafe, two workers may then build one shard and bill two batches.
    unsafe_skip_conditional_write_check: bool = False

    # -- Poison items (issue 16): an image or a step that would take a worker down ----------
    # Images of more pixels than this (width x height, read from the header) are refused as
    # image_too_large before any decoding (0: no limit). 120 MP takes a 100 MP camera frame
    # (11648x8736) with room to spare; fal takes at most 7000x7000 and the Batch API's model
    # sees ~2 MP, so larger sources (satellite mosaics, scans) want tiling first.
    max_image_pixels: int = Field(default=120_000_000, ge=0)
    # Bytes of decoded pixels a worker process holds at once across its fetch threads (0: no
    # bound); an image needing more than this is decoded alone. An image at the pixel limit
    # decodes into at most 4 bytes per pixel (480 MB).
    decode_memory: int = Field(default=512 * 1024 * 1024, ge=0)
    # Celery's soft and hard time limits of every task (s). The longest legitimate step is a
    # 2 GB shard build: its images read and its JSONL uploaded at 10-20 MB/s take minutes;
    # an hour leaves room for slow sources. A soft limit is a clean retry; keep the hard one
    # below MOONBATCH_VISIBILITY_TIMEOUT, so Redis does not hand a running task out again.
    task_soft_time_limit: float = Field(default=3600.0, gt=0)
    task_time_limit: float = Field(default=4200.0, gt=0)
    # A round's build, or a step of it, that lost its worker (killed, out of memory, over the
    # soft time limit) this many times in a row is not run again: the round's items not sent
    # yet become worker_lost error rows and the run goes on.
    max_worker_losses: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _time_limits_ordered(self) -> Settings:
        if self.task_time_limit <= self.task_soft_time_limit:
            raise ValueError("MOONBATCH_TASK_TIME_LIMIT must be above MOONBATCH_TASK_SOFT_TIME_LIMIT "
                             f"({self.task_time_limit:g} <= {self.task_soft_time_limit:g}): the "
                             "soft limit is what lets a step stop cleanly")
        return self


@functools.cache
def get_settings() -> Settings:
    """The settings of this process, read once; call ``reload_settings()`` after changing env."""
    return Settings()


def reload_settings() -> Settings:
    """Forget the cached settings and read the environment again."""
    get_settings.cache_clear()
    return get_settings()
