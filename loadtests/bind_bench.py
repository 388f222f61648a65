"""The cost of binding one row of the events insert: the driver's ``bind`` against worker/binding.py's.

    sluice dev servers &                  # Redis and Cassandra (or a running `make up`)
    .venv/bin/python -m loadtests.bind_bench

The ceiling's own rows (views and bookings, as the worker makes them from queued events); each way binds the
same 2,000 rows five times per repeat; the best of seven repeats, in µs per row, and their ratio.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
import timeit
from collections.abc import Callable
from typing import Any

from loadtests.ceiling import _rows
from sluice.cassandra import Store, ttl_s
from sluice.settings import Settings
from worker.binding import RowBinder


def _bind_all(bind: Callable[[Any], Any], rows: list[Any]) -> None:
    for row in rows:
        bind(row)


def main() -> None:
    store = Store.open(Settings())
    try:
        statement = store.insert_by_listing
        now_us, accepted = time.time_ns() // 1000, dt.datetime.now(dt.UTC)
        rows = [
            (*r.values, accepted, r.timestamp_us, ttl_s(r.timestamp_us, 0, now_us)) for r in _rows(2000, 1, 100_000, 0)
        ]
        ways: dict[str, Callable[[Any], Any]] = {
            "driver bind()": statement.bind,
            "RowBinder": RowBinder(statement).bind,
        }
        cost = {}
        for name, bind in ways.items():
            best = min(timeit.repeat(functools.partial(_bind_all, bind, rows), number=5, repeat=7))
            cost[name] = best / (5 * len(rows)) * 1e6
            print(f"{name:14} {cost[name]:6.2f} µs per row")
        print(f"RowBinder / driver: {cost['RowBinder'] / cost['driver bind()']:.2f}")
    finally:
        store.close()


if __name__ == "__main__":
    main()
