"""The plugin contract (v2): declaration checked at registration, the core applies the system
prompt, validate() follows data.on_invalid, one route for processors, test helpers, new-profile,
plugin operations (requirements, tracing, missing-plugin hint) and one test per hookspec.

datasette's rule: every hookspec has a test here named ``test_hook_<name>`` and an entry in
docs/plugins.md; ``test_every_hookspec_has_a_test_and_docs`` fails when either is missing.
"""

from __future__ import annotations

import ast
import datetime as dt
import inspect
import json
import os
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import ClassVar

import attrs
import click
import pytest
from click.testing import CliRunner

from trainer_core import Profile, check_answer, hookimpl, hookspecs
from trainer_core.cli import cli
from trainer_core.config import TrainerConfig, resolve
from trainer_core.data.chat import IGNORE_INDEX
from trainer_core.data.preprocess import preprocess
from trainer_core.errors import DataError, UserError
from trainer_core.monitor.events import RunListener
from trainer_core.plugins.profile import PlainSFT
from trainer_core.plugins.registry import (
    ALLOW_ENV,
    TRACE_ENV,
    collect_logits_processors,
    get_profile_class,
    get_registry,
    reset_registry,
)
from trainer_core.testing import check_profile, registered_plugin, run_trainer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"
DAY = dt.date(2025, 1, 2)


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "")  # only the built-in plugin is discovered
    reset_registry()
    yield
    reset_registry()


class Plugin:
    """A plugin object registering the given profile classes."""

    def __init__(self, *classes: type) -> None:
        self.classes = classes

    @hookimpl
    def register_profiles(self, register):
        for cls in self.classes:
            register(cls)


def plugins_json() -> dict[str, dict]:
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    return {p["name"]: p for p in json.loads(result.stdout)}


def chat(question: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}


# --------------------------------------------------------------------------- declaration


class Dated(Profile, name="dated", version="2", description="Only a system prompt."):
    """A profile that does nothing but return a system prompt: the core must apply it."""

    def system_prompt(self, today):
        return f"Today is {today.isoformat()}. Be brief."


class Keeper(Profile, name="keeper", version="1", system_prompt_mode="keep"):
    def system_prompt(self, today):
        return "KEEPER PROMPT"


class WithOptions(Profile, name="with_options", version="1"):
    @attrs.frozen
    class Options:
        prompt: str = "from options"
        system_prompt_mode: str = "replace"

    def system_prompt(self, today):
        return self.options.prompt


def test_v2_declaration_is_stated_once_and_registers(trainer_plugin):
    check_profile(Dated)
    trainer_plugin(Plugin(Dated, WithOptions), "v2-plugin")
    assert get_profile_class("dated") is Dated
    assert (Dated.name, Dated.version, Dated.description) == ("dated", "2", "Only a system prompt.")
    profile = get_profile_class("with_options").from_options({"prompt": "hi"})
    assert profile.options.prompt == "hi" and WithOptions().options.prompt == "from options"
    with pytest.raises(UserError, match=r"profile.options.promt: unknown key"):
        WithOptions.from_options({"promt": "x"})
    info = plugins_json()["v2-plugin"]
    assert info["status"] == "ok" and info["notes"] == []


def _shadowed_name():
    @attrs.define(frozen=True)
    class Typed(Profile):
        name: str = "typed"  # natural in typed code: makes `name` an attrs field
        version: ClassVar[str] = "1"

    return Typed


def _no_version():
    class NoVersion(Profile, name="no_version"):
        pass

    return NoVersion


def _bad_options():
    class BadOptions(Profile, name="bad_options", version="1"):
        class Options:  # not an attrs class
            x: int = 1

    return BadOptions


def _bad_mode():
    class BadMode(Profile, name="bad_mode", version="1", system_prompt_mode="always"):
        pass

    return BadMode


def _empty_name():
    class Empty(Profile, name="", version="1"):
        pass

    return Empty


