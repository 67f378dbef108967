"""A daemon home in `trainer dashboard` (its view: queue, history, pause/resume/skip) and in
`trainer watch`: over HTTP on a home without a daemon, then on a real running daemon, in the
terminal and in a real headless browser."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer_core.cli import cli
from trainer_core.daemon.control import submit_files
from trainer_core.daemon.dashboard import DaemonView
from trainer_core.daemon.home import Home
from trainer_core.daemon.ledger import Ledger
from trainer_core.monitor.dashboard.server import make_server, stop
from trainer_core.monitor.watch import render


def _serve(home: Path, host: str = "127.0.0.1"):
    server, board = make_server(home, host, 0, views={"daemon": DaemonView(home)}, token="tok")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, board, server.server_address[1]


def _meta(home: Home, key: str):
    ledger = Ledger(home.ledger)
    try:
        return ledger.meta(key)
    finally:
        ledger.close()


@pytest.fixture
def idle_home(tmp_path, sample_rows, du):
    """A home with a ledger and no daemon: four queued files, three finished ones."""
    home = Home(tmp_path / "home")
    src = tmp_path / "src"
    files = {n: du.write_jsonl(src / f"{n}.jsonl", sample_rows[i * 2:i * 2 + 2])
             for i, n in enumerate(["low1", "norm1", "high1", "norm2", "old1", "old2", "old3"])}
    for name, prio in (("old1", "normal"), ("old2", "normal"), ("old3", "normal"),
                       ("low1", "low"), ("norm1", "normal"), ("high1", "high"),
                       ("norm2", "normal")):
        submit_files(home, [files[name]], prio, False)
    ledger = Ledger(home.ledger)
    t = time.time()
    ledger.set_file(1, state="completed", steps=1, step_before=0, step_after=1, loss_start=2.5,
                    loss_end=2.0, finished_at=t - 30)
    ledger.set_file(2, state="failed", error="line 3: no messages", finished_at=t - 10)
    ledger.set_file(3, state="skipped", error="skipped by the user", finished_at=t - 20)
    ledger.close()
    (home.logs / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "file_id": 1, "file_step": s, "loss": 2.5 - 0.5 * s, "lr": 1e-3})
        + "\n" for s in (1,)))
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    server, board, port = _serve(home.root)
    yield home, port
    stop(server, board)


def test_daemon_view_shows_the_queue_in_training_order_and_the_history(idle_home, http_request):
    home, port = idle_home
    status, body = http_request(port, "GET", "/api/daemon/state")
    assert status == 200, body
    data = json.loads(body)
    # what runs next first: priority, then arrival
    assert [(f["position"], f["name"], f["priority"]) for f in data["queue"]] == [
        (1, "high1.jsonl", "high"), (2, "norm1.jsonl", "normal"), (3, "norm2.jsonl", "normal"),
        (4, "low1.jsonl", "low")]
    # finished files, newest first, with what happened to each
    assert [(f["name"], f["state"]) for f in data["history"]] == [
        ("old2.jsonl", "failed"), ("old3.jsonl", "skipped"), ("old1.jsonl", "completed")]
    assert data["history"][0]["error"] == "line 3: no messages"
    assert data["history"][2]["loss_end"] == 2.0
    # no daemon runs: the state comes from the ledger
    assert data["status"]["state"] == "stopped" and data["status"]["current"] is None
    assert [m["step"] for m in data["metrics"]] == [1]
    assert data["offsets"]["metrics"] == (home.logs / "metrics.jsonl").stat().st_size
    # the page has one tab, the daemon's, and its script comes from the daemon package
    assert b"""content='["daemon"]'""" in http_request(port, "GET", "/")[1]
    status, script = http_request(port, "GET", "/static/daemon.js")
    assert status == 200 and b"TD.views.daemon" in script


def test_actions_change_the_ledger_like_the_cli(idle_home, http_request):
    home, port = idle_home
    tok = {"X-Trainer-Token": "tok"}
    status, body = http_request(port, "POST", "/api/daemon/pause", tok)
    assert status == 200 and "next start" in json.loads(body)["result"]
    assert _meta(home, "paused") == "1"
    assert json.loads(http_request(port, "GET", "/api/daemon/state")[1])["status"]["paused"] is True
    assert http_request(port, "POST", "/api/daemon/resume", tok)[0] == 200
    assert _meta(home, "paused") == "0"
    # skip a queued file by its number: skipped/ with its report, out of the queue
    status, body = http_request(port, "POST", "/api/daemon/skip", tok, {"id": 5})
    assert status == 200 and json.loads(body)["result"] == "#5 norm1.jsonl skipped"
    assert (home.skipped / "000005-norm1.jsonl").exists()
    assert (home.skipped / "000005-norm1.jsonl.report.json").exists()
    data = json.loads(http_request(port, "GET", "/api/daemon/state")[1])
    assert [f["id"] for f in data["queue"]] == [6, 7, 4]
    assert (data["history"][0]["id"], data["history"][0]["state"]) == (5, "skipped")
    # the CLI's refusals come back as 409 with its message
    status, body = http_request(port, "POST", "/api/daemon/skip", tok)
    assert status == 409 and json.loads(body)["error"] == "no file is in training"
    status, body = http_request(port, "POST", "/api/daemon/skip", tok, {"id": 1})
    assert status == 409 and "is completed, not queued" in json.loads(body)["error"]
    for bad in ("../x", "#1", True, -1):
        assert http_request(port, "POST", "/api/daemon/skip", tok, {"id": bad})[0] == 400, bad
    assert http_request(port, "POST", "/api/daemon/stop", tok)[0] == 404  # not offered


def test_actions_need_the_token_and_a_loopback_host(idle_home, http_request):
    home, port = idle_home
    for action in ("pause", "resume", "skip"):
        assert http_request(port, "POST", f"/api/daemon/{action}")[0] == 403
        assert http_request(port, "POST", f"/api/daemon/{action}", {"X-Trainer-Token": "no"}
                        )[0] == 403
    assert _meta(home, "paused") is None  # nothing happened
    # DNS rebinding: a page served as evil.example that resolves to 127.0.0.1
    assert http_request(port, "GET", "/api/daemon/state", host="evil.example")[0] == 403
    assert http_request(port, "POST", "/api/daemon/pause", {"X-Trainer-Token": "tok"},
                    host="evil.example:80")[0] == 403
    assert _meta(home, "paused") is None


def test_off_loopback_the_page_has_no_token_and_actions_need_it(idle_home, http_request):
    home, _ = idle_home
    server, board, port = _serve(home.root, host="0.0.0.0")
    try:
        page = http_request(port, "GET", "/", host="192.0.2.1")[1]
        assert b'content="tok"' not in page and b'content=""' in page
        assert http_request(port, "POST", "/api/daemon/pause", host="192.0.2.1")[0] == 403
        assert _meta(home, "paused") is None
        # the printed token (sent by the page as the header) is what works
        assert http_request(port, "POST", "/api/daemon/pause", {"X-Trainer-Token": "tok"},
                        host="192.0.2.1")[0] == 200
        assert _meta(home, "paused") == "1"
    finally:
        stop(server, board)


@pytest.mark.parametrize("path", [
    "/files/../secret.json", "/files/..%2fsecret.json", "/files/%2e%2e/secret.json",
    "/files/logs/../../secret.json", "/files//etc/passwd", "/files/../../../../etc/passwd",
    "/static/../dashboard.py", "/static/%2e%2e/ledger.py", "/files/ledger.sqlite",
    "/files/link.json", "/api/daemon/../../secret.json", "/api/daemon/state/../../x",
])
def test_never_serves_files_outside_the_home(idle_home, path, http_request):
    home, port = idle_home
    (home.root / "link.json").symlink_to(home.root.parent / "secret.json")
    status, body = http_request(port, "GET", path)
    assert status in (400, 404), (path, status)
    # (an error may echo the path; the content never comes back)
    assert b"\"secret\": 1" not in body and b"root:" not in body and b"SQLite" not in body


def test_events_send_new_steps_and_queue_changes(idle_home, tmp_path, sample_rows, du):
    home, port = idle_home
    offset = (home.logs / "metrics.jsonl").stat().st_size
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", f"/api/daemon/events?metrics={offset}")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"

    def read_until(names):
        got: dict[str, list] = {}
        deadline = time.time() + 10
        while not names <= got.keys() and time.time() < deadline:
            line = resp.fp.readline().decode()
            if line.startswith("event: "):
                name = line[7:].strip()
                got.setdefault(name, []).append(json.loads(resp.fp.readline().decode()[6:]))
        return got

    first = read_until({"status", "queue", "history"})
    assert [f["name"] for f in first["queue"][-1]][:1] == ["high1.jsonl"]
    with open(home.logs / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 2, "file_id": 4, "loss": 1.5}) + "\n")
    submit_files(home, [du.write_jsonl(tmp_path / "new.jsonl", sample_rows[20:22])], "high",
                 False)
    got = read_until({"metrics", "queue"})
    conn.close()
    assert got["metrics"] == [[{"step": 2, "file_id": 4, "loss": 1.5}]]
    assert [f["name"] for f in got["queue"][-1]][:2] == ["high1.jsonl", "new.jsonl"]


def test_the_page_starts_from_the_tail_of_a_long_metrics_log(idle_home, monkeypatch):
    """logs/metrics.jsonl grows for the daemon's whole life: the snapshot reads only its last
    complete lines, and hands the events the offset of its end."""
    import trainer_core.daemon.dashboard as dash

    home, _ = idle_home
    monkeypatch.setattr(dash, "METRICS_TAIL_BYTES", 1000)
    with open(home.metrics, "a") as fh:
        for step in range(2, 400):
            fh.write(json.dumps({"step": step, "file_id": 1, "loss": 1.0}) + "\n")
    data = DaemonView(home).snapshot()
    steps = [m["step"] for m in data["metrics"]]
    assert steps[-1] == 399 and steps == list(range(steps[0], 400))
    assert 20 < len(steps) < 40  # ~1000 bytes of ~45-byte lines, none of them cut
    assert data["offsets"]["metrics"] == home.metrics.stat().st_size


def test_not_a_daemon_home(tmp_path, http_request):
    view = DaemonView(tmp_path)
    server, board = make_server(tmp_path, "127.0.0.1", 0, views={"daemon": view}, token="tok")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        status, body = http_request(port, "GET", "/api/daemon/state")
        assert status == 404 and b"not a daemon home" in body
        assert http_request(port, "GET", "/api/daemon/events")[0] == 404
        assert http_request(port, "POST", "/api/daemon/pause", {"X-Trainer-Token": "tok"})[0] == 404
        assert not (tmp_path / "ledger.sqlite").exists()  # looking creates nothing
    finally:
        stop(server, board)


def test_dashboard_command_opens_the_daemon_view_on_a_home(idle_home):
    import signal
    import subprocess
    import sys
    import urllib.request

    home, _ = idle_home
    proc = subprocess.Popen([sys.executable, "-m", "trainer_core.cli", "dashboard",
                             str(home.root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"dashboard of daemon home {home.root} at http://127.0.0.1:"), line
        port = line.split(" at ")[1].split(":")[2].split("/")[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/views") as resp:
            assert json.loads(resp.read()) == ["daemon"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


# --------------------------------------------------------------------------- a real daemon


def _inbox(root: Path, sample_rows, du, long_steps: int) -> None:
    """Files dropped into the inbox before the daemon starts (2 rows a step), taken in name
    order: #1 high/first.jsonl (1 step), #2 long.jsonl, #3 low/last.jsonl (1 step)."""
    end = 2 + 2 * long_steps
    du.write_jsonl(root / "inbox" / "high" / "first.jsonl", sample_rows[0:2])
    du.write_jsonl(root / "inbox" / "long.jsonl", sample_rows[2:end])
    du.write_jsonl(root / "inbox" / "low" / "last.jsonl", sample_rows[end:end + 2])


