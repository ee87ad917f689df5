//! Roster API handlers. Reads stream from the store on the blocking pool; writes go
//! through the store's one write path, so an override lands in the same kind of
//! transaction (with its governance event and change event) as a SCIM write.
use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::jwt::Scope;
use super::{ApiError, ApiResult, Caller, Params, TenantRoster, authenticate, json_body};
use crate::classify::TenantPolicy;
use crate::dispatch::ReconcileMode;
use crate::scim::ResourceKind;
use crate::server::{AppState, RequestBody};
use crate::store::{
    Assignment, EVENT_KINDS, EventQuery, IdScan, IndexQuery, Job, OverrideChange, OverrideRefusal,
    OverrideRules, RecordAssignment, Resolver, Resource, RosterRecord, Store, StoreError,
    StoreResult,
};

type St = State<Arc<AppState>>;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
const MAX_BULK: usize = 10_000;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/roster/users", get(list_users))
        .route(
            "/api/v1/roster/users:export",
            get(super::export::export_users),
        )
        .route(
            "/api/v1/roster/users/{user_id}",
            get(get_user).patch(patch_user),
        )
        .route("/api/v1/roster/archetype:bulk-assign", post(bulk_assign))
        .route("/api/v1/roster/archetypes", get(list_archetypes))
        .route("/api/v1/roster/groups", get(list_groups))
        .route("/api/v1/roster/review", get(list_review))
        .route(
            "/api/v1/roster/review/{user_id}/accept",
            post(accept_review),
        )
        .route("/api/v1/roster/events", get(list_events))
        .route("/api/v1/roster/scim:sync", post(start_sync))
        .route("/api/v1/roster/scim/jobs/{job_id}", get(get_job))
}

// ---------------------------------------------------------------------------------------
// Plumbing

pub(super) fn tenant_of<'a>(state: &'a AppState, tenant: &str) -> ApiResult<&'a TenantRoster> {
    state
        .roster
        .tenants
        .get(tenant)
        .ok_or_else(|| ApiError::UnknownTenant(tenant.to_owned()))
}

/// Run store reads off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| ApiError::Internal(crate::store::StoreError::from_join(e)))?
}

