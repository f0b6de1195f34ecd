"""``--model`` and fal's queue controls (issue 18, items 4 and 5).

- ``--model`` reaches the Batch API (each batch's ``mpu-complete``) and the emulator, which
  runs the models FACTS.md names and fails a batch of any other with ``invalid_model``;
- on fal, a model other than the endpoint's own is refused before anything is sent, and
  ``fal-ai/moondream/batched``'s own choice goes into its ``model_id``;
- fal-only options (``--priority``, ``--fal-store-io``, ``--queue-timeout``) are refused on
  the Batch API, and reach the emulated fal queue as ``X-Fal-*`` headers (``X-Fal-Store-IO: 0``
  when nothing is said);
- the dry run names the model and prices it from ``workers/providers/prices.py``
  (3.1 below 3 Preview), and shows fal's queue controls.

Real workers (the session fleet), moto's S3, the emulator over HTTP; refusals through the
Python API and one ``moonbatch`` process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import moonbatch
from moonbatch.errors import InvalidOption
from tests.conftest import jpeg_bytes, read_json, read_results, run_cli, wait_for_completion
from tests.test_providers_cli import keyless

ROOT = Path(__file__).resolve().parent.parent
BATCHED = "fal-ai/moondream/batched"
CAPTION = "fal-ai/moondream3-preview/caption"


def cli_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """``keyless`` (no key, no broker, no state: a dry run or a refusal needs none), with this
    checkout's code first on the path (the ``moonbatch`` script may be another checkout's)."""
    e = keyless(env, tmp_path)
    return {**e, "PYTHONPATH": f"{ROOT}:{e['PYTHONPATH']}" if e.get("PYTHONPATH") else str(ROOT)}


@pytest.fixture
def images(tmp_path):
    """A local folder of four small JPEGs."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        (folder / f"img-{i}.jpg").write_bytes(jpeg_bytes(color=(40 * i, 90, 160)))
    return folder


def put_images(s3, bucket: str, prefix: str, n: int = 3) -> None:
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"{prefix}img-{i}.jpg",
                      Body=jpeg_bytes(color=(60 * i, 20, 200)))


# -- refusals, before anything is sent ---------------------------------------------------------
@pytest.mark.parametrize("options,says", [
    ({"provider": "fal", "model": "moondream3.1"},
     "--model moondream3.1: fal endpoint fal-ai/moondream3-preview/caption runs "
     "moondream3-preview only"),
    ({"provider": "fal", "endpoint": BATCHED, "model": "moondream3-preview"},
     "choose --model vikhyatk/moondream2 or fal-ai/moondream2-docci"),
    ({"provider": "fal", "skill": ["caption", "detect"], "object": "cat",
      "model": "vikhyatk/moondream2"}, f"use --endpoint {BATCHED}"),
    ({"priority": "low"}, "--priority applies to --provider fal only"),
    ({"fal_store_io": True}, "--fal-store-io applies to --provider fal only"),
    ({"queue_timeout": 60}, "--queue-timeout applies to --provider fal only"),
    ({"provider": "fal", "priority": "high"}, "--priority high: not a choice: choose one of "
                                              "normal, low"),
    ({"provider": "fal", "queue_timeout": 0}, "--queue-timeout 0: must be a number of seconds"),
    ({"model": " moondream3.1"}, "--model ' moondream3.1': a model name"),
])
def test_refused_before_anything_is_sent(tmp_path, env, emulator, options, says):
    batches, requests = len(emulator.emulator.batches), len(emulator.emulator.fal.requests)
    for call in (moonbatch.dry_run, moonbatch.submit):
        with pytest.raises(InvalidOption) as caught:
            call(str(tmp_path / "in"), str(tmp_path / "out"), **options)
        assert says in str(caught.value) and "\n" not in str(caught.value)
    assert len(emulator.emulator.batches) == batches
    assert len(emulator.emulator.fal.requests) == requests
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_foreign_model_on_fal_in_one_line(env, tmp_path, images):
    proc = run_cli(["run", str(images), str(tmp_path / "out"), "--provider", "fal",
                    "--model", "moondream3.1", "--workers", "0"], cli_env(env, tmp_path),
                   check=False)
    assert proc.returncode == 2, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(line) == 1 and "fal-ai/moondream3-preview/caption runs moondream3-preview" \
        in line[0] and "Traceback" not in proc.stderr


