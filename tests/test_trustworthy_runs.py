"""Issue 14: output directories are exclusive and never silently reused, resume is honest,
checkpoints are safe to load, and failures end as recorded failures.

Each test reproduces one bullet of the issue and asserts the exit code, the message and that
nothing was lost. Runs are a few steps of the micro model (tests/conftest.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer_core import hookimpl
from trainer_core.cli import cli
from trainer_core.monitor.events import RunListener, StepEnd
from trainer_core.testing import registered_plugin
from trainer_core.train.checkpoint import list_checkpoints
from trainer_core.train.rundir import RunDirLock, inspect_run_dir


def run_args(model_dir, data, out, *extra):
    args = ["run", "--model", str(model_dir), "--dataset", str(data), "--profile", "plain_sft",
            "--batch-size", "4", "--learning-rate", "0.003", "--max-length", "1024",
            "--set", "hyperparams.warmup_steps=0", "--set", "monitoring.num_preview_samples=0",
            "--set", "environment.logging_steps=1", "--set", "data.validation_split=0",
            "--set", "hyperparams.eval_steps=0", "--quiet", *extra]
    if out is not None:
        args[1:1] = ["--output-dir", str(out)]
    return args


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(result, code):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metric_steps(out: Path) -> list[int]:
    """The steps of metrics.jsonl's step records (an alert, e.g. a slow window on a loaded
    machine, is a line of its own)."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if "loss" in r]


def read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))


class _SignalAt(RunListener):
    """Sends this process ``sig`` when step ``at`` ends (like Ctrl-C or SIGTERM mid-run)."""

    def __init__(self, at: int, sig: int, times: int = 1):
        self.at, self.sig, self.times = at, sig, times

    def on_step_end(self, event: StepEnd) -> None:
        if event.step == self.at:
            for _ in range(self.times):
                signal.raise_signal(self.sig)


class _InterruptPlugin:
    def __init__(self, at: int, sig: int = signal.SIGTERM, times: int = 1):
        self.listener = _SignalAt(at, sig, times)

    @hookimpl
    def run_listeners(self, config, output_dir):
        return [self.listener]


@pytest.fixture
def interrupted_run(micro_model_dir, small_jsonl, tmp_path):
    """A run of 8 steps (checkpoint every 2) stopped by SIGTERM after step 5."""
    out = tmp_path / "run"
    with registered_plugin(_InterruptPlugin(5), "interrupt"):
        result = invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "8",
                                 "--save-steps", "2"))
    assert result.exit_code == 1, result.output
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004",
                                                       "step-000005"]
    return out, result


# --------------------------------------------------------------------------- exclusive directories


def test_a_locked_directory_is_refused_naming_the_pid(micro_model_dir, small_jsonl, tmp_path):
    out = tmp_path / "run"
    with RunDirLock(out):
        assert inspect_run_dir(out).kind == "locked"
        line = one_error_line(invoke(run_args(micro_model_dir, small_jsonl, out,
                                              "--max-steps", "1")), 2)
    assert f"in use by another trainer run (pid {os.getpid()})" in line
    assert sorted(p.name for p in out.iterdir()) == [".trainer-run.lock"]
    assert inspect_run_dir(out).kind == "empty"  # the lock died with its holder


