"""Publish the pipeline's queue metrics to CloudWatch: ``sluice cloudwatch``.

Runs beside the Celery worker (a second container of the per-instance worker task in ECS). Every
``SLUICE_CLOUDWATCH_INTERVAL_S`` seconds it reads, in one Redis round trip (a Lua script, so the numbers
are one consistent snapshot):

* ``QueueDepth``: messages waiting in the Celery queue (``LLEN`` of :data:`sluice.keys.EVENTS_QUEUE`);
  each message is a batch of events. Worker scaling tracks it per running worker task.
* ``DeadLetters``: entries of the dead-letter hash (``HLEN`` of :data:`sluice.keys.DEAD_LETTERS`).
* ``OldestMessageAgeSeconds``: how long the message at the head of the queue (the oldest: kombu pushes
  on the left and pops on the right) has been there, as seen by this publisher; 0 when the queue is empty.
  It needs nothing from the producers: the head is identified by its length and last 256 bytes (where
  kombu's JSON envelope keeps the message's unique ``delivery_tag``), so a 1 MB batch is never copied.
* ``EventsWrittenTotal``: the counter :data:`sluice.keys.WRITTEN_TOTAL`; ``RATE()`` of it is the drain rate.

Every metric has the dimension ``Environment``. Several publishers put the same values, so alarms and
scaling read the ``Maximum`` statistic (and a rate of ``EventsWrittenTotal``, never its ``Sum``).

``sluice cloudwatch --disk PATH`` publishes instead ``DataVolumeUsedPercent``: how full the file
system holding PATH is (a Cassandra node's data volume; a sidecar of each Cassandra task). Every node puts
it under the same dimensions, so the ``Maximum`` is the fullest volume.

Configuration, all optional except the Redis URL:

=================================  =====================================================  ===========
``SLUICE_REDIS_URL``               the broker (read through :func:`sluice.settings.get_settings`)
``SLUICE_CLOUDWATCH_NAMESPACE``    CloudWatch namespace                                   ``Sluice``
``SLUICE_CLOUDWATCH_ENVIRONMENT``  value of the ``Environment`` dimension                 ``local``
``SLUICE_CLOUDWATCH_INTERVAL_S``   seconds between two publications                       ``10``
``SLUICE_CLOUDWATCH_ENDPOINT_URL`` CloudWatch endpoint override (tests, VPC endpoints)    AWS default
=================================  =====================================================  ===========

AWS credentials and region come from the usual chain (the ECS task role, ``AWS_REGION``). SIGTERM or
SIGINT stops the loop after the publication in progress; the process then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import math
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import aiobotocore.session  # type: ignore[import-untyped]  # aiobotocore ships no type information
from redis.asyncio import Redis

from sluice import broker, keys
from sluice.settings import Settings

log = logging.getLogger("sluice.cloudwatch")

#: Every metric this module puts (a test checks that dashboards and alarms name no other in our namespace).
PUBLISHED_METRICS = (
    "QueueDepth",
    "DeadLetters",
    "OldestMessageAgeSeconds",
    "EventsWrittenTotal",
    "DataVolumeUsedPercent",
)

#: One consistent snapshot: queue length, dead letters, written counter, and the head's length and tail.
_SNAPSHOT_LUA = """
local depth = redis.call('LLEN', KEYS[1])
local dead = redis.call('HLEN', KEYS[2])
local written = redis.call('GET', KEYS[3])
local head = redis.call('LINDEX', KEYS[1], -1)
if head then
  return {depth, dead, written or false, string.len(head), string.sub(head, -256)}
