"""AuthService: the use cases behind usersvc.v1.AuthService (login, keys,
token checks).

Every failed login gets the same answer after the same work: unknown email,
wrong password, disabled or deleted user and unusable input all cost one
bcrypt check at the configured cost and end in InvalidCredentials, so neither
the answer nor its timing tells whether an email is registered.
"""

from __future__ import annotations

import hmac

from usersvc.domain.errors import FieldViolation, InvalidCredentials
from usersvc.domain.models import Credentials, Principal, User, UserState, uuid7
from usersvc.domain.passwords import MAX_PASSWORD_BYTES
from usersvc.domain.ports import UnitOfWorkFactory
from usersvc.domain.validation import normalize_email
from usersvc.services.inputs import LoginResult
from usersvc.services.passwords import BcryptPasswordHasher
from usersvc.services.tokens import TokenService

TOKEN_TYPE = "Bearer"  # noqa: S105 (an RFC 6750 scheme name, not a secret)
# Checked against the dummy hash when there is nothing real to check; any
# valid-length text works, the result is discarded.
_PLACEHOLDER_PASSWORD = "not-a-password"  # noqa: S105


class AuthService:
    def __init__(
        self,
        *,
        uow_factory: UnitOfWorkFactory,
        hasher: BcryptPasswordHasher,
        tokens: TokenService,
    ) -> None:
        self._uow_factory = uow_factory
        self._hasher = hasher
        self._tokens = tokens

    async def login(self, *, email: str, password: str) -> LoginResult:
        """An access token for the active user with these credentials.

        Raises InvalidCredentials for every kind of failure (one answer for
        all), DatabaseUnavailable.
        """
        problems: list[FieldViolation] = []
        normalized = normalize_email(email, field="email", errors=problems)
        usable = not problems and 0 < len(password.encode("utf-8", "replace")) <= MAX_PASSWORD_BYTES
        credentials: Credentials | None = None
        if usable:
            async with self._uow_factory() as uow:
                credentials = await uow.users.get_credentials_by_email(normalized)
        if credentials is None:
            # Same bcrypt work as a real check, so that timing does not tell
            # unknown emails from known ones.
            await self._hasher.verify(_PLACEHOLDER_PASSWORD, await self._hasher.dummy_hash())
            raise InvalidCredentials()
        matches = await self._hasher.verify(password, credentials.password_hash)
        user = credentials.user
        if not matches or user.state is not UserState.ACTIVE:
            raise InvalidCredentials()
        if self._hasher.needs_rehash(credentials.password_hash):
            user = await self._rehash(credentials, password)
        # Sessions arrive with refresh tokens; until then each login is its
        # own session id.
        access_token, expires_in = self._tokens.issue_access_token(user, session_id=str(uuid7()))
        return LoginResult(
            access_token=access_token,
            refresh_token="",
            token_type=TOKEN_TYPE,
            expires_in=expires_in,
            user=user,
        )

    async def _rehash(self, credentials: Credentials, password: str) -> User:
        """Stores a hash at the current cost (after a cost increase), unless
        the password changed meanwhile; returns the user as it now is."""
        new_hash = await self._hasher.hash(password)
        user = credentials.user
        async with self._uow_factory() as uow:
            # Lock first so that no password change slips in between the
            # comparison and the write.
            if await uow.users.get(user.id, for_update=True) is None:
                return user
            latest = await uow.users.get_credentials(user.id)
            if latest is None or not hmac.compare_digest(
                latest.password_hash.encode(), credentials.password_hash.encode()
            ):
                # Changed while we hashed: never overwrite a newer password
                # with the old one.
                return user
            user = await uow.users.set_password_hash(user.id, new_hash)
            await uow.commit()
        return user

    def jwks_json(self) -> str:
        """The public verification keys (RFC 7517). Raises nothing."""
        return self._tokens.jwks_json()

    def authenticate(self, token: str) -> Principal:
        """The caller an access token names. Raises TokenExpired, TokenInvalid."""
        return self._tokens.verify_access_token(token)
