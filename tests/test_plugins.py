"""Plugin discovery, the profile registry, isolation of broken plugins, and the hooks."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from trainer_core import Profile, hookimpl
from trainer_core.cli import TrainerGroup, _add_plugin_commands, cli, main
from trainer_core.config import TrainerConfig
from trainer_core.errors import UserError
from trainer_core.plugins.profile import PlainSFT
from trainer_core.plugins.registry import (
    ALLOW_ENV,
    BUILTIN_NAME,
    collect_logits_processors,
    get_profile_class,
    get_registry,
    reset_registry,
)
from trainer_core.testing import registered_plugin

# --------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    """Each test starts from a fresh registry with only the built-in plugin discovered
    (third-party plugins that happen to be installed are kept out unless a test asks)."""
    monkeypatch.setenv(ALLOW_ENV, "")
    reset_registry()
    yield
    reset_registry()


class Hello(Profile, name="hello", version="7", description="Says hello."):
    def logits_processors(self, tokenizer: Any, config: Any) -> list[Any]:
        return ["hello-own-1", "hello-own-2"]


class OtherHello(Profile, name="hello", version="1", description="Another hello."):
    pass


class Goodbye(Profile, name="goodbye", version="1"):
    pass


class ProfilesPlugin:
    def __init__(self, *classes: type) -> None:
        self.classes = classes

    @hookimpl
    def register_profiles(self, register):
        for cls in self.classes:
            register(cls)


class BrokenProfilesPlugin:
    @hookimpl
    def register_profiles(self, register):
        raise RuntimeError("boom in register_profiles")


def plugins_json() -> dict[str, dict]:
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    return {p["name"]: p for p in json.loads(result.stdout)}


def profiles_table() -> dict[str, str]:
    result = CliRunner().invoke(cli, ["profiles"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "DISTRIBUTION", "DESCRIPTION"]
    return {line.split()[0]: line for line in lines[1:]}


# --------------------------------------------------------------------------- in-process plugins


def test_builtin_plain_sft_always_there():
    assert get_profile_class("plain_sft") is PlainSFT
    info = get_registry().plugins[BUILTIN_NAME]
    assert info.status == "ok" and info.distribution == "trainer-core"
    # A profile's own processors come from its method, not through the hook (one route).
    assert info.hooks == ["register_profiles"]


def test_registered_plugin_context_manager():
    with registered_plugin(ProfilesPlugin(Hello), name="hello-plugin"):
        assert get_profile_class("hello") is Hello
        entry = get_registry().profiles["hello"]
        assert (entry.plugin, entry.distribution) == ("hello-plugin", "(in-process)")
        assert "hello" in profiles_table()
        assert plugins_json()["hello-plugin"]["hooks"] == ["register_profiles"]
    assert "hello" not in get_registry().profiles
    assert "hello-plugin" not in get_registry().plugins
    with pytest.raises(UserError, match="unknown profile 'hello'"):
        get_profile_class("hello")


@pytest.fixture
def gone_afterwards():
    """Requested before ``trainer_plugin``, so this teardown runs after that fixture's: the
    profiles named in the returned list must be gone by then."""
    names: list[str] = []
    yield names
    registry = get_registry()
    for name in names:
        assert name not in registry.profiles, f"{name} still registered after the test"


def test_trainer_plugin_fixture(gone_afterwards, trainer_plugin):
    plugin = ProfilesPlugin(Goodbye)
    assert trainer_plugin(plugin, "goodbye-plugin") is plugin
    assert get_profile_class("goodbye") is Goodbye
    assert "goodbye" in profiles_table()
    gone_afterwards.append("goodbye")


def test_duplicate_profile_names_name_both_plugins(trainer_plugin):
    trainer_plugin(ProfilesPlugin(Hello), "first-plugin")
    trainer_plugin(ProfilesPlugin(OtherHello), "second-plugin")
    with pytest.raises(UserError) as info:
        get_profile_class("hello")
    msg = str(info.value)
    assert "more than one plugin" in msg
    assert "first-plugin" in msg and "second-plugin" in msg
    result = CliRunner().invoke(cli, ["profiles"])
    assert result.exit_code == 0
    assert "warning: profile 'hello' registered by first-plugin, second-plugin" in result.stderr
    # Other profiles are unaffected.
    assert get_profile_class("plain_sft") is PlainSFT


def test_raising_register_profiles_is_isolated(trainer_plugin):
    trainer_plugin(BrokenProfilesPlugin(), "broken-plugin")
    trainer_plugin(ProfilesPlugin(Goodbye), "good-plugin")
    info = get_registry().plugins["broken-plugin"]
    assert info.status == "broken"
    assert info.error == "register_profiles: RuntimeError: boom in register_profiles"
    assert get_profile_class("goodbye") is Goodbye
    assert get_profile_class("plain_sft") is PlainSFT
    shown = plugins_json()["broken-plugin"]
    assert shown["status"] == "broken" and "boom" in shown["error"]
    assert {"goodbye", "plain_sft"} <= set(profiles_table())
    with pytest.raises(UserError, match=r"broken plugins: broken-plugin"):
        get_profile_class("nope")


def test_registering_a_non_profile_marks_the_plugin_broken(trainer_plugin):
    trainer_plugin(ProfilesPlugin(dict), "bad-register")
    info = get_registry().plugins["bad-register"]
    assert info.status == "broken" and "Profile subclass" in info.error


# --------------------------------------------------------------------------- entry points


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Install fake distributions (a dist-info folder and a module) on a fresh sys.path entry."""
    site = tmp_path / "site"
    site.mkdir()
    modules: list[str] = []

    def make(code: str, *, dist: str = "fakeplug", version: str = "0.1",
             module: str = "fakeplug_mod", ep: str = "fake") -> Path:
        info = site / f"{dist}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
        (info / "entry_points.txt").write_text(f"[trainer]\n{ep} = {module}\n", encoding="utf-8")
        (site / f"{module}.py").write_text(textwrap.dedent(code), encoding="utf-8")
        modules.append(module)
        if str(site) not in sys.path:
            monkeypatch.syspath_prepend(str(site))
        sys.modules.pop(module, None)
        reset_registry()
        return site

    yield make
    for module in modules:
        sys.modules.pop(module, None)


