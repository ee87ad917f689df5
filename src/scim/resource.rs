//! Resource documents: normalizing what clients send into what is stored, and projecting
//! what is stored into what a client asked to see (RFC 7644 §3.4.2.5, §3.9).
//!
//! Stored documents use the schema's spelling of every attribute name and the schema's
//! types (`"False"` becomes `false`), and keep values, array order and unknown-to-us but
//! well-formed sub-attribute values exactly as sent: a client reading back must see what
//! it wrote.
use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::scim::error::{ScimError, ScimResult};
use crate::scim::filter::AttrPath;
use crate::scim::schema::{self, AttrDef, AttrKind, Mutability, ResourceKind, Returned, SchemaDef};

/// A normalized document and the names of what was dropped because no schema defines it.
#[derive(Debug)]
pub struct Normalized {
    pub resource: Value,
    pub ignored: Vec<String>,
}

/// The multi-valued attributes of a stored document whose values are objects (emails,
/// phoneNumbers, addresses, …): where `primary` lives.
fn valued_lists(doc: &Value) -> impl Iterator<Item = (&String, &Vec<Value>)> {
    doc.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k, v.as_array()?)))
        .filter(|(_, a)| a.iter().all(Value::is_object))
}

/// A multi-valued attribute's value marked `"primary": true`.
pub(crate) fn is_primary(v: &Value) -> bool {
    v.get("primary") == Some(&Value::Bool(true))
}

fn several_primaries(values: &[Value]) -> bool {
    values.iter().filter(|v| is_primary(v)).count() > 1
}

/// "The primary attribute value 'true' MUST appear no more than once" (RFC 7643 §2.4):
/// a created or replaced resource with two primaries is refused, since which one the
/// client meant cannot be known.
pub fn one_primary_each(doc: &Value) -> ScimResult<()> {
    for (k, values) in valued_lists(doc) {
        if several_primaries(values) {
            return Err(ScimError::invalid_value(format!(
                "{k}: \"primary\": true on more than one value; at most one may be primary"
            )));
        }
    }
    Ok(())
}