@pytest.mark.parametrize(("make", "reason"), [
    (_shadowed_name, r"name must be a string, got member_descriptor .*made it an attrs field"),
    (_no_version, r"no version"),
    (_bad_options, r"Options must be an attrs class"),
    (_bad_mode, r"system_prompt_mode must be one of replace, keep, none, got 'always'"),
    (_empty_name, r"name must be letters, digits"),
    (lambda: dict, r"register\(\) takes a Profile subclass"),
])
def test_contract_violation_marks_the_plugin_broken(trainer_plugin, make, reason):
    cls = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        trainer_plugin(Plugin(cls), "bad-plugin")
    trainer_plugin(Plugin(Dated), "good-plugin")
    info = plugins_json()["bad-plugin"]
    assert info["status"] == "broken"
    assert info["error"].startswith("register_profiles: ")
    assert re.search(reason, info["error"]), info["error"]
    table = CliRunner().invoke(cli, ["plugins"])
    assert "broken: register_profiles:" in table.stdout
    assert set(get_registry().profiles) == {"plain_sft", "dated"}  # others unaffected


@attrs.define(frozen=True)
class V1Options:
    word: str = "hi"


@attrs.define(frozen=True)
class V1Profile(Profile):
    name: ClassVar[str] = "v1_profile"
    version: ClassVar[str] = "3"
    description: ClassVar[str] = "Declared the old way."
    Options: ClassVar[type] = V1Options

    options: V1Options = attrs.field(factory=V1Options, kw_only=True)

    def system_prompt(self, today):
        return "v1 prompt"


def test_v1_declaration_still_works_with_a_deprecation_warning(trainer_plugin):
    with pytest.warns(DeprecationWarning) as caught:
        trainer_plugin(Plugin(V1Profile), "v1-plugin")
    messages = [str(w.message) for w in caught]
    assert any("V1Profile: v1 declaration (class attributes" in m for m in messages)
    assert any("declares an `options` attrs field" in m for m in messages)
    profile = get_profile_class("v1_profile").from_options({"word": "yo"})
    assert profile.options.word == "yo"
    assert profile.prepare(chat("Q", "A"), 0, random.Random(0))["messages"][0] == {
        "role": "system", "content": "v1 prompt"}
    info = plugins_json()["v1-plugin"]
    assert info["status"] == "ok" and len(info["notes"]) == 2
    assert "deprecated" in CliRunner().invoke(cli, ["plugins"]).stdout
    with pytest.raises(AssertionError, match="v1 declaration"):
        check_profile(V1Profile)


def test_shipped_profiles_use_the_v2_declaration():
    check_profile(PlainSFT)
    emoji = pytest.importorskip("trainer_emoji_think.profile")
    regime3 = pytest.importorskip("trainer_regime3.plugin")
    check_profile(emoji.EmojiThink)
    check_profile(regime3.Regime3)


# --------------------------------------------------------------------------- system prompt


def test_core_applies_the_system_prompt_per_mode():
    rng = random.Random(0)
    dated = Dated(today=DAY)
    out = dated.prepare(chat("Q", "A", system="own"), 0, rng)
    assert out["messages"][0] == {"role": "system", "content": "Today is 2025-01-02. Be brief."}
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant"]  # replaced
    kept = Keeper().prepare(chat("Q", "A", system="own"), 0, rng)
    assert kept["messages"][0]["content"] == "own"  # declared mode "keep"
    assert Keeper().prepare(chat("Q", "A"), 0, rng)["messages"][0]["content"] == "KEEPER PROMPT"
    # An options field named system_prompt_mode wins over the declared mode.
    none = WithOptions.from_options({"system_prompt_mode": "none"})
    assert none.prepare(chat("Q", "A"), 0, rng) == chat("Q", "A")


