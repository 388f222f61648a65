"""Re-queue accepted events whose message was lost in flight, also while the queue has a backlog.

kombu's Redis transport takes a message off the queue (BRPOP) before it records the delivery in its
unacknowledged set; a worker killed in between loses that message, and nothing in Redis but the events'
queued marks (:mod:`sluice.marks`) remembers it. Each mark's index score says when its event was last
queued. An event is lost when its score is older than

* the visibility timeout (plus a margin), and
* the oldest message still in the queue (its ``sluice_enqueued_at``): the queue is first in, first out, so
  everything queued before that message has been taken off it. This is what lets recovery run under a
  backlog: an old event still waiting its turn is never younger than the queue's head;

and no message that a worker holds (kombu's unacknowledged set: being written, or waiting for its retry to
be due) carries it. That set is read only when there are candidates, so a worker pays no Redis round trip
per message for recovery's sake.

Such events are queued again (with their marks' scores refreshed, in one script). The write is idempotent
and the worker skips events already stored, so a false alarm costs one read.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Final, cast

import orjson

from sluice import keys, message
from sluice.marks import Marks

log = logging.getLogger("sluice.worker")

#: Events per re-queued message.
CHUNK: Final = 500
#: Slack for the clocks of the hosts that stamp scores and messages.
CLOCK_MARGIN_S: Final = 5.0


def lost_before(marks: Marks, older_than_s: float, now: float | None = None) -> float | None:
    """Marks scored before this instant belong to lost messages; None when that cannot be told now."""
    now = time.time() if now is None else now
    cutoff = now - older_than_s
    head = cast("bytes | None", marks.client.lindex(keys.EVENTS_QUEUE, -1))
    if head is not None:
        head_at = message.enqueued_at(head)
        if head_at is None:
            return None  # a message from another producer heads the queue: its age is unknown
        cutoff = min(cutoff, head_at - CLOCK_MARGIN_S)
    return cutoff


def _held_by_workers(marks: Marks) -> set[str]:
    """Event ids of the messages workers hold right now (delivered, not yet acknowledged)."""
    held: set[str] = set()
    for _, raw in marks.client.hscan_iter(keys.UNACKED, count=100):
        try:
            envelope = orjson.loads(raw)[0]
            body = envelope["body"]
            if envelope.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            events = orjson.loads(body)[0][0]
            held.update(str(event["event_id"]) for event in events if isinstance(event, dict) and "event_id" in event)
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
            continue  # not one of ours: nothing of it can be a queued mark
    return held


def recover_lost(marks: Marks, *, older_than_s: float, limit: int = 5000) -> int:
    """Queue again the events whose message was lost; returns how many."""
    client = marks.client
    cutoff = lost_before(marks, older_than_s)
    if cutoff is None:
        return 0
    # One worker per round: several would queue the same events more than once (harmless, but wasteful).
    if not client.set(keys.RECOVERY_LOCK, "1", nx=True, ex=max(1, int(older_than_s / 3))):
        return 0
    ids = cast("list[bytes]", client.zrangebyscore(keys.QUEUED_INDEX, "-inf", cutoff, 0, limit))
    if not ids:
        return 0
    held = _held_by_workers(marks)
    ids = [event_id for event_id in ids if event_id.decode() not in held]
    records = marks.get(ids) if ids else []
    found = [(event_id.decode(), mark) for event_id, mark in zip(ids, records, strict=True) if mark]
    gone = [event_id for event_id, mark in zip(ids, records, strict=True) if mark is None]
    for start in range(0, len(found), CHUNK):
        chunk = found[start : start + CHUNK]
        msg = message.build(
            [mark.event for _, mark in chunk],
            accepted_at=min(mark.accepted_at for _, mark in chunk),
            request_ids=["recovery"],
            origin="recovery",
        )
        marks.requeue(msg, [event_id for event_id, _ in chunk])
    if gone:
        client.zrem(keys.QUEUED_INDEX, *gone)
    if found:
        log.warning("re-queued %d accepted events whose message was lost in flight", len(found))
    return len(found)
