"""worker/cloudwatch.py against a real redis-server and moto's CloudWatch (server mode)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiobotocore.session
import pytest
from redis.asyncio import Redis

from sluice import keys
from sluice.settings import Settings
from worker.cloudwatch import LagTracker, PublisherConfig, QueueMetricsPublisher, metric_data

ROOT = Path(__file__).resolve().parents[2]


def kombu_message(events: int) -> bytes:
    """Shaped like kombu's Redis envelope: a body, then properties ending with a unique delivery tag."""
    return json.dumps(
        {
            "body": "x" * (events * 100),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"task": "sluice.write_batch", "id": str(uuid.uuid4())},
            "properties": {"delivery_tag": str(uuid.uuid4()), "priority": 0},
        }
    ).encode()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def metric_values(endpoint: str, name: str, environment: str) -> list[float]:
    session = aiobotocore.session.get_session()
    async with session.create_client("cloudwatch", endpoint_url=endpoint) as cloudwatch:
        response = await cloudwatch.get_metric_statistics(
            Namespace="SluiceTest",
            MetricName=name,
            Dimensions=[{"Name": "Environment", "Value": environment}],
            StartTime=datetime.now(UTC) - timedelta(minutes=10),
            EndTime=datetime.now(UTC) + timedelta(minutes=10),
            Period=60,
            Statistics=["Maximum", "SampleCount"],
        )
    return [point["Maximum"] for point in response["Datapoints"]]


@pytest.fixture
def config() -> PublisherConfig:
    return PublisherConfig(namespace="SluiceTest", environment=f"test-{uuid.uuid4().hex[:8]}", interval_s=0.05)


def test_publishes_depth_dead_letters_lag_and_written_total(
    aws: str, clean_redis: str, config: PublisherConfig
) -> None:
    clock = FakeClock()

    async def scenario() -> list[Any]:
        redis = Redis.from_url(clean_redis)
        session = aiobotocore.session.get_session()
        try:
            await redis.lpush(keys.EVENTS_QUEUE, kombu_message(500), kombu_message(10), kombu_message(3))
            await redis.hset(keys.DEAD_LETTERS, mapping={"event-1": "{}", "event-2": "{}"})
            await redis.set(keys.WRITTEN_TOTAL, 12345)
            async with session.create_client("cloudwatch", endpoint_url=aws) as cloudwatch:
                publisher = QueueMetricsPublisher(redis, cloudwatch, config, clock=clock)
                first = await publisher.publish_once()
                clock.now += 7
                second = await publisher.publish_once()
                await redis.rpop(keys.EVENTS_QUEUE)  # a worker takes the oldest batch
                clock.now += 3
                third = await publisher.publish_once()
                clock.now += 2
                fourth = await publisher.publish_once()
            return [first, second, third, fourth]
        finally:
            await redis.aclose()

    first, second, third, fourth = asyncio.run(scenario())
    assert (first.depth, first.dead_letters, first.written_total) == (3, 2, 12345)
    assert first.oldest_age_s == 0.0
    assert second.oldest_age_s == pytest.approx(7.0)  # the same head, seen 7 s apart
    assert (third.depth, third.oldest_age_s) == (2, 0.0)  # a new head: its age restarts
    assert fourth.oldest_age_s == pytest.approx(2.0)

    assert asyncio.run(metric_values(aws, "QueueDepth", config.environment)) == [3.0]
    assert asyncio.run(metric_values(aws, "DeadLetters", config.environment)) == [2.0]
    assert asyncio.run(metric_values(aws, "OldestMessageAgeSeconds", config.environment)) == [7.0]
    assert asyncio.run(metric_values(aws, "EventsWrittenTotal", config.environment)) == [12345.0]


def test_empty_queue_publishes_zeros_and_no_written_total(aws: str, clean_redis: str, config: PublisherConfig) -> None:
    async def scenario() -> Any:
        redis = Redis.from_url(clean_redis)
        try:
            async with aiobotocore.session.get_session().create_client("cloudwatch", endpoint_url=aws) as cloudwatch:
                return await QueueMetricsPublisher(redis, cloudwatch, config).publish_once()
        finally:
            await redis.aclose()

    metrics = asyncio.run(scenario())
    assert (metrics.depth, metrics.dead_letters, metrics.oldest_age_s, metrics.written_total) == (
        0,
        0,
        0.0,
        None,
    )
    assert asyncio.run(metric_values(aws, "QueueDepth", config.environment)) == [0.0]
    assert asyncio.run(metric_values(aws, "EventsWrittenTotal", config.environment)) == []


