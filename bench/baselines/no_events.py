"""usersvc with the events of UpdateUser and CreateUser left out: the other
half of the events scenario's served pairs (bench/event_served.py), which
measure what writing the event costs those RPCs, side by side.

    python -m bench.baselines.no_events serve

The same ``usersvc serve``, settings and code, except that the two RPCs hand
their writes no event draft, so the statements they send carry no events
CTE: everything else (authentication, validation, the write lane, the unit
of work, the events feed) is the service's own. For measuring only: a
server that drops events breaks the audit trail's promise.
"""

from __future__ import annotations

from usersvc.cli import main
from usersvc.services import users

# The drafts UpdateUser and CreateUser write with their change
# (usersvc/services/users.py); no drafts, no events CTE.
users._UPDATED = ()
users._CREATED = ()

if __name__ == "__main__":
    raise SystemExit(main())
