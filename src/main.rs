//! The `mailpoll` command line.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use mailpoll::telemetry::{self, LogFormat};
use mailpoll::{db, operator, resource};

/// mailpoll: every email that arrives in a Microsoft 365 mailbox, recorded once and delivered
/// once, as a Kubernetes operator with Postgres as its only state.
#[derive(Debug, Parser)]
#[command(name = "mailpoll", version, propagate_version = true)]
struct Cli {
    /// Log line format.
    #[arg(long, env = "MAILPOLL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter in RUST_LOG syntax, e.g. `info,mailpoll=debug`.
    #[arg(long, env = "MAILPOLL_LOG", default_value = "info", global = true)]
    log_filter: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the operator: apply migrations, then serve until SIGTERM.
    Operator(OperatorArgs),
    /// Print the MailboxPoll CustomResourceDefinition as YAML.
    Crd,
    /// Apply the database migrations and exit (safe to run from several places at once).
    Migrate(DatabaseArgs),
}

#[derive(Debug, Args)]
struct DatabaseArgs {
    /// Postgres URL, e.g. postgres://mailpoll:secret@db:5432/mailpoll?sslmode=require
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Maximum connections in the pool.
    #[arg(long, env = "MAILPOLL_DB_MAX_CONNECTIONS", default_value_t = 16)]
    db_max_connections: u32,
}

#[derive(Debug, Args)]
struct OperatorArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// Address of the /healthz, /readyz and /metrics endpoints.
    #[arg(long, env = "MAILPOLL_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
}

impl DatabaseArgs {
    fn pool_config(&self) -> db::PoolConfig {
        db::PoolConfig {
            max_connections: self.db_max_connections,
            ..db::PoolConfig::default()
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = telemetry::init(cli.log_format, &cli.log_filter) {
        eprintln!("error: {error}");
        return ExitCode::from(2);
    }
    mailpoll::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "mailpoll failed");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Crd => {
            print!("{}", resource::crd_yaml()?);
            Ok(())
        }
        Command::Migrate(args) => {
            let pool = db::connect(&args.database_url, &args.pool_config()).await?;
            db::migrate(&pool).await?;
            tracing::info!("migrations applied");
            pool.close().await;
            Ok(())
        }
        Command::Operator(args) => {
            let config = operator::OperatorConfig {
                pool: args.database.pool_config(),
                database_url: args.database.database_url,
                http_addr: args.http_addr,
            };
            operator::run(config, operator::shutdown_signal()).await?;
            Ok(())
        }
    }
}
