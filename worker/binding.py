"""Rows bound to a prepared statement for less than the driver's ``bind`` costs; the same bytes.

At 1,000 single events/s, binding each row (``PreparedStatement.bind``) was a quarter of the writing pool
process's CPU (py-spy, docs/performance.md, tenth steps): about 20 µs a row on the development machine, of
which the values' encoding was half (a ``timestamp`` through ``calendar.timegm`` and ``utctimetuple``, a
``date`` through the driver's ``Date``) and the rest the driver's loop around it (a column descriptor and an
encryption-policy check per value). :class:`RowBinder` encodes each column's value with a function chosen
once per column: a direct one for the Python types the worker binds (the driver's own packers), the column
type's ``serialize`` for anything else. Its result is a :class:`~cassandra.query.BoundStatement` as ``bind``
makes it (``values`` the encoded bytes, ``UNSET_VALUE`` and ``None`` kept; ``raw_values`` what was given).

What it does not take, ``bind`` itself does, with the driver's own errors: a value the direct encoder refuses
(the wrong type: its column's error names it), a row of another width, an unset routing-key value, a
statement with a column-encryption policy, protocol versions before 4. tests/test_binding.py compares the
bytes with the driver's for every column type and edge the worker binds.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

from cassandra.cqltypes import DateType, Int32Type, LongType, SimpleDateType, UTF8Type, UUIDType, VarcharType
from cassandra.marshal import int32_pack, int64_pack, uint32_pack
from cassandra.query import UNSET_VALUE, BoundStatement, PreparedStatement

Encode = Callable[[Any], bytes]

_EPOCH_UTC: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_NAIVE: Final = dt.datetime(1970, 1, 1)
_EPOCH_ORDINAL: Final = dt.date(1970, 1, 1).toordinal()
#: CQL's ``date`` is days since the epoch, offset to the middle of an unsigned 32-bit range.
_DATE_OFFSET: Final = 2**31


def _timestamp(value: dt.datetime) -> bytes:
    # What DateType.serialize computes (whole seconds from the UTC time tuple, then the microseconds as a
    # fraction of a millisecond, truncated), from one subtraction instead of utctimetuple() and timegm().
    # Only for UTC or naive times: there the delta's microseconds are the value's own, as the driver reads.
    delta = value - (_EPOCH_NAIVE if value.tzinfo is None else _EPOCH_UTC)
    packed: bytes = int64_pack(int((delta.days * 86_400 + delta.seconds) * 1e3 + delta.microseconds / 1e3))
    return packed


def _date(value: dt.date) -> bytes:
    packed: bytes = uint32_pack(value.toordinal() - _EPOCH_ORDINAL + _DATE_OFFSET)
    return packed


def _utc_or_naive(value: Any) -> bool:
    return type(value) is dt.datetime and (value.tzinfo is None or value.tzinfo is dt.UTC)


#: Column type -> (does a value take the direct path?, the direct encoder). Exact Python types only: a
#: subclass (``bool`` for ``int``, a ``datetime`` for ``date``) goes the driver's way.
_DIRECT: Final[dict[type, tuple[Callable[[Any], bool], Encode]]] = {
    UUIDType: (lambda v: type(v) is uuid.UUID, lambda v: v.bytes),
    LongType: (lambda v: type(v) is int, int64_pack),
    Int32Type: (lambda v: type(v) is int, int32_pack),
    UTF8Type: (lambda v: type(v) is str, str.encode),
    VarcharType: (lambda v: type(v) is str, str.encode),
    DateType: (_utc_or_naive, _timestamp),
    SimpleDateType: (lambda v: type(v) is dt.date, _date),
}


class _Refused(Exception):
    """A value the direct path does not take: the row goes to the driver's ``bind``."""


def _encoder(cql_type: Any, protocol_version: int) -> Encode:
    serialize = cql_type.serialize
    direct = _DIRECT.get(cql_type)
    if direct is None:
        return lambda value: serialize(value, protocol_version)
    takes, encode = direct

    def checked(value: Any) -> bytes:
        if takes(value):
            return encode(value)
        raise _Refused

    return checked


class RowBinder:
    """Binds rows to one prepared statement (see the module's doc); one per statement, shared by calls."""

    def __init__(self, statement: PreparedStatement) -> None:
        self.statement = statement
        self._meta: Any = None
        self._encoders: tuple[Encode, ...] | None = None
        self._routing: tuple[int, ...] = ()

    def _prepare(self) -> None:
        statement = self.statement
        self._meta = statement.column_metadata
        if statement.protocol_version < 4 or statement.column_encryption_policy is not None:
            self._encoders = None
            return
        self._encoders = tuple(_encoder(column.type, statement.protocol_version) for column in self._meta)
        self._routing = tuple(statement.routing_key_indexes or ())

    def bind(self, values: Sequence[Any]) -> BoundStatement:
        statement = self.statement
        # The driver replaces a statement's metadata when it prepares it again (after a schema change).
        if statement.column_metadata is not self._meta:
            self._prepare()
        encoders = self._encoders
        if encoders is None or len(values) != len(encoders):
            return statement.bind(values)
        try:
            encoded = [
                value if value is None or value is UNSET_VALUE else encode(value)
                for value, encode in zip(values, encoders, strict=True)
            ]
        except Exception:  # noqa: BLE001 - _Refused, or a column type's own refusal: the driver's error
            return statement.bind(values)
        for index in self._routing:
            if encoded[index] is UNSET_VALUE:
                return statement.bind(values)  # the driver's error
        bound = BoundStatement(statement)
        bound.raw_values = values
        bound.values = encoded
        return bound