/// The request body, read only once [`admit`] let the request in: a client without a
/// valid token must not get the daemon to buffer `max_body_bytes` for it.
/// A large body holds its share of [`crate::server::BodyBudget`] as long as it lives.
pub(super) async fn read_body(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<RequestBody> {
    use crate::server::BodyRefusal;
    crate::server::read_request_body(st, headers, body)
        .await
        .map_err(|r| match r {
            BodyRefusal::Encoded(codings) => ApiError::UnsupportedEncoding(codings),
            BodyRefusal::TooLarge => ApiError::PayloadTooLarge,
            BodyRefusal::Unreadable(e) => {
                ApiError::BadRequest(format!("cannot read the request body: {e}"))
            }
        })
}

/// The checks every handler makes first, in this order: the caller's token, its scope, and
/// the query parameters the endpoint takes (`allowed`).
pub(super) fn admit(
    st: &AppState,
    headers: &HeaderMap,
    scope: Scope,
    p: Params,
    allowed: &[&str],
) -> ApiResult<(Caller, HashMap<String, String>)> {
    let caller = authenticate(st, headers)?;
    caller.require(scope)?;
    let p = p.0?;
    check_params(&p, allowed)?;
    Ok((caller, p))
}

fn check_params(p: &HashMap<String, String>, allowed: &[&str]) -> ApiResult<()> {
    let mut unknown: Vec<&str> = p
        .keys()
        .map(String::as_str)
        .filter(|k| !allowed.contains(k))
        .collect();
    unknown.sort_unstable();
    match unknown.first() {
        Some(k) if allowed.is_empty() => Err(ApiError::BadRequest(format!(
            "unknown query parameter {k:?}; this endpoint takes none"
        ))),
        Some(k) => Err(ApiError::BadRequest(format!(
            "unknown query parameter {k:?}; this endpoint takes {}",
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

pub(super) fn parse_limit(p: &HashMap<String, String>) -> ApiResult<usize> {
    match p.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        // Digits only: `parse` would also take "+5".
        Some(v) => match v
            .parse::<usize>()
            .ok()
            .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
        {
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::BadRequest(format!(
                "limit must be an integer from 1 to {MAX_LIMIT}"
            ))),
        },
    }
}

/// What a cursor was issued for: the endpoint, the tenant and the filters as the listing
/// reads them (not `limit`, which a client may change between pages). A cursor carried
/// to another query would page through a different list from a position in this one;
/// one carried to the same filters spelt otherwise (`active=TRUE` for the default,
/// `department=software` for `Software`) pages the same list and is taken.
#[derive(Clone, Copy)]
struct CursorScope([u8; 8]);

impl CursorScope {
    /// `filters` are the normalized filters, in an order fixed by the endpoint; a filter
    /// not given is left out.
    fn new<'a>(
        endpoint: &str,
        tenant: &str,
        filters: impl IntoIterator<Item = (&'a str, String)>,
    ) -> CursorScope {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for part in [endpoint, tenant] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        for (k, v) in filters {
            h.update(k.as_bytes());
            h.update([1]);
            h.update(v.as_bytes());
            h.update([0]);
        }
        let mut out = [0u8; 8];
        out.copy_from_slice(&h.finalize()[..8]);
        CursorScope(out)
    }

    /// The cursor after the user with SCIM id `id`.
    fn encode(self, id: &str) -> String {
        let mut raw = self.0.to_vec();
        raw.extend_from_slice(id.as_bytes());
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The id of the last user a page showed. A truncated or garbled cursor, an empty one
    /// and one from another query (endpoint, tenant, filters) are refused. One edited to
    /// name another user id is read as that position: it is no secret, since the caller
    /// may list the same query from the start, and it reads nothing outside it.
    fn decode(self, c: &str) -> ApiResult<String> {
        let raw = URL_SAFE_NO_PAD
            .decode(c.as_bytes())
            .ok()
            .filter(|b| b.len() > 8)
            .ok_or_else(|| ApiError::BadRequest("cursor is not one this API issued".into()))?;
        if raw[..8] != self.0 {
            return Err(ApiError::BadRequest(
                "cursor belongs to another query (endpoint, tenant or filters); page with the \
                 filters the cursor came with, or start again without a cursor"
                    .into(),
            ));
        }
        String::from_utf8(raw[8..].to_vec())
            .ok()
            .filter(|id| uuid::Uuid::try_parse(id).is_ok_and(|u| u.hyphenated().to_string() == *id))
            .ok_or_else(|| ApiError::BadRequest("cursor is not one this API issued".into()))
    }
}

/// A body that must be there (PATCH, bulk assign).
fn required_body(headers: &HeaderMap, body: &Bytes, shape: &str) -> ApiResult<Value> {
    json_body(headers, body)?
        .ok_or_else(|| ApiError::BadRequest(format!("a body is required: {shape}")))
}

/// [`find_user`] on the blocking pool.
async fn find_user_async(st: &Arc<AppState>, tenant: &str, user_id: &str) -> ApiResult<Resource> {
    let (st, tenant, user_id) = (st.clone(), tenant.to_owned(), user_id.to_owned());
    blocking(move || find_user(&st.store, &tenant, &user_id)).await
}

/// A SCIM id as the store holds it: ids are issued lower-case, and a UUID is the same id
/// in either case. Anything else is left as it is.
fn canonical_id(id: &str) -> std::borrow::Cow<'_, str> {
    if uuid::Uuid::try_parse(id).is_ok() {
        id.to_ascii_lowercase().into()
    } else {
        id.into()
    }
}

/// `user:<userName>` or a SCIM id.
pub(super) fn find_user(store: &Store, tenant: &str, user_id: &str) -> ApiResult<Resource> {
    let found = match user_id.strip_prefix("user:") {
        Some(name) => match store
            .lookup(tenant, &IndexQuery::UserName(name.to_owned()))?
            .first()
        {
            Some(id) => store.get(tenant, ResourceKind::User, id)?,
            None => None,
        },
        None => store.get(tenant, ResourceKind::User, &canonical_id(user_id))?,
    };
    found.ok_or_else(|| {
        ApiError::NotFound(if user_id.starts_with("user:") {
            format!("user {user_id:?} not found")
        } else {
            // A bare userName is the usual slip: the path takes `user:` before it.
            format!("user {user_id:?} not found; name a user by user:<userName> or by SCIM id")
        })
    })
}

// ---------------------------------------------------------------------------------------
// Rendering users

/// A user as the Roster API shows it (roster-api.txt).
#[derive(Debug, Clone, Serialize)]
pub(super) struct RosterUser {
    pub user_id: String,
    pub scim_id: String,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub job_title: Option<String>,
    pub department: Option<String>,
    pub manager_user_id: Option<String>,
    pub archetype_id: Option<String>,
    pub archetype_confidence: Option<f64>,
    pub archetype_assigned_by: Option<String>,
    pub archetype_assigned_at: Option<DateTime<Utc>>,
    pub is_active: bool,
    pub scim_external_id: Option<String>,
    /// The user's groups by `group_id`, sorted, as roster-api.txt has them: what
    /// `GET /groups` lists and the `group` filter takes, and unambiguous where display
    /// names repeat or hold commas (the CSV joins them with commas).
    pub groups: Vec<String>,
    /// The display names of `groups`, in the same order, for people.
    pub group_names: Vec<String>,
}

fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Group names a [`Renderer`] keeps at most: about 5 MiB.
const NAME_CACHE_MAX: usize = 50_000;
/// Manager userNames a [`Renderer`] keeps at most: about 15 MiB. An export meets
/// managers in no useful order, so the cache is a hit only if it holds them all: with
/// one manager for every ten users, this covers two million users.
const MANAGER_CACHE_MAX: usize = 200_000;

/// Renders users, caching group names and manager userNames across one request.
pub(super) struct Renderer<'a> {
    store: &'a Store,
    tenant: &'a str,
    group_names: HashMap<String, String>,
    /// By the manager's SCIM id as 16 bytes (the store's ids are UUIDs; any other
    /// value names no user and is looked up each time).
    manager_names: HashMap<u128, Option<Box<str>>>,
}

impl<'a> Renderer<'a> {
    pub fn new(store: &'a Store, tenant: &'a str) -> Self {
        Renderer {
            store,
            tenant,
            group_names: HashMap::new(),
            manager_names: HashMap::new(),
        }
    }

    /// Render one user by SCIM id.
    pub fn by_id(&mut self, id: &str) -> ApiResult<RosterUser> {
        let bytes = self
            .store
            .roster_record(self.tenant, id)?
            .ok_or_else(|| ApiError::NotFound(format!("user {id:?} not found")))?;
        Ok(self.user(id, &bytes.record()?, None)?)
    }

    pub fn user(
        &mut self,
        id: &str,
        rec: &RosterRecord<'_>,
        group_ids: Option<&[String]>,
    ) -> StoreResult<RosterUser> {
        let manager_user_id = match rec.user.manager {
            Some(mid) => self.manager_name(mid)?.map(|n| format!("user:{n}")),
            None => None,
        };
        let groups = self.group_ids(id, group_ids)?;
        let group_names = groups
            .iter()
            .map(|gid| self.group_name(gid))
            .collect::<StoreResult<_>>()?;
        let owned = |v: Option<&str>| v.map(str::to_owned);
        let a = rec.assignment.as_ref();
        Ok(RosterUser {
            user_id: format!("user:{}", rec.user.user_name),
            scim_id: id.to_owned(),
            email: owned(rec.user.email),
            first_name: owned(rec.user.given_name.as_deref()),
            last_name: owned(rec.user.family_name.as_deref()),
            job_title: owned(rec.user.title),
            department: owned(rec.user.department),
            manager_user_id,
            archetype_id: owned(rec.archetype_id()),
            archetype_confidence: rec.confidence(),
            archetype_assigned_by: a.map(|a| a.assigned_by.to_owned()),
            archetype_assigned_at: a.map(RecordAssignment::assigned_at),
            is_active: rec.user.active,
            scim_external_id: owned(rec.user.external_id),
            groups,
            group_names,
        })
    }

    /// The user's group ids, sorted (`given` when the caller has them): the user's
    /// `groups`, and the CSV's `groups` cell.
    pub fn group_ids(&self, id: &str, given: Option<&[String]>) -> StoreResult<Vec<String>> {
        let mut groups = match given {
            Some(g) => g.to_vec(),
            None => self.store.groups_of(self.tenant, id)?,
        };
        groups.sort();
        Ok(groups)
    }

    /// The userName of the manager with SCIM id `id`, if that user exists.
    pub fn manager_name(&mut self, id: &str) -> StoreResult<Option<String>> {
        // Only the store's own form, so that two spellings of one UUID, which the store
        // answers differently, never share an entry.
        let key = crate::store::id_key(id);
        if let Some(n) = key.and_then(|k| self.manager_names.get(&k)) {
            return Ok(n.as_deref().map(str::to_owned));
        }
        let n = match self.store.roster_record_unpaged(self.tenant, id)? {
            Some(bytes) => {
                Some(bytes.record()?.user.user_name.to_owned()).filter(|n| !n.is_empty())
            }
            None => None,
        };
        if let Some(key) = key {
            // A roster can have as many managers as users: start over rather than let
            // the cache grow with the tenant.
            if self.manager_names.len() >= MANAGER_CACHE_MAX {
                self.manager_names.clear();
            }
            self.manager_names.insert(key, n.as_deref().map(Box::from));
        }
        Ok(n)
    }

    fn group_name(&mut self, id: &str) -> StoreResult<String> {
        if let Some(n) = self.group_names.get(id) {
            return Ok(n.clone());
        }
        let n = self
            .store
            .get(self.tenant, ResourceKind::Group, id)?
            .and_then(|g| text(g.doc.get("displayName")))
            .unwrap_or_else(|| id.to_owned());
        if self.group_names.len() >= NAME_CACHE_MAX {
            self.group_names.clear();
        }
        self.group_names.insert(id.to_owned(), n.clone());
        Ok(n)
    }
}

// ---------------------------------------------------------------------------------------
// Listing users

/// The filters of `GET /users` (and the export).
#[derive(Debug, Clone, Default)]
pub(super) struct UserFilter {
    pub archetype: Option<String>,
    /// None: active and inactive.
    pub active: Option<bool>,
    pub email: Option<String>,
    /// SCIM id of the manager (resolved from `user:<userName>`).
    pub manager: Option<String>,
    pub department: Option<String>,
    /// SCIM id of the group.
    pub group: Option<String>,
    pub confidence_lt: Option<f64>,
}

pub(super) const FILTER_PARAMS: &[&str] = &[
    "archetype",
    "active",
    "email",
    "manager_user_id",
    "department",
    "group",
    "archetype_confidence__lt",
];

impl UserFilter {
    pub fn from_params(
        store: &Store,
        tenant: &str,
        policy: Option<&TenantPolicy>,
        p: &HashMap<String, String>,
    ) -> ApiResult<Self> {
        let active = match p.get("active").map(|s| s.to_ascii_lowercase()).as_deref() {
            None | Some("true") => Some(true),
            Some("false") => Some(false),
            Some("any") | Some("all") => None,
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "active must be true, false or any, not {other:?}"
                )));
            }
        };
        // A filter value that names nothing is a slip (a bare userName, a misspelt
        // archetype): an empty page would read as "nobody", so it is refused instead.
        let manager = match p.get("manager_user_id") {
            Some(m) => Some(
                find_user(store, tenant, m)
                    .map_err(|e| match e {
                        ApiError::NotFound(why) => {
                            ApiError::BadRequest(format!("manager_user_id: {why}"))
                        }
                        other => other,
                    })?
                    .id,
            ),
            None => None,
        };
        let group = match p.get("group") {
            Some(g) => Some(find_group(store, tenant, g)?.ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "group {g:?} names no group (by SCIM id, displayName or externalId)"
                ))
            })?),
            None => None,
        };
        if let Some(a) = p.get("archetype") {
            check_archetype_filter(store, tenant, policy, a)?;
        }
        let confidence_lt =
            match p.get("archetype_confidence__lt") {
                Some(v) => Some(v.parse::<f64>().ok().filter(|f| f.is_finite()).ok_or_else(
                    || ApiError::BadRequest("archetype_confidence__lt must be a number".into()),
                )?),
                None => None,
            };
        Ok(UserFilter {
            archetype: p.get("archetype").cloned(),
            active,
            email: p.get("email").cloned(),
            manager,
            department: p.get("department").cloned(),
            group,
            confidence_lt,
        })
    }

    /// The filters as `matches` reads them, for [`CursorScope`]: case folded where the
    /// comparison folds it, users and groups by SCIM id, `active` always (it has a
    /// default), a number by its value.
    fn cursor_key(&self) -> Vec<(&'static str, String)> {
        let active = match self.active {
            Some(true) => "true",
            Some(false) => "false",
            None => "any",
        };
        let mut key = vec![("active", active.to_owned())];
        let given = [
            ("archetype", self.archetype.clone()),
            ("email", self.email.as_deref().map(str::to_lowercase)),
            ("manager", self.manager.clone()),
            (
                "department",
                self.department.as_deref().map(str::to_lowercase),
            ),
            ("group", self.group.clone()),
            ("confidence_lt", self.confidence_lt.map(|c| c.to_string())),
        ];
        key.extend(given.into_iter().filter_map(|(k, v)| Some((k, v?))));
        key
    }

    /// The most selective index to walk, or None to walk every user.
    fn index(&self) -> Option<IdScan> {
        if let Some(e) = &self.email {
            Some(IdScan::Email(e.clone()))
        } else if let Some(m) = &self.manager {
            Some(IdScan::Manager(m.clone()))
        } else if let Some(g) = &self.group {
            Some(IdScan::Members(g.clone()))
        } else if let Some(a) = &self.archetype {
            Some(IdScan::Archetype(a.clone()))
        } else {
            self.department
                .as_ref()
                .map(|d| IdScan::Department(d.clone()))
        }
    }

    fn matches(
        &self,
        store: &Store,
        tenant: &str,
        id: &str,
        rec: &RosterRecord<'_>,
    ) -> StoreResult<bool> {
        if self.active.is_some_and(|want| rec.user.active != want) {
            return Ok(false);
        }
        if let Some(want) = &self.archetype
            && rec.archetype_id() != Some(want.as_str())
        {
            return Ok(false);
        }
        if let Some(lt) = self.confidence_lt
            && !rec.confidence().is_some_and(|c| c < lt)
        {
            return Ok(false);
        }
        if let Some(d) = &self.department
            && rec
                .user
                .department
                .is_none_or(|x| x.to_lowercase() != d.to_lowercase())
        {
            return Ok(false);
        }
        if let Some(e) = &self.email
            && !rec.user.has_email(e)
        {
            return Ok(false);
        }
        if let Some(m) = &self.manager
            && rec.user.manager != Some(m.as_str())
        {
            return Ok(false);
        }
        if let Some(g) = &self.group
            && !store.is_member(tenant, g, id)?
        {
            return Ok(false);
        }
        Ok(true)
    }

    /// Walk every matching user in no particular order, calling `f` until it returns
    /// false: [`UserFilter::for_each`] for a walk that needs no cursor (the export). A
    /// walk over every user reads the store's copy of the records kept out of its page
    /// cache, with each user's group ids when the copy has them.
    pub fn for_each_unordered(
        &self,
        store: &Store,
        tenant: &str,
        mut f: impl FnMut(&str, &RosterRecord<'_>, Option<&[String]>) -> StoreResult<bool>,
    ) -> StoreResult<()> {
        if self.index().is_some() {
            return self.for_each(store, tenant, None, f);
        }
        store.for_each_record(tenant, |id, rec, groups| {
            Ok(!self.matches(store, tenant, id, rec)? || f(id, rec, groups)?)
        })
    }

    /// Walk matching users in id order after `after`, calling `f` until it returns false.
    /// `f` gets the user's group ids when the walk already has them. Memory is one user
    /// at a time; a page costs its own size plus what the filters skip.
    pub fn for_each(
        &self,
        store: &Store,
        tenant: &str,
        after: Option<&str>,
        mut f: impl FnMut(&str, &RosterRecord<'_>, Option<&[String]>) -> StoreResult<bool>,
    ) -> StoreResult<()> {
        let mut visit = |id: &str| -> StoreResult<bool> {
            let Some(bytes) = store.roster_record(tenant, id)? else {
                return Ok(true);
            };
            let rec = bytes.record()?;
            Ok(!self.matches(store, tenant, id, &rec)? || f(id, &rec, None)?)
        };
        match self.index() {
            Some(IdScan::Email(e)) => {
                // A user without emails shows a userName that is an address as their
                // email, which the emails index does not hold: look both up.
                let mut ids = store.lookup(tenant, &IndexQuery::Email(e.clone()))?;
                ids.extend(store.lookup(tenant, &IndexQuery::UserName(e))?);
                ids.sort_unstable();
                ids.dedup();
                for id in ids
                    .iter()
                    .filter(|id| after.is_none_or(|a| id.as_str() > a))
                {
                    if !visit(id)? {
                        break;
                    }
                }
            }
            Some(scan) => {
                for id in store.scan_ids(tenant, &scan, after)? {
                    if !visit(&id?)? {
                        break;
                    }
                }
            }
            None => {
                // A full walk: records and memberships are both keyed by user id, so two
                // ordered scans are merged instead of a lookup per user.
                let mut memberships = store.scan_memberships_after(tenant, after)?.peekable();
                let mut groups: Vec<String> = Vec::new();
                for bytes in store.scan_records_after(tenant, after)? {
                    let bytes = bytes?;
                    let id = bytes.id();
                    groups.clear();
                    while let Some(next) = memberships.peek() {
                        match next {
                            Ok((mid, _)) if mid.as_str() < id => {
                                memberships.next();
                            }
                            Ok((mid, _)) if mid == id => {
                                if let Some((_, gid)) = memberships.next().transpose()? {
                                    groups.push(gid);
                                }
                            }
                            Ok(_) => break,
                            Err(_) => {
                                memberships.next().transpose()?;
                            }
                        }
                    }
                    let rec = bytes.record()?;
                    if self.matches(store, tenant, id, &rec)? && !f(id, &rec, Some(&groups))? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// An `archetype` filter names an archetype of the bundle, or one that overrides made
/// before the bundle dropped it still hold (`GET /archetypes` lists both).
fn check_archetype_filter(
    store: &Store,
    tenant: &str,
    policy: Option<&TenantPolicy>,
    a: &str,
) -> ApiResult<()> {
    if policy.is_some_and(|p| p.has_archetype(a)) {
        return Ok(());
    }
    match store.archetype_user_counts(tenant, &[a])?.first() {
        Some((users, _)) if *users > 0 => Ok(()),
        _ => Err(ApiError::InvalidArchetype(a.to_owned())),
    }
}

/// A group named by SCIM id, displayName (any case) or externalId. Display names need
/// not be unique, nor unlike another group's externalId; a name that several groups
/// answer to is refused rather than read as one of them, which would list some of the
/// users it names and silently leave out others. A SCIM id is unique and wins.
fn find_group(store: &Store, tenant: &str, g: &str) -> ApiResult<Option<String>> {
    let as_id = canonical_id(g);
    if store.get(tenant, ResourceKind::Group, &as_id)?.is_some() {
        return Ok(Some(as_id.into_owned()));
    }
    let by_name = store.lookup(tenant, &IndexQuery::GroupName(g.to_owned()))?;
    let by_external = store.lookup_group_external_id(tenant, g)?;
    let what = match (by_name.is_empty(), by_external.is_empty()) {
        (false, false) => "displayName or externalId",
        (false, true) => "displayName",
        _ => "externalId",
    };
    let mut ids = by_name;
    ids.extend(by_external);
    ids.sort();
    ids.dedup();
    if ids.len() > 1 {
        return Err(ApiError::BadRequest(format!(
            "{} groups have the {what} {g:?} (ids {}); filter by one group's id",
            ids.len(),
            ids.join(", ")
        )));
    }
    Ok(ids.pop())
}

async fn list_users(State(st): St, headers: HeaderMap, p: Params) -> ApiResult<Response> {
    let mut allowed = FILTER_PARAMS.to_vec();
    allowed.extend(["limit", "cursor"]);
    let (caller, p) = admit(&st, &headers, Scope::Read, p, &allowed)?;
    let limit = parse_limit(&p)?;
    let policy = tenant_of(&st, &caller.tenant)?.policy();
    let tenant = caller.tenant;
    blocking(move || {
        let store = &st.store;
        let filter = UserFilter::from_params(store, &tenant, policy.as_deref(), &p)?;
        let scope = CursorScope::new("users", &tenant, filter.cursor_key());
        let after = p.get("cursor").map(|c| scope.decode(c)).transpose()?;
        let mut renderer = Renderer::new(store, &tenant);
        let mut users = Vec::with_capacity(limit);
        let mut more = false;
        filter.for_each(store, &tenant, after.as_deref(), |id, rec, groups| {
            if users.len() == limit {
                more = true;
                return Ok(false);
            }
            users.push(renderer.user(id, rec, groups)?);
            Ok(true)
        })?;
        let next = more
            .then(|| users.last().map(|u| scope.encode(&u.scim_id)))
            .flatten();
        Ok(Json(json!({"users": users, "next_cursor": next})).into_response())
    })
    .await
}

async fn get_user(
    State(st): St,
    headers: HeaderMap,
    Path(user_id): Path<String>,
    p: Params,
) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Read, p, &[])?;
    let tenant = caller.tenant;
    blocking(move || {
        let res = find_user(&st.store, &tenant, &user_id)?;
        let user = Renderer::new(&st.store, &tenant).by_id(&res.id)?;
        Ok(Json(user).into_response())
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Overrides

/// An assignment as everything rosterd sends out shows it (governance events' `before`
/// and `after`, the change feed, webhooks): the user object's names for what
/// roster-api.txt names, and how it was decided.
pub(crate) fn assignment_state(a: &Assignment) -> Value {
    json!({
        "archetype_id": a.archetype_id,
        "archetype_confidence": a.confidence,
        "archetype_assigned_by": a.assigned_by,
        "archetype_assigned_at": a.assigned_at,
        "source": a.source,
        "bundle_version": a.bundle_version,
        "needs_review": a.needs_review,
        "candidates": shown_candidates(&a.candidates),
    })
}

/// The candidates in the classifier's order, which assignments stored before it ordered
/// the runners-up do not have.
fn shown_candidates(c: &[crate::store::Candidate]) -> Vec<&crate::store::Candidate> {
    let mut out: Vec<&crate::store::Candidate> = c.iter().collect();
    crate::classify::order_runners_up(&mut out, |c| c.confidence);
    out
}

fn assignment_reply(user_name: &str, a: &Assignment) -> Value {
    json!({
        "user_id": format!("user:{user_name}"),
        "archetype_id": a.archetype_id,
        "archetype_confidence": a.confidence,
        "archetype_assigned_by": a.assigned_by,
        "archetype_assigned_at": a.assigned_at,
    })
}

/// Every override through the API: none while a job holds the tenant (409), checked
/// again as the write lands. The bundle's archetypes are always checked there.
const OVERRIDE_RULES: OverrideRules = OverrideRules {
    only_review_items: false,
    refuse_during_job: true,
};

/// What a request does to a user's override, for [`check_override`].
#[derive(Clone, Copy)]
enum OverrideIntent<'a> {
    /// Set one: this archetype, or (None) the suggestion a review item carries.
    Set(Option<&'a str>),
    /// Remove one, which a policy against overrides does not forbid: the clear is the
    /// way out of overrides made before the tenant turned them off.
    Clear,
}

/// Checks shared by every override, answered early: the caller may write, the tenant
/// allows overrides (unless the override is being cleared), no sync job is rewriting
/// assignments, and the archetype is in the bundle. The store checks the racy ones (job
/// running, archetype still in the bundle, user still in review) again as it writes.
/// `user` is the SCIM id of the user the override is for, once found: repeating the
/// override a user already holds is accepted (and changes nothing) even when a bundle
/// reload has since dropped its archetype.
fn check_override(
    st: &AppState,
    caller: &Caller,
    intent: OverrideIntent<'_>,
    user: Option<&str>,
) -> ApiResult<()> {
    caller.require(Scope::Write)?;
    let t = tenant_of(st, &caller.tenant)?;
    // One read, only for an archetype outside the bundle or a tenant without overrides:
    // rare enough to do here.
    let held = |a: &str| -> ApiResult<bool> {
        let Some(id) = user else { return Ok(false) };
        Ok(st.store.assignment(&caller.tenant, id)?.is_some_and(|c| {
            c.source == crate::store::AssignmentSource::Override
                && c.archetype_id.as_deref() == Some(a)
        }))
    };
    let archetype = match intent {
        // Repeating the override a user holds sets nothing new, as for a dropped
        // archetype: a bulk re-send of a team's overrides does not fail on them.
        OverrideIntent::Set(Some(a)) if !t.allow_overrides && held(a)? => Some(a),
        OverrideIntent::Set(_) if !t.allow_overrides => return Err(ApiError::OverridesForbidden),
        OverrideIntent::Set(a) => a,
        OverrideIntent::Clear => None,
    };
    if let Some(a) = archetype {
        let policy = t.policy().ok_or(ApiError::NoBundle)?;
        if !policy.has_archetype(a) && !held(a)? {
            return Err(ApiError::InvalidArchetype(a.to_owned()));
        }
    }
    if st.store.job_running(&caller.tenant) {
        return Err(sync_in_progress(st, &caller.tenant));
    }
    Ok(())
}

/// 409 naming the job to wait for, so the caller can follow it rather than poll blind.
fn sync_in_progress(st: &AppState, tenant: &str) -> ApiError {
    ApiError::SyncInProgress(
        st.store
            .running_job(tenant)
            .ok()
            .flatten()
            .map(|j| j.job_id),
    )
}

/// A body (or bulk item) names no field beyond `allowed`: an unknown one is a typo or a
/// wish (`"dry_run": true`) that would otherwise be ignored while the rest is written.
/// `shape` says what is expected.
fn only_fields(
    obj: &serde_json::Map<String, Value>,
    allowed: &[&str],
    shape: &str,
) -> ApiResult<()> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::BadRequest(format!(
            "unknown field {k:?}; {shape}"
        ))),
        None => Ok(()),
    }
}

/// A review accept's body: the archetype chosen (None: the suggestion) and the suggestion
/// the reviewer was shown, if they say.
fn accept_fields(body: &Value) -> ApiResult<(Option<String>, Option<String>)> {
    const SHAPE: &str = "the body is {\"archetype_id\": \"<id>\"} to choose an archetype, or {} or {\"expected_archetype_id\": \"<id>\"} to accept the suggestion (only while it is that one)";
    let Some(obj) = body.as_object() else {
        return Err(ApiError::BadRequest("body must be a JSON object".into()));
    };
    only_fields(obj, &["archetype_id", "expected_archetype_id"], SHAPE)?;
    let id = |key: &str| match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::BadRequest(format!(
            "{key} must be an archetype id, or null to accept the suggestion; {SHAPE}"
        ))),
    };
    match (id("archetype_id")?, id("expected_archetype_id")?) {
        (Some(_), Some(_)) => Err(ApiError::BadRequest(format!(
            "archetype_id chooses an archetype and expected_archetype_id accepts the suggestion: send one; {SHAPE}"
        ))),
        fields => Ok(fields),
    }
}

/// The `archetype_id` of an override's body (`{"archetype_id": "<id>" | null}`): a
/// string sets an override, `null` clears it.
fn archetype_field(body: &Value) -> ApiResult<Option<String>> {
    let Some(obj) = body.as_object() else {
        return Err(ApiError::BadRequest("body must be a JSON object".into()));
    };
    only_fields(
        obj,
        &["archetype_id"],
        "the body is {\"archetype_id\": \"<id>\" | null}",
    )?;
    match obj.get("archetype_id") {
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(Value::Null) => Ok(None),
        _ => Err(ApiError::BadRequest(
            "archetype_id must be an archetype id, or null to clear the override".into(),
        )),
    }
}

async fn patch_user(
    State(st): St,
    headers: HeaderMap,
    Path(user_id): Path<String>,
    p: Params,
    body: Body,
) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Write, p, &[])?;
    let body = read_body(&st, &headers, body).await?;
    let body = required_body(&headers, &body, "{\"archetype_id\": \"<id>\" | null}")?;
    let archetype = archetype_field(&body)?;
    let user = find_user_async(&st, &caller.tenant, &user_id).await?;
    let intent = match &archetype {
        Some(a) => OverrideIntent::Set(Some(a)),
        None => OverrideIntent::Clear,
    };
    check_override(&st, &caller, intent, Some(&user.id))?;
    if archetype.is_none() && tenant_of(&st, &caller.tenant)?.policy().is_none() {
        return Err(ApiError::NoBundle);
    }
    let change = match archetype {
        Some(a) => OverrideChange::Set(a),
        None => OverrideChange::Clear,
    };
    let a = st
        .store
        .change_override(
            &caller.tenant,
            &user.id,
            change,
            OVERRIDE_RULES,
            &caller.principal.actor(),
        )
        .await?;
    let name = text(user.doc.get("userName")).unwrap_or_default();
    tracing::info!(user = %user.id, archetype = a.archetype_id.as_deref().unwrap_or("none"), actor = %caller.principal.actor(), "Archetype override set.");
    Ok(Json(assignment_reply(&name, &a)).into_response())
}

