//! The Roster API (`/api/v1/roster`, JSON): the classified roster as operators and
//! downstream systems read it, archetype overrides, the review queue, governance events
//! and sync jobs. Authenticated with JWTs whose claims name the tenant and the scopes.
//!
//! Every failure is an [`ApiError`], rendered in one place as
//! `{"error": "<stable code>", "message": "<for people>"}`.

pub mod export;
pub mod jwt;
mod mirror;
mod openapi;
mod roster;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::classify::TenantPolicy;
use crate::server::AppState;
use crate::store::StoreError;
use jwt::{JwtError, Principal, Scope};

pub use export::{COLUMNS, FORMULA_STARTS, confidence_cell, neutralize, write_roster_csv};
pub use mirror::REPLAY_BATCH_MAX;
pub use openapi::openapi_document;
pub(crate) use roster::assignment_state;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(#[from] JwtError),
    #[error("this token does not open tenant {0:?}")]
    TenantMismatch(String),
    /// The token verified, but names a tenant this daemon does not serve.
    #[error("tenant {0:?}, which the token names, is not configured on this daemon")]
    UnknownTenant(String),
    #[error("this request needs the {0} scope")]
    MissingScope(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("archetype {} is not in this tenant's bundle", crate::server::quote_clipped(.0, 200))]
    InvalidArchetype(String),
    #[error("{0}")]
    BadRequest(String),
    /// The running job's id, when it was looked up.
    #[error(
        "a sync job is running for this tenant; try again when it has finished ({})",
        match .0 {
            Some(id) => format!("GET /api/v1/roster/scim/jobs/{id} follows it"),
            None => "/status shows it under running_job".to_owned(),
        }
    )]
    SyncInProgress(Option<String>),
    #[error("this tenant's policy does not allow manual archetype overrides")]
    OverridesForbidden,
    #[error("this tenant has no archetype bundle configured")]
    NoBundle,
    /// The reason is the operator's (it names environment variables and files) and is
    /// logged at start; callers, who need no token to see this, get the fact only.
    #[error("the Roster API is not configured on this daemon; its log says why")]
    Disabled(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0} is not in the review queue; PATCH /api/v1/roster/users/{{id}} overrides any user")]
    NotInReview(String),
    #[error(
        "the suggestion is {}, not {expected:?} (expected_archetype_id): it changed since the item was read (the user's title, department or groups, or the bundle or the group rules did), or it never was {expected:?}; read the item again",
        now.as_deref().map_or_else(|| "none".to_owned(), |a| format!("{a:?}"))
    )]
    SuggestionChanged {
        expected: String,
        now: Option<String>,
    },
    /// A downstream target refused what we sent on the caller's behalf.
    #[error("{0}")]
    Upstream(String),
    /// What the caller asked to send cannot be expressed for the target; nothing went.
    #[error("{0}")]
    Unmappable(String),
    #[error("this endpoint does not take {0}")]
    MethodNotAllowed(String),
    #[error("the request body is larger than this daemon accepts (server.max_body_bytes)")]
    PayloadTooLarge,
    #[error("the request body is {0}; send JSON with Content-Type: application/json")]
    UnsupportedMediaType(String),
    #[error(
        "the request body is sent with Content-Encoding {0}, which rosterd does not decode; send it uncompressed"
    )]
    UnsupportedEncoding(String),
    #[error("the request body stalled for {0} s (server.client_timeout_secs); send it again")]
    RequestTimeout(u64),
    #[error(
        "{0}; try again when one has finished (one whose client reads nothing for server.client_timeout_secs is ended)"
    )]
    TooManyExports(String),
    #[error(
        "a dry run of this tenant's reconciliation is running; try again when it has finished (it reads each OneRoster target back for at most the connector's read_back_max_secs)"
    )]
    DryRunInProgress,
    #[error("internal error")]
    Internal(StoreError),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        use crate::store::OverrideRefusal as R;
        match e {
            StoreError::OverrideRefused(r) => match r {
                R::NotInReview(id) => ApiError::NotInReview(id),
                R::NothingSuggested => ApiError::BadRequest(
                    "this user has no suggested archetype; send {\"archetype_id\": …}".into(),
                ),
                R::UnknownArchetype(a) => ApiError::InvalidArchetype(a),
                R::JobRunning => ApiError::SyncInProgress(None),
                R::SuggestionChanged { expected, now } => {
                    ApiError::SuggestionChanged { expected, now }
                }
            },
            other => ApiError::Internal(other),
        }
    }
}

