//! SCIM 2.0 endpoints at `/scim/v2/{tenant}`: authentication, resource CRUD, list and
//! search, /Bulk and discovery. Protocol rules come from `crate::scim`; persistence from
//! `crate::store`. Each operation is a plain function returning a [`Reply`] so that /Bulk
//! runs exactly the code the single-resource endpoints run.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::AppState;
use super::auth::AuthOutcome;
use super::error::{SCIM_CONTENT_TYPE, ScimFailure, store_to_scim};
use crate::scim::filter::{AttrPath, CompareOp, Filter, parse_attr_list, parse_filter};
use crate::scim::patch::{
    MemberOp, MemberRef, PatchOp, apply, check_operation_count, parse_patch_request,
    skip_unknown_extensions, split_member_ops,
};
use crate::scim::resource::{
    check_document_size, check_immutable, merge_repeats, normalize_input, one_primary_each,
    project, settle_primaries,
};
use crate::scim::schema::{
    self, ENTERPRISE_USER_SCHEMA, GROUP_SCHEMA, ResourceKind, USER_SCHEMA, lookup,
};
use crate::scim::{ScimError, ScimResult};
use crate::store::{IfMatch, IndexQuery, Resource, Store, Update};

const LIST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
const SEARCH_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:SearchRequest";
const BULK_REQUEST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:BulkRequest";
const BULK_RESPONSE_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:BulkResponse";
const SPC_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig";
const RESOURCE_TYPE_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:ResourceType";

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
// Rendering

/// Which attributes a response carries.
#[derive(Debug, Clone, Default)]
struct Projection {
    attributes: Vec<AttrPath>,
    excluded: Vec<AttrPath>,
}

impl Projection {
    /// No `attributes` and no `excludedAttributes`: the resource as it is returned by default.
    fn is_everything(&self) -> bool {
        self.attributes.is_empty() && self.excluded.is_empty()
    }

    fn from_params(params: &Params) -> ScimResult<Projection> {
        Ok(Projection {
            attributes: match params.get("attributes") {
                Some(a) => parse_attr_list(a)?,
                None => vec![],
            },
            excluded: match params.get("excludedattributes") {
                Some(a) => parse_attr_list(a)?,
                None => vec![],
            },
        })
    }

    /// Would a top-level core attribute `name` be returned? Used to skip loading members
    /// or groups that the client excluded.
    fn wants(&self, name: &str) -> bool {
        let core = |p: &AttrPath| {
            p.urn.as_deref().is_none_or(|u| {
                u.eq_ignore_ascii_case(USER_SCHEMA) || u.eq_ignore_ascii_case(GROUP_SCHEMA)
            })
        };
        // The core schema's URN alone names every core attribute.
        let whole_core = |p: &AttrPath| p.is_whole_schema() && p.urn.is_some() && core(p);
        let named = |list: &[AttrPath]| {
            list.iter()
                .any(|p| (p.attr.eq_ignore_ascii_case(name) && core(p)) || whole_core(p))
        };
        if !self.attributes.is_empty() {
            return named(&self.attributes);
        }
        !self
            .excluded
            .iter()
            .any(|p| (p.sub.is_none() && p.attr.eq_ignore_ascii_case(name)) || whole_core(p))
    }
}

/// Attach what is stored apart from the document: a group's members, a user's groups.
fn attach_relations(
    state: &AppState,
    tenant: &str,
    kind: ResourceKind,
    doc: &mut Value,
    id: &str,
) -> ScimResult<()> {
    let Some(obj) = doc.as_object_mut() else {
        return Ok(());
    };
    match kind {
        ResourceKind::Group => {
            let mut members = Vec::new();
            for m in state.store.members(tenant, id).map_err(store_to_scim)? {
                let m = m.map_err(store_to_scim)?;
                let member_kind = if m.kind == "Group" {
                    ResourceKind::Group
                } else {
                    ResourceKind::User
                };
                let mut e = Map::new();
                e.insert("value".into(), Value::String(m.value.clone()));
                e.insert(
                    "$ref".into(),
                    Value::String(location(state, tenant, member_kind, &m.value)),
                );
                e.insert("type".into(), Value::String(m.kind));
                if let Some(d) = m.display {
                    e.insert("display".into(), Value::String(d));
                }
                members.push(Value::Object(e));
            }
            // An empty group says so with `[]` rather than leaving `members` out (the
            // same state, RFC 7643 §2.5): authentik's full sync adds missing members
            // only to a group whose answer has the attribute, so it never refilled one
            // that had been emptied here.
            obj.insert("members".into(), Value::Array(members));
        }
        ResourceKind::User => {
            let mut groups = Vec::new();
            for gid in state.store.groups_of(tenant, id).map_err(store_to_scim)? {
                let display = state
                    .store
                    .get(tenant, ResourceKind::Group, &gid)
                    .map_err(store_to_scim)?
                    .and_then(|g| g.doc.get("displayName").cloned());
                let mut e = Map::new();
                e.insert("value".into(), Value::String(gid.clone()));
                e.insert(
                    "$ref".into(),
                    Value::String(location(state, tenant, ResourceKind::Group, &gid)),
                );
                if let Some(d) = display {
                    e.insert("display".into(), d);
                }
                e.insert("type".into(), Value::String("direct".into()));
                groups.push(Value::Object(e));
            }
            if !groups.is_empty() {
                obj.insert("groups".into(), Value::Array(groups));
            }
        }
    }
    Ok(())
}

fn render(
    state: &AppState,
    tenant: &str,
    kind: ResourceKind,
    res: &Resource,
    projection: &Projection,
) -> ScimResult<Value> {
    let mut doc = res.doc.clone();
    let relation = match kind {
        ResourceKind::Group => "members",
        ResourceKind::User => "groups",
    };
    if projection.wants(relation) {
        attach_relations(state, tenant, kind, &mut doc, &res.id)?;
    }
    if let Some(meta) = doc.get_mut("meta").and_then(Value::as_object_mut) {
        meta.insert(
            "location".into(),
            Value::String(location(state, tenant, kind, &res.id)),
        );
    }
    Ok(project(
        kind,
        &doc,
        &projection.attributes,
        &projection.excluded,
    ))
}

fn resource_reply(
    state: &AppState,
    tenant: &str,
    kind: ResourceKind,
    res: &Resource,
    status: StatusCode,
    projection: &Projection,
) -> ScimResult<Reply> {
    let body = render(state, tenant, kind, res, projection)?;
    Ok(Reply {
        status,
        body: Some(body),
        etag: Some(res.etag()),
        location: Some(location(state, tenant, kind, &res.id)),
    })
}

// ---------------------------------------------------------------------------------------
// Write operations (shared with /Bulk)

/// Split a normalized group document into the document proper and its members.
fn take_members(kind: ResourceKind, doc: &mut Value) -> ScimResult<Option<Vec<MemberRef>>> {
    if kind != ResourceKind::Group {
        return Ok(None);
    }
    let Some(members) = doc.as_object_mut().and_then(|o| o.remove("members")) else {
        return Ok(None);
    };
    let Value::Array(items) = members else {
        return Err(ScimError::invalid_value("members must be an array"));
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let value = item
            .get("value")
            .and_then(Value::as_str)
            .ok_or_else(|| ScimError::invalid_value("every member needs a string \"value\""))?;
        out.push(MemberRef {
            value: value.to_owned(),
            kind: item.get("type").and_then(Value::as_str).map(str::to_owned),
            display: item
                .get("display")
                .and_then(Value::as_str)
                .map(str::to_owned),
        });
    }
    Ok(Some(out))
}

/// What a body sent that no schema has is dropped, and said: the first few names (a
/// client once sent 50,000, one 10 MB log line), each cut, and how many there were.
fn warn_ignored(ignored: &[String]) {
    if ignored.is_empty() {
        return;
    }
    let shown: Vec<_> = ignored
        .iter()
        .take(IGNORED_NAMES_LOGGED)
        .map(|a| super::clip(a, 160))
        .collect();
    tracing::warn!(
        count = ignored.len(),
        ignored = ?shown,
        "Ignored attributes that are not in the schema."
    );
}

/// A user's enterprise `manager.value`, unless blank.
fn manager_value(doc: &Value) -> Option<&str> {
    doc.get(ENTERPRISE_USER_SCHEMA)
        .and_then(|e| e.pointer("/manager/value"))
        .and_then(Value::as_str)
        .filter(|m| !m.trim().is_empty())
}

