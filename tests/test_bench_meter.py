"""The bench's CPU meter finds a real JVM's JIT compiler threads (loadtests/procs.py): the bench warms
Cassandra until they are quiet before it measures CPU per request (docs/performance.md)."""

from __future__ import annotations

from cassandra.cluster import Session

from devstack import Profile
from loadtests.procs import JIT_ROLE, StackProcesses, cpu_seconds, jit_cpu_seconds, listening_pids


def test_the_jit_compilers_of_a_running_cassandra_are_found_and_part_of_its_cpu(
    cassandra: Session, profile: Profile
) -> None:
    [pid] = listening_pids(profile.cassandra_port)
    # A started Cassandra has compiled code (it answered the schema's statements): some of its time is the JIT's.
    jit = jit_cpu_seconds(pid)
    assert 0 < jit < cpu_seconds(pid)
    procs = StackProcesses(api_port=profile.api_port, redis_port=profile.redis_port,
                           cassandra_port=profile.cassandra_port)  # fmt: skip
    procs.refresh()
    roles = procs.cpu_by_role()
    assert jit <= roles[JIT_ROLE] < roles["cassandra"]
    # Not a JVM: no compiler threads.
    [redis_pid] = listening_pids(profile.redis_port)
    assert jit_cpu_seconds(redis_pid) == 0
