//! SCIM PATCH (RFC 7644 §3.5.2): parsing the request and applying it to a stored document,
//! including the dialects Entra ID and Okta really send (`../shared/reference/idp-quirks.md`).
//!
//! Group membership is not part of the stored document (each membership is its own store
//! key, so large groups stay cheap); [`split_member_ops`] turns member operations into
//! [`MemberOp`]s the store applies key by key.
use serde_json::{Map, Value};

use crate::scim::error::{ScimError, ScimResult};
use crate::scim::filter::{AttrPath, CompareOp, Filter, PatchPath, parse_path, present};
use crate::scim::resource::{
    HeldValues, check_value_count, complex_entries, encoded_object, types_agree, value_key,
};
use crate::scim::schema::{self, AttrDef, AttrKind, Mutability, ResourceKind};

pub const PATCH_OP_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchOpKind {
    Add,
    Remove,
    Replace,
}

#[derive(Debug, Clone)]
pub struct PatchOp {
    pub op: PatchOpKind,
    pub path: Option<PatchPath>,
    pub value: Option<Value>,
    /// The op as the client named it: a `replace` with null is applied as a `remove`.
    pub sent_as: PatchOpKind,
}

impl PatchOp {
    /// A `remove` the client named, of the core `active` itself: RFC 7644 §3.5.2.2 has
    /// the attribute go (the public conformance suite checks it), where a null `active`
    /// is an unasserted value, as in a PUT (see `server::scim::write::keep_deactivated`).
    pub fn removes_active(&self) -> bool {
        self.sent_as == PatchOpKind::Remove
            && self.path.as_ref().is_some_and(|p| {
                p.filter.is_none()
                    && p.sub_after_filter.is_none()
                    && p.attr.sub.is_none()
                    && p.attr.is_core()
                    && p.attr.attr.eq_ignore_ascii_case("active")
            })
    }
}

/// A member as a client names it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberRef {
    pub value: String,
    /// `User` or `Group` when the client said which.
    pub kind: Option<String>,
    pub display: Option<String>,
}

/// A change to a group's membership, applied by the store without loading the group.
#[derive(Debug, Clone)]
pub enum MemberOp {
    Add(Vec<MemberRef>),
    Remove(Vec<String>),
    RemoveAll,
    ReplaceAll(Vec<MemberRef>),
    /// Remove every member the value filter (over `value`, `type`, `display`) selects.
    RemoveMatching(Filter),
    /// Replace the members the filter selects with these; 400 `noTarget` when it selects
    /// none (RFC 7644 §3.5.2.3), as a filtered `replace` of emails is.
    ReplaceMatching(Filter, Vec<MemberRef>),
}

fn get_ci<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

fn take_ci(obj: &mut Map<String, Value>, name: &str) -> Option<Value> {
    let key = key_ci(obj, name)?;
    obj.remove(&key)
}

/// The key under which `name` is stored in `obj`, if any (names match case-insensitively).
fn key_ci(obj: &Map<String, Value>, name: &str) -> Option<String> {
    if obj.contains_key(name) {
        return Some(name.to_owned());
    }
    obj.keys().find(|k| k.eq_ignore_ascii_case(name)).cloned()
}

/// Parse a PatchOp request body. Errors are `invalidSyntax`, `invalidPath` or
/// `invalidValue`, so a malformed request is refused before anything is applied.
/// The body is taken, not borrowed: its values move into the operations, since a copy
/// of a 15 MB body costs a few hundred MB as `Value`s.
pub fn parse_patch_request(body: Value) -> ScimResult<Vec<PatchOp>> {
    let Value::Object(mut obj) = body else {
        return Err(ScimError::invalid_syntax("a PATCH body is a JSON object"));
    };
    if let Some(schemas) = get_ci(&obj, "schemas") {
        let ok = schemas.as_array().is_some_and(|a| {
            a.iter().any(|s| {
                s.as_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case(PATCH_OP_SCHEMA))
            })
        });
        if !ok {
            return Err(ScimError::invalid_syntax(format!(
                "a PATCH body's schemas must contain {PATCH_OP_SCHEMA}"
            )));
        }
    }
    let Some(Value::Array(items)) = take_ci(&mut obj, "Operations") else {
        return Err(ScimError::invalid_syntax(
            "a PATCH body needs an \"Operations\" array",
        ));
    };
    if items.is_empty() {
        return Err(ScimError::invalid_syntax("\"Operations\" is empty"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            parse_op(item).map_err(|mut e| {
                e.detail = format!("Operations[{i}]: {}", e.detail);
                e
            })
        })
        .collect()
}

fn parse_op(item: Value) -> ScimResult<PatchOp> {
    let Value::Object(mut o) = item else {
        return Err(ScimError::invalid_syntax("an operation is a JSON object"));
    };
    let op = match get_ci(&o, "op").and_then(Value::as_str) {
        Some(s) if s.eq_ignore_ascii_case("add") => PatchOpKind::Add,
        Some(s) if s.eq_ignore_ascii_case("remove") => PatchOpKind::Remove,
        Some(s) if s.eq_ignore_ascii_case("replace") => PatchOpKind::Replace,
        Some(s) => {
            return Err(ScimError::invalid_syntax(format!(
                "unknown op {s:?}; expected add, remove or replace"
            )));
        }
        None => return Err(ScimError::invalid_syntax("\"op\" is missing")),
    };
    let path = match get_ci(&o, "path") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) if p.trim().is_empty() => None,
        Some(Value::String(p)) => Some(parse_path(p.trim())?),
        Some(_) => return Err(ScimError::invalid_path("\"path\" must be a string")),
    };
    let sent = take_ci(&mut o, "value");
    // RFC 7643 §2.5: null and unassigned are the same state, so replacing an attribute
    // with null clears it, as a remove of the same path does (some IdPs clear a title
    // this way). An add of null adds nothing and stays refused below.
    let sent_as = op;
    let op = match (op, &path, &sent) {
        (PatchOpKind::Replace, Some(_), Some(Value::Null)) => PatchOpKind::Remove,
        (op, ..) => op,
    };
    let value = sent.filter(|v| !v.is_null());
    match (op, &path, &value) {
        (PatchOpKind::Remove, None, _) => Err(ScimError::no_target(
            "remove needs a \"path\" (RFC 7644 §3.5.2.2)",
        )),
        (PatchOpKind::Add, _, None) => Err(ScimError::invalid_value(
            "add needs a \"value\" (to clear an attribute, remove it, or replace it with null)",
        )),
        (PatchOpKind::Replace, _, None) => Err(ScimError::invalid_value(
            "replace needs a \"value\" (null clears the attribute its \"path\" names)",
        )),
        (PatchOpKind::Add | PatchOpKind::Replace, None, Some(v)) if !v.is_object() => {
            Err(ScimError::invalid_value(
                "without a \"path\", \"value\" must be an object of attributes",
            ))
        }
        _ => Ok(PatchOp {
            op,
            path,
            value,
            sent_as,
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Extension schemas rosterd does not know

/// The ids of the schemas rosterd has a definition of, for either resource kind.
fn known_schemas() -> impl Iterator<Item = &'static str> {
    [ResourceKind::User, ResourceKind::Group]
        .into_iter()
        .flat_map(|k| schema::schemas_of(k).iter().map(|s| s.id))
}

/// Whether `urn`, the schema part of a qualified attribute name, is an extension schema
/// rosterd has no definition of (an Entra custom extension,
/// `urn:ietf:params:scim:schemas:extension:CustomExtensionName:2.0:User`). Not a core
/// schema misspelt (`urn:…:core:2.0:Usr`) nor a longer path inside a known schema
/// (`urn:…:core:2.0:User:name:givenName`): those are a client's mistake about a schema
/// rosterd has, and stay refused.
fn unknown_extension(urn: &str) -> bool {
    let urn = urn.to_ascii_lowercase();
    // The core and enterprise schemas' own namespaces: a URN there that rosterd does
    // not know is a misspelt known schema (`…:enterprise:2.0:Usr`), refused as an
    // unknown attribute, not skipped as someone's extension.
    !urn.starts_with("urn:ietf:params:scim:schemas:core:")
        && !urn.starts_with("urn:ietf:params:scim:schemas:extension:enterprise:")
        && !known_schemas().any(|k| {
            let k = k.to_ascii_lowercase();
            urn == k || urn.starts_with(&format!("{k}:"))
        })
}

/// Whether a path-less value's key, or a path, lies in an extension schema rosterd does
/// not know: it is such a schema's URN (a key holding an object of its attributes), or
/// an attribute qualified by one. Either way, what precedes its last `:` is no known
/// schema, unless it is a known schema's URN alone.
fn in_unknown_extension(name: &str) -> bool {
    super::urn_prefixed(name)
        && !known_schemas().any(|k| k.eq_ignore_ascii_case(name))
        && name
            .rsplit_once(':')
            .is_some_and(|(urn, _)| unknown_extension(urn))
}

/// Drop what `ops` change in extension schemas rosterd does not know, and name it: a
/// whole operation whose path lies in one, and the keys of a path-less value that do.
/// A POST or PUT ignores such attributes (with a warning); refusing the PATCH instead
/// lost the operations beside them (Entra sends a custom extension's attribute in the
/// same request as a title change, and retries the user until it quarantines the job).
/// An unknown attribute of a known schema is left for `apply` to refuse.
pub fn skip_unknown_extensions(ops: Vec<PatchOp>) -> (Vec<PatchOp>, Vec<String>) {
    let mut skipped = Vec::new();
    let mut kept = Vec::with_capacity(ops.len());
    for mut op in ops {
        match &op.path {
            Some(p) => {
                let name = p.attr.to_string();
                if in_unknown_extension(&name) {
                    skipped.push(name);
                    continue;
                }
            }
            None => {
                if let Some(Value::Object(attrs)) = &mut op.value {
                    attrs.retain(|key, _| {
                        let unknown = in_unknown_extension(key);
                        if unknown {
                            skipped.push(key.clone());
                        }
                        !unknown
                    });
                }
            }
        }
        kept.push(op);
    }
    (kept, skipped)
}

// ---------------------------------------------------------------------------------------
// Membership

fn is_members(kind: ResourceKind, p: &AttrPath) -> bool {
    kind == ResourceKind::Group && p.is_core() && p.attr.eq_ignore_ascii_case("members")
}

fn member_refs(value: Value, ignored: &mut Vec<String>) -> ScimResult<Vec<MemberRef>> {
    let items = match value {
        Value::Array(items) => items,
        other => vec![other],
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::String(s) => Ok(MemberRef {
                value: s,
                kind: None,
                display: None,
            }),
            Value::Object(o) => {
                // A key no member has is dropped and named, as in a POST or PUT body.
                for key in o.keys() {
                    let known = crate::scim::schema::MEMBER_SUBS
                        .iter()
                        .any(|d| d.name.eq_ignore_ascii_case(key));
                    if !known {
                        let name = format!("members.{key}");
                        if !ignored.contains(&name) {
                            ignored.push(name);
                        }
                    }
                }
                let value = get_ci(&o, "value")
                    .and_then(Value::as_str)
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        ScimError::invalid_value("every member needs a string \"value\"")
                    })?;
                let text = |k: &str| -> ScimResult<Option<String>> {
                    match get_ci(&o, k).and_then(Value::as_str) {
                        Some(t) => {
                            crate::scim::resource::check_text(t, &format!("members.{k}"))?;
                            Ok(Some(t.to_owned()))
                        }
                        None => Ok(None),
                    }
                };
                crate::scim::resource::check_text(value, "members.value")?;
                Ok(MemberRef {
                    value: value.to_owned(),
                    kind: text("type")?,
                    display: text("display")?,
                })
            }
            _ => Err(ScimError::invalid_value(
                "a member is an object with a \"value\"",
            )),
        })
        .collect()
}

