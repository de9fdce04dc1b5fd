//! The operator's own HTTP endpoints: liveness, readiness and (later) metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::{Router, extract::State, http::StatusCode, routing::get};
use sqlx::PgPool;
use tokio::net::TcpListener;

/// What the endpoints look at.
#[derive(Clone)]
pub struct HttpState {
    pub pool: PgPool,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(state))
}

/// Liveness: the process is serving requests.
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: Postgres answers. Never depends on leadership.
async fn readyz(State(state): State<Arc<HttpState>>) -> (StatusCode, &'static str) {
    match sqlx::query("SELECT 1").execute(&state.pool).await {
        Ok(_) => (StatusCode::OK, "ok"),
        Err(error) => {
            tracing::warn!(%error, "readiness check: Postgres unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, "postgres unreachable")
        }
    }
}

/// Binds the listener; bind errors surface before anything else starts.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
