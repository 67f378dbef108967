"""Several processes (torchrun, gloo on CPU): the same training as one process, rank-0 I/O,
checkpoint/resume, prompt failure propagation; and the pure pieces (token split, launcher)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer_core.cli.run_cmds import without_nproc
from trainer_core.data.batching import (
    count_micro_batches,
    micro_batches,
    pack_greedy,
    split_by_tokens,
    trained_tokens,
)
from trainer_core.train.distributed import (
    named_optimizer_state,
    positional_optimizer_state,
    torchrun_command,
)

# --------------------------------------------------------------------------- pure pieces


def test_split_by_tokens_balances_tokens_not_counts():
    lengths = [900, 10, 10, 10, 10, 10, 10, 10, 10, 500, 400]
    shares = split_by_tokens(lengths, 2)
    assert sorted(i for s in shares for i in s) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= 10  # by count it would be 6 vs 5 examples, 1.4k vs 500
    assert all(s == sorted(s) for s in shares)  # each share keeps the step's order
    assert split_by_tokens(lengths, 2) == shares  # deterministic
    assert all(split_by_tokens(lengths, 4))  # no empty share while items >= parts
    assert split_by_tokens(lengths, 1) == [list(range(len(lengths)))]


def test_count_micro_batches_matches_micro_batches():
    exs = [{"input_ids": [1] * n, "labels": [1] * n} for n in (5, 9, 3, 12, 7, 1)]
    lengths = [len(e["input_ids"]) for e in exs]
    for packing in (True, False):
        got = count_micro_batches(lengths, packing, 4, 16)
        assert got == len(micro_batches(exs, packing, 4, 16, 0))
    assert count_micro_batches(lengths, True, 4, 16) == len(pack_greedy(lengths, 16))
    assert trained_tokens({"labels": [-100, -100, 3, 4]}) == 2


def test_torchrun_command_and_nproc_stripping():
    cmd = torchrun_command(4, ["run", "--config", "c.json"], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                   "-m", "trainer_core", "run", "--config", "c.json"]
    multi = torchrun_command(8, ["run"], python="py", nnodes=2, rdzv_endpoint="h:29500",
                             rdzv_id="job1")
    assert "--nnodes=2" in multi and "--rdzv-endpoint=h:29500" in multi
    assert "--standalone" not in multi
    assert without_nproc(["run", "--nproc", "2", "--gpus=3", "-q", "--max-steps", "5"]) == [
        "run", "-q", "--max-steps", "5"]


def test_optimizer_state_formats_round_trip():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    opt = torch.optim.AdamW([{"params": [model[0].weight]},
                             {"params": [model[0].bias, *model[1].parameters()]}])
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    positional = opt.state_dict()
    names = ["0.weight", "0.bias", "1.weight", "1.bias"]
    named = named_optimizer_state(positional, names)
    assert set(named["state"]) == set(names)
    back = positional_optimizer_state(named)
    assert back["param_groups"] == positional["param_groups"]
    for i, st in positional["state"].items():
        assert torch.equal(back["state"][i]["exp_avg"], st["exp_avg"])


def test_world_size_is_recorded_but_never_blocks_a_resume():
    from trainer_core.train.checkpoint import check_resume, resume_differences

    old = {"world_size": 2, "learning_rate": 0.003}
    assert resume_differences(old, {"world_size": 1, "learning_rate": 0.003}) == []
    assert check_resume(old, {"world_size": 4, "learning_rate": 0.003}) == []
    with pytest.raises(Exception, match="learning_rate: 0.003 -> 0.001"):
        check_resume(old, {"world_size": 1, "learning_rate": 0.001})


def test_a_repeated_signal_is_one_request_only_under_several_processes():
    from trainer_core.train.signals import RunInterrupted, StopRequested

    several = StopRequested(deferred=True, repeat_window_s=1.0)
    several._handle(signal.SIGINT, None)
    several._handle(signal.SIGTERM, None)  # torchrun forwarding the same Ctrl-C
    assert several.signal == signal.SIGINT
    several._at -= 2.0  # a second Ctrl-C, later: stop now
    with pytest.raises(RunInterrupted):
        several._handle(signal.SIGINT, None)
    one = StopRequested(deferred=True)  # one process: a double Ctrl-C stops at once
    one._handle(signal.SIGINT, None)
    with pytest.raises(RunInterrupted):
        one._handle(signal.SIGINT, None)


# --------------------------------------------------------------------------- torchrun, gloo


STEPS = 12


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, sample_rows) -> Path:
    path = tmp_path_factory.mktemp("dist-data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sample_rows[:48]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("dist-cache")
    # torchrun's defaults would be 1 thread per process anyway; say it for the 1-process run.
    return {**os.environ, "TRAINER_CACHE": str(cache), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out),
            "--profile", "plain_sft", "--batch-size", "4", "--grad-accum", "2",
            "--learning-rate", "0.003", "--max-steps", str(STEPS), "--save-steps", "4",
            "--set", "hyperparams.save_total_limit=null", "--set", "environment.logging_steps=1",
            "--set", "data.validation_split=0.1", "--set", "hyperparams.eval_steps=4",
            "--set", "monitoring.num_preview_samples=2", "--set", "monitoring.preview_steps=0",
            "--set", "monitoring.max_new_tokens=4", "--quiet", *extra]


def _trainer(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer_core", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"timed out:\n{out}")
    return out


def _metrics(out: Path) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines) if "loss" in m}


def _max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def single(tmp_path_factory, micro_model_dir, data_file, env) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    proc = _trainer(_args(micro_model_dir, data_file, out), env)
    text = _finish(proc)
    assert proc.returncode == 0, text
    return out


@pytest.fixture(scope="module")
def ddp2(tmp_path_factory, micro_model_dir, data_file, env) -> Path:
    out = tmp_path_factory.mktemp("ddp2") / "run"
    proc = _trainer(_args(micro_model_dir, data_file, out, "--nproc", "2"), env)
    text = _finish(proc)
    assert proc.returncode == 0, text
    assert "running: torchrun --standalone --nproc-per-node=2" in text
    return out


def _assert_same_training(single: Path, multi: Path) -> None:
    a, b = _metrics(single), _metrics(multi)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))  # one line per step: rank 0 only
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5, step
        assert a[step]["tokens_trained"] == b[step]["tokens_trained"]
    evals_a = [m["eval_loss"] for m in a.values() if "eval_loss" in m]
    evals_b = [m["eval_loss"] for m in b.values() if "eval_loss" in m]
    assert len(evals_a) == len(evals_b) == 3
    assert max(abs(x - y) for x, y in zip(evals_a, evals_b, strict=True)) <= 1e-5
    assert _max_weight_diff(single, multi) <= 1e-5


@pytest.mark.slow
def test_two_ddp_processes_train_like_one(single, ddp2):
    _assert_same_training(single, ddp2)
    run = json.loads((ddp2 / "run.json").read_text())
    assert run["state"] == "completed"
    status = json.loads((ddp2 / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == STEPS
    assert (ddp2 / "previews.jsonl").exists()  # rank 0 generated them from its replica
    ckpt_state = json.loads((ddp2 / "checkpoints" / "step-000004" / "trainer_state.json")
                            .read_text())
    assert ckpt_state["world_size"] == 2


@pytest.mark.slow
def test_two_fsdp_processes_train_like_one(single, tmp_path, micro_model_dir, data_file, env):
    out = tmp_path / "fsdp"
    proc = _trainer(_args(micro_model_dir, data_file, out, "--nproc", "2",
                          "--set", "environment.distributed=fsdp"), env)
    text = _finish(proc)
    assert proc.returncode == 0, text
    _assert_same_training(single, out)


@pytest.mark.slow
def test_sigterm_then_resume_under_two_processes_equals_uninterrupted(
        ddp2, tmp_path, micro_model_dir, data_file, env):
    out = tmp_path / "stopped"
    proc = _trainer(_args(micro_model_dir, data_file, out, "--nproc", "2"), env)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-000004").exists():
        assert proc.poll() is None and time.time() < deadline, _finish(proc)
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # the launcher forwards it to torchrun, torchrun to ranks
    text = _finish(proc, 120)
    assert proc.returncode != 0, text
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted", text
    stopped_at = status["step"]
    assert 4 <= stopped_at < STEPS
    assert (out / "checkpoints" / f"step-{stopped_at:06d}").is_dir()
    assert not (out / "model.safetensors").exists()

    # Resume under FSDP: the checkpoint format is the same for both strategies.
    resumed = _trainer(_args(micro_model_dir, data_file, out, "--nproc", "2", "--resume",
                             "--set", "environment.distributed=fsdp"), env)
    text = _finish(resumed)
    assert resumed.returncode == 0, text
    assert _max_weight_diff(ddp2, out) <= 1e-5
    a, b = _metrics(ddp2), _metrics(out)
    assert abs(a[STEPS]["lr"] - b[STEPS]["lr"]) < 1e-12
    assert abs(a[STEPS]["loss"] - b[STEPS]["loss"]) <= 1e-5


@pytest.mark.slow
def test_single_process_checkpoint_resumes_under_two_processes(single, tmp_path, micro_model_dir,
                                                               data_file, env):
    out = tmp_path / "from-single"
    ckpt = single / "checkpoints" / "step-000004"
    assert json.loads((ckpt / "trainer_state.json").read_text()).get("world_size", 1) == 1
    proc = _trainer(_args(micro_model_dir, data_file, out, "--nproc", "2",
                          "--resume-from", str(ckpt)), env)
    text = _finish(proc)
    assert proc.returncode == 0, text
    assert "written by 1 process(es), in 2" in text
    a, b = _metrics(single), _metrics(out)
    assert sorted(b) == list(range(5, STEPS + 1))  # the data position carried over
    for step in b:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5, step
        assert abs(a[step]["lr"] - b[step]["lr"]) < 1e-12, step
    assert _max_weight_diff(single, out) <= 1e-5


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.slow
def test_killed_rank_brings_the_other_down_promptly(tmp_path, micro_model_dir, data_file, env):
    out = tmp_path / "killed"
    cmd = torchrun_command(2, _args(micro_model_dir, data_file, out, "--max-steps", "100000",
                                    "--save-steps", "0"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    status = out / "status.json"
    deadline = time.time() + 240
    while not (status.exists() and json.loads(status.read_text()).get("step", 0) >= 2):
        assert proc.poll() is None and time.time() < deadline, _finish(proc)
        time.sleep(0.05)
    ranks = {_rank_of(p): p for p in _children(proc.pid)}
    assert set(ranks) >= {0, 1}, ranks
    killed_at = time.time()
    os.kill(ranks[1], signal.SIGKILL)
    text = _finish(proc, 60)
    took = time.time() - killed_at
    assert proc.returncode != 0, text
    assert took < 20, f"the job took {took:.1f} s to end after a rank died"
    with pytest.raises(ProcessLookupError):
        os.kill(ranks[0], 0)
    final = json.loads(status.read_text())
    assert final["state"] == "failed", final