/// `value eq "a" or value eq "b"`: the ids named, or None for any other filter.
fn member_ids_of(filter: &Filter) -> Option<Vec<String>> {
    match filter {
        Filter::Compare {
            path,
            op: CompareOp::Eq,
            value: Value::String(v),
        } if path.urn.is_none()
            && path.sub.is_none()
            && path.attr.eq_ignore_ascii_case("value") =>
        {
            Some(vec![v.clone()])
        }
        Filter::Or(a, b) => {
            let mut ids = member_ids_of(a)?;
            ids.extend(member_ids_of(b)?);
            Some(ids)
        }
        _ => None,
    }
}

/// A group PATCH apart: its membership changes, the changes to the document proper, and
/// the member sub-attributes it sent that no member has.
#[derive(Debug)]
pub struct GroupPatch {
    pub members: Vec<MemberOp>,
    pub doc_ops: Vec<PatchOp>,
    pub ignored: Vec<String>,
}

/// The ids of the members a `remove`'s value names. An entry that names none
/// (`{"value": null}`, `{}`) is passed over, as for any multi-valued attribute, rather
/// than refused.
fn named_members(value: &Value, ignored: &mut Vec<String>) -> ScimResult<Vec<String>> {
    let named = named(Some(value)).unwrap_or_default();
    Ok(member_refs(Value::Array(named), ignored)?
        .into_iter()
        .map(|m| m.value)
        .collect())
}

/// `value eq "a" or value eq "b" …` over these member ids; `None` for none. Balanced, so
/// that thousands of ids nest only as deep as their logarithm (a chain as long as the
/// list overflowed a worker's stack once).
fn any_member_of(mut ids: Vec<String>) -> Option<Filter> {
    match ids.len() {
        0 => None,
        1 => ids.pop().map(|id| Filter::Compare {
            path: AttrPath::simple("value"),
            op: CompareOp::Eq,
            value: Value::String(id),
        }),
        n => {
            let right = ids.split_off(n / 2);
            Some(Filter::Or(
                Box::new(any_member_of(ids)?),
                Box::new(any_member_of(right)?),
            ))
        }
    }
}

/// Separate a group PATCH into membership changes and changes to the document proper.
pub fn split_member_ops(ops: Vec<PatchOp>) -> ScimResult<GroupPatch> {
    let kind = ResourceKind::Group;
    let mut members = Vec::new();
    let mut doc_ops = Vec::new();
    let mut ignored = Vec::new();
    for op in ops {
        match op.path {
            Some(path) if is_members(kind, &path.attr) => {
                if path.attr.sub.is_some() || path.sub_after_filter.is_some() {
                    return Err(ScimError::invalid_path(
                        "member sub-attributes are immutable; add or remove whole members",
                    ));
                }
                match (op.op, path.filter, op.value) {
                    (PatchOpKind::Add, None, Some(v)) => {
                        members.push(MemberOp::Add(member_refs(v, &mut ignored)?))
                    }
                    (PatchOpKind::Replace, None, Some(v)) => {
                        members.push(MemberOp::ReplaceAll(member_refs(v, &mut ignored)?));
                    }
                    // Entra's older dialect names the members to remove in `value`.
                    (PatchOpKind::Remove, None, Some(v)) if !v.is_null() => {
                        members.push(MemberOp::Remove(named_members(&v, &mut ignored)?))
                    }
                    (PatchOpKind::Remove, None, _) => members.push(MemberOp::RemoveAll),
                    (PatchOpKind::Remove, Some(f), v) => {
                        // A value narrows what the filter selects, as it does for emails.
                        let named = match v.filter(|v| !v.is_null()) {
                            Some(v) => Some(named_members(&v, &mut ignored)?),
                            None => None,
                        };
                        members.push(match (member_ids_of(&f), named) {
                            (Some(ids), None) => MemberOp::Remove(ids),
                            (Some(ids), Some(n)) => MemberOp::Remove(
                                ids.into_iter().filter(|i| n.contains(i)).collect(),
                            ),
                            (None, None) => MemberOp::RemoveMatching(f),
                            (None, Some(n)) => match any_member_of(n) {
                                Some(of) => {
                                    MemberOp::RemoveMatching(Filter::And(Box::new(f), Box::new(of)))
                                }
                                None => MemberOp::Remove(vec![]),
                            },
                        });
                    }
                    (PatchOpKind::Replace, Some(f), Some(v)) => {
                        members.push(MemberOp::ReplaceMatching(f, member_refs(v, &mut ignored)?));
                    }
                    (PatchOpKind::Add, Some(f), Some(v)) => {
                        // An add creates what it names, matched or not, as for emails.
                        members.push(MemberOp::RemoveMatching(f));
                        members.push(MemberOp::Add(member_refs(v, &mut ignored)?));
                    }
                    (_, _, None) => {
                        return Err(ScimError::invalid_value("add and replace need a \"value\""));
                    }
                }
            }
            None if op.op != PatchOpKind::Remove => {
                let mut value = op.value;
                if let Some(Value::Object(obj)) = value.as_mut()
                    && let Some(key) = key_ci(obj, "members")
                    && let Some(list) = obj.remove(&key)
                {
                    members.push(match op.op {
                        PatchOpKind::Replace => {
                            MemberOp::ReplaceAll(member_refs(list, &mut ignored)?)
                        }
                        _ => MemberOp::Add(member_refs(list, &mut ignored)?),
                    });
                }
                if value
                    .as_ref()
                    .and_then(Value::as_object)
                    .is_some_and(|o| !o.is_empty())
                {
                    doc_ops.push(PatchOp {
                        op: op.op,
                        path: None,
                        value,
                        sent_as: op.sent_as,
                    });
                }
            }
            path => doc_ops.push(PatchOp {
                op: op.op,
                path,
                value: op.value,
                sent_as: op.sent_as,
            }),
        }
    }
    Ok(GroupPatch {
        members,
        doc_ops,
        ignored,
    })
}

// ---------------------------------------------------------------------------------------
// Applying to a document

/// The most operations one PATCH applies to a resource's document (a group's membership
/// changes apart, which take another, cheaper path). Each walks the attribute it changes:
/// 250,000 of them on a user with 1,000 emails held the tenant's writes for 48 s, and no
/// identity provider sends more than a few dozen.
pub const MAX_PATCH_OPERATIONS: usize = 1000;

/// Apply `ops` in order to `doc`. The caller normalizes the result (booleans sent as
/// strings, attribute-name case) and persists it only if every operation succeeded.
pub fn apply(kind: ResourceKind, doc: &mut Value, ops: &[PatchOp]) -> ScimResult<()> {
    if !doc.is_object() {
        return Err(ScimError::invalid_value("resource is not an object"));
    }
    check_operation_count(ops.len())?;
    // Elements with nothing of their own, per attribute, that the result may hold: those
    // the resource had.
    let allowed = hollow_elements(kind, doc);
    let had: std::collections::BTreeMap<&str, Vec<Value>> = hollow_of(kind, doc)
        .into_iter()
        .map(|(name, items)| (name, items.into_iter().cloned().collect()))
        .collect();
    // By attribute, how many elements a `remove` left with nothing of their own.
    let mut hollowed = std::collections::BTreeMap::<&'static str, usize>::new();
    for op in ops {
        one_primary_in(op)?;
        let before = super::resource::primaries_of(doc);
        let hollow_before = (op.op == PatchOpKind::Remove).then(|| hollow_elements(kind, doc));
        match &op.path {
            None => apply_pathless(kind, doc, op.op, op.value.as_ref())?,
            Some(p) => apply_path(kind, doc, op.op, p, op.value.as_ref(), true)?,
        }
        super::resource::check_list_sizes(doc)?;
        super::resource::settle_primaries(kind, &before, doc);
        if let Some(was) = hollow_before {
            for (name, n) in hollow_elements(kind, doc) {
                let more = n.saturating_sub(was.get(name).copied().unwrap_or(0));
                if more > 0 {
                    *hollowed.entry(name).or_default() += more;
                }
            }
        }
    }
    // A remove that leaves an element with nothing of its own (`remove emails[type eq
    // "work"].value`, Entra's way to clear the work address) removes the element: kept,
    // the user had a primary email with no address, which a PATCH may not make. Judged
    // on the result, so that a later operation of the request giving it a value again
    // keeps its `primary`; the resource's own such elements stay, and one a filtered
    // operation made so is still refused below.
    for (name, removed) in hollowed {
        let had = had.get(name).map_or(&[][..], Vec::as_slice);
        drop_new_hollow(kind, doc, name, had, removed);
    }
    // A filtered operation that matches nothing makes the element its filter describes;
    // one left with nothing of its own (`replace emails[type eq "work"].primary` on a
    // user with no work address: an address-less email, made the primary) is refused.
    // Judged on the result, so that `.primary` before `.value` in one request passes.
    let now = hollow_elements(kind, doc);
    if let Some((name, _)) = now
        .iter()
        .find(|(name, n)| **n > allowed.get(*name).copied().unwrap_or(0))
    {
        let def = schema::core_schema(kind)
            .attributes
            .iter()
            .find(|a| a.name == *name);
        return Err(ScimError::no_target(format!(
            "{name}: a filtered operation matched nothing, and the element it would make was given no {}",
            if def.is_some_and(AttrDef::has_value_sub) {
                "value"
            } else {
                "content but its type or primary"
            }
        )));
    }
    // RFC 7644 §3.5.2.2: a PATCH that leaves a required attribute unassigned is a
    // `mutability` error. Judged on the result, so that a remove and an add of
    // `userName` in one request pass.
    if let Some(obj) = doc.as_object()
        && let Some(name) = super::resource::missing_required(kind, |n| get_ci(obj, n))
    {
        return Err(ScimError::mutability(format!(
            "{name} is required for a {}; a PATCH cannot remove it or set it empty",
            kind.name()
        )));
    }
    Ok(())
}

/// Per multi-valued complex attribute of `kind`'s core schema, how many of its elements
/// hold nothing of their own: no `value` where the attribute has one, else nothing but
/// `type`, `primary` or `display`.
fn hollow_elements(
    kind: ResourceKind,
    doc: &Value,
) -> std::collections::BTreeMap<&'static str, usize> {
    hollow_of(kind, doc)
        .into_iter()
        .map(|(name, items)| (name, items.len()))
        .collect()
}

/// The elements of each multi-valued complex attribute that hold nothing of their own.
fn hollow_of(
    kind: ResourceKind,
    doc: &Value,
) -> std::collections::BTreeMap<&'static str, Vec<&Value>> {
    let Some(obj) = doc.as_object() else {
        return Default::default();
    };
    schema::core_schema(kind)
        .attributes
        .iter()
        .filter(|a| a.multi_valued && !a.sub_attributes.is_empty())
        .filter_map(|a| {
            let Some(Value::Array(items)) = get_ci(obj, a.name) else {
                return None;
            };
            let hollow = items
                .iter()
                .filter(|e| e.as_object().is_some_and(|e| is_hollow(a, e)))
                .collect();
            Some((a.name, hollow))
        })
        .collect()
}

/// Whether an element of `def` holds nothing of its own: no `value`, or for an attribute
/// without one (`addresses`), nothing but its type, primary or display.
fn is_hollow(def: &AttrDef, element: &Map<String, Value>) -> bool {
    let valued = def.has_value_sub();
    !element.iter().any(|(k, v)| {
        !v.is_null()
            && if valued {
                k.eq_ignore_ascii_case("value")
            } else {
                !["type", "primary", "display"]
                    .iter()
                    .any(|m| k.eq_ignore_ascii_case(m))
            }
    })
}

