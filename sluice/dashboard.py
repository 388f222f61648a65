"""The Grafana dashboard, generated: ``python -m sluice.dashboard`` writes dashboards/grafana/sluice.json.

The per-type panels come from the event-type registry (sluice/eventtypes.py), so a new type gets its panel
without anyone editing JSON; tests/test_eventtypes.py checks the checked-in file is what this generates
(``python -m sluice.dashboard --check`` does the same). Edit this module, never the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sluice.eventtypes import REGISTRY

PATH = Path(__file__).resolve().parent.parent / "dashboards" / "grafana" / "sluice.json"
_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_WIDTH = 24  # Grafana's grid is 24 columns wide


def _stat(title: str, description: str, unit: str, expr: str, x: int, y: int, w: int = 6) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": _DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": 4},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background", "graphMode": "area"},
        "targets": [{"refId": "A", "expr": expr}],
    }


def _series(
    title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int, description: str = ""
) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": _DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": 12, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]}},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def _quantiles(metric: str, window: str) -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket[{window}])))", f"p{round(q * 100)}")
        for q in (0.5, 0.99)
    ]


def _per_type(y: int) -> list[dict[str, Any]]:
    """One panel per declared event type: what the API accepted and what the workers stored, per second."""
    width = max(_WIDTH // len(REGISTRY), 4)
    panels = []
    for index, kind in enumerate(REGISTRY):
        x, row = (index * width) % _WIDTH, (index * width) // _WIDTH
        panel = _series(
            f"{kind.name} events: accepted and stored (/s)",
            "reqps",
            [
                (f'sum(rate(sluice_events_accepted_total{{type="{kind.name}"}}[1m]))', "accepted"),
                (f'sum(rate(sluice_events_written_total{{type="{kind.name}"}}[1m]))', "stored"),
                (f'sum(rate(sluice_events_rejected_total{{type="{kind.name}"}}[1m]))', "rejected"),
            ],
            x,
            y + row * 8,
            description=kind.doc,
        )
        panel["gridPos"]["w"] = width
        panels.append(panel)
    return panels


def build() -> dict[str, Any]:
    panels = [
        _stat("Events in (/s)", "Events the API acknowledged (202).", "reqps",
              "sum(rate(sluice_events_accepted_total[1m]))", 0, 0),
        _stat("Events stored (/s)", "Events the workers wrote to Cassandra.", "reqps",
              "sum(rate(sluice_events_written_total[1m]))", 6, 0),
        _stat("Queue depth", "Messages waiting in Redis (backpressure starts at SLUICE_MAX_QUEUE_DEPTH).", "short",
              "max(sluice_queue_depth)", 12, 0),
        _stat("Lag p99", "From the API's 202 to the event stored in Cassandra.", "s",
              "histogram_quantile(0.99, sum by (le) (rate(sluice_event_lag_seconds_bucket[5m])))", 18, 0),
        _series("Ingest: accepted and rejected events (/s)", "reqps", [
            ("sum by (type) (rate(sluice_events_accepted_total[1m]))", "accepted {{type}}"),
            ("sum by (type) (rate(sluice_events_rejected_total[1m]))", "rejected {{type}}"),
        ], 0, 4),
        _series("Drain: events written to Cassandra (/s)", "reqps", [
            ("sum by (type) (rate(sluice_events_written_total[1m]))", "written {{type}}"),
        ], 12, 4),
        _series("API requests by route and status (/s)", "reqps", [
            ("sum by (handler, status) (rate(sluice_http_requests_total[1m]))", "{{handler}} {{status}}"),
        ], 0, 12),
        _series("API latency", "s", _quantiles("sluice_http_request_duration_seconds", "1m"), 12, 12),
        _series("Queue depth (messages)", "short", [("max(sluice_queue_depth)", "queued messages")], 0, 20,
                description="Sampled by the API every 0.25 s."),
        _series("End-to-end lag: accepted to stored", "s", _quantiles("sluice_event_lag_seconds", "5m"), 12, 20),
        _series("Cassandra write time per task", "s", _quantiles("sluice_write_duration_seconds", "1m"), 0, 28),
        _series("Retries and dead letters", "short", [
            ("sum(rate(sluice_task_retries_total[5m])) * 60", "retries / min"),
            ("sum by (reason) (increase(sluice_dead_letters_total[5m]))", "dead-lettered ({{reason}}) / 5 min"),
        ], 12, 28, description="Any dead letter needs a look: sluice dlq list"),
        _series("Publishing: events per message and failures", "short", [
            ("sum(rate(sluice_publish_batch_events_sum[1m])) / sum(rate(sluice_publish_batch_events_count[1m]))",
             "events per message"),
            ("sum by (outcome) (rate(sluice_publish_failures_total[1m]))", "failed publishes ({{outcome}}) /s"),
        ], 0, 36, description="How many requests share one Celery message; failures are 503 (refused) or 504 "
                              "(unknown)."),
        *_per_type(44),
    ]  # fmt: skip
    for number, panel in enumerate(panels, start=1):
        panel["id"] = number
    return {
        "title": "Sluice pipeline",
        "uid": "sluice-pipeline",
        "description": "HTTP in -> Redis queue -> workers -> Cassandra: rates, depth, lag, latency, retries, dead "
        "letters.",
        "tags": ["sluice"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluice.dashboard", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the checked-in dashboard is not current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if PATH.read_text() != text:
            print(f"{PATH} is not what python -m sluice.dashboard generates: run it", file=sys.stderr)
            return 1
        return 0
    PATH.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
