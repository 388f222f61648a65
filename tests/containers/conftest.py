"""The container suite: Sluice's images under compose on a real Docker engine.

Selected with ``-m containers`` (``make container-test``, part of ``make test``); ``make containers`` must
have made the engine and the images first. Every stack runs under a project name of its own, on host ports
of its own, and is brought down with its volumes, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from cassandra.cluster import Cluster, Session

from devstack import PROJECT
from sluice.cassandra import connect
from sluice.settings import Settings
from tests.support import TEST_KEY, wait_until

LOG_DIR = PROJECT / "build" / "containers"
TEST_FILE = Path(__file__).with_name("compose.test.yaml")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "containers: needs a Docker engine and the images of `make containers`")


def say(text: str) -> None:
    print(f"[containers] {text}", flush=True)


class Compose:
    """``docker compose`` on one project: its files, its environment, its logs under build/containers/."""

    def __init__(self, project: str, files: Sequence[str | Path], api_port: int) -> None:
        self.project = project
        self.files = [str(f) for f in files]
        self.api_port = api_port
        self.base_url = f"http://127.0.0.1:{api_port}"
        self.env = os.environ | {
            "SLUICE_API_KEYS": TEST_KEY,
            "SLUICE_API_HOST_PORT": str(api_port),
            "SLUICE_LOCUST_HOST_PORT": str(api_port + 89),
        }
        LOG_DIR.mkdir(parents=True, exist_ok=True)

    def cmd(self, *args: str) -> list[str]:
        return ["docker", "compose", "-p", self.project, *(a for f in self.files for a in ("-f", f)), *args]

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.cmd(*args), env=self.env, cwd=PROJECT, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(self.cmd(*args))} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def up(self, *args: str, timeout: float = 420) -> float:
        """``up -d --wait``, with a progress line every 15 s; returns the seconds it took."""
        began = time.monotonic()
        log = (LOG_DIR / f"{self.project}-up.log").open("a")
        say(f"{self.project}: docker compose up -d --wait {' '.join(args)}")
        proc = subprocess.Popen(
            self.cmd("up", "-d", "--wait", *args), env=self.env, cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            while proc.poll() is None:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    took = time.monotonic() - began
                    if took > timeout:
                        proc.kill()
                        break
                    say(f"  {self.project}: {took:.0f} s, {self.health_line()}")
        finally:
            log.close()
        took = time.monotonic() - began
        if proc.returncode != 0:
            self.save_logs()
            raise AssertionError(
                f"compose up failed ({proc.returncode}) after {took:.0f} s: {self.health_line()}; logs in {LOG_DIR}/"
            )
        say(f"{self.project}: every service healthy in {took:.0f} s")
        return took

    def states(self) -> list[dict[str, str]]:
        out = self.run("ps", "-a", "--format", "json").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def health_line(self) -> str:
        try:
            return ", ".join(
                f"{s['Name'].removeprefix(self.project + '-')}: {s['Health'] or s['State']}" for s in self.states()
            )
        except (AssertionError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            return f"(no status: {exc})"

    def ids(self, service: str) -> list[str]:
        return self.run("ps", "-q", service).stdout.split()

    def ip(self, service: str) -> str:
        (cid,) = self.ids(service)
        out = subprocess.run(
            ["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", cid],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout.split()[0]

    def save_logs(self) -> None:
        out = self.run("logs", "--no-color", "--timestamps", check=False, timeout=60)
        (LOG_DIR / f"{self.project}.log").write_text(out.stdout + out.stderr)

    def down(self) -> None:
        self.save_logs()
        say(f"{self.project}: docker compose down --volumes")
        self.run("--profile", "loadtest", "down", "--volumes", "--remove-orphans", "--timeout", "30", timeout=300)
        left = subprocess.run(
            ["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={self.project}"],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        assert not left, f"volumes left behind by compose down --volumes: {left}"


def cassandra_session(ips: Sequence[str], keyspace: str = "sluice") -> tuple[Cluster, Session]:
    settings = Settings(cassandra_contact_points=list(ips), cassandra_port=9042, cassandra_local_dc="datacenter1")
    return connect(settings, keyspace=keyspace)


def wait_api(base_url: str, timeout: float = 60) -> None:
    def ready() -> bool:
        try:
            return httpx.get(f"{base_url}/readyz", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout, f"{base_url}/readyz", every=1)


@pytest.fixture(scope="session")
def docker_ready() -> None:
    """Fail loudly, never skip: a container suite that silently does not run guards nothing."""
    done = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    assert done.returncode == 0, f"no docker compose v2 ({done.stderr.strip()}): run `make containers`"
    for image in ("sluice:local", "sluice-loadtest:local", "cassandra:5.0.8", "redis:7.2.5-bookworm"):
        found = subprocess.run(["docker", "image", "inspect", image], capture_output=True)
        assert found.returncode == 0, f"image {image} missing: run `make containers`"


@contextlib.contextmanager
def _stack(project: str, files: Sequence[str | Path], api_port: int, workers: int, *down: str) -> Iterator[Compose]:
    """A compose project up with ``workers`` workers, after taking down what a crashed run left of it; down with
    its volumes afterwards, pass or fail. ``down``: options before ``down`` (e.g. the loadtest profile)."""
    stack = Compose(project, files, api_port=api_port)
    stack.run(*down, "down", "--volumes", "--remove-orphans", timeout=300)
    try:
        stack.up("--scale", f"worker={workers}")
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="module")
def single(docker_ready: None) -> Iterator[Compose]:
    """compose.yaml as the README runs it, with three workers; down with volumes afterwards."""
    with _stack("sluice-ct", ["compose.yaml", TEST_FILE], 18600, 3, "--profile", "loadtest") as stack:
        yield stack


@pytest.fixture(scope="module")
def ring(docker_ready: None) -> Iterator[Compose]:
    """compose.yaml plus compose.ring.yaml: three Cassandra nodes, RF 3, LOCAL_QUORUM."""
    with _stack("sluice-ring", ["compose.yaml", "compose.ring.yaml", TEST_FILE], 18700, 2) as stack:
        yield stack


@pytest.fixture(scope="module")
def ha(docker_ready: None) -> Iterator[Compose]:
    """compose.yaml plus compose.ha.yaml: a Redis primary, two replicas and three sentinels; one replica confirms."""
    with _stack("sluice-ha", ["compose.yaml", "compose.ha.yaml", TEST_FILE], 18800, 2) as stack:
        yield stack
