"""The write ceiling: the bench's rows written by the driver's best path, with no pipeline around them.

No HTTP, no queue, no validation: ``processes`` processes (2, like the default worker pool), each with its own
session, prepared statements, rows built before the clock starts, unlogged batches of one partition
(``events_by_listing_day``) or one replica (``events_by_id``), ``concurrency`` requests in flight. The same
two tables, the same columns, the same write timestamps as the workers. What it reaches on this machine, in
the same run, is what the drain is measured against (``drain_ratio``).
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import random
import time
import uuid
from collections import defaultdict
from typing import Any

from loadtests.common import make_event
from sluice.settings import Settings

ROWS_PER_BATCH = 20


def _rows(count: int, seed: int, listing_base: int) -> list[tuple[Any, ...]]:
    from sluice.events import EVENT_ADAPTER, queued_form
    from worker.writer import parse_queued

    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    accepted = dt.datetime.now(dt.UTC)
    rows = []
    for _ in range(count):
        kind = "booking" if rng.random() < 0.1 else "view"
        event = make_event(str(uuid.uuid4()), kind, listing_base + rng.randrange(1000), rng.randint(1, 10**6),
                           now_ms - rng.randint(0, 2000), rng)  # fmt: skip
        row = parse_queued(queued_form(EVENT_ADAPTER.validate_python(event)))
        assert row is not None
        # The worker's bind (worker/writer.py): values, accepted_at, write timestamp, TTL (0: none, the default
        # retention; the ceiling measures writes, not expiry).
        rows.append((*row.values, accepted, row.timestamp_us, 0))
    return rows


def _writer(settings: Settings, count: int, seed: int, concurrency: int, start: Any, ready: Any, out: Any) -> None:
    from cassandra.concurrent import execute_concurrent
    from cassandra.query import BatchStatement, BatchType

    from sluice.cassandra import Store

    store = Store.open(settings)
    try:
        rows = _rows(count, seed, listing_base=seed * 10**6)
        metadata, keyspace = store.cluster.metadata, store.keyspace
        ready.put(seed)
        start.wait()
        began = time.perf_counter()
        for statement in (store.insert_by_listing, store.insert_by_id):
            groups: dict[Any, list[Any]] = defaultdict(list)
            for values in rows:
                bound = statement.bind(values)
                key = bound.routing_key
                if statement is store.insert_by_id:
                    replicas = metadata.get_replicas(keyspace, key)
                    key = replicas[0] if replicas else None
                groups[key].append(bound)
            requests: list[tuple[Any, Any]] = []
            for members in groups.values():
                for i in range(0, len(members), ROWS_PER_BATCH):
                    chunk = members[i : i + ROWS_PER_BATCH]
                    if len(chunk) == 1:
                        requests.append((chunk[0], None))
                        continue
                    batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                    for bound in chunk:
                        batch.add(bound)
                    requests.append((batch, None))
            for ok, result in execute_concurrent(store.session, requests, concurrency=concurrency,
                                                 raise_on_first_error=False):  # fmt: skip
                if not ok:
                    raise result
        out.put((time.perf_counter() - began, count))
    finally:
        store.close()


def measure(settings: Settings, events: int, *, processes: int = 2, concurrency: int = 64) -> dict[str, Any]:
    """Write ``events`` rows (both tables) from ``processes`` fresh processes; events/s from the common start
    to the last process done."""
    ctx = mp.get_context("spawn")  # the caller holds driver sessions: never fork them
    start, ready, out = ctx.Event(), ctx.Queue(), ctx.Queue()
    share = events // processes
    procs = [ctx.Process(target=_writer, args=(settings, share, 1000 + i, concurrency, start, ready, out),
                         daemon=True) for i in range(processes)]  # fmt: skip
    for proc in procs:
        proc.start()
    # Each process connects and builds its rows before the clock starts; then all start at once.
    for _ in procs:
        ready.get(timeout=180)
    start.set()
    results = [out.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(30)
    wall = max(seconds for seconds, _ in results)
    total = sum(count for _, count in results)
    return {
        "ceiling_events_per_s": round(total / wall, 1),
        "ceiling_events": total,
        "ceiling_s": round(wall, 2),
        "ceiling_processes": processes,
        "ceiling_concurrency": concurrency,
    }
