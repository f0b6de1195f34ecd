"""Checks before work: is everything a run needs there, before anything is written?

Each check is a small function that returns None when all is well, or one line naming the
thing, the cause and the fix (never a traceback, never a secret). ``preflight`` runs the checks
a command needs side by side and raises ``PreflightFailed`` with every failing line; each check
bounds its own time (Redis 2.5 s, HTTP 8 s, S3 3 s to connect and 5 s to read with two
attempts), so a start that cannot work ends in a few seconds. ``moonbatch run``, ``submit`` and
``resume`` use them (exit code 3, see README "Command line"). The credentials checked are the
run's provider's (``Provider.credential``, ``Provider.check_credentials``), never another's. OUTPUT
and the state store must also honour conditional writes (``prove_conditional_writes``), which
leases and write-once documents rest on; ``MOONBATCH_UNSAFE_SKIP_CONDITIONAL_WRITE_CHECK``
skips that proof. URLs in messages go through ``safe_url``: no piece of a password shows.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moonbatch.config import Settings
from moonbatch.workers import layout
from moonbatch.workers.storage import (
    LocalStore,
    S3Store,
    StorageError,
    Store,
    normalize_url,
    s3_session,
)

REDIS_TIMEOUT = 2.5  # seconds, connect and read
S3_CONNECT_TIMEOUT, S3_READ_TIMEOUT, S3_ATTEMPTS = 3, 5, 2

Check = Callable[[], "str | None"]
log = logging.getLogger(__name__)


class PreflightFailed(Exception):
    """One or more checks failed; ``problems`` holds one line per failure."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# A URL's scheme; several URLs may be joined by ";" (kombu's failover list, Redis Sentinel).
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_NEXT_URL = re.compile(r";(?=\s*[A-Za-z][A-Za-z0-9+.\-]*://)")


def _split_userinfo(url: str) -> tuple[str, str, str] | None:
    """``(scheme://, userinfo, rest after the @)`` of one URL, or None when it has no userinfo.

    The userinfo is everything up to the URL's LAST ``@``: a password may hold ``#``, ``/``,
    ``?``, ``@`` or ``%``, which ``urlsplit`` reads as the start of a path, query or fragment (an
    ``@`` in a query string then hides more than needed, never less)."""
    match = _SCHEME.match(url)
    head = match.group(0) if match else ""
    body = url[len(head):]
    at = body.rfind("@")
    if at < 0:
        return None
    return head, body[:at], body[at + 1:]


def _hidden_userinfo(userinfo: str) -> str:
    user, colon, _ = userinfo.partition(":")
    if not colon and not re.search(r"[#/?@%\s]", userinfo):
        return userinfo  # a user name alone is not a secret
    return f"{user}:***" if colon and not re.search(r"[#/?@%\s]", user) else "***"


def safe_url(url: str) -> str:
    """``url`` with every password replaced by ``***`` (for messages): ``redis://user:***@host:
    6379/0``. Several URLs joined by ``;`` (failover, Sentinel) are each hidden; a password with
    ``#``, ``/``, ``?``, ``@`` or ``%`` never shows a piece (see ``_split_userinfo``)."""
    shown = []
    for one in _NEXT_URL.split(url):
        parts = _split_userinfo(one)
        shown.append(one if parts is None else f"{parts[0]}{_hidden_userinfo(parts[1])}@{parts[2]}")
    return ";".join(shown)


def _passwords(url: str) -> list[str]:
    """The password of every URL in ``url`` (see ``safe_url``), longest first."""
    found = []
    for one in _NEXT_URL.split(url):
        parts = _split_userinfo(one)
        if parts is not None:
            found.append(parts[1].partition(":")[2] or parts[1])
    return sorted((p for p in found if p), key=len, reverse=True)


