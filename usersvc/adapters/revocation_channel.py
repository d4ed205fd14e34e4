"""The PostgreSQL NOTIFY channel that announces revoked sessions.

The writer (SqlAlchemySessionRepository.revoke) sends, in the revoking
transaction, ``pg_notify(REVOCATION_CHANNEL, payload)`` where the payload is
comma-separated session UUIDs in canonical text form; NOTIFY is transactional,
so replicas hear of a revocation exactly when it commits. Payloads stay under
PostgreSQL's 8000-byte limit: one revocation of many sessions is split over
several notifications. Listeners (usersvc.adapters.revocations) parse them
with ``parse_payload``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence

REVOCATION_CHANNEL = "usersvc_session_revoked"

# 7,000 bytes of payload at most (PostgreSQL refuses 8,000 and more): a UUID
# and its comma take 37 bytes.
MAX_PAYLOAD_BYTES = 7000
IDS_PER_NOTIFICATION = MAX_PAYLOAD_BYTES // 37


def payloads(session_ids: Sequence[uuid.UUID]) -> Iterator[str]:
    """The payloads announcing ``session_ids``, each under MAX_PAYLOAD_BYTES;
    nothing for an empty sequence. Raises nothing."""
    for start in range(0, len(session_ids), IDS_PER_NOTIFICATION):
        yield ",".join(str(i) for i in session_ids[start : start + IDS_PER_NOTIFICATION])


def parse_payload(payload: str) -> list[str]:
    """The session ids of a payload, in canonical text form; parts that are
    not UUIDs are skipped (a notification is a hint, the table is the truth).
    Raises nothing."""
    ids: list[str] = []
    for part in payload.split(","):
        try:
            ids.append(str(uuid.UUID(part.strip())))
        except ValueError:
            continue
    return ids
