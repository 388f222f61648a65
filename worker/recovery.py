"""Re-queue accepted events whose message was lost in flight.

kombu's Redis transport takes a message off the queue (BRPOP) before it records the delivery in its
unacknowledged set; a worker killed in between loses that message, and nothing in Redis remembers it. The
API therefore also records every accepted event (``keys.QUEUED``/``keys.QUEUED_INDEX``) until a worker has
written or dead-lettered it. Once the queue is empty, an event still recorded long after it was queued
(longer than the visibility timeout, so no live delivery can still hold it) has lost its message: it is
queued again. The write is idempotent, so a false alarm costs only a rewrite of identical cells.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import orjson
import redis
from celery import Celery

from sluice import keys
from sluice.queue import WRITE_EVENTS

log = logging.getLogger("sluice.worker")

#: Events per re-queued message.
CHUNK = 500


def recover_lost(client: redis.Redis, celery: Celery, *, older_than_s: float, limit: int = 5000) -> int:
    """Queue again the events recorded longer than ``older_than_s`` ago; returns how many."""
    # A backlog means old events may still be waiting their turn: only an empty queue proves them lost.
    if client.llen(keys.EVENTS_QUEUE):
        return 0
    # One worker per round: several would queue the same events more than once (harmless, but wasteful).
    if not client.set(keys.RECOVERY_LOCK, "1", nx=True, ex=max(1, int(older_than_s / 3))):
        return 0
    ids = cast("list[bytes]", client.zrangebyscore(keys.QUEUED_INDEX, "-inf", time.time() - older_than_s, 0, limit))
    if not ids:
        return 0
    records = cast("list[bytes | None]", client.hmget(keys.QUEUED, ids))
    found: list[dict[str, Any]] = []
    gone: list[bytes] = []
    for event_id, raw in zip(ids, records, strict=True):
        if raw is None:
            gone.append(event_id)
        else:
            found.append(orjson.loads(raw))
    for start in range(0, len(found), CHUNK):
        chunk = found[start : start + CHUNK]
        celery.send_task(
            WRITE_EVENTS,
            args=[[record["e"] for record in chunk], min(float(record["a"]) for record in chunk)],
            kwargs={"request_ids": ["recovery"]},
        )
    with client.pipeline(transaction=False) as pipe:
        if found:
            pipe.zadd(keys.QUEUED_INDEX, dict.fromkeys((str(r["e"]["event_id"]) for r in found), time.time()), xx=True)
        if gone:
            pipe.zrem(keys.QUEUED_INDEX, *gone)
        pipe.execute()
    if found:
        log.warning("re-queued %d accepted events whose message was lost in flight", len(found))
    return len(found)
