"""``sluice dev up|servers|fetch|down``: the local stack behind ``make up``.

    up        Redis, Cassandra, the schema, the API and one worker, in the foreground
    servers   only Redis and Cassandra, until Ctrl-C
    fetch     download Cassandra's jars (once) and check Java and redis-server
    down      stop servers a crashed run left behind

Ctrl-C or SIGTERM stops everything in order: API and worker first (warm shutdown), then the servers.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import signal
import time
import uuid
from pathlib import Path
from types import FrameType

from devstack import Profile, Servers, StackError, fetch_jars, say
from devstack._cassandra import find_java17
from devstack._proc import stop_pidfile
from devstack._redis import find_redis_server
from devstack.services import Service, apply_schema, start_api, start_worker, stop_leftovers, stop_services


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def fresh_dir(path: Path) -> Path:
    """An empty directory: metrics files of an earlier run would be added to this run's counts."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def local_api_key(profile: Profile) -> str:
    """The API key of local runs: made once, kept in the profile's (git-ignored) data folder."""
    path = profile.root / "api-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def up(profile: Profile) -> int:
    started = time.monotonic()
    servers = Servers(profile)
    services: list[Service] = []
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        servers.start()
        api_key = local_api_key(profile)
        env = {
            **profile.service_env(),
            "SLUICE_API_KEYS": os.environ.get("SLUICE_API_KEYS") or api_key,
            "PROMETHEUS_MULTIPROC_DIR": str(fresh_dir(profile.root / "metrics")),
        }
        apply_schema(env)
        # The foreground mode: both services' lines go to this terminal too (echo), and to .data/<profile>/logs/.
        logs, run = profile.root / "logs", profile.root / "run" / "services"
        services.append(start_worker("worker", env, logs, run_dir=run, echo=True, wait=False))
        api = start_api("api", env, logs, port=profile.api_port, run_dir=run, echo=True, timeout=30)
        services.append(api)
        base = api.base_url
        say(f"Sluice is up in {time.monotonic() - started:.0f} s:")
        say(f"  API      {base}   (docs: {base}/docs, OpenAPI: {base}/openapi.json)")
        say(f"  Redis    redis://127.0.0.1:{profile.redis_port}   log: {servers.redis and servers.redis.log_path}")
        say("           one node, no replica: a 202 means the events are in its AOF (SLUICE_REDIS_MIN_REPLICAS=0);")
        say("           for a queue that survives losing a node, see compose.ha.yaml (README: High availability)")
        say(f"  Cassandra 127.0.0.1:{profile.cassandra_port}   log: {servers.cassandra and servers.cassandra.log_path}")
        say(f"  API key  {api_key}   (kept in {profile.root / 'api-key'})")
        say("  try it:")
        print(
            f"curl -i -X POST {base}/v1/events -H 'Authorization: Bearer {api_key}' "
            "-H 'Content-Type: application/json' "
            f"""-d '{{"event_id": "{uuid.uuid4()}", "type": "view", "listing_id": 42, "user_id": 7, """
            f""""occurred_at": "{dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}"}}'""",
            flush=True,
        )
        say(f"  or: SLUICE_API_URL={base} SLUICE_API_KEY={api_key} sluice events get ID")
        say("  Ctrl-C stops everything.")
        while True:
            for service in services:
                service.check_alive("running")
            time.sleep(0.5)
    except _Stop as stop:
        say(f"{stop}: stopping")
        return _shutdown(services, servers, 0)
    except StackError as exc:
        say(f"error: {exc}")
        return _shutdown(services, servers, 1)


def _shutdown(services: list[Service], servers: Servers, code: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop_services(services)
    servers.stop()
    say("stopped")
    return code


def servers_only(profile: Profile) -> int:
    servers = Servers(profile)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        servers.start()
        say("servers up; Ctrl-C stops them")
        while all(p is not None and p.alive() for p in (servers.redis, servers.cassandra)):
            time.sleep(0.5)
        say("a server exited; stopping")
        return _shutdown([], servers, 1)
    except _Stop:
        return _shutdown([], servers, 0)
    except StackError as exc:
        say(f"error: {exc}")
        return _shutdown([], servers, 1)


def fetch(profile: Profile) -> int:
    say(f"redis-server: {find_redis_server()}")
    say(f"java: {find_java17()}")
    fetch_jars(profile.cache)
    return 0


def down(profile: Profile) -> int:
    run = profile.root / "run"
    stop_leftovers(run / "services")
    stop_pidfile(run / "cassandra.pid", "cassandra", str(profile.root / "cassandra" / "conf"))
    stop_pidfile(run / "redis.pid", "redis", f"127.0.0.1:{profile.redis_port}")
    return 0
