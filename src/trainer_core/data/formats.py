"""Row formats: what one record of a data file means, turned into chat ``messages``.

A record (a JSON object, a Parquet/Arrow row, a CSV row as ``{header: cell}``) is read in one
of these formats (``data.format``):

- ``messages``: ``{"messages": [{"role", "content"}, ...]}`` (OpenAI / Hugging Face chat);
- ``prompt_completion``: ``{"prompt": str, "completion": str}`` (a user and an assistant turn);
- ``sharegpt``: ``{"conversations": [{"from": "human", "value": ...}, ...], "system": ...}``
  (roles ``human``/``gpt``/``system``; an optional ``system`` column is the first turn);
- ``alpaca``: ``{"instruction", "input", "output", "system"}`` (the user turn is the
  instruction, then the input after a newline when it is not empty, as LLaMA-Factory does);
- ``auto`` (default): detected from the first valid record of each file, by its keys. A file
  detected as ``messages`` or ``prompt_completion`` may mix those two per row (the JSONL rule
  trainer always had).

``data.columns`` renames the columns a format reads (``{"messages": "dialog", "role": "speaker",
"content": "text"}``) and ``data.roles`` maps role values to ``system``/``user``/``assistant``
(``{"bot": "assistant"}``). Everything after this module sees ``{"messages": [...], ...}``;
problems are ``(field, reason, detail)`` with the field in the file's own column names.

Imports nothing heavy (the CLI validates data before loading torch).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from trainer_core.config.sections import ROW_FORMATS
from trainer_core.errors import UserError

ROLES = ("system", "user", "assistant")
#: The columns each format reads, by their name in ``data.columns`` -> the default column.
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "messages": {"messages": "messages", "role": "role", "content": "content"},
    "prompt_completion": {"prompt": "prompt", "completion": "completion"},
    "sharegpt": {"messages": "conversations", "role": "from", "content": "value",
                 "system": "system"},
    "alpaca": {"prompt": "instruction", "input": "input", "completion": "output",
               "system": "system"},
}
#: ShareGPT's role names (the usual values of ``from``); ``data.roles`` adds to them.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant"}
_AUTO_HINT = ("missing (give messages or prompt/completion, conversations (ShareGPT) or "
              "instruction/output (Alpaca), or set data.format and data.columns)")

Found = tuple[str, str, str]  # (field, reason, detail)


def kind_name(value: Any) -> str:
    """``a string``, ``an array``...: how a JSON value's type is named in messages."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


@attrs.frozen
class RowFormat:
    """How the records of a file become rows: ``data.format``, ``data.columns``,
    ``data.roles``. :meth:`of` checks them (``UserError`` naming the config field)."""

    format: str = "auto"
    columns: tuple[tuple[str, str], ...] = ()
    roles: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, format: str = "auto", columns: Mapping[str, str] | None = None,
           roles: Mapping[str, str] | None = None) -> RowFormat:
        columns, roles = dict(columns or {}), dict(roles or {})
        if format not in ROW_FORMATS:
            raise UserError(f"data.format: must be one of {', '.join(ROW_FORMATS)}, "
                            f"got {format!r}")
        if columns and format == "auto":
            raise UserError("data.columns: set data.format too (messages, sharegpt, alpaca or "
                            "prompt_completion): the columns are that format's")
        if format != "auto":
            used = DEFAULT_COLUMNS[format]
            for key in columns:
                if key not in used:
                    raise UserError(f"data.columns.{key}: not read by data.format {format} "
                                    f"(it reads {', '.join(used)})")
        for key, value in roles.items():
            if value not in ROLES:
                raise UserError(f"data.roles.{key}: must be one of {', '.join(ROLES)}, "
                                f"got {value!r}")
        return cls(format, tuple(sorted(columns.items())), tuple(sorted(roles.items())))

    @classmethod
    def from_config(cls, data: Any) -> RowFormat:
        """From the ``data`` section of a config."""
        return cls.of(data.format, data.columns, data.roles)

    def identity(self) -> bytes:
        """Stable bytes for cache keys (the same rows come from the same bytes and format)."""
        return json.dumps([self.format, self.columns, self.roles]).encode()

    def fixed(self, format: str) -> RowFormat:
        """This format with ``auto`` replaced by a detected one."""
        return attrs.evolve(self, format=format)

    def column(self, format: str, name: str) -> str:
        """The file's column for ``name`` (a key of ``DEFAULT_COLUMNS[format]``)."""
        return dict(self.columns).get(name, DEFAULT_COLUMNS[format][name])