/// Say at WARN, and count, a `manager.value` this write brought that names no user.
/// It is kept (refusing it would fail an IdP that ran for months), but the roster links
/// a manager by SCIM id alone (RFC 7643 §4.3), so the Roster API's `manager_user_id`,
/// its filter and the CSV's `manager` show none: Google and JumpCloud mappings send the
/// manager's email or employee number there, and the operator should hear of it.
/// Resolving such a value by userName would need a second, case-folded manager index
/// kept right as managers are created and renamed, for the filter's pages to agree.
/// A value the user already held is not said again: it may name a manager deleted
/// since (an IdP may PUT a report just after its manager's DELETE).
fn check_manager(
    state: &AppState,
    tenant: &str,
    kind: ResourceKind,
    res: &Resource,
    had: Option<&str>,
) {
    let Some(value) = manager_value(&res.doc).filter(|_| kind == ResourceKind::User) else {
        return;
    };
    if had == Some(value) {
        return;
    }
    // A store failure here leaves the write done; the next read says what is wrong.
    if !matches!(
        state.store.get_raw(tenant, ResourceKind::User, value),
        Ok(None)
    ) {
        return;
    }
    crate::ops::metrics::unresolved_manager(tenant);
    let shown = |v: &str| crate::text::terminal_safe(&super::quote_clipped(v, 64)).into_owned();
    let user_name = res.doc.get("userName").and_then(Value::as_str);
    tracing::warn!(
        user = %res.id,
        user_name = %shown(user_name.unwrap_or_default()),
        manager = %shown(value),
        "manager.value names no user (it must be the manager's SCIM id): kept, but the roster shows no manager for this user."
    );
}

/// How many of a body's unknown attribute names its warning lists.
const IGNORED_NAMES_LOGGED: usize = 20;

/// Normalize a client document; passwords are never stored: rosterd is not an
/// authenticator, and keeping them would only create a liability.
fn normalize(kind: ResourceKind, body: Value) -> ScimResult<Value> {
    let n = normalize_input(kind, body)?;
    warn_ignored(&n.ignored);
    let mut doc = n.resource;
    if let Some(obj) = doc.as_object_mut() {
        obj.remove("password");
    }
    Ok(doc)
}

/// A whole resource as a POST or PUT sends it: the stored document, checked, and the
/// group's members apart from it.
fn whole_resource(kind: ResourceKind, body: Value) -> ScimResult<(Value, Vec<MemberRef>)> {
    let mut doc = normalize(kind, body)?;
    one_primary_each(&doc)?;
    let members = take_members(kind, &mut doc)?.unwrap_or_default();
    check_document_size(&doc, None)?;
    Ok((doc, members))
}

async fn op_create(
    state: &AppState,
    tenant: &str,
    kind: ResourceKind,
    body: Value,
    projection: &Projection,
) -> ScimResult<Reply> {
    let (doc, members) = whole_resource(kind, body)?;
    let res = state
        .store
        .create(tenant, kind, doc, members)
        .await
        .map_err(store_to_scim)?;
    tracing::info!(id = %res.id, kind = ?kind, "Resource created.");
    check_manager(state, tenant, kind, &res, None);
    resource_reply(state, tenant, kind, &res, StatusCode::CREATED, projection)
}

/// The state a PUT or PATCH found (the store hands it to the update only), so that what
/// the write changed is logged and its manager checked (see [`log_update`],
/// [`check_manager`]).
#[derive(Clone, Default)]
struct Found(Arc<std::sync::Mutex<Option<Before>>>);

/// A resource as a write found it.
struct Before {
    version: Option<Value>,
    active: bool,
    manager: Option<String>,
}

impl Found {
    fn record(&self, old: &Value) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Before {
            version: old.pointer("/meta/version").cloned(),
            active: crate::scim::is_active(old),
            manager: manager_value(old).map(str::to_owned),
        });
    }

    /// What the write found, once it is done.
    fn take(&self) -> Option<Before> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Log a PUT or PATCH (`how`) that changed a resource: Entra and Okta deprovision by
/// PATCH or PUT `active: false`, and the journal must name the request that did it (by
/// its request id), as it does for a create or a delete. A write that changed nothing
/// (Okta's GET-then-PUT of every user) logs nothing.
fn log_update(kind: ResourceKind, res: &Resource, how: &'static str, before: Option<&Before>) {
    let Some(before) = before else { return };
    if before.version.as_ref() == res.doc.pointer("/meta/version") {
        return;
    }
    let active = crate::scim::is_active(&res.doc);
    let deactivated = kind == ResourceKind::User && before.active && !active;
    let reactivated = kind == ResourceKind::User && !before.active && active;
    // Named only when `active` changed, so that a search for them finds the changes.
    let (deactivated, reactivated) = (deactivated.then_some(true), reactivated.then_some(true));
    tracing::info!(id = %res.id, kind = ?kind, by = how, deactivated, reactivated, "Resource updated.");
}

/// A PUT that leaves `active` out keeps a deactivated user deactivated: RFC 7644 §3.5.1
/// lets an omitted attribute be taken as not asserted, and an HR client's PUT of a title
/// must not give a leaver their access back. Only `active: true` reactivates. So too for
/// a PATCH that makes `active` null: a user without one reads as active, so such a PATCH
/// reactivated a leaver everywhere the roster goes, though no one asked. (An explicit
/// remove is another matter: see [`PatchOp::removes_active`].)
fn keep_deactivated(kind: ResourceKind, old: &Value, mut doc: Value) -> Value {
    if kind == ResourceKind::User
        && !crate::scim::is_active(old)
        && let Some(obj) = doc.as_object_mut()
        && obj.get("active").is_none_or(Value::is_null)
    {
        obj.insert("active".into(), Value::Bool(false));
    }
    doc
}

async fn op_replace(
    state: &AppState,
    tenant: &str,
    kind: ResourceKind,
    id: &str,
    cond: Option<IfMatch>,
    body: Value,
    projection: &Projection,
) -> ScimResult<Reply> {
    if let Some(body_id) = body.get("id").and_then(Value::as_str)
        && body_id != id
    {
        return Err(ScimError::mutability(format!(
            "id {body_id:?} in the body does not match {id:?} in the path"
        )));
    }
    // PUT replaces the whole resource, members included (a diff is applied in the store).
    let (doc, members) = whole_resource(kind, body)?;
    let found = Found::default();
    let seen = found.clone();
    let res = state
        .store
        .update(tenant, kind, id, cond, move |old| {
            seen.record(old);
            check_immutable(kind, old, &doc)?;
            let doc = keep_deactivated(kind, old, doc);
            Ok(Update {
                doc,
                members: if kind == ResourceKind::Group {
                    vec![MemberOp::ReplaceAll(members)]
                } else {
                    vec![]
                },
            })
        })
        .await
        .map_err(store_to_scim)?;
    let before = found.take();
    log_update(kind, &res, "PUT", before.as_ref());
    let had = before.as_ref().and_then(|b| b.manager.as_deref());
    check_manager(state, tenant, kind, &res, had);
    resource_reply(state, tenant, kind, &res, StatusCode::OK, projection)
}

async fn op_patch(
    state: &AppState,
    tenant: &str,
    kind: ResourceKind,
    id: &str,
    cond: Option<IfMatch>,
    body: Value,
    projection: &Projection,
) -> ScimResult<Reply> {
    let (ops, mut ignored) = skip_unknown_extensions(parse_patch_request(body)?);
    let unassigns_active = kind == ResourceKind::User && ops.iter().any(PatchOp::removes_active);
    let (member_ops, doc_ops) = if kind == ResourceKind::Group {
        let split = split_member_ops(ops)?;
        ignored.extend(split.ignored);
        (split.members, split.doc_ops)
    } else {
        (vec![], ops)
    };
    warn_ignored(&ignored);
    check_operation_count(doc_ops.len())?;
    let found = Found::default();
    let seen = found.clone();
    let res = state
        .store
        .update(tenant, kind, id, cond, move |old| {
            seen.record(old);
            let mut doc = old.clone();
            apply(kind, &mut doc, &doc_ops)?;
            let mut doc = normalize(kind, doc)?;
            // Primaries first, while a re-sent value is still apart from the stored one
            // it repeats: merged, it would carry the stored `primary` and pass for new.
            settle_primaries(kind, old, &mut doc);
            merge_repeats(kind, &mut doc, old);
            let mut doc = if unassigns_active {
                doc
            } else {
                keep_deactivated(kind, old, doc)
            };
            if let Some(obj) = doc.as_object_mut() {
                obj.remove("members");
                obj.remove("groups");
            }
            check_immutable(kind, old, &doc)?;
            check_document_size(&doc, Some(old))?;
            Ok(Update {
                doc,
                members: member_ops,
            })
        })
        .await
        .map_err(store_to_scim)?;
    let before = found.take();
    log_update(kind, &res, "PATCH", before.as_ref());
    let had = before.as_ref().and_then(|b| b.manager.as_deref());
    check_manager(state, tenant, kind, &res, had);
    // A group's answer carries every member: 3 MB and a tenth of a second for one member
    // added to 20,000, on every PATCH Entra or Okta sends. RFC 7644 §3.5.2 lets the
    // answer be 204; a client that wants the group back asks with `attributes` or
    // `excludedAttributes`.
    if kind == ResourceKind::Group && projection.is_everything() {
        return Ok(Reply {
            status: StatusCode::NO_CONTENT,
            body: None,
            etag: Some(res.etag()),
            location: Some(location(state, tenant, kind, &res.id)),
        });
    }
    resource_reply(state, tenant, kind, &res, StatusCode::OK, projection)
}

