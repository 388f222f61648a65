"""``sluice.client``: a producer's client for Sluice (sync and async), on httpx and orjson only.

    from sluice.client import Client, view

    with Client("http://127.0.0.1:8000", api_key) as client:
        for n in range(10_000):
            client.send(view(listing_id=42, user_id=n + 1))
    # leaving the block flushed: every event was answered (accepted, or rejected with the API's reason)

Behaviour (batching, retries, ``Retry-After``, the queue's policy when full, what ``flush`` returns):
docs/client.md.
"""

from ._async import AsyncClient
from ._events import booking, view
from ._retry import RetryPolicy
from ._sync import Client
from ._types import (
    ClientClosed,
    ErrorCallback,
    Event,
    FlushResult,
    QueueFull,
    QueuePolicy,
    Rejection,
    SluiceClientError,
)

__all__ = [
    "AsyncClient",
    "Client",
    "ClientClosed",
    "ErrorCallback",
    "Event",
    "FlushResult",
    "QueueFull",
    "QueuePolicy",
    "Rejection",
    "RetryPolicy",
    "SluiceClientError",
    "booking",
    "view",
]
