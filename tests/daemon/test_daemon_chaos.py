"""Chaos: SIGKILL the daemon and its worker at random moments, restart, repeat.

Invariants: every submitted file ends exactly once in completed/ (or failed/), none is lost or
trained twice, the ledger's step counts add up, and the final weights are bit-identical to an
uninterrupted daemon's on the same files in the same order.
"""

from __future__ import annotations

import random
import time

import pytest

from trainer_core.daemon import storage
from trainer_core.daemon.control import submit_files
from trainer_core.daemon.home import Home

#: Enough files that KILLS lives end mid-work: the daemon overlaps steps since issue 24, and
#: on an idle machine a life used to finish most of 20 files before its kill came.
N_FILES = 30
KILLS = 6


def _files(tmp_path, sample_rows, du):
    rng = random.Random(7)
    out = []
    for i in range(N_FILES):
        n = rng.choice([2, 3, 4])  # 1 or 2 optimizer steps of 2 rows
        start = rng.randrange(0, len(sample_rows) - n)
        out.append(du.write_jsonl(tmp_path / "src" / f"f{i:02d}.jsonl",
                                  sample_rows[start:start + n]))
    return out


def _fill(root, files, du):
    """Half submitted, half dropped into the inbox (taken at the first scan, in name order)."""
    home = Home(root)
    submit_files(home, files[: N_FILES // 2], "normal", False)
    for f in files[N_FILES // 2:]:
        (home.inbox / f.name).write_bytes(f.read_bytes())
    return home


def _run_to_end(root, du, timeout=240):
    proc = du.start(root)
    try:
        du.wait_for(lambda: du.all_final(root) and len(du.rows(root)) == N_FILES, timeout,
                    "all files", proc, root)
        # the last file's commit is in the ledger; give the move and the report a moment
        du.wait_for(lambda: not list((root / "queue").glob("*.jsonl")), 30, "moves", proc,
                    root)
    finally:
        from click.testing import CliRunner

        from trainer_core.cli import cli

        CliRunner().invoke(cli, ["daemon", "stop", "--home", str(root)])
        proc.wait(60)
        du.kill_group(proc)


@pytest.mark.slow
def test_sigkill_chaos_loses_nothing_and_matches_an_uninterrupted_daemon(
        tmp_path, micro_model_dir, sample_rows, du):
    files = _files(tmp_path, sample_rows, du)
    # save_steps=1: checkpoints inside files too, so kills also resume mid-file
    chaos_root = du.make_home(tmp_path / "chaos", micro_model_dir, **{"daemon.save_steps": 1})
    ref_root = du.make_home(tmp_path / "ref", micro_model_dir)
    _fill(ref_root, files, du)
    chaos = _fill(chaos_root, files, du)

    _run_to_end(ref_root, du)

    rng = random.Random(1234)
    kills = 0
    t0 = time.time()
    while kills < KILLS and not du.all_final(chaos_root):
        proc = du.start(chaos_root)
        before = len(du.metrics(chaos_root))
        # Kill at a random moment once training is under way (a step logged in this life),
        # sometimes while the worker is still loading or the daemon is starting.
        if rng.random() < 0.8:
            du.wait_for(lambda b=before: len(du.metrics(chaos_root)) > b
                        or du.all_final(chaos_root), 120, "a step", proc, chaos_root)
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            time.sleep(rng.uniform(0.2, 3.0))
        du.kill_group(proc)
        kills += 1
    assert kills >= KILLS - 1, "the files finished before the daemon could be killed enough"
    _run_to_end(chaos_root, du)
    elapsed = time.time() - t0

    ref = {r["sha256"]: r for r in du.rows(ref_root)}
    got = du.rows(chaos_root)
    # every file exactly once, completed, in its folder with a report; nothing left behind
    assert len(got) == N_FILES and all(r["state"] == "completed" for r in got), got
    assert {r["sha256"] for r in got} == set(ref)
    names = sorted(p.name for p in chaos.completed.glob("*.jsonl"))
    assert names == sorted(r["fname"] for r in got)
    assert all((chaos.completed / (r["fname"] + ".report.json")).exists() for r in got)
    assert not list(chaos.queue.glob("*.jsonl")) and not list(chaos.failed.glob("*.jsonl"))
    assert not [p for p in chaos.inbox.rglob("*.jsonl")]
    # never trained twice: one completed attempt per file, no failed ones (kills are not
    # failures of the file), the same step numbers as the uninterrupted daemon
    attempts = du.rows(chaos_root, "SELECT * FROM attempts")
    assert sorted(a["file_id"] for a in attempts) == sorted(r["id"] for r in got)
    assert all(a["outcome"] == "completed" for a in attempts)
    for r in got:
        assert (r["step_before"], r["step_after"], r["steps"], r["tokens"]) == (
            ref[r["sha256"]]["step_before"], ref[r["sha256"]]["step_after"],
            ref[r["sha256"]]["steps"], ref[r["sha256"]]["tokens"])
    chain = sorted(got, key=lambda r: r["step_before"])
    assert chain[0]["step_before"] == 0
    for prev, nxt in zip(chain, chain[1:], strict=False):
        assert nxt["step_before"] == prev["step_after"]
    total = sum(r["steps"] for r in got)
    assert total == chain[-1]["step_after"] == storage.step_of(storage.current_model(chaos))
    # bit-identical weights
    import torch

    a, b = du.weights(chaos.current), du.weights(Home(ref_root).current)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ from the uninterrupted run"
    log = (chaos_root / "logs" / "daemon.log").read_text()
    print(f"chaos: {kills} kills, {log.count('daemon started')} starts, "
          f"{log.count('resumed at file step')} mid-file resumes, {elapsed:.0f} s")
