//! The OneRoster 1.2 connector: users become OneRoster users, groups become classes under
//! one configured course, memberships become enrollments. Every object is written with an
//! idempotent PUT by a UUIDv5 sourcedId, so a repeated delivery changes nothing.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

use super::http::Request;
use super::{Plan, sourced_id};
use crate::scim::ResourceKind;
use crate::store::{Assignment, ChangeEvent, Store, StoreError};

/// User roles OneRoster 1.2 defines (anything else must be `ext:…`).
const ROLES: [&str; 12] = [
    "aide",
    "counselor",
    "districtAdministrator",
    "guardian",
    "parent",
    "principal",
    "proctor",
    "relative",
    "siteAdministrator",
    "student",
    "systemAdministrator",
    "teacher",
];
const ENROLLMENT_ROLES: [&str; 4] = ["administrator", "proctor", "student", "teacher"];

/// `[oneroster]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OneRosterSettings {
    /// The rostering API root including its path prefix, e.g.
    /// `https://sis.example.com/ims/oneroster/rostering/v1p2`.
    pub base_url: String,
    pub auth: AuthSettings,
    /// The org every user's role and every class belongs to; checked with GET at start.
    pub org_sourced_id: String,
    /// The course rosterd's classes (one per SCIM group) live under; PUT at start.
    pub course_sourced_id: String,
    #[serde(default = "default_course_title")]
    pub course_title: String,
    /// OneRoster role per archetype id; users whose archetype is not listed get
    /// `default_role`.
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
    #[serde(default = "default_role")]
    pub default_role: String,
    /// Role of group members in their class's enrollment.
    #[serde(default = "default_role")]
    pub enrollment_role: String,
    /// What a SCIM deactivation (`active: false`) becomes downstream.
    #[serde(default)]
    pub deactivate: Deactivate,
    /// Reconciliation also reads users back from the target (`filter=dateLastModified>…`
    /// over the last `read_back_hours`) and repairs those changed or deleted there.
    #[serde(default)]
    pub read_back: bool,
    #[serde(default = "default_read_back_hours")]
    pub read_back_hours: u64,
    /// The longest one read-back reads, in seconds: a slow target answering page after
    /// page held the tenant's job slot, and so refused every override, for hours.
    #[serde(default = "default_read_back_max_secs")]
    pub read_back_max_secs: u64,
}

impl OneRosterSettings {
    /// The keys whose change alters the bodies of objects already sent (`other` is the
    /// new version): the mirror sends only what changes in the roster, so those bodies
    /// stay as they were at the target until a reconciliation (an audit saw 13 users keep
    /// their old role after `roles` changed).
    pub fn reshaped(&self, other: &OneRosterSettings) -> Vec<&'static str> {
        [
            (
                "org_sourced_id",
                self.org_sourced_id != other.org_sourced_id,
            ),
            (
                "course_sourced_id",
                self.course_sourced_id != other.course_sourced_id,
            ),
            ("course_title", self.course_title != other.course_title),
            ("roles", self.roles != other.roles),
            ("default_role", self.default_role != other.default_role),
            (
                "enrollment_role",
                self.enrollment_role != other.enrollment_role,
            ),
            ("deactivate", self.deactivate != other.deactivate),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }
}

fn default_read_back_hours() -> u64 {
    24
}

fn default_read_back_max_secs() -> u64 {
    1800
}

/// Ten years: further back than a target keeps `dateLastModified` for, and far short of
/// where the window's start would leave the calendar (a larger value made every
/// reconciliation panic).
const MAX_READ_BACK_HOURS: u64 = 87_600;
const MAX_READ_BACK_SECS: u64 = 86_400;

pub(super) fn default_course_title() -> String {
    "rosterd groups".into()
}

fn default_role() -> String {
    "teacher".into()
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Deactivate {
    /// PUT the user with `enabledUser: "false"`.
    #[default]
    Disable,
    /// DELETE the user (the target soft-deletes: status `tobedeleted`).
    Delete,
}

/// `[oneroster.auth]`: a static bearer token, or OAuth 2.0 client credentials.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Environment variable holding a static bearer token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// OAuth 2.0 token endpoint (client credentials grant).
    #[serde(default)]
    pub token_url: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
    /// Environment variable holding the client secret.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    /// How the client authenticates at the token endpoint.
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// Where the token request carries the client's credentials (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body (`client_secret_post`): what
    /// rosterd always sent, so the default, and what most SIS endpoints take.
    #[default]
    Post,
    /// An `Authorization: Basic` header (`client_secret_basic`), which 1EdTech's
    /// security framework and some SIS endpoints require.
    Basic,
}

impl OneRosterSettings {
    pub(super) fn validate(&self) -> Result<(), String> {
        super::http::check_url("base_url", &self.base_url, true)?;
        // The HTTP client sends a URL's user name and password as Basic credentials,
        // ahead of the bearer token: a recheck saw every request refused (401).
        for (key, url) in [
            ("base_url", Some(&self.base_url)),
            ("auth.token_url", self.auth.token_url.as_ref()),
        ] {
            if let Some(u) = url.and_then(|u| reqwest::Url::parse(u).ok())
                && (!u.username().is_empty() || u.password().is_some())
            {
                return Err(format!(
                    "key `{key}`: {} carries a user name or password, which the HTTP client would send as Basic credentials in place of those [oneroster.auth] gives; put the target's credentials there",
                    super::http::shown_url(u.as_str())
                ));
            }
        }
        let a = &self.auth;
        for (key, var) in [
            ("auth.token_env", &a.token_env),
            ("auth.client_secret_env", &a.client_secret_env),
        ] {
            if let Some(var) = var {
                crate::config::check_env_name(key, var)?;
            }
        }
        match (&a.token_env, &a.token_url) {
            (Some(_), None) => {}
            (None, Some(url)) => {
                super::http::check_url("auth.token_url", url, false)?;
                if a.client_id.is_none() || a.client_secret_env.is_none() {
                    return Err(
                        "key `auth.token_url` needs `auth.client_id` and `auth.client_secret_env`"
                            .into(),
                    );
                }
            }
            _ => {
                return Err("[oneroster.auth] needs exactly one of `token_env` (static bearer token) or `token_url` (OAuth client credentials)".into());
            }
        }
        if !(1..=MAX_READ_BACK_HOURS).contains(&self.read_back_hours) {
            return Err(format!(
                "key `read_back_hours`: must be between 1 and {MAX_READ_BACK_HOURS} (ten years)"
            ));
        }
        if !(1..=MAX_READ_BACK_SECS).contains(&self.read_back_max_secs) {
            return Err(format!(
                "key `read_back_max_secs`: must be between 1 and {MAX_READ_BACK_SECS} (a day)"
            ));
        }
        check_roles("", &self.roles, &self.default_role, &self.enrollment_role)
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base_url.trim_end_matches('/'))
    }

    /// Whether this user should be absent downstream: inactive, and deactivation means
    /// deletion.
    pub fn deletes(&self, doc: &Value) -> bool {
        !UserFields { doc }.active() && self.deactivate == Deactivate::Delete
    }

    /// The role of a user with this archetype.
    pub fn role_for(&self, archetype: Option<&str>) -> &str {
        archetype
            .and_then(|a| self.roles.get(a))
            .unwrap_or(&self.default_role)
    }
}

/// The roles a OneRoster connector sends, REST or CSV: each a OneRoster 1.2 role (or an
/// `ext:` one), the enrollment role one of the four a class takes. `keys` is where the
/// keys sit in the connector's file (`""` for `[oneroster]`, `"oneroster."` under
/// `[csv]`), for the error to name them.
pub(super) fn check_roles(
    keys: &str,
    roles: &BTreeMap<String, String>,
    default_role: &str,
    enrollment_role: &str,
) -> Result<(), String> {
    for (arch, role) in roles {
        if !valid_role(role) {
            return Err(format!(
                "key `{keys}roles.{arch}`: {role:?} is not a OneRoster role (one of {} or ext:…)",
                ROLES.join(", ")
            ));
        }
    }
    if !valid_role(default_role) {
        return Err(format!(
            "key `{keys}default_role`: {default_role:?} is not a OneRoster role"
        ));
    }
    if !ENROLLMENT_ROLES.contains(&enrollment_role) {
        return Err(format!(
            "key `{keys}enrollment_role`: {enrollment_role:?} is not one of {}",
            ENROLLMENT_ROLES.join(", ")
        ));
    }
    Ok(())
}

