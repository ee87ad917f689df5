//! The mirror's side of the Roster API: the change feed for pull consumers, and the
//! connectors with their dead letters for operators.

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::{Value, json};
use std::sync::Arc;

use super::jwt::Scope;
use super::roster::{admit, blocking, parse_limit};
use super::{ApiError, ApiResult, Params};
use crate::dispatch::DispatchError;
use crate::server::AppState;

type St = State<Arc<AppState>>;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/roster/changes", get(list_changes))
        .route("/api/v1/roster/connectors", get(list_connectors))
        .route("/api/v1/roster/connectors/{name}", get(get_connector))
        .route("/api/v1/roster/connectors/{name}/resume", post(resume))
        .route("/api/v1/roster/connectors/{name}/retire", post(retire))
        .route(
            "/api/v1/roster/connectors/{name}/dead-letters",
            get(list_dead_letters),
        )
        .route(
            "/api/v1/roster/connectors/{name}/dead-letters/{id}",
            delete(discard),
        )
        .route(
            "/api/v1/roster/connectors/{name}/dead-letters/{id}/replay",
            post(replay),
        )
        .route(
            "/api/v1/roster/connectors/{name}/dead-letters:replay",
            post(replay_batch),
        )
        .route(
            "/api/v1/roster/connectors/{name}/dead-letters:discard",
            post(discard_batch),
        )
}

impl From<DispatchError> for ApiError {
    fn from(e: DispatchError) -> Self {
        match e {
            DispatchError::Store(s) => ApiError::Internal(s),
            DispatchError::UnknownConnector(_) | DispatchError::NoSuchLetter(_) => {
                ApiError::NotFound(e.to_string())
            }
            DispatchError::NotRunning(..)
            | DispatchError::NotLoaded(..)
            | DispatchError::NotRetirable(..)
            | DispatchError::Refused(..) => ApiError::Conflict(e.to_string()),
            DispatchError::ReplayFailed(_) => ApiError::Upstream(e.to_string()),
            DispatchError::Unmappable(_) => ApiError::Unmappable(e.to_string()),
        }
    }
}

/// A change as the feed shows it: as stored, but its assignment in the one shape every
/// output gives an assignment.
fn change_json(c: &crate::store::ChangeEvent) -> Value {
    let mut v = serde_json::to_value(c).unwrap_or(Value::Null);
    if let (Some(a), Some(obj)) = (&c.assignment, v.as_object_mut()) {
        obj.insert("assignment".into(), super::assignment_state(a));
    }
    v
}

/// `GET /changes?since=SEQ&limit=N`: committed (durable) changes after `since`, oldest
/// first. `next_since` is what to ask for next; `compacted_upto` the last change
/// compaction removed, so a reader whose `since` is below it knows it missed some.
async fn list_changes(State(st): St, headers: HeaderMap, p: Params) -> ApiResult<Response> {
    let (caller, p) = admit(&st, &headers, Scope::Read, p, &["since", "limit"])?;
    let limit = parse_limit(&p)?;
    let since = match p.get("since") {
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| ApiError::BadRequest("since must be a change sequence number".into()))?,
        None => 0,
    };
    let tenant = caller.tenant;
    let durable = *st.store.watch_durable(&tenant).borrow();
    blocking(move || {
        let floor = st.store.changelog_floor(&tenant)?.min(durable);
        let n = (durable.saturating_sub(since) as usize).min(limit);
        let changes = if n == 0 {
            vec![]
        } else {
            st.store.changes(&tenant, since, n)?
        };
        // Past what compaction removed: asked again, the same `since` would find nothing
        // for ever while `last_seq` moved on.
        let next_since = changes.last().map(|c| c.seq).unwrap_or(since.max(floor));
        let changes: Vec<Value> = changes.iter().map(change_json).collect();
        Ok(Json(json!({
            "changes": changes,
            "next_since": next_since,
            "last_seq": durable,
            "compacted_upto": floor,
        }))
        .into_response())
    })
    .await
}

async fn list_connectors(State(st): St, headers: HeaderMap, p: Params) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Read, p, &[])?;
    let tenant = caller.tenant;
    blocking(move || {
        Ok(Json(json!({ "connectors": st.dispatch.status(Some(&tenant)) })).into_response())
    })
    .await
}

async fn get_connector(
    State(st): St,
    headers: HeaderMap,
    Path(name): Path<String>,
    p: Params,
) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Read, p, &[])?;
    let tenant = caller.tenant;
    blocking(move || {
        Ok(Json(
            st.dispatch
                .loaded_connector_status(&tenant, &name, "its status")?,
        )
        .into_response())
    })
    .await
}

