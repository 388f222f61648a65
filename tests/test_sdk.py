"""The analytics SDKs, unmodified, against the real stack: Segment's analytics-python, RudderStack's
rudder-sdk-python and PostHog's posthog, each in its default background-batching mode, gzip on and off.

Every mapped event is stored once with its fields (both tables); the SDK's error callback is never called;
an SDK retry (the same batch posted again, by the SDK's own request function) is stored once; an unknown
name is rejected, kept and replayed once a mapping exists; a 429 is honoured (retried after Retry-After).
"""

from __future__ import annotations

import gzip
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from cassandra.cluster import Session

from devstack import Profile
from tests.sdk import KEY_ID, TEST_KEY, Call, calls, check_rejections, check_stored, dlq, metric
from tests.support import Service, start_api, stored_rows, wait_until

Errors = list[tuple[Exception, Any]]


def segment_client(host: str, gzip_on: bool | None, errors: Errors) -> Any:
    from segment.analytics.client import Client

    options = {} if gzip_on is None else {"gzip": gzip_on}
    return Client(TEST_KEY, host=host, on_error=lambda e, batch: errors.append((e, batch)), **options)


def rudder_client(host: str, gzip_on: bool | None, errors: Errors) -> Any:
    from rudderstack.analytics.client import Client

    options = {} if gzip_on is None else {"gzip": gzip_on}
    return Client(TEST_KEY, host=host, on_error=lambda e, batch: errors.append((e, batch)), **options)


def posthog_client(host: str, gzip_on: bool | None, errors: Errors) -> Any:
    from posthog import Posthog

    options = {} if gzip_on is None else {"gzip": gzip_on}
    return Posthog(TEST_KEY, host=host, on_error=lambda e, batch: errors.append((e, batch)), **options)


def send_segment(client: Any, call: Call) -> None:
    """One call through the Segment-format API (Segment's and RudderStack's clients share it)."""
    common = {"message_id": call.message_id, "timestamp": call.timestamp}
    if call.kind == "track":
        client.track(user_id=call.user, event=call.name, properties=call.properties, anonymous_id=call.anonymous_id,
                     **common)  # fmt: skip
    elif call.kind == "page":
        client.page(user_id=call.user, name=call.name, properties=call.properties, **common)
    elif call.kind == "identify":
        client.identify(user_id=call.user, traits=call.properties, **common)
    elif call.kind == "group":
        client.group(user_id=call.user, group_id=call.name, **common)
    else:
        client.alias(previous_id=call.name, user_id=call.user, **common)


def send_posthog(client: Any, call: Call) -> None:
    if call.kind == "track":
        client.capture(call.name, distinct_id=call.user, properties=call.properties, timestamp=call.timestamp,
                       uuid=call.message_id)  # fmt: skip
    elif call.kind == "$set":
        client.set(distinct_id=call.user, properties=call.properties, timestamp=call.timestamp, uuid=call.message_id)
    else:
        client.alias(previous_id=call.name, distinct_id=call.user, timestamp=call.timestamp, uuid=call.message_id)


SDKS: dict[str, tuple[str, Callable[[str, bool | None, Errors], Any], Callable[[Any, Call], None]]] = {
    "segment": ("segment", segment_client, send_segment),
    "rudder": ("segment", rudder_client, send_segment),
    "posthog": ("posthog", posthog_client, send_posthog),
}


def run_sdk(sdk: str, host: str, sent: list[Call], gzip_on: bool | None = None) -> Errors:
    """Send through the SDK's background queue, then shut it down (flush, join its threads); its errors."""
    _, make, send = SDKS[sdk]
    errors: Errors = []
    client = make(host, gzip_on, errors)
    try:
        for call in sent:
            send(client, call)
    finally:
        client.shutdown()
    return errors