/// Remove at most `most` elements of attribute `name` that hold nothing of their own,
/// not those of `had` (the resource's own), and the attribute once none is left.
fn drop_new_hollow(kind: ResourceKind, doc: &mut Value, name: &str, had: &[Value], most: usize) {
    let Some(def) = schema::core_schema(kind)
        .attributes
        .iter()
        .find(|a| a.name == name)
    else {
        return;
    };
    let Some(obj) = doc.as_object_mut() else {
        return;
    };
    let Some(key) = key_ci(obj, name) else {
        return;
    };
    if let Some(Value::Array(items)) = obj.get_mut(&key) {
        let mut kept: Vec<&Value> = had.iter().collect();
        let mut dropped = 0;
        items.retain(|e| {
            if e.as_object().is_none_or(|o| !is_hollow(def, o)) {
                return true;
            }
            if let Some(i) = kept.iter().position(|h| *h == e) {
                kept.swap_remove(i);
                return true;
            }
            dropped += 1;
            dropped > most
        });
        if items.is_empty() {
            obj.remove(&key);
        }
    }
}

/// "primary": true on at most one of the values one operation sends (RFC 7643 §2.4), as
/// a POST or PUT is held to: which of two the client meant is not known, and the last
/// one was kept.
fn one_primary_in(op: &PatchOp) -> ScimResult<()> {
    // Before normalization: `"Primary": "True"` counts, as it will once normalized.
    let primary = |v: &Value| {
        v.as_object()
            .and_then(|o| get_ci(o, "primary"))
            .is_some_and(|p| same_scalar(false, p, &Value::Bool(true)))
    };
    let several = |items: &[Value]| items.iter().filter(|v| primary(v)).count() > 1;
    let refused = |name: &str| {
        Err(ScimError::invalid_value(format!(
            "{name}: \"primary\": true on more than one value; at most one may be primary"
        )))
    };
    match (&op.path, &op.value) {
        (None, Some(Value::Object(o))) => {
            match o
                .iter()
                .find(|(_, v)| v.as_array().is_some_and(|items| several(items)))
            {
                Some((k, _)) => refused(k),
                None => Ok(()),
            }
        }
        (Some(p), Some(Value::Array(items))) if several(items) => refused(&p.attr.to_string()),
        _ => Ok(()),
    }
}

/// At most [`MAX_PATCH_OPERATIONS`]: checked before the resource's write starts, so a
/// refused PATCH holds up no other write of the tenant.
pub fn check_operation_count(n: usize) -> ScimResult<()> {
    if n > MAX_PATCH_OPERATIONS {
        return Err(ScimError::invalid_value(format!(
            "this PATCH has {n} operations (a group's membership changes apart); rosterd applies at most {MAX_PATCH_OPERATIONS} in one request: send the rest in another"
        )));
    }
    Ok(())
}

/// A path-less add/replace: each key of the value is an attribute path of its own. Keys
/// may be dotted (`name.givenName`) or URN-qualified, as Entra sends them.
fn apply_pathless(
    kind: ResourceKind,
    doc: &mut Value,
    op: PatchOpKind,
    value: Option<&Value>,
) -> ScimResult<()> {
    let Some(Value::Object(attrs)) = value else {
        return Err(ScimError::invalid_value(
            "without a \"path\", \"value\" must be an object of attributes",
        ));
    };
    for (key, v) in attrs {
        if key.eq_ignore_ascii_case("id") {
            // Okta's group rename carries the resource's own id, which changes nothing.
            // Another id is refused as PUT refuses it, not dropped with a 200.
            let own = doc.get("id");
            let names_none = v.is_null() || v.as_str() == Some("");
            if !names_none && Some(v) != own {
                return Err(ScimError::mutability(format!(
                    "id {v} in the value does not match this resource's id {}",
                    own.unwrap_or(&Value::Null)
                )));
            }
            continue;
        }
        if ["schemas", "meta"]
            .iter()
            .any(|k| key.eq_ignore_ascii_case(k))
        {
            // Not the client's to set, and rebuilt by the server anyway.
            continue;
        }
        if let Some(ext) = schema::schemas_of(kind)
            .iter()
            .skip(1)
            .find(|s| s.id.eq_ignore_ascii_case(key))
        {
            let Value::Object(inner) = v else {
                return Err(ScimError::invalid_value(format!(
                    "{key}: an extension's value is an object"
                )));
            };
            for (k2, v2) in inner {
                let path = parse_path(&format!("{}:{k2}", ext.id))?;
                apply_path(kind, doc, op, &path, Some(v2), false)?;
            }
            continue;
        }
        let path = match parse_path(key) {
            Ok(path) => path,
            // A name no path can spell (an accented custom attribute) is one no schema
            // defines either: left in the document for normalization to drop and report,
            // as an unknown ASCII name is, rather than failing the whole PATCH.
            Err(_) if !key.is_ascii() && !key.contains(['.', '[', ']', ':', ' ', '"']) => {
                if let Some(root) = doc.as_object_mut() {
                    root.insert(key.clone(), v.clone());
                }
                continue;
            }
            Err(e) => return Err(ScimError::invalid_value(e.detail)),
        };
        apply_path(kind, doc, op, &path, Some(v), false)?;
    }
    Ok(())
}

/// The object an attribute lives in: the document, or an extension's object within it.
fn container<'a>(
    kind: ResourceKind,
    doc: &'a mut Value,
    attr: &AttrPath,
    create: bool,
) -> ScimResult<Option<&'a mut Map<String, Value>>> {
    let Some(root) = doc.as_object_mut() else {
        return Ok(None);
    };
    let Some(urn) = attr.urn.as_deref().filter(|_| !attr.is_core()) else {
        return Ok(Some(root));
    };
    let Some(ext) = schema::schemas_of(kind)
        .iter()
        .skip(1)
        .find(|s| s.id.eq_ignore_ascii_case(urn))
    else {
        return Err(ScimError::invalid_path(format!("unknown schema {urn:?}")));
    };
    let key = key_ci(root, ext.id);
    match key {
        Some(k) => Ok(root.get_mut(&k).and_then(Value::as_object_mut)),
        None if create => {
            let slot = root
                .entry(ext.id.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            Ok(slot.as_object_mut())
        }
        None => Ok(None),
    }
}

fn apply_path(
    kind: ResourceKind,
    doc: &mut Value,
    op: PatchOpKind,
    path: &PatchPath,
    value: Option<&Value>,
    explicit: bool,
) -> ScimResult<()> {
    let attr = &path.attr;
    if attr.is_whole_schema() {
        return apply_whole_extension(kind, doc, op, attr, value);
    }
    if attr.urn.is_none() && schema::extension_owning(kind, &attr.attr).is_some() {
        let mut qualified = path.clone();
        qualified.attr.qualify_for(kind);
        return apply_path(kind, doc, op, &qualified, value, explicit);
    }
    let def = schema::lookup(kind, attr.urn.as_deref(), &attr.attr, None);
    if explicit && def.is_none() {
        return Err(ScimError::invalid_path(format!(
            "{attr} is not an attribute of {}",
            kind.name()
        )));
    }
    if let Some(d) = def {
        let sub = attr
            .sub
            .as_deref()
            .or(path.sub_after_filter.as_deref())
            .and_then(|s| sub_def(def, s));
        let read_only = d.mutability == Mutability::ReadOnly
            || sub.is_some_and(|s| s.mutability == Mutability::ReadOnly);
        if read_only {
            if explicit {
                return Err(ScimError::mutability(format!("{attr} is read-only")));
            }
            return Ok(());
        }
        if explicit && (attr.sub.is_some() || path.sub_after_filter.is_some()) && sub.is_none() {
            return Err(ScimError::invalid_path(format!(
                "{path_text} names no sub-attribute of {}",
                d.name,
                path_text = attr
            )));
        }
        // `emails[typo eq "work"].value` matches nothing, so an add or replace would make
        // a new element from the filter and drop `typo` from it: an untyped address the
        // client never asked for.
        let is_sub = |p: &AttrPath| {
            p.urn.is_none()
                && p.sub.is_none()
                && (sub_def(def, &p.attr).is_some()
                    || (d.sub_attributes.is_empty() && p.attr.eq_ignore_ascii_case("value")))
        };
        if let Some(unknown) = path.filter.as_ref().and_then(|f| f.unknown_attr(&is_sub)) {
            return Err(ScimError::invalid_path(format!(
                "{attr}[…]: {unknown} is not a sub-attribute of {}",
                d.name
            )));
        }
        // A boolean has neither order nor substrings, a binary value no order (RFC 7644
        // §3.4.2.2): refused as the same filter in a query is, not answered `noTarget` as
        // if it matched nothing.
        let misapplied = path
            .filter
            .iter()
            .flat_map(|f| f.comparisons())
            .find(|(p, op, _)| sub_def(def, &p.attr).is_some_and(|s| !op.applies_to(s.kind)));
        if let Some((p, op, _)) = misapplied {
            return Err(ScimError::invalid_filter(format!(
                "{attr}[…]: {p} {}",
                op.misapplied()
            )));
        }
    }
    let name = def.map_or(attr.attr.as_str(), |d| d.name);
    let Some(obj) = container(kind, doc, attr, op != PatchOpKind::Remove)? else {
        return Ok(());
    };
    let key = key_ci(obj, name).unwrap_or_else(|| name.to_owned());
    match &path.filter {
        None => apply_plain(obj, &key, def, attr.sub.as_deref(), op, value),
        Some(f) => apply_filtered(
            kind,
            obj,
            (&key, def),
            attr,
            f,
            path.sub_after_filter.as_deref(),
            op,
            value,
        ),
    }
}

fn apply_whole_extension(
    kind: ResourceKind,
    doc: &mut Value,
    op: PatchOpKind,
    attr: &AttrPath,
    value: Option<&Value>,
) -> ScimResult<()> {
    let urn = attr.urn.as_deref().unwrap_or_default();
    if attr.is_core() {
        return match op {
            PatchOpKind::Remove => {
                Err(ScimError::invalid_path("the core schema cannot be removed"))
            }
            _ => apply_pathless(kind, doc, op, value),
        };
    }
    match op {
        PatchOpKind::Remove => {
            // Validates the URN as a side effect.
            container(kind, doc, attr, false)?;
            if let Some(root) = doc.as_object_mut()
                && let Some(k) = key_ci(root, urn)
            {
                root.remove(&k);
            }
            Ok(())
        }
        _ => {
            let Some(Value::Object(inner)) = value else {
                return Err(ScimError::invalid_value(format!(
                    "{urn}: an extension's value is an object"
                )));
            };
            for (k, v) in inner {
                let path = parse_path(&format!("{urn}:{k}"))?;
                apply_path(kind, doc, op, &path, Some(v), false)?;
            }
            Ok(())
        }
    }
}

/// Append the values of `new` that `list` does not hold yet. An IdP may add thousands of
/// values at once: a scan of the list per value made 50,000 emails take 50 s, with the
/// tenant's writes waiting. serde_json's maps are sorted, so equal values print the same.
/// An `add` to a multi-valued attribute. A value the attribute already holds, in any
/// spelling (its `value` as the schema compares it, with the same `type` or none: see
/// [`value_key`]), takes what the add says of it, each sub-attribute under the name it
/// is stored as; an identical value is dropped; any other is appended. Done at the
/// operation rather than after the PATCH, so that a later operation sees one value: an
/// add of `A@X.COM` to a work address `a@x.com`, then a remove of
/// `emails[type eq "work"]`, leaves no address, as it would one at a time.
fn add_values(def: Option<&AttrDef>, list: &mut Vec<Value>, new: Vec<Value>) {
    let mut seen: std::collections::HashSet<String> = list.iter().map(Value::to_string).collect();
    let mut held = HeldValues::default();
    for (i, item) in list.iter().enumerate() {
        if let Some(key) = item.as_object().and_then(|m| value_key(def, m)) {
            held.note(key, i);
        }
    }
    for v in new {
        if !seen.insert(v.to_string()) {
            continue;
        }
        if let Some(key) = v.as_object().and_then(|m| value_key(def, m)) {
            if let (Some(i), Value::Object(m)) = (held.repeat(&key), &v)
                && let Some(Value::Object(existing)) = list.get_mut(i)
            {
                for (k, sub) in m {
                    set_ci(existing, k, sub.clone());
                }
                continue;
            }
            held.note(key, list.len());
        }
        list.push(v);
    }
}

