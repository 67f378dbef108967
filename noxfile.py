"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s plugins``.

torch is pinned to the CPU build that lies on the machines' local disk (``/opt/wheels``); an
unpinned ``torch`` would pull the multi-GB CUDA build from the index.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests"]

ROOT = Path(__file__).parent
TORCH = "torch==2.13.0"
HATCHLING = "hatchling>=1.21"
PLUGIN_DIRS = ("plugins/emoji_think", "plugins/regime3")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite of the core and both plugins (pytest arguments after ``--``)."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    for plugin in PLUGIN_DIRS:
        session.install("-e", plugin)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", "src", "tests", "plugins", "bench", *session.posargs)


@nox.session
def typecheck(session: nox.Session) -> None:
    # The light, typed dependencies; torch and transformers are left out (imports of them are
    # treated as Any through ignore_missing_imports in pyproject.toml).
    session.install("mypy>=1.10", "attrs>=23.2", "cattrs>=24.1", "click>=8.1", "pluggy>=1.5",
                    "pytest>=8")
    session.run("mypy", "src/", *session.posargs)


def _trainer_proc(venv: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the user venv's ``trainer`` like a user would (no allow-list in the environment)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRAINER_PLUGINS", "VIRTUAL_ENV", "PYTHONPATH")}
    env["TRAINER_CACHE"] = str(venv.parent / "trainer-cache")
    return subprocess.run([str(venv / "bin" / "trainer"), *args], capture_output=True, text=True,
                          env=env, cwd=venv.parent, timeout=300)


def _trainer(venv: Path, *args: str) -> str:
    proc = _trainer_proc(venv, *args)
    if proc.returncode != 0:
        raise RuntimeError(f"trainer {' '.join(args)} exited {proc.returncode}:\n"
                           f"{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _profile_names(table: str) -> set[str]:
    return {line.split()[0] for line in table.splitlines()[1:] if line.strip()}


def readme_plugin_example(readme: Path, dest: Path) -> list[Path]:
    """Write the files of README's "Writing a profile plugin" example under ``dest``: every
    fenced block of that section whose first line is a ``# path`` comment."""
    text = readme.read_text(encoding="utf-8")
    section = text.split("## Writing a profile plugin", 1)[1].split("\n## ", 1)[0]
    written = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", section, re.MULTILINE | re.DOTALL):
        first = block.splitlines()[0]
        match = re.fullmatch(r"# ([\w./-]+\.(?:py|toml))", first)
        if match:
            path = dest / match[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block, encoding="utf-8")
            written.append(path)
    return written


@nox.session
def plugins(session: nox.Session) -> None:
    """Build the three wheels and install them in a fresh venv as a user would, with the
    README's plugin example and a `trainer new-profile` plugin; check discovery, preview (the
    system prompt shows), a 5-step run, the new plugin's own tests, requirements, the
    missing-plugin message and uninstalling."""
    started = time.time()

    def step(what: str) -> None:
        session.log(f"[{time.time() - started:6.1f} s] {what}")

    tmp = Path(session.create_tmp()).resolve()
    wheels = tmp / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    # One build backend installed once instead of an isolated build environment per package.
    session.install(HATCHLING)
    session.run("python", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--wheel-dir", str(wheels), *(str(ROOT / s) for s in (".", *PLUGIN_DIRS)))
    step("wheels built")
    built = sorted(wheels.glob("*.whl"))
    names = {w.name.split("-")[0] for w in built}
    if names != {"trainer_core", "trainer_emoji_think", "trainer_regime3"}:
        session.error(f"unexpected wheels: {[w.name for w in built]}")

    venv = tmp / "user-venv"
    for folder in (venv, tmp / "trainer-cache", tmp / "new", tmp / "readme-example",
                   tmp / "run"):
        shutil.rmtree(folder, ignore_errors=True)
    session.run("python", "-m", "venv", str(venv))
    # --no-compile: byte-compiling all of torch and transformers up front costs minutes on a
    # small CPU box; Python compiles the modules actually imported on first use.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-compile"]
    # The wheel files themselves, and --find-links so the plugins' dependency on trainer-core
    # resolves to the wheel just built (never to an index); pytest for the new plugin's tests,
    # hatchling to build the two source plugins below.
    session.run(*pip, TORCH, "pytest>=8", HATCHLING, "--find-links", str(wheels),
                *map(str, built), external=True)
    step("user venv ready")

    # An outside author's two plugins: the README example as written, and new-profile's output.
    example = readme_plugin_example(ROOT / "README.md", tmp / "readme-example")
    if sorted(p.name for p in example) != ["__init__.py", "pyproject.toml"]:
        session.error(f"README plugin example not found: {example}")
    session.log(_trainer(venv, "new-profile", "nox_probe", "--dir", str(tmp / "new")))
    probe = tmp / "new" / "trainer-nox-probe"
    session.run(*pip, "--no-build-isolation", "--find-links", str(wheels),
                str(tmp / "readme-example"), str(probe), external=True)
    step("README example and new-profile plugin installed")

    table = _trainer(venv, "profiles")
    session.log(table)
    found = _profile_names(table)
    missing = {"plain_sft", "emoji_think", "regime3", "shout", "nox_probe"} - found
    if missing:
        session.error(f"profiles missing after install: {sorted(missing)}")
    statuses = {p["name"]: p["status"] for p in json.loads(_trainer(venv, "plugins", "--json"))}
    session.log(f"plugins: {statuses}")
    if any(s != "ok" for s in statuses.values()):
        session.error(f"a plugin is not ok: {statuses}")

    for profile, prompt in (("shout", "Answer loudly."),
                            ("nox_probe", "You are a helpful assistant.")):
        shown = _trainer(venv, "preview", "--profile", profile, "-n", "1", "--no-color")
        session.log(shown)
        if prompt not in shown or "[[" not in shown:
            session.error(f"preview --profile {profile}: system prompt {prompt!r} or trained "
                          "tokens not shown")
    run_dir = tmp / "run"
    summary = json.loads(_trainer(venv, "run", "--profile", "nox_probe", "--max-steps", "5",
                                  "--output-dir", str(run_dir), "--quiet", "--json"))
    if summary["state"] != "completed" or summary["steps_done"] != 5:
        session.error(f"5-step run did not complete: {summary}")
    step(f"5-step run: loss {summary['loss_start']:.3f} -> {summary['loss_end']:.3f}")
    # The generated plugin's own tests pass against the installed trainer-core.
    session.run(str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                str(probe), external=True, env={"TRAINER_CACHE": str(tmp / "trainer-cache")})
    step("new plugin's tests passed")

    pins = _trainer(venv, "plugins", "--requirements", "--run", str(run_dir)).splitlines()
    session.log(f"requirements of the run: {pins}")
    if "trainer-nox-probe==0.1.0" not in pins:
        session.error(f"run.json's requirements lack trainer-nox-probe==0.1.0: {pins}")
    session.run(str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", "trainer-nox-probe",
                "trainer-regime3", external=True)
    gone = _trainer_proc(venv, "generate", "--model", str(run_dir), "--prompt", "hi")
    hint = "run.json says trainer-nox-probe 0.1.0; pip install trainer-nox-probe==0.1.0"
    if gone.returncode != 2 or hint not in gone.stderr:
        session.error(f"missing-plugin message not shown: {gone.returncode} {gone.stderr}")
    table = _trainer(venv, "profiles")
    session.log(table)
    found = _profile_names(table)
    if "regime3" in found or "emoji_think" not in found or "plain_sft" not in found:
        session.error(f"after uninstalling trainer-regime3 expected emoji_think but not "
                      f"regime3, got {sorted(found)}")
    step("plugins: install, discovery, preview, run, requirements and uninstall behave as "
         "expected")
