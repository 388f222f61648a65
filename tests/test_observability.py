"""Watching the pipeline: Prometheus metrics from every process, JSON logs that carry the request id from
the API to the worker, and Flower on our broker."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from cassandra.cluster import Session
from prometheus_client.parser import text_string_to_metric_families

from devstack import PROJECT, Profile, Servers
from sluice.queue import WRITE_EVENTS, make_celery
from sluice.settings import Settings
from tests.support import AUTH, Service, booking, service_env, start_worker, stored_rows, view, wait_until

#: Every metric the README and the Grafana dashboard promise, and the traffic below must move.
MOVING = [
    "sluice_http_requests_total",
    "sluice_http_request_duration_seconds_count",
    "sluice_events_accepted_total",
    "sluice_events_rejected_total",
    "sluice_publish_batch_events_count",
    "sluice_events_written_total",
    "sluice_write_duration_seconds_count",
    "sluice_task_retries_total",
    "sluice_dead_letters_total",
    "sluice_event_lag_seconds_count",
]
PRESENT = ["sluice_queue_depth", "sluice_publish_failures_total"]


def scrape(base_url: str) -> dict[str, float]:
    """Sample name -> value, summed over label sets."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        totals.setdefault(family.name, 0.0)
    return totals


def test_metrics_are_present_and_move_with_traffic(
    api: Service, worker: Service, servers: Servers, cassandra: Session, settings: Settings, profile: Profile,
    log_dir: Path,
) -> None:  # fmt: skip
    before = scrape(api.base_url)
    with httpx.Client(base_url=api.base_url, headers=AUTH) as c:
        events = [view(), booking(), view()]
        assert c.post("/v1/events/batch", json={"events": [*events, view(user_id="x")]}).status_code == 202
        for event in events:
            wait_until(lambda e=event: stored_rows(cassandra, e["event_id"]) == (1, 1), 10, "the events")
    # A retry: a worker with a short timeout writes while Cassandra is frozen for a moment.
    retrying = start_worker(profile, log_dir, name="worker-metrics", SLUICE_CASSANDRA_REQUEST_TIMEOUT_S="1",
                            SLUICE_REDIS_URL=f"redis://127.0.0.1:{profile.redis_port}/11")  # fmt: skip
    celery = make_celery(Settings(redis_url=f"redis://127.0.0.1:{profile.redis_port}/11"))
    try:
        assert servers.cassandra is not None
        servers.cassandra.signal(signal.SIGSTOP)
        try:
            late = view()
            # ... and a dead letter: an event in a format no version of the API accepted.
            celery.send_task(WRITE_EVENTS, args=[[late, {"event_id": str(uuid.uuid4())}], time.time()])
            wait_until(lambda: "retrying in" in retrying.log_text(), 20, "a retry")
        finally:
            servers.cassandra.signal(signal.SIGCONT)
        wait_until(lambda: stored_rows(cassandra, late["event_id"]) == (1, 1), 30, "the retried event")
    finally:
        celery.close()
        retrying.stop()
    after = scrape(api.base_url)
    for name in PRESENT:
        assert name in after, f"{name} is not exported"
    for name in MOVING:
        assert after.get(name, 0) > before.get(name, 0), f"{name} did not move: {before.get(name)} -> {after.get(name)}"
    assert after["sluice_events_rejected_total"] - before.get("sluice_events_rejected_total", 0) == 1


def test_request_id_goes_from_the_api_to_the_worker_log(api: Service, worker: Service, cassandra: Session) -> None:
    request_id = uuid.uuid4().hex
    event = view()
    response = httpx.post(f"{api.base_url}/v1/events", json=event, headers={**AUTH, "X-Request-ID": request_id})
    assert response.status_code == 202
    assert response.headers["x-request-id"] == request_id
    wait_until(lambda: stored_rows(cassandra, event["event_id"]) == (1, 1), 10, "the event")

    def logged() -> list[dict[str, object]]:
        lines = [json.loads(line) for line in worker.log_text().splitlines() if line.startswith("{")]
        return [line for line in lines if request_id in (line.get("request_ids") or [])]

    wait_until(lambda: bool(logged()), 5, "the worker's log line for the batch")
    line = logged()[0]
    assert line["logger"] == "sluice.worker"
    assert line["level"] == "INFO"
    assert str(line["message"]).startswith("wrote ")
    assert line["task_ids"]


def test_flower_works_against_our_broker(worker: Service, profile: Profile, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Flower 2 serves its API only with authentication configured, or with this switch (fine on loopback).
    env = {**os.environ, **service_env(profile), "FLOWER_UNAUTHENTICATED_API": "true"}
    log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.app", "flower", f"--port={port}", "--address=127.0.0.1"],
        env=env, cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=1).text == "OK"
            except httpx.HTTPError:
                return False

        wait_until(answers, 30, "Flower to answer")
        workers = httpx.get(f"http://127.0.0.1:{port}/api/workers", params={"refresh": "true"}, timeout=20).json()
        assert any(name.startswith("sluice-worker-") for name in workers), workers
    finally:
        flower.terminate()
        flower.wait(10)
        log.close()


def test_grafana_dashboard_queries_name_exported_metrics(api: Service) -> None:
    dashboard = json.loads((PROJECT / "dashboards" / "grafana" / "sluice.json").read_text())
    exported = set(scrape(api.base_url))
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(queries) >= 10
    named = {name for query in queries for name in re.findall(r"\b(sluice_[a-z_]+)\b", query)}
    assert named, "the dashboard queries no Sluice metric"
    missing = sorted(named - exported)
    assert not missing, f"the dashboard queries metrics we do not export: {missing}"
    # And every metric we promise is on the dashboard.
    on_dashboard = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in named}
    promised = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in MOVING + PRESENT}
    assert promised <= on_dashboard, sorted(promised - on_dashboard)


def test_no_payload_in_the_worker_log_at_info(worker: Service, settings: Settings, cassandra: Session) -> None:
    """A message in the older producer format (``send_task`` with the events as arguments, which the worker
    still accepts) must not put its events in any log line (Celery's "received" and "succeeded" lines did)."""
    event = view(user_id=987_654_321_123)
    app = make_celery(settings)
    try:
        task_id = app.send_task(WRITE_EVENTS, args=[[event], time.time()]).id
    finally:
        app.close()
    wait_until(lambda: stored_rows(cassandra, event["event_id"]) == (1, 1), 20, "the event")
    wait_until(lambda: str(task_id) in worker.log_text(), 5, "the worker's line for the run")
    log = worker.log_text()
    assert event["event_id"] not in log
    assert str(event["user_id"]) not in log
