"""BcryptPasswordHasher (usersvc.services.passwords): bcrypt off the event loop."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator

import bcrypt
import pytest

from usersvc.services import passwords
from usersvc.services.passwords import BcryptPasswordHasher, thread_niceness

PASSWORD = "correct horse battery staple"


@pytest.fixture
def hasher() -> Iterator[BcryptPasswordHasher]:
    hasher = BcryptPasswordHasher(rounds=4, max_threads=2)
    yield hasher
    hasher.close()


class Gate:
    """Holds bcrypt calls in their worker thread until released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.threads: list[int] = []

    def wrap(self, fn):  # type: ignore[no-untyped-def]
        def gated(*args):  # type: ignore[no-untyped-def]
            self.threads.append(threading.get_ident())
            self.started.set()
            self.release.wait(timeout=10)
            return fn(*args)

        return gated

    async def wait_started(self) -> bool:
        return await asyncio.to_thread(self.started.wait, 10)


async def test_a_hash_verifies_its_password(hasher: BcryptPasswordHasher) -> None:
    hashed = await hasher.hash(PASSWORD)
    assert await hasher.verify(PASSWORD, hashed)


async def test_a_hash_refuses_another_password(hasher: BcryptPasswordHasher) -> None:
    hashed = await hasher.hash(PASSWORD)
    assert not await hasher.verify(PASSWORD + "!", hashed)


async def test_hashes_use_the_configured_cost(hasher: BcryptPasswordHasher) -> None:
    assert (await hasher.hash(PASSWORD)).startswith("$2b$04$")


