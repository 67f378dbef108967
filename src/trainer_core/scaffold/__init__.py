"""``trainer new-profile``: write a complete, installable profile plugin from a template.

The template (``template/*.tmpl``, ``string.Template`` syntax) is a working distribution:
pyproject with the ``trainer`` entry point, a package with a v2 profile, a README and tests that
pass against the installed trainer-core. Uses only the standard library and ``errors``.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from trainer_core.errors import UserError

TEMPLATE_DIR = Path(__file__).parent / "template"
#: template file -> path in the new distribution (``{package}``/``{name}`` substituted).
FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "init.py.tmpl": "src/{package}/__init__.py",
    "plugin.py.tmpl": "src/{package}/plugin.py",
    "test_profile.py.tmpl": "tests/test_{name}.py",
    "gitignore.tmpl": ".gitignore",
}
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def plugin_names(name: str) -> dict[str, str]:
    """Template variables for profile ``name``: distribution, package and class names."""
    if not _NAME.fullmatch(name) or name.endswith("_") or "__" in name:
        raise UserError(f"new-profile: {name!r} is not a usable profile name (lowercase letters, "
                        "digits and single underscores, starting with a letter, e.g. my_profile)")
    from trainer_core import __version__

    return {
        "name": name,
        "dist": "trainer-" + name.replace("_", "-"),
        "package": "trainer_" + name,
        "cls": "".join(part.capitalize() for part in name.split("_")),
        "core_version": __version__,
    }


def render(name: str) -> dict[str, str]:
    """The new distribution's files: relative path -> text."""
    names = plugin_names(name)
    out = {}
    for template, target in FILES.items():
        text = (TEMPLATE_DIR / template).read_text(encoding="utf-8")
        out[target.format(**names)] = string.Template(text).substitute(names)
    return out


def write_plugin(name: str, directory: str | Path = ".") -> Path:
    """Write ``trainer-NAME/`` under ``directory``; returns its path. Refuses to overwrite."""
    files = render(name)
    root = Path(directory) / plugin_names(name)["dist"]
    if root.exists() and any(root.iterdir()):
        raise UserError(f"new-profile: {root} already exists and is not empty")
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root