/// OneRoster 1.2's org types (`OrgType`).
pub(super) const ORG_TYPES: [&str; 6] = [
    "department",
    "school",
    "district",
    "local",
    "state",
    "national",
];

/// One of a OneRoster enumeration's values, or an extension of it (`ext:…`).
fn in_enumeration(known: &[&str], v: &str) -> bool {
    known.contains(&v) || v.strip_prefix("ext:").is_some_and(|s| !s.is_empty())
}

pub(super) fn valid_role(r: &str) -> bool {
    in_enumeration(&ROLES, r)
}

pub(super) fn valid_org_type(t: &str) -> bool {
    in_enumeration(&ORG_TYPES, t)
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A change this connector cannot express; it goes to the dead letters as is.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unmappable(pub String);

/// The fields of a SCIM user a OneRoster user needs.
pub struct UserFields<'a> {
    pub doc: &'a Value,
}

impl UserFields<'_> {
    fn str(&self, ptr: &str) -> Option<&str> {
        text(self.doc.pointer(ptr))
    }

    /// The value of the first element of the multi-valued `attr` that `pred` accepts
    /// and that has a value.
    fn value_where(&self, attr: &str, pred: impl Fn(&Value) -> bool) -> Option<&str> {
        self.doc
            .get(attr)
            .and_then(Value::as_array)?
            .iter()
            .filter(|e| pred(e))
            .find_map(|e| text(e.get("value")))
    }

    pub fn user_name(&self) -> Option<&str> {
        self.str("/userName")
    }

    /// The primary email, else the work one, else the first; else a userName that is one.
    pub fn email(&self) -> Option<&str> {
        self.value_where("emails", |e| e.get("primary") == Some(&Value::Bool(true)))
            .or_else(|| self.value_where("emails", |e| type_is(e, "work")))
            .or_else(|| self.value_where("emails", |_| true))
            .or_else(|| self.user_name().filter(|u| u.contains('@')))
    }

    /// The given name every output shows (see [`crate::scim::names`]).
    pub fn given_name(&self) -> Option<Cow<'_, str>> {
        crate::scim::names::given_name(self.doc)
    }

    /// The family name every output shows (see [`crate::scim::names`]).
    pub fn family_name(&self) -> Option<Cow<'_, str>> {
        crate::scim::names::family_name(self.doc)
    }

    /// What a OneRoster user cannot be without: email, given and family name; or why
    /// user `id` cannot be one.
    pub fn required(&self, id: &str) -> Result<(&str, Cow<'_, str>, Cow<'_, str>), Unmappable> {
        let email = self.email().ok_or_else(|| {
            Unmappable(format!(
                "user {id} has no email and no email-like userName; OneRoster requires one"
            ))
        })?;
        let (given, family) = self.names(id)?;
        Ok((email, given, family))
    }

    /// Given and family name, or why the user cannot be a OneRoster user.
    pub fn names(&self, id: &str) -> Result<(Cow<'_, str>, Cow<'_, str>), Unmappable> {
        let (missing, attrs) = match (self.given_name(), self.family_name()) {
            (Some(g), Some(f)) => return Ok((g, f)),
            (None, None) => (
                "given name and no family name",
                "name.givenName or name.familyName",
            ),
            (None, Some(_)) => ("given name", "name.givenName"),
            (Some(_), None) => ("family name", "name.familyName"),
        };
        Err(Unmappable(format!(
            "user {id} has no {missing}: no {attrs}, and neither name.formatted nor displayName holds two words or more; OneRoster requires both names"
        )))
    }

    pub fn middle_name(&self) -> Option<&str> {
        self.str("/name/middleName")
    }

    /// The number to call: the primary one, else the first `work` one. A fax or pager
    /// number is never it, even when marked primary.
    pub fn phone(&self) -> Option<&str> {
        let callable = |p: &Value| !type_is(p, "fax") && !type_is(p, "pager");
        self.value_where("phoneNumbers", |p| {
            callable(p) && p.get("primary") == Some(&Value::Bool(true))
        })
        .or_else(|| self.value_where("phoneNumbers", |p| type_is(p, "work")))
    }

    /// The number for text messages: the first `mobile` one.
    pub fn sms(&self) -> Option<&str> {
        self.value_where("phoneNumbers", |p| type_is(p, "mobile"))
    }

    pub fn active(&self) -> bool {
        crate::scim::is_active(self.doc)
    }

    fn enterprise(&self, attr: &str) -> Option<&str> {
        text(
            self.doc
                .get(crate::scim::schema::ENTERPRISE_USER_SCHEMA)
                .and_then(|e| e.get(attr)),
        )
    }
}

impl<'a> UserFields<'a> {
    /// The SCIM id the enterprise `manager.value` names, whether or not it exists.
    pub fn manager(&self) -> Option<&'a str> {
        self.doc
            .get(crate::scim::schema::ENTERPRISE_USER_SCHEMA)
            .and_then(|e| e.pointer("/manager/value"))
            .and_then(Value::as_str)
            .filter(|m| !m.trim().is_empty())
    }
}

/// A SCIM user as the connector maps it.
pub struct UserState<'a> {
    pub id: &'a str,
    pub doc: &'a Value,
    pub assignment: Option<&'a Assignment>,
    /// The SCIM id of the user's manager, only if that user is in the roster (see
    /// [`existing_manager`]).
    pub manager: Option<&'a str>,
}

/// The manager `doc` names, if that user is in the roster now. A body naming a deleted
/// manager would point at no one downstream; resolving it whenever a body is built lets
/// reconciliation see such a body as drift.
pub fn existing_manager<'d>(
    store: &Store,
    tenant: &str,
    doc: &'d Value,
) -> Result<Option<&'d str>, StoreError> {
    match (UserFields { doc }).manager() {
        Some(m) if store.get_raw(tenant, ResourceKind::User, m)?.is_some() => Ok(Some(m)),
        _ => Ok(None),
    }
}

/// The write for a user as stored: its assignment and its manager (if in the roster)
/// read from the store, as every body of it is built. The outer error is the store's,
/// the inner one says why the user cannot be a OneRoster user.
pub fn stored_user_write(
    store: &Store,
    settings: &OneRosterSettings,
    tenant: &str,
    id: &str,
    doc: &Value,
    modified: DateTime<Utc>,
) -> Result<Result<Write, Unmappable>, StoreError> {
    let assignment = store.assignment(tenant, id)?;
    let user = UserState {
        id,
        doc,
        assignment: assignment.as_ref(),
        manager: existing_manager(store, tenant, doc)?,
    };
    Ok(user_write(settings, tenant, &user, modified))
}

/// An object of the pairs whose value is present: OneRoster's optional fields are left
/// out when rosterd has no value, never sent as null.
fn present<const N: usize>(fields: [(&str, Option<Value>); N]) -> Map<String, Value> {
    fields
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_owned(), v?)))
        .collect()
}

/// A string value as a target should get it: trimmed, and absent when blank.
fn text(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Whether a multi-valued element's `type` is `t`. SCIM types are not case-exact (RFC
/// 7643 §2.4): "Work" and "MOBILE" are work and mobile.
fn type_is(element: &Value, t: &str) -> bool {
    element
        .get("type")
        .and_then(Value::as_str)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(t))
}

/// The OneRoster user body (inside `{"user": …}`) for a SCIM user.
pub fn user_body(
    settings: &OneRosterSettings,
    tenant: &str,
    user: &UserState<'_>,
    modified: DateTime<Utc>,
) -> Result<Value, Unmappable> {
    let (id, doc) = (user.id, user.doc);
    let u = UserFields { doc };
    let (email, given, family) = u.required(id)?;
    let archetype = user.assignment.and_then(|a| a.archetype_id.as_deref());
    let org = json!({ "sourcedId": settings.org_sourced_id, "type": "org" });
    let s = |v: Option<&str>| v.map(Value::from);
    let metadata = present([
        ("archetype_id", s(archetype)),
        ("confidence", user.assignment.map(|a| json!(a.confidence))),
        ("department", s(u.enterprise("department"))),
        ("job_title", s(u.str("/title"))),
        (
            "manager",
            user.manager
                .map(|m| Value::from(sourced_id(tenant, &user_key(m)))),
        ),
        ("scim_id", Some(json!(id))),
    ]);
    let body = present([
        ("sourcedId", Some(json!(sourced_id(tenant, &user_key(id))))),
        ("status", Some(json!("active"))),
        ("dateLastModified", Some(json!(ts(modified)))),
        (
            "enabledUser",
            Some(json!(if u.active() { "true" } else { "false" })),
        ),
        ("username", Some(json!(u.user_name().unwrap_or(email)))),
        ("givenName", Some(json!(given))),
        ("familyName", Some(json!(family))),
        ("middleName", s(u.middle_name())),
        ("email", Some(json!(email))),
        ("sms", s(u.sms())),
        ("phone", s(u.phone())),
        ("identifier", s(u.enterprise("employeeNumber"))),
        (
            "roles",
            Some(json!([{
                "roleType": "primary",
                "role": settings.role_for(archetype),
                "org": org,
            }])),
        ),
        ("primaryOrg", Some(org)),
        ("metadata", Some(Value::Object(metadata))),
    ]);
    Ok(Value::Object(body))
}