end
return {depth, dead, written or false, 0, false}
"""


class CloudWatchClient(Protocol):
    """The one call we make on an aiobotocore CloudWatch client."""

    def put_metric_data(self, **kwargs: Any) -> Awaitable[Any]: ...


@dataclass(frozen=True)
class PublisherConfig:
    namespace: str = "Sluice"
    environment: str = "local"
    interval_s: float = 10.0
    queue_key: str = keys.EVENTS_QUEUE
    dead_letters_key: str = keys.DEAD_LETTERS
    written_total_key: str = keys.WRITTEN_TOTAL

    def __post_init__(self) -> None:
        if not self.namespace or self.namespace.startswith("AWS/"):
            raise ValueError(f"invalid CloudWatch namespace {self.namespace!r}")
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise ValueError(f"SLUICE_CLOUDWATCH_INTERVAL_S must be positive, not {self.interval_s!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> PublisherConfig:
        return cls(
            namespace=settings.cloudwatch_namespace,
            environment=settings.cloudwatch_environment,
            interval_s=settings.cloudwatch_interval_s,
        )


@dataclass(frozen=True)
class QueueSnapshot:
    depth: int
    dead_letters: int
    written_total: int | None
    #: Identity of the message at the head of the queue (None when the queue is empty).
    head: str | None


@dataclass(frozen=True)
class QueueMetrics:
    depth: int
    dead_letters: int
    oldest_age_s: float
    written_total: int | None


@dataclass
class LagTracker:
    """How long the current head of the queue has been the head, from this process's observations.

    A lower bound of the oldest message's age (exact up to one interval once the publisher has run for
    longer than that age); it restarts at 0 whenever the head changes, i.e. whenever a worker took it.
    """

    clock: Callable[[], float] = time.monotonic
    _head: str | None = field(default=None, init=False)
    _since: float = field(default=0.0, init=False)

    def observe(self, head: str | None) -> float:
        now = self.clock()
        if head is None:
            self._head = None
            return 0.0
        if head != self._head:
            self._head, self._since = head, now
        return max(0.0, now - self._since)


async def read_snapshot(redis: Redis, config: PublisherConfig) -> QueueSnapshot:
    reply = await redis.eval(  # type: ignore[misc]  # redis-py types eval() as Awaitable | value
        _SNAPSHOT_LUA, 3, config.queue_key, config.dead_letters_key, config.written_total_key
    )
    depth, dead, written, head_length, head_tail = (list(reply) + [None] * 5)[:5]
    head: str | None = None
    if head_tail is not None:
        tail = head_tail if isinstance(head_tail, bytes) else str(head_tail).encode()
        head = f"{int(head_length)}:{hashlib.sha256(tail).hexdigest()}"
    return QueueSnapshot(
        depth=int(depth),
        dead_letters=int(dead),
        written_total=_int_or_none(written),
        head=head,
    )


def _int_or_none(value: object) -> int | None:
    if value is None:
        return None
    try:
        return int(value if isinstance(value, int | str | bytes) else str(value))
    except ValueError:
        return None


def metric_data(metrics: QueueMetrics, config: PublisherConfig, timestamp: datetime) -> list[dict[str, Any]]:
    """The ``MetricData`` of one PutMetricData call."""
    dimensions = [{"Name": "Environment", "Value": config.environment}]
    points: list[tuple[str, float, str]] = [
        ("QueueDepth", float(metrics.depth), "Count"),
        ("DeadLetters", float(metrics.dead_letters), "Count"),
        ("OldestMessageAgeSeconds", round(metrics.oldest_age_s, 3), "Seconds"),
    ]
    if metrics.written_total is not None:
        points.append(("EventsWrittenTotal", float(metrics.written_total), "Count"))
    return [
        {"MetricName": name, "Dimensions": dimensions, "Timestamp": timestamp, "Value": value, "Unit": unit}
        for name, value, unit in points
    ]


class QueueMetricsPublisher:
    """Reads the queue metrics from Redis and puts them to CloudWatch; both clients are injected."""

    def __init__(
        self,
        redis: Redis,
        cloudwatch: CloudWatchClient,
        config: PublisherConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._cloudwatch = cloudwatch
        self._config = config
        self._lag = LagTracker(clock=clock)

    async def publish_once(self) -> QueueMetrics:
        snapshot = await read_snapshot(self._redis, self._config)
        metrics = QueueMetrics(
            depth=snapshot.depth,
            dead_letters=snapshot.dead_letters,
            oldest_age_s=self._lag.observe(snapshot.head),
            written_total=snapshot.written_total,
        )
        await self._cloudwatch.put_metric_data(
            Namespace=self._config.namespace,
            MetricData=metric_data(metrics, self._config, datetime.now(UTC)),
        )
        log.info(
            "published to %s (Environment=%s): queue depth %d, dead letters %d, oldest message age %.1f s%s",
            self._config.namespace,
            self._config.environment,
            metrics.depth,
            metrics.dead_letters,
            metrics.oldest_age_s,
            "" if metrics.written_total is None else f", events written {metrics.written_total}",
        )
        return metrics

    async def run(self, stop: asyncio.Event) -> int:
        """Publish every interval until ``stop`` is set; returns how many publications succeeded.

        A failed publication (Redis or CloudWatch unreachable, throttled, ...) is logged and retried at
        the next tick: the publisher outlives outages of either side.
        """
        published = 0
        log.info(
            "publishing queue metrics of %r every %.1f s to namespace %s",
            self._config.queue_key,
            self._config.interval_s,
            self._config.namespace,
        )
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.publish_once()
                published += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of one tick must not end the loop
                log.warning(
                    "publication failed, retrying in %.1f s: %s: %s",
                    self._config.interval_s,
                    type(exc).__name__,
                    exc,
                )
            remaining = self._config.interval_s - (time.monotonic() - started)
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=remaining)
        log.info("stopped after %d publications", published)
        return published


def disk_metric_data(path: Path, config: PublisherConfig, timestamp: datetime) -> list[dict[str, Any]]:
    """The ``MetricData`` of one disk publication: how full the file system holding ``path`` is."""
    usage = shutil.disk_usage(path)
    percent = 100.0 * usage.used / usage.total if usage.total else 0.0
    return [
        {
            "MetricName": "DataVolumeUsedPercent",
            "Dimensions": [{"Name": "Environment", "Value": config.environment}],
            "Timestamp": timestamp,
            "Value": round(percent, 2),
            "Unit": "Percent",
        }
    ]


async def run_disk(cloudwatch: CloudWatchClient, config: PublisherConfig, path: Path, stop: asyncio.Event) -> int:
    """Put the disk metric every interval until ``stop`` is set; failures are logged and retried."""
    published = 0
    while not stop.is_set():
        try:
            data = disk_metric_data(path, config, datetime.now(UTC))
            await cloudwatch.put_metric_data(Namespace=config.namespace, MetricData=data)
            published += 1
            log.info("published %s: %s used %.1f%%", config.namespace, path, data[0]["Value"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one tick must not end the loop
            log.warning("disk publication failed: %s: %s", type(exc).__name__, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=config.interval_s)
    return published


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, stop, signum)


def _on_signal(stop: asyncio.Event, signum: int) -> None:
    log.info("received %s, stopping", signal.Signals(signum).name)
    stop.set()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sluice cloudwatch", description=__doc__.split("\n")[0])
    parser.add_argument("--disk", type=Path, default=None, help="publish how full this path's file system is")
    return parser.parse_args(argv)


async def main(settings: Settings, argv: Sequence[str] = ()) -> int:
    args = parse_args(argv)
    config = PublisherConfig.from_settings(settings)
    if args.disk is not None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        session = aiobotocore.session.get_session()
        async with session.create_client("cloudwatch", endpoint_url=settings.cloudwatch_endpoint_url) as cloudwatch:
            await run_disk(cloudwatch, config, args.disk, stop)
        return 0
    redis = broker.async_client(settings)
    stop = asyncio.Event()
    install_stop_signals(stop)
    session = aiobotocore.session.get_session()
    try:
        async with session.create_client("cloudwatch", endpoint_url=settings.cloudwatch_endpoint_url) as cloudwatch:
            await QueueMetricsPublisher(redis, cloudwatch, config).run(stop)
    finally:
        await broker.aclose(redis)
    return 0


if __name__ == "__main__":
    from sluice.cli import main as cli

    sys.exit(cli(["cloudwatch", *sys.argv[1:]]))
