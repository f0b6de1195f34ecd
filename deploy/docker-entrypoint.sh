#!/bin/sh
# moonbatch container entrypoint (run under tini): give prometheus_client's multiprocess mode
# the empty directory it needs, then exec the command so it receives SIGTERM itself.
set -eu
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    # Files of a previous container life (a restart keeps an emptyDir) would add stale samples.
    find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -maxdepth 1 -name '*.db' -delete
fi
exec "$@"
