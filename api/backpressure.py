"""Backpressure: refuse new events with 503 while the queue is over its limit, instead of filling Redis.

The queue depth and the workers' drain rate are sampled in the background a few times a second (one
pipelined round trip), so a request pays nothing for them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import redis.asyncio as aioredis

from sluice import keys
from sluice.metrics import QUEUE_DEPTH

log = logging.getLogger(__name__)


class QueueMonitor:
    def __init__(self, client: aioredis.Redis, max_depth: int, interval_s: float = 0.25) -> None:
        self._redis = client
        self.max_depth = max_depth
        self._interval_s = interval_s
        self.depth = 0
        #: Messages drained per second (smoothed); 0 while unknown or while no worker drains.
        self.drain_per_s = 0.0
        self._last: tuple[float, int] | None = None

    def retry_after(self) -> int | None:
        """None while the queue has room; else seconds until it is expected to have room again."""
        if self.depth < self.max_depth:
            return None
        # Time for the workers to bring the queue back to 90% of its limit at their current pace.
        excess = self.depth - 0.9 * self.max_depth
        if self.drain_per_s <= 0:
            return 30
        return min(60, max(1, math.ceil(excess / self.drain_per_s)))

    async def sample(self) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.llen(keys.EVENTS_QUEUE)
            pipe.get(keys.DRAINED_MESSAGES)
            depth, drained_raw = await pipe.execute()
        now = time.monotonic()
        drained = int(drained_raw or 0)
        self.depth = int(depth)
        QUEUE_DEPTH.set(self.depth)
        if self._last is not None and now > self._last[0]:
            rate = max(0, drained - self._last[1]) / (now - self._last[0])
            self.drain_per_s = rate if self.drain_per_s == 0 else 0.7 * self.drain_per_s + 0.3 * rate
        self._last = (now, drained)

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception as exc:  # noqa: BLE001 - unknown depth: let the publish itself decide
                log.debug("queue depth sample failed: %r", exc)
                self.depth = 0
            await asyncio.sleep(self._interval_s)
