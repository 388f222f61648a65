"""``POST /v1/events`` and ``POST /v1/events/batch`` answered without FastAPI's routing and dependencies.

At 1,000 single events/s the API's profile (docs/performance.md) had FastAPI's routing and dependency
solving, the instrumentator's second route match and the correlation-id middleware costing more than the
route's own work. The two ingest routes are the hot path, so this pure-ASGI layer, outermost in the app,
answers them itself and hands every other request on unchanged. It does what that stack did for them, in
the same order and with the same results:

1. the request id (``X-Request-ID``: the client's if it is a UUID, else a new one; echoed back, and set for
   the logs and the publish as :data:`asgi_correlation_id.correlation_id`);
2. the API key (401), then room in the queue (503 ``queue_full``);
3. the route's handler itself (api/routes/events.py: body, rate limit, validation, publish);
4. an :class:`~api.errors.ApiError` as the API's error body; anything else goes on to the app's 500
   handler, as before;
5. the HTTP metrics (:data:`sluice.metrics.HTTP_REQUESTS`, :data:`~sluice.metrics.HTTP_LATENCY`).

FastAPI still declares both routes, with the same handlers: they make the OpenAPI document, and they answer
with ``SLUICE_API_FAST_INGEST=false``. tests/test_fast_ingest.py sends the same requests both ways and
compares the answers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

from asgi_correlation_id import correlation_id
from asgi_correlation_id.middleware import is_valid_uuid4
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import Resources, authorize, bearer_token, queue_has_room
from api.errors import ApiError, error_response
from api.publisher import BatchingPublisher
from api.routes import events
from sluice.metrics import HTTP_LATENCY, HTTP_REQUESTS
from sluice.settings import Settings

Handler = Callable[[Request, Settings, BatchingPublisher], Awaitable[Response]]

#: Path -> the route's handler. Exact paths only: anything else (a trailing slash, another method) is
#: FastAPI's to answer (a redirect, a 405).
ROUTES: Final[dict[str, Handler]] = {"/v1/events": events.post_event, "/v1/events/batch": events.post_batch}

REQUEST_ID_HEADER: Final = "x-request-id"


def record_http(handler: str, method: str, status: int, seconds: float) -> None:
    """Count one answered request and its time (every route's metrics go through here)."""
    labels = (handler, method, str(status))
    HTTP_REQUESTS.labels(*labels).inc()
    HTTP_LATENCY.labels(*labels).observe(seconds)


class FastIngest:
    """The ASGI middleware: see the module's doc."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        handler = ROUTES.get(path)
        if handler is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the metrics say if the handler fails (the app's 500 handler then answers)
        request = Request(scope, receive)
        request_id = _request_id(request.headers.get(REQUEST_ID_HEADER))
        token = correlation_id.set(request_id)
        try:
            response = await _answer(request, handler)
            response.headers.append(REQUEST_ID_HEADER, request_id)
            status = response.status_code
            await response(scope, receive, send)
        finally:
            correlation_id.reset(token)
            record_http(path, "POST", status, time.perf_counter() - started)


async def _answer(request: Request, handler: Handler) -> Response:
    resources: Resources = request.app.state.resources
    try:
        authorize(request, bearer_token(request))
        await queue_has_room(request)
        return await handler(request, resources.settings, resources.publisher)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


def _request_id(presented: str | None) -> str:
    # What asgi_correlation_id's middleware does for every other route: a client's id must parse as a UUID.
    if presented and is_valid_uuid4(presented):
        return presented
    return uuid.uuid4().hex


def instrumentator_metrics(info: Any) -> None:
    """The instrumentator's hook for every other route: the same two metrics, through :func:`record_http`."""
    record_http(info.modified_handler, info.method, int(info.modified_status), info.modified_duration)
