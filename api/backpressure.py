"""Backpressure: refuse new events with 503 while the queue is over its limit, or Redis's memory nearly full.

The queue depth and the workers' drain rate are sampled in the background every 50 ms, Redis's memory every
quarter second (one pipelined round trip), so a request pays nothing for them. Memory counts because queued marks,
retries and dead letters need room too: the API stops at ``memory_ratio`` of ``maxmemory``, before Redis
itself refuses writes (``noeviction``), so the workers can still record what they do.
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
    def __init__(
        self,
        client: aioredis.Redis,
        max_depth: int,
        interval_s: float = 0.05,
        *,
        memory_ratio: float = 0.8,
        memory_every: int = 5,
        held: int = 0,
    ) -> None:
        self._redis = client
        self.max_depth = max_depth
        #: Messages a lingering worker leaves in the queue on purpose while it gathers a run: not a backlog.
        self.held = held
        # The depth every 50 ms: the publisher's backlog linger follows it, and should engage as soon as
        # messages wait. Redis's memory (INFO, a heavier command) only every ``memory_every``-th sample.
        self._interval_s = interval_s
        self._memory_every = memory_every
        self._samples = 0
        self._previous_depth = 0
        self.memory_ratio = memory_ratio
        self.depth = 0
        #: Redis's used memory and its limit (0: no limit), in bytes.
        self.used_memory = 0
        self.max_memory = 0
        #: Messages drained per second (smoothed); 0 while unknown or while no worker drains.
        self.drain_per_s = 0.0
        self._last: tuple[float, int] | None = None

    def backlogged(self) -> bool:
        """More than ``held`` messages have waited in the queue for two samples in a row (50 ms or more): every
        worker is busy. One sample is not enough: a message caught between its push and a worker's pop would
        count. Nor is what a lingering worker holds: at 100 requests/s its 200 ms linger leaves about 20 messages
        waiting, and taking them for a backlog put the API's backlog linger on many requests (p50 1.9 -> 3.1 ms)."""
        return self.depth > self.held and self._previous_depth > self.held

    @property
    def memory_full(self) -> bool:
        return self.max_memory > 0 and self.used_memory >= self.memory_ratio * self.max_memory

    def retry_after(self) -> int | None:
        """None while the queue has room; else seconds until it is expected to have room again."""
        if self.memory_full:
            # Memory frees as workers drain; without a rate to go by, a short wait.
            return 5 if self.drain_per_s <= 0 else 2
        if self.depth < self.max_depth:
            return None
        # Time for the workers to bring the queue back to 90% of its limit at their current pace.
        excess = self.depth - 0.9 * self.max_depth
        if self.drain_per_s <= 0:
            return 30
        return min(60, max(1, math.ceil(excess / self.drain_per_s)))

    async def sample(self) -> None:
        with_memory = self._samples % self._memory_every == 0
        self._samples += 1
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.llen(keys.EVENTS_QUEUE)
            pipe.get(keys.DRAINED_MESSAGES)
            if with_memory:
                pipe.info("memory")
            depth, drained_raw, *memory = await pipe.execute()
        if memory:
            self.used_memory = int(memory[0].get("used_memory", 0))
            self.max_memory = int(memory[0].get("maxmemory", 0))
        now = time.monotonic()
        drained = int(drained_raw or 0)
        self._previous_depth, self.depth = self.depth, int(depth)
        QUEUE_DEPTH.set(self.depth)
        if self._last is not None and now > self._last[0]:
            rate = max(0, drained - self._last[1]) / (now - self._last[0])
            # Smoothed over about a second whatever the sampling interval (0.7 kept per quarter second).
            keep = 0.7 ** ((now - self._last[0]) / 0.25)
            self.drain_per_s = rate if self.drain_per_s == 0 else keep * self.drain_per_s + (1 - keep) * rate
        self._last = (now, drained)

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception as exc:  # noqa: BLE001 - unknown depth: let the publish itself decide
                log.debug("queue depth sample failed: %r", exc)
                self.depth = self.used_memory = 0
            await asyncio.sleep(self._interval_s)
