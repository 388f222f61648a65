"""The API's one error shape, ``{"error": {"code", "message", "details"}}``, and the handlers that make it.

On the analytics-SDK routes (api/routes/sdk.py) the body also carries ``code`` and ``message`` at its top
level: Segment's and RudderStack's SDKs read exactly those two keys of an error body, and RudderStack's
crashes without them."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.responses import JSONResponse
from sluice.cassandra import UnknownEventType

log = logging.getLogger(__name__)


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: list[Any] = []


class ErrorBody(BaseModel):
    error: ErrorInfo


class ApiError(Exception):
    """Raised anywhere in a request to answer with ``status`` and the error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[Any] | None = None,
    headers: dict[str, str] | None = None,
    *,
    sdk: bool = False,
) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": code, "message": message, "details": details or []}}
    if sdk:
        body = {"code": code, "message": message, **body}
    return JSONResponse(body, status_code=status, headers=headers)


def _for_sdk(request: Request) -> bool:
    """Set by the SDK routes' first dependency (api/routes/sdk.py), before anything there can fail."""
    return bool(getattr(request.state, "sdk", False))


def store_read_failed(exc: Exception) -> ApiError:
    """A read that Cassandra failed: the store's fault, not the caller's (503, retry later).

    A stored row of a type this release does not declare is no outage, and retrying will not help: 500, named,
    rather than returning it as some other type or without its fields."""
    if isinstance(exc, UnknownEventType):
        log.error("%s", exc)
        return ApiError(500, "unknown_event_type", str(exc))
    return ApiError(503, "store_unavailable", f"reading from Cassandra failed: {exc}", headers={"Retry-After": "2"})


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "payload_too_large"}


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers, sdk=_for_sdk(request))

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        details = [
            {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
            for err in exc.errors()
        ]
        return error_response(422, "invalid_request", "the request's parameters are invalid", details)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None),
                              sdk=_for_sdk(request))  # fmt: skip

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "an unexpected error occurred; it has been logged",
                              sdk=_for_sdk(request))  # fmt: skip

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
