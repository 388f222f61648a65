"""The queued marks: Redis's record of every accepted event until it is stored. Their one owner.

A mark is the hash field ``keys.QUEUED[event_id]`` = 16 hex digits of the event's fingerprint followed by the
JSON record ``{"a": accepted_at, "e": event}``, plus the event id in the sorted set ``keys.QUEUED_INDEX``
scored by when the event was last queued. A mark:

* is written **in the same Redis script as the message** that carries the event (:func:`enqueue`): both or
  neither, in one round trip, so a 202 never stands without its mark, and a worker can never see (and clear)
  a message whose marks are not written yet;
* makes "first write wins" decidable: while it exists, a re-post of the same id with the same fingerprint is a
  duplicate (202, nothing new queued) and one with another fingerprint is a conflict (409);
* lets workers re-queue an event whose message was lost in flight (``worker/recovery.py``);
* is removed once the event is stored, or once a stored first version makes it a conflict; a dead-lettered
  event keeps its mark (out of the index) until it is replayed or purged, so no other version can be accepted
  meanwhile.

Every script here touches only the keys it is given, so a deployment can prefix them (see :mod:`sluice.keys`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import orjson
import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from sluice import keys
from sluice.events import fingerprint
from sluice.message import Message

FP_LEN: Final = 16

#: Status letters the enqueue script answers per event when it wrote nothing.
NEW: Final = "n"
DUPLICATE: Final = "d"
CONFLICT: Final = "c"

# KEYS: queue, marks hash, marks index, replication probe. ARGV: message, now, then (id, mark) per event.
# Writes nothing but the probe and answers one status letter per event when any event already has a mark; else
# writes the marks and the message and answers an empty list. The probe is a write after the existing marks:
# a replica that confirms it (WAIT) holds them too, so a duplicate is answered only once its first copy is on
# as many nodes as a new event would be. (Redis 7.0 already makes WAIT cover the offset at a client's last
# command of any kind; later versions count only commands that propagated a write, so without the probe a
# read-only run of the script would leave WAIT nothing to wait for.)
_ENQUEUE = """#!lua
local n = (#ARGV - 2) / 2
local ids, fields, members = {}, {}, {}
for i = 1, n do
  local id = ARGV[1 + 2 * i]
  ids[i] = id
  fields[2 * i - 1], fields[2 * i] = id, ARGV[2 + 2 * i]
  members[2 * i - 1], members[2 * i] = ARGV[2], id
end
-- One call per CHUNK values, not one per event: a call from Lua costs more than the work of most of them.
-- (unpack has a limit of its own, some thousands, and a message of an SDK batch may hold 20,000 events.)
local CHUNK = 1000
local existing = {}
for s = 1, n, CHUNK do
  local part = redis.call('HMGET', KEYS[2], unpack(ids, s, math.min(s + CHUNK - 1, n)))
  for j = 1, #part do existing[s + j - 1] = part[j] end
end
local statuses = {}
local clash = false
for i = 1, n do
  local mark = existing[i]
  if mark then
    clash = true
    if string.sub(mark, 1, 16) == string.sub(ARGV[2 + 2 * i], 1, 16) then statuses[i] = 'd' else statuses[i] = 'c' end
  else
    statuses[i] = 'n'
  end
end
if clash then
  redis.call('INCR', KEYS[4])
  return statuses
end
for s = 1, 2 * n, 2 * CHUNK do
  local e = math.min(s + 2 * CHUNK - 1, 2 * n)
  redis.call('HSET', KEYS[2], unpack(fields, s, e))
  redis.call('ZADD', KEYS[3], unpack(members, s, e))
end
redis.call('LPUSH', KEYS[1], ARGV[1])
return {}
"""

# KEYS: queue, marks index. ARGV: message, now, ids. The events' marks already exist (a retry, a recovery):
# push the message and mark the events as just queued, together.
_REQUEUE = """#!lua
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[i])
end
redis.call('LPUSH', KEYS[1], ARGV[1])
return 1
"""

# KEYS: queue, marks hash, marks index, dead letters. ARGV: message, now, id, the dead-letter record as read,
# the mark. Replays exactly the record that was read: the mark first, then the message, then that record
# is deleted, all at once; a record changed meanwhile, or another version's mark, stops it.
_REPLAY = """#!lua
if redis.call('HGET', KEYS[4], ARGV[3]) ~= ARGV[4] then return 'changed' end
local existing = redis.call('HGET', KEYS[2], ARGV[3])
if existing and string.sub(existing, 1, 16) ~= string.sub(ARGV[5], 1, 16) then return 'conflict' end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[3])
return 'ok'
"""


def mark_value(event: dict[str, Any], accepted_at: float, fp: str | None = None) -> bytes:
    """The mark of one queued-form event: its fingerprint, then ``{"a": accepted_at, "e": event}``."""
    return (fp or fingerprint(event)).encode() + orjson.dumps({"a": accepted_at, "e": event})


@dataclass(frozen=True, slots=True)
class Mark:
    fingerprint: str
    accepted_at: float
    event: dict[str, Any]


def parse_mark(raw: bytes) -> Mark:
    record = orjson.loads(raw[FP_LEN:])
    return Mark(raw[:FP_LEN].decode(), float(record["a"]), record["e"])


def _enqueue_args(message: Message, marks: Sequence[tuple[str, bytes]]) -> list[Any]:
    argv: list[Any] = [message.payload, time.time()]
    for event_id, value in marks:
        argv += [event_id, value]
    return argv


_QUEUE_KEYS: Final = (keys.EVENTS_QUEUE, keys.QUEUED, keys.QUEUED_INDEX, keys.REPLICATION_PROBE)


class ReplicasUnconfirmed(RuntimeError):
    """The primary ran the publish, but fewer replicas than required confirmed it in time: the events may be on
    the primary alone, where a failover could drop them. An unknown outcome, never a 202."""


class AsyncMarks:
    """The API's side: enqueue a message with its events' marks, on the event loop.

    With ``min_replicas``, the publish is answered only once that many replicas confirm it (Redis ``WAIT``,
    bounded by ``replica_timeout_ms``); else :class:`ReplicasUnconfirmed` is raised."""

    def __init__(self, client: aioredis.Redis, *, min_replicas: int = 0, replica_timeout_ms: int = 250) -> None:
        self._client = client
        self._enqueue = client.register_script(_ENQUEUE)
        self._min_replicas = min_replicas
        self._replica_timeout_ms = replica_timeout_ms

    async def enqueue(self, message: Message, marks: Sequence[tuple[str, bytes]]) -> list[str]:
        """Write the marks and the message together; ``[]`` when done. Otherwise nothing was written and the
        answer holds one status per event: :data:`NEW`, :data:`DUPLICATE` or :data:`CONFLICT`."""
        args = _enqueue_args(message, marks)
        if self._min_replicas:
            answer = await self._enqueue_confirmed(args)
        else:
            answer = await self._enqueue(keys=_QUEUE_KEYS, args=args)
        return [s.decode() if isinstance(s, bytes) else str(s) for s in cast("list[Any]", answer)]

    async def _enqueue_confirmed(self, args: list[Any]) -> Any:
        # The script and WAIT in one round trip, on one connection: WAIT counts the replicas that hold
        # everything *this connection* wrote, so it must follow the script on the same connection. (redis-py's
        # Script in a pipeline would first ask SCRIPT EXISTS, a round trip per publish: EVALSHA, and load the
        # script only when a node does not know it, e.g. a primary just promoted.)
        for attempt in range(2):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.evalsha(self._enqueue.sha, len(_QUEUE_KEYS), *_QUEUE_KEYS, *args)
                pipe.wait(self._min_replicas, self._replica_timeout_ms)
                # Errors as values: redis-py's own pipeline error drops the server's text (e.g. NOREPLICAS).
                answer, confirmed = await pipe.execute(raise_on_error=False)
            if isinstance(answer, NoScriptError) and not attempt:
                await self._client.script_load(_ENQUEUE)
                continue
            if isinstance(answer, Exception):
                raise answer
            if isinstance(confirmed, Exception):
                raise confirmed
            if int(confirmed) < self._min_replicas:
                raise ReplicasUnconfirmed(
                    f"{confirmed} of {self._min_replicas} required replicas confirmed the publish within "
                    f"{self._replica_timeout_ms} ms"
                )
            return answer
        raise AssertionError("unreachable")  # pragma: no cover


class Marks:
    """The workers' and the operators' side (blocking client)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._enqueue = client.register_script(_ENQUEUE)
        self._requeue = client.register_script(_REQUEUE)
        self._replay = client.register_script(_REPLAY)

    def enqueue(self, message: Message, marks: Sequence[tuple[str, bytes]]) -> list[str]:
        answer = self._enqueue(keys=_QUEUE_KEYS, args=_enqueue_args(message, marks))
        return [s.decode() if isinstance(s, bytes) else str(s) for s in cast("list[Any]", answer)]

    def requeue(self, message: Message, event_ids: Sequence[str]) -> None:
        """Queue ``message`` again for events whose marks exist (a retry, a recovery)."""
        self._requeue(keys=(keys.EVENTS_QUEUE, keys.QUEUED_INDEX), args=[message.payload, time.time(), *event_ids])

    def replay(self, message: Message, event_id: str, dead_record: bytes, mark: bytes) -> str:
        """``ok``, ``changed`` (the dead letter is not the one read) or ``conflict`` (another version's mark)."""
        answer = self._replay(
            keys=(keys.EVENTS_QUEUE, keys.QUEUED, keys.QUEUED_INDEX, keys.DEAD_LETTERS),
            args=[message.payload, time.time(), event_id, dead_record, mark],
        )
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def get(self, event_ids: Sequence[str | bytes]) -> list[Mark | None]:
        raw = cast("list[bytes | None]", self.client.hmget(keys.QUEUED, list(event_ids)))
        return [None if value is None else parse_mark(value) for value in raw]

    @staticmethod
    def done(pipe: Any, stored: Sequence[str], dead_lettered: Sequence[str] = ()) -> None:
        """Queue on ``pipe`` the end of these events' marks: stored (or refused as a conflict) ones lose their
        mark; dead-lettered ones leave the index but keep the mark, which holds their claim on the id."""
        if stored:
            pipe.hdel(keys.QUEUED, *stored)
            pipe.zrem(keys.QUEUED_INDEX, *stored)
        if dead_lettered:
            pipe.zrem(keys.QUEUED_INDEX, *dead_lettered)