/// `GET …/dead-letters?limit=N&after=ID`: a page of the letters, oldest first, and
/// `next_after` for the next page (null on the last).
async fn list_dead_letters(
    State(st): St,
    headers: HeaderMap,
    Path(name): Path<String>,
    p: Params,
) -> ApiResult<Response> {
    let (caller, p) = admit(&st, &headers, Scope::Read, p, &["limit", "after"])?;
    let limit = parse_limit(&p)?;
    let after = p
        .get("after")
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::BadRequest("after must be a dead letter id (next_after)".into())
            })
        })
        .transpose()?;
    let tenant = caller.tenant;
    blocking(move || {
        // One more than asked tells whether this page is the last.
        let (mut letters, total) = st.dispatch.dead_letters(&tenant, &name, after, limit + 1)?;
        let more = letters.len() > limit;
        letters.truncate(limit);
        let next = more.then(|| letters.last().map(|l| l.id)).flatten();
        let letters: Vec<Value> = letters
            .iter()
            .map(|l| {
                let mut v = serde_json::to_value(l).unwrap_or(Value::Null);
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("event".into(), change_json(&l.event));
                }
                v
            })
            .collect();
        Ok(
            Json(json!({ "dead_letters": letters, "next_after": next, "total": total }))
                .into_response(),
        )
    })
    .await
}

fn letter_id(raw: &str) -> ApiResult<u64> {
    raw.parse()
        .map_err(|_| ApiError::BadRequest(format!("dead letter id {raw:?} is not a number")))
}

async fn discard(
    State(st): St,
    headers: HeaderMap,
    Path((name, id)): Path<(String, String)>,
    p: Params,
) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Admin, p, &[])?;
    st.dispatch
        .discard(&caller.tenant, &name, letter_id(&id)?)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn replay(
    State(st): St,
    headers: HeaderMap,
    Path((name, id)): Path<(String, String)>,
    p: Params,
) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Admin, p, &[])?;
    let id = letter_id(&id)?;
    let replayed = st.dispatch.replay(&caller.tenant, &name, id).await?;
    Ok(Json(replayed).into_response())
}

/// The most letters one `dead-letters:replay` or `dead-letters:discard` names.
pub const REPLAY_BATCH_MAX: usize = 1000;

/// How long one `dead-letters:replay` goes on starting letters: the CLI waits a minute
/// for an answer, and a replay may take the connector's request timeout.
const REPLAY_BATCH_BUDGET: std::time::Duration = std::time::Duration::from_secs(20);

/// `POST /connectors/{name}/dead-letters:replay` with `{"ids": [...]}`: replay each, in
/// the order given, as `…/{id}/replay` would, reading the change log once for them all.
/// Each letter's outcome is its own (`status` and the single replay's answer or error);
/// `not_attempted` lists those left for the next call once the time budget ran out.
async fn replay_batch(
    State(st): St,
    headers: HeaderMap,
    Path(name): Path<String>,
    p: Params,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Admin, p, &[])?;
    let ids = batch_ids(&st, &headers, body).await?;
    let (done, not_attempted) = st
        .dispatch
        .replay_batch(&caller.tenant, &name, &ids, REPLAY_BATCH_BUDGET)
        .await?;
    let results: Vec<Value> = done
        .into_iter()
        .map(|(id, r)| match r {
            Ok(replayed) => {
                let mut v = serde_json::to_value(replayed).unwrap_or_else(|_| json!({}));
                v["id"] = json!(id);
                v["status"] = json!(200);
                v
            }
            Err(e) => failed(id, e),
        })
        .collect();
    Ok(Json(json!({"results": results, "not_attempted": not_attempted})).into_response())
}

/// `POST /connectors/{name}/dead-letters:discard` with `{"ids": [...]}`: drop each, as
/// `DELETE …/{id}` would, in one store write. Each letter's outcome is its own.
async fn discard_batch(
    State(st): St,
    headers: HeaderMap,
    Path(name): Path<String>,
    p: Params,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Admin, p, &[])?;
    let ids = batch_ids(&st, &headers, body).await?;
    let done = st
        .dispatch
        .discard_batch(&caller.tenant, &name, &ids)
        .await?;
    let results: Vec<Value> = done
        .into_iter()
        .map(|(id, r)| match r {
            Ok(()) => json!({"id": id, "status": 204}),
            Err(e) => failed(id, e),
        })
        .collect();
    Ok(Json(json!({ "results": results })).into_response())
}

