"""Event types as data: everything that knows a type derives from sluice/eventtypes.py.

The `search` type is one declaration there plus migration 0002; these tests show it going the whole way
(posted, stored, read by id and by listing, counted in /stats) and check that the other derived places
(columns of the migrated tables, metric labels, the OpenAPI document, the dashboard) follow the registry.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
from cassandra.cluster import Session

from sluice import dashboard
from sluice.cassandra import EVENT_COLUMNS
from sluice.events import EVENT_ADAPTER, MODELS, SearchEvent, fingerprint, queued_form, validate_event
from sluice.eventtypes import REGISTRY, SEARCH, TYPE_FIELDS, TYPE_NAMES, EventField, EventType, _check_registry, text
from sluice.metrics import EVENTS_ACCEPTED, EVENTS_REJECTED, EVENTS_WRITTEN
from tests.support import Service, booking, stored_rows, view, wait_until
from worker.writer import parse_queued


def search(**overrides: Any) -> dict[str, Any]:
    return view(type="search") | {"query": "lake view, 2 guests", "result_count": 37} | overrides


# --- the model -------------------------------------------------------------------------------------------


def test_a_search_is_validated_like_the_other_types() -> None:
    assert isinstance(validate_event(search()), SearchEvent)
    assert isinstance(validate_event(search(result_count=0)), SearchEvent)
    for field, value, error in [
        ("query", "", "string_too_short"),
        ("query", "x" * 257, "string_too_long"),
        ("query", 5, "string_type"),
        ("result_count", -1, "greater_than_equal"),
        ("result_count", "3", "int_type"),
        ("result_count", True, "int_type"),
    ]:
        assert errors_of(search(**{field: value})) == [([field], error)]
    # Fields of other types are unknown fields here, and a search's fields are unknown on a view.
    assert errors_of(search(guests=2)) == [(["guests"], "extra_forbidden")]
    assert errors_of(view(query="x")) == [(["query"], "extra_forbidden")]
    missing = search()
    del missing["result_count"]
    assert errors_of(missing, ("events", 2)) == [(["events", 2, "result_count"], "missing")]


def errors_of(raw: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[list[str | int], str]]:
    outcome = validate_event(raw, prefix)
    assert isinstance(outcome, list), outcome
    return [(e.loc, e.type) for e in outcome]


def test_the_worker_binds_a_search_to_its_own_columns_and_leaves_the_others_unset() -> None:
    from cassandra.query import UNSET_VALUE

    row = parse_queued(queued_form(EVENT_ADAPTER.validate_python(search())))
    assert row is not None
    assert row.type == "search"
    columns = dict(zip(("day", *EVENT_COLUMNS[:-1]), row.values, strict=True))
    assert (columns["query"], columns["result_count"]) == ("lake view, 2 guests", 37)
    assert all(columns[f.name] is UNSET_VALUE for f in TYPE_FIELDS if f.name not in ("query", "result_count"))
    good = queued_form(EVENT_ADAPTER.validate_python(search()))
    for bad in (good | {"result_count": "37"}, good | {"query": None}, good | {"guests": 2}):
        assert parse_queued(bad) is None, bad


def test_the_registry_refuses_what_the_derived_code_could_not_handle() -> None:
    clash = EventType("click", "ClickEvent", "A click.", "clicks", (EventField("guests", text(max_length=5)),))
    with pytest.raises(ValueError, match="'guests' is declared by both 'booking' and 'click'"):
        _check_registry((*REGISTRY, clash))
    with pytest.raises(ValueError, match="declared twice"):
        _check_registry((*REGISTRY, SEARCH))
    common = EventType("click", "ClickEvent", "A click.", "clicks", (EventField("user_id", text(max_length=5)),))
    with pytest.raises(ValueError, match="common field"):
        _check_registry((*REGISTRY, common))
    stats = EventType("click", "ClickEvent", "A click.", "views")
    with pytest.raises(ValueError, match="stats key 'views' is taken"):
        _check_registry((*REGISTRY, stats))


def test_metric_labels_and_models_follow_the_registry() -> None:
    assert tuple(MODELS) == TYPE_NAMES == ("view", "booking", "search")
    for metric, extra in ((EVENTS_ACCEPTED, ()), (EVENTS_WRITTEN, ()), (EVENTS_REJECTED, ("unknown",))):
        labels = {sample.labels["type"] for family in metric.collect() for sample in family.samples}
        assert labels == {*TYPE_NAMES, *extra}, metric


def test_the_checked_in_dashboard_is_the_generated_one() -> None:
    assert dashboard.PATH.read_text() == dashboard.render(), "run: python -m sluice.dashboard"
    titles = [panel["title"] for panel in dashboard.build()["panels"]]
    for kind in REGISTRY:
        assert f"{kind.name} events: accepted and stored (/s)" in titles


# --- the store -------------------------------------------------------------------------------------------


def test_the_migrated_tables_hold_every_declared_column(cassandra: Session) -> None:
    """The migrations and the registry agree: each declared field is a column of its CQL type in both tables."""
    for table in ("events_by_id", "events_by_listing_day"):
        rows = cassandra.execute(
            "SELECT column_name, type FROM system_schema.columns WHERE keyspace_name = %s AND table_name = %s",
            (cassandra.keyspace, table),
        )
        columns = {row.column_name: row.type for row in rows}
        assert set(EVENT_COLUMNS) <= set(columns), table
        for f in TYPE_FIELDS:
            assert columns[f.name] == f.kind.cql, (table, f.name)


def test_the_openapi_document_names_every_type(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for kind in REGISTRY:
        assert schemas[kind.model_name]["additionalProperties"] is False
        assert set(kind.field_names) <= set(schemas[kind.model_name]["required"])
    assert set(schemas["Event"]["discriminator"]["mapping"]) == set(TYPE_NAMES)
    assert set(TYPE_FIELDS_NAMES) <= set(schemas["StoredEventOut"]["properties"])
    assert {kind.stats_key for kind in REGISTRY} <= set(schemas["Stats"]["properties"])


TYPE_FIELDS_NAMES = tuple(f.name for f in TYPE_FIELDS)


@pytest.mark.usefixtures("worker")
def test_a_search_goes_the_whole_way(client: httpx.Client, cassandra: Session) -> None:
    """Posted, stored by the worker, read back by id and by listing, counted in /stats beside the others."""
    listing_id = random.randint(10**9, 10**12)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    day = now - dt.timedelta(hours=1)
    stamp = day.isoformat().replace("+00:00", "Z")
    first = search(listing_id=listing_id, occurred_at=stamp)
    events = [
        first,
        search(listing_id=listing_id, occurred_at=stamp, query="cabin", result_count=0),
        view(listing_id=listing_id, occurred_at=stamp),
        booking(listing_id=listing_id, occurred_at=stamp),
    ]
    answer = client.post("/v1/events", json=first)
    assert answer.status_code == 202, answer.text
    answer = client.post("/v1/events/batch", json={"events": events[1:]})
    assert answer.status_code == 202, answer.text
    assert answer.json()["accepted"] == 3
    for event in events:
        wait_until(lambda e=event: client.get(f"/v1/events/{e['event_id']}").json().get("status") == "stored", 30,
                   "the events to be stored")  # fmt: skip

    stored = client.get(f"/v1/events/{first['event_id']}").json()["event"]
    assert stored == {
        "event_id": first["event_id"], "type": "search", "listing_id": listing_id, "user_id": 7,
        "occurred_at": stamp.replace("Z", ".000Z"), "query": "lake view, 2 guests", "result_count": 37,
        "accepted_at": stored["accepted_at"],
    }  # fmt: skip
    assert stored_rows(cassandra, first["event_id"]) == (1, 1)

    window = {"from": (day - dt.timedelta(minutes=1)).isoformat(), "to": now.isoformat()}
    listed = client.get(f"/v1/listings/{listing_id}/events", params=window).json()["events"]
    assert Counter(e["type"] for e in listed) == {"search": 2, "view": 1, "booking": 1}
    searches = client.get(f"/v1/listings/{listing_id}/events", params=window | {"type": "search"}).json()["events"]
    assert sorted((e["query"], e["result_count"]) for e in searches) == [("cabin", 0), ("lake view, 2 guests", 37)]

    stats = client.get(f"/v1/listings/{listing_id}/stats", params={"from": day.date().isoformat(),
                                                                   "to": day.date().isoformat()}).json()  # fmt: skip
    assert (stats["views"], stats["bookings"], stats["searches"]) == (1, 1, 2)
    assert stats["days"] == [{"day": day.date().isoformat(), "views": 1, "bookings": 1, "searches": 2}]

    # Read back, it is exactly its queued form: a redelivery is recognised as stored, not as a conflict.
    read_back = {k: v for k, v in stored.items() if k != "accepted_at"}
    assert fingerprint(read_back) == fingerprint(queued_form(EVENT_ADAPTER.validate_python(first)))


@pytest.mark.usefixtures("worker")
def test_search_metrics_count_under_their_own_label(api: Service, client: httpx.Client) -> None:
    def written(kind: str) -> float:
        text = client.get("/metrics").text
        line = next((ln for ln in text.splitlines() if ln.startswith(f'sluice_events_written_total{{type="{kind}"}}')),
                    None)  # fmt: skip
        return float(line.split()[-1]) if line else 0.0

    before = {kind: written(kind) for kind in TYPE_NAMES}
    event = search(listing_id=random.randint(10**9, 10**12))
    assert client.post("/v1/events", json=event).status_code == 202
    wait_until(lambda: written("search") >= before["search"] + 1, 30, "the search to be counted as written")
    assert written("booking") == before["booking"], "a search must never be counted as a booking"


def test_an_optional_field_may_be_left_out_and_is_never_written_as_a_null() -> None:
    """``required=False``: absent or null in the request, queued as null, left unset in Cassandra."""
    from cassandra.query import UNSET_VALUE

    from sluice.events import _model
    from worker.writer import _optional

    note = EventField("note", text(max_length=20), required=False)
    model = _model(EventType("note", "NoteEvent", "A note.", "notes", (note,)))
    bare = view(type="note")
    assert queued_form(model.model_validate(bare))["note"] is None
    assert queued_form(model.model_validate(bare | {"note": "hi"}))["note"] == "hi"
    with pytest.raises(ValueError, match="at most 20 characters"):
        model.model_validate(bare | {"note": "x" * 21})
    load = _optional(note.kind.load)
    assert load(None) is UNSET_VALUE
    assert load("hi") == "hi"


@pytest.mark.usefixtures("worker")
def test_a_stored_row_of_an_undeclared_type_is_an_error_never_another_type(
    client: httpx.Client, cassandra: Session
) -> None:
    """A row whose type the registry does not declare (written by a newer release, or by hand) is refused
    by name on read, and counted under no declared type."""
    listing_id = random.randint(10**9, 10**12)
    event_id = uuid.uuid4()
    occurred = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    for table in ("events_by_listing_day", "events_by_id"):
        cassandra.execute(
            f"INSERT INTO {table} (event_id, type, listing_id, user_id, occurred_at, day, guests)"
            " VALUES (%s, 'click', %s, 7, %s, %s, 2)",
            (event_id, listing_id, occurred, occurred.date()),
        )
    answer = client.get(f"/v1/events/{event_id}")
    assert answer.status_code == 500, answer.text
    assert answer.json()["error"]["code"] == "unknown_event_type"
    assert "'click'" in answer.json()["error"]["message"]
    window = {"from": (occurred - dt.timedelta(minutes=1)).isoformat(), "to": dt.datetime.now(dt.UTC).isoformat()}
    assert client.get(f"/v1/listings/{listing_id}/events", params=window).status_code == 500
    day = occurred.date().isoformat()
    stats = client.get(f"/v1/listings/{listing_id}/stats", params={"from": day, "to": day}).json()
    assert [stats[kind.stats_key] for kind in REGISTRY] == [0] * len(REGISTRY)
