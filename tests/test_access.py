"""Access control: API keys on every /v1 route, a per-key rate limit, and no secret anywhere it leaks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cassandra.cluster import Session

from devstack import Profile, StackError
from tests.support import AUTH, TEST_KEY, Service, start_api, view


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
