"""Finding the stack's processes and reading their memory and CPU from /proc (Linux only, no psutil).

Processes are found by what they do, not by name, so this works for a stack we started and for one that was
already running: the API is whoever holds the listening socket of its port (uvicorn's supervisor and its
workers all do); a worker instance is a ``sluice worker`` / celery process with a connection to the
Redis port, plus its pool children; Cassandra and Redis are whoever listens on their ports.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from devstack.services import cmdline, service_role

PROC = Path("/proc")
#: The role under which cpu_by_role reports Cassandra's JIT compilers (their share of "cassandra").
JIT_ROLE = "cassandra's JIT compilers (of cassandra)"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _hex_port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1], 16)


def _socket_inodes(port: int, *, listening: bool) -> set[str]:
    """Inodes of TCP sockets listening on ``port`` (or connected to a remote ``port``)."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
            wanted_state, addr = ("0A", local) if listening else ("01", remote)
            if state == wanted_state and _hex_port(addr) == port:
                inodes.add(inode)
    return inodes


def _pids_with_sockets(inodes: set[str]) -> set[int]:
    if not inodes:
        return set()
    wanted = {f"socket:[{inode}]" for inode in inodes}
    pids: set[int] = set()
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    pids.add(int(entry.name))
                    break
        except OSError:
            continue
    return pids


def listening_pids(port: int) -> set[int]:
    return _pids_with_sockets(_socket_inodes(port, listening=True))


def connected_pids(remote_port: int) -> set[int]:
    return _pids_with_sockets(_socket_inodes(remote_port, listening=False))


def parent_of(pid: int) -> int:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and parent_of(int(entry.name)) == pid:
            found.append(int(entry.name))
    return found


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmHWM = peak RSS, VmRSS = current RSS); 0 if gone."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (its own threads, not its children)."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


#: The names (comm, cut to 15 characters) of a JVM's JIT compiler threads.
_JIT_THREADS: tuple[str, ...] = ("C1 CompilerThre", "C2 CompilerThre")


def jit_cpu_seconds(pid: int) -> float:
    """CPU time the JIT compiler threads of JVM ``pid`` have used so far: compiling hot code, a cost of warming
    up, not of each request. (The JVM stops compiler threads it no longer needs, and their time goes with them,
    so this only ever undercounts.)"""
    total = 0
    try:
        tasks = list(os.scandir(PROC / str(pid) / "task"))
    except OSError:
        return 0.0
    for task in tasks:
        try:
            text = Path(task.path, "stat").read_text()
        except OSError:
            continue
        if text[text.index("(") + 1 : text.rindex(")")].startswith(_JIT_THREADS):
            fields = text.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in (PROC / "stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / _CLK_TCK, total / _CLK_TCK


@dataclass
class Component:
    """A named group of processes (e.g. one worker instance: its main process and its pool children)."""

    name: str
    pids: list[int] = field(default_factory=list)
    #: Highest VmHWM seen per pid, so peaks of processes that were since restarted are kept.
    peak_kb: dict[int, int] = field(default_factory=dict)

    def sample(self) -> None:
        for pid in self.pids:
            hwm = status_kb(pid, "VmHWM")
            if hwm:
                self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), hwm)

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def rss_mb(self) -> float:
        return sum(status_kb(pid, "VmRSS") for pid in self.pids) / 1024


@dataclass
class StackProcesses:
    """The stack's processes grouped by role; ``refresh()`` finds them again after a restart."""

    api_port: int
    redis_port: int
    cassandra_port: int
    api: list[Component] = field(default_factory=list)
    workers: list[Component] = field(default_factory=list)
    cassandra: Component = field(default_factory=lambda: Component("cassandra"))
    redis: Component = field(default_factory=lambda: Component("redis"))
    _history: dict[str, Component] = field(default_factory=dict)

    def refresh(self, exclude: Iterable[int] = ()) -> None:
        skip = {os.getpid(), *exclude}
        self.api = [self._keep(Component(f"api pid {pid}", [pid])) for pid in sorted(listening_pids(self.api_port))]
        self.cassandra = self._keep(Component("cassandra", sorted(listening_pids(self.cassandra_port))))
        self.redis = self._keep(Component("redis", sorted(listening_pids(self.redis_port))))
        api_pids = {pid for c in self.api for pid in c.pids}
        mains: set[int] = set()
        for pid in connected_pids(self.redis_port) - skip - api_pids:
            if not _is_worker(cmdline(pid)):
                continue
            # A pool child that talks to Redis itself (dead letters) belongs to its parent's instance.
            parent = parent_of(pid)
            mains.add(parent if _is_worker(cmdline(parent)) else pid)
        self.workers = [
            self._keep(Component(f"worker pid {main}", [main, *sorted(children_of(main))])) for main in sorted(mains)
        ]

    def _keep(self, component: Component) -> Component:
        """Carry over the peaks already seen for the same pids."""
        for old in self._history.values():
            for pid in component.pids:
                if pid in old.peak_kb:
                    component.peak_kb[pid] = old.peak_kb[pid]
        self._history[f"{component.name}:{','.join(map(str, component.pids))}"] = component
        return component

    def all(self) -> list[Component]:
        return [*self.api, *self.workers, self.cassandra, self.redis]

    def sample(self) -> None:
        for component in self.all():
            component.sample()

    def peaks_mb(self, prefix: str) -> list[float]:
        """Peak RSS (sum over a component's processes) of each component ever seen whose name starts so."""
        seen: dict[str, float] = {}
        for key, comp in self._history.items():
            if comp.name.startswith(prefix):
                total = sum(comp.peak_kb.values()) / 1024
                seen[key] = max(seen.get(key, 0.0), total)
        return sorted(seen.values(), reverse=True)

    def cpu_by_role(self) -> dict[str, float]:
        return {
            "api": sum(c.cpu() for c in self.api),
            "worker": sum(c.cpu() for c in self.workers),
            "cassandra": self.cassandra.cpu(),
            "redis": self.redis.cpu(),
            # Part of "cassandra" (not added to the machine's total twice): see jit_cpu_seconds.
            JIT_ROLE: sum(jit_cpu_seconds(pid) for pid in self.cassandra.pids),
        }


def describe(components: Iterable[Component]) -> str:
    return "; ".join(f"{c.name} ({len(c.pids)} processes)" for c in components)


def _is_worker(line: str) -> bool:
    return service_role(line) == "worker" or "celery" in line
