//! `mailpoll operator`: the long-running process. For now it prepares the database and serves
//! the health endpoints until SIGTERM.

use std::net::SocketAddr;

use crate::{db, http};

/// Settings of one operator process.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    pub database_url: String,
    pub http_addr: SocketAddr,
    pub pool: db::PoolConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Runs until `shutdown` resolves, then stops serving and returns.
pub async fn run(
    config: OperatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), OperatorError> {
    let pool = db::connect(&config.database_url, &config.pool).await?;
    db::migrate(&pool).await?;
    tracing::info!("database schema is up to date");

    let listener = http::bind(config.http_addr)
        .await
        .map_err(|source| OperatorError::Bind {
            addr: config.http_addr,
            source,
        })?;
    let local = listener.local_addr().map_err(OperatorError::Serve)?;
    tracing::info!(addr = %local, "serving /healthz and /readyz");

    let state = http::HttpState {
        pool: pool.clone(),
        metrics: std::sync::Arc::new(crate::telemetry::metrics::Metrics::new()),
        watch_synced: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
    };
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(OperatorError::Serve)?;
    pool.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes' stop signal) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}