/// What identifies a value of a multi-valued attribute: its `value`, folded to lower
/// case where the schema compares it so (an email, a role; not a photo's URL or a
/// certificate), and its `type` in lower case, if it has one. The sub-attributes' names
/// are read in any letter case, as a PATCH's values come before normalization.
pub(crate) fn value_key(
    def: Option<&AttrDef>,
    m: &Map<String, Value>,
) -> Option<(String, Option<String>)> {
    let get = |name: &str| {
        m.get(name).or_else(|| {
            m.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
    };
    let v = get("value")?;
    let sub = def.and_then(|d| d.sub_attributes.iter().find(|s| s.name == "value"));
    let exact = sub.is_some_and(|s| s.case_exact);
    let v = match v {
        Value::String(s) if !exact => s.to_lowercase(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let t = get("type").and_then(Value::as_str).map(str::to_lowercase);
    Some((v, t))
}

/// Whether two values' types (from [`value_key`]) let one be a repeat of the other: the
/// same, or one of them untyped.
pub(crate) fn types_agree(a: &Option<String>, b: &Option<String>) -> bool {
    a.is_none() || b.is_none() || a == b
}

/// Where the values of a multi-valued attribute are, by [`value_key`]: what tells a
/// repeat of a held value from another value.
#[derive(Default)]
pub(crate) struct HeldValues(HashMap<String, Vec<(usize, Option<String>)>>);

impl HeldValues {
    /// Note the value with this key as held at `at`.
    pub(crate) fn note(&mut self, (value, kind): (String, Option<String>), at: usize) {
        self.0.entry(value).or_default().push((at, kind));
    }

    /// Where the value a value with this key repeats is held, if one is: the same
    /// `value`, and types that agree. An untyped held value that meets a typed repeat
    /// has that type from then on.
    pub(crate) fn repeat(&mut self, (value, kind): &(String, Option<String>)) -> Option<usize> {
        let (at, held) = self
            .0
            .get_mut(value)?
            .iter_mut()
            .find(|(_, held)| types_agree(held, kind))?;
        if held.is_none() {
            held.clone_from(kind);
        }
        Some(*at)
    }
}

/// Two values without a `value` (addresses) are the same when equal apart from `primary`.
fn same_unvalued(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
    let not_primary = |(k, _): &(&String, &Value)| !k.eq_ignore_ascii_case("primary");
    let rest = |m: &Map<String, Value>| m.iter().filter(not_primary).count();
    rest(a) == rest(b)
        && a.iter()
            .filter(not_primary)
            .all(|(k, v)| b.get(k) == Some(v))
}

/// A PATCH `add` of a value the attribute already holds, spelled differently
/// (`"Primary": "True"` for `true`, the address in other letter case), leaves one value,
/// not two: RFC 7644 §3.5.2.1 has an add of a value already there change nothing but
/// what it says of it, and two equal values, both primary, made the user one that its own
/// GET-then-PUT (Okta's update) was refused for. Runs on the normalized document, where
/// the spellings agree. Values are the same when their `value`s are (see [`value_key`])
/// and their types agree or one has none; a later value's sub-attributes win over the
/// earlier one's. Only the attributes the PATCH changed from `before` are merged: a
/// POST or PUT stores values as sent, and a PATCH of the title must not rewrite them.
pub fn merge_repeats(kind: ResourceKind, doc: &mut Value, before: &Value) {
    let Some(obj) = doc.as_object_mut() else {
        return;
    };
    for (key, list) in obj.iter_mut() {
        if before.get(key) == Some(list) {
            continue;
        }
        let Value::Array(items) = list else {
            continue;
        };
        if items.len() < 2 || !items.iter().all(Value::is_object) {
            continue;
        }
        let def = schema::lookup(kind, None, key, None);
        // Every item is an object (checked above), so nothing is lost here.
        let values = items.drain(..).filter_map(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        });
        let mut kept: Vec<Map<String, Value>> = Vec::new();
        let mut held = HeldValues::default();
        for new in values {
            let earlier = match value_key(def, &new) {
                Some(key) => held.repeat(&key).or_else(|| {
                    held.note(key, kept.len());
                    None
                }),
                None => kept
                    .iter()
                    .position(|k| !k.contains_key("value") && same_unvalued(k, &new)),
            };
            match earlier {
                Some(i) => kept[i].extend(new),
                None => kept.push(new),
            }
        }
        *items = kept.into_iter().map(Value::Object).collect();
    }
}

/// The `primary` flag of a multi-valued attribute's value, as a client may spell it
/// before normalization (`"Primary": "True"`): its key, and whether it says true.
fn primary_flag(v: &Value) -> Option<(&String, bool)> {
    let (k, flag) = v
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("primary"))?;
    let on = match flag {
        Value::Bool(b) => *b,
        Value::String(s) => s.eq_ignore_ascii_case("true"),
        _ => false,
    };
    Some((k, on))
}

pub(crate) fn marked_primary(v: &Value) -> bool {
    primary_flag(v).is_some_and(|(_, on)| on)
}

/// The values marked primary of each multi-valued attribute, copied: what
/// [`settle_primaries`] compares a PATCH operation's result with. Only those: a copy of
/// the whole lists before each operation made a PATCH of many small adds cost more with
/// each one.
pub fn primaries_of(doc: &Value) -> Value {
    Value::Object(
        valued_lists(doc)
            .map(|(k, v)| {
                let marked = v.iter().filter(|v| marked_primary(v)).cloned().collect();
                (k.clone(), Value::Array(marked))
            })
            .collect(),
    )
}

/// Whether `v` is a value that was primary before: one of `before` (the values that
/// were primary) with the same identity, its `value` as the schema compares it and the
/// same `type` or none (see [`value_key`]); for values without a `value` (addresses),
/// the same sub-attributes apart from `primary`.
fn was_primary(def: Option<&AttrDef>, before: &[&Value], v: &Value) -> bool {
    let Some(m) = v.as_object() else {
        return before.contains(&v);
    };
    let key = value_key(def, m);
    before
        .iter()
        .filter_map(|b| b.as_object())
        .any(|b| match (&key, value_key(def, b)) {
            (Some((v, t)), Some((bv, bt))) => *v == bv && types_agree(t, &bt),
            (None, None) => same_unvalued(b, m),
            _ => false,
        })
}

/// After a PATCH operation made a value primary, the others stop being primary, as
/// RFC 7644 §3.5.2 asks of the server: a value that is primary and was not (new, or
/// newly flagged) wins over those that already were, the last such one if several.
/// Run after each operation, in order, so that a later operation's choice stands (and
/// one that removes the flag or the value leaves no primary behind). A value that was
/// primary and is only re-sent or rewritten (its address changed) stays what it was,
/// not a new choice. Reads the flag as a client may spell it before normalization.
pub fn settle_primaries(kind: ResourceKind, before: &Value, after: &mut Value) {
    let keys: Vec<String> = valued_lists(after)
        .filter(|(_, values)| values.iter().filter(|v| marked_primary(v)).count() > 1)
        .map(|(k, _)| k.clone())
        .collect();
    for k in keys {
        let def = schema::lookup(kind, None, &k, None);
        let old: Vec<&Value> = before
            .as_object()
            .and_then(|o| o.iter().find(|(ok, _)| ok.eq_ignore_ascii_case(&k)))
            .and_then(|(_, v)| v.as_array())
            .into_iter()
            .flatten()
            .filter(|v| marked_primary(v))
            .collect();
        let Some(values) = after.get_mut(&k).and_then(Value::as_array_mut) else {
            continue;
        };
        let Some(keep) = values
            .iter()
            .rposition(|v| marked_primary(v) && !was_primary(def, &old, v))
        else {
            continue;
        };
        for (i, v) in values.iter_mut().enumerate() {
            if i == keep {
                continue;
            }
            // The key as the client spelled it, so that one flag is left, not two.
            if let Some((flag, true)) = primary_flag(v).map(|(f, on)| (f.clone(), on)) {
                v[flag.as_str()] = Value::Bool(false);
            }
        }
    }
}

/// Turn a client's document into the stored form. Read-only attributes (`id`, `meta`,
/// `groups`, …) are dropped: the server owns them. Attributes no schema defines are
/// dropped and reported in `ignored`, so the caller can log them. Values of the wrong type
/// are refused with `invalidValue`.
pub fn normalize_input(kind: ResourceKind, body: Value) -> ScimResult<Normalized> {
    let Value::Object(input) = body else {
        return Err(ScimError::invalid_syntax("a resource is a JSON object"));
    };
    let core = schema::core_schema(kind);
    let mut out = Map::new();
    let mut ignored = Vec::new();
    let mut exts: Vec<(&'static SchemaDef, Map<String, Value>)> = Vec::new();

    for (key, value) in input {
        if key.eq_ignore_ascii_case("schemas") {
            check_schemas(core, &value)?;
            continue;
        }
        if let Some(ext) = extension(kind, &key) {
            let Value::Object(inner) = value else {
                if value.is_null() {
                    continue;
                }
                return Err(ScimError::invalid_value(format!(
                    "{key}: an extension's value is an object"
                )));
            };
            let mut m = Map::new();
            for (k, v) in inner {
                put_attr(ext, &mut m, &k, v, &mut ignored, &format!("{}:", ext.id))?;
            }
            merge_ext(&mut exts, ext, m)?;
            continue;
        }
        // A URN-qualified attribute name at the top level (`urn:…:User:department`).
        if super::urn_prefixed(&key) {
            if let Some((urn, attr)) = key.rsplit_once(':') {
                if urn.eq_ignore_ascii_case(core.id) {
                    put_attr(core, &mut out, attr, value, &mut ignored, "")?;
                    continue;
                }
                if let Some(ext) = extension(kind, urn) {
                    put_ext_attr(&mut exts, ext, attr, value, &mut ignored)?;
                    continue;
                }
            }
            ignored.push(key);
            continue;
        }
        let top = key.split_once('.').map_or(key.as_str(), |(a, _)| a);
        if let Some(ext) = schema::extension_owning(kind, top) {
            put_ext_attr(&mut exts, ext, &key, value, &mut ignored)?;
            continue;
        }
        put_attr(core, &mut out, &key, value, &mut ignored, "")?;
    }

    let mut schemas = vec![Value::String(core.id.to_owned())];
    for (ext, m) in exts {
        if !m.is_empty() {
            schemas.push(Value::String(ext.id.to_owned()));
            out.insert(ext.id.to_owned(), Value::Object(m));
        }
    }
    out.insert("schemas".into(), Value::Array(schemas));

    if let Some(name) = missing_required(kind, |name| out.get(name)) {
        return Err(ScimError::invalid_value(format!(
            "{name} is required for a {}",
            kind.name()
        )));
    }
    Ok(Normalized {
        resource: Value::Object(out),
        ignored,
    })
}

/// The first required attribute of `kind`'s core schema that `get` finds unassigned
/// (absent, null or blank).
pub(crate) fn missing_required<'a>(
    kind: ResourceKind,
    get: impl Fn(&str) -> Option<&'a Value>,
) -> Option<&'static str> {
    schema::core_schema(kind)
        .attributes
        .iter()
        .filter(|d| d.required)
        .find(|d| match get(d.name) {
            Some(Value::String(s)) => s.trim().is_empty(),
            Some(v) => v.is_null(),
            None => true,
        })
        .map(|d| d.name)
}

/// A resource's `schemas` must name the endpoint's own core schema (RFC 7643 §3): a
/// Group document POSTed to /Users is a client's mistake, not a user. Other URNs may
/// come beside it (Entra adds one of Microsoft's to a group create), and a document
/// without `schemas` (or with an empty list) is taken, as some clients leave it out.
fn check_schemas(core: &SchemaDef, value: &Value) -> ScimResult<()> {
    let names = match value {
        Value::Null => return Ok(()),
        Value::Array(items) => items.iter().map(Value::as_str).collect::<Option<Vec<_>>>(),
        _ => None,
    };
    let Some(names) = names else {
        return Err(ScimError::invalid_syntax(format!(
            "schemas is a list of schema URNs, not {value}"
        )));
    };
    // An empty list says no more than none.
    if names.is_empty() || names.iter().any(|n| n.eq_ignore_ascii_case(core.id)) {
        return Ok(());
    }
    Err(ScimError::invalid_syntax(format!(
        "schemas {names:?} does not name {}, the schema of this endpoint's resources",
        core.id
    )))
}

fn extension(kind: ResourceKind, urn: &str) -> Option<&'static SchemaDef> {
    schema::schemas_of(kind)
        .iter()
        .skip(1)
        .find(|s| s.id.eq_ignore_ascii_case(urn))
        .copied()
}

