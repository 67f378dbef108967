"""Shared fixtures: a micro Qwen3 model directory and the bundled sample data.

(``qwen_tokenizer`` comes from ``trainer_core.testing``, a pytest plugin of trainer-core.)

The micro model keeps Qwen3's real 151,936-row vocabulary (so the real tokenizer's ids are
valid) with a 16-wide body: a training step takes tens of milliseconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory, qwen_tokenizer) -> Path:
    import torch
    import transformers

    from trainer_core.demo import tiny_model_config

    cfg = tiny_model_config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            max_position_embeddings=1024)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = transformers.Qwen3ForCausalLM(cfg)
    out = tmp_path_factory.mktemp("micro-qwen3")
    model.save_pretrained(out, safe_serialization=True)
    qwen_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def loss_and_grads():
    """``f(model, batches, fn=loss_sum) -> (step loss, {name: grad})``, as one optimizer step
    sees it: each micro-batch's summed loss divided by the trained tokens of all of them."""
    from trainer_core.data.batching import count_trained
    from trainer_core.model.loss import loss_sum

    def run(model, batches, fn=loss_sum):
        model.zero_grad()
        n = count_trained(batches)
        total = 0.0
        for b in batches:
            loss, _ = fn(model, b)
            (loss / n).backward()
            total += float(loss.detach())
        return total / n, {k: p.grad.detach().clone() for k, p in model.named_parameters()}

    return run


@pytest.fixture
def triton_interpreter():
    """``run(script) -> dict``: ``script`` run by a fresh Python with Triton's interpreter (the
    kernels on CPU tensors), returning the JSON its last output line prints. Skips where
    Triton is not installed."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="Triton is installed with the test extra on Linux x86-64")

    def run(script: str) -> dict:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run


@pytest.fixture(scope="session")
def sample_rows() -> list[dict]:
    from trainer_core.demo import sample_dataset_path

    lines = sample_dataset_path().read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture
def small_jsonl(tmp_path, sample_rows) -> Path:
    """48 bundled sample conversations in a fresh file."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sample_rows[:48]), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def http_request():
    """``request(port, method, path, headers=None, body=None, host=None) -> (status, bytes)``
    against a local server, with any Host header (the dashboards check it)."""
    import http.client

    def request(port, method, path, headers=None, body=None, host=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        data = json.dumps(body).encode() if body is not None else b""
        conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        resp = conn.getresponse()
        out = resp.status, resp.read()
        conn.close()
        return out

    return request


@pytest.fixture
def headless_chromium():
    """``make(height=900) -> driver``: Debian's chromium, headless, through selenium (drivers
    quit at teardown). Skips, saying what to install, where chromium, chromedriver or selenium
    is missing (CI installs them: .ci/run)."""
    import os
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("SKIPPED: the dashboard browser tests need Debian's chromium and "
                    "chromium-driver (apt-get install chromium chromium-driver); not found")
    pytest.importorskip("selenium", reason="pip install 'trainer-core[test]' (selenium)")
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must never go online
    os.environ.setdefault("SE_AVOID_STATS", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def make(height: int = 900):
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", f"--window-size=1280,{height}"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
        drivers.append(driver)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return driver

    yield make
    for driver in drivers:
        driver.quit()


@pytest.fixture
def alter_steps(monkeypatch):
    """``alter_steps(fn)``: each step of a run in this test reports ``fn(n, loss, grad_norm)``
    (``n`` counts the steps from 1) instead of its own loss and gradient norm, as a bad batch
    would. The seam is the loop's ``launch_step``."""
    import attrs

    from trainer_core.train import loop

    def install(fn):
        real = loop.launch_step
        count = [0]

        def launch(*args, **kwargs):
            step = real(*args, **kwargs)
            count[0] += 1
            n, inner = count[0], step.wait
            return attrs.evolve(step, wait=lambda: fn(n, *inner()))

        monkeypatch.setattr(loop, "launch_step", launch)

    return install
