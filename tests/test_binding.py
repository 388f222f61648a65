"""worker/binding.py: rows bound without the driver's ``bind`` carry exactly the bytes ``bind`` makes, and
whatever the direct path does not take gets the driver's own answer (its value, or its error)."""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest
from cassandra.cluster import Session
from cassandra.cqltypes import DateType, Int32Type, LongType, SimpleDateType, UTF8Type, UUIDType, VarcharType
from cassandra.query import UNSET_VALUE, PreparedStatement

from sluice.cassandra import EVENT_COLUMNS, Store
from worker import binding
from worker.binding import RowBinder

UTC = dt.UTC
PLUS_TWO = dt.timezone(dt.timedelta(hours=2))

#: Values each direct encoder takes, edges included: before the epoch with sub-millisecond digits (the
#: driver truncates towards zero there, not down), the ends of each range, naive times (read as UTC).
TAKEN: list[tuple[Any, Any]] = [
    (DateType, dt.datetime(2026, 11, 25, 8, 30, 0, 250_000, tzinfo=UTC)),
    (DateType, dt.datetime(2026, 11, 25, 8, 30, 0, 250_999, tzinfo=UTC)),
    (DateType, dt.datetime(1970, 1, 1, tzinfo=UTC)),
    (DateType, dt.datetime(1969, 12, 31, 23, 59, 59, 999_500, tzinfo=UTC)),
    (DateType, dt.datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC)),
    (DateType, dt.datetime(1900, 3, 1, 12, 0, 0, 123_456, tzinfo=UTC)),
    (DateType, dt.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)),
    (DateType, dt.datetime(1, 1, 1, tzinfo=UTC)),
    (DateType, dt.datetime(2026, 11, 25, 8, 30, 0, 250_000)),
    (DateType, dt.datetime(1969, 7, 20, 20, 17, 40, 500_001)),
    (SimpleDateType, dt.date(2026, 11, 25)),
    (SimpleDateType, dt.date(1970, 1, 1)),
    (SimpleDateType, dt.date(1969, 12, 31)),
    (SimpleDateType, dt.date(1, 1, 1)),
    (SimpleDateType, dt.date(9999, 12, 31)),
    (UUIDType, uuid.UUID("1027c4d1-c386-4bc4-8d61-3e30d8f16adf")),
    (UUIDType, uuid.UUID(int=0)),
    (LongType, 0),
    (LongType, -1),
    (LongType, 2**63 - 1),
    (LongType, -(2**63)),
    (Int32Type, 2**31 - 1),
    (Int32Type, -(2**31)),
    (UTF8Type, ""),
    (UTF8Type, "héllo wörld ✓ \U0001f600"),
    (VarcharType, "view"),
]

#: Values the direct encoders leave to the driver: other Python types, subclasses, other time zones.
LEFT: list[tuple[Any, Any]] = [
    (DateType, dt.datetime(2026, 11, 25, 10, 30, tzinfo=PLUS_TWO)),
    (DateType, dt.date(2026, 11, 25)),
    (DateType, 1_764_059_400_250),
    (SimpleDateType, dt.datetime(2026, 11, 25, 8, 30, tzinfo=UTC)),
    (SimpleDateType, 2**31 + 20_417),
    (LongType, True),
    (Int32Type, False),
    (UTF8Type, b"raw bytes"),
    (UUIDType, "1027c4d1-c386-4bc4-8d61-3e30d8f16adf"),
]


@pytest.mark.parametrize(("cql_type", "value"), TAKEN, ids=repr)
def test_each_direct_encoder_makes_the_drivers_bytes(cql_type: Any, value: Any) -> None:
    assert binding._encoder(cql_type, 5)(value) == cql_type.serialize(value, 5)


@pytest.mark.parametrize(("cql_type", "value"), LEFT, ids=repr)
def test_a_value_the_direct_path_does_not_take_is_refused_not_encoded(cql_type: Any, value: Any) -> None:
    with pytest.raises(binding._Refused):
        binding._encoder(cql_type, 5)(value)


