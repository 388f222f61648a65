"""Logging set-up shared by every Sluice process: one JSON object per line (or plain text), to stderr.

JSON lines carry the request id (``request_id``) where there is one: the API sets it per request, and the
worker's log lines for a batch name the request ids of the events in it, so one id follows an event from
the API to Cassandra.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from sluice.settings import get_settings

_TEXT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _RequestIdFilter(logging.Filter):
    """Adds the current API request's id (asgi-correlation-id's context variable), when there is one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            from asgi_correlation_id import correlation_id
        except ImportError:  # pragma: no cover - the worker image has it too; belt and braces
            return True
        request_id = correlation_id.get()
        if request_id and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


def setup_logging(level: str | None = None) -> None:
    settings = get_settings()
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(_TEXT))
    handler.addFilter(_RequestIdFilter())
    logging.basicConfig(level=(level or settings.log_level).upper(), handlers=[handler], force=True)
    # The driver logs every reconnection attempt at WARNING; keep them, but silence its chatter below that.
    logging.getLogger("cassandra").setLevel(max(logging.getLogger().level, logging.WARNING))
