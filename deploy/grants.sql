-- usersvc: least-privilege database roles.
--
-- Two roles:
--   owner_role  owns the schema and every table; runs the migrations
--               (USERSVC_MIGRATION_DATABASE_URL, `usersvc migrate`).
--   app_role    what the service runs as (USERSVC_DATABASE_URL): it may read
--               and write the rows of usersvc's tables and nothing else. No
--               CREATE on the schema or the database, no ownership, no
--               TRUNCATE, REFERENCES or TRIGGER, no temporary tables.
--               LISTEN/NOTIFY (the revocation feed) needs no grant.
--               The events table (audit trail and outbox) needs exactly the
--               defaults below: INSERT (every change), SELECT (EventService,
--               the relay), UPDATE (the sequencer numbers rows),
--               DELETE (retention); event_relay_mark (the relay's
--               progress) and event_sequencer (the sequencer's floor) need
--               SELECT, INSERT and UPDATE, also defaults. Advisory locks,
--               LISTEN/NOTIFY (sequencer, its wake-up, relay, WatchEvents)
--               and the migrations' functions (EXECUTE is PUBLIC's) need
--               no grant.
--
-- Run it with psql as a superuser, connected to usersvc's database, before
-- the first migration; it is idempotent, so run it again whenever in doubt:
--
--   psql "postgresql://postgres@db.internal/usersvc" -v ON_ERROR_STOP=1 \
--        -v owner_role=usersvc_owner -v app_role=usersvc_app \
--        -f deploy/grants.sql
--
-- Both variables are optional (those are the defaults); so is
-- statement_timeout (default 5s, see below). Passwords are not set here:
-- `\password usersvc_owner` and `\password usersvc_app` in psql keep them out
-- of shell history and the process list.
--
-- Tables the migrations create later are covered by the default privileges
-- below, so new migrations need no new grants. One exception: alembic's own
-- alembic_version table, created by the first migration, is read-only for
-- app_role only once this script has run after that migration.

\set ON_ERROR_STOP on
\if :{?owner_role}
\else
  \set owner_role usersvc_owner
\endif
\if :{?app_role}
\else
  \set app_role usersvc_app
\endif
\if :{?statement_timeout}
\else
  \set statement_timeout 5s
\endif

-- Roles: created when missing, and in any case stripped of every power a
-- role attribute can give.
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'owner_role') AS create_owner,
       NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app_role') AS create_app
\gset
\if :create_owner
  CREATE ROLE :"owner_role" LOGIN;
\endif
\if :create_app
  CREATE ROLE :"app_role" LOGIN;
\endif
ALTER ROLE :"owner_role" NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
ALTER ROLE :"app_role" NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;

-- The database: only these roles (and superusers) may connect; nobody may
-- create schemas or temporary tables in it. PUBLIC loses its default
-- CONNECT and TEMPORARY here, so grant CONNECT to any other role that needs
-- it (monitoring, backups).
REVOKE ALL ON DATABASE :"DBNAME" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"DBNAME" TO :"owner_role", :"app_role";

-- The schema: owned by owner_role, usable (not writable) by app_role.
ALTER SCHEMA public OWNER TO :"owner_role";
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"app_role";

-- Tables and sequences that exist already (when run after a migration).
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"app_role";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO :"app_role";
SELECT to_regclass('public.alembic_version') IS NOT NULL AS migrated
\gset
\if :migrated
  REVOKE INSERT, UPDATE, DELETE ON public.alembic_version FROM :"app_role";
\endif

-- Tables and sequences the migrations (run as owner_role) create later.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA public
  GRANT USAGE, SELECT ON SEQUENCES TO :"app_role";

-- A server-side statement timeout that holds however the service connects:
-- usersvc sends USERSVC_DB_STATEMENT_TIMEOUT_MS when it connects (which
-- overrides this), except behind a transaction pool such as PgBouncer
-- (USERSVC_DB_TRANSACTION_POOLING=true), which refuses that startup
-- parameter; this role default is what bounds its statements there.
ALTER ROLE :"app_role" IN DATABASE :"DBNAME" SET statement_timeout = :'statement_timeout';
