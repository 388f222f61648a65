"""The API's fast path (sluice.events.validate_queued) against the model: on any event, generated to sit on
every edge the model judges, the fast path either defers to the model or gives exactly what the model and
``queued_form`` give. It may never accept what the model refuses, nor queue a value in another form. And the
body's key count, which lets a body skip the slow duplicate-key parse, is exact."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from api.body import _count_keys
from sluice.events import EVENT_ADAPTER, _fast_queued, iso_utc_ms, queued_form, time_range, validate_queued
from tests.support import booking, view

SEARCH = view(type="search") | {"query": "sea view", "result_count": 12}
MISSING = object()

#: Values on each edge the model judges, per field: wrong types, bounds, spellings it takes and refuses.
EDGES: dict[str, list[Any]] = {
    "event_id": [
        str(uuid.uuid4()),
        str(uuid.uuid4()).upper(),
        uuid.uuid4().hex,
        "{" + str(uuid.uuid4()) + "}",
        f"urn:uuid:{uuid.uuid4()}",
        str(uuid.uuid4())[:-1],
        str(uuid.uuid4()) + "\n",
        5,
        None,
        "",
    ],
    "type": ["view", "booking", "search", "View", "", 1, None],
    "listing_id": [1, 42, 2**63 - 1, 2**63, 0, -1, "42", 42.0, True, None],
    "user_id": [1, 7, 2**63 - 1, 2**63, 0, -5, "7", 7.5, False, None],
    "occurred_at": [
        "2026-11-25T09:30:00Z",
        "2026-11-25T09:30:00.250Z",
        "2026-02-30T10:00:00.000Z",
        "2026-11-25T09:30:00.250+01:00",
        "2026-11-25T09:30:00.1Z",
        "2026-11-25T09:30:00.123456Z",
        "2026-11-25T09:30:00.1234567Z",
        "2026-11-25t09:30:00z",
        "2026-11-25 09:30:00Z",
        "2026-11-25T09:30Z",
        "2026-11-25T09:30:00+0100",
        "2026-11-25T09:30:00",
        "2026-11-25T24:00:00Z",
        "2026-11-25T23:59:60Z",
        "2026-02-30T10:00:00Z",
        "1999-12-31T23:59:59.999Z",
        "2000-01-01T00:00:00Z",
        "2000-01-01T00:30:00+01:00",
        "2999-01-01T00:00:00Z",
        "1732527000",
        "2026-11-25T09:30:00-23:59",
        "2026-11-25T09:30:00+24:00",
        "2026-11-25T09:30:00.Z",
        "٢٠٢٦-11-25T09:30:00Z",
        1732527000,
        None,
    ],
    "check_in": [
        "2026-12-01",
        "2026-12-04",
        "1999-12-31",
        "2000-01-01",
        "2199-12-31",
        "2200-01-01",
        "2026-02-30",
        "20261201",
        "2026-12-1",
        "2026-12-01T00:00:00",
        " 2026-12-01",
        20261201,
        None,
    ],
    "check_out": ["2026-12-04", "2026-12-01", "2026-11-30", "2199-12-31", "2026-12-04\n", None],
    "guests": [1, 2, 50, 51, 0, -1, "2", 2.0, True, None],
    "total_price": [
        "449.70",
        "0149.90",
        "149.9",
        "0",
        "0.0000",
        "999999999999.9999",
        "9999999999999",
        "1.23456",
        "-1",
        "1e3",
        "149.90\n",
        " 149.90",
        "149.",
        ".5",
        "١٤٩",
        149.9,
        None,
    ],
    "currency": ["EUR", "USD", "eur", "EURO", "EU", "EUR\n", "ÉUR", 978, None],
    "query": ["sea view", "x", "", "x" * 256, "x" * 257, "é" * 256, 5, None],
    "result_count": [0, 12, 2**31 - 1, 2**31, -1, "12", 1.0, None],
    "extra": ["anything"],
}


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    base = dict(draw(st.sampled_from([view(), booking(), SEARCH])))
    base["event_id"] = str(uuid.uuid4())
    for name in draw(st.lists(st.sampled_from(sorted(EDGES)), max_size=3, unique=True)):
        value = draw(st.sampled_from([*EDGES[name], MISSING]))
        if value is MISSING:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def model_queued(raw: Any, context: dict[str, Any] | None) -> dict[str, Any] | None:
    try:
        return queued_form(EVENT_ADAPTER.validate_python(raw, context=context))
    except ValidationError:
        return None


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events(), st.sampled_from([0, 30]))
def test_the_fast_path_accepts_only_what_the_model_accepts_and_queues_it_alike(
    raw: dict[str, Any], retention_days: int
) -> None:
    context = time_range(300, retention_days)
    fast = _fast_queued(raw, context)
    if fast is not None:
        assert fast == model_queued(raw, context), raw


def test_the_fast_path_takes_the_plain_form_clients_send() -> None:
    """Not vacuous: what clients send goes the fast way (and gives the model's answer)."""
    context = time_range(300, 0)
    now = dt.datetime.now(dt.UTC).isoformat()
    for raw in (view(), booking(), SEARCH, view(occurred_at=now), booking(total_price="0149.90")):
        fast = _fast_queued(raw, context)
        assert fast is not None, raw
        assert fast == model_queued(raw, context)
    assert _fast_queued(booking(total_price="0149.90"), context)["total_price"] == "149.90"  # type: ignore[index]


def test_the_time_range_is_reused_for_a_moment_and_then_made_again() -> None:
    """The API's bounds (latest allowed instant, retention's earliest) are shared for 50 ms, never longer."""
    began = time.monotonic()
    first = time_range(300, 0)
    again = time_range(300, 0)
    if time.monotonic() - began < 0.04:  # a stalled machine could take longer between the two calls
        assert again is first
    assert time_range(300, 30) is not first, "other settings, other bounds"
    time.sleep(0.06)
    later = time_range(300, 0)
    assert later is not None
    assert first is not None
    assert later["latest"] > first["latest"]


@settings(max_examples=400, deadline=None)
@given(st.datetimes(min_value=dt.datetime(1970, 1, 2), timezones=st.none() | st.timezones()))
def test_instants_are_written_as_isoformat_writes_them_in_utc(value: dt.datetime) -> None:
    utc = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    assert iso_utc_ms(value) == utc.isoformat(timespec="milliseconds")[:-6] + "Z"


def test_what_the_fast_path_defers_gets_the_models_errors() -> None:
    outcome = validate_queued(booking(check_out="2026-11-30"), ("events", 2), max_future_s=300)
    assert isinstance(outcome, list)
    assert [(e.loc, e.msg) for e in outcome] == [(["events", 2], "check_out must be after check_in")]


def _keys_by_recursion(value: Any) -> int:
    if isinstance(value, dict):
        return len(value) + sum(_keys_by_recursion(item) for item in value.values())
    if isinstance(value, list):
        return sum(_keys_by_recursion(item) for item in value)
    return 0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None)
@given(JSON_VALUES)
def test_the_duplicate_key_check_counts_every_key_of_a_body(value: Any) -> None:
    # api/body.py refuses a body as a duplicate-key suspect unless its key tokens match this count exactly: a
    # count too high would let a repeated key through unseen.
    assert _count_keys(value) == _keys_by_recursion(value)
