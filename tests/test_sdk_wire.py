"""The SDK routes' contract without an SDK: the mapping as data (sluice/sdkmap.py, no server), and what the
routes answer (an API on Redis database 1, where no worker consumes)."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import uuid
import zlib
from typing import Any

import httpx
import orjson
import pytest
import redis

from sluice import keys
from sluice.sdkmap import Request, SdkMapping, derive_event_id, occurred_at_of, translate
from tests.sdk import KEY_ID, TEST_KEY

NOW = dt.datetime(2026, 12, 4, 12, 0, 0, tzinfo=dt.UTC)
SEGMENT = Request("segment", KEY_ID, NOW)


def track(**overrides: Any) -> dict[str, Any]:
    msg = {"type": "track", "event": "Listing Viewed", "userId": "7", "properties": {"listing_id": 42},
           "messageId": "0b6f3c1e-8a55-4c1e-9a57-5f1d2c3b4a01", "timestamp": "2026-12-04T11:59:00.250Z"}  # fmt: skip
    return msg | overrides


# --- the mapping -----------------------------------------------------------------------------------------


def test_a_json_number_price_is_stored_as_the_decimal_it_prints_as() -> None:
    props = {"listing_id": 42, "check_in": "2026-12-10", "check_out": "2026-12-12", "guests": 2, "currency": "EUR"}
    for sent, stored in [(449.7, "449.7"), (449.70, "449.7"), (0.1, "0.1"), (1200, "1200"), ("449.70", "449.70")]:
        msg = track(event="Booking Completed", properties=props | {"total_price": sent})
        outcome = translate(msg, SEGMENT, SdkMapping())
        assert outcome.event is not None, outcome.errors
        assert outcome.event["total_price"] == stored
    too_fine = translate(
        track(event="Booking Completed", properties=props | {"total_price": 1e-5}), SEGMENT, SdkMapping()
    )
    assert [(e.loc, e.type) for e in too_fine.errors] == [(["properties", "total_price"], "string_pattern_mismatch")]


def test_a_message_id_that_is_no_uuid_becomes_a_stable_uuid_of_it_and_the_key() -> None:
    first = derive_event_id({"messageId": "node-next-1-abc"}, SEGMENT)
    assert first == derive_event_id({"messageId": "node-next-1-abc"}, Request("segment", KEY_ID, NOW, "later"))
    assert first != derive_event_id({"messageId": "node-next-1-abc"}, Request("segment", "other-key", NOW))
    assert derive_event_id(track(), SEGMENT) == "0b6f3c1e-8a55-4c1e-9a57-5f1d2c3b4a01"
    # Without any id: derived from the content, which a retry's new sentAt does not change.
    no_id = track()
    del no_id["messageId"]
    assert derive_event_id(no_id | {"sentAt": "a"}, SEGMENT) == derive_event_id(no_id | {"sentAt": "b"}, SEGMENT)


def test_segments_clock_skew_rule_without_a_timestamp() -> None:
    # The device's clock is 65 s behind ours: what it calls 11:58:00 happened at 11:59:05.
    msg = {"originalTimestamp": "2026-12-04T11:58:00.000Z", "sentAt": "2026-12-04T11:58:55.000Z"}
    assert occurred_at_of(msg, SEGMENT) == ("2026-12-04T11:59:05.000Z", "originalTimestamp")
    # Transit jitter between two attempts (ms) does not change the event: the correction is in whole seconds.
    later = Request("segment", KEY_ID, NOW + dt.timedelta(milliseconds=40))
    assert occurred_at_of(msg, later) == occurred_at_of(msg, SEGMENT)
    assert occurred_at_of({"timestamp": "t", **msg}, SEGMENT) == ("t", "timestamp")
    assert occurred_at_of({}, SEGMENT) == ("2026-12-04T12:00:00.000Z", "timestamp")


def test_what_cannot_be_mapped_is_rejected_with_the_reason_at_its_path() -> None:
    cases = [
        (track(event="Listing Shared"), ["batch", 3, "event"], "unknown_name"),
        (track(userId=None, anonymousId="a-1"), ["batch", 3, "userId"], "anonymous"),
        (track(userId="u-7"), ["batch", 3, "userId"], "invalid_user_id"),
        (track(properties={"listing_id": "forty-two"}), ["batch", 3, "properties", "listing_id"], "int_type"),
        (track(type="screenview"), ["batch", 3, "type"], "unknown_type"),
        ("not an object", ["batch", 3], "not_an_object"),
    ]
    for msg, loc, kind in cases:
        outcome = translate(msg, SEGMENT, SdkMapping(), ("batch", 3))
        assert outcome.status == "rejected", msg
        assert [(e.loc, e.type) for e in outcome.errors] == [(loc, kind)], outcome.errors
    for call in ("identify", "group", "alias"):
        assert translate(track(type=call), SEGMENT, SdkMapping()).status == "counted"


def test_operators_add_names_and_sources_without_code() -> None:
    revenue = {"type": "booking", "fields": {"total_price": "properties.revenue"}}
    mapping = SdkMapping({"Product Viewed": "view", "Order Completed": revenue})
    assert translate(track(event="Product Viewed"), SEGMENT, mapping).status == "accepted"
    props = {"listing_id": 42, "check_in": "2026-12-10", "check_out": "2026-12-12", "guests": 2, "currency": "EUR",
             "revenue": 99.5}  # fmt: skip
    booking = translate(track(event="Order Completed", properties=props), SEGMENT, mapping).event
    assert booking is not None
    assert booking["total_price"] == "99.5"
    for bad, why in [
        ({"X": "click"}, "type must be one of"),
        ({"X": {"type": "view", "fields": {"guests": "a"}}}, "not a field of 'view'"),
        ({"X": {"type": "view", "fields": {"listing_id": "a..b"}}}, "dotted path"),
    ]:
        with pytest.raises(ValueError, match=why):
            SdkMapping(bad)  # type: ignore[arg-type]


# --- the routes ------------------------------------------------------------------------------------------


def post(client: httpx.Client, path: str, body: Any, **headers: str) -> httpx.Response:
    # No Bearer header of the fixture's: the SDKs authenticate their own way.
    return client.post(path, content=orjson.dumps(body), headers={"authorization": "", "content-type":
                       "application/json"} | headers)  # fmt: skip


def test_a_batch_with_bad_messages_is_a_200_with_a_verdict_each(
    isolated_client: httpx.Client, isolated_queue: redis.Redis
) -> None:
    basic = "Basic " + base64.b64encode(f"{TEST_KEY}:".encode()).decode()  # as Segment's and Rudder's SDKs send it
    m1, m2, m3 = (f"m-{uuid.uuid4()}" for _ in range(3))
    body = {"batch": [track(messageId=m1), track(event="Listing Shared", messageId=m2), 5]}
    answer = post(isolated_client, "/v1/batch", body, authorization=basic)
    assert answer.status_code == 200, answer.text
    assert answer.json()["success"] is True
    assert [(r["status"], r["type"], r["message_id"]) for r in answer.json()["results"]] == [
        ("accepted", "view", m1), ("rejected", None, m2), ("rejected", None, None)]  # fmt: skip
    assert isolated_queue.llen(keys.EVENTS_QUEUE) == 1
    # A single message, the key in the body (writeKey), never kept in the dead letter.
    single = post(isolated_client, "/v1/track", track(event="Nope", messageId=m3) | {"writeKey": TEST_KEY})
    assert single.json()["results"][0]["errors"][0]["loc"] == ["event"]
    assert TEST_KEY.encode() not in isolated_queue.hget(keys.DEAD_LETTERS, single.json()["results"][0]["event_id"])
    # PostHog: the key in the body, no header, trailing slash.
    message = {"event": "Listing Viewed", "distinct_id": "7", "properties": {"listing_id": 42},
               "uuid": str(uuid.uuid4()), "timestamp": "2026-12-04T11:59:00Z"}  # fmt: skip
    posthog = {"api_key": TEST_KEY, "batch": [message]}
    assert post(isolated_client, "/batch/", posthog).json()["accepted"] == 1


def test_sdk_errors_carry_code_and_message_at_the_top(
    isolated_client: httpx.Client, isolated_queue: redis.Redis
) -> None:
    for answer, status, code in [
        (post(isolated_client, "/v1/batch", {"batch": []}), 401, "unauthorized"),
        (post(isolated_client, "/v1/batch", {"batch": []}, authorization="Basic bm9wZTo="), 401, "unauthorized"),
        (post(isolated_client, "/batch/", {"api_key": TEST_KEY, "batch": {}}), 400, "invalid_batch"),
        (post(isolated_client, "/batch/", {"api_key": TEST_KEY, "batch": [{}] * 20_001}), 413, "batch_too_large"),
    ]:
        assert answer.status_code == status, answer.text
        body = answer.json()
        assert (body["code"], body["error"]["code"]) == (code, code)
        assert isinstance(body["message"], str)


def test_an_sdk_gzip_bomb_is_refused_while_it_inflates(
    isolated_client: httpx.Client, isolated_queue: redis.Redis
) -> None:
    squeezer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = squeezer.compress(b'{"batch": ["') + squeezer.compress(b"0" * (64 * 1024 * 1024)) + squeezer.flush()
    answer = isolated_client.post("/batch/", content=bomb, headers={"content-type": "application/json",
                                  "content-encoding": "gzip", "authorization": ""})  # fmt: skip
    assert answer.status_code == 413
    assert answer.json()["code"] == "payload_too_large"
    # 5 MiB of PostHog batch, gzip'ed, is within the limit.
    big = {"api_key": TEST_KEY, "batch": [{"event": "Listing Viewed", "distinct_id": "7", "properties":
           {"listing_id": 42, "pad": "x" * 1000}, "timestamp": "2026-12-04T11:59:00Z"}] * 5_000}  # fmt: skip
    body = orjson.dumps(big)
    assert len(body) > 5 * 1024 * 1024
    answer = isolated_client.post("/batch/", content=gzip.compress(body), headers={"content-type": "application/json",
                                  "content-encoding": "gzip", "authorization": ""}, timeout=30)  # fmt: skip
    assert answer.status_code == 200, answer.text[:500]
    assert answer.json()["accepted"] == 5_000  # the same event 5,000 times: one stored, the copies duplicates
