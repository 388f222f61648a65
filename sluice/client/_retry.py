"""When to retry and how long to wait: capped full-jitter backoff that never undercuts ``Retry-After``."""

from __future__ import annotations

import datetime as dt
import email.utils
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one batch: at most ``max_attempts`` sends within ``give_up_after_s`` of the first.

    Between attempts the client waits a random time in [0, min(``backoff_max_s``, ``backoff_base_s`` * 2^n))
    ("full jitter": producers that failed together do not come back together), or, when the API said
    ``Retry-After``, that long plus a little jitter: never less, since the API only says it when retrying
    sooner is pointless (rate limit, full queue, Redis away).
    """

    max_attempts: int = 12
    give_up_after_s: float = 120.0
    backoff_base_s: float = 0.2
    backoff_max_s: float = 10.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after the ``attempt``-th failed send (1 for the first)."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        if retry_after is not None:
            return retry_after + self.rng.uniform(0, min(ceiling, 1.0))
        return self.rng.uniform(0, ceiling)


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """``Retry-After`` in seconds: delay-seconds (``"3"``) or an HTTP-date (RFC 9110 10.2.3); None if
    absent or unreadable. A date in the past means "now" (0)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT by definition; "-0000" parses as naive
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - (now or dt.datetime.now(dt.UTC))).total_seconds())