@pytest.fixture(scope="module")
def statement(cassandra: Session) -> PreparedStatement:
    return Store(cassandra.cluster, cassandra, cassandra.keyspace).insert_by_listing


def _row(**changes: Any) -> list[Any]:
    """A row of the events insert (``day``, :data:`EVENT_COLUMNS`, the write timestamp, the TTL): a booking."""
    occurred = dt.datetime(2026, 11, 25, 8, 30, 0, 250_000, tzinfo=UTC)
    values: dict[str, Any] = {
        "day": occurred.date(), "event_id": uuid.uuid4(), "type": "booking", "listing_id": 42,
        "user_id": 7, "occurred_at": occurred, "check_in": dt.date(2027, 1, 2), "check_out": dt.date(2027, 1, 5),
        "guests": 2, "total_price": Decimal("412.50"), "currency": "EUR", "query": UNSET_VALUE,
        "result_count": None, "accepted_at": dt.datetime.now(UTC), "timestamp": 1_764_059_400_250_000, "ttl": 0,
    }  # fmt: skip
    assert list(values)[1:-2] == ["event_id", *EVENT_COLUMNS[1:]]  # the statement's columns, in order
    values.update(changes)
    return list(values.values())


def test_a_row_is_bound_to_the_drivers_bytes_and_routing_key(statement: PreparedStatement) -> None:
    binder = RowBinder(statement)
    for row in (_row(), _row(type="view", check_in=UNSET_VALUE, check_out=UNSET_VALUE, guests=UNSET_VALUE,
                             total_price=UNSET_VALUE, currency=UNSET_VALUE, occurred_at=dt.datetime(2026, 1, 1)),
                _row(occurred_at=dt.datetime(2026, 1, 1, 2, tzinfo=PLUS_TWO), listing_id=True)):  # fmt: skip
        ours, theirs = binder.bind(row), statement.bind(row)
        assert ours.values == theirs.values
        assert ours.raw_values == theirs.raw_values
        assert ours.routing_key == theirs.routing_key
        assert ours.prepared_statement is statement
        assert (ours.keyspace, ours.consistency_level, ours.is_idempotent) == (
            theirs.keyspace, theirs.consistency_level, theirs.is_idempotent)  # fmt: skip


def test_the_rows_the_worker_binds_never_take_the_drivers_bind(statement: PreparedStatement) -> None:
    """Else the tests above would pass through the fallback alone."""

    def refuse(values: Any) -> None:
        raise AssertionError("the driver's bind was called")

    only_direct = copy.copy(statement)
    only_direct.bind = refuse
    view = _row(type="view", check_in=UNSET_VALUE, check_out=UNSET_VALUE, guests=UNSET_VALUE,
                total_price=UNSET_VALUE, currency=UNSET_VALUE)  # fmt: skip
    assert RowBinder(only_direct).bind(view).values == statement.bind(view).values
    with pytest.raises(AssertionError, match="driver's bind"):
        RowBinder(only_direct).bind(_row(listing_id="42"))


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"listing_id": "42"}, TypeError),  # the wrong type: the driver names the column
        ({"user_id": 2**63}, TypeError),  # out of range for a bigint
        ({"total_price": "not a number"}, TypeError),  # a column type's own refusal
        ({"listing_id": UNSET_VALUE}, ValueError),  # part of the routing key
    ],
    ids=["wrong-type", "out-of-range", "decimal", "unset-key"],
)
def test_a_row_the_driver_refuses_gets_the_drivers_error(
    statement: PreparedStatement, changes: dict[str, Any], error: type[Exception]
) -> None:
    row = _row(**changes)
    with pytest.raises(error) as theirs:
        statement.bind(row)
    with pytest.raises(error) as ours:
        RowBinder(statement).bind(row)
    assert str(ours.value) == str(theirs.value)


def test_a_row_of_another_width_is_the_drivers_to_bind(statement: PreparedStatement) -> None:
    short = _row()[:-3]  # protocol v4+: the driver leaves the missing columns unset
    assert RowBinder(statement).bind(short).values == statement.bind(short).values
    with pytest.raises(ValueError, match="Too many arguments"):
        RowBinder(statement).bind([*_row(), 1])