/// The dead letter ids a batch call names: 1 to [`REPLAY_BATCH_MAX`], none twice.
async fn batch_ids(
    st: &AppState,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Vec<u64>> {
    let body = super::roster::read_body(st, headers, body).await?;
    const EXPECTED: &str = "expected {\"ids\": [dead letter ids]}";
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct BatchBody {
        #[serde(default, deserialize_with = "whole_numbers")]
        ids: Vec<u64>,
    }
    let BatchBody { ids } = super::options_body(headers, &body, EXPECTED)?;
    if ids.is_empty() || ids.len() > REPLAY_BATCH_MAX {
        return Err(ApiError::BadRequest(format!(
            "ids must name 1 to {REPLAY_BATCH_MAX} dead letters, not {}; {EXPECTED}",
            ids.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = ids.iter().find(|&&id| !seen.insert(id)) {
        return Err(ApiError::BadRequest(format!(
            "ids names dead letter {twice} twice; {EXPECTED}"
        )));
    }
    Ok(ids)
}

/// Ids as JSON numbers, `1.0` included: OpenAPI 3.1 (JSON Schema 2020-12) counts a number
/// with a zero fraction as an integer, so a client that writes ids as floats is within the
/// served schema.
fn whole_numbers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    use serde::Deserialize;
    Vec::<serde_json::Number>::deserialize(d)?
        .into_iter()
        .map(|n| {
            n.as_u64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(f))
                        .map(|f| f as u64)
                })
                .ok_or_else(|| serde::de::Error::custom(format!("{n} is not a dead letter id")))
        })
        .collect()
}

/// One letter's failure in a batch's answer: what its single call would have answered.
fn failed(id: u64, e: DispatchError) -> Value {
    let e = ApiError::from(e);
    let (status, code) = e.status_and_code();
    json!({"id": id, "status": status.as_u16(), "error": code, "message": e.message()})
}

/// What `skip_held` does for a CSV connector, in the resume's answer.
const CSV_SKIP_NOTE: &str = "its CSV files are written again from the roster as it stands now, so nothing it held is left out of them: a deprovisioning the identity provider has not undone goes out with them (undo it there, and the next write puts those users back)";

/// `POST /connectors/{name}/resume`: lift a pause. `{"skip_held": true}` lets a
/// connector its guard holds go on without sending what it holds, then starts a
/// reconciliation, which sends the current state of what the skipped changes touched.
async fn resume(
    State(st): St,
    headers: HeaderMap,
    Path(name): Path<String>,
    p: Params,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Admin, p, &[])?;
    let body = super::roster::read_body(&st, &headers, body).await?;
    const EXPECTED: &str = "expected {\"skip_held\": true|false}";
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct ResumeBody {
        #[serde(default)]
        skip_held: bool,
    }
    let ResumeBody { skip_held } = super::options_body(&headers, &body, EXPECTED)?;
    if !skip_held {
        let was_paused = st.dispatch.resume(&caller.tenant, &name).await?;
        // The letters a pause left are the operator's next step: said with the resume.
        let dead_letters = st.store.dead_letter_count(&caller.tenant, &name)?;
        // `resumed` stays for older clients; `was_paused` says whether there was a pause.
        return Ok(Json(
            json!({ "resumed": name, "was_paused": was_paused, "dead_letters": dead_letters }),
        )
        .into_response());
    }
    let skipped = st.dispatch.skip_held(&caller.tenant, &name).await?;
    let mut answer =
        json!({ "resumed": name, "was_paused": true, "skipped_through": skipped.through });
    if !skipped.reconcile {
        // A CSV connector's files are state, written whole: nothing it held is left out
        // of them, which "skipped" alone let an operator believe.
        answer["note"] = json!(CSV_SKIP_NOTE);
        return Ok(Json(answer).into_response());
    }
    // This connector's alone: another connector of the tenant, held or paused, would
    // fail a reconciliation of them all (a recheck saw the skip's job end `failed`
    // although its own part went out).
    let only = Some(name.as_str());
    match crate::schedule::start_reconcile(st.clone(), &caller.tenant, "scim_sync", false, only)
        .await
    {
        Ok(job) => answer["job"] = super::roster::job_json(&job),
        // Skipped all the same: the operator starts the reconciliation once the other
        // job has ended.
        Err(e) => {
            let why = format!(
                "{e}; start it with `rosterd reconcile --tenant {}` once that ends",
                caller.tenant
            );
            // Until it runs, what the skipped changes altered stays as the target has it.
            tracing::warn!(tenant = %caller.tenant, connector = %name, reason = why.as_str(), "The reconciliation after a skip of held changes did not start.");
            answer["job_error"] = json!(why);
        }
    }
    Ok(Json(answer).into_response())
}

async fn retire(
    State(st): St,
    headers: HeaderMap,
    Path(name): Path<String>,
    p: Params,
) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Admin, p, &[])?;
    let r = st.dispatch.retire(&caller.tenant, &name).await?;
    Ok(Json(json!({
        "retired": name,
        "undelivered": r.undelivered,
        "dead_letters": r.dead_letters,
        "was_retired": r.was_retired,
    }))
    .into_response())
}
