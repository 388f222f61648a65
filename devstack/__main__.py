"""``python -m devstack``: the launcher behind ``make up``.

    python -m devstack up        Redis, Cassandra, the schema, the API and one worker, in the foreground
    python -m devstack servers   only Redis and Cassandra, until Ctrl-C
    python -m devstack fetch     download Cassandra's jars (once) and check Java and redis-server
    python -m devstack down      stop servers a crashed run left behind

Ctrl-C or SIGTERM stops everything in order: API and worker first (warm shutdown), then the servers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import FrameType

from devstack import PROFILES, PROJECT, Profile, Servers, StackError, fetch_jars, say
from devstack._cassandra import find_java17
from devstack._proc import stop_pidfile
from devstack._redis import find_redis_server


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _stream(proc: subprocess.Popen[bytes], prefix: str) -> None:
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        sys.stdout.write(f"{prefix} | {line.decode(errors='replace')}")
        sys.stdout.flush()


def _service(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        argv, env=env, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    threading.Thread(target=_stream, args=(proc, f"{name:6s}"), daemon=True).start()
    return proc


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"the API exited with code {proc.returncode} while starting (its log is above)")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise StackError(f"the API did not answer {url} within {timeout:.0f} s (its log is above)")


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
    services: list[tuple[str, subprocess.Popen[bytes]]] = []
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        servers.start()
        api_key = local_api_key(profile)
        env = {
            **os.environ,
            **profile.service_env(),
            "SLUICE_API_PORT": str(profile.api_port),
            "SLUICE_API_KEYS": os.environ.get("SLUICE_API_KEYS") or api_key,
            "PROMETHEUS_MULTIPROC_DIR": str(fresh_dir(profile.root / "metrics")),
            "PYTHONUNBUFFERED": "1",
        }
        say("applying the Cassandra schema (python -m sluice.schema)")
        subprocess.run([sys.executable, "-m", "sluice.schema"], env=env, cwd=PROJECT, check=True)
        services.append(("worker", _service("worker", [sys.executable, "-m", "worker"], env)))
        api = _service("api", [sys.executable, "-m", "api"], env)
        services.append(("api", api))
        base = f"http://127.0.0.1:{profile.api_port}"
        _wait_http(f"{base}/healthz", api)
        say(f"Sluice is up in {time.monotonic() - started:.0f} s:")
        say(f"  API      {base}   (docs: {base}/docs, OpenAPI: {base}/openapi.json)")
        say(f"  Redis    redis://127.0.0.1:{profile.redis_port}   log: {servers.redis and servers.redis.log_path}")
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
        say("  Ctrl-C stops everything.")
        while True:
            for name, proc in services:
                if proc.poll() is not None:
                    raise StackError(f"the {name} exited with code {proc.returncode} (its log is above)")
            time.sleep(0.5)
    except _Stop as stop:
        say(f"{stop}: stopping")
        return _shutdown(services, servers, 0)
    except (StackError, subprocess.CalledProcessError) as exc:
        say(f"error: {exc}")
        return _shutdown(services, servers, 1)


def _shutdown(services: list[tuple[str, subprocess.Popen[bytes]]], servers: Servers, code: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The API first, so it stops taking events and flushes its publisher; then the worker (warm shutdown).
    for name, proc in reversed(services):
        if proc.poll() is None:
            say(f"stopping {name} (SIGTERM)")
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
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
    stop_pidfile(run / "cassandra.pid", "cassandra", str(profile.root / "cassandra" / "conf"))
    stop_pidfile(run / "redis.pid", "redis", f"127.0.0.1:{profile.redis_port}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("command", choices=["up", "servers", "fetch", "down"])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="dev")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    commands = {"up": up, "servers": servers_only, "fetch": fetch, "down": down}
    try:
        return commands[args.command](profile)
    except StackError as exc:
        say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