BROKEN_MODULE = """
raise ImportError("fakeplug needs a library that is not installed")
"""

GOOD_MODULE = """
import trainer_core


class FakeProfile(trainer_core.Profile, name="fake_profile", version="3",
                  description="A profile from a fake distribution."):
    pass


@trainer_core.hookimpl
def register_profiles(register):
    register(FakeProfile)
"""


def test_entry_point_plugin_that_fails_to_import(fake_dist, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV)
    fake_dist(BROKEN_MODULE)
    shown = plugins_json()["fake"]
    assert shown["distribution"] == "fakeplug" and shown["version"] == "0.1"
    assert shown["status"] == "broken"
    assert shown["error"] == "ImportError: fakeplug needs a library that is not installed"
    assert shown["hooks"] == []
    # The human table says so too, and everything else keeps working.
    table = CliRunner().invoke(cli, ["plugins"])
    assert table.exit_code == 0 and "broken: ImportError: fakeplug needs" in table.stdout
    result = CliRunner().invoke(cli, ["profiles"])
    assert result.exit_code == 0, result.output
    assert "plain_sft" in result.stdout
    assert get_profile_class("plain_sft") is PlainSFT
    with pytest.raises(UserError, match=r"broken plugins: fake \(see `trainer plugins`\)"):
        get_profile_class("fake_profile")


def test_entry_point_plugin_discovered(fake_dist, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV)
    fake_dist(GOOD_MODULE)
    registry = get_registry()
    entry = registry.profiles["fake_profile"]
    assert (entry.plugin, entry.distribution, entry.version) == ("fake", "fakeplug", "0.1")
    assert get_profile_class("fake_profile").description == "A profile from a fake distribution."
    row = profiles_table()["fake_profile"]
    assert row.split()[:4] == ["fake_profile", "3", "fakeplug", "0.1"]
    shown = plugins_json()["fake"]
    assert shown["status"] == "ok" and shown["hooks"] == ["register_profiles"]


