//! Logging set-up. Secrets never reach a log line: credentials are only ever held in types
//! whose `Debug` output is redacted.

use clap::ValueEnum;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Shape of log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax (`info,mailpoll=debug`).
pub fn init(format: LogFormat, filter: &str) -> Result<(), InitError> {
    let filter = EnvFilter::try_new(filter).map_err(|e| InitError::Filter(e.to_string()))?;
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    result.map_err(|e| InitError::Install(e.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("invalid log filter: {0}")]
    Filter(String),
    #[error("cannot install the log subscriber: {0}")]
    Install(String),
}

pub mod metrics;
