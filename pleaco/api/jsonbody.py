"""Request bodies: the one place the API (and the webhook) read a body, within a time limit
(a client that sends its body slowly holds a connection and memory) and a size limit, and
turn it into JSON, with a nesting limit checked before the parser runs (Python's json
recurses per level and a 100 000-deep body raised RecursionError, a 500)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from aiohttp import web

from pleaco.api.errors import ApiError

# The app's nesting limit ([api] max_json_depth) and body time limit ([api] body_timeout),
# set by the ApiServer.
MAX_JSON_DEPTH = web.AppKey("max_json_depth", int)
BODY_TIMEOUT = web.AppKey("body_timeout", float)
DEFAULT_BODY_TIMEOUT = 10.0  # for an app made without the ApiServer (tests)


async def read(request: web.Request, limit: int | None = None, what: str = "request body") -> bytes:
    """The whole body within the app's time limit (408) and, with ``limit``, at most that
    many bytes (413, told before reading when the client says its length); without
    ``limit``, aiohttp's own client_max_size applies."""
    try:
        async with asyncio.timeout(request.app.get(BODY_TIMEOUT, DEFAULT_BODY_TIMEOUT)):
            if limit is None:
                return await request.read()
            too_large = ApiError(413, "body_too_large", f"{what} too large (limit {limit} bytes)")
            if request.content_length is not None and request.content_length > limit:
                raise too_large
            parts: list[bytes] = []
            size = 0
            while chunk := await request.content.read(65536):
                size += len(chunk)
                if size > limit:
                    raise too_large
                parts.append(chunk)
            return b"".join(parts)
    except TimeoutError:
        timeout = request.app.get(BODY_TIMEOUT, DEFAULT_BODY_TIMEOUT)
        raise ApiError(408, "body_timeout", f"{what} not received within {timeout:g}s") from None

# A JSON string literal: brackets inside one do not nest.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


def nesting_depth(raw: bytes, limit: int) -> int:
    """How deep the arrays and objects of ``raw`` nest, counting up to ``limit + 1`` (a
    deeper document stops the count there)."""
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", raw))
    depth = deepest = 0
    for b in brackets:
        if b in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def loads(raw: bytes, max_depth: int, what: str = "request body") -> Any:
    """``raw`` as JSON, or an ApiError 400 ``invalid_json`` naming what is wrong."""
    if nesting_depth(raw, max_depth) > max_depth:
        raise ApiError(400, "invalid_json", f"{what} nests deeper than {max_depth} levels (the limit)")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"{what} is not valid JSON: {exc}") from None


def parse(request: web.Request, raw: bytes, what: str = "request body") -> Any:
    """``raw``, the body of ``request``, as JSON within the app's nesting limit."""
    return loads(raw, request.app[MAX_JSON_DEPTH], what)
