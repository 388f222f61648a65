"""Every error class of the API, and batches judged event by event; against the real API process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from devstack import Profile, Servers
from sluice import keys
from tests.support import booking, view

JSON = {"content-type": "application/json"}


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"code", "message", "details"} <= set(body["error"]), body
    error: dict[str, Any] = body["error"]
    return error


def queued(client: redis.Redis) -> int:
    return int(client.llen(keys.EVENTS_QUEUE))


@pytest.fixture
def client(isolated_client: httpx.Client) -> httpx.Client:
    return isolated_client


@pytest.fixture
def paused_queue(isolated_queue: redis.Redis) -> redis.Redis:
    return isolated_queue


def test_single_event_is_accepted_and_queued(client: httpx.Client, paused_queue: redis.Redis) -> None:
    event = view()
    response = client.post("/v1/events", json=event)
    assert response.status_code == 202
    assert response.json() == {
        "accepted": 1,
        "rejected": 0,
        "results": [{"index": 0, "event_id": event["event_id"], "status": "accepted", "errors": []}],
    }
    # A 202 means the Celery message is already in Redis.
    assert queued(paused_queue) == 1
    assert event["event_id"].encode() in paused_queue.lindex(keys.EVENTS_QUEUE, 0)


def test_malformed_json_is_400(client: httpx.Client, paused_queue: redis.Redis) -> None:
    response = client.post("/v1/events", content=b'{"event_id": ', headers=JSON)
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "malformed_json"
    assert "line 1" in error["message"]
    assert queued(paused_queue) == 0


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type_is_415(client: httpx.Client, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/events", content=b"{}", headers=headers)
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"


def test_body_over_the_limit_is_413(client: httpx.Client, paused_queue: redis.Redis) -> None:
    big = b'{"events": [' + b"1," * 600_000 + b"1]}"
    response = client.post("/v1/events/batch", content=big, headers=JSON)
    assert response.status_code == 413
    assert "1048576 bytes" in error_of(response)["message"]


def test_body_over_the_limit_without_content_length_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"events": ['
        for _ in range(200):
            yield b"1," * 5000
        yield b"1]}"

    response = client.post("/v1/events/batch", content=chunks(), headers=JSON)
    assert response.status_code == 413


def test_invalid_event_is_422_with_field_paths(client: httpx.Client, paused_queue: redis.Redis) -> None:
    response = client.post("/v1/events", json=booking(guests=0, listing_id="5", extra=1))
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_event"
    assert sorted(tuple(d["loc"]) for d in error["details"]) == [("extra",), ("guests",), ("listing_id",)]
    assert queued(paused_queue) == 0


def test_batch_judges_each_event_on_its_own(client: httpx.Client, paused_queue: redis.Redis) -> None:
    good = [view(), booking()]
    bad = view(user_id=True)
    response = client.post("/v1/events/batch", json={"events": [good[0], bad, good[1]]})
    assert response.status_code == 202
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (2, 1)
    assert [r["status"] for r in body["results"]] == ["accepted", "rejected", "accepted"]
    assert body["results"][1]["event_id"] == bad["event_id"]
    assert body["results"][1]["errors"][0]["loc"] == ["events", 1, "user_id"]
    # The valid events share one message; the invalid one is not queued at all.
    assert queued(paused_queue) == 1
    message = paused_queue.lindex(keys.EVENTS_QUEUE, 0)
    assert all(e["event_id"].encode() in message for e in good)
    assert bad["event_id"].encode() not in message


def test_batch_with_no_valid_event_is_422(client: httpx.Client, paused_queue: redis.Redis) -> None:
    response = client.post("/v1/events/batch", json={"events": [view(type="click"), booking(guests=99)]})
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_events"
    assert [d["loc"] for d in error["details"]] == [["events", 0, "type"], ["events", 1, "guests"]]
    assert queued(paused_queue) == 0


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"events": []}, "empty_batch"),
        ({"events": [view() for _ in range(1001)]}, "batch_too_large"),
        ({"events": view()}, "invalid_batch"),
        ({"events": [view()], "extra": 1}, "invalid_batch"),
        ([view()], "invalid_batch"),
    ],
)
def test_batch_shape_errors_are_422(client: httpx.Client, body: Any, code: str) -> None:
    response = client.post("/v1/events/batch", json=body)
    assert response.status_code == 422
    assert error_of(response)["code"] == code


def test_unknown_event_is_404_and_bad_id_is_422(client: httpx.Client) -> None:
    missing = client.get(f"/v1/events/{view()['event_id']}")
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "not_found"
    bad = client.get("/v1/events/not-a-uuid")
    assert bad.status_code == 422
    assert error_of(bad)["details"][0]["loc"] == ["path", "event_id"]


def test_unknown_route_and_method_use_the_error_shape(client: httpx.Client) -> None:
    assert error_of(client.get("/v2/nothing"))["code"] == "not_found"
    assert error_of(client.delete("/v1/events"))["code"] == "method_not_allowed"


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["redis"] == "ok"
    assert ready.json()["checks"]["cassandra"].startswith("ok (Cassandra 5.0")


def test_openapi_describes_the_contract(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    assert {"/v1/events", "/v1/events/batch", "/v1/events/{event_id}", "/healthz", "/readyz"} <= set(doc["paths"])
    post = doc["paths"]["/v1/events"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Event"}
    assert {"202", "400", "409", "413", "415", "422", "503", "504"} <= set(post["responses"])
    # Named operations, for generated clients (postEvent, not post_event_v1_events_post).
    operations = {op["operationId"] for path in doc["paths"].values() for op in path.values()}
    sdk = {
        f"postSegment{call}" for call in ("Batch", "Import", "Track", "Page", "Screen", "Identify", "Group", "Alias")
    }
    assert operations == {"postEvent", "postEventBatch", "getEvent", "listListingEvents", "getListingStats",
                          "getHealth", "getReadiness", "getMetrics", "postPosthogBatch", *sdk}  # fmt: skip
    booking_schema = doc["components"]["schemas"]["BookingEvent"]
    assert booking_schema["additionalProperties"] is False
    assert "guests" in booking_schema["required"]


def test_the_api_exits_when_its_port_is_taken(servers: Servers, profile: Profile) -> None:
    """A clear error and a non-zero exit, not a process that hangs (it did, under uvloop, with Redis up)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = os.environ | profile.service_env() | {"SLUICE_API_PORT": str(port), "SLUICE_API_KEYS": "k"}
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "api"], env=env, capture_output=True, timeout=30, check=False)
    assert proc.returncode != 0
    assert b"address already in use" in proc.stderr + proc.stdout
    assert time.monotonic() - started < 20
