//! The HTTP server: routing, request ids and tracing spans, graceful shutdown. Protocol
//! handlers live beside it (`scim`); the protocol rules themselves live in `crate::scim`.

pub mod auth;
mod error;
mod scim;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Config;
use crate::store::{Store, StoreError};
use auth::{AuthSetupError, TokenRegistry};
pub use error::ScimFailure;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// What every handler can reach.
pub(crate) struct AppState {
    pub store: Store,
    pub tokens: TokenRegistry,
    pub config: Config,
    /// External base URL without a trailing slash.
    pub base_url: String,
}

/// Run the daemon on `listener` until `shutdown` is cancelled, then drain in-flight
/// requests and flush the store.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let tokens = TokenRegistry::from_config(&config.tenants, |v| std::env::var(v).ok())?;
    run_with_tokens(config, tokens, listener, shutdown).await
}

/// As [`run`], with tokens already resolved (tests pass them without touching the
/// process environment).
pub async fn run_with_tokens(
    config: Config,
    tokens: TokenRegistry,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let data_dir = config.server.data_dir.clone();
    std::fs::create_dir_all(&data_dir)?;
    let store = tokio::task::spawn_blocking(move || Store::open(&data_dir))
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))??;
    let local: SocketAddr = listener.local_addr()?;
    let base_url = config.public_url(local);
    let state = Arc::new(AppState {
        store: store.clone(),
        tokens,
        config,
        base_url,
    });
    let app = router(state.clone());
    tracing::info!(addr = %local, tenants = state.tokens.tenants().count(), "rosterd is listening.");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    tracing::info!("Draining finished; flushing the store.");
    let closed = tokio::task::spawn_blocking(move || store.close())
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?;
    served?;
    closed?;
    tracing::info!("rosterd stopped cleanly.");
    Ok(())
}

fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.server.max_body_bytes;
    Router::new()
        .merge(scim::routes())
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", axum::routing::get(|| async { "ready" }))
        .fallback(scim::not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(request_span))
        .with_state(state)
}

/// Give every request an id (the client's `X-Request-Id` if sane, else a fresh one), run
/// it inside a span carrying that id and the tenant, and echo the id back.
async fn request_span(req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.is_ascii())
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let path = req.uri().path();
    let tenant = path
        .strip_prefix("/scim/v2/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("")
        .to_owned();
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        tenant = %tenant,
        method = %req.method(),
        path = %path,
    );
    let started = std::time::Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(
            status = resp.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "Request finished."
        )
    });
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}
