"""What the dashboard's server and its views share: the error a request ends with, and the
one way a request's path is turned into a file under the served directory.

Its own module so that the views need not import the server (which builds the run views).
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path


class HTTPError(Exception):
    """Ends a request with ``status`` and a JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def safe_path(root: Path, rel: str) -> Path:
    """``root/rel`` resolved (symlinks too), or HTTPError 404 when it leaves ``root``."""
    rel = urllib.parse.unquote(rel)
    if "\x00" in rel:
        raise HTTPError(404, "not found")
    root = root.resolve()
    target = (root / rel.lstrip("/")).resolve()
    if target != root and root not in target.parents:
        raise HTTPError(404, "not found")
    return target
