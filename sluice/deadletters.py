"""The dead-letter record: events (and undecodable messages) the worker gave up on, kept in Redis with the
reason, never dropped. Its one owner: the worker writes records here, the API reads them, and the operator's
command (``sluice dlq``) lists, replays and purges them here.

A record is the hash field ``keys.DEAD_LETTERS[event_id]`` (or ``unkeyed-<uuid>`` for a raw message) holding
JSON ``{"event", "reason", "kind", "task_id", "attempts", "failed_at", "accepted_at"}``. Writing records and
taking their events out of the recovery index happen in one transaction (:func:`add`): if Redis refuses it,
the caller must not acknowledge the message (the event would be nowhere).

A record holds anything: ``event`` is the event (or message) as JSON when it can be written as JSON, and
otherwise its raw form, ``{"raw_message": text, "encoding": "utf-8" | "base64" | "repr", "bytes": n}`` (see
:func:`raw_message`): a message that is not JSON at all, or an event JSON can carry but orjson cannot (an
integer over 64 bits). So no content can make a dead-letter write fail, and no message loops on one.

A message from an analytics SDK that the API could not map to an event (sluice/sdkmap.py) is a record of its
own kind, :data:`SDK_KIND`, written by the API before it answers (:func:`add_sdk_rejections`): ``event`` is
the SDK's message as sent, and ``sdk`` what its translation depends on besides (format, key id, the request's
times). Its id is the event id the message would have, so an SDK's retry finds the record already there
(written only if absent), and ``replay`` translates the message again, with the mapping of its own settings.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import orjson
import redis
import redis.asyncio as aioredis

from sluice import keys, message, sdkmap
from sluice.events import event_id_of, fingerprint, queued_form, validate_event
from sluice.marks import Marks, mark_value
from sluice.metrics import DEAD_LETTERS

# KEYS: dead letters, marks hash, marks index. ARGV: id, fingerprint of the dead-lettered event ('' if none).
# Deletes the record, and the event's mark only if it is this version's claim (not a newer version's mark).
_PURGE = """#!lua
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then
  local mark = redis.call('HGET', KEYS[2], ARGV[1])
  if mark and string.sub(mark, 1, 16) == ARGV[2] and not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
    redis.call('HDEL', KEYS[2], ARGV[1])
  end
end
return removed
"""


def raw_message(data: bytes) -> dict[str, Any]:
    """The raw form of a message or event: its exact bytes, as text when they are UTF-8, else in base64."""
    try:
        return {"raw_message": data.decode("utf-8"), "encoding": "utf-8", "bytes": len(data)}
    except UnicodeDecodeError:
        return {"raw_message": base64.b64encode(data).decode("ascii"), "encoding": "base64", "bytes": len(data)}


def raw_bytes(event: Any) -> bytes | None:
    """The exact bytes a record's raw form holds (see :func:`raw_message`), or None if it holds an event."""
    if not isinstance(event, dict) or not isinstance(event.get("raw_message"), str):
        return None
    text: str = event["raw_message"]
    return base64.b64decode(text) if event.get("encoding") == "base64" else text.encode("utf-8")


def _encode(record: dict[str, Any]) -> bytes:
    """The record as JSON, whatever its event holds.

    orjson refuses integers over 64 bits (and keys that are not strings), which JSON itself allows: then the
    event is kept as the JSON text the standard library writes for it, and failing even that (a value JSON
    cannot hold), as its ``repr``. The record itself is then strings and numbers only, which orjson writes."""
    try:
        return orjson.dumps(record, default=str)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        pass
    event = record["event"]
    try:
        text = json.dumps(event, default=str, ensure_ascii=False, allow_nan=False)
        raw = raw_message(text.encode("utf-8"))
    except (TypeError, ValueError, RecursionError):
        raw = {**raw_message(repr(event).encode("utf-8", errors="backslashreplace")), "encoding": "repr"}
    return orjson.dumps({**record, "event": raw}, default=str)


#: The kind of an SDK message the API could not map to an event.
SDK_KIND: Final = "sdk_unmapped"


@dataclass(frozen=True, slots=True)
class Item:
    """One thing to dead-letter: the raw event (or message) and why."""

    raw: Any
    reason: str


def add(
    client: redis.Redis,
    items: Iterable[Item],
    *,
    kind: str,
    task_id: str | None,
    attempts: int,
    accepted_at: float | None = None,
    release_marks: Sequence[str] = (),
) -> int:
    """Record the items and take their events out of the recovery index, in one transaction.

    Dead-lettered events keep their marks (their claim on the id) unless named in ``release_marks`` (a
    conflict: another version is stored). Raises :class:`redis.RedisError` if Redis refused: then nothing
    was recorded and the message must go back to the queue."""
    now = dt.datetime.now(dt.UTC).isoformat()
    mapping: dict[str, bytes] = {}
    for item in items:
        key = event_id_of(item.raw) or f"unkeyed-{uuid.uuid4()}"
        record = {"event": item.raw, "reason": item.reason, "kind": kind, "task_id": task_id,
                  "attempts": attempts, "failed_at": now, "accepted_at": accepted_at}  # fmt: skip
        mapping[key] = _encode(record)
    if not mapping:
        return 0
    ids = [key for key in mapping if not key.startswith("unkeyed-")]
    released = set(release_marks)
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(keys.DEAD_LETTERS, mapping=mapping)
        Marks.done(pipe, [i for i in ids if i in released], [i for i in ids if i not in released])
        pipe.execute()
    DEAD_LETTERS.labels(kind).inc(len(mapping))
    return len(mapping)


