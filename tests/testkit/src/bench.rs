//! What the benchmarks share: the Postgres server they measure against, announced with the
//! settings their figures depend on. The settings are read from the server itself, so a
//! figure measured on a server configured differently from the README's says so.

use anyhow::Context;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::pg::PgServer;

/// The settings that move the figures: what a commit costs (fsync, synchronous_commit,
/// full_page_writes, wal_level), what the server can cache and serve (shared_buffers,
/// work_mem, max_connections), and work that can land inside a measurement (checkpoints,
/// autovacuum, JIT compilation).
pub const SETTINGS: &[&str] = &[
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "shared_buffers",
    "work_mem",
    "max_connections",
    "max_wal_size",
    "checkpoint_timeout",
    "autovacuum",
    "jit",
];

/// The server a benchmark measures against: the one of `DATABASE_URL`, else a private
/// throwaway one with the test setup's settings (stopped on drop).
pub struct BenchPostgres {
    admin_url: String,
    origin: String,
    _owned: Option<PgServer>,
}

impl BenchPostgres {
    /// Picks the server and prints which one it is and its settings, on standard output
    /// with the figures they qualify.
    pub async fn start() -> anyhow::Result<Self> {
        let bench = match std::env::var("DATABASE_URL") {
            Ok(url) => Self {
                origin: format!("DATABASE_URL, {}", host_and_port(&url)),
                admin_url: url,
                _owned: None,
            },
            Err(_) => {
                let server = PgServer::start()?;
                Self {
                    origin: format!(
                        "private server started by the benchmark, {}",
                        host_and_port(&server.url())
                    ),
                    admin_url: server.url(),
                    _owned: Some(server),
                }
            }
        };
        println!("{}", bench.describe().await?);
        Ok(bench)
    }

    /// A URL of the server's maintenance database, where benchmarks create their own.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// One line: where the server comes from, then `name=value` for each of [`SETTINGS`].
    pub async fn describe(&self) -> anyhow::Result<String> {
        let settings = server_settings(&self.admin_url).await?;
        let listed: Vec<String> = settings
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        Ok(format!("Postgres ({}): {}", self.origin, listed.join(", ")))
    }
}

/// [`SETTINGS`] as the server reports them (`current_setting`, so with units), in order;
/// a setting this server version does not have reads `(absent)`.
pub async fn server_settings(url: &str) -> anyhow::Result<Vec<(String, String)>> {
    let options: PgConnectOptions = url.parse().context("DATABASE_URL is not a Postgres URL")?;
    let mut conn = options
        .connect()
        .await
        .context("cannot connect to the benchmark's Postgres server")?;
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT name, current_setting(name, true)
         FROM unnest($1::text[]) WITH ORDINALITY AS s(name, n)
         ORDER BY n",
    )
    .bind(SETTINGS)
    .fetch_all(&mut conn)
    .await
    .context("reading the server's settings")?;
    conn.close().await?;
    Ok(rows
        .into_iter()
        .map(|(name, value)| (name, value.unwrap_or_else(|| "(absent)".into())))
        .collect())
}

/// `host:port` of a Postgres URL: where the figures were measured, without credentials.
fn host_and_port(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => format!(
            "{}:{}",
            parsed.host_str().unwrap_or("local socket"),
            parsed.port().unwrap_or(5432)
        ),
        Err(_) => "unparsable URL".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_leaves_credentials_out() {
        assert_eq!(
            host_and_port("postgres://bench:s3cret@db.example:6543/postgres"),
            "db.example:6543"
        );
        assert_eq!(
            host_and_port("postgres://db.example/postgres"),
            "db.example:5432"
        );
    }
}