/// `attr` or `attr.sub` without a value filter.
fn apply_plain(
    obj: &mut Map<String, Value>,
    key: &str,
    def: Option<&AttrDef>,
    sub: Option<&str>,
    op: PatchOpKind,
    value: Option<&Value>,
) -> ScimResult<()> {
    let multi = def.is_some_and(|d| d.multi_valued);
    let complex = def.is_some_and(|d| !d.sub_attributes.is_empty());
    if let Some(sub) = sub {
        let held_def = sub_def(def, sub);
        let sub_name = held_def.map_or(sub, |s| s.name);
        // A value names which of the sub-attribute's values go (`remove manager.value`
        // naming another manager than the one held removed the held one).
        let named = named(value);
        let named = named.as_deref();
        let take = |o: &mut Map<String, Value>| {
            if let Some(k) = key_ci(o, sub_name)
                && is_named(held_def, &o[&k], named)
            {
                o.remove(&k);
            }
        };
        return match (op, obj.get_mut(key)) {
            (PatchOpKind::Remove, Some(Value::Object(o))) => {
                take(o);
                Ok(())
            }
            (PatchOpKind::Remove, Some(Value::Array(items))) => {
                items
                    .iter_mut()
                    .filter_map(Value::as_object_mut)
                    .for_each(take);
                Ok(())
            }
            (PatchOpKind::Remove, _) => Ok(()),
            (_, Some(Value::Array(items))) => {
                for item in items.iter_mut().filter_map(Value::as_object_mut) {
                    set_ci(item, sub_name, value.cloned().unwrap_or(Value::Null));
                }
                Ok(())
            }
            (_, slot) => {
                let v = value.cloned().unwrap_or(Value::Null);
                match slot {
                    // `manager.value` set to another id names another manager, as a
                    // whole `manager` with another `value` does below: the old one's
                    // displayName is not this one's.
                    Some(Value::Object(o))
                        if sub_name == "value"
                            && get_ci(o, "value").is_some_and(|old| *old != v) =>
                    {
                        *o = Map::from_iter([(sub_name.to_owned(), v)]);
                    }
                    Some(Value::Object(o)) => set_ci(o, sub_name, v),
                    _ => {
                        let mut o = Map::new();
                        o.insert(sub_name.to_owned(), v);
                        obj.insert(key.to_owned(), Value::Object(o));
                    }
                }
                Ok(())
            }
        };
    }
    // Counted before the list is copied: a PATCH adding 300,000 emails, refused only
    // once normalized, had first built three copies of them and taken the daemon to
    // 770 MB.
    if let Some(d) = def.filter(|_| multi && op != PatchOpKind::Remove) {
        let n = value.and_then(Value::as_array).map_or(1, Vec::len);
        check_value_count(d, key, n)?;
    }
    let value = value.cloned();
    match op {
        PatchOpKind::Remove => {
            match (value, obj.get_mut(key)) {
                // Entra's older dialect: remove the listed values of a multi-valued attribute.
                (Some(v), Some(Value::Array(items))) if multi => {
                    // `null` names no value, and the path alone says what goes, as for
                    // any attribute. A list that names none (`[]`, `[{"value": null}]`)
                    // removes none: read as no value, it removed every address.
                    let complex = def.is_some_and(|d| d.kind == AttrKind::Complex);
                    match named(Some(&v)) {
                        None if v.is_null() => {
                            obj.remove(key);
                        }
                        None => {}
                        Some(n) => {
                            let n = if complex { complex_entries(n) } else { n };
                            items.retain(|i| !n.iter().any(|g| same_element(def, i, g)));
                            if items.is_empty() {
                                obj.remove(key);
                            }
                        }
                    }
                }
                // A value names what goes on a single-valued attribute too, as the filter
                // form `manager[value eq "…"]` does: `remove manager` naming another
                // manager than the one held removed the held one, and a `name` naming
                // only a givenName took the familyName with it.
                (Some(v), Some(stored)) => match named(Some(&v)) {
                    None => {
                        obj.remove(key);
                    }
                    Some(n) if n.iter().any(|g| same_element(def, stored, g)) => {
                        obj.remove(key);
                    }
                    // Parts of a complex value without a `value` of its own (`name` with
                    // a `givenName`): those parts go, where they hold what was named.
                    Some(n) if complex && !def.is_some_and(AttrDef::has_value_sub) => {
                        if let Value::Object(held) = stored {
                            for (k, given) in n.iter().filter_map(Value::as_object).flatten() {
                                if let Some(hk) = key_ci(held, k)
                                    && same_element(sub_def(def, k), &held[&hk], given)
                                {
                                    held.remove(&hk);
                                }
                            }
                            if held.is_empty() {
                                obj.remove(key);
                            }
                        }
                    }
                    Some(_) => {}
                },
                _ => {
                    obj.remove(key);
                }
            }
            Ok(())
        }
        PatchOpKind::Add if multi => {
            let new = match value {
                Some(Value::Array(vs)) => vs,
                Some(v) => vec![v],
                None => vec![],
            };
            let slot = obj
                .entry(key.to_owned())
                .or_insert_with(|| Value::Array(Vec::new()));
            if !slot.is_array() {
                *slot = Value::Array(vec![slot.take()]);
            }
            if let Value::Array(items) = slot {
                add_values(def, items, new);
            }
            Ok(())
        }
        // RFC 7644 §3.5.2.1/§3.5.2.3: a complex value merges into what is there.
        _ if complex && !multi => {
            let new = match value {
                Some(Value::Object(o)) => o,
                // Entra sends `manager` as a bare id. Only an attribute with a `value`
                // can take one: "Jane Doe" for `name` would vanish with a 200.
                Some(v @ Value::String(_)) if def.is_some_and(AttrDef::has_value_sub) => {
                    Map::from_iter([("value".to_owned(), v)])
                }
                Some(_) | None => {
                    return Err(ScimError::invalid_value(format!(
                        "{key} is complex; its value is an object"
                    )));
                }
            };
            match obj.get_mut(key) {
                // Another `value` is another thing (another manager): what was said of
                // the old one (its displayName) does not carry over to it.
                Some(Value::Object(existing))
                    if get_ci(&new, "value")
                        .is_some_and(|v| get_ci(existing, "value").is_some_and(|o| o != v)) =>
                {
                    *existing = new;
                }
                Some(Value::Object(existing)) => {
                    for (k, v) in new {
                        set_ci(existing, &k, v);
                    }
                }
                _ => {
                    obj.insert(key.to_owned(), Value::Object(new));
                }
            }
            Ok(())
        }
        _ => {
            match value {
                Some(v) => obj.insert(key.to_owned(), v),
                None => obj.remove(key),
            };
            Ok(())
        }
    }
}

/// Whether a value a `remove` names (`given`) is the one held (`stored`): the same
/// `value` as the schema compares it (an email in any letter case) with types that agree
/// (a home address is not the work one), or, for a value without a `value`, equal.
fn same_element(def: Option<&AttrDef>, stored: &Value, given: &Value) -> bool {
    let as_element = |g: &Value| Map::from_iter([("value".to_owned(), g.clone())]);
    // An entry named by its JSON text, as Entra's older dialect removes the `roles` entry
    // it added so: read as text, it named nothing, and the remove answered 200 and left
    // the role.
    // A value that is itself such text (stored before it was read so) still matches it.
    if let (Value::Object(_), Value::String(g)) = (stored, given)
        && let Some(o) = encoded_object(g)
        && same_element(def, stored, &Value::Object(o))
    {
        return true;
    }
    match (stored, given) {
        (Value::Object(s), Value::Object(g)) => match (value_key(def, s), value_key(def, g)) {
            (Some((a, at)), Some((b, bt))) => a == b && types_agree(&at, &bt),
            _ => s == g,
        },
        (Value::Object(s), g) => match (value_key(def, s), value_key(def, &as_element(g))) {
            (Some((a, _)), Some((b, _))) => a == b,
            _ => false,
        },
        (s, g) => same_scalar(def.is_some_and(|d| d.case_exact), s, g),
    }
}

/// Two simple values alike as an add or a filter would take them: a string in any letter
/// case unless the attribute is caseExact, a boolean sent as `"True"`, a number sent as
/// its digits.
fn same_scalar(case_exact: bool, a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) if !case_exact => x.to_lowercase() == y.to_lowercase(),
        (Value::Bool(x), Value::String(y)) | (Value::String(y), Value::Bool(x)) => {
            y.eq_ignore_ascii_case(if *x { "true" } else { "false" })
        }
        (Value::Number(x), Value::String(y)) | (Value::String(y), Value::Number(x)) => {
            x.to_string() == *y
        }
        _ => a == b,
    }
}

/// What a `remove` names in its `value` (Entra's older dialect), or `None` when it names
/// nothing (no value, `null`, empty): then the path alone says what goes.
fn named(value: Option<&Value>) -> Option<Vec<Value>> {
    let list: Vec<Value> = match value? {
        Value::Array(vs) => vs.clone(),
        v => vec![v.clone()],
    };
    let list: Vec<Value> = list.into_iter().filter(present).collect();
    (!list.is_empty()).then_some(list)
}

/// Whether a `remove` takes `held`: nothing was named, or `held` is one of what was.
fn is_named(def: Option<&AttrDef>, held: &Value, named: Option<&[Value]>) -> bool {
    named.is_none_or(|n| n.iter().any(|g| same_element(def, held, g)))
}

/// `name`'s sub-attribute `sub`, if `def` has one.
fn sub_def<'a>(def: Option<&'a AttrDef>, sub: &str) -> Option<&'a AttrDef> {
    def.and_then(|d| {
        d.sub_attributes
            .iter()
            .find(|s| s.name.eq_ignore_ascii_case(sub))
    })
}

fn set_ci(obj: &mut Map<String, Value>, name: &str, v: Value) {
    let key = key_ci(obj, name).unwrap_or_else(|| name.to_owned());
    obj.insert(key, v);
}

