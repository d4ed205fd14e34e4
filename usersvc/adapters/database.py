"""Engine construction (failures are translated in usersvc.adapters.database_errors).

One engine per process, built by the composition root from Settings; nothing
here runs at import.

TLS is configured in the URL. asyncpg's own ``?ssl=require`` (or
``verify-ca``, ``verify-full``, ...) passes straight through the asyncpg
dialect. The libpq spellings work too: ``?sslmode=verify-full&sslrootcert=
/etc/ssl/db-ca.pem`` (also ``sslcert``, ``sslkey``, ``sslcrl``); asyncpg reads
those only from a DSN, so create_engine hands them over as one.

Behind a transaction-pooling proxy (PgBouncer ``pool_mode = transaction``,
USERSVC_DB_TRANSACTION_POOLING=true) each transaction may run on another
server connection, so nothing may outlive a transaction on one: asyncpg's and
the dialect's statement caches are off and every statement is PostgreSQL's
unnamed one (see TRANSACTION_POOLING_CONNECT_ARGS), and no session setting is
sent at connect (PgBouncer refuses startup parameters such as
statement_timeout: set that one on the role instead, deploy/grants.sql).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import await_

from usersvc.config import Settings

APPLICATION_NAME = "usersvc"

# asyncpg waits 60 s for a connection by default; an RPC should learn sooner
# that the database is gone. A ``timeout`` in the URL takes precedence.
CONNECT_TIMEOUT_SECONDS = 10.0

# A client-side backstop on top of the server's statement_timeout: if the
# network drops without a reset, the server cannot cancel anything and the
# query would otherwise wait for TCP keepalive.
COMMAND_TIMEOUT_MARGIN_SECONDS = 5.0

# TLS options asyncpg understands only inside a DSN, not as keyword arguments.
LIBPQ_TLS_PARAMETERS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl")


def _unnamed_statement() -> str:
    return ""


# Through a transaction pool: asyncpg's own statement cache off, the
# dialect's cache off, and the dialect's prepare() asked for the unnamed
# statement. Named statements, even uniquely named ones (the uuid recipe of
# the SQLAlchemy docs), stay behind on whichever server connection ran the
# transaction: one leaked per transaction until the proxy recycles that
# connection. The unnamed statement is replaced by the next Parse, and
# asyncpg re-parses it with every execution when its cache is off, so it
# never has to survive a hop between server connections.
TRANSACTION_POOLING_CONNECT_ARGS: Mapping[str, Any] = MappingProxyType(
    {
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": _unnamed_statement,
    }
)


def create_engine(settings: Settings, url: str) -> AsyncEngine:
    """Build the service's AsyncEngine: pool sizing from ``settings``, a
    server-side ``statement_timeout`` (``db_statement_timeout_ms``; 0 leaves
    the server's or role's own setting alone; never sent with
    ``db_transaction_pooling``, where only the client-side backstop applies)
    and ``application_name`` set on every connection. Connects lazily, so an
    unreachable database surfaces on first use as DatabaseUnavailable, not
    here.

    Raises sqlalchemy.exc.ArgumentError for a malformed URL.
    """
    parsed = make_url(url)
    server_settings = {"application_name": APPLICATION_NAME}
    connect_args: dict[str, Any] = {"server_settings": server_settings}
    tls = {name: parsed.query[name] for name in LIBPQ_TLS_PARAMETERS if name in parsed.query}
    if tls:
        parsed = parsed.difference_update_query(tls)
        # Host, port, user and database still come from the URL: asyncpg
        # lets keyword arguments override the DSN.
        connect_args["dsn"] = "postgresql://?" + urlencode(tls, doseq=True)
    if settings.db_statement_timeout_ms > 0:
        if not settings.db_transaction_pooling:
            server_settings["statement_timeout"] = str(settings.db_statement_timeout_ms)
        connect_args["command_timeout"] = (
            settings.db_statement_timeout_ms / 1000 + COMMAND_TIMEOUT_MARGIN_SECONDS
        )
    if settings.db_transaction_pooling:
        connect_args.update(TRANSACTION_POOLING_CONNECT_ARGS)
    if "timeout" not in parsed.query:
        connect_args["timeout"] = CONNECT_TIMEOUT_SECONDS
    engine = create_async_engine(
        parsed,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        # Our own, cheaper pre-ping instead (install_pre_ping).
        pool_pre_ping=False,
        pool_recycle=settings.db_pool_recycle_seconds,
        # SQLAlchemy error messages otherwise quote bound parameters, which
        # include password hashes; those messages reach logs.
        hide_parameters=True,
        connect_args=connect_args,
    )
    if settings.db_pool_pre_ping:
        install_pre_ping(engine)
    return engine


# Set by callers that check their connection by using it and retry once on a
# fresh one when it was dead (usersvc.adapters.read_lane).
_skip_pre_ping: ContextVar[bool] = ContextVar("usersvc_skip_pre_ping", default=False)
# Sent with the simple query protocol (asyncpg's execute without arguments).
# Not the empty query: asyncpg cannot read an answer without a command tag.
_PING_SQL = "SELECT 1"


@contextmanager
def skipping_pre_ping() -> Iterator[None]:
    """Connections checked out inside the block are not pinged first. Only
    for work that changes nothing and retries once on a fresh connection
    after a disconnect (the pool is invalidated by then). Never raises."""
    token = _skip_pre_ping.set(True)
    try:
        yield
    finally:
        _skip_pre_ping.reset(token)


def install_pre_ping(engine: AsyncEngine) -> None:
    """Ping every pooled connection at checkout with one simple-protocol
    round trip, replacing it (and every connection pooled before it) when
    the ping fails, as SQLAlchemy's ``pool_pre_ping`` does.

    Why not ``pool_pre_ping``: outside a transaction the asyncpg dialect
    pings with BEGIN, a prepared ``;`` and ROLLBACK (three round trips, so
    that a transaction pool cannot split the prepare from its execution),
    and a GetUser then cost six round trips instead of one. A simple-protocol
    query is one message, one round trip, and safe behind PgBouncer's
    transaction mode (nothing is prepared). Raises nothing.
    """

    def ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if _skip_pre_ping.get():
            return
        try:
            # Runs inside SQLAlchemy's greenlet (the pool is sync code).
            await_(dbapi_connection.driver_connection.execute(_PING_SQL))
        except Exception as exc:
            # The pool reconnects this record and drops older connections:
            # a dead one seldom dies alone (a restart, a failover).
            raise sa_exc.InvalidatePoolError() from exc

    event.listen(engine.sync_engine.pool, "checkout", ping)