async fn op_delete(
    state: &AppState,
    tenant: &str,
    kind: ResourceKind,
    id: &str,
    cond: Option<IfMatch>,
) -> ScimResult<Reply> {
    state
        .store
        .delete(tenant, kind, id, cond)
        .await
        .map_err(store_to_scim)?;
    tracing::info!(%id, kind = ?kind, "Resource deleted.");
    Ok(Reply {
        status: StatusCode::NO_CONTENT,
        body: None,
        etag: None,
        location: None,
    })
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

fn get_one(
    state: &AppState,
    tenant: &str,
    kind: ResourceKind,
    id: &str,
    headers: &HeaderMap,
    params: Params,
) -> ScimResult<Reply> {
    let projection = Projection::from_params(&params)?;
    let res = state
        .store
        .get(tenant, kind, id)
        .map_err(store_to_scim)?
        .ok_or_else(|| ScimError::not_found(format!("{kind:?} {id:?} not found")))?;
    // RFC 9110 §13.1.1 holds If-Match to every method: a client that reads only the
    // version it holds gets 412 rather than a newer one it did not ask for.
    if let Some(cond) = if_match(headers)?
        && !cond.admits(res.version)
    {
        return Err(store_to_scim(
            crate::store::StoreError::PreconditionFailed {
                current: res.etag(),
            },
        ));
    }
    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        let hit = inm.trim() == "*"
            || inm
                .split(',')
                .any(|t| crate::store::tag_version(t) == Some(res.version));
        if hit {
            return Ok(Reply {
                status: StatusCode::NOT_MODIFIED,
                body: None,
                etag: Some(res.etag()),
                location: None,
            });
        }
    }
    resource_reply(state, tenant, kind, &res, StatusCode::OK, &projection)
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

/// What a query of the root lists.
const BOTH: [ResourceKind; 2] = [ResourceKind::User, ResourceKind::Group];

/// `GET {base}?filter=…`, a query across users and groups (RFC 7644 §3.4.2.1), as
/// `POST {base}/.search` is.
async fn list_root(
    State(st): St,
    Path(tenant): Path<String>,
    q: ScimQuery,
    headers: HeaderMap,
) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    let query = ListQuery::from_params(&st, &lower_keys(q)?)?;
    Ok(run_list(st, tenant, BOTH.to_vec(), query)
        .await?
        .into_response())
}

async fn search_root(
    State(st): St,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    let (body, _share) = read_body(&st, &headers, body).await?;
    let query = ListQuery::from_search_body(&st, &body)?;
    Ok(run_list(st, tenant, BOTH.to_vec(), query)
        .await?
        .into_response())
}

async fn me(State(st): St, Path(tenant): Path<String>, headers: HeaderMap) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    Err(ScimError::not_implemented(
        "/Me is not supported: SCIM tokens here belong to provisioning clients, not users",
    )
    .into())
}

// ---------------------------------------------------------------------------------------
// List, filter, sort, page

#[derive(Debug, Clone)]
struct ListQuery {
    filter: Option<Filter>,
    sort_by: Option<AttrPath>,
    descending: bool,
    /// 1-based.
    start_index: usize,
    count: usize,
    projection: Projection,
}

/// An RFC 9865 client that had its `cursor` ignored would get the first page again and
/// again; ServiceProviderConfig says rosterd pages by index only.
const NO_CURSOR: &str =
    "cursor paging (RFC 9865) is not offered here: page with startIndex and count";

impl ListQuery {
    fn build(
        state: &AppState,
        filter: Option<&str>,
        sort_by: Option<&str>,
        sort_order: Option<&str>,
        start_index: Option<i64>,
        count: Option<i64>,
        projection: Projection,
    ) -> ScimResult<ListQuery> {
        let filter = match filter.map(str::trim).filter(|f| !f.is_empty()) {
            Some(f) => Some(parse_filter(f)?),
            None => None,
        };
        let sort_by = match sort_by.map(str::trim).filter(|s| !s.is_empty()) {
            Some(s) => {
                let mut paths = parse_attr_list(s)
                    .map_err(|e| ScimError::invalid_value(format!("sortBy: {}", e.detail)))?;
                if paths.len() != 1 {
                    return Err(ScimError::invalid_value("sortBy names one attribute"));
                }
                paths.pop()
            }
            None => None,
        };
        let descending = match sort_order.map(str::trim) {
            None | Some("") => false,
            Some(o) if o.eq_ignore_ascii_case("ascending") => false,
            Some(o) if o.eq_ignore_ascii_case("descending") => true,
            Some(o) => {
                return Err(ScimError::invalid_value(format!(
                    "sortOrder {o:?} is neither ascending nor descending"
                )));
            }
        };
        // RFC 7644 §3.4.2.4: values below 1 are treated as 1, negative counts as 0.
        let start_index = start_index.unwrap_or(1).max(1) as usize;
        let max = state.config.scim.max_results;
        let count = count.map(|c| c.max(0) as usize).unwrap_or(max).min(max);
        Ok(ListQuery {
            filter,
            sort_by,
            descending,
            start_index,
            count,
            projection,
        })
    }

    fn from_params(state: &AppState, p: &Params) -> ScimResult<ListQuery> {
        if p.contains_key("cursor") {
            return Err(ScimError::invalid_value(NO_CURSOR));
        }
        // Looked up by lower-case name, named in errors as RFC 7644 spells it.
        let int = |name: &str| -> ScimResult<Option<i64>> {
            match p.get(&name.to_ascii_lowercase()) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    ScimError::invalid_value(format!("{name} must be an integer, not {v:?}"))
                }),
            }
        };
        Self::build(
            state,
            p.get("filter").map(String::as_str),
            p.get("sortby").map(String::as_str),
            p.get("sortorder").map(String::as_str),
            int("startIndex")?,
            int("count")?,
            Projection::from_params(p)?,
        )
    }

    fn from_search_body(state: &AppState, body: &Value) -> ScimResult<ListQuery> {
        let obj = body
            .as_object()
            .ok_or_else(|| ScimError::invalid_syntax("a SearchRequest must be a JSON object"))?;
        let field = |name: &str| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        };
        if field("cursor").is_some() {
            return Err(ScimError::invalid_value(NO_CURSOR));
        }
        let schemas_ok = field("schemas").and_then(Value::as_array).is_some_and(|a| {
            a.iter().any(|s| {
                s.as_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case(SEARCH_SCHEMA))
            })
        });
        if !schemas_ok {
            return Err(ScimError::invalid_syntax(format!(
                "schemas must contain {SEARCH_SCHEMA}"
            )));
        }
        let string = |name: &str| -> ScimResult<Option<String>> {
            match field(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Array(a)) => {
                    let parts: Option<Vec<&str>> = a.iter().map(Value::as_str).collect();
                    parts
                        .map(|p| Some(p.join(",")))
                        .ok_or_else(|| ScimError::invalid_value(format!("{name} must be strings")))
                }
                Some(_) => Err(ScimError::invalid_value(format!("{name} must be a string"))),
            }
        };
        let int = |name: &str| -> ScimResult<Option<i64>> {
            match field(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_i64()
                    .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                    .map(Some)
                    .ok_or_else(|| ScimError::invalid_value(format!("{name} must be an integer"))),
            }
        };
        let projection = Projection {
            attributes: match string("attributes")? {
                Some(a) => parse_attr_list(&a)?,
                None => vec![],
            },
            excluded: match string("excludedAttributes")? {
                Some(a) => parse_attr_list(&a)?,
                None => vec![],
            },
        };
        Self::build(
            state,
            string("filter")?.as_deref(),
            string("sortBy")?.as_deref(),
            string("sortOrder")?.as_deref(),
            int("startIndex")?,
            int("count")?,
            projection,
        )
    }
}

/// Candidate ids from an index, when the filter pins an indexed attribute with `eq`.
/// `None` means a scan is needed. The full filter is still evaluated on each candidate.
fn index_plan(
    store: &Store,
    tenant: &str,
    kind: ResourceKind,
    filter: &Filter,
) -> ScimResult<Option<Vec<String>>> {
    match filter {
        Filter::And(a, b) => {
            if let Some(ids) = index_plan(store, tenant, kind, a)? {
                return Ok(Some(ids));
            }
            index_plan(store, tenant, kind, b)
        }
        Filter::Or(a, b) => {
            let (Some(mut x), Some(y)) = (
                index_plan(store, tenant, kind, a)?,
                index_plan(store, tenant, kind, b)?,
            ) else {
                return Ok(None);
            };
            x.extend(y);
            Ok(Some(x))
        }
        Filter::Compare {
            path,
            op: CompareOp::Eq,
            value: Value::String(v),
        } => index_lookup(store, tenant, kind, path, None, v),
        Filter::ValuePath { path, filter } => match filter.as_ref() {
            Filter::Compare {
                path: inner,
                op: CompareOp::Eq,
                value: Value::String(v),
            } if inner.sub.is_none() && inner.urn.is_none() => {
                index_lookup(store, tenant, kind, path, Some(&inner.attr), v)
            }
            Filter::And(..) => {
                // `emails[type eq "work" and value eq "x"]`: use whichever side indexes.
                let mut found = None;
                for side in and_terms(filter) {
                    if let Filter::Compare {
                        path: inner,
                        op: CompareOp::Eq,
                        value: Value::String(v),
                    } = side
                        && let Some(ids) =
                            index_lookup(store, tenant, kind, path, Some(&inner.attr), v)?
                    {
                        found = Some(ids);
                        break;
                    }
                }
                Ok(found)
            }
            _ => Ok(None),
        },
        _ => Ok(None),
    }
}