/// The class body for a SCIM group.
pub fn class_body(
    settings: &OneRosterSettings,
    tenant: &str,
    id: &str,
    doc: &Value,
    modified: DateTime<Utc>,
) -> Value {
    let title = doc.get("displayName").and_then(Value::as_str).unwrap_or(id);
    let mut body = json!({
        "sourcedId": sourced_id(tenant, &format!("Group/{id}")),
        "status": "active",
        "dateLastModified": ts(modified),
        "title": title,
        "classType": "homeroom",
        "course": { "sourcedId": settings.course_sourced_id, "type": "course" },
        "org": { "sourcedId": settings.org_sourced_id, "type": "org" },
        "school": { "sourcedId": settings.org_sourced_id, "type": "org" },
        "terms": [],
        "metadata": { "scim_id": id },
    });
    if let Some(code) = text(doc.get("externalId")) {
        body["classCode"] = json!(code);
    }
    body
}

pub fn enrollment_id(tenant: &str, group: &str, user: &str) -> String {
    sourced_id(tenant, &format!("Member/{group}/{user}"))
}

pub fn enrollment_body(
    settings: &OneRosterSettings,
    tenant: &str,
    group: &str,
    user: &str,
    modified: DateTime<Utc>,
) -> Value {
    json!({
        "sourcedId": enrollment_id(tenant, group, user),
        "status": "active",
        "dateLastModified": ts(modified),
        "role": settings.enrollment_role,
        "primary": "false",
        "user": { "sourcedId": sourced_id(tenant, &format!("User/{user}")), "type": "user" },
        "class": { "sourcedId": sourced_id(tenant, &format!("Group/{group}")), "type": "class" },
        "school": { "sourcedId": settings.org_sourced_id, "type": "org" },
    })
}

/// The state of one object as a change leaves it, for this connector.
pub struct Current<'a> {
    pub doc: Option<&'a Value>,
    pub assignment: Option<&'a Assignment>,
    /// The user's manager, if it is in the roster (see [`existing_manager`]).
    pub manager: Option<&'a str>,
    /// Members of a group that are users (enrollments exist only for users).
    pub user_members_added: Vec<&'a str>,
    pub user_members_removed: Vec<&'a str>,
    /// For a deleted user, its reports as they should be now: their bodies named it as
    /// their manager and no longer do.
    pub reports: Vec<Write>,
    /// For a user that leaves the target or comes back to it (see
    /// [`OneRosterSettings::deletes`]), the groups it belongs to, with their documents:
    /// their enrollments leave before it, and come back after it and their classes.
    pub groups: Vec<(&'a str, &'a Value)>,
    /// For a user the target has never acknowledged, its groups whose class the target
    /// holds but not the user's enrollment: a group's change leaves out the enrollment of
    /// a user that cannot be sent ([`held_downstream`]), and it goes with the user once
    /// the user can be.
    pub enrollments_owed: Vec<&'a str>,
}

