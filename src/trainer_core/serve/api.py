"""The request schema of ``POST /v1/chat/completions`` and OpenAI-style error objects.

Bodies are structured with the project's strict cattrs converter (the one the config uses):
unknown keys, wrong types and out-of-range values are a 400 whose ``error.param`` names the
field (``messages[1].role``). Fields OpenAI has and this server does not do (``n`` > 1, tools,
images, ``logprobs``) are known here so that they get a clear "not supported" instead of
"unknown key".

The extra field ``profile`` (not OpenAI's) opts out of the served run's profile: ``false`` for
all of it, or ``{"prompt": false, "format": false, "processors": false}`` for single parts
(``prompt``: the profile's system prompt and its transform of the conversation; ``format``: its
answer format; ``processors``: its logits processors).
"""

from __future__ import annotations

from typing import Any

import attrs

from trainer_core.config.structure import FieldError, check, structure
from trainer_core.errors import ConfigError

ROLES = ("system", "developer", "user", "assistant")
#: OpenAI's limit on stop sequences.
MAX_STOP = 4


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` object with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _unsupported(what: str):
    def validator(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None:
            raise FieldError(attribute, f"{what} not supported by trainer serve")

    return validator


def _content(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise FieldError(attribute, f"expected a string or a list of text parts, got {value!r}")
    for i, part in enumerate(value):
        where = f"[{i}]"
        if not isinstance(part, dict) or "type" not in part:
            raise FieldError(attribute, f"{where}: expected an object with a type")
        if part["type"] != "text":
            raise FieldError(attribute, f"{where}: {part['type']!r} parts are not supported "
                                        f"(text only; no images or audio)")
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise FieldError(attribute, f"{where}: a text part is {{\"type\": \"text\", "
                                        f"\"text\": string}}")


def _role(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if value in ("tool", "function"):
        raise FieldError(attribute, f"{value!r} messages are not supported (no tools)")
    if value not in ROLES:
        raise FieldError(attribute, f"must be one of {', '.join(ROLES)}, got {value!r}")


@attrs.frozen
class Message:
    """One chat message: text content only."""

    role: str = attrs.field(validator=_role)
    content: Any = attrs.field(validator=_content)
    name: str | None = None
    tool_calls: Any = attrs.field(default=None, validator=_unsupported("tool calls are"))

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)


@attrs.frozen
class StreamOptions:
    include_usage: bool = False


@attrs.frozen
class ProfileUse:
    """Which parts of the served run's profile apply to a request (all by default)."""

    prompt: bool = True
    format: bool = True
    processors: bool = True


def _stop(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or isinstance(value, str) and value:
        return
    if (isinstance(value, list) and 0 < len(value) <= MAX_STOP
            and all(isinstance(s, str) and s for s in value)):
        return
    raise FieldError(attribute, f"expected a non-empty string or a list of 1 to {MAX_STOP} "
                                f"non-empty strings, got {value!r}")


def _response_format(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or "type" not in value:
        raise FieldError(attribute, f"expected an object with a type, got {value!r}")
    kind = value["type"]
    if kind == "text":
        if set(value) != {"type"}:
            raise FieldError(attribute, "a text response_format takes no other key")
        return
    if kind == "json_object":
        raise FieldError(attribute, "json_object is not supported; give a json_schema")
    if kind != "json_schema":
        raise FieldError(attribute, f"type must be text or json_schema, got {kind!r}")
    spec = value.get("json_schema")
    if set(value) != {"type", "json_schema"} or not isinstance(spec, dict):
        raise FieldError(attribute, "expected {\"type\": \"json_schema\", \"json_schema\": "
                                    "{\"name\": ..., \"schema\": {...}}}")
    unknown = set(spec) - {"name", "schema", "strict", "description"}
    if unknown:
        raise FieldError(attribute, f"json_schema: unknown key {sorted(unknown)[0]!r}")
    if not isinstance(spec.get("schema"), dict):
        raise FieldError(attribute, "json_schema.schema: expected a JSON schema object")


def _messages(value: Any) -> list[Message]:
    # Structured here, item by item, so an error names its index (``messages[2].role``).
    if not isinstance(value, list) or not value:
        raise ConfigError(f"messages: expected a non-empty list, got {value!r}")
    return [m if isinstance(m, Message) else structure(m, Message, f"messages[{i}]")
            for i, m in enumerate(value)]


def _bool_or_profile(value: Any) -> Any:
    # ``"profile": false`` is short for every part off; an object picks parts.
    if isinstance(value, bool):
        return ProfileUse(value, value, value)
    if isinstance(value, dict):
        return structure(value, ProfileUse, "profile")
    raise ConfigError(f"profile: expected true, false or an object, got {value!r}")


@attrs.frozen
class ChatRequest:
    """A validated ``POST /v1/chat/completions`` body (see the module docstring)."""

    model: str
    messages: Any = attrs.field(converter=lambda v: _messages(v))  # -> list[Message]
    max_tokens: int | None = attrs.field(default=None, validator=check(lambda v: v > 0,
                                                                       "must be > 0"))
    max_completion_tokens: int | None = attrs.field(
        default=None, validator=check(lambda v: v > 0, "must be > 0"))
    temperature: float | None = attrs.field(
        default=None, validator=check(lambda v: 0 <= v <= 2, "must be between 0 and 2"))
    top_p: float | None = attrs.field(
        default=None, validator=check(lambda v: 0 < v <= 1, "must be > 0 and <= 1"))
    stop: Any = attrs.field(default=None, validator=_stop)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: Any = attrs.field(default=None, validator=_response_format)
    n: int | None = attrs.field(default=None, validator=check(lambda v: v == 1,
                                                              "only n=1 is supported"))
    tools: Any = attrs.field(default=None, validator=_unsupported("tools are"))
    tool_choice: Any = attrs.field(default=None, validator=_unsupported("tools are"))
    functions: Any = attrs.field(default=None, validator=_unsupported("functions are"))
    function_call: Any = attrs.field(default=None, validator=_unsupported("functions are"))
    logprobs: bool | None = attrs.field(
        default=None, validator=check(lambda v: v is False, "logprobs are not supported"))
    profile: Any = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.messages[-1].role != "user":
            raise ConfigError(f"messages[{len(self.messages) - 1}].role: the last message must "
                              f"be the user's, got {self.messages[-1].role!r}")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ConfigError("max_completion_tokens: differs from max_tokens; give one")
        if self.stream_options is not None and not self.stream:
            raise ConfigError("stream_options: only with stream: true")

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema of a ``json_schema`` response_format, else None."""
        rf = self.response_format
        return rf["json_schema"]["schema"] if rf and rf["type"] == "json_schema" else None

    @property
    def uses(self) -> ProfileUse:
        return self.profile if isinstance(self.profile, ProfileUse) else ProfileUse()


def parse_chat_request(body: Any) -> ChatRequest:
    """``body`` (decoded JSON) as a :class:`ChatRequest`, or APIError 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    for key in ("model", "messages"):
        if key not in body:
            raise APIError(400, f"{key}: required", param=key)
    try:
        request = structure({k: v for k, v in body.items() if k != "profile"}, ChatRequest, "")
        if "profile" in body:
            request = attrs.evolve(request, profile=_bool_or_profile(body["profile"]))
    except ConfigError as exc:
        first = str(exc).split("; ")[0]
        param = first.split(":", 1)[0] if ":" in first else None
        raise APIError(400, str(exc), param=param) from None
    return request
