"""The FastAPI app: validates events, queues them through Celery on Redis, serves reads and health."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_fastapi_instrumentator import Instrumentator
from pydantic import TypeAdapter
from starlette.types import ASGIApp

from api.auth import ApiKeys
from api.backpressure import QueueMonitor
from api.deps import CassandraHandle, Resources
from api.errors import install_error_handlers
from api.ingest import FastIngest, instrumentator_metrics
from api.publisher import BatchingPublisher
from api.ratelimit import RateLimiter
from api.responses import JSONResponse
from api.routes import events, health, listings, sdk
from sluice import broker, keys
from sluice.events import Event
from sluice.logs import setup_logging
from sluice.marks import AsyncMarks
from sluice.metrics import TALLY, Tally, mark_process_dead, registry
from sluice.sdkmap import SdkMapping
from sluice.settings import Settings, get_settings

log = logging.getLogger("sluice.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        api_keys = ApiKeys(settings.api_keys)  # refuses to start without a key
        sdk_mapping = SdkMapping.from_settings(settings)  # refuses to start on a bad SLUICE_SDK_EVENTS
        # Its own client: the publish has a short timeout of its own (a stalled Redis is a fast 503/504), which
        # leaves room for the replicas' confirmation (WAIT) when one is required.
        replica_wait_s = settings.redis_replica_timeout_ms / 1000 if settings.redis_min_replicas else 0.0
        publish_timeout_s = settings.publish_timeout_s + replica_wait_s
        publish_redis = broker.async_client(settings, timeout=publish_timeout_s)
        redis = broker.async_client(settings)
        # A lingering worker claims up to SLUICE_WORKER_BATCH_MESSAGES per pool process at the end of its linger.
        held = settings.worker_batch_messages if settings.worker_linger_ms > 0 else 0
        monitor = QueueMonitor(redis, settings.max_queue_depth, memory_ratio=settings.max_redis_memory_ratio,
                               held=held)  # fmt: skip
        publisher = BatchingPublisher(
            AsyncMarks(
                publish_redis,
                min_replicas=settings.redis_min_replicas,
                replica_timeout_ms=settings.redis_replica_timeout_ms,
            ).enqueue,
            max_events=settings.publish_max_events,
            linger_s=settings.publish_linger_ms / 1000,
            deadline_s=publish_timeout_s + 0.3,
            max_pending_events=settings.max_pending_events,
            backlog_linger_s=settings.publish_backlog_linger_ms / 1000,
            backlogged=monitor.backlogged,
            concurrency=settings.publish_concurrency,
            rate_linger_s=settings.publish_rate_linger_ms / 1000,
        )
        publisher.start()
        cassandra = CassandraHandle(settings)
        limiter = RateLimiter(redis, settings.rate_limit_per_s)
        background = [
            asyncio.create_task(limiter.run(), name="sluice-ratelimit"),
            asyncio.create_task(monitor.run(), name="sluice-queue-monitor"),
            asyncio.create_task(_flush_metrics(), name="sluice-metrics"),
        ]
        app.state.resources = Resources(
            settings=settings, publisher=publisher, cassandra=cassandra, redis=redis,
            api_keys=api_keys, limiter=limiter, monitor=monitor, page_token_key=page_token_key(settings),
            sdk_mapping=sdk_mapping,
        )  # fmt: skip
        log.info("API ready: queue %s on %s", keys.EVENTS_QUEUE, broker.describe(settings))
        if settings.redis_min_replicas:
            log.info(
                "a 202 waits for %d replica(s) to confirm the publish (WAIT, up to %d ms; else 504)",
                settings.redis_min_replicas, settings.redis_replica_timeout_ms,
            )  # fmt: skip
        else:
            log.info(
                "a 202 waits for no replica (SLUICE_REDIS_MIN_REPLICAS=0): accepted events are on the primary "
                "alone, and a failover may lose them; fine for one node, not for production (docs/guarantees.md)"
            )
        try:
            yield
        finally:
            log.info("API shutting down: publishing what is queued")
            for task in background:
                task.cancel()
            # Bounded: under uvloop, a task cancelled while redis-py opens its first connection was seen
            # never to finish (the API then hung on a port already in use instead of exiting). These tasks
            # hold nothing that needs flushing.
            _, stuck = await asyncio.wait(background, timeout=1.0)
            if stuck:
                log.warning("%d background tasks did not stop within 1 s; leaving them", len(stuck))
            await publisher.close()
            await cassandra.close()
            await broker.aclose(redis)
            await broker.aclose(publish_redis)
            TALLY.flush()
            mark_process_dead(os.getpid())

    app = FastAPI(
        title="Sluice",
        version="1.0.0",
        summary="Buffered event ingestion: HTTP in, Celery on Redis, Apache Cassandra out.",
        default_response_class=JSONResponse,
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry hooks look things up on every request; we export Prometheus metrics.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    app.include_router(events.router)
    app.include_router(sdk.router)
    app.include_router(listings.router)
    app.include_router(health.router)
    # HTTP metrics per route template, method and status (one pure-ASGI middleware, no per-request I/O).
    # (The ingest fast path records the same metrics itself.)
    Instrumentator(
        should_group_status_codes=False, excluded_handlers=["/metrics"], should_instrument_requests_inprogress=False
    ).add(instrumentator_metrics).instrument(app)
    # Every request, even one refused before routing, gets an id (X-Request-ID, echoed back).
    app.add_middleware(CorrelationIdMiddleware, header_name="X-Request-ID")

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics of every API and worker process",
        operation_id="getMetrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def metrics() -> Response:
        TALLY.flush()  # this process's counts so far; the others' flush every Tally.FLUSH_S
        return Response(generate_latest(registry()), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


async def _flush_metrics() -> None:
    """Add the counts this process kept (sluice.metrics.Tally) to the shared metrics, every ``Tally.FLUSH_S``."""
    while True:
        await asyncio.sleep(Tally.FLUSH_S)
        TALLY.flush()


def serve(app: FastAPI, settings: Settings | None = None) -> ASGIApp:
    """What uvicorn serves: :class:`~api.ingest.FastIngest` in front of ``app``, which answers the two ingest
    routes before any of the app's layers (api/ingest.py says why); ``app`` alone with
    ``SLUICE_API_FAST_INGEST=false``."""
    settings = settings or get_settings()
    return FastIngest(app) if settings.api_fast_ingest else app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the request-body schemas: the routes parse bodies themselves (to give
    400/413/415 before validation), so FastAPI cannot see them."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    ref = "#/components/schemas/{model}"
    event_schema = TypeAdapter(Event).json_schema(ref_template=ref)
    components.update(event_schema.pop("$defs", {}))
    components["Event"] = event_schema
    batch_schema = events.BatchRequest.model_json_schema(ref_template=ref)
    components.update(batch_schema.pop("$defs", {}))
    components["BatchRequest"] = batch_schema
    app.openapi_schema = schema
    return schema


def page_token_key(settings: Settings) -> bytes:
    """The key that signs page tokens: SLUICE_PAGE_TOKEN_SECRET, or one derived from the API keys (which every
    API process of a deployment shares), so a token made by one process is good at every other."""
    secret = settings.page_token_secret or settings.api_keys
    return hashlib.sha256(b"sluice page tokens\0" + secret.get_secret_value().encode()).digest()


setup_logging()
app = create_app()
#: The ASGI app uvicorn serves (api/server.py).
asgi = serve(app)
