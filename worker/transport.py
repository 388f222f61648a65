"""kombu's Redis transport with a guard between the queue's raw bytes and kombu: no message can stop a worker.

kombu pops a message (``BRPOP``) and then parses it (``json.loads``, then its envelope: ``properties``,
``delivery_tag``, ``delivery_info``, the body in its ``body_encoding``) before Celery sees anything. Whatever
raises there (bytes that are not JSON, a JSON list, an object that is not an envelope, invalid base64) escapes
Celery's consumer as an "Unrecoverable error" and stops the worker, and the message, already popped, is
gone. Celery's own hooks (``on_decode_error``, ``on_unknown_message``, ``on_invalid_task``: worker/consumer.py)
only see messages kombu has already turned into a ``Message``, so they cannot catch these.

The smallest place that sees the raw bytes is the channel's ``_brpop_read``: kombu has no hook between the pop
and the parse. :class:`Channel` keeps kombu's own ``_brpop_read`` line for line around one change: the item is
parsed by :meth:`Channel._parse` and a message kombu could not read is dead-lettered with its exact bytes and
the reason (kind ``malformed_message``) instead of raising. Checks that need the envelope sit in
:class:`GuardedMessage` (kombu's ``Channel.Message`` class attribute, another kombu hook), which kombu builds
before it records the delivery, so a refused envelope is never in the unacknowledged set either.

**Bulk claims.** kombu pays three Redis round trips per message: the ``BRPOP``, a pipeline that records the
delivery in the unacknowledged set (``QoS.append``), and another that removes it on the ack. Here, once
``BRPOP`` has returned a message, one script (:data:`CLAIM`) records it and takes up to the prefetch room of
further waiting messages off the queue, recording each in kombu's unacknowledged set *in the same step*; they
are delivered under a hold (worker/delivery.py), so they leave in one run, and a run's acks go in one pipeline
(:meth:`ClaimingQoS.ack` gathers the acks Celery sends through its hub, one by one). The records are kombu's
own (the same hash and index, the same value), so kombu's restore, the visibility timeout and worker/app.py's
``RestoreUnacked`` treat them as ever; and a claimed message is never in neither place, as one is between
kombu's ``BRPOP`` and its ``QoS.append``. With
``SLUICE_WORKER_LINGER_MS`` the channel then pauses (it sends no ``BRPOP``) for that long, holding runs, and
claims what arrived meanwhile: at moderate rates, one claim, one run and one ack per linger instead of three
round trips and a run per message. It lingers only while messages come more often than the linger (the one
before was taken less than a linger ago), so a quiet worker writes a lone message at once.

Only the consuming path (``BRPOP``) is guarded; ``basic_get`` (``_get``), which Celery's worker does not use,
is kombu's. Selected by ``broker_transport`` in worker/app.py (:func:`transport_for`: the Sentinel variant for a
``sentinel://`` URL); producers (the API, the tests) do not need it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.transport.virtual import Message as KombuMessage
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.commands.core import Script

from sluice import deadletters
from sluice.deadletters import Item, raw_message
from sluice.settings import get_settings
from worker import delivery

log = logging.getLogger("sluice.worker")

#: The dead-letter kind of a message kombu could not read (its record holds the raw bytes).
KIND = "malformed_message"


#: Records the message ``BRPOP`` took (ARGV 5 and 6: its delivery tag and kombu's record of it, if given), then
#: takes up to ARGV 2 more messages off the list KEYS[1], recording each in kombu's unacknowledged hash KEYS[2]
#: and its index KEYS[3] (score: ARGV 1, the time) as kombu's ``QoS.append`` would, and returns
#: ``[item, tag, item, tag, ...]`` (tag "" when the item is not an envelope it can record: Python reads it, and
#: kombu records it if it can be delivered at all). Each item is recorded before it is popped, so a write Redis
#: refuses (out of memory) leaves it on the queue. At most ARGV 3 bytes are taken, and an item over ARGV 4 bytes
#: is left where it is (``BRPOP`` takes it next): Redis decodes what it records, and must not stall on it.
CLAIM = Script(
    None,  # type: ignore[arg-type]  # no default client: each call names the channel's
    b"""