impl From<crate::schedule::JobError> for ApiError {
    fn from(e: crate::schedule::JobError) -> Self {
        match e {
            crate::schedule::JobError::AlreadyRunning(_) => ApiError::SyncInProgress(None),
            crate::schedule::JobError::Store(s) => ApiError::Internal(s),
        }
    }
}

impl ApiError {
    pub(crate) fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized(e) => (StatusCode::UNAUTHORIZED, e.code()),
            ApiError::TenantMismatch(_) => (StatusCode::FORBIDDEN, "tenant_mismatch"),
            ApiError::UnknownTenant(_) => (StatusCode::FORBIDDEN, "unknown_tenant"),
            ApiError::MissingScope(_) => (StatusCode::FORBIDDEN, "insufficient_scope"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::InvalidArchetype(_) => (StatusCode::BAD_REQUEST, "invalid_archetype"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::SyncInProgress(_) => (StatusCode::CONFLICT, "sync_in_progress"),
            ApiError::OverridesForbidden => {
                (StatusCode::UNPROCESSABLE_ENTITY, "override_forbidden")
            }
            ApiError::NoBundle => (StatusCode::CONFLICT, "no_bundle"),
            ApiError::Disabled(_) => (StatusCode::SERVICE_UNAVAILABLE, "roster_api_disabled"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::NotInReview(_) => (StatusCode::CONFLICT, "not_in_review"),
            ApiError::SuggestionChanged { .. } => (StatusCode::CONFLICT, "suggestion_changed"),
            ApiError::Upstream(_) => (StatusCode::BAD_GATEWAY, "target_refused"),
            ApiError::Unmappable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unmappable"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) | ApiError::UnsupportedEncoding(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::TooManyExports(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_exports"),
            ApiError::DryRunInProgress => (StatusCode::TOO_MANY_REQUESTS, "dry_run_in_progress"),
            ApiError::Internal(StoreError::NotFound { .. }) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Internal(e) if e.outage_message().is_some() => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_failed")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl ApiError {
    /// What the client is told, as the body's `message`; a store failure is logged here,
    /// and said to the client only as far as it is known.
    pub(crate) fn message(&self) -> String {
        match self {
            ApiError::Internal(StoreError::NotFound { .. }) => "not found".to_owned(),
            // As the SCIM side says it (server::error): only what is known.
            ApiError::Internal(e) => match e.outage_message() {
                Some(m) => {
                    crate::server::log_outage(e, "Roster API");
                    m.to_owned()
                }
                None => {
                    tracing::error!(error = %e, "Store failure while serving a Roster API request.");
                    crate::store::INTERNAL_ERROR_MESSAGE.to_owned()
                }
            },
            ApiError::Disabled(reason) => {
                tracing::debug!(
                    reason = reason.as_str(),
                    "Roster API request while the API is off."
                );
                self.to_string()
            }
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        // Messages quote what the client sent: a 60,000-character filter came back whole.
        let message = match self.message() {
            m if m.len() > crate::server::MAX_MESSAGE_BYTES => {
                crate::server::clip(&m, crate::server::MAX_MESSAGE_BYTES).into_owned()
            }
            m => m,
        };
        let mut resp = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            json!({"error": code, "message": message}).to_string(),
        )
            .into_response();
        resp.extensions_mut().insert(crate::server::Refusal {
            code: Some(code),
            detail: message,
        });
        // RFC 6750 §3: a request without credentials is told only how to
        // authenticate; a refused token is `invalid_token`; a token short of a scope
        // is `insufficient_scope`, naming the scope.
        let challenge = match &self {
            ApiError::Unauthorized(JwtError::Missing) => {
                Some("Bearer realm=\"rosterd\"".to_owned())
            }
            ApiError::Unauthorized(_) => {
                Some("Bearer realm=\"rosterd\", error=\"invalid_token\"".to_owned())
            }
            ApiError::MissingScope(scope) => Some(format!(
                "Bearer realm=\"rosterd\", error=\"insufficient_scope\", scope=\"{scope}\""
            )),
            _ => None,
        };
        if let Some(v) = challenge.and_then(|c| c.parse().ok()) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        if let ApiError::UnsupportedEncoding(_) = self {
            // RFC 9110 §15.5.16: what the body may be sent in instead.
            resp.headers_mut().insert(
                header::ACCEPT_ENCODING,
                axum::http::HeaderValue::from_static("identity"),
            );
        }
        if let ApiError::TooManyExports(_) | ApiError::DryRunInProgress = self {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(export::EXPORT_RETRY_AFTER_SECS),
            );
        }
        if code == "store_failed" {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(crate::store::OUTAGE_RETRY_AFTER_SECS),
            );
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Every code an [`ApiError`] can carry besides the token codes of [`JwtError::code`]:
/// the OpenAPI document lists them (a test holds the two to each other).
pub(crate) const ERROR_CODES: &[&str] = &[
    "tenant_mismatch",
    "unknown_tenant",
    "insufficient_scope",
    "not_found",
    "invalid_archetype",
    "invalid_request",
    "sync_in_progress",
    "override_forbidden",
    "no_bundle",
    "roster_api_disabled",
    "conflict",
    "not_in_review",
    "suggestion_changed",
    "target_refused",
    "unmappable",
    "method_not_allowed",
    "payload_too_large",
    "unsupported_media_type",
    "request_timeout",
    "too_many_exports",
    "dry_run_in_progress",
    "store_failed",
    "internal",
];

/// The query string, name → value. A name given twice is refused: which copy counts is
/// nothing a caller should have to guess (`limit=1&limit=2`). A query that does not read
/// is refused only once the caller is known (`roster::admit`): a client without a token
/// gets the 401 its credentials earn, whatever it asked.
pub(crate) struct Params(ApiResult<HashMap<String, String>>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Params {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Params(read_params(parts.uri.query().unwrap_or_default())))
    }
}

fn read_params(query: &str) -> ApiResult<HashMap<String, String>> {
    let pairs = crate::server::query_pairs(query)
        .map_err(|e| ApiError::BadRequest(format!("query string: {e}")))?;
    let mut map = HashMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        if map.contains_key(&k) {
            return Err(ApiError::BadRequest(format!(
                "query parameter {k:?} is given more than once; give it once"
            )));
        }
        map.insert(k, v);
    }
    Ok(map)
}

/// An optional body of options (`{"dry_run": true}`): none is `T::default()`; anything
/// but an object of `T`'s keys is 400 naming `expected`. serde would also read a struct
/// from an array (`[true]`), which no caller means.
pub(crate) fn options_body<T: serde::de::DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: &[u8],
    expected: &str,
) -> ApiResult<T> {
    match json_body(headers, body)? {
        None => Ok(T::default()),
        Some(v @ serde_json::Value::Object(_)) => serde_json::from_value(v)
            .map_err(|e| ApiError::BadRequest(format!("body: {e}; {expected}"))),
        Some(_) => Err(ApiError::BadRequest(format!(
            "body must be a JSON object: {expected}"
        ))),
    }
}