#: ``auto`` fixed to the native pair: each row is ``messages`` or ``prompt_completion``.
NATIVE = "native"


def detect(obj: dict[str, Any]) -> str | None:
    """The format a record's keys say (``None``: none of them)."""
    if "messages" in obj:
        return "messages"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    return None


def file_format(detected: str) -> str:
    """What a file read under ``auto`` is fixed to once a record of ``detected`` was valid."""
    return NATIVE if detected in ("messages", "prompt_completion") else detected


def normalise(obj: Any, fmt: RowFormat, text_cells: bool = False
              ) -> tuple[dict[str, Any] | None, list[Found], str | None]:
    """One record as a row: ``(row, [], format)`` or ``(None, problems, format)``.

    ``format`` is the one used (detected under ``auto``; ``None`` when nothing matched).
    ``text_cells``: values are text (CSV), so a messages column holds its list as JSON text.
    """
    if not isinstance(obj, dict):
        return None, [("", "not_object", f"expected a JSON object, got {kind_name(obj)}")], None
    name: str | None = fmt.format
    if name in ("auto", NATIVE):
        name = detect(obj)
        if fmt.format == NATIVE and name not in ("messages", "prompt_completion"):
            name = "messages"  # reported as missing, in the native pair's words
        if name is None:
            return None, [("messages", "missing_messages", _AUTO_HINT)], None
        if not text_cells and not fmt.roles and name in ("messages", "prompt_completion"):
            row, found = _native(obj)
            return row, found, name
    row, found = _CONVERTERS[name](obj, fmt, name, text_cells)
    return row, found, name


def _native(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, list[Found]]:
    """The JSONL rows trainer always read: ``messages``, or ``prompt``/``completion``."""
    if "messages" not in obj and ("prompt" in obj or "completion" in obj):
        return _prompt_completion(obj, "prompt", "completion")
    if "messages" not in obj:
        return None, [("messages", "missing_messages",
                       "missing (give messages or prompt/completion)")]
    if "prompt" in obj or "completion" in obj:
        return None, [("", "mixed_formats", "give either messages or prompt/completion, not both")]
    messages = obj["messages"]
    if not isinstance(messages, list):
        return None, [("messages", "bad_messages", f"expected an array, got {kind_name(messages)}")]
    if not messages:
        return None, [("messages", "empty_messages", "empty (needs at least one turn)")]
    found = check_messages(messages)
    return (None, found) if found else (obj, [])


def _missing(column: str, fmt: str, name: str) -> Found:
    return (column, "missing_" + name,
            f"missing (data.format {fmt} reads column {column!r}; map another with "
            f"data.columns.{name})")


def _rest(obj: dict[str, Any], used: set[str]) -> dict[str, Any]:
    """The record's other columns, carried along like a JSONL row's ``metadata``."""
    return {k: v for k, v in obj.items() if k not in used}


