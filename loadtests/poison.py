"""Malformed messages pushed straight onto the queue (``LPUSH sluice.events``), as a broken producer or a hand on
redis-cli might, and the check that each became a dead letter holding its exact bytes.

Used by ``make chaos`` (loadtests/chaos.py): while the faults and the load run, :class:`PoisonProducer` pushes
one message at a time, drawn from :data:`SHAPES`, each made unique by a nonce so that its dead letter can be
found by its bytes. A push that Redis confirmed is *sent*; one that raised (Redis killed meanwhile) may or may
not have landed and is only counted as *uncertain*. After the drain, :func:`check` reads every dead letter:
each sent message must be there (else *lost*), and none may be anywhere else (none carries events, so the
exactly-once checker would flag any row one of them produced as unexpected).
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from sluice import keys, message
from sluice.deadletters import raw_bytes


def envelope(nonce: str, **changes: Any) -> dict[str, Any]:
    """A valid envelope of an empty batch (so nothing it could produce is ever stored), then changed."""
    envelope: dict[str, Any] = orjson.loads(message.build([], accepted_at=time.time(), request_ids=[nonce]).payload)
    for path, value in changes.items():
        *parents, name = path.split("__")
        target = envelope
        for parent in parents:
            target = target[parent]
        target[name] = value
    return envelope


def _truncated(nonce: str, rng: random.Random) -> bytes:
    whole = orjson.dumps(envelope(nonce))
    return whole[: rng.randint(len(whole) // 4, len(whole) - 2)]


#: Every kind of malformed message, by name: the shapes issue 19 found stopping the worker, and more.
SHAPES: dict[str, Callable[[str, random.Random], bytes]] = {
    "not_json": lambda n, _: b'{"not": json, "nonce": "' + n.encode() + b'"',
    "truncated": _truncated,
    "not_utf8": lambda n, _: b"\xff\xfe" + orjson.dumps(envelope(n)),
    "json_list": lambda n, _: orjson.dumps([1, 2, n]),
    "not_an_envelope": lambda n, _: orjson.dumps({"task": message.WRITE_EVENTS, "args": [], "nonce": n}),
    "object_body": lambda n, _: orjson.dumps(envelope(n, body=orjson.dumps({"events": [], "n": n}).decode())),
    "body_not_a_string": lambda n, _: orjson.dumps(envelope(n, body={"events": [], "n": n})),
    "bad_base64": lambda n, _: orjson.dumps(envelope(n, properties__body_encoding="base64", body="%%%" + n)),
    "bad_eta": lambda n, _: orjson.dumps(envelope(n, headers__eta="tomorrow " + n)),
    "task_name_a_list": lambda n, _: orjson.dumps(envelope(n, headers__task=["sluice.write_events", n])),
    # Rarer (see PoisonProducer): a megabyte that is not JSON.
    "huge": lambda n, _: n.encode() + b"x" * (1024 * 1024),
}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class PoisonProducer:
    """Pushes a malformed message every ``every_s`` seconds (about), until :meth:`stop`."""

    client: redis.Redis
    rng: random.Random
    every_s: float = 2.0
    sent: dict[str, str] = field(default_factory=dict)  # digest -> shape
    uncertain: set[str] = field(default_factory=set)
    by_shape: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="poison", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        names = [name for name in SHAPES if name != "huge"]
        while not self._stop.wait(self.rng.uniform(0.5, 1.5) * self.every_s):
            shape = "huge" if self.rng.random() < 0.05 else self.rng.choice(names)
            data = SHAPES[shape](uuid.uuid4().hex, self.rng)
            digest = _digest(data)
            try:
                self.client.lpush(keys.EVENTS_QUEUE, data)
            except redis.RedisError:
                self.uncertain.add(digest)  # Redis killed meanwhile: it may or may not have landed
                continue
            self.sent[digest] = shape
            self.by_shape[shape] += 1


@dataclass
class PoisonReport:
    sent: int
    uncertain: int
    dead_lettered: int
    lost: list[str]
    #: Dead-lettered more than once (a worker killed between the record and the acknowledgement): not a loss.
    dead_lettered_twice: int
    by_shape: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        return {"sent": self.sent, "uncertain": self.uncertain, "dead_lettered": self.dead_lettered,
                "lost": len(self.lost), "dead_lettered_twice": self.dead_lettered_twice,
                "by_shape": self.by_shape}  # fmt: skip


def check(client: redis.Redis, producer: PoisonProducer) -> PoisonReport:
    """Each message the producer sent must be a dead letter holding exactly its bytes."""
    found: Counter[str] = Counter()
    for _, value in client.hscan_iter(keys.DEAD_LETTERS, count=500):
        data = raw_bytes(orjson.loads(value).get("event"))
        if data is not None:
            found[_digest(data)] += 1
    sent = producer.sent
    lost = sorted(f"{shape} {digest[:16]}" for digest, shape in sent.items() if not found[digest])
    return PoisonReport(
        sent=len(sent),
        uncertain=len(producer.uncertain),
        dead_lettered=sum(1 for digest in sent if found[digest]),
        lost=lost,
        dead_lettered_twice=sum(1 for digest in sent if found[digest] > 1),
        by_shape=dict(producer.by_shape),
    )
