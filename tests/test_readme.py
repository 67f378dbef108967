"""Every shell command in the README's user sections runs as printed, so the README cannot
drift from the code.

The runner extracts the commands of every fenced ``bash``/``sh``/``console`` block of every
``## `` section except :data:`NOT_USER` (sections added later are user sections and are run
too), splits ``a && b`` into its parts and runs each part with bash, in README order, in one
scratch directory that has the repository's ``src/`` and ``plugins/`` and this environment as
``.venv``. So the commands share state as a reader's would: the demo run of "Install and first
run" is the ``runs/latest`` that later commands use. Only :data:`SKIP` (each with its reason)
is not run; a command that needs an optional extra may be skipped only by naming it there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: Sections for developers, not users: their commands are not run here.
NOT_USER = {"Layout", "Development", "Internals and measurements"}

#: Commands (exact text after `&&` splitting) that are not run, with why.
SKIP = {
    "python3 -m venv .venv":
        "creates the venv this test runs in; .ci/run runs the install on a fresh machine",
    ".venv/bin/pip install torch==2.13.0 -e . -e plugins/emoji_think -e plugins/regime3":
        "installs into the venv; .ci/run runs it on a fresh machine",
    '.venv/bin/pip install -e ".[test]"':
        "installs into the venv; .ci/run runs it",
    ".venv/bin/python -m pytest":
        "the test suite this test is part of",
    ".venv/bin/trainer run --nproc 4 --config run.json":
        "needs 4 GPUs and a run.json; tests/test_distributed.py launches the same on the CPU",
    ".venv/bin/torchrun --standalone --nproc-per-node=4 -m trainer_core run --config run.json":
        "needs 4 GPUs and a run.json; tests/test_distributed.py runs torchrun on the CPU",
}

#: The first run: it must end clean, with no active alert (the demo used to end with two) and
#: the next steps printed. (.ci/run runs it in full and checks the same.)
DEMO = ".venv/bin/trainer run --profile emoji_think"
#: Every `trainer run` without --dry-run or a --max-steps of its own gets this many steps (the
#: demo's full 238 take 80 s on 2 idle cores, and many minutes on a busy machine).
SHORT_STEPS = 30
#: Commands that serve until stopped: started, checked for this text, left running while the
#: rest of their section's commands run (a `curl` to the server, say), then stopped.
SERVES = {".venv/bin/trainer dashboard runs": "http://127.0.0.1:",
          ".venv/bin/trainer serve runs/latest --name demo": "http://127.0.0.1:8765"}
#: What a command may start with: the venv's programs, and curl to talk to a server above.
PROGRAMS = (".venv/bin/", "python3 -m venv", "curl ")


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"(?m)^(?=## )", text)
    return {p.splitlines()[0][3:].strip(): p for p in parts[1:]}


def block_commands(block: str, console: bool) -> list[str]:
    """The commands of one fenced block: continuation lines joined, comment lines dropped;
    in a console block only the ``$ `` lines."""
    text = re.sub(r"\s*\\\n\s*", " ", block)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if console:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"\s+#[^'\"]*$", "", line)  # a trailing comment
        out.extend(part.strip() for part in line.split(" && "))
    return out


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(section, command) for every command of the user sections, in README order."""
    found = []
    for title, body in sections(text).items():
        if title in NOT_USER:
            continue
        for lang, block in re.findall(r"(?ms)^```(\w*)\n(.*?)^```", body):
            if lang in ("bash", "sh", "shell", "console"):
                found.extend((title, c) for c in block_commands(block, lang == "console"))
    return found


def test_the_runner_reads_the_readme_as_written():
    text = README.read_text(encoding="utf-8")
    commands = [c for _, c in readme_commands(text)]
    assert DEMO in commands and "python3 -m venv .venv" in commands
    assert all(c.startswith(PROGRAMS) for c in commands), \
        [c for c in commands if not c.startswith(PROGRAMS)]
    stale = [c for c in SKIP if c not in commands]
    assert not stale, f"SKIP lists commands the README no longer has: {stale}"
    assert block_commands("a \\\n  b && c  # note\n# only a comment\n", False) == ["a b", "c"]
    assert block_commands("$ x --y\noutput line\n", True) == ["x --y"]


def test_ci_runs_the_readme_s_two_commands_exactly():
    install = sections(README.read_text(encoding="utf-8"))["Install and first run"]
    block = re.search(r"(?ms)^```bash\n(.*?)^```", install)[1]
    lines = [x for x in block.splitlines() if x.strip() and not x.startswith("#")]
    assert len(lines) == 2
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert all(line in ci for line in lines)


def _shortened(command: str) -> str:
    if (command.startswith(".venv/bin/trainer run ")
            and "--dry-run" not in command and "--max-steps" not in command):
        return f"{command} --max-steps {SHORT_STEPS}"
    return command


def _serve(command: str, expect: str, env: dict, cwd: Path) -> subprocess.Popen:
    """Start a serving command and wait until it prints ``expect``; the caller stops it."""
    log = cwd / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while expect not in log.read_text() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    seen = log.read_text()
    if "Address already in use" in seen:  # another program holds the port on this machine
        return proc
    if expect not in seen:
        _stop(proc)
    assert expect in seen, f"{command}: {seen}"
    port = re.search(r":(\d+)$", expect)
    if port:  # said before it listens: wait until it accepts connections
        import socket

        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", int(port[1]))) == 0:
                    break
            time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.executable).parent.parent)
    for name in ("src", "plugins"):
        (work / name).symlink_to(ROOT / name)
    env = {**os.environ, "TRAINER_CACHE": str(tmp_path / "cache"), "NO_COLOR": "1"}
    env.pop("TRAINER_PLUGINS", None)  # the installed plugins, as a user has them
    ran, skipped = [], []
    server, server_section = None, None
    try:
        for section, command in readme_commands(README.read_text(encoding="utf-8")):
            if server is not None and section != server_section:
                _stop(server)
                server = None
            if command in SKIP:
                skipped.append(command)
                continue
            if command in SERVES:
                _stop(server)
                server, server_section = _serve(command, SERVES[command], env, work), section
                ran.append(command)
                continue
            proc = subprocess.run(["bash", "-c", _shortened(command)], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, (f"README section {section!r}: {command} exited "
                                          f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}")
            ran.append(command)
            if command == DEMO:
                # the first run ends clean: no active alert, a next: block, latest points at it
                status = json.loads((work / "runs" / "latest" / "status.json").read_text())
                assert status["state"] == "completed" and status["alerts"] == [], \
                    status["alerts"]
                assert "\nnext:\n" in proc.stderr and "alert raised" not in proc.stderr
    finally:
        _stop(server)
    assert DEMO in ran and len(ran) >= 15, ran
    assert sorted(skipped) == sorted(SKIP)
