"""The command line's rough edges, fixed: option errors name the option, the value and the
allowed values; a run whose stderr is not a terminal prints progress lines at a steady
interval; the bar counts items first; ``status`` and ``wait`` without a RUN_ID take the newest
run; ``retry-failed`` of a run whose queues nobody consumes refuses with the command that
works. Real ``moonbatch`` processes over the session's Redis, moto's S3 and the emulator."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from tests.conftest import photos_dir, run_cli

BROKEN_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.mark.parametrize("args,line", [
    (["--format", "csv"], "error: --format csv: not a choice: choose one of jsonl, parquet"),
    (["--skill", "captoin"],
     "error: --skill captoin: not a choice: choose one of caption, query, detect, point, "
     "segment"),
    (["--length", "huge"], "error: --length huge: not a choice: choose one of short, normal, long"),
    (["--input-format", "zip"], "error: --input-format zip: not a choice: choose one of auto, "
                                "prefix, manifest, webdataset, parquet"),
    (["--temperature", "5"], "error: --temperature 5.0: must be <= 2.0"),
    (["--max-pixels", "-1"], "error: --max-pixels -1: must be >= 0 (0 turns downscaling off)"),
])
def test_option_errors_name_option_value_and_choices(args, line, env, tmp_path):
    (tmp_path / "in").mkdir()
    for command in ("run", "submit"):
        proc = run_cli([command, str(tmp_path / "in"), str(tmp_path / "out"), *args], env,
                       check=False, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == line  # one line, no pydantic wording or URL
    assert not (tmp_path / "out").exists()


def test_progress_bar_counts_items_first(monkeypatch):
    from moonbatch.producer.cli import render

    buf = io.StringIO()
    monkeypatch.setattr(render, "err", Console(file=buf, width=120, force_terminal=True,
                                               color_system=None))
    snap = {"run_id": "r", "status": "running",
            "counts": {"total": 23, "done": 5, "ok": 4, "error": 1, "in_flight": 8},
            "shards": {"total": 3, "merged": 1}}
    with render.ProgressView() as view:
        view.update(snap)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())  # the bar's last frame
    assert re.search(r"annotating .* 5/23 items ok 4\s+error 1\s+shards merged 1/3", text), text


def test_progress_lines_newest_run_and_retry_without_consumer(env, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("astronaut.png", "coffee.png", "chelsea.png"):
        (src / name).write_bytes((photos_dir() / name).read_bytes())
    (src / "broken.png").write_bytes(BROKEN_PNG)
    out = tmp_path / "out"
    run_env = {**env, "MOONBATCH_PROGRESS_INTERVAL": "0.3"}
    proc = run_cli(["run", str(src), str(out), "--provider", "fal", "--workers", "1",
                    "--shard-size", "2", "--timeout", "120"], run_env)
    run_id = re.search(r"run (\S+): 4 images in 2 shard", proc.stderr).group(1)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"run {run_id}: ")]
    progress = [ln for ln in lines if "items done" in ln]
    assert progress, proc.stderr  # stderr is a pipe: lines, not a bar
    assert re.fullmatch(rf"run {run_id}: \d/4 items done \(ok \d, error \d, in flight \d\); "
                        r"\d+\.\d items/s; ETA (\S+)", progress[-1]), progress[-1]

    status = run_cli(["status"], env).stdout  # no RUN_ID: the newest run, this one
    assert status.startswith(f"run {run_id}: completed  4/4 items done (ok 3, error 1")
    waited = run_cli(["wait", "--timeout", "30"], env).stdout
    assert run_id in waited and "completed" in waited

    # Its workers were the command's own and are gone: a retry would wait for nobody.
    proc = run_cli(["retry-failed", run_id], env, check=False)
    assert proc.returncode == 3, proc.stderr
    assert f"moonbatch retry-failed {run_id} --workers N" in proc.stderr
    assert "nothing was changed" in proc.stderr
    assert not (out / "_moonbatch" / "retries").exists()
    proc = run_cli(["retry-failed", run_id, "--workers", "1", "--timeout", "120"], env)
    assert f"run {run_id}: retry pass 1: 1 item(s) of 1 shard(s) sent again" in proc.stdout
    assert "completed" in proc.stdout
