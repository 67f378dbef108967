"""Daemon training goes through the shared loop (train/loop.py): a daemon file produces the same
run events as `trainer run`, plugin listeners (`run_listeners`) and alerts hear them, the
protocol's progress and checkpoint messages are those events, and a step left running is read
after the next one is launched. The worker runs in this process, fed commands by the test."""

from __future__ import annotations

import io
import json

import attrs

from trainer_core import hookimpl
from trainer_core.config import resolve
from trainer_core.daemon import protocol
from trainer_core.monitor.events import RunListener
from trainer_core.train.recipe import run_training


class Recorder(RunListener):
    def __init__(self):
        self.events: list[tuple[str, object]] = []
        self.closed = 0

    def on_start(self, e):
        self.events.append(("start", e))

    def on_step_end(self, e):
        self.events.append(("step_end", e))

    def on_evaluation(self, e):
        self.events.append(("evaluation", e))

    def on_preview(self, e):
        self.events.append(("preview", e))

    def on_checkpoint(self, e):
        self.events.append(("checkpoint", e))

    def on_alert(self, e):
        self.events.append(("alert", e))

    def on_end(self, e):
        self.events.append(("end", e))

    def close(self):
        self.closed += 1


def _plugin(trainer_plugin, seen):
    """A plugin whose ``run_listeners`` hook returns a new recorder per run (per daemon file)."""

    class RecorderPlugin:
        @hookimpl
        def run_listeners(self, config, output_dir):
            rec = Recorder()
            seen.append((output_dir, rec))
            return [rec]

    trainer_plugin(RecorderPlugin())


def _worker(home, monkeypatch):
    """A worker in this process (commands from ``worker.inbox``), loaded, base checkpointed."""
    from trainer_core.daemon.home import Home
    from trainer_core.daemon.worker import Worker

    monkeypatch.setattr(Worker, "_read_stdin", lambda self: None)
    out = io.StringIO()
    worker = Worker(Home(home), out)
    worker.load(resolve(file=worker.home.config).config)
    worker.init()
    return worker, out


def _job(worker, path, file_id, tmp_path):
    start = json.loads(worker.out.getvalue().splitlines()[-1])["checkpoint"]
    return protocol.TrainCommand(file_id=file_id, attempt=1, name=path.name, path=str(path),
                                 start_from=start, seed=file_id,
                                 problems_path=str(tmp_path / f"{file_id}.problems.json"))


def _messages(out, name):
    return [m for m in map(json.loads, out.getvalue().splitlines()) if m["event"] == name]


def test_a_daemon_file_emits_the_run_events_of_trainer_run(tmp_path, monkeypatch, du,
                                                           micro_model_dir, sample_rows,
                                                           trainer_plugin):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    seen: list = []
    _plugin(trainer_plugin, seen)
    data = du.write_jsonl(tmp_path / "data" / "a.jsonl", sample_rows[:8])  # 4 steps of 2 rows
    # trainer run on the same rows, saving every 2 steps
    run_training(resolve(cli={
        "model.path": str(micro_model_dir), "data.dataset": str(data),
        "output.output_dir": str(tmp_path / "run"), "hyperparams.batch_size": 2,
        "hyperparams.max_length": 512, "hyperparams.save_steps": 2,
        "data.validation_split": 0.0, "monitoring.num_preview_samples": 0,
        "environment.device": "cpu"}), quiet=True)
    (_, cli_rec), = seen
    seen.clear()

    home = du.make_home(tmp_path / "home", micro_model_dir, **{"daemon.save_steps": 2})
    worker, out = _worker(home, monkeypatch)
    second = du.write_jsonl(tmp_path / "data" / "b.jsonl", sample_rows[8:16])
    assert worker.train(_job(worker, data, 1, tmp_path))
    assert worker.train(_job(worker, second, 2, tmp_path))

    assert [d for d, _ in seen] == [home, home]  # one run per file, in the daemon's home
    first, then = (rec for _, rec in seen)
    def kinds(rec):  # (alerts come and go with the wall clock: throughput)
        return [k for k, _ in rec.events if k != "alert"]

    assert kinds(cli_rec) == ["start", "step_end", "step_end", "checkpoint", "step_end",
                              "step_end", "end"]
    assert kinds(first) == kinds(cli_rec) == kinds(then)
    assert first.closed == then.closed == 1
    # the global step goes on from file to file
    start = then.events[0][1]
    assert (start.start_step, start.total_steps, start.resumed) == (4, 8, False)
    steps = [e for k, e in first.events + then.events if k == "step_end"]
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [s.step for s in steps[:4]] == [e.step for k, e in cli_rec.events if k == "step_end"]
    # the protocol's progress and checkpoint messages are those events
    progress = _messages(out, "progress")
    assert [(p["step"], p["loss"], p["lr"]) for p in progress] == [
        (s.step, s.loss, s.lr) for s in steps]
    assert [p["file_step"] for p in progress] == [1, 2, 3, 4] * 2
    checkpoints = [e for k, e in first.events + then.events if k == "checkpoint"]
    assert [(c["step"], c["checkpoint"]) for c in _messages(out, "checkpoint")] == [
        (c.step, c.path) for c in checkpoints] and [c.step for c in checkpoints] == [2, 6]
    done = _messages(out, "done")
    ends = [e for k, e in first.events + then.events if k == "end"]
    assert [e.state for e in ends] == ["completed", "completed"]
    assert [e.summary["steps_done"] for e in ends] == [d["step"] for d in done] == [4, 8]
    assert [e.summary["tokens"] for e in ends] == [d["tokens"] for d in done]


