"""What ties the transport's bulk claims (worker/transport.py) to the runs of the batcher (worker/batching.py),
without either importing the other.

- :func:`runs_held`: messages the transport delivers inside it reach the pool together. The transport takes
  several messages off the queue in one step and hands them to Celery one by one; without the hold the first
  would leave as a run of its own while a pool process is free.
(A run's acknowledgements reach Redis together too, but Celery sends them through its hub, later: the
transport's QoS gathers them there.)

It is used only on the consumer's thread (kombu's event loop), where deliveries and run callbacks happen.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator
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
