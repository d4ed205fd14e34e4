"""The relay's publish window (usersvc.adapters.publish_window) against a
fake JetStream at its port: several publishes outstanding at once, never
more than the window, PubAcks taken in the order of the publishes, each
publish sent behind an unacknowledged one naming it as the expected last
message, and a failure at the head ending the window."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from usersvc.adapters.publish_window import (
    EXPECTED_LAST_MSG_ID,
    MSG_ID,
    WRONG_LAST_MSG_ID,
    PubAck,
    PublishFailed,
    PublishRejected,
    PublishWindow,
)


@dataclass
class Sent:
    subject: str
    headers: dict[str, str]
    ack: asyncio.Future[PubAck]
    outstanding_before: int  # unresolved PubAcks when this one was sent


@dataclass
class FakeJetStream:
    """Records every publish; the test decides when and how each is
    acknowledged."""

    sent: list[Sent] = field(default_factory=list)

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[PubAck]:
        del payload
        ack: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        waiting = sum(1 for s in self.sent if not s.ack.done())
        self.sent.append(Sent(subject, dict(headers), ack, waiting))
        return ack

    def ack(self, index: int) -> None:
        self.sent[index].ack.set_result(PubAck("USERSVC_EVENTS", index + 1))

    def refuse(self, index: int, err_code: int = 10077) -> None:
        self.sent[index].ack.set_exception(PublishRejected(400, err_code, "refused"))


def _window(
    js: FakeJetStream, acked: list[int], *, size: int = 4, timeout: float = 5.0
) -> PublishWindow[int]:
    return PublishWindow(js, size=size, timeout=timeout, on_ack=lambda n, _a: acked.append(n))


async def _send(window: PublishWindow[int], n: int) -> None:
    await window.send(n, "usersvc.user.updated.v1", b"body", {MSG_ID: f"id-{n}"})


async def test_publishes_go_out_without_waiting_for_earlier_pubacks() -> None:
    js, acked = FakeJetStream(), list[int]()
    window = _window(js, acked, size=4)

    for n in range(4):
        await _send(window, n)

    assert [s.outstanding_before for s in js.sent] == [0, 1, 2, 3]
    assert window.outstanding == window.peak == 4
    assert acked == []


async def test_a_full_window_sends_nothing_more_until_the_oldest_is_acknowledged() -> None:
    js, acked = FakeJetStream(), list[int]()
    window = _window(js, acked, size=4, timeout=0.05)
    for n in range(4):
        await _send(window, n)

    # No PubAck comes: the fifth waits for the oldest and gives up with it.
    with pytest.raises(PublishFailed, match="no PubAck"):
        await _send(window, 4)

    assert len(js.sent) == 4
    assert window.discard() == 4
    assert all(s.ack.cancelled() for s in js.sent)


async def test_room_made_by_an_acknowledgement_is_used_at_once() -> None:
    js, acked = FakeJetStream(), list[int]()
    window = _window(js, acked, size=4)
    for n in range(4):
        await _send(window, n)
    js.ack(0)

    await _send(window, 4)

    assert acked == [0]
    assert js.sent[4].outstanding_before == 3
    assert window.outstanding == 4


async def test_pubacks_are_taken_in_the_order_of_the_publishes() -> None:
    js, acked = FakeJetStream(), list[int]()
    window = _window(js, acked, size=8)
    for n in range(5):
        await _send(window, n)
    for index in (3, 1, 4, 0, 2):
        js.ack(index)

    await window.drain()

    assert acked == [0, 1, 2, 3, 4]
    assert window.outstanding == 0


async def test_a_publish_behind_an_unacknowledged_one_expects_it_to_be_last() -> None:
    js, acked = FakeJetStream(), list[int]()
    window = _window(js, acked, size=8)
    for n in range(3):
        await _send(window, n)
    for index in range(3):
        js.ack(index)
    await window.drain()
    await _send(window, 3)

    expected = [s.headers.get(EXPECTED_LAST_MSG_ID) for s in js.sent]
    # The first of a run, and one sent once all before it were
    # acknowledged (so stored), need no expectation.
    assert expected == [None, "id-0", "id-1", None]


async def test_a_refused_publish_stops_the_window_before_anything_after_it() -> None:
    js, acked = FakeJetStream(), list[int]()
    window = _window(js, acked, size=8)
    for n in range(5):
        await _send(window, n)
    js.ack(0)
    js.refuse(1)
    js.ack(2)  # stored or not, it must not count before 1 does

    with pytest.raises(PublishRejected) as refused:
        await window.drain()

    assert acked == [0]
    assert not refused.value.out_of_turn
    assert window.discard() == 4  # 1 (refused), 2 (answered), 3 and 4 (pending)
    assert js.sent[3].ack.cancelled()
    assert js.sent[4].ack.cancelled()


async def test_a_refusal_for_a_wrong_last_message_is_out_of_turn() -> None:
    js, acked = FakeJetStream(), list[int]()
    window = _window(js, acked, size=8)
    await _send(window, 0)
    await _send(window, 1)
    js.ack(0)
    js.refuse(1, err_code=WRONG_LAST_MSG_ID)

    with pytest.raises(PublishRejected) as refused:
        await window.drain()

    assert refused.value.out_of_turn
    assert acked == [0]
    window.discard()


async def test_a_failing_send_fails_the_window() -> None:
    class ClosedJetStream(FakeJetStream):
        async def publish(
            self, subject: str, payload: bytes, headers: dict[str, str]
        ) -> asyncio.Future[PubAck]:
            raise ConnectionError("closed")

    window = _window(ClosedJetStream(), [])

    with pytest.raises(PublishFailed, match="ConnectionError: closed"):
        await _send(window, 0)
    assert window.outstanding == 0


def test_a_window_holds_at_least_one_publish() -> None:
    with pytest.raises(ValueError, match="at least one"):
        PublishWindow(FakeJetStream(), size=0, timeout=1.0, on_ack=lambda _n, _a: None)