@dataclass(frozen=True, slots=True)
class SdkRejection:
    """An SDK message the API rejected: kept under the event id it would have."""

    event_id: str
    message: Any
    reason: str
    request: sdkmap.Request


async def add_sdk_rejections(client: aioredis.Redis, rejections: Sequence[SdkRejection]) -> int:
    """Keep the rejected SDK messages (a record each, written only where none is: a retry changes nothing, and
    an event's own dead letter is never overwritten); how many are new. Raises :class:`redis.RedisError`
    if Redis refused: then the API must not answer 200."""
    now = dt.datetime.now(dt.UTC).isoformat()
    async with client.pipeline(transaction=True) as pipe:
        for item in rejections:
            record = {"event": item.message, "reason": item.reason, "kind": SDK_KIND, "task_id": None,
                      "attempts": 0, "failed_at": now, "accepted_at": None, "sdk": item.request.as_json()}  # fmt: skip
            pipe.hsetnx(keys.DEAD_LETTERS, item.event_id, orjson.dumps(record, default=str).decode())
        written = sum(int(n) for n in await pipe.execute())
    DEAD_LETTERS.labels(SDK_KIND).inc(written)
    return written


def entries(client: redis.Redis) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every record, a page at a time (``HSCAN``: never one reply the size of the whole store)."""
    for key, value in client.hscan_iter(keys.DEAD_LETTERS, count=500):
        yield key.decode(), orjson.loads(value)


def ids(client: redis.Redis) -> list[str]:
    # (HSCAN's NOVALUES needs Redis 7.4; the values come along and are dropped.)
    return [key.decode() for key, _ in client.hscan_iter(keys.DEAD_LETTERS, count=500)]


def get(client: redis.Redis, entry_id: str) -> dict[str, Any] | None:
    raw = cast("bytes | None", client.hget(keys.DEAD_LETTERS, entry_id))
    return None if raw is None else cast("dict[str, Any]", orjson.loads(raw))


def _replayable(record: dict[str, Any], entry_id: str | None = None) -> dict[str, Any] | str:
    """The event of a record in its queued form, or why it cannot be replayed."""
    if record.get("kind") == SDK_KIND:
        return _sdk_replayable(record, entry_id)
    event = record.get("event")
    if not isinstance(event, dict) or "raw_message" in event or "message_body" in event or "args" in event:
        return "a raw message, not an event: inspect it with `show`"
    outcome = validate_event(event)
    if isinstance(outcome, list):
        return "not a valid event: " + "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in outcome)
    return queued_form(outcome)


def _sdk_replayable(record: dict[str, Any], entry_id: str | None) -> dict[str, Any] | str:
    """An SDK message translated again, with this process's mapping (SLUICE_SDK_EVENTS)."""
    try:
        request = sdkmap.Request.from_json(record["sdk"])
    except (KeyError, TypeError, ValueError) as exc:
        return f"an SDK record without its request ({exc!r})"
    outcome = sdkmap.translate(record.get("event"), request, sdkmap.current())
    if outcome.status == "counted":
        return "an SDK call Sluice counts but does not store"
    if outcome.event is None:
        why = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in outcome.errors)
        return f"still not an event: {why}"
    if entry_id is not None and outcome.event_id != entry_id:
        return f"the message translates to event {outcome.event_id}, not {entry_id}"
    return outcome.event


_REPLAY_REFUSED: Final = {
    "changed": "the record changed while replaying; replay it again",
    "conflict": "another version of this event id is queued",
}


def replay(client: redis.Redis, entry_ids: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """Queue dead-lettered events again through the normal path; returns (replayed, skipped with why).

    Per record, in one Redis script: the event's mark is written, then its message, then exactly the record
    that was read is deleted. A record that changed meanwhile (a newer failure of the same id) is left for
    the next replay, and a record whose id is now claimed by another version is left as a conflict."""
    marks = Marks(client)
    replayed: list[str] = []
    skipped: dict[str, str] = {}
    for entry_id in entry_ids:
        raw = cast("bytes | None", client.hget(keys.DEAD_LETTERS, entry_id))
        if raw is None:
            skipped[entry_id] = "no such dead letter"
            continue
        record = orjson.loads(raw)
        event = _replayable(record, entry_id)
        if isinstance(event, str):
            skipped[entry_id] = event
            continue
        accepted_at = record.get("accepted_at")
        accepted = float(accepted_at) if isinstance(accepted_at, int | float) else dt.datetime.now(dt.UTC).timestamp()
        msg = message.build([event], accepted_at=accepted, request_ids=[f"replay:{entry_id}"], origin="replay")
        outcome = marks.replay(msg, entry_id, raw, mark_value(event, accepted))
        if outcome == "ok":
            replayed.append(entry_id)
        else:
            skipped[entry_id] = _REPLAY_REFUSED.get(outcome, outcome)
    return replayed, skipped


def purge(client: redis.Redis, entry_ids: Iterable[str]) -> int:
    """Delete records for good (and release their events' claims on the ids)."""
    script = client.register_script(_PURGE)
    removed = 0
    for entry_id in entry_ids:
        record = get(client, entry_id)
        event = _replayable(record, entry_id) if record is not None else "gone"
        fp = fingerprint(event) if isinstance(event, dict) else ""
        removed += int(
            cast("int", script(keys=(keys.DEAD_LETTERS, keys.QUEUED, keys.QUEUED_INDEX), args=[entry_id, fp]))
        )
    return removed
