"""``trainer serve`` through the official ``openai`` client, against live server processes.

One trained run of the demo model (emoji_think, 3 steps) is served by one server for the whole
module (API key, a small queue); a second server follows a daemon home into which the test
publishes models with the daemon's own ``storage.publish`` (running a whole daemon would only
add its training time).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="pip install 'trainer-core[test]' (openai)")
pytest.importorskip("starlette", reason="pip install 'trainer-core[serve]'")
pytest.importorskip("uvicorn", reason="pip install 'trainer-core[serve]'")

KEY = "sk-test-key"
PROMPT = "What is 2 + 2?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())


def start_server(target: Path, log: Path, env: dict, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "trainer_core", "serve", str(target),
                                 "--port", str(port), *args], stdout=fh, stderr=fh, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"trainer serve exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            health(url)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"trainer serve did not answer: {log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return {**os.environ, "TRAINER_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, env) -> Path:
    """The demo model after 3 emoji_think steps: a real run directory."""
    out = tmp_path_factory.mktemp("serve") / "run"
    proc = subprocess.run([sys.executable, "-m", "trainer_core", "run", "--profile",
                           "emoji_think", "--max-steps", "3", "--output-dir", str(out),
                           "--set", "monitoring.num_preview_samples=0", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def server(trained_run, env, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    proc, url = start_server(trained_run, log, env, "--api-key", KEY, "--queue-size", "2",
                             "--max-batch", "4", "--max-tokens-cap", "1000")
    yield url
    stop_server(proc)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(trained_run):
    """``answer(use_processors, n) -> text``: what `trainer generate` answers to PROMPT."""
    from trainer_core.generate.generate import run_generate

    def answer(use_processors: bool, n: int) -> str:
        (record,) = run_generate(str(trained_run), None, PROMPT, None, 1, n, use_processors, {})
        return record["output"]

    return answer


def ask(client, **kw):
    return client.chat.completions.create(
        model="run", messages=[{"role": "user", "content": PROMPT}], **kw)


# ------------------------------------------------------------------------------ chat


def test_models_names_the_profile_and_step(client):
    (card,) = client.models.list().data
    assert card.id == "run"
    assert card.model_extra["profile"] == "emoji_think" and card.model_extra["step"] == 3


def test_chat_answers_like_trainer_generate(client, reference):
    out = ask(client, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert out.model == "run" and out.system_fingerprint == "step-3"
    assert choice.message.role == "assistant"
    # The run's system prompt, template and processors, as `trainer generate` applies them.
    assert choice.message.content == reference(True, 12)
    assert choice.finish_reason in ("stop", "length")
    assert 0 < out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_profile_opt_out(client, reference):
    full = ask(client, max_tokens=12)
    # `trainer generate --no-processors` generates free: no format, no processors.
    no_processors = ask(client, max_tokens=12,
                        extra_body={"profile": {"processors": False, "format": False}})
    assert no_processors.choices[0].message.content == reference(False, 12)
    # Without the profile's prompt, the system prompt is gone from the prompt.
    bare = ask(client, max_tokens=4, extra_body={"profile": False})
    assert bare.usage.prompt_tokens < full.usage.prompt_tokens


def test_stream_sends_chunks_and_usage(client):
    whole = ask(client, max_tokens=16).choices[0].message.content
    stream = ask(client, max_tokens=16, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert {c.system_fingerprint for c in chunks} == {"step-3"}


def test_seeded_sampling_repeats_and_stop_cuts(client):
    a = ask(client, max_tokens=10, temperature=1.0, seed=7, extra_body={"profile": False})
    b = ask(client, max_tokens=10, temperature=1.0, seed=7, extra_body={"profile": False})
    assert a.choices[0].message.content == b.choices[0].message.content
    text = a.choices[0].message.content
    cut = ask(client, max_tokens=10, temperature=1.0, seed=7, stop=[text[3:6]],
              extra_body={"profile": False})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[:text.index(text[3:6])]


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "unit"],
          "properties": {"answer": {"type": "integer"},
                         "unit": {"type": "string", "enum": ["apples", "pears"]}}}


def test_response_format_json_schema(client):
    out = ask(client, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
    value = json.loads(out.choices[0].message.content)  # parses...
    # ... and validates against SCHEMA
    assert set(value) == {"answer", "unit"}
    assert isinstance(value["answer"], int) and not isinstance(value["answer"], bool)
    assert value["unit"] in ("apples", "pears")
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert err.value.param == "response_format"


def test_profile_format_applied_and_opted_out(client, trained_run):
    from trainer_core.generate.generate import generation_setup
    from trainer_core.generate.previews import preview_prompts
    from trainer_core.plugins.answer_format import check_answer
    from trainer_core.plugins.registry import build_profile

    cfg = generation_setup(str(trained_run)).cfg
    profile = build_profile(cfg)
    row = {"messages": [{"role": "user", "content": PROMPT},
                        {"role": "assistant", "content": "(none)"}]}
    prepared = preview_prompts([row], profile, 1, cfg.data.seed)[0]
    fmt = profile.answer_format({"messages": prepared["messages"]})
    assert fmt is not None  # emoji_think instructs a format in the user turn
    held = ask(client, max_tokens=48).choices[0].message.content
    assert check_answer(fmt, held) == (True, "")
    free = ask(client, max_tokens=48, extra_body={"profile": {"format": False}})
    assert check_answer(fmt, free.choices[0].message.content)[0] is False


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("extra, param", [
    ({"bogus": 1}, "bogus"),
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"profile": {"format": "no"}}, "profile.format"),
])
def test_bad_requests_name_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="run", messages=[{"role": "user", "content": "x"}],
                                       extra_body=extra)
    assert err.value.param == param
    assert err.value.type == "invalid_request_error"
    assert "Traceback" not in err.value.message


def test_images_and_unknown_models_are_refused(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="run", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}])
    assert err.value.param == "messages[0].content" and "not supported" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user",
                                                                   "content": "x"}])


def test_api_key_is_required(server, http_request):
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, body = http_request(int(server.rsplit(":", 1)[1]), "POST", "/v1/chat/completions",
                                body={"model": "run", "messages": []})
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert health(server)["status"] == "ok"  # /health needs no key


def test_oversized_body_is_refused(server, http_request):
    port = int(server.rsplit(":", 1)[1])
    status, body = http_request(port, "POST", "/v1/chat/completions",
                                headers={"Authorization": f"Bearer {KEY}",
                                         "Content-Type": "application/json"},
                                body={"model": "run", "messages": [
                                    {"role": "user", "content": "x" * (5 << 20)}]})
    assert status == 413 and "over" in json.loads(body)["error"]["message"]


def test_cross_site_requests_are_refused(server, http_request):
    port = int(server.rsplit(":", 1)[1])
    chat = {"model": "run", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    # A form post (no CORS preflight) is not JSON to this server.
    status, body = http_request(port, "POST", "/v1/chat/completions", body=chat, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"})
    assert status == 415, body
    # DNS rebinding: a loopback server answers loopback host names only.
    status, body = http_request(port, "POST", "/v1/chat/completions", body=chat,
                                host="evil.example:80", headers={
                                    "Authorization": f"Bearer {KEY}",
                                    "Content-Type": "application/json"})
    assert status == 403 and json.loads(body)["error"]["message"] == "forbidden host"


def test_full_queue_answers_429(client, server):
    # The server keeps 2 waiting requests; 12 at once cannot all wait.
    outcomes: list[str] = []

    def one():
        try:
            ask(client, max_tokens=100, extra_body={"profile": False})
            outcomes.append("ok")
        except openai.RateLimitError as exc:
            assert exc.code == "queue_full"
            outcomes.append("429")

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "429" in outcomes and "ok" in outcomes, outcomes


def test_disconnected_client_stops_its_row(client, server):
    before = health(server)["tokens_generated"]
    stream = ask(client, max_tokens=1000, stream=True, extra_body={"profile": False})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.time() + 120
    while health(server)["generating"] and time.time() < deadline:
        time.sleep(0.1)
    # The row ended long before its 1000 tokens: the work stopped with the client.
    assert health(server)["tokens_generated"] - before < 1000


def test_non_loopback_needs_an_api_key(trained_run):
    from click.testing import CliRunner

    from trainer_core.cli import cli

    result = CliRunner().invoke(cli, ["serve", str(trained_run), "--host", "0.0.0.0"],
                                env={"TRAINER_SERVE_API_KEY": ""})
    assert result.exit_code == 2 and "--api-key" in result.output


# ------------------------------------------------------------------------------ a daemon home


def fake_checkpoint(run: Path, where: Path, step: int) -> Path:
    """A daemon checkpoint folder holding ``run``'s model (what storage.publish reads)."""
    ckpt = where / f"step-{step:06d}"
    ckpt.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy2(run / name, ckpt / name)
    (ckpt / "trainer_state.json").write_text("{}")
    return ckpt