def _conversation(obj: dict[str, Any], fmt: RowFormat, name: str, text_cells: bool
                  ) -> tuple[dict[str, Any] | None, list[Found]]:
    """``messages`` with mapped columns/roles, and ``sharegpt``."""
    col = {k: fmt.column(name, k) for k in DEFAULT_COLUMNS[name]}
    lst, role_key, content_key = col["messages"], col["role"], col["content"]
    if lst not in obj:
        return None, [_missing(lst, name, "messages")]
    turns = obj[lst]
    if text_cells and isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except (json.JSONDecodeError, RecursionError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            return None, [(lst, "not_json", f"not valid JSON text: {why}")]
    if not isinstance(turns, list):
        return None, [(lst, "bad_messages", f"expected an array, got {kind_name(turns)}")]
    if not turns:
        return None, [(lst, "empty_messages", "empty (needs at least one turn)")]
    roles = dict(SHAREGPT_ROLES) if name == "sharegpt" else {}
    roles.update(fmt.roles)
    messages: list[Any] = []
    found: list[Found] = []
    if name == "sharegpt":
        system = obj.get(col["system"])
        if isinstance(system, str) and system.strip():
            messages.append({"role": "system", "content": system})
        elif system not in (None, "") and not isinstance(system, str):
            found.append((col["system"], "bad_content",
                          f"expected a string, got {kind_name(system)}"))
    offset = len(messages)
    for turn in turns:
        if not isinstance(turn, dict):
            messages.append(turn)
            continue
        m: dict[str, Any] = {}
        if role_key in turn:
            role = turn[role_key]
            m["role"] = roles.get(role, role) if isinstance(role, str) else role
        if content_key in turn:
            m["content"] = turn[content_key]
        messages.append(m)

    def rename(field: str) -> str:  # messages[i].role -> conversations[i - offset].from
        if not field.startswith("messages"):
            return field
        rest = field[len("messages"):]
        if rest.startswith("["):
            index, _, tail = rest[1:].partition("]")
            rest = f"[{int(index) - offset}]{tail}"
        rest = rest.replace(".role", f".{role_key}").replace(".content", f".{content_key}")
        return lst + rest

    for field, reason, detail in check_messages(messages):
        if reason == "unknown_role":
            detail += " (map it with data.roles)"
        found.append((rename(field), reason, detail))
    if found:
        return None, found
    used = {lst, col["system"]} if name == "sharegpt" else {lst}
    return {**_rest(obj, used), "messages": messages}, []


def _prompt_completion(obj: dict[str, Any], prompt_key: str, completion_key: str,
                       fmt: str = "", input_key: str = "", system_key: str = ""
                       ) -> tuple[dict[str, Any] | None, list[Found]]:
    """A user and an assistant turn (after an optional system turn); ``fmt`` empty: the
    native prompt/completion row, with its historical messages."""
    found: list[Found] = []
    for key, name in ((prompt_key, "prompt"), (completion_key, "completion")):
        if key not in obj or (fmt and obj[key] is None):
            found.append(_missing(key, fmt, name) if fmt else (key, "missing_" + key, "missing"))
        elif not isinstance(obj[key], str):
            found.append((key, "bad_content", f"expected a string, got {kind_name(obj[key])}"))
    optional = {}
    for key in (input_key, system_key):
        value = obj.get(key) if key else None
        if value is not None and not isinstance(value, str):
            found.append((key, "bad_content", f"expected a string, got {kind_name(value)}"))
        elif value:
            optional[key] = value
    if not found and not obj[completion_key].strip():
        found.append((completion_key, "empty_assistant", "empty completion"))
    if found:
        return None, found
    user = obj[prompt_key]
    if input_key and input_key in optional:
        user = f"{user}\n{optional[input_key]}"
    messages = [{"role": "user", "content": user},
                {"role": "assistant", "content": obj[completion_key]}]
    if system_key and system_key in optional:
        messages.insert(0, {"role": "system", "content": optional[system_key]})
    used = {prompt_key, completion_key, input_key, system_key}
    return {**_rest(obj, used), "messages": messages}, []


def _pairs(obj: dict[str, Any], fmt: RowFormat, name: str, _text_cells: bool
           ) -> tuple[dict[str, Any] | None, list[Found]]:
    """``prompt_completion`` and ``alpaca``."""
    col = {k: fmt.column(name, k) for k in DEFAULT_COLUMNS[name]}
    return _prompt_completion(obj, col["prompt"], col["completion"], name,
                              col.get("input", ""), col.get("system", ""))


_CONVERTERS: dict[str, Callable[..., tuple[dict[str, Any] | None, list[Found]]]] = {
    "messages": _conversation, "sharegpt": _conversation,
    "prompt_completion": _pairs, "alpaca": _pairs,
}


def check_messages(messages: list[Any]) -> list[Found]:
    """Problems of a ``messages`` list as ``(field, reason, detail)``."""
    problems: list[Found] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            problems.append((where, "bad_message", f"expected an object, got {kind_name(m)}"))
            continue
        role = m.get("role")
        if "role" not in m:
            problems.append((f"{where}.role", "missing_role", "missing"))
        elif role not in ROLES:
            shown = json.dumps(role, ensure_ascii=False, default=repr)
            problems.append((f"{where}.role", "unknown_role", f"unknown role {shown}"))
        if "content" not in m:
            problems.append((f"{where}.content", "missing_content", "missing"))
        elif not isinstance(m["content"], str):
            problems.append((f"{where}.content", "bad_content",
                             f"expected a string, got {kind_name(m['content'])}"))
        elif role == "assistant" and not m["content"].strip():
            problems.append((f"{where}.content", "empty_assistant", "empty assistant content"))
    # "No assistant turn" only makes sense once every role is readable.
    if not problems and not any(m["role"] == "assistant" for m in messages):
        problems.append(("messages", "no_assistant", "no assistant turn to learn from"))
    return problems
