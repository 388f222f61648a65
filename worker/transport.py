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

Only the consuming path (``BRPOP``) is guarded; ``basic_get`` (``_get``), which Celery's worker does not use,
is kombu's. Selected by ``broker_transport`` in worker/app.py (:func:`transport_for`: the Sentinel variant for a
``sentinel://`` URL); producers (the API, the tests) do not need it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Message as KombuMessage
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from sluice import deadletters
from sluice.deadletters import Item, raw_message
from sluice.settings import get_settings

log = logging.getLogger("sluice.worker")

#: The dead-letter kind of a message kombu could not read (its record holds the raw bytes).
KIND = "malformed_message"


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


class Channel(kombu_redis.Channel):
    Message = GuardedMessage
    #: The raw bytes of the message being delivered, while it is (see :class:`GuardedMessage`).
    delivering: bytes | None = None
    connection_errors: tuple[type[BaseException], ...]
    _queue_cycle: Any

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5's _brpop_read, with the parse and the delivery guarded (see the module's doc).
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
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                payload = self._parse(dest, item)
                if payload is not None:
                    # Delivery is synchronous: the message kombu builds from the payload now takes these bytes.
                    self.delivering = item
                    try:
                        self.connection._deliver(payload, dest)
                    except PoisonMessage as exc:
                        self._dead_letter(dest, item, str(exc))
                    finally:
                        self.delivering = None
                return True
            raise Empty()
        finally:
            self._in_poll = None

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


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same guard over kombu's Sentinel channel (``sentinel://`` broker URLs): only how the channel finds
    its Redis differs, and ``_brpop_read`` is the one both inherit from kombu's Redis channel."""


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def transport_for(url: str) -> str:
    """The guarded transport for a broker URL (``broker_transport`` in worker/app.py)."""
    return f"{__name__}:{'SentinelTransport' if url.startswith('sentinel://') else 'Transport'}"