def test_daemon_home_swaps_models_while_clients_stream(trained_run, env, tmp_path):
    from trainer_core.daemon import storage
    from trainer_core.daemon.home import Home

    home = Home(tmp_path / "home")
    home.create()
    home.tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (trained_run / name).exists():
            shutil.copy2(trained_run / name, home.tokenizer / name)
    shutil.copy2(trained_run / "trainer_config.json", home.config)
    storage.publish(home, fake_checkpoint(trained_run, home.checkpoints, 1))
    proc, url = start_server(home.root, tmp_path / "serve.log", env)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                               timeout=300)
        swapped = threading.Event()
        done = threading.Event()
        seen: list[tuple[bool, set[str]]] = []  # (asked after the swap, fingerprints)
        failures: list[BaseException] = []

        def stream_forever():
            try:
                while not done.is_set():
                    after = swapped.is_set()
                    chunks = list(client.chat.completions.create(
                        model="home", messages=[{"role": "user", "content": PROMPT}],
                        max_tokens=12, stream=True))
                    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
                    seen.append((after, {c.system_fingerprint for c in chunks}))
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=stream_forever) for _ in range(8)]
        for t in threads:
            t.start()
        while len(seen) < 8 and not failures:
            time.sleep(0.1)
        storage.publish(home, fake_checkpoint(trained_run, home.checkpoints, 2))
        deadline = time.time() + 300
        while health(url)["step"] != 2 and time.time() < deadline and not failures:
            time.sleep(0.2)
        swapped.set()
        count = len(seen)
        while len(seen) < count + 16 and not failures and time.time() < deadline:
            time.sleep(0.1)
        done.set()
        for t in threads:
            t.join()
    finally:
        stop_server(proc)
    assert not failures, failures
    assert all(len(fps) == 1 for _, fps in seen)  # one model per response
    assert {"step-1"} in [fps for after, fps in seen if not after]
    after = [fps for was_after, fps in seen if was_after]
    assert after and all(fps == {"step-2"} for fps in after)


