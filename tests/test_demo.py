"""``moonbatch demo`` on a fresh environment: no broker, no S3, no API key, nothing running."""

from __future__ import annotations

import json
import os

from moonbatch.workers.lines import classify_key, sniff_format
from tests.conftest import photos_dir, run_cli


def test_demo_annotates_the_sample_photographs(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MOONBATCH_", "MOONDREAM_", "AWS_"))}
    env["HOME"] = str(tmp_path)  # no ~/.aws, no .env
    proc = run_cli(["demo", "--output", str(tmp_path / "demo")], env, timeout=300)
    assert "results are in" in proc.stdout, proc.stderr
    (run_dir,) = (tmp_path / "demo").iterdir()
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["status"] == "completed" and summary["run_id"] == run_dir.name

    expected = set()
    for path in photos_dir().rglob("*"):
        if not path.is_file():
            continue
        key = path.relative_to(photos_dir()).as_posix()
        kind = classify_key(key)
        if kind == "image" or (kind == "sniff" and sniff_format(path.read_bytes()[:16])):
            expected.add(key)
    rows = [json.loads(line) for f in sorted((run_dir / "results").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(expected)  # each image exactly once
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= len(rows) - 1 and all(r["result"]["caption"] for r in ok)
    assert summary["counts"]["ok"] == len(ok) and summary["counts"]["total"] == len(rows)


def test_demo_under_load_three_times_in_a_row():
    """The embedded broker under load: three demos in a row with every core busy, each checked
    (exit 0, completed, every image once, no temporary file left). ``python -m
    bench.demo_soak`` does the same a hundred times."""
    from bench.demo_soak import soak

    result = soak(3, verbose=False)
    print("\n" + result.summary())
    assert result.runs == 3 and not result.failures, result.failures


def _demo_rows(run_dir):
    return [json.loads(line) for f in sorted((run_dir / "results").glob("*.jsonl"))
            for line in f.read_text().splitlines()]


def test_demo_with_fal_annotates_the_sample_photographs(tmp_path):
    """``moonbatch demo --provider fal``: the emulator's fal queue, offline, no key."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MOONBATCH_", "MOONDREAM_", "AWS_", "FAL_"))}
    env["HOME"] = str(tmp_path)
    proc = run_cli(["demo", "--provider", "fal", "--output", str(tmp_path / "demo")], env,
                   timeout=300)
    assert "emulated fal (fal-ai/moondream3-preview/caption) at http://127.0.0.1:" in proc.stderr
    assert "fal (fal-ai/moondream3-preview/caption)" in proc.stdout
    (run_dir,) = (tmp_path / "demo").iterdir()
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["status"] == "completed" and summary["provider"] == "fal"
    spec = json.loads((run_dir / "_moonbatch" / "spec.json").read_text())
    assert spec["endpoint"] == "fal-ai/moondream3-preview/caption"
    rows = _demo_rows(run_dir)
    assert len({r["id"] for r in rows}) == len(rows) == summary["counts"]["total"] > 0
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= len(rows) - 1 and all(r["result"]["caption"] for r in ok), rows[:2]
