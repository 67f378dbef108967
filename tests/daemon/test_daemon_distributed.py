"""`trainer daemon` with ``daemon.nproc`` 2: the worker under torchrun (gloo on CPU) trains like
the one-process worker (DDP and FSDP2), survives a SIGTERM to torchrun (checkpoint, restart,
exact resume), and a rank that dies fails the file promptly instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from trainer_core.cli import cli
from trainer_core.config import resolve
from trainer_core.daemon.control import submit_files
from trainer_core.daemon.home import Home
from trainer_core.errors import UserError

STEPS = 8  # 32 rows, 4 per optimizer step: 2 per process under torchrun


def _home(root, model_dir, du, **overrides):
    return du.make_home(root, model_dir, **{"hyperparams.batch_size": 4,
                                            "daemon.max_attempts": 1, **overrides})


def test_nproc_setting_is_validated_and_reaches_torchrun_command():
    from trainer_core.train.distributed import torchrun_command

    assert resolve(cli={"daemon.nproc": 2}).config.daemon.nproc == 2
    with pytest.raises(UserError, match="daemon.nproc"):
        resolve(cli={"daemon.nproc": 0})
    cmd = torchrun_command(2, ["/h"], python="py", module="trainer_core.daemon.worker")
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   "-m", "trainer_core.daemon.worker", "/h"]
    result = CliRunner().invoke(cli, ["daemon", "start", "--home", "/nonexistent", "--nproc",
                                      "0"])
    assert result.exit_code == 2 and "--nproc" in result.output


def _start_with_nproc(root, fault, du) -> subprocess.Popen:
    """``trainer daemon start --home H --nproc 2`` (the home's config.json says nothing of it)."""
    out = open(root / "test.out", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "trainer_core", "daemon", "start", "--home",
                             str(root), "--nproc", "2"], stdin=subprocess.DEVNULL, stdout=out,
                            stderr=out, env=du.env(fault), start_new_session=True)
    out.close()
    return proc


def _stop(root, proc, du) -> int:
    result = CliRunner().invoke(cli, ["daemon", "stop", "--home", str(root)])
    try:
        return proc.wait(90)
    finally:
        assert result.exit_code == 0, result.output
        du.kill_group(proc)


def _losses(root, du) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for m in du.metrics(root):
        if m["file_id"] == 1:
            out.setdefault(m["step"], []).append(m["loss"])
    return out


def _assert_same_training(root, reference, du) -> None:
    """One metrics line per global step (rank 0 alone talks, a resume repeats nothing), losses
    and the published model within 1e-5 of the one-process daemon's."""
    import torch

    two, one = _losses(root, du), _losses(reference, du)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        assert len(two[step]) == 1
        assert abs(two[step][0] - one[step][0]) <= 1e-5, step
    w1, w2 = du.weights(Home(reference).current), du.weights(Home(root).current)
    assert w1.keys() == w2.keys()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-5
    assert all(torch.isfinite(t).all() for t in w2.values())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, micro_model_dir, sample_rows, du):
    """The reference: the same file through the one-process worker."""
    tmp_path = tmp_path_factory.mktemp("daemon-one")
    root = _home(tmp_path / "one", micro_model_dir, du)
    submit_files(Home(root), [du.write_jsonl(tmp_path / "a.jsonl", sample_rows[:32])],
                 "normal", False)
    proc = du.start(root)
    try:
        du.wait_for(lambda: du.all_final(root), 180, "the file", proc, root)
    finally:
        assert _stop(root, proc, du) == 0
    return root


@pytest.mark.slow
def test_two_process_worker_trains_like_one_resumes_after_sigterm_and_fails_fast(
        one_process, tmp_path, micro_model_dir, sample_rows, du):
    root = _home(tmp_path / "two", micro_model_dir, du)
    home = Home(root)
    submit_files(home, [du.write_jsonl(tmp_path / "a.jsonl", sample_rows[:32])], "normal",
                 False)
    proc = _start_with_nproc(root, "sleep:0.4,rankcrash:boom", du)
    try:
        # pause mid-file (every rank stops after the same step, rank 0 checkpoints), then
        # resume: the idle worker gets the file again through rank 0's broadcast
        du.wait_for(lambda: len(du.metrics(root)) >= 1, 180, "a step", proc, root)
        assert CliRunner().invoke(cli, ["daemon", "pause", "--home", str(root)]).exit_code == 0
        du.wait_for(lambda: du.status(root).get("state") == "paused", 30, "pause", proc, root)
        paused_at = len(du.metrics(root))
        assert CliRunner().invoke(cli, ["daemon", "resume", "--home", str(root)]).exit_code == 0
        # SIGTERM to torchrun mid-file: the ranks agree on a step, rank 0 checkpoints, the
        # daemon restarts the worker and the file resumes there.
        du.wait_for(lambda: len(du.metrics(root)) > paused_at, 60, "resume", proc, root)
        torchrun = du.status(root)["worker"]["pid"]
        os.kill(torchrun, signal.SIGTERM)
        du.wait_for(lambda: du.all_final(root), 180, "the file", proc, root)
        # A rank that dies: the file fails with the reason, promptly; the model rolls back.
        submit_files(home, [du.write_jsonl(tmp_path / "boom.jsonl", sample_rows[32:40])],
                     "normal", False)
        du.wait_for(lambda: len(du.rows(root)) == 2 and du.all_final(root), 120, "boom",
                    proc, root)
        st = du.status(root)
    finally:
        assert _stop(root, proc, du) == 0
    assert json.loads((root / "config.json").read_text())["daemon"]["nproc"] == 2
    a, boom = du.rows(root)
    assert a["state"] == "completed" and a["steps"] == STEPS and a["attempts"] == 1
    log = (root / "logs" / "daemon.log").read_text()
    assert "worker started under torchrun, 2 processes" in log
    assert "--nproc-per-node=2 -m trainer_core.daemon.worker" in log
    assert "worker stopped at global step" in log  # the SIGTERM's checkpoint
    resumed_at = [int(line.split("resumed at file step ")[1].split()[0])
                  for line in log.splitlines() if "resumed at file step" in line]
    assert "paused at global step" in log
    assert len(resumed_at) == 2 and resumed_at[0] == paused_at, log
    assert paused_at < resumed_at[1] < STEPS, log
    _assert_same_training(root, one_process, du)

    assert boom["state"] == "failed" and "rank 1 died" in boom["error"], boom["error"]
    attempt = du.rows(root, "SELECT * FROM attempts WHERE file_id=?", (boom["id"],))[0]
    assert attempt["finished_at"] - boom["train_started_at"] < 20
    assert st["model"]["step"] == STEPS  # rolled back: boom never advanced the model


@pytest.mark.slow
def test_two_process_fsdp_worker_trains_like_one(one_process, tmp_path, micro_model_dir,
                                                 sample_rows, du):
    # FSDP gathers the step-0 checkpoint (an optimizer that never stepped) and every later one
    # to rank 0; mid-file checkpoints too (save_steps).
    root = _home(tmp_path / "fsdp", micro_model_dir, du, **{
        "daemon.nproc": 2, "environment.distributed": "fsdp", "daemon.save_steps": 2})
    submit_files(Home(root), [du.write_jsonl(tmp_path / "a.jsonl", sample_rows[:32])],
                 "normal", False)
    proc = du.start(root)
    try:
        du.wait_for(lambda: du.all_final(root), 180, "the file", proc, root)
    finally:
        assert _stop(root, proc, du) == 0
    assert du.rows(root)[0]["state"] == "completed"
    _assert_same_training(root, one_process, du)