def _scrub(text: str, url: str) -> str:
    """``text`` (an error message) without any password of ``url``, whole or in pieces as a
    parser may have cut it at ``#``, ``/``, ``?``, ``@``, ``%`` or ``:``."""
    for password in _passwords(url):
        for piece in sorted({password, *re.split(r"[#/?@%:;]", password)}, key=len, reverse=True):
            if len(piece) >= 3:
                text = text.replace(piece, "***")
    return text


# -- broker -------------------------------------------------------------------------------------
def check_broker(url: str, timeout: float = REDIS_TIMEOUT) -> str | None:
    """Ping the Celery broker at ``url`` (Redis: one PING within ``timeout`` seconds, no retry;
    ``filesystem://``: nothing to reach; anything else: one kombu connection attempt). No
    message carries a piece of the URL's password (``safe_url``, ``_scrub``)."""
    try:
        problem = _check_broker(url, timeout)
    except ValueError:
        # urllib's message quotes what it took for a port: a piece of the password.
        return (f"broker: MOONBATCH_BROKER_URL ({safe_url(url)}) cannot be parsed: "
                "percent-encode special characters of its password (# %23, / %2F, ? %3F, "
                "@ %40, % %25)")
    except Exception as exc:
        problem = f"broker: {safe_url(url)}: {_short(exc)}: check MOONBATCH_BROKER_URL"
    return problem and _scrub(problem, url)


def _check_broker(url: str, timeout: float) -> str | None:
    shown = safe_url(url)
    if url.startswith("filesystem://"):
        return None
    if url.startswith(("redis://", "rediss://", "redis+socket://", "unix://")):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=timeout,
                                      socket_timeout=timeout, retry_on_timeout=False, retry=None)
        try:
            client.ping()
        except redis.AuthenticationError:
            return (f"broker: Redis at {shown} refused the credentials: fix the password in "
                    "MOONBATCH_BROKER_URL (redis://:PASSWORD@host:6379/0)")
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            return (f"broker: cannot reach Redis at {shown} ({_short(exc)}): start Redis there, "
                    "point MOONBATCH_BROKER_URL at a running one, or (moonbatch run on this "
                    "machine) pass --embedded-broker")
        except redis.RedisError as exc:
            return f"broker: Redis at {shown} answered an error ({_short(exc)}): check the server"
        finally:
            client.close()
        return None
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
    except ValueError:
        raise
    except Exception as exc:
        return (f"broker: cannot reach the broker at {shown} ({_short(exc)}): start it or fix "
                "MOONBATCH_BROKER_URL")
    return None


# -- storage ------------------------------------------------------------------------------------
_client_lock = threading.Lock()


def _s3_client(endpoint_url: str | None, region: str | None) -> Any:
    """An S3 client with short timeouts and few attempts: a preflight answers in seconds. One
    per endpoint and region, built once even when the checks ask for it side by side."""
    with _client_lock:
        return _new_s3_client(endpoint_url, region)


