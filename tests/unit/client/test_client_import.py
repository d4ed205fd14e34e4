"""Importing the client stays light: other services that call usersvc must
not pull in the server's database, hashing or token libraries."""

from __future__ import annotations

import subprocess
import sys

SERVER_ONLY = ("sqlalchemy", "asyncpg", "bcrypt", "alembic", "redis", "jwt", "pgserver")
SERVER_PACKAGES = ("usersvc.adapters", "usersvc.services", "usersvc.api", "usersvc.domain")


def test_importing_the_client_loads_none_of_the_servers_dependencies() -> None:
    probe = "import sys, usersvc.client\nprint('\\n'.join(sorted(sys.modules)))\n"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(result.stdout.split())
    assert "usersvc.client" in loaded, "the probe did not import the client"
    heavy = sorted(
        name
        for name in loaded
        if name.split(".")[0] in SERVER_ONLY or name.startswith(SERVER_PACKAGES)
    )
    assert heavy == []
