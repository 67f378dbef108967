"""Issue 23 (hardening round 3), the items about runs, generate and config: what an adversarial
probe broke, each a test that failed before the fix. The daemon's and the dashboard's items are
in tests/daemon/test_daemon_hardening.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer_core.cli import cli


def invoke(args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def one_error_line(result, code=2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))


def run_args(model_dir, data, out, *extra):
    return ["run", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out),
            "--batch-size", "4", "--max-length", "1024", "--set", "hyperparams.warmup_steps=0",
            "--set", "data.validation_split=0", "--set", "hyperparams.eval_steps=0",
            "--set", "monitoring.num_preview_samples=0", "--quiet", *map(str, extra)]


# --------------------------------------------------------------------------- 1: remote code


def _hostile_run_dir(micro_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A downloaded "run directory": its trainer_config.json trusts remote code and its
    config.json maps the model to a Python file that leaves a marker when imported."""
    d = tmp_path / "downloaded-run"
    shutil.copytree(micro_model_dir, d)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (d / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import Qwen3Config as EvilConfig, Qwen3ForCausalLM as EvilModel\n")
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig",
                          "AutoModelForCausalLM": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(config))
    (d / "trainer_config.json").write_text(json.dumps(
        {"model": {"trust_remote_code": True}, "profile": {"name": "plain_sft"}}))
    return d, marker


def test_generate_never_trusts_remote_code_because_the_loaded_directory_says_so(
        micro_model_dir, tmp_path):
    from trainer_core.generate.generate import generation_setup

    d, marker = _hostile_run_dir(micro_model_dir, tmp_path)
    invoke(["generate", "--model", d, "--prompt", "hi", "--max-new-tokens", "2", "-q"])
    assert not marker.exists()  # whatever generate said, the directory's code never ran
    assert generation_setup(str(d)).cfg.model.trust_remote_code is False
    from trainer_core.config import read_recorded_config  # the one rule, for serve/export too

    assert "trust_remote_code" not in read_recorded_config(d / "trainer_config.json")["model"]


# --------------------------------------------------------------------------- 2: --overwrite


def test_overwrite_replaces_only_a_run_directory_never_a_folder_or_the_data(
        micro_model_dir, small_jsonl, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    data = project / "train.jsonl"
    shutil.copy(small_jsonl, data)
    (project / "notes.txt").write_text("precious")
    line = one_error_line(invoke(run_args(micro_model_dir, data, project, "--max-steps", "1",
                                          "--overwrite")))
    assert "holds files that are not a trainer run" in line and "another --output-dir" in line
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt", "train.jsonl"]
    # a run directory holding the data being trained on: not overwritten either
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    inside = run / "train.jsonl"
    shutil.copy(small_jsonl, inside)
    line = one_error_line(invoke(run_args(micro_model_dir, inside, run, "--max-steps", "1",
                                          "--overwrite")))
    assert "data.dataset" in line and "inside" in line
    assert inside.read_bytes() == small_jsonl.read_bytes()


# --------------------------------------------------------------------------- 13-15: dashboard


@pytest.fixture
def runs_board(tmp_path):
    """A real dashboard server on DIR=runs/ with one finished run, ``a``."""
    import threading

    from trainer_core.monitor.dashboard.server import make_server, stop

    root = tmp_path / "runs"
    (root / "a").mkdir(parents=True)
    (root / "a" / "status.json").write_text(json.dumps({"state": "completed", "step": 1}))
    server, board = make_server(root, "127.0.0.1", 0, token="tok")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, server.server_address[1]
    stop(server, board)


def test_dashboard_host_check_compares_the_whole_host(runs_board, http_request):
    _, port = runs_board
    tok = {"X-Trainer-Token": "tok"}
    for host in ("127.0.0.1.evil.com", "127.0.0.1.evil.com:80", "127.evil.com", "localhost.evil",
                 "[::1].evil.com"):
        status, body = http_request(port, "GET", "/", host=host)
        assert status == 403 and b"tok" not in body, host
        assert http_request(port, "POST", "/api/runs/stop?id=a", tok, host=host)[0] == 403
    for host in (f"127.0.0.1:{port}", "localhost", f"127.0.0.2:{port}", "[::1]:80",
                 "LOCALHOST:1"):
        assert http_request(port, "GET", "/api/runs/list", host=host)[0] == 200, host


def test_dashboard_stop_signals_only_the_process_holding_the_runs_lock(runs_board, tmp_path,
                                                                      http_request):
    import socket
    import subprocess
    import sys
    import time

    root, port = runs_board
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        d = root / "forged"
        d.mkdir()
        (d / "status.json").write_text(json.dumps({
            "state": "running", "pid": victim.pid, "host": socket.gethostname(),
            "updated_at": time.time(), "stall_after_s": 600}))
        status, body = http_request(port, "POST", "/api/runs/stop?id=forged",
                                    {"X-Trainer-Token": "tok"})
        assert status == 409 and b"does not hold the run's lock" in body
        time.sleep(0.3)
        assert victim.poll() is None  # never signalled
    finally:
        victim.kill()
        victim.wait()


def test_dashboard_lists_runs_past_a_symlink_that_leaves_dir(runs_board, tmp_path,
                                                             http_request):
    root, port = runs_board
    outside = tmp_path / "elsewhere" / "run"
    outside.mkdir(parents=True)
    (outside / "status.json").write_text(json.dumps({"state": "completed", "step": 9}))
    (root / "escape").symlink_to(outside)
    status, body = http_request(port, "GET", "/api/runs/list")
    assert status == 200, body
    assert [r["id"] for r in json.loads(body)] == ["a"]
    skipped = json.loads(http_request(port, "GET", "/api/runs/skipped")[1])
    assert [s["name"] for s in skipped] == ["escape"]
    # the live stream sends its runs list instead of breaking mid-response
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/runs/events?id=a")
    resp = conn.getresponse()
    assert resp.status == 200
    seen = b""
    while b"event: runs" not in seen:
        line = resp.fp.readline()
        assert line, seen
        seen += line
    data = resp.fp.readline()
    assert b'"id": "a"' in data and b"escape" not in data
    conn.close()


# --------------------------------------------------------------------------- 19: echoed values


def test_a_config_error_echoes_a_short_value(tmp_path):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"hyperparams": {"batch_size": list(range(10**6)),
                                               "learning_rate": 1e-4}}))
    line = one_error_line(invoke(["config", "validate", big]))
    assert "hyperparams.batch_size: expected an integer, got [0, 1, 2" in line
    assert "(1000000 items)" in line and len(line) < 300
    text = tmp_path / "text.json"
    text.write_text(json.dumps({"data": {"on_invalid": "x" * 10**6}}))
    line = one_error_line(invoke(["config", "validate", text]))
    assert "data.on_invalid" in line and "(1000000 characters)" in line and len(line) < 300


