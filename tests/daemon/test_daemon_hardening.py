"""Issue 23 (hardening round 3): what an adversarial probe did to the daemon, each a check that
failed before the fix, on real daemon processes. Homes are copies of one trained home (two
files, checkpoints at steps 0, 1 and 2), so only three daemons train at all: one fed hostile
files, one started twice at once with changed settings, and the one that trains the home."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer_core.cli import cli
from trainer_core.daemon import storage
from trainer_core.daemon.control import submit_files
from trainer_core.daemon.home import Home
from trainer_core.daemon.ledger import Ledger

pytestmark = pytest.mark.slow


def invoke(*args: str):
    return CliRunner().invoke(cli, ["daemon", *map(str, args)])


def daemon_cli(du, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``trainer daemon ARGS`` in its own process (a real start that may refuse)."""
    return subprocess.run([sys.executable, "-m", "trainer_core", "daemon", *map(str, args)],
                          capture_output=True, text=True, env=du.env(), timeout=timeout,
                          stdin=subprocess.DEVNULL)


def stop(root: Path, proc: subprocess.Popen | None, du) -> None:
    invoke("stop", "--home", root)
    if proc is not None:
        try:
            proc.wait(60)
        finally:
            du.kill_group(proc)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, micro_model_dir, sample_rows, du):
    """A stopped home that trained a.jsonl (step 1) and b.jsonl (step 2)."""
    base = tmp_path_factory.mktemp("trained")
    root = du.make_home(base / "home", micro_model_dir)
    files = [du.write_jsonl(base / "src" / f"{n}.jsonl", sample_rows[i * 2:i * 2 + 2])
             for i, n in enumerate("ab")]
    submit_files(Home(root), files, "normal", False)
    proc = du.start(root)
    try:
        du.wait_for(lambda: du.all_final(root) and len(du.rows(root)) == 2, 240, "two files",
                    proc, root)
    finally:
        stop(root, proc, du)
    assert [r["state"] for r in du.rows(root)] == ["completed", "completed"]
    assert [storage.step_of(p) for p in storage.checkpoints(Home(root))] == [0, 1, 2]
    return root


