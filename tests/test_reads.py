"""Reading back: a listing's events in time order across day partitions, per-day stats that stay exact
when messages are redelivered, and where one event is (queued, stored, dead-lettered)."""

from __future__ import annotations

import base64
import datetime as dt
import random
import time
from typing import Any

import httpx
import orjson
import pytest
import redis
from cassandra.cluster import Session

from sluice import keys
from sluice.deadletters import Item, add
from sluice.marks import mark_value
from sluice.queue import WRITE_EVENTS, make_celery
from sluice.settings import Settings
from tests.support import AUTH, Service, booking, view, wait_until

DAY0 = (dt.datetime.now(dt.UTC) - dt.timedelta(days=10)).replace(hour=0, minute=0, second=0, microsecond=0)


def at(day: int, hour: int, minute: int = 0) -> str:
    return (DAY0 + dt.timedelta(days=day, hours=hour, minutes=minute)).isoformat().replace("+00:00", "Z")


@pytest.fixture(scope="module")
def listing(client_factory: Any) -> tuple[int, list[dict[str, Any]]]:
    """A listing with 12 events over three days (and two just outside the range asked for)."""
    listing_id = random.randint(10**9, 10**12)
    events = [
        view(listing_id=listing_id, occurred_at=at(0, 23, 59)),
        *(view(listing_id=listing_id, occurred_at=at(1, h)) for h in (1, 5, 9, 13, 17)),
        *(booking(listing_id=listing_id, occurred_at=at(1, h, 30)) for h in (2, 6)),
        *(view(listing_id=listing_id, occurred_at=at(2, h)) for h in (0, 3, 4)),
        booking(listing_id=listing_id, occurred_at=at(2, 4)),  # same instant as a view: ordered by id
        view(listing_id=listing_id, occurred_at=at(3, 0)),  # exactly at "to": excluded
        view(listing_id=listing_id, occurred_at=at(-1, 23)),  # before "from": excluded
    ]
    random.shuffle(events)
    with client_factory() as client:
        assert client.post("/v1/events/batch", json={"events": events}).json()["accepted"] == len(events)
        for event in events:
            wait_until(lambda e=event: client.get(f"/v1/events/{e['event_id']}").json().get("status") == "stored", 20,
                       "the listing's events to be stored")  # fmt: skip
    return listing_id, events


@pytest.fixture(scope="module")
def client_factory(api: Service, worker: Service) -> Any:
    return lambda: httpx.Client(base_url=api.base_url, headers=AUTH, timeout=10)


def expected(events: list[dict[str, Any]], kind: str | None = None) -> list[str]:
    inside = [e for e in events if at(0, 0) <= e["occurred_at"] < at(3, 0) and kind in (None, e["type"])]
    inside.sort(key=lambda e: (e["occurred_at"], e["event_id"]))
    return [e["event_id"] for e in inside]


def read_all(client: httpx.Client, listing_id: int, **params: Any) -> tuple[list[str], int]:
    ids: list[str] = []
    pages = 0
    token = None
    while True:
        query = {"from": at(0, 0), "to": at(3, 0), **params} | ({"page_token": token} if token else {})
        page = client.get(f"/v1/listings/{listing_id}/events", params=query)
        assert page.status_code == 200, page.text
        body = page.json()
        ids += [e["event_id"] for e in body["events"]]
        pages += 1
        token = body["next_page_token"]
        if token is None:
            return ids, pages
        assert pages < 50


def test_events_come_in_time_order_across_days_and_pages(
    listing: tuple[int, list[dict[str, Any]]], client_factory: Any
) -> None:
    listing_id, events = listing
    with client_factory() as client:
        ids, pages = read_all(client, listing_id, limit=3)
        assert ids == expected(events)
        assert pages == 4, pages  # 12 events in pages of 3: the last page says there is no next one
        # Paging by type skips the other type, still in order, still across days.
        bookings, _ = read_all(client, listing_id, limit=2, type="booking")
        assert bookings == expected(events, "booking")
        one_page, _ = read_all(client, listing_id, limit=1000)
        assert one_page == expected(events)


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"type": "click"}, "type"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-01-01T00:00:00"}, "from"),  # no offset
        ({"from": at(2, 0), "to": at(1, 0)}, "from"),
        ({"from": at(-100, 0), "to": at(1, 0)}, "from"),  # over 92 days
    ],
)
def test_invalid_parameters_are_422(client_factory: Any, params: dict[str, Any], where: str) -> None:
    with client_factory() as client:
        response = client.get("/v1/listings/42/events", params=params)
    assert response.status_code == 422, response.text
    assert where in str(response.json()["error"]["details"])


