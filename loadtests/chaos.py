"""``make chaos``: a randomized fault run, Jepsen-style, then the exactly-once checker.

    .venv/bin/sluice chaos [--duration 600] [--rate 40] [--seed N] [--out build/chaos]

On the ``chaos`` profile (its own ports and data folder, so it runs beside ``make up`` and ``make test``) it
starts Redis and Cassandra, the schema, the API and two workers as real processes (with the short test
timings of ``tests/support.py``: a lost message is handed out again after 20 s, retries back off from
0.5 s), then for ``--duration`` seconds:

- a workload of single events, batches and gzip-compressed batches at ``--rate`` requests/s, plus a few
  re-posts of accepted ids with another body (first write wins: 409 ``conflict`` while the first version is
  queued; once it is stored, a 202 and a dead letter of kind ``conflict``, never stored); unknown
  outcomes (504, timeouts, resets) are retried with the same ids and bodies (``loadtests/workload.py``);
- a scheduler, seeded by ``--seed``, that after a quiet gap injects one fault (in shuffled rounds of every
  kind): SIGKILL the API (then start it again), SIGKILL one worker (then start it again), SIGKILL Redis
  (then start it again on the same append-only file), or SIGSTOP Cassandra for a few seconds (SIGCONT);
- a producer of malformed messages pushed straight onto the queue (``LPUSH``, every ``--poison-every``
  seconds; loadtests/poison.py): not JSON, truncated, not UTF-8, a JSON list, not an envelope, a body that is
  an object or not a string, invalid base64, a bad eta, a task name that is a list, and now and then a
  megabyte of garbage. Each must end as a dead letter holding its exact bytes (``poison_lost`` counts those
  that did not), and no worker may stop by itself (``unexpected_exits``: any API or worker found dead that
  the scheduler did not kill, checked every few seconds and started again).

Then it stops the load (unknowns are still retried for a while), waits for the queue to drain, and runs the
checker (``loadtests/checker.py``). It prints lost / duplicated / unexpected / conflicting / partial /
stats-mismatched / unresolved counts and the faults injected, writes every request and fault to
``<out>/history.jsonl`` and the verdict to ``<out>/summary.json``, and exits 1 if any count is not 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import redis

from devstack import PROFILES, Profile, Servers
from loadtests.checker import Checker, Report, api_stats
from loadtests.common import BUILD, PROJECT, code_state, command_line, ignore_signals, raise_on_sigterm, say
from loadtests.poison import PoisonProducer, PoisonReport
from loadtests.poison import check as check_poison
from loadtests.verify import dead_letters, queue_depth, wait_drained
from loadtests.workload import Mix, Workload
from sluice import keys
from sluice.cassandra import apply_schema, connect
from sluice.settings import Settings
from tests.support import TEST_KEY, Service, start_api, start_worker, wait_until

FAULTS = ("kill_api", "kill_worker", "kill_redis", "pause_cassandra")
#: What must be 0 for the run to pass.
MUST_BE_ZERO = (
    "lost", "duplicated", "unexpected", "conflicting", "partial", "stats_mismatched", "unresolved",
    "conflicts_not_dead_lettered", "poison_lost", "unexpected_exits",
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sluice chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load and faults (600)")
    p.add_argument("--rate", type=float, default=40.0, help="requests per second (40; batches hold 2..20 events)")
    p.add_argument("--seed", type=int, default=None, help="seed of the workload and the scheduler (default: random)")
    p.add_argument("--gap", type=float, nargs=2, default=(5.0, 15.0), metavar=("MIN", "MAX"),
                   help="quiet seconds between two faults, drawn uniformly (5 15)")  # fmt: skip
    p.add_argument("--faults", default=",".join(FAULTS), help=f"kinds to inject, comma-separated ({','.join(FAULTS)})")
    p.add_argument("--conflicts", type=float, default=0.02, help="share of requests re-posting an id (0.02)")
    p.add_argument(
        "--poison-every",
        type=float,
        default=2.0,
        help="seconds between two malformed messages pushed onto the queue (2; 0: none)",
    )
    p.add_argument("--drain-timeout", type=float, default=180.0, help="seconds to wait for the queue to drain (180)")
    p.add_argument("--retry-deadline", type=float, default=60.0, help="seconds unknowns are retried after the load")
    p.add_argument("--profile", default="chaos", choices=sorted(PROFILES), help="devstack profile (chaos)")
    p.add_argument("--out", type=Path, default=BUILD / "chaos", help="history, summary and logs (build/chaos)")
    return p.parse_args(argv)


class Rig:
    """The servers and services of the run, and the faults done to them (one at a time)."""

    def __init__(self, profile: Profile, out: Path, t0: float) -> None:
        self.profile = profile
        self.log_dir = out / "logs"
        self.t0 = t0
        self.servers = Servers(profile, fresh=True)
        self.api: Service | None = None
        self.workers: dict[str, Service] = {}
        self.faults: Counter[str] = Counter()
        #: Services found dead that no fault killed (a worker must never stop on a message).
        self.unexpected_exits: Counter[str] = Counter()
        self.timeline: list[dict[str, Any]] = []
        self.redis = redis.Redis(port=profile.redis_port, socket_timeout=2, socket_connect_timeout=2)
        self.lock = threading.Lock()  # the scheduler and the final checks never restart a service together

    def note(self, kind: str, **detail: Any) -> None:
        entry = {"t": round(time.monotonic() - self.t0, 3), "fault": kind, **detail}
        self.timeline.append(entry)
        say(f"  [{entry['t']:7.1f} s] {kind} " + " ".join(f"{k}={v}" for k, v in detail.items()))

    def start(self) -> None:
        self.servers.start()
        settings = Settings(cassandra_port=self.profile.cassandra_port, redis_url=self.redis_url())
        cluster, session = connect(settings)
        try:
            apply_schema(session, settings)
        finally:
            cluster.shutdown()
        self.start_api()
        for name in ("worker-1", "worker-2"):
            self.start_worker(name)

    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.profile.redis_port}/0"

    def start_api(self) -> None:
        self.api = start_api(self.profile, self.log_dir)

    def start_worker(self, name: str) -> None:
        # One pool process each: two workers, API, Redis, Cassandra and the load share two cores here.
        self.workers[name] = start_worker(self.profile, self.log_dir, name=name, SLUICE_WORKER_CONCURRENCY="1")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.profile.api_port}"

    def redis_answers(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    # --- faults ------------------------------------------------------------------------------------------
    def inject(self, kind: str, rng: random.Random) -> None:
        with self.lock:
            self.faults[kind] += 1
            down = round(rng.uniform(0.5, 3.0), 2)
            if kind == "kill_api":
                assert self.api is not None
                self.note(kind, pid=self.api.proc.pid, restart_after_s=down)
                self.api.signal(signal.SIGKILL)
                self.api.proc.wait()
                self.api.stop()
                time.sleep(down)
                self.start_api()
            elif kind == "kill_worker":
                name = rng.choice(sorted(self.workers))
                worker = self.workers[name]
                self.note(kind, worker=name, pid=worker.proc.pid, restart_after_s=down)
                worker.signal(signal.SIGKILL)  # the whole process group: main process and pool
                worker.proc.wait()
                worker.stop()
                time.sleep(down)
                self.start_worker(name)
            elif kind == "kill_redis":
                proc = self.servers.redis
                assert proc is not None
                assert proc.proc is not None
                self.note(kind, pid=proc.pid, restart_after_s=down)
                proc.signal(signal.SIGKILL)  # a crash: only what the AOF holds comes back
                proc.proc.wait()
                time.sleep(down)
                proc.start()  # same data folder, so the same appendonly file
                wait_until(self.redis_answers, 30, "Redis to answer after its restart")
            elif kind == "pause_cassandra":
                proc = self.servers.cassandra
                assert proc is not None
                frozen = round(rng.uniform(2.0, 8.0), 2)
                self.note(kind, pid=proc.pid, frozen_s=frozen)
                proc.signal(signal.SIGSTOP)
                try:
                    time.sleep(frozen)
                finally:
                    proc.signal(signal.SIGCONT)
            else:
                raise ValueError(kind)
            self.note(f"{kind} done")

    def revive(self) -> None:
        """Whatever died outside the scheduler (it should not have) is started again, counted and said so."""
        with self.lock:
            if self.api is not None and self.api.proc.poll() is not None:
                self.note("api found dead", code=self.api.proc.returncode)
                self.unexpected_exits["api"] += 1
                self.start_api()
            for name, worker in list(self.workers.items()):
                if worker.proc.poll() is not None:
                    self.note("worker found dead", worker=name, code=worker.proc.returncode)
                    self.unexpected_exits[name] += 1
                    self.start_worker(name)

    def stop(self) -> None:
        for service in [*self.workers.values(), *([self.api] if self.api else [])]:
            service.stop()
        if self.servers.cassandra is not None:
            self.servers.cassandra.signal(signal.SIGCONT)  # never leave it frozen
        self.servers.stop()
        self.redis.close()


def scheduler(rig: Rig, kinds: list[str], rng: random.Random, gap: tuple[float, float], until: float) -> None:
    """Faults at random moments, in rounds that each hold every kind once in a random order: a short run
    still sees every kind (a plain random choice left a two-minute run without a single Redis kill)."""
    round_: list[str] = []
    while True:
        pause = rng.uniform(*gap)
        if time.monotonic() + pause >= until:
            return
        time.sleep(pause)
        if not round_:
            round_ = rng.sample(kinds, len(kinds))
        rig.inject(round_.pop(), rng)


def progress(rig: Rig, load: Workload, poison: PoisonProducer | None, until: float, every: float = 10.0) -> None:
    last: Counter[str] = Counter()
    last_t = time.monotonic()
    while time.monotonic() < until:
        for _ in range(int(every)):  # a service that stopped by itself is found within a second or two
            if time.monotonic() >= until:
                break
            time.sleep(1.0)
            rig.revive()
        now = time.monotonic()
        outcomes, counts = load.snapshot()
        delta = outcomes - last
        requests = sum(delta.values())
        try:
            waiting, unacked = queue_depth(rig.redis)
            queue = f"queue {waiting}+{unacked}"
        except redis.RedisError:
            queue = "queue ?"
        say(f"  [{now - rig.t0:7.1f} s] {requests / (now - last_t):5.1f} req/s {dict(delta)}; accepted "
            f"{counts['accepted']:,}, unknown now {counts['unresolved']}, retries {load.retries}; {queue}; "
            f"faults {dict(rig.faults)}; malformed sent {len(poison.sent) if poison else 0}")  # fmt: skip
        last, last_t = outcomes, now


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    unknown = set(kinds) - set(FAULTS)
    if unknown:
        raise SystemExit(f"unknown fault kinds: {sorted(unknown)}")
    out: Path = args.out if args.out.is_absolute() else PROJECT / args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("history.jsonl", "summary.json"):
        (out / stale).unlink(missing_ok=True)
    raise_on_sigterm()
    t0 = time.monotonic()
    rig = Rig(PROFILES[args.profile], out, t0)
    say(f"chaos run: {args.duration:g} s at {args.rate:g} requests/s, seed {seed}, faults {kinds}, "
        f"profile {args.profile}")  # fmt: skip
    try:
        rig.start()
        return run(args, rig, seed, kinds, out)
    except KeyboardInterrupt:
        say("interrupted: stopping what this run started")
        return 130
    finally:
        ignore_signals()
        rig.stop()
        say(f"done in {time.monotonic() - t0:.0f} s")


def run(args: argparse.Namespace, rig: Rig, seed: int, kinds: list[str], out: Path) -> int:
    rng = random.Random(seed)
    mix = Mix(single=0.6, batch=0.2, gzip=0.2, conflict=args.conflicts)
    load = Workload(rig.base_url, TEST_KEY, rate=args.rate, mix=mix, seed=rng.getrandbits(64),
                    timeout=3.0, retry_deadline_s=args.retry_deadline)  # fmt: skip
    load.start()
    poison_rng = random.Random(rng.getrandbits(64))
    poison = PoisonProducer(rig.redis, poison_rng, every_s=args.poison_every) if args.poison_every > 0 else None
    if poison is not None:
        poison.start()
    until = time.monotonic() + args.duration
    threads = [
        threading.Thread(target=scheduler, args=(rig, kinds, random.Random(rng.getrandbits(64)), tuple(args.gap),
                                                 until), name="scheduler", daemon=True),
        threading.Thread(target=progress, args=(rig, load, poison, until), name="progress", daemon=True),
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if poison is not None:
        poison.stop()
    rig.revive()
    say(f"load stopped; retrying {load.snapshot()[1]['unresolved']} unknown outcomes (up to "
        f"{args.retry_deadline:g} s)")  # fmt: skip
    load.stop()
    counts = load.ledger.counts()
    say(f"  clients: {counts}")

    say("waiting for the queue to drain (sluice.events empty, nothing unacknowledged)")
    drained_s = wait_drained(rig.redis, args.drain_timeout)
    with Checker(port=rig.profile.cassandra_port) as checker:
        # A message lost in flight is re-queued from the API's records once the queue is empty and the
        # visibility timeout (20 s here) has passed: give it that long, and a little more.
        missing = checker.wait_stored(list(load.ledger.accepted), timeout=60, every=2.0, note=say)
        if drained_s is None or missing:
            wait_drained(rig.redis, 30)
        report = checker.check(load.ledger, stats=api_stats(rig.base_url, TEST_KEY))
    dead = dead_letters(rig.redis)
    # First write wins: a second body the API could not refuse any more (the first was already stored, 409
    # only while it is queued) got 202, must not be stored (checked above: stored = first version), and
    # must be kept as a dead letter of kind "conflict", so its sender can find out (GET /v1/events/{id}).
    report.conflicts_not_dead_lettered = _not_dead_lettered_as_conflicts(rig.redis, load.ledger.accepted_conflicts)
    rig.revive()  # a worker that stopped while draining counts too
    poisoned = check_poison(rig.redis, poison) if poison is not None else None
    return finish(args, rig, load, report, seed, out, drained_s, dead, poisoned)


def _not_dead_lettered_as_conflicts(client: redis.Redis, ids: set[Any]) -> list[Any]:
    missing = []
    for eid in ids:
        raw = client.hget(keys.DEAD_LETTERS, str(eid))
        if raw is None or orjson.loads(raw).get("kind") != "conflict":  # type: ignore[arg-type]
            missing.append(eid)
    return missing


def finish(
    args: argparse.Namespace, rig: Rig, load: Workload, report: Report, seed: int, out: Path,
    drained_s: float | None, dead: int, poisoned: PoisonReport | None = None,
) -> int:  # fmt: skip
    result = report.as_json()
    result["poison_lost"] = len(poisoned.lost) if poisoned is not None else 0
    result["unexpected_exits"] = sum(rig.unexpected_exits.values())
    counts = {name: int(result[name]) for name in MUST_BE_ZERO}
    history = out / "history.jsonl"
    # One clock for both: seconds since the run started (the workload counts from its own start).
    offset = load.started - rig.t0
    requests = [{**r, "t": round(float(r["t"]) + offset, 3)} for r in load.requests]
    with history.open("wb") as f:
        for entry in sorted([*requests, *rig.timeline], key=lambda e: float(e["t"])):
            f.write(orjson.dumps(entry) + b"\n")
    passed = not any(counts.values()) and drained_s is not None
    summary = {
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "pass": passed,
        "seed": seed,
        "command": command_line("chaos"),
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "code": code_state(),
        "faults": dict(rig.faults),
        "clients": load.ledger.counts(),
        "requests": len(load.requests),
        "retries": load.retries,
        "outcomes": dict(load.outcomes),
        "drained_after_s": None if drained_s is None else round(drained_s, 2),
        "dead_letters": dead,
        "malformed_messages": poisoned.as_json() if poisoned is not None else None,
        "unexpected_exits": dict(rig.unexpected_exits),
        "counts": counts,
        "check": result,
        "history": str(history),
    }
    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    print()
    print(f"seed {seed}; faults injected: {dict(rig.faults)}; requests {len(load.requests):,} "
          f"({load.retries:,} retries); outcomes {dict(load.outcomes)}")  # fmt: skip
    print(f"clients: {load.ledger.counts()}; dead letters in Redis: {dead}")
    if poisoned is not None:
        print(
            f"malformed messages pushed onto the queue: {poisoned.sent} (plus {poisoned.uncertain} whose push "
            f"Redis did not confirm), dead-lettered with their bytes: {poisoned.dead_lettered}, lost: "
            f"{len(poisoned.lost)}, dead-lettered twice: {poisoned.dead_lettered_twice}; {poisoned.by_shape}"
        )
        for line in poisoned.lost[:5]:
            print(f"  malformed message lost: {line}")
    print(report.line())
    for name, value in counts.items():
        print(f"{'PASS' if value == 0 else 'FAIL'}  {name:<20} {value}")
    if drained_s is None:
        print(f"FAIL  drained              not within {args.drain_timeout:g} s")
    # Which defects the faults made, apart from the API accepting a second body for a known id (409 expected):
    # those ids are flagged as duplicated / conflicting too, and would hide the rest.
    twice = load.ledger.accepted_conflicts
    apart = {k: len(set(getattr(report, k)) - twice) for k in ("lost", "duplicated", "unexpected", "conflicting")}
    summary["counts_apart_from_accepted_conflicts"] = apart
    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    print(f"apart from the {len(twice)} ids accepted with two bodies: {apart}")
    for kind, lines in report.details.items():
        for line in lines[:5]:
            print(f"  {kind}: {line}")
    print(f"{'PASSED' if passed else 'FAILED'}: history {history}, summary {out / 'summary.json'}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
