"""The ingest fast path (api/ingest.py) answers exactly as FastAPI's declared routes do.

Two APIs, one with ``SLUICE_API_FAST_INGEST`` on and one with it off, each publishing to its own Redis
database where no worker consumes, get the same requests: good, bad, unauthorised, hostile. Status, body and
the headers a client acts on must match, request by request; and the fast path must count what it answers in
the HTTP metrics, by route and status, as the instrumentator does for every other route."""

from __future__ import annotations

import gzip
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from cassandra.cluster import Session

from devstack import Profile
from sluice.metrics import Tally
from tests.support import AUTH, Service, booking, start_api, view
from tests.test_bad_input import CASES, JSON

#: Headers a client acts on; ``x-request-id`` is compared separately (a new id differs by design).
COMPARED = ("content-type", "retry-after", "www-authenticate")
REQUEST_ID = str(uuid.uuid4())


def _requests() -> list[tuple[str, str, dict[str, str], bytes]]:
    """(id, path, headers, body): every hostile body of tests/test_bad_input.py, and the other outcomes."""
    out = [(case_id, path, {"content-type": ctype} if ctype else {}, body) for case_id, path, body, ctype, *_ in CASES]
    single, first, second = view(), booking(), view()
    out += [
        ("single", "/v1/events", {"content-type": JSON}, orjson.dumps(single)),
        ("single again (duplicate)", "/v1/events", {"content-type": JSON}, orjson.dumps(single)),
        ("conflict", "/v1/events", {"content-type": JSON}, orjson.dumps({**single, "user_id": 8})),
        ("invalid", "/v1/events", {"content-type": JSON}, orjson.dumps(view(user_id="x"))),
        (
            "batch, one bad",
            "/v1/events/batch",
            {"content-type": JSON},
            orjson.dumps({"events": [first, view(listing_id=-1), second]}),
        ),
        ("batch, not an object", "/v1/events/batch", {"content-type": JSON}, b"[1]"),
        ("batch, empty", "/v1/events/batch", {"content-type": JSON}, b'{"events": []}'),
        ("gzip", "/v1/events", {"content-type": JSON, "content-encoding": "gzip"}, gzip.compress(orjson.dumps(view()))),
        ("no key", "/v1/events", {"content-type": JSON, "authorization": ""}, orjson.dumps(view())),
        ("wrong key", "/v1/events", {"content-type": JSON, "authorization": "Bearer nope"}, orjson.dumps(view())),
        ("basic, not bearer", "/v1/events/batch", {"content-type": JSON, "authorization": "Basic eDo="}, b"{}"),
        ("request id echoed", "/v1/events", {"content-type": JSON, "x-request-id": REQUEST_ID}, orjson.dumps(view())),
        (
            "request id not a uuid",
            "/v1/events",
            {"content-type": JSON, "x-request-id": "not-a-uuid"},
            orjson.dumps(view()),
        ),
    ]
    return out


@pytest.fixture(scope="module")
def declared_api(cassandra: Session, profile: Profile, log_dir: Path) -> Iterator[Service]:
    """The fast path off: FastAPI's routes answer. Its own Redis database, where nothing consumes."""
    service = start_api(
        profile, log_dir, name="api-declared", SLUICE_API_PORT=str(profile.api_port + 5),
        SLUICE_REDIS_URL=f"redis://127.0.0.1:{profile.redis_port}/12", SLUICE_API_FAST_INGEST="false",
    )  # fmt: skip
    yield service
    service.stop()


def _answer(response: httpx.Response) -> tuple[int, Any, dict[str, str | None]]:
    return (
        response.status_code,
        response.json(),
        {name: response.headers.get(name) for name in COMPARED},
    )


def _http_counts(base_url: str) -> dict[tuple[str, str], float]:
    """sluice_http_requests_total by (handler, status), over every process of the stack."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "sluice_http_requests_total" and sample.labels.get("method") == "POST":
                key = (sample.labels["handler"], sample.labels["status"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def test_the_fast_path_answers_as_the_declared_routes_do(
    isolated_api: Service, declared_api: Service, redis_client: Any
) -> None:
    for db in (1, 12):  # each API's queue and marks start empty: both see the same events as new
        redis_client.execute_command("SELECT", db)
        redis_client.flushdb()
    redis_client.execute_command("SELECT", 0)
    requests = _requests()
    before = _http_counts(isolated_api.base_url)
    sent: dict[tuple[str, str], int] = {}
    with (
        httpx.Client(base_url=isolated_api.base_url, headers=AUTH, timeout=10) as fast,
        httpx.Client(base_url=declared_api.base_url, headers=AUTH, timeout=10) as declared,
    ):
        for case_id, path, headers, body in requests:
            got = [client.post(path, content=body, headers=headers) for client in (fast, declared)]
            assert _answer(got[0]) == _answer(got[1]), case_id
            ids = [response.headers.get("x-request-id") for response in got]
            assert all(ids), f"{case_id}: no X-Request-ID: {ids}"
            if headers.get("x-request-id") == REQUEST_ID:
                assert ids == [REQUEST_ID, REQUEST_ID], case_id
            else:
                assert ids[0] != ids[1], case_id  # made afresh, not a fixed value
            key = (path, str(got[0].status_code))
            sent[key] = sent.get(key, 0) + 2  # both APIs' processes share the test stack's metrics
    statuses = {status for _, status in sent}
    assert {"202", "400", "401", "409", "413", "415", "422"} <= statuses
    expected = {key: float(count) for key, count in sent.items()}
    # The scraped API adds its own counts before it answers; the other's arrive with its next flush
    # (sluice.metrics.Tally.FLUSH_S).
    deadline = time.monotonic() + 3 * Tally.FLUSH_S
    while True:
        after = _http_counts(isolated_api.base_url)
        moved = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in sent}
        if moved == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert moved == expected