def test_run_keeps_going_through_failures_and_stops_when_asked(
    aws: str, clean_redis: str, config: PublisherConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken tick (here: CloudWatch refuses the namespace) is logged; the loop goes on until stopped."""
    caplog.set_level("INFO", logger="sluice.cloudwatch")

    async def scenario() -> tuple[int, int]:
        redis = Redis.from_url(clean_redis)
        try:
            async with aiobotocore.session.get_session().create_client("cloudwatch", endpoint_url=aws) as cloudwatch:
                stop = asyncio.Event()
                good = asyncio.create_task(QueueMetricsPublisher(redis, cloudwatch, config).run(stop))
                broken_config = PublisherConfig(namespace="SluiceTest", environment="x", interval_s=0.05)
                broken_redis = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
                broken = asyncio.create_task(QueueMetricsPublisher(broken_redis, cloudwatch, broken_config).run(stop))
                deadline = time.monotonic() + 20  # until both have ticked a few times, however slow the machine
                while time.monotonic() < deadline and (  # noqa: ASYNC110 - polls the captured log
                    caplog.text.count("published to SluiceTest") < 3 or "publication failed" not in caplog.text
                ):
                    await asyncio.sleep(0.05)
                stop.set()
                results = await asyncio.wait_for(asyncio.gather(good, broken), timeout=5)
                await broken_redis.aclose()
                return results[0], results[1]
        finally:
            await redis.aclose()

    good, broken = asyncio.run(scenario())
    assert good >= 3
    assert broken == 0
    assert "publication failed, retrying" in caplog.text
    assert "stopped after" in caplog.text


def test_config_from_settings_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_CLOUDWATCH_NAMESPACE", "Ingest")
    monkeypatch.setenv("SLUICE_CLOUDWATCH_ENVIRONMENT", "prod")
    monkeypatch.setenv("SLUICE_CLOUDWATCH_INTERVAL_S", "2.5")
    config = PublisherConfig.from_settings(Settings())
    assert (config.namespace, config.environment, config.interval_s) == ("Ingest", "prod", 2.5)
    assert (
        PublisherConfig.from_settings(
            Settings(
                _env_file=None,
                cloudwatch_namespace="Sluice",
                cloudwatch_environment="local",
                cloudwatch_interval_s=10.0,
            )
        )
        == PublisherConfig()
    )
    with pytest.raises(ValueError, match="INTERVAL"):
        PublisherConfig(interval_s=0)
    with pytest.raises(ValueError, match="namespace"):
        PublisherConfig(namespace="AWS/ECS")


def test_lag_tracker_and_metric_data_shape() -> None:
    clock = FakeClock()
    lag = LagTracker(clock=clock)
    assert lag.observe("a") == 0.0
    clock.now += 5
    assert lag.observe("a") == 5.0
    assert lag.observe(None) == 0.0
    assert lag.observe("a") == 0.0  # after an empty queue the same identity is a new message
    from worker.cloudwatch import QueueMetrics

    data = metric_data(QueueMetrics(4, 1, 2.5, None), PublisherConfig(), datetime.now(UTC))
    assert [d["MetricName"] for d in data] == ["QueueDepth", "DeadLetters", "OldestMessageAgeSeconds"]
    assert all(d["Dimensions"] == [{"Name": "Environment", "Value": "local"}] for d in data)


def test_module_runs_and_stops_cleanly_on_sigterm(aws: str, clean_redis: str) -> None:
    """`sluice cloudwatch` as ECS runs it: publishes, then exits 0 on SIGTERM."""
    environment = f"proc-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SLUICE_REDIS_URL": clean_redis,
        "SLUICE_CLOUDWATCH_ENDPOINT_URL": aws,
        "SLUICE_CLOUDWATCH_NAMESPACE": "SluiceTest",
        "SLUICE_CLOUDWATCH_ENVIRONMENT": environment,
        "SLUICE_CLOUDWATCH_INTERVAL_S": "0.2",
    }
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("sluice")), "cloudwatch"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not asyncio.run(metric_values(aws, "QueueDepth", environment)):
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the publisher published nothing in 20 s"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "published to SluiceTest" in output
    assert "received SIGTERM, stopping" in output
    assert "stopped after" in output


def test_disk_metric_is_the_used_share_of_the_volume(tmp_path: Path) -> None:
    from worker.cloudwatch import disk_metric_data, run_disk

    config = PublisherConfig(namespace="Sluice", environment="prod", interval_s=0.01)
    usage = os.statvfs(tmp_path)
    expected = 100 * (usage.f_blocks - usage.f_bfree) * usage.f_frsize / (usage.f_blocks * usage.f_frsize)
    (point,) = disk_metric_data(tmp_path, config, datetime.now(UTC))
    assert point["MetricName"] == "DataVolumeUsedPercent"
    assert point["Unit"] == "Percent"
    assert point["Dimensions"] == [{"Name": "Environment", "Value": "prod"}]
    assert abs(point["Value"] - expected) < 1.0

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[dict[str, Any]] = []

        async def put_metric_data(self, **kwargs: Any) -> None:
            self.calls.append(kwargs)
            if len(self.calls) == 3:
                stop.set()

    async def scenario() -> int:
        return await run_disk(recorder, config, tmp_path, stop)

    stop = asyncio.Event()
    recorder = Recorder()
    assert asyncio.run(scenario()) == 3
    assert {c["Namespace"] for c in recorder.calls} == {"Sluice"}
