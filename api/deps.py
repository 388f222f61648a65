"""What routes depend on, as ``Annotated`` aliases; everything is made once per process in the lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request

from api.errors import ApiError
from api.publisher import BatchingPublisher
from sluice.cassandra import Store
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


def _resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


def _settings(request: Request) -> Settings:
    return _resources(request).settings


def _publisher(request: Request) -> BatchingPublisher:
    return _resources(request).publisher


async def _store(request: Request) -> Store:
    return await _resources(request).cassandra.get()


ResourcesDep = Annotated[Resources, Depends(_resources)]
SettingsDep = Annotated[Settings, Depends(_settings)]
PublisherDep = Annotated[BatchingPublisher, Depends(_publisher)]
StoreDep = Annotated[Store, Depends(_store)]
