"""Content-Encoding: gzip request bodies: accepted, with the inflated size capped while it inflates."""

from __future__ import annotations

import gzip
import time
import zlib

import httpx
import orjson
import redis

from sluice import keys
from tests.support import view

GZIP = {"content-type": "application/json", "content-encoding": "gzip"}


def test_gzip_batch_is_accepted(isolated_client: httpx.Client, isolated_queue: redis.Redis) -> None:
    events = [view() for _ in range(200)]
    body = gzip.compress(orjson.dumps({"events": events}))
    response = isolated_client.post("/v1/events/batch", content=body, headers=GZIP)
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 200
    assert isolated_queue.llen(keys.EVENTS_QUEUE) == 1


def test_gzip_bomb_is_refused_cheaply(isolated_client: httpx.Client, isolated_queue: redis.Redis) -> None:
    # 1 GiB of zeros behind a JSON prefix compresses to about 1 MiB; 64 MiB of it to ~64 KiB.
    squeezer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = squeezer.compress(b'{"events": ["') + squeezer.compress(b"0" * (64 * 1024 * 1024)) + squeezer.flush()
    assert len(bomb) < 200_000
    started = time.perf_counter()
    response = isolated_client.post("/v1/events/batch", content=bomb, headers=GZIP)
    elapsed = time.perf_counter() - started
    assert response.status_code == 413
    assert "decompressed request body exceeds" in response.json()["error"]["message"]
    # Inflating stops at the limit (1 MiB), far from the 64 MiB the bomb holds.
    assert elapsed < 2.0, elapsed
    assert isolated_queue.llen(keys.EVENTS_QUEUE) == 0


def test_corrupt_or_truncated_gzip_is_400(isolated_client: httpx.Client, isolated_queue: redis.Redis) -> None:
    good = gzip.compress(orjson.dumps(view()))
    for body in (b"not gzip at all", good[: len(good) // 2]):
        response = isolated_client.post("/v1/events", content=body, headers=GZIP)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "malformed_gzip"
    assert isolated_queue.llen(keys.EVENTS_QUEUE) == 0


def test_other_encodings_are_415(isolated_client: httpx.Client) -> None:
    response = isolated_client.post(
        "/v1/events",
        content=orjson.dumps(view()),
        headers={"content-type": "application/json", "content-encoding": "br"},
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_content_encoding"
