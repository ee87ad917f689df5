//! The write operations: create, replace (PUT), patch and delete. Each is a plain
//! function returning a `Reply`, so /Bulk runs the code the single-resource endpoints
//! run; with them are what a write checks and logs on the way (unknown attributes
//! dropped, a manager that names no user, a deactivated user kept so, what changed).

use axum::http::StatusCode;
use serde_json::Value;
use std::sync::Arc;

use super::render::{Projection, resource_reply};
use super::{Reply, location};
use crate::scim::patch::{
    MemberOp, MemberRef, PatchOp, apply, check_operation_count, parse_patch_request,
    skip_unknown_extensions, split_member_ops,
};
use crate::scim::resource::{
    check_document_size, check_immutable, merge_repeats, normalize_input, one_primary_each,
    settle_primaries,
};
use crate::scim::schema::{ENTERPRISE_USER_SCHEMA, ResourceKind};
use crate::scim::{ScimError, ScimResult};
use crate::server::AppState;
use crate::server::error::store_to_scim;
use crate::store::{IfMatch, Resource, Update};

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

pub(super) async fn op_create(
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

pub(super) async fn op_replace(
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

pub(super) async fn op_patch(
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

pub(super) async fn op_delete(
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
