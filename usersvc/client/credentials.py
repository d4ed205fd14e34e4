"""How a client proves who it is: a bearer token (fixed, or obtained by
logging in and kept fresh), and TLS / mTLS settings for the channel.

A service with a client certificate needs no bearer credentials at all: pass
``tls=TlsConfig.from_files(ca, cert, key)`` and ``credentials=None``.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from usersvc.client.errors import RefreshTokenInvalid

__all__ = [
    "BearerCredentials",
    "IssuedTokens",
    "PasswordLogin",
    "StaticToken",
    "TlsConfig",
    "TokenEndpoint",
]


@dataclass(frozen=True)
class IssuedTokens:
    """What Login and RefreshToken return, reduced to what a credential keeps."""

    access_token: str
    refresh_token: str
    expires_in: int


class TokenEndpoint(Protocol):
    """The two AuthService calls a login credential needs, made without
    credentials of their own (the client implements this)."""

    async def login_tokens(self, email: str, password: str) -> IssuedTokens:
        """Raises InvalidCredentials, RateLimited, or any UsersvcError."""
        ...

    async def refresh_tokens(self, refresh_token: str) -> IssuedTokens:
        """Raises RefreshTokenInvalid, or any UsersvcError."""
        ...


class BearerCredentials(abc.ABC):
    """Supplies the access token sent as ``authorization: Bearer ...``."""

    @abc.abstractmethod
    async def access_token(self, endpoint: TokenEndpoint) -> str:
        """A token to send now. Raises UsersvcError when none can be had."""

    def reject(self, access_token: str) -> bool:
        """The server refused ``access_token`` as expired or revoked. Returns
        True when asking again (``access_token``) may give a better one, so
        the call is worth repeating once. Never raises."""
        return False

    def forget(self) -> None:
        """Drop any tokens held (after Logout). Never raises."""
        return None


class StaticToken(BearerCredentials):
    """A token obtained elsewhere, sent as is; nothing refreshes it."""

    def __init__(self, access_token: str) -> None:
        self._access_token = access_token

    async def access_token(self, endpoint: TokenEndpoint) -> str:
        return self._access_token


@dataclass(frozen=True)
class _Held:
    tokens: IssuedTokens
    refresh_at: float


class PasswordLogin(BearerCredentials):
    """Logs in with an email and password on first use, then keeps the
    access token fresh: shortly before it expires (``refresh_margin``
    seconds, at most a fifth of its lifetime, before ``expires_in`` runs
    out) the next call refreshes it with RefreshToken. If the server refuses
    the refresh token (session ended, token reused or expired), it logs in
    again.

    Refreshes are single-flight: however many calls need a token at once, one
    of them refreshes and the others wait for its result. This matters, as
    refresh tokens are single-use: two refreshes racing with one token look
    like theft to the server, which then ends the whole session.

    ``clock`` is a monotonic clock in seconds (time.monotonic); tests pass
    their own to make time pass without sleeping.
    """

    def __init__(
        self,
        email: str,
        password: str,
        *,
        refresh_margin: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._email = email
        self._password = password
        self._refresh_margin = refresh_margin
        self._clock = clock
        self._held: _Held | None = None
        self._lock = asyncio.Lock()

    @property
    def refresh_token(self) -> str | None:
        """The refresh token of the current session, if logged in."""
        return self._held.tokens.refresh_token if self._held is not None else None

    async def access_token(self, endpoint: TokenEndpoint) -> str:
        held = self._held
        if held is not None and self._clock() < held.refresh_at:
            return held.tokens.access_token
        async with self._lock:
            # Whoever held the lock before may have renewed the token already.
            held = self._held
            if held is None or self._clock() >= held.refresh_at:
                held = await self._renew(endpoint, held)
                self._held = held
            return held.tokens.access_token

    async def _renew(self, endpoint: TokenEndpoint, held: _Held | None) -> _Held:
        # Measured before the call, so network time only makes us refresh early.
        started = self._clock()
        if held is not None and held.tokens.refresh_token:
            try:
                return self._hold(await endpoint.refresh_tokens(held.tokens.refresh_token), started)
            except RefreshTokenInvalid:
                # The session is gone (logged out, revoked, expired): start a new one.
                started = self._clock()
        return self._hold(await endpoint.login_tokens(self._email, self._password), started)

    def _hold(self, tokens: IssuedTokens, started: float) -> _Held:
        margin = min(self._refresh_margin, tokens.expires_in / 5)
        return _Held(tokens, started + tokens.expires_in - margin)

    def reject(self, access_token: str) -> bool:
        held = self._held
        if held is None:
            return False
        if held.tokens.access_token == access_token:
            # Renew on the next request, whatever the clock says.
            self._held = _Held(held.tokens, float("-inf"))
        return True

    def forget(self) -> None:
        self._held = None


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the channel: the CA that signed the server's certificate
    (None: the system's roots), and for mTLS the client's certificate chain
    and private key (PEM). ``server_name`` overrides the name checked against
    the server's certificate (when dialing an address it does not name)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its private key, and the other way round")

    @classmethod
    def from_files(
        cls,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        *,
        server_name: str | None = None,
    ) -> TlsConfig:
        """Read PEM files. Raises OSError when one cannot be read, ValueError
        when only one of cert_file and key_file is given."""
        return cls(
            root_certificates=_read(ca_file),
            certificate_chain=_read(cert_file),
            private_key=_read(key_file),
            server_name=server_name,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None
