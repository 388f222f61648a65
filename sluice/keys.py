"""Every Redis key and queue name Sluice uses, in one place.

Celery's Redis transport keeps a queue as a Redis list named after the queue, and the messages it has
handed out but not yet acknowledged in a hash plus a sorted set; we name those two explicitly so that
several Sluice deployments (or a test run beside ``make up``) can never read each other's state.
"""

from typing import Final

#: The Celery queue (a Redis list) that carries batches of events from the API to the workers.
EVENTS_QUEUE: Final = "sluice.events"

#: Celery/kombu bookkeeping of delivered-but-unacknowledged messages (restored after the visibility timeout).
UNACKED: Final = "sluice:unacked"
UNACKED_INDEX: Final = "sluice:unacked_index"
UNACKED_MUTEX: Final = "sluice:unacked_mutex"

#: Hash of dead-lettered events: field ``event_id`` (or a message id), value a JSON record with the reason.
DEAD_LETTERS: Final = "sluice:dead"

#: Every accepted event until a worker has written (or dead-lettered) it: hash ``event_id`` -> JSON
#: ``{"a": accepted_at, "e": event}``, and a sorted set of the same ids scored by when they were last
#: queued. The API adds an event when its message is in Redis; the worker removes it once done. It answers
#: "is it queued?", and it lets workers re-queue an event whose message was lost in flight (see
#: worker/recovery.py): kombu pops a message (BRPOP) before it records the delivery, so a worker killed in
#: between would otherwise lose that message.
QUEUED: Final = "sluice:queued"
QUEUED_INDEX: Final = "sluice:queued_index"
#: Counter the enqueue script bumps when it finds existing marks, so that WAIT has a write to confirm that
#: follows them (sluice/marks.py).
REPLICATION_PROBE: Final = "sluice:replication_probe"
#: Held by the one worker that re-queues lost events in a given round.
RECOVERY_LOCK: Final = "sluice:recovery_lock"

#: Counter of events written to Cassandra, used to estimate the drain rate for ``Retry-After``.
WRITTEN_TOTAL: Final = "sluice:written_total"

#: Messages the workers have finished (written or dead-lettered): its rate is the drain rate behind Retry-After.
DRAINED_MESSAGES: Final = "sluice:drained_messages"

#: Per API key and one-second window: requests admitted by all API processes (``{prefix}{key_id}:{window}``).
RATE_LIMIT_PREFIX: Final = "sluice:ratelimit:"
