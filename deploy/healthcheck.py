#!/usr/bin/env python3
"""Container health check of moonbatch (Docker HEALTHCHECK, compose healthcheck).

Default: the broker answers a Redis PING within 3 s (MOONBATCH_BROKER_URL). Cheap enough to run
every 30 s on every container, unlike ``celery inspect ping``, which broadcasts to the fleet.
``--http URL``: URL answers 200 within 5 s (Flower: http://127.0.0.1:5555/healthcheck); sends
FLOWER_BASIC_AUTH's first user:password as basic auth when set.
Exit 0 healthy, 1 not; one line on stderr says why. Never prints a secret.
"""

from __future__ import annotations

import base64
import os
import sys
import urllib.error
import urllib.request


def check_broker() -> str | None:
    import redis

    url = os.environ.get("MOONBATCH_BROKER_URL", "redis://127.0.0.1:6379/0")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None  # embedded or another transport: nothing to ping from outside
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        client.ping()
    except Exception as exc:  # any failure is "unhealthy"
        return f"broker unreachable ({type(exc).__name__})"
    return None


def check_http(url: str) -> str | None:
    request = urllib.request.Request(url)
    auth = os.environ.get("FLOWER_BASIC_AUTH", "").split(",")[0]
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            if answer.status != 200:
                return f"{url} answered {answer.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url} unreachable ({type(exc).__name__})"
    return None


def main(argv: list[str]) -> int:
    problem = check_http(argv[2]) if len(argv) == 3 and argv[1] == "--http" else check_broker()
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