local now, room, budget, largest = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if ARGV[5] then
  redis.call('ZADD', KEYS[3], now, ARGV[5])
  redis.call('HSET', KEYS[2], ARGV[5], ARGV[6])
end
local out, bytes = {}, 0
while #out < 2 * room and bytes < budget do
  local item = redis.call('LINDEX', KEYS[1], -1)
  if not item or #item > largest then break end
  local tag = ''
  local ok, envelope = pcall(cjson.decode, item)
  if ok and type(envelope) == 'table' and type(envelope['properties']) == 'table' then
    local properties = envelope['properties']
    local info, t = properties['delivery_info'], properties['delivery_tag']
    if type(t) == 'string' and t ~= '' and type(info) == 'table'
        and type(info['exchange']) == 'string' and type(info['routing_key']) == 'string' then
      tag = t
      redis.call('ZADD', KEYS[3], now, tag)
      redis.call('HSET', KEYS[2], tag,
        '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key']) .. ']')
    end
  end
  redis.call('RPOP', KEYS[1])
  bytes = bytes + #item
  out[#out + 1] = item
  out[#out + 1] = tag
end
return out
""",
)
#: Bounds of one claim: Redis decodes each message it records, so a claim stays small for it (a few ms at most).
CLAIM_BYTES = 4 << 20
CLAIM_ITEM_BYTES = 512 << 10
#: Messages one claim takes when kombu sets no prefetch limit.
CLAIM_MESSAGES = 256


class QueueKeyNotAList(RuntimeError):
    """A queue key holds another type: not a Redis error Celery should retry, so the worker stops (exit 1)."""


def _wrong_type(exc: redis.ResponseError) -> None:
    """Redis error replies are retried like a lost connection (broker_channel_error_retry, so that a primary
    refusing writes without its replica only pauses the worker), but a queue key that is not a list is an
    operator's slip no retry can fix: raise what stops the worker, which says so with its exit code."""
    if "WRONGTYPE" in str(exc):
        raise QueueKeyNotAList(f"a queue key is not a Redis list: {exc}") from exc


class PoisonMessage(Exception):
    """A message kombu cannot deliver; the text says why."""


def envelope_problem(payload: Any) -> str | None:
    """What kombu (and its unacknowledged-set bookkeeping) would trip on in a parsed envelope, or None.

    kombu indexes these without checking: a missing or mistyped one raises in the consumer loop."""
    if not isinstance(payload, dict):
        return f"a JSON {type(payload).__name__}, not a kombu envelope (a JSON object)"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "not a kombu envelope: 'properties' is missing or not an object"
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        return "not a kombu envelope: 'properties.delivery_tag' is missing or not a string"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("exchange", "routing_key")):
        return "not a kombu envelope: 'properties.delivery_info' needs the strings 'exchange' and 'routing_key'"
    if not isinstance(payload.get("headers"), dict | None):
        return "not a kombu envelope: 'headers' is not an object"
    if not isinstance(payload.get("body"), str | None):
        return f"the body is a JSON {type(payload['body']).__name__}, not a string"
    if properties.get("body_encoding") not in (None, "base64"):
        return f"unknown body_encoding {properties['body_encoding']!r}"
    for name in ("content-type", "content-encoding"):
        if not isinstance(payload.get(name), str | None):
            return f"'{name}' is not a string"
    return None


class GuardedMessage(KombuMessage):
    """kombu's message, refusing (:class:`PoisonMessage`) an envelope it would raise on, before the delivery is
    recorded."""

    #: The bytes the message was parsed from, when it came off the queue (worker/consumer.py keeps them in
    #: the dead letter of a message Celery refuses).
    raw_bytes: bytes | None = None

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        self.raw_bytes = getattr(channel, "delivering", None)
        problem = envelope_problem(payload)
        if problem is not None:
            raise PoisonMessage(problem)
        try:
            super().__init__(payload, channel=channel, **kwargs)  # decodes the body (e.g. base64)
        except Exception as exc:
            raise PoisonMessage(f"kombu cannot read the envelope: {exc!r}") from exc
        if self.errors:  # kombu keeps a failed decompression here, to raise later in the consumer
            raise PoisonMessage(f"kombu cannot read the body: {self.errors[0][1]!r}")


class ClaimingQoS(kombu_redis.QoS):
    """kombu's Redis QoS, knowing what :data:`CLAIM` already recorded, and acknowledging the messages of one round
    of the hub in one pipeline."""

    channel: Channel

    def can_consume(self) -> bool:
        # A lingering channel sends no BRPOP until it has claimed what arrived meanwhile (or, should the timer
        # that ends the linger be dropped with a restarting consumer, until its backstop deadline).
        return time.monotonic() >= self.channel.linger_until and bool(super().can_consume())

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.channel.recorded:
            self.channel.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # the claim wrote Redis's record: this process's only
        else:
            super().append(message, delivery_tag)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Acks gathered in this round of the hub (see :meth:`ack`), and the hub whose ticks send them.
        self._acks: list[str] = []
        self._ticking: Any = None

    def ack(self, delivery_tag: str) -> None:
        loop = getattr(self.channel.connection, "event_loop", None)
        if loop is None:  # no hub (a plain consumer): at once, as kombu does
            super().ack(delivery_tag)
            return
        # Celery acknowledges through the hub (``call_soon``), each message on its own, after a run's verdicts:
        # a MULTI/EXEC round trip, and with appendfsync always an fsync, per message. They are gathered here and
        # sent in one round trip at the hub's next tick, which comes in the same round, before it polls again
        # (a ``call_soon`` made now would wait for that poll: up to a second with nothing to read).
        self._acks.append(delivery_tag)
        if self._ticking is not loop:
            loop.on_tick.add(self._send_acks)
            self._ticking = loop

    def _send_acks(self) -> None:
        if self._acks:
            tags, self._acks = self._acks, []
            self.ack_many(tags)

    def restore_unacked_once(self, *args: Any, **kwargs: Any) -> Any:
        # The channel is closing: acks still gathered go first, or their messages would be handed out again.
        self._send_acks()
        if self._ticking is not None:
            self._ticking.on_tick.discard(self._send_acks)
            self._ticking = None
        return super().restore_unacked_once(*args, **kwargs)

    def forget(self, tags: list[str]) -> None:
        """Remove the records of these deliveries (kombu's ``_remove_from_indices``, for many at once)."""
        with self.pipe_or_acquire() as pipe:
            pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()

    def ack_many(self, tags: list[str]) -> None:
        """Remove the records in one round trip. If Redis refuses, they stay there and kombu's restore hands the
        messages out again after the visibility timeout (the write is idempotent); this process lets go of them
        either way, or each would hold a prefetch slot for good."""
        try:
            self.forget(tags)
        except Exception as exc:  # noqa: BLE001 - Redis away: see the docstring
            log.error("could not acknowledge %d messages: %r; they are handed out again after the visibility "
                      "timeout", len(tags), exc)  # fmt: skip
        for tag in tags:
            virtual.QoS.ack(self, tag)


class Channel(kombu_redis.Channel):
    Message = GuardedMessage
    QoS = ClaimingQoS
    qos: ClaimingQoS
    #: The raw bytes of the message being delivered, while it is (see :class:`GuardedMessage`).
    delivering: bytes | None = None
    #: Delivery tags :data:`CLAIM` recorded in Redis, until kombu's ``QoS.append`` sees them.
    recorded: set[str]
    #: Until when (monotonic) the channel waits for a linger to end (no BRPOP meanwhile).
    linger_until = 0.0
    connection_errors: tuple[type[BaseException], ...]
    _queue_cycle: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.recorded = set()
        self.linger_s = get_settings().worker_linger_ms / 1000
        #: When the channel last took messages (monotonic): a linger is only worth it when they come often.
        self.taken_at = -math.inf
        super().__init__(*args, **kwargs)

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5's _brpop_read, with the parse and the delivery guarded and the claim (see the module's doc).
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # if there's a ConnectionError, disconnect so the next iteration will reconnect automatically.
                self.client.connection.disconnect()
                raise
            except redis.ResponseError as exc:
                _wrong_type(exc)
                raise
            if dest__item:
                key, item = dest__item
                dest = bytes_to_str(key).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                payload = self._parse(dest, item)
                first = None
                if payload is not None and envelope_problem(payload) is None:
                    first = (payload["properties"]["delivery_tag"], _record(item, payload))
                room = self._room() - 1
                with delivery.runs_held():
                    claimed = self._claim(key, room, first)
                    if payload is not None:
                        self._deliver(dest, item, payload, first[0] if first and claimed is not None else None)
                    self._deliver_claimed(key, dest, claimed or [])
                # What was just taken is written at once (the hold ended above); a linger holds what comes next.
                # Only when messages come more often than the linger (the previous one was taken less than a
                # linger ago): else it would claim nothing, at the cost of a round trip. Not after a full claim.
                now, previous = time.monotonic(), self.taken_at
                self.taken_at = now
                if 0 < now - previous < self.linger_s and claimed is not None and len(claimed) < room:
                    self._linger(key, dest)
                return True
            raise Empty()
        finally:
            self._in_poll = None

    def _room(self) -> int:
        room = self.qos.can_consume_max_estimate()
        return CLAIM_MESSAGES if room is None else int(room)

    def _claim(self, key: bytes, room: int, first: tuple[str, bytes] | None) -> list[tuple[bytes, str]] | None:
        """Record ``first`` and take up to ``room`` more messages (:data:`CLAIM`); None if Redis refused (the
        first is then recorded by kombu, as it would be without the claim)."""
        args: list[Any] = [repr(time.time()), max(0, room), CLAIM_BYTES, CLAIM_ITEM_BYTES]
        if first is not None:
            args += first
        try:
            with self.conn_or_acquire() as client:
                flat = CLAIM(keys=[key, self.unacked_key, self.unacked_index_key], args=args, client=client)
        except redis.RedisError as exc:
            log.warning("could not claim waiting messages: %r", exc)
            return None
        return [(flat[i], bytes_to_str(flat[i + 1])) for i in range(0, len(flat), 2)]

    def _deliver_claimed(self, key: bytes, dest: str, claimed: list[tuple[bytes, str]]) -> None:
        for done, (item, tag) in enumerate(claimed):
            try:
                payload = self._parse(dest, item)
                if payload is None:
                    self._forget(tag)
                else:
                    self._deliver(dest, item, payload, tag or None)
            except BaseException:
                # Those not delivered go back to the queue now, not after the visibility timeout.
                for _, left in claimed[done + 1 :]:
                    if left:
                        self._hand_back(left)
                raise

    def _deliver(self, dest: str, item: bytes, payload: Any, tag: str | None) -> None:
        """Hand one message to kombu (which calls Celery's consumer); ``tag``: its record is already in Redis."""
        if tag:
            self.recorded.add(tag)
        # Delivery is synchronous: the message kombu builds from the payload now takes these bytes.
        self.delivering = item
        try:
            self.connection._deliver(payload, dest)
        except PoisonMessage as exc:
            self._forget(tag)
            self._dead_letter(dest, item, str(exc))
        finally:
            self.delivering = None
            if tag:
                self.recorded.discard(tag)

    def _forget(self, tag: str | None) -> None:
        """Drop the record of a claimed message that was dead-lettered instead of delivered."""
        if not tag:
            return
        try:
            self.qos.forget([tag])
        except redis.RedisError as exc:  # restored after the visibility timeout: dead-lettered once more
            log.warning("could not drop the record of a dead-lettered message: %r", exc)

    def _hand_back(self, tag: str) -> None:
        try:
            self.qos.restore_by_tag(tag, leftmost=False)
        except redis.RedisError as exc:
            log.warning("could not hand back a claimed message: %r; it is restored after the visibility timeout",
                        exc)  # fmt: skip

    def _linger(self, key: bytes, dest: str) -> None:
        """Send no BRPOP for ``linger_s`` and hold runs; then claim what arrived meanwhile (on kombu's event loop:
        without one, as in ``drain_events``, there is no linger)."""
        loop = getattr(self.connection, "event_loop", None)
        if loop is None:
            return
        # The timer below ends the linger; the deadline is a backstop for a timer dropped with a restarting
        # consumer, late enough that it never races the timer.
        self.linger_until = time.monotonic() + 2 * self.linger_s + 1.0
        delivery.hold_until(self.linger_until)

        def end() -> None:
            try:
                self.linger_until = 0.0
                if not self.closed and not delivery.stopping():
                    self._deliver_claimed(key, dest, self._claim(key, self._room(), None) or [])
                    self.taken_at = time.monotonic()
            except Exception:  # a timer must not end the loop: the next BRPOP carries on
                log.exception("the claim after a linger failed")
            finally:
                delivery.release()

        loop.call_later(self.linger_s, end)

    def _size(self, queue: str) -> int:
        # Where a worker first touches the queue key (declaring the queue): see _wrong_type.
        try:
            return int(super()._size(queue))
        except redis.ResponseError as exc:
            _wrong_type(exc)
            raise

    def _parse(self, queue: str, item: bytes) -> Any:
        """The parsed envelope, or None when the raw bytes went to the dead-letter store."""
        limit = get_settings().max_message_bytes
        if len(item) > limit:
            self._dead_letter(queue, item, f"{len(item):,} bytes, over SLUICE_MAX_MESSAGE_BYTES ({limit:,})")
            return None
        try:
            # kombu's own parser (strict UTF-8 here: kombu would replace invalid bytes and deliver the result).
            return loads(item)
        except Exception as exc:  # noqa: BLE001 - any failure to parse is the message's, and it is kept
            # str, not repr: a UnicodeDecodeError's repr holds the whole message, and the reason is logged.
            self._dead_letter(queue, item, f"not UTF-8 JSON: {type(exc).__name__}: {exc}"[:500])
            return None

    def _dead_letter(self, queue: str, item: bytes, reason: str) -> None:
        """Keep the raw bytes and the reason. If Redis refuses the record, push the bytes back where they were
        taken from (the head of the queue) after a pause, as a task does (worker/tasks.py); only if Redis
        refuses that as well are they lost, and said so."""
        digest = hashlib.sha256(item).hexdigest()[:16]
        try:
            with self.conn_or_acquire() as client:
                deadletters.add(client, [Item(raw_message(item), reason)], kind=KIND, task_id=None, attempts=1)
        except redis.RedisError as exc:
            log.error("could not dead-letter a malformed message (%s): %r; putting it back", reason, exc)
            time.sleep(1.0)
            try:
                with self.conn_or_acquire() as client:
                    client.rpush(queue, item)  # BRPOP takes from the right: the next one taken again
            except redis.RedisError as again:
                log.critical("lost a malformed message of %d bytes (sha256 %s): Redis refused it twice: %r",
                             len(item), digest, again)  # fmt: skip
            return
        # The reason, never the bytes: a message may carry personal data, and its record keeps them.
        log.error("dead-lettered a malformed message of %d bytes (sha256 %s): %s", len(item), digest, reason)


def _record(item: bytes, payload: dict[str, Any]) -> bytes:
    """kombu's record of a delivered message (``[envelope, exchange, routing_key]``, as ``QoS.append`` writes
    it), with the envelope's bytes as they came: they parsed, so they are JSON, and kombu's restore reads them."""
    info = payload["properties"]["delivery_info"]
    return b"[" + item + b"," + dumps(info["exchange"]).encode() + b"," + dumps(info["routing_key"]).encode() + b"]"


class _WithLoop:
    """Keeps the event loop the transport is registered with: a channel's linger ends on its timer."""

    event_loop: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self.event_loop = loop
        super().register_with_event_loop(connection, loop)  # type: ignore[misc]


class Transport(_WithLoop, kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same guard over kombu's Sentinel channel (``sentinel://`` broker URLs): only how the channel finds
    its Redis differs, and ``_brpop_read`` is the one both inherit from kombu's Redis channel."""


class SentinelTransport(_WithLoop, kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def transport_for(url: str) -> str:
    """The guarded transport for a broker URL (``broker_transport`` in worker/app.py)."""
    return f"{__name__}:{'SentinelTransport' if url.startswith('sentinel://') else 'Transport'}"
