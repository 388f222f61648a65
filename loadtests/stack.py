"""The stack under test: the one answering on 127.0.0.1:8000, or one we start (and always stop) ourselves.

Starting reuses devstack: Redis and Cassandra of the ``dev`` profile (reused when both already answer), the
schema (``sluice schema apply``), then workers and the API through the service launcher
(devstack/services.py), logging to files under ``build/<command>/logs/``. Their pids are kept in
``build/<command>/run/`` so that a run killed hard does not leave an API behind that the next run would
mistake for someone else's stack.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import redis

from devstack import PROFILES, Servers
from devstack.services import Service, apply_schema, start_api, start_worker, stop_leftovers, stop_services
from loadtests.common import PROJECT, say
from loadtests.procs import StackProcesses
from sluice import keys

PROFILE = PROFILES["dev"]
API_BASE = f"http://127.0.0.1:{PROFILE.api_port}"
REDIS_URL = f"redis://127.0.0.1:{PROFILE.redis_port}/0"


def api_answers(base: str = API_BASE, timeout: float = 1.0) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _redis_answers() -> bool:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _cassandra_answers() -> bool:
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import WhiteListRoundRobinPolicy

    profile = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy(["127.0.0.1"]), request_timeout=3)
    cluster = Cluster(
        ["127.0.0.1"],
        port=PROFILE.cassandra_port,
        connect_timeout=2,
        control_connection_timeout=2,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
    )
    try:
        cluster.connect().execute("SELECT release_version FROM system.local")
        return True
    except Exception:  # noqa: BLE001 - any failure means "not there"
        return False
    finally:
        cluster.shutdown()


@dataclass
class StackConfig:
    api_key: str
    #: None: the project's defaults (SLUICE_API_WORKERS / SLUICE_WORKER_CONCURRENCY unset).
    api_workers: int | None = None
    worker_concurrency: int | None = None
    worker_procs: int = 1
    log_level: str = "INFO"


class Stack:
    """Use the running stack, or start one; ``with Stack(...) as stack:`` stops whatever it started."""

    def __init__(self, config: StackConfig, out_dir: Path) -> None:
        self.config = config
        self.log_dir = out_dir / "logs"
        self.run_dir = out_dir / "run"
        self.external = False
        self.servers: Servers | None = None
        self.api: Service | None = None
        self.workers: list[Service] = []
        self.processes = StackProcesses(PROFILE.api_port, PROFILE.redis_port, PROFILE.cassandra_port)
        self.env = {
            **os.environ,
            **PROFILE.service_env(),
            "SLUICE_API_PORT": str(PROFILE.api_port),
            "SLUICE_API_KEYS": config.api_key,
            "SLUICE_LOG_LEVEL": config.log_level,
            # The per-key rate limit (10,000 events/s by default) protects a shared API from one client; here it
            # would cap what the runs measure (it capped the drain's fill at 10,000 events a second).
            "SLUICE_RATE_LIMIT_PER_S": os.environ.get("SLUICE_RATE_LIMIT_PER_S", "10000000"),
        }
        if config.api_workers is not None:
            self.env["SLUICE_API_WORKERS"] = str(config.api_workers)
        if config.worker_concurrency is not None:
            self.env["SLUICE_WORKER_CONCURRENCY"] = str(config.worker_concurrency)

    # --- life cycle ------------------------------------------------------------------------------------
    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        stop_leftovers(self.run_dir)
        if api_answers():
            self.external = True
            say(f"using the stack already answering on {API_BASE} (started elsewhere; it is left running)")
            self.processes.refresh()
            return
        started = time.monotonic()
        say(f"no API answers on {API_BASE}: starting a stack (logs in {self.log_dir.relative_to(PROJECT)}/)")
        if _redis_answers() and _cassandra_answers():
            say(f"Redis :{PROFILE.redis_port} and Cassandra :{PROFILE.cassandra_port} already answer; reusing them")
        else:
            self.servers = Servers(PROFILE).start()
        apply_schema(self.env)
        self.start_workers()
        self.start_api()
        say(f"stack up in {time.monotonic() - started:.0f} s")
        self.processes.refresh()

    def stop(self) -> None:
        stop_services([*([self.api] if self.api else []), *self.workers])
        self.api = None
        self.workers = []
        if self.servers is not None:
            self.servers.stop()
            self.servers = None

    def start_api(self) -> None:
        say(f"starting the API ({self.env.get('SLUICE_API_WORKERS', '1')} process(es))")
        self.api = start_api("api", self.env, self.log_dir, port=PROFILE.api_port, run_dir=self.run_dir)
        # With several uvicorn workers, /healthz answers as soon as the first is up: give the rest a moment.
        if (self.config.api_workers or 1) > 1:
            time.sleep(2)

    def start_workers(self) -> None:
        self.spawn_workers()
        self.wait_workers_ready()

    def spawn_workers(self) -> None:
        """Start the worker processes without waiting for them (the drain phase times them from here)."""
        concurrency = self.env.get("SLUICE_WORKER_CONCURRENCY", "2")
        for i in range(self.config.worker_procs):
            worker = start_worker(f"worker-{i + 1}", self.env, self.log_dir, run_dir=self.run_dir, wait=False)
            self.workers.append(worker)
            say(f"starting worker {i + 1}/{self.config.worker_procs} (pid {worker.pid}, concurrency {concurrency})")

    def wait_workers_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.wait_ready(max(0.0, deadline - time.monotonic()))

    def check_workers(self) -> None:
        for worker in self.workers:
            worker.check_alive("running")

    def stop_workers(self) -> None:
        stop_services(self.workers)
        self.workers = []

    # --- consumers of an external stack -----------------------------------------------------------
    def pause_consumers(self) -> list[str]:
        """Stop the workers from taking messages (remote control); they stay up, warm, and resume on demand."""
        return self._control("cancel_consumer")

    def resume_consumers(self) -> list[str]:
        return self._control("add_consumer")

    def _control(self, command: str) -> list[str]:
        from sluice.queue import make_celery
        from sluice.settings import Settings

        app = make_celery(Settings(redis_url=REDIS_URL))
        try:
            replies: list[dict[str, Any]] = (
                app.control.broadcast(command, arguments={"queue": keys.EVENTS_QUEUE}, reply=True, timeout=2.0) or []
            )
        finally:
            app.close()
        return [name for reply in replies for name in reply]

    # --- description -----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        procs = self.processes
        return {
            "stack": "external (already running)" if self.external else "started by this run",
            "api_processes": sum(len(c.pids) for c in procs.api),
            "api_workers": self.config.api_workers if not self.external else None,
            "worker_instances": len(procs.workers),
            "worker_processes": [len(c.pids) for c in procs.workers],
            "worker_concurrency": self.config.worker_concurrency if not self.external else None,
            "api_url": API_BASE,
            "redis_url": REDIS_URL,
            "cassandra": f"127.0.0.1:{PROFILE.cassandra_port}",
        }