/// A request body as JSON, or None when there is none (empty or only whitespace). A body
/// labelled as something else than JSON is refused rather than read anyway: a form post
/// by mistake should say so, not fail on its first byte. No Content-Type is taken as JSON.
pub(crate) fn json_body(headers: &HeaderMap, body: &[u8]) -> ApiResult<Option<serde_json::Value>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = String::from_utf8_lossy(ct.as_bytes());
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "labelled {essence:?}"
            )));
        }
    }
    crate::server::json::request_body(body)
        .map(Some)
        .map_err(ApiError::BadRequest)
}

/// Under `/api/v1/` every error is the API's JSON body, including those axum answers
/// before any handler runs: no such route (the shared fallback speaks SCIM), a method the
/// route does not take, a body over the limit, a path or query that does not decode.
/// Responses already in JSON, and everything outside the API, pass untouched.
pub(crate) async fn json_errors(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let api = req.uri().path().starts_with("/api/v1/");
    let method = req.method().clone();
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !api || json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let kept = crate::server::kept_headers(resp.headers());
    let err = match status {
        StatusCode::NOT_FOUND => ApiError::NotFound("no such endpoint in the Roster API".into()),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed(method.to_string()),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => {
            let message = crate::server::rejection_text(resp).await;
            let code = match status {
                StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
                s if s.is_server_error() => "internal",
                _ => "invalid_request",
            };
            return (
                status,
                kept,
                [(header::CONTENT_TYPE, "application/json")],
                json!({"error": code, "message": message}).to_string(),
            )
                .into_response();
        }
    };
    let mut out = err.into_response();
    out.headers_mut().extend(kept);
    out
}

