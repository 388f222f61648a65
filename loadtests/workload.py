"""A client workload that keeps a history: open-loop singles, batches and gzip bodies, unknowns retried.

Used by the fault tests (``tests/history.py``) and the chaos run. Every request is recorded (time, ids,
attempt, status, outcome) and every event's outcome goes into a :class:`~loadtests.checker.Ledger`:

- 202: each event whose result says "accepted" is accepted; "rejected" ones are refused;
- 409 (``conflict``), 4xx, 503 (``queue_full``/``queue_unavailable``), 429, a refused connection: refused,
  nothing was queued;
- 504 (``queue_timeout``), a timeout, a reset or half-answered connection, a 500: unknown. The request is
  sent again with the same ids and the same bodies (after ``Retry-After`` or ``retry_every``) until an answer
  says what happened, within a budget of attempts and a deadline. A definite refusal of a retry does not
  resolve an earlier unknown attempt (that one may have queued the events), so it is retried too.

Listings are unique to the workload (a random base), so the checker can scan their partitions for rows
that should not be there.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from loadtests.checker import Ledger, Outcome
from loadtests.common import make_event

#: Transport errors that mean the request never reached the API.
NOT_SENT = ("connect_error", "ConnectTimeout", "PoolTimeout")


@dataclass
class Failure:
    """A fresh request's definite refusal (what the fault tests assert on)."""

    event_id: str
    status: int
    code: str
    retry_after: str | None
    seconds: float
    sent_at: float


@dataclass
class Job:
    """One request's events, sent again as they were until its outcome is known."""

    kind: str  # "single", "batch", "gzip" (a gzip batch), "conflict" (a single with another body)
    events: list[dict[str, Any]]
    attempts: int = 0
    unknown_before: bool = False


@dataclass
class Mix:
    """Shares of each kind of request (weights) and the batch sizes."""

    single: float = 1.0
    batch: float = 0.0
    gzip: float = 0.0
    #: Re-posts of an accepted id with another body (the API must answer 409): a share of requests.
    conflict: float = 0.0
    batch_min: int = 2
    batch_max: int = 20


