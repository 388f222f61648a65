"""Segment's Node SDK (@segment/analytics-node, from npm: tests/sdk/node/), unmodified, in its default batching
mode, against the real stack: the same checks as the Python SDKs' (tests/test_sdk.py). It sends no gzip.

``make pytest`` installs it first (``make sdk-node``); without ``node`` on the machine these tests skip."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from cassandra.cluster import Session

from tests.sdk import KEY_ID, TEST_KEY, Call, calls, check_rejections, check_stored, metric
from tests.support import Service, stored_rows, wait_until
from tests.test_sdk import limited_api as limited_api  # the same rate-limited API (a module fixture)

NODE_DIR = Path(__file__).parent / "sdk" / "node"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed: the Node SDK's tests need Node 18+"),
]


def run_node(host: str, sent: list[Call]) -> dict[str, Any]:
    """Send through the Node SDK; what it reported (errors, the bodies it posted, the statuses it got)."""
    if not (NODE_DIR / "node_modules" / "@segment" / "analytics-node").is_dir():
        pytest.fail("the Node SDK is not installed: run `make sdk-node` (make pytest does)")
    spec = {"host": host, "writeKey": TEST_KEY, "calls": [_params(c, n) for n, c in enumerate(sent)]}
    assert NODE is not None
    out = subprocess.run([NODE, "send.js"], cwd=NODE_DIR, input=json.dumps(spec), capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.stdout)
    # The SDK picks its own messageIds ("node-next-<ms>-<uuid>", not UUIDs) where a call gives none: read
    # them from what it sent (each call is tagged with its index in a context field).
    for request in report["requests"]:
        for msg in json.loads(request["body"])["batch"]:
            sent[int(msg["context"]["seq"])].message_id = msg["messageId"]
    return report


def _params(call: Call, seq: int) -> dict[str, Any]:
    params: dict[str, Any] = {"kind": call.kind, "timestamp": call.timestamp.isoformat(), "context": {"seq": seq}}
    if call.user is not None:
        params["userId"] = call.user
    if call.anonymous_id is not None:
        params["anonymousId"] = call.anonymous_id
    if call.kind == "track":
        params |= {"event": call.name, "properties": _plain(call.properties)}
    elif call.kind == "page":
        params |= {"name": call.name, "properties": _plain(call.properties)}
    elif call.kind == "identify":
        params["traits"] = call.properties
    elif call.kind == "group":
        params["groupId"] = call.name
    else:
        params["previousId"] = call.name
    if seq % 2:  # half with the SDK's own messageIds, half with UUIDs of ours
        params["messageId"] = call.message_id
    return params


def _plain(properties: dict[str, Any]) -> dict[str, Any]:
    # JavaScript has no decimals: a price is a number.
    return {k: float(v) if k == "total_price" else v for k, v in properties.items()}


def test_the_node_sdk_stores_every_mapped_event_once_and_keeps_the_rest(
    api: Service, worker: Service, client: httpx.Client, cassandra: Session, redis_client: redis.Redis
) -> None:
    sent = calls(random.randrange(10**6, 10**9))
    report = run_node(api.base_url, sent)
    assert report["errors"] == [], report["errors"]
    assert set(report["statuses"]) == {200}
    stored, rejected = check_stored(client, cassandra, "segment", sent)
    check_rejections(redis_client, "segment", sent)
    print(f"node: sent {len(sent)}, stored {stored}, rejected {rejected}")

    # The SDK's retry: the batch it posted, posted again as it was (same bytes and headers): stored once.
    first = report["requests"][0]
    again = httpx.post(first["url"], content=first["body"], headers=first["headers"])
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["accepted"] == sum(1 for c in sent if not c.rejected)
    assert body["rejected"] == rejected
    check_stored(client, cassandra, "segment", sent)
    assert metric(client, "sluice_sdk_messages_total", key=KEY_ID, format="segment", call="identify") >= 2


def test_the_node_sdk_honours_a_429(
    limited_api: Service, worker: Service, client: httpx.Client, cassandra: Session
) -> None:
    tag = random.randrange(10**6, 10**9)
    # Batches of 15 (the SDK's default) against 40 events/s: the third batch of a second gets 429.
    sent = [Call("track", "5", "Listing Viewed", {"listing_id": tag}, message_id=str(uuid.uuid4()),
                 stored=("view", {"listing_id": tag})) for _ in range(75)]  # fmt: skip
    report = run_node(limited_api.base_url, sent)
    assert report["errors"] == [], report["errors"]
    assert 429 in report["statuses"], report["statuses"]
    for event_id in [c.event_id("segment") for c in sent]:
        wait_until(lambda e=event_id: stored_rows(cassandra, e) == (1, 1), 30, "every event stored once")
