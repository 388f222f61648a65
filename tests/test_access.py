"""Access control: API keys on every /v1 route, a per-key rate limit, and no secret anywhere it leaks."""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cassandra.cluster import Session

from devstack import Profile, StackError
from tests.support import AUTH, TEST_KEY, Service, start_api, view, wait_until


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {TEST_KEY}"},
        {"Authorization": f"Bearer {TEST_KEY}x"},
        {"Authorization": "Bearer"},
    ],
)
def test_v1_routes_need_a_valid_key(isolated_api: Service, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=isolated_api.base_url, headers=headers) as c:
        for response in (
            c.post("/v1/events", json=view()),
            c.post("/v1/events/batch", json={"events": [view()]}),
            c.get(f"/v1/events/{view()['event_id']}"),
        ):
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "unauthorized"


def test_health_stays_open(isolated_api: Service) -> None:
    assert httpx.get(f"{isolated_api.base_url}/healthz").status_code == 200
    assert httpx.get(f"{isolated_api.base_url}/readyz").status_code == 200


def test_the_key_is_checked_before_the_body_is_read(isolated_api: Service) -> None:
    response = httpx.post(f"{isolated_api.base_url}/v1/events", content=b"{not json")
    assert response.status_code == 401


@pytest.fixture(scope="module")
def limited_api(cassandra: Session, profile: Profile, log_dir: Path) -> Iterator[Service]:
    service = start_api(
        profile, log_dir, name="api-limited", SLUICE_API_PORT=str(profile.api_port + 2),
        SLUICE_REDIS_URL=f"redis://127.0.0.1:{profile.redis_port}/2", SLUICE_RATE_LIMIT_PER_S="20",
        SLUICE_API_KEYS=f"{TEST_KEY},second-key-abcdef",
    )  # fmt: skip
    yield service
    service.stop()


def test_rate_limit_per_key_answers_429_with_retry_after(limited_api: Service) -> None:
    with httpx.Client(base_url=limited_api.base_url, headers=AUTH) as c:
        c.get(f"/v1/events/{view()['event_id']}")  # connects to Cassandra, so the requests below are quick
        # Start at the top of a second, so all 30 requests fall in one window.
        time.sleep(1 - time.time() % 1)
        statuses = [c.get(f"/v1/events/{view()['event_id']}").status_code for _ in range(30)]
        assert statuses.count(404) == 20
        assert statuses[20:] == [429] * 10
        limited = c.get(f"/v1/events/{view()['event_id']}")
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 1
        # Another key has its own budget.
        other = c.get(f"/v1/events/{view()['event_id']}", headers={"Authorization": "Bearer second-key-abcdef"})
        assert other.status_code == 404
        # And the limit lifts in the next window.
        time.sleep(1.1)
        assert c.get(f"/v1/events/{view()['event_id']}").status_code == 404


def test_rate_limit_counts_events_not_requests(limited_api: Service) -> None:
    """A batch costs one unit per event: 15 + 1 events fit in a window of 20; 5 more do not."""
    with httpx.Client(base_url=limited_api.base_url, headers=AUTH) as c:
        time.sleep(1 - time.time() % 1)
        assert c.post("/v1/events/batch", json={"events": [view() for _ in range(15)]}).status_code == 202
        assert c.post("/v1/events", json=view()).status_code == 202
        over = c.post("/v1/events/batch", json={"events": [view() for _ in range(5)]})
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "rate_limited"
        assert "events per second" in over.json()["error"]["message"]


def test_stats_cost_what_they_scan(limited_api: Service, client: httpx.Client, worker: Service) -> None:
    """/stats pays one unit per day partition and type it counts, before reading, and one per 100 rows those
    counts scanned, after: a 92-day range takes a whole window of a 20-per-second key."""
    listing = random.randint(10**9, 10**12)
    day = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).replace(hour=12, minute=0, second=0, microsecond=0)
    events = [view(listing_id=listing, occurred_at=(day + dt.timedelta(seconds=i)).isoformat()) for i in range(200)]
    assert client.post("/v1/events/batch", json={"events": events}).status_code == 202
    wait_until(lambda: client.get(f"/v1/events/{events[-1]['event_id']}").json().get("status") == "stored", 20,
               "the events")  # fmt: skip
    stats = f"/v1/listings/{listing}/stats"
    one_day = {"from": day.date().isoformat(), "to": day.date().isoformat()}
    with httpx.Client(base_url=limited_api.base_url, headers=AUTH) as c:
        c.get(stats, params=one_day)  # connects to Cassandra, so the requests below are quick
        time.sleep(2 - time.time() % 1)  # the top of a second, and a window untouched by that request's debit
        last = dt.datetime.now(dt.UTC).date()
        assert c.get(stats, params={"from": (last - dt.timedelta(days=91)).isoformat()}).status_code == 200
        refused = c.get(stats, params={"to": last.isoformat(), "from": last.isoformat()})
        assert refused.status_code == 429, refused.text
        time.sleep(1 - time.time() % 1)
        # 3 units for the day, then 6 for its 600 rows scanned (200 rows, once per type), then 4 days: 12 > 11.
        assert c.get(stats, params=one_day).json()["views"] == 200
        assert c.get(stats, params={"from": (last - dt.timedelta(days=3)).isoformat()}).status_code == 429
        time.sleep(1 - time.time() % 1)
        assert c.get(stats, params={"from": (last - dt.timedelta(days=3)).isoformat()}).status_code == 200


def test_no_secret_in_logs_errors_or_openapi(limited_api: Service, isolated_api: Service) -> None:
    with httpx.Client(base_url=limited_api.base_url) as c:
        wrong = c.post("/v1/events", json=view(), headers={"Authorization": "Bearer second-key-abcdeX"})
        doc = c.get("/openapi.json").text
    assert "second-key" not in wrong.text
    assert TEST_KEY not in doc
    assert "second-key" not in doc
    assert '"HTTPBearer"' in doc
    for service in (limited_api, isolated_api):
        text = service.log_text()
        assert TEST_KEY not in text
        assert "second-key" not in text


def test_api_refuses_to_start_without_keys(profile: Profile, log_dir: Path, cassandra: Session) -> None:
    with pytest.raises(StackError, match="SLUICE_API_KEYS is empty"):
        start_api(profile, log_dir, name="api-nokeys", SLUICE_API_PORT=str(profile.api_port + 3), SLUICE_API_KEYS="")