/// One tenant as the Roster API sees it.
pub struct TenantRoster {
    /// Replaced whole on a bundle reload, so a request sees one consistent bundle.
    pub policy: RwLock<Option<Arc<TenantPolicy>>>,
    pub allow_overrides: bool,
    /// What `GET /groups` names as a group's source: `scim:<idp>`, or `scim`.
    pub group_source: String,
    /// What `GET /groups` names as the role each group grants (`claresia_role`).
    pub group_roles: Vec<crate::config::GroupRole>,
    /// The bundle in force and how the last reload of it went, for `/status`.
    pub bundle: Mutex<BundleState>,
    /// Held while a dry run of the tenant's reconciliation runs. Dry runs take no job
    /// slot, and each reads every OneRoster target back: forty at once took the daemon to
    /// 1.3 GB, and they kept reading after their clients had gone.
    pub dry_run: tokio::sync::Mutex<()>,
}

/// Which bundle a tenant runs on, and whether the last attempt to replace it failed: a
/// failed reload keeps the old bundle serving, but the next restart would refuse the
/// file, so operators must see it without reading the log.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BundleState {
    pub path: Option<String>,
    pub version: Option<String>,
    pub archetypes: usize,
    pub loaded_at: Option<chrono::DateTime<chrono::Utc>>,
    /// How long reading and training took.
    pub load_seconds: Option<f64>,
    pub reload_error: Option<String>,
    pub reload_error_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Whether a restart would refuse the file that did not reload: `reload_error` ends
    /// saying so in words; the metrics' `rosterd_config_file_error` counts it.
    #[serde(skip)]
    pub restart_refuses: bool,
    /// A changed bundle being read and trained since then, the one above still in
    /// force: training a large bundle takes minutes, during which nothing else told a
    /// reload under way from one ignored.
    pub training_since: Option<chrono::DateTime<chrono::Utc>>,
}

impl BundleState {
    pub fn loaded(&mut self, policy: &TenantPolicy) {
        let from = policy.loaded_from();
        *self = BundleState {
            path: from.map(|(path, _)| path.display().to_string()),
            version: Some(policy.bundle().version.clone()),
            archetypes: policy.bundle().archetypes.len(),
            loaded_at: Some(chrono::Utc::now()),
            load_seconds: from.map(|(_, took)| (took * 100.0).round() / 100.0),
            reload_error: None,
            reload_error_at: None,
            restart_refuses: false,
            training_since: None,
        };
    }

    pub fn training(&mut self) {
        self.training_since = Some(chrono::Utc::now());
    }

    pub fn failed(&mut self, error: &impl std::fmt::Display, restart_refuses: bool) {
        self.training_since = None;
        self.reload_error = Some(error.to_string());
        self.reload_error_at = Some(chrono::Utc::now());
        self.restart_refuses = restart_refuses;
    }

    /// The file loads again (or never changed): no reload error stands.
    pub fn recovered(&mut self) {
        self.reload_error = None;
        self.reload_error_at = None;
        self.restart_refuses = false;
    }
}

impl TenantRoster {
    /// The role a group grants: the first `group_roles` entry that names it, else member.
    pub fn group_role(&self, id: &str, name: Option<&str>, external: Option<&str>) -> &str {
        self.group_roles
            .iter()
            .find(|r| crate::config::names_group(&r.group, id, name, external))
            .map_or(crate::config::DEFAULT_GROUP_ROLE, |r| r.role.as_str())
    }