async fn bulk_assign(
    State(st): St,
    headers: HeaderMap,
    p: Params,
    body: Body,
) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Write, p, &[])?;
    let body = read_body(&st, &headers, body).await?;
    let body = required_body(
        &headers,
        &body,
        "{\"assignments\": [{\"user_id\", \"archetype_id\"}, …]}",
    )?;
    if let Some(obj) = body.as_object() {
        only_fields(
            obj,
            &["assignments"],
            "the body is {\"assignments\": [...]}",
        )?;
    }
    let Some(items) = body.get("assignments").and_then(Value::as_array) else {
        return Err(ApiError::BadRequest(
            "body must be {\"assignments\": [{\"user_id\", \"archetype_id\"}, …]}".into(),
        ));
    };
    if items.len() > MAX_BULK {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_BULK} assignments per request"
        )));
    }
    // Whether each item may set an override is the item's answer: clears go through
    // whatever the policy.
    check_override(&st, &caller, OverrideIntent::Clear, None)?;
    tenant_of(&st, &caller.tenant)?
        .policy()
        .ok_or(ApiError::NoBundle)?;
    let mut updated = 0u64;
    let mut errors = Vec::new();
    // The SCIM id of each user an item named, with that item's index.
    let mut named: HashMap<String, usize> = HashMap::new();
    for (index, item) in items.iter().enumerate() {
        let user_id = item
            .get("user_id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let outcome: ApiResult<()> = async {
            // Each item is read as PATCH reads its body, plus the user it is for.
            let Some(fields) = item.as_object() else {
                return Err(ApiError::BadRequest(
                    "an item is {\"user_id\": \"user:…\", \"archetype_id\": \"<id>\" | null}"
                        .into(),
                ));
            };
            only_fields(
                fields,
                &["user_id", "archetype_id"],
                "an item has user_id and archetype_id",
            )?;
            if user_id.is_empty() {
                return Err(ApiError::BadRequest(
                    "user_id is required: user:<userName> or a SCIM id".into(),
                ));
            }
            // As PATCH takes it, and in its order (the user, then whether the override
            // may be set): an id overrides, null clears the override.
            let set = match item.get("archetype_id") {
                Some(Value::String(a)) if !a.is_empty() => Some(a),
                Some(Value::Null) => None,
                None => {
                    return Err(ApiError::BadRequest(
                        "archetype_id is required: an archetype id, or null to clear the override"
                            .into(),
                    ));
                }
                // Said as what it is: "required" sent the client looking for a field it
                // had sent.
                Some(other) => {
                    return Err(ApiError::BadRequest(format!(
                        "archetype_id must be an archetype id (a non-empty string), or null to clear the override, not {}",
                        crate::server::clip(&other.to_string(), 64)
                    )));
                }
            };
            let user = find_user_async(&st, &caller.tenant, user_id).await?;
            // Applied in turn, all of them would count as `updated` while only the last
            // stays in force, and each would write its event: which one the sender meant
            // is not for the order of the list to decide.
            if let Some(first) = named.get(&user.id) {
                return Err(ApiError::BadRequest(format!(
                    "item {first} names this user already; send one item per user"
                )));
            }
            named.insert(user.id.clone(), index);
            let change = match set {
                Some(a) => {
                    check_override(&st, &caller, OverrideIntent::Set(Some(a)), Some(&user.id))?;
                    OverrideChange::Set(a.clone())
                }
                None => OverrideChange::Clear,
            };
            st.store
                .change_override(
                    &caller.tenant,
                    &user.id,
                    change,
                    OVERRIDE_RULES,
                    &caller.principal.actor(),
                )
                .await?;
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => updated += 1,
            Err(ApiError::Internal(e))
                if !matches!(e, crate::store::StoreError::NotFound { .. }) =>
            {
                return Err(ApiError::Internal(e));
            }
            Err(e) => {
                let (status, code) = e.status_and_code();
                errors.push(json!({
                    "index": index,
                    "user_id": user_id,
                    "status": status.as_u16(),
                    "error": code,
                    "message": e.to_string(),
                }));
            }
        }
    }
    Ok(Json(json!({"updated": updated, "failed": errors.len(), "errors": errors})).into_response())
}

