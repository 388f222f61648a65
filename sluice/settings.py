"""Sluice's settings: one typed class, every value from a ``SLUICE_``-prefixed environment variable.

Read once per process through :func:`get_settings`; the README lists each variable with its default.
"""

from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: An upper bound on one event's share of a queued message: the largest is a search event whose 256-character
#: query is all control characters, each escaped twice (``\\u001f`` in the envelope's JSON body, 7 bytes), about
#: 2.2 KiB with the other fields.
MAX_EVENT_BYTES = 4096

ConsistencyName = Literal["ONE", "LOCAL_ONE", "QUORUM", "LOCAL_QUORUM", "EACH_QUORUM", "ALL"]


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_", extra="ignore", frozen=True)

    # --- Redis (the Celery broker) -------------------------------------------------------------
    #: One node (``redis://``, ``rediss://``) or Sentinel's primary (``sentinel://h1:26379;sentinel://h2:26379/0``,
    #: kombu's form): see sluice/broker.py.
    redis_url: str = "redis://127.0.0.1:6380/0"
    #: The name the sentinels monitor the primary under (``sentinel monitor <name> ...``); sentinel:// URLs only.
    redis_sentinel_master: str = "sluice"
    #: Replicas that must confirm a publish (Redis ``WAIT``) before the API answers 202. 0: the primary alone
    #: (one node, ``make up``). With 1, a 202 means the events are on two nodes, and a replica that does not
    #: confirm within ``SLUICE_REDIS_REPLICA_TIMEOUT_MS`` turns the answer into a 504 (unknown outcome).
    redis_min_replicas: int = Field(default=0, ge=0, le=5)
    #: How long a publish waits for its replicas to confirm, in milliseconds (never 0: WAIT 0 blocks forever).
    redis_replica_timeout_ms: int = Field(default=250, ge=1, le=10_000)
    #: Socket timeouts for every Redis call, so a stalled Redis fails a request fast instead of hanging it.
    redis_socket_timeout_s: float = Field(default=2.0, gt=0)

    # --- Cassandra ---------------------------------------------------------------------------
    cassandra_contact_points: Annotated[list[str], NoDecode] = ["127.0.0.1"]
    cassandra_port: int = Field(default=9042, ge=1, le=65535)
    cassandra_keyspace: str = Field(default="sluice", pattern=r"^[a-z][a-z0-9_]{0,47}$")
    #: Keyspace replication as JSON, e.g. {"class": "NetworkTopologyStrategy", "dc1": 3} in production.
    cassandra_replication: dict[str, str | int] = {"class": "SimpleStrategy", "replication_factor": 1}
    cassandra_local_dc: str | None = None
    cassandra_consistency: ConsistencyName = "LOCAL_QUORUM"
    cassandra_username: str | None = None
    cassandra_password: SecretStr | None = None
    cassandra_request_timeout_s: float = Field(default=10.0, gt=0)
    #: Native protocol version: 5 for Cassandra 5.0, 4 for Amazon Keyspaces.
    cassandra_protocol_version: int = Field(default=5, ge=3, le=5)
    #: Days an event is kept after its ``occurred_at`` (its cells' TTL counts from the event's time); 0 keeps
    #: events forever. The API refuses events already older than this; the schema step sizes the tables'
    #: compaction windows to it (docs/retention.md). At most 20 years, Cassandra's longest TTL.
    retention_days: int = Field(default=0, ge=0, le=7300)

    # --- API ---------------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    #: Uvicorn worker processes; each runs its own event loop and publisher.
    api_workers: int = Field(default=1, ge=1)
    #: Answer the two ingest routes in a pure-ASGI layer (api/ingest.py) rather than through FastAPI's routing
    #: and dependencies: same answers, about a third less CPU per request. Off: for an A/B, or to rule it out.
    api_fast_ingest: bool = True
    #: Largest request body accepted, in bytes; larger bodies get 413 before they are read whole.
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    #: Most events in one POST /v1/events/batch.
    max_batch_events: int = Field(default=1000, ge=1, le=10_000)
    #: Most events the API packs into one queued task; concurrent requests share a task up to this size.
    publish_max_events: int = Field(default=500, ge=1)
    #: How long the API waits for more concurrent requests before publishing a task, in milliseconds.
    publish_linger_ms: float = Field(default=2.0, ge=0)
    #: How long the API waits to fill a message while messages wait in the queue (the workers are behind), in
    #: milliseconds: there the wait is hidden behind the queue's, and fuller messages cost workers less per
    #: event, so they catch up.
    publish_backlog_linger_ms: float = Field(default=10.0, ge=0)
    #: How long the API waits to fill a message while requests arrive fast (at most half this apart, smoothed:
    #: with 16 ms, from 125 requests/s per API process), in milliseconds: Redis, the API's publish and the
    #: worker pay per message, so fuller messages cost them less per request, and a request waits at most this
    #: long. 16 against 8 at 1,000 requests/s: Redis -26 %, API -12 %, worker -11 % CPU per request, p50 8.4 ->
    #: 13.4 ms (docs/performance.md, tenth steps). Slower traffic never waits for it; 0 turns it off.
    publish_rate_linger_ms: float = Field(default=16.0, ge=0, le=1000)
    #: Messages one API process may have on their way to Redis at once: it goes on validating while Redis
    #: runs a script and fsyncs, and Redis fsyncs scripts that arrive together once.
    publish_concurrency: int = Field(default=4, ge=1, le=64)
    #: Socket timeout of the API's publish to Redis: a stalled Redis turns into a fast 503, not a hang.
    publish_timeout_s: float = Field(default=0.5, gt=0)
    #: API keys accepted in ``Authorization: Bearer <key>``, comma-separated. Required: the API will not
    #: start without one. ``make up`` creates a local key in .data/dev/api-key.
    api_keys: SecretStr = SecretStr("")
    #: Requests per second allowed per API key (shared by all API processes through Redis), and the burst.
    rate_limit_per_s: int = Field(default=10_000, ge=1)
    #: Queue depth (messages in Redis) above which the API answers 503 with Retry-After instead of queueing.
    max_queue_depth: int = Field(default=20_000, ge=1)
    #: Share of Redis's maxmemory above which the API answers 503 with Retry-After: well before Redis itself
    #: refuses writes (noeviction), so that workers can still record retries, dead letters and progress.
    max_redis_memory_ratio: float = Field(default=0.8, gt=0, le=1)
    #: Events one API process holds while they wait for Redis; beyond it, requests get 503 at once.
    max_pending_events: int = Field(default=50_000, ge=1)
    #: Key that signs page tokens (HMAC). Unset: derived from SLUICE_API_KEYS, which every API process shares.
    page_token_secret: SecretStr | None = None
    #: Connection limits of each API process (api/http.py). A connection with no request under way is closed
    #: after this many seconds without a byte (keep it above a load balancer's idle timeout in front: the
    #: AWS stack sets 75 against the ALB's 60).
    http_idle_timeout_s: float = Field(default=5.0, gt=0)
    #: Seconds from a request's first byte to the end of its headers; then 408 and the connection is closed.
    http_header_timeout_s: float = Field(default=10.0, gt=0)
    #: Seconds from the end of a request's headers to the end of its body (1 MiB in 30 s is 35 KB/s); then 408.
    http_body_timeout_s: float = Field(default=30.0, gt=0)
    #: Open connections per API process; a connection over it is closed as soon as it is accepted.
    http_max_connections: int = Field(default=1000, ge=1)
    #: How far in the future ``occurred_at`` may lie (clock skew between clients and us), in seconds.
    max_clock_skew_s: int = Field(default=300, ge=0)

    # --- Analytics SDKs (Segment / RudderStack / PostHog wire formats: api/routes/sdk.py) ----------
    #: More SDK event names, JSON: ``{"Product Viewed": "view"}``, or with other field sources,
    #: ``{"Order Completed": {"type": "booking", "fields": {"total_price": "properties.revenue"}}}``. Added to
    #: the names the registry declares (sluice/eventtypes.py); checked at start-up (sluice/sdkmap.py).
    sdk_events: dict[str, str | dict[str, Any]] = {}
    #: Largest SDK request body, compressed and inflated: PostHog's batches reach 5 MiB plus one event.
    sdk_max_body_bytes: int = Field(default=6_291_456, ge=1024)
    #: Most messages in one SDK batch: above Segment's 2,500, and what 6 MiB of small PostHog events hold.
    sdk_max_batch_events: int = Field(default=20_000, ge=1, le=50_000)

    # --- Worker ------------------------------------------------------------------------------
    #: Worker processes per ``sluice worker`` (Celery prefork pool).
    worker_concurrency: int = Field(default=2, ge=1)
    #: Cassandra writes in flight at once per worker process.
    write_concurrency: int = Field(default=64, ge=1, le=1024)
    #: Most messages one worker run writes together (worker/batching.py): whatever waits while every pool
    #: process is busy goes into the next run, up to this many messages and ``SLUICE_WORKER_BATCH_EVENTS``
    #: events. Also what each pool process may hold unacknowledged (Celery's prefetch).
    worker_batch_messages: int = Field(default=32, ge=1, le=1000)
    worker_batch_events: int = Field(default=2000, ge=1, le=100_000)
    #: After taking a message, how long a worker waits before it takes what arrived meanwhile, in milliseconds,
    #: when messages come more often than that (worker/transport.py): a run and a message cost a worker far more
    #: than an event, so at moderate rates a wait cuts its CPU and Redis's per event (at 1,000 single events/s,
    #: 200 ms against 50: the worker's by half, Redis's by a third; readable p99 about 350 ms instead of 200).
    #: It delays only when events become readable, never a 202; the message taken is written at once, and a
    #: full claim (a backlog) is followed by the next one at once. 0: no wait.
    worker_linger_ms: float = Field(default=200.0, ge=0, le=5000)
    #: Attempts of a task before its events are dead-lettered.
    task_max_retries: int = Field(default=8, ge=0)
    task_retry_backoff_s: float = Field(default=1.0, gt=0)
    task_retry_backoff_max_s: float = Field(default=60.0, gt=0)
    #: Largest message a worker takes from the queue, in bytes: a bigger one is dead-lettered whole, never
    #: parsed or run (a message Sluice builds holds at most max(SLUICE_MAX_BATCH_EVENTS,
    #: SLUICE_PUBLISH_MAX_EVENTS) events of well under 4 KiB each, so it is never one of them).
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    #: Hard limit on one task run; must stay below the visibility timeout so a task never runs twice at once.
    task_time_limit_s: int = Field(default=120, ge=1)
    #: Seconds a delivered message may stay unacknowledged before Redis hands it to another worker.
    visibility_timeout_s: int = Field(default=300, ge=2)

    #: Log level of every Sluice process.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: ``json``: one JSON object per line (for log pipelines); ``text``: plain lines (for a terminal).
    log_format: Literal["json", "text"] = "json"
    #: Port on which ``sluice worker`` serves its processes' Prometheus metrics; unset: not served
    #: (``make up`` shares one metrics directory, so the API's /metrics already includes the workers).
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)

    # --- CloudWatch publisher (sluice cloudwatch, beside the workers on AWS) ------------
    cloudwatch_namespace: str = "Sluice"
    #: Value of the ``Environment`` dimension on every metric.
    cloudwatch_environment: str = "local"
    cloudwatch_interval_s: float = Field(default=10.0, gt=0)
    #: CloudWatch endpoint override (tests, VPC endpoints); unset means AWS's default.
    cloudwatch_endpoint_url: str | None = None

    _split_contact_points = field_validator("cassandra_contact_points", mode="before")(_split_csv)

    def model_post_init(self, __context: object) -> None:
        if self.task_time_limit_s >= self.visibility_timeout_s:
            raise ValueError(
                "SLUICE_TASK_TIME_LIMIT_S must be below SLUICE_VISIBILITY_TIMEOUT_S, "
                "or a slow task would be handed to a second worker while it still runs"
            )
        largest = MAX_EVENT_BYTES * max(self.max_batch_events, self.publish_max_events)
        if self.max_message_bytes < largest:
            raise ValueError(
                f"SLUICE_MAX_MESSAGE_BYTES must be at least {largest} ({MAX_EVENT_BYTES} bytes per event of the "
                "largest message the API builds), or workers would dead-letter the API's own messages"
            )
        if self.task_retry_backoff_max_s >= self.visibility_timeout_s:
            raise ValueError(
                "SLUICE_TASK_RETRY_BACKOFF_MAX_S must be below SLUICE_VISIBILITY_TIMEOUT_S: a retry waits in a "
                "worker until it is due, and recovery would take a longer wait for a lost message"
            )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