# --------------------------------------------------------------------------- 12: growing data


def test_a_dataset_that_grows_while_the_run_reads_it_is_refused(micro_model_dir, small_jsonl,
                                                                 tmp_path, monkeypatch):
    from trainer_core.train import recipe

    original = recipe.prepare_examples

    def grow_then_prepare(*args, **kwargs):  # a writer appends during preprocessing
        with open(small_jsonl, "a", encoding="utf-8") as fh:
            fh.write(small_jsonl.read_text().splitlines()[0] + "\n")
        return original(*args, **kwargs)

    monkeypatch.setattr(recipe, "prepare_examples", grow_then_prepare)
    out = tmp_path / "run"
    result = invoke(run_args(micro_model_dir, small_jsonl, out, "--max-steps", "1"))
    assert result.exit_code == 2, result.output
    assert "changed while the run read it" in result.stderr
    manifest = out / "run.json"  # never names a hash of rows it did not train
    assert not manifest.exists() or "dataset_sha256" not in json.loads(manifest.read_text())


# --------------------------------------------------------------------------- 16: clear errors


def test_truncated_or_empty_weights_are_one_line_and_leave_no_output(micro_model_dir,
                                                                    small_jsonl, tmp_path):
    weights = (micro_model_dir / "model.safetensors").read_bytes()
    for name, content in (("empty", b""), ("truncated", weights[:len(weights) // 2])):
        model = tmp_path / f"model-{name}"
        shutil.copytree(micro_model_dir, model)
        (model / "model.safetensors").write_bytes(content)
        out = tmp_path / f"out-{name}"
        line = one_error_line(invoke(run_args(model, small_jsonl, out, "--max-steps", "1")))
        assert "model.safetensors: not a complete safetensors file" in line, line
        assert not out.exists()  # no stub directory locked to the bad model
        gen = invoke(["generate", "--model", model, "--prompt", "hi", "-q"])
        assert "not a complete safetensors file" in one_error_line(gen)


def test_the_daemon_never_trusts_remote_code_because_its_home_says_so(micro_model_dir,
                                                                     tmp_path, monkeypatch):
    """A home's config.json (a downloaded home, or one edited by another user) is the record
    of the last start, not a permission: only this command line can trust remote code."""
    from trainer_core.config import resolve, to_dict
    from trainer_core.daemon import service

    home = tmp_path / "home"
    home.mkdir()
    recorded = to_dict(resolve(cli={"model.path": str(micro_model_dir),
                                    "model.trust_remote_code": True}).config)
    (home / "config.json").write_text(json.dumps(recorded))
    seen = []
    monkeypatch.setattr(service.Daemon, "run", lambda self: seen.append(self.cfg) or 0)
    assert invoke(["daemon", "start", "--home", home]).exit_code == 0
    assert invoke(["daemon", "start", "--home", home, "--set",
                   "model.trust_remote_code=true"]).exit_code == 0
    assert [c.model.trust_remote_code for c in seen] == [False, True]
    assert seen[0].model.path == str(micro_model_dir)  # the rest of the record is kept