@dataclass
class Workload:
    base_url: str
    api_key: str
    rate: float = 100.0
    mix: Mix = field(default_factory=Mix)
    listings: int = 97
    timeout: float = 3.0
    retry_every: float = 0.5
    #: Attempts per request at most, and how long after ``stop()`` unknowns are still retried.
    max_attempts: int = 200
    retry_deadline_s: float = 60.0
    seed: int | None = None
    ledger: Ledger = field(default_factory=Ledger)
    #: Every request: monotonic time, kind, attempt, ids, status, outcome, error code, seconds.
    requests: list[dict[str, Any]] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    failed: dict[str, Failure] = field(default_factory=dict)
    retries: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.base = self.rng.randrange(10**12, 9 * 10**12)
        self.listing_ids = [self.base + i for i in range(self.listings)]
        self.ledger.listings.update(self.listing_ids)
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._stopped_at: float | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="workload", daemon=True)
        self._accepted: list[dict[str, Any]] = []

    # --- control -----------------------------------------------------------------------------------------
    def __enter__(self) -> Workload:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> Ledger:
        """Stop sending new requests; wait until every unknown outcome is resolved or the retry deadline."""
        self._stopped_at = time.monotonic()
        self._stop.set()
        self._thread.join(timeout=self.retry_deadline_s + self.timeout + 30)
        return self.ledger

    @property
    def unresolved(self) -> int:
        return len(self.ledger.unresolved)

    def snapshot(self) -> tuple[Counter[str], dict[str, int]]:
        """Outcomes so far and the ledger's counts, read while no answer is being recorded (progress lines)."""
        with self._lock:
            return Counter(self.outcomes), self.ledger.counts()

    # --- events ------------------------------------------------------------------------------------------
    def _event(self) -> dict[str, Any]:
        # A little after the fact, like real clients: occurred_at up to two seconds in the past.
        epoch_ms = int(time.time() * 1000) - self.rng.randint(0, 2000)
        kind = "booking" if self.rng.random() < 0.1 else "view"
        eid = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        listing = self.rng.choice(self.listing_ids)
        return make_event(eid, kind, listing, self.rng.randint(1, 10**6), epoch_ms, self.rng)

    def _next_job(self) -> Job:
        m = self.mix
        kinds, weights = ["single", "batch", "gzip", "conflict"], [m.single, m.batch, m.gzip, m.conflict]
        kind = self.rng.choices(kinds, weights)[0]
        if kind == "conflict":
            if not self._accepted:
                kind = "single"
            else:
                first = self.rng.choice(self._accepted)
                # Another body for a known id, later in time (so that, were it stored, it would win in Cassandra).
                at = first["occurred_at"]
                other = dict(first, user_id=first["user_id"] + 1, occurred_at=at[:20] + "999" + at[23:])
                if other["occurred_at"] == at:
                    other["user_id"] += 1
                return Job("conflict", [other])
        if kind == "single":
            return Job("single", [self._event()])
        return Job(kind, [self._event() for _ in range(self.rng.randint(m.batch_min, m.batch_max))])

    # --- the loop ----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        # No cap on connections: on an overloaded machine, requests that failed mid-flight can leave pooled
        # connections unusable (a fault test saw every later request end in PoolTimeout, 60 s long, with a
        # fresh API answering); the open loop's 500-request cap bounds the connections anyway.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        headers = {"Authorization": f"Bearer {self.api_key}"}
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout, limits=limits) as c:
            pending: set[asyncio.Task[None]] = set()
            sent = 0
            while not self._stop.is_set():
                # Open loop: requests go out on schedule whether or not earlier ones were answered.
                due = int((time.monotonic() - self.started) * self.rate)
                while sent < due and len(pending) < 500:
                    task = asyncio.create_task(self._drive(c, self._next_job()))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    sent += 1
                await asyncio.sleep(0.005)
            if pending:
                await asyncio.wait(pending)

    def _give_up(self) -> bool:
        if self._stopped_at is None:
            return False
        return time.monotonic() > self._stopped_at + self.retry_deadline_s

    async def _drive(self, client: httpx.AsyncClient, job: Job) -> None:
        while True:
            outcome, wait = await self._attempt(client, job)
            if outcome == "settled":
                return
            if job.attempts >= self.max_attempts or self._give_up():
                return  # the events stay unresolved in the ledger: the caller bounds and reports them
            self.retries += 1
            await asyncio.sleep(wait)

    async def _attempt(self, client: httpx.AsyncClient, job: Job) -> tuple[str, float]:
        """One send of ``job``: ("settled", 0) when its outcome is known, else ("retry", seconds to wait)."""
        job.attempts += 1
        began = time.monotonic()
        single = len(job.events) == 1 and job.kind in ("single", "conflict")
        body = orjson.dumps(job.events[0] if single else {"events": job.events})
        headers = {"Content-Type": "application/json"}
        if job.kind == "gzip":
            body, headers["Content-Encoding"] = gzip.compress(body, compresslevel=1), "gzip"
        path = "/v1/events" if single else "/v1/events/batch"
        status, code, retry_after, answer = 0, "", None, None
        try:
            response = await client.post(path, content=body, headers=headers)
            status = response.status_code
            retry_after = response.headers.get("retry-after")
            try:
                answer = response.json() if response.content else None
            except ValueError:
                answer = None
            if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
                code = str(answer["error"].get("code", ""))
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # No connection was made (or none was free): nothing reached the API, definitely not queued.
            code = "connect_error" if isinstance(exc, httpx.ConnectError) else type(exc).__name__
        except httpx.HTTPError as exc:
            code = type(exc).__name__
        seconds = time.monotonic() - began

        per_event: list[Outcome]
        if status == 202 and isinstance(answer, dict):
            results = answer.get("results", [])
            by_id = {r.get("event_id"): r.get("status") for r in results if isinstance(r, dict)}
            per_event = ["accepted" if by_id.get(e["event_id"]) == "accepted" else "refused" for e in job.events]
        elif status == 504 or (status >= 500 and status != 503) or (status == 0 and code not in NOT_SENT):
            per_event = ["unknown"] * len(job.events)
        else:  # 4xx, 409, 503, a refused connection: nothing was queued
            per_event = ["refused"] * len(job.events)
        settled = "unknown" not in per_event and not ("refused" in per_event and job.unknown_before)
        if "unknown" in per_event:
            job.unknown_before = True
        with self._lock:
            for event, outcome in zip(job.events, per_event, strict=True):
                self.ledger.record(event, outcome)
                if outcome == "accepted" and job.kind != "conflict":
                    self._accepted.append(event)
            label = str(status) if status else code
            self.outcomes[label if job.attempts == 1 else f"retry {label}"] += 1
            if job.attempts == 1 and status != 202 and per_event[0] == "refused":
                for e in job.events:
                    self.failed[e["event_id"]] = Failure(e["event_id"], status, code, retry_after, seconds, began)
            self.requests.append({
                "t": round(began - self.started, 3), "kind": job.kind, "attempt": job.attempts,
                "ids": [e["event_id"] for e in job.events], "status": status, "code": code,
                "outcome": per_event[0] if len(set(per_event)) == 1 else "mixed",
                "accepted": per_event.count("accepted"), "seconds": round(seconds, 3),
            })  # fmt: skip
        if settled:
            return "settled", 0.0
        wait = self.retry_every
        if retry_after:
            with contextlib.suppress(ValueError):
                wait = max(wait, min(float(retry_after), 5.0))
        return "retry", wait
