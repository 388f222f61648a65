"""The project's own launcher for its real servers: Debian's redis-server and Apache Cassandra 5.0.

Used by ``make up`` (``sluice dev up``, devstack/run.py) and by the test suite alike; devstack/services.py
starts our own API and workers. Each profile has its own ports
and data folder under ``.data/``, so a test run never collides with a running ``make up``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from devstack._cassandra import CASSANDRA_VERSION, cassandra_process, fetch_jars, start_cassandra
from devstack._proc import ManagedProcess, StackError, say
from devstack._redis import redis_process, start_redis

__all__ = [
    "CASSANDRA_VERSION", "PROFILES", "Profile", "Servers", "StackError", "fetch_jars", "redis_process", "say",
    "start_redis",
]  # fmt: skip

PROJECT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Profile:
    name: str
    redis_port: int
    cassandra_port: int
    storage_port: int
    jmx_port: int
    api_port: int
    heap_mb: int = 1024
    redis_maxmemory: str = "1gb"

    @property
    def root(self) -> Path:
        return Path(os.environ.get("SLUICE_DATA_DIR", PROJECT / ".data")) / self.name

    @property
    def cache(self) -> Path:
        return Path(os.environ.get("SLUICE_CACHE_DIR", PROJECT / ".cache"))

    def service_env(self) -> dict[str, str]:
        """Environment for API and worker processes that talk to this profile's servers."""
        return {
            "SLUICE_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "SLUICE_CASSANDRA_CONTACT_POINTS": "127.0.0.1",
            "SLUICE_CASSANDRA_PORT": str(self.cassandra_port),
        }


#: ``SLUICE_PORT_OFFSET=N`` shifts every port of every profile by N, so two clones on one machine (each with
#: its own ``.data/``) can run their servers and tests side by side.
_O = int(os.environ.get("SLUICE_PORT_OFFSET", "0"))

PROFILES = {
    "dev": Profile(
        "dev", redis_port=6380 + _O, cassandra_port=9042 + _O, storage_port=7000 + _O, jmx_port=7199 + _O,
        api_port=8000 + _O,
    ),
    "test": Profile(
        "test", redis_port=16380 + _O, cassandra_port=19042 + _O, storage_port=17000 + _O, jmx_port=17199 + _O,
        api_port=18000 + _O, heap_mb=768, redis_maxmemory="512mb",
    ),
    # The randomized fault run (make chaos, tests/test_chaos.py): it kills Redis and freezes Cassandra, so it
    # gets servers, ports and a data folder of its own and never disturbs a test run beside it.
    "chaos": Profile(
        "chaos", redis_port=26380 + _O, cassandra_port=29042 + _O, storage_port=27000 + _O, jmx_port=27199 + _O,
        api_port=28000 + _O, heap_mb=768, redis_maxmemory="512mb",
    ),
}  # fmt: skip


@dataclass
class Servers:
    """Redis and Cassandra for one profile: ``start()`` waits until both answer; ``stop()`` stops both."""

    profile: Profile
    fresh: bool = False
    redis: ManagedProcess | None = field(default=None, init=False)
    cassandra: ManagedProcess | None = field(default=None, init=False)
    timings: dict[str, float] = field(default_factory=dict, init=False)

    def start(self) -> Servers:
        p = self.profile
        if self.fresh:
            self._stop_stale()
            shutil.rmtree(p.root, ignore_errors=True)
        p.root.mkdir(parents=True, exist_ok=True)
        try:
            self.redis = redis_process(p.root, p.redis_port, p.redis_maxmemory)
            self.timings["redis"] = start_redis(self.redis, p.redis_port)
            self.cassandra = cassandra_process(
                p.root, p.cache, profile=p.name, native_port=p.cassandra_port,
                storage_port=p.storage_port, jmx_port=p.jmx_port, heap_mb=p.heap_mb,
            )  # fmt: skip
            self.timings["cassandra"] = start_cassandra(self.cassandra, p.cassandra_port)
        except BaseException:
            self.stop()
            raise
        return self

    def _stop_stale(self) -> None:
        from devstack._proc import stop_pidfile

        run = self.profile.root / "run"
        stop_pidfile(run / "cassandra.pid", "cassandra", str(self.profile.root / "cassandra" / "conf"))
        stop_pidfile(run / "redis.pid", "redis", f"127.0.0.1:{self.profile.redis_port}")

    def stop(self) -> None:
        # Cassandra first: it may still be flushing writes a worker made; Redis holds nothing it needs.
        for proc in (self.cassandra, self.redis):
            if proc is not None and proc.alive():
                say(f"stopping {proc.name} (SIGTERM)")
                proc.stop(timeout=60)
