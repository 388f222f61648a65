"""Every Prometheus metric Sluice exports, in one place (the Grafana dashboard's queries name these).

Several API processes (uvicorn workers) and worker processes (Celery's prefork pool) each count on their own;
prometheus_client's multiprocess mode adds them up. It reads ``PROMETHEUS_MULTIPROC_DIR`` when it is first
imported, so the launcher sets it in the environment of every process: ``make up`` and the tests give all
processes of a stack one fresh directory, so the API's ``/metrics`` shows the workers too; the image sets
one per container, and a worker can serve its own processes' metrics on ``SLUICE_WORKER_METRICS_PORT``.
"""

from __future__ import annotations

import bisect
import os
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from sluice.eventtypes import TYPE_NAMES

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)

#: Every HTTP request the API answers, by route template (``handler``), method and status: recorded for the
#: ingest fast path by api/ingest.py and for every other route by the instrumentator (api/main.py).
HTTP_REQUESTS = Counter(
    "sluice_http_requests_total", "HTTP requests by route, method and status", ["handler", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "sluice_http_request_duration_seconds",
    "Time to answer an HTTP request, by route, method and status",
    ["handler", "method", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
EVENTS_ACCEPTED = Counter("sluice_events_accepted_total", "Events accepted (202) by the API", ["type"])
EVENTS_REJECTED = Counter(
    "sluice_events_rejected_total", "Events refused by validation, by type as sent (or 'unknown')", ["type"]
)
PUBLISH_BATCH_EVENTS = Histogram(
    "sluice_publish_batch_events", "Events per message the API publishes", buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500)
)
PUBLISH_FAILURES = Counter("sluice_publish_failures_total", "Messages the API could not publish", ["outcome"])
QUEUE_DEPTH = Gauge(
    "sluice_queue_depth",
    "Messages waiting in the Redis queue (as the API last sampled it)",
    multiprocess_mode="livemostrecent",
)
EVENTS_WRITTEN = Counter("sluice_events_written_total", "Events written to Cassandra by the workers", ["type"])
WRITE_DURATION = Histogram(
    "sluice_write_duration_seconds", "Time to write one worker run's events to Cassandra", buckets=_LATENCY_BUCKETS
)
RUN_MESSAGES = Histogram(
    "sluice_worker_run_messages", "Messages one worker run writes together", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
TASK_RETRIES = Counter("sluice_task_retries_total", "Tasks retried after a failed Cassandra write")
DEAD_LETTERS = Counter("sluice_dead_letters_total", "Events or messages sent to the dead-letter store", ["reason"])
SDK_MESSAGES = Counter(
    "sluice_sdk_messages_total",
    "Messages on the analytics-SDK routes, by API key id, wire format, SDK call and verdict "
    "(accepted: queued as an event; counted: identify/group/alias, not stored; rejected: a dead letter)",
    ["key", "format", "call", "outcome"],
)
SDK_REJECTED = Counter(
    "sluice_sdk_rejected_total",
    "SDK messages rejected (kept as dead letters of kind sdk_unmapped), by API key id, event name and reason",
    ["key", "name", "reason"],
)
EVENT_LAG = Histogram(
    "sluice_event_lag_seconds", "From the API's acceptance (202) to the event being stored", buckets=_LAG_BUCKETS
)


class Tally:
    """Counts and observations kept in this process's memory and added to their metrics by :meth:`flush`.

    In multiprocess mode every update of a metric's value takes a lock, a ``getpid()`` system call (to notice
    a fork) and a write to its memory-mapped file; a single event cost the API four of them, about 5 % of its
    CPU per request (py-spy, 1,000 single events/s). Here an update is a dict entry's increment, and a flush
    writes each metric once. The API flushes every :data:`FLUSH_S` and before it answers ``/metrics``, so a
    scrape of another process may see up to that much less than was counted.

    A histogram's observations are kept per bucket and added as its own ``observe()`` would add them (its
    sum and the first bucket whose bound holds the value): ``tests/test_metrics.py`` checks the exposition
    against observe()'s. Thread-safe: the instrumentator may count from a thread."""

    #: Seconds between the API's flushes.
    FLUSH_S = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[Any, float] = {}
        #: Histogram child -> [sum, count per bucket...].
        self._observed: dict[Any, list[float]] = {}

    def inc(self, child: Any, amount: float = 1) -> None:
        """``child.inc(amount)`` at the next flush (``child``: a counter, or a labelled counter's child)."""
        with self._lock:
            self._counts[child] = self._counts.get(child, 0) + amount

    def observe(self, child: Any, value: float) -> None:
        """``child.observe(value)`` at the next flush (``child``: a histogram, or a labelled one's child)."""
        with self._lock:
            kept = self._observed.get(child)
            if kept is None:
                kept = self._observed[child] = [0.0] * (1 + len(child._upper_bounds))
            kept[0] += value
            kept[1 + bisect.bisect_left(child._upper_bounds, value)] += 1

    def flush(self) -> None:
        """Add what was kept to the metrics."""
        with self._lock:
            counts, self._counts = self._counts, {}
            observed, self._observed = self._observed, {}
        for child, amount in counts.items():
            child.inc(amount)
        for child, (total, *buckets) in observed.items():
            child._sum.inc(total)
            for bucket, count in zip(child._buckets, buckets, strict=True):
                if count:
                    bucket.inc(count)


#: This process's tally (the API's hot paths count through it).
TALLY = Tally()


def registry() -> CollectorRegistry:
    """The registry to expose: every process's samples in multiprocess mode, else this process's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)  # type: ignore[no-untyped-call]
        return reg
    from prometheus_client import REGISTRY

    return REGISTRY


def mark_process_dead(pid: int) -> None:
    """Drop a finished process's live gauges (its counters still count)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# Every label value we know of starts at zero, so dashboards and alerts see the series before the first event.
# The per-type children, by type: counting an event of a type the registry does not declare is a KeyError,
# never a count under some other type.
ACCEPTED_BY_TYPE = {kind: EVENTS_ACCEPTED.labels(kind) for kind in TYPE_NAMES}
WRITTEN_BY_TYPE = {kind: EVENTS_WRITTEN.labels(kind) for kind in TYPE_NAMES}
REJECTED_BY_TYPE = {kind: EVENTS_REJECTED.labels(kind) for kind in (*TYPE_NAMES, "unknown")}
for _outcome in ("refused", "unknown"):
    PUBLISH_FAILURES.labels(_outcome)
for _reason in (
    "write_failed",
    "invalid_event",
    "conflict",
    "malformed_task",
    "undecodable",
    "unknown_task",
    "invalid_message",
    "unknown_format",
    "sdk_unmapped",
):
    DEAD_LETTERS.labels(_reason)

#: Distinct event names one process labels SDK rejections with; later names count as "(other)", so that a
#: client sending random names cannot grow /metrics without bound.
SDK_NAME_LABELS_MAX = 200
_sdk_names: set[str] = set()


def sdk_name_label(name: str) -> str:
    label = name[:64]
    if label in _sdk_names:
        return label
    if len(_sdk_names) >= SDK_NAME_LABELS_MAX:
        return "(other)"
    _sdk_names.add(label)
    return label
