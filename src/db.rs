//! Postgres connection, schema migrations and notifications.

mod listen;

pub use listen::{Heard, disable_listening, listen, listening};

use std::sync::LazyLock;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// The schema, embedded in the binary so an operator image needs no migration files.
///
/// Migrations applied by a newer release that this one does not know are accepted, so a
/// rollback (`helm rollback` to the previous image) starts instead of crash-looping. That is
/// safe because migrations follow expand/contract: a release only adds (tables, nullable or
/// defaulted columns, indexes); what an older release still reads is dropped only in a later
/// release than the one that stopped reading it.
///
/// Its own session-level advisory lock is off: [`migrate`] serialises runs with a lock of the
/// transaction the whole run happens in instead.
pub static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator.set_locking(false);
    migrator
});

/// Advisory lock class of the migration run (`"mlpm"`); the other half of the key is 0.
const MIGRATION_LOCK_CLASS: i32 = 0x6d6c_706d;

/// A failure to reach or prepare the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid Postgres URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    #[error("cannot connect to Postgres: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("applying migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot take the migration lock: {0}")]
    Lock(#[source] sqlx::Error),
    #[error("committing the migrations failed: {0}")]
    Commit(#[source] sqlx::Error),
}

/// Pool settings; the defaults suit one operator replica.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub application_name: String,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(10),
            application_name: "mailpoll".into(),
        }
    }
}

/// Opens a pool. Connections send no session options, so a pooler in transaction mode
/// (PgBouncer, which refuses the `options` startup parameter) can stand in between: the
/// timeouts sessions need (an idle-in-transaction timeout, so one stuck transaction cannot
/// pin the vacuum horizon of the hot queue table, and a lock timeout) are settings of the
/// database, made by a migration (see README, Postgres).
pub async fn connect(url: &str, config: &PoolConfig) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url.parse().map_err(DbError::InvalidUrl)?;
    // extra_float_digits is not a parameter PgBouncer passes on, and Postgres 12 and later
    // send floats exactly without it.
    let options = options
        .application_name(&config.application_name)
        .extra_float_digits(None);
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        // A ping before every checkout doubles the round trips of the task queue's hot path.
        // A connection that died since its last use fails its next statement instead, and
        // every caller retries database errors anyway.
        .test_before_acquire(false)
        .acquire_timeout(config.acquire_timeout)
        .connect_with(options)
        .await
        .map_err(DbError::Connect)
}

/// Applies pending migrations, all in one transaction that first takes an advisory lock of
/// that transaction, so replicas starting together apply each migration exactly once.
///
/// Not sqlx's own session-level lock: behind a pooler in transaction mode the lock, taken by one
/// statement, stays with whichever server connection ran it, and the unlock may run on another.
/// That server then holds it for good (every other replica waits on it) and a client handed
/// that same server later takes it again at once (locks are re-entrant), so two runs overlap.
/// A lock of the transaction lives exactly as long as the run, on the one server the pooler
/// keeps for it. Each migration still runs in its own savepoint; all of them commit together.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    let mut tx = pool.begin().await.map_err(DbError::Connect)?;
    // Waiting for another replica's run is not a lock to give up on after the database's
    // lock_timeout; the migrations themselves keep that timeout.
    sqlx::query("SET LOCAL lock_timeout = 0")
        .execute(&mut *tx)
        .await
        .map_err(DbError::Lock)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
        .bind(MIGRATION_LOCK_CLASS)
        .execute(&mut *tx)
        .await
        .map_err(DbError::Lock)?;
    sqlx::query("SET LOCAL lock_timeout = DEFAULT")
        .execute(&mut *tx)
        .await
        .map_err(DbError::Lock)?;
    // `Migrator::run` wants an `Acquire`, whose future is not `Send` for a borrowed transaction.
    MIGRATOR.run_direct(None, &mut *tx, false).await?;
    tx.commit().await.map_err(DbError::Commit)?;
    Ok(())
}

/// The database's clock: times compared with stored times come from it, not from this host.
pub async fn now(pool: &PgPool) -> Result<chrono::DateTime<chrono::Utc>, sqlx::Error> {
    sqlx::query_scalar("SELECT now()").fetch_one(pool).await
}

/// Sends a Postgres notification on `channel`.
pub async fn notify(pool: &PgPool, channel: &str, payload: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(pool)
        .await?;
    Ok(())
}
