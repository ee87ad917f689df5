//! SCIM 2.0 endpoints at `/scim/v2/{tenant}`: authentication, resource CRUD, list and
//! search, /Bulk and discovery. Protocol rules come from `crate::scim`; persistence from
//! `crate::store`. Each operation is a plain function returning a [`Reply`] so that /Bulk
//! runs exactly the code the single-resource endpoints run.
//!
//! Where each part is: this file has the routes, the errors answered before a handler
//! runs, what every request shares (the token check, the body, `If-Match`, the query
//! string, the `Reply`), and the handlers of users and groups that `resource_handlers!`
//! makes. `render` says which attributes an answer carries and renders a resource with
//! its members or groups; `write` creates, replaces, patches and deletes; `read` gets one
//! resource and lists and searches (the filter's checks, index lookups, sorting, paging);
//! `bulk` runs a /Bulk request's operations through `write`; `discovery` answers
//! ServiceProviderConfig, Schemas and ResourceTypes.

mod bulk;
mod discovery;
mod read;
mod render;
mod write;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

use super::AppState;
use super::auth::AuthOutcome;
use super::error::{SCIM_CONTENT_TYPE, ScimFailure};
use crate::scim::schema::ResourceKind;
use crate::scim::{ScimError, ScimResult};
use crate::store::IfMatch;
use bulk::bulk;
use discovery::{
    resource_type_by_id, resource_types, schema_by_id, schemas, service_provider_config,
};
use read::{ListQuery, get_one, list_root, run_list, search_root};
use render::Projection;
use write::{op_create, op_delete, op_patch, op_replace};
// Named by the files beside this one as `super::…`.
use super::{clip, quote_clipped};

const LIST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";

type St = State<Arc<AppState>>;
type HandlerResult = Result<Response, ScimFailure>;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/scim/v2/{tenant}/Users", get(list_users).post(create_user))
        .route("/scim/v2/{tenant}/Users/.search", post(search_users))
        .route(
            "/scim/v2/{tenant}/Users/{id}",
            get(get_user)
                .put(replace_user)
                .patch(patch_user)
                .delete(delete_user),
        )
        .route(
            "/scim/v2/{tenant}/Groups",
            get(list_groups).post(create_group),
        )
        .route("/scim/v2/{tenant}/Groups/.search", post(search_groups))
        .route(
            "/scim/v2/{tenant}/Groups/{id}",
            get(get_group)
                .put(replace_group)
                .patch(patch_group)
                .delete(delete_group),
        )
        .route("/scim/v2/{tenant}", get(list_root))
        .route("/scim/v2/{tenant}/", get(list_root))
        .route("/scim/v2/{tenant}/.search", post(search_root))
        .route("/scim/v2/{tenant}/Bulk", post(bulk))
        .route(
            "/scim/v2/{tenant}/ServiceProviderConfig",
            get(service_provider_config),
        )
        // Entra's test collection probes this older alias.
        .route(
            "/scim/v2/{tenant}/serviceConfiguration",
            get(service_provider_config),
        )
        .route("/scim/v2/{tenant}/Schemas", get(schemas))
        .route("/scim/v2/{tenant}/Schemas/{id}", get(schema_by_id))
        .route("/scim/v2/{tenant}/ResourceTypes", get(resource_types))
        .route(
            "/scim/v2/{tenant}/ResourceTypes/{id}",
            get(resource_type_by_id),
        )
        .route("/scim/v2/{tenant}/Me", axum::routing::any(me))
}

/// Under `/scim/`, the errors axum answers before any handler runs (a method the endpoint
/// does not take, a path that does not decode) carry the SCIM error schema too: a client
/// reads `detail` from every error, and an empty body tells it nothing.
pub(super) async fn scim_errors(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let scim = req.uri().path().starts_with("/scim/");
    let method = req.method().clone();
    let resp = next.run(req).await;
    let status = resp.status();
    let typed = resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(SCIM_CONTENT_TYPE.as_bytes()) || v.starts_with(b"application/json")
    });
    if !scim || typed || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let kept = super::kept_headers(resp.headers());
    let detail = match status {
        StatusCode::METHOD_NOT_ALLOWED => format!(
            "this endpoint does not take {method}{}",
            kept.get(header::ALLOW)
                .and_then(|a| a.to_str().ok())
                .map(|a| format!("; it takes {a}"))
                .unwrap_or_default()
        ),
        _ => super::rejection_text(resp).await,
    };
    let mut out = ScimFailure(ScimError::new(status.as_u16(), None, detail)).into_response();
    out.headers_mut().extend(kept);
    out
}

/// Anything unrouted. Under `/scim/` the answer is a SCIM error, and a protocol version
/// other than v2 is named as such.
pub(super) async fn not_found(method: Method, uri: Uri) -> ScimFailure {
    let path = uri.path();
    if let Some(rest) = path.strip_prefix("/scim/") {
        let version = rest.split('/').next().unwrap_or("");
        if !version.eq_ignore_ascii_case("v2") {
            return ScimError::invalid_vers(format!(
                "SCIM protocol version {version:?} is not supported; use /scim/v2/{{tenant}}"
            ))
            .into();
        }
    }
    ScimError::not_found(format!("no endpoint {method} {path}")).into()
}

