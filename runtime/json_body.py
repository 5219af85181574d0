"""JSON request bodies parsed with bounds, for every route (OpenAI, v2 REST, v2 parameters).

``json.loads`` alone turns hostile input into 500s: arrays nested 100k deep raise RecursionError,
an integer of more than 4300 digits raises a plain ValueError, and a lone surrogate escape
(``"\\ud800"``) gives a ``str`` that cannot be encoded, which fails later in the tokenizer or in
``str.encode``. ``parse_json`` turns each into a ``JSONBodyError`` (a ValueError) that names the
problem, and refuses nesting deeper than ``MAX_JSON_DEPTH`` (our own code walks tensors and
chat content recursively; no real request nests that deep).
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON_DEPTH = 64
# A \uD800-\uDFFF escape: the only way a JSON text yields a lone surrogate. Scanning the raw bytes
# for it first keeps the walk below off the common path.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


class JSONBodyError(ValueError):
    """A body that is not acceptable JSON; the message says why. ``field``: the top-level key
    the problem is under, when it is under one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def parse_json(body: bytes | str, what: str = "the request body") -> Any:
    """``body`` as JSON, within ``MAX_JSON_DEPTH`` and with valid Unicode strings only."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise JSONBodyError(f"{what} nests JSON arrays/objects deeper than {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JSONBodyError(f"{what} is not valid JSON: {exc}") from exc
    except ValueError:  # an integer past Python's int/str conversion limit (4300 digits)
        raise JSONBodyError(f"{what} holds a number with too many digits") from None
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    _check(data, what, deep=raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH,
           surrogates=_SURROGATE_ESCAPE.search(raw) is not None)
    return data


def _check(data: Any, what: str, *, deep: bool, surrogates: bool) -> None:
    """Walk ``data`` (iteratively: depth is what is being checked) when the raw text could hold
    too deep a nesting or a surrogate escape."""
    if not deep and not surrogates:
        return
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if surrogates:
                _check_text(value, path, what)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise JSONBodyError(f"{_short(path) or what}: JSON nested deeper than {MAX_JSON_DEPTH} levels",
                                _top(path))
        if isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                if surrogates:
                    _check_text(key, child, what)
                stack.append((item, child, depth + 1))
        else:
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = _short(ascii(path)[1:-1]) or what  # the path itself may hold the surrogate (a key)
        raise JSONBodyError(f"{where}: contains a lone UTF-16 surrogate (\\ud800-\\udfff), "
                            "which is not valid Unicode text", _top(where)) from None


def _short(path: str, limit: int = 80) -> str:
    return path if len(path) <= limit else path[:limit] + "..."


def _top(path: str) -> str | None:
    """The top-level key of a field path (``messages[0].content`` -> ``messages``)."""
    head = re.split(r"[.\[]", path, maxsplit=1)[0]
    return head or None
