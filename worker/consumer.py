"""A Celery consumer that dead-letters the messages Celery itself would drop, or stop on.

Stock Celery acknowledges a message it cannot decode, and rejects one naming an unknown task or carrying
an invalid body: either way the message is gone, with only a log line. Here each goes to the dead-letter
store with the reason first and its envelope as it was on the queue.

Some envelopes kombu reads fine still make Celery raise while it builds the request, outside the four hooks
above: a body that decodes to an object instead of ``[args, kwargs, embed]`` (``ValueError`` from unpacking
it), an ``eta`` that is not a date, a task name that is not a string. That exception would end the worker
("Unrecoverable error"), and the message, restored to the queue at shutdown, would end the next one too.
:meth:`DeadLetteringConsumer.create_task_handler` wraps Celery's handler: anything it raises for one message,
other than a broker connection error (which Celery handles by reconnecting), is that message's fault, and it
goes the way of an invalid task. Messages kombu cannot read at all never get here: worker/transport.py.

If even the dead-letter write fails (Redis refusing writes), the message goes back to the queue after a
pause; if Redis refuses that too, it stays in Redis's unacknowledged set, to be handed out again after the
visibility timeout, and this process lets go of it (else each such message would hold one of the consumer's
prefetch slots for good, and two would stop it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.worker.consumer import Consumer
from kombu.transport import virtual
from kombu.utils.json import dumps

from sluice import deadletters
from sluice.deadletters import Item, raw_message

log = logging.getLogger("sluice.worker")


def envelope_bytes(message: Any) -> bytes:
    """The message's envelope as the queue held it: its bytes, kept by our transport (worker/transport.py), or
    else kombu's parsed envelope written again."""
    kept = getattr(message, "raw_bytes", None)
    if isinstance(kept, bytes):
        return kept
    raw = getattr(message, "_raw", None)
    try:
        return dumps(raw).encode() if raw is not None else bytes(message.body or b"")
    except Exception:  # noqa: BLE001 - a value kombu's JSON cannot write again: keep what can be shown
        return repr(raw).encode("utf-8", errors="backslashreplace")


class DeadLetteringConsumer(Consumer):
    connection_errors: tuple[type[BaseException], ...]

    def _dead_letter(self, message: Any, reason: str, kind: str) -> None:
        from worker.clients import clients

        headers = message.headers if isinstance(message.headers, dict) else {}
        task_id, task = headers.get("id"), headers.get("task")
        record = {**raw_message(envelope_bytes(message)), "task": str(task)[:200], "id": str(task_id)[:200]}
        try:
            deadletters.add(clients.redis, [Item(record, reason)], task_id=None, attempts=1, kind=kind)
        except redis.RedisError as exc:
            log.error("could not dead-letter a message (%s): %r; returning it to the queue", reason, exc)
            self._give_back(message)
            return
        log.error("dead-lettered a message: %s", reason)
        message.ack()

    def _give_back(self, message: Any) -> None:
        time.sleep(1.0)  # Redis is refusing writes: a pause, or the message would loop hot
        try:
            message.reject(requeue=True)
        except Exception as exc:  # noqa: BLE001 - Redis refused the restore too
            log.error("could not return a message to the queue: %r; it is handed out again after the visibility "
                      "timeout", exc)  # fmt: skip
            # Still in Redis's unacknowledged set: release only this process's hold (kombu's local QoS).
            virtual.QoS.ack(message.channel.qos, message.delivery_tag)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._dead_letter(message, f"undecodable message ({message.content_type}): {exc!r}", "undecodable")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, "message in an unknown format (not a Celery task)", "unknown_format")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._dead_letter(message, f"unknown task: {exc!r}", "unknown_task")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._dead_letter(message, f"invalid task message: {exc!r}"[:1000], "invalid_message")

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle: Callable[[Any], Any] = super().create_task_handler(*args, **kwargs)
        connection_errors = tuple(self.connection_errors)

        def on_task_received(message: Any) -> Any:
            try:
                return handle(message)
            except connection_errors:
                raise
            except Exception as exc:  # see the module's doc
                if message.acknowledged:  # already settled by Celery: nothing of it is left to lose
                    log.exception("error after a message was settled")
                    return None
                self.on_invalid_task(None, message, exc)
                return None

        return on_task_received
