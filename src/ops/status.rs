//! `/healthz`, `/readyz` and `/status`: what an operator (or a load balancer, or systemd's
//! watchdog) asks a running daemon. No authentication, and nothing in the answers that
//! identifies a person: counts, cursors and error messages only.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::dispatch::ConnectorStatus;
use crate::scim::ResourceKind;
use crate::server::AppState;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    if let Some(e) = store_error(&st) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store failed at {}: {}; {}", e.at, e.error, e.hint),
        )
            .into_response();
    }
    if st.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    "ready".into_response()
}

#[derive(serde::Serialize)]
struct StoreErrorDoc {
    error: String,
    at: String,
    hint: &'static str,
}

fn store_error(st: &AppState) -> Option<StoreErrorDoc> {
    st.store.failure().map(|f| StoreErrorDoc {
        error: f.error.to_string(),
        at: f.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        hint: "writes are refused; restart rosterd once the cause (e.g. disk space) is fixed (it exits by itself once the data directory takes writes again)",
    })
}

async fn status(State(st): State<Arc<AppState>>) -> Response {
    let failed = st.clone();
    match tokio::task::spawn_blocking(move || document(&st)).await {
        Ok(Ok(v)) => Json(v).into_response(),
        // The counts come from the store that failed; what failed matters more.
        Ok(Err(_)) if failed.store.failure().is_some() => Json(json!({
            "version": crate::VERSION,
            "started_at": failed.started_at,
            "uptime_seconds": failed.started.elapsed().as_secs(),
            "draining": failed.shutdown.is_cancelled(),
            "store": { "error": store_error(&failed) },
        }))
        .into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "Cannot read the store for /status.");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": "internal", "message": e.to_string()})),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "internal", "message": e.to_string()})),
        )
            .into_response(),
    }
}

/// The job holding the tenant's job slot, if any. The jobs are listed only when the slot
/// is held, so an idle tenant's history is not read on every status call.
fn running_job(st: &AppState, tenant: &str) -> Result<Value, crate::store::StoreError> {
    Ok(st.store.running_job(tenant)?.map_or(
        Value::Null,
        |j| json!({"job_id": j.job_id, "kind": j.kind, "started_at": j.started_at}),
    ))
}

/// A tenant's roster size, from the counters the store keeps (no scan): for `/status`
/// and the metrics.
pub(crate) struct RosterCounts {
    pub users: u64,
    pub active: u64,
    pub groups: u64,
}

impl RosterCounts {
    pub(crate) fn of(st: &AppState, tenant: &str) -> Result<Self, crate::store::StoreError> {
        let users = st.store.count(tenant, ResourceKind::User)?;
        Ok(RosterCounts {
            users,
            active: users.saturating_sub(st.store.count_inactive(tenant)?),
            groups: st.store.count(tenant, ResourceKind::Group)?,
        })
    }
}

/// Where backups go and what the last ones did.
fn backup(st: &AppState) -> Value {
    let mut doc = serde_json::to_value(st.backups.state()).unwrap_or_default();
    doc["dir"] = json!(st.backups.plan.dir);
    doc["keep"] = json!(st.backups.plan.keep);
    doc
}

/// The `/status` document.
pub fn document(st: &AppState) -> Result<Value, crate::store::StoreError> {
    let on_disk = st.config.on_disk_with_tokens(&st.tokens.envs_in_force());
    let mut tenants = serde_json::Map::new();
    for t in &st.config.tenants {
        let counts = RosterCounts::of(st, &t.id)?;
        let bundle = st
            .roster
            .tenants
            .get(&t.id)
            .and_then(|r| r.policy().map(|_| r.bundle_state()));
        tenants.insert(
            t.id.clone(),
            json!({
                "users": counts.users,
                "active_users": counts.active,
                "groups": counts.groups,
                "review_queue": st.store.review_queue_len(&t.id)?,
                "last_seq": *st.store.watch_durable(&t.id).borrow(),
                "bundle": bundle,
                // Why an override answers 409 sync_in_progress, and which job to watch.
                "running_job": running_job(st, &t.id)?,
            }),
        );
    }
    // Stored, not declared: kept as it was, and served to no one.
    let mut undeclared = Vec::new();
    for t in st.undeclared_tenants() {
        let users = st.store.count(&t, ResourceKind::User)?;
        let groups = st.store.count(&t, ResourceKind::Group)?;
        undeclared.push(json!({"tenant": t, "users": users, "groups": groups}));
    }
    Ok(json!({
        "version": crate::VERSION,
        "started_at": st.started_at,
        "uptime_seconds": st.started.elapsed().as_secs(),
        // The run before this one, when it was killed or crashed rather than stopped.
        "unclean_stop": st.unclean_stop,
        "draining": st.shutdown.is_cancelled(),
        "store": { "size_bytes": st.store.size_on_disk()?, "error": store_error(st) },
        "tenants": tenants,
        "undeclared_tenants": undeclared,
        "connectors": st
            .dispatch
            .status(None)
            .into_iter()
            .map(ConnectorStatus::without_answer)
            .collect::<Vec<_>>(),
        "connector_errors": st.dispatch.load_errors(),
        "unloaded_connectors": st.dispatch.unloaded_status(),
        // Retired, so neither loaded nor waited for, yet their dead letters stay in the
        // store until discarded: listed here, or nothing showed them at all.
        "retired_connectors": st.dispatch.retired_status(),
        "reloads": st.reloads.load(Ordering::Relaxed),
        // By part ("scim_tokens", "api_keys"): what a reload could not apply, so the old
        // tokens or keys are still in force.
        "reload_errors": st.reload_errors.get(),
        // Read at each call, so an edit not yet followed by a reload shows too: one that
        // would not load (a restart would fail), or one that waits for a restart (a
        // reload does not apply tenants, group rules, server or schedules).
        "config_file_error": on_disk.error.map(|e| e.to_string()),
        // What a start would refuse in the file as the last reload found it, beyond what
        // `reload_errors` and each tenant's `bundle.reload_error` say: one line each.
        "restart_refusals": st.restart_refusals.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        "config_changed_since_start": on_disk.changed,
        // Which keys wait: a reload applies none of them (a tenant's `bundle` path and
        // `allow_overrides` included), and an operator took such an edit as live.
        "config_keys_waiting_for_restart": on_disk.waiting,
        "schedules": crate::schedule::status(st),
        "backup": backup(st),
    }))
}