def test_allow_list_empty_skips_third_party(fake_dist, monkeypatch):
    fake_dist(GOOD_MODULE)
    monkeypatch.setenv(ALLOW_ENV, "")
    reset_registry()
    shown = plugins_json()["fake"]
    assert shown["status"] == "skipped" and ALLOW_ENV in shown["error"]
    assert "fake_profile" not in get_registry().profiles
    assert "fakeplug_mod" not in sys.modules  # never even imported
    assert get_profile_class("plain_sft") is PlainSFT


@pytest.mark.parametrize("allowed", ["fakeplug", "other-dist, FakePlug "])
def test_allow_list_naming_the_distribution_loads_it(fake_dist, monkeypatch, allowed):
    fake_dist(GOOD_MODULE)
    fake_dist("raise RuntimeError('must not be imported')", dist="otherplug",
              module="otherplug_mod", ep="other")
    monkeypatch.setenv(ALLOW_ENV, allowed)
    reset_registry()
    assert get_profile_class("fake_profile").name == "fake_profile"
    assert get_registry().plugins["other"].status == "skipped"
    assert get_profile_class("plain_sft") is PlainSFT


# --------------------------------------------------------------------------- logits_processors


class ExtraProcessors:
    @hookimpl
    def logits_processors(self, profile, tokenizer, config):
        assert tokenizer == "TOK" and isinstance(config, TrainerConfig)
        return ["extra-1"] if profile.name == "hello" else None


class NoProcessors:
    @hookimpl
    def logits_processors(self, profile):  # arguments may be left out
        return []


def test_logits_processors_are_concatenated(trainer_plugin):
    trainer_plugin(ProfilesPlugin(Hello), "hello-plugin")
    trainer_plugin(ExtraProcessors(), "extra-plugin")
    trainer_plugin(NoProcessors(), "none-plugin")
    cfg = TrainerConfig()
    profile = get_profile_class("hello").from_options({})
    # The builtin bridge (the profile's own method) comes first: registration order.
    assert collect_logits_processors(profile, "TOK", cfg) == [
        "hello-own-1", "hello-own-2", "extra-1"]
    # A profile the other plugin does not know: only its own (none for plain_sft).
    assert collect_logits_processors(PlainSFT.from_options({}), "TOK", cfg) == []


# --------------------------------------------------------------------------- the CLI


def test_unknown_profile_exits_2_with_choices():
    result = CliRunner().invoke(cli, ["run", "--profile", "nope"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unknown profile 'nope'; available: ")
    assert "plain_sft" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


class CommandPlugin:
    @hookimpl
    def register_commands(self, cli):
        @cli.command("hello-cmd")
        @click.option("--who", default="world")
        def hello_cmd(who):
            """Say hello."""
            click.echo(f"hello {who} from a plugin")


class BrokenCommandPlugin:
    @hookimpl
    def register_commands(self, cli):
        raise RuntimeError("boom in register_commands")


def test_register_commands_on_a_fresh_group(trainer_plugin):
    trainer_plugin(CommandPlugin(), "cmd-plugin")
    group = TrainerGroup("trainer")
    _add_plugin_commands(group)
    result = CliRunner().invoke(group, ["hello-cmd", "--who", "you"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "hello you from a plugin\n"


def test_register_commands_through_main(trainer_plugin, monkeypatch, capsys):
    monkeypatch.setattr(cli, "commands", dict(cli.commands))  # restored after the test
    trainer_plugin(BrokenCommandPlugin(), "broken-cmd")
    trainer_plugin(CommandPlugin(), "cmd-plugin")
    with pytest.raises(SystemExit) as exit_info:
        main(["hello-cmd"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == "hello world from a plugin\n"
    info = get_registry().plugins["broken-cmd"]
    assert info.status == "broken" and "boom in register_commands" in info.error
    with pytest.raises(SystemExit) as exit_info:
        main(["profiles"])
    assert exit_info.value.code == 0
    assert "plain_sft" in capsys.readouterr().out


def test_broken_register_commands_alone_does_not_break_the_cli(trainer_plugin, monkeypatch,
                                                              capsys):
    monkeypatch.setattr(cli, "commands", dict(cli.commands))
    trainer_plugin(BrokenCommandPlugin(), "broken-cmd")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "profiles" in out and "config" in out
    assert plugins_json()["broken-cmd"]["status"] == "broken"
