"""BatchUpdateUsers and BatchDeleteUsers (AIP-234/235): all or nothing.

Every item is validated as its single-item method validates it, with the
violations named after the item ("requests[3].user.email"); then, in one
unit of work, the users are locked (in id order), every item's state and
etag is checked against them, and the whole batch is written with one
set-based statement. The first failing item, in request order, fails the
batch: its error carries ErrorInfo metadata "index", and nothing is written.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from usersvc.domain import policies
from usersvc.domain.errors import (
    DomainError,
    EmailAlreadyExists,
    EtagMismatch,
    FieldViolation,
    InvalidArgument,
    InvalidState,
    UserNotFound,
)
from usersvc.domain.events import EventDraft, EventType
from usersvc.domain.models import Principal, RevokeReason, User, UserPatch, UserState
from usersvc.domain.ports import UnitOfWorkFactory, UserWrite
from usersvc.domain.validation import (
    normalize_display_name,
    normalize_email,
    normalize_labels,
    normalize_roles,
    parse_user_id,
    validate_etag,
)
from usersvc.services.inputs import UpdateUserInput
from usersvc.services.sessions import SessionRevoker

MAX_BATCH_SIZE = 1000
INDEX_KEY = "index"
# One event per user, written by the batch's own statement.
_UPDATED = (EventDraft(EventType.USER_UPDATED),)
_DELETED = (EventDraft(EventType.USER_DELETED),)


@dataclass(frozen=True, slots=True)
class DeleteItem:
    """Raw fields of one DeleteUserRequest of a batch."""

    user_id: str
    etag: str = ""


class BatchWriteService:
    def __init__(self, *, uow_factory: UnitOfWorkFactory, sessions: SessionRevoker) -> None:
        """Raises nothing."""
        self._uow_factory = uow_factory
        self._sessions = sessions

    async def batch_update_users(
        self, *, principal: Principal, requests: Sequence[UpdateUserInput]
    ) -> list[User]:
        """Updates 1..1000 users atomically; the users after the update, in
        request order.

        Raises PermissionDenied (admins only); InvalidArgument (size, and
        every bad item field: "requests[i]...", metadata "index" of the
        first bad item; a repeated id or email); and, with metadata "index":
        UserNotFound, InvalidState (deleted user), EtagMismatch,
        EmailAlreadyExists (metadata "index" when the taken email's item is
        known).
        """
        policies.ensure(policies.can_batch_write(principal), "batch-update users")
        _check_size(requests)
        errors: list[FieldViolation] = []
        first_bad: int | None = None
        writes: list[UserWrite] = []
        etags: list[str] = []
        first_of_id: dict[uuid.UUID, int] = {}
        first_of_email: dict[str, int] = {}
        for index, item in enumerate(requests):
            prefix = f"requests[{index}].user"
            before = len(errors)
            target = _parse_id(item.user_id, f"{prefix}.id", principal, errors)
            patch = _normalized_patch(item.patch, prefix, errors)
            if patch.is_empty():
                errors.append(
                    FieldViolation(
                        f"requests[{index}].update_mask",
                        "names no field to change (email, display_name, labels, roles)",
                    )
                )
            validate_etag(item.etag, field=f"{prefix}.etag", errors=errors)
            if target is not None:
                earlier = first_of_id.setdefault(target, index)
                if earlier != index:
                    errors.append(FieldViolation(f"{prefix}.id", f"repeats requests[{earlier}]"))
            if patch.email:
                earlier = first_of_email.setdefault(patch.email, index)
                if earlier != index:
                    errors.append(
                        FieldViolation(f"{prefix}.email", f"repeats requests[{earlier}].user.email")
                    )
            if len(errors) > before and first_bad is None:
                first_bad = index
            if target is not None:
                writes.append(UserWrite(target, patch))
                etags.append(item.etag)
        if errors:
            raise InvalidArgument(errors, metadata={INDEX_KEY: str(first_bad)})
        targets = [w.user_id for w in writes]
        new_emails = [w.patch.email for w in writes if w.patch.email is not None]
        async with self._uow_factory() as uow:
            current = {user.id: user for user in await uow.accounts.lock_users(targets)}
            for index, (target, etag) in enumerate(zip(targets, etags, strict=True)):
                _check_writable(current.get(target), target, etag, index)
            taken = await uow.accounts.taken_emails(new_emails, except_ids=targets)
            for index, write in enumerate(writes):
                if write.patch.email is not None and write.patch.email in taken:
                    raise EmailAlreadyExists(
                        metadata={
                            "email": write.patch.email,
                            "field": f"requests[{index}].user.email",
                            INDEX_KEY: str(index),
                        }
                    )
            writes = [
                UserWrite(w.user_id, w.patch, w.patch.changed_fields(current[w.user_id]))
                for w in writes
            ]
            users = await uow.accounts.update_many(writes, events=_UPDATED)
            # Access tokens carry roles: a user whose roles changed loses
            # every session, as UpdateUser does it.
            revocations = [
                await self._sessions.revoke_user(uow, w.user_id, RevokeReason.ROLES_CHANGED)
                for w in writes
                if w.patch.roles is not None and set(w.patch.roles) != set(current[w.user_id].roles)
            ]
            await uow.commit()
        for revocation in revocations:
            self._sessions.committed(revocation)
        return users

    async def batch_delete_users(
        self, *, principal: Principal, requests: Sequence[DeleteItem]
    ) -> list[User]:
        """Soft-deletes 1..1000 users atomically and ends their sessions;
        the deleted users, in request order.

        Raises PermissionDenied (admins only); InvalidArgument (size, ids,
        etags: "requests[i].id", metadata "index" of the first bad item; a
        repeated id); and, with metadata "index": UserNotFound,
        InvalidState (already deleted), EtagMismatch.
        """
        policies.ensure(policies.can_batch_write(principal), "batch-delete users")
        _check_size(requests)
        errors: list[FieldViolation] = []
        first_bad: int | None = None
        targets: list[uuid.UUID] = []
        first_of_id: dict[uuid.UUID, int] = {}
        for index, item in enumerate(requests):
            prefix = f"requests[{index}]"
            before = len(errors)
            target = _parse_id(item.user_id, f"{prefix}.id", principal, errors)
            validate_etag(item.etag, field=f"{prefix}.etag", errors=errors)
            if target is not None:
                earlier = first_of_id.setdefault(target, index)
                if earlier != index:
                    errors.append(FieldViolation(f"{prefix}.id", f"repeats requests[{earlier}]"))
                targets.append(target)
            if len(errors) > before and first_bad is None:
                first_bad = index
        if errors:
            raise InvalidArgument(errors, metadata={INDEX_KEY: str(first_bad)})
        async with self._uow_factory() as uow:
            current = {user.id: user for user in await uow.accounts.lock_users(targets)}
            for index, (target, item) in enumerate(zip(targets, requests, strict=True)):
                _check_writable(current.get(target), target, item.etag, index)
            users = await uow.accounts.delete_many(targets, events=_DELETED)
            sessions = await uow.accounts.live_session_ids(targets)
            revocation = await self._sessions.revoke_sessions(uow, sessions, RevokeReason.DELETED)
            await uow.commit()
        self._sessions.committed(revocation)
        return users


def _check_size(requests: Sequence[object]) -> None:
    if not 1 <= len(requests) <= MAX_BATCH_SIZE:
        raise InvalidArgument.single(
            "requests", f"must hold 1..{MAX_BATCH_SIZE} items, got {len(requests)}"
        )


def _parse_id(
    raw: str, field: str, principal: Principal, errors: list[FieldViolation]
) -> uuid.UUID | None:
    try:
        return parse_user_id(raw, field, principal)
    except InvalidArgument as exc:
        errors.extend(exc.violations)
        return None


def _normalized_patch(patch: UserPatch, prefix: str, errors: list[FieldViolation]) -> UserPatch:
    return UserPatch(
        email=None
        if patch.email is None
        else normalize_email(patch.email, field=f"{prefix}.email", errors=errors),
        display_name=None
        if patch.display_name is None
        else normalize_display_name(
            patch.display_name, field=f"{prefix}.display_name", errors=errors
        ),
        roles=None
        if patch.roles is None
        else normalize_roles(patch.roles, field=f"{prefix}.roles", errors=errors),
        labels=None
        if patch.labels is None
        else normalize_labels(patch.labels, field=f"{prefix}.labels", errors=errors),
    )


def _check_writable(user: User | None, target: uuid.UUID, etag: str, index: int) -> None:
    """Raises, with metadata "index", UserNotFound, InvalidState (deleted)
    or EtagMismatch: the single-item rules for an admin."""
    metadata = {"id": str(target), INDEX_KEY: str(index)}
    error: DomainError | None = None
    if user is None:
        error = UserNotFound(metadata=metadata)
    elif user.state is UserState.DELETED:
        error = InvalidState(f"requests[{index}]: the user is deleted", metadata=metadata)
    elif etag and not hmac.compare_digest(etag.encode(), user.etag.encode()):
        error = EtagMismatch(metadata=metadata)
    if error is not None:
        raise error
