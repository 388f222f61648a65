"""Reading a JSON request body safely: content type first, size capped while it streams, strict JSON."""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from typing import Any

import orjson
from fastapi import Request

from api.errors import ApiError


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def _too_large(max_bytes: int, what: str = "the request body") -> ApiError:
    return ApiError(413, "payload_too_large", f"{what} exceeds the limit of {max_bytes} bytes")


class _Inflater:
    """gzip, inflated as it streams, and never past ``max_bytes``: a small gzip bomb costs us ``max_bytes``
    of work, not its expanded size."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._out = 0
        # 16 + MAX_WBITS: a gzip header and trailer, not raw deflate or zlib.
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> bytes:
        try:
            out = self._z.decompress(data, self._max + 1 - self._out)
        except zlib.error as exc:
            raise ApiError(400, "malformed_gzip", f"the gzip request body is corrupt: {exc}") from None
        self._out += len(out)
        if self._out > self._max or self._z.unconsumed_tail:
            raise _too_large(self._max, "the decompressed request body")
        return out

    def finish(self) -> None:
        if not self._z.eof:
            raise ApiError(400, "malformed_gzip", "the gzip request body is truncated")


async def read_json(request: Request, max_bytes: int) -> Any:
    """The decoded body, or an :class:`ApiError` with 415, 413 or 400.

    ``Content-Encoding: gzip`` bodies are accepted; both the compressed and the decompressed size are capped
    at ``max_bytes``, and checked while the body streams in."""
    encoding = json_encoding(request.headers.get("content-type"), request.headers.get("content-encoding"))
    inflater = _Inflater(max_bytes) if encoding == "gzip" else None
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    # Count while streaming, so a body without (or lying about) Content-Length is still never read whole.
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(inflater.feed(chunk) if inflater else chunk)
    if inflater is not None and size:
        inflater.finish()
    body = b"".join(chunks)
    value = parse_json(body)
    if value is REPEATS_KEYS:
        # The slow, exact check: a 1 MiB body takes a CPU-bound while, so it runs off the event loop, and
        # only a few at a time (others wait their turn instead of piling threads onto 2 cores).
        async with _slow_path():
            value = await asyncio.to_thread(_refuse_duplicate_keys, body)
    return value


def json_encoding(content_type: str | None, content_encoding: str | None) -> str:
    """The body's encoding (``identity`` or ``gzip``) from its headers; 415 unless it is JSON in one of them."""
    if not _is_json(content_type):
        raise ApiError(415, "unsupported_media_type", "the request body must be JSON (Content-Type: application/json)")
    encoding = "identity" if content_encoding is None else content_encoding.strip().lower()
    if encoding not in ("identity", "gzip"):
        raise ApiError(415, "unsupported_content_encoding", "Content-Encoding must be gzip or identity (none)")
    return encoding


#: What :func:`parse_json` returns for a body that may repeat a key in an object: only the slow check
#: (:func:`_refuse_duplicate_keys`, off the event loop) can tell.
REPEATS_KEYS: Any = object()


def parse_json(body: bytes) -> Any:
    """The decoded (whole, decompressed) body; 400 if it is empty or not JSON. :data:`REPEATS_KEYS` if it may
    repeat a key: the caller then runs the slow check, which gives the value or the 400."""
    if not body:
        raise ApiError(400, "malformed_json", "the request body is empty; expected a JSON document")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON: {exc}") from None
    if len(_KEY_TOKEN.findall(body)) != _count_keys(value):
        return REPEATS_KEYS
    return value


# Every object key is a string followed by a colon, so this matches at least once per key (and more only
# where a string value happens to hold an escaped quote before a colon).
_KEY_TOKEN = re.compile(rb'"[ \t\r\n]*:')


_SLOW_PATHS: asyncio.Semaphore | None = None


def _slow_path() -> asyncio.Semaphore:
    global _SLOW_PATHS
    if _SLOW_PATHS is None:
        _SLOW_PATHS = asyncio.Semaphore(2)
    return _SLOW_PATHS


def _refuse_duplicate_keys(body: bytes) -> Any:
    """400 for ``{"a": 1, "a": 2}``: which value a parser keeps is up to the parser, so we keep neither; else
    the body's value.

    Called only when the fast check (in :func:`parse_json`) fails: if the body has exactly as many key tokens
    as the parsed objects have keys, no key can have been repeated (a repeat collapses two tokens into one
    key). Otherwise parse again, slowly, to find the repeated key."""

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ApiError(400, "duplicate_key", f"the request body repeats the key {key[:100]!r} in one object")
            seen.add(key)
        return dict(pairs)

    try:
        return json.loads(body, object_pairs_hook=pairs_hook)
    except RecursionError:
        raise ApiError(400, "malformed_json", "the request body is nested too deeply") from None


def _count_keys(value: Any) -> int:
    # orjson makes plain dicts and lists only. Most values are scalars: one C-level pass over a container's
    # value types finds out whether it holds containers at all, before any per-item Python work.
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            count += len(item)
            values: Any = item.values()
        elif type(item) is list:
            values = item
        else:
            continue
        kinds = set(map(type, values))
        if dict in kinds or list in kinds:
            stack.extend(v for v in values if type(v) is dict or type(v) is list)
    return count
