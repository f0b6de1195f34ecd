"""Secrets (the API keys, presigned URLs, data URIs) never reach task arguments, Celery messages
and events (what Flower shows), logs, results, state documents or error text, whatever the
provider."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.conftest import read_json, run_cli, upload_photos

# fal: S3 images go as presigned URLs, downscaled ones (--max-pixels) as data URIs.
PROVIDER_ARGS = {"moondream": [], "fal": ["--provider", "fal", "--max-pixels", "200000"]}


@pytest.mark.parametrize("provider", list(PROVIDER_ARGS))
def test_no_secret_in_messages_events_logs_or_storage(provider, s3, bucket, env, fleet, emulator):
    from moonbatch.workers.app import app

    emulator.config.lines_per_output_file = 1  # several presigned URLs per batch
    events: list[dict] = []
    ready = threading.Event()
    receiver = {}

    def capture() -> None:
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"*": events.append})
            receiver["r"] = recv
            ready.set()
            recv.capture(limit=None, timeout=None, wakeup=False)

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    assert ready.wait(10)
    time.sleep(0.5)
    upload_photos(s3, bucket, "p/", names=("coffee.png", "rocket.jpg", "chelsea.png"))
    run_cli(["run", f"s3://{bucket}/p/", f"s3://{bucket}/o/", "--shard-size", "2",
             "--workers", "0", "--timeout", "120", *PROVIDER_ARGS[provider]], env)
    time.sleep(1)
    receiver["r"].should_stop = True
    thread.join(5)

    # Compared in lower case: "X-Amz-Signature=", "Signature=" and "signature=" alike.
    secrets = tuple(x.lower() for x in (env["MOONDREAM_API_KEY"], env["FAL_KEY"], "signature=",
                                        "/_outputs/", "base64,"))
    sent = [e for e in events if e.get("type") == "task-received"]  # what Flower shows
    names = {e.get("name") for e in sent}
    assert {"moonbatch.build_shard", "moonbatch.poll_round", "moonbatch.merge_round"} <= names
    blob = json.dumps(events).lower()
    for secret in secrets:
        assert secret not in blob, f"{secret!r} in a Celery event"
    for e in sent:  # keyword arguments: the OUTPUT URL, the run id and small numbers only
        assert f"s3://{bucket}/o/" in e["kwargs"] and "'run': '" in e["kwargs"]
        assert e["args"] in ("()", "[]")

    for obj in s3.list_objects_v2(Bucket=bucket, Prefix="o/")["Contents"]:
        body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode().lower()
        for secret in secrets:
            assert secret not in body, f"{secret!r} in {obj['Key']}"
    assert read_json(s3, bucket, "o/run.json")["status"] == "completed"
    log = fleet.log_path.read_text().lower()
    for secret in secrets:
        assert secret not in log, f"{secret!r} in the worker log"
