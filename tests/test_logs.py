"""MOONBATCH_LOG_FORMAT=json: one JSON object per line with the task's context, never a secret."""

from __future__ import annotations

import json
import logging

from moonbatch.workers.logs import JsonFormatter, context, redact
from tests.conftest import Worker, private_env, run_cli, upload_photos


def test_json_lines_carry_the_context_and_redact_secrets():
    token = context.set({"run": "r1", "shard": 3, "round": 0, "provider": "fal"})
    try:
        record = logging.LogRecord("moonbatch.workers.x", logging.WARNING, __file__, 1,
                                   "fetched %s and %s", ("https://b/k?X-Amz-Signature=abc123&x=1",
                                                         "data:image/png;base64,iVBORw0KGgo="),
                                   None)
        record.request_id = "req-9"
        doc = json.loads(JsonFormatter().format(record))
    finally:
        context.reset(token)
    assert doc["run"] == "r1" and doc["shard"] == 3 and doc["round"] == 0
    assert doc["provider"] == "fal" and doc["request_id"] == "req-9" and doc["level"] == "warning"
    assert "abc123" not in doc["message"] and "iVBOR" not in doc["message"]
    assert redact("no secret here") == "no secret here"


def test_a_worker_logs_json_for_both_providers(s3, bucket, env, broker, tmp_path):
    upload_photos(s3, bucket, "in/", names=("coffee.png", "rocket.jpg"))
    renv = private_env(env, broker, MOONBATCH_LOG_FORMAT="json")
    log = tmp_path / "worker.log"
    with Worker(renv, renv["MOONBATCH_QUEUE"], log):
        for provider in ("moondream", "fal"):
            run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/{provider}/", "--workers", "0",
                     "--timeout", "120", "--provider", provider, "--max-pixels", "200000"], renv)
    text = log.read_text()
    docs = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert docs, text[-2000:]
    submitted = [d for d in docs if d.get("batch_id") and d.get("provider") == "moondream"]
    assert submitted and {"run", "shard", "round", "task", "task_id"} <= set(submitted[0])
    assert any(d.get("provider") == "fal" and d.get("run") for d in docs)
    lowered = text.lower()
    for secret in (renv["MOONDREAM_API_KEY"], renv["FAL_KEY"], "signature=", "base64,"):
        assert secret.lower() not in lowered