@functools.cache
def _new_s3_client(endpoint_url: str | None, region: str | None) -> Any:
    from botocore.config import Config

    config = Config(connect_timeout=S3_CONNECT_TIMEOUT, read_timeout=S3_READ_TIMEOUT,
                    retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"})
    return s3_session().client("s3", endpoint_url=endpoint_url, region_name=region or "us-east-1",
                               config=config)


def quick_store(url: str, settings: Settings) -> Store:
    """The store at ``url`` with the preflight's short S3 timeouts (local paths as usual).

    Raises ``ValueError`` for an unsupported URL.
    """
    url = normalize_url(url)
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        return S3Store(bucket, prefix, _s3_client(settings.s3_endpoint_url, settings.s3_region))
    return LocalStore(url)


def _s3_problem(what: str, url: str, exc: Exception, settings: Settings, *, write: bool) -> str:
    """One line for an S3 error met while checking ``what`` (INPUT, OUTPUT, state)."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    bucket = url[5:].partition("/")[0]
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return (f"{what}: no AWS credentials to reach {url}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile in ~/.aws, or an instance role")
    if isinstance(exc, EndpointConnectionError):
        endpoint = settings.s3_endpoint_url or "AWS S3"
        return (f"{what}: cannot reach S3 at {endpoint} for {url}: check the network, or "
                "MOONBATCH_S3_ENDPOINT_URL")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404"):
            fix = f"create it (aws s3 mb s3://{bucket})" if write else "check the bucket name"
            return f"{what}: bucket {bucket!r} of {url} does not exist (NoSuchBucket): {fix}"
        if code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId",
                    "SignatureDoesNotMatch"):
            perm = "s3:PutObject and s3:DeleteObject" if write else "s3:ListBucket and s3:GetObject"
            return (f"{what}: access to {url} denied ({code}): check the AWS credentials and "
                    f"their {perm} permission")
        return f"{what}: S3 refused to {'write' if write else 'list'} {url} ({code}): check it"
    return f"{what}: {url}: {_short(exc)}"


def check_input(url: str, settings: Settings, *, allow_empty: bool = False) -> str | None:
    """INPUT exists, can be listed and holds at least one object (unless ``allow_empty``); a
    file INPUT (a manifest, a ``.tar``, a ``.parquet``: ``moonbatch.workers.readers.kind_of_file``)
    exists and can be read."""
    from moonbatch.workers.readers import kind_of_file

    if kind_of_file(url) is not None:
        return check_input_file(url, settings)
    url = normalize_url(url)
    if not url.startswith("s3://"):
        path = Path(url)
        if not path.exists():
            return f"INPUT: {url} does not exist: check the path"
        if not path.is_dir():
            return f"INPUT: {url} is a file: INPUT must be a directory or an s3://bucket/prefix/"
        if not os.access(path, os.R_OK | os.X_OK):
            return f"INPUT: {url} cannot be read (permission denied): check its permissions"
    try:
        store = quick_store(url, settings)
        if isinstance(store, S3Store):
            store.page_size = 10  # one object answers: not a page of 1000 keys (~0.3 s on moto)
        empty = next(iter(store.iter_objects()), None) is None
    except Exception as exc:
        if url.startswith("s3://"):
            return _s3_problem("INPUT", url, exc, settings, write=False)
        return f"INPUT: {url} cannot be listed: {_short(exc)}"
    if empty and not allow_empty:
        hint = " (s3://b/photos means the prefix s3://b/photos/)" if url.startswith("s3://") else ""
        return (f"INPUT: no objects under {url}{hint}: check the path, or pass --allow-empty "
                "to accept an empty run")
    return None


def check_input_file(url: str, settings: Settings) -> str | None:
    """The INPUT file at ``url`` (``s3://bucket/key`` or a local path) exists and can be read
    (local: its permissions; S3: a HEAD)."""
    if not url.startswith("s3://"):
        path = Path(url).expanduser()
        if not path.exists():
            return f"INPUT: {url} does not exist: check the path"
        if not path.is_file():
            return f"INPUT: {url} is not a file: name the manifest, .tar or .parquet file"
        if not os.access(path, os.R_OK):
            return f"INPUT: {url} cannot be read (permission denied): check its permissions"
        return None
    folder, _, name = url.rpartition("/")
    try:
        if not quick_store(folder + "/", settings).exists(name):
            return f"INPUT: {url} does not exist: check the key"
    except Exception as exc:
        cause = exc.__context__ if isinstance(exc.__context__, Exception) else exc
        return _s3_problem("INPUT", url, cause, settings, write=False)
    return None


def _check_writable(what: str, url: str, settings: Settings, probe_key: str) -> str | None:
    """``url`` can take objects, and honours conditional writes (``prove_conditional_writes``,
    unless ``settings.unsafe_skip_conditional_write_check``): a probe object is written there
    and deleted at once (S3, or a local directory that exists); for a local directory yet to be
    created, its nearest existing parent must be a writable directory. Nothing is left behind."""
    url = normalize_url(url)
    skip = settings.unsafe_skip_conditional_write_check
    if skip:
        log.warning("%s: %s: conditional writes not checked (%s is set): leases and write-once "
                    "records are unsafe there", what, url, UNSAFE_SETTING)
    if not url.startswith("s3://"):
        path = Path(url)
        parent = path
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return f"{what}: {url} cannot be created: {parent} is a file, not a directory"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{what}: {parent} is not writable (permission denied): check its permissions"
        if parent != path:
            return None  # created at the first write; nothing to probe without creating it
        name = f".moonbatch-probe-{secrets.token_hex(4)}"
        try:
            if skip:
                (path / name).write_bytes(b"")
                (path / name).unlink()
                return None
            cause = prove_conditional_writes(LocalStore(path), name)
        except OSError as exc:
            return f"{what}: {url} is not writable ({exc.strerror or _short(exc)}): check it"
        except StorageError as exc:
            cause = "refused: " + _short(exc)
        finally:
            # LocalStore's compare-and-swap serialises on a sidecar lock file: not ours to keep.
            (path / f".{name}.lock").unlink(missing_ok=True)
        return cause and _conditional_problem(what, url, cause)
    store = quick_store(url, settings)
    try:
        if skip:
            store.put(probe_key, b"")
            store.delete(probe_key)
            return None
        cause = prove_conditional_writes(store, probe_key)
    except Exception as exc:
        inner = exc.__context__ if isinstance(exc.__context__, Exception) else exc
        code = _s3_code(inner)
        if code not in _UNSUPPORTED:  # not about the conditions: denied, unreachable...
            return _s3_problem(what, url, inner, settings, write=True)
        cause = f"refused: {code}: {_s3_message(inner)}"
    return cause and _conditional_problem(what, _s3_where(url, settings), cause)


# S3 error codes of a store that does not know a conditional-write header.
_UNSUPPORTED = ("NotImplemented", "InvalidArgument", "InvalidRequest", "501")
# An ETag no object has: a compare-and-swap against it must be refused.
_WRONG_VERSION = '"' + "0" * 32 + '"'
UNSAFE_SETTING = "MOONBATCH_UNSAFE_SKIP_CONDITIONAL_WRITE_CHECK"


def prove_conditional_writes(store: Store, key: str) -> str | None:
    """Prove that ``store`` honours the conditional writes leases and write-once documents rest
    on (FACTS.md "S3": ``If-None-Match: *`` fails with 412 when the key exists, ``If-Match:
    <etag>`` is a compare-and-swap): a create-if-absent of the new probe ``key`` succeeds, a
    second one is refused, a compare-and-swap with a wrong version is refused and one with the
    version the create answered (as a lease's first swap uses it) succeeds; the probe is
    deleted. Four round trips in a row: the two that must be refused go side by side (neither
    changes the probe); a store that answers a create without an ETag costs a read of it.

    Returns None when all hold, else the cause: ``"ignored: ..."`` (a condition was not
    enforced) or ``"refused: ..."`` (a legitimate conditional write was refused). Raises
    storage errors (a store that fails a conditional request; the first create's, before
    anything was written)."""
    version = store.put_new(key, b"1")
    try:
        if version is None:
            return "refused: a create with If-None-Match: * of a new probe object was refused"
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="probe") as pool:
            again = pool.submit(store.put, key, b"2", if_absent=True)
            wrong = pool.submit(store.put_if_match, key, b"3", _WRONG_VERSION)
        if again.result():
            return ("ignored: a second create with If-None-Match: * of the same probe object "
                    "succeeded")
        if wrong.result():
            return "ignored: a compare-and-swap with If-Match and a wrong ETag succeeded"
        if not version:  # the create answered no ETag
            _, version = store.get_versioned(key)
        if not store.put_if_match(key, b"4", version):
            return "refused: a compare-and-swap with If-Match and the object's own ETag was refused"
        return None
    finally:
        store.delete(key)


def _conditional_problem(what: str, where: str, cause: str) -> str:
    """One line: the store at ``where`` does not do conditional writes (``cause`` from
    ``prove_conditional_writes``), what that breaks, the fix and the unsafe override."""
    verb, _, why = cause.partition(": ")
    return (f"{what}: {where} {'ignores' if verb == 'ignored' else 'refuses'} conditional writes "
            f"({why}): moonbatch's leases and write-once records need them; use a store that "
            "honours If-None-Match and If-Match (AWS S3, MinIO, Cloudflare R2), or set "
            f"{UNSAFE_SETTING}=1 to run without them (unsafe: two workers may build one shard "
            "and bill two batches)")


def _s3_where(url: str, settings: Settings) -> str:
    return f"{url} (S3 at {settings.s3_endpoint_url or 'AWS'})"


def _s3_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    code = response.get("Error", {}).get("Code", "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or (str(status) if status else "")


def _s3_message(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    text = " ".join(str(response.get("Error", {}).get("Message", "")).split())
    return text[:160] or type(exc).__name__


def check_output(url: str, settings: Settings) -> str | None:
    """OUTPUT can be written (see ``_check_writable``)."""
    return _check_writable("OUTPUT", url, settings, layout.probe(secrets.token_hex(6)))


def check_state(settings: Settings) -> str | None:
    """The state location (MOONBATCH_STATE_URL: run registry) can be written."""
    try:
        url = normalize_url(settings.state_url)
    except ValueError as exc:
        return f"state: MOONBATCH_STATE_URL: {exc}"
    problem = _check_writable("state", url, settings, layout.registry_probe(secrets.token_hex(6)))
    return problem and problem + " (the run registry, MOONBATCH_STATE_URL)"


def run_checks(checks: dict[str, Check]) -> list[str]:
    """Run ``checks`` (name → check) side by side; return the failures' lines in the order of
    ``checks``. A check that raises counts as failed, with the error's type and message."""
    if not checks:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(checks)) as pool:
        futures = {name: pool.submit(check) for name, check in checks.items()}
    problems = []
    for name, future in futures.items():
        try:
            problem = future.result()
        except Exception as exc:
            problem = f"{name}: {_short(exc)}"
        if problem:
            problems.append(problem)
    return problems


def check_credentials(settings: Settings, provider: str) -> str | None:
    """The key of ``provider`` works: ``Provider.check_credentials`` (one cheap authenticated
    call). Only that provider's key is needed. None when all is well, else one line."""
    from moonbatch.workers.providers import get_provider

    return get_provider(provider).check_credentials(settings)


def preflight(settings: Settings, *, input_url: str | None = None, output_url: str | None = None,
              allow_empty: bool = False, broker: bool = True, api_key: bool = True,
              state: bool = True, provider: str | None = None) -> None:
    """Run the checks a command needs (INPUT and OUTPUT when given; the credentials of
    ``provider``, default ``settings.provider``, when ``api_key``). Raises ``PreflightFailed``
    listing every problem; returns None when all pass. Takes at most ~10 s."""
    checks: dict[str, Check] = {}
    if broker:
        checks["broker"] = lambda: check_broker(settings.broker_url)
    if api_key:
        from moonbatch.workers.providers import get_provider

        name = provider or settings.provider
        checks[get_provider(name).credential] = lambda: check_credentials(settings, name)
    if input_url is not None:
        checks["INPUT"] = lambda: check_input(input_url, settings, allow_empty=allow_empty)
    if output_url is not None:
        checks["OUTPUT"] = lambda: check_output(output_url, settings)
    if state:
        checks["state"] = lambda: check_state(settings)
    problems = run_checks(checks)
    if problems:
        raise PreflightFailed(problems)


def _short(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 200 characters."""
    text = " ".join(str(exc).split())
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:200]
