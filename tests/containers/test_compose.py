"""compose.yaml as a user runs it: up --wait with three workers, the README's requests, every event stored
once, SIGTERM of workers and API under load, the loadtest profile headless and with its web UI; then down
with volumes (the fixture)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from cassandra.cluster import Session

from devstack import PROJECT
from tests.containers.conftest import Compose, cassandra_session, say, wait_api
from tests.containers.load import SteadyLoad, check
from tests.support import AUTH, TEST_KEY, booking, view, wait_until

pytestmark = [pytest.mark.containers, pytest.mark.timeout(600)]

REPORT = PROJECT / "build" / "loadtest-compose"


def test_every_service_is_healthy_with_three_workers(single: Compose) -> None:
    states = {s["Name"]: s for s in single.states()}
    running = {n: s["Health"] for n, s in states.items() if s["State"] == "running"}
    assert sorted(n.removeprefix("sluice-ct-") for n in running) == [
        "api-1", "cassandra-1", "redis-1", "worker-1", "worker-2", "worker-3"
    ]  # fmt: skip
    assert set(running.values()) == {"healthy"}, running
    assert states["sluice-ct-schema-1"]["State"] == "exited"
    assert states["sluice-ct-schema-1"]["ExitCode"] == 0


def test_worker_healthcheck_is_the_liveness_file(single: Compose) -> None:
    (cid, *_) = single.ids("worker")
    probe = ["docker", "exec", cid, "sluice", "liveness", "--max-age", "60"]
    assert subprocess.run(probe, capture_output=True).returncode == 0
    # A heartbeat that is too old must fail the check: the check can fail.
    stale = subprocess.run([*probe[:-1], "0.001"], capture_output=True, text=True)
    assert stale.returncode == 1
    assert "old" in stale.stderr


def test_the_readme_requests_work(single: Compose) -> None:
    event_id = str(uuid.uuid4())
    with httpx.Client(base_url=single.base_url, headers=AUTH, timeout=10) as c:
        one = c.post("/v1/events", json=view(event_id=event_id))
        assert one.status_code == 202, one.text
        batch = c.post("/v1/events/batch", json={"events": [booking(), view()]})
        assert batch.status_code == 202, batch.text
        assert batch.json()["accepted"] == 2, batch.text
        wait_until(lambda: c.get(f"/v1/events/{event_id}").json().get("status") == "stored", 60, "stored", every=1)
        assert c.post("/v1/events", json=view(), headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_singles_and_batches_are_stored_once_and_workers_drain_in_parallel(single: Compose, session: Session) -> None:
    with SteadyLoad(single.base_url, TEST_KEY, rate=60) as load:
        time.sleep(20)
    figures = check(load.load, session)
    say(f"single node, 60 req/s for 20 s: {figures}, answers {dict(load.load.requests)}")
    assert load.load.requests["202"] == load.load.sent_requests
    assert not load.load.bad_answers
    # Every one of the three workers wrote batches: the queue is drained in parallel.
    for cid in single.ids("worker"):
        logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True).stderr
        assert "wrote " in logs, f"worker {cid[:12]} wrote nothing"


def test_sigterm_of_workers_and_api_under_load_loses_nothing(single: Compose, session: Session) -> None:
    with SteadyLoad(single.base_url, TEST_KEY, rate=60) as load:
        time.sleep(5)
        single.run("stop", "worker", timeout=200)  # SIGTERM: warm shutdown, the batch in flight finishes
        exits = subprocess.run(
            ["docker", "ps", "-a", "--filter", "label=com.docker.compose.service=worker",
             "--filter", f"label=com.docker.compose.project={single.project}", "--format", "{{.Status}}"],
            capture_output=True, text=True, check=True,
        ).stdout.split("\n")  # fmt: skip
        assert all(s.startswith("Exited (0)") for s in exits if s), f"workers did not exit cleanly: {exits}"
        time.sleep(3)  # the API keeps queueing while no worker runs
        single.run("start", "worker")
        time.sleep(3)
        single.run("stop", "api", timeout=60)  # SIGTERM: uvicorn answers what it accepted, then exits
        single.run("start", "api")
        wait_api(single.base_url)
        time.sleep(5)
    figures = check(load.load, session)
    say(f"SIGTERM of workers and API under 60 req/s: {figures}, answers {dict(load.load.requests)}")
    assert load.load.requests["202"] > 0
    # While the API was stopped, requests were refused at connect (failed, nothing sent), never half-done.
    assert not load.load.bad_answers, load.load.bad_answers


def test_loadtest_profile_headless_writes_its_report(single: Compose) -> None:
    shutil.rmtree(REPORT, ignore_errors=True)
    began = time.monotonic()
    # The README's headless command, with a rate and p99 bound this shared 2-core machine can hold (the
    # thresholds themselves are the locustfile's; command-line values win over LOCUST_* variables).
    command = ["locust", "-f", "loadtests/locustfile.py", "--host", "http://api:8000", "--users", "10"]
    command += ["--spawn-rate", "10", "--target-rps", "30", "--p99-ms", "3000", "--min-rate-ratio", "0.8"]
    command += ["--html", "/report/report.html", "--summary-file", "/report/locust-summary.json"]
    command += ["--accepted-dir", "/report"]
    done = single.run(
        "--profile", "loadtest", "run", "--rm", "-e", "LOCUST_HEADLESS=true", "-e", "LOCUST_RUN_TIME=20s",
        "locust", *command, timeout=240, check=False,
    )  # fmt: skip
    say(f"headless locust: exit {done.returncode} in {time.monotonic() - began:.0f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[loadtest] PASS rate" in done.stdout + done.stderr
    summary = json.loads((REPORT / "locust-summary.json").read_text())
    assert summary["requests"] > 0, summary
    assert summary["failures"] == 0, summary
    assert "<html" in (REPORT / "report.html").read_text()[:2000].lower()
    assert list(REPORT.glob("accepted-*.jsonl")), "no accepted events written"


def test_loadtest_profile_web_ui_runs_and_writes_its_report(single: Compose) -> None:
    shutil.rmtree(REPORT, ignore_errors=True)
    single.run("--profile", "loadtest", "up", "-d", "--wait", "locust", timeout=240)
    ui = f"http://127.0.0.1:{single.api_port + 89}"
    assert httpx.get(ui, timeout=10).status_code == 200
    started = httpx.post(
        f"{ui}/swarm", data={"user_count": 20, "spawn_rate": 20, "host": "http://api:8000"}, timeout=10
    )
    assert started.status_code == 200, started.text
    assert started.json()["success"], started.text

    def requests_made() -> bool:
        return int(httpx.get(f"{ui}/stats/requests", timeout=10).json()["stats"][-1]["num_requests"]) >= 100

    wait_until(requests_made, 60, "locust's web UI run to make 100 requests", every=2)
    httpx.get(f"{ui}/stop", timeout=10)
    single.run("--profile", "loadtest", "stop", "locust", timeout=60)
    assert "<html" in (REPORT / "report.html").read_text()[:2000].lower()


@pytest.fixture(scope="module")
def session(single: Compose) -> Iterator[Session]:
    cluster, session = cassandra_session([single.ip("cassandra")])
    yield session
    cluster.shutdown()