fn and_terms(f: &Filter) -> Vec<&Filter> {
    match f {
        Filter::And(a, b) => {
            let mut v = and_terms(a);
            v.extend(and_terms(b));
            v
        }
        other => vec![other],
    }
}

fn index_lookup(
    store: &Store,
    tenant: &str,
    kind: ResourceKind,
    path: &AttrPath,
    sub_override: Option<&str>,
    value: &str,
) -> ScimResult<Option<Vec<String>>> {
    let sub = sub_override.or(path.sub.as_deref());
    let core = path.urn.as_deref().is_none_or(|u| {
        u.eq_ignore_ascii_case(USER_SCHEMA) || u.eq_ignore_ascii_case(GROUP_SCHEMA)
    });
    let ent = path
        .urn
        .as_deref()
        .is_some_and(|u| u.eq_ignore_ascii_case(ENTERPRISE_USER_SCHEMA));
    let attr = path.attr.to_ascii_lowercase();
    let query = match (
        kind,
        core,
        ent,
        attr.as_str(),
        sub.map(str::to_ascii_lowercase),
    ) {
        (_, true, _, "id", None) => {
            return Ok(Some(
                store
                    .get(tenant, kind, value)
                    .map_err(store_to_scim)?
                    .map(|r| r.id)
                    .into_iter()
                    .collect(),
            ));
        }
        (ResourceKind::User, true, _, "username", None) => IndexQuery::UserName(value.into()),
        (ResourceKind::User, true, _, "externalid", None) => IndexQuery::ExternalId(value.into()),
        (ResourceKind::User, true, _, "emails", None) => IndexQuery::Email(value.into()),
        (ResourceKind::User, true, _, "emails", Some(s)) if s == "value" => {
            IndexQuery::Email(value.into())
        }
        (ResourceKind::User, _, true, "manager", Some(s)) if s == "value" => {
            IndexQuery::Manager(value.into())
        }
        (ResourceKind::User, _, true, "department", None) => IndexQuery::Department(value.into()),
        (ResourceKind::Group, true, _, "displayname", None) => IndexQuery::GroupName(value.into()),
        (ResourceKind::Group, true, _, "externalid", None) => {
            return Ok(Some(
                store
                    .lookup_group_external_id(tenant, value)
                    .map_err(store_to_scim)?,
            ));
        }
        _ => return Ok(None),
    };
    Ok(Some(store.lookup(tenant, &query).map_err(store_to_scim)?))
}

/// A value to order by, per the attribute's type; missing values sort last.
#[derive(Debug, Clone, PartialEq, PartialOrd)]
enum SortKey {
    Bool(bool),
    Num(f64),
    Text(String),
}

fn sort_key(kind: ResourceKind, doc: &Value, path: &AttrPath) -> Option<SortKey> {
    let obj = doc.as_object()?;
    let get = |o: &Map<String, Value>, name: &str| -> Option<Value> {
        o.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let base = match path.urn.as_deref() {
        Some(u)
            if !u.eq_ignore_ascii_case(USER_SCHEMA) && !u.eq_ignore_ascii_case(GROUP_SCHEMA) =>
        {
            get(obj, u)?
        }
        _ => doc.clone(),
    };
    let mut v = get(base.as_object()?, &path.attr)?;
    if let Value::Array(items) = &v {
        // Multi-valued: the primary element, else the first (RFC 7644 §3.4.2.3).
        let pick = items
            .iter()
            .find(|e| e.get("primary").and_then(Value::as_bool) == Some(true))
            .or_else(|| items.first())?
            .clone();
        v = match &path.sub {
            Some(s) => get(pick.as_object()?, s)?,
            None => pick.get("value").cloned().unwrap_or(pick),
        };
    } else if let Some(s) = &path.sub {
        v = get(v.as_object()?, s)?;
    } else if let Value::Object(o) = &v {
        // A single complex attribute sorts by its `value` (`manager`), as a multi-valued
        // one does; it sorted as nothing.
        v = get(o, "value")?;
    }
    let case_exact = lookup(kind, path.urn.as_deref(), &path.attr, path.sub.as_deref())
        .map(|d| d.case_exact)
        .unwrap_or(path.attr.eq_ignore_ascii_case("id"));
    match v {
        Value::Bool(b) => Some(SortKey::Bool(b)),
        Value::Number(n) => n.as_f64().map(SortKey::Num),
        Value::String(s) => Some(SortKey::Text(if case_exact { s } else { s.to_lowercase() })),
        _ => None,
    }
}

async fn run_list(
    state: Arc<AppState>,
    tenant: String,
    kinds: Vec<ResourceKind>,
    query: ListQuery,
) -> ScimResult<Reply> {
    if let Some(unknown) = query
        .filter
        .as_ref()
        .and_then(|f| f.unknown_attr(&|p| defs_in(&kinds, p).next().is_some()))
    {
        // It would match nothing, which an IdP matching users reads as "no such user"
        // before creating one; a PATCH path naming it is refused as well.
        return Err(ScimError::invalid_filter(format!(
            "{unknown} is not an attribute of {}",
            endpoints(&kinds)
        )));
    }
    if let Some(f) = &query.filter {
        check_comparisons(&kinds, f)?;
    }
    // Sorted by what no resource holds, a list came back in id order with a 200: a typo
    // in `sortBy` went unnoticed (RFC 7644 §3.4.2.3 leaves it to the server).
    if let Some(path) = &query.sort_by
        && !sortable(&kinds, path)
    {
        return Err(ScimError::invalid_value(format!(
            "sortBy: {path} is not an attribute of {} that a list can be sorted by",
            endpoints(&kinds)
        )));
    }
    let span = tracing::Span::current();
    let listed = tokio::task::spawn_blocking(move || {
        span.in_scope(|| list_blocking(&state, &tenant, &kinds, &query))
    })
    .await;
    listed.map_err(|e| store_to_scim(crate::store::StoreError::from_join(e)))?
}

/// Whether a list can be sorted by `path`: an attribute the endpoint's schemas define that
/// has one value to sort by. Not `meta.location` (made as a resource is answered), a
/// user's `groups` or a group's `members` (stored apart from the document), `password`
/// (never kept), or a complex attribute without a `value` of its own (`name`): each
/// sorted as nothing, in id order, with a 200.
fn sortable(kinds: &[ResourceKind], path: &AttrPath) -> bool {
    let is = |name: &str| path.attr.eq_ignore_ascii_case(name);
    let mut defs = defs_in(kinds, path).peekable();
    if defs.peek().is_none() || is("groups") || is("members") || is("password") {
        return false;
    }
    if is_meta_location(path) {
        return false;
    }
    defs.all(|d| !d.is_valueless_complex())
}

/// `meta.location`, which is made from the id as a resource is answered, not stored: no
/// filter or sort can read it.
fn is_meta_location(p: &AttrPath) -> bool {
    p.attr.eq_ignore_ascii_case("meta")
        && p.sub
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("location"))
}

/// `/Users`, `/Groups` or `/Users or /Groups`, for errors.
fn endpoints(kinds: &[ResourceKind]) -> String {
    kinds
        .iter()
        .map(|k| k.endpoint())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// A comparison that can never be true is 400 `invalidFilter`, for the reason an unknown
/// attribute is: it would match nothing, and an IdP reads "nothing" as "no such user".
/// That is `gt`, `ge`, `lt` or `le` on a boolean or binary attribute (RFC 7644
/// §3.4.2.2), and a value the attribute can never hold (`meta.created gt "soon"`,
/// `active eq "maybe"`, `userName eq true`). Numbers against strings stay, as
/// `employeeNumber eq 701` means the digits. So is a substring operator on a boolean, a
/// comparison of a complex attribute that has no `value` (`name eq "Alice"`), and any
/// filter on `meta.location`, which is made as a resource is answered, not stored.
fn check_comparisons(kinds: &[ResourceKind], filter: &Filter) -> ScimResult<()> {
    use schema::AttrKind;
    let comparisons = filter.comparisons();
    if filter.attr_paths().into_iter().any(is_meta_location)
        || comparisons.iter().any(|(p, ..)| is_meta_location(p))
    {
        return Err(ScimError::invalid_filter(
            "meta.location is made from the resource's id as it is answered and is not stored: filter on id instead",
        ));
    }
    let misapplied = comparisons
        .iter()
        .find(|(path, op, _)| defs_in(kinds, path).any(|d| !op.applies_to(d.kind)));
    if let Some((path, op, _)) = misapplied {
        return Err(ScimError::invalid_filter(format!(
            "{path} {}",
            op.misapplied()
        )));
    }
    let whole = comparisons
        .iter()
        .find(|(path, ..)| defs_in(kinds, path).any(schema::AttrDef::is_valueless_complex));
    if let Some((path, ..)) = whole {
        return Err(ScimError::invalid_filter(format!(
            "{path} is complex and has no value of its own: compare one of its sub-attributes (such as {path}.{})",
            defs_in(kinds, path)
                .find_map(|d| d.sub_attributes.first())
                .map_or("…", |s| s.name)
        )));
    }
    for (path, _, value) in comparisons {
        let Some(kind) = defs_in(kinds, &path).map(|d| d.kind).next() else {
            continue;
        };
        let fits = match (kind, value) {
            (_, Value::Null) => true,
            (AttrKind::DateTime, Value::String(s)) => {
                crate::scim::filter::parse_datetime(s).is_some()
            }
            (AttrKind::DateTime, _) => false,
            (AttrKind::Boolean, Value::Bool(_)) => true,
            (AttrKind::Boolean, Value::String(s)) => {
                s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("false")
            }
            (AttrKind::Boolean, _) => false,
            (AttrKind::String | AttrKind::Reference | AttrKind::Binary, Value::Bool(_)) => false,
            _ => true,
        };
        if !fits {
            let what = match kind {
                AttrKind::DateTime => "a dateTime (such as \"2026-01-31T09:00:00Z\")",
                AttrKind::Boolean => "a boolean (true or false)",
                _ => "a string",
            };
            return Err(ScimError::invalid_filter(format!(
                "{path} is {what}; compared with {value} it can match nothing"
            )));
        }
    }
    Ok(())
}

/// What the schemas of `kinds` define at the path (core, common or extension), one per
/// kind that has it.
fn defs_in<'a>(
    kinds: &'a [ResourceKind],
    p: &'a AttrPath,
) -> impl Iterator<Item = &'static schema::AttrDef> + 'a {
    kinds
        .iter()
        .filter_map(|k| lookup(*k, p.urn.as_deref(), &p.attr, p.sub.as_deref()))
}

