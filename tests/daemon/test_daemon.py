"""`trainer daemon`: intake, ledger, priorities, duplicates, failures and rollback, control
commands from another process, LR schedule, retention, disk gate, status and history."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer_core.cli import cli
from trainer_core.daemon import storage
from trainer_core.daemon.control import submit_files
from trainer_core.daemon.home import Home
from trainer_core.daemon.intake import InboxWatcher
from trainer_core.daemon.ledger import Ledger
from trainer_core.daemon.schedule import DaemonSchedule, apply_lr


def invoke(*args: str):
    return CliRunner().invoke(cli, ["daemon", *args])


# --------------------------------------------------------------------------- intake (no daemon)


def test_file_being_written_is_not_taken(tmp_path):
    home = Home(tmp_path / "home")
    home.create()
    watcher = InboxWatcher(home, settle_s=5.0)
    growing = home.inbox / "growing.jsonl"
    with open(growing, "w", encoding="utf-8") as fh:
        fh.write('{"prompt": "a", "completion": "b"}\n')
        fh.flush()
        t0 = growing.stat().st_mtime
        assert watcher.ready(now=t0 + 1) == []
        fh.write('{"prompt": "c", "compl')  # still being written
        fh.flush()
        os.utime(growing, (t0 + 4, t0 + 4))
        assert watcher.ready(now=t0 + 6) == []  # changed 2 s ago: not settled
    # temporary names are never taken, however old
    for name in (".hidden.jsonl", "x.jsonl.tmp", "y.jsonl.part"):
        (home.inbox / name).write_text("{}\n", encoding="utf-8")
        os.utime(home.inbox / name, (t0, t0))
    assert watcher.ready(now=t0 + 8) == []
    assert watcher.ready(now=t0 + 9.5) == [growing]  # unchanged for settle_s: complete


def test_inbox_takes_every_data_kind_training_reads(tmp_path):
    from trainer_core.data.kinds import DATA_SUFFIXES

    home = Home(tmp_path / "home")
    home.create()
    watcher = InboxWatcher(home, settle_s=0.0)
    names = [f"d{suffix}" for suffix in DATA_SUFFIXES] + ["D.PARQUET", "notes.txt",
                                                          "x.parquet.part"]
    for name in names:
        (home.inbox / name).write_text("{}\n", encoding="utf-8")
    assert watcher.ready() == []  # first sight: not settled yet
    taken = {p.name for p in watcher.ready(now=time.time() + 1)}
    assert taken == {"d.jsonl", "d.json", "d.parquet", "d.csv", "d.tsv", "D.PARQUET"}


def test_priorities_duplicates_and_order_in_the_ledger(tmp_path, sample_rows, du):
    home = Home(tmp_path / "home")
    files = [du.write_jsonl(tmp_path / f"{n}.jsonl", sample_rows[i * 2:i * 2 + 2])
             for i, n in enumerate(["a", "b", "c", "d"])]
    submit_files(home, [files[0]], "low", False)
    submit_files(home, [files[1]], "normal", False)
    submit_files(home, [files[2]], "high", False)
    submit_files(home, [files[3]], "normal", False)
    dup = submit_files(home, [files[1]], "high", False)[0]
    assert dup["state"] == "skipped" and dup["duplicate_of"] == 2
    assert "duplicate of #2" in dup["error"]
    assert (home.skipped / dup["fname"]).exists()
    report = json.loads((home.skipped / (dup["fname"] + ".report.json")).read_text())
    assert report["duplicate_of"] == 2
    forced = submit_files(home, [files[1]], "low", True)[0]
    assert forced["state"] == "queued"
    ledger = Ledger(home.ledger)
    assert [r["name"] for r in ledger.queued()] == ["c.jsonl", "b.jsonl", "d.jsonl", "a.jsonl",
                                                    "b.jsonl"]
    ledger.close()
    # the CLI reports a duplicate with exit code 1, and copies nothing
    result = invoke("submit", "--home", str(home.root), str(files[0]))
    assert result.exit_code == 1 and "duplicate of #1" in result.stderr
    assert len(list(home.queue.glob("*.jsonl"))) == 5


def test_schedule_warms_up_once_and_never_decays_across_files():
    import torch

    param = torch.nn.Parameter(torch.zeros(1))
    for kind in ("constant", "per_file"):
        opt = torch.optim.SGD([param], lr=1.0)
        sched = DaemonSchedule(warmup=3, kind=kind, per_file="linear")
        lr = torch.optim.lr_scheduler.LambdaLR(opt, sched)
        seen: list[list[float]] = []
        for file_steps in (4, 4, 4):  # three files
            sched.begin_file(lr.last_epoch, file_steps)
            apply_lr(lr, opt)
            lrs = []
            for _ in range(file_steps):
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                lr.step()
            seen.append(lrs)
        flat = [x for f in seen for x in f]
        assert flat[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # warmup, once
        if kind == "constant":
            assert flat[3:] == [1.0] * 9
        else:  # each file from the peak down over its own steps, the next back at the peak
            assert seen[1] == pytest.approx([1.0, 0.75, 0.5, 0.25])
            assert seen[2] == seen[1]
        assert min(flat[3:]) > 0
    # the state travels with LambdaLR's checkpoint
    sched.begin_file(40, 7)
    restored = DaemonSchedule(warmup=3, kind="per_file", per_file="linear")
    lr2 = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([param], lr=1.0), restored)
    lr2.load_state_dict(lr.state_dict())
    assert (restored.file_start, restored.file_steps) == (40, 7)


# --------------------------------------------------------------------------- storage


def _fake_checkpoint(home: Home, step: int, mb: float) -> Path:
    path = home.checkpoints / f"step-{step:06d}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"\0" * int(mb * 2**20))
    (path / "config.json").write_text("{}")
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def test_retention_on_real_directories(tmp_path):
    home = Home(tmp_path / "home")
    home.create()
    ckpts = [_fake_checkpoint(home, s, 1.0) for s in (5, 40, 100, 900, 1000)]
    # numeric order, not names: step-1000 is newer than step-900
    assert storage.checkpoints(home) == ckpts
    storage.publish(home, ckpts[1])  # the current model came from step 40
    assert storage.current_model(home) == (home.models / "step-000040").resolve()
    assert (home.current / "model.safetensors").read_bytes() == (ckpts[1] / "model.safetensors"
                                                                 ).read_bytes()
    old_snap = storage.take_snapshot(home, "2026-01-01")
    (old_snap / "SNAPSHOT").write_text(json.dumps({"taken_at": time.time() - 10 * 86400}))
    new_snap = storage.take_snapshot(home, "2026-01-09")
    deleted = storage.apply_retention(home, keep_checkpoints=2, snapshot_max_age_h=48,
                                      max_total_gb=None, protected={ckpts[1]})
    assert ckpts[0] in deleted and old_snap in deleted
    assert [p.name for p in storage.checkpoints(home)] == ["step-000040", "step-000900",
                                                           "step-001000"]
    assert new_snap.exists()
    # a size budget forces deletions (snapshot first, then old checkpoints), never the
    # protected checkpoint nor the current model. Hard links count once: the snapshot and the
    # published model share the step-40 weights.
    for s in (1100, 1200):
        _fake_checkpoint(home, s, 1.0)
    assert storage.managed_bytes(home) > 5 * 2**20
    deleted = storage.apply_retention(home, keep_checkpoints=10, snapshot_max_age_h=48,
                                      max_total_gb=2.5 / 1024, protected={ckpts[1]})
    assert deleted[0] == new_snap
    assert storage.managed_bytes(home) <= 2.5 * 2**20
    left = [p.name for p in storage.checkpoints(home)]
    assert "step-000040" in left and "step-001200" in left
    assert (home.current / "model.safetensors").exists()
    # an impossible budget stops at the protected data instead of deleting it
    storage.apply_retention(home, 10, 48, 1e-9, {ckpts[1]})
    assert [p.name for p in storage.checkpoints(home)] == ["step-000040"]
    assert (home.current / "config.json").exists()


def test_snapshot_due():
    import datetime as dt

    at = dt.datetime(2026, 5, 1, 4, 29)
    assert not storage.snapshot_due(at, "04:30", None)
    assert storage.snapshot_due(at.replace(minute=31), "04:30", "2026-04-30")
    assert not storage.snapshot_due(at.replace(minute=31), "04:30", "2026-05-01")
    assert not storage.snapshot_due(at, None, None)


# --------------------------------------------------------------------------- the daemon


@pytest.mark.slow
def test_lifecycle_priorities_failures_rollback_schedule(tmp_path, micro_model_dir,
                                                         sample_rows, du):
    root = du.make_home(tmp_path / "home", micro_model_dir)
    home = Home(root)
    src = tmp_path / "src"
    a = du.write_jsonl(src / "a.jsonl", sample_rows[0:4])
    b = du.write_jsonl(src / "b.jsonl", sample_rows[4:8])
    bad = du.write_jsonl(src / "bad.jsonl", sample_rows[8:10])
    with open(bad, "a", encoding="utf-8") as fh:
        fh.write('{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    nan = du.write_jsonl(src / "nanfile.jsonl", sample_rows[10:14])
    crash = du.write_jsonl(src / "crashfile.jsonl", sample_rows[18:22])
    donecrash = du.write_jsonl(src / "donecrash.jsonl", sample_rows[22:26])
    assert invoke("submit", "--home", str(root), str(a)).exit_code == 0
    assert invoke("submit", "--home", str(root), "--priority", "high", str(b)).exit_code == 0
    assert invoke("submit", "--home", str(root), str(bad), str(nan), str(donecrash)
                  ).exit_code == 0
    assert invoke("submit", "--home", str(root), "--priority", "low", str(crash)).exit_code == 0
    du.write_jsonl(root / "inbox" / "low" / "d.jsonl", sample_rows[14:18])
    proc = du.start(root, fault="nan:nanfile,crash:crashfile,crashdone:donecrash")
    try:
        du.wait_for(lambda: du.status(root).get("state") in ("training", "idle"), 120,
                    "the daemon to start", proc, root)
        second = invoke("start", "--home", str(root))
        assert second.exit_code == 2 and "already running" in second.stderr
        du.wait_for(lambda: du.all_final(root) and len(du.rows(root)) == 7, 240,
                    "all files to finish", proc, root)
        du.wait_for(lambda: du.status(root).get("state") == "idle", 30, "idle", proc, root)
        st = du.status(root)
        history = invoke("history", "--home", str(root), "-n", "0")
        status_text = invoke("status", "--home", str(root))
        stopped = invoke("stop", "--home", str(root))
        assert stopped.exit_code == 0 and "daemon stopped" in stopped.output  # waits for it
        assert proc.wait(60) == 0
    finally:
        du.kill_group(proc)
    files = {r["name"]: r for r in du.rows(root)}
    # priorities: high first, then normal in submit order, low last; failures retried lower
    done = du.rows(root, "SELECT f.name FROM attempts a JOIN files f ON f.id=a.file_id "
                         "WHERE outcome='completed' ORDER BY a.id")
    assert [r["name"] for r in done] == ["b.jsonl", "a.jsonl", "donecrash.jsonl", "low/d.jsonl"]
    # invalid rows: a data error, failed at once (another attempt would fail the same way),
    # with the line in its report
    assert files["bad.jsonl"]["state"] == "failed" and files["bad.jsonl"]["attempts"] == 1
    rep = json.loads((home.failed / (files["bad.jsonl"]["fname"] + ".report.json")).read_text())
    assert rep["problems"][0]["line"] == 3 and rep["problems"][0]["field"].startswith("messages")
    assert ":3:" in rep["error"] and len(rep["attempt_log"]) == 1
    assert (home.failed / files["bad.jsonl"]["fname"]).exists()
    # NaN: rolled back each time, never advanced the model, failed after max_attempts
    n = files["nanfile.jsonl"]
    assert n["state"] == "failed" and n["attempts"] == 2 and "nan" in n["error"].lower()
    nan_attempts = du.rows(root, "SELECT * FROM attempts WHERE file_id=?", (n["id"],))
    assert all(x["outcome"] == "failed" and x["step_after"] == x["step_before"]
               for x in nan_attempts)
    # a crashing worker never takes the daemon down: it is restarted, the file retried, then
    # failed; the model is not advanced by it
    c = files["crashfile.jsonl"]
    assert c["state"] == "failed" and c["attempts"] == 2 and "worker died" in c["error"]
    assert (home.failed / (c["fname"] + ".report.json")).exists()
    log = (root / "logs" / "daemon.log").read_text()
    assert log.count("worker exited with code 17") == 2
    # a worker that dies after the file's final checkpoint: the file is done, not retried
    assert "worker exited with code 18" in log
    assert files["donecrash.jsonl"]["state"] == "completed"
    assert files["donecrash.jsonl"]["attempts"] == 1
    # the step counts add up: each completed file continues where the previous one ended
    completed = sorted((r for r in files.values() if r["state"] == "completed"),
                       key=lambda r: r["step_before"])
    assert completed[0]["step_before"] == 0
    for prev, nxt in zip(completed, completed[1:], strict=False):
        assert nxt["step_before"] == prev["step_after"]
    total = sum(r["steps"] for r in completed)
    assert total == completed[-1]["step_after"] == st["model"]["step"] == 8
    for r in completed:
        assert (home.completed / r["fname"]).exists()
        assert (home.completed / (r["fname"] + ".report.json")).exists()
    assert not list(home.queue.glob("*.jsonl"))
    # no checkpoint of a rolled-back attempt survives past the model
    assert max(storage.step_of(p) for p in storage.checkpoints(home)) == 8
    # the published current model is complete, finite and the last checkpoint's weights
    import torch

    current = du.weights(home.current)
    ckpt = du.weights(home.checkpoints / "step-000008")
    assert all(torch.equal(current[k], ckpt[k]) for k in ckpt)
    assert all(torch.isfinite(t).all() for t in current.values())
    assert (home.current / "tokenizer_config.json").exists()
    # one LR schedule: warmup over the first 3 global steps, then the peak, across files
    lrs = {m["step"]: m["lr"] for m in du.metrics(root)}
    assert [lrs[s] for s in (1, 2, 3)] == pytest.approx([du.PEAK_LR / 3, 2 * du.PEAK_LR / 3,
                                                         du.PEAK_LR])
    assert all(lr == pytest.approx(du.PEAK_LR) for s, lr in lrs.items() if s > 3)
    # status.json and the CLI
    assert st["queue"]["total"] == 0 and st["counts"]["completed"] == 4
    assert st["disk"]["gate"] == "ok" and st["model"]["current"].endswith("step-000008")
    assert history.exit_code == 0 and history.output.count("completed") == 4
    assert "low/d.jsonl" in history.output and "nanfile.jsonl" in history.output
    assert status_text.exit_code == 0 and "state: idle" in status_text.output
    stopped = invoke("status", "--home", str(root), "--json")
    assert json.loads(stopped.output)["state"] == "stopped"
    assert "no daemon is running" in invoke("stop", "--home", str(root)).output


@pytest.mark.slow
def test_pause_resume_skip_stop_retry_from_another_process(tmp_path, micro_model_dir,
                                                           sample_rows, du):
    root = du.make_home(tmp_path / "home", micro_model_dir)
    home = Home(root)
    long = du.write_jsonl(tmp_path / "long.jsonl", sample_rows[0:16])  # 8 steps
    short = du.write_jsonl(tmp_path / "short.jsonl", sample_rows[16:18])  # 1 step
    submit_files(home, [long, short], "normal", False)
    proc = du.start(root, fault="sleep:0.4")
    try:
        def current_step():
            cur = du.status(root).get("current") or {}
            return cur.get("file_step") or 0

        du.wait_for(lambda: current_step() >= 1, 120, "training to start", proc, root)
        result = invoke("pause", "--home", str(root))
        assert result.exit_code == 0, result.output
        du.wait_for(lambda: du.status(root).get("state") == "paused", 30, "pause", proc, root)
        paused_at = current_step()
        ckpts = [storage.checkpoint_state(p) for p in storage.checkpoints(home)]
        mine = [c for c in ckpts if (c.get("daemon") or {}).get("file_id") == 1]
        assert mine and mine[-1]["daemon"]["file_step"] == paused_at
        assert not mine[-1]["daemon"]["complete"]
        time.sleep(1.5)
        assert current_step() == paused_at  # nothing trains while paused
        assert invoke("resume", "--home", str(root)).exit_code == 0
        du.wait_for(lambda: current_step() > paused_at, 30, "resume", proc, root)
        assert invoke("skip", "--home", str(root)).exit_code == 0
        # skipped: the ledger first, then the file and its report; the model is rolled back
        # (the short file starts from step 0)
        du.wait_for(lambda: (home.skipped / "000001-long.jsonl.report.json").exists(), 30,
                    "skip", proc, root)
        assert du.rows(root)[0]["state"] == "skipped"
        assert (home.skipped / "000001-long.jsonl").exists()
        du.wait_for(lambda: du.rows(root)[1]["state"] == "completed", 60, "short", proc, root)
        assert du.rows(root)[1]["step_before"] == 0 and du.rows(root)[1]["step_after"] == 1
        # retry the skipped file, then stop the daemon mid-file
        assert invoke("retry", "--home", str(root), "long.jsonl").exit_code == 0
        du.wait_for(lambda: current_step() >= 2, 60, "long again", proc, root)
        result = invoke("stop", "--home", str(root))
        assert result.exit_code == 0
        assert proc.wait(60) == 0
    finally:
        du.kill_group(proc)
    row = du.rows(root)[0]
    assert row["state"] == "training" and row["attempts"] == 1
    saved = [storage.checkpoint_state(p)["daemon"] for p in storage.checkpoints(home)
             if storage.step_of(p) > 1]
    assert saved and saved[-1]["file_id"] == 1 and 2 <= saved[-1]["file_step"] < 8
    # a restart resumes the file where the stop left it and completes it
    proc = du.start(root)
    try:
        du.wait_for(lambda: du.all_final(root), 120, "the resumed file", proc, root)
    finally:
        invoke("stop", "--home", str(root))
        proc.wait(60)
        du.kill_group(proc)
    row = du.rows(root)[0]
    assert row["state"] == "completed" and row["steps"] == 8
    assert row["step_before"] == 1 and row["step_after"] == 9
    log = (root / "logs" / "daemon.log").read_text()
    assert f"resumed at file step {saved[-1]['file_step']}" in log


@pytest.mark.slow
def test_disk_gate_blocks_new_files(tmp_path, micro_model_dir, sample_rows, du):
    root = du.make_home(tmp_path / "home", micro_model_dir, **{"daemon.min_free_gb": 1e9})
    submit_files(Home(root), [du.write_jsonl(tmp_path / "x.jsonl", sample_rows[:2])], "normal",
                 False)
    proc = du.start(root)
    try:
        st = du.wait_for(lambda: (s := du.status(root)).get("state") == "waiting_disk" and s,
                         120, "the disk gate", proc, root)
        assert st["disk"]["gate"] == "blocked" and st["disk"]["min_free_gb"] == 1e9
        assert st["queue"]["total"] == 1
        assert du.rows(root)[0]["state"] == "queued" and du.rows(root)[0]["attempts"] == 0
        assert "disk gate" in (root / "logs" / "daemon.log").read_text()
    finally:
        invoke("stop", "--home", str(root))
        proc.wait(60)
        du.kill_group(proc)


def test_cli_user_errors_are_one_line(tmp_path):
    bad = invoke("start", "--home", str(tmp_path / "h"), "--set", "daemon.poll_interval_s=0")
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "error: daemon.poll_interval_s: must be > 0, got 0.0"
    missing = invoke("status", "--home", str(tmp_path / "nowhere"))
    assert missing.exit_code == 2 and "not a daemon home" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    nothing = invoke("submit", "--home", str(tmp_path / "h"))
    assert nothing.exit_code == 2 and "at least one file" in nothing.stderr


def test_retry_and_skip_without_a_running_daemon(tmp_path, sample_rows, du):
    home = Home(tmp_path / "home")
    f = du.write_jsonl(tmp_path / "x.jsonl", sample_rows[:2])
    submit_files(home, [f], "normal", False)
    result = invoke("skip", "--home", str(home.root), "x.jsonl")
    assert result.exit_code == 0 and "skipped" in result.output
    assert (home.skipped / "000001-x.jsonl").exists()
    again = invoke("retry", "--home", str(home.root), "#1")
    assert again.exit_code == 0 and "queued again" in again.output
    assert (home.queue / "000001-x.jsonl").exists()
    assert not (home.skipped / "000001-x.jsonl.report.json").exists()
    refused = invoke("retry", "--home", str(home.root), "x.jsonl")
    assert refused.exit_code == 2 and "is queued" in refused.stderr
    paused = invoke("pause", "--home", str(home.root))
    assert paused.exit_code == 0 and "next start" in paused.output
    assert du.rows(home.root, "SELECT value FROM meta WHERE key='paused'")[0]["value"] == "1"


def test_half_deleted_and_temporary_directories_are_cleaned(tmp_path):
    home = Home(tmp_path / "home")
    home.create()
    good = _fake_checkpoint(home, 3, 0.01)
    half = _fake_checkpoint(home, 7, 0.01)
    (half / "trainer_state.json").unlink()  # a kill in the middle of deleting it
    tmp = home.checkpoints / ".tmp-step-000009"
    tmp.mkdir()
    storage.publish(home, good)
    gone = storage.remove_incomplete(home)
    assert sorted(p.name for p in gone) == [".tmp-step-000009", "step-000007"]
    assert storage.checkpoints(home) == [good]
    assert (home.current / "model.safetensors").exists()