def copy_home(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    (dest / "test.out").unlink(missing_ok=True)
    return dest


def snapshot(root: Path) -> dict:
    """What must survive a refused start unchanged."""
    return {"checkpoints": sorted(p.name for p in (root / "checkpoints").iterdir()),
            "models": sorted(p.name for p in (root / "models").iterdir()),
            "current": os.readlink(root / "current"),
            "completed": sorted(p.name for p in (root / "completed").iterdir()),
            "config": (root / "config.json").read_bytes()}


# --------------------------------------------------------------------------- 3, 16: the ledger


def test_a_missing_emptied_or_truncated_ledger_is_refused_with_the_way_out(trained, tmp_path,
                                                                          du):
    def missing(ledger: Path) -> None:
        for p in ledger.parent.glob("ledger.sqlite*"):
            p.unlink()

    def emptied(ledger: Path) -> None:  # a backup from before the first file
        missing(ledger)
        Ledger(ledger).close()

    def truncated(ledger: Path) -> None:
        data = ledger.read_bytes()
        missing(ledger)
        ledger.write_bytes(data[:1000])

    for damage in (missing, emptied, truncated):
        root = copy_home(trained, tmp_path / damage.__name__)
        damage(root / "ledger.sqlite")
        before = snapshot(root)
        started = daemon_cli(du, "start", "--home", root)
        assert started.returncode == 2, (damage.__name__, started.stdout, started.stderr)
        assert "Traceback" not in started.stderr
        line = started.stderr.strip().splitlines()[-1]
        if damage is truncated:
            assert "not a readable ledger" in line and "restore ledger.sqlite" in line
            status = invoke("status", "--home", root)
            assert status.exit_code == 2 and "not a readable ledger" in status.stderr
        else:
            assert "holds the model of step 2" in line and "Restore ledger.sqlite" in line
            assert "move ledger.sqlite, checkpoints/, models/ and current aside" in line
        assert snapshot(root) == before, damage.__name__  # nothing published or deleted
        if damage is missing:
            assert "ledger.sqlite is missing or empty" in line
            assert not (root / "ledger.sqlite").exists()  # nor created
        assert not (root / "status.json").exists() or \
            json.loads((root / "status.json").read_text())["model"]["step"] == 2


# --------------------------------------------------------------------------- 9, 10, 11


def test_restarts_refuse_another_model_and_unaccepted_changes_and_detach_races_are_honest(
        trained, tmp_path, micro_model_dir, sample_rows, du):
    root = copy_home(trained, tmp_path / "home")
    before = snapshot(root)
    other = tmp_path / "other-model"
    shutil.copytree(micro_model_dir, other)
    refused = daemon_cli(du, "start", "--home", root, "--model", other)
    assert refused.returncode == 2 and "trains another model" in refused.stderr
    assert f"-> {other}" in refused.stderr and "daemon started" not in refused.stdout
    changed = daemon_cli(du, "start", "--home", root, "--set", "hyperparams.learning_rate=0.9")
    assert changed.returncode == 2
    assert "hyperparams.learning_rate: 0.001 -> 0.9" in changed.stderr
    assert "--allow-changes lr" in changed.stderr
    assert snapshot(root) == before  # refused before anything was saved

    # Two detached starts at once, with different settings: one wins, and its config runs.
    common = ["daemon", "start", "--home", str(root), "--detach", "--allow-changes", "lr",
              "--set", "hyperparams.learning_rate=0.9"]
    procs = {poll: subprocess.Popen([sys.executable, "-m", "trainer_core", *common, "--set",
                                     f"daemon.poll_interval_s={poll}"], env=du.env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for poll in (0.3, 0.4)}
    results = {poll: (p.wait(120), *p.communicate()) for poll, p in procs.items()}
    try:
        winners = [poll for poll, (rc, _, _) in results.items() if rc == 0]
        assert len(winners) == 1, results
        won, lost = winners[0], next(p for p in results if p not in winners)
        pid = int(results[won][1].split("(pid ")[1].split(")")[0])
        rc, out, err = results[lost]
        assert rc == 2 and "already running" in err and "daemon started" not in err + out
        assert json.loads((root / "config.json").read_text())["daemon"]["poll_interval_s"] == won
        du.wait_for(lambda: du.status(root).get("pid") == pid, 60, "the winner's status")
        log = (root / "logs" / "daemon.log").read_text()
        assert "learning rate 0.9" in log
        assert "accepted changes: hyperparams.learning_rate: 0.001 -> 0.9" in log
        submit_files(Home(root), [du.write_jsonl(tmp_path / "c.jsonl", sample_rows[4:6])],
                     "normal", False)
        du.wait_for(lambda: du.all_final(root) and len(du.rows(root)) == 3, 180, "c.jsonl",
                    home=root)
    finally:
        stop(root, None, du)
        du.wait_for(lambda: not _running(root), 60, "the detached daemon to stop")
    # the accepted learning rate is the one trained with (warmup is over: the peak)
    assert [m["lr"] for m in du.metrics(root) if m["step"] == 3] == [pytest.approx(0.9)]


def _running(root: Path) -> bool:
    from trainer_core.daemon.home import daemon_running

    return bool(daemon_running(Home(root)))


# --------------------------------------------------------------------------- 4-8, 17, 18


def test_nothing_about_one_file_or_command_stops_the_daemon(trained, tmp_path, sample_rows,
                                                            du, http_request):
    root = copy_home(trained, tmp_path / "home")
    home = Home(root)
    cfg = json.loads(home.config.read_text())
    cfg["daemon"]["max_row_mb"] = 1
    home.config.write_text(json.dumps(cfg))
    src = tmp_path / "src"
    rows = lambda i: sample_rows[i * 2:i * 2 + 2]  # noqa: E731 - two rows, one step
    # 8: the current model's checkpoint deleted by hand (step 1 and models/ remain)
    shutil.rmtree(home.checkpoints / "step-000002")
    # 5: a 240-byte name, submitted; 7: a submitted file deleted from queue/ before training
    long_name = "s" * 234 + ".jsonl"
    submit_files(home, [du.write_jsonl(src / long_name, rows(3))], "normal", False)
    gone = submit_files(home, [du.write_jsonl(src / "gone.jsonl", rows(4))], "normal", False)[0]
    (home.queue / gone["fname"]).unlink()
    # 4: a command with an id too large for SQLite, pending before the start
    ledger = Ledger(home.ledger)
    ledger.add_command("skip", "#" + "9" * 30)
    ledger.close()
    # the inbox: 5 a 240-byte name, 6 a name that is not UTF-8, 17 links, 18 a 2 MB row,
    # and invalid rows (a data error: one attempt, not max_attempts)
    du.write_jsonl(home.inbox / ("i" * 234 + ".jsonl"), rows(5))
    fd = os.open(os.fsencode(home.inbox) + b"/bad\xff.jsonl", os.O_WRONLY | os.O_CREAT)
    os.write(fd, "".join(json.dumps(r) + "\n" for r in rows(6)).encode())
    os.close(fd)
    outside = du.write_jsonl(tmp_path / "outside" / "linked.jsonl", rows(7))
    (home.inbox / "link.jsonl").symlink_to(outside)
    (home.inbox / "passwd.jsonl").symlink_to("/etc/passwd")
    dangling = du.write_jsonl(tmp_path / "outside" / "dangling.jsonl", rows(8))
    (home.inbox / "dangling.jsonl").symlink_to(dangling)
    dangling.unlink()
    huge = rows(9)[0]
    (home.inbox / "huge.jsonl").write_text(json.dumps(huge) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "x" * (2 << 20)},
                      {"role": "assistant", "content": "y"}]}) + "\n")
    du.write_jsonl(home.inbox / "invalid.jsonl",
                   [*rows(10), {"messages": [{"role": "wizard", "content": "hi"}]}])

    from trainer_core.daemon.dashboard import DaemonView
    from trainer_core.monitor.dashboard.server import make_server
    from trainer_core.monitor.dashboard.server import stop as stop_server

    server, board = make_server(root, "127.0.0.1", 0, views={"daemon": DaemonView(root)},
                                token="tok")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proc = du.start(root)
    try:
        du.wait_for(lambda: du.status(root).get("state") in ("training", "idle"), 120,
                    "the daemon to start", proc, root)
        huge_id = "9" * 30
        skipped = invoke("skip", "--home", root, f"#{huge_id}")
        assert skipped.exit_code == 2 and "no such file" in skipped.stderr
        status, body = http_request(server.server_address[1], "POST", "/api/daemon/skip",
                                    {"X-Trainer-Token": "tok"}, {"id": huge_id})
        assert status == 409 and b"no such file" in body
        du.wait_for(lambda: du.all_final(root) and len(du.rows(root)) == 10, 240,
                    "every file to end", proc, root)
        assert proc.poll() is None  # the daemon never stopped
        assert all(c["done_at"] for c in du.rows(root, "SELECT * FROM commands"))
        pending = du.rows(root, "SELECT result FROM commands WHERE arg=?", ("#" + huge_id,))
        assert pending and all(c["result"].startswith("error: ") for c in pending)
    finally:
        stop(root, proc, du)
        stop_server(server, board)
    files = {r["name"]: r for r in du.rows(root)}
    log = (root / "logs" / "daemon.log").read_text()
    # 8: back to the checkpoint of step 1; b.jsonl (trained into the lost step 2) again
    assert "falls back to step-000001 (step 1); 1 file(s) trained since are queued again" in log
    assert files["b.jsonl"]["state"] == "completed" and files["b.jsonl"]["step_before"] >= 1
    completed = sorted((r for r in files.values() if r["state"] == "completed"),
                       key=lambda r: r["step_before"])
    assert completed[0]["step_before"] == 0
    chain = [r for r in completed if r["name"] != "a.jsonl"]
    assert chain[0]["step_before"] == 1
    for prev, nxt in zip(chain, chain[1:], strict=False):
        assert nxt["step_before"] == prev["step_after"]
    # 5: long names trained, reported, stored under a legal name
    for name in (long_name, "i" * 234 + ".jsonl"):
        r = files[name]
        assert r["state"] == "completed", r
        assert len(r["fname"].encode()) <= 230 and r["fname"].endswith(".jsonl")
        assert (home.completed / (r["fname"] + ".report.json")).exists()
    # 6: renamed (U+FFFD for the bad byte) and trained
    assert files["bad\ufffd.jsonl"]["state"] == "completed"
    # 7: a vanished file fails alone, at once
    g = files["gone.jsonl"]
    assert g["state"] == "failed" and g["attempts"] == 1 and "gone from queue/" in g["error"]
    # 17: the content of a link is taken (a regular file), the link removed
    link = files["link.jsonl"]
    assert link["state"] == "completed"
    kept = home.completed / link["fname"]
    assert not kept.is_symlink() and kept.read_bytes() == outside.read_bytes()
    assert not (home.inbox / "link.jsonl").is_symlink() and outside.exists()
    pw = files["passwd.jsonl"]
    assert pw["state"] == "failed" and pw["attempts"] == 1  # not JSON: a data error, once
    assert not (home.failed / pw["fname"]).is_symlink()
    assert "dangling.jsonl" not in files
    # 18: refused at intake, naming the line; never trained
    h = files["huge.jsonl"]
    assert h["state"] == "failed" and h["attempts"] == 0
    assert "line 2" in h["error"] and "daemon.max_row_mb" in h["error"]
    assert (home.failed / (h["fname"] + ".report.json")).exists()
    assert files["invalid.jsonl"]["state"] == "failed" and files["invalid.jsonl"]["attempts"] == 1

    # and the next start is a normal one
    proc = du.start(root)
    try:
        du.wait_for(lambda: du.status(root).get("state") == "idle" and
                    du.status(root).get("pid") == proc.pid, 120, "a clean restart", proc, root)
    finally:
        stop(root, proc, du)
    assert proc.returncode == 0


