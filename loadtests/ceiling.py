"""The write ceiling: the bench's rows written by the driver's best path, with no pipeline around them.

No HTTP, no queue, no validation, no first-write-wins read: ``processes`` processes (2, like the default
worker pool), each with its own session and the worker's own batching (:meth:`EventWriter.write_rows`:
prepared statements, values serialized once, unlogged batches per replica ordered partition by partition,
``concurrency`` requests in flight), rows built before the clock starts. The same two tables, the same
columns and write timestamps as the workers, and the same workload as the bench's other phases (the same
kinds of event, listings drawn by the same Zipf popularity over ``listings``), so partitions are as dense as
the drain's. What it reaches on this machine, in the same run, is what the drain is measured against
(``drain_ratio``). A second pass writes other rows of the same kind through :meth:`EventWriter.write`, the
worker's whole write with its first-write-wins read, and says what that read costs
(``ceiling_with_read_events_per_s``).
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from loadtests.common import Zipf, make_event
from sluice.settings import Settings


def _rows(count: int, seed: int, listings: int, listing_base: int) -> list[Any]:
    from sluice.events import EVENT_ADAPTER, queued_form
    from worker.writer import parse_queued

    rng = random.Random(seed)
    zipf = Zipf(listings, base=listing_base, rng=rng)
    now_ms = int(time.time() * 1000)
    rows = []
    for _ in range(count):
        kind = "booking" if rng.random() < 0.1 else "view"
        event = make_event(str(uuid.UUID(int=rng.getrandbits(128), version=4)), kind, zipf.listing(),
                           rng.randint(1, 2_000_000), now_ms - rng.randint(0, 2000), rng)  # fmt: skip
        row = parse_queued(queued_form(EVENT_ADAPTER.validate_python(event)))
        assert row is not None
        rows.append(row)
    return rows


def _writer(
    settings: Settings, count: int, seed: int, listings: int, concurrency: int, starts: Any, ready: Any, out: Any
) -> None:
    from sluice.cassandra import Store
    from worker.writer import EventWriter

    store = Store.open(settings)
    try:
        writer = EventWriter(store, concurrency)
        base = (int(time.time()) % 100_000) * 10**7 + 9 * 10**6 + seed * 10**5
        plain, checked = _rows(count, seed, listings, base), _rows(count, seed + 1, listings, base)
        accepted = dt.datetime.now(dt.UTC)
        # Untimed: the session's connections and the statements' first use, else billed to the first pass (it
        # came out slower than the second, which does more).
        writer.write_rows(_rows(max(1, count // 10), seed + 2, listings, base), accepted)
        ready.put(seed)
        results = []

        def with_read() -> dict[int, Exception]:
            return dict(enumerate(error for _, error in writer.write(checked, accepted).failed))

        passes: tuple[Callable[[], dict[int, Exception]], ...] = (lambda: writer.write_rows(plain, accepted), with_read)
        for start, write in zip(starts, passes, strict=True):
            start.wait()
            began, cpu = time.perf_counter(), time.process_time()
            failed = write()
            if failed:
                raise next(iter(failed.values()))
            results.append((time.perf_counter() - began, time.process_time() - cpu))
            ready.put(seed)
        out.put((results, count))
    finally:
        store.close()


def measure(
    settings: Settings,
    events: int,
    *,
    listings: int = 10_000,
    processes: int = 2,
    concurrency: int = 64,
    meter: Any = None,
) -> dict[str, Any]:
    """Write ``events`` rows (both tables) from ``processes`` fresh processes, then as many again with the
    first-write-wins read; events/s from the common start to the last process done. ``meter`` (the bench's
    CPU meter: ``start()``, ``stop()``) is run around each pass; its usages come back under ``cpu``."""
    ctx = mp.get_context("spawn")  # the caller holds driver sessions: never fork them
    starts = (ctx.Event(), ctx.Event())
    ready, out = ctx.Queue(), ctx.Queue()
    share = events // processes
    procs = [ctx.Process(target=_writer, args=(settings, share, 1000 + 2 * i, listings, concurrency, starts, ready,
                                               out), daemon=True) for i in range(processes)]  # fmt: skip
    for proc in procs:
        proc.start()
    usages = []
    # Each process connects and builds its rows before the clock starts; then all start at once, per pass,
    # and each says when it is through (``ready``) before the next pass starts.
    for _ in procs:
        ready.get(timeout=180)
    for start in starts:
        if meter is not None:
            meter.start()
        start.set()
        for _ in procs:
            ready.get(timeout=300)
        if meter is not None:
            usages.append(meter.stop())
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
    total = sum(count for _, count in results)
    plain_s = max(r[0][0] for r, _ in results)
    read_s = max(r[1][0] for r, _ in results)
    return {
        # The writer processes' own CPU (the bench's meter sees the stack's processes, not these).
        "writer_cpu_ms_per_event": [round(sum(r[i][1] for r, _ in results) * 1000 / total, 4) for i in (0, 1)],
        "ceiling_events_per_s": round(total / plain_s, 1),
        "ceiling_with_read_events_per_s": round(total / read_s, 1),
        "ceiling_events": total,
        "ceiling_s": round(plain_s, 2),
        "ceiling_processes": processes,
        "ceiling_concurrency": concurrency,
        "cpu": usages,
    }
