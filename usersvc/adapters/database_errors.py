"""The one translation of SQLAlchemy and asyncpg failures into the errors the
services understand, as advanced-alchemy's ``wrap_sqlalchemy_exception`` does:

    with translate_database_errors({USERS_EMAIL_INDEX: EmailAlreadyExists}):
        await session.execute(statement)

- an integrity error on a constraint or index named in the mapping becomes
  the error its factory makes (matched by the name the driver reports, never
  by message text);
- a failure meaning the database cannot serve us right now (lost or refused
  connections, pool and statement timeouts, stale cached statements) becomes
  DatabaseUnavailable;
- anything else, domain errors raised inside the block included, passes
  through unchanged. Translated errors are chained with ``from``.

Every path to PostgreSQL uses it: the repositories, the unit of work's
commit and rollback, the read lane and the revocation checker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import exc as sa_exc

from usersvc.domain.errors import DatabaseUnavailable, DomainError

logger = logging.getLogger(__name__)

# Constraint or index name -> the error a violation of it stands for.
ConstraintErrors = Mapping[str, Callable[[], Exception]]
NO_CONSTRAINT_ERRORS: ConstraintErrors = MappingProxyType({})

# SQLSTATEs meaning "the database cannot serve us right now; retry later":
# the connection class (08), refused logins (28: from the service's point of
# view the database is unreachable), too many connections, shutdown and
# start-up (57P0x), and statement_timeout (57014).
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "28")
_UNAVAILABLE_SQLSTATES = frozenset({"53300", "57014", "57P01", "57P02", "57P03"})
# An integrity error raised by asyncpg itself, on the lanes that call the
# driver directly (usersvc.adapters.pooled_driver).
_RAW_INTEGRITY_ERROR = asyncpg.exceptions.IntegrityConstraintViolationError
_STALE_STATEMENT_ERRORS = (
    asyncpg.exceptions.InvalidCachedStatementError,
    asyncpg.exceptions.OutdatedSchemaCacheError,
)


@contextmanager
def translate_database_errors(
    constraints: ConstraintErrors = NO_CONSTRAINT_ERRORS,
) -> Iterator[None]:
    """Re-raise failures inside the block as described in the module
    docstring. Raises DatabaseUnavailable, whatever ``constraints`` makes,
    and everything else unchanged."""
    try:
        yield
    except Exception as exc:
        error = _translated(exc, constraints)
        if error is None:
            raise
        raise error from exc


def _translated(exc: Exception, constraints: ConstraintErrors) -> Exception | None:
    if isinstance(exc, DomainError):
        return None
    if isinstance(exc, sa_exc.IntegrityError | _RAW_INTEGRITY_ERROR):
        make_error = constraints.get(constraint_name_of(exc) or "")
        return None if make_error is None else make_error()
    if not is_unavailable(exc):
        return None
    # The class name is enough for operators; the chained exception keeps the
    # details for the traceback the error mapper logs.
    logger.warning("database unavailable: %s", type(exc).__name__)
    return DatabaseUnavailable()


def sqlstate_of(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE carried by ``exc`` (a SQLAlchemy DBAPIError, an
    adapted DBAPI error or a raw asyncpg error), or None."""
    candidates: list[object] = [exc]
    if isinstance(exc, sa_exc.DBAPIError):
        candidates.append(exc.orig)
    candidates.extend([exc.__cause__, getattr(exc.__cause__, "__cause__", None)])
    for candidate in candidates:
        code = getattr(candidate, "sqlstate", None)
        if isinstance(code, str) and code:
            return code
    return None


def constraint_name_of(exc: BaseException) -> str | None:
    """The name of the violated constraint or index behind an integrity
    error, when the driver reports it."""
    for candidate in _error_chain(exc):
        name = getattr(candidate, "constraint_name", None)
        if isinstance(name, str) and name:
            return name
    return None


def _error_chain(exc: BaseException) -> Iterator[object]:
    seen: set[int] = set()
    current: object = exc
    while isinstance(current, BaseException) and id(current) not in seen:
        seen.add(id(current))
        yield current
        if isinstance(current, sa_exc.DBAPIError) and current.orig is not None:
            current = current.orig
        else:
            current = current.__cause__


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the database is unreachable or cannot serve
    the request right now, so that a retry may succeed (as opposed to a bug
    or a constraint violation)."""
    if isinstance(exc, sa_exc.TimeoutError):
        return True  # no pooled connection within pool_timeout
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    chain = list(_error_chain(exc))
    # A schema change (a migration) made a cached prepared statement stale;
    # the dialect has dropped its caches, so the retry will prepare afresh.
    if any(isinstance(e, _STALE_STATEMENT_ERRORS) for e in chain):
        return True
    code = sqlstate_of(exc)
    if code is not None:
        return code in _UNAVAILABLE_SQLSTATES or code[:2] in _UNAVAILABLE_SQLSTATE_CLASSES
    # Failures to connect arrive unwrapped: refused, unreachable, DNS, TLS
    # handshake and connect timeouts are all OSError subclasses.
    return any(isinstance(e, OSError) for e in chain)
