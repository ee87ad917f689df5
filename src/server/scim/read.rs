//! Reads: one resource by id, and the lists and searches of users, groups or both
//! (filter, sort, page), with the index lookups a filter can use and the checks that
//! refuse a filter or sort that could only match or order nothing. Apart from the
//! writes, which share with them only the rendering.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Map, Value, json};
use std::sync::Arc;

use super::render::{Projection, attach_relations, render, resource_reply};
use super::{
    HandlerResult, LIST_SCHEMA, Params, Reply, ScimQuery, St, authorize, if_match, lower_keys, ok,
    read_body,
};
use crate::scim::filter::{AttrPath, CompareOp, Filter, parse_attr_list, parse_filter};
use crate::scim::schema::{
    self, ENTERPRISE_USER_SCHEMA, GROUP_SCHEMA, ResourceKind, USER_SCHEMA, lookup,
};
use crate::scim::{ScimError, ScimResult};
use crate::server::AppState;
use crate::server::error::store_to_scim;
use crate::store::{IndexQuery, Resource, Store};

const SEARCH_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:SearchRequest";

pub(super) fn get_one(
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

/// What a query of the root lists.
const BOTH: [ResourceKind; 2] = [ResourceKind::User, ResourceKind::Group];

/// `GET {base}?filter=…`, a query across users and groups (RFC 7644 §3.4.2.1), as
/// `POST {base}/.search` is.
pub(super) async fn list_root(
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

pub(super) async fn search_root(
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

// ---------------------------------------------------------------------------------------
// List, filter, sort, page

#[derive(Debug, Clone)]
pub(super) struct ListQuery {
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

    pub(super) fn from_params(state: &AppState, p: &Params) -> ScimResult<ListQuery> {
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

    pub(super) fn from_search_body(state: &AppState, body: &Value) -> ScimResult<ListQuery> {
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

pub(super) async fn run_list(
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