// ---------------------------------------------------------------------------------------
// Archetypes and groups

async fn list_archetypes(State(st): St, headers: HeaderMap, p: Params) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Read, p, &[])?;
    let policy = tenant_of(&st, &caller.tenant)?
        .policy()
        .ok_or(ApiError::NoBundle)?;
    let tenant = caller.tenant;
    blocking(move || {
        let archetypes = &policy.bundle().archetypes;
        let ids = policy.bundle().archetype_ids();
        let counts = st.store.archetype_user_counts(&tenant, &ids)?;
        let mut out = Vec::new();
        for (a, (users, active)) in archetypes.iter().zip(counts) {
            out.push(json!({
                "archetype_id": a.id,
                "title": a.title,
                "function_focus": a.function_focus,
                "default_cowork_id": a.default_cowork_id,
                "user_count": users,
                "active_user_count": active,
                "in_bundle": true,
            }));
        }
        // Overrides outlive a bundle that drops their archetype; their users must still
        // add up, and an operator must be able to find them.
        for (id, users, active) in st.store.archetypes_held_outside(&tenant, &ids)? {
            out.push(json!({
                "archetype_id": id,
                "title": null,
                "function_focus": [],
                "default_cowork_id": null,
                "user_count": users,
                "active_user_count": active,
                "in_bundle": false,
            }));
        }
        Ok(Json(json!({
            "bundle_version": policy.bundle().version,
            "archetypes": out,
        }))
        .into_response())
    })
    .await
}

