"""Debian's redis-server, run with AOF on, its own port and data folder, and no eviction."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import redis

from devstack._proc import ManagedProcess, StackError, say

REDIS_PACKAGE = "redis-server"


def find_redis_server() -> str:
    """Path of redis-server; installs Debian's package when it is missing and we may (root with apt-get)."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackError(
            "redis-server is not installed. Install Debian's package and re-run: sudo apt-get install -y redis-server"
        )
    say("redis-server is missing: installing Debian's redis-server package (apt-get) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", REDIS_PACKAGE]):
        if subprocess.run(argv, env=env, check=False).returncode != 0:
            raise StackError(f"installing redis-server failed at: {' '.join(argv)} (output above)")
    found = shutil.which("redis-server")
    if not found:
        raise StackError("apt-get installed redis-server but it is not on PATH")
    return found


def redis_process(root: Path, port: int, maxmemory: str, *, replica_of: int | None = None) -> ManagedProcess:
    """Redis on 127.0.0.1:``port``; with ``replica_of``, a replica of the Redis on that local port."""
    data = root / "redis"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        find_redis_server(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--protected-mode", "yes",
        "--dir", str(data),
        "--daemonize", "no",
        # Durability: every write goes to the append-only file and is fsynced before Redis answers (group
        # commit: one fsync per event-loop round, and the API packs many events per message). With
        # "everysec", a fsync that stalls lets Redis answer writes it has not yet written to the file, and
        # a crash then loses them (see docs/guarantees.md).
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--save", "",
        # Queued events must never be evicted: when full, Redis refuses writes and the API answers 503.
        "--maxmemory", maxmemory,
        "--maxmemory-policy", "noeviction",
        "--loglevel", "notice",
    ]  # fmt: skip
    if replica_of is not None:
        argv += ["--replicaof", "127.0.0.1", str(replica_of)]
    return ManagedProcess(
        "redis",
        argv,
        log_path=root / "logs" / "redis.log",
        pid_path=root / "run" / "redis.pid",
        # Redis rewrites its process title to "redis-server 127.0.0.1:PORT".
        marker=f"127.0.0.1:{port}",
    )


def start_redis(proc: ManagedProcess, port: int) -> float:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)

    def pings() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    say(f"starting redis on 127.0.0.1:{port} (log: {proc.log_path})")
    proc.start()
    try:
        took = proc.wait_ready(pings, timeout=30, what="answering PING")
    finally:
        client.close()
    say(f"redis ready in {took:.1f} s")
    return took
