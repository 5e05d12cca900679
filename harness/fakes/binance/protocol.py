"""The request side of Binance's market-stream protocol: validation, replies and errors in Binance's own words.

Binance's error messages are those of its JSON parser, serde_json (its positions, its names of types); the
functions here reproduce them from Python's json module, for clients that match on them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Outcome", "error_reply", "json_error_message", "result_reply", "validate_request"]

_METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
_MAX_U64 = 2**64 - 1
_METHOD_VALUE_RE = re.compile(r'"method"\s*:\s*("(?:[^"\\]|\\.)*"|[^,}\s]+)')


_NO_ID = object()


def result_reply(result: Any, request_id: Any) -> str:
    return json.dumps({"result": result, "id": request_id}, separators=(",", ":"))


def error_reply(code: int, msg: str, request_id: Any = _NO_ID) -> str:
    body: dict[str, Any] = {"error": {"code": code, "msg": msg}}
    if request_id is not _NO_ID:
        body["id"] = request_id
    return json.dumps(body, separators=(",", ":"))


def _end_position(text: str) -> tuple[int, int]:
    """Line and column of the last character, the position serde reports for errors found at the end."""
    return text.count("\n") + 1, len(text) - (text.rfind("\n") + 1)


def json_error_message(exc: json.JSONDecodeError) -> str:
    """Python's JSON error in the words of Binance's parser (serde_json), e.g. `expected value at line 1 column 1`."""
    text = exc.doc
    if exc.msg.startswith("Unterminated string"):
        line, col = _end_position(text)
        return f"EOF while parsing a string at line {line} column {col}"
    if exc.pos >= len(text.rstrip()):
        line, col = _end_position(text)
        return f"EOF while parsing a value at line {line} column {col}"
    words = {
        "Expecting value": "expected value",
        "Expecting property name": "key must be a string",
        "Expecting ',' delimiter": "expected `,` or `}`",
        "Expecting ':' delimiter": "expected `:`",
        "Extra data": "trailing characters",
    }
    what = next((w for prefix, w in words.items() if exc.msg.startswith(prefix)), "expected value")
    return f"{what} at line {exc.lineno} column {exc.colno}"


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean `{json.dumps(value)}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if value is None:
        return "null"
    # Annotated: left to itself, mypy infers ABCMeta keys and rejects the lookup by type(value).
    names: dict[type, str] = {list: "sequence", dict: "map"}
    return names.get(type(value), "value")


@dataclass
class Outcome:
    reply: str | None
    close: bool = False  # Binance futures disconnects after invalid JSON (changelog 2023-06-22)


def _is_request_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_U64


def validate_request(text: str, obj: Any) -> str | None:
    """The error reply for a request that does not deserialize (these carry `"id":null`), else None."""
    if not isinstance(obj, dict):
        line, col = _end_position(text)
        return error_reply(2, f"Invalid request: invalid type: {_json_kind(obj)}, expected struct Request "
                              f"at line {line} column {col}", None)
    if "method" not in obj:
        line, col = _end_position(text)
        return error_reply(2, f"Invalid request: missing field `method` at line {line} column {col}", None)
    method = obj["method"]
    if method not in _METHODS:
        found = _METHOD_VALUE_RE.search(text)
        end = found.end() if found else len(text)
        line, col = text.count("\n", 0, end) + 1, end - (text.rfind("\n", 0, end) + 1)
        expected = ", ".join(f"`{m}`" for m in _METHODS)
        if isinstance(method, str):
            return error_reply(2, f"Invalid request: unknown variant `{method}`, expected one of {expected} "
                                  f"at line {line} column {col}", None)
        return error_reply(2, f"Invalid request: invalid type: {_json_kind(method)}, expected variant identifier "
                              f"at line {line} column {col}", None)
    if not _is_request_id(obj.get("id")):
        return error_reply(2, "Invalid request: request ID must be an unsigned integer", None)
    return None
