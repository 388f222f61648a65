"""The API's tally (sluice.metrics.Tally): what it adds to the metrics at a flush is what updating them
directly would have added, and nothing twice."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from sluice.metrics import Tally

#: Values on, between, below and beyond the bounds (the last bucket is +Inf).
VALUES = (0.0, 0.0005, 0.001, 0.0010001, 0.05, 0.1, 0.7, 1.0, 3.0, 250.0)


def _metrics(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    counter = Counter("requests", "requests", ["route"], registry=registry)
    histogram = Histogram("latency", "latency", ["route"], buckets=(0.001, 0.01, 0.1, 1.0), registry=registry)
    return counter, histogram


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")  # when each was made: differs by design
    }


def test_a_flush_adds_what_direct_updates_would_have_added_and_nothing_twice() -> None:
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    (counter, histogram), (t_counter, t_histogram) = _metrics(direct), _metrics(tallied)
    tally = Tally()
    for route in ("a", "b"):
        for value in VALUES if route == "a" else VALUES[3:6]:
            counter.labels(route).inc(2)
            histogram.labels(route).observe(value)
            tally.inc(t_counter.labels(route), 2)
            tally.observe(t_histogram.labels(route), value)
    before = _samples(tallied)
    assert before[("latency_count", (("route", "a"),))] == 0, "kept, not yet added"
    tally.flush()
    assert _samples(tallied) == _samples(direct)
    assert _samples(direct)[("latency_bucket", (("le", "0.001"), ("route", "a")))] == 3  # 0, 0.0005, 0.001
    tally.flush()
    assert _samples(tallied) == _samples(direct), "a second flush adds nothing"
