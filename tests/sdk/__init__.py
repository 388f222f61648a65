"""What the SDK tests share (tests/test_sdk.py, tests/test_sdk_node.py): the calls they make, what each should
become, and the checks against the real stack."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import redis
from cassandra.cluster import Session

from devstack import PROJECT, Profile
from sluice import keys
from sluice.sdkmap import Request, derive_event_id
from tests.support import AUTH, TEST_KEY, service_env, stored_rows, wait_until

KEY_ID = hashlib.sha256(TEST_KEY.encode()).hexdigest()[:16]


@dataclass
class Call:
    """One SDK call: ``kind`` is track / page / identify / group / alias (PostHog: capture or its $ events)."""

    kind: str
    user: str | None = None
    name: str | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    anonymous_id: str | None = None
    #: What Sluice should store: the type and the fields (None: not stored, counted or rejected).
    stored: tuple[str, dict[str, Any]] | None = None
    #: The reason a rejected call is kept with (None: accepted).
    rejected: str | None = None
    timestamp: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC).replace(microsecond=250_000))

    def event_id(self, fmt: str) -> str:
        return derive_event_id({"messageId" if fmt == "segment" else "uuid": self.message_id},
                               Request(fmt, KEY_ID, dt.datetime.now(dt.UTC)))  # type: ignore[arg-type]  # fmt: skip


def calls(tag: int, *, posthog: bool = False) -> list[Call]:
    """Every kind of call once: mapped events of each type, counted calls, and two that cannot be mapped.
    ``tag`` keeps listings apart between runs (the listing id is ``tag`` and the next two)."""
    user = str(700 + tag)
    booking = {"listing_id": tag + 1, "check_in": "2026-12-10", "check_out": "2026-12-13", "guests": 2,
               "total_price": Decimal("449.70"), "currency": "EUR"}  # fmt: skip
    expected_booking = booking | {"total_price": "449.7"}  # Segment's SDK sends a Decimal as a float
    out = [
        Call("track", user, "Listing Viewed", {"listing_id": tag}, stored=("view", {"listing_id": tag})),
        # A messageId that is no UUID: stored under a UUID derived from it and the key.
        Call("track", user, "Listing Viewed", {"listing_id": tag, "plan": "pro"}, message_id=f"msg-{uuid.uuid4()}",
             stored=("view", {"listing_id": tag})),
        Call("track", user, "Booking Completed", booking, stored=("booking", expected_booking)),
        Call("track", user, "Listings Searched", {"listing_id": tag + 2, "query": "lake view", "result_count": 12},
             stored=("search", {"listing_id": tag + 2, "query": "lake view", "result_count": 12})),
        Call("track", user, "Listing Favourited", {"listing_id": tag}, rejected="unknown_name"),
        Call("track", "not-a-number", "Listing Viewed", {"listing_id": tag}, rejected="invalid_user_id"),
    ]  # fmt: skip
    if posthog:
        # PostHog's uuid must be a UUID (the SDK replaces others).
        out[1].message_id = str(uuid.uuid4())
        return [*out, Call("$set", user, properties={"plan": "pro"}), Call("alias", user, name="old-id")]
    return [
        *out,
        Call("page", user, "Listing Viewed", {"listing_id": tag}, stored=("view", {"listing_id": tag})),
        Call("track", None, "Listing Viewed", {"listing_id": tag}, anonymous_id="anon-1", rejected="anonymous"),
        Call("identify", user, properties={"plan": "pro"}),
        Call("group", user, name="team-1"),
        Call("alias", user, name="old-id"),
    ]


def check_stored(client: httpx.Client, cassandra: Session, fmt: str, sent: list[Call]) -> tuple[int, int]:
    """Every call that should be stored is, once in both tables, with its fields; nothing else is. Returns
    (stored, rejected) counts."""
    stored = [c for c in sent if c.stored]
    for c in stored:
        eid = c.event_id(fmt)
        wait_until(lambda e=eid: stored_rows(cassandra, e) == (1, 1), 30, f"{c.name} ({eid}) stored once")
        answer = client.get(f"/v1/events/{eid}").json()
        assert answer["status"] == "stored", answer
        kind, fields = c.stored  # type: ignore[misc]
        event = answer["event"]
        assert event["type"] == kind
        assert event["user_id"] == int(c.user or 0)
        assert event["occurred_at"] == c.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert {k: event[k] for k in fields} == fields, event
    for c in sent:
        if not c.stored:
            assert stored_rows(cassandra, c.event_id(fmt)) == (0, 0), c
    return len(stored), sum(1 for c in sent if c.rejected)


def check_rejections(db: redis.Redis, fmt: str, sent: list[Call]) -> None:
    """Every rejected call is a dead letter of kind sdk_unmapped, with the reason; the write key is not in it."""
    for c in sent:
        raw = db.hget(keys.DEAD_LETTERS, c.event_id(fmt))
        if c.rejected is None:
            assert raw is None or json.loads(raw)["kind"] != "sdk_unmapped", c
            continue
        assert raw is not None, f"{c.name} ({c.rejected}) is not kept"
        record = json.loads(raw)
        assert record["kind"] == "sdk_unmapped"
        assert record["sdk"]["format"] == fmt
        assert record["sdk"]["key_id"] == KEY_ID
        assert TEST_KEY not in raw.decode()


def metric(client: httpx.Client, name: str, /, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if not line.startswith(name + "{"):
            continue
        sample_labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def dlq(profile: Profile, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``sluice dlq ...`` on the test stack's Redis (database 0, where the session's worker consumes)."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("sluice")), "dlq", *args],
        env={**os.environ, **service_env(profile), **env}, cwd=PROJECT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


__all__ = ["AUTH", "KEY_ID", "TEST_KEY", "Call", "calls", "check_rejections", "check_stored", "dlq", "metric"]
