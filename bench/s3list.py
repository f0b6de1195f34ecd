"""A listing-only S3 server over N generated keys, for listing at a scale moto cannot hold.

    python -m bench.s3list N [PORT]      serve; prints "http://127.0.0.1:PORT" once listening

One bucket (any name) holds N objects ``ROOT d<dir>/IMG_<i>.jpg`` (``key(i)``: 1000 per
directory, zero-padded so that the listing order is the order of ``i``; size
``50_000 + i % 900_000`` bytes), made up per request: nothing is stored, so 10,000,000 keys cost
no memory. It answers what moonbatch's producer asks of an INPUT prefix:

- ``GET /<bucket>?list-type=2`` (ListObjectsV2) with ``prefix``, ``continuation-token``,
  ``start-after``, ``max-keys`` (at most 1000) and ``encoding-type=url`` (botocore always sends
  it; keys are then percent-encoded as S3 does, and ``EncodingType`` echoed): the XML of AWS's
  API reference (``ListBucketResult`` with ``Contents`` ``Key``/``LastModified``/``ETag``/
  ``Size``/``StorageClass``, ``IsTruncated``, ``KeyCount``, ``NextContinuationToken``...);
- ``HEAD /<bucket>`` (HeadBucket): 200;
- anything else (a ``delimiter``, GetObject...): an S3 error document (501 / 404).

Requests are not authenticated (clients sign with dummy credentials). The server runs in its own
process (``listing_server``) so that generating pages does not share the measured client's GIL;
HTTP/1.1 keep-alive, one thread per connection.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit
from xml.sax.saxutils import escape

ROOT = "data/"  # the prefix the keys live under: INPUT is s3://<bucket>/data/
PER_DIR = 1000
MAX_KEYS = 1000  # S3's cap per page
LAST_MODIFIED = "2026-01-01T00:00:00.000Z"
XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"


def key(i: int) -> str:
    """The ``i``-th key (0-based) in listing order: ``data/d<dir:05>/IMG_<i:08>.jpg`` (the
    order holds for ``i`` below 100,000,000)."""
    return f"{ROOT}d{i // PER_DIR:05d}/IMG_{i:08d}.jpg"


def size(i: int) -> int:
    """The ``i``-th object's size in bytes."""
    return 50_000 + i % 900_000


def first_at_or_after(n: int, text: str) -> int:
    """The smallest ``i`` in ``[0, n]`` with ``key(i) >= text`` (keys sort as their index)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if key(mid) < text:
            lo = mid + 1
        else:
            hi = mid
    return lo


def list_page(n: int, bucket: str, query: dict[str, str]) -> bytes:
    """The ListObjectsV2 XML answer to ``query`` over ``n`` keys."""
    prefix = query.get("prefix", "")
    max_keys = min(int(query.get("max-keys", MAX_KEYS)), MAX_KEYS)
    token = query.get("continuation-token")
    start = first_at_or_after(n, prefix)
    if "start-after" in query:
        start = max(start, first_at_or_after(n, query["start-after"] + "\0"))
    if token is not None:
        start = max(start, int(token))
    stop = first_at_or_after(n, prefix + "\U0010ffff") if prefix else n  # past prefix's keys
    end = max(start, min(start + max_keys, stop))
    url = query.get("encoding-type") == "url"
    enc = (lambda s: quote(s, safe="/")) if url else escape
    parts = [f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{XMLNS}">'
             f"<Name>{escape(bucket)}</Name><Prefix>{enc(prefix)}</Prefix>"
             f"<MaxKeys>{max_keys}</MaxKeys>"]
    if url:
        parts.append("<EncodingType>url</EncodingType>")
    truncated = end < stop
    parts.append(f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
                 f"<KeyCount>{end - start}</KeyCount>")
    if token is not None:
        parts.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
    if truncated:
        parts.append(f"<NextContinuationToken>{end}</NextContinuationToken>")
    for i in range(start, end):
        parts.append(f"<Contents><Key>{enc(key(i))}</Key><LastModified>{LAST_MODIFIED}"
                     f'</LastModified><ETag>&quot;{i:032x}&quot;</ETag><Size>{size(i)}</Size>'
                     "<StorageClass>STANDARD</StorageClass></Contents>")
    parts.append("</ListBucketResult>")
    return "".join(parts).encode()


def error_xml(code: str, message: str) -> bytes:
    """An S3 error document."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{escape(message)}</Message></Error>").encode()


class Handler(BaseHTTPRequestHandler):
    """ListObjectsV2 and HeadBucket over ``server.n`` generated keys (see the module)."""

    protocol_version = "HTTP/1.1"  # keep-alive: botocore reuses its connections
    wbufsize = -1  # headers and body leave in one write (flushed after each request)...
    disable_nagle_algorithm = True  # ...at once, not after the client's delayed ACK

    def _send(self, status: int, body: bytes, *, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", "0")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _bucket(self) -> tuple[str, str, dict[str, str]]:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        bucket, _, rest = parts.path.lstrip("/").partition("/")
        return bucket, rest, query

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        bucket, rest, query = self._bucket()
        if rest or query.get("list-type") != "2":
            self._send(404 if rest else 501, error_xml(
                "NoSuchKey" if rest else "NotImplemented", "this server only lists objects"))
        elif query.get("delimiter"):
            self._send(501, error_xml("NotImplemented", "delimiter is not supported here"))
        else:
            self._send(200, list_page(self.server.n, bucket, query))  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:  # noqa: N802
        bucket, rest, _ = self._bucket()
        self._send(404 if rest else 200, b"", head=True)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # no line per request


def serve(n: int, port: int = 0) -> None:
    """Serve ``n`` (at most 100,000,000) keys on 127.0.0.1:``port`` (0: any free port) until
    killed; print the URL."""
    if not 0 <= n <= 100_000_000:
        raise ValueError(f"{n} keys: the generated keys sort by index up to 100,000,000")
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.n = n  # type: ignore[attr-defined]
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


class Server:
    """A running ``serve`` child: its endpoint ``url`` and ``pid``."""

    def __init__(self, url: str, pid: int) -> None:
        self.url, self.pid = url, pid

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) the server has used so far (from /proc)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def listing_server(n: int) -> Iterator[Server]:
    """Run ``serve(n)`` in a child process for the block."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.s3list", str(n)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        url = proc.stdout.readline().strip() if proc.stdout else ""
        if not url.startswith("http://"):
            raise RuntimeError(f"the listing server did not start (exit {proc.poll()})")
        yield Server(url, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