// ---------------------------------------------------------------------------------------
// Authentication and request plumbing

fn authorize(state: &AppState, tenant: &str, headers: &HeaderMap) -> ScimResult<()> {
    if let Some(why) = super::more_than_one_authorization(headers) {
        return Err(ScimError::new(400, None, why));
    }
    let Some(token) = super::bearer_token(headers) else {
        return Err(ScimError::new(401, None, "a Bearer token is required"));
    };
    match state.tokens.check(tenant, &token) {
        AuthOutcome::Allowed if state.tokens.has_tenant(tenant) => Ok(()),
        AuthOutcome::Allowed | AuthOutcome::OtherTenant => Err(ScimError::new(
            403,
            None,
            "this token does not open this tenant",
        )),
        AuthOutcome::Denied => Err(ScimError::new(401, None, super::error::INVALID_TOKEN)),
    }
}

/// The request's JSON body, read only once [`authorize`] let the request in: a client
/// without a token must not get the daemon to buffer `max_body_bytes` for it.
///
/// The share of [`super::BodyBudget`] a large body holds comes with it: keep it as long
/// as the value.
async fn read_body(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> ScimResult<(Value, super::BodyShare)> {
    use super::BodyRefusal;
    let limit = st.config.server.max_body_bytes;
    let (bytes, share) = super::read_request_body(st, headers, body)
        .await
        .map_err(|r| match r {
            BodyRefusal::Encoded(codings) => ScimError::new(
                415,
                None,
                crate::api::ApiError::UnsupportedEncoding(codings).to_string(),
            ),
            BodyRefusal::TooLarge => ScimError::new(
                413,
                None,
                format!("request body is larger than the {limit}-byte limit"),
            ),
            BodyRefusal::Unreadable(e) => {
                ScimError::invalid_syntax(format!("cannot read the request body: {e}"))
            }
        })?
        .into_parts();
    if bytes.is_empty() {
        return Err(ScimError::invalid_syntax("request body is empty"));
    }
    let value = super::json::request_body(&bytes).map_err(ScimError::invalid_syntax)?;
    Ok((value, share))
}

fn if_match(headers: &HeaderMap) -> ScimResult<Option<IfMatch>> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| ScimError::invalid_syntax("If-Match is not ASCII"))?;
    Ok(Some(etag_list(v)))
}

/// An `If-Match` value, or a /Bulk operation's `version`: `*`, or a list of ETags.
fn etag_list(v: &str) -> IfMatch {
    if v.trim() == "*" {
        return IfMatch::Any;
    }
    IfMatch::Tags(v.split(',').map(|t| t.trim().to_owned()).collect())
}

/// A successful SCIM answer, shared by the endpoints and /Bulk.
struct Reply {
    status: StatusCode,
    body: Option<Value>,
    etag: Option<String>,
    location: Option<String>,
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut resp = match self.body {
            Some(b) => (self.status, b.to_string()).into_response(),
            None => self.status.into_response(),
        };
        let no_content = resp.status() == StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        if !no_content {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(SCIM_CONTENT_TYPE),
            );
        }
        if let Some(etag) = self.etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
            h.insert(header::ETAG, etag);
        }
        if let Some(loc) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            h.insert(header::LOCATION, loc);
        }
        resp
    }
}

fn ok(v: Value) -> Reply {
    Reply {
        status: StatusCode::OK,
        body: Some(v),
        etag: None,
        location: None,
    }
}

fn location(state: &AppState, tenant: &str, kind: ResourceKind, id: &str) -> String {
    format!(
        "{}/scim/v2/{tenant}/{}/{id}",
        state.base_url,
        kind.endpoint()
    )
}

fn tenant_base(state: &AppState, tenant: &str) -> String {
    format!("{}/scim/v2/{tenant}", state.base_url)
}

// ---------------------------------------------------------------------------------------
// Single-resource handlers

type Params = HashMap<String, String>;

/// The query string's names and values (see [`super::query_pairs`]); one that does not
/// decode is 400 in SCIM's error schema. It is read only after the token is checked: a
/// client without one learns nothing of what the query would have done, and gets the 401
/// its credentials earn whatever it asked.
struct ScimQuery(Result<Vec<(String, String)>, String>);

