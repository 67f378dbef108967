"""The run-lifecycle seam: a run's events, their order, and listeners from the hook."""

from __future__ import annotations

import json

from trainer_core import hookimpl
from trainer_core.config import resolve
from trainer_core.monitor.events import RunListener
from trainer_core.train.recipe import run_training


class Recorder(RunListener):
    def __init__(self):
        self.events: list[tuple[str, object]] = []
        self.closed = False

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

    def on_end(self, e):
        self.events.append(("end", e))

    def close(self):
        self.closed = True


def _resolved(model_dir, data, out, **extra):
    cli = {"model.path": str(model_dir), "data.dataset": str(data), "output.output_dir": str(out),
           "profile.name": "plain_sft", "hyperparams.batch_size": 4,
           "hyperparams.max_steps": 4, "hyperparams.save_steps": 2, "hyperparams.eval_steps": 2,
           "monitoring.preview_steps": 4, "monitoring.num_preview_samples": 1,
           "monitoring.max_new_tokens": 4, "environment.logging_steps": 2,
           "data.validation_split": 0.1, **extra}
    return resolve(cli=cli)


def test_events_arrive_in_order_and_match_the_files(micro_model_dir, small_jsonl, tmp_path,
                                                    monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    rec = Recorder()
    summary = run_training(_resolved(micro_model_dir, small_jsonl, out), quiet=True,
                           listeners=[rec])
    assert summary["state"] == "completed"
    kinds = [k for k, _ in rec.events]
    # start first, end last; per step: evaluation/preview before step_end, checkpoint after it
    assert kinds == ["start", "step_end", "evaluation", "step_end", "checkpoint", "step_end",
                     "evaluation", "preview", "step_end", "end"]
    start = rec.events[0][1]
    assert start.total_steps == 4 and start.start_step == 0 and not start.resumed
    assert start.manifest["dataset_sha256"] and start.config["hyperparams"]["max_steps"] == 4
    steps = [e for k, e in rec.events if k == "step_end"]
    assert [s.step for s in steps] == [1, 2, 3, 4]
    # the records the listeners saw are exactly what metrics.jsonl holds
    logged = [s.record for s in steps if s.record is not None]
    on_disk = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == on_disk
    # step 1 is always logged (the first point of a chart is the summary's first loss)
    assert logged[0]["step"] == 1 and logged[0]["loss"] == end_summary_loss_start(rec)
    assert "eval_loss" in logged[1] and "eval_loss" in logged[-1]
    preview = next(e for k, e in rec.events if k == "preview")
    assert preview.step == 4 and len(preview.records) == 1
    previews_on_disk = [json.loads(x) for x in (out / "previews.jsonl").read_text().splitlines()]
    assert previews_on_disk == json.loads(json.dumps(preview.records))
    ckpt = next(e for k, e in rec.events if k == "checkpoint")
    assert ckpt.step == 2 and (out / "checkpoints" / "step-000002").samefile(ckpt.path)
    end = rec.events[-1][1]
    assert end.state == "completed" and end.reason is None and end.summary["steps_done"] == 4
    assert rec.closed


def test_failed_run_ends_with_a_reason(micro_model_dir, small_jsonl, tmp_path, monkeypatch,
                                       alter_steps):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    alter_steps(lambda n, loss, grad: (float("nan"), 1.0))
    rec = Recorder()
    summary = run_training(_resolved(micro_model_dir, small_jsonl, tmp_path / "run"),
                           quiet=True, listeners=[rec])
    assert summary["state"] == "failed"
    assert [k for k, _ in rec.events] == ["start", "end"]
    end = rec.events[-1][1]
    assert end.state == "failed" and "loss nan" in end.reason


def test_listeners_from_the_run_listeners_hook(micro_model_dir, small_jsonl, tmp_path,
                                               monkeypatch, trainer_plugin):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    seen: dict[str, object] = {}
    rec = Recorder()

    class TrackerPlugin:
        @hookimpl
        def run_listeners(self, config, output_dir):
            seen["config"], seen["output_dir"] = config, output_dir
            return [rec]

    trainer_plugin(TrackerPlugin())
    out = tmp_path / "run"
    run_training(_resolved(micro_model_dir, small_jsonl, out), quiet=True)
    assert seen["output_dir"] == out and seen["config"].hyperparams.max_steps == 4
    assert [k for k, _ in rec.events][0] == "start" and rec.events[-1][0] == "end"
    assert sum(k == "step_end" for k, _ in rec.events) == 4


def end_summary_loss_start(rec):
    return rec.events[-1][1].summary["loss_start"]
