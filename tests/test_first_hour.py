"""What a new user meets in the first hour: runs/latest is a pointer (never a second run),
previews show the question's start and the reference, the run's closing lines, the first loss
logged, world size in run.json, and the daemon's times, queue and ignored settings."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from trainer_core.monitor.plot import plot_runs
from trainer_core.monitor.watch import find_runs, render, render_run
from trainer_core.train.rundir import update_latest


def _run(d: Path, steps: int = 3, previews: list[dict] | None = None) -> Path:
    d.mkdir(parents=True)
    recs = [{"step": i, "loss": 3.0 / i, "lr": 1e-3, "tokens_per_s": 100.0,
             "tokens_trained": 10 * i} for i in range(1, steps + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "status.json").write_text(json.dumps({"state": "completed", "step": steps,
                                               "total_steps": steps, "alerts": []}))
    if previews:
        (d / "previews.jsonl").write_text("".join(json.dumps(p) + "\n" for p in previews))
    return d


@pytest.fixture
def two_runs_and_latest(tmp_path):
    root = tmp_path / "runs"
    _run(root / "emoji_think-1")
    newest = _run(root / "emoji_think-2")
    update_latest(newest)
    assert (root / "latest").is_symlink()
    return root


def test_latest_is_a_pointer_not_a_run(two_runs_and_latest, tmp_path):
    root = two_runs_and_latest
    # trainer watch runs / the dashboard's sidebar (both list find_runs)
    assert sorted(p.name for p in find_runs(root)) == ["emoji_think-1", "emoji_think-2"]
    assert render(root, width=100).startswith(f"2 runs in {root}")
    # trainer plot runs/*: each run once, under its own name
    svg = plot_runs(sorted(root.iterdir()), tmp_path / "runs.svg").read_text()
    assert svg.count(">emoji_think-2<") == 1 and ">latest<" not in svg
    assert svg.count(">emoji_think-1<") == 1
    # runs/latest on its own is the run it points at, named as such
    alone = plot_runs([root / "latest"], tmp_path / "latest.svg").read_text()
    assert ">emoji_think-2<" in alone and ">latest<" not in alone


def test_dashboard_lists_latest_once(two_runs_and_latest, http_request):
    from trainer_core.monitor.dashboard.server import make_server, stop

    server, board = make_server(two_runs_and_latest, "127.0.0.1", 0, token="t")
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, body = http_request(server.server_address[1], "GET", "/api/runs/list")
    finally:
        stop(server, board)
    assert status == 200
    assert sorted(r["id"] for r in json.loads(body)) == ["emoji_think-1", "emoji_think-2"]


def test_watch_previews_show_the_question_start_and_the_reference(tmp_path):
    question = ("What is the capital of France, the country west of Germany? Think first: "
                "open your answer with 2 thinking emojis and close it with 3 stop emojis.")
    run = _run(tmp_path / "r", previews=[{"step": 3, "prompt": question, "output": "Paris 🛑",
                                          "reference": "🤔🤔 Paris 🛑🛑🛑", "scores": {}}])
    text = render_run(run, width=200)
    line = next(x for x in text.splitlines() if "->" in x)
    assert "'What is the capital of France, the coun…'" in line  # the start, cut visibly
    assert "stop emojis" not in line  # not the profile's instruction at the end
    assert "(reference '🤔🤔 Paris 🛑🛑🛑')" in line


def test_run_summary_ends_with_next_steps_and_readable_scores():
    from trainer_core.monitor.console import print_summary, venv_tool

    out = io.StringIO()
    print_summary({"state": "completed", "steps_done": 5, "steps": 5, "tokens_trained": 10,
                   "tokens_seen": 40, "loss_start": 3.0, "loss_end": 1.0, "eval_loss": 1.1,
                   "preview_scores": {"preview/has_stop_suffix": 0.75}, "wall_time_s": 3,
                   "tokens_per_s": 13.3, "output_dir": "runs/emoji_think-1"}, out)
    text = out.getvalue()
    assert "previews has_stop_suffix 0.75" in text and "{" not in text
    trainer = venv_tool("trainer")
    lines = text.splitlines()
    nxt = lines.index("next:")
    assert lines[nxt + 1] == (f"  {trainer} generate --model runs/emoji_think-1 "
                              "--prompt 'What is 7 + 5?'")
    assert f"  {trainer} dashboard runs" in lines[nxt:]
    failed = io.StringIO()
    print_summary({"state": "failed", "steps_done": 2, "steps": 5, "tokens_trained": 1,
                   "tokens_seen": 4, "loss_start": None, "loss_end": None, "wall_time_s": 1,
                   "tokens_per_s": 1.0, "output_dir": "runs/x"}, failed)
    assert "next:" not in failed.getvalue()


@pytest.mark.slow
def test_first_loss_logged_world_size_recorded_and_no_alert(micro_model_dir, small_jsonl,
                                                            tmp_path, monkeypatch):
    """Step 1 is logged (the chart's first point is the summary's first loss), run.json says
    how many processes and GPUs trained, and a normal CPU run ends with no alert."""
    from trainer_core.config import resolve
    from trainer_core.train.recipe import run_training

    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    summary = run_training(resolve(cli={
        "model.path": str(micro_model_dir), "data.dataset": str(small_jsonl),
        "output.output_dir": str(out), "hyperparams.batch_size": 2, "hyperparams.max_steps": 12,
        "hyperparams.save_steps": 0, "hyperparams.eval_steps": 4,
        "monitoring.num_preview_samples": 0, "environment.logging_steps": 5,
        "data.validation_split": 0.1}), quiet=True)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in losses] == [1, 5, 10, 12]
    assert losses[0]["loss"] == summary["loss_start"]
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["world_size"] == 1 and manifest["device_count"] == 0
    assert not [m for m in metrics if "alert" in m]
    assert json.loads((out / "status.json").read_text())["alerts"] == []


def test_daemon_reports_iso_times_and_names_ignored_settings():
    from trainer_core.daemon.control import ignored_settings
    from trainer_core.daemon.reports import iso_times
    from trainer_core.train.inputs import load_config

    assert iso_times({"finished_at": 0.0, "steps": 3, "started_at": None}) == {
        "finished_at": "1970-01-01T00:00:00.000+00:00", "steps": 3, "started_at": None}
    said = ignored_settings(load_config(overrides={"hyperparams.num_epochs": 2.0}))
    assert "hyperparams.num_epochs=2.0 (daemon.epochs_per_file decides)" in said
    assert ignored_settings(load_config(overrides={"model.path": os.devnull})) == []


def test_daemon_status_lists_a_submitted_file_at_once(tmp_path):
    """`status` reads the queue from the ledger: a file just submitted is listed even though
    the running daemon's status.json was written before it (no ~3 s lag)."""
    from trainer_core.daemon.control import status, submit_files
    from trainer_core.daemon.home import Home
    from trainer_core.demo import sample_dataset_path

    home = Home(tmp_path / "home")
    home.create()
    home.status.write_text(json.dumps({"kind": "trainer-daemon", "state": "idle",
                                       "queue": {"total": 0, "next": []}}))
    submit_files(home, [sample_dataset_path()], "high", False)
    seen = status(home)
    assert seen["queue"]["total"] == 1 and seen["queue"]["by_priority"]["high"] == 1
    assert seen["queue"]["next"][0]["name"] == "train.jsonl"