def _spawn(args, env):
    return subprocess.Popen([sys.executable, "-m", "trainer_core.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_concurrent_runs_into_one_directory(micro_model_dir, small_jsonl, tmp_path):
    env = {**os.environ, "TRAINER_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    first = _spawn(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "40"), env)
    deadline = time.time() + 240
    while not (out / "status.json").exists():
        assert first.poll() is None and time.time() < deadline, first.stdout.read()
        time.sleep(0.05)
    second = invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "3"))
    line = one_error_line(second, 2)
    assert f"pid {first.pid}" in line
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    # the first run's results are whole: its steps once each, its model, completed
    assert metric_steps(out) == list(range(1, 41))
    assert read(out, "run.json")["state"] == "completed"
    assert read(out, "run.json")["steps_done"] == 40
    assert (out / "model.safetensors").exists()


def test_rerun_into_a_finished_save_steps_0_directory(micro_model_dir, small_jsonl, tmp_path):
    out = tmp_path / "run"
    first = invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "3",
                            "--save-steps", "0"))
    assert first.exit_code == 0, first.output
    model_hash, metrics = sha(out / "model.safetensors"), (out / "metrics.jsonl").read_text()
    again = invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "2"))
    line = one_error_line(again, 2)
    assert "already holds a completed run" in line
    for way_out in ("--resume", "--overwrite", "--output-dir"):
        assert way_out in line
    assert sha(out / "model.safetensors") == model_hash
    assert (out / "metrics.jsonl").read_text() == metrics
    # resuming a completed run is refused too: it would train again
    resumed = one_error_line(invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps",
                                             "3", "--resume")), 2)
    assert "completed run; there is nothing to resume" in resumed
    # --overwrite replaces it explicitly
    replaced = invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "2",
                               "--overwrite"))
    assert replaced.exit_code == 0, replaced.output
    assert metric_steps(out) == [1, 2]
    assert read(out, "run.json")["steps_done"] == 2


def test_a_non_run_directory_is_refused(micro_model_dir, small_jsonl, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    line = one_error_line(invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "1")),
                          2)
    assert "not empty and holds no trainer run" in line and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_bad_data_found_during_preprocessing_leaves_the_directory_reusable(
        micro_model_dir, small_jsonl, tmp_path):
    out = tmp_path / "run"
    rows = small_jsonl.read_text().splitlines()
    bad = json.loads(rows[0])
    bad["messages"][-1]["content"] += "<|im_end|>"
    small_jsonl.write_text("\n".join([json.dumps(bad), *rows[1:]]) + "\n")
    line = one_error_line(invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "1")),
                          2)
    assert "control token" in line or "control tokens" in line
    assert not out.exists()  # nothing left behind: fixing the data and rerunning just works


# --------------------------------------------------------------------------- interruption, resume


def test_interrupted_run_resumes_as_the_hint_says(interrupted_run, micro_model_dir, small_jsonl):
    out, result = interrupted_run
    line = one_error_line(result, 1)
    assert "stopped by signal 15 at step 5; checkpoint saved" in line
    assert line.endswith("continue with the same command plus --resume.")
    assert read(out, "status.json")["state"] == "interrupted"
    assert read(out, "run.json")["state"] == "interrupted"
    # without --resume the directory is not reused
    refused = one_error_line(invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps",
                                             "8", "--save-steps", "2")), 2)
    assert "already holds an interrupted run (3 checkpoints)" in refused
    resumed = invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "8",
                              "--save-steps", "2", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert metric_steps(out) == list(range(1, 9))  # never a step twice
    manifest = read(out, "run.json")
    assert manifest["state"] == "completed" and manifest["steps_done"] == 8
    segments = [(s["start_step"], s["end_step"]) for s in manifest["segments"]]
    assert segments == [(0, 5), (5, 8)]
    trained = sum(s["train_time_s"] for s in manifest["segments"])
    assert manifest["train_time_s"] == pytest.approx(trained, abs=0.05)
    assert manifest["tokens_per_s"] == pytest.approx(manifest["tokens_seen"] / trained, rel=0.05)