def test_a_non_finite_daemon_step_reaches_alerts_and_fails_the_file(
        tmp_path, monkeypatch, du, micro_model_dir, sample_rows, trainer_plugin, alter_steps):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    seen: list = []
    _plugin(trainer_plugin, seen)
    home = du.make_home(tmp_path / "home", micro_model_dir)
    worker, out = _worker(home, monkeypatch)
    alter_steps(lambda n, loss, grad: (float("nan"), grad) if n == 2 else (loss, grad))
    data = du.write_jsonl(tmp_path / "a.jsonl", sample_rows[:8])
    assert worker.train(_job(worker, data, 1, tmp_path))
    (_, rec), = seen
    assert [k for k, _ in rec.events] == ["start", "step_end", "alert", "end"]
    alert = rec.events[2][1]
    assert (alert.name, alert.state, alert.step) == ("non_finite", "raised", 2)
    end = rec.events[-1][1]
    failed, = _messages(out, "failed")
    assert end.state == "failed" and end.reason == failed["error"]
    assert "at file step 2 (global step 2); model rolled back" in failed["error"]
    assert any("non_finite" in m["message"] for m in _messages(out, "log"))  # the daemon's log
    assert worker.at is None  # the next file reloads its checkpoint


def test_daemon_steps_overlap_where_nothing_looks_at_the_model(
        tmp_path, monkeypatch, du, micro_model_dir, sample_rows):
    """As on a GPU replaying whole-step graphs: step k is read after step k + 1 is launched,
    except before a checkpoint (daemon.save_steps) and at the end of the file."""
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    from trainer_core.train import loop

    home = du.make_home(tmp_path / "home", micro_model_dir, **{"daemon.save_steps": 3})
    worker, out = _worker(home, monkeypatch)
    events: list[tuple[str, int]] = []
    real = loop.launch_step

    def launch(*args, **kwargs):
        index = sum(kind == "launch" for kind, _ in events)
        events.append(("launch", index))
        step = real(*args, **kwargs)
        inner = step.wait

        def wait():
            events.append(("read", index))
            return inner()

        return attrs.evolve(step, wait=wait, running=True)

    monkeypatch.setattr(loop, "launch_step", launch)
    monkeypatch.setattr(loop, "runs_ahead", lambda *a: True)
    data = du.write_jsonl(tmp_path / "a.jsonl", sample_rows[:12])  # 6 steps
    assert worker.train(_job(worker, data, 1, tmp_path))
    order = {e: i for i, e in enumerate(events)}
    assert [i for kind, i in events if kind == "read"] == list(range(6))
    for k in range(5):  # step index k is file step k + 1
        read_first = order[("read", k)] < order[("launch", k + 1)]
        assert read_first == (k + 1 == 3), k
    assert [p["file_step"] for p in _messages(out, "progress")] == [1, 2, 3, 4, 5, 6]
    assert [c["step"] for c in _messages(out, "checkpoint")] == [3]
    assert _messages(out, "done")[0]["file_step"] == 6
