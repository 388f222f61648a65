"""The dead-letter store: events the worker gave up on, kept in Redis with the reason, never dropped."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from typing import Any

import orjson
import redis

from sluice import keys
from sluice.events import event_id_of


def add(client: redis.Redis, items: Iterable[tuple[Any, str]], *, task_id: str | None, attempts: int) -> int:
    """Record each ``(raw event, reason)``; keyed by event id, so dead-lettering twice keeps one entry."""
    now = dt.datetime.now(dt.UTC).isoformat()
    mapping: dict[str, bytes] = {}
    for raw, reason in items:
        key = event_id_of(raw) or f"unkeyed-{uuid.uuid4()}"
        record = {"event": raw, "reason": reason, "task_id": task_id, "attempts": attempts, "failed_at": now}
        mapping[key] = orjson.dumps(record, default=str)
    if mapping:
        client.hset(keys.DEAD_LETTERS, mapping=mapping)
    return len(mapping)
