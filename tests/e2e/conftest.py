"""Fixtures of the end-to-end tier: real servers on port 0 over the migrated
test database (``database_url`` / ``clean_db`` come from tests/conftest.py),
client channels that record every response, and a fresh set of logged-in
users per test.

Every log line the tier makes the service write is swept for secrets
(tests/log_secrets.py): lines of in-process servers through a handler on the
root logger (opened to DEBUG while an e2e test runs, its fixtures included),
output of subprocess servers through ``SWEEP.add_text`` and the ``*.log``
files a test leaves in its tmp_path. Secrets come from every channel the tier
opens (requests, responses, bearer tokens), from the passwords the factories
make and from the servers' settings. A leak fails the test that caused it;
at the end the whole session is searched again against every secret seen
(a line may carry a secret that a later test recorded).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from log_secrets import SWEEP, Finding, SecretHarvester
from support.servers import InProcessServer, in_process

from .helpers import Caller, ResponseRecorder, World, auth_service_pb2

# The in-process server of tests/support/servers.py: container, server,
# channel, address.
RunningServer = InProcessServer


@asynccontextmanager
async def running_server(
    settings: Any, recorder: ResponseRecorder, **bootstrap_options: Any
) -> AsyncIterator[RunningServer]:
    """A real server on an ephemeral port and a recording channel to it;
    ``bootstrap_options`` go to usersvc.bootstrap.bootstrap (a clock). Its
    settings' secrets join the log sweep."""
    SWEEP.ledger.add_settings(settings)
    async with in_process(settings, interceptors=[recorder], **bootstrap_options) as running:
        yield running


E2E_DIR = Path(__file__).resolve().parent
_HARVESTER = SecretHarvester(SWEEP.ledger)


def _harvesting(factory: Any) -> Any:
    def channel(target: str, *args: Any, **kwargs: Any) -> grpc.aio.Channel:
        kwargs["interceptors"] = [*(kwargs.get("interceptors") or ()), _HARVESTER]
        return factory(target, *args, **kwargs)

    return channel


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """While an e2e test runs, from its first fixture set up to its last
    one torn down: its log lines are captured, and every channel opened
    (to in-process or subprocess servers) records the secrets that pass
    through it. pytest calls this hook of every conftest for every item,
    so the tier is chosen here; other tiers run untouched."""
    if E2E_DIR not in item.path.resolve().parents:
        yield
        return
    SWEEP.start(item.nodeid)
    with pytest.MonkeyPatch.context() as patch:
        # Channels made earlier (session fixtures) keep their harvester.
        patch.setattr(grpc.aio, "insecure_channel", _harvesting(grpc.aio.insecure_channel))
        patch.setattr(grpc.aio, "secure_channel", _harvesting(grpc.aio.secure_channel))
        try:
            yield
        finally:
            SWEEP.pause()


_session_findings: list[Finding] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not SWEEP.lines:
        return
    _session_findings.extend(SWEEP.findings())
    if _session_findings and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not SWEEP.lines:
        return
    terminalreporter.write_line(
        f"log secret sweep: {len(SWEEP.lines)} log lines checked against "
        f"{len(SWEEP.ledger)} secrets, {len(_session_findings)} leaks "
        f"({SWEEP.search_seconds:.1f}s searching)"
    )
    for finding in _session_findings[:50]:
        terminalreporter.write_line(f"LEAK: {finding}", red=True)


@pytest.fixture(autouse=True)
def no_secret_in_any_log_line(request: pytest.FixtureRequest) -> Iterator[None]:
    """The log lines written while this test ran (its fixtures included)
    carry no secret the tier has seen so far, and nothing shaped like one."""
    mark = len(SWEEP.lines)
    yield
    tmp_path = request.node.funcargs.get("tmp_path")
    if isinstance(tmp_path, Path):
        for log in sorted(tmp_path.rglob("*.log")):
            SWEEP.add_text(f"{request.node.nodeid} ({log.name})", log.read_bytes())
    leaks = SWEEP.findings(since=mark)
    assert not leaks, "secrets in log lines:\n" + "\n".join(str(leak) for leak in leaks[:20])


@pytest.fixture(scope="session")
def recorder() -> ResponseRecorder:
    return ResponseRecorder()


@pytest.fixture(autouse=True)
def no_secret_in_any_response(recorder: ResponseRecorder) -> Iterator[None]:
    """Every response of the suite is searched for bcrypt hashes and the
    passwords the suite used; a leak fails the test that caused it."""
    mark = len(recorder.responses)
    yield
    leaks = recorder.leaks(since=mark)
    assert not leaks, f"secrets in responses: {leaks}"


@pytest.fixture(scope="session")
def signing_key() -> Ed25519PrivateKey:
    """The servers' signing key, known to the tests so they can mint tokens
    the servers must judge (expired, wrong audience, ...)."""
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def e2e_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("usersvc-e2e")


@pytest.fixture(scope="session")
def e2e_settings(database_url: str, e2e_data_dir: Path, signing_key: Ed25519PrivateKey) -> Any:
    from usersvc.config import Settings

    pem = signing_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    settings = dataclasses.replace(
        Settings(),
        database_url=database_url,
        data_dir=e2e_data_dir,
        bcrypt_rounds=4,
        allow_signup=True,
        jwt_private_key_pem=pem,
        listen_addr="127.0.0.1:0",
        shutdown_grace_seconds=1.0,
        # Every test logs its users in from 127.0.0.1 within moments; the
        # default Login/sign-up bucket (5/s, burst 10) is for real clients.
        # tests/e2e/test_rate_limits.py tests the limits on servers of its own.
        auth_rate_limit_rps=100_000.0,
        auth_rate_limit_burst=100_000,
    )
    SWEEP.ledger.add_settings(settings)
    return settings


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def primary(e2e_settings: Any, recorder: ResponseRecorder) -> AsyncIterator[RunningServer]:
    """The server most tests talk to (sign-up enabled)."""
    async with running_server(e2e_settings, recorder) as running:
        yield running


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def signup_closed(
    e2e_settings: Any, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    """A server on the same database with self sign-up disabled."""
    settings = dataclasses.replace(e2e_settings, allow_signup=False)
    async with running_server(settings, recorder) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def replica(e2e_settings: Any, recorder: ResponseRecorder) -> AsyncIterator[RunningServer]:
    """Another replica: its own process state, the same database and key."""
    async with running_server(e2e_settings, recorder) as running:
        yield running


@pytest.fixture(scope="session")
def anonymous(primary: RunningServer) -> Caller:
    return Caller(primary.channel, None)


@pytest_asyncio.fixture(loop_scope="session")
async def world(primary: RunningServer, recorder: ResponseRecorder, clean_db: Any) -> World:
    """An empty database plus admin, service, alice and bob, logged in."""
    return await World(
        user_service=primary.container.user_service, channel=primary.channel, recorder=recorder
    ).populate()


@pytest_asyncio.fixture(loop_scope="session")
async def jwks(anonymous: Caller) -> dict[str, Any]:
    response = await anonymous.auth.GetJwks(auth_service_pb2.GetJwksRequest())
    keys: dict[str, Any] = json.loads(response.jwks_json)
    return keys
