"""Helpers for tests on the real stack: service processes, event factories, and Cassandra look-ups."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from cassandra.cluster import Session
from cassandra.query import ValueSequence

from devstack import PROJECT, Profile


def view(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "type": "view",
        "listing_id": 42,
        "user_id": 7,
        "occurred_at": "2026-11-25T09:30:00.250+01:00",
    }
    return event | overrides


def booking(**overrides: Any) -> dict[str, Any]:
    event = view(type="booking") | {
        "check_in": "2026-12-01",
        "check_out": "2026-12-04",
        "guests": 2,
        "total_price": "449.70",
        "currency": "EUR",
    }
    return event | overrides


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


class Service:
    """``python -m api`` or ``python -m worker`` as a real child process, logging to a file."""

    def __init__(self, name: str, module: str, env: dict[str, str], log_dir: Path, args: Iterable[str] = ()) -> None:
        self.name = name
        self.base_url = ""
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            cwd=PROJECT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


#: The API key of test runs (never a real secret).
TEST_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}

#: Shorter than the defaults so fault tests settle in seconds: a lost message is handed out again after
#: 20 s instead of 5 minutes, and retries back off from 0.5 s up to 4 s.
TEST_TIMINGS = {
    "SLUICE_VISIBILITY_TIMEOUT_S": "20",
    "SLUICE_TASK_TIME_LIMIT_S": "15",
    "SLUICE_TASK_RETRY_BACKOFF_S": "0.5",
    "SLUICE_TASK_RETRY_BACKOFF_MAX_S": "4",
}


def service_env(profile: Profile, **extra: str) -> dict[str, str]:
    return (
        profile.service_env()
        | TEST_TIMINGS
        | {
            "SLUICE_API_PORT": str(profile.api_port),
            "SLUICE_LOG_LEVEL": "INFO",
            "SLUICE_API_KEYS": TEST_KEY,
            # One directory for the whole test stack: the API's /metrics then shows every process.
            "PROMETHEUS_MULTIPROC_DIR": str(profile.root / "metrics"),
        }
        | extra
    )


def start_api(profile: Profile, log_dir: Path, name: str = "api", **env: str) -> Service:
    api = Service(name, "api", service_env(profile, **env), log_dir)
    base = api.base_url = f"http://127.0.0.1:{env.get('SLUICE_API_PORT', profile.api_port)}"

    def healthy() -> bool:
        if api.proc.poll() is not None:
            api.stop()
            raise AssertionError(f"API exited with {api.proc.returncode}:\n{api.log_text()[-3000:]}")
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 30, "the API to answer /healthz")
    return api


def start_worker(
    profile: Profile, log_dir: Path, name: str = "worker", args: Iterable[str] = (), **env: str
) -> Service:
    worker = Service(name, "worker", service_env(profile, **env), log_dir, args)

    def ready() -> bool:
        if worker.proc.poll() is not None:
            worker.stop()
            raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.log_text()[-3000:]}")
        return " ready." in worker.log_text()

    wait_until(ready, 60, "the worker to be ready")
    return worker


def utc(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value).astimezone(dt.UTC)


def stored_rows(session: Session, event_id: str | UUID) -> tuple[int, int]:
    """How many rows hold this event in each table: (by id, by listing and day).

    The second number counts the event's rows in its listing's partitions of the day ``events_by_id`` names
    and the days either side, scanned whole: a second row under another ``occurred_at`` (even across
    midnight) counts, so a duplicate shows as 2, not as a point read's 0 or 1.
    """
    eid = UUID(str(event_id))
    by_id = session.execute("SELECT listing_id, day FROM events_by_id WHERE event_id = %s", (eid,)).all()
    if not by_id:
        return 0, 0
    listing_id, day = by_id[0].listing_id, by_id[0].day.date()
    days = [day + dt.timedelta(days=d) for d in (-1, 0, 1)]
    by_listing = session.execute(
        "SELECT event_id FROM events_by_listing_day WHERE listing_id = %s AND day IN %s",
        (listing_id, ValueSequence(days)),
    ).all()
    return len(by_id), sum(1 for row in by_listing if row.event_id == eid)
