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
import time
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
#: ``runs_held`` blocks under way (on the consumer's stack, so always released).
_depth = 0
#: A linger's hold, until this time (monotonic) at the latest: a deadline, not a count, because the timer that
#: ends a linger is dropped when Celery's consumer restarts on a lost connection, and a hold that outlived it
#: would keep every later run from the pool.
_until = 0.0


def register(batcher: _Flushable) -> None:
    """A batcher to flush when a hold ends."""
    _holders.add(batcher)


def held() -> bool:
    return _depth > 0 or time.monotonic() < _until


def hold_until(deadline: float) -> None:
    """Hold runs until ``deadline`` (monotonic) or :func:`release`, whichever comes first."""
    global _until
    _until = deadline


def release() -> None:
    """End a linger's hold now; what was buffered meanwhile goes to the pool."""
    global _until
    _until = 0.0
    _flush()


def _flush() -> None:
    if not held():
        for batcher in list(_holders):
            batcher.flush()


@contextlib.contextmanager
def runs_held() -> Iterator[None]:
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        _flush()


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