async fn list_groups(State(st): St, headers: HeaderMap, p: Params) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Read, p, &[])?;
    let tenant = caller.tenant;
    blocking(move || {
        let t = tenant_of(&st, &tenant)?;
        let policy = t.policy();
        let mut out = Vec::new();
        for g in st.store.scan(&tenant, ResourceKind::Group)? {
            let g = g?;
            let members = st.store.member_count(&tenant, &g.id)?;
            let name = text(g.doc.get("displayName"));
            let external = text(g.doc.get("externalId"));
            let rule = policy.as_ref().and_then(|p| {
                p.group_rule_for(&g.id, name.as_deref(), external.as_deref())
                    .map(str::to_owned)
            });
            out.push(json!({
                "group_id": g.id,
                "display_name": name,
                "external_id": external,
                "source": t.group_source,
                "member_count": members,
                "claresia_role": t.group_role(&g.id, name.as_deref(), external.as_deref()),
                "archetype_rule": rule,
            }));
        }
        Ok(Json(json!({"groups": out})).into_response())
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Review queue

async fn list_review(State(st): St, headers: HeaderMap, p: Params) -> ApiResult<Response> {
    let (caller, p) = admit(&st, &headers, Scope::Read, p, &["limit", "cursor"])?;
    let limit = parse_limit(&p)?;
    // The queue takes no filters: a cursor is bound to the endpoint and tenant only.
    let scope = CursorScope::new("review", &caller.tenant, []);
    let after = p.get("cursor").map(|c| scope.decode(c)).transpose()?;
    let threshold = tenant_of(&st, &caller.tenant)?
        .policy()
        .map(|p| p.review_threshold_value());
    let tenant = caller.tenant;
    blocking(move || {
        let mut items = Vec::new();
        let mut more = false;
        for id in st
            .store
            .review_queue_after(&tenant, after.as_deref(), limit.saturating_add(1))?
        {
            if items.len() == limit {
                more = true;
                break;
            }
            let (Some(rec), Some(a)) = (
                st.store.roster_record(&tenant, &id)?,
                st.store.assignment(&tenant, &id)?,
            ) else {
                continue;
            };
            let rec = rec.record()?;
            // The user object's names (roster-api.txt), so a reviewer's tool reads an
            // item as it reads a user; inactive users keep their place in the queue (a
            // reactivation brings the doubt back), so each item says whether it is active.
            items.push(json!({
                "user_id": format!("user:{}", rec.user.user_name),
                "scim_id": id,
                "email": rec.user.email,
                "job_title": rec.user.title,
                "department": rec.user.department,
                "is_active": rec.user.active,
                "archetype_id": a.archetype_id,
                "archetype_confidence": a.confidence,
                "archetype_assigned_by": a.assigned_by,
                "archetype_assigned_at": a.assigned_at,
                "candidates": shown_candidates(&a.candidates),
            }));
        }
        let next = if more {
            items
                .last()
                .and_then(|i| i["scim_id"].as_str())
                .map(|id| scope.encode(id))
        } else {
            None
        };
        Ok(Json(json!({
            "review_threshold": threshold,
            "total": st.store.review_queue_len(&tenant)?,
            "items": items,
            "next_cursor": next,
        }))
        .into_response())
    })
    .await
}

/// Accept the suggested archetype (empty body) or pick another (`{"archetype_id": …}`):
/// either way a person decided, so it becomes an override and leaves the queue. With
/// `{"expected_archetype_id": …}`, the suggestion is accepted only while it is still the
/// one the reviewer was shown.
async fn accept_review(
    State(st): St,
    headers: HeaderMap,
    Path(user_id): Path<String>,
    p: Params,
    body: Body,
) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Write, p, &[])?;
    let body = read_body(&st, &headers, body).await?;
    // No body (or whitespace), `{}` and `{"archetype_id": null}` all accept the
    // suggestion (the OpenAPI document makes the field optional).
    let (chosen, expected) = match json_body(&headers, &body)? {
        None => (None, None),
        Some(v) => accept_fields(&v)?,
    };
    let user = find_user_async(&st, &caller.tenant, &user_id).await?;
    check_override(
        &st,
        &caller,
        OverrideIntent::Set(chosen.as_deref()),
        Some(&user.id),
    )?;
    // A suggestion is always an archetype of the bundle: one outside it is a typo, which
    // a 409 would pass off as a change to read again and retry.
    if let Some(e) = &expected
        && tenant_of(&st, &caller.tenant)?
            .policy()
            .is_some_and(|p| !p.has_archetype(e))
    {
        return Err(ApiError::InvalidArchetype(e.clone()));
    }
    // Accepting resolves a queue item; a user decided with confidence, or already
    // resolved (a second click on a stale page, another reviewer first), is no item,
    // and an override of them is a PATCH on purpose rather than a side effect of
    // reviewing. The store checks that, and takes the suggestion, as it writes.
    let change = match chosen {
        Some(a) => OverrideChange::Set(a),
        None => OverrideChange::AcceptSuggestion { expected },
    };
    let rules = OverrideRules {
        only_review_items: true,
        ..OVERRIDE_RULES
    };
    let a = st
        .store
        .change_override(
            &caller.tenant,
            &user.id,
            change,
            rules,
            &caller.principal.actor(),
        )
        .await
        .map_err(|e| match e {
            StoreError::OverrideRefused(OverrideRefusal::NotInReview(_)) => {
                ApiError::NotInReview(user_id.clone())
            }
            other => other.into(),
        })?;
    let name = text(user.doc.get("userName")).unwrap_or_default();
    Ok(Json(assignment_reply(&name, &a)).into_response())
}