def test_a_signal_during_a_running_step_stops_after_it_and_resumes_exactly(
        micro_model_dir, small_jsonl, tmp_path, monkeypatch):
    """On a GPU, step k is read while step k+1 already runs (whole-step CUDA graphs): a
    signal seen then stops the run after step k+1, saved there, and resuming gives the
    uninterrupted run."""
    import attrs
    from safetensors.torch import load_file

    from trainer_core.train import loop

    real = loop.launch_step
    # as a GPU replay would be (on the CPU every step is finished at launch)
    monkeypatch.setattr(loop, "launch_step",
                        lambda *a, **k: attrs.evolve(real(*a, **k), running=True))
    monkeypatch.setattr(loop, "runs_ahead", lambda *a: True)
    out, straight = tmp_path / "run", tmp_path / "straight"
    args = ("--max-steps", "8", "--save-steps", "3", "--set", "hyperparams.save_total_limit=null")
    assert invoke(run_args(micro_model_dir, small_jsonl, straight, *args)).exit_code == 0
    with registered_plugin(_InterruptPlugin(4), "interrupt"):
        result = invoke(run_args(micro_model_dir, small_jsonl, out, *args))
    assert "stopped by signal 15 at step 5; checkpoint saved" in one_error_line(result, 1)
    assert [p.name for p in list_checkpoints(out)] == ["step-000003", "step-000005"]
    resumed = invoke(run_args(micro_model_dir, small_jsonl, out, *args, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert metric_steps(out) == list(range(1, 9))
    a, b = load_file(out / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(bool((a[k] == b[k]).all()) for k in a)


def test_resume_without_output_dir_picks_the_newest_run(micro_model_dir, small_jsonl, tmp_path,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    with registered_plugin(_InterruptPlugin(2), "interrupt"):
        first = invoke(run_args(micro_model_dir, small_jsonl, None, "--max-steps", "4"))
    line = one_error_line(first, 1)
    hint = re.search(r"plus (--resume --output-dir \S+)\.$", line)
    assert hint, line  # a default directory is named, so the hint works from anywhere
    run_dir = Path(hint.group(1).split()[-1])
    assert run_dir.parent == Path("runs")
    assert os.readlink("runs/latest") == run_dir.name
    resumed = invoke(run_args(micro_model_dir, small_jsonl, None, "--max-steps", "4",
                              "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert f"--resume: continuing {run_dir}" in resumed.stderr
    assert metric_steps(run_dir) == [1, 2, 3, 4]
    # nothing left to resume now: the candidates are listed
    none_left = one_error_line(invoke(run_args(micro_model_dir, small_jsonl, None, "--max-steps",
                                               "4", "--resume")), 2)
    assert "no resumable plain_sft run under runs/" in none_left
    assert f"{run_dir} (a completed run" in none_left


def test_double_ctrl_c_ends_interrupted(micro_model_dir, small_jsonl, tmp_path):
    out = tmp_path / "run"
    with registered_plugin(_InterruptPlugin(2, signal.SIGINT, times=2), "interrupt"):
        result = invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "6"))
    line = one_error_line(result, 1)
    assert "interrupted by signal 2" in line
    assert read(out, "status.json")["state"] == "interrupted"
    assert read(out, "run.json")["state"] == "interrupted"


def test_sigterm_during_preprocessing(micro_model_dir, small_jsonl, tmp_path, monkeypatch):
    import trainer_core.train.inputs as inputs

    real = inputs.prepare_examples

    def slow_prepare(*args, **kw):
        signal.raise_signal(signal.SIGTERM)
        return real(*args, **kw)

    monkeypatch.setattr("trainer_core.train.recipe.prepare_examples", slow_prepare)
    out = tmp_path / "run"
    line = one_error_line(invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "2")),
                          1)
    assert "interrupted by signal 15" in line
    assert read(out, "status.json")["state"] == "interrupted"
    assert read(out, "run.json")["state"] == "interrupted"


def test_truncated_newest_checkpoint_falls_back(interrupted_run, micro_model_dir, small_jsonl):
    out, _ = interrupted_run
    weights = out / "checkpoints" / "step-000005" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    resumed = invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "8",
                              "--save-steps", "2", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "checkpoint step-000005 is unreadable" in resumed.stderr
    assert "falling back to step-000004" in resumed.stderr
    assert metric_steps(out) == list(range(1, 9))
    assert read(out, "run.json")["resumed_from"].endswith("step-000004")


def test_max_steps_below_the_checkpoint_is_an_error(interrupted_run, micro_model_dir,
                                                    small_jsonl):
    out, _ = interrupted_run
    line = one_error_line(invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "3",
                                          "--save-steps", "2", "--resume")), 2)
    assert "step-000005 is at step 5 but this run has only 3 steps" in line
    assert read(out, "run.json")["state"] == "interrupted"  # a refused resume changes nothing


