"""Make docs/dashboard_daemon.png: the dashboard's daemon view on a live daemon, in headless
chromium.

    python docs/dashboard_daemon_screenshot.py [OUT.png]

Starts `trainer daemon` on the embedded demo model in a fresh home, drops the bundled sample
conversations into its inbox as a few files of several priorities, serves the dashboard on the
home, skips one queued file from the page and takes the screenshot once three files are
trained and the next one is half-way.
Needs chromium + chromium-driver (apt) and selenium.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("SE_OFFLINE", "true")
os.environ.setdefault("SE_AVOID_STATS", "true")

FILES = [("high", "urgent-fixes.jsonl", 16), ("", "support-2026-11-24.jsonl", 24),
         ("", "support-2026-11-25.jsonl", 40), ("", "support-2026-11-26.jsonl", 40),
         ("low", "style-examples.jsonl", 32), ("low", "archive-2025.jsonl", 48)]


def main() -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from trainer_core.daemon.dashboard import DaemonView
    from trainer_core.demo import sample_dataset_path
    from trainer_core.monitor.dashboard.server import make_server, stop

    out_png = Path(sys.argv[1] if len(sys.argv) > 1
                   else Path(__file__).parent / "dashboard_daemon.png")
    home = Path(tempfile.mkdtemp(prefix="daemon-")) / "daemon-demo"
    rows = sample_dataset_path().read_text(encoding="utf-8").splitlines()
    start = 0
    for folder, name, n in FILES:
        path = home / "inbox" / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows[start:start + n]) + "\n", encoding="utf-8")
        start += n
    proc = subprocess.Popen([
        sys.executable, "-m", "trainer_core.cli", "daemon", "start", "--home", str(home),
        "--set", "daemon.settle_s=0", "--set", "daemon.poll_interval_s=0.5",
        "--set", "daemon.status_interval_s=0.5"], stderr=subprocess.DEVNULL)
    driver = server = board = None
    try:
        while not (home / "ledger.sqlite").exists():
            time.sleep(0.2)
        server, board = make_server(home, "127.0.0.1", 0, views={"daemon": DaemonView(home)})
        threading.Thread(target=server.serve_forever, daemon=True).start()
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--window-size=1280,960"):
            opts.add_argument(a)
        driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"),
                                  options=opts)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 1280, "height": 960, "deviceScaleFactor": 1, "mobile": False})
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        js = driver.execute_script
        wait = WebDriverWait(driver, 900, poll_frequency=0.5)
        # one queued file skipped from the page, three trained, the next one half-way
        wait.until(lambda d: js("return document.querySelectorAll('#dhistory tr.done').length")
                   >= 1)
        js("window.confirm = () => true; [...document.querySelectorAll('#dqueue tr.queued')]"
           ".find((r) => r.textContent.includes('archive-2025'))"
           ".querySelector('button.skip-queued').click()")
        wait.until(lambda d: js("return document.querySelectorAll('#dhistory tr.done').length")
                   >= 4)

        def half_way(_):
            cur = json.loads((home / "status.json").read_text()).get("current") or {}
            return (cur.get("file_steps") or 0) and cur["file_step"] >= cur["file_steps"] // 2

        wait.until(half_way)
        time.sleep(1.5)  # the page's next status event
        driver.save_screenshot(str(out_png))
        print(out_png)
    finally:
        if driver is not None:
            driver.quit()
        if server is not None:
            stop(server, board)
        proc.terminate()
        proc.wait(timeout=300)


if __name__ == "__main__":
    main()