// ---------------------------------------------------------------------------------------
// Governance events

fn parse_time(p: &HashMap<String, String>, key: &str) -> ApiResult<Option<DateTime<Utc>>> {
    p.get(key)
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| ApiError::BadRequest(format!("{key} must be an RFC 3339 time")))
        })
        .transpose()
}

async fn list_events(State(st): St, headers: HeaderMap, p: Params) -> ApiResult<Response> {
    let (caller, p) = admit(
        &st,
        &headers,
        Scope::Read,
        p,
        &["user_id", "kind", "since", "until", "limit", "after"],
    )?;
    let limit = parse_limit(&p)?;
    let after_seq = match p.get("after") {
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| ApiError::BadRequest("after must be an event seq".into()))?,
        None => 0,
    };
    let (since, until) = (parse_time(&p, "since")?, parse_time(&p, "until")?);
    if let (Some(s), Some(u)) = (since, until)
        && s > u
    {
        return Err(ApiError::BadRequest(format!(
            "since ({}) is after until ({}): no event could match",
            p["since"], p["until"]
        )));
    }
    // A misspelt kind would otherwise read as "no such events" to an auditor.
    if let Some(k) = p.get("kind")
        && !EVENT_KINDS.contains(&k.as_str())
    {
        return Err(ApiError::BadRequest(format!(
            "kind {k:?} is not an event kind; one of {}",
            EVENT_KINDS.join(", ")
        )));
    }
    // An empty user_id (or `user:` and nothing) names no one: 400, as an empty group,
    // archetype or manager_user_id is; a 404 read as "no such user".
    if p.get("user_id")
        .is_some_and(|u| u.strip_prefix("user:").unwrap_or(u).trim().is_empty())
    {
        return Err(ApiError::BadRequest(
            "user_id is empty; name a user by user:<userName> or by SCIM id".to_owned(),
        ));
    }
    let tenant = caller.tenant;
    blocking(move || {
        let user = match p.get("user_id") {
            // A deleted user's history stays reachable: by the userName they had, and by
            // the SCIM id the events carry. An id this tenant never had events for is
            // still not found.
            Some(u) => match find_user(&st.store, &tenant, u) {
                Ok(r) => Some(r.id),
                Err(ApiError::NotFound(m)) if u.starts_with("user:") => Some(
                    st.store
                        .departed_user(&tenant, &u["user:".len()..])?
                        .ok_or(ApiError::NotFound(m))?,
                ),
                Err(ApiError::NotFound(m)) if uuid::Uuid::try_parse(u).is_ok() => {
                    let u = &canonical_id(u).into_owned();
                    let any = EventQuery {
                        user: Some(u.clone()),
                        kind: None,
                        since: None,
                        until: None,
                        after_seq: 0,
                        limit: 1,
                    };
                    if st.store.governance_events(&tenant, &any)?.is_empty() {
                        return Err(ApiError::NotFound(m));
                    }
                    Some(u.clone())
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        let q = EventQuery {
            user,
            kind: p.get("kind").cloned(),
            since,
            until,
            after_seq,
            // One more than the page, to know whether another page follows.
            limit: limit + 1,
        };
        let mut events = st.store.governance_events(&tenant, &q)?;
        let more = events.len() > limit;
        events.truncate(limit);
        let mut names: BTreeMap<String, String> = BTreeMap::new();
        let mut out = Vec::with_capacity(events.len());
        for e in &events {
            if !names.contains_key(&e.user) {
                let name = match st.store.get(&tenant, ResourceKind::User, &e.user)? {
                    Some(r) => text(r.doc.get("userName")),
                    None => st.store.departed_name(&tenant, &e.user)?,
                };
                let n = name
                    .map(|n| format!("user:{n}"))
                    .unwrap_or_else(|| e.user.clone());
                names.insert(e.user.clone(), n);
            }
            out.push(json!({
                "seq": e.seq,
                "at": e.at,
                "kind": e.kind,
                "user_id": names.get(&e.user),
                "scim_id": e.user,
                "actor": e.actor,
                "before": e.before.as_ref().map(assignment_state),
                "after": e.after.as_ref().map(assignment_state),
            }));
        }
        let next = more.then(|| events.last().map(|e| e.seq)).flatten();
        Ok(Json(json!({"events": out, "next_after": next})).into_response())
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Sync jobs

pub(super) fn job_json(j: &Job) -> Value {
    let mut v = json!({
        "job_id": j.job_id,
        "kind": j.kind,
        "status": j.status,
        "started_at": j.started_at,
        "finished_at": j.finished_at,
        "counts": j.counts,
        "error": j.error,
    });
    if j.full {
        v["full"] = json!(true);
    }
    if let Some(c) = &j.connector {
        v["connector"] = json!(c);
    }
    v
}

/// `POST /scim:sync`: start the reconcile job (202 with the job). With
/// `{"dry_run": true}` nothing is started: the answer (200) lists, per connector, what
/// reconciliation would send. `{"full": true}` sends every object again; `{"connector":
/// NAME}` reconciles that connector alone.
async fn start_sync(
    State(st): St,
    headers: HeaderMap,
    p: Params,
    body: Body,
) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Write, p, &[])?;
    let body = read_body(&st, &headers, body).await?;
    const EXPECTED: &str =
        "expected {\"dry_run\": true|false, \"full\": true|false, \"connector\": \"NAME\"}";
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct SyncBody {
        #[serde(default)]
        dry_run: bool,
        #[serde(default)]
        full: bool,
        #[serde(default)]
        connector: Option<String>,
    }
    let SyncBody {
        dry_run,
        full,
        connector,
    } = super::options_body(&headers, &body, EXPECTED)?;
    let only = connector.as_deref();
    if dry_run {
        let _one = st
            .roster
            .tenants
            .get(&caller.tenant)
            .map(|r| {
                r.dry_run.try_lock().map_err(|_| {
                    // A name the tenant has no connector of is the answer to give first.
                    match only.map(|name| {
                        st.dispatch.loaded_connector_status(
                            &caller.tenant,
                            name,
                            "a reconciliation",
                        )
                    }) {
                        Some(Err(e)) => ApiError::from(e),
                        _ => ApiError::DryRunInProgress,
                    }
                })
            })
            .transpose()?;
        let mode = ReconcileMode { dry_run, full };
        let reports = st.dispatch.reconcile(&caller.tenant, mode, only).await?;
        return Ok(
            Json(json!({"dry_run": true, "full": full, "connectors": reports})).into_response(),
        );
    }
    // Named, it must be one of the tenant's, and on: a typo, or a connector switched
    // off, would otherwise start a job that reconciles nothing and succeeds.
    if let Some(name) = only
        && !st
            .dispatch
            .loaded_connector_status(&caller.tenant, name, "a reconciliation")?
            .enabled
    {
        return Err(ApiError::Conflict(format!(
            "connector {name:?} is disabled (`enabled = false` in its file): nothing to reconcile; enable it and reload first"
        )));
    }
    let job = crate::schedule::start_reconcile(st.clone(), &caller.tenant, "scim_sync", full, only)
        .await
        .map_err(|e| match ApiError::from(e) {
            ApiError::SyncInProgress(None) => sync_in_progress(&st, &caller.tenant),
            other => other,
        })?;
    Ok((StatusCode::ACCEPTED, Json(job_json(&job))).into_response())
}

async fn get_job(
    State(st): St,
    headers: HeaderMap,
    Path(job_id): Path<String>,
    p: Params,
) -> ApiResult<Response> {
    let (caller, _) = admit(&st, &headers, Scope::Read, p, &[])?;
    let job = st
        .store
        .job(&caller.tenant, &job_id)?
        .ok_or_else(|| ApiError::NotFound(format!("job {job_id:?} not found")))?;
    Ok(Json(job_json(&job)).into_response())
}