fn filter_touches(filter: &Filter, attr: &str) -> bool {
    filter
        .attr_paths()
        .iter()
        .any(|p| p.attr.eq_ignore_ascii_case(attr))
}

/// Stream every candidate through the filter, keeping only the requested page (or, when
/// sorting, only sort keys and ids) in memory.
fn list_blocking(
    state: &AppState,
    tenant: &str,
    kinds: &[ResourceKind],
    q: &ListQuery,
) -> ScimResult<Reply> {
    if q.filter.is_none() && q.sort_by.is_none() {
        return unfiltered_page(state, tenant, kinds, q);
    }
    let store = &state.store;
    let skip = q.start_index - 1;
    let mut total = 0usize;
    let mut page: Vec<(ResourceKind, Resource)> = Vec::new();
    let mut sortable: Vec<(Option<SortKey>, ResourceKind, String)> = Vec::new();
    let max_sort = state.config.scim.max_sort_results;

    for &kind in kinds {
        let relation = match kind {
            ResourceKind::Group => "members",
            ResourceKind::User => "groups",
        };
        let needs_relations = q
            .filter
            .as_ref()
            .is_some_and(|f| filter_touches(f, relation));
        let mut consider = |res: Resource| -> ScimResult<()> {
            if let Some(f) = &q.filter {
                let matched = if needs_relations {
                    let mut doc = res.doc.clone();
                    attach_relations(state, tenant, kind, &mut doc, &res.id)?;
                    f.matches(kind, &doc)
                } else {
                    f.matches(kind, &res.doc)
                };
                if !matched {
                    return Ok(());
                }
            }
            total += 1;
            if let Some(path) = &q.sort_by {
                if sortable.len() >= max_sort {
                    return Err(ScimError::too_many(format!(
                        "more than {max_sort} matches to sort; narrow the filter"
                    )));
                }
                sortable.push((sort_key(kind, &res.doc, path), kind, res.id));
            } else if total > skip && page.len() < q.count {
                page.push((kind, res));
            }
            Ok(())
        };
        let planned = match &q.filter {
            Some(f) => index_plan(store, tenant, kind, f)?,
            None => None,
        };
        match planned {
            Some(mut ids) => {
                ids.sort();
                ids.dedup();
                for id in ids {
                    if let Some(res) = store.get(tenant, kind, &id).map_err(store_to_scim)? {
                        consider(res)?;
                    }
                }
            }
            None => {
                for res in store.scan(tenant, kind).map_err(store_to_scim)? {
                    consider(res.map_err(store_to_scim)?)?;
                }
            }
        }
    }

    if q.sort_by.is_some() {
        sortable.sort_by(|a, b| {
            let ord = match (&a.0, &b.0) {
                (Some(x), Some(y)) => x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            };
            let ord = if q.descending { ord.reverse() } else { ord };
            ord.then_with(|| a.2.cmp(&b.2))
        });
        for (_, kind, id) in sortable.into_iter().skip(skip).take(q.count) {
            if let Some(res) = store.get(tenant, kind, &id).map_err(store_to_scim)? {
                page.push((kind, res));
            }
        }
    }

    list_reply(state, tenant, q, total, &page)
}

/// A list with neither filter nor sort, as identity providers page through everything
/// (`startIndex` stepping by `count`): the total comes from the store's counters and only
/// the page's documents are read, where a filtered list decodes every candidate.
fn unfiltered_page(
    state: &AppState,
    tenant: &str,
    kinds: &[ResourceKind],
    q: &ListQuery,
) -> ScimResult<Reply> {
    let store = &state.store;
    let mut skip = q.start_index - 1;
    let mut total = 0usize;
    let mut page: Vec<(ResourceKind, Resource)> = Vec::new();
    for &kind in kinds {
        let n = usize::try_from(store.count(tenant, kind).map_err(store_to_scim)?)
            .unwrap_or(usize::MAX);
        total = total.saturating_add(n);
        let want = q.count - page.len();
        if skip >= n {
            skip -= n;
            continue;
        }
        if want > 0 {
            for id in store
                .ids_page(tenant, kind, skip, want)
                .map_err(store_to_scim)?
            {
                if let Some(res) = store.get(tenant, kind, &id).map_err(store_to_scim)? {
                    page.push((kind, res));
                }
            }
        }
        skip = 0;
    }
    list_reply(state, tenant, q, total, &page)
}

fn list_reply(
    state: &AppState,
    tenant: &str,
    q: &ListQuery,
    total: usize,
    page: &[(ResourceKind, Resource)],
) -> ScimResult<Reply> {
    let mut resources = Vec::with_capacity(page.len());
    for (kind, res) in page {
        resources.push(render(state, tenant, *kind, res, &q.projection)?);
    }
    Ok(ok(json!({
        "schemas": [LIST_SCHEMA],
        "totalResults": total,
        "startIndex": q.start_index,
        "itemsPerPage": resources.len(),
        "Resources": resources,
    })))
}

// ---------------------------------------------------------------------------------------
// Bulk (RFC 7644 §3.7)

async fn bulk(
    State(st): St,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    let (body, _share) = read_body(&st, &headers, body).await?;
    Ok(run_bulk(&st, &tenant, body).await?.into_response())
}