@pytest.mark.slow
def test_kill_9_during_the_first_checkpoint_write_then_resume(micro_model_dir, small_jsonl,
                                                             tmp_path):
    """A real SIGKILL in the middle of writing the first checkpoint (after its weights)."""
    out = tmp_path / "run"
    args = run_args(micro_model_dir, small_jsonl, out, "--max-steps", "4", "--save-steps", "2")
    code = ("import os, signal, torch, sys\n"
            "import trainer_core.train.checkpoint as c\n"
            "real = torch.save\n"
            "def dying_save(obj, f, *a, **k):\n"
            "    real(obj, f, *a, **k)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "c.torch.save = dying_save\n"
            "from trainer_core.cli import main\n"
            f"sys.argv = ['trainer', *{[str(a) for a in args]!r}]\n"
            "main()\n")
    env = {**os.environ, "TRAINER_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    leftovers = [p.name for p in (out / "checkpoints").iterdir()]
    assert leftovers == [".tmp-step-000002"] and not list_checkpoints(out)
    assert inspect_run_dir(out).state == "stopped"
    resumed = invoke([*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "no complete checkpoint" in resumed.stderr and "from step 0" in resumed.stderr
    assert not any(p.name.startswith(".tmp") for p in (out / "checkpoints").iterdir())
    assert metric_steps(out) == [1, 2, 3, 4]
    assert read(out, "run.json")["state"] == "completed"


def test_leftover_tmp_checkpoint_is_cleaned_and_ignored(interrupted_run, micro_model_dir,
                                                        small_jsonl):
    out, _ = interrupted_run
    junk = out / "checkpoints" / ".tmp-step-000006"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"")
    resumed = invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "8",
                              "--save-steps", "2", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert not junk.exists()
    assert read(out, "run.json")["resumed_from"].endswith("step-000005")


# --------------------------------------------------------------------------- honest resume


def test_resume_with_a_changed_learning_rate(interrupted_run, micro_model_dir, small_jsonl):
    out, _ = interrupted_run
    base = ["--max-steps", "8", "--save-steps", "2", "--resume", "--set",
            "hyperparams.lr_scheduler=constant"]
    # the interrupted run used the cosine schedule: a constant one is a schedule change too
    changed = run_args(micro_model_dir, small_jsonl, out, *base, "--learning-rate", "0.01")
    line = one_error_line(invoke(changed), 2)
    assert "learning_rate: 0.003 -> 0.01" in line
    assert "lr_scheduler: \"cosine\" -> \"constant\"" in line
    assert "--allow-changes lr,schedule" in line
    assert read(out, "run.json")["state"] == "interrupted"
    accepted = invoke([*changed, "--allow-changes", "lr,schedule"])
    assert accepted.exit_code == 0, accepted.output
    lrs = {json.loads(x)["step"]: json.loads(x)["lr"]
           for x in (out / "metrics.jsonl").read_text().splitlines()}
    # the new value is the one used, not just the one recorded
    assert lrs[6] == lrs[7] == lrs[8] == pytest.approx(0.01)
    assert lrs[5] != pytest.approx(0.01)
    manifest = read(out, "run.json")
    assert "learning_rate: 0.003 -> 0.01" in manifest["accepted_changes"]
    assert read(out, "trainer_config.json")["hyperparams"]["learning_rate"] == 0.01


def test_resume_with_a_changed_dataset_or_profile(interrupted_run, micro_model_dir, small_jsonl,
                                                  tmp_path):
    out, _ = interrupted_run
    other = tmp_path / "other.jsonl"
    other.write_text("".join(small_jsonl.read_text().splitlines(keepends=True)[:40]))
    line = one_error_line(invoke(run_args(micro_model_dir, other, out, "--max-steps", "8",
                                          "--save-steps", "2", "--resume")), 2)
    assert "dataset_sha256: " in line and "--allow-changes data" in line
    args = run_args(micro_model_dir, small_jsonl, out, "--max-steps", "8", "--save-steps", "2",
                    "--resume", "--set", "profile.options.system_prompt=Be brief.")
    line = one_error_line(invoke(args), 2)
    assert 'profile.options.system_prompt: "" -> "Be brief."' in line
    assert "--allow-changes profile" in line
    assert [p.name for p in list_checkpoints(out)][-1] == "step-000005"


# --------------------------------------------------------------------------- safe checkpoints


def test_a_crafted_training_state_is_never_unpickled(interrupted_run, micro_model_dir,
                                                     small_jsonl, tmp_path):
    import torch

    out, _ = interrupted_run
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = out / "checkpoints" / "step-000005"
    torch.save({"optimizer": Exploit(), "scheduler": {}, "rng": {}}, ckpt / "training_state.pt")
    line = one_error_line(invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "8",
                                          "--save-steps", "2", "--resume")), 2)
    assert "training_state.pt: refused to load" in line
    assert not marker.exists()


