"""A per-key rate limit shared by every API process through Redis, without a round trip per request.

It counts events, not requests: a batch of 1,000 events costs 1,000 units, a single event or a page of
``/events`` costs 1 (so batching saves round trips, not quota). ``/stats`` costs what it scans: one unit per
day partition and type it counts (a 92-day range is 276), charged before it reads, and one more per 100 rows
those counts scanned, charged after (api/routes/listings.py).

Each process admits requests against the last known total of the current one-second window plus what it
admitted itself since; every ``sync_s`` it adds its own count to the window's Redis counter and learns the
total of all processes. So one process is exact, and several overshoot by at most one sync interval of
traffic. If Redis does not answer, the process keeps limiting on its own counts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from sluice import keys

log = logging.getLogger(__name__)


@dataclass
class _Window:
    second: int
    known_total: int = 0
    pending: int = 0


class RateLimiter:
    def __init__(self, client: aioredis.Redis, limit_per_s: int, sync_s: float = 0.05) -> None:
        self._redis = client
        self._limit = limit_per_s
        self._sync_s = sync_s
        self._windows: dict[str, _Window] = {}

    def admit(self, key_id: str, cost: int = 1) -> float | None:
        """None if a request costing ``cost`` units (one per event, one per read) may proceed, else the
        seconds until it may be retried. A cost above the limit is charged as the whole limit, so that one
        large batch is still possible under a small limit."""
        now = time.time()
        window = self._window(key_id, int(now))
        cost = max(1, min(cost, self._limit))
        if window.known_total + window.pending + cost > self._limit:
            return max(0.001, window.second + 1 - now)
        window.pending += cost
        return None

    def debit(self, key_id: str, cost: int) -> None:
        """Charge units for work already done whose cost was known only after it (the rows a count scanned):
        never refused, capped at the limit like :meth:`admit`; the key's next requests in this window pay."""
        if cost > 0:
            self._window(key_id, int(time.time())).pending += min(cost, self._limit)

    def _window(self, key_id: str, second: int) -> _Window:
        window = self._windows.get(key_id)
        if window is None or window.second != second:
            window = self._windows[key_id] = _Window(second)
        return window

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._sync_s)
            try:
                await self._sync()
            except Exception as exc:  # noqa: BLE001 - keep limiting locally; try again next round
                log.debug("rate-limit sync failed: %r", exc)

    async def _sync(self) -> None:
        # Snapshot the counts sent: requests admitted while the round trip is under way stay pending.
        due = [(key_id, w, w.pending) for key_id, w in self._windows.items() if w.pending]
        if not due:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id, window, sent in due:
                counter = f"{keys.RATE_LIMIT_PREFIX}{key_id}:{window.second}"
                pipe.incrby(counter, sent)
                pipe.expire(counter, 5)
            results = await pipe.execute()
        for (_, window, sent), total in zip(due, results[::2], strict=True):
            window.known_total = int(total)
            window.pending -= sent
        # Drop windows of past seconds.
        current = int(time.time())
        for key_id in [k for k, w in self._windows.items() if w.second < current and not w.pending]:
            del self._windows[key_id]


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
