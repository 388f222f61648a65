"""A Jepsen-style history for fault tests: steady load whose every request is recorded, unknown outcomes
retried with the same ids, and the exactly-once checker (loadtests/checker.py) run once the system settled."""

from __future__ import annotations

from typing import Any

from cassandra.cluster import Session

from loadtests.checker import Checker, Ledger, Report, api_stats
from loadtests.workload import Failure, Mix, Workload
from tests.support import TEST_KEY

__all__ = ["Failure", "History", "SteadyLoad", "check"]


class History:
    """What the fault tests look at: ids acknowledged, definitely refused (with the answer), unresolved."""

    def __init__(self, load: Workload) -> None:
        self.load = load

    @property
    def ledger(self) -> Ledger:
        return self.load.ledger

    @property
    def ok(self) -> set[str]:
        return {str(i) for i in self.ledger.accepted}

    @property
    def failed(self) -> dict[str, Failure]:
        """Fresh requests definitely refused (503, a refused connection, ...); a later retry may still have
        been accepted: the ledger has the final word."""
        return self.load.failed

    @property
    def unknown(self) -> set[str]:
        """Ids whose outcome is still unknown after every retry."""
        return {str(i) for i in self.ledger.unresolved}

    @property
    def outcomes(self) -> Any:
        return self.load.outcomes


class SteadyLoad(Workload):
    """Single events at ``rate`` per second from a background thread, on listings unique to the test; an
    unknown outcome (504, timeout, reset) is retried with the same id and body until the answer is definite
    (``retry_deadline_s`` after ``stop()`` at most)."""

    def __init__(self, base_url: str, rate: float = 100, timeout: float = 3.0, **kw: Any) -> None:
        super().__init__(base_url, TEST_KEY, rate=rate, timeout=timeout, mix=kw.pop("mix", Mix()), **kw)

    @property
    def history(self) -> History:
        return History(self)


def check(
    history: History,
    session: Session,
    settle_s: float = 90,
    *,
    api_url: str | None = None,
    max_unresolved: int = 0,
) -> dict[str, Any]:
    """Every acknowledged event stored once in both tables with the fields sent; nothing stored that was
    refused or never sent; ``/stats`` (when ``api_url`` answers) agrees; unknown outcomes bounded."""
    ledger = history.ledger
    assert ledger.accepted, f"no request succeeded: {history.outcomes}"
    checker = Checker(session=session)
    missing = checker.wait_stored(list(ledger.accepted), settle_s)
    report: Report = checker.check(ledger, stats=api_stats(api_url, TEST_KEY) if api_url else None)
    assert report.ok, f"{report.line()}; details: {dict(report.details)}"
    assert not missing, f"{missing} acknowledged events never became readable by id; {report.line()}"
    # Unknown outcomes were retried with the same ids until the answer was definite: what is left is bounded.
    assert report.unresolved <= max_unresolved, (
        f"{report.unresolved} events of unknown outcome after retries (at most {max_unresolved}): {history.outcomes}"
    )
    return {
        "ok": len(ledger.accepted),
        "failed": len(ledger.refused),
        "unknown": report.unresolved,
        "stored": report.stored_once + report.unresolved_stored,
        **report.counts(),
    }
