"""The ring: three Cassandra nodes (compose.ring.yaml), keyspace at RF 3, API and worker at LOCAL_QUORUM,
under 200 requests/s for 60 s. One node is killed (SIGKILL, ``docker kill``) for 30 s and started again, then
separately one node is killed for good. Nothing acknowledged is lost or stored twice, the API keeps answering
202, and the node that came back catches up; the test says whether hinted handoff did it or repair was needed.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.policies import WhiteListRoundRobinPolicy

from devstack import PROJECT
from tests.containers.conftest import Compose, cassandra_session, say
from tests.containers.load import Load, SteadyLoad, check, read_rows
from tests.support import TEST_KEY, wait_until

pytestmark = [pytest.mark.containers, pytest.mark.timeout(900)]

RATE = 200
DURATION_S = 60
#: How long the returning node gets to catch up from hints alone before the test repairs it (and says so).
HINTS_WAIT_S = 120
#: How long after a repair the node gets to answer with every event (a busy machine reads slowly).
REPAIRED_WAIT_S = 120
FIGURES = PROJECT / "build" / "containers" / "ring-figures.json"


def node_session(ip: str) -> tuple[Cluster, Session]:
    """A session that talks to one node only: with CL ONE, what that node itself holds."""
    profile = ExecutionProfile(
        load_balancing_policy=WhiteListRoundRobinPolicy([ip]), consistency_level=ConsistencyLevel.ONE,
        request_timeout=20,
    )  # fmt: skip
    # A node just back answers CQL while it still replays its commit log and takes hints: its first connections
    # can time out on a busy machine (seen in CI), so connecting is retried for a while.
    deadline = time.monotonic() + 90
    while True:
        cluster = Cluster([ip], execution_profiles={EXEC_PROFILE_DEFAULT: profile}, protocol_version=5,
                          connect_timeout=20)  # fmt: skip
        try:
            return cluster, cluster.connect("sluice")
        except NoHostAvailable:
            cluster.shutdown()
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def hint_files(container: str) -> int:
    """Hint files a node holds for its peers: written while a replica is down, deleted once delivered.

    Read from the hints folder (the same path in the official image and ours): Cassandra 5.0's
    system_views.pending_hints listed nothing here while the folder held hints.
    """
    out = subprocess.run(
        ["docker", "exec", container, "sh", "-c", "ls /var/lib/cassandra/hints"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    return sum(1 for name in out.split() if name.endswith(".hints"))


def record(name: str, figures: dict[str, Any]) -> None:
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    FIGURES.write_text(json.dumps(known | {name: figures}, indent=2))
    say(f"{name}: {figures}")


@pytest.fixture(scope="module")
def ips(ring: Compose) -> dict[str, str]:
    return {name: ring.ip(name) for name in ("cassandra", "cassandra2", "cassandra3")}


@pytest.fixture(scope="module")
def session(ring: Compose, ips: dict[str, str]) -> Iterator[Session]:
    cluster, session = cassandra_session(list(ips.values()))
    # CL ONE reads of the returning node must be answered from its own data, not raced to a faster replica.
    for table in ("events_by_id", "events_by_listing_day"):
        session.execute(f"ALTER TABLE {table} WITH speculative_retry = 'NONE'")
    yield session
    cluster.shutdown()


def test_ring_has_three_nodes_and_replication_factor_3(session: Session, ips: dict[str, str]) -> None:
    cluster, node1 = node_session(ips["cassandra"])  # peers and local from one and the same node
    try:
        peers = {str(r.peer) for r in node1.execute("SELECT peer FROM system.peers")}
        local = node1.execute("SELECT broadcast_address FROM system.local").one().broadcast_address
    finally:
        cluster.shutdown()
    assert peers | {str(local)} == set(ips.values())
    replication = (
        session.execute("SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = 'sluice'")
        .one()
        .replication
    )
    assert replication["class"].endswith("NetworkTopologyStrategy")
    assert replication["datacenter1"] == "3"


def assert_api_kept_answering(load: Load, seconds: float) -> None:
    # The load really was RATE requests/s (an open loop falls behind only if this machine starves it).
    assert load.sent_requests >= 0.9 * RATE * seconds, f"only {load.sent_requests} requests in {seconds:.0f} s"
    # Timeouts are the client's "unknown" (counted, never judged as lost); the API must have answered nearly all.
    assert load.requests["202"] >= 0.99 * load.sent_requests, f"the API did not keep answering: {load.requests}"
    assert not load.bad_answers, f"answers other than 202 or 503 with Retry-After: {load.bad_answers[:5]}"
    refused = [f for f in load.history.failed.values() if f.status != 503 or not f.code.startswith("queue_")]
    assert not refused, f"{len(refused)} events refused without Redis being at fault, e.g. {refused[:2]}"


def test_node_killed_for_30_s_comes_back_and_catches_up(ring: Compose, session: Session, ips: dict[str, str]) -> None:
    (node3,) = ring.ids("cassandra3")
    samples: list[tuple[float, int]] = []
    sampling = threading.Event()
    peers = ring.ids("cassandra") + ring.ids("cassandra2")

    def sample_hints() -> None:  # hints the two other nodes hold, every 3 s, from the kill until the end
        while not sampling.wait(3):
            try:
                samples.append((time.monotonic(), sum(hint_files(peer) for peer in peers)))
            except Exception as exc:  # a sample may fail while the ring is busy; the next one counts
                say(f"  hint sample failed: {exc!r}")

    sampler = threading.Thread(target=sample_hints, daemon=True)
    try:
        with SteadyLoad(ring.base_url, TEST_KEY, rate=RATE, batch_every=20, batch_size=5) as load:
            time.sleep(10)
            say("ring: docker kill cassandra3")
            subprocess.run(["docker", "kill", node3], check=True, capture_output=True)
            killed = time.monotonic()
            sampler.start()
            time.sleep(30)
            say("ring: docker start cassandra3")
            subprocess.run(["docker", "start", node3], check=True, capture_output=True)
            started = time.monotonic()
            time.sleep(max(0.0, DURATION_S - 40))
        node3_ip = ring.ip("cassandra3")
        wait_until(lambda: _cql_up(node3_ip), 180, "cassandra3 to serve CQL again", every=1)
        back = time.monotonic()

        # First the ring as a whole, at LOCAL_QUORUM: every acknowledged event stored once, nothing refused yet
        # stored. Only then is the node's catch-up judged: an event the worker has not written yet (it may still be
        # retrying what the dead node failed) is missing on every node, and no hint or repair could bring it.
        figures = check(load.load, session)
        assert_api_kept_answering(load.load, DURATION_S)

        # Catch-up: every acknowledged event read from cassandra3 alone (CL ONE, whitelisted), both tables.
        cluster, local = node_session(node3_ip)
        try:
            missing = set(load.load.history.ok)
            rounds: list[int] = []

            def caught_up() -> bool:
                nonlocal missing
                rows = read_rows(local, load.load, missing, ConsistencyLevel.ONE)
                missing = {i for i in missing if not (rows.by_id[i] and rows.by_listing[i])}
                rounds.append(len(missing))
                return not missing

            how = "hinted handoff"
            try:
                wait_until(caught_up, HINTS_WAIT_S, "cassandra3 to hold every acknowledged event", every=2)
            except AssertionError:
                # Hints did not bring it all (seen once in five runs: 7 of 14,600 events). Repair must. A full
                # repair, not 5.0's default incremental one: it compares every row, whatever was marked repaired, and
                # a busy machine's compactions cannot make it skip sstables.
                how = f"hinted handoff, then repair for {len(missing)} events hints had not brought"
                say(f"ring: {len(missing)} events still missing on cassandra3 after {HINTS_WAIT_S} s: nodetool repair")
                repair = subprocess.run(["docker", "exec", node3, "nodetool", "repair", "--full", "sluice"],
                                        capture_output=True, text=True, timeout=600)  # fmt: skip
                last = (repair.stdout + repair.stderr).strip().splitlines()[-1:]  # its verdict; the ranges go before
                say(f"ring: nodetool repair exit {repair.returncode}: {last[0][-300:] if last else ''}")
                assert repair.returncode == 0, "nodetool repair failed"
                try:
                    wait_until(
                        caught_up, REPAIRED_WAIT_S, "cassandra3 to hold every acknowledged event after repair", 2
                    )
                except AssertionError as exc:  # which events, so the next look starts from them
                    raise AssertionError(f"{exc}: still missing {len(missing)}, e.g. {sorted(missing)[:3]}") from None
            done = time.monotonic()
        finally:
            cluster.shutdown()
    finally:  # the sampler stops whatever failed: a check's failure must not leave it sampling
        sampling.set()
        if sampler.is_alive():
            sampler.join()
    hint_peak = max((n for _, n in samples), default=0)
    drained = next((t for t, n in samples if t > started and n == 0), None)
    record(
        "node_killed_30s",
        figures
        | {
            "answers": dict(load.load.requests),
            "down_s": round(started - killed, 1),
            "restart_to_cql_s": round(back - started, 1),
            "caught_up_after_cql_s": round(done - back, 1),
            "caught_up_after_restart_s": round(done - started, 1),
            "missing_on_node_at_first_read": rounds[0] if rounds else None,
            "hint_files_peak": hint_peak,
            "hints_drained_after_restart_s": round(drained - started, 1) if drained else None,
            "caught_up_by": how,
        },
    )
    assert hint_peak > 0, "the other nodes stored no hints for the dead node: was it really down?"


def test_node_gone_for_good_loses_nothing(ring: Compose, session: Session) -> None:
    (node3,) = ring.ids("cassandra3")
    with SteadyLoad(ring.base_url, TEST_KEY, rate=RATE, batch_every=20, batch_size=5) as load:
        time.sleep(5)
        say("ring: docker kill cassandra3, for good")
        subprocess.run(["docker", "kill", node3], check=True, capture_output=True)
        time.sleep(DURATION_S - 5)
    figures = check(load.load, session)
    assert_api_kept_answering(load.load, DURATION_S)
    record("node_gone_for_good", figures | {"answers": dict(load.load.requests)})


def _cql_up(ip: str) -> bool:
    try:
        cluster, s = node_session(ip)
    except Exception:
        return False
    try:
        return s.execute("SELECT release_version FROM system.local").one() is not None
    finally:
        cluster.shutdown()
