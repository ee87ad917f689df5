//! Rendering: which attributes an answer carries (`Projection`), and a resource as it
//! is answered, with what is stored apart from its document (a group's members, a
//! user's groups) and its location. Apart because the writes, the reads and the lists
//! all answer with it.

use axum::http::StatusCode;
use serde_json::{Map, Value};

use super::{Params, Reply, location};
use crate::scim::ScimResult;
use crate::scim::filter::{AttrPath, parse_attr_list};
use crate::scim::resource::project;
use crate::scim::schema::{GROUP_SCHEMA, ResourceKind, USER_SCHEMA};
use crate::server::AppState;
use crate::server::error::store_to_scim;
use crate::store::Resource;

// ---------------------------------------------------------------------------------------
// Rendering

/// Which attributes a response carries.
#[derive(Debug, Clone, Default)]
pub(super) struct Projection {
    pub(super) attributes: Vec<AttrPath>,
    pub(super) excluded: Vec<AttrPath>,
}

impl Projection {
    /// No `attributes` and no `excludedAttributes`: the resource as it is returned by default.
    pub(super) fn is_everything(&self) -> bool {
        self.attributes.is_empty() && self.excluded.is_empty()
    }

    pub(super) fn from_params(params: &Params) -> ScimResult<Projection> {
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
pub(super) fn attach_relations(
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

pub(super) fn render(
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

pub(super) fn resource_reply(
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
