"""``POST /v1/events`` and ``POST /v1/events/batch`` answered without FastAPI's routing and dependencies.

At 1,000 single events/s the API's profile (docs/performance.md) had FastAPI's routing and dependency
solving, the instrumentator's second route match and the correlation-id middleware costing more than the
route's own work; and below them, Starlette's and FastAPI's own layers (the error middleware, which wraps
every ``send``, the body-limit and telemetry middlewares) cost a request more again. The two ingest routes are
the hot path, so this pure-ASGI app, the one uvicorn serves (:data:`api.main.asgi`), answers them itself and
hands every other request, and the lifespan, to the FastAPI app unchanged. It does what that stack did for
them, in the same order and with the same results:

1. the request id (``X-Request-ID``: the client's if it is a UUID, else a new one; echoed back, and set for
   the logs and the publish as :data:`asgi_correlation_id.correlation_id`);
2. the API key (401), then room in the queue (503 ``queue_full``);
3. the route's handler itself (api/routes/events.py: body, rate limit, validation, publish);
4. an :class:`~api.errors.ApiError` as the API's error body; anything else is logged and answered 500
   ``internal_error``, as the app's own handler answers it;
5. the HTTP metrics (:data:`sluice.metrics.HTTP_REQUESTS`, :data:`~sluice.metrics.HTTP_LATENCY`).

Most ingest requests do not reach this app as ASGI at all: the connection's protocol (api/http.py, the
ingest lane) calls :meth:`FastIngest.respond` itself and writes the answer. Both ways run the same steps.

FastAPI still declares both routes, with the same handlers: they make the OpenAPI document, and they answer
with ``SLUICE_API_FAST_INGEST=false``. tests/test_fast_ingest.py sends the same requests both ways and
compares the answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from random import getrandbits
from typing import Any, Final

from asgi_correlation_id import correlation_id
from asgi_correlation_id.middleware import is_valid_uuid4
from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api.body import REPEATS_KEYS, json_encoding, parse_json
from api.deps import Resources, authorize, bearer_token, charge_key, check_room, key_of, queue_has_room
from api.errors import ApiError, error_response
from api.publisher import BatchingPublisher, Overloaded, PublishError
from api.routes import events
from sluice.events import fingerprint
from sluice.metrics import HTTP_LATENCY, HTTP_REQUESTS, TALLY
from sluice.settings import Settings

Handler = Callable[[Request, Settings, BatchingPublisher], Awaitable[Response]]

#: Path -> the route's handler. Exact paths only: anything else (a trailing slash, another method) is
#: FastAPI's to answer (a redirect, a 405).
ROUTES: Final[dict[str, Handler]] = {"/v1/events": events.post_event, "/v1/events/batch": events.post_batch}
#: The route whose requests :meth:`FastIngest.start_single` answers without a task.
SINGLE: Final = "/v1/events"

#: The answer to a lane's request (api/http.py): its status, raw headers and body; called once.
Reply = Callable[[int, list[tuple[bytes, bytes]], bytes], None]

#: The headers :meth:`FastIngest.start_single` reads (uvicorn lower-cases names).
_SINGLE_HEADERS: Final = frozenset((b"authorization", b"content-type", b"content-encoding", b"x-request-id"))

REQUEST_ID_HEADER: Final = "x-request-id"

log = logging.getLogger("sluice.api")


#: (handler, method, status) -> that label set's counter and histogram: prometheus_client's ``labels()`` checks
#: and looks its arguments up under a lock on every call. As bounded as the label sets themselves.
_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def record_http(handler: str, method: str, status: int, seconds: float) -> None:
    """Count one answered request and its time (every route's metrics go through here)."""
    key = (handler, method, status)
    children = _CHILDREN.get(key)
    if children is None:
        labels = (handler, method, str(status))
        children = _CHILDREN[key] = (HTTP_REQUESTS.labels(*labels), HTTP_LATENCY.labels(*labels))
    TALLY.inc(children[0])
    TALLY.observe(children[1], seconds)


class _Headers(Headers):
    def get(self, key: str, default: Any = None) -> Any:
        # Mapping.get() goes through __getitem__, which raises KeyError for every header a request lacks
        # (most lack X-Request-ID and Content-Encoding): a scan without the exception.
        wanted = key.lower().encode("latin-1")
        for name, value in self.raw:
            if name == wanted:
                return value.decode("latin-1")
        return default


class IngestRequest(Request):
    """An ingest request: a :class:`Request` whose headers are looked up without an exception per miss."""

    @property
    def headers(self) -> Headers:
        headers = self.__dict__.get("_ingest_headers")
        if headers is None:
            headers = self.__dict__["_ingest_headers"] = _Headers(scope=self.scope)
        return headers


class FastIngest:
    """The ASGI app in front of the FastAPI ``app``: see the module's doc. The connection's protocol
    (api/http.py) answers most ingest requests without ASGI at all, through :meth:`respond`."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        #: Request target (exact, no query) -> (path, handler): what the protocol's lane looks up.
        self.targets: Final[dict[bytes, tuple[str, Handler]]] = {p.encode(): (p, h) for p, h in ROUTES.items()}

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
        status = 500  # what the metrics say if the answer cannot be sent
        scope["app"] = self.app  # what Starlette sets, and request.app reads (the app's resources)
        try:
            response = await self.respond(IngestRequest(scope, receive), path, handler)
            status = response.status_code
            await response(scope, receive, send)
        finally:
            record_http(path, "POST", status, time.perf_counter() - started)

    async def respond(self, request: Request, path: str, handler: Handler) -> Response:
        """The answer to one ingest request, with its ``X-Request-ID``; never raises (an error is a 500)."""
        request_id = _request_id(request.headers.get(REQUEST_ID_HEADER))
        token = correlation_id.set(request_id)
        try:
            response = await _answer(request, handler)
        except Exception:  # noqa: BLE001 - any failure is this request's 500, logged
            response = _internal_error(path)
        finally:
            correlation_id.reset(token)
        response.headers.append(REQUEST_ID_HEADER, request_id)
        return response

    def start_single(self, headers: list[tuple[bytes, bytes]], body: bytes, reply: Reply) -> bool:
        """Answer a ``POST /v1/events`` whose whole body is here, as :meth:`respond` and the route's handler
        do, without a task: the checks run now, and ``reply`` is called with the answer, now for a refusal, or
        from the event loop once the event is queued. False, having done nothing a second pass would repeat
        (nothing charged or queued), for a request :meth:`respond` must answer: a ``Content-Encoding``, or a
        body that may repeat a key (those need work off the event loop).

        The same steps as :meth:`respond` and :func:`api.routes.events.post_event`, in the same order, from
        the same functions; tests/test_fast_ingest.py compares the answers. Why: a task, its coroutine chain
        and the request and response objects were about a third of the API's CPU per single event."""
        found: dict[bytes, bytes] = {}
        for name, value in headers:
            if name in _SINGLE_HEADERS and name not in found:  # the first of a repeated header, as Starlette's
                found[name] = value
        if b"content-encoding" in found:
            return False
        request_id = _request_id(_text(found.get(b"x-request-id")))
        resources: Resources = self.app.state.resources
        token = correlation_id.set(request_id)

        def answer(response: Response) -> None:
            reply(response.status_code, [*response.raw_headers, (b"x-request-id", request_id.encode())],
                  response.body)  # type: ignore[arg-type]  # fmt: skip

        def settled(statuses: list[str], error: PublishError | None) -> None:
            # Called by the publisher, from the event loop: whatever happens here is this request's answer.
            response: Response
            try:
                if error is not None:
                    raise events.publish_refused(error)
                events.count_accepted([event], statuses)
                response = events.single_answer(event["event_id"], statuses[0])
            except ApiError as exc:
                response = error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
            except Exception:  # noqa: BLE001 - any failure is this request's 500, logged
                context = correlation_id.set(request_id)  # for the log line
                response = _internal_error(SINGLE)
                correlation_id.reset(context)
            answer(response)

        try:
            key_id = key_of(resources.api_keys, bearer_token(_text(found.get(b"authorization"))))
            check_room(resources.monitor)
            json_encoding(_text(found.get(b"content-type")), None)
            raw = parse_json(body)
            if raw is REPEATS_KEYS:
                return False
            charge_key(resources, key_id, 1)
            event = events.single_event(raw, resources.settings)
            try:
                resources.publisher.submit_soon([event], [fingerprint(event)], request_id, settled)
            except (Overloaded, PublishError) as exc:
                raise events.publish_refused(exc) from None
        except ApiError as exc:
            answer(error_response(exc.status, exc.code, exc.message, exc.details, exc.headers))
        except Exception:  # noqa: BLE001 - any failure is this request's 500, logged
            answer(_internal_error(SINGLE))
        finally:
            correlation_id.reset(token)
        return True


def _text(header: bytes | None) -> str | None:
    return header.decode("latin-1") if header is not None else None


def _internal_error(path: str) -> Response:
    """A 500 for an exception no one expected (logged here, with its traceback)."""
    log.exception("unhandled error on POST %s", path)
    return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")


async def _answer(request: Request, handler: Handler) -> Response:
    resources: Resources = request.app.state.resources
    try:
        authorize(request, bearer_token(request.headers.get("authorization")))
        await queue_has_room(request)
        return await handler(request, resources.settings, resources.publisher)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


def _request_id(presented: str | None) -> str:
    # What asgi_correlation_id's middleware does for every other route: a client's id must parse as a UUID.
    if presented and is_valid_uuid4(presented):
        return presented
    # A new one from the process's own generator: uuid4() reads the kernel's (a system call per request).
    # Seeded from it at start (each API process), which is all a correlation id needs.
    return f"{getrandbits(128):032x}"


def instrumentator_metrics(info: Any) -> None:
    """The instrumentator's hook for every other route: the same two metrics, through :func:`record_http`."""
    record_http(info.modified_handler, info.method, int(info.modified_status), info.modified_duration)
