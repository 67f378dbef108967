"""The dashboard's HTTP server: stdlib ``http.server``, JSON API, server-sent events.

No web framework: the pages are three static files shipped in this package, the data are the
run's own files, and live updates are server-sent events (one thread per open page). Charts are
drawn by our own JavaScript into SVG; nothing is fetched from a CDN, so it works offline.

Routes::

    GET  /                       the page (index.html)
    GET  /static/<name>          the page's JS/CSS (a fixed list, from this package), and
                                 /static/<view>.js, the script each view supplies
    GET  /api/views              the views this server has, e.g. ["runs"]
    GET  /api/<view>/<what>      a view's JSON (see views.RunsView)
    GET  /api/<view>/events      a view's server-sent events
    POST /api/<view>/<action>    a view's control action: needs the X-Trainer-Token header
    GET  /files/<path>           a file under DIR (plots), never outside it

Safety: binds 127.0.0.1 by default. Control actions always need the session token; the page
gets it embedded only when the server is bound to loopback (other sites cannot read it, and
cannot send the header without a CORS preflight we never answer). Bound elsewhere, the token is
printed once and must be given in the URL (``?token=``). On loopback, requests whose ``Host`` is
not a loopback name are refused (DNS rebinding).
"""

from __future__ import annotations

import hmac
import http.server
import ipaddress
import json
import math
import secrets
import threading
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Any

from trainer_core.monitor.dashboard.base import HTTPError, safe_path