/// A content hash that ignores `dateLastModified`, so reconciliation sees real drift only.
pub fn content_hash(body: &Value) -> u64 {
    use sha2::Digest;
    let mut v = body.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("dateLastModified");
    }
    let d = sha2::Sha256::digest(v.to_string().as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// The key of a user, class or enrollment in the delivered-content hashes (and, for users
/// and groups, the name its sourcedId is derived from).
pub fn user_key(id: &str) -> String {
    format!("User/{id}")
}

pub fn group_key(id: &str) -> String {
    format!("Group/{id}")
}

pub fn member_key(group: &str, user: &str) -> String {
    format!("Member/{group}/{user}")
}

/// One request for one object, with what the delivered-content hash becomes once it is
/// acknowledged (`None`: the object is gone downstream).
pub struct Write {
    pub key: String,
    pub request: Request,
    pub hash: Option<u64>,
    /// The unwrapped body of a PUT, for comparison with what the target holds.
    pub body: Option<Value>,
}

impl Write {
    fn put(key: String, url: String, wrapper: &str, body: Value) -> Write {
        Write {
            key,
            request: Request::put(url, &json!({ wrapper: body })),
            hash: Some(content_hash(&body)),
            body: Some(body),
        }
    }

    fn delete(key: String, url: String) -> Write {
        Write {
            key,
            request: Request::delete(url),
            hash: None,
            body: None,
        }
    }
}

/// A user as it should be downstream: a PUT, or a DELETE when it is inactive and
/// deactivation means deletion, or inactive and not expressible as a OneRoster user.
pub fn user_write(
    settings: &OneRosterSettings,
    tenant: &str,
    user: &UserState<'_>,
    modified: DateTime<Utc>,
) -> Result<Write, Unmappable> {
    if settings.deletes(user.doc) {
        return Ok(user_delete(settings, tenant, user.id));
    }
    let body = match user_body(settings, tenant, user, modified) {
        Ok(body) => body,
        // No body can say "disabled" for this user (no names or no email to send): a
        // DELETE is the one request left that takes its access away at a target that
        // may hold it (an older rosterd made names up). A PUT with names brings it back.
        Err(_) if !(UserFields { doc: user.doc }).active() => {
            return Ok(user_delete(settings, tenant, user.id));
        }
        Err(e) => return Err(e),
    };
    let (key, url) = object_url(settings, tenant, "users", user_key(user.id));
    Ok(Write::put(key, url, "user", body))
}

pub fn user_delete(settings: &OneRosterSettings, tenant: &str, id: &str) -> Write {
    let (key, url) = object_url(settings, tenant, "users", user_key(id));
    Write::delete(key, url)
}

/// A user's or class's key and URL: the sourcedId is derived from the key.
fn object_url(
    settings: &OneRosterSettings,
    tenant: &str,
    collection: &str,
    key: String,
) -> (String, String) {
    let url = settings.url(&format!("{collection}/{}", sourced_id(tenant, &key)));
    (key, url)
}

pub fn class_put(
    settings: &OneRosterSettings,
    tenant: &str,
    id: &str,
    doc: &Value,
    modified: DateTime<Utc>,
) -> Write {
    let (key, url) = object_url(settings, tenant, "classes", group_key(id));
    Write::put(
        key,
        url,
        "class",
        class_body(settings, tenant, id, doc, modified),
    )
}

pub fn class_delete(settings: &OneRosterSettings, tenant: &str, id: &str) -> Write {
    let (key, url) = object_url(settings, tenant, "classes", group_key(id));
    Write::delete(key, url)
}

pub fn enrollment_put(
    settings: &OneRosterSettings,
    tenant: &str,
    group: &str,
    user: &str,
    modified: DateTime<Utc>,
) -> Write {
    let url = settings.url(&format!(
        "enrollments/{}",
        enrollment_id(tenant, group, user)
    ));
    let body = enrollment_body(settings, tenant, group, user, modified);
    Write::put(member_key(group, user), url, "enrollment", body)
}

/// Whether the roster's user `id` is one the target holds as of change `seq`, so that
/// it can be enrolled then: `None` when it is not a user in the roster (a nested group)
/// or one that cannot be sent ([`can_send`]: the target never got it, and an enrollment
/// naming it would be refused, failing its group's whole change); `Some(false)` while it
/// is inactive and deactivation means deletion ([`OneRosterSettings::deletes`]), and
/// also when it was reactivated after `seq`: it was inactive, so absent downstream, at
/// that change, and its reactivation, sent after it, brings the enrollment back with the
/// user.
pub fn held_downstream(
    store: &Store,
    settings: &OneRosterSettings,
    tenant: &str,
    id: &str,
    seq: u64,
) -> Result<Option<bool>, StoreError> {
    let Some(u) = store.get(tenant, ResourceKind::User, id)? else {
        return Ok(None);
    };
    Ok(match settings.deactivate {
        Deactivate::Delete if settings.deletes(&u.doc) => Some(false),
        _ if !can_send(&u.doc) => None,
        Deactivate::Delete => Some(!store.reactivated_after(tenant, id, seq)?),
        Deactivate::Disable => Some(true),
    })
}

/// Whether a user has what a OneRoster user requires (an email, a given and a family
/// name); one that has not is a dead letter, never sent (see [`user_body`]).
pub fn can_send(doc: &Value) -> bool {
    UserFields { doc }.required("").is_ok()
}

pub fn enrollment_delete(
    settings: &OneRosterSettings,
    tenant: &str,
    group: &str,
    user: &str,
) -> Write {
    let url = settings.url(&format!(
        "enrollments/{}",
        enrollment_id(tenant, group, user)
    ));
    Write::delete(member_key(group, user), url)
}

impl Plan {
    /// A stage of requests that run at once; empty stages are left out.
    fn stage(&mut self, writes: Vec<Write>) {
        if writes.is_empty() {
            return;
        }
        let mut requests = Vec::with_capacity(writes.len());
        for w in writes {
            self.hashes.push((w.key, w.hash));
            requests.push(w.request);
        }
        self.stages.push(requests);
    }
}

/// Requests for one change.
pub fn plan(
    settings: &OneRosterSettings,
    tenant: &str,
    event: &ChangeEvent,
    cur: Current<'_>,
) -> Result<Plan, Unmappable> {
    let mut p = Plan::default();
    let id = event.id.as_str();
    match (event.resource_type.as_str(), cur.doc) {
        ("User", Some(doc)) => {
            let user = UserState {
                id,
                doc,
                assignment: cur.assignment,
                manager: cur.manager,
            };
            let write = user_write(settings, tenant, &user, event.at)?;
            if settings.deletes(doc) {
                // As for a deleted user: enrollments may not outlive their user.
                p.stage(
                    cur.groups
                        .iter()
                        .map(|(g, _)| enrollment_delete(settings, tenant, g, id))
                        .collect(),
                );
                p.stage(vec![write]);
            } else {
                // Back from a deactivation that deleted it: the user, its classes as
                // they stand, then its enrollments, which left with it.
                p.stage(vec![write]);
                p.stage(
                    cur.groups
                        .iter()
                        .map(|(g, d)| class_put(settings, tenant, g, d, event.at))
                        .collect(),
                );
                p.stage(
                    cur.groups
                        .iter()
                        .map(|(g, _)| *g)
                        .chain(
                            cur.enrollments_owed
                                .iter()
                                .copied()
                                .filter(|o| !cur.groups.iter().any(|(g, _)| g == o)),
                        )
                        .map(|g| enrollment_put(settings, tenant, g, id, event.at))
                        .collect(),
                );
            }
        }
        ("User", None) => {
            p.stage(vec![user_delete(settings, tenant, id)]);
            // After the delete: a report the target refuses must not keep the user
            // itself from going.
            p.stage(cur.reports);
        }
        ("Group", doc) => {
            let removals: Vec<Write> = cur
                .user_members_removed
                .iter()
                .map(|u| enrollment_delete(settings, tenant, id, u))
                .collect();
            match doc {
                Some(doc) => {
                    // The class must exist before enrollments reference it.
                    p.stage(vec![class_put(settings, tenant, id, doc, event.at)]);
                    let mut members = removals;
                    members.extend(
                        cur.user_members_added
                            .iter()
                            .map(|u| enrollment_put(settings, tenant, id, u, event.at)),
                    );
                    p.stage(members);
                }
                None => {
                    // Enrollments go first: a class with active enrollments may not be
                    // deletable downstream.
                    p.stage(removals);
                    p.stage(vec![class_delete(settings, tenant, id)]);
                }
            }
        }
        (other, _) => {
            return Err(Unmappable(format!(
                "resource type {other:?} has no OneRoster mapping"
            )));
        }
    }
    Ok(p)
}

/// The requests that check and prepare the target before any change is sent: the org
/// must exist (GET), the course is created or updated (PUT).
/// Each with what it is about, for an error: the URL is shown by its host alone.
pub fn preflight(settings: &OneRosterSettings, now: DateTime<Utc>) -> Vec<(String, Request)> {
    vec![
        (
            format!("the org {:?}", settings.org_sourced_id),
            Request::get(settings.url(&format!("orgs/{}", settings.org_sourced_id))),
        ),
        (
            format!("the course {:?}", settings.course_sourced_id),
            course_put(settings, now),
        ),
    ]
}

/// Whether a write's answer is a page (HTML or XML: a proxy's login page, an error page)
/// rather than what a OneRoster provider sends. JSON is the norm, but a byte-order mark
/// before it, or a bare `OK`, are answers too: refused, a provider answering so would
/// hold its connector on the first change for good.
pub fn looks_like_a_page(body: &[u8]) -> bool {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    body.iter()
        .find(|b| !b.is_ascii_whitespace() && **b != 0)
        .is_some_and(|&b| b == b'<')
}

/// Whether the preflight's GET of the org answered that org, in use. A 2xx alone is not
/// enough: a proxy's login page, another org and one marked for deletion answer it too.
///
/// The error is the reason, and the start of what came when it is quoted in it (a login
/// page may name a person: `/status`, which takes no token, leaves it out).
pub fn check_org_answer(
    settings: &OneRosterSettings,
    body: &[u8],
) -> Result<(), (String, Option<String>)> {
    #[derive(Deserialize)]
    struct Answer {
        org: Org,
    }
    #[derive(Deserialize)]
    struct Org {
        #[serde(rename = "sourcedId")]
        sourced_id: String,
        #[serde(default)]
        status: Option<String>,
    }
    let json = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let answer: Answer = serde_json::from_slice(json).map_err(|e| {
        let start = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        let reason = format!(
            "the target answered the GET of the org with something that is not a OneRoster org (a JSON object with an `org` that has a `sourcedId`: {}), a proxy's login page? It begins",
            crate::connectors::http::json_error_unquoted(&e)
        );
        (
            crate::connectors::http::with_answer(reason, &start),
            crate::connectors::http::brief_answer(&start),
        )
    })?;
    let wanted = &settings.org_sourced_id;
    if answer.org.sourced_id != *wanted {
        return Err((
            format!(
                "the target answered the GET of the org {wanted:?} with the org {:?}",
                answer.org.sourced_id
            ),
            None,
        ));
    }
    if answer
        .org
        .status
        .is_some_and(|s| s.eq_ignore_ascii_case("tobedeleted"))
    {
        return Err((
            format!(
                "the org {wanted:?} is marked `tobedeleted` at the target; users and classes would be put under an org on its way out"
            ),
            None,
        ));
    }
    Ok(())
}

/// The course every class belongs to.
pub fn course_put(settings: &OneRosterSettings, now: DateTime<Utc>) -> Request {
    Request::put(
        settings.url(&format!("courses/{}", settings.course_sourced_id)),
        &json!({ "course": {
            "sourcedId": settings.course_sourced_id,
            "status": "active",
            "dateLastModified": ts(now),
            "title": settings.course_title,
            "courseCode": settings.course_sourced_id,
            "org": { "sourcedId": settings.org_sourced_id, "type": "org" },
        }}),
    )
}

/// Bearer credentials for the target: a static token, or an OAuth access token cached
/// until shortly before it expires and fetched again after a 401.
pub struct Credentials {
    settings: AuthSettings,
    static_token: Option<String>,
    client_secret: Option<String>,
    cached: Mutex<Option<(String, Instant)>>,
    /// The last token request's failure, and when the endpoint may be asked again. Every
    /// request in flight asked it again, one after another: 77 token requests in 15 s
    /// from a connector of concurrency 4, past the endpoint's `Retry-After: 30`.
    failed: std::sync::Mutex<Option<(String, Instant)>>,
}

/// The least wait after a failed token request: requests in flight then share the one
/// failure instead of each asking again.
const TOKEN_RETRY_FLOOR: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("environment variable {} is not set", crate::config::shown_env_name(.0))]
    Unset(String),
    #[error(
        "environment variable {} is set but empty (an environment file's line `{}=` with nothing after it)",
        crate::config::shown_env_name(.0),
        crate::config::shown_env_name(.0)
    )]
    Blank(String),
    #[error("token endpoint: {0}")]
    Token(String),
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    /// Required by RFC 6749 §5.1, but left out by some endpoints, which mean Bearer.
    #[serde(default)]
    token_type: Option<serde_json::Value>,
    /// Seconds (RFC 6749 §5.1), read by [`token_lifetime`].
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

