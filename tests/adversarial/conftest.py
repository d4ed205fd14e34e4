"""Fixtures of the adversarial tier: a server (support.Server) on the
session's test database and a fresh cast of callers, per test module."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine
from support.servers import in_process

from .support import FUZZ_COUNTS, Cast, Server, generous, truncate_all


@pytest.fixture(scope="session")
def adversarial_settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Cheap bcrypt, a pool that a thousand concurrent calls can queue for
    without timing out, and sign-up open (anonymous CreateUser is the first
    thing an attacker calls)."""
    from usersvc.config import Settings

    data_dir: Path = tmp_path_factory.mktemp("usersvc-adversarial")
    return generous(
        dataclasses.replace(
            Settings(),
            database_url=database_url,
            data_dir=data_dir,
            bcrypt_rounds=4,
            allow_signup=True,
            listen_addr="127.0.0.1:0",
            shutdown_grace_seconds=1.0,
            db_pool_size=20,
            db_max_overflow=20,
            db_pool_timeout_seconds=60.0,
        )
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def adversarial_server(adversarial_settings: Any) -> AsyncIterator[Server]:
    """One server per test module: its pool of up to 40 connections is
    closed when the module ends, not held through the rest of the suite."""
    async with in_process(adversarial_settings) as running:
        yield Server(running.container, running.server, running.channel)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cast(adversarial_server: Server, engine: AsyncEngine) -> Cast:
    """A fresh cast on an empty database, once per test module."""
    await truncate_all(engine)
    return await Cast.assemble(adversarial_server)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FUZZ_COUNTS:
        return
    total = sum(count for key, count in FUZZ_COUNTS.items() if key.startswith("calls:"))
    terminalreporter.write_sep("-", f"adversarial tier: {total} hostile calls")
    for key in sorted(FUZZ_COUNTS):
        terminalreporter.write_line(f"  {key}: {FUZZ_COUNTS[key]}")