/// Replace every `"bulkId:x"` string with the id created for `x`. An unresolved
/// reference is an error for that operation.
fn resolve_bulk_ids(v: &mut Value, ids: &HashMap<String, String>) -> ScimResult<()> {
    match v {
        Value::String(s) => {
            if let Some(key) = s.strip_prefix("bulkId:") {
                match ids.get(key) {
                    Some(id) => *s = id.clone(),
                    None => {
                        return Err(ScimError::invalid_value(format!(
                            "bulkId {key:?} does not name a successful POST of this request"
                        )));
                    }
                }
            }
        }
        Value::Array(a) => {
            for x in a {
                resolve_bulk_ids(x, ids)?;
            }
        }
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                match x {
                    // A PATCH path names members by value inside a filter
                    // (`members[value eq "bulkId:x"]`); left as it is, the filter would
                    // match no one and the remove would succeed doing nothing.
                    Value::String(path) if k.eq_ignore_ascii_case("path") => {
                        resolve_bulk_ids_in_filter(path, ids)?;
                    }
                    _ => resolve_bulk_ids(x, ids)?,
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Replace each quoted `"bulkId:x"` inside a PATCH path's filter with the id created
/// for `x`.
fn resolve_bulk_ids_in_filter(path: &mut String, ids: &HashMap<String, String>) -> ScimResult<()> {
    const MARK: &str = "\"bulkId:";
    let mut out = String::with_capacity(path.len());
    let mut rest = path.as_str();
    while let Some(pos) = rest.find(MARK) {
        let after = &rest[pos + MARK.len()..];
        let Some(end) = after.find('"') else { break };
        let key = &after[..end];
        let id = ids.get(key).ok_or_else(|| {
            ScimError::invalid_value(format!(
                "bulkId {key:?} does not name a successful POST of this request"
            ))
        })?;
        out.push_str(&rest[..pos]);
        out.push('"');
        out.push_str(id);
        out.push('"');
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    *path = out;
    Ok(())
}

fn parse_bulk_path(path: &str) -> ScimResult<(ResourceKind, Option<String>)> {
    let trimmed = path.trim().trim_start_matches('/');
    let mut parts = trimmed.splitn(2, '/');
    let kind = match parts.next().unwrap_or("") {
        p if p.eq_ignore_ascii_case("Users") => ResourceKind::User,
        p if p.eq_ignore_ascii_case("Groups") => ResourceKind::Group,
        other => {
            return Err(ScimError::invalid_value(format!(
                "bulk path {other:?} is not /Users or /Groups"
            )));
        }
    };
    let id = parts.next().filter(|s| !s.is_empty()).map(str::to_owned);
    Ok((kind, id))
}

async fn run_bulk(state: &AppState, tenant: &str, body: Value) -> ScimResult<Reply> {
    let Value::Object(obj) = body else {
        return Err(ScimError::invalid_syntax(
            "a BulkRequest must be a JSON object",
        ));
    };
    // As in an operation: a misspelt `failOnError`, read as absent, ran every operation
    // after the first error.
    let mut obj = canonical_keys(obj, &BULK_REQUEST_KEYS, &[], "", "a BulkRequest")?;
    let schemas_ok = obj
        .get("schemas")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter().any(|s| {
                s.as_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case(BULK_REQUEST_SCHEMA))
            })
        });
    if !schemas_ok {
        return Err(ScimError::invalid_syntax(format!(
            "schemas must contain {BULK_REQUEST_SCHEMA}"
        )));
    }
    // Taken out of the body, not copied: a request of 16 MiB is held once.
    let Some(Value::Array(ops)) = obj.remove("Operations") else {
        return Err(ScimError::invalid_syntax("Operations must be an array"));
    };
    let max_ops = state.config.scim.bulk_max_operations;
    if ops.len() > max_ops {
        return Err(ScimError::new(
            413,
            None,
            format!(
                "the request has {} operations; the limit is {max_ops}",
                ops.len()
            ),
        ));
    }
    let fail_on_errors =
        match obj.get("failOnErrors") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
                ScimError::invalid_value("failOnErrors must be a positive integer")
            })? as usize),
        };

    // An operation's keys are attribute names, read in any letter case (RFC 7643
    // §2.1): `"Version"` read as absent wrote without the check the client asked for.
    let ops: Vec<Value> = ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| canonical_operation(i, op))
        .collect::<ScimResult<_>>()?;

    // bulkIds must be unique: a duplicate would make references ambiguous. A reference
    // ends at a quote inside a filter, so a bulkId holding one could not be named.
    let mut seen = HashSet::new();
    for op in &ops {
        if let Some(b) = op.get("bulkId").and_then(Value::as_str) {
            if b.is_empty() || b.contains('"') {
                return Err(ScimError::invalid_value(format!(
                    "bulkId {b:?}: a bulkId is not empty and holds no double quote"
                )));
            }
            if !seen.insert(b) {
                return Err(ScimError::invalid_value(format!(
                    "bulkId {b:?} is used twice"
                )));
            }
        }
    }

    // RFC 7644 §3.7.1: an operation may name a resource a later POST creates. It runs
    // right after that POST; what waits in a circle (itself included) can never run,
    // which the RFC lets us refuse with 409.
    let posts: HashSet<&str> = ops
        .iter()
        .filter(|op| {
            op.get("method")
                .and_then(Value::as_str)
                .is_some_and(|m| m.eq_ignore_ascii_case("POST"))
        })
        .filter_map(|op| op.get("bulkId").and_then(Value::as_str))
        .collect();
    // What each operation waits for, read once: a chain written backwards takes as many
    // passes as it is long, and reading the bodies on every pass made it quadratic.
    let waits_on: Vec<Vec<String>> = ops
        .iter()
        .map(|op| {
            let mut refs = Vec::new();
            bulk_refs(op, &mut refs);
            refs.retain(|r| posts.contains(r.as_str()));
            refs.sort_unstable();
            refs.dedup();
            refs
        })
        .collect();
    let can_run = runnable(&ops, &waits_on, &posts);
    // The resource each PUT, PATCH or DELETE writes, by its path as written: one that
    // waits holds back the later ones on the same resource, so the request's last write
    // to it is the one that stands. (A POST makes a resource of its own.)
    let targets: Vec<Option<String>> = ops
        .iter()
        .map(|op| {
            let method = op.get("method").and_then(Value::as_str)?;
            if method.eq_ignore_ascii_case("POST") {
                return None;
            }
            let path = op.get("path").and_then(Value::as_str)?;
            let (kind, id) = parse_bulk_path(path).ok()?;
            Some(format!("{}/{}", kind.endpoint(), id?))
        })
        .collect();
    let order = bulk_order(&ops, &waits_on, &can_run, &targets);

    // Run one at a time in that order: when failOnErrors stops the request, nothing
    // after the failed operation runs, as the README says, and what did not run has no
    // entry in the response.
    let mut created: HashMap<String, String> = HashMap::new();
    let mut results: Vec<Option<Value>> = vec![None; ops.len()];
    let mut errors = 0usize;
    for i in order {
        let entry = if can_run[i] {
            run_bulk_entry(state, tenant, &ops[i], &mut created).await
        } else {
            failed_entry(
                bulk_entry_head(&ops[i]),
                ScimError::new(
                    409,
                    None,
                    "this operation waits for a bulkId no operation can create first: its \
                     own, or one of operations that wait for each other's (itself, or one it \
                     waits for); create one of them without the reference and add it with a \
                     PATCH",
                ),
            )
        };
        errors += usize::from(entry.get("response").is_some());
        results[i] = Some(Value::Object(entry));
        if fail_on_errors.is_some_and(|limit| errors >= limit) {
            break;
        }
    }
    Ok(ok(json!({
        "schemas": [BULK_RESPONSE_SCHEMA],
        "Operations": results.into_iter().flatten().collect::<Vec<_>>(),
    })))
}

/// The names RFC 7644 §3.7 gives a BulkRequest's keys.
const BULK_REQUEST_KEYS: [&str; 3] = ["schemas", "failOnErrors", "Operations"];

/// The names RFC 7644 §3.7 gives a bulk operation's keys.
const BULK_OPERATION_KEYS: [&str; 5] = ["method", "bulkId", "version", "path", "data"];
/// The keys RFC 7644 §3.7.3 gives an operation's result only: a client whose one model
/// serves both (scim2-models' BulkOperation) may send them, and they ask for nothing.
const BULK_RESULT_KEYS: [&str; 3] = ["location", "response", "status"];

/// Operation `i` with its keys spelt as RFC 7644 §3.7 spells them. A key given twice in
/// two letter cases, or one the RFC does not name (`"verison"`, which would have written
/// without the check it misspells), refuses the request before anything runs.
fn canonical_operation(i: usize, op: Value) -> ScimResult<Value> {
    let Value::Object(obj) = op else {
        return Ok(op);
    };
    canonical_keys(
        obj,
        &BULK_OPERATION_KEYS,
        &BULK_RESULT_KEYS,
        &format!("Operations[{i}]: "),
        "a bulk operation",
    )
    .map(Value::Object)
}