# ------------------------------------------------------------------------------ in process


def test_row_masked_keeps_opted_out_rows_unchanged():
    import torch

    from trainer_core.serve.engine import RowMasked

    def bump(_ids, scores):
        scores[:, 0] += 100.0  # in place, as some processors do
        return scores

    scores = torch.zeros(2, 4)
    out = RowMasked(bump, [True, False])(torch.zeros(2, 3, dtype=torch.long), scores)
    assert out[0, 0] == 100.0 and out[1, 0] == 0.0 and scores[0, 0] == 0.0


def test_remote_previews_through_a_server(server, trained_run, monkeypatch):
    from trainer_core.generate.remote import remote_generate, served_model

    monkeypatch.setenv("TRAINER_SERVE_API_KEY", KEY)
    assert served_model(server)["step"] == 3
    outs = remote_generate(server, [[{"role": "user", "content": PROMPT}]] * 2, 6)
    assert len(outs) == 2 and len(set(outs)) == 1 and outs[0]
    monkeypatch.setenv("TRAINER_SERVE_API_KEY", "wrong")
    with pytest.raises(RuntimeError, match="HTTP 401"):
        remote_generate(server, [[{"role": "user", "content": PROMPT}]], 6)


def test_one_batch_mixes_rows_with_and_without_processors(trained_run, trainer_plugin):
    """Two requests generated as one batch: the one that opted out of processors is not
    touched by them, the other is (a plugin's processor forces one token)."""
    import asyncio

    import transformers

    from trainer_core import hookimpl
    from trainer_core.serve.api import parse_chat_request
    from trainer_core.serve.engine import Batcher, Job, ModelSource, Target

    class ForceZ(transformers.LogitsProcessor):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores):
            out = scores.clone()
            out[:, self.token] = out.max() + 10.0
            return out

    class Plugin:
        @hookimpl
        def logits_processors(self, profile, tokenizer, config):
            return [ForceZ(tokenizer.convert_tokens_to_ids("Z"))]

    trainer_plugin(Plugin(), "force-z")
    batcher = Batcher(ModelSource(Target.of(str(trained_run))), max_batch=4)

    async def answers():
        loop = asyncio.get_running_loop()
        jobs = [Job(parse_chat_request({"model": "run", "max_tokens": 5, "messages": [
                    {"role": "user", "content": PROMPT}], "profile": profile}), loop)
                for profile in ({"processors": True, "format": False},
                                {"processors": False, "format": False})]
        for job in jobs:
            batcher.jobs.put_nowait(job)  # both wait before the worker starts: one batch
        batcher.start()
        out = []
        for job in jobs:
            text = ""
            while (event := await job.events.get())[0] != "end":
                assert event[0] in ("start", "delta"), event
                text += event[1] if event[0] == "delta" else ""
            out.append(text)
        batcher.stop()
        return out

    forced, free = asyncio.run(answers())
    batcher._thread.join(timeout=120)
    assert batcher.batches == 1
    assert forced == "ZZZZZ"
    assert free and "Z" not in free


