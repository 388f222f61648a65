"""What routes depend on, as ``Annotated`` aliases; everything is made once per process in the lifespan."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from dataclasses import dataclass
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from api.auth import ApiKeys
from api.backpressure import QueueMonitor
from api.errors import ApiError
from api.publisher import BatchingPublisher
from api.ratelimit import RateLimiter, retry_after_header
from sluice.cassandra import Store
from sluice.sdkmap import SdkMapping
from sluice.settings import Settings

log = logging.getLogger(__name__)


class CassandraHandle:
    """Connects to Cassandra on first use (and again after a failure), off the event loop.

    The API must start and accept events while Cassandra is down (writes only need Redis), so it never
    blocks start-up on Cassandra; reads answer 503 until it answers.
    """

    RETRY_AFTER_S = 2.0

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._store: Store | None = None
        self._lock = asyncio.Lock()
        self._failed_at = 0.0
        self._last_error = ""

    async def get(self) -> Store:
        if self._store is not None:
            return self._store
        async with self._lock:
            if self._store is None:
                if time.monotonic() - self._failed_at < self.RETRY_AFTER_S:
                    raise self._unavailable()
                try:
                    self._store = await asyncio.to_thread(Store.open, self._settings)
                    log.info("connected to Cassandra at %s", self._settings.cassandra_contact_points)
                except Exception as exc:  # noqa: BLE001 - any connect failure means "unavailable"
                    self._failed_at = time.monotonic()
                    self._last_error = str(exc)
                    log.warning("cannot connect to Cassandra: %s", exc)
                    raise self._unavailable() from None
        return self._store

    def _unavailable(self) -> ApiError:
        return ApiError(503, "store_unavailable", "Cassandra is not reachable right now", headers={"Retry-After": "2"})

    async def close(self) -> None:
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
            self._store = None


@dataclass
class Resources:
    settings: Settings
    publisher: BatchingPublisher
    cassandra: CassandraHandle
    redis: aioredis.Redis
    api_keys: ApiKeys
    limiter: RateLimiter
    monitor: QueueMonitor
    #: Signs page tokens (api/routes/listings.py).
    page_token_key: bytes
    #: SDK event names -> event types (api/routes/sdk.py), from the registry and SLUICE_SDK_EVENTS.
    sdk_mapping: SdkMapping


def _state(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


# Dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in a thread pool, and
# that hand-off per request costs more than the dependency itself.
async def _resources(request: Request) -> Resources:
    return _state(request)


async def _settings(request: Request) -> Settings:
    return _state(request).settings


async def _publisher(request: Request) -> BatchingPublisher:
    return _state(request).publisher


async def _store(request: Request) -> Store:
    return await _state(request).cassandra.get()


_bearer = HTTPBearer(auto_error=False, description="An API key from SLUICE_API_KEYS.")


async def _authorize(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    return authorize(request, credentials.credentials if credentials else None)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None: what :data:`_bearer` reads, for the
    ingest fast path (api/ingest.py), which runs no dependencies."""
    scheme, token = get_authorization_scheme_param(header)
    return token if scheme.lower() == "bearer" and token else None


def authorize(request: Request, token: str | None) -> str:
    """The caller's key id (also kept on ``request.state.key_id``); 401 without a valid key."""
    key_id = key_of(_state(request).api_keys, token)
    request.state.key_id = key_id
    return key_id


def key_of(api_keys: ApiKeys, token: str | None) -> str:
    """The id of the API key ``token``; 401 if it names none."""
    key_id = api_keys.identify(token) if token else None
    if key_id is None:
        raise ApiError(
            401,
            "unauthorized",
            "a valid API key is required: Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return key_id


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": 'Basic realm="sluice"'})


def sdk_header_key(request: Request) -> str | None:
    """An SDK request's key id from its Authorization header, checked before its body is read: Basic with the
    API key as user name (what Segment's and RudderStack's SDKs send; the password is not used), or Bearer.
    None without the header (the key is then in the body, as PostHog sends it); 401 if the header names no
    valid key."""
    header = request.headers.get("authorization")
    if header is None or not header.strip():
        return None
    scheme, _, value = header.strip().partition(" ")
    presented = value.strip()
    if scheme.lower() == "basic":
        try:
            presented = base64.b64decode(presented, validate=True).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            raise _unauthorized("the Basic credentials are not base64 of 'key:'") from None
    elif scheme.lower() != "bearer":
        raise _unauthorized("Authorization must be Basic (the API key as user name) or Bearer <key>")
    key_id = _state(request).api_keys.identify(presented)
    if key_id is None:
        raise _unauthorized("the Authorization header holds no valid API key")
    return key_id


def authorize_sdk(request: Request, header_key_id: str | None, body_key: object) -> str:
    """The caller's key id (kept on ``request.state.key_id``): the header's, else the body's key (Segment's
    ``writeKey``, PostHog's ``api_key``); 401 without a valid one."""
    key_id = header_key_id
    if key_id is None and isinstance(body_key, str):
        key_id = _state(request).api_keys.identify(body_key)
    if key_id is None:
        raise _unauthorized("a valid API key is required: as the Basic user name, or as writeKey / api_key in the body")
    request.state.key_id = key_id
    return key_id


def charge(request: Request, cost: int) -> None:
    """Charge ``cost`` units (events, or 1 for a read) to the caller's rate limit; 429 over it."""
    charge_key(_state(request), request.state.key_id, cost)


def charge_key(resources: Resources, key_id: str, cost: int) -> None:
    """:func:`charge` for a key id: 429 if ``cost`` units are over its rate limit."""
    wait = resources.limiter.admit(key_id, cost)
    if wait is not None:
        raise ApiError(
            429,
            "rate_limited",
            f"over {resources.settings.rate_limit_per_s} events per second for this API key",
            headers={"Retry-After": retry_after_header(wait)},
        )


async def _charge_one(request: Request, _: Annotated[str, Depends(_authorize)]) -> None:
    charge(request, 1)


async def queue_has_room(request: Request) -> None:
    """503 ``queue_full`` while the queue is over its limit (ingest routes, before the body is read)."""
    check_room(_state(request).monitor)


def check_room(monitor: QueueMonitor) -> None:
    """:func:`queue_has_room`: 503 ``queue_full`` while the queue is over its limit."""
    retry = monitor.retry_after()
    if retry is not None:
        if monitor.memory_full:
            why = f"Redis is {monitor.used_memory / monitor.max_memory:.0%} full"
        else:
            why = f"the queue holds {monitor.depth} messages, over its limit of {monitor.max_depth}"
        raise ApiError(503, "queue_full", f"{why}; retry later", headers={"Retry-After": str(retry)})


#: Router-level: every /v1 route needs a valid API key. Ingest routes charge their events to the key's rate
#: limit once the body is read (:func:`charge`); read routes add :data:`RATE_LIMITED` (one unit each).
AUTHORIZED = Depends(_authorize)
RATE_LIMITED = Depends(_charge_one)
#: Ingest routes: refuse with 503 while the queue is over its limit.
QUEUE_HAS_ROOM = Depends(queue_has_room)

ResourcesDep = Annotated[Resources, Depends(_resources)]
SettingsDep = Annotated[Settings, Depends(_settings)]
PublisherDep = Annotated[BatchingPublisher, Depends(_publisher)]
StoreDep = Annotated[Store, Depends(_store)]
