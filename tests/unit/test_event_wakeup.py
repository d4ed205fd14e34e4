"""The sequencer wake-up (usersvc.adapters.event_wakeup) without a database:
whom a commit wakes, and how many NOTIFYs a burst of commits costs; and that
every constant statement writing events says so, so its commit wakes."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil

from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import TextualSelect

import usersvc.adapters
from usersvc.adapters.event_wakeup import SequencerWakeup
from usersvc.adapters.events import WRITES_EVENTS_OPTION


class FakeFeed:
    def __init__(self, *, listening: bool) -> None:
        self.listening = listening
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


class CountingNotify:
    """A NOTIFY that counts; each call waits for ``gate`` (open by default)."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next = False

    async def __call__(self) -> None:
        self.calls += 1
        self.entered.set()
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("database gone")


async def test_a_commit_wakes_the_listening_feed_of_its_process_and_sends_no_notify() -> None:
    feed, notify = FakeFeed(listening=True), CountingNotify()
    wakeup = SequencerWakeup(feed=feed, notify=notify)

    wakeup.events_committed()
    wakeup.events_committed()
    await wakeup.aclose()

    assert (feed.wakes, notify.calls, wakeup.notifications) == (2, 0, 0)


async def test_without_a_listening_feed_a_burst_of_commits_costs_one_notify() -> None:
    feed, notify = FakeFeed(listening=False), CountingNotify()
    wakeup = SequencerWakeup(feed=feed, notify=notify)

    for _ in range(100):
        wakeup.events_committed()
    await wakeup.aclose()

    assert (feed.wakes, notify.calls, wakeup.notifications) == (0, 1, 1)


async def test_commits_during_a_notify_share_the_next_one() -> None:
    notify = CountingNotify()
    notify.gate.clear()
    wakeup = SequencerWakeup(notify=notify, min_interval=0.0)

    wakeup.events_committed()
    await notify.entered.wait()
    for _ in range(50):
        wakeup.events_committed()  # while the first NOTIFY is under way
    notify.gate.set()
    await wakeup.aclose()

    assert notify.calls == 2


async def test_a_failed_notify_is_not_raised_and_the_next_commit_notifies_again() -> None:
    notify = CountingNotify()
    notify.gate.clear()
    notify.fail_next = True
    wakeup = SequencerWakeup(notify=notify, min_interval=0.0)

    wakeup.events_committed()
    await notify.entered.wait()
    wakeup.events_committed()  # due again while the first attempt fails
    notify.gate.set()
    await wakeup.aclose()

    assert (notify.calls, wakeup.notifications) == (2, 1)


async def test_after_aclose_commits_wake_nothing() -> None:
    notify = CountingNotify()
    wakeup = SequencerWakeup(notify=notify)
    await wakeup.aclose()

    wakeup.events_committed()
    await wakeup.aclose()

    assert notify.calls == 0


def _constant_statements_inserting_events() -> list[tuple[str, TextClause | TextualSelect]]:
    found = []
    for module_info in pkgutil.walk_packages(usersvc.adapters.__path__, "usersvc.adapters."):
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if isinstance(value, (TextClause, TextualSelect)):
                sql = value.text if isinstance(value, TextClause) else value.element.text
                if "INSERT INTO events" in sql:
                    found.append((f"{module_info.name}.{name}", value))
    return found


def test_every_constant_statement_inserting_events_is_marked_as_writing_events() -> None:
    statements = _constant_statements_inserting_events()

    unmarked = [
        name
        for name, statement in statements
        if not statement.get_execution_options().get(WRITES_EVENTS_OPTION)
    ]
    assert len(statements) >= 5  # sessions (2), batch writes (2), import (1)
    assert unmarked == []