def test_run_previews_use_the_preview_backend(server, client, qwen_tokenizer, monkeypatch):
    from trainer_core.config import resolve
    from trainer_core.errors import ConfigError
    from trainer_core.generate.previews import run_previews
    from trainer_core.plugins.registry import build_profile

    class NoModel:  # the server generates: the run's own model is never called
        training = True

        def eval(self):
            self.training = False

        def train(self, mode=True):
            self.training = mode

    monkeypatch.setenv("TRAINER_SERVE_API_KEY", KEY)
    cfg = resolve(cli={"monitoring.preview_backend": server,
                       "monitoring.max_new_tokens": 6}).config
    messages = [{"role": "user", "content": PROMPT}]
    prompts = [{"messages": messages, "reference": "4",
                "example": {"messages": [*messages, {"role": "assistant", "content": "4"}]}}]
    model = NoModel()
    records, _ = run_previews(model, qwen_tokenizer, build_profile(cfg), prompts, cfg, 5)
    served = ask(client, max_tokens=6, extra_body={"profile": {"prompt": False}})
    assert records[0]["step"] == 5 and records[0]["output"] == served.choices[0].message.content
    assert model.training  # put back as it was
    with pytest.raises(ConfigError, match="preview_backend"):
        resolve(cli={"monitoring.preview_backend": "ftp://host"})


def test_incremental_decoding_gives_the_whole_text(qwen_tokenizer):
    """Rows decode only their last tokens per step; the text must equal a full decode,
    characters split across tokens included."""
    import random

    from trainer_core.serve.engine import Row

    rng = random.Random(0)
    samples = ["🤔🤔🤔\nThe answer is 4.\n🛑🛑🛑", "héllo wörld — ✓ 中文字符 😀😀", "a b  c\n\n\tx"]
    cases = [qwen_tokenizer(t, add_special_tokens=False)["input_ids"] for t in samples]
    cases += [[rng.randrange(151643) for _ in range(40)] for _ in range(10)]
    for ids in cases:
        row = Row(None, 0, 100, [], 0.0, 1.0, None)
        partial = [row.add(qwen_tokenizer, i) for i in ids]
        full = qwen_tokenizer.decode(ids, skip_special_tokens=True)
        assert row.text(qwen_tokenizer) == full
        assert all(full.startswith(p) and "\ufffd" not in p[-1:] for p in partial)