# -- the dry run ---------------------------------------------------------------------------------
def test_dry_run_prices_each_model(env, tmp_path, images, caplog):
    out = str(tmp_path / "out")
    preview = moonbatch.dry_run(str(images), out, model="moondream3-preview")
    v31 = moonbatch.dry_run(str(images), out, model="moondream3.1")
    default = moonbatch.dry_run(str(images), out)
    assert (preview["model"], v31["model"], default["model"]) == \
        ("moondream3-preview", "moondream3.1", None)
    # Same tokens, Moondream's batch prices: 3.1 outputs cost $0.50/M, 3 Preview's $1.25/M.
    assert v31["input_tokens"] == preview["input_tokens"] > 0
    assert 0 < v31["cost_usd"] < preview["cost_usd"] == default["cost_usd"]
    expected = (v31["input_tokens"] * 0.15 + v31["output_tokens"] * 0.50) / 1e6
    assert v31["cost_usd"] == pytest.approx(expected)
    assert "model: moondream3.1, sent in each batch's mpu-complete" in v31["details"]
    assert v31["basis"].startswith("moondream3.1 batch: $0.15/M input, $0.5/M output tokens "
                                   "(moondream.ai/pricing")
    assert default["details"] == ["model: moondream3-preview (the API's default: no model is sent)"]
    assert v31["warnings"] == [] and v31["provider_options"] == {}
    # A name the price table does not know is sent as given, with a warning and the dearest price.
    odd = moonbatch.dry_run(str(images), out, model="moondream-9000")
    assert odd["warnings"] and "--model moondream-9000: not in moonbatch's price table" \
        in odd["warnings"][0] and odd["cost_usd"] == preview["cost_usd"]
    # The text form shows the model, its price and the warning.
    e = cli_env(env, tmp_path)
    proc = run_cli(["run", str(images), out, "--model", "moondream3.1", "--dry-run"], e)
    assert "moondream3.1" in proc.stdout and "$0.5/M output tokens" in proc.stdout
    assert "model" in proc.stdout and "moondream.ai/pricing" in proc.stdout
    proc = run_cli(["submit", str(images), out, "--model", "moondream-9000", "--dry-run"], e)
    assert "warning:" in proc.stderr and "moondream-9000" in proc.stderr


def test_dry_run_shows_fal_controls(env, tmp_path, images, monkeypatch):
    out = str(tmp_path / "out")
    plain = moonbatch.dry_run(str(images), out, provider="fal")
    assert plain["provider_options"] == {"store_io": False}
    assert "model: moondream3-preview (the model of fal-ai/moondream3-preview/caption)" \
        in plain["details"]
    assert any(d.startswith("payload retention: off (X-Fal-Store-IO: 0")
               for d in plain["details"])
    assert "priority: normal (fal's default)" in plain["details"]
    assert any(d.startswith("queue timeout: none") for d in plain["details"])
    chosen = moonbatch.dry_run(str(images), out, provider="fal", endpoint=BATCHED,
                               model="fal-ai/moondream2-docci", priority="low",
                               fal_store_io=True, queue_timeout=90)
    assert chosen["model"] == "fal-ai/moondream2-docci"
    assert chosen["provider_options"] == {"priority": "low", "store_io": True,
                                          "request_timeout": 90}
    assert "model: fal-ai/moondream2-docci (sent as model_id)" in chosen["details"]
    assert "priority: low (X-Fal-Queue-Priority: low)" in chosen["details"]
    assert any("X-Fal-Store-IO: 1" in d for d in chosen["details"])
    assert "queue timeout: 90 s to start (X-Fal-Request-Timeout)" in chosen["details"]
    # MOONBATCH_FAL_STORE_IO turns retention on for every run that does not say otherwise.
    from moonbatch.config import reload_settings

    monkeypatch.setenv("MOONBATCH_FAL_STORE_IO", "1")
    reload_settings()
    try:
        kept = moonbatch.dry_run(str(images), out, provider="fal")
        said = moonbatch.dry_run(str(images), out, provider="fal", fal_store_io=False)
    finally:
        monkeypatch.delenv("MOONBATCH_FAL_STORE_IO")
        reload_settings()
    assert kept["provider_options"] == {"store_io": True}
    assert said["provider_options"] == {"store_io": False}
    # The text form lists each control.
    text = run_cli(["run", str(images), out, "--provider", "fal", "--priority", "low",
                    "--queue-timeout", "90", "--dry-run"], cli_env(env, tmp_path)).stdout
    for shown in ("priority", "low (X-Fal-Queue-Priority: low)", "payload retention",
                  "X-Fal-Store-IO: 0", "queue timeout", "90 s to start"):
        assert shown in text, shown


