"""UserService: the use cases behind usersvc.v1.UserService.

Every method takes the calling Principal first and decides PERMISSION_DENIED
from the caller and the id alone, before reading anything (a refusal must not
reveal whether a user exists). Inputs are validated in full (every bad field
reported at once) before any password is hashed, and bcrypt never runs while
a database connection is held.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from usersvc.domain import policies
from usersvc.domain.errors import (
    EmailAlreadyExists,
    EtagMismatch,
    FieldViolation,
    InvalidArgument,
    InvalidCredentials,
    InvalidState,
    PermissionDenied,
    UserNotFound,
)
from usersvc.domain.events import EventDraft, EventType
from usersvc.domain.filtering import parse_filter, parse_order_by
from usersvc.domain.listing import Cursor, Filter, ListedPage, ListQuery, Ordering, cursor_of
from usersvc.domain.lockout import LockoutPolicy
from usersvc.domain.models import (
    ROLE_ADMIN,
    ROLE_USER,
    NewUser,
    Principal,
    RevokeReason,
    User,
    UserPatch,
    UserState,
    version_in_etag,
)
from usersvc.domain.passwords import PasswordPolicy
from usersvc.domain.ports import (
    IdempotencyKeyTaken,
    IdempotencyRecord,
    PasswordHasher,
    UnitOfWork,
    UnitOfWorkFactory,
    UpdateOutcome,
    UserReader,
    UserUpdate,
    UserWriter,
)
from usersvc.domain.role_checks import RoleCheck
from usersvc.domain.validation import (
    check_self_service_labels,
    normalize_display_name,
    normalize_email,
    normalize_labels,
    normalize_roles,
    parse_user_id,
    raise_for_violations,
    validate_etag,
    validate_request_id,
)
from usersvc.domain.wire_size import OversizedUsers
from usersvc.services.bulk_import import ImportResult, ImportRow, UserImporter
from usersvc.services.inputs import (
    CreateUserInput,
    ListUsersInput,
    UpdateUserInput,
    UserListResult,
)
from usersvc.services.pagination import (
    decode_page_token,
    encode_page_token,
    query_fingerprint,
)
from usersvc.services.response_size import (
    MAX_RESPONSE_BYTES,
    byte_budget,
    fitting_count,
    fitting_prefix,
    user_wire_bytes,
)
from usersvc.services.sessions import SessionRevoker, session_id_of

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A first page's total_size is exact up to this many matches and an
# estimate beyond (docs/api.md, List rules): a first page over a million users
# must not cost a count of all of them.
EXACT_TOTAL_UP_TO = 10_000
MAX_BATCH_SIZE = 1000
_CREATE_USER = "CreateUser"
_BATCH_CREATE_USERS = "BatchCreateUsers"


@dataclass(frozen=True, slots=True)
class _Draft:
    """A validated create request; the password is still plain text, kept
    only until it is hashed."""

    email: str
    display_name: str
    roles: tuple[str, ...]
    labels: Mapping[str, str]
    password: str = field(repr=False)

    def fingerprint_data(self) -> list[object]:
        # Deliberately without the password: nothing derived from a password
        # is stored outside its bcrypt hash.
        return [self.email, self.display_name, list(self.roles), sorted(self.labels.items())]


class UnitOfWorkUserReader:
    """usersvc.domain.ports.UserReader through a unit of work per read: for
    compositions without a read lane (the unit tests' fakes)."""

    def __init__(self, uow_factory: UnitOfWorkFactory) -> None:
        self._uow_factory = uow_factory

    async def get(self, user_id: uuid.UUID, *, role_check: RoleCheck | None = None) -> User | None:
        """Raises DatabaseUnavailable, TokenRevoked."""
        async with self._uow_factory() as uow:
            await _settle(uow, role_check)
            return await uow.users.get(user_id)

    async def get_many(
        self, user_ids: Sequence[uuid.UUID], *, role_check: RoleCheck | None = None
    ) -> list[User]:
        """Raises DatabaseUnavailable, TokenRevoked."""
        async with self._uow_factory() as uow:
            await _settle(uow, role_check)
            return await uow.users.get_many(user_ids)

    async def get_many_within(
        self, user_ids: Sequence[uuid.UUID], *, max_bytes: int
    ) -> list[User] | OversizedUsers:
        """Reads the users, then sizes them (no SQL of its own). Raises
        DatabaseUnavailable."""
        found = await self.get_many(user_ids)
        sizes = {user.id: user_wire_bytes(user) for user in found}
        if sum(sizes.values()) <= max_bytes:
            return found
        deleted = frozenset(user.id for user in found if user.state is UserState.DELETED)
        return OversizedUsers(wire_bytes=sizes, deleted=deleted)

    async def get_by_email(self, email: str, *, role_check: RoleCheck | None = None) -> User | None:
        """Raises DatabaseUnavailable, TokenRevoked."""
        async with self._uow_factory() as uow:
            await _settle(uow, role_check)
            return await uow.users.get_by_email(email)

    async def list_unfiltered(
        self,
        query: ListQuery,
        *,
        role_check: RoleCheck | None = None,
        count_up_to: int | None = None,
    ) -> ListedPage:
        """The page and, with ``count_up_to``, always the total (counted
        first, as count_matches does it). Raises ValueError for a query
        with a filter, InvalidArgument, DatabaseUnavailable, TokenRevoked."""
        if query.filter.terms:
            raise ValueError("list_unfiltered takes a query without a filter")
        async with self._uow_factory() as uow:
            await _settle(uow, role_check)
            total = None
            if count_up_to is not None:
                total = await uow.users.count_matches(
                    query.filter, show_deleted=query.show_deleted, exact_up_to=count_up_to
                )
            return ListedPage(await uow.users.list(query), total)


async def _settle(uow: UnitOfWork, role_check: RoleCheck | None) -> None:
    # The account first, in the read's own unit of work. Raises TokenRevoked.
    if role_check is not None:
        role_check.settle_on(await uow.users.get(role_check.account_id))


def _pending(role_check: RoleCheck | None) -> RoleCheck | None:
    # A check still to be made (a done one has nothing left to read).
    return None if role_check is None or role_check.done else role_check


class UnitOfWorkUserWriter:
    """usersvc.domain.ports.UserWriter through a unit of work per write:
    for compositions without a write lane (the unit tests' fakes)."""

    def __init__(self, uow_factory: UnitOfWorkFactory) -> None:
        self._uow_factory = uow_factory

    async def update(
        self, change: UserUpdate, *, events: Sequence[EventDraft] = ()
    ) -> UpdateOutcome:
        """Raises ValueError for a patch of email or roles (as the write
        lane), DatabaseUnavailable."""
        if change.patch.email is not None or change.patch.roles is not None:
            raise ValueError("email and roles changes need a unit of work")
        async with self._uow_factory() as uow:
            outcome = await uow.users.update_checked(change, events=events)
            if outcome.after is not None:
                await uow.commit()
        return outcome

    async def create(
        self,
        new: NewUser,
        *,
        events: Sequence[EventDraft] = (),
        role_check: RoleCheck | None = None,
    ) -> User:
        """Raises TokenRevoked, EmailAlreadyExists, DatabaseUnavailable."""
        async with self._uow_factory() as uow:
            await _settle(uow, _pending(role_check))
            user = await uow.users.add(new, events=events)
            await uow.commit()
        return user


class UserService:
    def __init__(
        self,
        *,
        uow_factory: UnitOfWorkFactory,
        hasher: PasswordHasher,
        password_policy: PasswordPolicy,
        allow_signup: bool,
        sessions: SessionRevoker,
        reader: UserReader | None = None,
        writer: UserWriter | None = None,
        page_token_keys: Callable[[], Sequence[bytes]] | None = None,
        lockout: LockoutPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``reader`` serves the plain reads (get_user, lookup_user,
        batch_get_users) outside a unit of work; without one they read
        through a unit of work. ``writer`` likewise serves the updates that
        are one statement (update_user of display_name and labels).
        ``page_token_keys`` returns the current HMAC keys of page tokens,
        the first tagging new ones (the server's:
        usersvc.services.tokens.KeyRing.page_token_keys); without it, a
        random key of this instance, so tokens work only where issued.
        ``lockout`` and ``clock`` are the login's (usersvc.services.auth): a
        wrong current password in ChangePassword counts towards the same
        lock. Raises nothing."""
        self._lockout = lockout or LockoutPolicy()
        self._clock = clock
        self._uow_factory = uow_factory
        self._reader: UserReader = reader or UnitOfWorkUserReader(uow_factory)
        self._writer: UserWriter = writer or UnitOfWorkUserWriter(uow_factory)
        self._hasher = hasher
        self._policy = password_policy
        self._allow_signup = allow_signup
        self._sessions = sessions
        if page_token_keys is None:
            own_key = (secrets.token_bytes(32),)
            page_token_keys = lambda: own_key  # noqa: E731
        self._page_token_keys = page_token_keys

    # -- create ----------------------------------------------------------------

    async def create_user(
        self,
        *,
        principal: Principal,
        request: CreateUserInput,
        role_check: RoleCheck | None = None,
    ) -> User:
        """Creates one user; a retry with the same non-empty request_id
        returns the first response and creates nothing. ``role_check`` (the
        caller's, when its token claims a privilege still to be checked) is
        settled before the user is written, by the write itself; a call
        that writes nothing (a refusal, a retry's stored answer) leaves it
        to its caller (usersvc.domain.role_checks).

        Raises PermissionDenied, InvalidArgument, WeakPassword,
        EmailAlreadyExists, TokenRevoked.
        """
        self._ensure_can_create(principal, request.roles, "roles")
        errors: list[FieldViolation] = []
        password_errors: list[FieldViolation] = []
        draft = self._draft(request, "", errors, password_errors)
        if not policies.has_full_label_limits(principal):
            check_self_service_labels(draft.labels, field="labels", errors=errors)
        validate_request_id(request.request_id, field="request_id", errors=errors)
        raise_for_violations(errors, password_errors)
        users = await self._create(principal, _CREATE_USER, request.request_id, [draft], role_check)
        return users[0]

    async def batch_create_users(
        self, *, principal: Principal, requests: Sequence[CreateUserInput], request_id: str
    ) -> list[User]:
        """Creates 1..1000 users atomically, in request order; idempotent
        like create_user. Field violations name the item
        ("requests[3].email"); an email repeated in the batch is reported on
        its later item.

        Raises PermissionDenied, InvalidArgument, WeakPassword,
        EmailAlreadyExists (metadata "field" names the item when known).
        """
        policies.ensure(policies.can_batch_create(principal), "batch-create users")
        if not 1 <= len(requests) <= MAX_BATCH_SIZE:
            raise InvalidArgument.single(
                "requests", f"must hold 1..{MAX_BATCH_SIZE} items, got {len(requests)}"
            )
        for index, item in enumerate(requests):
            self._ensure_can_create(principal, item.roles, f"requests[{index}].roles")
        errors: list[FieldViolation] = []
        password_errors: list[FieldViolation] = []
        drafts: list[_Draft] = []
        first_index_of: dict[str, int] = {}
        for index, item in enumerate(requests):
            prefix = f"requests[{index}]"
            draft = self._draft(item, prefix, errors, password_errors)
            drafts.append(draft)
            if item.request_id:
                errors.append(
                    FieldViolation(
                        f"{prefix}.request_id",
                        "must be empty; set request_id on the batch request instead",
                    )
                )
            earlier = first_index_of.setdefault(draft.email, index)
            if earlier != index and draft.email:
                errors.append(
                    FieldViolation(f"{prefix}.email", f"repeats requests[{earlier}].email")
                )
        validate_request_id(request_id, field="request_id", errors=errors)
        raise_for_violations(errors, password_errors)
        return await self._create(principal, _BATCH_CREATE_USERS, request_id, drafts)

    def _ensure_can_create(self, principal: Principal, roles: Sequence[str], field: str) -> None:
        if policies.can_create(principal, roles, allow_signup=self._allow_signup):
            return
        if set(roles) - {ROLE_USER}:
            raise PermissionDenied(f'{field}: only admins may grant roles other than "user"')
        raise PermissionDenied("self sign-up is disabled; ask an admin to create the account")

    def _draft(
        self,
        request: CreateUserInput,
        prefix: str,
        errors: list[FieldViolation],
        password_errors: list[FieldViolation],
    ) -> _Draft:
        path = f"{prefix}." if prefix else ""
        email = normalize_email(request.email, field=f"{path}email", errors=errors)
        draft = _Draft(
            email=email,
            display_name=normalize_display_name(
                request.display_name, field=f"{path}display_name", errors=errors
            ),
            roles=normalize_roles(request.roles, field=f"{path}roles", errors=errors),
            labels=normalize_labels(request.labels, field=f"{path}labels", errors=errors),
            password=request.password,
        )
        password_errors.extend(
            self._policy.violations(request.password, field=f"{path}password", email=email)
        )
        return draft

    async def _create(
        self,
        principal: Principal,
        method: str,
        request_id: str,
        drafts: Sequence[_Draft],
        role_check: RoleCheck | None = None,
    ) -> list[User]:
        fingerprint = _fingerprint([d.fingerprint_data() for d in drafts]) if request_id else ""
        scope = _idempotency_scope(principal, method, fingerprint)
        batch = method == _BATCH_CREATE_USERS
        if request_id:
            stored = await self._stored_response(scope, request_id, fingerprint, principal, drafts)
            if stored is not None:
                return stored
        # Hashed before the unit of work opens: a connection is never held
        # through bcrypt's deliberate slowness.
        hashes = await asyncio.gather(*(self._hasher.hash(d.password) for d in drafts))
        news = [
            NewUser(
                email=d.email,
                password_hash=password_hash,
                display_name=d.display_name,
                roles=d.roles,
                labels=d.labels,
            )
            for d, password_hash in zip(drafts, hashes, strict=True)
        ]
        try:
            if not batch and not request_id:
                # Nothing else belongs in its transaction: one statement,
                # committed on its own (usersvc.domain.ports.UserWriter).
                users = [await self._writer.create(news[0], events=_CREATED, role_check=role_check)]
            else:
                async with self._uow_factory() as uow:
                    await _settle(uow, _pending(role_check))
                    if batch:
                        users = await uow.users.add_many(news, events=_CREATED)
                    else:
                        users = [await uow.users.add(news[0], events=_CREATED)]
                    if request_id:
                        record = IdempotencyRecord(fingerprint, tuple(users))
                        await uow.idempotency.add(scope, request_id, record)
                    await uow.commit()
        except (IdempotencyKeyTaken, EmailAlreadyExists) as exc:
            # A concurrent first attempt with the same key won the race: its
            # insert of the same email (or of the key) beat ours. Answer as a
            # retry would, with the response it stored.
            if request_id:
                stored = await self._stored_response(
                    scope, request_id, fingerprint, principal, drafts
                )
                if stored is not None:
                    return stored
            if isinstance(exc, EmailAlreadyExists):
                located = _locate_clash(exc, drafts, batch=batch)
                if located is None:
                    raise
                raise located from exc
            raise InvalidArgument.single(
                "request_id", "a concurrent request with this request_id did not finish; retry"
            ) from exc
        return users

    async def _stored_response(
        self,
        scope: str,
        request_id: str,
        fingerprint: str,
        principal: Principal,
        drafts: Sequence[_Draft],
    ) -> list[User] | None:
        async with self._uow_factory() as uow:
            record = await uow.idempotency.get(scope, request_id)
            credentials = None
            if record is not None and not principal.is_authenticated and record.users:
                credentials = await uow.users.get_credentials(record.users[0].id)
        if record is None:
            return None
        different = not hmac.compare_digest(record.fingerprint.encode(), fingerprint.encode())
        if not different and not principal.is_authenticated:
            # The fingerprint leaves the password out, so an anonymous
            # caller who knows someone's sign-up (email, name, labels and
            # request_id) could otherwise collect its answer: the retry must
            # also carry the password the account was created with.
            different = credentials is None or not await self._hasher.verify(
                drafts[0].password, credentials.password_hash
            )
        if different:
            raise InvalidArgument.single(
                "request_id", "this request_id was already used for a different request"
            )
        return list(record.users)

    # -- import ----------------------------------------------------------------

    async def import_users(
        self, *, principal: Principal, rows: AsyncIterable[ImportRow]
    ) -> ImportResult:
        """Imports users whose passwords are already bcrypt hashes, stored as
        they are (usersvc.services.bulk_import): bad rows and taken emails are
        reported per row, not raised; valid rows are committed batch by
        batch. The caller is checked before a row is read.

        Raises PermissionDenied (admins only), what iterating ``rows``
        raises, DatabaseUnavailable; batches committed before an error stay.
        """
        policies.ensure(policies.can_import(principal), "import users")
        return await UserImporter(uow_factory=self._uow_factory).run(rows)

    # -- read ------------------------------------------------------------------

    async def get_user(
        self, *, principal: Principal, user_id: str, role_check: RoleCheck | None = None
    ) -> User:
        """The user ``user_id`` ("me": the caller). ``role_check`` (the
        caller's, when its token claims a privilege still to be checked) is
        settled by the read itself (usersvc.domain.role_checks).

        Raises PermissionDenied, InvalidArgument, UserNotFound (also for a
        deleted user unless the caller is an admin), TokenRevoked.
        """
        target = _target(principal, user_id, "id")
        policies.ensure(policies.can_read(principal, target), "read this user")
        user = await self._reader.get(target, role_check=role_check)
        return _visible(principal, user, target)

    async def lookup_user(
        self, *, principal: Principal, email: str, role_check: RoleCheck | None = None
    ) -> User:
        """The user with ``email`` (case-insensitive); ``role_check`` as in
        get_user.

        Raises PermissionDenied, InvalidArgument, UserNotFound, TokenRevoked.
        """
        policies.ensure(policies.can_lookup(principal), "look up users")
        errors: list[FieldViolation] = []
        normalized = normalize_email(email, field="email", errors=errors)
        raise_for_violations(errors)
        user = await self._reader.get_by_email(normalized, role_check=role_check)
        if user is None or (
            user.state is UserState.DELETED and not policies.can_see_deleted(principal)
        ):
            raise UserNotFound()
        return user

    async def create_or_promote_admin(
        self, *, principal: Principal, email: str, password: str, display_name: str
    ) -> tuple[User, bool]:
        """Make ``email`` an admin (``usersvc create-admin``): a new user with
        the roles user and admin, or the existing user with admin added to
        its roles (its password untouched). Returns the user and whether it
        was created.

        Raises what lookup_user, create_user and update_user raise
        (PermissionDenied unless ``principal`` is an admin, InvalidArgument,
        WeakPassword, EmailAlreadyExists on a race with another creation).
        """
        try:
            existing = await self.lookup_user(principal=principal, email=email)
        except UserNotFound:
            request = CreateUserInput(
                email=email,
                password=password,
                display_name=display_name,
                roles=(ROLE_USER, ROLE_ADMIN),
            )
            return await self.create_user(principal=principal, request=request), True
        roles = tuple(dict.fromkeys((*existing.roles, ROLE_ADMIN)))
        patch = UpdateUserInput(user_id=str(existing.id), etag="", patch=UserPatch(roles=roles))
        return await self.update_user(principal=principal, request=patch), False

    async def batch_get_users(
        self,
        *,
        principal: Principal,
        user_ids: Sequence[str],
        role_check: RoleCheck | None = None,
    ) -> list[User]:
        """1..1000 distinct users in request order; ``role_check`` as in
        get_user.

        Raises PermissionDenied, InvalidArgument (violations "ids[i]",
        including an id repeating an earlier one; field "ids" when the users
        would not fit in one response of 4 MiB), UserNotFound with metadata
        {"id": ...} naming the first id in request order that is missing (or
        deleted, unless the caller is an admin), TokenRevoked.
        """
        policies.ensure(policies.can_batch_get(principal), "batch-get users")
        if not 1 <= len(user_ids) <= MAX_BATCH_SIZE:
            raise InvalidArgument.single(
                "ids", f"must hold 1..{MAX_BATCH_SIZE} ids, got {len(user_ids)}"
            )
        errors: list[FieldViolation] = []
        targets: list[uuid.UUID] = []
        first_index_of: dict[uuid.UUID, int] = {}
        for index, raw in enumerate(user_ids):
            try:
                target = parse_user_id(raw, f"ids[{index}]", principal)
            except InvalidArgument as exc:
                errors.extend(exc.violations)
                continue
            # Repeats are refused, not answered: each costs a full copy of
            # the user in the response for nothing.
            earlier = first_index_of.setdefault(target, index)
            if earlier != index:
                errors.append(FieldViolation(f"ids[{index}]", f"repeats ids[{earlier}]"))
            targets.append(target)
        raise_for_violations(errors)
        budget = byte_budget(len(targets))
        found: list[User] | OversizedUsers
        if budget is None:
            found = await self._reader.get_many(targets, role_check=role_check)
        else:
            # Users that would not fit are not read: only their sizes are.
            # The role check, if any, is not in this statement: the auth
            # interceptor settles it before the call answers.
            found = await self._reader.get_many_within(targets, max_bytes=budget)
        if isinstance(found, OversizedUsers):
            for target in targets:
                if target not in found.wire_bytes or (
                    target in found.deleted and not policies.can_see_deleted(principal)
                ):
                    raise UserNotFound(metadata={"id": str(target)})
            fitting = fitting_count(found.wire_bytes[target] for target in targets)
            raise _too_many_bytes(len(targets), fitting)
        by_id = {user.id: user for user in found}
        users = [_visible(principal, by_id.get(target), target) for target in targets]
        fitting = fitting_prefix(users)
        if fitting < len(users):
            raise _too_many_bytes(len(users), fitting)
        return users

    async def list_users(
        self,
        *,
        principal: Principal,
        request: ListUsersInput,
        role_check: RoleCheck | None = None,
    ) -> UserListResult:
        """One keyset page of the users matching the filter. ``role_check``
        as in get_user: a page without a filter settles it in its own read
        (the read lane: one statement); with a filter, the page is read in
        a unit of work and the check is left to the caller.

        Raises PermissionDenied (show_deleted needs an admin),
        InvalidArgument (page_size, filter, order_by, page_token; the first
        three reported together), TokenRevoked.
        """
        policies.ensure(policies.can_list(principal), "list users")
        if request.show_deleted:
            policies.ensure(policies.can_see_deleted(principal), "list deleted users")
        errors: list[FieldViolation] = []
        if request.page_size < 0:
            errors.append(FieldViolation("page_size", "must not be negative"))
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        filter, ordering = Filter(), Ordering()
        try:
            filter = parse_filter(request.filter)
        except InvalidArgument as exc:
            errors.extend(exc.violations)
        try:
            ordering = parse_order_by(request.order_by)
        except InvalidArgument as exc:
            errors.extend(exc.violations)
        raise_for_violations(errors)
        fingerprint = query_fingerprint(filter, ordering, request.show_deleted)
        after: Cursor | None = None
        total: int | None = None
        if request.page_token:
            token = decode_page_token(
                request.page_token,
                fingerprint=fingerprint,
                ordering=ordering,
                keys=self._page_token_keys(),
            )
            after, total = token.cursor, token.total_size
        # The query stops at the byte budget already (no row past it is
        # read); the exact check below stays the last word.
        query = ListQuery(
            filter,
            ordering,
            request.show_deleted,
            page_size,
            after,
            max_bytes=byte_budget(page_size + 1),
        )
        if filter.terms:
            async with self._uow_factory() as uow:
                if total is None:
                    total = await uow.users.count_matches(
                        filter, show_deleted=request.show_deleted, exact_up_to=EXACT_TOTAL_UP_TO
                    )
                page = await uow.users.list(query)
        else:
            # The common page: one statement, which also settles the role
            # check and, on a first page, usually the total.
            listed = await self._reader.list_unfiltered(
                query,
                role_check=role_check,
                count_up_to=EXACT_TOTAL_UP_TO if total is None else None,
            )
            page = listed.page
            if total is None:
                total = listed.total_size
            if total is None:
                async with self._uow_factory() as uow:
                    total = await uow.users.count_matches(
                        filter, show_deleted=request.show_deleted, exact_up_to=EXACT_TOTAL_UP_TO
                    )
        users, next_cursor = page.users, page.next_cursor
        fitting = fitting_prefix(users)
        if fitting < len(users):
            # A shorter page, as AIP-158 allows: the response stays below
            # 4 MiB and the token resumes after its last user.
            users = users[:fitting]
            next_cursor = cursor_of(ordering.field, users[-1])
        next_token = ""
        if next_cursor is not None:
            next_token = encode_page_token(
                next_cursor,
                fingerprint=fingerprint,
                total_size=total,
                keys=self._page_token_keys(),
            )
        return UserListResult(users=users, next_page_token=next_token, total_size=total)

    # -- update ----------------------------------------------------------------

    async def update_user(
        self,
        *,
        principal: Principal,
        request: UpdateUserInput,
        role_check: RoleCheck | None = None,
    ) -> User:
        """Applies the fields set in ``request.patch``. ``role_check`` (the
        caller's privileged token, when its re-check is pending) is settled
        by the update's own statement, which writes nothing unless it passes
        (usersvc.domain.role_checks).

        Raises TokenRevoked (the role check failed), PermissionDenied (roles
        need an admin), InvalidArgument (empty
        patch: field "update_mask"; bad values, etag over 64 characters:
        "user.<field>"),
        UserNotFound, InvalidState (deleted user, admins), EtagMismatch,
        EmailAlreadyExists. A change of roles ends all the user's sessions
        (the caller's own too, on a self change).
        """
        target = _target(principal, request.user_id, "user.id")
        patch = request.patch
        touched = [
            name
            for name, value in (
                ("email", patch.email),
                ("display_name", patch.display_name),
                ("roles", patch.roles),
                ("labels", patch.labels),
            )
            if value is not None
        ]
        policies.ensure(policies.can_update(principal, target, touched), "update these fields")
        if not touched:
            raise InvalidArgument.single(
                "update_mask", "names no field to change (email, display_name, labels, roles)"
            )
        errors: list[FieldViolation] = []
        normalized = UserPatch(
            email=None
            if patch.email is None
            else normalize_email(patch.email, field="user.email", errors=errors),
            display_name=None
            if patch.display_name is None
            else normalize_display_name(
                patch.display_name, field="user.display_name", errors=errors
            ),
            roles=None
            if patch.roles is None
            else normalize_roles(patch.roles, field="user.roles", errors=errors),
            labels=None
            if patch.labels is None
            else normalize_labels(patch.labels, field="user.labels", errors=errors),
        )
        if normalized.labels is not None and not policies.has_full_label_limits(principal):
            check_self_service_labels(normalized.labels, field="user.labels", errors=errors)
        validate_etag(request.etag, field="user.etag", errors=errors)
        raise_for_violations(errors)
        # One conditional UPDATE checks every rule (state, etag, the stored
        # admin role for a role change), writes the user and its event, and
        # returns the version it replaced, which tells which rule refused a
        # write without a second look (usersvc.adapters.repository.user_update).
        change = UserUpdate(
            user_id=target,
            patch=normalized,
            expected_version=version_in_etag(request.etag) if request.etag else None,
            admin_caller=principal.user_id() if normalized.roles is not None else None,
            role_check=role_check if role_check is not None and not role_check.done else None,
        )
        if normalized.email is None and normalized.roles is None:
            # Nothing else happens in the transaction: the statement commits
            # on its own (usersvc.domain.ports.UserWriter).
            outcome = await self._writer.update(change, events=_UPDATED)
            return _updated(principal, target, request.etag, outcome)
        revocation = None
        async with self._uow_factory() as uow:
            outcome = await uow.users.update_checked(change, events=_UPDATED)
            user = _updated(principal, target, request.etag, outcome)
            before = outcome.before
            if (
                normalized.roles is not None
                and before is not None
                and set(normalized.roles) != set(before.roles)
            ):
                # Access tokens carry roles: every session of the user ends,
                # like on a disable, so no token with the old roles lives on
                # (on every replica through the revocation feed).
                revocation = await self._sessions.revoke_user(
                    uow, target, RevokeReason.ROLES_CHANGED
                )
            await uow.commit()
        if revocation is not None:
            self._sessions.committed(revocation)
        return user

    async def delete_user(self, *, principal: Principal, user_id: str, etag: str) -> User:
        """Soft-deletes the user and ends all its sessions (the caller's too,
        on a self-delete); its email stays taken until purged.

        Raises PermissionDenied, InvalidArgument (id; etag over 64
        characters), UserNotFound (also an already deleted user, for
        non-admins), InvalidState (already deleted, admins), EtagMismatch.
        """
        target = _target(principal, user_id, "id")
        policies.ensure(policies.can_delete(principal, target), "delete this user")
        errors: list[FieldViolation] = []
        validate_etag(etag, field="etag", errors=errors)
        raise_for_violations(errors)
        async with self._uow_factory() as uow:
            await _lock_live(uow, principal, target, etag=etag)
            user = await uow.users.set_deleted(target, True, events=_DELETED)
            revocation = await self._sessions.revoke_user(uow, target, RevokeReason.DELETED)
            await uow.commit()
        self._sessions.committed(revocation)
        return user

    async def undelete_user(self, *, principal: Principal, user_id: str) -> User:
        """Restores a soft-deleted user to its state before deletion.

        Raises PermissionDenied, InvalidArgument, UserNotFound, InvalidState
        (already_exists: the user is not deleted).
        """
        policies.ensure(policies.can_undelete(principal), "undelete users")
        target = _target(principal, user_id, "id")
        async with self._uow_factory() as uow:
            current = await uow.users.get(target, for_update=True)
            if current is None:
                raise UserNotFound(metadata={"id": str(target)})
            if current.state is not UserState.DELETED:
                raise InvalidState("the user is not deleted", already_exists=True)
            user = await uow.users.set_deleted(target, False, events=_UNDELETED)
            await uow.commit()
        return user

    async def purge_user(self, *, principal: Principal, user_id: str) -> None:
        """Erases the user (live or deleted) and its sessions for good; the
        sessions' access tokens stay refused until they would have expired.

        Raises PermissionDenied, InvalidArgument, UserNotFound.
        """
        policies.ensure(policies.can_purge(principal), "purge users")
        target = _target(principal, user_id, "id")
        async with self._uow_factory() as uow:
            # Revoked first: the purge deletes the session rows, but the
            # revocation log outlives them.
            revocation = await self._sessions.revoke_user(uow, target, RevokeReason.PURGED)
            if not await uow.users.purge(target, events=_PURGED):
                raise UserNotFound(metadata={"id": str(target)})
            await uow.commit()
        self._sessions.committed(revocation)

    async def disable_user(self, *, principal: Principal, user_id: str) -> User:
        """Disables the user (no logins) and ends all its sessions; no write
        when already disabled.

        Raises PermissionDenied, InvalidArgument, UserNotFound, InvalidState
        (deleted user).
        """
        return await self._set_disabled(principal, user_id, disabled=True)

    async def enable_user(self, *, principal: Principal, user_id: str) -> User:
        """Re-enables the user; no write when already enabled.

        Raises PermissionDenied, InvalidArgument, UserNotFound, InvalidState
        (deleted user).
        """
        return await self._set_disabled(principal, user_id, disabled=False)

    async def _set_disabled(self, principal: Principal, user_id: str, *, disabled: bool) -> User:
        policies.ensure(policies.can_change_state(principal), "disable or enable users")
        target = _target(principal, user_id, "id")
        async with self._uow_factory() as uow:
            current = await _lock_live(uow, principal, target, etag="")
            if (current.state is UserState.DISABLED) == disabled:
                return current
            user = await uow.users.set_disabled(
                target, disabled, events=_DISABLED if disabled else _ENABLED
            )
            revocation = None
            if disabled:
                revocation = await self._sessions.revoke_user(uow, target, RevokeReason.DISABLED)
            await uow.commit()
        if revocation is not None:
            self._sessions.committed(revocation)
        return user

    async def change_password(
        self,
        *,
        principal: Principal,
        user_id: str,
        current_password: str,
        new_password: str,
    ) -> None:
        """Sets a new password and ends the user's other sessions: all of
        them when an admin changes another user's password, all but the
        caller's own on a self change. Changing one's own password needs the
        current one (admins included); admins changing another user's do not.

        A wrong current password counts towards the account's login lock
        (usersvc.domain.lockout); while it is locked the current password is
        not even checked.

        Raises PermissionDenied, InvalidArgument (missing current_password),
        UserNotFound, InvalidState (deleted user, admins),
        InvalidCredentials (wrong current password, locked account),
        WeakPassword (field "new_password").
        """
        target = _target(principal, user_id, "id")
        policies.ensure(
            policies.can_change_password(principal, target), "change this user's password"
        )
        needs_current = policies.requires_current_password(principal, target)
        if needs_current and not current_password:
            raise InvalidArgument.single(
                "current_password", "is required to change your own password"
            )
        now = datetime.fromtimestamp(self._clock(), UTC)
        async with self._uow_factory() as uow:
            credentials = await uow.users.get_credentials(target)
            if credentials is None:
                raise UserNotFound(metadata={"id": str(target)})
            user = _live(principal, credentials.user, target)
            attempt = await uow.users.find_login(user.email) if needs_current else None
        if needs_current:
            # Guessed like a login, so limited like one: refused the same way
            # while the account is locked (its hash not even checked), and a
            # wrong guess counted towards the same lock (after bcrypt, as
            # Login counts), so a stolen token gets no more guesses than
            # Login would allow.
            if attempt is None or attempt.credentials.user.id != target:
                raise InvalidCredentials("the current password is wrong")
            if attempt.locked_until is not None and attempt.locked_until > now:
                raise InvalidCredentials("the current password is wrong")
            credentials = attempt.credentials
        verified_hash = credentials.password_hash
        if needs_current and not await self._hasher.verify(current_password, verified_hash):
            async with self._uow_factory() as uow:
                await uow.users.count_login_failure(target, now=now, policy=self._lockout)
                await uow.commit()
            raise InvalidCredentials("the current password is wrong")
        self._policy.check(new_password, field="new_password", email=user.email)
        new_hash = await self._hasher.hash(new_password)
        async with self._uow_factory() as uow:
            await _lock_live(uow, principal, target, etag="")
            if needs_current:
                # The password may have changed while bcrypt ran; the check
                # above then proved knowledge of a password no longer valid.
                latest = await uow.users.get_credentials(target)
                if latest is None or not hmac.compare_digest(
                    latest.password_hash.encode(), verified_hash.encode()
                ):
                    raise InvalidCredentials("the current password is wrong")
            await uow.users.set_password_hash(target, new_hash, events=_PASSWORD_CHANGED)
            # The current password was proven: like a successful login. A
            # lock that fell while bcrypt ran stays (as for Login), and the
            # refusal rolls the new hash back.
            if needs_current and not await uow.users.clear_login_failures(
                target, unless_locked_at=now
            ):
                raise InvalidCredentials("the current password is wrong")
            own_session = (
                session_id_of(principal.session_id) if principal.user_id() == target else None
            )
            revocation = await self._sessions.revoke_user(
                uow, target, RevokeReason.PASSWORD_CHANGED, except_session_id=own_session
            )
            await uow.commit()
        self._sessions.committed(revocation)


# -- helpers ---------------------------------------------------------------------

# What each change writes with it (usersvc.domain.events); never a secret.
_CREATED = (EventDraft(EventType.USER_CREATED),)
_DELETED = (EventDraft(EventType.USER_DELETED),)
_UNDELETED = (EventDraft(EventType.USER_UNDELETED),)
_PURGED = (EventDraft(EventType.USER_PURGED),)
_DISABLED = (EventDraft(EventType.USER_DISABLED),)
_ENABLED = (EventDraft(EventType.USER_ENABLED),)
_PASSWORD_CHANGED = (EventDraft(EventType.USER_PASSWORD_CHANGED),)
# The statement fills in the fields the update changed.
_UPDATED = (EventDraft(EventType.USER_UPDATED),)


def _target(principal: Principal, raw_id: str, field: str) -> uuid.UUID:
    """The user id a request names. Anonymous callers are refused first: every
    method taking an id needs a caller (the API layer normally stops them
    even earlier). Raises PermissionDenied, InvalidArgument."""
    if not principal.is_authenticated:
        raise PermissionDenied("this method needs an authenticated caller")
    return parse_user_id(raw_id, field, principal)


def _too_many_bytes(count: int, fitting: int) -> InvalidArgument:
    return InvalidArgument.single(
        "ids",
        f"these {count} users do not fit in one response of "
        f"{MAX_RESPONSE_BYTES // (1024 * 1024)} MiB (the first {fitting} do); "
        "ask for fewer ids per call",
    )


def _visible(principal: Principal, user: User | None, target: uuid.UUID) -> User:
    """Raises UserNotFound unless ``user`` exists and, when deleted, the
    caller may see deleted users."""
    if user is None or (
        user.state is UserState.DELETED and not policies.can_see_deleted(principal)
    ):
        raise UserNotFound(metadata={"id": str(target)})
    return user


def _live(principal: Principal, user: User | None, target: uuid.UUID) -> User:
    """Raises UserNotFound for a missing user and for a deleted one the
    caller cannot see; InvalidState for a deleted one an admin can see."""
    found = _visible(principal, user, target)
    if found.state is UserState.DELETED:
        raise InvalidState("the user is deleted; undelete it first")
    return found


async def _lock_live(
    uow: UnitOfWork, principal: Principal, target: uuid.UUID, *, etag: str
) -> User:
    """Reads and locks the user for a write within ``uow``. Raises
    UserNotFound, InvalidState (see _live) and EtagMismatch when ``etag`` is
    given and not current."""
    user = _live(principal, await uow.users.get(target, for_update=True), target)
    if etag and not hmac.compare_digest(etag.encode(), user.etag.encode()):
        raise EtagMismatch(metadata={"id": str(target)})
    return user


def _updated(principal: Principal, target: uuid.UUID, etag: str, outcome: UpdateOutcome) -> User:
    """The user an update wrote, or the error of the first rule that
    refused it, in the order the rules are told: UserNotFound,
    InvalidState (see _live), EtagMismatch, PermissionDenied (a role change
    is the one write that grants privilege: the calling user must hold the
    admin role in the database, not merely in its token; certificate-
    authenticated services have no row, their roles come from
    configuration)."""
    before = _live(principal, outcome.before, target)
    if etag and not hmac.compare_digest(etag.encode(), before.etag.encode()):
        raise EtagMismatch(metadata={"id": str(target)})
    if not outcome.caller_is_admin:
        raise PermissionDenied("the caller no longer holds the admin role")
    if outcome.after is None:
        # The statement refuses only for the rules above.
        raise RuntimeError(f"update of {target} refused for no rule")
    return outcome.after


def _idempotency_scope(principal: Principal, method: str, fingerprint: str) -> str:
    # Keys are per caller and per method: two callers may pick the same key,
    # and a key of CreateUser says nothing about BatchCreateUsers. Anonymous
    # callers cannot be told apart, so their scope is the request itself
    # (its fingerprint, without the password): a retry of the same sign-up
    # finds its first answer, and another sign-up that happens to use the
    # same request_id creates its own user instead of receiving that one.
    if not principal.is_authenticated:
        return f"{method}:{principal.kind.value}:anonymous:{fingerprint}"
    return f"{method}:{principal.kind.value}:{principal.subject}"


def _fingerprint(data: object) -> str:
    canonical = json.dumps(data, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _locate_clash(
    exc: EmailAlreadyExists, drafts: Sequence[_Draft], *, batch: bool
) -> EmailAlreadyExists | None:
    """The repository's EmailAlreadyExists with metadata "field" naming the
    request field whose email is taken; None when the email is not known."""
    email = exc.metadata.get("email", "")
    for index, draft in enumerate(drafts):
        if draft.email == email:
            path = f"requests[{index}].email" if batch else "email"
            return EmailAlreadyExists(exc.message, metadata={**exc.metadata, "field": path})
    return None
