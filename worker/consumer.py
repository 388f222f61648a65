"""A Celery consumer that dead-letters the messages Celery itself would drop.

Stock Celery acknowledges a message it cannot decode, and rejects one naming an unknown task or carrying
an invalid body: either way the message is gone, with only a log line. Here each goes to the dead-letter
store with the reason first; if even that fails, the message is left unacknowledged, so Redis hands it out
again after the visibility timeout.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer

from sluice import deadletters
from sluice.deadletters import Item

log = logging.getLogger("sluice.worker")


class DeadLetteringConsumer(Consumer):
    def _dead_letter(self, message: Any, reason: str, kind: str) -> bool:
        from worker.clients import clients

        body = message.body
        text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else str(body)
        headers = dict(message.headers or {})
        record = {"message_body": text[:100_000], "task": headers.get("task"), "id": headers.get("id")}
        try:
            deadletters.add(clients.redis, [Item(record, reason)], task_id=headers.get("id"), attempts=1, kind=kind)
        except Exception as exc:  # noqa: BLE001
            log.error("could not dead-letter a message (%s): %r; leaving it unacknowledged", reason, exc)
            return False
        log.error("dead-lettered a message: %s", reason)
        return True

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        if self._dead_letter(message, f"undecodable message ({message.content_type}): {exc!r}", "undecodable"):
            message.ack()

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if self._dead_letter(message, "message in an unknown format (not a Celery task)", "unknown_format"):
            message.ack()

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        if self._dead_letter(message, f"unknown task: {exc!r}", "unknown_task"):
            message.ack()

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if self._dead_letter(message, f"invalid task message: {exc!r}", "invalid_message"):
            message.ack()