impl ScimQuery {
    fn read(self) -> ScimResult<Vec<(String, String)>> {
        self.0
            .map_err(|e| ScimError::invalid_value(format!("query string: {e}")))
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ScimQuery {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(ScimQuery(super::query_pairs(
            parts.uri.query().unwrap_or_default(),
        )))
    }
}

/// Query parameters by lower-case name. A list parameter given more than once
/// (`attributes=userName&attributes=emails`, as HTTP libraries send a list) is one list;
/// any other given twice (`count=1&count=2`) is 400: which of the two the client meant
/// is not rosterd's to guess, as with a key given twice in a body.
fn lower_keys(q: ScimQuery) -> ScimResult<Params> {
    let q = q.read()?;
    let mut out = Params::with_capacity(q.len());
    for (k, v) in q {
        let name = k.to_ascii_lowercase();
        match out.entry(name) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(v);
            }
            std::collections::hash_map::Entry::Occupied(mut e)
                if matches!(e.key().as_str(), "attributes" | "excludedattributes") =>
            {
                let joined = format!("{},{v}", e.get());
                e.insert(joined);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                return Err(ScimError::invalid_value(format!(
                    "the query parameter {k:?} is given more than once"
                )));
            }
        }
    }
    Ok(out)
}

macro_rules! resource_handlers {
    ($kind:expr, $get:ident, $create:ident, $replace:ident, $patch:ident, $delete:ident, $list:ident, $search:ident) => {
        async fn $get(
            State(st): St,
            Path((tenant, id)): Path<(String, String)>,
            q: ScimQuery,
            headers: HeaderMap,
        ) -> HandlerResult {
            authorize(&st, &tenant, &headers)?;
            Ok(get_one(&st, &tenant, $kind, &id, &headers, lower_keys(q)?)?.into_response())
        }

        // `attributes` and `excludedAttributes` shape every answer that carries the
        // resource (RFC 7644 §3.9): a group PUT's answer echoed every member, and are read
        // before the write so that a bad one changes nothing.
        async fn $create(
            State(st): St,
            Path(tenant): Path<String>,
            q: ScimQuery,
            headers: HeaderMap,
            body: Body,
        ) -> HandlerResult {
            authorize(&st, &tenant, &headers)?;
            let (body, _share) = read_body(&st, &headers, body).await?;
            let projection = Projection::from_params(&lower_keys(q)?)?;
            Ok(op_create(&st, &tenant, $kind, body, &projection)
                .await?
                .into_response())
        }

        async fn $replace(
            State(st): St,
            Path((tenant, id)): Path<(String, String)>,
            q: ScimQuery,
            headers: HeaderMap,
            body: Body,
        ) -> HandlerResult {
            authorize(&st, &tenant, &headers)?;
            let (body, _share) = read_body(&st, &headers, body).await?;
            let cond = if_match(&headers)?;
            let projection = Projection::from_params(&lower_keys(q)?)?;
            Ok(
                op_replace(&st, &tenant, $kind, &id, cond, body, &projection)
                    .await?
                    .into_response(),
            )
        }

        async fn $patch(
            State(st): St,
            Path((tenant, id)): Path<(String, String)>,
            q: ScimQuery,
            headers: HeaderMap,
            body: Body,
        ) -> HandlerResult {
            authorize(&st, &tenant, &headers)?;
            let (body, _share) = read_body(&st, &headers, body).await?;
            let cond = if_match(&headers)?;
            let projection = Projection::from_params(&lower_keys(q)?)?;
            Ok(op_patch(&st, &tenant, $kind, &id, cond, body, &projection)
                .await?
                .into_response())
        }

        async fn $delete(
            State(st): St,
            Path((tenant, id)): Path<(String, String)>,
            headers: HeaderMap,
        ) -> HandlerResult {
            authorize(&st, &tenant, &headers)?;
            let cond = if_match(&headers)?;
            Ok(op_delete(&st, &tenant, $kind, &id, cond)
                .await?
                .into_response())
        }

        async fn $list(
            State(st): St,
            Path(tenant): Path<String>,
            q: ScimQuery,
            headers: HeaderMap,
        ) -> HandlerResult {
            authorize(&st, &tenant, &headers)?;
            let query = ListQuery::from_params(&st, &lower_keys(q)?)?;
            Ok(run_list(st, tenant, vec![$kind], query)
                .await?
                .into_response())
        }

        async fn $search(
            State(st): St,
            Path(tenant): Path<String>,
            headers: HeaderMap,
            body: Body,
        ) -> HandlerResult {
            authorize(&st, &tenant, &headers)?;
            let (body, _share) = read_body(&st, &headers, body).await?;
            let query = ListQuery::from_search_body(&st, &body)?;
            Ok(run_list(st, tenant, vec![$kind], query)
                .await?
                .into_response())
        }
    };
}

resource_handlers!(
    ResourceKind::User,
    get_user,
    create_user,
    replace_user,
    patch_user,
    delete_user,
    list_users,
    search_users
);
resource_handlers!(
    ResourceKind::Group,
    get_group,
    create_group,
    replace_group,
    patch_group,
    delete_group,
    list_groups,
    search_groups
);

async fn me(State(st): St, Path(tenant): Path<String>, headers: HeaderMap) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    Err(ScimError::not_implemented(
        "/Me is not supported: SCIM tokens here belong to provisioning clients, not users",
    )
    .into())
}
