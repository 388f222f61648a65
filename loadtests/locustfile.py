"""Realistic Sluice traffic for locust, with the pass/fail thresholds enforced through locust's own exit code.

Run it through ``sluice loadtest`` (``make loadtest``), which also starts a stack if none
answers and checks afterwards that every accepted event is stored exactly once. Directly::

    locust -f loadtests/locustfile.py --headless -u 50 -r 500 -t 60s --host http://127.0.0.1:8000 \\
        --target-rps 100 --p99-ms 100

Traffic: :class:`EventUser` browses (about nine single ``view`` events to one ``booking``), for end users drawn
from a large pool who each view a few listings in a row; listings follow a Zipf-like popularity.
:class:`BatchUser` posts batches of the same mix, like a service forwarding what it buffered. Every event has
a fresh ``event_id``. Every user is paced with ``constant_throughput`` so that all users together make
``--target-rps`` requests per second: a fixed arrival rate, as long as a request takes less than the pacing
interval (``users / target-rps`` seconds). Each user starts at a random point of its interval, so arrivals
are spread out instead of coming in bursts of one request per user.

Each accepted event (202, status ``accepted``) is appended to ``<accepted-dir>/accepted-<pid>.csv``
(``event_id,listing_id,occurred_at epoch ms``) for the exactly-once check. When locust quits, the
``quitting`` listener compares the run with the thresholds, prints one line per threshold, writes a JSON
summary and sets ``environment.process_exit_code`` (1 if any threshold failed), as locust's documentation
describes for CI use.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import gevent  # type: ignore[import-untyped]
import orjson
from locust import FastHttpUser, constant_throughput, events, task
from locust.argument_parser import LocustArgumentParser
from locust.contrib.fasthttp import ResponseContextManager
from locust.env import Environment
from locust.event import EventHook
from locust.runners import MasterRunner, WorkerRunner

from loadtests.common import BUILD, Zipf, accepted_line, make_event, resolve_api_key

F = TypeVar("F", bound=Callable[..., None])


def _on(hook: EventHook) -> Callable[[F], F]:
    """``@_on(events.init)``: locust's ``add_listener``, typed."""

    def register(handler: F) -> F:
        hook.add_listener(handler)  # type: ignore[no-untyped-call]
        return handler

    return register


def _fail(response: ResponseContextManager, reason: str) -> None:
    response.failure(reason)  # type: ignore[no-untyped-call]


#: Set from the command line in ``on_init``.
_zipf = Zipf(1000)
_user_pool = 2_000_000
_batch_size = 20
#: Seconds between two requests of one user (users / target rate).
_interval_s = 1.0
_auth: dict[str, str] = {}
#: time.monotonic() at test start and stop: the window the achieved rate is measured over.
_window: dict[str, float] = {}


@_on(events.init_command_line_parser)
def _arguments(parser: LocustArgumentParser) -> None:
    group = parser.add_argument_group("Sluice", "traffic shape and pass/fail thresholds")
    group.add_argument("--target-rps", type=float, default=100.0, help="requests per second of all users together")
    group.add_argument("--p99-ms", type=float, default=100.0, help="fail unless p99 latency is under this")
    group.add_argument("--min-rate-ratio", type=float, default=0.99, help="fail below this share of --target-rps")
    group.add_argument("--users-batch", type=int, default=1, help="how many of the users post batches")
    group.add_argument("--batch-size", type=int, default=20, help="events per batch request")
    group.add_argument("--listings", type=int, default=100_000, help="listings, drawn with Zipf-like popularity")
    group.add_argument(
        "--listing-base",
        type=int,
        default=0,
        help="added to every listing id: a base of its own per run keeps the check to this run's rows",
    )
    group.add_argument("--zipf-s", type=float, default=1.07, help="Zipf exponent of listing popularity")
    group.add_argument("--user-pool", type=int, default=2_000_000, help="distinct end users")
    group.add_argument("--accepted-dir", default=str(BUILD / "loadtest" / "accepted"), help="accepted ids go here")
    group.add_argument("--summary-file", default=str(BUILD / "loadtest" / "locust-summary.json"))
    group.add_argument("--progress-s", type=float, default=5.0, help="seconds between progress lines (0: none)")