def _current(root, du) -> dict:
    return du.status(root).get("current") or {}


@pytest.mark.slow
def test_watch_on_a_running_daemon(tmp_path, micro_model_dir, sample_rows, du):
    root = du.make_home(tmp_path / "home", micro_model_dir)
    _inbox(root, sample_rows, du, long_steps=8)
    proc = du.start(root, fault="sleep:0.3")
    try:
        du.wait_for(lambda: _current(root, du).get("name") == "long.jsonl"
                    and (_current(root, du).get("file_step") or 0) >= 2, 120,
                    "long.jsonl to train", proc, root)
        text = render(root, width=120, ascii_only=True)
        lines = text.splitlines()
        assert lines[0].startswith(f"daemon {root}  [training]  model step ")
        assert "training #2 long.jsonl (normal, attempt 1)" in text and "/8" in text
        assert "queue 1 (low 1)" in text and "next #3 low/last.jsonl (low)" in text
        assert any(ln.strip().startswith("ok") and "#1 high/first.jsonl  1 steps, loss" in ln
                   for ln in lines), text
        spark = next(ln for ln in lines if ln.startswith("  loss "))
        assert len(spark.split()[1]) >= 2  # one mark per logged step so far
        du.wait_for(lambda: du.all_final(root), 120, "all files", proc, root)
        du.wait_for(lambda: du.status(root).get("state") == "idle", 30, "idle", proc, root)
        out = CliRunner().invoke(cli, ["watch", str(root), "--once", "--ascii"])
        assert out.exit_code == 0, out.output
        assert "[idle]" in out.output and "training: nothing" in out.output
        assert "queue 0" in out.output
        for name in ("first", "long", "last"):
            assert f"{name}.jsonl  " in out.output
        steps = [m["step"] for m in du.metrics(root)]
        assert f"model step {steps[-1]}" in out.output.splitlines()[0] and len(steps) == 10
    finally:
        CliRunner().invoke(cli, ["daemon", "stop", "--home", str(root)])
        proc.wait(60)
        du.kill_group(proc)
    assert proc.returncode == 0


