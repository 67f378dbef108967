"""Trackers: report_to drives plugins; TensorBoard event files and Trackio's SQLite hold the run."""

from __future__ import annotations

import json
import sqlite3
import struct
import subprocess
import sys

import pytest
from click.testing import CliRunner

from trainer_core import hookimpl
from trainer_core.cli import cli
from trainer_core.config import resolve
from trainer_core.errors import UserError
from trainer_core.monitor.events import RunListener
from trainer_core.train.recipe import run_training


def _resolved(model_dir, data, out, report_to, **extra):
    cli_args = {"model.path": str(model_dir), "data.dataset": str(data),
                "output.output_dir": str(out), "profile.name": "plain_sft",
                "hyperparams.batch_size": 4, "hyperparams.max_steps": 6,
                "hyperparams.save_steps": 0, "hyperparams.eval_steps": 3,
                "monitoring.preview_steps": 6, "monitoring.num_preview_samples": 1,
                "monitoring.max_new_tokens": 4, "environment.logging_steps": 2,
                "data.validation_split": 0.1, "environment.report_to": report_to, **extra}
    return resolve(cli=cli_args)


def read_tfevents(path):
    """Every event in a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    with open(path, "rb") as fh:
        while header := fh.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            data = fh.read(length)
            fh.read(4)
            event = event_pb2.Event()
            event.ParseFromString(data)
            events.append(event)
    return events


def test_tensorboard_event_files_hold_the_scalars(micro_model_dir, small_jsonl, tmp_path,
                                                  monkeypatch, alter_steps):
    pytest.importorskip("tensorboardX", reason="pip install 'trainer-core[tensorboard]'")
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    # a loss spike at step 5, so that an alert reaches the tracker too
    alter_steps(lambda n, loss, grad: (loss * 10 if n == 5 else loss, grad))
    out = tmp_path / "run"
    summary = run_training(_resolved(micro_model_dir, small_jsonl, out, ["tensorboard"],
                                     **{"monitoring.loss_window": 3}), quiet=True)
    assert summary["state"] == "completed"
    files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars: dict[str, dict[int, float]] = {}
    texts: dict[str, str] = {}
    for event in read_tfevents(files[0]):
        for v in event.summary.value:
            if v.HasField("simple_value") or v.tag.startswith(("train/", "eval/", "preview")):
                scalars.setdefault(v.tag, {})[event.step] = v.simple_value
            if v.HasField("tensor") and v.tensor.string_val:
                texts[v.tag] = v.tensor.string_val[0].decode()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {m["step"]: m for m in metrics if "loss" in m}
    assert sorted(scalars["train/loss"]) == sorted(by_step) == [1, 2, 4, 6]
    for step, rec in by_step.items():
        for key, tag in (("loss", "train/loss"), ("lr", "train/lr"),
                         ("grad_norm", "train/grad_norm"),
                         ("tokens_per_s", "train/tokens_per_s"),
                         ("tokens_trained", "train/tokens_trained")):
            assert scalars[tag][step] == pytest.approx(rec[key], rel=1e-6), (tag, step)
    evals = {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m}
    assert scalars["eval/loss"] == pytest.approx(evals)
    config_text = next(t for tag, t in texts.items() if tag.startswith("config"))
    manifest_text = next(t for tag, t in texts.items() if tag.startswith("manifest"))
    assert '"max_steps": 6' in config_text and "dataset_sha256" in manifest_text
    assert scalars["alerts/loss_spike"] == {5: 1.0, 6: 0.0}


@pytest.mark.slow
def test_trackio_database_holds_the_run(micro_model_dir, small_jsonl, tmp_path):
    """In a child process: Trackio reads TRACKIO_DIR once, at import."""
    pytest.importorskip("trackio", reason="pip install 'trainer-core[trackio]'")
    out = tmp_path / "run"
    trackio_dir = tmp_path / "trackio"
    code = (
        "import sys, json\n"
        "from trainer_core.config import resolve\n"
        "from trainer_core.train.recipe import run_training\n"
        "cli = json.loads(sys.argv[1])\n"
        "s = run_training(resolve(cli=cli), quiet=True)\n"
        "print(json.dumps({'state': s['state']}))\n")
    cli_args = {"model.path": str(micro_model_dir), "data.dataset": str(small_jsonl),
                "output.output_dir": str(out), "hyperparams.batch_size": 4,
                "hyperparams.max_steps": 4, "hyperparams.save_steps": 0,
                "hyperparams.eval_steps": 2, "monitoring.num_preview_samples": 0,
                "environment.logging_steps": 1, "data.validation_split": 0.1,
                "environment.report_to": ["trackio"], "monitoring.trackio_project": "itest"}
    import os

    env = {**os.environ, "TRACKIO_DIR": str(trackio_dir), "TRAINER_CACHE": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cli_args)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    # Trackio's console messages stay off stdout: the last line is our JSON
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"state": "completed"}
    db = sqlite3.connect(trackio_dir / "itest.db")
    rows = db.execute("select run_name, step, metrics from metrics order by step").fetchall()
    assert {r[0] for r in rows} == {"run"}
    logged = {step: json.loads(m) for _, step, m in rows}
    on_disk = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for rec in on_disk:
        if "loss" in rec:
            assert logged[rec["step"]]["train/loss"] == pytest.approx(rec["loss"])
            assert logged[rec["step"]]["train/lr"] == pytest.approx(rec["lr"])
        if "eval_loss" in rec:
            assert logged[rec["step"]]["eval/loss"] == pytest.approx(rec["eval_loss"])
    (config,) = db.execute("select config from configs where run_name = 'run'").fetchone()
    config = json.loads(config)
    assert config["config"]["hyperparams"]["max_steps"] == 4
    assert len(config["manifest"]["dataset_sha256"]) == 64


class Recorder(RunListener):
    def __init__(self):
        self.steps = []

    def on_step_end(self, event):
        self.steps.append(event.step)


def test_a_third_party_tracker_plugin(micro_model_dir, small_jsonl, tmp_path, monkeypatch,
                                      trainer_plugin):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    rec = Recorder()

    class MyTracker:
        @hookimpl
        def trackers(self):
            return ["mytracker"]

        @hookimpl
        def run_listeners(self, config, output_dir):
            return [rec] if "mytracker" in config.environment.report_to else []

    trainer_plugin(MyTracker())
    run_training(_resolved(micro_model_dir, small_jsonl, tmp_path / "run", ["mytracker"],
                           **{"monitoring.num_preview_samples": 0}), quiet=True)
    assert rec.steps == [1, 2, 3, 4, 5, 6]


def test_unknown_tracker_is_a_one_line_error_before_any_work(micro_model_dir, small_jsonl,
                                                             tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", "--model", str(micro_model_dir), "--dataset",
                                      str(small_jsonl), "--output-dir", str(out), "--set",
                                      'environment.report_to=["wandb"]'])
    assert result.exit_code == 2
    assert "environment.report_to: unknown tracker 'wandb'" in result.output
    assert "tensorboard, trackio" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_missing_tracker_package_names_the_extra(monkeypatch, tmp_path):
    import trainer_core.monitor.trackers as trackers

    # None in sys.modules makes any import of the name fail, as if it were not installed.
    for name in ("trackio", "tensorboardX", "tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UserError, match=r"^environment.report_to: trackio needs the trackio "
                                        r"package: pip install 'trainer-core\[trackio\]'$"):
        trackers.TrackioTracker("p", "r")
    with pytest.raises(UserError, match=r"pip install 'trainer-core\[tensorboard\]'$"):
        trackers.TensorBoardTracker(tmp_path)
