//! A real PgBouncer in front of the test Postgres, for tests of mailpoll behind a connection
//! pooler. `MAILPOLL_PGBOUNCER` names the binary to use (scripts/test builds Debian 13's
//! PgBouncer 1.24 there, the first Debian release with prepared statements in transaction
//! pooling); otherwise the one on `PATH` or Debian's `/usr/sbin/pgbouncer`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::pg::{free_port, tempdir::TempDir};

/// PgBouncer's pooling mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Session,
    Transaction,
}

impl PoolMode {
    fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

/// The version from which PgBouncer keeps protocol-level prepared statements apart per client
/// in transaction pooling (`max_prepared_statements`).
pub const PREPARED_STATEMENTS_SINCE: (u32, u32) = (1, 21);

/// The pgbouncer binary: `MAILPOLL_PGBOUNCER`, else on `PATH`, else where Debian installs it.
pub fn binary() -> Option<PathBuf> {
    if let Some(named) = std::env::var_os("MAILPOLL_PGBOUNCER") {
        let named = PathBuf::from(named);
        return named.is_file().then_some(named);
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("pgbouncer"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        let debian = PathBuf::from("/usr/sbin/pgbouncer");
        debian.is_file().then_some(debian)
    })
}

/// Debian's own binary, `/usr/sbin/pgbouncer`, when installed.
pub fn debian_binary() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/sbin/pgbouncer");
    debian.is_file().then_some(debian)
}

/// The binary's version, as `(major, minor)`, from `pgbouncer --version` ("PgBouncer 1.24.1").
pub fn version(binary: &std::path::Path) -> anyhow::Result<(u32, u32)> {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_version(&text).with_context(|| format!("no version in {text:?}"))
}

fn parse_version(text: &str) -> Option<(u32, u32)> {
    let number = text.lines().next()?.strip_prefix("PgBouncer ")?;
    let mut parts = number.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// A running PgBouncer; stopped when dropped.
pub struct PgBouncer {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl PgBouncer {
    /// Starts PgBouncer on a free loopback port, forwarding every database to the Postgres at
    /// `upstream_port` on 127.0.0.1 and trusting the users it is told of (`users`). It refuses
    /// to run as root; as root it runs as the `postgres` user.
    pub fn start(
        binary: &std::path::Path,
        upstream_port: u16,
        mode: PoolMode,
        users: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = TempDir::new("mailpoll-pgbouncer")?;
        // As a managed pooler is set up for clients with prepared statements (1.21 and later);
        // older versions do not know the setting.
        let prepared = if version(binary)? >= PREPARED_STATEMENTS_SINCE {
            "max_prepared_statements = 200\n"
        } else {
            ""
        };
        let port = free_port()?;
        let auth_file = dir.path().join("users.txt");
        let users_text: String = users
            .iter()
            .map(|user| format!("\"{user}\" \"\"\n"))
            .collect();
        std::fs::write(&auth_file, users_text)?;
        let config = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &config,
            format!(
                "[databases]\n* = host=127.0.0.1 port={upstream_port}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {auth}\npool_mode = {mode}\n\
                 default_pool_size = 20\nmax_client_conn = 500\n\
                 ignore_startup_parameters = extra_float_digits\npidfile = {pid}\n{prepared}",
                auth = auth_file.display(),
                pid = dir.path().join("pgbouncer.pid").display(),
                mode = mode.as_str(),
            ),
        )?;
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
            .unwrap_or(false);
        let mut command = if is_root {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .status()?;
            if !status.success() {
                bail!("cannot hand {} to user postgres", dir.path().display());
            }
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(binary);
            c
        } else {
            Command::new(binary)
        };
        let child = command
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let bouncer = Self { child, port, dir };
        bouncer.wait_listening()?;
        Ok(bouncer)
    }

    fn wait_listening(&self) -> anyhow::Result<()> {
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("pgbouncer did not listen on port {} within 5 s", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL to `database` through PgBouncer as `user`.
    pub fn url(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser does not pass SIGKILL on: stop pgbouncer itself by the pid it wrote.
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("pgbouncer.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        // runuser reaps pgbouncer and ends; killed first, it would leave a zombie behind.
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn versions_are_read_from_the_first_line() {
        assert_eq!(
            parse_version("PgBouncer 1.24.1\nlibevent 2.1.12-stable\n"),
            Some((1, 24))
        );
        assert_eq!(parse_version("PgBouncer 1.18.0\n"), Some((1, 18)));
        assert_eq!(parse_version("pgbouncer: command not found"), None);
    }
}
