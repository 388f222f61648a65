"""Reading a JSON request body safely: content type first, size capped while it streams, strict JSON."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request

from api.errors import ApiError


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


async def read_json(request: Request, max_bytes: int) -> Any:
    """The decoded body, or an :class:`ApiError` with 415, 413 or 400."""
    if not _is_json(request.headers.get("content-type")):
        raise ApiError(415, "unsupported_media_type", "the request body must be JSON (Content-Type: application/json)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "payload_too_large", f"the request body exceeds the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    # Count while streaming, so a body without (or lying about) Content-Length is still never read whole.
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "payload_too_large", f"the request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise ApiError(400, "malformed_json", "the request body is empty; expected a JSON document")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON: {exc}") from None
