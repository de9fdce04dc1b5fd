//! The operator's own HTTP endpoints: liveness, readiness and Prometheus metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Router, extract::State, routing::get};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::telemetry::metrics::SharedMetrics;

/// Longest a readiness probe waits for Postgres.
const READY_DB_TIMEOUT: Duration = Duration::from_secs(2);

/// What the endpoints look at.
pub struct HttpState {
    pub pool: PgPool,
    pub metrics: SharedMetrics,
    /// Set once the Kubernetes watch cache has synced (always true when not watching).
    pub watch_synced: Arc<AtomicBool>,
    /// The readiness probe's own connection, opened on first use and again after an error.
    /// Probing through the shared pool would make a replica whose workers hold every pooled
    /// connection look unready, though Postgres is fine.
    probe: Mutex<Option<PgConnection>>,
}

impl HttpState {
    pub fn new(pool: PgPool, metrics: SharedMetrics, watch_synced: Arc<AtomicBool>) -> Self {
        Self {
            pool,
            metrics,
            watch_synced,
            probe: Mutex::new(None),
        }
    }

    /// `SELECT 1` on the probe connection, connecting first when there is none.
    async fn ping_postgres(&self) -> Result<(), sqlx::Error> {
        let mut probe = self.probe.lock().await;
        if probe.is_none() {
            let options = self.pool.connect_options();
            *probe = Some(PgConnection::connect_with(&options).await?);
        }
        let Some(connection) = probe.as_mut() else {
            return Err(sqlx::Error::PoolClosed);
        };
        let result = sqlx::query("SELECT 1").execute(&mut *connection).await;
        if result.is_err() {
            // A broken connection is replaced at the next probe.
            *probe = None;
        }
        result.map(|_| ())
    }
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Arc::new(state))
}

/// Liveness: the process is serving requests.
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: Postgres answers and the watch cache is synced. Never depends on leadership:
/// every replica runs workers.
async fn readyz(State(state): State<Arc<HttpState>>) -> (StatusCode, &'static str) {
    if !state.watch_synced.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "watch cache not synced");
    }
    match tokio::time::timeout(READY_DB_TIMEOUT, state.ping_postgres()).await {
        Ok(Ok(())) => (StatusCode::OK, "ok"),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness check: Postgres unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, "postgres unreachable")
        }
        Err(_) => {
            // The abandoned query may have left the connection mid-protocol.
            *state.probe.lock().await = None;
            (StatusCode::SERVICE_UNAVAILABLE, "postgres timed out")
        }
    }
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    match state.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "cannot encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Binds the listener; bind errors surface before anything else starts.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