@pytest.mark.slow
def test_daemon_dashboard_in_a_real_browser(tmp_path, micro_model_dir, sample_rows, du,
                                            headless_chromium):
    from selenium.webdriver.support.ui import WebDriverWait

    root = du.make_home(tmp_path / "home", micro_model_dir)
    home = Home(root)
    _inbox(root, sample_rows, du, long_steps=12)  # skipped before it ends
    proc = du.start(root, fault="sleep:0.4")
    server = board = None
    try:
        du.wait_for(lambda: (root / "ledger.sqlite").exists(), 120, "the ledger", proc, root)
        server, board, port = _serve(root)
        driver = headless_chromium(height=1100)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 180, poll_frequency=0.2)
        js = driver.execute_script
        js("window.__marker = 1")
        q = "return document.querySelector"
        state = f"{q}('#dstate')?.dataset.state"

        def names(sel):
            return js(f"return [...document.querySelectorAll('{sel}')].map("
                      "(r) => r.children[2].textContent)")

        # the daemon takes the inbox: the first (high) file trains and lands in the history;
        # the long file trains next, the low one waits
        wait.until(lambda d: js(f"{q}('#dcurname')?.dataset.id") == "2")
        wait.until(lambda d: names("#dqueue tr.queued") == ["low/last.jsonl"])
        wait.until(lambda d: names("#dhistory tr.done") == ["high/first.jsonl"])
        assert js(f"{q}('#dhistory tr.done').dataset.state") == "completed"
        # the loss chart grows live
        first = wait.until(lambda d: int(js(
            f"{q}('#chart-dloss svg').dataset.points || 0")) >= 2 and int(js(
                f"{q}('#chart-dloss svg').dataset.points")))
        wait.until(lambda d: int(js(f"{q}('#chart-dloss svg').dataset.points")) > first)
        assert js(state) == "training"

        # pause: the daemon checkpoints at the next step boundary and reports paused
        js(f"{q}('#pause').click()")
        wait.until(lambda d: js(state) == "paused")
        assert du.status(root)["state"] == "paused"
        paused_at = _current(root, du)["file_step"]
        assert js(f"{q}('#pause').disabled") and not js(f"{q}('#resume').disabled")
        # files that arrive meanwhile are queued by priority, and the page shows it live
        src = tmp_path / "src"
        submit_files(home, [du.write_jsonl(src / "normal.jsonl", sample_rows[30:32])], "normal",
                     False)
        submit_files(home, [du.write_jsonl(src / "urgent.jsonl", sample_rows[32:34])], "high",
                     False)
        wait.until(lambda d: names("#dqueue tr.queued")
                   == ["urgent.jsonl", "normal.jsonl", "low/last.jsonl"])
        # a queued file skipped from its row
        js("window.confirm = () => true")
        js(f"{q}('#dqueue tr.queued[data-id=\"4\"] button.skip-queued').click()")
        wait.until(lambda d: names("#dqueue tr.queued") == ["urgent.jsonl", "low/last.jsonl"])
        wait.until(lambda d: js(f"{q}('#dhistory tr.done[data-id=\"4\"]')?.dataset.state")
                   == "skipped")
        assert _current(root, du)["file_step"] == paused_at  # nothing trained while paused

        # resume: training continues
        js(f"{q}('#resume').click()")
        wait.until(lambda d: js(state) == "training")
        du.wait_for(lambda: (_current(root, du).get("file_step") or 0) > paused_at, 60,
                    "training to continue", proc, root)
        wait.until(lambda d: int(js(f"{q}('#dfilestep').textContent").split("/")[0])
                   > paused_at)

        # skip: the long file goes to the history as skipped, the model rolled back
        js(f"{q}('#skip').click()")
        wait.until(lambda d: "skipped" in (js(
            f"{q}('#dhistory tr.done[data-id=\"2\"]')?.dataset.state") or ""))
        assert [r["state"] for r in du.rows(root)][:2] == ["completed", "skipped"]
        assert "rolled back" in (root / "logs" / "daemon.log").read_text()
        assert (home.skipped / "000002-long.jsonl").exists()
        # the rest trains in priority order; the page ends idle with every file in the history
        wait.until(lambda d: len(names("#dhistory tr.done")) == 5)
        assert names("#dhistory tr.done") == ["low/last.jsonl", "urgent.jsonl", "long.jsonl",
                                              "normal.jsonl", "high/first.jsonl"]
        wait.until(lambda d: js(state) == "idle")
        assert js(f"{q}('#dqueue tr.queued')") is None
        assert js("return window.__marker") == 1  # all live: the page never reloaded
        shot = Path(os.environ.get("TRAINER_DAEMON_DASHBOARD_SCREENSHOT",
                                   tmp_path / "daemon.png"))
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        if server is not None:
            stop(server, board)
        CliRunner().invoke(cli, ["daemon", "stop", "--home", str(root)])
        proc.wait(60)
        du.kill_group(proc)