/// `obj` with each key spelt as `names` spells it, read in any letter case, and the
/// `ignored` ones dropped. Any other key, or one given twice in two cases, is refused,
/// the message led by `at` and naming the object as `what`.
fn canonical_keys(
    obj: Map<String, Value>,
    names: &[&'static str],
    ignored: &[&str],
    at: &str,
    what: &str,
) -> ScimResult<Map<String, Value>> {
    let mut out = Map::with_capacity(obj.len());
    for (k, v) in obj {
        if ignored.iter().any(|n| n.eq_ignore_ascii_case(&k)) {
            continue;
        }
        let Some(name) = names.iter().find(|n| n.eq_ignore_ascii_case(&k)) else {
            return Err(ScimError::invalid_syntax(format!(
                "{at}{:?} is not a key of {what} ({})",
                super::clip(&k, 64),
                names.join(", ")
            )));
        };
        if out.insert((*name).to_owned(), v).is_some() {
            return Err(ScimError::invalid_syntax(format!(
                "{at}{name} is given twice (its name is case-insensitive); give it once"
            )));
        }
    }
    Ok(out)
}

/// Which operations can run: every POST each waits for can (`posts`, the request's
/// POSTs' bulkIds). What is left waits in a circle, or on one. Each operation is looked
/// at once, and again as what it waits for is found runnable: passes over the whole
/// request until nothing changed took seconds for 13 MB of references.
fn runnable(ops: &[Value], waits_on: &[Vec<String>], posts: &HashSet<&str>) -> Vec<bool> {
    let mut missing: Vec<usize> = waits_on.iter().map(Vec::len).collect();
    let mut waiters: HashMap<&str, Vec<usize>> = HashMap::new();
    for (j, refs) in waits_on.iter().enumerate() {
        for r in refs {
            waiters.entry(r.as_str()).or_default().push(j);
        }
    }
    let mut can_run = vec![false; ops.len()];
    let mut free: Vec<usize> = (0..ops.len()).filter(|&i| missing[i] == 0).collect();
    while let Some(i) = free.pop() {
        can_run[i] = true;
        let Some(b) = ops[i]
            .get("bulkId")
            .and_then(Value::as_str)
            .filter(|b| posts.contains(b))
        else {
            continue;
        };
        for &w in waiters.get(b).into_iter().flatten() {
            missing[w] -= 1;
            if missing[w] == 0 {
                free.push(w);
            }
        }
    }
    can_run
}

/// The order a /Bulk request's operations run in: the request's, except that one waiting
/// for a later POST's bulkId runs right after that POST, and one writing a resource that
/// a waiting one writes runs after it. One that can never run (`can_run` false) takes
/// its place in the request, where it fails. Each operation is looked at when it comes
/// and when what it waits for is done, so 1,000 operations naming 1,000 bulkIds each
/// cost no more than reading them (rescanning what waits took 2 s there).
fn bulk_order(
    ops: &[Value],
    waits_on: &[Vec<String>],
    can_run: &[bool],
    targets: &[Option<String>],
) -> Vec<usize> {
    use std::collections::{BTreeSet, HashMap};
    let n = ops.len();
    let mut missing: Vec<usize> = waits_on.iter().map(Vec::len).collect();
    let mut waiters: HashMap<&str, Vec<usize>> = HashMap::new();
    for (j, refs) in waits_on.iter().enumerate() {
        for r in refs {
            waiters.entry(r.as_str()).or_default().push(j);
        }
    }
    // Per resource, the operations on it that came and have not run, earliest first:
    // only the first may run.
    let mut queued: HashMap<&str, BTreeSet<usize>> = HashMap::new();
    let mut ready: BTreeSet<usize> = BTreeSet::new();
    let mut order = Vec::with_capacity(n);
    let first_on = |queued: &HashMap<&str, BTreeSet<usize>>, j: usize| {
        targets[j]
            .as_deref()
            .is_none_or(|t| queued.get(t).and_then(|q| q.first()) == Some(&j))
    };
    for i in 0..n {
        if let Some(t) = targets[i].as_deref() {
            queued.entry(t).or_default().insert(i);
        }
        if !can_run[i] || (missing[i] == 0 && first_on(&queued, i)) {
            ready.insert(i);
        }
        while let Some(j) = ready.pop_first() {
            order.push(j);
            if let Some(t) = targets[j].as_deref()
                && let Some(q) = queued.get_mut(t)
            {
                q.remove(&j);
                if let Some(&next) = q.first()
                    && can_run[next]
                    && missing[next] == 0
                {
                    ready.insert(next);
                }
            }
            if !can_run[j] {
                continue;
            }
            let Some(b) = ops[j].get("bulkId").and_then(Value::as_str) else {
                continue;
            };
            for &w in waiters.get(b).into_iter().flatten() {
                missing[w] -= 1;
                // One that has not come yet is looked at when it does.
                if missing[w] == 0 && w <= i && can_run[w] && first_on(&queued, w) {
                    ready.insert(w);
                }
            }
        }
    }
    order
}

/// The bulkIds an operation refers to: `bulkId:x` in its path, its data, or a quoted one
/// inside a PATCH path's filter.
fn bulk_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(pos) = rest.find("bulkId:") {
                let after = &rest[pos + "bulkId:".len()..];
                let end = after.find('"').unwrap_or(after.len());
                out.push(after[..end].to_owned());
                rest = &after[end..];
            }
        }
        Value::Array(a) => a.iter().for_each(|x| bulk_refs(x, out)),
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("bulkId"))
            .for_each(|(_, x)| bulk_refs(x, out)),
        _ => {}
    }
}

/// A result entry's `method` and `bulkId`.
fn bulk_entry_head(op: &Value) -> Map<String, Value> {
    let mut entry = Map::new();
    let method = op.get("method").and_then(Value::as_str).unwrap_or("");
    entry.insert("method".into(), Value::String(method.to_ascii_uppercase()));
    if let Some(b) = op.get("bulkId").and_then(Value::as_str) {
        entry.insert("bulkId".into(), Value::String(b.to_owned()));
    }
    entry
}

/// Run one bulk operation and describe its outcome; a POST's bulkId is recorded with
/// the id it created, if it succeeded.
async fn run_bulk_entry(
    state: &AppState,
    tenant: &str,
    op: &Value,
    created: &mut HashMap<String, String>,
) -> Map<String, Value> {
    let method_name = op
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_uppercase();
    let bulk_id = op.get("bulkId").and_then(Value::as_str).map(str::to_owned);
    let target = bulk_target(op, &method_name, created);
    // RFC 7644 §3.7.3: every entry but a failed POST's says where its resource is. An id
    // that could be no resource's (`../../other/Users/x`, a line break) would make a
    // location that is no URI, or another tenant's path: left out.
    let target_location = match &target {
        Ok((kind, Some(id)))
            if !matches!(id.as_str(), "." | "..")
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)) =>
        {
            Some(location(state, tenant, *kind, id))
        }
        _ => None,
    };
    // Each operation counts as the request it stands for would: a /Bulk answers 200
    // whatever its operations met, and a store outage's 503s went uncounted.
    // By the path as written when it does not resolve (`/Users/bulkId:t` after t's POST
    // failed is still an operation on Users).
    let kind = target.as_ref().ok().map(|(kind, _)| *kind).or_else(|| {
        let path = op.get("path").and_then(Value::as_str)?;
        parse_bulk_path(path).ok().map(|(kind, _)| kind)
    });
    let counted = crate::ops::metrics::ScimOp::of_bulk_operation(kind, &method_name);
    let outcome = match target {
        Ok((kind, id)) => run_bulk_op(state, tenant, op, &method_name, kind, id, created).await,
        Err(e) => Err(e),
    };
    let status = match &outcome {
        Ok((reply, _)) => reply.status,
        Err(e) => StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    };
    crate::ops::metrics::record_scim_operation(tenant, counted, status);
    let mut entry = bulk_entry_head(op);
    match outcome {
        Ok((reply, id)) => {
            if let (Some(b), Some(id)) = (&bulk_id, &id)
                && method_name == "POST"
            {
                created.insert(b.clone(), id.clone());
            }
            // A DELETE's answer has none of its own.
            if let Some(loc) = reply.location.or(target_location) {
                entry.insert("location".into(), Value::String(loc));
            }
            if let Some(v) = reply.etag {
                entry.insert("version".into(), Value::String(v));
            }
            entry.insert(
                "status".into(),
                Value::String(reply.status.as_u16().to_string()),
            );
        }
        Err(e) => {
            if let Some(loc) = target_location {
                entry.insert("location".into(), Value::String(loc));
            }
            return failed_entry(entry, e);
        }
    }
    entry
}

/// A result entry for an operation that failed with `e`.
fn failed_entry(mut entry: Map<String, Value>, e: ScimError) -> Map<String, Value> {
    entry.insert("status".into(), Value::String(e.status.to_string()));
    entry.insert("response".into(), e.to_json());
    entry
}

/// The resource type an operation's path names, and its id with any `bulkId:` reference
/// resolved; a POST's path names no id (RFC 7644 §3.7: "MUST specify a resource type
/// endpoint"), since it would be ignored.
fn bulk_target(
    op: &Value,
    method: &str,
    created: &HashMap<String, String>,
) -> ScimResult<(ResourceKind, Option<String>)> {
    let path = op
        .get("path")
        .and_then(Value::as_str)
        .ok_or_else(|| ScimError::invalid_syntax("every bulk operation needs a path"))?;
    let mut path = path.to_owned();
    if let Some(pos) = path.find("bulkId:") {
        let key = &path[pos + "bulkId:".len()..];
        let id = created.get(key).ok_or_else(|| {
            ScimError::invalid_value(format!("bulkId {key:?} has not been created"))
        })?;
        path = format!("{}{id}", &path[..pos]);
    }
    let (kind, id) = parse_bulk_path(&path)?;
    if method == "POST" && id.is_some() {
        return Err(ScimError::invalid_value(format!(
            "a POST's path is the resource type's endpoint, /{}, without an id",
            kind.endpoint()
        )));
    }
    Ok((kind, id))
}

/// An operation's `version`: its precondition, as `If-Match` is outside /Bulk.
fn bulk_version(op: &Value) -> ScimResult<Option<IfMatch>> {
    match op.get("version") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(v)) => Ok(Some(etag_list(v))),
        // Dropping it would write without the check the client asked for.
        Some(other) => Err(ScimError::invalid_syntax(format!(
            "version must be a string, an ETag such as W/\"3\" or \"*\", not {other}"
        ))),
    }
}

async fn run_bulk_op(
    state: &AppState,
    tenant: &str,
    op: &Value,
    method: &str,
    kind: ResourceKind,
    id: Option<String>,
    created: &HashMap<String, String>,
) -> ScimResult<(Reply, Option<String>)> {
    let mut data = op.get("data").cloned();
    if let Some(d) = data.as_mut() {
        resolve_bulk_ids(d, created)?;
    }
    let cond = bulk_version(op)?;
    let need_id = || {
        id.clone().ok_or_else(|| {
            ScimError::invalid_value(format!("{method} needs /{}/{{id}}", kind.endpoint()))
        })
    };
    let need_data = || {
        data.clone()
            .ok_or_else(|| ScimError::invalid_syntax(format!("{method} needs data")))
    };
    // No operation of /Bulk answers with its resource.
    let all = Projection::default();
    let reply = match method {
        "POST" => {
            if op.get("bulkId").and_then(Value::as_str).is_none() {
                return Err(ScimError::invalid_syntax("POST in /Bulk needs a bulkId"));
            }
            op_create(state, tenant, kind, need_data()?, &all).await?
        }
        "PUT" => op_replace(state, tenant, kind, &need_id()?, cond, need_data()?, &all).await?,
        "PATCH" => op_patch(state, tenant, kind, &need_id()?, cond, need_data()?, &all).await?,
        "DELETE" => op_delete(state, tenant, kind, &need_id()?, cond).await?,
        other => {
            return Err(ScimError::invalid_syntax(format!(
                "bulk method {other:?} is not POST, PUT, PATCH or DELETE"
            )));
        }
    };
    let new_id = reply
        .location
        .as_deref()
        .and_then(|l| l.rsplit('/').next())
        .map(str::to_owned);
    Ok((reply, new_id))
}

