"""The HTTP side of ``trainer serve``: a Starlette application on uvicorn.

Routes::

    POST /v1/chat/completions   OpenAI's chat completions; ``stream: true`` answers server-sent
                                events in OpenAI's chunk format, ending with ``data: [DONE]``
    GET  /v1/models             the served model: id, profile, step
    GET  /health                status, step, queue length (no API key needed)

Safety: with an API key every ``/v1/`` route needs ``Authorization: Bearer KEY`` (401 without);
bodies must be ``application/json`` (415: no cross-origin form posts) and at most ``max_body``
bytes (413); bound to loopback, a Host header that is not a loopback name is refused (403, DNS
rebinding, as the dashboard does); errors are OpenAI error objects, never a
traceback (a failure is logged on the server's stderr and answered as a 500 naming only the
exception's type). Nothing in a request names a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import uuid
from typing import Any

from trainer_core.monitor.dashboard.server import is_loopback
from trainer_core.serve.api import APIError, parse_chat_request
from trainer_core.serve.engine import Batcher, Job, ModelSource, Served, log, now

#: Largest request body accepted (bytes): room for long conversations, not for abuse.
MAX_BODY = 4 << 20
#: Seconds between checks that a non-streaming client is still connected.
DISCONNECT_POLL_S = 0.5


def model_card(source: ModelSource) -> dict[str, Any]:
    served = source.active
    return {"id": source.target.name, "object": "model", "created": now(),
            "owned_by": "trainer", "profile": served.profile.name, "step": served.step}


def make_app(source: ModelSource, batcher: Batcher, api_key: str | None = None,
             max_body: int = MAX_BODY, loopback_only: bool = True) -> Any:
    """The application; ``loopback_only`` (bound to loopback) refuses other Host names."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error_response(exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    def check_key(request: Request) -> None:
        if loopback_only:  # DNS rebinding: a loopback server answers loopback names only
            host = (request.headers.get("host") or "").rsplit(":", 1)[0]
            if not is_loopback(host):
                raise APIError(403, "forbidden host", kind="permission_error")
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                           kind="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        # JSON only: a web page cannot send it cross-origin without a CORS preflight, which
        # this server never answers.
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise APIError(415, "the body must be sent as Content-Type: application/json")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise APIError(413, f"the body is over {max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise APIError(413, f"the body is over {max_body} bytes")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the body must be JSON") from None

    async def models(request: Request) -> JSONResponse:
        check_key(request)
        return JSONResponse({"object": "list", "data": [model_card(source)]})

    async def health(request: Request) -> JSONResponse:
        served = source.active
        return JSONResponse({"status": "ok", "model": source.target.name, "step": served.step,
                             "profile": served.profile.name,
                             "loading": str(source.loading) if source.loading else None,
                             "queued": batcher.jobs.qsize(), "batches": batcher.batches,
                             "generating": batcher.generating,
                             "tokens_generated": batcher.tokens})

    async def chat(request: Request) -> Any:
        check_key(request)
        chat_request = parse_chat_request(await read_json(request))
        if chat_request.model != source.target.name:
            raise APIError(404, f"model {chat_request.model!r} is not served here; this "
                                f"server serves {source.target.name!r} (GET /v1/models)",
                           param="model", code="model_not_found")
        job = Job(chat_request, asyncio.get_running_loop())
        batcher.submit(job)
        try:
            first = await _next_event(job, request)
        except BaseException:
            job.cancel()
            raise
        if first[0] == "error":
            raise first[1]
        served: Served = first[1]
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": ident, "created": now(), "model": source.target.name,
                "system_fingerprint": served.fingerprint}
        if chat_request.stream:
            usage_chunk = bool(chat_request.stream_options
                               and chat_request.stream_options.include_usage)
            return StreamingResponse(_stream(job, head, usage_chunk),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store"})
        parts: list[str] = []
        try:
            while True:
                event = await _next_event(job, request)
                if event[0] == "delta":
                    parts.append(event[1])
                elif event[0] == "error":
                    raise event[1]
                else:  # end
                    _, reason, usage = event
                    break
        except BaseException:
            job.cancel()
            raise
        return JSONResponse({
            **head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "finish_reason": reason, "logprobs": None}],
            "usage": usage})

    async def on_api_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind=kind))

    async def on_error(_request: Request, exc: Exception) -> JSONResponse:
        import traceback

        traceback.print_exception(exc)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}",
                                       kind="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    return Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/health", health, methods=["GET"])],
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error,
                            Exception: on_error},
        lifespan=lifespan)


async def _next_event(job: Job, request: Any) -> tuple[Any, ...]:
    """The job's next event; raises CancelledError when the client has gone away meanwhile."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                raise asyncio.CancelledError from None


def _chunk(head: dict[str, Any], delta: dict[str, Any], reason: str | None = None,
           usage: dict[str, Any] | None = None) -> bytes:
    body = {**head, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def _stream(job: Job, head: dict[str, Any], usage_chunk: bool) -> Any:
    """OpenAI's chunks: the role, the text as generated, the finish reason with the usage,
    (with ``stream_options.include_usage``) a usage-only chunk, then ``[DONE]``. Starlette
    cancels this generator when the client disconnects; the job's row then ends."""
    try:
        yield _chunk(head, {"role": "assistant", "content": ""})
        while True:
            event = await job.events.get()
            if event[0] == "delta":
                yield _chunk(head, {"content": event[1]})
            elif event[0] == "error":
                error: APIError = event[1]
                yield b"data: " + json.dumps(error.body()).encode() + b"\n\n"
                return
            else:
                _, reason, usage = event
                yield _chunk(head, {}, reason, usage)
                if usage_chunk:
                    body = {**head, "object": "chat.completion.chunk", "choices": [],
                            "usage": usage}
                    yield b"data: " + json.dumps(body).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                return
    finally:
        job.cancel()  # a no-op for a finished row; ends the row of a client that went away


def serve(target: str, host: str, port: int, api_key: str | None, queue_size: int,
          max_batch: int, max_tokens_cap: int, name: str | None = None) -> None:
    """Load the target and serve it until interrupted (``trainer serve``)."""
    import uvicorn

    from trainer_core.serve.engine import Target

    where = Target.of(target, name)
    _check_port(host, port)  # before the model loads: a taken port is a one-line error
    source = ModelSource(where)
    batcher = Batcher(source, queue_size, max_batch, max_tokens_cap)
    app = make_app(source, batcher, api_key, loopback_only=is_loopback(host))
    served = source.active
    follow = " (following the daemon's current model)" if where.home is not None else ""
    log(f"{where.name}: profile {served.profile.name}, {served.fingerprint}{follow}; "
        f"http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)


def _check_port(host: str, port: int) -> None:
    import socket

    from trainer_core.errors import UserError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UserError(f"--host {host}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise UserError(f"--port {port}: cannot listen on {host}:{port}: "
                            f"{exc.strerror}") from None