@pytest.mark.parametrize(
    ("path", "params", "where"),
    [
        ("events", {"to": "0001-01-01T00:00:00Z"}, "to"),
        ("events", {"from": "0001-01-01T00:00:00Z", "to": "0001-01-02T00:00:00Z"}, "from,to"),
        ("events", {"from": "0001-01-01T00:00:00+01:00"}, "from"),
        ("events", {"to": "9999-12-31T23:59:59Z"}, "to"),
        ("events", {"from": "9999-12-30T00:00:00Z", "to": "9999-12-31T23:59:59Z"}, "from,to"),
        ("events", {"to": "9999-12-31T23:00:00-05:00"}, "to"),
        ("events", {"to": "1999-12-31T00:00:00Z"}, "to"),
        ("events", {"to": "2000-01-01T00:00:00Z"}, "to"),  # nothing can lie before it
        ("stats", {"to": "0001-01-01"}, "to"),
        ("stats", {"from": "0001-01-01", "to": "0001-01-03"}, "from,to"),
        ("stats", {"to": "9999-12-31"}, "to"),
        ("stats", {"from": "9999-12-30", "to": "9999-12-31"}, "from,to"),
        ("stats", {"from": "2199-12-31", "to": "2200-01-01"}, "to"),
    ],
)
def test_dates_out_of_range_are_422_naming_the_parameter(
    client_factory: Any, path: str, params: dict[str, Any], where: str
) -> None:
    with client_factory() as client:
        response = client.get(f"/v1/listings/42/{path}", params=params)
    assert response.status_code == 422, response.text
    assert [d["loc"] for d in response.json()["error"]["details"]] == [["query", w] for w in where.split(",")]


def test_paging_works_with_the_default_range(client_factory: Any) -> None:
    """Without from/to the range ends "now", which moves: the token keeps the range the first page used."""
    listing_id = random.randint(10**9, 10**12)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    events = [view(listing_id=listing_id, occurred_at=(now - dt.timedelta(hours=h)).isoformat()) for h in (1, 30, 80)]
    with client_factory() as client:
        assert client.post("/v1/events/batch", json={"events": events}).json()["accepted"] == 3
        for event in events:
            wait_until(lambda e=event: client.get(f"/v1/events/{e['event_id']}").json().get("status") == "stored", 20,
                       "the events to be stored")  # fmt: skip
        ids, token = [], None
        for _ in range(4):
            time.sleep(0.01)  # "now" moves between pages
            page = client.get(f"/v1/listings/{listing_id}/events",
                              params={"limit": 1} | ({"page_token": token} if token else {}))  # fmt: skip
            assert page.status_code == 200, page.text
            ids += [e["event_id"] for e in page.json()["events"]]
            token = page.json()["next_page_token"]
            if token is None:
                break
    assert ids == [e["event_id"] for e in reversed(events)]


def test_a_token_only_works_for_its_own_query(listing: tuple[int, list[dict[str, Any]]], client_factory: Any) -> None:
    listing_id, _ = listing
    with client_factory() as client:
        first = client.get(f"/v1/listings/{listing_id}/events", params={"from": at(0, 0), "to": at(3, 0), "limit": 2})
        token = first.json()["next_page_token"]
        other = client.get(
            f"/v1/listings/{listing_id}/events",
            params={"from": at(0, 0), "to": at(3, 0), "limit": 2, "type": "view", "page_token": token},
        )
    assert other.status_code == 400
    assert other.json()["error"]["code"] == "invalid_page_token"


def test_listing_reads_need_a_key(api: Service) -> None:
    assert httpx.get(f"{api.base_url}/v1/listings/42/events").status_code == 401
    assert httpx.get(f"{api.base_url}/v1/listings/42/stats").status_code == 401


def test_stats_stay_exact_after_redelivery(
    listing: tuple[int, list[dict[str, Any]]], client_factory: Any, settings: Settings
) -> None:
    listing_id, events = listing
    # Redeliver some of the events: the same messages again, and the same events posted again.
    celery = make_celery(settings)
    try:
        for _ in range(2):
            celery.send_task(WRITE_EVENTS, args=[events[:5], time.time()], kwargs={"request_ids": ["redelivery"]})
    finally:
        celery.close()
    with client_factory() as client:
        assert client.post("/v1/events/batch", json={"events": events[5:]}).status_code == 202
        time.sleep(2)
        last = (DAY0 + dt.timedelta(days=2)).date().isoformat()
        stats = client.get(f"/v1/listings/{listing_id}/stats", params={"from": DAY0.date().isoformat(), "to": last})
    assert stats.status_code == 200
    body = stats.json()
    by_day = {d["day"]: (d["views"], d["bookings"]) for d in body["days"]}
    day = [(DAY0 + dt.timedelta(days=i)).date().isoformat() for i in range(3)]
    assert by_day == {day[0]: (1, 0), day[1]: (5, 2), day[2]: (3, 1)}
    assert (body["views"], body["bookings"]) == (9, 3)