/// The element a filter like `type eq "work" and primary eq true` describes, so that a
/// filtered add/replace matching nothing can create it (Entra relies on this).
fn synthesize(filter: &Filter) -> Option<Map<String, Value>> {
    match filter {
        Filter::Compare {
            path,
            op: CompareOp::Eq,
            value,
        } if path.urn.is_none() && path.sub.is_none() && !value.is_null() => {
            Some(Map::from_iter([(path.attr.clone(), value.clone())]))
        }
        Filter::And(a, b) => {
            let mut m = synthesize(a)?;
            m.extend(synthesize(b)?);
            Some(m)
        }
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
fn apply_filtered(
    kind: ResourceKind,
    obj: &mut Map<String, Value>,
    (key, def): (&str, Option<&AttrDef>),
    attr: &AttrPath,
    filter: &Filter,
    sub: Option<&str>,
    op: PatchOpKind,
    value: Option<&Value>,
) -> ScimResult<()> {
    let matches = |e: &Value| filter.matches_element(kind, attr, e);
    // A `remove`'s value narrows what the filter selects, as it does without a filter.
    let named = if op == PatchOpKind::Remove {
        named(value)
    } else {
        None
    };
    let named = named.as_deref();
    let held_def = sub.and_then(|s| sub_def(def, s));
    let take_sub = |o: &mut Map<String, Value>, s: &str| {
        if let Some(k) = key_ci(o, s)
            && is_named(held_def, &o[&k], named)
        {
            o.remove(&k);
        }
    };
    match obj.get_mut(key) {
        // A single-valued complex attribute (`manager[value eq "…"]`).
        Some(Value::Object(_)) => {
            let slot = obj.get(key).cloned().unwrap_or(Value::Null);
            if !matches(&slot) {
                return if op == PatchOpKind::Remove {
                    Ok(())
                } else {
                    Err(ScimError::no_target(format!(
                        "{attr}[{filter}] matches nothing"
                    )))
                };
            }
            let Some(Value::Object(o)) = obj.get_mut(key) else {
                return Ok(());
            };
            match (op, sub) {
                (PatchOpKind::Remove, None) => {
                    if is_named(def, &slot, named) {
                        obj.remove(key);
                    }
                }
                (PatchOpKind::Remove, Some(s)) => take_sub(o, s),
                (_, Some(s)) => set_ci(o, s, value.cloned().unwrap_or(Value::Null)),
                (_, None) => merge_element(o, op, value, attr)?,
            }
            Ok(())
        }
        Some(Value::Array(items)) => {
            let hits: Vec<usize> = (0..items.len()).filter(|&i| matches(&items[i])).collect();
            if hits.is_empty() {
                return create_matching(obj, key, attr, filter, sub, op, value);
            }
            // One operation making several values primary is refused, as the same in a
            // body is (RFC 7643 §2.4): keeping the last would pick one the client did not.
            // As the flag is read everywhere: `"True"`, as Entra sends it, too.
            let makes_primary = match (sub, value) {
                (Some(s), Some(v)) => {
                    s.eq_ignore_ascii_case("primary")
                        && crate::scim::resource::marked_primary(
                            &serde_json::json!({ "primary": v }),
                        )
                }
                (None, Some(v)) => crate::scim::resource::marked_primary(v),
                _ => false,
            };
            if op != PatchOpKind::Remove && makes_primary && hits.len() > 1 {
                return Err(ScimError::invalid_value(format!(
                    "{attr}[{filter}] selects {} values to make primary; at most one may be",
                    hits.len()
                )));
            }
            match (op, sub) {
                (PatchOpKind::Remove, None) => {
                    let mut i = 0;
                    items.retain(|item| {
                        let keep = !(hits.contains(&i) && is_named(def, item, named));
                        i += 1;
                        keep
                    });
                    if items.is_empty() {
                        obj.remove(key);
                    }
                }
                (PatchOpKind::Remove, Some(s)) => {
                    for &i in &hits {
                        if let Some(o) = items[i].as_object_mut() {
                            take_sub(o, s);
                        }
                    }
                }
                (_, Some(s)) => {
                    for &i in &hits {
                        if let Some(o) = items[i].as_object_mut() {
                            set_ci(o, s, value.cloned().unwrap_or(Value::Null));
                        }
                    }
                }
                (_, None) => {
                    for &i in &hits {
                        if let Some(o) = items[i].as_object_mut() {
                            merge_element(o, op, value, attr)?;
                        }
                    }
                }
            }
            Ok(())
        }
        _ => create_matching(obj, key, attr, filter, sub, op, value),
    }
}

fn merge_element(
    o: &mut Map<String, Value>,
    op: PatchOpKind,
    value: Option<&Value>,
    attr: &AttrPath,
) -> ScimResult<()> {
    let Some(Value::Object(new)) = value else {
        return Err(ScimError::invalid_value(format!(
            "{attr}[…]: the value for a selected element is an object"
        )));
    };
    if op == PatchOpKind::Replace {
        o.clear();
    }
    for (k, v) in new {
        set_ci(o, k, v.clone());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn create_matching(
    obj: &mut Map<String, Value>,
    key: &str,
    attr: &AttrPath,
    filter: &Filter,
    sub: Option<&str>,
    op: PatchOpKind,
    value: Option<&Value>,
) -> ScimResult<()> {
    if op == PatchOpKind::Remove {
        // Removing what is not there leaves the resource as the client wants it.
        return Ok(());
    }
    // RFC 7644 §3.5.2.3 has a replace that selects nothing fail with noTarget. Entra
    // replaces `emails[type eq "work"].value` expecting the element to be made, so a
    // filter on what kind of element it is may create one; a filter on the element's
    // `value` names one the client believes exists, and making it would invent data.
    if op == PatchOpKind::Replace
        && filter
            .attr_paths()
            .iter()
            .any(|p| p.attr.eq_ignore_ascii_case("value"))
    {
        return Err(ScimError::no_target(format!(
            "{attr}[{filter}] matches nothing to replace"
        )));
    }
    let Some(mut element) = synthesize(filter) else {
        return Err(ScimError::no_target(format!(
            "{attr}[{filter}] matches nothing, and the filter does not describe an element to create"
        )));
    };
    // What the value says replaces what the filter described under another spelling
    // (`emails[Type eq "work"]` with `{"type": "work", …}`): one attribute, one key.
    let put = |element: &mut Map<String, Value>, k: &str, v: &Value| {
        element.retain(|have, _| !have.eq_ignore_ascii_case(k));
        element.insert(k.to_owned(), v.clone());
    };
    match (sub, value) {
        (Some(s), Some(v)) => put(&mut element, s, v),
        (None, Some(Value::Object(o))) => {
            for (k, v) in o {
                put(&mut element, k, v);
            }
        }
        _ => {
            return Err(ScimError::invalid_value(format!(
                "{attr}[…]: the value for a selected element is an object"
            )));
        }
    }
    let slot = obj
        .entry(key.to_owned())
        .or_insert_with(|| Value::Array(Vec::new()));
    match slot {
        Value::Array(items) => items.push(Value::Object(element)),
        other => *other = Value::Array(vec![Value::Object(element)]),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scim::error::ScimType;
    use crate::scim::schema::ENTERPRISE_USER_SCHEMA;
    use serde_json::json;

    fn user() -> Value {
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "id": "u1",
            "userName": "bjensen",
            "active": true,
            "name": {"givenName": "Barbara", "familyName": "Jensen"},
            "emails": [
                {"value": "b@work.example", "type": "work", "primary": true},
                {"value": "b@home.example", "type": "home"}
            ]
        })
    }

    fn patch(doc: &mut Value, ops: Value) -> ScimResult<()> {
        let body = json!({"schemas": [PATCH_OP_SCHEMA], "Operations": ops});
        let ops = parse_patch_request(body)?;
        apply(ResourceKind::User, doc, &ops)
    }

    #[test]
    fn an_unknown_extension_is_skipped_and_an_unknown_attribute_of_a_known_schema_is_not() {
        const CUSTOM: &str = "urn:ietf:params:scim:schemas:extension:CustomExtensionName:2.0:User";
        let skipped = |ops: Value| {
            let body = json!({"schemas": [PATCH_OP_SCHEMA], "Operations": ops});
            let (kept, skipped) = skip_unknown_extensions(parse_patch_request(body).unwrap());
            let mut d = user();
            apply(ResourceKind::User, &mut d, &kept).map(|()| (d, skipped))
        };
        let (d, names) = skipped(json!([
            {"op": "Replace", "path": "title", "value": "Buyer II"},
            {"op": "Replace", "path": format!("{CUSTOM}:costCode"), "value": "CC-1"},
            {"op": "Remove", "path": CUSTOM},
            {"op": "Add", "value": {CUSTOM: {"costCode": "CC-2"},
                                    format!("{CUSTOM}:site"): "HQ",
                                    "displayName": "B J"}},
        ]))
        .unwrap();
        assert_eq!(
            (&d["title"], &d["displayName"]),
            (&json!("Buyer II"), &json!("B J"))
        );
        assert_eq!(d.get(CUSTOM), None, "{d}");
        assert_eq!(names.len(), 4, "{names:?}");
        // An unknown attribute of a schema rosterd has, and a core schema misspelt.
        for path in [
            format!("{ENTERPRISE_USER_SCHEMA}:costCode"),
            "urn:ietf:params:scim:schemas:core:2.0:User:nickname2".to_owned(),
            "urn:ietf:params:scim:schemas:core:2.0:Usr:title".to_owned(),
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:Usr:department".to_owned(),
            "titel".to_owned(),
        ] {
            let e = skipped(json!([{"op": "Replace", "path": path, "value": "x"}])).unwrap_err();
            assert_eq!(e.scim_type, Some(ScimType::InvalidPath), "{path}: {e:?}");
        }
    }

    #[test]
    fn an_add_keeps_one_of_each_value_in_order() {
        let mut d = user();
        d["emails"] = json!([{"value": "a@x", "type": "work"}]);
        let many: Vec<Value> = (0..999)
            .map(|i| json!({"value": format!("e{}@x", i % 500), "type": "home"}))
            .chain([json!({"type": "work", "value": "a@x"})])
            .collect();
        patch(
            &mut d,
            json!([{"op": "add", "path": "emails", "value": many}]),
        )
        .unwrap();
        let emails = d["emails"].as_array().unwrap();
        assert_eq!(emails.len(), 501);
        assert_eq!(emails[0]["value"], "a@x");
        assert_eq!(emails[1]["value"], "e0@x");
        assert_eq!(emails[500]["value"], "e499@x");
    }

    /// Refused by `apply` itself, before the list is copied into the document: normalize
    /// would refuse it too, but only after three copies of it were built.
    #[test]
    fn more_values_than_an_attribute_takes_are_refused_before_they_are_copied() {
        let many: Vec<Value> = (0..1001)
            .map(|i| json!({"value": format!("e{i}@x")}))
            .collect();
        for op in [
            json!({"op": "add", "path": "emails", "value": many}),
            json!({"op": "replace", "path": "emails", "value": many}),
            json!({"op": "add", "value": {"emails": many}}),
            json!({"op": "replace", "value": {"phoneNumbers": many}}),
        ] {
            let mut d = user();
            let e = patch(&mut d, json!([op])).expect_err(&op.to_string());
            assert_eq!(e.scim_type, Some(ScimType::InvalidValue), "{op}");
            assert!(e.detail.contains("1001 values"), "{op}: {}", e.detail);
            assert_eq!(d, user(), "{op}: the document is untouched");
        }
        // A group's members are stored apart and may run to the hundred thousand.
        let members: Vec<Value> = (0..1001)
            .map(|i| json!({"value": format!("u{i}")}))
            .collect();
        let mut g = json!({"schemas": [crate::scim::schema::GROUP_SCHEMA], "displayName": "G"});
        let ops = parse_patch_request(json!({"schemas": [PATCH_OP_SCHEMA],
            "Operations": [{"op": "add", "path": "members", "value": members}]}))
        .unwrap();
        apply(ResourceKind::Group, &mut g, &ops).unwrap();
        assert_eq!(g["members"].as_array().map(Vec::len), Some(1001));
    }

    /// A `remove` that names a value removes that value only, on a single-valued
    /// attribute as on a multi-valued one, compared as the schema compares it.
    #[test]
    fn a_remove_naming_a_value_removes_only_that_value() {
        let manager = format!("{ENTERPRISE_USER_SCHEMA}:manager");
        let mut d = user();
        d["title"] = json!("Tour Guide");
        d[ENTERPRISE_USER_SCHEMA] = json!({"manager": {"value": "m-1", "displayName": "M"}});
        let before = d.clone();
        patch(
            &mut d,
            json!([
                {"op": "remove", "path": manager, "value": [{"value": "m-other"}]},
                {"op": "remove", "path": "name", "value": {"givenName": "Babs"}},
                {"op": "remove", "path": "title", "value": "Tour Operator"},
                {"op": "remove", "path": "emails", "value": [{"value": "B@WORK.EXAMPLE", "type": "home"}]},
            ]),
        )
        .unwrap();
        assert_eq!(d, before, "nothing named is held");
        patch(
            &mut d,
            json!([
                {"op": "remove", "path": manager, "value": [{"value": "m-1"}]},
                {"op": "remove", "path": "title", "value": "tour guide"},
                {"op": "remove", "path": "emails", "value": [{"value": "B@WORK.EXAMPLE", "type": "work"}]},
                {"op": "remove", "path": "name", "value": null},
            ]),
        )
        .unwrap();
        assert!(d[ENTERPRISE_USER_SCHEMA].get("manager").is_none(), "{d}");
        for gone in ["title", "name"] {
            assert!(d.get(gone).is_none(), "{gone}: {d}");
        }
        assert_eq!(
            d["emails"],
            json!([{"value": "b@home.example", "type": "home"}])
        );
        // A bare id names a manager as an object does (Entra sends either).
        d[ENTERPRISE_USER_SCHEMA] = json!({"manager": {"value": "m-2"}});
        patch(
            &mut d,
            json!([{"op": "Remove", "path": manager, "value": "m-2"}]),
        )
        .unwrap();
        assert!(d[ENTERPRISE_USER_SCHEMA].get("manager").is_none(), "{d}");
    }

    /// An entry named by its JSON text is the entry the text encodes, as an add takes it:
    /// Entra's older dialect removes a `roles` entry so, and the remove answered 200 and
    /// left the role.
    #[test]
    fn a_remove_naming_an_entry_by_its_json_text_removes_it() {
        let mut d = user();
        d["roles"] = json!([
            {"primary": false, "type": "WindowsAzureActiveDirectoryRole", "value": "Reader"},
            {"value": "Writer"},
            {"value": "Owner"},
        ]);
        patch(
            &mut d,
            json!([
                {"op": "Remove", "path": "roles", "value": [
                    "{\"primary\":false,\"type\":\"WindowsAzureActiveDirectoryRole\",\"value\":\"Reader\"}"
                ]},
                {"op": "Remove", "path": "roles", "value": "{\"value\":\"writer\"}"},
                {"op": "Remove", "path": "emails", "value": ["{\"value\":\"b@work.example\",\"type\":\"work\"}"]},
            ]),
        )
        .unwrap();
        assert_eq!(d["roles"], json!([{"value": "Owner"}]), "{d}");
        assert_eq!(
            d["emails"],
            json!([{"value": "b@home.example", "type": "home"}])
        );
        // A list of entries as one JSON text too; text naming no entry removes nothing.
        patch(
            &mut d,
            json!([{"op": "Remove", "path": "roles", "value": "[{\"value\":\"Nobody\"}]"}]),
        )
        .unwrap();
        assert_eq!(d["roles"], json!([{"value": "Owner"}]), "{d}");
        patch(
            &mut d,
            json!([{"op": "Remove", "path": "roles", "value": "[{\"value\":\"Owner\"}]"}]),
        )
        .unwrap();
        assert!(d.get("roles").is_none(), "{d}");
    }

    /// The same with a sub-attribute or a filter in the path: the value narrows what the
    /// path selects, and compares as an add would take it.
    #[test]
    fn a_remove_naming_a_value_narrows_a_sub_attribute_or_a_filter() {
        let ext = ENTERPRISE_USER_SCHEMA;
        let mut d = user();
        d[ext] = json!({"manager": {"value": "m-1"}, "employeeNumber": "701"});
        let before = d.clone();
        patch(
            &mut d,
            json!([
                {"op": "remove", "path": format!("{ext}:manager.value"), "value": "m-2"},
                {"op": "remove", "path": "name.givenName", "value": "X"},
                {"op": "remove", "path": "emails[type eq \"work\"]", "value": [{"value": "b@home.example"}]},
                {"op": "remove", "path": "emails.value", "value": "nobody@x.test"},
                {"op": "remove", "path": "active", "value": "False"},
            ]),
        )
        .unwrap();
        assert_eq!(d, before, "nothing named is held");
        patch(
            &mut d,
            json!([
                {"op": "remove", "path": format!("{ext}:manager.value"), "value": "m-1"},
                {"op": "remove", "path": "name", "value": {"givenName": "BARBARA"}},
                {"op": "remove", "path": "emails[type eq \"work\"]", "value": [{"value": "B@work.example"}]},
                {"op": "remove", "path": "active", "value": "True"},
                {"op": "remove", "path": format!("{ext}:employeeNumber"), "value": 701},
            ]),
        )
        .unwrap();
        assert!(
            d[ext]
                .get("manager")
                .is_none_or(|m| m.get("value").is_none()),
            "{d}"
        );
        assert_eq!(
            d["name"],
            json!({"familyName": "Jensen"}),
            "only the part named"
        );
        assert_eq!(
            d["emails"],
            json!([{"value": "b@home.example", "type": "home"}])
        );
        assert!(
            d.get("active").is_none() && d[ext].get("employeeNumber").is_none(),
            "{d}"
        );
        // A list that names no value removes none (read as no value, it removed every
        // address); null names none, and the path says what goes.
        for none in [
            json!([]),
            json!([{"value": null}]),
            json!([{}]),
            json!([null]),
            json!([""]),
        ] {
            patch(
                &mut d,
                json!([{"op": "remove", "path": "emails", "value": none}]),
            )
            .unwrap();
            assert_eq!(d["emails"].as_array().map(Vec::len), Some(1), "{none}: {d}");
        }
        patch(
            &mut d,
            json!([{"op": "remove", "path": "emails", "value": null}]),
        )
        .unwrap();
        assert!(d.get("emails").is_none(), "{d}");
    }

    /// RFC 7644 §3.5.2.2: leaving a required attribute unassigned is `mutability`;
    /// a remove and an add of it in one request pass.
    #[test]
    fn a_patch_cannot_leave_a_required_attribute_unassigned() {
        for ops in [
            json!([{"op": "remove", "path": "userName"}]),
            json!([{"op": "replace", "path": "USERNAME", "value": null}]),
            json!([{"op": "replace", "value": {"userName": null}}]),
            json!([{"op": "replace", "path": "userName", "value": "  "}]),
        ] {
            let mut d = user();
            let e = patch(&mut d, ops.clone()).expect_err(&ops.to_string());
            assert_eq!(e.scim_type, Some(ScimType::Mutability), "{ops}");
            assert!(e.detail.contains("userName is required"), "{}", e.detail);
        }
        let mut d = user();
        patch(
            &mut d,
            json!([{"op": "remove", "path": "userName"},
                   {"op": "add", "path": "userName", "value": "babs"}]),
        )
        .unwrap();
        assert_eq!(d["userName"], "babs");
        let mut g = json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                           "id": "g1", "displayName": "G"});
        let body = json!({"schemas": [PATCH_OP_SCHEMA],
                          "Operations": [{"op": "remove", "path": "displayName"}]});
        let e = apply(
            ResourceKind::Group,
            &mut g,
            &parse_patch_request(body).unwrap(),
        )
        .unwrap_err();
        assert_eq!(e.scim_type, Some(ScimType::Mutability), "{}", e.detail);
    }

    #[test]
    fn two_primaries_in_one_operation_are_refused() {
        let two = json!([{"value": "a@x.test", "primary": true},
                         {"value": "b@x.test", "primary": true}]);
        let spelled = json!([{"value": "a@x.test", "Primary": "True"},
                             {"value": "b@x.test", "primary": true}]);
        for op in [
            json!({"op": "replace", "path": "emails", "value": two}),
            json!({"op": "add", "value": {"emails": two}}),
            json!({"op": "add", "path": "emails", "value": spelled}),
        ] {
            let e = patch(&mut user(), json!([op])).expect_err(&op.to_string());
            assert_eq!(e.scim_type, Some(ScimType::InvalidValue), "{op}");
            assert!(
                e.detail.contains("at most one may be primary"),
                "{}",
                e.detail
            );
        }
        // One made primary against those held still takes over (RFC 7644 §3.5.2).
        let mut d = user();
        patch(
            &mut d,
            json!([{"op": "add", "path": "emails", "value": [{"value": "c@x.test", "primary": true}]}]),
        )
        .unwrap();
        let primaries: Vec<&Value> = d["emails"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["primary"] == true)
            .collect();
        assert_eq!(primaries.len(), 1, "{d}");
        assert_eq!(primaries[0]["value"], "c@x.test");
    }

    #[test]
    fn a_path_filter_comparing_a_boolean_by_order_or_substring_is_invalid_filter() {
        for path in [
            "emails[primary co \"tr\"].value",
            "emails[primary gt false]",
            // A binary value has no order either.
            "x509Certificates[value gt \"TUlJ\"]",
        ] {
            let e = patch(
                &mut user(),
                json!([{"op": "replace", "path": path, "value": "x@y.test"}]),
            )
            .unwrap_err();
            assert_eq!(
                e.scim_type,
                Some(ScimType::InvalidFilter),
                "{path}: {}",
                e.detail
            );
        }
        let mut d = user();
        patch(
            &mut d,
            json!([{"op": "replace", "path": "emails[primary eq true].value", "value": "n@x.test"}]),
        )
        .unwrap();
        assert_eq!(d["emails"][0]["value"], "n@x.test");
    }

    #[test]
    fn replace_add_remove_simple() {
        let mut d = user();
        patch(
            &mut d,
            json!([
                {"op": "Replace", "path": "userName", "value": "babs"},
                {"op": "add", "path": "nickName", "value": "Babs"},
                {"op": "remove", "path": "name.familyName"},
                {"op": "remove", "path": "title"}
            ]),
        )
        .unwrap();
        assert_eq!(d["userName"], "babs");
        assert_eq!(d["nickName"], "Babs");
        assert_eq!(d["name"], json!({"givenName": "Barbara"}));
    }

    #[test]
    fn entra_pathless_replace_with_dotted_and_urn_keys() {
        let mut d = user();
        patch(
            &mut d,
            json!([{"op": "Replace", "value": {
                "name.givenName": "Babs",
                "active": "False",
                format!("{ENTERPRISE_USER_SCHEMA}:employeeNumber"): "42",
                ENTERPRISE_USER_SCHEMA: {"department": "Tours"}
            }}]),
        )
        .unwrap();
        assert_eq!(d["name"]["givenName"], "Babs");
        assert_eq!(d["name"]["familyName"], "Jensen", "merge, not overwrite");
        assert_eq!(
            d["active"], "False",
            "normalization turns it into a boolean later"
        );
        assert_eq!(d[ENTERPRISE_USER_SCHEMA]["employeeNumber"], "42");
        assert_eq!(d[ENTERPRISE_USER_SCHEMA]["department"], "Tours");
    }

    #[test]
    fn okta_rename_drops_id() {
        let mut d = user();
        patch(
            &mut d,
            json!([{"op": "replace", "value": {"id": "u1", "displayName": "B"}}]),
        )
        .unwrap();
        assert_eq!(d["id"], "u1");
        assert_eq!(d["displayName"], "B");
        // An empty one names none; another is refused, as PUT refuses it.
        patch(
            &mut d,
            json!([{"op": "replace", "value": {"id": "", "displayName": "B"}}]),
        )
        .unwrap();
        let e = patch(
            &mut d,
            json!([{"op": "replace", "value": {"ID": "other", "displayName": "C"}}]),
        )
        .unwrap_err();
        assert_eq!(e.scim_type, Some(ScimType::Mutability), "{}", e.detail);
        assert_eq!(d["displayName"], "B");
    }

    #[test]
    fn filtered_paths() {
        let mut d = user();
        patch(
            &mut d,
            json!([
                {"op": "replace", "path": "emails[type eq \"work\"].value", "value": "new@work.example"},
                {"op": "remove", "path": "emails[type eq \"home\"]"}
            ]),
        )
        .unwrap();
        assert_eq!(
            d["emails"],
            json!([{"value": "new@work.example", "type": "work", "primary": true}])
        );
    }

    /// A list grown one value at a time is refused at the operation that takes it past
    /// the cap, not at the end: 32,000 one-value adds, each dearer than the last, took
    /// 576 s of CPU before the final check refused them. An extension's list counts too.
    #[test]
    fn a_list_grown_one_add_at_a_time_is_refused_at_the_cap() {
        // Two values an operation, so that the list, not the operations, passes 1,000.
        let adds = |path: &str, ops: usize| -> Value {
            (0..ops)
                .map(|i| json!({"op": "add", "path": path, "value": [{"value": format!("a{i}@x")}, {"value": format!("b{i}@x")}]}))
                .collect()
        };
        let mut d = json!({"userName": "x"});
        patch(&mut d, adds("emails", 500)).unwrap();
        assert_eq!(d["emails"].as_array().map(Vec::len), Some(1000));
        let mut d = json!({"userName": "x"});
        let err = patch(&mut d, adds("emails", 501)).unwrap_err();
        assert!(
            err.detail
                .contains("emails: 1002 values; rosterd takes at most 1000"),
            "{err:?}"
        );
        // Path-less adds grow it as well.
        let pathless: Value = (0..501)
            .map(|i| json!({"op": "add", "value": {"phoneNumbers": [{"value": format!("+1 555 {i}")}, {"value": format!("+1 556 {i}")}]}}))
            .collect();
        let mut d = json!({"userName": "x"});
        let err = patch(&mut d, pathless).unwrap_err();
        assert!(err.detail.contains("phoneNumbers: 1002 values"), "{err:?}");
        // More operations than that are refused whatever they do.
        let many: Value = (0..1001)
            .map(|i| json!({"op": "replace", "path": "nickName", "value": format!("n{i}")}))
            .collect();
        let mut d = json!({"userName": "x"});
        let err = patch(&mut d, many).unwrap_err();
        assert!(
            err.detail.contains("this PATCH has 1001 operations"),
            "{err:?}"
        );
        // An accented name no schema defines is left for normalization to drop, as an
        // ASCII one is, not refused as a path.
        let mut d = json!({"userName": "x"});
        patch(
            &mut d,
            json!([{"op": "add", "value": {"aaa\u{e9}": 1, "nickName": "n"}}]),
        )
        .unwrap();
        assert_eq!(
            (d["aaa\u{e9}"].clone(), d["nickName"].clone()),
            (json!(1), json!("n"))
        );
        assert!(patch(&mut d, json!([{"op": "add", "value": {"a.b\u{e9}": 1}}])).is_err());
        let mut d = json!({"userName": "x", "urn:example:ext:1.0:User": {"badges": (0..1001).collect::<Vec<_>>()}});
        assert!(super::super::resource::check_list_sizes(&d).is_err());
        d["urn:example:ext:1.0:User"]["badges"] = json!([1, 2]);
        assert!(super::super::resource::check_list_sizes(&d).is_ok());
    }

    /// RFC 7644 §3.5.2: operations apply in order, and a value made primary makes the
    /// others not primary at that point, so a later operation's choice stands.
    #[test]
    fn primary_is_settled_operation_by_operation() {
        let primaries = |d: &Value| -> Vec<String> {
            d["emails"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| super::super::resource::marked_primary(e))
                .map(|e| e["value"].as_str().unwrap().to_owned())
                .collect()
        };
        let two = || {
            json!({"userName": "x", "emails": [
                {"value": "h@x", "type": "home"},
                {"value": "o@x", "type": "other", "primary": true}]})
        };
        // The other address changes (still primary), then home is made primary.
        let mut d = two();
        patch(
            &mut d,
            json!([
                {"op": "replace", "path": "emails[type eq \"other\"].value", "value": "o2@x"},
                {"op": "replace", "path": "emails[value eq \"h@x\"].primary", "value": true}
            ]),
        )
        .unwrap();
        assert_eq!(primaries(&d), ["h@x"], "{d}");
        // Home made primary, then the already-primary one again: the last word stands,
        // spelled as Entra spells it.
        let mut d = two();
        patch(
            &mut d,
            json!([
                {"op": "replace", "path": "emails[value eq \"h@x\"].primary", "value": true},
                {"op": "Replace", "path": "emails[value eq \"o@x\"].Primary", "value": "True"}
            ]),
        )
        .unwrap();
        assert_eq!(primaries(&d), ["o@x"], "{d}");
        // A new primary added, then its flag removed: no primary is left, not the old one.
        let mut d = two();
        patch(
            &mut d,
            json!([
                {"op": "add", "path": "emails", "value": [{"value": "n@x", "type": "work", "primary": true}]},
                {"op": "remove", "path": "emails[type eq \"work\"].primary"}
            ]),
        )
        .unwrap();
        assert_eq!(primaries(&d), Vec::<String>::new(), "{d}");
        // Home made primary, then removed: the old primary does not come back.
        let mut d = two();
        patch(
            &mut d,
            json!([
                {"op": "replace", "path": "emails[value eq \"h@x\"].primary", "value": true},
                {"op": "remove", "path": "emails[value eq \"h@x\"]"}
            ]),
        )
        .unwrap();
        assert_eq!(primaries(&d), Vec::<String>::new(), "{d}");
    }

    /// An added repeat of a held value is that value from the operation on, so a later
    /// operation's filter finds one value, carrying what the add said of it.
    #[test]
    fn an_added_repeat_is_one_value_for_the_next_operation() {
        let mut d = json!({"userName": "x", "emails": [{"type": "WORK", "value": "golf0@x.com"}]});
        patch(
            &mut d,
            json!([
                {"op": "add", "path": "emails", "value": [{"value": "GOLF0@X.COM"}]},
                {"op": "rEMoVe", "path": "emails[type eq \"WORK\"]"}
            ]),
        )
        .unwrap();
        assert!(d.get("emails").is_none(), "{d}");
        let mut d = json!({"userName": "x", "emails": [{"type": "work", "value": "a@x.com"}]});
        patch(
            &mut d,
            json!([
                {"op": "add", "path": "emails", "value": [{"Value": "A@X.com", "Display": "A", "Primary": "True"}]},
                {"op": "add", "value": {"emails": [{"value": "a@x.com", "type": "home"}]}}
            ]),
        )
        .unwrap();
        assert_eq!(
            d["emails"],
            json!([{"type": "work", "value": "A@X.com", "Display": "A", "Primary": "True"},
                   {"value": "a@x.com", "type": "home"}]),
            "the stored names kept, another type another value"
        );
    }

    /// An element of an attribute that has a `value` is made only with one: a filtered
    /// `primary` or `display` alone would make an address-less email (and, primary, take
    /// the primary from the real address).
    #[test]
    fn a_filter_matching_nothing_makes_no_element_without_a_value() {
        for (op, path, value) in [
            ("replace", "emails[type eq \"work\"].primary", json!(true)),
            ("add", "emails[type eq \"work\"].display", json!("Work")),
            ("add", "emails[type eq \"work\"]", json!({"primary": true})),
            (
                "replace",
                "phoneNumbers[type eq \"mobile\"].primary",
                json!(true),
            ),
            // An address has no `value`: its type and primary alone are nothing either.
            (
                "replace",
                "addresses[type eq \"home\"].primary",
                json!(true),
            ),
        ] {
            let mut d = json!({"userName": "x",
                "emails": [{"value": "real@x.com", "type": "home", "primary": true}],
                "addresses": [{"type": "work", "locality": "Leeds", "primary": true}]});
            let e = patch(&mut d, json!([{"op": op, "path": path, "value": value}])).unwrap_err();
            assert_eq!(e.scim_type, Some(ScimType::NoTarget), "{op} {path}: {e:?}");
        }
        // A remove that leaves an element with nothing of its own removes the element
        // (Entra clears the work address so): kept, a primary email had no address. The
        // other elements, and one left with something, stay.
        let mut d = json!({"userName": "x",
        "phoneNumbers": [{"value": "+1", "type": "mobile"}],
        "emails": [
            {"value": "w@x.com", "type": "work", "primary": true},
            {"value": "h@x.com", "type": "home"},
        ],
        "addresses": [
            {"type": "work", "locality": "Leeds", "primary": true},
            {"type": "home", "locality": "York", "postalCode": "Y1"},
        ]});
        patch(
            &mut d,
            json!([
                {"op": "Remove", "path": "phoneNumbers[type eq \"mobile\"].value"},
                {"op": "Remove", "path": "emails[type eq \"work\"].value"},
                {"op": "Remove", "path": "addresses[type eq \"work\"].locality"},
                {"op": "Remove", "path": "addresses[type eq \"home\"].locality"},
            ]),
        )
        .unwrap();
        assert!(d.get("phoneNumbers").is_none(), "{d}");
        assert_eq!(d["emails"], json!([{"value": "h@x.com", "type": "home"}]));
        assert_eq!(
            d["addresses"],
            json!([{"type": "home", "postalCode": "Y1"}])
        );
        // Judged on the result: a value given again in the same request keeps the
        // element, `primary` and all; the resource's own such element stays; one a
        // filtered operation makes so is still refused.
        let mut d = json!({"userName": "x",
            "emails": [{"value": "w@x.com", "type": "work", "primary": true}],
            "addresses": [{"type": "other"}, {"type": "work", "locality": "Leeds"}]});
        patch(
            &mut d,
            json!([
                {"op": "Remove", "path": "emails[type eq \"work\"].value"},
                {"op": "Add", "path": "emails[type eq \"work\"].value", "value": "new@x.com"},
                {"op": "Remove", "path": "addresses[type eq \"work\"].locality"},
            ]),
        )
        .unwrap();
        assert_eq!(
            d["emails"],
            json!([{"value": "new@x.com", "type": "work", "primary": true}])
        );
        assert_eq!(d["addresses"], json!([{"type": "other"}]));
        let mut d = json!({"userName": "x",
            "emails": [{"value": "w@x.com", "type": "work"}]});
        let e = patch(
            &mut d,
            json!([
                {"op": "Remove", "path": "emails[type eq \"work\"].value"},
                {"op": "Replace", "path": "emails[type eq \"home\"].primary", "value": true},
            ]),
        )
        .unwrap_err();
        assert_eq!(e.scim_type, Some(ScimType::NoTarget), "{e:?}");
        // With the value it is made, as Entra expects, whichever operation comes first;
        // an address has no `value` to give, and any part of it will do.
        let mut d = json!({"userName": "x"});
        patch(
            &mut d,
            json!([
                {"op": "add", "path": "emails[type eq \"work\"].primary", "value": true},
                {"op": "add", "path": "emails[type eq \"work\"].value", "value": "w@x.com"},
                {"op": "replace", "path": "addresses[type eq \"work\"].locality", "value": "Leeds"}
            ]),
        )
        .unwrap();
        assert_eq!(
            d["emails"],
            json!([{"type": "work", "value": "w@x.com", "primary": true}])
        );
        assert_eq!(
            d["addresses"],
            json!([{"type": "work", "locality": "Leeds"}])
        );
    }

    #[test]
    fn a_filter_selecting_several_values_cannot_make_them_all_primary() {
        let base = json!({"userName": "x", "emails": [
            {"value": "w1@x.com", "type": "work", "primary": true},
            {"value": "w2@x.com", "type": "work"},
            {"value": "h@x.com", "type": "home"}]});
        for (path, value) in [
            ("emails[type eq \"work\"].primary", json!(true)),
            ("emails[type eq \"work\"].primary", json!("True")),
            (
                "emails[type eq \"work\"]",
                json!({"value": "w@x.com", "primary": true}),
            ),
        ] {
            let mut d = base.clone();
            let e = patch(
                &mut d,
                json!([{"op": "replace", "path": path, "value": value}]),
            )
            .unwrap_err();
            assert_eq!(e.scim_type, Some(ScimType::InvalidValue), "{path}: {e:?}");
            assert_eq!(d, base, "{path}");
        }
        // One value selected is made primary, the others not.
        let mut d = base.clone();
        patch(
            &mut d,
            json!([{"op": "replace", "path": "emails[type eq \"home\"].primary", "value": true}]),
        )
        .unwrap();
        assert_eq!(d["emails"][2]["primary"], true);
    }

    #[test]
    fn filtered_add_matching_nothing_creates_the_element() {
        let mut d = json!({"userName": "x"});
        patch(
            &mut d,
            json!([
                {"op": "Add", "path": "emails[type eq \"work\"].value", "value": "x@w"},
                {"op": "Add", "path": "phoneNumbers[type eq \"mobile\" and primary eq true].value", "value": "+1"}
            ]),
        )
        .unwrap();
        assert_eq!(d["emails"], json!([{"type": "work", "value": "x@w"}]));
        assert_eq!(
            d["phoneNumbers"],
            json!([{"type": "mobile", "primary": true, "value": "+1"}])
        );
        let e = patch(
            &mut d,
            json!([{"op": "replace", "path": "emails[value co \"zz\"].type", "value": "home"}]),
        )
        .unwrap_err();
        assert_eq!(e.scim_type, Some(ScimType::NoTarget));
        // A replace selecting by the value names an element the client thinks exists.
        let e = patch(
            &mut d,
            json!([{"op": "replace", "path": "emails[value eq \"nomatch\"].type", "value": "home"}]),
        )
        .unwrap_err();
        assert_eq!(e.scim_type, Some(ScimType::NoTarget));
        assert_eq!(d["emails"].as_array().unwrap().len(), 1);

        // The filter's attribute under another spelling than the value's is one key, so
        // the document still normalizes (two keys would be one attribute given twice).
        let mut d = json!({"userName": "x"});
        patch(
            &mut d,
            json!([{"op": "add", "path": "emails[Type eq \"work\"]",
                    "value": {"type": "work", "value": "x@w"}}]),
        )
        .unwrap();
        assert_eq!(d["emails"], json!([{"type": "work", "value": "x@w"}]));
        let n = crate::scim::resource::normalize_input(ResourceKind::User, d).unwrap();
        assert_eq!(
            n.resource["emails"],
            json!([{"type": "work", "value": "x@w"}])
        );
    }

    #[test]
    fn multi_valued_add_appends_without_duplicates() {
        let mut d = user();
        patch(
            &mut d,
            json!([{"op": "add", "path": "emails", "value": [
                {"value": "b@home.example", "type": "home"},
                {"value": "c@other.example", "type": "other"}
            ]}]),
        )
        .unwrap();
        assert_eq!(d["emails"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn manager_bare_string_and_filtered_remove() {
        let mut d = user();
        let mgr = format!("{ENTERPRISE_USER_SCHEMA}:manager");
        patch(
            &mut d,
            json!([{"op": "Add", "path": mgr, "value": {"value": "m0", "displayName": "Zed"}}]),
        )
        .unwrap();
        patch(
            &mut d,
            json!([{"op": "replace", "path": mgr, "value": {"value": "m0"}}]),
        )
        .unwrap();
        assert_eq!(
            d[ENTERPRISE_USER_SCHEMA]["manager"]["displayName"], "Zed",
            "the same manager: sub-attributes merge (RFC 7644 §3.5.2.3)"
        );
        // Another manager: Zed's name is not the new manager's, whether the id comes
        // whole, by its `value` path, or as a path-less dotted key.
        patch(
            &mut d,
            json!([{"op": "replace", "path": format!("{mgr}.value"), "value": "m0"}]),
        )
        .unwrap();
        assert_eq!(d[ENTERPRISE_USER_SCHEMA]["manager"]["displayName"], "Zed");
        patch(
            &mut d,
            json!([{"op": "replace", "path": format!("{mgr}.value"), "value": "m2"}]),
        )
        .unwrap();
        assert_eq!(d[ENTERPRISE_USER_SCHEMA]["manager"], json!({"value": "m2"}));
        d[ENTERPRISE_USER_SCHEMA]["manager"]["displayName"] = json!("Yan");
        patch(
            &mut d,
            json!([{"op": "replace", "value": {"manager.value": "m3"}}]),
        )
        .unwrap();
        assert_eq!(d[ENTERPRISE_USER_SCHEMA]["manager"], json!({"value": "m3"}));
        d[ENTERPRISE_USER_SCHEMA]["manager"]["displayName"] = json!("Xi");
        patch(&mut d, json!([{"op": "Add", "path": mgr, "value": "m1"}])).unwrap();
        assert_eq!(d[ENTERPRISE_USER_SCHEMA]["manager"], json!({"value": "m1"}));
        patch(
            &mut d,
            json!([{"op": "remove", "path": format!("{mgr}[value eq \"other\"]")}]),
        )
        .unwrap();
        assert!(d[ENTERPRISE_USER_SCHEMA].get("manager").is_some());
        patch(
            &mut d,
            json!([{"op": "remove", "path": format!("{mgr}[value eq \"m1\"]")}]),
        )
        .unwrap();
        assert!(d[ENTERPRISE_USER_SCHEMA].get("manager").is_none());
    }

    #[test]
    fn errors() {
        let cases = [
            (json!({"Operations": []}), ScimType::InvalidSyntax),
            (
                json!({"schemas": ["x"], "Operations": [{"op": "add", "path": "nickName", "value": "x"}]}),
                ScimType::InvalidSyntax,
            ),
            (
                json!({"Operations": [{"op": "frob", "path": "x"}]}),
                ScimType::InvalidSyntax,
            ),
            (
                json!({"Operations": [{"op": "remove"}]}),
                ScimType::NoTarget,
            ),
            (
                json!({"Operations": [{"op": "add", "path": "nickName"}]}),
                ScimType::InvalidValue,
            ),
            (
                json!({"Operations": [{"op": "add", "path": "emails[type eq"}]}),
                ScimType::InvalidPath,
            ),
            (
                json!({"Operations": [{"op": "replace", "value": "x"}]}),
                ScimType::InvalidValue,
            ),
        ];
        for (body, want) in cases {
            let e = parse_patch_request(body.clone()).expect_err(&body.to_string());
            assert_eq!(e.scim_type, Some(want), "{body}");
        }
        let mut d = user();
        let unknown = patch(
            &mut d,
            json!([{"op": "add", "path": "favouriteColour", "value": "x"}]),
        );
        assert_eq!(unknown.unwrap_err().scim_type, Some(ScimType::InvalidPath));
        let ro = patch(
            &mut d,
            json!([{"op": "replace", "path": "groups", "value": []}]),
        );
        assert_eq!(ro.unwrap_err().scim_type, Some(ScimType::Mutability));
        let bad_urn = patch(
            &mut d,
            json!([{"op": "add", "path": "urn:x:y:z", "value": "x"}]),
        );
        assert!(bad_urn.is_err());
        assert_eq!(d, user(), "failed operations left the document as it was");
    }

    #[test]
    fn member_ops_are_split_out() {
        let body = json!({"Operations": [
            {"op": "Add", "path": "members", "value": [{"value": "a"}, {"value": "b", "type": "User"}]},
            {"op": "Remove", "path": "members[value eq \"c\"]"},
            {"op": "Remove", "path": "members", "value": [{"value": "d"}]},
            {"op": "remove", "path": "members[type eq \"Group\"]"},
            {"op": "replace", "value": {"id": "g", "displayName": "Team", "members": [{"value": "e"}]}},
            {"op": "remove", "path": "members"}
        ]});
        let GroupPatch {
            members,
            doc_ops,
            ignored,
        } = split_member_ops(parse_patch_request(body).unwrap()).unwrap();
        assert!(ignored.is_empty(), "{ignored:?}");
        assert!(
            matches!(&members[0], MemberOp::Add(v) if v.len() == 2 && v[1].kind.as_deref() == Some("User"))
        );
        assert!(matches!(&members[1], MemberOp::Remove(v) if v == &["c"]));
        assert!(matches!(&members[2], MemberOp::Remove(v) if v == &["d"]));
        assert!(matches!(&members[3], MemberOp::RemoveMatching(_)));
        assert!(matches!(&members[4], MemberOp::ReplaceAll(v) if v[0].value == "e"));
        assert!(matches!(&members[5], MemberOp::RemoveAll));
        assert_eq!(doc_ops.len(), 1);
        assert!(doc_ops[0].value.as_ref().unwrap().get("members").is_none());
    }

    /// A value narrows a filtered member removal, as it does one of emails: naming
    /// another member than the filter's, it removed the filter's.
    #[test]
    fn a_value_narrows_a_filtered_member_removal() {
        let body = json!({"Operations": [
            {"op": "remove", "path": "members[value eq \"u1\"]", "value": [{"value": "u2"}]},
            {"op": "remove", "path": "members[value eq \"u1\"]", "value": [{"value": "u1"}]},
            {"op": "remove", "path": "members[type eq \"User\"]", "value": [{"value": "u2"}]},
            {"op": "remove", "path": "members[type eq \"User\"]", "value": []},
            {"op": "remove", "path": "members[type eq \"User\"]", "value": [{"value": null}]},
            {"op": "remove", "path": "members", "value": [{"value": null}, {}]},
        ]});
        let members = split_member_ops(parse_patch_request(body).unwrap())
            .unwrap()
            .members;
        assert!(matches!(&members[0], MemberOp::Remove(v) if v.is_empty()));
        assert!(matches!(&members[1], MemberOp::Remove(v) if v == &["u1"]));
        let MemberOp::RemoveMatching(f) = &members[2] else {
            panic!("{:?}", members[2]);
        };
        let member = |id: &str| json!({"value": id, "type": "User"});
        let path = AttrPath::simple("members");
        assert!(f.matches_element(ResourceKind::Group, &path, &member("u2")));
        assert!(!f.matches_element(ResourceKind::Group, &path, &member("u1")));
        // Lists that name no member remove none, rather than being refused.
        for op in &members[3..6] {
            assert!(matches!(op, MemberOp::Remove(v) if v.is_empty()), "{op:?}");
        }
        // Thousands of ids nest as deep as their logarithm.
        let many = (0..4096).map(|i| format!("u{i}")).collect();
        fn depth(f: &Filter) -> usize {
            match f {
                Filter::Or(a, b) | Filter::And(a, b) => 1 + depth(a).max(depth(b)),
                _ => 1,
            }
        }
        assert_eq!(depth(&any_member_of(many).unwrap()), 13);
    }

    #[test]
    fn unknown_member_sub_attributes_are_named() {
        let body = json!({"Operations": [
            {"op": "add", "path": "members", "value": [{"value": "a", "displayName": "A", "$ref": "x"}]},
            {"op": "replace", "value": {"members": [{"value": "b", "displayName": "B", "Extra": 1}]}}
        ]});
        let split = split_member_ops(parse_patch_request(body).unwrap()).unwrap();
        assert_eq!(split.ignored, ["members.displayName", "members.Extra"]);
        assert!(matches!(&split.members[0], MemberOp::Add(v) if v[0].value == "a"));
    }

    #[test]
    fn large_member_add_is_one_op() {
        let refs: Vec<Value> = (0..50_000)
            .map(|i| json!({"value": format!("u{i}")}))
            .collect();
        let body = json!({"Operations": [{"op": "add", "path": "members", "value": refs}]});
        let members = split_member_ops(parse_patch_request(body).unwrap())
            .unwrap()
            .members;
        assert!(matches!(&members[0], MemberOp::Add(v) if v.len() == 50_000));
    }
}
