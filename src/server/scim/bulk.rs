//! /Bulk (RFC 7644 §3.7): the request read and checked, the order its operations run
//! in (one naming a later POST's bulkId runs after that POST), and each run by the
//! write operations the single-resource endpoints run, its outcome an entry of the
//! answer. The largest part of the SCIM endpoints, and one no other part calls.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};

use super::render::Projection;
use super::write::{op_create, op_delete, op_patch, op_replace};
use super::{HandlerResult, Reply, St, authorize, etag_list, location, ok, read_body};
use crate::scim::schema::ResourceKind;
use crate::scim::{ScimError, ScimResult};
use crate::server::AppState;
use crate::store::IfMatch;

const BULK_REQUEST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:BulkRequest";
const BULK_RESPONSE_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:BulkResponse";

// ---------------------------------------------------------------------------------------
// Bulk (RFC 7644 §3.7)

pub(super) async fn bulk(
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
