"""Make docs/dashboard.png: the dashboard on a live emoji_think demo run, in headless chromium.

    python docs/dashboard_screenshot.py [OUT.png]

Trains the embedded demo model (emoji_think profile) for 40 steps in a child process, serves
the dashboard on its folder and, once previews are in, freezes the trainer (SIGSTOP) for a few
seconds so the page shows how a hung run looks (the `stalled` alert is derived by the reader
from status.json's timestamp); then lets it continue and takes the screenshot.
Needs chromium + chromium-driver (apt) and selenium.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("SE_OFFLINE", "true")
os.environ.setdefault("SE_AVOID_STATS", "true")


def main() -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from trainer_core.monitor.dashboard.server import make_server, stop

    out_png = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "dashboard.png")
    root = Path(tempfile.mkdtemp(prefix="dash-")) / "runs"
    run_dir = root / "emoji_think-demo"
    proc = subprocess.Popen([
        sys.executable, "-m", "trainer_core.cli", "run", "--profile", "emoji_think",
        "--output-dir", str(run_dir), "--max-steps", "40", "--eval-steps", "10", "--quiet",
        "--set", "monitoring.preview_steps=10", "--set", "environment.logging_steps=1",
        "--set", "monitoring.stall_after_s=30", "--set", "monitoring.status_interval_s=0.5",
        "--set", "monitoring.num_preview_samples=3"])
    server, board = make_server(root, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,1300"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"),
                              options=opts)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1280, "height": 1300, "deviceScaleFactor": 1, "mobile": False})
    try:
        while True:
            try:
                status = json.loads((run_dir / "status.json").read_text())
            except (OSError, ValueError):
                status = {}
            if status.get("step", 0) >= 30 or proc.poll() is not None:
                break
            time.sleep(0.5)
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        js = driver.execute_script
        wait = WebDriverWait(driver, 180, poll_frequency=0.2)
        wait.until(lambda d: js("return document.querySelectorAll('#previews tr.preview')"
                                ".length") > 0)
        os.kill(proc.pid, signal.SIGSTOP)
        wait.until(lambda d: js("return document.querySelector("
                                "'#alerts [data-alert=stalled]') !== null"))
        driver.save_screenshot(str(out_png))
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=600)
        print(out_png)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
        driver.quit()
        stop(server, board)


if __name__ == "__main__":
    main()