#: The page's own files; each view's script comes from the view (``/static/<view>.js``).
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
#: File types /files/ serves (plots and the run's text files); anything else is refused.
SERVED_SUFFIXES = {".svg": "image/svg+xml", ".png": "image/png", ".json": "application/json",
                   ".jsonl": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8"}


def clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become null (JavaScript's JSON.parse rejects NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def dumps(obj: Any) -> bytes:
    return json.dumps(clean(obj), default=str, allow_nan=False).encode()


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bound address or a Host header's host part) is exactly a loopback
    name or address: ``127.0.0.1.evil.com`` is not (DNS rebinding)."""
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_part(header: str) -> str:
    """The host of a ``Host`` header: ``[::1]:8080`` -> ``[::1]``, ``a:80`` -> ``a``."""
    if header.startswith("[") and "]" in header:
        end = header.index("]") + 1
        rest = header[end:]
        return header[:end] if not rest or (rest[0] == ":" and rest[1:].isdigit()) else header
    host, sep, port = header.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else header


class Dashboard:
    """What the handler serves: a root directory and views by name, in tab order (``runs``
    here; a daemon home adds its own view object with the same methods: ``get``, ``events``,
    ``action`` and ``script``, see ``views.RunsView``)."""

    def __init__(self, root: Path, views: dict[str, Any], host: str, token: str | None = None):
        self.root = Path(root).resolve()
        self.views = views
        self.host = host
        self.token = token or secrets.token_urlsafe(24)
        self.stopping = threading.Event()

    def page(self) -> bytes:
        html = resources.files(__package__).joinpath("static/index.html").read_text("utf-8")
        # The token rides in the page only on loopback (see the module docstring).
        token = self.token if is_loopback(self.host) else ""
        return html.replace("__TOKEN__", token).replace(
            "__VIEWS__", json.dumps(list(self.views))).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "trainer-dashboard"
    protocol_version = "HTTP/1.1"
    dashboard: Dashboard  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        pass  # quiet: the terminal belongs to the user

    # ----------------------------------------------------------------- plumbing

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None
              ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; img-src 'self' data:; style-src 'self'")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, dumps(obj), "application/json")

    def _check_host(self) -> None:
        if not is_loopback(self.dashboard.host):
            return
        host = host_part(self.headers.get("Host") or "").lower().rstrip(".")
        if not (is_loopback(host) or host == self.dashboard.host):
            raise HTTPError(403, "forbidden host")

    def _route(self) -> tuple[str, dict[str, str]]:
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        return url.path, query

    def _view(self, name: str) -> Any:
        view = self.dashboard.views.get(name)
        if view is None:
            raise HTTPError(404, f"no view {name!r}")
        return view

    def _handle(self, fn: Any) -> None:
        try:
            self._check_host()
            fn()
        except HTTPError as exc:
            self._json({"error": str(exc)}, exc.status)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # one bad request must not take the dashboard down
            try:
                self._json({"error": f"internal error: {type(exc).__name__}"}, 500)
            except OSError:
                pass

    # ----------------------------------------------------------------- GET

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        self._handle(self._get)

    def _get(self) -> None:
        path, query = self._route()
        if path in ("/", "/index.html"):
            self._send(200, self.dashboard.page(), "text/html; charset=utf-8")
        elif path.startswith("/static/"):
            name = path[len("/static/"):]
            view = self.dashboard.views.get(name.removesuffix(".js"))
            if name.endswith(".js") and view is not None:
                self._send(200, view.script(), "text/javascript; charset=utf-8")
                return
            if name not in STATIC:
                raise HTTPError(404, "not found")
            body = resources.files(__package__).joinpath(f"static/{name}").read_bytes()
            self._send(200, body, STATIC[name] + "; charset=utf-8")
        elif path == "/api/views":
            self._json(list(self.dashboard.views))
        elif path.startswith("/api/"):
            parts = path[len("/api/"):].split("/", 1)
            view = self._view(parts[0])
            what = parts[1] if len(parts) > 1 else ""
            if what == "events":
                self._events(view, query)
            else:
                self._json(view.get(what, query))
        elif path.startswith("/files/"):
            self._file(path[len("/files/"):])
        else:
            raise HTTPError(404, "not found")

    def _file(self, rel: str) -> None:
        target = safe_path(self.dashboard.root, rel)
        ctype = SERVED_SUFFIXES.get(target.suffix.lower())
        if ctype is None or not target.is_file():
            raise HTTPError(404, "not found")
        self._send(200, target.read_bytes(), ctype)

    def _events(self, view: Any, query: dict[str, str]) -> None:
        """Server-sent events until the page goes away or the server stops."""
        stream = view.events(query, self.dashboard.stopping)  # may raise HTTPError first
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for name, data in stream:
            if name is None:  # keep-alive comment: also notices a closed page
                self.wfile.write(b": ping\n\n")
            else:
                self.wfile.write(b"event: " + name.encode() + b"\ndata: " + dumps(data)
                                 + b"\n\n")
            self.wfile.flush()

    # ----------------------------------------------------------------- POST

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        self._handle(self._post)

    def _post(self) -> None:
        path, query = self._route()
        given = self.headers.get("X-Trainer-Token") or ""
        if not hmac.compare_digest(given.encode(), self.dashboard.token.encode()):
            raise HTTPError(403, "missing or wrong X-Trainer-Token")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(min(length, 1 << 20)) or b"{}") if length else {}
        except ValueError:
            raise HTTPError(400, "the body must be JSON") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        if not path.startswith("/api/"):
            raise HTTPError(404, "not found")
        parts = path[len("/api/"):].split("/", 1)
        view = self._view(parts[0])
        self._json(view.action(parts[1] if len(parts) > 1 else "", query, body))


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(root: Path, host: str = "127.0.0.1", port: int = 8080,
                views: dict[str, Any] | None = None, token: str | None = None
                ) -> tuple[Server, Dashboard]:
    """A ready (not yet serving) server; ``port`` 0 picks a free one."""
    from trainer_core.monitor.dashboard.views import RunsView

    dashboard = Dashboard(root, views if views is not None else {"runs": RunsView(root)}, host,
                          token)
    handler = type("BoundHandler", (Handler,), {"dashboard": dashboard})
    server = Server((host, port), handler)
    return server, dashboard


def stop(server: Server, dashboard: Dashboard) -> None:
    dashboard.stopping.set()
    server.shutdown()
    server.server_close()