def test_a_checkpoint_with_a_tensor_removed_is_an_error(interrupted_run, micro_model_dir,
                                                        small_jsonl):
    from safetensors.torch import load_file, save_file

    out, _ = interrupted_run
    path = out / "checkpoints" / "step-000005" / "model.safetensors"
    weights = load_file(path)
    removed = "model.layers.0.mlp.down_proj.weight"
    del weights[removed]
    save_file(weights, path, metadata={"format": "pt"})
    line = one_error_line(invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "8",
                                          "--save-steps", "2", "--resume")), 2)
    assert "does not match the model: missing 1 tensor(s): " + removed in line


def test_checkpoint_records_what_shaped_the_run(interrupted_run):
    out, _ = interrupted_run
    facts = json.loads((out / "checkpoints" / "step-000005" / "run_facts.json").read_text())
    assert facts["world_size"] == 1
    assert facts["learning_rate"] == 0.003 and facts["total_steps"] == 8
    assert facts["profile"]["name"] == "plain_sft" and len(facts["dataset_sha256"]) == 64
    assert len(facts["tokenizer"]) == 64


# --------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("background", ["off", "on"])
def test_disk_full_while_checkpointing(micro_model_dir, small_jsonl, tmp_path, monkeypatch,
                                       background):
    """The same outcome whether the checkpoint is written in the loop or in a background
    thread (environment.async_checkpoint, the CUDA default)."""
    import torch

    import trainer_core.train.checkpoint as ckpt

    real = torch.save
    calls = []

    def full_disk(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: write a little, then the disk is full
            Path(f).write_bytes(b"")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    out = tmp_path / "run"
    line = one_error_line(invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "6",
                                          "--save-steps", "2", "--set",
                                          f"environment.async_checkpoint={background}")), 1)
    assert "cannot write the checkpoint of step 4: No space left on device" in line
    assert read(out, "status.json")["state"] == "failed"
    assert read(out, "run.json")["state"] == "failed"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert not (out / "model.safetensors").exists()
    empty = [p for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0
             and p.name != ".trainer-run.lock"]
    assert empty == []


def test_disk_full_while_writing_the_lock(micro_model_dir, small_jsonl, tmp_path, monkeypatch):
    real_write = os.write

    def full(fd, data):
        if data.strip().isdigit():  # the pid written into the run lock
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    out = tmp_path / "run"
    line = one_error_line(invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "1")),
                          1)
    assert "cannot write the run lock" in line and "No space left on device" in line
    assert not (out / "model.safetensors").exists()


def test_inspect_run_dir_classifies_directories(interrupted_run, tmp_path):
    """The state detection the daemon reuses: what each kind of directory is."""
    from trainer_core.train.rundir import find_resumable_runs

    out, _ = interrupted_run
    info = inspect_run_dir(out)
    assert (info.kind, info.state, info.resumable, info.completed) == (
        "run", "interrupted", True, False)
    assert info.profile == "plain_sft" and len(info.checkpoints) == 3
    assert inspect_run_dir(tmp_path / "nothing").kind == "missing"
    (tmp_path / "empty").mkdir()
    assert inspect_run_dir(tmp_path / "empty").kind == "empty"
    assert inspect_run_dir(tmp_path).kind == "foreign"  # train.jsonl, cache...
    # a run whose process died without recording an end: "stopped", still resumable
    status = json.loads((out / "status.json").read_text())
    (out / "status.json").write_text(json.dumps({**status, "state": "running"}))
    manifest = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**manifest, "state": "running"}))
    assert inspect_run_dir(out).state == "stopped" and inspect_run_dir(out).resumable
    with RunDirLock(out):
        assert inspect_run_dir(out).kind == "locked"
        assert find_resumable_runs("plain_sft", root=tmp_path) == []
    assert [i.path for i in find_resumable_runs("plain_sft", root=tmp_path)] == [out]


