"""What ties the transport's bulk claims and acknowledgements (worker/transport.py) to the runs of the batcher
(worker/batching.py), without either importing the other.

- :func:`runs_held`: messages the transport delivers inside it reach the pool together. The transport takes
  several messages off the queue in one step and hands them to Celery one by one; without the hold the first
  would leave as a run of its own while a pool process is free.
- :func:`acks_together`: the acknowledgements of one run are sent to Redis in one round trip (kombu sends each
  on its own).

Both are used only on the consumer's thread (kombu's event loop), where deliveries and run callbacks happen.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from celery.worker import state as worker_state


def stopping() -> bool:
    """The worker is stopping: Celery sets these on a warm (should_stop, to the exit code: 0 is a stop too) or
    cold shutdown. Nothing more goes to the pool, and the transport claims nothing more."""
    return worker_state.should_stop not in (None, False) or worker_state.should_terminate not in (None, False)


class _Flushable(Protocol):
    def flush(self) -> None: ...


_holders: weakref.WeakSet[Any] = weakref.WeakSet()
_held = 0


def register(batcher: _Flushable) -> None:
    """A batcher to flush when the last hold is released."""
    _holders.add(batcher)


def held() -> bool:
    return _held > 0


def hold() -> None:
    global _held
    _held += 1


def release() -> None:
    """Release one hold; the last one hands what was buffered meanwhile to the pool."""
    global _held
    _held = max(0, _held - 1)
    if not _held:
        for batcher in list(_holders):
            batcher.flush()


@contextlib.contextmanager
def runs_held() -> Iterator[None]:
    hold()
    try:
        yield
    finally:
        release()


_acks = threading.local()

#: Acknowledges the delivery tags it is given, in one round trip (the transport's QoS).
AckMany = Callable[[list[str]], None]


def deferred(ack_many: AckMany, tag: str) -> bool:
    """Inside :func:`acks_together` on this thread: note the ack for the end of the block (True); else False,
    and the caller acknowledges at once."""
    pending: dict[AckMany, list[str]] | None = getattr(_acks, "pending", None)
    if pending is None:
        return False
    pending.setdefault(ack_many, []).append(tag)
    return True


@contextlib.contextmanager
def acks_together() -> Iterator[None]:
    if getattr(_acks, "pending", None) is not None:  # nested: the outer block sends them
        yield
        return
    pending: dict[AckMany, list[str]] = {}
    _acks.pending = pending
    try:
        yield
    finally:
        _acks.pending = None
        for ack_many, tags in pending.items():
            ack_many(tags)
