"""The queued message: one Celery task message carrying a batch of accepted events. Its one owner.

Everyone who puts events on the queue builds the message here (the API, recovery, dead-letter replay and the
worker's retries), and the worker reads its arguments here, so the format has one definition.

The message is a Celery protocol-2 task message in kombu's Redis envelope (what ``celery.send_task`` would
LPUSH), built directly so that it can travel in the same Redis script as the events' queued marks (see
:mod:`sluice.marks`): message and marks are written together, in one round trip, or not at all. Building it
costs one ``orjson.dumps`` per message, never per event, and needs no Celery app in the API.

The body is plain JSON (no base64 ``body_encoding``): kombu passes a body without an encoding through as is,
which saves a third of the bytes and an encode/decode per message.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final

import orjson

from sluice import keys

#: The one task: write a batch of validated events to Cassandra.
WRITE_EVENTS: Final = "sluice.write_events"

_ORIGIN: Final = f"sluice-{os.getpid()}@{socket.gethostname()}"
_EMBED: Final = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

JsonEvent = dict[str, Any]
#: Version of the queued form a message's events are in (sluice.events.queued_form).
QUEUED_FORM: Final = 1


@dataclass(frozen=True, slots=True)
class Message:
    """One message ready for LPUSH: its task id and the envelope's bytes."""

    task_id: str
    payload: bytes


def build(
    events: list[JsonEvent],
    *,
    accepted_at: float,
    request_ids: list[str],
    retries: int = 0,
    countdown_s: float | None = None,
    origin: str = "api",
) -> Message:
    """The message that makes a worker write ``events`` (plain JSON dicts in the queued form).

    ``accepted_at`` (epoch seconds) is when the API acknowledged them; ``retries`` and ``countdown_s`` are
    for the worker's own retries (Celery holds a message with an ETA until it is due).
    """
    task_id = str(uuid.uuid4())
    eta = None
    if countdown_s is not None:
        eta = dt.datetime.fromtimestamp(time.time() + countdown_s, dt.UTC).isoformat()
    # ``form``: the events are in their queued form, validated by the API, so the worker may trust them.
    kwargs = {"accepted_at": accepted_at, "request_ids": request_ids, "form": QUEUED_FORM}
    body = orjson.dumps([[events], kwargs, _EMBED])
    envelope = {
        "body": body.decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": WRITE_EVENTS,
            "id": task_id,
            "shadow": None,
            "eta": eta,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": retries,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            # A summary, not the arguments: Celery logs argsrepr, and a repr of 500 events is useless there.
            "argsrepr": f"<{len(events)} events from {origin}>",
            "kwargsrepr": "{}",
            "origin": _ORIGIN,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
            # Ours: when the message was put on the queue, so recovery can tell how far the queue has moved.
            "sluice_enqueued_at": time.time(),
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": keys.EVENTS_QUEUE},
            "priority": 0,
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return Message(task_id, orjson.dumps(envelope))


def enqueued_at(raw: bytes | str | None) -> float | None:
    """When a message taken from the queue (``LINDEX``) was enqueued, if it says (ours all do)."""
    if raw is None:
        return None
    try:
        value = orjson.loads(raw)["headers"].get("sluice_enqueued_at")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class TaskArguments:
    events: list[Any]
    accepted_at: float
    request_ids: list[str]
    #: Built by sluice (the API, recovery, replay, a retry): events in their queued form, already validated.
    trusted: bool


def parse_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskArguments | str:
    """The task's arguments, or why they cannot be used (a message from an older or broken producer).

    Accepts the current form ``(events,), {accepted_at, request_ids}`` and the older ``(events, accepted_at)``.
    """
    events = args[0] if args else kwargs.get("events")
    accepted_at = args[1] if len(args) > 1 else kwargs.get("accepted_at")
    request_ids = kwargs.get("request_ids") or []
    if not isinstance(events, list):
        return f"malformed task arguments: events is {type(events).__name__}, not a list"
    if not isinstance(accepted_at, int | float) or isinstance(accepted_at, bool):
        accepted_at = time.time()
    if not isinstance(request_ids, list):
        request_ids = []
    trusted = kwargs.get("form") == QUEUED_FORM
    return TaskArguments(events, float(accepted_at), [str(r) for r in request_ids], trusted)