# -- over the fleet ------------------------------------------------------------------------------
def test_model_reaches_the_batch_api(s3, bucket, env, fleet, emulator, caplog):
    put_images(s3, bucket, "m/in/")
    before = set(emulator.emulator.batches)
    good = moonbatch.submit(f"s3://{bucket}/m/in/", f"s3://{bucket}/m/v31/", model="moondream3.1",
                            shard_size=2)
    with caplog.at_level("WARNING"):
        bad = moonbatch.submit(f"s3://{bucket}/m/in/", f"s3://{bucket}/m/v2/", model="moondream2")
    assert any("--model moondream2: not in moonbatch's price table" in r.getMessage()
               for r in caplog.records)
    wait_for_completion(s3, bucket, "m/v31/", env, timeout=120)
    wait_for_completion(s3, bucket, "m/v2/", env, timeout=120)
    assert read_json(s3, bucket, "m/v31/_moonbatch/spec.json")["model"] == "moondream3.1"
    sent = [b for k, b in emulator.emulator.batches.items() if k not in before]
    assert sorted(b.model for b in sent) == ["moondream2", "moondream3.1", "moondream3.1"]
    rows = read_results(s3, bucket, "m/v31/")
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), rows
    # The emulator runs what the real service runs: moondream2 is not a Batch API model.
    rows = read_results(s3, bucket, "m/v2/")
    assert len(rows) == 3 and {r["error"]["code"] for r in rows} == {"invalid_model"}, rows
    assert good.id != bad.id


def test_fal_headers_and_model_id_reach_the_queue(s3, bucket, env, fleet, emulator):
    put_images(s3, bucket, "f/in/")
    before = set(emulator.emulator.fal.requests)
    moonbatch.submit(f"s3://{bucket}/f/in/", f"s3://{bucket}/f/low/", provider="fal",
                     endpoint=BATCHED, skill="caption", model="fal-ai/moondream2-docci",
                     priority="low", queue_timeout=120)
    moonbatch.submit(f"s3://{bucket}/f/in/", f"s3://{bucket}/f/plain/", provider="fal",
                     skill="caption")
    wait_for_completion(s3, bucket, "f/low/", env, timeout=120)
    wait_for_completion(s3, bucket, "f/plain/", env, timeout=120)
    sent = [r for k, r in emulator.emulator.fal.requests.items() if k not in before]
    batched = [r for r in sent if r.endpoint == BATCHED]
    single = [r for r in sent if r.endpoint == CAPTION]
    assert len(batched) == 1 and len(single) == 3, [r.endpoint for r in sent]
    assert batched[0].headers == {"x-fal-queue-priority": "low", "x-fal-store-io": "0",
                                  "x-fal-request-timeout": "120"}
    assert batched[0].model == "fal-ai/moondream2-docci"
    # Nothing said: fal is asked not to keep the payloads, and nothing else.
    assert all(r.headers == {"x-fal-store-io": "0"} for r in single)
    for prefix in ("f/low/", "f/plain/"):
        rows = read_results(s3, bucket, prefix)
        assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), rows


def test_every_provider_answers_check_model_and_refuses_foreign_options(tmp_path):
    """Shared code asks every provider for ``check_model`` (``runs.new_spec``, the start's
    warnings, the dry run): a provider added to ``PROVIDERS`` must answer it, and must refuse
    provider options it does not take rather than ignore them."""
    from moonbatch.config import get_settings
    from moonbatch.producer.runs import new_spec
    from moonbatch.workers.models import SkillOptions
    from moonbatch.workers.providers import PROVIDERS, get_provider

    for name in PROVIDERS:
        provider = get_provider(name)
        assert callable(getattr(provider, "check_model", None)), name
        spec = new_spec(str(tmp_path / "in"), str(tmp_path / "out"),
                        SkillOptions(skill="caption"), get_settings(), provider=name)
        assert isinstance(provider.check_model(spec), list), name
        odd = spec.model_copy(update={"provider_options": {"no_such_option": 1}})
        with pytest.raises(ValueError):
            provider.check_spec(odd)
