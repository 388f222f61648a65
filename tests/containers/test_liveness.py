"""worker.liveness without containers: the heartbeat step and the check the worker healthcheck runs."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sluice import cli
from worker import liveness
from worker.app import app


class FakeTimer:
    def __init__(self) -> None:
        self.calls: list[tuple[float, Callable[[], None]]] = []
        self.cancelled = False

    def call_repeatedly(self, secs: float, fun: Callable[[], None]) -> FakeTimer:
        self.calls.append((secs, fun))
        return self

    def cancel(self) -> None:
        self.cancelled = True


class FakeConsumer:
    def __init__(self) -> None:
        self.timer = FakeTimer()


def test_the_step_is_registered_on_the_consumer() -> None:
    assert "worker.liveness:Heartbeat" in app.steps["consumer"]


def test_heartbeat_touches_on_start_and_from_the_consumer_timer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "beat"
    monkeypatch.setenv("SLUICE_WORKER_HEARTBEAT_FILE", str(path))
    consumer: Any = FakeConsumer()
    step = liveness.Heartbeat(consumer)
    step.start(consumer)
    assert path.exists()
    ((interval, beat),) = consumer.timer.calls
    assert interval == 10
    os.utime(path, (0, 0))
    beat()
    assert time.time() - path.stat().st_mtime < 5
    step.stop(consumer)
    assert consumer.timer.cancelled
    assert not path.exists(), "a stopped consumer must not look live"


def test_check_passes_fresh_and_fails_stale_or_missing(tmp_path: Path) -> None:
    path = tmp_path / "beat"
    # The check as the compose healthcheck runs it: `sluice liveness`.
    assert cli.main(["liveness", "--file", str(path)]) == 1
    path.touch()
    assert cli.main(["liveness", "--file", str(path), "--max-age", "60"]) == 0
    os.utime(path, (time.time() - 120, time.time() - 120))
    assert cli.main(["liveness", "--file", str(path), "--max-age", "60"]) == 1
    assert "old" in (liveness.check(path, 60) or "")
