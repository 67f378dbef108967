"""The package layout is the architecture: lower layers never import higher ones.

Every module under ``trainer_core`` is parsed (not imported) and each ``trainer_core.*`` import,
at module level or inside a function, is checked against the layer table below. A new module
lands in a layer by its folder; a new top-level module must be added here on purpose.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import trainer_core

ROOT = Path(trainer_core.__file__).parent

#: Layer of each top-level package or module, low to high. A module may import its own layer
#: and lower ones.
LAYERS: dict[str, int] = {
    "errors": 0, "hookspecs": 0, "files": 0,
    "config": 1,
    "plugins": 2,
    "data": 3,
    "demo": 4,
    "model": 5,
    "generate": 6, "generation": 6,
    "monitor": 7,
    "train": 8,
    "daemon": 9, "scaffold": 9,
    "serve": 10,
    "cli": 11, "testing": 11, "__main__": 11,
}
#: The package itself is the public facade for plugin authors: at import time it loads only
#: config and plugins (layer <= 2), so anything may import it (``from trainer_core import
#: hookimpl``); names from higher layers are re-exported lazily (``__getattr__``), which is why
#: only its module-level imports are checked.
FACADE_LAYER = 2
#: Nothing inside trainer_core may import these (they are entry points or public facades),
#: except the entry points and ``testing`` (its ``run_trainer`` runs the CLI in-process).
NEVER_IMPORTED = {"cli", "testing", "__main__", "generation"}
MAY_RUN_THE_CLI = {"testing", "__main__"}


def top_name(module: str) -> str:
    """``trainer_core.data.chat`` -> ``data``; ``trainer_core`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def all_modules() -> list[str]:
    names = ["trainer_core"]
    for info in pkgutil.walk_packages([str(ROOT)], prefix="trainer_core."):
        names.append(info.name)
    return sorted(names)


def module_file(name: str) -> Path:
    rel = Path(*name.split(".")[1:])
    pkg = ROOT / rel / "__init__.py"
    return pkg if pkg.exists() else (ROOT / rel).with_suffix(".py")


def imports_of(name: str, source: str | None = None, is_pkg: bool | None = None
               ) -> list[tuple[int, str]]:
    """(line, imported trainer_core module) for every import in the module's source."""
    if source is None:
        path = module_file(name)
        source, is_pkg = path.read_text(encoding="utf-8"), path.name == "__init__.py"
    tree = ast.parse(source)
    # The facade's lazy re-exports (inside functions or ``if TYPE_CHECKING``) are not imports.
    nodes = tree.body if name == "trainer_core" else list(ast.walk(tree))
    out: list[tuple[int, str]] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("trainer_core")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("trainer_core"):
                continue
            if mod == "trainer_core":  # ``from trainer_core import x``: x may be a submodule
                for a in node.names:
                    sub = f"trainer_core.{a.name}"
                    out.append((node.lineno, sub if top_name(sub) in LAYERS else mod))
            else:
                out.append((node.lineno, mod))
    return out


def layer_of(module: str) -> int:
    top = top_name(module)
    return FACADE_LAYER if top == "" else LAYERS[top]


MODULES = all_modules()


def test_every_module_has_a_layer():
    unknown = sorted({top_name(m) for m in MODULES if m != "trainer_core"} - set(LAYERS))
    assert not unknown, f"add these to LAYERS in {__file__}: {unknown}"


def test_layout_has_the_documented_packages():
    # The README's Layout section describes these; the test keeps the picture true.
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert {"config", "plugins", "data", "demo", "model", "generate", "monitor", "train",
            "cli"} <= packages


def upward_imports(module: str, source: str | None = None, is_pkg: bool = False) -> list[str]:
    own = layer_of(module)
    bad = []
    for line, imported in imports_of(module, source, is_pkg):
        target = top_name(imported)
        runs_cli = module.endswith("__main__") or top_name(module) in MAY_RUN_THE_CLI
        if target in NEVER_IMPORTED and top_name(module) != target and not runs_cli:
            bad.append(f"line {line}: {imported} (never imported from inside the package)")
        elif target and layer_of(imported) > own:
            bad.append(f"line {line}: {imported} (layer {layer_of(imported)} > {own})")
    return bad


@pytest.mark.parametrize("module", MODULES)
def test_no_module_imports_a_higher_layer(module):
    bad = upward_imports(module)
    assert not bad, f"{module} (layer {layer_of(module)}) imports upward:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", [m for m in MODULES if not m.endswith("__main__")])
def test_every_module_imports(module):
    importlib.import_module(module)


def test_the_checker_catches_upward_and_relative_imports():
    # Guard against a checker that cannot fail.
    lazy = "def f():\n    from trainer_core.train.recipe import run_training\n"
    assert upward_imports("trainer_core.data.rows", lazy) == [
        "line 2: trainer_core.train.recipe (layer 8 > 3)"]
    relative = "from ..cli import options\n"
    assert upward_imports("trainer_core.monitor.events", relative) == [
        "line 1: trainer_core.cli (never imported from inside the package)"]
    assert upward_imports("trainer_core.train.recipe", "from trainer_core.data import rows\n") == []


def test_plugins_import_only_the_public_api():
    public = {"trainer_core", "trainer_core.generation", "trainer_core.testing"}
    repo = ROOT.parents[1]
    bad = []
    for path in sorted((repo / "plugins").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.relative_to(repo)}:{node.lineno}: {m}" for m in mods
                    if m.startswith("trainer_core") and m not in public]
    assert not bad, "plugins must use only the public API:\n" + "\n".join(bad)