/// The longest a fetched token is used before another is fetched. An `expires_in` near
/// `u64::MAX` overflowed the clock's arithmetic (a panic in the connector's task); and a
/// token the endpoint revoked is refreshed on its first 401 anyway.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How long a token is used: its `expires_in`, an hour without one, within 1 s and
/// [`MAX_TOKEN_LIFETIME`]. RFC 6749 has a number, but some endpoints send a string
/// (`"3599"`: Azure AD's v1 endpoint, several OneRoster vendors') or a float (`3600.0`);
/// refusing those would stop every delivery over a formality.
fn token_lifetime(expires_in: Option<&serde_json::Value>) -> Result<Duration, String> {
    use serde_json::Value;
    let secs = match expires_in {
        None | Some(Value::Null) => 3600.0,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(Value::String(s)) => s.trim().parse::<f64>().unwrap_or(f64::NAN),
        Some(_) => f64::NAN,
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!(
            "`expires_in` is not a number of seconds ({})",
            match expires_in {
                Some(Value::String(_)) => "a string that is not a number",
                Some(Value::Number(_)) => "a negative number",
                Some(Value::Bool(_)) => "a boolean",
                Some(Value::Array(_)) => "an array",
                _ => "an object",
            }
        ));
    }
    Ok(Duration::from_secs_f64(
        secs.clamp(1.0, MAX_TOKEN_LIFETIME.as_secs_f64()),
    ))
}

