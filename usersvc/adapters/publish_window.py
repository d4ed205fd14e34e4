"""In-order publishing to JetStream with a window of unacknowledged publishes.

JetStream answers every stored message with a PubAck on the publish's reply
subject. Waiting for each PubAck before sending the next message costs a
round trip per message; a window keeps up to ``size`` publishes outstanding
and settles their PubAcks strictly in the order they were sent, so a
caller learns of an acknowledgement only once all earlier ones came back.

Order on the stream stays the order of sending even when one publish of a
window fails alone (a message refused by a stream limit, the leader of a
clustered stream changing mid-window): a publish sent while its predecessor
is still unacknowledged names that predecessor in
``Nats-Expected-Last-Msg-Id``, and JetStream refuses it unless the
predecessor is the stream's last message. So nothing stored can jump ahead
of a message that failed. A publish sent with nothing outstanding needs no
such check: everything before it was acknowledged, hence stored.

Any failure at the head (no PubAck in time, a refusal, a lost connection)
ends the window with PublishFailed; the caller discards it and resumes with
the first unacknowledged message. JetStream answers a message whose
``Nats-Msg-Id`` it already holds (within the stream's duplicate window) as a
duplicate before it looks at the expectation, so a resumed run passes over
what had been stored.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"
EXPECTED_STREAM = "Nats-Expected-Stream"
# JetStream's error code for a publish whose Nats-Expected-Last-Msg-Id is
# not the stream's last message ("wrong last msg ID").
WRONG_LAST_MSG_ID = 10070

T = TypeVar("T")


@dataclass(frozen=True)
class PubAck:
    """JetStream stored the message (or already held its Nats-Msg-Id)."""

    stream: str
    sequence: int
    duplicate: bool = False


class PublishFailed(Exception):
    """A publish was not acknowledged: it and everything sent after it may
    or may not be stored; resume from it."""


class PublishRejected(PublishFailed):
    """JetStream answered a publish with an error."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"JetStream refused the message: {description} ({code}/{err_code})")
        self.code = code
        self.err_code = err_code

    @property
    def out_of_turn(self) -> bool:
        """Refused only because another message came between it and its
        predecessor (something else publishes into the stream): resending
        it with nothing outstanding will do."""
        return self.err_code == WRONG_LAST_MSG_ID


class AckingPublisher(Protocol):
    """The port: publishes one message and returns, without waiting, the
    future of its PubAck (or of a PublishFailed)."""

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[PubAck]: ...


@dataclass
class _Outstanding(Generic[T]):
    item: T
    msg_id: str
    ack: asyncio.Future[PubAck]
    deadline: float


class PublishWindow(Generic[T]):
    """Up to ``size`` publishes awaiting their PubAck, settled in order:
    ``on_ack(item, ack)`` is called for each, in the order of ``send``.
    Single-use: after a PublishFailed, ``discard`` it."""

    def __init__(
        self,
        publisher: AckingPublisher,
        *,
        size: int,
        timeout: float,
        on_ack: Callable[[T, PubAck], None],
    ) -> None:
        if size < 1:
            raise ValueError("a window holds at least one publish")
        self._publisher = publisher
        self._size = size
        self._timeout = timeout
        self._on_ack = on_ack
        self._outstanding: deque[_Outstanding[T]] = deque()
        self.peak = 0  # the most publishes outstanding at once

    @property
    def outstanding(self) -> int:
        """Publishes sent and not yet settled. Raises nothing."""
        return len(self._outstanding)

    async def send(self, item: T, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        """Publish ``payload`` (``headers`` must hold its Nats-Msg-Id) once
        the window has room, settling PubAcks in order until it has.
        Raises PublishFailed."""
        self._settle_arrived()
        while len(self._outstanding) >= self._size:
            await self._settle_head()
        if self._outstanding:
            headers[EXPECTED_LAST_MSG_ID] = self._outstanding[-1].msg_id
        try:
            ack = await self._publisher.publish(subject, payload, headers)
        except PublishFailed:
            raise
        except Exception as exc:
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc
        deadline = asyncio.get_running_loop().time() + self._timeout
        self._outstanding.append(_Outstanding(item, headers[MSG_ID], ack, deadline))
        self.peak = max(self.peak, len(self._outstanding))

    async def drain(self) -> None:
        """Settle every outstanding publish, in order. Raises PublishFailed."""
        while self._outstanding:
            await self._settle_head()

    def discard(self) -> int:
        """Forget what is outstanding (its PubAcks are ignored); returns how
        many publishes that was. Raises nothing."""
        dropped = len(self._outstanding)
        for outstanding in self._outstanding:
            if outstanding.ack.done():
                # Retrieved, so that asyncio does not report it as lost.
                with contextlib.suppress(BaseException):
                    outstanding.ack.exception()
            else:
                outstanding.ack.cancel()
        self._outstanding.clear()
        return dropped

    def _settle_arrived(self) -> None:
        while self._outstanding and self._outstanding[0].ack.done():
            self._settle(self._outstanding[0])

    async def _settle_head(self) -> None:
        head = self._outstanding[0]
        if not head.ack.done():
            remaining = head.deadline - asyncio.get_running_loop().time()
            await asyncio.wait({head.ack}, timeout=max(remaining, 0.0))
            if not head.ack.done():
                raise PublishFailed(f"no PubAck within {self._timeout:g} s")
        self._settle(head)

    def _settle(self, head: _Outstanding[T]) -> None:
        # The head stays in the window when it failed: ``discard`` drops it.
        if head.ack.cancelled():
            raise PublishFailed("the publish was cancelled")
        error = head.ack.exception()
        if error is not None:
            if isinstance(error, PublishFailed):
                raise error
            raise PublishFailed(f"{type(error).__name__}: {error}") from error
        self._outstanding.popleft()
        self._on_ack(head.item, head.ack.result())
