"""How the embedded PostgreSQL's commands are run as its system user
(usersvc.adapters.embedded.RunAsUser): through runuser, so that Python
starts them without fork()."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from usersvc.adapters.embedded import RUNUSER, RunAsUser


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], dict[str, Any]]]:
    seen: list[tuple[list[str], dict[str, Any]]] = []

    def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        seen.append((args, kwargs))
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    return seen


def test_a_command_for_another_user_runs_through_runuser_without_user(
    calls: list[tuple[list[str], dict[str, Any]]],
) -> None:
    RunAsUser().run(["/opt/pg/bin/initdb", "-D", "/data"], user="pgserver", check=True, timeout=10)
    # No ``user=`` left: that is what would make Python fork().
    assert calls == [
        ([RUNUSER, "-u", "pgserver", "--", "/opt/pg/bin/initdb", "-D", "/data"],
         {"check": True, "timeout": 10}),
    ]  # fmt: skip


def test_a_command_for_ourselves_runs_as_given(
    calls: list[tuple[list[str], dict[str, Any]]],
) -> None:
    RunAsUser().run(["/opt/pg/bin/psql", "-c", "SELECT 1"], check=True)
    assert calls == [(["/opt/pg/bin/psql", "-c", "SELECT 1"], {"check": True})]


def test_the_rest_is_the_subprocess_module() -> None:
    # pgserver catches these by ``subprocess.<name>`` on what it was given.
    runner = RunAsUser()
    assert runner.CalledProcessError is subprocess.CalledProcessError
    assert runner.TimeoutExpired is subprocess.TimeoutExpired