async def test_hashing_runs_in_a_worker_thread(
    hasher: BcryptPasswordHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate()
    gate.release.set()
    monkeypatch.setattr(bcrypt, "hashpw", gate.wrap(bcrypt.hashpw))
    await hasher.hash(PASSWORD)
    assert gate.threads
    assert threading.get_ident() not in gate.threads


async def test_verifying_runs_in_a_worker_thread(
    hasher: BcryptPasswordHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed = await hasher.hash(PASSWORD)
    gate = Gate()
    gate.release.set()
    monkeypatch.setattr(bcrypt, "checkpw", gate.wrap(bcrypt.checkpw))
    assert await hasher.verify(PASSWORD, hashed)
    assert gate.threads
    assert threading.get_ident() not in gate.threads


async def test_the_event_loop_keeps_running_while_bcrypt_works(
    hasher: BcryptPasswordHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate()
    monkeypatch.setattr(bcrypt, "hashpw", gate.wrap(bcrypt.hashpw))
    pending = asyncio.create_task(hasher.hash(PASSWORD))
    assert await gate.wait_started()
    # bcrypt is held mid-hash; had it run on the loop, we would only get
    # here after it finished.
    assert await asyncio.gather(*(asyncio.sleep(0, result=i) for i in range(3))) == [0, 1, 2]
    assert not pending.done()
    gate.release.set()
    assert (await pending).startswith("$2b$")


async def test_no_more_hashes_run_at_once_than_there_are_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hasher = BcryptPasswordHasher(rounds=4, max_threads=2)
    lock = threading.Lock()
    running = 0
    peak = 0
    real = bcrypt.hashpw

    def counting(password: bytes, salt: bytes) -> bytes:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return real(password, salt)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(bcrypt, "hashpw", counting)
    try:
        hashes = await asyncio.gather(*(hasher.hash(f"{PASSWORD}{i}") for i in range(8)))
    finally:
        hasher.close()
    assert len(set(hashes)) == 8
    assert 1 <= peak <= 2


async def test_a_cancelled_hash_gives_its_slot_back_when_bcrypt_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hasher = BcryptPasswordHasher(rounds=4, max_threads=1)
    gate = Gate()
    monkeypatch.setattr(bcrypt, "hashpw", gate.wrap(bcrypt.hashpw))
    try:
        first = asyncio.create_task(hasher.hash(PASSWORD))
        assert await gate.wait_started()
        first.cancel()
        gate.release.set()
        second = await asyncio.wait_for(hasher.hash(PASSWORD), timeout=10)
    finally:
        hasher.close()
    assert second.startswith("$2b$04$")
    assert first.cancelled()


async def test_hashing_more_than_72_bytes_is_refused(hasher: BcryptPasswordHasher) -> None:
    with pytest.raises(ValueError, match="72"):
        await hasher.hash("é" * 37)


async def test_verifying_more_than_72_bytes_is_false_without_calling_bcrypt(
    hasher: BcryptPasswordHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed = await hasher.hash("x" * 72)
    calls: list[bytes] = []
    monkeypatch.setattr(bcrypt, "checkpw", lambda pw, h: calls.append(pw) or True)
    assert await hasher.verify("x" * 73, hashed) is False
    assert calls == []


@pytest.mark.parametrize(
    "bad_hash", ["", "not a hash", "$2b$04$short", "$2b$04$" + "é" * 53, "$1$md5$crypt"]
)
async def test_a_malformed_hash_verifies_as_false(
    hasher: BcryptPasswordHasher, bad_hash: str
) -> None:
    assert await hasher.verify(PASSWORD, bad_hash) is False


async def test_an_unencodable_password_verifies_as_false(hasher: BcryptPasswordHasher) -> None:
    hashed = await hasher.hash(PASSWORD)
    assert await hasher.verify("\ud800" * 8, hashed) is False


def test_a_hash_of_any_other_cost_than_the_configured_one_needs_rehashing() -> None:
    hasher = BcryptPasswordHasher(rounds=12, max_threads=1)
    try:
        assert hasher.needs_rehash(bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode())
        assert hasher.needs_rehash("$2a$10$" + "a" * 53)
        assert not hasher.needs_rehash("$2b$12$" + "a" * 53)
        assert hasher.needs_rehash("$2y$13$" + "a" * 53)
    finally:
        hasher.close()


@pytest.mark.parametrize("rounds", [3, 17, 31])
def test_a_configured_cost_outside_4_to_16_is_refused(rounds: int) -> None:
    with pytest.raises(ValueError, match=r"4\.\.16"):
        BcryptPasswordHasher(rounds=rounds, max_threads=1)


async def test_a_hash_over_the_cost_budget_is_never_checked(
    hasher: BcryptPasswordHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cost 31 would keep a thread busy for days; the check fails after the
    # dummy work of the configured cost instead.
    checked: list[bytes] = []
    real = passwords._checkpw

    def spy(secret: bytes, hashed: bytes) -> bool:
        checked.append(hashed[:7])
        return real(secret, hashed)

    monkeypatch.setattr(passwords, "_checkpw", spy)
    cheap = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    assert await hasher.verify(PASSWORD, "$2b$31$" + cheap[7:]) is False
    assert checked == [b"$2b$04$"]


async def test_padding_after_a_cheaper_hash_does_one_check_at_the_configured_cost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hasher = BcryptPasswordHasher(rounds=5, max_threads=1)
    checked: list[bytes] = []
    real = passwords._checkpw

    def spy(secret: bytes, hashed: bytes) -> bool:
        checked.append(hashed[:7])
        return real(secret, hashed)

    monkeypatch.setattr(passwords, "_checkpw", spy)
    try:
        await hasher.pad(bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode())
        await hasher.pad("not a hash")
        await hasher.pad(bcrypt.hashpw(b"pw", bcrypt.gensalt(5)).decode())
        await hasher.pad(bcrypt.hashpw(b"pw", bcrypt.gensalt(6)).decode())
    finally:
        hasher.close()
    assert checked == [b"$2b$05$", b"$2b$05$"]


async def test_the_bcrypt_threads_never_hold_the_process_at_exit() -> None:
    hasher = BcryptPasswordHasher(rounds=4, max_threads=2)
    try:
        await hasher.hash(PASSWORD)
        threads = hasher._executor._threads
        assert len(threads) == 2
        assert all(t.daemon and t.is_alive() for t in threads)
    finally:
        hasher.close()


def test_no_bcrypt_thread_starts_before_the_first_job() -> None:
    # A worker process may fork after the hasher is built; threads do not
    # survive a fork.
    hasher = BcryptPasswordHasher(rounds=4, max_threads=2)
    try:
        assert not any(t.is_alive() for t in hasher._executor._threads)
    finally:
        hasher.close()


@pytest.mark.parametrize("bad_hash", ["", "plain", "$2b$xx$" + "a" * 53, "$2b$12$tooshort"])
def test_an_unreadable_hash_needs_rehashing(bad_hash: str) -> None:
    hasher = BcryptPasswordHasher(rounds=4, max_threads=1)
    try:
        assert hasher.needs_rehash(bad_hash)
    finally:
        hasher.close()


async def test_the_dummy_hash_is_computed_once_at_the_configured_cost(
    hasher: BcryptPasswordHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = bcrypt.hashpw

    def counting(password: bytes, salt: bytes) -> bytes:
        nonlocal calls
        calls += 1
        return real(password, salt)

    monkeypatch.setattr(bcrypt, "hashpw", counting)
    first, second = await asyncio.gather(hasher.dummy_hash(), hasher.dummy_hash())
    assert first == second == await hasher.dummy_hash()
    assert first.startswith("$2b$04$")
    assert calls == 1


@pytest.mark.parametrize(("rounds", "threads"), [(3, 1), (32, 1), (4, 0)])
def test_invalid_settings_are_refused(rounds: int, threads: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        BcryptPasswordHasher(rounds=rounds, max_threads=threads)


async def test_a_closed_hasher_refuses_new_work(hasher: BcryptPasswordHasher) -> None:
    hasher.close()
    with pytest.raises(RuntimeError):
        await hasher.hash(PASSWORD)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice is per thread on Linux only")
async def test_bcrypt_threads_run_at_a_lower_priority_than_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []
    hashpw = bcrypt.hashpw

    def recording(secret: bytes, salt: bytes) -> bytes:
        seen.append(thread_niceness())
        return hashpw(secret, salt)

    monkeypatch.setattr(bcrypt, "hashpw", recording)
    hasher = BcryptPasswordHasher(rounds=4, max_threads=1, nice=7)
    try:
        await hasher.hash(PASSWORD)
    finally:
        hasher.close()
    loop_niceness = thread_niceness()
    assert seen == [min(19, loop_niceness + 7)]


async def test_without_nice_bcrypt_threads_keep_the_loops_priority(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []
    hashpw = bcrypt.hashpw

    def recording(secret: bytes, salt: bytes) -> bytes:
        seen.append(thread_niceness())
        return hashpw(secret, salt)

    monkeypatch.setattr(bcrypt, "hashpw", recording)
    hasher = BcryptPasswordHasher(rounds=4, max_threads=1)
    try:
        await hasher.hash(PASSWORD)
    finally:
        hasher.close()
    assert seen == [thread_niceness()]


@pytest.mark.parametrize("nice", [-1, 20])
def test_a_nice_value_outside_0_to_19_is_refused(nice: int) -> None:
    with pytest.raises(ValueError, match="nice must be"):
        BcryptPasswordHasher(rounds=4, max_threads=1, nice=nice)