// ---------------------------------------------------------------------------------------
// Discovery (RFC 7644 §4)

fn spc_json(state: &AppState, tenant: &str) -> Value {
    let scim = &state.config.scim;
    json!({
        "schemas": [SPC_SCHEMA],
        "documentationUri": "https://github.com/rosterd/rosterd#readme",
        "patch": {"supported": true},
        "bulk": {
            "supported": true,
            "maxOperations": scim.bulk_max_operations,
            "maxPayloadSize": state.config.server.max_body_bytes,
        },
        "filter": {"supported": true, "maxResults": scim.max_results},
        // RFC 9865 §4: say that pages go by startIndex, so a cursor client does not try.
        "pagination": {
            "cursor": false,
            "index": true,
            "defaultPaginationMethod": "index",
            "defaultPageSize": scim.max_results,
            "maxPageSize": scim.max_results,
        },
        "changePassword": {"supported": false},
        "sort": {"supported": true},
        "etag": {"supported": true},
        "authenticationSchemes": [{
            "type": "oauthbearertoken",
            "name": "OAuth Bearer Token",
            "description": "A per-tenant bearer token created with `rosterd token new`.",
            "specUri": "https://www.rfc-editor.org/info/rfc6750",
            "primary": true,
        }],
        "meta": {
            "resourceType": "ServiceProviderConfig",
            "location": format!("{}/ServiceProviderConfig", tenant_base(state, tenant)),
        },
    })
}

async fn service_provider_config(
    State(st): St,
    Path(tenant): Path<String>,
    q: ScimQuery,
    headers: HeaderMap,
) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    refuse_filter(&q.read()?)?;
    Ok(ok(spc_json(&st, &tenant)).into_response())
}

/// RFC 7644 §4: the discovery endpoints ignore sorting and paging, but a `filter` is 403,
/// so that a client cannot take the whole list for the matches.
fn refuse_filter(query: &[(String, String)]) -> ScimResult<()> {
    if query.iter().any(|(k, _)| k.eq_ignore_ascii_case("filter")) {
        return Err(ScimError::new(
            403,
            None,
            "the discovery endpoints (ServiceProviderConfig, Schemas, ResourceTypes) take no filter (RFC 7644 §4): read the whole list",
        ));
    }
    Ok(())
}

fn all_schemas(state: &AppState, tenant: &str) -> Vec<Value> {
    let base = tenant_base(state, tenant);
    [&schema::USER, &schema::ENTERPRISE_USER, &schema::GROUP]
        .into_iter()
        .map(|s| schema::schema_json(s, &base))
        .collect()
}

fn list_response(items: Vec<Value>) -> Value {
    json!({
        "schemas": [LIST_SCHEMA],
        "totalResults": items.len(),
        "startIndex": 1,
        "itemsPerPage": items.len(),
        "Resources": items,
    })
}

async fn schemas(
    State(st): St,
    Path(tenant): Path<String>,
    q: ScimQuery,
    headers: HeaderMap,
) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    refuse_filter(&q.read()?)?;
    Ok(ok(list_response(all_schemas(&st, &tenant))).into_response())
}

async fn schema_by_id(
    State(st): St,
    Path((tenant, id)): Path<(String, String)>,
    q: ScimQuery,
    headers: HeaderMap,
) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    refuse_filter(&q.read()?)?;
    one_by_id(all_schemas(&st, &tenant), &id, "schema")
}

/// The discovery document whose `id` is `id` (any case), or 404 naming `what` it is.
fn one_by_id(documents: Vec<Value>, id: &str, what: &str) -> HandlerResult {
    documents
        .into_iter()
        .find(|d| d["id"].as_str().is_some_and(|d| d.eq_ignore_ascii_case(id)))
        .map(|d| ok(d).into_response())
        .ok_or_else(|| ScimError::not_found(format!("{what} {id:?} not found")).into())
}

fn all_resource_types(state: &AppState, tenant: &str) -> Vec<Value> {
    let base = tenant_base(state, tenant);
    vec![
        json!({
            "schemas": [RESOURCE_TYPE_SCHEMA],
            "id": "User",
            "name": "User",
            "endpoint": "/Users",
            "description": "User Account",
            "schema": USER_SCHEMA,
            "schemaExtensions": [{"schema": ENTERPRISE_USER_SCHEMA, "required": false}],
            "meta": {"resourceType": "ResourceType", "location": format!("{base}/ResourceTypes/User")},
        }),
        json!({
            "schemas": [RESOURCE_TYPE_SCHEMA],
            "id": "Group",
            "name": "Group",
            "endpoint": "/Groups",
            "description": "Group",
            "schema": GROUP_SCHEMA,
            "meta": {"resourceType": "ResourceType", "location": format!("{base}/ResourceTypes/Group")},
        }),
    ]
}

async fn resource_types(
    State(st): St,
    Path(tenant): Path<String>,
    q: ScimQuery,
    headers: HeaderMap,
) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    refuse_filter(&q.read()?)?;
    Ok(ok(list_response(all_resource_types(&st, &tenant))).into_response())
}

async fn resource_type_by_id(
    State(st): St,
    Path((tenant, id)): Path<(String, String)>,
    q: ScimQuery,
    headers: HeaderMap,
) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    refuse_filter(&q.read()?)?;
    one_by_id(all_resource_types(&st, &tenant), &id, "resource type")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order as first written: after each operation runs, look again from the
    /// request's start for the first one that is ready. Plain, and quadratic.
    fn rescanning_order(
        ops: &[Value],
        waits_on: &[Vec<String>],
        can_run: &[bool],
        targets: &[Option<String>],
    ) -> Vec<usize> {
        let mut order = Vec::new();
        let mut posted: HashSet<&str> = HashSet::new();
        let mut pending: Vec<usize> = Vec::new();
        for i in 0..ops.len() {
            pending.push(i);
            'again: loop {
                let mut held: HashSet<&str> = HashSet::new();
                for (k, &j) in pending.iter().enumerate() {
                    let target = targets[j].as_deref();
                    let ready = !can_run[j]
                        || (waits_on[j].iter().all(|r| posted.contains(r.as_str()))
                            && !target.is_some_and(|t| held.contains(t)));
                    if ready {
                        pending.remove(k);
                        order.push(j);
                        if can_run[j]
                            && let Some(b) = ops[j].get("bulkId").and_then(Value::as_str)
                        {
                            posted.insert(b);
                        }
                        continue 'again;
                    }
                    held.extend(target);
                }
                break;
            }
        }
        order.extend(pending);
        order
    }

    /// The counting order is the rescanning one, on thousands of small random requests:
    /// POSTs, and writes to a few resources, naming bulkIds before and after them, in
    /// circles too.
    #[test]
    fn bulk_order_counts_to_the_order_a_rescan_gives() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..5_000 {
            let n = 1 + next(12) as usize;
            let mut ops = Vec::new();
            let mut targets = Vec::new();
            let mut waits_on = Vec::new();
            for i in 0..n {
                let post = next(2) == 0;
                ops.push(if post {
                    json!({"method": "POST", "bulkId": format!("b{i}")})
                } else {
                    json!({"method": "PATCH"})
                });
                targets.push((!post).then(|| format!("Users/{}", next(3))));
                let mut refs: Vec<String> = (0..next(3))
                    .map(|_| format!("b{}", next(n as u64)))
                    .collect();
                refs.sort_unstable();
                refs.dedup();
                waits_on.push(refs);
            }
            // Only POSTs' bulkIds are waited for, as run_bulk keeps them.
            let posts: HashSet<&str> = ops
                .iter()
                .filter_map(|o| o.get("bulkId").and_then(Value::as_str))
                .collect();
            for refs in &mut waits_on {
                refs.retain(|r| posts.contains(r.as_str()));
            }
            let can_run = runnable(&ops, &waits_on, &posts);
            // Against passes over the request until nothing changes.
            let mut passes = vec![false; n];
            loop {
                let before = passes.clone();
                for i in 0..n {
                    passes[i] = passes[i]
                        || waits_on[i].iter().all(|r| {
                            (0..n).any(|j| {
                                before[j] && ops[j].get("bulkId").and_then(Value::as_str) == Some(r)
                            })
                        });
                }
                if passes == before {
                    break;
                }
            }
            assert_eq!(can_run, passes, "{ops:?} waiting {waits_on:?}");
            let counted = bulk_order(&ops, &waits_on, &can_run, &targets);
            let rescanned = rescanning_order(&ops, &waits_on, &can_run, &targets);
            assert_eq!(
                counted, rescanned,
                "{ops:?} waiting {waits_on:?} on {targets:?}, can run {can_run:?}"
            );
        }
    }
}
