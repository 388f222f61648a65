"""Hostile bodies: each is answered with its 4xx and a clear JSON error, and nothing is queued."""

from __future__ import annotations

import datetime as dt
import gzip
from collections.abc import Iterator

import httpx
import orjson
import pytest
import redis

from sluice import keys
from tests.support import booking, view

JSON = "application/json"
ONE_MIB = 1_048_576


def _batch(*events: object) -> bytes:
    return orjson.dumps({"events": list(events)})


def _future(seconds: int) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()


CASES: list[tuple[str, str, bytes, str | None, int, str]] = [
    # (id, path, body, content type, status, error code)
    ("malformed", "/v1/events", b'{"event_id": "x",', JSON, 400, "malformed_json"),
    ("truncated", "/v1/events/batch", _batch(view())[:-7], JSON, 400, "malformed_json"),
    ("empty body", "/v1/events", b"", JSON, 400, "malformed_json"),
    ("trailing garbage", "/v1/events", orjson.dumps(view()) + b"}", JSON, 400, "malformed_json"),
    ("no content type", "/v1/events", orjson.dumps(view()), None, 415, "unsupported_media_type"),
    ("form content type", "/v1/events", orjson.dumps(view()), "application/x-www-form-urlencoded", 415,
     "unsupported_media_type"),
    ("xml", "/v1/events", b"<event/>", "application/xml", 415, "unsupported_media_type"),
    ("over the size limit", "/v1/events/batch", b'{"events": ["' + b"a" * ONE_MIB + b'"]}', JSON, 413,
     "payload_too_large"),
    ("deeply nested", "/v1/events", b"[" * 5000 + b"]" * 5000, JSON, 400, "malformed_json"),
    ("nested under a field", "/v1/events", b'{"event_id": ' + b"[" * 2000 + b"]" * 2000 + b"}", JSON, 400,
     "malformed_json"),
    ("not utf-8", "/v1/events", b'{"event_id": "\xff\xfe", "type": "view"}', JSON, 400, "malformed_json"),
    ("utf-16", "/v1/events", orjson.dumps(view()).decode().encode("utf-16"), JSON, 400, "malformed_json"),
    ("NaN", "/v1/events", orjson.dumps(view()).replace(b'"user_id":7', b'"user_id":NaN'), JSON, 400,
     "malformed_json"),
    ("Infinity", "/v1/events", orjson.dumps(view()).replace(b'"user_id":7', b'"user_id":Infinity'), JSON, 400,
     "malformed_json"),
    ("duplicate key", "/v1/events", orjson.dumps(view()).replace(b'"user_id":7', b'"user_id":7,"user_id":8'), JSON,
     400, "duplicate_key"),
    ("duplicate key in a batch", "/v1/events/batch",
     _batch(view(), view()).replace(b'"listing_id":42', b'"listing_id":42,"listing_id":43', 1), JSON, 400,
     "duplicate_key"),
    ("huge string", "/v1/events", orjson.dumps(view(event_id="e" * 900_000)), JSON, 422, "invalid_event"),
    # A number beyond a double is not JSON we can represent; one beyond 64 bits is just not an id.
    ("huge number", "/v1/events", orjson.dumps(view()).replace(b'"user_id":7', b'"user_id":' + b"9" * 5000), JSON,
     400, "malformed_json"),
    ("long integer", "/v1/events", orjson.dumps(view()).replace(b'"user_id":7', b'"user_id":' + b"9" * 30), JSON,
     422, "invalid_event"),
    ("integer over bigint", "/v1/events", orjson.dumps(view(listing_id=2**63)), JSON, 422, "invalid_event"),
    ("float id", "/v1/events", orjson.dumps(view(listing_id=1e308)), JSON, 422, "invalid_event"),
    ("date out of range", "/v1/events", orjson.dumps(view(occurred_at="10000-01-01T00:00:00Z")), JSON, 422,
     "invalid_event"),
    ("year zero", "/v1/events", orjson.dumps(view(occurred_at="0000-01-01T00:00:00Z")), JSON, 422, "invalid_event"),
    ("unix time as a string", "/v1/events", orjson.dumps(view(occurred_at="1764063000")), JSON, 422,
     "invalid_event"),
    ("date-time without an offset", "/v1/events", orjson.dumps(view(occurred_at="2026-11-25T09:30:00")), JSON, 422,
     "invalid_event"),
    ("before 2000", "/v1/events", orjson.dumps(view(occurred_at="1999-12-31T23:59:59Z")), JSON, 422, "invalid_event"),
    ("far future", "/v1/events", orjson.dumps(view(occurred_at=_future(3600))), JSON, 422, "invalid_event"),
    ("stay out of range", "/v1/events", orjson.dumps(booking(check_in="2300-01-01", check_out="2300-01-02")), JSON,
     422, "invalid_event"),
    ("empty object", "/v1/events", b"{}", JSON, 422, "invalid_event"),
    ("json null", "/v1/events", b"null", JSON, 422, "invalid_event"),
    ("string body", "/v1/events", b'"view"', JSON, 422, "invalid_event"),
    ("empty batch", "/v1/events/batch", b'{"events": []}', JSON, 422, "empty_batch"),
    ("batch over 1000", "/v1/events/batch", _batch(*(view() for _ in range(1001))), JSON, 422, "batch_too_large"),
    ("batch not an object", "/v1/events/batch", b"[]", JSON, 422, "invalid_batch"),
    ("batch of garbage", "/v1/events/batch", _batch(1, "two", None, [], {}), JSON, 422, "invalid_events"),
]  # fmt: skip


@pytest.fixture
def queue(isolated_queue: redis.Redis) -> Iterator[redis.Redis]:
    yield isolated_queue
    assert isolated_queue.llen(keys.EVENTS_QUEUE) == 0, "a refused request queued something"


@pytest.mark.parametrize(("path", "body", "content_type", "status", "code"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_hostile_body(
    isolated_client: httpx.Client, queue: redis.Redis, path: str, body: bytes, content_type: str | None,
    status: int, code: str,
) -> None:  # fmt: skip
    headers = {"content-type": content_type} if content_type else {}
    response = isolated_client.post(path, content=body, headers=headers)
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert len(response.content) < 200_000, "the error must not echo a huge input back"


def test_field_errors_name_their_path(isolated_client: httpx.Client, queue: redis.Redis) -> None:
    response = isolated_client.post("/v1/events", json=view(occurred_at=_future(3600)))
    assert response.json()["error"]["details"] == [
        {"loc": ["occurred_at"], "msg": "must not be more than 300 s in the future", "type": "value_error"}
    ]


def test_small_skew_is_allowed(isolated_client: httpx.Client, isolated_queue: redis.Redis) -> None:
    assert isolated_client.post("/v1/events", json=view(occurred_at=_future(60))).status_code == 202


def test_compressed_body_without_support_is_refused_not_misread(
    isolated_client: httpx.Client, queue: redis.Redis
) -> None:
    response = isolated_client.post(
        "/v1/events", content=gzip.compress(orjson.dumps(view())), headers={"content-type": JSON}
    )
    assert response.status_code == 400
