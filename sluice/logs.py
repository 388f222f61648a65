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


class _NoTaskArguments(logging.Filter):
    """Keeps a task's arguments (its events) out of Celery's task log lines ("Task ... received", "... succeeded").

    Celery passes them in each line's context, which our JSON lines print (``data``, and the format's
    arguments): the API's messages carry a summary there (``argsrepr``), but a message in the older producer
    format, which the worker still accepts, carries the events themselves. Payloads belong in Cassandra and
    the dead letters, never in a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("celery"):
            if isinstance(record.args, dict) and ("args" in record.args or "kwargs" in record.args):
                record.args = _without_arguments(record.args)
            data = getattr(record, "data", None)
            if isinstance(data, dict) and ("args" in data or "kwargs" in data):
                record.data = _without_arguments(data)
        return True


def _without_arguments(context: dict[str, object]) -> dict[str, object]:
    return {**context, **{k: "<not logged>" for k in ("args", "kwargs") if k in context}}


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
    handler.addFilter(_NoTaskArguments())
    logging.basicConfig(level=(level or settings.log_level).upper(), handlers=[handler], force=True)
    # The driver logs every reconnection attempt at WARNING; keep them, but silence its chatter below that.
    logging.getLogger("cassandra").setLevel(max(logging.getLogger().level, logging.WARNING))