def test_background_checkpoints_equal_synchronous_ones(micro_model_dir, small_jsonl, tmp_path,
                                                        monkeypatch):
    """Checkpoints written in a thread hold exactly what the loop would have written at that
    step (training goes on meanwhile)."""
    from safetensors.torch import load_file

    import trainer_core.train.checkpoint as ckpt

    started = []
    real_start = ckpt.BackgroundCheckpoint.start

    def start(self, output_dir, step, *args, **kwargs):
        started.append(step)
        return real_start(self, output_dir, step, *args, **kwargs)

    monkeypatch.setattr(ckpt.BackgroundCheckpoint, "start", start)
    runs = {}
    for background in ("off", "on"):
        out = tmp_path / background
        result = invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "6",
                                 "--save-steps", "2", "--set",
                                 f"environment.async_checkpoint={background}"))
        assert result.exit_code == 0, result.output
        runs[background] = out
    assert started == [2, 4]  # only the "on" run used the thread
    sync, bg = runs["off"], runs["on"]
    names = [p.name for p in list_checkpoints(sync)]
    assert names == [p.name for p in list_checkpoints(bg)] == ["step-000002", "step-000004"]
    for name in names:
        a = load_file(sync / "checkpoints" / name / "model.safetensors")
        b = load_file(bg / "checkpoints" / name / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch_equal(a[key], b[key]), (name, key)
        ta = json.loads((sync / "checkpoints" / name / "trainer_state.json").read_text())
        tb = json.loads((bg / "checkpoints" / name / "trainer_state.json").read_text())
        assert ta["step"] == tb["step"] and ta["tokens_trained"] == tb["tokens_trained"]
        assert (bg / "checkpoints" / name / "tokenizer_config.json").exists()
    # Every checkpoint was announced (after its step's metrics line).
    events = [json.loads(line) for line in (bg / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e] == [1, 2, 3, 4, 5, 6]
    # The optimizer state, schedule and RNG too: so resuming from either is the same (exact
    # resume from a checkpoint is tested above).
    import torch

    for name in names:
        sa = torch.load(sync / "checkpoints" / name / "training_state.pt", weights_only=True)
        sb = torch.load(bg / "checkpoints" / name / "training_state.pt", weights_only=True)
        assert sa["scheduler"] == sb["scheduler"]
        for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(),
                          strict=True):
            for key in pa:
                assert torch_equal(pa[key], pb[key]), (name, key)
        assert torch_equal(sa["rng"]["torch"], sb["rng"]["torch"])


def test_host_snapshot_reuses_its_buffers_and_keeps_tied_tensors_tied():
    """Background saves copy into the same host memory every time (fresh memory cost a GPU run
    seconds of page faults per checkpoint), with this save's values, tied tensors still one."""
    import torch

    from trainer_core.train.checkpoint import HostSnapshot

    w = torch.arange(6.0).reshape(2, 3)
    tree = {"model": {"embed": w, "head": w, "bias": torch.ones(3)}, "step": 3}
    snap = HostSnapshot()
    first = snap.copy(tree)
    assert first["step"] == 3
    assert first["model"]["embed"] is first["model"]["head"]  # still one tensor: saved as shared
    assert first["model"]["embed"].data_ptr() != w.data_ptr()  # a copy, not the live tensor
    ptrs = {k: t.data_ptr() for k, t in first["model"].items()}
    w.add_(10.0)
    assert torch.equal(first["model"]["embed"], torch.arange(6.0).reshape(2, 3))  # detached
    second = snap.copy(tree)
    assert {k: t.data_ptr() for k, t in second["model"].items()} == ptrs  # no new memory
    assert torch.equal(second["model"]["head"], w)
    tree["model"]["bias"] = torch.ones(4)  # a new shape gets its own buffer
    third = snap.copy(tree)
    assert third["model"]["bias"].shape == (4,) and third["model"]["bias"].data_ptr() != ptrs["bias"]


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
