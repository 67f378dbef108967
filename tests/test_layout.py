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
    "monitor": 7, "export": 7,
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


def imports_of(name: str, source: str | None = None, is_pkg: bool | None = None,
               submodules: bool = False) -> list[tuple[int, str]]:
    """(line, imported trainer_core module) for every import in the module's source;
    ``submodules``: ``from pkg import mod`` counts as importing ``pkg.mod``, not ``pkg``."""
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
            elif submodules:  # ``from trainer_core.pkg import x``: x may be a module too
                out += [(node.lineno, f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULE_NAMES
                         else mod) for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


def string_imports(name: str, source: str | None = None) -> list[tuple[int, str]]:
    """(line, module) for every string in the module's source that is exactly the name of one
    of our modules: what ``importlib.import_module`` would load by name, or a child process
    runs with ``-m``."""
    source = module_file(name).read_text(encoding="utf-8") if source is None else source
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value in MODULE_NAMES]


def layer_of(module: str) -> int:
    top = top_name(module)
    return FACADE_LAYER if top == "" else LAYERS[top]


MODULES = all_modules()
MODULE_NAMES = frozenset(MODULES)
#: Modules loaded by name from a lower layer, on purpose (each with why). Nothing else may name
#: a higher layer's module in a string.
LOADED_BY_NAME = {
    # The built-in trackers are a plugin: the registry loads them exactly as an entry point
    # would be loaded, so the plugins layer never imports monitor.
    ("trainer_core.plugins.registry", "trainer_core.monitor.trackers"),
}


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


def upward_loads(module: str, source: str | None = None) -> list[str]:
    """Module names in ``module``'s strings that name a higher layer (importlib loads), less
    the :data:`LOADED_BY_NAME` exceptions; the facade's lazy re-exports are checked apart."""
    if module == "trainer_core":
        return []
    return [f"line {line}: {target} (loaded by name, layer {layer_of(target)} > "
            f"{layer_of(module)})" for line, target in string_imports(module, source)
            if layer_of(target) > layer_of(module) and (module, target) not in LOADED_BY_NAME]


@pytest.mark.parametrize("module", MODULES)
def test_no_module_loads_a_higher_layer_by_name(module):
    bad = upward_loads(module)
    assert not bad, f"{module} names a higher layer's module:\n" + "\n".join(bad)


def test_the_exceptions_still_exist():
    # An exception nobody needs any more is a hole in the check: remove it.
    for module, target in LOADED_BY_NAME:
        assert target in {t for _, t in string_imports(module)}, (module, target)


def facade_lazy_exports() -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]],
                                   list[str]]:
    """The facade's ``_LAZY`` table, its ``if TYPE_CHECKING`` imports (public name ->
    (module, name there)) and ``__all__``, read from its source."""
    tree = ast.parse(module_file("trainer_core").read_text(encoding="utf-8"))
    lazy: dict[str, tuple[str, str]] = {}
    typed: dict[str, tuple[str, str]] = {}
    public: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "_LAZY":
                lazy = ast.literal_eval(node.value)
            elif node.targets[0].id == "__all__":
                public = ast.literal_eval(node.value)
        elif isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for sub in node.body:
                if isinstance(sub, ast.ImportFrom):
                    typed.update({a.asname or a.name: (sub.module, a.name) for a in sub.names})
    return lazy, typed, public


def test_facade_lazy_exports_are_public_and_resolve():
    import trainer_core as facade

    lazy, typed, public = facade_lazy_exports()
    assert lazy, "the facade's _LAZY table was not found"
    # What type checkers see is what the facade serves, and every lazy name is public.
    assert typed == lazy
    assert set(lazy) <= set(public)
    for name, (module, attr) in lazy.items():
        assert module in MODULE_NAMES, (name, module)
        assert top_name(module) not in NEVER_IMPORTED, (name, module)
        assert getattr(facade, name) is getattr(importlib.import_module(module), attr), name
    # At import time the facade loads nothing above its own layer (the lazy names are why).
    assert all(layer_of(m) <= FACADE_LAYER for _, m in imports_of("trainer_core"))


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (lazy imports included)."""
    return {m: {t for _, t in imports_of(m, submodules=True) if t in MODULE_NAMES and t != m}
            for m in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    # Across layers a cycle is already an upward import; inside a layer two modules that need
    # each other are one module in two files (or need a third they both import).
    assert cycles(import_graph()) == []


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
    loads = 'MODULES = ("trainer_core.train.recipe", "trainer_core.config")\n'
    assert upward_loads("trainer_core.data.rows", loads) == [
        "line 1: trainer_core.train.recipe (loaded by name, layer 8 > 3)"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


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