    pub fn bundle_state(&self) -> BundleState {
        self.bundle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_bundle_state(&self, f: impl FnOnce(&mut BundleState)) {
        f(&mut self.bundle.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn policy(&self) -> Option<Arc<TenantPolicy>> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Roster API state shared by its handlers.
pub struct RosterState {
    pub verifier: jwt::Verifiers,
    /// Why there is no verifier, told to callers.
    pub disabled: Option<String>,
    pub tenants: HashMap<String, TenantRoster>,
    pub exports: export::ExportSlots,
}

/// A verified caller, bound to one tenant.
pub struct Caller {
    pub tenant: String,
    pub principal: Principal,
}

impl Caller {
    pub fn require(&self, scope: Scope) -> ApiResult<()> {
        if self.principal.has(scope) {
            Ok(())
        } else {
            Err(ApiError::MissingScope(match scope {
                Scope::Read => "roster:read",
                Scope::Write => "roster:write",
                Scope::Admin => "roster:admin",
            }))
        }
    }
}

/// Verify the bearer JWT and the tenant it names. `X-Tenant` (or the reference's
/// `X-Claresia-Tenant`), when sent, must agree with the token: a client cannot pick a
/// tenant its token does not name.
pub fn authenticate(state: &AppState, headers: &HeaderMap) -> ApiResult<Caller> {
    let Some(verifier) = state.roster.verifier.get() else {
        return Err(ApiError::Disabled(
            state.roster.disabled.clone().unwrap_or_default(),
        ));
    };
    if let Some(why) = crate::server::more_than_one_authorization(headers) {
        return Err(ApiError::BadRequest(why));
    }
    let token =
        crate::server::bearer_token(headers).ok_or(ApiError::Unauthorized(JwtError::Missing))?;
    let principal = verifier.verify(&token)?;
    // The claim is the token's, before it is found to name a tenant: written to the
    // log as the terminal can show it (`\u{202E}` would reverse the rest of the line).
    tracing::Span::current().record(
        "tenant",
        tracing::field::display(crate::text::terminal_safe(&principal.tenant)),
    );
    // Who: every line the request logs (a dead letter discarded, a guard's hold let go,
    // a connector resumed) then says which token's subject did it; the journal could
    // not tell who discarded 1,312 changes.
    tracing::Span::current().record(
        "actor",
        tracing::field::display(crate::text::terminal_safe(&principal.actor())),
    );
    // Every copy of the header counts: a proxy that checks only one of them must not be
    // able to disagree with us about which tenant was asked for.
    for name in ["x-tenant", "x-claresia-tenant"] {
        for v in headers.get_all(name) {
            let v = String::from_utf8_lossy(v.as_bytes());
            if v != principal.tenant {
                return Err(ApiError::TenantMismatch(v.into_owned()));
            }
        }
    }
    if !state.roster.tenants.contains_key(&principal.tenant) {
        return Err(ApiError::UnknownTenant(principal.tenant.clone()));
    }
    Ok(Caller {
        tenant: principal.tenant.clone(),
        principal,
    })
}

pub(crate) fn routes() -> Router<Arc<AppState>> {
    roster::routes().merge(mirror::routes()).route(
        "/api/v1/openapi.json",
        axum::routing::get(|| async { axum::Json(openapi_document()) }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of each variant. The match below has no wildcard, so a new variant does not
    /// compile until it is added here, and so to the codes the document lists.
    fn every_error() -> Vec<ApiError> {
        let all = vec![
            ApiError::Unauthorized(JwtError::Expired),
            ApiError::TenantMismatch("t".into()),
            ApiError::UnknownTenant("t".into()),
            ApiError::MissingScope("roster:read"),
            ApiError::NotFound("x".into()),
            ApiError::InvalidArchetype("x".into()),
            ApiError::BadRequest("x".into()),
            ApiError::SyncInProgress(None),
            ApiError::OverridesForbidden,
            ApiError::NoBundle,
            ApiError::Disabled("x".into()),
            ApiError::Conflict("x".into()),
            ApiError::NotInReview("x".into()),
            ApiError::SuggestionChanged {
                expected: "a".into(),
                now: None,
            },
            ApiError::Upstream("x".into()),
            ApiError::Unmappable("x".into()),
            ApiError::MethodNotAllowed("PUT".into()),
            ApiError::PayloadTooLarge,
            ApiError::UnsupportedMediaType("x".into()),
            ApiError::UnsupportedEncoding("gzip".into()),
            ApiError::RequestTimeout(30),
            ApiError::TooManyExports("x".into()),
            ApiError::DryRunInProgress,
            ApiError::Internal(StoreError::Backend("x".into())),
            ApiError::Internal(StoreError::NotDurable("x".into())),
            ApiError::Internal(StoreError::Io("x".into())),
        ];
        for e in &all {
            match e {
                ApiError::Unauthorized(_)
                | ApiError::TenantMismatch(_)
                | ApiError::UnknownTenant(_)
                | ApiError::MissingScope(_)
                | ApiError::NotFound(_)
                | ApiError::InvalidArchetype(_)
                | ApiError::BadRequest(_)
                | ApiError::SyncInProgress(_)
                | ApiError::OverridesForbidden
                | ApiError::NoBundle
                | ApiError::Disabled(_)
                | ApiError::Conflict(_)
                | ApiError::NotInReview(_)
                | ApiError::SuggestionChanged { .. }
                | ApiError::Upstream(_)
                | ApiError::Unmappable(_)
                | ApiError::MethodNotAllowed(_)
                | ApiError::PayloadTooLarge
                | ApiError::UnsupportedMediaType(_)
                | ApiError::UnsupportedEncoding(_)
                | ApiError::RequestTimeout(_)
                | ApiError::TooManyExports(_)
                | ApiError::DryRunInProgress
                | ApiError::Internal(_) => {}
            }
        }
        all
    }

    #[test]
    fn the_document_lists_every_error_code() {
        let doc = openapi_document();
        let listed = doc["components"]["schemas"]["Error"]["properties"]["error"]["description"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut seen = std::collections::HashSet::new();
        for e in every_error() {
            let (_, code) = e.status_and_code();
            assert!(listed.contains(code), "{code} is not in: {listed}");
            if !matches!(e, ApiError::Unauthorized(_)) {
                assert!(ERROR_CODES.contains(&code), "{code} is not in ERROR_CODES");
                seen.insert(code);
            }
        }
        assert_eq!(
            seen.len(),
            ERROR_CODES.len(),
            "ERROR_CODES lists a code no error has"
        );
        for code in jwt::TOKEN_CODES {
            assert!(listed.contains(code), "{code}");
        }
    }

    #[test]
    fn a_store_that_cannot_read_or_write_is_503_for_reads_too() {
        for e in [
            StoreError::Io("No space left on device".into()),
            StoreError::NotDurable("flush failed".into()),
        ] {
            let resp = ApiError::Internal(e).into_response();
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(resp.headers()[header::RETRY_AFTER], "120");
        }
        let (status, code) = ApiError::Internal(StoreError::Backend("x".into())).status_and_code();
        assert_eq!(
            (status, code),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
    }

    #[test]
    fn a_body_labelled_as_something_else_than_json_is_415() {
        let mut h = HeaderMap::new();
        assert_eq!(json_body(&h, b" \n").unwrap(), None);
        assert_eq!(json_body(&h, b"{}").unwrap(), Some(json!({})));
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "application/merge-patch+json",
            "Application/JSON",
        ] {
            h.insert(header::CONTENT_TYPE, ok.parse().unwrap());
            assert!(json_body(&h, b"{}").is_ok(), "{ok}");
        }
        for bad in [
            "application/x-www-form-urlencoded",
            "text/plain",
            "multipart/form-data; boundary=x",
        ] {
            h.insert(header::CONTENT_TYPE, bad.parse().unwrap());
            let e = json_body(&h, b"{}").unwrap_err();
            assert_eq!(e.status_and_code().1, "unsupported_media_type", "{bad}");
        }
    }
}