def test_system_prompt_reaches_training_preview_and_generation(trainer_plugin, qwen_tokenizer,
                                                               tmp_path):
    from trainer_core.data.preview import preview_examples
    from trainer_core.generate.previews import preview_prompts

    trainer_plugin(Plugin(Dated), "dated-plugin")
    rows = [{**chat("What is 2 + 2?", "4"), "_line": 1}]
    profile = Dated(today=DAY)
    ds, _ = preprocess(rows, profile, qwen_tokenizer, "chatml", 256, 0, False, tmp_path)
    text = qwen_tokenizer.decode(ds[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nToday is 2025-01-02. Be brief.<|im_end|>")
    trained = qwen_tokenizer.decode([t for t in ds[0]["labels"] if t != IGNORE_INDEX])
    assert "Be brief" not in trained  # the system prompt is context, not a target
    shown = preview_examples(rows, profile, qwen_tokenizer, "chatml", 1, 0)
    assert "Today is 2025-01-02. Be brief." in shown
    prompt = preview_prompts(rows, profile, 1, 0)[0]
    assert prompt["messages"][0] == {"role": "system", "content": "Today is 2025-01-02. Be brief."}
    cli_preview = run_trainer("preview", "--profile", "dated", "-n", "1", "--no-color")
    assert cli_preview.exit_code == 0, cli_preview.output
    assert f"Today is {dt.date.today().isoformat()}. Be brief." in cli_preview.stdout


# --------------------------------------------------------------------------- validate()


class Suffixed(Profile, name="suffixed", version="1"):
    """Appends ' END' to answers; validate rejects answers without it (so it must see the
    transformed row) and answers containing FORBIDDEN."""

    def transform(self, example, index, rng):
        out = super().transform(example, index, rng)
        out["messages"][-1]["content"] += " END"
        return out

    def validate(self, example):
        answer = example["messages"][-1]["content"]
        problems = [] if answer.endswith(" END") else ["messages[-1].content: not transformed"]
        if "FORBIDDEN" in answer:
            problems.append("messages[-1].content: contains FORBIDDEN")
        return problems


class Raising(Profile, name="raising", version="1"):
    def validate(self, example):
        raise KeyError("metadata")


def _rows(*answers: str) -> list[dict]:
    return [{**chat("q", a), "_line": i + 1} for i, a in enumerate(answers)]


def test_validate_sees_the_transformed_row_and_follows_on_invalid(qwen_tokenizer, tmp_path):
    rows = _rows("fine", "FORBIDDEN one", "ok")
    ds, stats = preprocess(rows, Suffixed(), qwen_tokenizer, "chatml", 256, 0, False, tmp_path,
                           source="train.jsonl", on_invalid="skip")
    assert len(ds) == 2 and stats.dropped == {"profile_invalid": 1}
    assert stats.problems == ["train.jsonl:2: messages[-1].content: contains FORBIDDEN"]
    # "error": the same rows stop the run, named by line, also when the result is cached.
    for _ in range(2):
        with pytest.raises(DataError) as info:
            preprocess(rows, Suffixed(), qwen_tokenizer, "chatml", 256, 0, False, tmp_path,
                       source="train.jsonl", on_invalid="error")
        lines = str(info.value).splitlines()
        assert lines[0].startswith("train.jsonl: 1 row rejected by profile 'suffixed'")
        assert "data.on_invalid: skip" in lines[0]
        assert lines[1:] == ["train.jsonl:2: messages[-1].content: contains FORBIDDEN"]


def test_an_exception_in_validate_is_a_named_error(qwen_tokenizer, tmp_path):
    with pytest.raises(UserError) as info:
        preprocess(_rows("a"), Raising(), qwen_tokenizer, "chatml", 256, 0, False, tmp_path,
                   source="train.jsonl")
    assert str(info.value) == ("train.jsonl:1: profile 'raising' (plugin "
                               "'tests.test_plugin_contract') failed to validate the row: "
                               "KeyError('metadata')")


def _jsonl(path: Path, *answers: str) -> Path:
    path.write_text("".join(json.dumps(chat(f"q{i}", a)) + "\n" for i, a in enumerate(answers)),
                    encoding="utf-8")
    return path


def test_validate_rejections_in_run_and_dry_run(trainer_plugin, micro_model_dir, tmp_path,
                                                monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    trainer_plugin(Plugin(Suffixed, Raising), "validate-plugin")
    data = _jsonl(tmp_path / "train.jsonl", *(["fine"] * 6 + ["FORBIDDEN"] + ["ok"] * 5))
    base = ["run", "--model", str(micro_model_dir), "--dataset", str(data), "--output-dir",
            str(tmp_path / "out"), "--dry-run", "--set", "data.validation_split=0"]
    failed = run_trainer(*base, "--profile", "suffixed")
    assert failed.exit_code == 2
    assert failed.stderr.startswith(f"error: {data}: 1 row rejected by profile 'suffixed'")
    assert f"{data}:7: messages[-1].content: contains FORBIDDEN" in failed.stderr
    skipped = run_trainer(*base, "--profile", "suffixed", "--set", "data.on_invalid=skip")
    assert skipped.exit_code == 0, skipped.output
    assert "dropped: profile_invalid 1" in skipped.stderr
    assert f"dropped row  {data}:7: messages[-1].content: contains FORBIDDEN" in skipped.stderr
    raising = run_trainer(*base, "--profile", "raising")
    assert raising.exit_code == 2 and "Traceback" not in raising.output
    assert raising.stderr == (f"error: {data}:1: profile 'raising' (plugin 'validate-plugin') "
                              "failed to validate the row: KeyError('metadata')\n")


# --------------------------------------------------------------------------- processors


class OwnProcessors(Profile, name="own", version="1"):
    def logits_processors(self, tokenizer, config):
        return ["own-1"]


class CrossCutting:
    calls: ClassVar[list[str]] = []

    @hookimpl
    def logits_processors(self, profile, tokenizer, config):
        CrossCutting.calls.append(profile.name)
        return ["everyone"]


def test_processors_have_one_route(trainer_plugin):
    trainer_plugin(Plugin(OwnProcessors), "own-plugin")
    cfg = TrainerConfig()
    # Without a hook implementation a profile's processors come from its method, once.
    assert collect_logits_processors(OwnProcessors(), "TOK", cfg) == ["own-1"]
    assert "logits_processors" not in get_registry().plugins["trainer_core.plugins.builtin"].hooks
    trainer_plugin(CrossCutting(), "cross-plugin")
    CrossCutting.calls.clear()
    assert collect_logits_processors(OwnProcessors(), "TOK", cfg) == ["own-1", "everyone"]
    assert collect_logits_processors(PlainSFT(), "TOK", cfg) == ["everyone"]
    assert CrossCutting.calls == ["own", "plain_sft"]


# --------------------------------------------------------------------------- new-profile


def test_new_profile_writes_an_installable_plugin(tmp_path, monkeypatch):
    result = CliRunner().invoke(cli, ["new-profile", "my_shout", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    root = tmp_path / "trainer-my-shout"
    assert f"created {root}" in result.stdout
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert files == {"pyproject.toml", "README.md", ".gitignore", "tests/test_my_shout.py",
                     "src/trainer_my_shout/__init__.py", "src/trainer_my_shout/plugin.py"}
    pyproject = (root / "pyproject.toml").read_text()
    assert 'name = "trainer-my-shout"' in pyproject and 'version = "0.1.0"' in pyproject
    assert '[project.entry-points.trainer]\nmy_shout = "trainer_my_shout.plugin"' in pyproject
    # The package imports only the public API and its profile meets the v2 contract.
    monkeypatch.syspath_prepend(str(root / "src"))
    from trainer_my_shout import plugin  # type: ignore[import-not-found]

    check_profile(plugin.MyShout)
    # It declares its answers' format (with a prefix set), which the core checks and enforces.
    shout = plugin.MyShout.from_options({"answer_prefix": "A: "})
    fmt = shout.answer_format({"messages": [{"role": "user", "content": "Q"}]})
    assert fmt is not None and fmt.kind == "regex"
    assert check_answer(fmt, "A: yes")[0] and not check_answer(fmt, "yes")[0]
    with registered_plugin(plugin):
        shown = run_trainer("preview", "--profile", "my_shout", "-n", "1", "--no-color")
    assert shown.exit_code == 0, shown.output
    assert "You are a helpful assistant." in shown.stdout
    assert "format: none" in shown.stdout  # no prefix by default: no format
    # Existing folders are never overwritten; bad names are one-line errors.
    again = CliRunner().invoke(cli, ["new-profile", "my_shout", "--dir", str(tmp_path)])
    assert again.exit_code == 2 and "already exists" in again.stderr
    bad = CliRunner().invoke(cli, ["new-profile", "My-Shout", "--dir", str(tmp_path)])
    assert bad.exit_code == 2 and "not a usable profile name" in bad.stderr
    for module in [m for m in sys.modules if m.startswith("trainer_my_shout")]:
        del sys.modules[module]


@pytest.mark.slow
def test_new_profile_tests_pass(tmp_path):
    """The generated distribution's own tests pass (in a subprocess, as its author runs them),
    before it is installed: its pyproject puts src/ on pytest's path."""
    CliRunner().invoke(cli, ["new-profile", "gen_check", "--dir", str(tmp_path)])
    root = tmp_path / "trainer-gen-check"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(root)], capture_output=True, text=True, env=env, cwd=root,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^8 passed", proc.stdout, re.MULTILINE), proc.stdout


def test_new_profile_template_imports_only_the_public_api():
    from trainer_core.scaffold import render

    for path, text in render("x_y").items():
        if path.endswith(".py"):
            assert not private_imports(text), (path, private_imports(text))


def readme_example(dest: Path) -> dict[str, Path]:
    """The files of README's plugin example (fenced blocks opening with a ``# path`` comment;
    noxfile.py's ``readme_plugin_example`` reads them the same way to pip-install them)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Writing a profile plugin", 1)[1].split("\n## ", 1)[0]
    files = {}
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", section, re.MULTILINE | re.DOTALL):
        match = re.fullmatch(r"# ([\w./-]+\.(?:py|toml))", block.splitlines()[0])
        if match:
            files[match[1]] = dest / match[1]
            files[match[1]].parent.mkdir(parents=True, exist_ok=True)
            files[match[1]].write_text(block, encoding="utf-8")
    return files


def test_readme_plugin_example_works(tmp_path, monkeypatch):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    files = readme_example(tmp_path)
    assert sorted(files) == ["pyproject.toml", "trainer_shout/__init__.py"]
    project = tomllib.loads(files["pyproject.toml"].read_text())["project"]
    assert project["version"] and project["name"] == "trainer-shout"  # pip-installable as is
    assert project["entry-points"]["trainer"] == {"shout": "trainer_shout"}
    assert not private_imports(files["trainer_shout/__init__.py"].read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    import trainer_shout  # type: ignore[import-not-found]

    try:
        check_profile(trainer_shout.Shout)
        with registered_plugin(trainer_shout):
            shown = run_trainer("preview", "--profile", "shout", "-n", "1", "--no-color",
                                "--set", "profile.options.repeat=2")
        assert shown.exit_code == 0, shown.output
        assert "Answer loudly." in shown.stdout
        answer = re.search(r"\[\[(.*?)<\|im_end\|>", shown.stdout, re.DOTALL)[1]
        assert answer == answer.upper() and len(answer.split()) >= 2
    finally:
        del sys.modules["trainer_shout"]


# --------------------------------------------------------------------------- public API only

PUBLIC = {"trainer_core", "trainer_core.generation", "trainer_core.testing"}


def private_imports(source: str) -> list[str]:
    """Modules of trainer_core outside the public API that ``source`` imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found += [n for n in names if n.startswith("trainer_core") and n not in PUBLIC]
    return found


def test_shipped_plugins_import_only_the_public_api():
    files = sorted((ROOT / "plugins").glob("*/*/**/*.py"))
    assert len(files) >= 10
    bad = {str(f.relative_to(ROOT)): private_imports(f.read_text(encoding="utf-8"))
           for f in files}
    assert {f: mods for f, mods in bad.items() if mods} == {}
    assert private_imports("from trainer_core.plugins.registry import x") == [
        "trainer_core.plugins.registry"]


# --------------------------------------------------------------------------- test helpers


def test_registered_plugin_works_when_the_plugin_is_installed(fake_installed):
    """The plugin's module is already registered by its entry point: no pluggy error, and it
    stays registered afterwards; a development copy of the class wins while registered."""
    module = fake_installed
    assert get_registry().profiles["installed"].distribution == "fakeinstalled"
    with registered_plugin(module) as same:
        assert same is module
        assert get_profile_class("installed") is module.Installed
    assert get_profile_class("installed") is module.Installed  # still there

    class DevCopy(Profile, name="installed", version="2"):
        pass

    with registered_plugin(Plugin(DevCopy), name="installed"):  # the entry point's name
        assert get_profile_class("installed") is DevCopy
        assert get_registry().conflicts == {}
    assert get_profile_class("installed") is module.Installed


def test_trainer_plugin_fixture_with_an_installed_plugin(fake_installed, trainer_plugin):
    assert trainer_plugin(fake_installed) is fake_installed
    trainer_plugin(fake_installed)  # twice is fine too
    assert get_profile_class("installed") is fake_installed.Installed


@pytest.fixture
def fake_installed(tmp_path, monkeypatch):
    """A distribution 'fakeinstalled' 1.2.0 whose entry point registers profile 'installed'."""
    site = tmp_path / "site"
    info = site / "fakeinstalled-1.2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeinstalled\nVersion: 1.2.0\n")
    (info / "entry_points.txt").write_text("[trainer]\ninstalled = fakeinstalled_mod\n")
    (site / "fakeinstalled_mod.py").write_text(
        "import trainer_core\n\n\n"
        "class Installed(trainer_core.Profile, name='installed', version='1'):\n"
        "    pass\n\n\n"
        "@trainer_core.hookimpl\n"
        "def register_profiles(register):\n"
        "    register(Installed)\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv(ALLOW_ENV, "fakeinstalled")
    sys.modules.pop("fakeinstalled_mod", None)
    reset_registry()
    get_registry()
    yield sys.modules["fakeinstalled_mod"]
    sys.modules.pop("fakeinstalled_mod", None)


# --------------------------------------------------------------------------- operations


def test_plugins_requirements(fake_installed, tmp_path):
    from trainer_core import __version__

    result = CliRunner().invoke(cli, ["plugins", "--requirements"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["fakeinstalled==1.2.0", f"trainer-core=={__version__}"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"plugins": [
        {"distribution": "trainer-core", "version": "0.1.0"},
        {"distribution": "trainer-shout", "version": "0.3.1"}]}))
    recorded = CliRunner().invoke(cli, ["plugins", "--requirements", "--run", str(run)])
    assert recorded.stdout.splitlines() == ["trainer-core==0.1.0", "trainer-shout==0.3.1"]
    missing = CliRunner().invoke(cli, ["plugins", "--requirements", "--run", str(tmp_path)])
    assert missing.exit_code == 2 and "no run.json" in missing.stderr


def test_trace_plugins_prints_each_hook_call(trainer_plugin, monkeypatch, capsys):
    env = {**os.environ, TRACE_ENV: "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-m", "trainer_core", "profiles"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "plain_sft" in proc.stdout
    assert re.search(r"^trace: trainer_core\.plugins\.builtin: register_profiles\("
                     r"register=<function .*>\) -> None \[\d+\.\d\d ms\]$", proc.stderr,
                     re.MULTILINE), proc.stderr
    assert "trace:" not in subprocess.run(
        [sys.executable, "-m", "trainer_core", "profiles"], capture_output=True, text=True,
        env={**env, TRACE_ENV: ""}, timeout=120).stderr
    # In-process: each implementation's call with its arguments, result and duration.
    monkeypatch.setenv(TRACE_ENV, "1")
    trainer_plugin(CrossCutting(), "cross-plugin")
    capsys.readouterr()
    collect_logits_processors(Dated(today=DAY), "TOK", None)
    assert re.fullmatch(r"trace: cross-plugin: logits_processors\(profile=Dated\(.*\), "
                        r"tokenizer='TOK', config=None\) -> \['everyone'\] \[\d+\.\d\d ms\]\n",
                        capsys.readouterr().err)


def test_missing_profile_plugin_says_what_to_install(tmp_path):
    model = tmp_path / "run"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "run.json").write_text(json.dumps({
        "profile": {"name": "shout", "options": {}, "distribution": "trainer-shout",
                    "distribution_version": "0.1.0"},
        "plugins": [{"distribution": "trainer-core", "version": "0.1.0"},
                    {"distribution": "trainer-shout", "version": "0.1.0"}]}))
    result = CliRunner().invoke(cli, ["generate", "--model", str(model), "--prompt", "hi"])
    assert result.exit_code == 2
    assert result.stderr == (f"error: --model {model}: profile 'shout' is not installed; "
                             "run.json says trainer-shout 0.1.0; pip install trainer-shout==0.1.0\n")
    # An older run.json without the profile's distribution: the recorded plugins are named.
    data = json.loads((model / "run.json").read_text())
    del data["profile"]["distribution"]
    (model / "run.json").write_text(json.dumps(data))
    result = CliRunner().invoke(cli, ["generate", "--model", str(model), "--prompt", "hi"])
    assert result.exit_code == 2
    assert "run.json lists the plugins trainer-shout==0.1.0; pip install trainer-shout==0.1.0" \
        in result.stderr


# --------------------------------------------------------------------------- one test per hook


def hookspec_names() -> list[str]:
    return sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
                  if hasattr(fn, "trainer_spec"))


def missing_contract_entries(specs: list[str], test_names: set[str], docs: str) -> list[str]:
    """What the rule finds missing: a ``test_hook_<name>`` test or a ``### `<name>(`` docs
    heading, per hookspec."""
    missing = []
    for name in specs:
        if f"test_hook_{name}" not in test_names:
            missing.append(f"{name}: no test named test_hook_{name}")
        if not re.search(rf"^### `{name}\(", docs, re.MULTILINE):
            missing.append(f"{name}: no entry '### `{name}(...)`' in docs/plugins.md")
    return missing


def test_every_hookspec_has_a_test_and_docs():
    specs = hookspec_names()
    assert specs == ["logits_processors", "register_commands", "register_profiles",
                     "run_listeners", "trackers"]
    tests = {n for n in globals() if n.startswith("test_")}
    assert missing_contract_entries(specs, tests, DOCS.read_text(encoding="utf-8")) == []
    # The rule bites: a new hookspec without test or docs is reported twice.
    assert missing_contract_entries(["new_hook"], tests, "### `other(x)`") == [
        "new_hook: no test named test_hook_new_hook",
        "new_hook: no entry '### `new_hook(...)`' in docs/plugins.md"]


def test_hook_register_profiles(trainer_plugin):
    trainer_plugin(Plugin(Dated, Keeper), "two-profiles")
    entry = get_registry().profiles["dated"]
    assert (entry.cls, entry.plugin, entry.distribution) == (Dated, "two-profiles", "(in-process)")
    assert get_profile_class("keeper") is Keeper


def test_hook_logits_processors(trainer_plugin):
    trainer_plugin(CrossCutting(), "cross-plugin")
    CrossCutting.calls.clear()
    assert collect_logits_processors(Dated(), "TOK", None) == ["everyone"]
    assert CrossCutting.calls == ["dated"]


def test_hook_register_commands(trainer_plugin):
    class Commands:
        @hookimpl
        def register_commands(self, cli):
            @cli.command("shout-stats")
            @click.argument("path")
            def shout_stats(path):
                """Count rows the way `trainer run` reads them."""
                import trainer_core

                cfg = trainer_core.load_config(overrides={"data.dataset": path,
                                                          "data.validation_split": 0})
                train, _, skipped = trainer_core.load_rows(cfg)
                click.echo(f"{len(train)} rows, skipped {skipped}")

    trainer_plugin(Commands(), "cmd-plugin")
    from trainer_core import sample_dataset_path

    ok = run_trainer("shout-stats", str(sample_dataset_path()))
    assert ok.exit_code == 0, ok.output
    assert ok.stdout == "400 rows, skipped {}\n"
    bad = run_trainer("shout-stats", "/nonexistent.jsonl")
    assert bad.exit_code == 2
    assert bad.stderr == "error: data.dataset: /nonexistent.jsonl: file not found\n"
    assert "shout-stats" not in cli.commands  # run_trainer left the global CLI alone


class Recorder(RunListener):
    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.events: list[str] = []

    def on_start(self, event):
        self.events.append(f"start:{event.total_steps}")

    def on_step_end(self, event):
        self.events.append(f"step_end:{event.step}")

    def on_end(self, event):
        self.events.append(f"end:{event.state}")

    def close(self):
        self.events.append("close")


class ListenerPlugin:
    def __init__(self) -> None:
        self.made: list[Recorder] = []

    @hookimpl
    def run_listeners(self, config, output_dir):
        assert isinstance(config, TrainerConfig)
        self.made.append(Recorder(output_dir))
        return self.made[-1:]


class TrackerNames:
    @hookimpl
    def trackers(self):
        return ["my-tracker"]


def test_hook_trackers(trainer_plugin):
    from trainer_core.config import load_config
    from trainer_core.plugins.registry import check_report_to, collect_trackers

    cfg = load_config(overrides={"environment.report_to": ["my-tracker"]})
    with pytest.raises(UserError, match="unknown tracker 'my-tracker'"):
        check_report_to(cfg)
    trainer_plugin(TrackerNames(), "tracker-names")
    assert collect_trackers()["my-tracker"] == "tracker-names"
    check_report_to(cfg)  # declared now: accepted
    # the built-in trackers are declared through the same hook
    assert {"tensorboard", "trackio"} <= set(collect_trackers())


def test_hook_run_listeners(trainer_plugin, micro_model_dir, small_jsonl, tmp_path, monkeypatch):
    from trainer_core.train.recipe import run_training

    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    plugin = trainer_plugin(ListenerPlugin(), "listener-plugin")
    out = tmp_path / "run"
    resolved = resolve(cli={
        "model.path": str(micro_model_dir), "data.dataset": str(small_jsonl),
        "output.output_dir": str(out), "hyperparams.max_steps": 3, "hyperparams.batch_size": 4,
        "monitoring.num_preview_samples": 0, "data.validation_split": 0})
    summary = run_training(resolved, quiet=True, stream=open(os.devnull, "w"))
    assert summary["state"] == "completed"
    (recorder,) = plugin.made
    assert recorder.output_dir == out
    assert recorder.events == ["start:3", "step_end:1", "step_end:2", "step_end:3",
                               "end:completed", "close"]
    # run.json records which distribution provided the profile (for the missing-plugin hint).
    profile = json.loads((out / "run.json").read_text())["profile"]
    assert (profile["distribution"], profile["name"]) == ("trainer-core", "plain_sft")
