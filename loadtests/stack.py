"""The stack under test: the one answering on 127.0.0.1:8000, or one we start (and always stop) ourselves.

Starting reuses devstack: Redis and Cassandra of the ``dev`` profile (reused when both already answer), the
schema (``python -m sluice.schema``), then workers (``python -m worker``) and the API (``python -m api``) as
child processes in their own sessions, logging to files under ``build/<command>/logs/``. Their pids are kept
in ``build/<command>/run/`` so that a run killed hard does not leave an API behind that the next run would
mistake for someone else's stack.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import redis

from devstack import PROFILES, Servers, StackError
from loadtests.common import PROJECT, python, say
from loadtests.procs import StackProcesses, cmdline
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


class Service:
    """``python -m api`` / ``python -m worker`` as a child in its own session, logging to a file."""

    def __init__(self, name: str, module: str, env: dict[str, str], log_dir: Path, run_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.pid_path = run_dir / f"{name}.pid"
        log_dir.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [python(), "-m", module],
                env={**env, "PYTHONUNBUFFERED": "1"},
                cwd=PROJECT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_path.write_text(str(self.proc.pid))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def check_alive(self, what: str) -> None:
        if not self.alive():
            tail = "\n".join("    " + line for line in self.log_text().splitlines()[-20:])
            raise StackError(f"the {self.name} exited with code {self.proc.returncode} while {what}:\n{tail}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            say(f"stopping {self.name} (pid {self.pid}, SIGTERM)")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop within {timeout:.0f} s; killing its process group")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.pid_path.unlink(missing_ok=True)


def stop_leftovers(run_dir: Path) -> None:
    """Stop API/worker processes a previous run of ours left behind (matched by pid file and command line)."""
    for pid_file in run_dir.glob("*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)
            continue
        line = cmdline(pid)
        if "-m api" in line or "-m worker" in line:
            say(f"stopping {pid_file.stem} left running by an earlier run (pid {pid})")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while cmdline(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                if cmdline(pid):
                    os.killpg(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)


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
        say("applying the Cassandra schema (python -m sluice.schema)")
        subprocess.run([python(), "-m", "sluice.schema"], env=self.env, cwd=PROJECT, check=True)
        self.start_workers()
        self.start_api()
        say(f"stack up in {time.monotonic() - started:.0f} s")
        self.processes.refresh()

    def stop(self) -> None:
        if self.api is not None:
            self.api.stop()
            self.api = None
        self.stop_workers()
        if self.servers is not None:
            self.servers.stop()
            self.servers = None

    def start_api(self) -> None:
        self.api = Service("api", "api", self.env, self.log_dir, self.run_dir)
        say(f"starting the API (pid {self.api.pid}, {self.env.get('SLUICE_API_WORKERS', '1')} process(es))")
        deadline = time.monotonic() + 60
        while not api_answers():
            self.api.check_alive("starting")
            if time.monotonic() > deadline:
                raise StackError(f"the API did not answer {API_BASE}/healthz within 60 s; log: {self.api.log_path}")
            time.sleep(0.2)
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
            worker = Service(f"worker-{i + 1}", "worker", self.env, self.log_dir, self.run_dir)
            self.workers.append(worker)
            say(f"starting worker {i + 1}/{self.config.worker_procs} (pid {worker.pid}, concurrency {concurrency})")

    def wait_workers_ready(self, timeout: float = 90.0) -> None:
        started = time.monotonic()
        for worker in self.workers:
            while " ready." not in worker.log_text():
                worker.check_alive("starting")
                if time.monotonic() - started > timeout:
                    raise StackError(f"{worker.name} was not ready within {timeout:.0f} s; log: {worker.log_path}")
                time.sleep(0.2)

    def check_workers(self) -> None:
        for worker in self.workers:
            worker.check_alive("running")

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=60)
        self.workers = []

    # --- consumers of an external stack -----------------------------------------------------------
    def pause_consumers(self) -> list[str]:
        """Stop the workers from taking messages (remote control), for a stack we do not own."""
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
