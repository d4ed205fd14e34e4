"""What a stored user costs in a response, in SQL: usersvc.domain.wire_size's
estimate computed by PostgreSQL, so that a read can stop (ListUsers,
usersvc.adapters.repository.listing) or refuse (BatchGetUsers, the
statement below) before the rows travel.
"""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Integer,
    Text,
    Uuid,
    any_,
    bindparam,
    case,
    cast,
    func,
    literal_column,
    over,
    select,
)

from usersvc.adapters.repository.user_rows import USER_COLUMNS, users
from usersvc.domain.wire_size import FIXED_USER_BYTES, LABEL_OVERHEAD, STRING_OVERHEAD

# What jsonb's text adds to an entry's key and value: "": "", and ", "
# (or, once, the braces).
_JSON_ENTRY_CHARACTERS = 8
# Labels stored in fewer bytes than this are sized from their JSON text,
# larger ones entry by entry (see _wire_bytes).
_SMALL_LABELS_BYTES = 1024


def _wire_bytes() -> ColumnElement[int]:
    # Small labels are sized from their JSON text, {"key": "value", ...}:
    # each entry is its key and value plus 8 characters, and every '": "'
    # gets 4 more, which makes the 12 of LABEL_OVERHEAD. Inside JSON
    # strings every quote is escaped, so that sequence occurs once per
    # entry (or, after a value ending in '": ', once more); escapes only
    # lengthen the text. So the sum is the service's exactly unless a key
    # or value holds a quote, a backslash or '": ', and never below it.
    # Large labels are summed entry by entry (jsonb_each_text: exact),
    # which costs a fixed 2 us a row but a quarter of rendering and
    # searching their text (12 us against 40 to 80 for 64 entries of 320
    # characters; 2.5 us against 0.5 for two short ones). The stored size
    # chooses (pg_column_size and pg_column_compression read it without
    # fetching the value; a compressed value is large).
    padding = "." * (LABEL_OVERHEAD - _JSON_ENTRY_CHARACTERS)
    label_text = func.replace(cast(users.labels, Text), _text('": "'), _text('": "' + padding))
    entries = func.jsonb_each_text(users.labels).table_valued("key", "value")
    entry_bytes = (
        _integer(LABEL_OVERHEAD)
        + func.octet_length(entries.c.key)
        + func.octet_length(entries.c.value)
    )
    return cast(
        _integer(FIXED_USER_BYTES + 2 * STRING_OVERHEAD)
        + func.octet_length(users.email)
        + func.octet_length(users.display_name)
        + func.octet_length(func.array_to_string(users.roles, _text("")))
        + _integer(STRING_OVERHEAD) * func.cardinality(users.roles)
        + case(
            (users.labels == literal_column("'{}'::jsonb"), _integer(0)),
            (
                (func.pg_column_size(users.labels) < _integer(_SMALL_LABELS_BYTES))
                & func.pg_column_compression(users.labels).is_(None),
                func.octet_length(label_text),
            ),
            else_=select(func.sum(entry_bytes)).select_from(entries).scalar_subquery(),
        ),
        Integer,
    )


# The constants are written into the SQL, not bound: the read lane runs
# these statements on the driver with its own arguments only.
def _integer(value: int) -> ColumnElement[int]:
    return literal_column(str(int(value)), Integer)


def _text(value: str) -> ColumnElement[str]:
    if "'" in value or "\\" in value:
        raise ValueError(f"not a constant to write into SQL: {value!r}")
    return literal_column(f"'{value}'", Text)


# usersvc.domain.wire_size.user_wire_bytes of a row, in SQL, or a little
# more (see _wire_bytes). Text is UTF-8 in PostgreSQL: octet_length counts
# the bytes Python counts.
WIRE_BYTES = _wire_bytes()

_BY_IDS = users.id == any_(bindparam("user_ids", type_=ARRAY(Uuid)))

# The users among the ids (as GET_USERS_BY_IDS), each with its size
# ("wire_bytes") and "deleted"; "fits" says whether their sizes together
# stay within "max_bytes". When they do not, the rows carry only those
# (every user column but the id is null): none of the users' bytes leave
# PostgreSQL, and a refusal still knows which users exist and their sizes.
# (OFFSET 0 keeps PostgreSQL from merging "found" into the query above it,
# where it would compute each size twice: for the sum and for the row.)
_FOUND = (
    select(*USER_COLUMNS, WIRE_BYTES.label("wire_bytes"))
    .where(_BY_IDS)
    .offset(_integer(0))
    .subquery("found")
)
_TOTALS = select(
    _FOUND,
    (over(func.sum(_FOUND.c.wire_bytes)) <= bindparam("max_bytes", type_=Integer)).label("fits"),
).subquery("totals")
GET_USERS_BY_IDS_WITHIN = select(
    _TOTALS.c.id,
    *(
        case((_TOTALS.c.fits, _TOTALS.c[column.name])).label(column.name)
        for column in USER_COLUMNS
        if column.name != "id"
    ),
    _TOTALS.c.delete_time.is_not(None).label("deleted"),
    _TOTALS.c.wire_bytes,
    _TOTALS.c.fits,
)
