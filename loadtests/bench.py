"""``make bench``: how far the pipeline goes on this machine, everything co-located, end to end into Cassandra.

    .venv/bin/sluice bench [--api-workers N] [--worker-concurrency N] [--worker-procs N] ...

Uses the stack answering on 127.0.0.1:8000, or starts one and stops it at the end (also on Ctrl-C). Load
comes from a lean asyncio generator on raw keep-alive HTTP/1.1 connections (``loadtests/loadgen.py``):
open-loop fixed-rate scheduling with latency measured from each request's due time; its own CPU is
reported. Phases, each checked end to end (every accepted event stored exactly once in Cassandra):

1. single: rising fixed rates of ``POST /v1/events`` (``--steps``, ``--step-s`` each), stopping at the first
   step that fails, then ``--refine`` bisections between the best pass and the first failure. A step passes
   when every request got 202, the achieved rate is >= 99% of the target, p99 < ``--p99-ms``, the queue is
   drained within ``--max-lag-s`` after the last request, and no event is lost or duplicated.
2. drain: workers told to stop consuming (remote control; they stay up and warm), the queue filled with
   ``--fill-events`` through the API, consumers resumed: events/s from the first message taken to drained.
3. batch: ``POST /v1/events/batch`` of 100 events, closed loop; events/s from the first request until the
   queue is drained. Sized to about ``--batch-s`` seconds of the drain rate just measured (at most
   ``--batch-events``), so a slow worker does not make the run overrun. Then the same count of Segment-format
   batches (``POST /v1/batch``, as analytics-python sends them): ``sdk_batch_ratio`` = their events/s / the
   native batches' (``sdk_batch_api_ratio``: the same at the API alone); with ``--sdk-rounds N``, the median
   of N pairs measured back to back (on a shared machine, one pair is at the mercy of outside load).
4. lag: ``--lag-rate`` requests/s for ``--lag-s``; every ``--lag-sample``-th event is polled in
   ``events_by_id`` from the moment its 202 came back: p50/p99 of accepted -> readable.
   cpu: ``--cpu-rate`` single events/s for ``--cpu-s``, nothing polled: CPU ms per request per role
   (``cpu_<role>_ms_per_request``, api, worker, cassandra and redis with targets), first request to drained.
5. memory: peak RSS (VmHWM) of the API processes, each worker instance (main + pool), Cassandra.
7. replica: the price of a 202 on two nodes (``SLUICE_REDIS_MIN_REPLICAS=1``): a Redis replica and a second
   API that waits for it; p50/p99 at 100 single events/s and the single phase's rates under the p99 bar, each
   measured back to back on the one-node API and on the waiting one (``wait_*`` beside ``node_*``, and their
   ratios ``wait_p50_at_100_ratio``, ``wait_single_rps_ratio``).

0. warm-up (not counted): a few requests and batches, then single events at ``--cpu-rate`` in 10 s slices
   until Cassandra's JIT compilers use under ``--jit-quiet`` of a core (at most ``--jit-warm-s``); then 100
   single events/s for 10 s: ``single_p50_ms_at_100``.
6. ceiling (before the drain): the same kind of rows written by the driver's best path with no pipeline
   (``loadtests/ceiling.py``): ``ceiling_events_per_s``; ``drain_ratio`` = drain / ceiling and ``batch_ratio``
   = batch end to end / ceiling come from the same run. The drain phase's fill, workers paused, gives
   ``api_batch_events_per_s``; the single phase, past its first failure, climbs for ``single_max_rps`` (the
   highest rate sustained at any latency). CPU per event per role (ms) for the drain, batch and ceiling.

Prints a table and writes ``build/bench/summary.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import orjson
import redis
import uvloop

from devstack import StackError
from loadtests.benchparts import EventFactory, LagPoller, Meter, ok_records
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
from loadtests.loadgen import OnResponse, Result, generate
from loadtests.procs import JIT_ROLE
from loadtests.stack import PROFILE, REDIS_URL, Stack, StackConfig
from loadtests.verify import Accepted, Checker, CheckResult, queue_depth, wait_drained

OUT = BUILD / "bench"
T = TypeVar("T")

#: The targets of the performance issue; ratios are against the ceiling measured in the same run.
TARGETS: dict[str, tuple[str, float]] = {
    "drain_ratio": (">=", 0.80),
    "batch_ratio": (">=", 0.75),
    "sdk_batch_ratio": (">=", 0.80),
    "api_batch_events_per_s": (">=", 50_000),
    "single_rps": (">=", 1500),
    "single_max_rps": (">=", 4000),
    "single_p50_ms_at_100": ("<=", 3),
    "lag_p99_ms": ("<=", 2000),
    "api_rss_mb": ("<=", 150),
    "lost": ("<=", 0),
    "duplicated": ("<=", 0),
    # CPU per single-event request at --cpu-rate (1,000/s), per role: what each tier costs a request.
    "cpu_api_ms_per_request": ("<=", 0.15),
    "cpu_worker_ms_per_request": ("<=", 0.15),
    "cpu_cassandra_ms_per_request": ("<=", 0.2),
    "cpu_redis_ms_per_request": ("<=", 0.05),
}

#: The roles whose CPU per request has a target (the keys cpu_<role>_ms_per_request).
CPU_ROLES = ("api", "worker", "cassandra", "redis")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sluice bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--host", default=DEFAULT_HOST, help=f"the API, on this machine only ({DEFAULT_HOST})")
    p.add_argument("--api-key", default=None, help="else $SLUICE_LOADTEST_API_KEY, .data/dev/api-key, 'dev-key'")
    g = p.add_argument_group("stack (when this run starts it)")
    g.add_argument("--api-workers", type=int, default=None, help="SLUICE_API_WORKERS (default: project's, 1)")
    g.add_argument("--worker-concurrency", type=int, default=None, help="SLUICE_WORKER_CONCURRENCY (default 2)")
    g.add_argument("--worker-procs", type=int, default=1, help="`sluice worker` processes (1)")
    g = p.add_argument_group("phases")
    g.add_argument("--steps", default="250,500,1000,1500,2000,2500,3000,4000,5000",
                   help="single-event rates to try, requests/s")  # fmt: skip
    g.add_argument("--step-s", type=float, default=10.0, help="seconds per rate step (10)")
    g.add_argument("--refine", type=int, default=4, help="bisections after the first failing step (4)")
    g.add_argument("--max-steps", type=int, default=3,
                   help="steps above the first failing rate, for the highest sustained rate (3)")  # fmt: skip
    g.add_argument("--ceiling-events", type=int, default=None, help="rows of the ceiling phase (= --fill-events)")
    g.add_argument("--p99-ms", type=float, default=50.0, help="API p99 bound of a passing step (50)")
    g.add_argument("--max-lag-s", type=float, default=2.0, help="a passing step's queue drains within this (2)")
    g.add_argument("--connections", type=int, default=64, help="keep-alive connections, single events (64)")
    g.add_argument("--batch-events", type=int, default=100_000, help="most events of the batch phase (100,000)")
    g.add_argument("--batch-s", type=float, default=20.0, help="size the batch phase to ~this many s of drain (20)")
    g.add_argument("--batch-connections", type=int, default=4, help="connections in the batch phase (4)")
    g.add_argument("--sdk-rounds", type=int, default=1,
                   help="native/Segment-format batch pairs; the SDK ratios are their medians (1)")  # fmt: skip
    g.add_argument("--fill-events", type=int, default=40_000, help="events queued for the drain phase (40,000)")
    g.add_argument("--lag-rate", type=float, default=1000.0, help="requests/s of the lag phase (1,000)")
    g.add_argument("--cpu-rate", type=float, default=1000.0,
                   help="single events/s of the cpu phase: CPU per request per role (1,000)")  # fmt: skip
    g.add_argument("--cpu-s", type=float, default=10.0, help="seconds of the cpu phase (10)")
    g.add_argument("--jit-warm-s", type=float, default=120.0,
                   help="warm-up: at most this long until Cassandra's JIT is quiet (120; 0: none)")  # fmt: skip
    g.add_argument("--jit-quiet", type=float, default=0.05,
                   help="warm-up: the JIT is quiet below this share of a core over 10 s (0.05)")  # fmt: skip
    g.add_argument("--lag-s", type=float, default=15.0, help="seconds of the lag phase (15)")
    g.add_argument("--lag-sample", type=int, default=5, help="poll every N-th event of the lag phase (5)")
    g.add_argument("--listings", type=int, default=10_000, help="listings per phase, Zipf popularity (10,000)")
    g.add_argument("--budget-s", type=float, default=330.0,
                   help="stop adding rate steps when the run would overrun this many seconds after its warm-up "
                        "(330)")  # fmt: skip
    g.add_argument("--skip", default="",
                   help="phases to skip, comma-separated: single,ceiling,batch,sdk,drain,lag,cpu,replica")  # fmt: skip
    g.add_argument("--py-spy", action="store_true",
                   help="profile the API during the lag phase and the workers during the drain phase")  # fmt: skip
    g.add_argument("--py-spy-format", default="flamegraph", choices=["flamegraph", "raw", "speedscope"])
    return p.parse_args(argv)


def run_async(coro_fn: Callable[[], Any]) -> Any:
    return uvloop.run(coro_fn())


class Bench:
    def __init__(self, args: argparse.Namespace, stack: Stack, api_key: str) -> None:
        self.args = args
        self.stack = stack
        self.host, self.port = loopback_target(args.host)
        self.redis = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        self.checker = Checker(port=stack.processes.cassandra_port)
        self.factory = EventFactory(self.host, self.port, api_key, args.listings)
        self.meter = Meter(stack.processes)
        self.checked = 0
        self.lost = 0
        self.duplicated = 0
        self.unexpected = 0
        self.conflicting = 0

    def close(self) -> None:
        self.checker.close()
        self.redis.close()

    # --- helpers -----------------------------------------------------------------------------------------
    def load(
        self,
        requests: Sequence[bytes],
        *,
        rate: float | None,
        connections: int,
        max_seconds: float,
        on_response: OnResponse | None = None,
    ) -> Result:
        async def go() -> Result:
            return await generate(self.host, self.port, requests, connections=connections, rate=rate,
                                  max_seconds=max_seconds, on_response=on_response)  # fmt: skip

        result: Result = run_async(go)
        return result

    def settle(self, timeout: float) -> float | None:
        """Seconds until the queue is empty and nothing unacknowledged (polled every 20 ms), None on timeout."""
        return wait_drained(self.redis, timeout, every=0.02, note_every=5.0)

    def verify(self, records: Sequence[Accepted], drained: bool) -> CheckResult:
        if len(records) >= 5000:
            say(f"  checking {len(records):,} events in Cassandra (both tables)")
        if not drained:
            self.checker.wait_stored_records(records, timeout=20)
        result = self.checker.check_accepted(records)
        if result.lost and drained:
            # "Drained" is read from Redis, and kombu takes a message off the queue (BRPOP) a moment before it
            # records the delivery as unacknowledged: a message in that moment is in neither, and its events
            # are written just after. Give them the time a write takes before calling them lost.
            missing = set(result.lost)
            late = [record for record in records if record.event_id in missing]
            still = self.checker.wait_stored_records(late, timeout=5)
            say(f"  {len(late) - still} of {len(late)} events missing when the queue read as drained were "
                "stored just after (taken off the queue, not yet recorded as unacknowledged)")  # fmt: skip
            result = self.checker.check_accepted(records)
        if result.lost:
            say(f"  LOST {len(result.lost)} accepted events, e.g. {', '.join(str(u) for u in result.lost[:5])}")
        self.checked += result.total
        self.lost += len(result.lost)
        self.duplicated += len(result.duplicated)
        self.unexpected += len(result.unexpected)
        self.conflicting += len(result.conflicting)
        return result

    def ensure_empty_queue(self) -> None:
        waiting, unacked = queue_depth(self.redis)
        if waiting or unacked:
            say(f"  queue holds {waiting} messages ({unacked} unacknowledged): waiting for it to drain")
            self.settle(120)

    def quiesce(self, idle_cores: float = 0.15, timeout: float = 30.0) -> None:
        """Wait until Cassandra is idle (below ``idle_cores`` over half a second): the flushes and compactions
        a phase leaves behind would otherwise be billed to the next phase's CPU and throughput."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            before = self.stack.processes.cpu_by_role()["cassandra"]
            time.sleep(0.5)
            busy = (self.stack.processes.cpu_by_role()["cassandra"] - before) / 0.5
            if busy < idle_cores:
                took = time.monotonic() - started
                if took > 1:
                    say(f"  Cassandra idle after {took:.1f} s (finishing the last phase's flushes and compactions)")
                return
        say(f"  Cassandra still busy after {timeout:g} s; measuring anyway")

    # --- phases ------------------------------------------------------------------------------------------
    def warmup(self) -> dict[str, Any]:
        """Warm every JIT and cache on the path before anything is measured: a cold Cassandra made the first
        phase of earlier runs look worse than the rest."""
        say("warm-up: 5 s at 200 requests/s and 20,000 events in batches (not counted)")
        requests, records = self.factory.single(1000, 200)
        statuses = array("H", bytes(2 * len(requests)))
        self.load(requests, rate=200, connections=min(16, self.args.connections), max_seconds=10,
                  on_response=_recorder(statuses))  # fmt: skip
        batches, batch_records = self.factory.batches(200, 100)
        batch_statuses = array("H", bytes(2 * len(batches)))
        self.load(batches, rate=None, connections=self.args.batch_connections, max_seconds=60,
                  on_response=_recorder(batch_statuses, all_accepted=True))  # fmt: skip
        self.settle(60)
        accepted = [r for st, recs in zip(batch_statuses, batch_records, strict=True) if st == 202 for r in recs]
        self.verify(ok_records(statuses, records) + accepted, drained=True)
        return self.warm_jit()

    def warm_jit(self, slice_s: float = 10.0) -> dict[str, Any]:
        """Single events at ``--cpu-rate`` until Cassandra's JIT compilers are quiet (or ``--jit-warm-s``).

        A JVM compiles its hot code over its first minutes of load: with the warm-up above alone, Cassandra's
        compilers still took 40 % of its CPU in a cpu phase right after (0.25 of 0.56 ms per request), and their
        bursts share the two cores with every request of the single phase. A long-running server has paid that
        once; so, as a JVM benchmark's warm-up iterations do, this runs the load until a 10 s slice costs the
        compilers under ``--jit-quiet`` of a core. What they still use in a phase is reported beside it."""
        a = self.args
        started = time.monotonic()
        slices: list[float] = []
        accepted: list[Accepted] = []
        if a.jit_warm_s <= 0:
            return {"seconds": 0.0, "slices_jit_cores": slices}
        say(f"warm-up: {a.cpu_rate:g} single events/s in {slice_s:g} s slices until Cassandra's JIT compilers use "
            f"under {a.jit_quiet:g} of a core (at most {a.jit_warm_s:g} s; not counted)")  # fmt: skip
        while True:
            requests, records = self.factory.single(int(a.cpu_rate * slice_s), a.cpu_rate)
            statuses = array("H", bytes(2 * len(requests)))
            jit = self.stack.processes.cpu_by_role()[JIT_ROLE]
            res = self.load(requests, rate=a.cpu_rate, connections=a.connections, max_seconds=slice_s + 5,
                            on_response=_recorder(statuses))  # fmt: skip
            cores = (self.stack.processes.cpu_by_role()[JIT_ROLE] - jit) / max(res.wall_s, 1e-3)
            slices.append(round(cores, 3))
            accepted += ok_records(statuses, records)
            took = time.monotonic() - started
            say(f"  {took:3.0f} s: the JIT used {cores:.2f} of a core over the last {res.wall_s:.0f} s "
                f"(p99 {res.quantile_ms(0.99):.0f} ms)")  # fmt: skip
            if cores < a.jit_quiet:
                break
            if took + slice_s > a.jit_warm_s:
                say(f"  the JIT is still compiling after {took:.0f} s; measuring anyway")
                break
        self.verify(accepted, drained=self.settle(60) is not None)
        return {"seconds": round(time.monotonic() - started, 1), "slices_jit_cores": slices}

    def p50_at_100(self) -> dict[str, Any]:
        """Latency of a quiet API: 100 single events per second for 10 s."""
        requests, records = self.factory.single(1000, 100)
        statuses = array("H", bytes(2 * len(requests)))
        res = self.load(requests, rate=100, connections=min(16, self.args.connections), max_seconds=15,
                        on_response=_recorder(statuses))  # fmt: skip
        self.settle(30)
        self.verify(ok_records(statuses, records), drained=True)
        p50 = round(res.quantile_ms(0.5), 2)
        say(f"  at 100/s: p50 {p50} ms, p99 {res.quantile_ms(0.99):.1f} ms")
        return {"single_p50_ms_at_100": p50, "single_p99_ms_at_100": round(res.quantile_ms(0.99), 2)}

    def replica(self, single_rates: Sequence[float]) -> dict[str, Any]:
        """The price of a 202 on two nodes: a replica of the bench's Redis, and a second API that answers only
        once it confirmed (SLUICE_REDIS_MIN_REPLICAS=1). Each measurement is taken twice back to back, on the
        one-node API and then on the waiting one, so the price is a ratio of the same minute (the single phase
        ran minutes earlier, when Cassandra and the machine may have been busier or quieter): 100 single
        events/s, then the single phase's rates, rising, until both have failed the p99 bar."""
        from devstack import redis_process, start_redis
        from devstack.services import start_api, stop_services

        a = self.args
        say("phase replica: a Redis replica and an API waiting for it (SLUICE_REDIS_MIN_REPLICAS=1), each step "
            "beside the same step on the one-node API")  # fmt: skip
        self.ensure_empty_queue()
        port = PROFILE.redis_port + 1000
        node = redis_process(OUT / "replica", port, "512mb", replica_of=PROFILE.redis_port)
        start_redis(node, port)
        replica = redis.Redis(port=port, socket_timeout=2)
        api = None
        ports = {"node": self.port, "wait": PROFILE.api_port + 2}
        try:
            deadline = time.monotonic() + 30
            while cast("dict[str, Any]", replica.info("replication")).get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise StackError(f"the replica on :{port} did not sync with the bench's Redis within 30 s")
                time.sleep(0.2)
            env = self.stack.env | {"SLUICE_REDIS_MIN_REPLICAS": "1"}
            api = start_api("api-wait", env, self.stack.log_dir, port=ports["wait"], run_dir=self.stack.run_dir)
            out: dict[str, Any] = {}
            for side, api_port in ports.items():
                self.port = api_port
                out |= {f"{side}_{key}": value for key, value in self.p50_at_100().items()}
            steps = sorted(set(single_rates)) or [float(x) for x in a.steps.split(",") if x.strip()]
            best: dict[str, dict[str, Any] | None] = dict.fromkeys(ports)
            failed: set[str] = set()
            results: dict[str, list[dict[str, Any]]] = {side: [] for side in ports}
            for rate in steps:
                for side in [s for s in ports if s not in failed]:
                    self.port = ports[side]
                    self.ensure_empty_queue()
                    say(f"  {side}:")
                    step = self.single_step(rate)
                    results[side].append(step)
                    if step["pass"]:
                        best[side] = step
                    else:
                        failed.add(side)
                if failed == set(ports):
                    break
            for side in ports:
                chosen = best[side]
                out[f"{side}_steps"] = results[side]
                out[f"{side}_single_rps"] = chosen["http"]["achieved_rps"] if chosen else 0.0
                out[f"{side}_single_p99_ms"] = chosen["http"]["p99_ms"] if chosen else None
            if out["node_single_rps"]:
                out["wait_single_rps_ratio"] = round(out["wait_single_rps"] / out["node_single_rps"], 3)
            if out["node_single_p50_ms_at_100"]:
                out["wait_p50_at_100_ratio"] = round(
                    out["wait_single_p50_ms_at_100"] / out["node_single_p50_ms_at_100"], 3
                )
            say(f"  with a replica confirming: {out['wait_single_rps']:,.0f} req/s under the p99 bar, p50 at 100/s "
                f"{out['wait_single_p50_ms_at_100']} ms; the one-node API beside it: "
                f"{out['node_single_rps']:,.0f} req/s, {out['node_single_p50_ms_at_100']} ms")  # fmt: skip
            return out
        finally:
            self.port = ports["node"]
            if api is not None:
                stop_services([api])
            replica.close()
            node.stop()

    def ceiling(self, events: int) -> dict[str, Any]:
        from loadtests.ceiling import measure
        from sluice.settings import Settings

        say(f"phase ceiling: {events:,} events (both tables) by the driver's best path, 2 processes, no pipeline;"
            " then as many with the worker's first-write-wins read")  # fmt: skip
        self.ensure_empty_queue()
        self.quiesce()
        out = measure(Settings(cassandra_port=self.stack.processes.cassandra_port), events,
                      listings=self.args.listings, meter=self.meter)  # fmt: skip
        plain, with_read = out.pop("cpu")
        writers = out.pop("writer_cpu_ms_per_event")
        out["ceiling_cpu"] = plain.as_json()
        # The writers stand where the worker does in the pipeline: one column to compare.
        out["ceiling_cpu_ms_per_event"] = cpu_per_event(plain, out["ceiling_events"]) | {"worker": writers[0]}
        out["ceiling_with_read_cpu_ms_per_event"] = cpu_per_event(with_read, out["ceiling_events"]) | {
            "worker": writers[1]
        }
        say(f"  {out['ceiling_events_per_s']:,.0f} events/s; with the read "
            f"{out['ceiling_with_read_events_per_s']:,.0f} events/s")  # fmt: skip
        return out

    def single_step(self, rate: float) -> dict[str, Any]:
        a = self.args
        count = int(rate * a.step_s)
        requests, records = self.factory.single(count, rate)
        statuses = array("H", bytes(2 * count))
        self.meter.start()
        res = self.load(requests, rate=rate, connections=a.connections, max_seconds=a.step_s + 5,
                        on_response=_recorder(statuses))  # fmt: skip
        drained_s = self.settle(max(20.0, a.step_s * 2))
        usage = self.meter.stop()
        accepted = ok_records(statuses, records)
        check = self.verify(accepted, drained_s is not None)
        p99 = res.quantile_ms(0.99)
        reasons = []
        if res.ok < count:
            reasons.append(f"{count - res.ok} of {count} requests not answered 202 {dict(res.statuses)}")
        if res.achieved_rps < 0.99 * rate:
            reasons.append(f"achieved {res.achieved_rps:.0f}/s < 99% of {rate:g}")
        if not p99 < a.p99_ms:
            reasons.append(f"p99 {p99:.1f} ms >= {a.p99_ms:g} ms")
        if drained_s is None or drained_s > a.max_lag_s:
            took = "not within the wait" if drained_s is None else f"{drained_s:.1f} s"
            reasons.append(f"queue drained {took} after the last request (> {a.max_lag_s:g} s: workers behind)")
        if not check.ok:
            reasons.append(check.line())
        step = {
            "target_rps": rate,
            "pass": not reasons,
            "why_not": reasons,
            "http": res.summary(),
            "drained_after_s": None if drained_s is None else round(drained_s, 2),
            "end_to_end_events_per_s": round(len(accepted) / (res.finished - res.started + (drained_s or 0.0)), 1),
            "exactly_once": check.as_json(5),
            "cpu": usage.as_json(),
        }
        verdict = "pass" if not reasons else "FAIL: " + "; ".join(reasons)
        say(f"  {rate:6.0f}/s: achieved {res.achieved_rps:7.1f}/s  p50 {res.quantile_ms(0.5):6.1f} ms  "
            f"p99 {p99:7.1f} ms  drained +{drained_s if drained_s is not None else math.inf:.1f} s  "
            f"generator {100 * res.cpu_s / res.wall_s:.0f}% core  -> {verdict}")  # fmt: skip
        return step

    def single(self, deadline: float) -> dict[str, Any]:
        """Rising rates until the first failure, then bisections; no new step once ``deadline`` is near."""
        a = self.args
        steps = [float(s) for s in a.steps.split(",") if s.strip()]
        say(f"phase single events: rising rates {', '.join(f'{s:g}' for s in steps)} req/s, {a.step_s:g} s each")
        results: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        failed_at: float | None = None
        step_cost = a.step_s + 8
        for rate in steps:
            if time.monotonic() + step_cost > deadline:
                say(f"  time budget reached: no step at {rate:g}/s (--budget-s)")
                break
            self.ensure_empty_queue()
            step = self.single_step(rate)
            results.append(step)
            if step["pass"]:
                best = step
            else:
                failed_at = rate
                break
        low = best["target_rps"] if best else 0.0
        for _ in range(a.refine if failed_at is not None else 0):
            assert failed_at is not None
            # Fine steps: to 10 req/s, stopping once the bracket is within 5 % of the best pass.
            mid = round((low + failed_at) / 2 / 10) * 10
            if (mid <= low or mid >= failed_at or failed_at - low < max(20.0, 0.05 * low)
                    or time.monotonic() + step_cost > deadline):  # fmt: skip
                break
            self.ensure_empty_queue()
            step = self.single_step(mid)
            results.append(step)
            if step["pass"]:
                best, low = step, mid
            else:
                failed_at = mid
        # The highest sustained rate at any latency: keep climbing past the first failure while the generator
        # still achieves what it offers (and nothing is lost); the latency bar no longer matters here.
        sustained = [r for r in results if r["http"]["achieved_rps"] >= 0.95 * r["target_rps"]
                     and r["exactly_once"].get("lost", 0) == 0]  # fmt: skip
        rate = max([r["target_rps"] for r in results] + [0.0])
        for _ in range(a.max_steps if failed_at is not None else 0):
            rate = rate * 1.5
            if time.monotonic() + step_cost > deadline + 60:
                break
            self.ensure_empty_queue()
            step = self.single_step(rate)
            results.append(step)
            if step["http"]["achieved_rps"] >= 0.95 * rate and step["exactly_once"].get("lost", 0) == 0:
                sustained.append(step)
            else:
                break
        out: dict[str, Any] = {"steps": results, "first_failing_rps": failed_at}
        out["single_max_rps"] = max((r["http"]["achieved_rps"] for r in sustained), default=0.0)
        if best is not None:
            out |= {
                "single_rps": best["http"]["achieved_rps"],
                "single_target_rps": best["target_rps"],
                "single_p99_ms": best["http"]["p99_ms"],
                "single_p50_ms": best["http"]["p50_ms"],
                "single_cpu": best["cpu"],
            }
        else:
            out |= {"single_rps": 0.0, "single_p99_ms": None}
        return out

    def batch(self, drain_rate: float | None, *, sdk: bool = False) -> dict[str, Any]:
        """Closed-loop batches of 100, end to end. ``sdk``: Segment's wire format on ``POST /v1/batch``, built the
        way analytics-python sends it (its message fields, Basic auth, a 200 per batch); the same count as the
        native phase, so ``sdk_batch_ratio`` compares like with like."""
        a = self.args
        events = a.batch_events if not drain_rate else min(a.batch_events, max(10_000, drain_rate * a.batch_s))
        count = max(1, int(events) // 100)
        what = "POST /v1/batch (Segment's format, as analytics-python sends it)" if sdk else "POST /v1/events/batch"
        phase = "sdk" if sdk else "3/4"
        say(f"phase {phase} batches: {count} x {what} of 100 events, {a.batch_connections} connections")
        self.ensure_empty_queue()
        self.quiesce()
        requests, records = (self.factory.sdk_batches if sdk else self.factory.batches)(count, 100)
        ok, prefix = (200, "sdk_batch") if sdk else (202, "batch")
        statuses = array("H", bytes(2 * count))
        self.meter.start()
        res = self.load(requests, rate=None, connections=a.batch_connections, max_seconds=60,
                        on_response=_recorder(statuses, all_accepted=True, ok=ok))  # fmt: skip
        api_s = res.finished - res.started
        drained_s = self.settle(180)
        usage = self.meter.stop()
        accepted = [rec for status, recs in zip(statuses, records, strict=True) if status == ok for rec in recs]
        end_to_end_s = api_s + (drained_s if drained_s is not None else math.nan)
        check = self.verify(accepted, drained_s is not None)
        out = {
            f"{prefix}_events_per_s": round(len(accepted) / end_to_end_s, 1),
            f"{prefix}_api_events_per_s": round(len(accepted) / api_s, 1),
            f"{prefix}_requests": res.summary(),
            f"{prefix}_events_accepted": len(accepted),
            f"{prefix}_drained_after_api_s": None if drained_s is None else round(drained_s, 2),
            f"{prefix}_exactly_once": check.as_json(5),
            f"{prefix}_cpu": usage.as_json(),
            f"{prefix}_cpu_ms_per_event": cpu_per_event(usage, len(accepted)),
        }
        say(f"  {len(accepted):,} events accepted in {api_s:.1f} s ({out[f'{prefix}_api_events_per_s']:,.0f}/s at the "
            f"API, p99 {res.quantile_ms(0.99):.0f} ms/request), stored {drained_s or math.inf:.1f} s later: "
            f"{out[f'{prefix}_events_per_s']:,.0f} events/s end to end")  # fmt: skip
        return out

    def sdk_rounds(self, native: dict[str, Any], rounds: int) -> dict[str, Any]:
        """Segment-format batches against the native ones of this run: ``rounds`` pairs (the first pairs with
        phase 3's native figures; each later one measures native then SDK again, back to back), so that load
        from outside the run (a shared machine) weighs on both sides alike. The ratios are the pairs' medians."""
        drain_rate = native.get("drain_events_per_s")
        pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        out: dict[str, Any] = {}
        for n in range(rounds):
            before = native if n == 0 else self.batch(drain_rate)
            out = self.batch(drain_rate, sdk=True)
            pairs.append((before, out))
        ratios = [sdk["sdk_batch_events_per_s"] / nat["batch_events_per_s"] for nat, sdk in pairs]
        api_ratios = [sdk["sdk_batch_api_events_per_s"] / nat["batch_api_events_per_s"] for nat, sdk in pairs]
        if rounds > 1:
            say(f"  SDK / native batches per round: {', '.join(f'{r:.3f}' for r in ratios)} (at the API: "
                f"{', '.join(f'{r:.3f}' for r in api_ratios)})")  # fmt: skip
        return out | {
            "sdk_batch_ratio": round(statistics.median(ratios), 3),
            "sdk_batch_api_ratio": round(statistics.median(api_ratios), 3),
            "sdk_batch_ratios": [round(r, 3) for r in ratios],
            "sdk_batch_api_ratios": [round(r, 3) for r in api_ratios],
        }

    def drain(self) -> dict[str, Any]:
        a = self.args
        count = max(1, a.fill_events // 100)
        say(f"phase 2/4 drain: stop consuming, queue {count * 100:,} events through the API, then start")
        self.ensure_empty_queue()
        self.quiesce()
        self.stack.processes.sample()
        paused = False
        try:
            # Paused, not stopped: restarted workers would bill their start (imports, connections: over a second
            # of CPU) to the drain, and write its first messages cold.
            names = self.stack.pause_consumers()
            paused = True
            say(f"  told {len(names)} worker(s) to stop consuming: {', '.join(names)}")
            requests, records = self.factory.batches(count, 100)
            statuses = array("H", bytes(2 * count))
            res = self.load(requests, rate=None, connections=a.batch_connections, max_seconds=90,
                            on_response=_recorder(statuses, all_accepted=True))  # fmt: skip
        except BaseException:
            if paused:
                self.stack.resume_consumers()  # never leave the workers idle
            raise
        accepted = [rec for status, recs in zip(statuses, records, strict=True) if status == 202 for rec in recs]
        messages, _ = queue_depth(self.redis)
        refused = {code: n for code, n in res.statuses.items() if code != 202}
        say(f"  queued {len(accepted):,} events in {messages} messages ({res.wall_s:.1f} s)"
            f"{f'; not accepted: {refused}' if refused else ''}; resuming consumers")  # fmt: skip
        profiler: subprocess.Popen[bytes] | None = None
        self.meter.start()
        started = time.perf_counter()
        self.stack.resume_consumers()
        first_taken: float | None = None
        done: float | None = None
        next_note = started + 5
        while time.perf_counter() - started < 300:
            waiting, unacked = queue_depth(self.redis)
            now = time.perf_counter()
            if first_taken is None and (waiting < messages or unacked):
                first_taken = now
                if a.py_spy:
                    self.stack.processes.refresh()
                    profiler = self.py_spy("worker", [c.pids[0] for c in self.stack.processes.workers], 10)
            if waiting == 0 and unacked == 0:
                done = now
                break
            if now >= next_note:
                say(f"  draining: {waiting} messages waiting, {unacked} being written ({now - started:.0f} s)")
                next_note = now + 5
            self.stack.check_workers()
            time.sleep(0.02)
        usage = self.meter.stop()
        if profiler is not None:
            profiler.wait(60)
        check = self.verify(accepted, done is not None)
        taken = first_taken or started
        out = {
            "drain_events_per_s": round(len(accepted) / (done - taken), 1) if done else 0.0,
            "drain_events_per_s_incl_startup": round(len(accepted) / (done - started), 1) if done else 0.0,
            "drain_events": len(accepted),
            "drain_messages": messages,
            "drain_startup_s": round(taken - started, 2),
            "drain_s": None if done is None else round(done - taken, 2),
            "fill_api_events_per_s": round(len(accepted) / res.wall_s, 1),
            "fill_not_accepted": refused,
            # Batches taken by the API alone, workers paused: what one API process accepts.
            "api_batch_events_per_s": round(len(accepted) / res.wall_s, 1),
            "drain_cpu_ms_per_event": cpu_per_event(usage, len(accepted)),
            "drain_exactly_once": check.as_json(5),
            "drain_cpu": usage.as_json(),
        }
        say(f"  drained in {out['drain_s']} s after the first message was taken ({out['drain_startup_s']} s to "
            f"start): {out['drain_events_per_s']:,.0f} events/s")  # fmt: skip
        return out

    def lag(self) -> dict[str, Any]:
        a = self.args
        count = int(a.lag_rate * a.lag_s)
        say(f"phase 4/4 lag: {a.lag_rate:g} requests/s for {a.lag_s:g} s, polling every {a.lag_sample}th event")
        self.ensure_empty_queue()
        requests, records = self.factory.single(count, a.lag_rate)
        statuses = array("H", bytes(2 * count))
        poller = LagPoller(self.checker)
        sample = max(1, a.lag_sample)

        def on_response(index: int, status: int, body: bytes, at: float) -> None:
            statuses[index] = status
            if status == 202 and index % sample == 0:
                poller.inbox.put((records[index].event_id, at))

        poller.start()
        profiler = None
        if a.py_spy:
            profiler = self.py_spy("api", [c.pids[0] for c in self.stack.processes.api][:1], min(10.0, a.lag_s))
        self.meter.start()
        res = self.load(requests, rate=a.lag_rate, connections=a.connections, max_seconds=a.lag_s + 5,
                        on_response=on_response)  # fmt: skip
        poller.finish(timeout=30)
        drained_s = self.settle(60)
        usage = self.meter.stop()
        if profiler is not None:
            profiler.wait(60)
        check = self.verify(ok_records(statuses, records), drained_s is not None)
        lag = poller.summary()
        out = {
            "lag_p50_ms": lag["p50_ms"],
            "lag_p99_ms": lag["p99_ms"],
            "lag": lag,
            "lag_http": res.summary(),
            "lag_exactly_once": check.as_json(5),
            "lag_cpu": usage.as_json(),
        }
        say(f"  achieved {res.achieved_rps:.0f}/s (p99 {res.quantile_ms(0.99):.0f} ms); accepted -> readable: "
            f"p50 {lag['p50_ms']} ms, p99 {lag['p99_ms']} ms over {lag['samples']} samples")  # fmt: skip
        return out

    def cpu(self) -> dict[str, Any]:
        """CPU per single-event request, per role, at ``--cpu-rate``: from the first request until the queue is
        drained (every request's whole cost, the worker's and Cassandra's included), with nothing else running:
        no polling of Cassandra, unlike the lag phase."""
        a = self.args
        count = int(a.cpu_rate * a.cpu_s)
        say(f"phase cpu: {a.cpu_rate:g} single events/s for {a.cpu_s:g} s; CPU per request per role until drained")
        self.ensure_empty_queue()
        self.quiesce()
        requests, records = self.factory.single(count, a.cpu_rate)
        statuses = array("H", bytes(2 * count))
        self.meter.start()
        res = self.load(requests, rate=a.cpu_rate, connections=a.connections, max_seconds=a.cpu_s + 5,
                        on_response=_recorder(statuses))  # fmt: skip
        drained_s = self.settle(60)
        usage = self.meter.stop()
        accepted = ok_records(statuses, records)
        self.verify(accepted, drained_s is not None)
        per_request = cpu_per_event(usage, res.ok)
        out: dict[str, Any] = {
            "cpu_http": res.summary(),
            "cpu": usage.as_json(),
            "cpu_ms_per_request": per_request,
            **{f"cpu_{role}_ms_per_request": per_request.get(role) for role in CPU_ROLES},
        }
        say(f"  achieved {res.achieved_rps:.0f}/s (p99 {res.quantile_ms(0.99):.0f} ms), drained "
            f"+{drained_s if drained_s is not None else math.inf:.1f} s; CPU ms per request: "
            + ", ".join(f"{role} {ms:.3f}" for role, ms in per_request.items()))  # fmt: skip
        return out

    def memory(self) -> dict[str, Any]:
        procs = self.stack.processes
        procs.sample()
        api = procs.peaks_mb("api")
        workers = procs.peaks_mb("worker")
        cassandra = procs.peaks_mb("cassandra")
        redis_mb = procs.peaks_mb("redis")
        return {
            "api_rss_mb": round(max(api), 1) if api else None,
            "api_rss_mb_each": [round(v, 1) for v in api],
            "worker_rss_mb": round(max(workers), 1) if workers else None,
            "worker_rss_mb_each_instance": [round(v, 1) for v in workers],
            "cassandra_rss_mb": round(max(cassandra), 1) if cassandra else None,
            "redis_rss_mb": round(max(redis_mb), 1) if redis_mb else None,
        }

    def py_spy(self, role: str, pids: list[int], seconds: float) -> subprocess.Popen[bytes] | None:
        if not pids:
            return None
        ext = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}[self.args.py_spy_format]
        path = OUT / f"profile-{role}.{ext}"
        argv = [str(PROJECT / ".venv" / "bin" / "py-spy"), "record", "--pid", str(pids[0]), "--duration",
                str(max(1, int(seconds))), "--format", self.args.py_spy_format, "-o", str(path),
                "--subprocesses", "--nonblocking", "--gil"]  # fmt: skip
        say(f"  py-spy: recording the {role} (pid {pids[0]} and children) for {seconds:.0f} s into {path.name}")
        log = (OUT / f"py-spy-{role}.log").open("wb")
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def _recorder(statuses: array[int], all_accepted: bool = False, ok: int = 202) -> OnResponse:
    """Keep each request's status; with ``all_accepted``, an ``ok`` answer that rejected any event counts as 299."""

    def on_response(index: int, status: int, body: bytes, at: float) -> None:
        if all_accepted and status == ok and b'"rejected":0,' not in body:
            status = 299
        statuses[index] = status

    return on_response


def verdict(name: str, value: Any) -> str:
    op, target = TARGETS[name]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    met = value >= target if op == ">=" else value <= target
    return "met" if met else "MISSED"


def print_table(summary: dict[str, Any]) -> None:
    offered = summary["parameters"]["lag_rate"]
    achieved = summary.get("lag_http", {}).get("achieved_rps")
    lag_note = f"at {achieved:,.0f} req/s achieved ({offered:,.0f} offered)" if achieved else ""
    rows = [
        ("ceiling_events_per_s", "write ceiling, driver alone (events/s)", "2 processes, 64 in flight"),
        ("ceiling_with_read_events_per_s", "  the same, with first-write-wins read", "what the read costs"),
        ("drain_events_per_s", "worker drain into Cassandra (events/s)", ""),
        ("drain_ratio", "drain / ceiling", ""),
        ("batch_events_per_s", "batch endpoint, end to end (events/s)", ""),
        ("batch_ratio", "batch end to end / ceiling", ""),
        ("api_batch_events_per_s", "API alone, batches, workers paused (ev/s)", ""),
        ("sdk_batch_events_per_s", "Segment-format batches, end to end (ev/s)", "POST /v1/batch of 100"),
        ("sdk_batch_ratio", "Segment-format / native batches", f"at the API: {summary.get('sdk_batch_api_ratio')}"),
        ("single_rps", "single events, p99 bar, end to end (req/s)", f"p99 {summary.get('single_p99_ms')} ms"),
        ("single_max_rps", "single events, highest sustained (req/s)", "any latency"),
        ("single_p50_ms_at_100", "single events at 100/s, p50 (ms)", ""),
        ("single_p99_ms_at_100", "single events at 100/s, p99 (ms)", ""),
        ("wait_single_p50_ms_at_100", "  a replica confirming: p50 at 100/s (ms)", "SLUICE_REDIS_MIN_REPLICAS=1"),
        ("node_single_p50_ms_at_100", "    one node, measured beside it (ms)", ""),
        ("wait_p50_at_100_ratio", "    replica / one node, p50 at 100/s", "the price of WAIT"),
        ("wait_single_p99_ms_at_100", "  a replica confirming: p99 at 100/s (ms)", ""),
        ("node_single_p99_ms_at_100", "    one node, measured beside it (ms)", ""),
        ("wait_single_rps", "  a replica confirming: p99 bar (req/s)", f"p99 {summary.get('wait_single_p99_ms')} ms"),
        ("node_single_rps", "    one node, step by step beside it", f"p99 {summary.get('node_single_p99_ms')} ms"),
        ("wait_single_rps_ratio", "    replica / one node, p99 bar", "the price of WAIT"),
        ("lag_p50_ms", "accepted -> readable p50 (ms)", lag_note),
        ("lag_p99_ms", "accepted -> readable p99 (ms)", lag_note),
        ("api_rss_mb", "API peak RSS per process (MB)", ""),
        ("worker_rss_mb", "worker peak RSS, main + pool (MB)", ""),
        ("cassandra_rss_mb", "Cassandra peak RSS (MB)", ""),
        *[
            (
                f"cpu_{role}_ms_per_request",
                f"CPU per single request, {role} (ms)",
                f"at {summary['parameters']['cpu_rate']:,.0f} req/s" if role == "api" else "",
            )
            for role in CPU_ROLES
        ],
        ("lost", "events lost", f"of {summary.get('checked', 0):,} checked"),
        ("duplicated", "events duplicated", ""),
    ]
    print()
    print(f"{'figure':<42} {'measured':>12}  {'target':<10} {'':<7} note")
    print("-" * 100)
    for key, label, note in rows:
        value = summary.get(key)
        if value is None:
            shown = "-"
        elif key.endswith(("_ratio", "_ms_per_request")):
            shown = f"{value:.3f}"
        else:
            shown = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
        if key in TARGETS:
            op, target = TARGETS[key]
            target_text, met = f"{op} {target:,g}", verdict(key, value)
        else:
            target_text, met = "", ""
        print(f"{label:<42} {shown:>12}  {target_text:<10} {met:<7} {note}")
    print("-" * 100)
    for phase in ("drain", "batch", "ceiling", "ceiling_with_read", "cpu"):
        per_event = summary.get(f"{phase}_cpu_ms_per_event" if phase != "cpu" else "cpu_ms_per_request")
        if per_event:
            shares = ", ".join(f"{role} {ms:.3f}" for role, ms in per_event.items())
            print(f"CPU ms per event, {phase}: {shares}")
    print(flush=True)


def cpu_per_event(usage: Any, events: int) -> dict[str, float]:
    """Milliseconds of CPU per event for each role (cores busy x wall time / events)."""
    if not events:
        return {}
    return {role: round(cores * usage.wall_s * 1000 / events, 4) for role, cores in usage.cores.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loopback_target(args.host)
    api_key = resolve_api_key(args.api_key)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    OUT.mkdir(parents=True, exist_ok=True)
    raise_on_sigterm()
    started = time.monotonic()
    config = StackConfig(api_key=api_key, api_workers=args.api_workers,
                         worker_concurrency=args.worker_concurrency, worker_procs=args.worker_procs)  # fmt: skip
    stack = Stack(config, OUT)
    bench: Bench | None = None
    try:
        stack.start()
        described = stack.describe()
        say("configuration: " + ", ".join(f"{k}={v}" for k, v in described.items()))
        if stack.external and (args.api_workers or args.worker_concurrency or args.worker_procs != 1):
            say("note: --api-workers/--worker-concurrency/--worker-procs only apply to a stack this run starts")
        bench = Bench(args, stack, api_key)
        summary: dict[str, Any] = {
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": command_line("bench"),
            "configuration": described,
            "code": code_state(),
            "parameters": {k: v for k, v in vars(args).items() if k != "api_key"},
            "machine": {"cpus": _cpus(), "note": "load generator, API, workers, Redis and Cassandra share it"},
        }
        summary["jit_warm_up"] = bench.warmup()
        warm = time.monotonic()  # --budget-s counts from here: the JIT's warm-up takes what it takes
        summary |= bench.p50_at_100()
        # What the later phases need, kept back from the stepped search: drain + batch + lag + stopping.
        reserve = 60 + 2 * args.batch_s + args.lag_s + 40
        if "single" not in skip:
            summary |= bench.single(deadline=warm + args.budget_s - reserve)
        if "ceiling" not in skip:
            summary |= bench.ceiling(args.ceiling_events or args.fill_events)
        if "drain" not in skip:
            summary |= bench.drain()
        if summary.get("ceiling_events_per_s"):
            summary["drain_ratio"] = round(summary.get("drain_events_per_s", 0.0) / summary["ceiling_events_per_s"], 3)
        if "batch" not in skip:
            summary |= bench.batch(summary.get("drain_events_per_s"))
            if summary.get("ceiling_events_per_s"):
                summary["batch_ratio"] = round(summary["batch_events_per_s"] / summary["ceiling_events_per_s"], 3)
        if "sdk" not in skip and "batch" not in skip:
            summary |= bench.sdk_rounds(summary, args.sdk_rounds)
        if "lag" not in skip:
            summary |= bench.lag()
        if "cpu" not in skip:
            summary |= bench.cpu()
        if "replica" not in skip:
            summary |= bench.replica([s["target_rps"] for s in summary.get("steps", [])])
        summary |= bench.memory()
        summary |= {"lost": bench.lost, "duplicated": bench.duplicated, "checked": bench.checked,
                    "unexpected": bench.unexpected, "conflicting": bench.conflicting}  # fmt: skip
        summary["targets"] = {k: {"target": f"{op} {t:g}", "verdict": verdict(k, summary.get(k))}
                              for k, (op, t) in TARGETS.items()}  # fmt: skip
        summary["took_s"] = round(time.monotonic() - started, 1)
        (OUT / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        print_table(summary)
        say(f"figures written to {(OUT / 'summary.json').relative_to(PROJECT)} ({summary['took_s']:.0f} s)")
        return 0 if not (bench.lost or bench.duplicated or bench.unexpected or bench.conflicting) else 1
    except KeyboardInterrupt:
        say("interrupted: stopping what this run started")
        return 130
    except (StackError, subprocess.CalledProcessError, ConnectionError) as exc:
        say(f"error: {exc}")
        return 1
    finally:
        ignore_signals()
        if bench is not None:
            bench.close()
        stack.stop()
        say(f"done in {time.monotonic() - started:.0f} s")


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