def test_skip_of_the_file_a_stopped_daemon_was_training(trained, tmp_path, du):
    root = copy_home(trained, tmp_path / "home")
    db = sqlite3.connect(root / "ledger.sqlite")
    db.execute("UPDATE files SET state='training', attempts=1, step_before=2 WHERE id=2")
    db.commit()
    db.close()
    result = invoke("skip", "--home", root, "b.jsonl")
    assert result.exit_code == 0 and "skipped" in result.output, result.output
    assert du.rows(root)[1]["state"] == "skipped"
    assert (root / "skipped" / "000002-b.jsonl.report.json").exists()


# --------------------------------------------------------------------------- 16: a full disk


def _fill(path: Path, leave: int) -> None:
    """Write ``path`` until only about ``leave`` bytes stay free on its file system."""
    free = shutil.disk_usage(path.parent).free
    with open(path, "wb") as fh:
        try:
            fh.write(b"\0" * max(0, free - leave))
            fh.flush()
            os.fsync(fh.fileno())
        except OSError:
            pass


def test_a_full_disk_is_a_wait_not_a_file_failure(tmp_path, micro_model_dir, sample_rows, du):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("needs permission to mount a small tmpfs (a real full disk)")
    proc = None
    try:
        root = du.make_home(disk / "home", micro_model_dir)
        proc = du.start(root)
        du.wait_for(lambda: du.status(root).get("state") == "idle", 120, "the base model",
                    proc, root)
        _fill(disk / "filler", 1 << 20)  # room for a file, not for a checkpoint
        submit_files(Home(root), [du.write_jsonl(tmp_path / "a.jsonl", sample_rows[:2])],
                     "normal", False)
        du.wait_for(lambda: du.status(root).get("state") == "waiting_disk", 120,
                    "waiting_disk", proc, root)
        row = du.rows(root)[0]
        assert row["state"] == "queued" and row["attempts"] == 0, row
        _fill(disk / "filler2", 0)
        full = invoke("submit", "--home", root, du.write_jsonl(tmp_path / "b.jsonl",
                                                               sample_rows[2:4]))
        assert full.exit_code == 2 and "Traceback" not in full.output
        assert "disk is full" in full.stderr and len(full.stderr.strip().splitlines()) == 1
        assert proc.poll() is None
        (disk / "filler").unlink()
        (disk / "filler2").unlink()
        du.wait_for(lambda: du.rows(root)[0]["state"] == "completed", 180, "a.jsonl", proc,
                    root)
        a = du.rows(root)[0]
        assert a["attempts"] == 1 and a["step_after"] == 1
        assert not du.rows(root, "SELECT * FROM attempts WHERE outcome='failed'")
        log = (root / "logs" / "daemon.log").read_text()
        assert "disk full" in log and "waits, first in line, for free space" in log
    finally:
        if proc is not None:
            du.kill_group(proc)
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