def test_where_an_event_is(client_factory: Any, cassandra: Session, redis_client: redis.Redis, worker: Service) -> None:
    with client_factory() as client:
        stored = booking()
        assert client.post("/v1/events", json=stored).status_code == 202
        wait_until(
            lambda: client.get(f"/v1/events/{stored['event_id']}").json().get("status") == "stored", 10, "stored"
        )
        body = client.get(f"/v1/events/{stored['event_id']}").json()
        assert body["event"]["total_price"] == "449.70"
        assert body["write_time"] == "2026-11-25T08:30:00.250Z"  # derived from occurred_at, by design

        # Queued: as the API marks an event it has put in Redis that no worker has written yet.
        queued_id = view()["event_id"]
        redis_client.hset(keys.QUEUED, queued_id, mark_value({"event_id": queued_id}, 1_764_000_000.5))
        try:
            body = client.get(f"/v1/events/{queued_id}").json()
        finally:
            redis_client.hdel(keys.QUEUED, queued_id)
        assert body == {"event_id": queued_id, "status": "queued", "accepted_at": "2025-11-24T16:00:00.500Z"}

        dead = view()
        add(redis_client, [Item(dead, "write failed after 9 attempts: boom")], kind="write_failed", task_id="t",
            attempts=9)  # fmt: skip
        try:
            body = client.get(f"/v1/events/{dead['event_id']}").json()
        finally:
            redis_client.hdel(keys.DEAD_LETTERS, dead["event_id"])
        assert body["status"] == "dead_lettered"
        assert body["reason"] == "write failed after 9 attempts: boom"
        assert body["attempts"] == 9
        assert client.get(f"/v1/events/{view()['event_id']}").status_code == 404


def test_the_api_marks_queued_events_and_the_worker_clears_them(
    client_factory: Any, redis_client: redis.Redis, worker: Service
) -> None:
    with client_factory() as client:
        event = view()
        assert client.post("/v1/events", json=event).status_code == 202
        wait_until(lambda: client.get(f"/v1/events/{event['event_id']}").json().get("status") == "stored", 10, "stored")
    wait_until(lambda: not redis_client.hexists(keys.QUEUED, event["event_id"]), 5, "the mark to go")
    assert redis_client.zscore(keys.QUEUED_INDEX, event["event_id"]) is None


def test_a_forged_page_token_is_400_at_once(listing: tuple[int, list[dict[str, Any]]], client_factory: Any) -> None:
    listing_id, _ = listing
    params = {"from": at(0, 0), "to": at(3, 0), "limit": 2}
    with client_factory() as client:
        token = client.get(f"/v1/listings/{listing_id}/events", params=params).json()["next_page_token"]
        payload, signature = token.split(".")
        data = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        # The day moved to the year 1000: unsigned, this made one request scan Cassandra day by day for minutes.
        forged = base64.urlsafe_b64encode(orjson.dumps(data | {"d": "1000-01-01"})).decode().rstrip("=")
        for bad in (f"{forged}.{signature}", forged, "not-a-token", f"{payload}.{signature[:-2]}AA"):
            began = time.monotonic()
            answer = client.get(f"/v1/listings/{listing_id}/events", params=params | {"page_token": bad})
            assert time.monotonic() - began < 1.0
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["code"] == "invalid_page_token"
            assert answer.json()["error"]["details"][0]["loc"] == ["query", "page_token"]


def test_a_type_filter_reads_a_bounded_number_of_rows_per_page(client_factory: Any, cassandra: Session) -> None:
    """2,500 views and one booking in a day: asking for bookings reads at most the scan budget per request,
    answering a short page with a token to go on, until the booking is found."""
    listing_id = random.randint(10**9, 10**12)
    views = [view(listing_id=listing_id, occurred_at=at(1, 1, i % 60)) for i in range(2500)]
    rare = booking(listing_id=listing_id, occurred_at=at(1, 23))
    with client_factory() as client:
        for start in range(0, len(views), 1000):
            assert client.post("/v1/events/batch", json={"events": views[start : start + 1000]}).status_code == 202
        assert client.post("/v1/events", json=rare).status_code == 202
        wait_until(lambda: client.get(f"/v1/events/{rare['event_id']}").json().get("status") == "stored", 20, "rare")
        wait_until(lambda: client.get(f"/v1/listings/{listing_id}/stats",
                                      params={"from": at(1, 0)[:10], "to": at(1, 0)[:10]}).json()["views"] == 2500,
                   30, "the views")  # fmt: skip
        params: dict[str, Any] = {"from": at(0, 0), "to": at(3, 0), "type": "booking", "limit": 10}
        pages = []
        token = None
        for _ in range(10):
            body = client.get(f"/v1/listings/{listing_id}/events", params=params | ({"page_token": token} if token
                                                                                     else {})).json()  # fmt: skip
            pages.append([e["event_id"] for e in body["events"]])
            token = body["next_page_token"]
            if token is None:
                break
    assert pages[0] == [], "2,000 rows read, no booking among them: a short page with a token"
    assert [eid for page in pages for eid in page] == [rare["event_id"]]
    assert token is None
