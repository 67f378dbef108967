"""`trainer dashboard`: its HTTP API and safety rules, and the page in a real headless browser."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from pathlib import Path

import pytest

from trainer_core.config import resolve
from trainer_core.monitor.dashboard.server import make_server, stop
from trainer_core.monitor.events import RunListener
from trainer_core.train.recipe import run_training


def _write_run(d: Path, state="completed", steps=5):
    d.mkdir(parents=True)
    recs = [{"step": i, "loss": 3.0 / i, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0,
             "tokens_trained": 10 * i, "time": 0} for i in range(1, steps + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "status.json").write_text(json.dumps({"state": state, "step": steps,
                                               "total_steps": steps, "loss": recs[-1]["loss"],
                                               "alerts": []}))
    (d / "loss.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")


def _question(prompt: str, width: int = 120) -> str:
    """What the previews table shows of a prompt: its start, with an ellipsis when cut."""
    text = " ".join(prompt.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "runs"
    _write_run(root / "a")
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    server, board = make_server(root, "127.0.0.1", 0, token="tok")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, server.server_address[1], board
    stop(server, board)


def test_api_lists_runs_and_serves_a_run(served, http_request):
    root, port, _ = served
    status, body = http_request(port, "GET", "/api/runs/list")
    assert status == 200
    assert [(r["id"], r["state"], r["step"]) for r in json.loads(body)] == [("a", "completed", 5)]
    status, body = http_request(port, "GET", "/api/runs/run?id=a")
    run = json.loads(body)
    assert [m["step"] for m in run["metrics"]] == [1, 2, 3, 4, 5]
    assert run["plot"] == "/files/a/loss.svg"
    assert run["offsets"]["metrics"] == (root / "a" / "metrics.jsonl").stat().st_size
    status, body = http_request(port, "GET", "/files/a/loss.svg")
    assert status == 200 and body.startswith(b"<svg")
    status, page = http_request(port, "GET", "/")
    # no CDN, no remote script: every script and stylesheet is served by us
    assert status == 200 and b"http" not in page.replace(b"http://www.w3.org", b"")
    assert b'content="tok"' in page  # loopback: the page carries the control token


@pytest.mark.parametrize("path", [
    "/files/../secret.json", "/files/..%2fsecret.json", "/files/%2e%2e/secret.json",
    "/files/a/../../secret.json", "/files//etc/passwd", "/files/../../../../etc/passwd",
    "/static/../server.py", "/static/%2e%2e/server.py", "/api/runs/run?id=../",
    "/api/runs/run?id=..%2F..", "/api/runs/run?id=/etc", "/files/a/link.json",
])
def test_never_serves_files_outside_the_directory(served, path, http_request):
    root, port, _ = served
    (root / "a" / "link.json").symlink_to(root.parent / "secret.json")
    status, body = http_request(port, "GET", path)
    assert status in (400, 404), (path, status)
    assert b"secret" not in body and b"root:" not in body


def test_control_needs_the_token_and_a_loopback_host(served, http_request):
    root, port, _ = served
    assert http_request(port, "POST", "/api/runs/stop?id=a")[0] == 403
    assert http_request(port, "POST", "/api/runs/stop?id=a", {"X-Trainer-Token": "nope"})[0] == 403
    # with the token the action runs (and refuses: the run is not running)
    status, body = http_request(port, "POST", "/api/runs/stop?id=a", {"X-Trainer-Token": "tok"})
    assert status == 409 and b"not running" in body
    # DNS rebinding: a page served as evil.example that resolves to 127.0.0.1
    assert http_request(port, "GET", "/api/runs/list", host="evil.example:80")[0] == 403


def test_page_on_another_address_does_not_carry_the_token(tmp_path):
    from trainer_core.monitor.dashboard.server import Dashboard

    board = Dashboard(tmp_path, {"runs": None}, "0.0.0.0", token="tok")
    assert b'content="tok"' not in board.page()
    assert b'content=""' in board.page()


@pytest.mark.slow
def test_stop_action_interrupts_a_running_run(micro_model_dir, small_jsonl, tmp_path, http_request):
    """SIGTERM through the dashboard: the run checkpoints and ends as interrupted."""
    import subprocess
    import sys

    out = tmp_path / "runs" / "live"
    env = {**os.environ, "TRAINER_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer_core.cli", "run", "--model", str(micro_model_dir),
         "--dataset", str(small_jsonl), "--output-dir", str(out), "--max-steps", "100000",
         "--batch-size", "2", "--quiet", "--set", "monitoring.num_preview_samples=0",
         "--set", "hyperparams.eval_steps=0", "--set", "monitoring.status_interval_s=0.1",
         "--set", "environment.logging_steps=1"], env=env)
    server, board = make_server(tmp_path / "runs", "127.0.0.1", 0, token="tok")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            s = json.loads(http_request(port, "GET", "/api/runs/run?id=live")[1] or b"{}")
            if s.get("status", {}).get("step", 0) >= 2:
                break
            time.sleep(0.2)
        status, body = http_request(port, "POST", "/api/runs/stop?id=live",
                                {"X-Trainer-Token": "tok"})
        assert status == 200, body
        assert proc.wait(timeout=120) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        stop(server, board)
    final = json.loads((out / "status.json").read_text())
    assert final["state"] == "interrupted"
    assert list((out / "checkpoints").iterdir())


def test_events_stream_sends_only_what_was_appended(served):
    root, port, board = served
    metrics = root / "a" / "metrics.jsonl"
    offset = metrics.stat().st_size
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", f"/api/runs/events?id=a&metrics={offset}&previews=0")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    with open(metrics, "a") as fh:
        fh.write(json.dumps({"step": 6, "loss": 0.4}) + "\n")
        fh.write(json.dumps({"step": 6, "alert": "loss_spike", "state": "raised"}) + "\n")
        fh.write('{"step": 7, "loss"')  # half a line: not sent until complete
    got: dict[str, list] = {}
    deadline = time.time() + 10
    while ("metrics" not in got or "alerts" not in got) and time.time() < deadline:
        line = resp.fp.readline().decode()
        if line.startswith("event: "):
            name = line[7:].strip()
            data = json.loads(resp.fp.readline().decode()[6:])
            got.setdefault(name, []).extend(data if isinstance(data, list) else [data])
    conn.close()
    assert got["metrics"] == [{"step": 6, "loss": 0.4}]
    assert got["alerts"][0]["alert"] == "loss_spike"


# --------------------------------------------------------------------------- the browser


class Pace(RunListener):
    """Slows a real run so a page can watch it; from ``slow_from`` on, slow enough to raise the
    throughput alert."""

    def __init__(self, delay, slow_from, slow_delay):
        self.delay, self.slow_from, self.slow_delay = delay, slow_from, slow_delay

    def on_step_end(self, event):
        time.sleep(self.slow_delay if event.step >= self.slow_from else self.delay)


@pytest.mark.slow
def test_dashboard_in_a_real_browser(micro_model_dir, small_jsonl, tmp_path, monkeypatch,
                                     headless_chromium):
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "runs"
    _write_run(root / "earlier-run", steps=12)
    out = root / "sft-live"
    resolved = resolve(cli={
        "model.path": str(micro_model_dir), "data.dataset": str(small_jsonl),
        "output.output_dir": str(out), "hyperparams.batch_size": 4,
        "hyperparams.max_steps": 42, "hyperparams.save_steps": 0, "hyperparams.eval_steps": 10,
        "hyperparams.learning_rate": 3e-3, "hyperparams.warmup_steps": 5,
        "monitoring.preview_steps": 15, "monitoring.num_preview_samples": 2,
        "monitoring.max_new_tokens": 12, "environment.logging_steps": 1,
        "data.validation_split": 0.1, "monitoring.status_interval_s": 0.2,
        "monitoring.throughput_warmup_steps": 3, "monitoring.throughput_window": 4,
        "monitoring.throughput_drop": 0.5})
    result: dict = {}
    trainer = threading.Thread(target=lambda: result.update(run_training(
        resolved, quiet=True, listeners=[Pace(0.15, slow_from=32, slow_delay=2.0)])))
    server, board = make_server(root, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    trainer.start()
    driver = None
    try:
        while not (out / "status.json").exists() and trainer.is_alive():
            time.sleep(0.1)
        driver = headless_chromium()
        driver.get(url)
        wait = WebDriverWait(driver, 240, poll_frequency=0.2)
        js = driver.execute_script

        # the page loads, lists both runs and opens the running one
        wait.until(lambda d: js("return document.querySelectorAll('#runs .run').length") == 2)
        wait.until(lambda d: js("return document.querySelector('#head h1')?.textContent")
                   == "sft-live")
        # the loss chart grows while the run trains, without reloading the page
        js("window.__marker = 1")
        first = wait.until(lambda d: int(js(
            "return document.querySelector('#chart-loss svg').dataset.points || 0")) or False)
        wait.until(lambda d: int(js(
            "return document.querySelector('#chart-loss svg').dataset.points")) > first + 3)
        assert js("return document.querySelector('#state').textContent") == "running"
        assert js("return window.__marker") == 1  # same page: updated live, not reloaded
        # a preview with its step appears; the eval series is drawn
        wait.until(lambda d: js("return document.querySelectorAll('#previews tr.preview')"
                                ".length") >= 2)
        # each preview shows the start of its question and the reference answer
        cells = js("return [...document.querySelector('#previews tr.preview').children]"
                   ".map((c) => c.textContent)")
        first = json.loads((out / "previews.jsonl").read_text().splitlines()[0])
        assert cells[1] == _question(first["prompt"]) and cells[3] == first["reference"]
        # the alert shows (the run slows down from step 32)
        wait.until(lambda d: js("return document.querySelector("
                                "'#alerts [data-alert=throughput]') !== null"))
        alert_text = js("return document.querySelector('#alerts').textContent")
        assert "tok/s, below 50%" in alert_text
        for chart in ("chart-lr", "chart-tps", "chart-grad"):
            assert int(js(f"return document.querySelector('#{chart} svg').dataset.points")) > 0
        shot = Path(os.environ.get("TRAINER_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(shot.read_bytes()[16:24][:4], "big") == 1280  # PNG width
        # the run ends; the page says so
        trainer.join(timeout=300)
        wait.until(lambda d: js("return document.querySelector('#state').textContent")
                   == "completed")
    finally:
        stop(server, board)
        trainer.join(timeout=300)
    assert result["state"] == "completed"


def test_dashboard_command_serves_and_prints_the_token_only_off_loopback(tmp_path):
    import signal
    import subprocess
    import sys
    import urllib.request

    _write_run(tmp_path / "runs" / "a")
    for host, shows_token in (("127.0.0.1", False), ("0.0.0.0", True)):
        proc = subprocess.Popen([sys.executable, "-m", "trainer_core.cli", "dashboard",
                                 str(tmp_path / "runs"), "--host", host, "--port", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            url = line.split(" at ")[1].split(" ")[0]
            assert ("?token=" in url) is shows_token, line
            port = url.split(":")[2].split("/")[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs/list") as resp:
                assert json.loads(resp.read())[0]["id"] == "a"
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert ("warning: bound beyond loopback" in err) is shows_token


def test_another_view_plugs_in_next_to_the_runs(tmp_path, http_request):
    """How a daemon home's view will be added: one more object in ``views``."""
    from trainer_core.monitor.dashboard.views import RunsView

    class QueueView:
        def get(self, what, query):
            return {"what": what, "queue": ["a.jsonl"]}

        def events(self, query, stopping):
            yield "queue", ["a.jsonl"]

        def action(self, name, query, body):
            return {"done": name}

        def script(self):
            return b"TD.views.queue = {title: 'queue', mount() {}};"

    _write_run(tmp_path / "a")
    views = {"runs": RunsView(tmp_path), "queue": QueueView()}
    server, board = make_server(tmp_path, "127.0.0.1", 0, views=views, token="tok")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        assert json.loads(http_request(port, "GET", "/api/views")[1]) == ["runs", "queue"]
        assert http_request(port, "GET", "/static/queue.js")[1].startswith(b"TD.views.queue")
        assert json.loads(http_request(port, "GET", "/api/queue/list")[1])["queue"] == ["a.jsonl"]
        assert http_request(port, "POST", "/api/queue/pause")[0] == 403
        status, body = http_request(port, "POST", "/api/queue/pause", {"X-Trainer-Token": "tok"})
        assert status == 200 and json.loads(body) == {"done": "pause"}
        assert b"""content='["runs", "queue"]'""" in board.page()  # the page's tabs
    finally:
        stop(server, board)


def test_event_streams_send_a_keep_alive_only_after_a_silence(monkeypatch):
    """Both views' streams (runs and daemon) share poll_stream: events as polled, a keep-alive
    after KEEPALIVE_S without one, and an end once the server is stopping."""
    from trainer_core.monitor.dashboard import views

    monkeypatch.setattr(views, "KEEPALIVE_S", 0.05)
    stopping = threading.Event()
    polls = iter([[("metrics", [1])], [("status", {}), ("runs", [])]])

    def poll():
        return next(polls, [])

    stream = views.poll_stream(poll, stopping, every_s=0.01)
    assert [next(stream) for _ in range(3)] == [("metrics", [1]), ("status", {}), ("runs", [])]
    started = time.monotonic()
    assert next(stream) == (None, None)  # nothing new: a keep-alive, after the silence
    assert time.monotonic() - started >= 0.04
    stopping.set()
    assert list(stream) == []