class Recorder:
    """Accepted events of this process, appended to its own file (one file per locust process)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.buffer: list[str] = []
        self.count = 0

    def open(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / f"accepted-{os.getpid()}.jsonl"
        self.path.write_text("")

    def add(self, event: dict[str, Any], epoch_ms: int) -> None:
        self.buffer.append(accepted_line(event))
        self.count += 1
        if len(self.buffer) >= 1000:
            self.flush()

    def flush(self) -> None:
        if self.path is not None and self.buffer:
            with self.path.open("a") as f:
                f.writelines(self.buffer)
        self.buffer.clear()


recorder = Recorder()


class _SluiceUser(FastHttpUser):
    abstract = True
    # Replaced in on_init once the user count and target rate are known.
    wait_time = constant_throughput(1.0)
    # Fail fast rather than hang: a request slower than this is a failure anyway.
    network_timeout = 10.0
    connection_timeout = 5.0

    def on_start(self) -> None:
        self.rng = random.Random(os.urandom(16))
        self.user_id = 0
        self.session_left = 0
        # Users spawn within a fraction of a second, and constant_throughput keeps each user's phase: without
        # a random phase they would all fire in the same instant every interval (bursts of `users` requests)
        # rather than arrive spread out. Start each user at a random point of its interval, then restart
        # locust's pacing clock (the attributes constant_pacing keeps on the user) from there.
        gevent.sleep(self.rng.uniform(0.0, _interval_s))
        self._cp_last_run = time.perf_counter()
        self._cp_last_wait_time = 0.0

    def next_event(self, kind: str) -> tuple[dict[str, Any], int]:
        """An event of ``kind`` by the current end user, who views a few listings before another user comes."""
        if self.session_left <= 0:
            self.user_id = self.rng.randint(1, _user_pool)
            self.session_left = self.rng.randint(3, 15)
        self.session_left -= 1
        # Clients send a little after the fact: occurred_at is up to two seconds in the past.
        epoch_ms = int(time.time() * 1000) - self.rng.randint(0, 2000)
        event = make_event(str(uuid.uuid4()), kind, _zipf.listing(), self.user_id, epoch_ms, self.rng)
        return event, epoch_ms

    def post(self, path: str, name: str, events_ms: list[tuple[dict[str, Any], int]], body: dict[str, Any]) -> None:
        with self.client.post(
            path, data=orjson.dumps(body).decode(), headers=_auth, name=name, catch_response=True
        ) as response:
            _judge(response, events_ms)


def _judge(response: ResponseContextManager, events_ms: list[tuple[dict[str, Any], int]]) -> None:
    """A request counts as OK only if every event in it was accepted; accepted events are recorded."""
    if response.status_code != 202:
        _fail(response, f"HTTP {response.status_code}: {(response.text or '')[:200]}")
        return
    try:
        answer = orjson.loads(response.content or b"")
        results = answer["results"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        _fail(response, "202 without the expected body")
        return
    for (event, epoch_ms), result in zip(events_ms, results, strict=False):
        if result.get("status") == "accepted" and result.get("event_id") == event["event_id"]:
            recorder.add(event, epoch_ms)
    if answer.get("rejected", 0) or answer.get("accepted") != len(events_ms):
        _fail(response, f"{answer.get('rejected')} of {len(events_ms)} events rejected: {str(results)[:200]}")


class EventUser(_SluiceUser):
    """Someone browsing: single events, about nine views to one booking."""

    weight = 10

    @task(9)
    def view(self) -> None:
        event = self.next_event("view")
        self.post("/v1/events", "POST /v1/events (view)", [event], event[0])

    @task(1)
    def booking(self) -> None:
        event = self.next_event("booking")
        self.post("/v1/events", "POST /v1/events (booking)", [event], event[0])


class BatchUser(_SluiceUser):
    """A service forwarding what it buffered: batches of the same mix."""

    fixed_count = 1

    @task
    def batch(self) -> None:
        items = [self.next_event("booking" if self.rng.random() < 0.1 else "view") for _ in range(_batch_size)]
        self.post("/v1/events/batch", "POST /v1/events/batch", items, {"events": [event for event, _ in items]})


@_on(events.init)
def on_init(environment: Environment, **_: Any) -> None:
    global _zipf, _user_pool, _batch_size, _interval_s
    # gevent timers (locust's --run-time among them) count from the loop's cached clock, which is stale by
    # however long the imports took; refresh it, or a 60 s run would stop seconds early.
    gevent.get_hub().loop.update_now()
    options = environment.parsed_options
    if options is None:  # used as a library without options: keep the defaults
        return
    users = int(options.num_users or 1)
    if options.users_batch >= users:
        raise SystemExit(f"--users-batch ({options.users_batch}) must be below the user count ({users})")
    per_user = options.target_rps / users
    _interval_s = 1.0 / per_user
    EventUser.wait_time = constant_throughput(per_user)
    BatchUser.wait_time = constant_throughput(per_user)
    BatchUser.fixed_count = options.users_batch
    _zipf = Zipf(options.listings, options.zipf_s, base=options.listing_base)
    _user_pool = options.user_pool
    _batch_size = options.batch_size
    _auth["Authorization"] = f"Bearer {resolve_api_key(None)}"
    _auth["Content-Type"] = "application/json"
    if not isinstance(environment.runner, WorkerRunner):
        print(
            f"[loadtest] {users} users ({options.users_batch} posting batches of {options.batch_size}), "
            f"each paced at {per_user:.3f} requests/s: {options.target_rps:g} requests/s in all",
            flush=True,
        )


@_on(events.test_start)
def on_test_start(environment: Environment, **_: Any) -> None:
    _window["start"] = time.monotonic()
    options = environment.parsed_options
    recorder.open(options.accepted_dir if options else str(BUILD / "loadtest" / "accepted"))
    if options is not None and options.progress_s > 0 and not isinstance(environment.runner, WorkerRunner):
        gevent.spawn(_progress, environment, options.progress_s)


def _progress(environment: Environment, every: float) -> None:
    started = time.monotonic()
    while True:
        gevent.sleep(every)
        total = environment.stats.total
        print(
            f"[loadtest] {time.monotonic() - started:4.0f} s: {total.num_requests:,} requests "
            f"({total.total_rps:.1f}/s), {total.num_failures} failed, "
            f"p50 {total.get_response_time_percentile(0.5) or 0:.0f} ms, "
            f"p99 {total.get_response_time_percentile(0.99) or 0:.0f} ms"
            + ("" if isinstance(environment.runner, MasterRunner) else f", {recorder.count:,} events accepted"),
            flush=True,
        )


@_on(events.test_stop)
def on_test_stop(environment: Environment, **_: Any) -> None:
    _window["stop"] = time.monotonic()
    recorder.flush()


@_on(events.quitting)
def on_quitting(environment: Environment, **_: Any) -> None:
    recorder.flush()
    options = environment.parsed_options
    if options is None or isinstance(environment.runner, WorkerRunner):
        return
    total = environment.stats.total
    exceptions = len(environment.runner.exceptions) if environment.runner else 0
    # Requests over the measured window (locust's total_rps divides by first-to-last request, which counts
    # one request per user too many for a paced run).
    elapsed = _window.get("stop", time.monotonic()) - _window.get("start", time.monotonic())
    rate = total.num_requests / elapsed if elapsed > 0 else 0.0
    p99 = float(total.get_response_time_percentile(0.99) or 0.0)
    need_rate = options.min_rate_ratio * options.target_rps
    checks = [
        ("rate", rate >= need_rate, f"achieved {rate:.1f} requests/s; needs >= {need_rate:.1f} "
                                    f"({options.min_rate_ratio:.0%} of {options.target_rps:g})"),
        ("failures", total.num_requests > 0 and total.num_failures == 0 and exceptions == 0,
         f"{total.num_failures} of {total.num_requests} requests failed, {exceptions} user errors; needs none"),
        ("p99", 0 < p99 < options.p99_ms, f"p99 latency {p99:.0f} ms; needs < {options.p99_ms:g} ms"),
    ]  # fmt: skip
    for name, ok, text in checks:
        print(f"[loadtest] {'PASS' if ok else 'FAIL'} {name}: {text}", flush=True)
    summary = {
        "target_rps": options.target_rps,
        "achieved_rps": round(rate, 2),
        "window_s": round(elapsed, 2),
        "requests": total.num_requests,
        "failures": total.num_failures,
        "user_errors": exceptions,
        "p50_ms": total.get_response_time_percentile(0.5),
        "p95_ms": total.get_response_time_percentile(0.95),
        "p99_ms": p99,
        "max_ms": total.max_response_time,
        "p99_bound_ms": options.p99_ms,
        "events_accepted_by_master": recorder.count,
        "checks": {name: {"pass": ok, "detail": text} for name, ok, text in checks},
        "endpoints": {
            entry.name: {
                "requests": entry.num_requests,
                "failures": entry.num_failures,
                "rps": round(entry.total_rps, 2),
                "p50_ms": entry.get_response_time_percentile(0.5),
                "p99_ms": entry.get_response_time_percentile(0.99),
            }
            for entry in environment.stats.entries.values()
        },
        "errors": [
            {"name": err.name, "error": str(err.error)[:300], "occurrences": err.occurrences}
            for err in environment.stats.errors.values()
        ],
    }
    Path(options.summary_file).parent.mkdir(parents=True, exist_ok=True)
    Path(options.summary_file).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    environment.process_exit_code = 0 if all(ok for _, ok, _ in checks) else 1
