"""What the client hands back: accepted ids, rejections with the API's reasons, and its own errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias
from uuid import UUID


class Model(Protocol):
    """A pydantic model, such as the API's own ``sluice.events.ViewEvent`` (not imported: producers need not
    install pydantic)."""

    def model_dump(self, *, mode: str) -> dict[str, Any]: ...


#: An event as the producer gives it: a JSON-ready mapping (``view(...)``, ``booking(...)``, a plain dict) or a
#: pydantic model of one.
Event: TypeAlias = Mapping[str, Any] | Model

#: What ``send`` does when ``max_queued_events`` events are already waiting for an answer.
QueuePolicy: TypeAlias = Literal["block", "raise", "drop_new"]


class SluiceClientError(Exception):
    """Base of the client's own errors."""


class QueueFull(SluiceClientError):
    """The client's in-memory queue holds ``max_queued_events`` unanswered events (policy ``raise``, or
    ``block`` past its timeout)."""


class ClientClosed(SluiceClientError):
    """``send`` after ``close()``."""


@dataclass(frozen=True)
class Rejection:
    """One event the client could not get accepted, and why.

    ``status`` is the HTTP status that decided it (409 for a conflicting second version, 422 for an invalid
    event, ...), or ``None`` when no answer decided it (the client gave up on connection errors, or dropped
    the event because its queue was full). ``code`` and ``message`` are the API's (``conflict``,
    ``invalid_event``, ...) or the client's own (``gave_up``, ``dropped``). ``details`` are the API's error
    details, each with the JSON path of the bad field in ``loc``.

    ``outcome_unknown`` is True when the last attempt may have queued the event anyway (a timeout, a
    connection lost after sending, a 504): resending the same event (same id, same content) later is safe.
    """

    event_id: UUID
    status: int | None
    code: str
    message: str
    details: Sequence[Mapping[str, Any]] = ()
    outcome_unknown: bool = False

    @property
    def loc(self) -> list[str | int] | None:
        """The path of the first bad field, as the API gives it (``["events", 3, "guests"]``), if any."""
        for detail in self.details:
            loc = detail.get("loc")
            if isinstance(loc, list):
                return loc
        return None


@dataclass
class FlushResult:
    """What the API answered for the events sent since the previous ``flush()``.

    ``accepted``: ids the API answered 202 "accepted" for, i.e. durably queued (see docs/client.md, *What a
    202 means*). ``rejected``: every other event, each with its reason. Nothing is left out: every event
    ``send`` took is in exactly one of the two lists of exactly one flush.
    """

    accepted: list[UUID] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejected

    def _take(self) -> FlushResult:
        taken = FlushResult(self.accepted, self.rejected)
        self.accepted, self.rejected = [], []
        return taken


#: ``on_error(error, events)``: ``error`` is a :class:`Rejection` (the API refused the events, or the client
#: gave up on them), or a :class:`QueueFull` (``drop_new`` dropped them). ``events`` are the events concerned
#: as sent (with their ``event_id``). Called from the client's sender thread (sync) or task (async): keep it
#: short; an exception it raises is logged and ignored.
ErrorCallback: TypeAlias = Callable[[Rejection | QueueFull, list[dict[str, Any]]], None]
