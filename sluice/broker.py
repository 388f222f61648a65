"""Clients of the queue's Redis: one node, or the primary that Redis Sentinel names now.

``SLUICE_REDIS_URL`` takes kombu's forms, so the workers' Celery and every other client read one value:

* ``redis://[:password@]host:port/db`` (``rediss://`` over TLS): one node (``make up``, ElastiCache's
  primary endpoint, which follows a failover by DNS);
* ``sentinel://host:port;sentinel://host:port;.../db``: the primary of ``SLUICE_REDIS_SENTINEL_MASTER`` as
  the sentinels name it. Every new connection asks them, and a connection that finds the node it reached
  demoted (READONLY) or gone is dropped, so every client follows a failover without a restart. A password
  in the first URL is the primary's; the sentinels themselves are reached without one.

Every process makes its clients here (API, workers, the CloudWatch publisher, the CLI), so none of them can
keep talking to an old primary by an address of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from sluice.settings import Settings

__all__ = ["SentinelTarget", "aclose", "async_client", "close", "describe", "parse_sentinels", "sync_client"]


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    db: int
    password: str | None


def parse_sentinels(url: str) -> SentinelTarget | None:
    """The sentinels of a ``sentinel://`` URL (kombu's form, ``;``-separated), or None for a one-node URL."""
    if not url.startswith("sentinel://"):
        return None
    sentinels: list[tuple[str, int]] = []
    db, password = 0, None
    for i, part in enumerate(p for p in url.split(";") if p.strip()):
        parts = urlsplit(part.strip())
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ValueError(f"SLUICE_REDIS_URL: {part!r} is not sentinel://host:port")
        sentinels.append((parts.hostname, parts.port or 26379))
        if i == 0 and parts.password:
            password = unquote(parts.password)
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
    return SentinelTarget(sentinels, db, password)


def _timeouts(settings: Settings, timeout: float | None) -> dict[str, float]:
    t = settings.redis_socket_timeout_s if timeout is None else timeout
    return {"socket_timeout": t, "socket_connect_timeout": t}


def sync_client(settings: Settings, *, timeout: float | None = None, **kwargs: Any) -> redis.Redis:
    """A blocking client of the current primary, with socket timeouts (``timeout``, else the setting's)."""
    options = _timeouts(settings, timeout) | kwargs
    target = parse_sentinels(settings.redis_url)
    if target is None:
        return redis.Redis.from_url(settings.redis_url, **options)
    sentinel_kwargs = _timeouts(settings, None)
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs, **options)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, redis_class=redis.Redis, db=target.db, password=target.password
    )
    return cast("redis.Redis", client)


def async_client(settings: Settings, *, timeout: float | None = None, **kwargs: Any) -> aioredis.Redis:
    """The same, on the event loop (redis.asyncio); close it with :func:`aclose`."""
    options = _timeouts(settings, timeout) | kwargs
    target = parse_sentinels(settings.redis_url)
    if target is None:
        return cast("aioredis.Redis", aioredis.Redis.from_url(settings.redis_url, **options))
    sentinel_kwargs = _timeouts(settings, None)
    sentinel = AsyncSentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs, **options)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(
        settings.redis_sentinel_master, redis_class=aioredis.Redis, db=target.db, password=target.password
    )
    return cast("aioredis.Redis", client)


async def aclose(client: aioredis.Redis) -> None:
    """Close a client of :func:`async_client`, and its sentinels' connections if it has any."""
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    await client.aclose()
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


def close(client: redis.Redis) -> None:
    """Close a client of :func:`sync_client`, and its sentinels' connections if it has any."""
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    client.close()
    for sentinel in getattr(manager, "sentinels", ()):
        sentinel.close()


def describe(settings: Settings) -> str:
    """Where the queue is, for a log line: never a password."""
    target = parse_sentinels(settings.redis_url)
    if target is not None:
        where = ",".join(f"{host}:{port}" for host, port in target.sentinels)
        return f"primary {settings.redis_sentinel_master!r} of sentinels {where} (db {target.db})"
    parts = urlsplit(settings.redis_url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"
