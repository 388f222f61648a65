"""The client's queue and its bookkeeping, shared by the sync and async clients (they hold their own lock).

Events are numbered as they are queued. One sender takes batches from the front, in order, and answers them
in order, so "everything up to number N is answered" is a single counter that ``flush`` waits on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ._protocol import Item, batch_size
from ._types import FlushResult


@dataclass(frozen=True)
class Limits:
    max_batch_events: int
    max_batch_bytes: int
    linger_s: float
    max_queued_events: int

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_events <= 1000:
            raise ValueError("max_batch_events must be 1..1000 (the API's batch limit)")
        if self.max_batch_bytes < 1024:
            raise ValueError("max_batch_bytes must be at least 1024")
        if self.max_queued_events < 1 or self.linger_s < 0:
            raise ValueError("max_queued_events must be positive and linger_s not negative")


@dataclass
class Buffer:
    limits: Limits
    _pending: deque[tuple[int, float, Item]] = field(default_factory=deque)
    _pending_bytes: int = 0
    #: Numbers of the last event queued, and of the last one answered (everything before it is answered).
    queued_upto: int = 0
    answered_upto: int = 0
    #: ``flush`` asks for everything up to this number to be sent now, without lingering.
    flush_upto: int = 0
    results: FlushResult = field(default_factory=FlushResult)

    @property
    def unanswered(self) -> int:
        """Events queued or in flight: what ``max_queued_events`` bounds."""
        return self.queued_upto - self.answered_upto

    @property
    def has_room(self) -> bool:
        return self.unanswered < self.limits.max_queued_events

    @property
    def idle(self) -> bool:
        return not self._pending

    def add(self, item: Item, now: float) -> None:
        self.queued_upto += 1
        self._pending.append((self.queued_upto, now, item))
        self._pending_bytes += len(item.encoded) + 1

    def wait_s(self, now: float) -> float | None:
        """0 when a batch should go now; else how long until the oldest event has lingered enough (None:
        nothing is pending)."""
        if not self._pending:
            return None
        first_seq, first_at, _ = self._pending[0]
        full = len(self._pending) >= self.limits.max_batch_events or self._pending_bytes >= self.limits.max_batch_bytes
        if full or first_seq <= self.flush_upto:
            return 0.0
        return max(0.0, first_at + self.limits.linger_s - now)

    def take(self) -> tuple[list[Item], int]:
        """The next batch (within the count and byte limits; at least one event) and its last number."""
        items: list[Item] = []
        size = batch_size([])
        last = self.answered_upto
        while self._pending and len(items) < self.limits.max_batch_events:
            seq, _, item = self._pending[0]
            if items and size + len(item.encoded) + 1 > self.limits.max_batch_bytes:
                break
            self._pending.popleft()
            self._pending_bytes -= len(item.encoded) + 1
            size += len(item.encoded) + 1
            items.append(item)
            last = seq
        return items, last

    def answered(self, last: int, result: FlushResult) -> None:
        self.answered_upto = last
        self.results.accepted += result.accepted
        self.results.rejected += result.rejected
