"""Repositories on PostgreSQL, one module per aggregate: ``users`` (with
``listing`` and ``bulk_import``), ``sessions`` (sessions and refresh tokens)
and ``idempotency``.

They run inside the unit of work's session and transaction
(usersvc.adapters.unit_of_work): statements execute at once, nothing is ever
committed here. They return domain dataclasses, never rows, and raise only
domain errors, translated in one place (usersvc.adapters.database_errors).

Inserts use ``ON CONFLICT DO NOTHING`` on the unique index instead of catching
a unique violation: a clash then costs no savepoint and leaves the transaction
usable, and a concurrent insert of the same key waits for the other
transaction and reports the clash only if that one commits.
"""
