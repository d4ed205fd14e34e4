"""What must hold in the database whatever callers sent: checked with SQL
after every fuzzing and injection run. Each check is a query counting the
rows that break a rule; a non-zero count is a problem. The queries run as
written (exec_driver_sql): their regular expressions hold colons that a
SQLAlchemy text() would take for bind parameters."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.domain.models import KNOWN_ROLES

_KNOWN_ROLES = "ARRAY[" + ", ".join(f"'{role}'" for role in sorted(KNOWN_ROLES)) + "]::text[]"

CHECKS: dict[str, str] = {
    "the users table exists": "SELECT CASE WHEN to_regclass('users') IS NULL THEN 1 ELSE 0 END",
    "emails are stored lower-case": "SELECT count(*) FROM users WHERE email <> lower(email)",
    "emails are unique ignoring case": (
        "SELECT count(*) - count(DISTINCT lower(email)) FROM users"
    ),
    "emails look like local@domain.tld": (
        "SELECT count(*) FROM users "
        "WHERE email !~ '^[^@[:space:]]+@[^@[:space:]]+\\.[^@[:space:]]+$'"
    ),
    "every user holds the role user": "SELECT count(*) FROM users WHERE NOT 'user' = ANY(roles)",
    "roles are known ones": f"SELECT count(*) FROM users WHERE NOT roles <@ {_KNOWN_ROLES}",
    "roles are not repeated": (
        "SELECT count(*) FROM users WHERE cardinality(roles) <> "
        "(SELECT count(DISTINCT r) FROM unnest(roles) AS r)"
    ),
    "versions start at 1": "SELECT count(*) FROM users WHERE version < 1",
    "updates never precede creation": "SELECT count(*) FROM users WHERE update_time < create_time",
    "deletions never precede creation": (
        "SELECT count(*) FROM users WHERE delete_time IS NOT NULL AND delete_time < create_time"
    ),
    "display names are short and printable": (
        "SELECT count(*) FROM users "
        "WHERE char_length(display_name) > 200 OR display_name ~ '[[:cntrl:]]'"
    ),
    "password hashes are bcrypt hashes": (
        "SELECT count(*) FROM users WHERE password_hash !~ '^\\$2[aby]\\$[0-9]{2}\\$.{53}$'"
    ),
    "labels are at most 64 string values": (
        "SELECT count(*) FROM users WHERE jsonb_typeof(labels) <> 'object' "
        "OR (SELECT count(*) FROM jsonb_object_keys(labels)) > 64 "
        "OR EXISTS (SELECT 1 FROM jsonb_each(labels) AS e WHERE jsonb_typeof(e.value) <> 'string')"
    ),
    "no session of a missing user": (
        "SELECT count(*) FROM sessions AS s LEFT JOIN users AS u ON u.id = s.user_id "
        "WHERE u.id IS NULL"
    ),
    "no live session of a deleted or disabled user": (
        "SELECT count(*) FROM sessions AS s JOIN users AS u ON u.id = s.user_id "
        "WHERE s.revoke_time IS NULL AND s.expire_time > now() "
        "AND (u.delete_time IS NOT NULL OR u.disable_time IS NOT NULL)"
    ),
    "every revoked session is in the revocation log": (
        "SELECT count(*) FROM sessions AS s "
        # Log rows may go once no access token of the session can be valid.
        "WHERE s.revoke_time > now() - interval '5 minutes' "
        "AND NOT EXISTS (SELECT 1 FROM session_revocations AS v WHERE v.session_id = s.id)"
    ),
    "a session's refresh chain has a valid token and a key": (
        "SELECT count(*) FROM sessions WHERE refresh_generation > 0 "
        "AND (refresh_token_hash IS NULL OR refresh_tag_key IS NULL)"
    ),
}


async def consistency_problems(engine: AsyncEngine) -> list[str]:
    """The rules above that some rows break, with the number of such rows."""
    problems = []
    async with engine.connect() as connection:
        for rule, query in CHECKS.items():
            broken = (await connection.exec_driver_sql(query)).scalar_one()
            if broken:
                problems.append(f"{rule}: {broken} row(s) break it")
    return problems
