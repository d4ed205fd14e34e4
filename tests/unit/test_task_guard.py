"""The guard of tests/conftest.py: a test that leaves an asyncio task
pending fails, named with the task; one that cleans up passes; tasks of
longer-lived fixtures are not counted against it. Run as a pytest of its
own in a subprocess, with the repository's root conftest."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from support.tasks import cancel, left_pending, live_tasks

TESTS_DIR = Path(__file__).resolve().parents[1]

LEAKY_SUITE = """
import asyncio

import pytest


async def forever() -> None:
    await asyncio.Event().wait()


@pytest.fixture(scope="module")
async def module_worker():
    task = asyncio.create_task(forever(), name="module-worker")
    yield task
    task.cancel()


async def test_leaks_a_task():
    asyncio.create_task(forever(), name="the-leaked-one")


async def test_cleans_up_after_itself():
    task = asyncio.create_task(forever(), name="cancelled-in-time")
    task.cancel()


async def test_a_module_fixture_task_is_not_this_tests(module_worker):
    assert not module_worker.done()


async def test_a_task_finishing_at_teardown_is_not_a_leak():
    # Ends a moment later, without a sleep: after one more loop turn.
    async def short() -> None:
        await asyncio.sleep(0)

    asyncio.create_task(short(), name="about-to-finish")


def test_sync_tests_run_under_the_guard_too():
    assert True
"""


def test_a_leaked_task_fails_the_test_that_left_it_and_only_that_one(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text((TESTS_DIR / "conftest.py").read_text())
    (suite / "test_leaky.py").write_text(LEAKY_SUITE)
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", str(suite), "-p", "no:cacheprovider", "-q",
            "-o", "asyncio_mode=auto",
            "-o", "asyncio_default_fixture_loop_scope=session",
            "-o", "asyncio_default_test_loop_scope=session",
            "-o", f"pythonpath={TESTS_DIR}",
            "--rootdir", str(suite),
        ],
        capture_output=True, text=True, timeout=120, check=False, cwd=suite,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "5 passed, 1 error" in output, output
    assert "ERROR test_leaky.py::test_leaks_a_task" in output, output
    assert "the-leaked-one (forever)" in output, output
    assert "cancelled-in-time" not in output
    assert "module-worker" not in output
    assert "about-to-finish" not in output
    # The leftover was cancelled, not left to be destroyed with the loop.
    assert "Task was destroyed but it is pending" not in output


async def test_left_pending_names_only_tasks_started_since_the_snapshot() -> None:
    older = asyncio.create_task(asyncio.Event().wait(), name="older")
    before = live_tasks()
    newer = asyncio.create_task(asyncio.Event().wait(), name="newer")
    try:
        assert await left_pending(before, settle_seconds=0.01) == [newer]
    finally:
        await cancel([older, newer])
    assert older.cancelled()
    assert newer.cancelled()
