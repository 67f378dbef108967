"""`trainer watch` (rendered to a string and in a pseudo-terminal) and the loss plots."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from trainer_core.cli import cli
from trainer_core.config import resolve
from trainer_core.monitor.events import RunListener
from trainer_core.monitor.watch import render, sparkline
from trainer_core.train.recipe import run_training


def _resolved(model_dir, data, out, **extra):
    cli_args = {"model.path": str(model_dir), "data.dataset": str(data),
                "output.output_dir": str(out), "profile.name": "plain_sft",
                "hyperparams.batch_size": 4, "hyperparams.max_steps": 8,
                "hyperparams.save_steps": 0, "hyperparams.eval_steps": 4,
                "monitoring.preview_steps": 4, "monitoring.num_preview_samples": 2,
                "monitoring.max_new_tokens": 4, "environment.logging_steps": 1,
                "data.validation_split": 0.1, "monitoring.status_interval_s": 0.05, **extra}
    return resolve(cli=cli_args)


@pytest.fixture(scope="module")
def finished_run(micro_model_dir, tmp_path_factory):
    from trainer_core.demo import sample_dataset_path

    root = tmp_path_factory.mktemp("runs")
    out = root / "first"
    os.environ.setdefault("TRAINER_CACHE", str(root / "cache"))
    summary = run_training(_resolved(micro_model_dir, sample_dataset_path(), out), quiet=True)
    assert summary["state"] == "completed"
    return out


def test_sparkline_scales_between_min_and_max():
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8], 8) == "▁▂▃▄▅▆▇█"
    assert sparkline([5, 5, 5], 8) == "▁▁▁"
    assert sparkline([3, 1, float("nan"), 2], 8, ascii_only=True) == "#_="
    assert len(sparkline(list(range(100)), 10)) == 10


def test_watch_renders_a_finished_run(finished_run):
    text = render(finished_run, width=100)
    metrics = [json.loads(x) for x in (finished_run / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "loss" in m][-1]
    assert text.splitlines()[0].startswith(f"run {finished_run.name}  [completed]")
    assert "[########################] 8/8 (100%)" in text
    assert f"loss {last['loss']:.4f}" in text
    assert re.search(r"  loss [▁▂▃▄▅▆▇█]{8}  ", text)  # one block per logged step
    assert "alerts: none" in text
    previews = [json.loads(x) for x in (finished_run / "previews.jsonl").read_text().splitlines()]
    assert "previews at step 8:" in text
    assert repr(previews[-1]["output"])[:20] in text
    # the CLI prints the same view once
    result = CliRunner().invoke(cli, ["watch", str(finished_run), "--once"])
    assert result.exit_code == 0 and "[completed]" in result.output


def test_watch_renders_a_folder_of_runs_with_an_alert(finished_run, tmp_path):
    root = finished_run.parent
    other = root / "hung"
    other.mkdir(exist_ok=True)
    (other / "status.json").write_text(json.dumps({
        "state": "running", "step": 3, "total_steps": 10, "loss": 2.5,
        "last_event_at": time.time() - 1000, "stall_after_s": 60, "alerts": []}))
    try:
        text = render(root, width=120)
    finally:
        (other / "status.json").unlink()
        other.rmdir()
    assert text.startswith("2 runs in")
    assert re.search(r"hung\s+running\s+3/10\s+loss 2.5000  1 alert", text)


class Slow(RunListener):
    def __init__(self, delay):
        self.delay = delay

    def on_step_end(self, event):
        time.sleep(self.delay)


def test_watch_follows_a_running_run_in_a_pseudo_terminal(micro_model_dir, small_jsonl,
                                                          tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "live"
    resolved = _resolved(micro_model_dir, small_jsonl, out, **{"hyperparams.max_steps": 16})
    result: dict = {}
    trainer = threading.Thread(target=lambda: result.update(
        run_training(resolved, quiet=True, listeners=[Slow(0.4)])))
    trainer.start()
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                status = json.loads((out / "status.json").read_text())
            except (OSError, ValueError):
                status = {}
            if status.get("step", 0) >= 2:
                break
            time.sleep(0.1)
        # rendered to a string while it runs
        text = render(out, width=100)
        assert "[running]" in text and "/16 (" in text

        # and the real command in a pseudo-terminal: redraws, then exits when the run ends
        primary, secondary = pty.openpty()
        env = {**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "100"}
        proc = subprocess.Popen([sys.executable, "-m", "trainer_core.cli", "watch", str(out),
                                 "--interval", "0.3"], stdin=secondary, stdout=secondary,
                                stderr=secondary, env=env)
        os.close(secondary)
        chunks = []
        end = time.time() + 180
        while time.time() < end:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    data = os.read(primary, 65536)
                except OSError:
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=30)
        os.close(primary)
    finally:
        trainer.join(timeout=300)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0
    frames = screen.split("\x1b[H\x1b[2J")
    assert len(frames) >= 3  # cleared and redrawn while the run went on
    assert "[running]" in screen
    assert "[completed]" in frames[-1] and "16/16 (100%)" in frames[-1]
    assert result["state"] == "completed"


def test_loss_plot_written_by_the_run_and_overlaid_by_trainer_plot(finished_run, tmp_path):
    svg = (finished_run / "loss.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") >= 3  # loss, eval, lr, tok/s
    assert "loss (solid: train, dashed: eval)" in svg and "tokens/s" in svg
    second = tmp_path / "second"
    second.mkdir()
    lines = (finished_run / "metrics.jsonl").read_text().splitlines()
    halved = [json.loads(x) for x in lines]
    for r in halved:
        r["loss"] = r.get("loss", 1.0) / 2
    (second / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in halved))
    out = tmp_path / "both.svg"
    result = CliRunner().invoke(cli, ["plot", str(finished_run), str(second), "-o", str(out)])
    assert result.exit_code == 0, result.output
    both = out.read_text()
    assert f">{finished_run.name}</text>" in both and ">second</text>" in both
    assert 'stroke="#0072b2"' in both and 'stroke="#d55e00"' in both
    bad = CliRunner().invoke(cli, ["plot", str(tmp_path)])
    assert bad.exit_code == 2 and "no metrics.jsonl" in bad.output


def test_a_daemon_home_is_not_taken_for_a_run(tmp_path):
    from trainer_core.monitor.watch import find_runs

    (tmp_path / "status.json").write_text(json.dumps({"kind": "trainer-daemon",
                                                      "state": "running"}))
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert find_runs(tmp_path) == [run]


def test_watch_renders_a_daemon_home(tmp_path):
    """From the daemon's status.json (its documented fields) and logs/metrics.jsonl."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "loss": 3.0 - 0.1 * i}) + "\n" for i in range(10)))
    (tmp_path / "status.json").write_text(json.dumps({
        "kind": "trainer-daemon", "state": "training", "pid": os.getpid(), "paused": False,
        "updated_at": 1000.0, "model": {"step": 120},
        "current": {"id": 7, "name": "batch-07.jsonl", "attempt": 1, "file_step": 5,
                    "file_steps": 10, "loss": 1.25, "lr": 2e-5, "priority": "high"},
        "queue": {"total": 3, "by_priority": {"high": 1, "normal": 2, "low": 0, "retry": 0},
                  "next": [{"id": 8, "name": "batch-08.jsonl", "priority": "high"}]},
        "last": [{"id": 6, "name": "batch-06.jsonl", "state": "completed", "steps": 10,
                  "loss_end": 1.3, "error": None},
                 {"id": 5, "name": "bad.jsonl", "state": "failed", "error": "line 3: no "
                                                                            "messages"}],
        "rates": {"tokens_per_s": 1234.5, "files_last_hour": 4},
        "disk": {"free_gb": 50.0, "gate": "ok"}}))
    text = render(tmp_path, width=120, now=1010.0)
    assert text.startswith(f"daemon {tmp_path}  [training]  model step 120  updated 10 s ago")
    assert "training #7 batch-07.jsonl (high, attempt 1)" in text and "5/10" in text
    assert "queue 3 (high 1, normal 2)" in text and "next #8 batch-08.jsonl" in text
    assert "ok       #6 batch-06.jsonl  10 steps, loss 1.3000" in text
    assert "FAILED   #5 bad.jsonl  error: line 3: no messages" in text
    assert "1,234 tok/s, 4 files in the last hour; disk 50.0 GB free (ok)" in text
    assert re.search(r"loss [▁▂▃▄▅▆▇█]{10}", text)
