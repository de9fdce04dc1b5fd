//! Real Postgres for tests: a private throwaway server (initdb + pg_ctl), and one fresh
//! database per test on the server named by `DATABASE_URL`, so tests run in parallel.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

/// A Postgres server owned by the test that started it; stopped and deleted on drop.
pub struct PgServer {
    bin_dir: PathBuf,
    data_dir: tempdir::TempDir,
    port: u16,
    run_as: Option<String>,
}

pub mod tempdir {
    use std::path::{Path, PathBuf};

    /// A directory removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(prefix: &str) -> std::io::Result<Self> {
            let path =
                std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&path)?;
            Ok(Self(path))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Directory holding initdb/pg_ctl: on PATH, or Debian's versioned directory.
pub fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("PG_BIN_DIR") {
        return Ok(PathBuf::from(path));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let output = Command::new("sh")
        .args(["-c", "command -v pg_ctl"])
        .output()?;
    let found = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match Path::new(&found).parent() {
        Some(dir) if !found.is_empty() => Ok(dir.to_path_buf()),
        _ => bail!("no Postgres server binaries found: install the `postgresql` package"),
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl PgServer {
    /// initdb into a temporary directory and start the server on a free loopback port.
    /// Postgres refuses to run as root; as root the server runs as the `postgres` user.
    pub fn start() -> anyhow::Result<Self> {
        let bin_dir = postgres_bin_dir()?;
        let data_dir = tempdir::TempDir::new("mailpoll-pg")?;
        let run_as = is_root().then(|| "postgres".to_owned());
        if let Some(user) = &run_as {
            let status = Command::new("chown")
                .arg("-R")
                .arg(user)
                .arg(data_dir.path())
                .status()?;
            if !status.success() {
                bail!("cannot hand {} to user {user}", data_dir.path().display());
            }
        }
        let server = Self {
            bin_dir,
            port: free_port()?,
            data_dir,
            run_as,
        };
        let pgdata = server.pgdata();
        server.run(
            "initdb",
            &[
                "-D",
                &pgdata,
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
        )?;
        server.pg_ctl(&["start", "-w", "-t", "60"])?;
        Ok(server)
    }

    fn pgdata(&self) -> String {
        self.data_dir.path().join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let program_path = self.bin_dir.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(&program_path);
                c
            }
            None => Command::new(&program_path),
        };
        let output = command
            .args(args)
            .current_dir(self.data_dir.path())
            .output()
            .with_context(|| format!("cannot run {}", program_path.display()))?;
        if !output.status.success() {
            bail!(
                "{program} {args:?} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let pgdata = self.pgdata();
        let log = self
            .data_dir
            .path()
            .join("postgres.log")
            .display()
            .to_string();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400 -c shared_buffers=128MB",
            self.port,
            self.data_dir.path().display()
        );
        let mut all = vec!["-D", &pgdata, "-l", &log, "-o", &options];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Restarts the server (fast shutdown: open connections are cut, as in a failover).
    pub fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60"])
    }

    pub fn stop(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"])
    }

    pub fn start_again(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["start", "-w", "-t", "60"])
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The server tests create their databases on: `DATABASE_URL`, which the test command sets.
pub fn admin_url() -> anyhow::Result<String> {
    std::env::var("DATABASE_URL").context(
        "DATABASE_URL is unset: run the test command `scripts/test` (it starts a throwaway \
         Postgres), or point DATABASE_URL at a server where tests may create databases",
    )
}

/// A database of its own for one test, migrated to the current schema.
pub struct TestDatabase {
    pub pool: PgPool,
    pub url: String,
    pub name: String,
}

impl TestDatabase {
    /// A fresh migrated database on the server of `DATABASE_URL`.
    pub async fn create() -> anyhow::Result<Self> {
        let db = Self::create_empty().await?;
        mailpoll::db::migrate(&db.pool)
            .await
            .context("migrations failed")?;
        Ok(db)
    }

    /// A fresh database without the schema, for migration tests.
    pub async fn create_empty() -> anyhow::Result<Self> {
        Self::create_on(&admin_url()?).await
    }

    /// A fresh empty database on the given server.
    pub async fn create_on(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!("mailpoll_test_{}", uuid::Uuid::new_v4().simple());
        let admin: PgConnectOptions = admin_url
            .parse()
            .context("DATABASE_URL is not a Postgres URL")?;
        let mut conn = admin
            .connect()
            .await
            .context("cannot connect to the test Postgres server")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        conn.close().await?;
        let url = with_database(admin_url, &name)?;
        let pool = PgPoolOptions::new()
            .max_connections(32)
            .connect(&url)
            .await
            .with_context(|| format!("cannot connect to database {name}"))?;
        Ok(Self { pool, url, name })
    }
}

/// The same server URL pointing at another database.
pub fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let mut parsed = url::Url::parse(url).context("DATABASE_URL is not a URL")?;
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.to_string())
}
