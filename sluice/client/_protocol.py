"""Sending one batch, without I/O: which request to make, how to read the answer, when to retry or split.

:func:`deliver` is a generator that yields :class:`Send` and :class:`Sleep` actions and is sent back the
response (or the transport exception, or None after a sleep); it returns the batch's :class:`FlushResult`.
The sync and the async client drive the same generator, each with its own HTTP client and sleep, so the
rules below exist once.

Rules:

- 202: each event as the API judged it (``results``); rejected ones carry the API's errors (409 for a
  conflicting second version, 422 for an invalid event). Never retried: the answer is definite.
- 429, 500, 502, 503, 504, connection errors and timeouts: retried, with the same bytes (same ids, same
  content), after ``Retry-After`` when given, else capped full-jitter backoff; given up after the policy's
  attempts or time, and then reported as rejected (``gave_up``) with the last reason.
- 413, and 422 ``batch_too_large``: the batch is split in halves, each sent on its own (an event alone
  that is still too large is rejected).
- 409 / 422 for the whole batch (no event was queued): per event, from the details' ``loc``.
- Any other status: every event of the batch rejected with the API's code and message.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
import orjson

from ._retry import RetryPolicy, parse_retry_after
from ._types import FlushResult, Rejection

BATCH_PATH = "/v1/events/batch"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Answers after which the events may have been queued although the request failed.
UNKNOWN_STATUSES = frozenset({500, 502, 504})
#: Transport errors raised before a byte of the request left: the outcome is known (nothing was queued).
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class Item:
    """One event as queued: its id, the event (for ``on_error``) and its JSON, encoded once."""

    event_id: UUID
    event: dict[str, Any]
    encoded: bytes


@dataclass(frozen=True)
class Send:
    body: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Sleep:
    seconds: float


Reply = httpx.Response | Exception | None
Delivery = Generator[Send | Sleep, Reply, FlushResult]


@dataclass(frozen=True)
class _Retry:
    status: int | None
    code: str
    message: str
    retry_after: float | None
    unknown: bool


class _Split:
    pass


def encode(items: Sequence[Item], compress: bool) -> Send:
    # The events are already JSON: join their bytes instead of decoding and re-encoding the batch.
    body = b'{"events":[' + b",".join(item.encoded for item in items) + b"]}"
    headers = {"Content-Type": "application/json"}
    if compress:
        # Level 5: JSON events shrink about 8x already; higher levels cost producer CPU for little more.
        body = gzip.compress(body, compresslevel=5, mtime=0)
        headers["Content-Encoding"] = "gzip"
    return Send(body, headers)


def batch_size(items: Sequence[Item]) -> int:
    """The uncompressed body's size: what the API caps (it inflates gzip under the same limit)."""
    return len(b'{"events":[]}') + sum(len(item.encoded) + 1 for item in items)


def deliver(
    items: Sequence[Item], policy: RetryPolicy, compress: bool, clock: Callable[[], float] = time.monotonic
) -> Delivery:
    request = encode(items, compress)
    started = clock()
    attempt = 0
    maybe_queued = False
    while True:
        reply = yield request
        attempt += 1
        decision = _judge(items, reply)
        if isinstance(decision, FlushResult):
            return decision
        if isinstance(decision, _Split):
            if len(items) == 1:
                assert isinstance(reply, httpx.Response)
                return _all_rejected(items, reply.status_code, *_error_of(reply), unknown=maybe_queued)
            half = len(items) // 2
            first = yield from deliver(items[:half], policy, compress, clock)
            second = yield from deliver(items[half:], policy, compress, clock)
            return FlushResult(first.accepted + second.accepted, first.rejected + second.rejected)
        maybe_queued = maybe_queued or decision.unknown
        wait = policy.delay(attempt, decision.retry_after)
        elapsed = clock() - started
        if attempt >= policy.max_attempts or elapsed + wait > policy.give_up_after_s:
            why = f"gave up after {attempt} attempts in {elapsed:.1f} s; last: {decision.code}: {decision.message}"
            if maybe_queued:
                why += " (an attempt's outcome is unknown: the events may be queued; resending them is safe)"
            return _all_rejected(items, decision.status, "gave_up", why, unknown=maybe_queued)
        yield Sleep(wait)


def _judge(items: Sequence[Item], reply: Reply) -> FlushResult | _Retry | _Split:
    if isinstance(reply, Exception) or reply is None:
        unknown = not isinstance(reply, _NOT_SENT)
        name = type(reply).__name__
        return _Retry(None, "timeout" if isinstance(reply, httpx.TimeoutException) else "connection_error",
                      f"{name}: {reply}", None, unknown)  # fmt: skip
    status = reply.status_code
    if status in RETRY_STATUSES:
        code, message, _ = _error_of(reply)
        retry_after = parse_retry_after(reply.headers.get("retry-after"))
        return _Retry(status, code, message, retry_after, status in UNKNOWN_STATUSES)
    if status == 202:
        try:
            results = orjson.loads(reply.content)["results"]
            by_index = {int(result["index"]): result for result in results}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            # A 202 says the events are queued, but not which: resend (same ids, so no duplicate is stored).
            return _Retry(status, "unreadable_answer", "the 202's body is unreadable", None, True)
        accepted: list[UUID] = []
        rejected: list[Rejection] = []
        for index, item in enumerate(items):
            result = by_index.get(index, {})
            if result.get("status") == "accepted":
                accepted.append(item.event_id)
            else:
                rejected.append(_per_event(item, result.get("errors") or [], "rejected", "the API rejected it"))
        return FlushResult(accepted, rejected)
    code, message, details = _error_of(reply)
    if status == 413 or (status == 422 and code == "batch_too_large"):
        return _Split()
    if status in (409, 422) and code in ("conflict", "invalid_events"):
        # No event of the batch was queued; the details say, per event, why (loc = ["events", i, ...]).
        per_index: dict[int, list[Mapping[str, Any]]] = {}
        for detail in details:
            loc = detail.get("loc") if isinstance(detail, Mapping) else None
            if isinstance(loc, list) and len(loc) > 1 and loc[0] == "events" and isinstance(loc[1], int):
                per_index.setdefault(loc[1], []).append(detail)
        return FlushResult([], [_per_event(item, per_index.get(i, []), code, message) for i, item in enumerate(items)])
    return _all_rejected(items, status, code, message, details)


def _per_event(item: Item, errors: Sequence[Mapping[str, Any]], code: str, message: str) -> Rejection:
    if not errors:
        return Rejection(item.event_id, 422, code, message)
    conflict = any(error.get("type") == "conflict" for error in errors)
    text = "; ".join(f"{'.'.join(str(p) for p in error.get('loc', []))}: {error.get('msg')}" for error in errors)
    return Rejection(item.event_id, 409 if conflict else 422, "conflict" if conflict else "invalid_event", text,
                     tuple(errors))  # fmt: skip


def _error_of(reply: httpx.Response) -> tuple[str, str, list[Any]]:
    """The API's ``{"error": {"code", "message", "details"}}``, or what can be said without it (a proxy's
    HTML page, an empty body)."""
    try:
        error = orjson.loads(reply.content)["error"]
        return str(error["code"]), str(error["message"]), list(error.get("details") or [])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"http_{reply.status_code}", reply.reason_phrase or f"HTTP {reply.status_code}", []


def _all_rejected(
    items: Sequence[Item],
    status: int | None,
    code: str,
    message: str,
    details: Sequence[Any] = (),
    *,
    unknown: bool = False,
) -> FlushResult:
    return FlushResult([], [Rejection(item.event_id, status, code, message, tuple(details), unknown) for item in items])