@pytest.fixture
def db(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


# gzip None: the SDK's default (Segment: off, RudderStack: on, PostHog: off), then the other setting.
@pytest.mark.parametrize(
    ("sdk", "gzip_on"),
    [("segment", None), ("segment", True), ("rudder", None), ("rudder", False), ("posthog", None), ("posthog", True)],
)
def test_the_sdk_stores_every_mapped_event_once_and_keeps_the_rest(
    sdk: str, gzip_on: bool | None, api: Service, worker: Service, client: httpx.Client, cassandra: Session,
    db: redis.Redis,
) -> None:  # fmt: skip
    fmt = SDKS[sdk][0]
    tag = random.randrange(10**6, 10**9)
    sent = calls(tag, posthog=fmt == "posthog")
    rejected_before = metric(client, "sluice_sdk_rejected_total", key=KEY_ID, name="Listing Favourited")
    counted_before = metric(client, "sluice_sdk_messages_total", key=KEY_ID, format=fmt, outcome="counted")

    errors = run_sdk(sdk, api.base_url, sent, gzip_on)

    assert errors == [], errors
    stored, rejected = check_stored(client, cassandra, fmt, sent)
    check_rejections(db, fmt, sent)
    counted = sum(1 for c in sent if not c.stored and not c.rejected)
    assert metric(client, "sluice_sdk_rejected_total", key=KEY_ID, name="Listing Favourited") == rejected_before + 1
    assert metric(client, "sluice_sdk_messages_total", key=KEY_ID, format=fmt, outcome="counted") == (
        counted_before + counted
    )
    print(f"{sdk} gzip={gzip_on}: sent {len(sent)}, stored {stored}, rejected {rejected}, counted {counted}")


def _post_twice(sdk: str, host: str, batch: list[dict[str, Any]]) -> None:
    """The SDK's own request function, twice with the same batch: what its retry after a lost answer sends."""
    for _ in range(2):
        if sdk == "segment":
            from segment.analytics.request import post as segment_post

            segment_post(TEST_KEY, host, gzip=True, batch=batch)
        elif sdk == "rudder":
            from rudderstack.analytics.request import post as rudder_post

            rudder_post(TEST_KEY, host, gzip=True, batch=batch)
        else:
            from posthog.request import batch_post

            batch_post(TEST_KEY, host, gzip=True, batch=batch)


@pytest.mark.parametrize("sdk", ["segment", "rudder", "posthog"])
def test_an_sdk_retry_of_the_same_batch_is_stored_once(
    sdk: str, api: Service, worker: Service, client: httpx.Client, cassandra: Session
) -> None:
    fmt = SDKS[sdk][0]
    tag = random.randrange(10**6, 10**9)
    sent = [c for c in calls(tag, posthog=fmt == "posthog") if c.stored and c.kind == "track"]
    # As the SDKs serialize them: a Decimal price as a float.
    props = [{k: float(v) if k == "total_price" else v for k, v in c.properties.items()} for c in sent]
    if fmt == "segment":
        batch = [{"type": "track", "event": c.name, "userId": c.user, "properties": p, "messageId": c.message_id,
                  "timestamp": c.timestamp.isoformat()} for c, p in zip(sent, props, strict=True)]  # fmt: skip
    else:
        batch = [{"event": c.name, "distinct_id": c.user, "uuid": c.message_id, "timestamp": c.timestamp.isoformat(),
                  "properties": p} for c, p in zip(sent, props, strict=True)]  # fmt: skip
    _post_twice(sdk, api.base_url, batch)
    check_stored(client, cassandra, fmt, sent)


def test_an_unknown_name_is_kept_and_replayed_once_it_is_mapped(
    api: Service, worker: Service, client: httpx.Client, cassandra: Session, profile: Profile, db: redis.Redis
) -> None:
    name = f"Listing Shared {uuid.uuid4().hex[:8]}"
    listing = random.randrange(10**6, 10**9)
    call = Call("track", "77", name, {"listing_id": listing}, rejected="unknown_name")
    body = {"batch": [{"type": "track", "event": name, "userId": "77", "properties": call.properties,
                       "messageId": call.message_id, "timestamp": call.timestamp.isoformat()}]}  # fmt: skip
    answer = httpx.post(f"{api.base_url}/v1/batch", content=gzip.compress(orjson.dumps(body)), auth=(TEST_KEY, ""),
                        headers={"content-type": "application/json", "content-encoding": "gzip"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    [result] = answer.json()["results"]
    assert (result["status"], result["event_id"]) == ("rejected", call.event_id("segment"))
    assert result["errors"][0]["loc"] == ["batch", 0, "event"]
    assert result["errors"][0]["type"] == "unknown_name"
    assert metric(client, "sluice_sdk_rejected_total", key=KEY_ID, name=name, reason="unknown_name") == 1

    listed = dlq(profile, "list")
    assert f"{call.event_id('segment')}" in listed.stdout
    assert "kind=sdk_unmapped" in listed.stdout
    still = dlq(profile, "replay", call.event_id("segment"))
    assert still.returncode == 1, still.stdout + still.stderr
    assert "still not an event" in still.stdout
    mapping = orjson.dumps({name: "view"}).decode()
    replayed = dlq(profile, "replay", call.event_id("segment"), SLUICE_SDK_EVENTS=mapping)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    call.stored = ("view", {"listing_id": listing})
    check_stored(client, cassandra, "segment", [call])
    assert db.hget(b"sluice:dead", call.event_id("segment")) is None


@pytest.fixture(scope="module")
def limited_api(cassandra: Session, profile: Profile, log_dir: Path) -> Iterator[Service]:
    """An API whose key may send 40 events a second: an SDK's second batch in one second gets 429."""
    service = start_api(profile, log_dir, name="api-sdk-limited", SLUICE_API_PORT=str(profile.api_port + 40),
                        SLUICE_RATE_LIMIT_PER_S="40")  # fmt: skip
    yield service
    service.stop()


@pytest.mark.parametrize("sdk", ["segment", "rudder", "posthog"])
def test_a_429_is_honoured(
    sdk: str, limited_api: Service, worker: Service, client: httpx.Client, cassandra: Session
) -> None:
    fmt = SDKS[sdk][0]
    tag = random.randrange(10**6, 10**9)
    # Three batches of 100 back to back, each charged as the whole limit: two of them share a second, 429.
    sent = [Call("track", "5", "Listing Viewed", {"listing_id": tag}, stored=("view", {"listing_id": tag}))
            for _ in range(300)]  # fmt: skip
    refused_before = metric(client, "sluice_http_requests_total", status="429")
    errors = run_sdk(sdk, limited_api.base_url, sent)
    assert errors == [], errors
    assert metric(client, "sluice_http_requests_total", status="429") > refused_before
    for event_id in [c.event_id(fmt) for c in sent]:
        wait_until(lambda e=event_id: stored_rows(cassandra, e) == (1, 1), 30, "every event stored once")
