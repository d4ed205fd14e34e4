"""What usersvc sends when it connects in transaction-pooling mode
(USERSVC_DB_TRANSACTION_POOLING): no startup parameter PgBouncer refuses,
and no statement cache, on the listener's and the monitor's connections too
(usersvc.adapters.revocations.asyncpg_connect_arguments)."""

from __future__ import annotations

import dataclasses

from usersvc.adapters.database import TRANSACTION_POOLING_CONNECT_ARGS
from usersvc.adapters.revocations import asyncpg_connect_arguments
from usersvc.config import Settings

URL = "postgresql+asyncpg://usersvc_app@127.0.0.1:6432/usersvc"
DEFAULTS = Settings(database_url=URL)
POOLING = dataclasses.replace(DEFAULTS, db_transaction_pooling=True)


def test_a_direct_connection_sets_the_statement_timeout_at_connect() -> None:
    arguments = asyncpg_connect_arguments(URL, DEFAULTS)

    assert arguments["server_settings"]["statement_timeout"] == "5000"


def test_a_pooled_connection_sends_no_statement_timeout() -> None:
    arguments = asyncpg_connect_arguments(URL, POOLING)

    assert "statement_timeout" not in arguments["server_settings"]


def test_a_pooled_connection_keeps_the_client_side_timeout() -> None:
    arguments = asyncpg_connect_arguments(URL, POOLING)

    assert arguments["command_timeout"] > DEFAULTS.db_statement_timeout_ms / 1000


def test_a_pooled_connection_caches_no_statements() -> None:
    assert asyncpg_connect_arguments(URL, POOLING)["statement_cache_size"] == 0


def test_the_engine_asks_for_the_unnamed_statement_every_time() -> None:
    name_func = TRANSACTION_POOLING_CONNECT_ARGS["prepared_statement_name_func"]

    assert name_func() == ""
    assert TRANSACTION_POOLING_CONNECT_ARGS["prepared_statement_cache_size"] == 0
    assert TRANSACTION_POOLING_CONNECT_ARGS["statement_cache_size"] == 0