/// Place one attribute of extension `ext` given outside the extension's object (a
/// URN-qualified or an unqualified name).
fn put_ext_attr(
    exts: &mut Vec<(&'static SchemaDef, Map<String, Value>)>,
    ext: &'static SchemaDef,
    key: &str,
    value: Value,
    ignored: &mut Vec<String>,
) -> ScimResult<()> {
    let mut m = Map::new();
    put_attr(ext, &mut m, key, value, ignored, &format!("{}:", ext.id))?;
    merge_ext(exts, ext, m)
}

fn merge_ext(
    exts: &mut Vec<(&'static SchemaDef, Map<String, Value>)>,
    ext: &'static SchemaDef,
    m: Map<String, Value>,
) -> ScimResult<()> {
    match exts.iter_mut().find(|(e, _)| e.id == ext.id) {
        Some((_, existing)) => merge_into(existing, m, &format!("{}:", ext.id))?,
        None => exts.push((ext, m)),
    }
    Ok(())
}

/// Put `new`'s attributes into `existing`; a complex attribute present in both takes the
/// sub-attributes of each (`manager.value` and `manager.displayName` given apart), unless
/// one is given twice.
fn merge_into(
    existing: &mut Map<String, Value>,
    new: Map<String, Value>,
    prefix: &str,
) -> ScimResult<()> {
    for (k, v) in new {
        let path = format!("{prefix}{k}");
        match (existing.get_mut(&k), v) {
            (Some(Value::Object(have)), Value::Object(more)) => {
                for (sub, v) in more {
                    once(have, &sub, &format!("{path}.{sub}"))?;
                    have.insert(sub, v);
                }
            }
            (_, v) => {
                once(existing, &k, &path)?;
                existing.insert(k, v);
            }
        }
    }
    Ok(())
}

/// Refuse a second value for an attribute: SCIM names are case-insensitive and may come
/// qualified or not, so `userName` and `USERNAME`, or `title` and `urn:…:User:title`,
/// name one attribute, and keeping either value would silently drop the other.
fn once(out: &Map<String, Value>, name: &str, path: &str) -> ScimResult<()> {
    if out.contains_key(name) {
        return Err(ScimError::invalid_syntax(format!(
            "{path} is given twice (attribute names are case-insensitive, and may be qualified by their schema's URN); give it once"
        )));
    }
    Ok(())
}

/// Place one attribute (possibly dotted: `name.givenName`) into `out` in stored form.
fn put_attr(
    schema: &SchemaDef,
    out: &mut Map<String, Value>,
    key: &str,
    value: Value,
    ignored: &mut Vec<String>,
    prefix: &str,
) -> ScimResult<()> {
    let (name, sub) = match key.split_once('.') {
        Some((a, s)) => (a, Some(s)),
        None => (key, None),
    };
    let Some(def) = schema
        .attributes
        .iter()
        .find(|a| a.name.eq_ignore_ascii_case(name))
    else {
        // Common attributes: externalId is the client's, id and meta are the server's.
        if sub.is_none() && name.eq_ignore_ascii_case("externalId") && prefix.is_empty() {
            // A number is taken as its text, as for every other string attribute: an HR
            // system's numeric id is still an id.
            let text = match value {
                Value::Null => None,
                Value::String(s) => Some(s),
                Value::Number(n) => Some(number_as_text(&n, "externalId")?),
                _ => return Err(ScimError::invalid_value("externalId must be a string")),
            };
            if let Some(s) = text {
                check_text(&s, "externalId")?;
                once(out, "externalId", "externalId")?;
                out.insert("externalId".into(), Value::String(s));
            }
        } else if !(name.eq_ignore_ascii_case("id") || name.eq_ignore_ascii_case("meta"))
            || !prefix.is_empty()
        {
            ignored.push(format!("{prefix}{key}"));
        }
        return Ok(());
    };
    if def.mutability == Mutability::ReadOnly {
        return Ok(());
    }
    match sub {
        None => {
            let path = format!("{prefix}{}", def.name);
            let v = normalize_value(def, value, ignored, &path)?;
            // A null next to a value unassigns nothing, whichever key sorts first.
            // Sub-attributes that came first as dotted keys (`Name.givenName` sorts before
            // `name`) are merged, unless one is given both ways.
            if let Some(v) = v {
                merge_into(out, Map::from_iter([(def.name.to_owned(), v)]), prefix)?;
            }
        }
        Some(s) => {
            // `name.givenName` as a key: merge into the complex value.
            let Some(sub_def) = def
                .sub_attributes
                .iter()
                .find(|x| x.name.eq_ignore_ascii_case(s))
            else {
                ignored.push(format!("{prefix}{key}"));
                return Ok(());
            };
            if def.multi_valued {
                return Err(ScimError::invalid_value(format!(
                    "{key}: set sub-attributes of a multi-valued attribute through PATCH paths"
                )));
            }
            let path = format!("{prefix}{}.{}", def.name, sub_def.name);
            let v = normalize_scalar(sub_def, value, &path)?;
            let slot = out
                .entry(def.name.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if let (Value::Object(o), Some(v)) = (slot, v) {
                once(o, sub_def.name, &path)?;
                o.insert(sub_def.name.to_owned(), v);
            }
        }
    }
    Ok(())
}

/// A complex value sent as its JSON text (`"{\"value\": \"Reader\"}"`), as Entra sends
/// `roles` entries: the object it encodes.
pub(crate) fn encoded_object(s: &str) -> Option<Map<String, Value>> {
    if !s.trim_start().starts_with('{') {
        return None;
    }
    match serde_json::from_str(s) {
        Ok(Value::Object(o)) => Some(o),
        _ => None,
    }
}

/// The entries of a complex multi-valued attribute as sent, with one sent as the JSON
/// text of a list of entries (`"[{\"value\": \"Writer\"}]"`) read as those entries: kept
/// whole, it was stored as one entry whose `value` was the list's text.
pub(crate) fn complex_entries(items: Vec<Value>) -> Vec<Value> {
    let encoded_list = |v: &Value| match v {
        Value::String(s) if s.trim_start().starts_with('[') => {
            match serde_json::from_str::<Value>(s) {
                Ok(Value::Array(list))
                    if !list.is_empty() && list.iter().all(|e| e.is_object() || e.is_string()) =>
                {
                    Some(list)
                }
                _ => None,
            }
        }
        _ => None,
    };
    if !items.iter().any(|i| encoded_list(i).is_some()) {
        return items;
    }
    items
        .into_iter()
        .flat_map(|i| encoded_list(&i).unwrap_or_else(|| vec![i]))
        .collect()
}

/// A value of attribute `def` in stored form; `None` when it is unassigned (null, empty).
fn normalize_value(
    def: &AttrDef,
    value: Value,
    ignored: &mut Vec<String>,
    path: &str,
) -> ScimResult<Option<Value>> {
    if value.is_null() {
        return Ok(None);
    }
    if def.multi_valued {
        let items = match value {
            Value::Array(items) => items,
            single => vec![single],
        };
        let items = if def.kind == AttrKind::Complex {
            complex_entries(items)
        } else {
            items
        };
        // A group's members are stored one key each and may run to the hundred
        // thousand; every other list is copied whole into the document, the roster
        // record and each change event: 300,000 emails in a 15 MB body took the daemon
        // past 1 GB and held the tenant's writes for seconds.
        check_value_count(def, path, items.len())?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let item = if def.kind == AttrKind::Complex {
                normalize_complex(def, item, ignored, path)?
            } else {
                normalize_scalar(def, item, path)?
            };
            out.extend(item);
        }
        return Ok((!out.is_empty()).then_some(Value::Array(out)));
    }
    if def.kind == AttrKind::Complex {
        return normalize_complex(def, value, ignored, path);
    }
    normalize_scalar(def, value, path)
}

fn normalize_complex(
    def: &AttrDef,
    value: Value,
    ignored: &mut Vec<String>,
    path: &str,
) -> ScimResult<Option<Value>> {
    let obj = match value {
        Value::Object(o) => o,
        Value::Null => return Ok(None),
        // Entra sends `manager` as a bare id and `roles` entries as JSON-encoded strings.
        Value::String(s) => match encoded_object(&s) {
            Some(o) => o,
            // Only an attribute with a `value` can take a bare string as its value;
            // `name` has none, and "Ada Lovelace" would otherwise vanish with a 201.
            _ if def
                .sub_attributes
                .iter()
                .any(|sub| sub.name.eq_ignore_ascii_case("value")) =>
            {
                Map::from_iter([("value".to_owned(), Value::String(s))])
            }
            _ => {
                return Err(ScimError::invalid_value(format!(
                    "{path}: expected an object, got the string {s:?}"
                )));
            }
        },
        other => {
            return Err(ScimError::invalid_value(format!(
                "{path}: expected an object, got {other}"
            )));
        }
    };
    let mut out = Map::new();
    for (k, v) in obj {
        let Some(sub) = def
            .sub_attributes
            .iter()
            .find(|s| s.name.eq_ignore_ascii_case(&k))
        else {
            ignored.push(format!("{path}.{k}"));
            continue;
        };
        // Read-only sub-attributes the server computes (manager.displayName is kept:
        // clients send it and expect to read it back).
        let sub_path = format!("{path}.{}", sub.name);
        if let Some(v) = normalize_scalar(sub, v, &sub_path)? {
            once(&out, sub.name, &sub_path)?;
            out.insert(sub.name.to_owned(), v);
        }
    }
    Ok((!out.is_empty()).then_some(Value::Object(out)))
}

/// The longest string value taken, in bytes. No name, title, address or certificate
/// comes near it, while one value of megabytes is copied into the stored document, the
/// roster record, the change event and every downstream request: a 12 MB title took the
/// daemon's peak memory past 250 MB.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// The largest stored document taken, serialized, in bytes. A person's record is a few
/// kilobytes; one of hundreds of megabytes (1,000 addresses of 64 KiB lines, grown
/// PATCH by PATCH) would be copied into the roster record and every change event.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// The document's size as JSON, counted without building the text.
fn json_len(doc: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing a Value into a counter cannot fail.
    let _ = serde_json::to_writer(&mut c, doc);
    c.0
}

/// Refuse a document over [`MAX_DOCUMENT_BYTES`], unless it was that large before this
/// write (`before`, for a PATCH): a user stored large is still deactivated by a PATCH.
pub fn check_document_size(doc: &Value, before: Option<&Value>) -> ScimResult<()> {
    let size = json_len(doc);
    if size <= MAX_DOCUMENT_BYTES || before.is_some_and(|b| json_len(b) >= size) {
        return Ok(());
    }
    Err(ScimError::invalid_value(format!(
        "the resource would be {size} bytes as JSON; rosterd takes at most {MAX_DOCUMENT_BYTES}"
    )))
}

/// The most values one multi-valued attribute (other than a group's members) takes. No
/// person has a thousand emails, phone numbers or roles.
pub const MAX_VALUES: usize = 1000;

/// Every multi-valued attribute of `doc` (an extension's too) within [`MAX_VALUES`],
/// checked after each PATCH operation. The cap on one operation's values let a PATCH of
/// 32,000 one-value adds grow a list to the end, each add dearer than the last: 576 s
/// of CPU, with the tenant's other writes waiting, before the final check refused it.
pub(crate) fn check_list_sizes(doc: &Value) -> ScimResult<()> {
    let Some(attrs) = doc.as_object() else {
        return Ok(());
    };
    let nested = attrs
        .iter()
        .filter(|(k, _)| k.starts_with("urn:"))
        .filter_map(|(_, v)| v.as_object())
        .flatten();
    for (name, v) in attrs.iter().chain(nested) {
        if let Value::Array(values) = v {
            check_count(name, name, values.len())?;
        }
    }
    Ok(())
}

/// Refuse a list of `n` values for `def` beyond [`MAX_VALUES`]. A group's members are
/// exempt: they are stored one key each, never copied whole.
pub(crate) fn check_value_count(def: &AttrDef, path: &str, n: usize) -> ScimResult<()> {
    check_count(def.name, path, n)
}

/// [`check_value_count`] by the attribute's name, as a client may spell it.
fn check_count(name: &str, path: &str, n: usize) -> ScimResult<()> {
    if n > MAX_VALUES && !name.eq_ignore_ascii_case("members") {
        return Err(ScimError::invalid_value(format!(
            "{path}: {n} values; rosterd takes at most {MAX_VALUES}"
        )));
    }
    Ok(())
}

/// A string value rosterd keeps and sends on. A NUL character is valid JSON but no name,
/// title or address holds one, and it would travel on into the CSV exports and
/// downstream targets, where C-string tools cut the cell at it; a value over
/// [`MAX_VALUE_BYTES`] is no roster data. Both are refused rather than cut, so the client
/// learns of it.
pub(crate) fn check_text(s: &str, path: &str) -> ScimResult<()> {
    if s.contains('\0') {
        return Err(ScimError::invalid_value(format!(
            "{path}: the value contains a NUL character (U+0000)"
        )));
    }
    if s.len() > MAX_VALUE_BYTES {
        return Err(ScimError::invalid_value(format!(
            "{path}: the value is {} bytes long; rosterd takes at most {MAX_VALUE_BYTES}",
            s.len()
        )));
    }
    Ok(())
}

/// A JSON number sent for a string attribute (an employee number), as its text. Only a
/// whole number that fits 64 bits is: any other reaches rosterd as a float, whose text
/// is not what was sent (`1e2` would be stored as "100.0", a 30-digit id as
/// "1.2345678901234568e+29"), so it is refused rather than silently changed.
fn number_as_text(n: &serde_json::Number, path: &str) -> ScimResult<String> {
    if n.is_i64() || n.is_u64() {
        return Ok(n.to_string());
    }
    Err(ScimError::invalid_value(format!(
        "{path}: the number {n} cannot be kept as sent (a number is read as text only when \
         it is a whole number within 64 bits); send it as a JSON string"
    )))
}

fn normalize_scalar(def: &AttrDef, value: Value, path: &str) -> ScimResult<Option<Value>> {
    let bad = |v: &Value| {
        // A value never returned (a password) is not echoed either: the error goes back
        // to the client and into the log.
        let got = if def.returned == schema::Returned::Never {
            "something else".to_owned()
        } else {
            v.to_string()
        };
        ScimError::invalid_value(format!(
            "{path}: expected a {}, got {got}",
            def.kind.as_str()
        ))
    };
    Ok(Some(match (def.kind, value) {
        (_, Value::Null) => return Ok(None),
        (AttrKind::Boolean, Value::Bool(b)) => Value::Bool(b),
        // Entra's older dialect sends booleans as "True"/"False".
        (AttrKind::Boolean, Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(bad(&Value::String(s))),
        },
        (AttrKind::String | AttrKind::Reference | AttrKind::Binary, Value::String(s)) => {
            check_text(&s, path)?;
            Value::String(s)
        }
        // Some clients send employee numbers and the like as JSON numbers.
        (AttrKind::String, Value::Number(n)) => Value::String(number_as_text(&n, path)?),
        (AttrKind::Integer, Value::Number(n)) if n.is_i64() || n.is_u64() => Value::Number(n),
        (AttrKind::Decimal, Value::Number(n)) => Value::Number(n),
        (AttrKind::Integer | AttrKind::Decimal, Value::String(s)) => {
            match serde_json::from_str::<serde_json::Number>(s.trim()) {
                Ok(n) if def.kind == AttrKind::Decimal || n.is_i64() || n.is_u64() => {
                    Value::Number(n)
                }
                _ => return Err(bad(&Value::String(s))),
            }
        }
        (AttrKind::DateTime, Value::String(s)) => {
            if chrono::DateTime::parse_from_rfc3339(&s).is_err() {
                return Err(ScimError::invalid_value(format!(
                    "{path}: {s:?} is not an RFC 3339 date-time"
                )));
            }
            Value::String(s)
        }
        (AttrKind::Complex, v) => {
            return Err(ScimError::invalid_value(format!(
                "{path}: nested complex value {v} is not allowed"
            )));
        }
        (_, v) => return Err(bad(&v)),
    }))
}

/// Refuse a change to an immutable attribute that already has a value (RFC 7643 §2.2).
pub fn check_immutable(kind: ResourceKind, old: &Value, new: &Value) -> ScimResult<()> {
    for s in schema::schemas_of(kind) {
        let (old_obj, new_obj) = if s.id == schema::core_schema(kind).id {
            (old.as_object(), new.as_object())
        } else {
            (
                old.get(s.id).and_then(Value::as_object),
                new.get(s.id).and_then(Value::as_object),
            )
        };
        let Some(old_obj) = old_obj else { continue };
        for def in s
            .attributes
            .iter()
            .filter(|d| d.mutability == Mutability::Immutable)
        {
            let before = old_obj.get(def.name);
            let after = new_obj.and_then(|o| o.get(def.name));
            if before.is_some() && before != after {
                return Err(ScimError::mutability(format!(
                    "{} is immutable once set",
                    def.name
                )));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Projection

fn names(p: &AttrPath, schema_id: &str, core: bool, attr: &str) -> bool {
    let urn_ok = match p.urn.as_deref() {
        None => core,
        Some(u) => u.eq_ignore_ascii_case(schema_id),
    };
    urn_ok && p.attr.eq_ignore_ascii_case(attr)
}

/// Shape `doc` for a response. `attributes` (if non-empty) lists what to return besides
/// what is always returned, and then `excluded` is ignored (RFC 7644 §3.4.2.5);
/// otherwise everything returned by default, minus `excluded`. `returned: never`
/// attributes (password) are never shown.
pub fn project(
    kind: ResourceKind,
    doc: &Value,
    attributes: &[AttrPath],
    excluded: &[AttrPath],
) -> Value {
    let Some(obj) = doc.as_object() else {
        return doc.clone();
    };
    let core = schema::core_schema(kind);
    let mut out = Map::new();
    for (key, value) in obj {
        if key == "schemas" || key == "id" {
            out.insert(key.clone(), value.clone());
            continue;
        }
        if let Some(ext) = extension(kind, key) {
            let Some(inner) = value.as_object() else {
                continue;
            };
            let m = if !attributes.is_empty() && whole(ext, attributes) {
                project_attrs(ext, inner, &[], &[], false)
            } else if attributes.is_empty() && whole(ext, excluded) {
                Map::new()
            } else {
                project_attrs(ext, inner, attributes, excluded, false)
            };
            if !m.is_empty() {
                out.insert(key.clone(), Value::Object(m));
            }
            continue;
        }
        let single = Map::from_iter([(key.clone(), value.clone())]);
        // The core schema's URN alone names every core attribute, as an extension's
        // names all of its own: `attributes=urn:…:core:2.0:User` gave only id and schemas.
        let m = if !attributes.is_empty() && whole(core, attributes) {
            project_attrs(core, &single, &[], &[], true)
        } else if attributes.is_empty() && whole(core, excluded) {
            project_attrs(core, &single, &[], &[AttrPath::simple(key)], true)
        } else {
            project_attrs(core, &single, attributes, excluded, true)
        };
        out.extend(m);
    }
    Value::Object(out)
}

/// Whether `list` names the whole of `schema` by its URN alone.
fn whole(schema: &SchemaDef, list: &[AttrPath]) -> bool {
    list.iter().any(|p| {
        p.is_whole_schema()
            && p.urn
                .as_deref()
                .is_some_and(|u| u.eq_ignore_ascii_case(schema.id))
    })
}

fn project_attrs(
    schema: &SchemaDef,
    obj: &Map<String, Value>,
    attributes: &[AttrPath],
    excluded: &[AttrPath],
    core: bool,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in obj {
        let def = schema
            .attributes
            .iter()
            .find(|d| d.name.eq_ignore_ascii_case(key))
            .or_else(|| schema::lookup_common(key, None).filter(|_| core));
        let returned = def.map_or(Returned::Default, |d| d.returned);
        if returned == Returned::Never {
            continue;
        }
        let list = if attributes.is_empty() {
            excluded
        } else {
            attributes
        };
        let mentions: Vec<&AttrPath> = list
            .iter()
            .filter(|p| names(p, schema.id, core, key))
            .collect();
        if returned == Returned::Always {
            out.insert(key.clone(), value.clone());
            continue;
        }
        if !attributes.is_empty() {
            if mentions.is_empty() {
                continue;
            }
            if mentions.iter().any(|p| p.sub.is_none()) {
                out.insert(key.clone(), value.clone());
            } else {
                let subs: Vec<&str> = mentions.iter().filter_map(|p| p.sub.as_deref()).collect();
                if let Some(v) = keep_subs(value, &subs, true) {
                    out.insert(key.clone(), v);
                }
            }
            continue;
        }
        if returned == Returned::Request {
            continue;
        }
        if mentions.iter().any(|p| p.sub.is_none()) {
            continue;
        }
        if mentions.is_empty() {
            out.insert(key.clone(), value.clone());
        } else {
            let subs: Vec<&str> = mentions.iter().filter_map(|p| p.sub.as_deref()).collect();
            if let Some(v) = keep_subs(value, &subs, false) {
                out.insert(key.clone(), v);
            }
        }
    }
    out
}

/// Keep (or drop) the named sub-attributes of a complex value or of every element of a
/// multi-valued one.
fn keep_subs(value: &Value, subs: &[&str], keep: bool) -> Option<Value> {
    let filter_obj = |o: &Map<String, Value>| -> Map<String, Value> {
        o.iter()
            .filter(|(k, _)| subs.iter().any(|s| s.eq_ignore_ascii_case(k)) == keep)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    match value {
        Value::Object(o) => {
            let m = filter_obj(o);
            (!m.is_empty()).then_some(Value::Object(m))
        }
        Value::Array(items) => {
            let v: Vec<Value> = items
                .iter()
                .filter_map(|i| match i {
                    Value::Object(o) => {
                        let m = filter_obj(o);
                        (!m.is_empty()).then_some(Value::Object(m))
                    }
                    other => Some(other.clone()),
                })
                .collect();
            (!v.is_empty()).then_some(Value::Array(v))
        }
        other => Some(other.clone()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn repeats_merge_by_value_and_type_as_the_schema_compares_them() {
        let mut d = json!({
            "emails": [{"value": "p@x.org", "type": "work", "primary": true},
                       {"value": "P@X.org"},
                       {"value": "p@x.org", "type": "home"}],
            "photos": [{"value": "https://cdn/A.jpg", "type": "photo"},
                       {"value": "https://cdn/a.jpg", "type": "photo"}],
            "addresses": [{"locality": "Oslo", "primary": true}, {"locality": "Oslo"},
                          {"locality": "Bergen"}],
        });
        super::merge_repeats(ResourceKind::User, &mut d, &Value::Null);
        assert_eq!(
            d["emails"],
            json!([{"value": "P@X.org", "type": "work", "primary": true},
                   {"value": "p@x.org", "type": "home"}]),
            "an untyped repeat is the typed one; another type is another email"
        );
        assert_eq!(
            d["photos"].as_array().unwrap().len(),
            2,
            "a URL's case matters"
        );
        assert_eq!(d["addresses"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_patch_making_a_repeat_primary_keeps_it_primary() {
        // Stored: b (home) and a (work, primary). The PATCH adds b as primary and a
        // again in other letters: b is the primary the client asked for.
        let before = json!({"emails": [{"value": "b@x.org", "type": "home"},
                                       {"value": "a@x.org", "type": "work", "primary": true}]});
        let mut after = json!({"emails": [{"value": "b@x.org", "type": "home"},
                                          {"value": "a@x.org", "type": "work", "primary": true},
                                          {"value": "b@x.org", "type": "home", "primary": true},
                                          {"value": "A@x.org", "type": "work"}]});
        super::settle_primaries(ResourceKind::User, &before, &mut after);
        super::merge_repeats(ResourceKind::User, &mut after, &before);
        let emails = after["emails"].as_array().unwrap();
        assert_eq!(emails.len(), 2, "{after}");
        let primary: Vec<&Value> = emails.iter().filter(|e| super::is_primary(e)).collect();
        assert_eq!(primary.len(), 1, "{after}");
        assert_eq!(primary[0]["value"], "b@x.org", "{after}");
    }

    #[test]
    fn one_value_stays_primary() {
        use serde_json::json;
        let two = json!({"emails": [{"value": "a@x", "primary": true}, {"value": "b@x", "primary": true}]});
        assert!(super::one_primary_each(&two).is_err());
        assert!(
            super::one_primary_each(&json!({"emails": [{"value": "a@x", "primary": true}]}))
                .is_ok()
        );

        let before = json!({"emails": [{"value": "old@x", "primary": true, "type": "work"}]});
        // A new primary added, as Okta and Entra do: the old one steps down.
        let mut after = json!({"emails": [{"value": "old@x", "primary": true, "type": "work"},
                                          {"value": "new@x", "primary": true, "type": "home"}]});
        super::settle_primaries(ResourceKind::User, &before, &mut after);
        assert_eq!(after["emails"][0]["primary"], false);
        assert_eq!(after["emails"][1]["primary"], true);
        // An existing value made primary by a filtered replace.
        let before = json!({"emails": [{"value": "a@x", "primary": true}, {"value": "b@x"}]});
        let mut after = json!({"emails": [{"value": "a@x", "primary": true}, {"value": "b@x", "primary": true}]});
        super::settle_primaries(ResourceKind::User, &before, &mut after);
        assert_eq!(
            (
                &after["emails"][0]["primary"],
                &after["emails"][1]["primary"]
            ),
            (&json!(false), &json!(true))
        );
    }

    use super::*;
    use crate::scim::error::ScimType;
    use crate::scim::filter::parse_attr_list;
    use crate::scim::schema::{ENTERPRISE_USER_SCHEMA, USER_SCHEMA};
    use serde_json::json;

    fn norm(v: Value) -> Normalized {
        normalize_input(ResourceKind::User, v).unwrap()
    }

    #[test]
    fn canonical_names_types_and_readonly() {
        let n = norm(json!({
            "schemas": [USER_SCHEMA, "urn:ietf:params:scim:schemas:extension:CustomExtensionName:2.0:User"],
            "USERNAME": "bjensen",
            "externalId": 48151623,
            "id": "client-chosen",
            "meta": {"resourceType": "User"},
            "groups": [],
            "roles": [],
            "Active": "False",
            "name": {"GIVENNAME": "Barbara", "nickname?": "x"},
            "emails": [{"value": "b@x", "primary": false, "type": "work"}],
            "favouriteColour": "blue",
            ENTERPRISE_USER_SCHEMA.to_lowercase(): {"employeeNumber": 701984, "manager": "m1"},
            format!("{ENTERPRISE_USER_SCHEMA}:department"): "Tours"
        }));
        let r = &n.resource;
        assert_eq!(r["userName"], "bjensen");
        assert_eq!(
            r["externalId"], "48151623",
            "a number, as any string attribute"
        );
        assert!(r.get("id").is_none() && r.get("meta").is_none() && r.get("groups").is_none());
        assert!(r.get("roles").is_none(), "empty values are unassigned");
        assert_eq!(r["active"], false);
        assert_eq!(r["name"], json!({"givenName": "Barbara"}));
        assert_eq!(r["emails"][0]["primary"], false, "stored as sent");
        assert_eq!(r["schemas"], json!([USER_SCHEMA, ENTERPRISE_USER_SCHEMA]));
        assert_eq!(
            r[ENTERPRISE_USER_SCHEMA],
            json!({"employeeNumber": "701984", "manager": {"value": "m1"}, "department": "Tours"})
        );
        assert!(n.ignored.contains(&"favouriteColour".to_owned()));
        assert!(n.ignored.iter().any(|i| i.contains("nickname?")));
    }

    /// A number whose text would not survive (a float, or too large for 64 bits, which
    /// the JSON reader takes as a float) is refused, not stored changed.
    #[test]
    fn a_number_for_a_string_is_kept_as_sent_or_refused() {
        let body = |v: &str| {
            serde_json::from_str::<Value>(&format!(
                r#"{{"userName": "x", "externalId": {v}, "title": {v}}}"#
            ))
            .unwrap()
        };
        for whole in ["-9223372036854775808", "18446744073709551615", "0"] {
            let n = normalize_input(ResourceKind::User, body(whole)).unwrap();
            assert_eq!(n.resource["externalId"], whole);
            assert_eq!(n.resource["title"], whole);
        }
        for lossy in [
            "18446744073709551616",
            "1e2",
            "100.0",
            "0.0000000000000000000000001",
        ] {
            let e = normalize_input(ResourceKind::User, body(lossy)).expect_err(lossy);
            assert_eq!(e.scim_type, Some(ScimType::InvalidValue), "{lossy}");
            assert!(
                e.detail.contains("send it as a JSON string"),
                "{}",
                e.detail
            );
        }
    }

    #[test]
    fn dotted_keys_and_json_encoded_roles() {
        let n = norm(json!({
            "userName": "x",
            "name.familyName": "Jensen",
            "roles": ["{\"value\":\"admin\",\"primary\":\"True\"}"]
        }));
        assert_eq!(n.resource["name"]["familyName"], "Jensen");
        assert_eq!(
            n.resource["roles"],
            json!([{"value": "admin", "primary": true}])
        );
        // One JSON text of a list of entries is those entries, not one entry of its text.
        for roles in [
            json!("[{\"value\":\"R1\"},{\"value\":\"R2\",\"type\":\"app\"}]"),
            json!(["[{\"value\":\"R1\"}]", {"value": "R2", "type": "app"}]),
        ] {
            let n = norm(json!({"userName": "x", "roles": roles}));
            assert_eq!(
                n.resource["roles"],
                json!([{"value": "R1"}, {"value": "R2", "type": "app"}]),
                "{roles}"
            );
        }
        // Text that is no such list stays a value as sent.
        let n = norm(json!({"userName": "x", "roles": ["[R1]", "[1, 2]"]}));
        assert_eq!(
            n.resource["roles"],
            json!([{"value": "[R1]"}, {"value": "[1, 2]"}])
        );
    }

    #[test]
    fn one_attribute_given_twice_is_refused_whatever_its_spelling() {
        let dept = format!("{ENTERPRISE_USER_SCHEMA}:department");
        for (body, path) in [
            (json!({"userName": "a", "USERNAME": "b"}), "userName"),
            (
                json!({"userName": "a", format!("{USER_SCHEMA}:userName"): "b"}),
                "userName",
            ),
            (
                json!({"userName": "a", "name": {"givenName": "B"}, "Name.GivenName": "C"}),
                "name.givenName",
            ),
            (
                json!({"userName": "a", "name": {"givenName": "B", "GIVENNAME": "C"}}),
                "name.givenName",
            ),
            (
                json!({"userName": "a", ENTERPRISE_USER_SCHEMA: {"department": "R&D"}, dept.clone(): "Sales"}),
                "department",
            ),
            (
                json!({"userName": "a", "department": "R&D", dept.clone(): "Sales"}),
                "department",
            ),
            (
                json!({"userName": "a", "externalId": "1", "EXTERNALID": "2"}),
                "externalId",
            ),
            (
                json!({"userName": "a", "manager.value": "m1", "manager": "m2"}),
                "manager.value",
            ),
        ] {
            let e = normalize_input(ResourceKind::User, body.clone()).unwrap_err();
            assert_eq!(e.scim_type, Some(ScimType::InvalidSyntax), "{body}");
            assert!(
                e.detail.contains(path) && e.detail.contains("is given twice"),
                "{body}: {}",
                e.detail
            );
        }
        // Pieces of one complex attribute that do not overlap are merged, in either
        // order of their keys, in the core schema and in an extension alike.
        for body in [
            json!({"userName": "a", "name": {"familyName": "J"}, "name.givenName": "B"}),
            json!({"userName": "a", "name": {"familyName": "J"}, "Name.givenName": "B"}),
        ] {
            assert_eq!(
                norm(body).resource["name"],
                json!({"familyName": "J", "givenName": "B"})
            );
        }
        for body in [
            json!({"userName": "a", "manager.value": "m1", "manager.displayName": "Boss"}),
            json!({"userName": "a", "manager": "m1", "manager.displayName": "Boss"}),
            json!({"userName": "a", ENTERPRISE_USER_SCHEMA: {"manager": {"value": "m1"}},
                   format!("{ENTERPRISE_USER_SCHEMA}:manager.displayName"): "Boss"}),
        ] {
            assert_eq!(
                norm(body.clone()).resource[ENTERPRISE_USER_SCHEMA]["manager"],
                json!({"value": "m1", "displayName": "Boss"}),
                "{body}"
            );
        }
        // A null beside a value unassigns nothing, whichever key sorts first.
        for body in [
            json!({"userName": "a", "Title": "Eng", "title": null}),
            json!({"userName": "a", "Title": null, "title": "Eng"}),
            json!({"userName": "a", "title": "Eng", format!("{USER_SCHEMA}:title"): null}),
        ] {
            assert_eq!(norm(body.clone()).resource["title"], "Eng", "{body}");
        }
    }

    #[test]
    fn refusals() {
        for (body, kind) in [
            (json!({"displayName": "no userName"}), ResourceKind::User),
            (json!({"userName": "  "}), ResourceKind::User),
            (
                json!({"userName": "x", "active": "maybe"}),
                ResourceKind::User,
            ),
            (
                json!({"userName": "x", "name": ["not", "complex"]}),
                ResourceKind::User,
            ),
            (json!({"members": []}), ResourceKind::Group),
        ] {
            let e = normalize_input(kind, body.clone()).expect_err(&body.to_string());
            assert_eq!(e.scim_type, Some(ScimType::InvalidValue), "{body}");
        }
        assert_eq!(
            normalize_input(ResourceKind::User, json!([1]))
                .unwrap_err()
                .scim_type,
            Some(ScimType::InvalidSyntax)
        );
    }

    fn stored() -> Value {
        json!({
            "schemas": [USER_SCHEMA, ENTERPRISE_USER_SCHEMA],
            "id": "u1",
            "userName": "bjensen",
            "password": "secret",
            "name": {"givenName": "Barbara", "familyName": "Jensen"},
            "emails": [{"value": "b@x", "type": "work"}],
            "meta": {"resourceType": "User"},
            ENTERPRISE_USER_SCHEMA: {"department": "Tours", "employeeNumber": "1"}
        })
    }

    fn proj(attrs: &str, excl: &str) -> Value {
        project(
            ResourceKind::User,
            &stored(),
            &parse_attr_list(attrs).unwrap(),
            &parse_attr_list(excl).unwrap(),
        )
    }

    #[test]
    fn projection() {
        let all = proj("", "");
        assert!(all.get("password").is_none(), "returned: never");
        assert_eq!(all["meta"]["resourceType"], "User");

        let only = proj("userName,name.familyName", "");
        assert_eq!(
            only,
            json!({"schemas": [USER_SCHEMA, ENTERPRISE_USER_SCHEMA], "id": "u1",
                   "userName": "bjensen", "name": {"familyName": "Jensen"}})
        );

        let ext = proj(&format!("{ENTERPRISE_USER_SCHEMA}:department"), "");
        assert_eq!(ext[ENTERPRISE_USER_SCHEMA], json!({"department": "Tours"}));
        assert!(ext.get("userName").is_none());

        let whole = proj(ENTERPRISE_USER_SCHEMA, "");
        assert_eq!(whole[ENTERPRISE_USER_SCHEMA]["employeeNumber"], "1");

        let ex = proj("", "emails,name.givenName,id");
        assert!(ex.get("emails").is_none());
        assert_eq!(ex["name"], json!({"familyName": "Jensen"}));
        assert_eq!(ex["id"], "u1", "id is always returned");

        let ex_ext = proj("", ENTERPRISE_USER_SCHEMA);
        assert!(ex_ext.get(ENTERPRISE_USER_SCHEMA).is_none());

        // attributes wins over excludedAttributes.
        let both = proj("userName", "userName");
        assert_eq!(both["userName"], "bjensen");
    }

    #[test]
    fn immutable_check() {
        let old = json!({"displayName": "g"});
        assert!(check_immutable(ResourceKind::Group, &old, &json!({"displayName": "h"})).is_ok());
    }
}
