"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s plugins``.

torch is pinned to the CPU build that lies on the machines' local disk (``/opt/wheels``); an
unpinned ``torch`` would pull the multi-GB CUDA build from the index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests"]

ROOT = Path(__file__).parent
TORCH = "torch==2.13.0"
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


def _trainer(venv: Path, *args: str) -> str:
    """Run the user venv's ``trainer`` like a user would (no allow-list in the environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRAINER_PLUGINS", "VIRTUAL_ENV")}
    proc = subprocess.run([str(venv / "bin" / "trainer"), *args], capture_output=True, text=True,
                          env=env, cwd=venv.parent, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"trainer {' '.join(args)} exited {proc.returncode}:\n"
                           f"{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _profile_names(table: str) -> set[str]:
    return {line.split()[0] for line in table.splitlines()[1:] if line.strip()}


@nox.session
def plugins(session: nox.Session) -> None:
    """Build the three wheels, install them in a fresh venv as a user would, check discovery."""
    tmp = Path(session.create_tmp()).resolve()
    wheels = tmp / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    for source in (".", *PLUGIN_DIRS):
        session.run("python", "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels),
                    str(ROOT / source))
    built = sorted(wheels.glob("*.whl"))
    names = {w.name.split("-")[0] for w in built}
    if names != {"trainer_core", "trainer_emoji_think", "trainer_regime3"}:
        session.error(f"unexpected wheels: {[w.name for w in built]}")

    venv = tmp / "user-venv"
    shutil.rmtree(venv, ignore_errors=True)
    session.run("python", "-m", "venv", str(venv))
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install"]
    session.run(*pip, TORCH, external=True)
    # The wheel files themselves, and --find-links so the plugins' dependency on trainer-core
    # resolves to the wheel just built (never to an index).
    session.run(*pip, "--find-links", str(wheels), *map(str, built), external=True)

    table = _trainer(venv, "profiles")
    session.log(table)
    found = _profile_names(table)
    missing = {"plain_sft", "emoji_think", "regime3"} - found
    if missing:
        session.error(f"profiles missing after install: {sorted(missing)}")
    statuses = {p["name"]: p["status"] for p in json.loads(_trainer(venv, "plugins", "--json"))}
    session.log(f"plugins: {statuses}")
    if any(s != "ok" for s in statuses.values()):
        session.error(f"a plugin is not ok: {statuses}")

    session.run(str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", "trainer-regime3",
                external=True)
    table = _trainer(venv, "profiles")
    session.log(table)
    found = _profile_names(table)
    if "regime3" in found or "emoji_think" not in found or "plain_sft" not in found:
        session.error(f"after uninstalling trainer-regime3 expected emoji_think but not "
                      f"regime3, got {sorted(found)}")
    session.log("plugins: install, discovery and uninstall behave as expected")
