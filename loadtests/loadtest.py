"""``make loadtest``: realistic traffic at a fixed rate, then proof that every accepted event is stored once.

    .venv/bin/sluice loadtest [--rate 100] [--duration 60] [--p99-ms 100] [--host URL] ...

1. Uses the stack answering on 127.0.0.1:8000, or starts one (and stops it at the end, also on Ctrl-C).
2. After ``--warmup-s`` seconds of un-counted traffic, runs ``locust --headless`` on
   ``loadtests/locustfile.py`` at ``--rate`` requests/s for ``--duration`` s; locust's ``quitting``
   listener enforces the HTTP thresholds (rate >= 99% of target, no failed request, p99 < ``--p99-ms``)
   through its exit code.
3. Waits until the queue has drained (``sluice.events`` empty, nothing unacknowledged), then checks in
   Cassandra that each accepted event is stored exactly once (``events_by_id`` and ``events_by_listing_day``).

Exits 0 only if every threshold passed; one line per threshold says which failed. Writes locust's HTML
report, the accepted ids and ``summary.json`` under ``build/loadtest/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import orjson
import redis
import uvloop

from devstack import StackError
from loadtests.benchparts import EventFactory
from loadtests.common import (
    BUILD,
    DEFAULT_HOST,
    PROJECT,
    code_state,
    command_line,
    ignore_signals,
    loopback_target,
    raise_on_sigterm,
    resolve_api_key,
    say,
)
from loadtests.loadgen import Result, generate
from loadtests.stack import REDIS_URL, Stack, StackConfig
from loadtests.verify import Checker, dead_letters, queue_depth, read_accepted, wait_drained
from sluice import keys

OUT = BUILD / "loadtest"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sluice loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rate", type=float, default=100.0, help="requests per second, all users together (100)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (60)")
    p.add_argument("--p99-ms", type=float, default=100.0, help="p99 latency must be under this (100 ms)")
    p.add_argument("--min-rate-ratio", type=float, default=0.99, help="achieved/target rate must reach this (0.99)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"the API, on this machine only ({DEFAULT_HOST})")
    p.add_argument("--users", type=int, default=None, help="locust users (default: one per 2 requests/s)")
    p.add_argument("--users-batch", type=int, default=1, help="how many of the users post batches (1)")
    p.add_argument("--batch-size", type=int, default=20, help="events per batch request (20)")
    p.add_argument("--listings", type=int, default=100_000, help="listings, Zipf-like popularity (100,000)")
    p.add_argument("--listing-base", type=int, default=None, help="first listing id (default: random, unique)")
    p.add_argument("--user-pool", type=int, default=2_000_000, help="distinct end users (2,000,000)")
    p.add_argument("--processes", type=int, default=1, help="locust processes (--processes; 1)")
    p.add_argument("--warmup-s", type=float, default=5.0, help="un-counted warm-up at --rate before locust (5)")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to wait for the queue to drain")
    p.add_argument("--api-key", default=None, help="else $SLUICE_LOADTEST_API_KEY, .data/dev/api-key, 'dev-key'")
    p.add_argument("--api-workers", type=int, default=None, help="SLUICE_API_WORKERS when starting a stack")
    p.add_argument("--worker-concurrency", type=int, default=None, help="SLUICE_WORKER_CONCURRENCY when starting")
    p.add_argument("--worker-procs", type=int, default=1, help="`sluice worker` processes when starting (1)")
    return p.parse_args(argv)


def locust_argv(args: argparse.Namespace, users: int) -> list[str]:
    return [
        sys.executable, "-m", "locust",
        "-f", str(PROJECT / "loadtests" / "locustfile.py"),
        "--headless", "--only-summary",
        "--host", args.host,
        "--users", str(users),
        # Everyone at once: the rate is the target from the first second.
        "--spawn-rate", str(max(users * 10, 1)),
        "--run-time", f"{math.ceil(args.duration)}s",
        "--stop-timeout", "10",
        "--html", str(OUT / "report.html"),
        "--target-rps", str(args.rate),
        "--p99-ms", str(args.p99_ms),
        "--min-rate-ratio", str(args.min_rate_ratio),
        "--users-batch", str(args.users_batch),
        "--batch-size", str(args.batch_size),
        "--listings", str(args.listings),
        "--user-pool", str(args.user_pool),
        "--accepted-dir", str(OUT / "accepted"),
        # Listings of this run only: the check scans their partitions, and any row there must be this run's.
        "--listing-base", str(args.listing_base),
        "--summary-file", str(OUT / "locust-summary.json"),
        *(["--processes", str(args.processes)] if args.processes > 1 else []),
    ]  # fmt: skip


def run_locust(args: argparse.Namespace, api_key: str) -> int:
    users = args.users or max(args.users_batch + 1, math.ceil(args.rate / 2))
    argv = locust_argv(args, users)
    say(f"running locust for {args.duration:g} s at {args.rate:g} requests/s ({users} users) against {args.host}")
    # The key travels in the environment, not on the command line where `ps` would show it.
    env = {**os.environ, "SLUICE_LOADTEST_API_KEY": api_key, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(PROJECT)}
    proc = subprocess.Popen(argv, cwd=PROJECT, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=args.duration + 120)
    except subprocess.TimeoutExpired:
        say("locust did not finish in time; stopping it")
        proc.send_signal(signal.SIGTERM)
        return proc.wait(30)
    except KeyboardInterrupt:
        # Locust runs in its own session (so Ctrl-C does not kill it mid-report): stop it politely.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def warm_up(args: argparse.Namespace, api_key: str) -> None:
    """A few seconds of single events at the target rate, not counted: connections, caches and Cassandra's
    JIT warm up, so a freshly started stack is judged on its steady state."""
    host, port = loopback_target(args.host)
    requests, _ = EventFactory(host, port, api_key, listings=1000).single(int(args.rate * args.warmup_s), args.rate)
    say(f"warm-up: {args.warmup_s:g} s at {args.rate:g} requests/s (not counted)")

    async def go() -> Result:
        return await generate(host, port, requests, connections=16, rate=args.rate, max_seconds=args.warmup_s + 5)

    result: Result = uvloop.run(go())
    if result.failed:
        say(f"  warm-up: {result.failed} of {result.planned} requests failed {dict(result.statuses)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.listing_base is None:
        args.listing_base = random.randrange(10**12, 9 * 10**12)
    loopback_target(args.host)
    api_key = resolve_api_key(args.api_key)
    shutil.rmtree(OUT / "accepted", ignore_errors=True)
    for stale in ("summary.json", "locust-summary.json", "report.html"):
        (OUT / stale).unlink(missing_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    raise_on_sigterm()
    config = StackConfig(api_key=api_key, api_workers=args.api_workers,
                         worker_concurrency=args.worker_concurrency, worker_procs=args.worker_procs)  # fmt: skip
    started = time.monotonic()
    stack = Stack(config, OUT)
    try:
        stack.start()
        return run(args, stack, started)
    except KeyboardInterrupt:
        say("interrupted: stopping what this run started")
        return 130
    except (StackError, subprocess.CalledProcessError) as exc:
        say(f"error: {exc}")
        return 1
    finally:
        ignore_signals()
        stack.stop()


def run(args: argparse.Namespace, stack: Stack, started: float) -> int:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    dead_before = dead_letters(client)
    waiting, unacked = queue_depth(client)
    if waiting or unacked:
        say(f"the queue already holds {waiting} messages ({unacked} unacknowledged); waiting for it to drain first")
        wait_drained(client, args.drain_timeout)

    if args.warmup_s > 0:
        warm_up(args, stack.config.api_key)
    locust_code = run_locust(args, stack.config.api_key)
    locust_summary: dict[str, Any] = {}
    summary_path = OUT / "locust-summary.json"
    if summary_path.exists():
        locust_summary = json.loads(summary_path.read_text())
    records = read_accepted(sorted((OUT / "accepted").glob("accepted-*.jsonl")))
    say(f"locust exited with {locust_code}; {len(records):,} accepted events recorded")

    say("waiting for the queue to drain (sluice.events empty, nothing unacknowledged)")
    drained_s = wait_drained(client, args.drain_timeout)
    if drained_s is not None:
        say(f"queue drained {drained_s:.1f} s after the load stopped")
    say(f"checking {len(records):,} events in Cassandra (events_by_id and events_by_listing_day)")
    with Checker(port=stack.processes.cassandra_port) as checker:
        checker.wait_stored_records(records, timeout=30 if drained_s is not None else 5)
        result = checker.check_accepted(records)
    dead = dead_letters(client) - dead_before
    client.close()

    checks = locust_summary.get("checks", {})
    verdicts: list[tuple[str, bool, str]] = [
        (name, bool(check["pass"]), str(check["detail"])) for name, check in checks.items()
    ]
    if not checks:
        verdicts.append(("locust", False, f"locust exited with {locust_code} and wrote no summary"))
    verdicts += [
        ("drained", drained_s is not None,
         f"queue drained in {drained_s:.1f} s" if drained_s is not None
         else f"queue not drained within {args.drain_timeout:g} s"),
        ("recorded", len(records) > 0, f"{len(records):,} accepted events recorded; needs some"),
        ("lost", not result.lost, f"{len(result.lost)} of {result.total:,} accepted events lost; needs 0"),
        ("duplicated", not result.duplicated,
         f"{len(result.duplicated)} of {result.total:,} events stored more than once; needs 0"),
        ("conflicting", not result.conflicting,
         f"{len(result.conflicting)} stored events differ from what was accepted; needs 0"),
        ("unexpected", not result.unexpected,
         f"{len(result.unexpected)} events stored in this run's listings that were never accepted; needs 0"),
    ]  # fmt: skip
    ok = all(passed for _, passed, _ in verdicts) and locust_code == 0
    print()
    for name, passed, detail in verdicts:
        print(f"{'PASS' if passed else 'FAIL'}  {name:<10} {detail}", flush=True)
    if dead:
        print(f"note: {dead} events were dead-lettered during the run (hash {keys.DEAD_LETTERS})")

    summary = {
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "pass": ok,
        "command": command_line("loadtest"),
        "parameters": {k: v for k, v in vars(args).items() if k != "api_key"},
        "stack": stack.describe(),
        "code": code_state(),
        "locust_exit_code": locust_code,
        "locust": locust_summary,
        "accepted_recorded": len(records),
        "drained_after_s": None if drained_s is None else round(drained_s, 2),
        "exactly_once": result.as_json(),
        "dead_lettered_during_run": dead,
        "verdicts": {name: {"pass": passed, "detail": detail} for name, passed, detail in verdicts},
        "report_html": str((OUT / "report.html").relative_to(PROJECT)),
        "took_s": round(time.monotonic() - started, 1),
    }
    (OUT / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    print(f"{'PASSED' if ok else 'FAILED'}: report {OUT.relative_to(PROJECT)}/report.html, "
          f"summary {OUT.relative_to(PROJECT)}/summary.json", flush=True)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
