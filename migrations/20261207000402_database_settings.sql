-- Timeouts every mailpoll session needs, as settings of the database instead of options each
-- connection sends at start-up: a pooler in transaction mode (PgBouncer) refuses the `options`
-- startup parameter, and a session setting would outlive the transaction on a pooled server.
--   idle_in_transaction_session_timeout: one stuck transaction cannot pin the vacuum horizon
--     of the hot queue table;
--   lock_timeout: a statement waiting on a lock fails (and is retried) instead of waiting for
--     ever.
-- Only the database's owner (or a superuser) may set them. Another role gets a notice and the
-- migration goes on: README (Postgres) shows the ALTER ROLE that does the same.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET idle_in_transaction_session_timeout = %L',
                   current_database(), '60s');
    EXECUTE format('ALTER DATABASE %I SET lock_timeout = %L', current_database(), '30s');
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'mailpoll: not the owner of database %, so its session timeouts are not set; run ALTER ROLE <mailpoll role> SET idle_in_transaction_session_timeout = ''60s''; ALTER ROLE <mailpoll role> SET lock_timeout = ''30s''',
        current_database();
END
$$;
