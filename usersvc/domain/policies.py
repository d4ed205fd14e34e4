"""Who may call what: pure answers over the calling Principal.

Each rule looks only at the caller and the id it names, never at stored
data, so services decide PERMISSION_DENIED before finding out whether the
target exists (a refusal must not reveal that). Roles: "user" acts on
itself, "admin" does everything, "service" creates, reads, looks up, lists
and batch-gets (and may grant only "user").

The ``can_*`` functions and ``requires_current_password`` raise nothing;
``ensure`` turns a refusal into PermissionDenied.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection

from usersvc.domain.errors import PermissionDenied
from usersvc.domain.models import ROLE_USER, Principal

# What a caller without the admin role may ask a new account to hold.
_SELF_GRANTABLE = frozenset({ROLE_USER})


def _is_self(principal: Principal, target_id: uuid.UUID) -> bool:
    return principal.user_id() == target_id


def _is_admin(principal: Principal) -> bool:
    # Roles count only on an authenticated caller, whatever built the Principal.
    return principal.is_authenticated and principal.is_admin


def _is_service(principal: Principal) -> bool:
    return principal.is_authenticated and principal.is_service


def _is_reader(principal: Principal) -> bool:
    return _is_admin(principal) or _is_service(principal)


def can_create(
    principal: Principal, roles_requested: Collection[str], *, allow_signup: bool
) -> bool:
    """Admins always; services always but granting only "user"; anyone else
    (anonymous included) only with sign-up enabled and roles empty or
    ["user"]."""
    if _is_admin(principal):
        return True
    if not set(roles_requested) <= _SELF_GRANTABLE:
        return False
    return _is_service(principal) or allow_signup


def has_full_label_limits(principal: Principal) -> bool:
    """Admins and services may set labels up to the full limits; anyone else
    (anonymous sign-ups, users editing themselves) within the smaller
    self-service budget (usersvc.domain.validation)."""
    return _is_reader(principal)


def can_batch_create(principal: Principal) -> bool:
    """Admins and services (each item is also checked with can_create)."""
    return _is_reader(principal)


def can_import(principal: Principal) -> bool:
    """ImportUsers (users with existing password hashes, any roles): admins."""
    return _is_admin(principal)


def can_read(principal: Principal, target_id: uuid.UUID) -> bool:
    """GetUser: the user itself, admins, services."""
    return _is_reader(principal) or _is_self(principal, target_id)


def can_lookup(principal: Principal) -> bool:
    """LookupUser by email: admins and services."""
    return _is_reader(principal)


def can_list(principal: Principal) -> bool:
    """ListUsers: admins and services."""
    return _is_reader(principal)


def can_batch_get(principal: Principal) -> bool:
    """BatchGetUsers: admins and services."""
    return _is_reader(principal)


def can_see_deleted(principal: Principal) -> bool:
    """Soft-deleted users exist only for admins (List show_deleted, Get,
    Lookup, BatchGet); everyone else gets NOT_FOUND."""
    return _is_admin(principal)


def can_update(principal: Principal, target_id: uuid.UUID, fields: Collection[str]) -> bool:
    """UpdateUser: admins anything; the user itself anything but roles."""
    if _is_admin(principal):
        return True
    return _is_self(principal, target_id) and "roles" not in fields


def can_delete(principal: Principal, target_id: uuid.UUID) -> bool:
    """DeleteUser: the user itself and admins."""
    return _is_admin(principal) or _is_self(principal, target_id)


def can_undelete(principal: Principal) -> bool:
    """UndeleteUser: admins."""
    return _is_admin(principal)


def can_purge(principal: Principal) -> bool:
    """PurgeUser: admins."""
    return _is_admin(principal)


def can_change_state(principal: Principal) -> bool:
    """DisableUser / EnableUser: admins."""
    return _is_admin(principal)


def can_change_password(principal: Principal, target_id: uuid.UUID) -> bool:
    """ChangePassword: the user itself and admins."""
    return _is_admin(principal) or _is_self(principal, target_id)


def requires_current_password(principal: Principal, target_id: uuid.UUID) -> bool:
    """Changing one's own password needs the current one, admins included (a
    stolen admin token must not silently take over the admin's account);
    admins setting another user's password do not need it."""
    return _is_self(principal, target_id) or not _is_admin(principal)


def can_revoke_sessions(principal: Principal, target_id: uuid.UUID) -> bool:
    """RevokeAllSessions: the user itself and admins."""
    return _is_admin(principal) or _is_self(principal, target_id)


def can_introspect(principal: Principal) -> bool:
    """IntrospectToken: admins and services."""
    return _is_reader(principal)


def can_issue_codes(principal: Principal) -> bool:
    """CreateEmailVerificationCode / CreatePasswordResetCode: admins and
    services (they deliver the code; usersvc sends no mail)."""
    return _is_reader(principal)


def can_verify_email(principal: Principal, target_id: uuid.UUID) -> bool:
    """VerifyEmail: the user itself, admins, services."""
    return _is_reader(principal) or _is_self(principal, target_id)


def can_batch_write(principal: Principal) -> bool:
    """BatchUpdateUsers / BatchDeleteUsers: admins."""
    return _is_admin(principal)


def can_read_events(principal: Principal) -> bool:
    """ListEvents, WatchEvents (the audit trail): admins and services."""
    return _is_reader(principal)


def claims_privilege(principal: Principal) -> bool:
    """Whether a user's access token claims any role beyond "user": those
    claims are checked against the stored roles on every call (see
    usersvc.services.auth.AuthService.authenticate), since a token outlives
    a demotion by up to its lifetime."""
    return principal.user_id() is not None and bool(principal.roles - _SELF_GRANTABLE)


def holds_claimed_roles(principal: Principal, stored_roles: Collection[str]) -> bool:
    """Whether the roles the token claims are all among ``stored_roles``
    (the user's roles now)."""
    return principal.roles <= frozenset(stored_roles)


def ensure(allowed: bool, action: str) -> None:
    """Raises PermissionDenied naming ``action`` unless ``allowed``."""
    if not allowed:
        raise PermissionDenied(f"the caller may not {action}")
