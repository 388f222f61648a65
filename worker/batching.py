"""Several waiting messages in one worker run: what the API accepts and what a worker writes, decoupled.

The API publishes what it has at once (a message may hold one event); a worker pays for each *run* (a pool
hand-off, the first-write-wins read, two write phases, one Redis pipeline) far more than for each event in it.
So the consumer does not hand each message to the pool on its own, as Celery's default strategy does: this
strategy keeps the messages it receives in a buffer and hands the pool *all* of them at once whenever a pool
process is free (up to ``SLUICE_WORKER_BATCH_MESSAGES`` messages and ``SLUICE_WORKER_BATCH_EVENTS`` events
per run). An idle worker therefore writes a lone message at once, as before; a busy one, whose processes are
all writing, gathers what arrives meanwhile into the next run, so the size of a run follows the load. The
transport (worker/transport.py) takes what waits in the queue in one step and delivers it under a hold
(worker/delivery.py), so those messages leave in one run too; with ``SLUICE_WORKER_LINGER_MS`` it pauses after
a message for that long, holding runs, and then takes what arrived meanwhile: fewer and fuller runs at moderate
rates, at the price of later readability (never of a later 202). A run's acknowledgements go to Redis in one
round trip (the transport gathers them).

Delivery is unchanged (sluice/queue.py, ``DELIVERY``): every message stays unacknowledged in Redis until its
run returns, and is then acknowledged or, when the run says so (Redis refused a record its outcome depends on),
handed back to the queue. A run whose pool process died, or hit the hard time limit, hands all its messages
back (Celery's ``reject_on_worker_lost``). Messages still in the buffer when the worker stops are unacknowledged
too: kombu hands them back when the channel closes.

Celery's ``Task.Strategy`` is the extension point (celery-batches uses it too); celery-batches itself flushes
on a count or a timer and acknowledges a batch only on success, leaving a lost run's messages held by the
process, so it is not used. Messages whose envelope Celery cannot read raise here exactly as in Celery's own
strategy, before anything is buffered, so worker/consumer.py dead-letters them as before.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.utils.imports import symbol_by_name
from celery.utils.time import timezone
from celery.worker.request import Request, create_request_cls  # type: ignore[attr-defined]
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2  # type: ignore[attr-defined]
from kombu.asynchronous.timer import to_timestamp

from sluice.metrics import RUN_MESSAGES
from worker import delivery

log = logging.getLogger("sluice.worker")

#: What the pool runs: ``run(jobs) -> verdicts``; a job is ``(task_id, (args, kwargs), retries)``, a verdict True
#: (acknowledge) or False (hand the message back to the queue).
Job = tuple[str, Any, int]
Runner = Callable[[list[Job]], list[bool]]


def _size(request: Request) -> int:
    """Events a message carries (for the run's event bound); 1 for anything that is not our form."""
    args = request.args
    events = args[0] if args else request.kwargs.get("events")
    return len(events) if isinstance(events, list) else 1


class Batcher:
    """The buffer between the consumer and the pool: runs go out while a pool process is free and the transport
    holds no delivery (worker/delivery.py)."""

    def __init__(
        self,
        pool: Any,
        run: Runner,
        *,
        slots: int,
        max_messages: int,
        max_events: int,
        limits: tuple[float, float],
    ) -> None:
        self._pool = pool
        self._run = run
        self._slots = slots
        self._max_messages = max_messages
        self._max_events = max_events
        self._soft, self._hard = limits
        #: (its events, the request), oldest first.
        self._buffer: deque[tuple[int, Request]] = deque()
        self._buffered_events = 0
        self._in_flight = 0
        delivery.register(self)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def put(self, request: Request) -> None:
        size = _size(request)
        self._buffer.append((size, request))
        self._buffered_events += size
        self.flush()

    def flush(self) -> None:
        """Hand the pool runs while it has a free process; none while the transport holds deliveries (it flushes
        when it lets go), and none once the worker is stopping (what is buffered then stays unacknowledged, and
        kombu hands it back as the channel closes)."""
        if delivery.stopping() or delivery.held():
            return
        while self._buffer and self._in_flight < self._slots:
            batch = self._take()
            self._in_flight += 1
            RUN_MESSAGES.observe(len(batch))
            # The arguments as the consumer decoded them (kombu, with the standard library's JSON): a pool
            # process unpickles them faster than it would parse the body again.
            jobs: list[Job] = [(r.id, (r.args, r.kwargs), int(r.request_dict.get("retries") or 0)) for r in batch]
            try:
                self._pool.apply_async(
                    self._run,
                    args=(jobs,),
                    callback=lambda verdicts, batch=batch: self._done(batch, verdicts),
                    error_callback=lambda exc_info, batch=batch: self._lost(batch, exc_info),
                    soft_timeout=self._soft,
                    timeout=self._hard,
                )
            except BaseException:
                self._in_flight -= 1
                for request in reversed(batch):
                    size = _size(request)
                    self._buffer.appendleft((size, request))
                    self._buffered_events += size
                raise

    def _take(self) -> list[Request]:
        """The oldest messages, up to the bounds (but always at least one)."""
        batch: list[Request] = []
        events = 0
        while self._buffer and len(batch) < self._max_messages:
            size, request = self._buffer[0]
            if batch and events + size > self._max_events:
                break
            self._buffer.popleft()
            self._buffered_events -= size
            batch.append(request)
            events += size
        return batch

    def _done(self, batch: list[Request], verdicts: Any) -> None:
        self._in_flight -= 1
        if not isinstance(verdicts, list) or len(verdicts) != len(batch):
            # The solo and threads pools hand the exception of a run that raised to the callback, not to the
            # error callback: nothing is known of its messages, so each goes back to the queue.
            log.error("a run of %d messages ended without a verdict (%r); returning them to the queue",
                      len(batch), verdicts)  # fmt: skip
            verdicts = [False] * len(batch)
        # Celery sends each ack through its hub, a moment later; the transport sends a run's in one round trip.
        for request, keep in zip(batch, verdicts, strict=True):
            if keep:
                request.acknowledge()
            else:
                request.reject(requeue=True)
        self.flush()

    def _lost(self, batch: list[Request], exc_info: Any) -> None:
        self._in_flight -= 1
        log.error("a run of %d messages was lost (%s); returning them to the queue", len(batch),
                  getattr(exc_info, "exception", exc_info))  # fmt: skip
        for request in batch:
            request.reject(requeue=True)
        self.flush()


def strategy(task: Task[Any, Any], app: Celery, consumer: Any, **_: Any) -> Callable[..., None]:
    """A ``Task.Strategy``: builds each request as Celery's default strategy does, then buffers it (a message
    with an ETA, a retry, joins the buffer when it is due)."""
    from worker.app import settings
    from worker.tasks import run_batch

    Req = create_request_cls(
        symbol_by_name(task.Request), task, consumer.pool, consumer.hostname, consumer.event_dispatcher, app=app
    )
    batcher = Batcher(
        consumer.pool,
        run_batch,
        slots=max(1, int(consumer.pool.limit or 1)),
        max_messages=settings.worker_batch_messages,
        max_events=settings.worker_batch_events,
        limits=(float(app.conf.task_soft_time_limit), float(app.conf.task_time_limit)),
    )
    call_at = consumer.timer.call_at

    def due(request: Request) -> None:
        consumer.qos.decrement_eventually()
        batcher.put(request)

    def handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **__: Any) -> None:
        if body is None and "args" not in message.payload:
            body, headers, decoded, utc = message.body, message.headers, False, app.uses_utc_timezone()
        elif "args" in message.payload:
            body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
        else:
            body, headers, decoded, utc = proto1_to_proto2(message, body)
        request = Req(
            message, on_ack=ack, on_reject=reject, app=app, hostname=consumer.hostname,
            eventer=consumer.event_dispatcher, task=task, connection_errors=consumer.connection_errors,
            body=body, headers=headers, decoded=decoded, utc=utc,
        )  # fmt: skip
        if request.eta:
            # Held until due without taking a prefetch slot (as Celery's default strategy does).
            eta = (to_timestamp(timezone.to_system(request.eta)) if request.utc
                   else to_timestamp(request.eta, app.timezone))  # type: ignore[arg-type]  # fmt: skip
            consumer.qos.increment_eventually()
            call_at(eta, due, (request,), priority=6)
            return
        batcher.put(request)

    return handler