impl Credentials {
    pub fn new(
        settings: &AuthSettings,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Credentials, AuthError> {
        // A blank value is as good as none, and sent it reads as the target refusing
        // rosterd's credentials (`Bearer ` and a 401), not as the variable to set.
        let read = |v: &Option<String>| -> Result<Option<String>, AuthError> {
            let Some(name) = v else {
                return Ok(None);
            };
            match env(name) {
                None => Err(AuthError::Unset(name.clone())),
                Some(value) if value.trim().is_empty() => Err(AuthError::Blank(name.clone())),
                Some(value) => Ok(Some(value)),
            }
        };
        Ok(Credentials {
            static_token: read(&settings.token_env)?,
            client_secret: read(&settings.client_secret_env)?,
            settings: settings.clone(),
            cached: Mutex::new(None),
            failed: Default::default(),
        })
    }

    /// The `Authorization` header value for the next request.
    /// `timeout`: the connector's `timeout_ms`, as for its other requests.
    pub async fn bearer(
        &self,
        client: &reqwest::Client,
        timeout: Duration,
    ) -> Result<String, AuthError> {
        if let Some(t) = &self.static_token {
            return Ok(format!("Bearer {t}"));
        }
        let mut cached = self.cached.lock().await;
        if let Some((t, until)) = &*cached
            && Instant::now() < *until
        {
            return Ok(format!("Bearer {t}"));
        }
        if let Some((error, until)) = &*self.failed()
            && Instant::now() < *until
        {
            return Err(AuthError::Token(error.clone()));
        }
        let (token, ttl) = match self.fetch(client, timeout).await {
            Ok(fetched) => {
                *self.failed() = None;
                fetched
            }
            Err((e, retry_after)) => {
                if let AuthError::Token(error) = &e {
                    let wait = retry_after.unwrap_or_default().max(TOKEN_RETRY_FLOOR);
                    *self.failed() = Some((error.clone(), Instant::now() + wait));
                }
                return Err(e);
            }
        };
        // Refresh a little early so a token never expires in flight.
        let until = Instant::now() + ttl.saturating_sub(Duration::from_secs(30).min(ttl / 2));
        *cached = Some((token.clone(), until));
        Ok(format!("Bearer {token}"))
    }

    fn failed(&self) -> std::sync::MutexGuard<'_, Option<(String, Instant)>> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Let the next request ask the token endpoint at once (`rosterd resume`).
    pub fn forget_failure(&self) {
        *self.failed() = None;
    }

    /// How long until the token endpoint, which failed, may be asked again: its
    /// `Retry-After`, or a second.
    pub fn token_wait(&self) -> Option<Duration> {
        let failed = self.failed();
        let (_, until) = failed.as_ref()?;
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    /// Forget the cached token after the target refused `used` (the `Authorization`
    /// value that was sent) with a 401, if it is still the cached one: requests run
    /// side by side, and one refused with the old token must not throw away the token
    /// another has just fetched.
    pub async fn invalidate(&self, used: Option<&str>) {
        let mut cached = self.cached.lock().await;
        let refused = cached
            .as_ref()
            .is_some_and(|(t, _)| used.is_none_or(|u| u == format!("Bearer {t}")));
        if refused {
            *cached = None;
        }
    }

    /// A new token and its lifetime; or why not, with the endpoint's `Retry-After`.
    async fn fetch(
        &self,
        client: &reqwest::Client,
        timeout: Duration,
    ) -> Result<(String, Duration), (AuthError, Option<Duration>)> {
        let mut retry_after = None;
        self.request_token(client, timeout, &mut retry_after)
            .await
            .map_err(|e| (e, retry_after))
    }

    async fn request_token(
        &self,
        client: &reqwest::Client,
        timeout: Duration,
        retry_after: &mut Option<Duration>,
    ) -> Result<(String, Duration), AuthError> {
        let url = self.settings.token_url.as_deref().unwrap_or_default();
        let id = self.settings.client_id.clone().unwrap_or_default();
        let secret = self.client_secret.clone().unwrap_or_default();
        let mut form = vec![("grant_type", "client_credentials".to_owned())];
        let mut request = client.post(url);
        match self.settings.client_auth {
            ClientAuth::Post => {
                form.push(("client_id", id));
                form.push(("client_secret", secret));
            }
            ClientAuth::Basic => {
                // RFC 6749 §2.3.1: each is form-encoded before they are joined, so a
                // `:` in the id cannot move the split.
                let enc =
                    |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                use base64::Engine as _;
                let pair = format!("{}:{}", enc(&id), enc(&secret));
                request = request.header(
                    reqwest::header::AUTHORIZATION,
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(pair)
                    ),
                );
            }
        }
        if let Some(s) = &self.settings.scope {
            form.push(("scope", s.clone()));
        }
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&form)
            .finish();
        let mut resp = request
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .timeout(timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| AuthError::Token(super::http::transport_error(e, url)))?;
        let status = resp.status();
        let location = super::http::redirect_target(resp.headers());
        let header = |name| resp.headers().get(name).and_then(|v| v.to_str().ok());
        // Only where it means "come back later": a 200 with an empty token and
        // `Retry-After: 3600` held the connector for the hour.
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            *retry_after = header(reqwest::header::RETRY_AFTER)
                .and_then(|v| super::http::parse_retry_after(v, header(reqwest::header::DATE)));
        }
        // What the answer is, to name when it is no token answer (its text may hold the
        // token, and is not quoted).
        let described = [
            reqwest::header::CONTENT_TYPE,
            reqwest::header::CONTENT_ENCODING,
        ]
        .into_iter()
        .filter_map(|h| Some(format!("{h}: {}", header(h.clone())?)))
        .collect::<Vec<_>>()
        .join(", ");
        // A token answer is a few KiB; an endpoint sending more (or without end) is not
        // read into memory whole.
        let bytes = match super::http::read_capped(&mut resp, super::http::SEARCHED_BODY)
            .await
            .map_err(|e| AuthError::Token(super::http::body_error(e, url)))?
        {
            super::http::Answer::Whole(b) => b,
            super::http::Answer::Cut(b) if !status.is_success() => b,
            super::http::Answer::Cut(_) => {
                return Err(AuthError::Token(format!(
                    "{status}, with an answer over {} KiB: not a token answer; rosterd stopped reading it",
                    super::http::SEARCHED_BODY >> 10
                )));
            }
        };
        if status.is_redirection() {
            // Not followed: a 307 or 308 would take the client secret to whatever host
            // it names.
            return Err(AuthError::Token(format!(
                "{status}, redirecting to {location}: rosterd does not follow redirects; set `token_url` to the address the endpoint means"
            )));
        }
        if !status.is_success() {
            // An endpoint that echoes the form it was sent must not put the secret in
            // the log and `/status`.
            let secret = self.client_secret.as_deref().unwrap_or_default();
            return Err(AuthError::Token(format!(
                "{status}: {}",
                super::http::kept_answer(&bytes, 512, &[secret])
            )));
        }
        // Some endpoints start their JSON with a byte order mark, which serde refuses.
        let json = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
        // serde's message quotes the value it could not take, which may be the token.
        let t: TokenResponse = serde_json::from_slice(json).map_err(|e| {
            AuthError::Token(format!(
                "unreadable answer: not a token answer's JSON (an object with a string `access_token` and, optionally, `expires_in`; {:?} error at line {}, column {}){}",
                e.classify(),
                e.line(),
                e.column(),
                if described.is_empty() {
                    String::new()
                } else {
                    format!("; the answer has {described}")
                }
            ))
        })?;
        // It goes into a header: a token with a blank, a control character (CR LF would
        // start another header) or a non-ASCII byte failed every request afterwards, for
        // as long as it was cached, as a "builder error" naming the target.
        if t.access_token.is_empty() || !t.access_token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::Token(format!(
                "unusable answer: its `access_token` {}",
                if t.access_token.is_empty() {
                    "is empty".to_owned()
                } else {
                    format!(
                        "of {} characters holds a blank, a control character or a non-ASCII one, which a bearer token cannot (RFC 6750)",
                        t.access_token.chars().count()
                    )
                }
            )));
        }
        // RFC 6749 §7.1: a client must not use a token of a type it does not know. Sent
        // as Bearer, a MAC or DPoP token gets 401s that look like a revoked token.
        match &t.token_type {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(kind)) if kind.eq_ignore_ascii_case("bearer") => {}
            Some(other) => {
                // A type's name is a word; whatever else came is not copied whole into the
                // log and `/status`.
                let shown = super::http::kept_answer(other.to_string().as_bytes(), 64, &[]);
                return Err(AuthError::Token(format!(
                    "unusable answer: its `token_type` is {shown}, where rosterd sends Bearer tokens only (RFC 6750); ask the endpoint for a Bearer token"
                )));
            }
        }
        let ttl = token_lifetime(t.expires_in.as_ref())
            .map_err(|e| AuthError::Token(format!("unreadable answer: {e}")))?;
        Ok((t.access_token, ttl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_told_from_an_answer() {
        for page in [
            &b"<html>Sign in</html>"[..],
            b"\0<html>not json at all",
            b"\xEF\xBB\xBF \n<!DOCTYPE html>",
            b"<?xml version=\"1.0\"?><error/>",
        ] {
            assert!(looks_like_a_page(page), "{page:?}");
        }
        for answer in [
            &b""[..],
            b" \n",
            b"{\"user\":{}}",
            b"\xEF\xBB\xBF{\"status\":\"active\"}",
            b"OK",
        ] {
            assert!(!looks_like_a_page(answer), "{answer:?}");
        }
    }

    #[tokio::test]
    async fn a_401_for_an_old_token_keeps_the_new_one() {
        let settings = AuthSettings {
            token_env: None,
            token_url: Some("http://127.0.0.1:9/token".into()),
            client_id: Some("c".into()),
            client_secret_env: Some("S".into()),
            scope: None,
            client_auth: ClientAuth::Post,
        };
        let creds = Credentials::new(&settings, &|_| Some("s".into())).unwrap();
        let later = Instant::now() + Duration::from_secs(600);
        *creds.cached.lock().await = Some(("new".into(), later));
        creds.invalidate(Some("Bearer old")).await;
        assert!(
            creds.cached.lock().await.is_some(),
            "a stale 401 kept the new token"
        );
        creds.invalidate(Some("Bearer new")).await;
        assert!(
            creds.cached.lock().await.is_none(),
            "the refused token is forgotten"
        );
    }

    #[tokio::test]
    async fn a_token_answer_without_end_is_not_read_whole() {
        let client = reqwest::Client::new();
        for (head, wanted) in [
            (
                "HTTP/1.1 200 OK",
                "200 OK, with an answer over 64 KiB: not a token answer",
            ),
            // An error answer is quoted as always, its first 512 bytes.
            ("HTTP/1.1 400 Bad Request", "400 Bad Request: xxxxxxxx"),
        ] {
            let (addr, written) = crate::connectors::http::tests::endless_answer(head).await;
            let creds = client_credentials(format!("http://{addr}/token"));
            match creds.bearer(&client, Duration::from_secs(20)).await {
                Err(AuthError::Token(e)) => {
                    assert!(e.starts_with(wanted) && e.len() < 600, "{e}")
                }
                other => panic!("{other:?}"),
            }
            let sent = written.load(std::sync::atomic::Ordering::Relaxed);
            assert!(sent < 16 << 20, "{sent} bytes were taken from the endpoint");
        }
    }

    /// A loopback token endpoint giving `answers` (raw HTTP) in turn, the last one for
    /// every later request; and the count of requests it took.
    async fn token_endpoint(
        answers: Vec<String>,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = taken.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let answer = answers[n.min(answers.len() - 1)].clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = socket.read(&mut buf).await;
                    if !answer.is_empty() {
                        let _ = socket.write_all(answer.as_bytes()).await;
                    } else {
                        // Never answers.
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                });
            }
        });
        (url, taken)
    }

    fn answer(status: &str, headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nconnection: close\r\n{headers}content-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    fn client_credentials(token_url: String) -> Credentials {
        let settings = AuthSettings {
            token_env: None,
            token_url: Some(token_url),
            client_id: Some("c".into()),
            client_secret_env: Some("S".into()),
            scope: None,
            client_auth: ClientAuth::Post,
        };
        Credentials::new(&settings, &|_| Some("a-client-secret".into())).unwrap()
    }

    #[tokio::test]
    async fn a_token_a_header_cannot_carry_is_refused_not_cached() {
        let client = reqwest::Client::new();
        let good = answer(
            "200 OK",
            "",
            r#"{"access_token":"good-token","expires_in":3600}"#,
        );
        for (token, wanted) in [
            ("", "its `access_token` is empty"),
            (
                r"tok\r\nX-Injected: yes",
                "holds a blank, a control character",
            ),
            ("tok abc", "holds a blank"),
            (r"t\u00f6k", "non-ASCII"),
            (r"tok\u0000", "a control character"),
        ] {
            let bad = answer(
                "200 OK",
                "",
                &format!(r#"{{"access_token":"{token}","expires_in":3600}}"#),
            );
            let (url, taken) = token_endpoint(vec![bad, good.clone()]).await;
            let creds = client_credentials(url);
            match creds.bearer(&client, Duration::from_secs(20)).await {
                Err(AuthError::Token(e)) => {
                    assert!(
                        e.contains(wanted) && !e.contains("Injected"),
                        "{token}: {e}"
                    )
                }
                other => panic!("{token}: {other:?}"),
            }
            // The next request after the wait asks again, and gets the good one: the bad
            // one was never cached (it was, for its whole hour).
            tokio::time::sleep(creds.token_wait().unwrap_or_default()).await;
            assert_eq!(
                creds
                    .bearer(&client, Duration::from_secs(20))
                    .await
                    .unwrap(),
                "Bearer good-token"
            );
            assert_eq!(taken.load(std::sync::atomic::Ordering::SeqCst), 2);
        }
    }

    /// RFC 6749 §7.1: a token of a type rosterd does not send is refused, naming it; a
    /// Bearer one in any case, or one without `token_type`, is used.
    #[tokio::test]
    async fn a_token_of_another_type_is_refused() {
        let client = reqwest::Client::new();
        for (kind, ok) in [
            (r#""mac""#, false),
            (r#""DPoP""#, false),
            ("7", false),
            (r#""bearer""#, true),
            (
                r#""a-very-long-type-name-that-goes-on-and-on-for-ever-and-ever-more-yes""#,
                false,
            ),
            (r#""Bearer""#, true),
            ("null", true),
            ("", true),
        ] {
            // "" leaves `token_type` out.
            let field = if kind.is_empty() {
                String::new()
            } else {
                format!(r#""token_type":{kind},"#)
            };
            let body = format!(r#"{{"access_token":"tok",{field}"expires_in":60}}"#);
            let (url, _) = token_endpoint(vec![answer("200 OK", "", &body)]).await;
            let got = client_credentials(url)
                .bearer(&client, Duration::from_secs(20))
                .await;
            match (got, ok) {
                (Ok(t), true) => assert_eq!(t, "Bearer tok"),
                (Err(AuthError::Token(e)), false) => assert!(
                    e.contains(&format!(
                        "its `token_type` is {}",
                        &kind[..kind.len().min(64)]
                    )) && !e.contains("more-yes"),
                    "{kind}: {e}"
                ),
                (other, _) => panic!("{kind}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_failed_token_request_is_shared_and_its_retry_after_kept() {
        let client = reqwest::Client::new();
        let busy = answer(
            "429 Too Many Requests",
            "retry-after: 30\r\n",
            r#"{"error":"slow_down"}"#,
        );
        let (url, taken) = token_endpoint(vec![busy]).await;
        let creds = std::sync::Arc::new(client_credentials(url));
        let asking: Vec<_> = (0..8)
            .map(|_| {
                let (creds, client) = (creds.clone(), client.clone());
                tokio::spawn(async move { creds.bearer(&client, Duration::from_secs(20)).await })
            })
            .collect();
        for a in asking {
            match a.await.unwrap() {
                Err(AuthError::Token(e)) => assert!(e.starts_with("429"), "{e}"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            taken.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "eight requests in flight asked the endpoint once"
        );
        let wait = creds.token_wait().expect("a wait");
        assert!(
            wait > Duration::from_secs(20) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        // A Retry-After on an answer that is no "come back later" is not kept: a 200
        // with an empty token held the connector for its hour.
        let empty = answer("200 OK", "retry-after: 3600\r\n", r#"{"access_token":""}"#);
        let (url, _) = token_endpoint(vec![empty]).await;
        let creds = client_credentials(url);
        assert!(
            creds
                .bearer(&client, Duration::from_secs(20))
                .await
                .is_err()
        );
        let wait = creds.token_wait().expect("a wait");
        assert!(wait <= TOKEN_RETRY_FLOOR, "{wait:?}");
    }

    #[tokio::test]
    async fn a_token_request_has_the_connectors_timeout_and_names_what_it_got() {
        let client = reqwest::Client::new();
        // An endpoint that never answers: the connector's timeout, not 30 s.
        let (url, _) = token_endpoint(vec![String::new()]).await;
        let creds = client_credentials(url);
        let fetched = tokio::time::timeout(
            Duration::from_secs(10),
            creds.bearer(&client, Duration::from_millis(200)),
        )
        .await
        .expect("the token request outlived its timeout");
        assert!(
            matches!(fetched, Err(AuthError::Token(ref e)) if e.contains("timed out")),
            "{fetched:?}"
        );

        // A byte order mark is read past; an HTML page is named by its Content-Type.
        let bom = answer("200 OK", "", "\u{feff}{\"access_token\":\"tok-1\"}");
        let html = answer(
            "200 OK",
            "content-type: text/html\r\n",
            "<html>Sign in</html>",
        );
        let (url, _) = token_endpoint(vec![bom, html]).await;
        let creds = client_credentials(url);
        assert_eq!(
            creds
                .bearer(&client, Duration::from_secs(20))
                .await
                .unwrap(),
            "Bearer tok-1"
        );
        *creds.cached.lock().await = None;
        match creds.bearer(&client, Duration::from_secs(20)).await {
            Err(AuthError::Token(e)) => assert!(e.contains("content-type: text/html"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_token_lifetime_is_read_as_endpoints_write_it_and_bounded() {
        let client = reqwest::Client::new();
        for (expires_in, wanted) in [
            ("18446744073709551615", Ok(MAX_TOKEN_LIFETIME)),
            ("1e300", Ok(MAX_TOKEN_LIFETIME)),
            ("\"3599\"", Ok(Duration::from_secs(3599))),
            ("3600.0", Ok(Duration::from_secs(3600))),
            ("0", Ok(Duration::from_secs(1))),
            ("null", Ok(Duration::from_secs(3600))),
            (
                "-5",
                Err("`expires_in` is not a number of seconds (a negative number)"),
            ),
            ("\"soon\"", Err("a string that is not a number")),
        ] {
            let body = format!(r#"{{"access_token":"tok","expires_in":{expires_in}}}"#);
            let (url, _) = token_endpoint(vec![answer("200 OK", "", &body)]).await;
            let creds = client_credentials(url);
            match (creds.bearer(&client, Duration::from_secs(20)).await, wanted) {
                (Ok(bearer), Ok(w)) => {
                    assert_eq!(bearer, "Bearer tok");
                    // Cached for its lifetime less a margin of at most 30 s.
                    let (_, until) = creds.cached.lock().await.clone().unwrap();
                    let left = until - Instant::now();
                    assert!(
                        left <= w && left + Duration::from_secs(31) >= w,
                        "{expires_in}: {left:?}"
                    );
                }
                (Err(AuthError::Token(e)), Err(w)) => assert!(e.contains(w), "{expires_in}: {e}"),
                (got, _) => panic!("{expires_in}: {got:?}"),
            }
        }
    }

    fn settings() -> OneRosterSettings {
        toml::from_str(
            r#"
base_url = "http://t/or/"
org_sourced_id = "org-1"
course_sourced_id = "course-1"
roles = { eng_lead = "districtAdministrator" }
[auth]
token_env = "T"
"#,
        )
        .unwrap()
    }

    /// A URL's user name and password would go out as Basic credentials ahead of the
    /// bearer token: refused, without being shown.
    #[test]
    fn credentials_in_a_url_are_refused() {
        assert_eq!(settings().validate(), Ok(()));
        let mut s = settings();
        s.base_url = "http://svc:s3cretpw@t/or/".into();
        let e = s.validate().unwrap_err();
        assert!(
            e.contains("base_url") && e.contains("[oneroster.auth]") && !e.contains("s3cretpw"),
            "{e}"
        );
        let mut s = settings();
        s.auth.token_env = None;
        s.auth.token_url = Some("https://svc@idp.example/token".into());
        s.auth.client_id = Some("c".into());
        s.auth.client_secret_env = Some("C".into());
        let e = s.validate().unwrap_err();
        assert!(e.contains("auth.token_url"), "{e}");
    }

    #[test]
    fn settings_that_change_what_was_sent_are_named() {
        let old = settings();
        let mut new = settings();
        // Where to send and how to authenticate change no body already sent.
        new.base_url = "http://elsewhere/or/".into();
        new.read_back = true;
        assert!(old.reshaped(&new).is_empty());
        new.roles.insert("designer".into(), "proctor".into());
        new.deactivate = Deactivate::Delete;
        assert_eq!(old.reshaped(&new), ["roles", "deactivate"]);
    }

    use crate::store::ChangeOp;

    fn event(rt: &str, op: ChangeOp) -> ChangeEvent {
        ChangeEvent::bare(1, Utc::now(), rt, "u1", op)
    }

    #[test]
    fn a_user_becomes_a_wrapped_oneroster_user() {
        let s = settings();
        let doc = json!({"userName": "ada@x.test", "name": {"givenName": "Ada", "familyName": "L"},
            "title": "Staff Engineer", "emails": [{"value": "ada@x.test", "primary": true}],
            crate::scim::schema::ENTERPRISE_USER_SCHEMA: {"department": "R&D", "manager": {"value": "m1"}}});
        let a = Assignment {
            archetype_id: Some("eng_lead".into()),
            confidence: 0.9,
            assigned_by: "service:classifier".into(),
            assigned_at: Utc::now(),
            source: crate::store::AssignmentSource::Classifier,
            bundle_version: String::new(),
            candidates: vec![],
            needs_review: false,
        };
        let cur = Current {
            doc: Some(&doc),
            assignment: Some(&a),
            manager: Some("m1"),
            user_members_added: vec![],
            user_members_removed: vec![],
            reports: vec![],
            groups: vec![],
            enrollments_owed: vec![],
        };
        let p = plan(&s, "demo", &event("User", ChangeOp::Created), cur).unwrap();
        assert_eq!(p.stages.len(), 1);
        let r = &p.stages[0][0];
        let sid = sourced_id("demo", "User/u1");
        assert_eq!(r.url, format!("http://t/or/users/{sid}"));
        let body: Value = serde_json::from_slice(r.body.as_ref().unwrap()).unwrap();
        let u = &body["user"];
        assert_eq!(u["sourcedId"], sid);
        assert_eq!(u["enabledUser"], "true");
        assert_eq!(u["roles"][0]["role"], "districtAdministrator");
        assert_eq!(u["roles"][0]["org"]["sourcedId"], "org-1");
        assert_eq!(u["metadata"]["department"], "R&D");
        assert_eq!(u["metadata"]["manager"], sourced_id("demo", "User/m1"));
    }

    #[test]
    fn a_user_without_email_is_unmappable() {
        let doc = json!({"userName": "ada"});
        let cur = Current {
            doc: Some(&doc),
            assignment: None,
            manager: None,
            user_members_added: vec![],
            user_members_removed: vec![],
            reports: vec![],
            groups: vec![],
            enrollments_owed: vec![],
        };
        let err = plan(&settings(), "demo", &event("User", ChangeOp::Created), cur).unwrap_err();
        assert!(err.0.contains("email"), "{err}");
    }

    #[test]
    fn a_group_is_a_class_then_its_enrollments() {
        let doc = json!({"displayName": "Ops"});
        let mut ev = event("Group", ChangeOp::Updated);
        ev.id = "g1".into();
        let cur = Current {
            doc: Some(&doc),
            assignment: None,
            manager: None,
            user_members_added: vec!["u1", "u2"],
            user_members_removed: vec!["u3"],
            reports: vec![],
            groups: vec![],
            enrollments_owed: vec![],
        };
        let p = plan(&settings(), "demo", &ev, cur).unwrap();
        assert_eq!(p.stages.len(), 2);
        assert!(p.stages[0][0].url.contains("/classes/"));
        assert_eq!(p.stages[1].len(), 3);
        assert_eq!(p.stages[1][0].method, reqwest::Method::DELETE);
        // Deleting a group removes enrollments before the class.
        let p = plan(
            &settings(),
            "demo",
            &ev,
            Current {
                doc: None,
                assignment: None,
                manager: None,
                user_members_added: vec![],
                user_members_removed: vec!["u1"],
                reports: vec![],
                groups: vec![],
                enrollments_owed: vec![],
            },
        )
        .unwrap();
        assert!(p.stages[0][0].url.contains("/enrollments/"));
        assert!(p.stages[1][0].url.contains("/classes/"));
    }

    #[test]
    fn names_are_taken_or_split_from_a_full_name_never_made_up() {
        let names = |doc: Value| {
            let u = UserFields { doc: &doc };
            u.names("u1")
                .map(|(g, f)| (g.into_owned(), f.into_owned()))
                .map_err(|e| e.0)
        };
        let ok = |g: &str, f: &str| Ok((g.to_owned(), f.to_owned()));
        assert_eq!(
            names(json!({"displayName": "Jane  Q Doe"})),
            ok("Jane Q", "Doe")
        );
        // name.formatted comes first; one word does not count as a full name.
        assert_eq!(
            names(json!({"name": {"formatted": "Cher"}, "displayName": "Cher Sarkisian"})),
            ok("Cher", "Sarkisian")
        );
        // Each part from the SCIM name when it has it.
        assert_eq!(
            names(json!({"name": {"givenName": "Ada", "formatted": "Augusta Ada King"}})),
            ok("Ada", "King")
        );
        assert_eq!(
            names(json!({"name": {"familyName": "Doe"}, "displayName": "Jane Doe-Smith"})),
            ok("Jane", "Doe")
        );
        // A known part ends or starts the full name: the other is the rest of it.
        assert_eq!(
            names(json!({"name": {"familyName": "van der Berg", "formatted": "Jan van der Berg"}})),
            ok("Jan", "van der Berg")
        );
        assert_eq!(
            names(json!({"name": {"givenName": "Mary Ann", "formatted": "Mary Ann de la Cruz"}})),
            ok("Mary Ann", "de la Cruz")
        );
        // Trimmed, as every value sent is.
        assert_eq!(
            names(json!({"name": {"givenName": " Jane ", "familyName": "Doe "}})),
            ok("Jane", "Doe")
        );
        let err = names(json!({"displayName": "Cher", "userName": "cher@x.test"})).unwrap_err();
        assert!(err.contains("family name") && err.contains("u1"), "{err}");
        let err = names(json!({"name": {"familyName": "Doe"}})).unwrap_err();
        assert!(err.contains("given name"), "{err}");
    }

    #[test]
    fn phone_is_the_primary_or_work_number_sms_the_mobile_one() {
        let doc = json!({"phoneNumbers": [
            {"value": "1", "type": "home"},
            {"value": "2", "type": "pager", "primary": true},
            {"value": "3", "type": "work"},
            {"value": "", "type": "mobile"},
            {"value": "4", "type": "mobile"}]});
        let u = UserFields { doc: &doc };
        assert_eq!((u.phone(), u.sms()), (Some("3"), Some("4")));
        let doc = json!({"phoneNumbers": [{"value": "5", "type": "home", "primary": true}]});
        let u = UserFields { doc: &doc };
        assert_eq!((u.phone(), u.sms()), (Some("5"), None));
        let doc = json!({"phoneNumbers": [{"value": "6", "type": "home"}]});
        assert_eq!(UserFields { doc: &doc }.phone(), None);
        // Types are not case-exact: a primary "Fax" is still a fax.
        let doc = json!({"phoneNumbers": [
            {"value": "7", "type": "Fax", "primary": true},
            {"value": " 8 ", "type": "Work"},
            {"value": "9", "type": "MOBILE"}]});
        let u = UserFields { doc: &doc };
        assert_eq!((u.phone(), u.sms()), (Some("8"), Some("9")));
        // A blank address is no address.
        let doc = json!({"emails": [
            {"value": "  ", "primary": true},
            {"value": "real@x.org", "type": "Work"}]});
        assert_eq!(UserFields { doc: &doc }.email(), Some("real@x.org"));
    }

    #[test]
    fn absent_fields_are_left_out_of_the_bodies() {
        let s = settings();
        let doc =
            json!({"userName": "ada@x.test", "name": {"givenName": "Ada", "familyName": "L"}});
        let user = UserState {
            id: "u1",
            doc: &doc,
            assignment: None,
            manager: None,
        };
        let body = user_body(&s, "demo", &user, Utc::now()).unwrap();
        for k in ["identifier", "middleName", "phone", "sms"] {
            assert!(body.get(k).is_none(), "{k} in {body}");
        }
        assert_eq!(body["metadata"], json!({"scim_id": "u1"}));
        let class = class_body(&s, "demo", "g1", &json!({"displayName": "Ops"}), Utc::now());
        assert!(class.get("classCode").is_none(), "{class}");
    }

    #[test]
    fn a_deleted_user_is_deleted_before_its_reports_are_put() {
        let s = settings();
        let doc = json!({"userName": "r@x.test", "name": {"givenName": "R", "familyName": "E"}});
        let report = UserState {
            id: "r1",
            doc: &doc,
            assignment: None,
            manager: None,
        };
        let cur = Current {
            doc: None,
            assignment: None,
            manager: None,
            user_members_added: vec![],
            user_members_removed: vec![],
            reports: vec![user_write(&s, "demo", &report, Utc::now()).unwrap()],
            groups: vec![],
            enrollments_owed: vec![],
        };
        let p = plan(&s, "demo", &event("User", ChangeOp::Deleted), cur).unwrap();
        assert_eq!(p.stages.len(), 2);
        assert_eq!(p.stages[0][0].method, reqwest::Method::DELETE);
        assert_eq!(p.stages[1][0].method, reqwest::Method::PUT);
        assert_eq!(p.hashes[1].0, "User/r1");
    }

    #[test]
    fn content_hash_ignores_the_timestamp_only() {
        let a = json!({"x": 1, "dateLastModified": "a"});
        let b = json!({"x": 1, "dateLastModified": "b"});
        let c = json!({"x": 2, "dateLastModified": "a"});
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_ne!(content_hash(&a), content_hash(&c));
    }

    #[test]
    fn bad_roles_are_refused() {
        let mut s = settings();
        s.roles.insert("x".into(), "wizard".into());
        assert!(s.validate().unwrap_err().contains("roles.x"));
    }
}
