//! A OneRoster 1.2 rostering server for integration tests and benchmarks: a real HTTP target
//! on `127.0.0.1:0` for rosterd's OneRoster connector, enforcing the write rules of
//! `oneroster-rostering-api.txt` (wrapped PUT bodies, required fields, existing references,
//! soft delete, course cascade protection, ownership) and the 1.2 list conventions.
//!
//! Include it with `#[path = "../support/oneroster.rs"] mod oneroster;`.
//!
//! Answers the connector must expect:
//! - 400 `invaliddata`: body not JSON, not wrapped (`{"user": {…}}`), path/body `sourcedId`
//!   mismatch, a missing/empty/mistyped required field, a value outside its enumeration
//!   (`status`, `classType`, enrollment `role`, user `roles[].role`/`roleType`,
//!   `enabledUser`/`primary` not the *string* `"true"`/`"false"`), a `dateLastModified` that
//!   is not RFC 3339. Lists: 400 `invalid_filter_field` for a malformed `filter`,
//!   `invalid_selection_field` for a bad `limit`/`offset`, `invalid_sort_field` for `orderBy`.
//! - 415 when a PUT's `Content-Type` is not JSON.
//! - 422 `unknownobject`: a reference (`roles[].org`, `primaryOrg`, course/class `org`,
//!   class `course`, enrollment `user`/`class`) names an object that does not exist, or — when
//!   the written object is `active` — one whose status is `tobedeleted`.
//! - 401 `unauthorisedrequest` (+ `WWW-Authenticate: Bearer`) for a missing, unknown, revoked
//!   or expired token; 403 `forbidden` for PUT/DELETE of an object marked owned by another
//!   client (DELETE also looks up the class → course chain); 404 `unknownobject` for a
//!   missing object; 405 for writes to `orgs`; 409 `{"error":"Cannot delete course with
//!   active enrollments"}`.
//! - PUT: 201 `{"status":"created","sourcedId":…}` or 200 `{"status":"updated",…}`; the
//!   body's `dateLastModified` is kept as sent. DELETE: 204, sets `status` to `tobedeleted`
//!   and `dateLastModified` to now; a second DELETE of the same object is 204 again.
//! - GET one answers the wrapped object (`{"user": {…}}`), soft-deleted ones included.
//!   Lists answer `{"users": […], "offset", "limit", "total"}` + `X-Total-Count`, ordered by
//!   `sourcedId` unless `sort`/`orderBy` say otherwise; `limit` defaults to 100 and is clamped
//!   to `max_limit` (1000 by default; the answer's `limit` is the one applied).
//!   [`OneRosterServer::set_list_quirks`] makes lists misbehave as some servers do (ignore
//!   `offset`, leave out either total).
//!
//! Faults ([`Fault`]) are checked first, before authentication and routing, against every
//! request — the token endpoint included — unless narrowed with [`Fault::on_path`] /
//! [`Fault::on_method`].
#![allow(dead_code)]

// webhook.rs includes it as well, and a test binary may take either target or both.
#[allow(clippy::duplicate_mod)]
#[path = "kill.rs"]
mod kill;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use kill::{Conn, KillListener};
use serde_json::{Map, Value, json};
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// The path prefix of the OneRoster 1.2 rostering binding.
pub const DEFAULT_PREFIX: &str = "/ims/oneroster/rostering/v1p2";
/// The static bearer token accepted by default.
pub const DEFAULT_TOKEN: &str = "oneroster-static-test-token";
/// The OAuth2 client registered by default.
pub const DEFAULT_CLIENT_ID: &str = "rosterd-test-client";
/// The secret of [`DEFAULT_CLIENT_ID`].
pub const DEFAULT_CLIENT_SECRET: &str = "rosterd-test-client-secret";
/// The org seeded by default.
pub const DEFAULT_ORG: &str = "org-0001";

const MAX_BODY: usize = 16 * 1024 * 1024;
const USER_ROLES: &[&str] = &[
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
const ENROLLMENT_ROLES: &[&str] = &["administrator", "proctor", "student", "teacher"];
const CLASS_TYPES: &[&str] = &["scheduled", "homeroom"];
const STATUSES: &[&str] = &["active", "tobedeleted"];

/// The kinds of object the server holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Org,
    User,
    Course,
    Class,
    Enrollment,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 5] = [
        Kind::Org,
        Kind::User,
        Kind::Course,
        Kind::Class,
        Kind::Enrollment,
    ];

    /// The collection's path segment and list key: `users`, `classes`, …
    pub fn collection(self) -> &'static str {
        match self {
            Kind::Org => "orgs",
            Kind::User => "users",
            Kind::Course => "courses",
            Kind::Class => "classes",
            Kind::Enrollment => "enrollments",
        }
    }

    /// The wrapper key of a single object: `user`, `class`, …
    pub fn singular(self) -> &'static str {
        match self {
            Kind::Org => "org",
            Kind::User => "user",
            Kind::Course => "course",
            Kind::Class => "class",
            Kind::Enrollment => "enrollment",
        }
    }

    /// The kind whose collection segment is `segment`.
    pub fn from_collection(segment: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.collection() == segment)
    }

    fn idx(self) -> usize {
        self as usize
    }
}

/// How to start a [`OneRosterServer`].
#[derive(Clone, Debug)]
pub struct OneRosterOptions {
    /// Path prefix of the rostering endpoints (no trailing slash).
    pub prefix: String,
    /// A bearer token that is always accepted (not affected by [`OneRosterServer::revoke_tokens`]).
    pub static_token: Option<String>,
    /// `(client_id, client_secret)` pairs accepted by the token endpoint.
    pub oauth_clients: Vec<(String, String)>,
    /// The token endpoint takes the client's credentials only as HTTP Basic
    /// (`client_secret_basic`), as 1EdTech's security framework has it.
    pub basic_only: bool,
    /// Lifetime of issued tokens (`expires_in` is its whole seconds).
    pub token_ttl: Duration,
    /// Path of the OAuth2 client-credentials token endpoint (outside the prefix).
    pub token_path: String,
    /// sourcedIds of the orgs seeded at start (type `school`).
    pub orgs: Vec<String>,
    /// Largest `limit` a list honours.
    pub max_limit: usize,
    /// How many [`RequestRecord`]s are kept (oldest dropped first); counts are always complete.
    pub log_capacity: usize,
    /// Whether request records keep the request body.
    pub log_bodies: bool,
}

impl Default for OneRosterOptions {
    fn default() -> Self {
        OneRosterOptions {
            prefix: DEFAULT_PREFIX.to_string(),
            static_token: Some(DEFAULT_TOKEN.to_string()),
            oauth_clients: vec![(
                DEFAULT_CLIENT_ID.to_string(),
                DEFAULT_CLIENT_SECRET.to_string(),
            )],
            basic_only: false,
            token_ttl: Duration::from_secs(3600),
            token_path: "/oauth/token".to_string(),
            orgs: vec![DEFAULT_ORG.to_string()],
            max_limit: 1000,
            log_capacity: 10_000,
            log_bodies: true,
        }
    }
}

/// One object as the server holds it.
#[derive(Clone, Debug)]
pub struct Stored {
    /// The object (unwrapped), as last written.
    pub value: Value,
    /// When the last write (PUT or DELETE) from a client arrived.
    pub received_at: DateTime<Utc>,
    /// Marked with [`OneRosterServer::set_owner_other`]: client writes answer 403.
    pub owned_by_other: bool,
    /// Accepted client PUTs of this object.
    pub writes: u64,
}

impl Stored {
    /// The object's `status` (`active` when absent).
    pub fn status(&self) -> &str {
        self.value
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("active")
    }
}

/// What an injected fault does.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultKind {
    /// Answer this status (with an imsx error body) without processing the request.
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    /// Process the request normally, then hold the answer back for this long (the write is
    /// applied even if the client gives up waiting).
    Delay(Duration),
    /// Process the request normally, then hold the answer back until
    /// [`OneRosterServer::release_held`] (or a later injection of another such fault).
    Hold,
    /// Hold the request back, not yet processed, until [`OneRosterServer::release_held`]:
    /// a target that applies concurrent requests in another order than they came.
    Stall,
    /// Close the connection without answering; the request is not processed.
    Drop,
    /// Answer this status and body, as given, without processing the request.
    Answer { status: u16, body: String },
}

/// A fault applied to the next `times` requests that match its filters.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub kind: FaultKind,
    /// How many more requests it applies to (`usize::MAX`: until cleared).
    pub times: usize,
    /// Only requests whose path contains this.
    pub path_contains: Option<String>,
    /// Only requests with this method (e.g. `"PUT"`).
    pub method: Option<String>,
}

impl Fault {
    fn new(kind: FaultKind, times: usize) -> Fault {
        Fault {
            kind,
            times,
            path_contains: None,
            method: None,
        }
    }

    /// Answer `status` to the next `times` requests.
    pub fn status(status: u16, times: usize) -> Fault {
        Fault::new(
            FaultKind::Status {
                status,
                retry_after: None,
            },
            times,
        )
    }

    /// Answer 429 with `Retry-After: retry_after` to the next `times` requests.
    pub fn rate_limited(times: usize, retry_after: impl Into<String>) -> Fault {
        Fault::status(429, times).with_retry_after(retry_after)
    }

    /// Answer the next `times` requests with `status` and `body` (JSON), whatever they ask.
    pub fn answer(status: u16, body: impl Into<String>, times: usize) -> Fault {
        Fault::new(
            FaultKind::Answer {
                status,
                body: body.into(),
            },
            times,
        )
    }

    /// Hold back the answers to the next `times` requests for `delay`.
    pub fn delay(delay: Duration, times: usize) -> Fault {
        Fault::new(FaultKind::Delay(delay), times)
    }

    /// Hold back the answers to the next `times` requests until
    /// [`OneRosterServer::release_held`]: a client kept waiting for exactly as long as a
    /// test needs, however slow the machine.
    pub fn held(times: usize) -> Fault {
        Fault::new(FaultKind::Hold, times)
    }

    /// Hold the next `times` requests back before processing them, until
    /// [`OneRosterServer::release_held`]: requests that came later are applied first.
    pub fn stalled(times: usize) -> Fault {
        Fault::new(FaultKind::Stall, times)
    }

    /// Close the connection of the next `times` requests without answering.
    pub fn drop_connection(times: usize) -> Fault {
        Fault::new(FaultKind::Drop, times)
    }

    /// Add a `Retry-After` header (seconds or HTTP date) to a status fault.
    pub fn with_retry_after(mut self, value: impl Into<String>) -> Fault {
        if let FaultKind::Status { retry_after, .. } = &mut self.kind {
            *retry_after = Some(value.into());
        }
        self
    }

    /// Only apply to requests whose path contains `needle`.
    pub fn on_path(mut self, needle: impl Into<String>) -> Fault {
        self.path_contains = Some(needle.into());
        self
    }

    /// Only apply to requests with this method.
    pub fn on_method(mut self, method: impl Into<String>) -> Fault {
        self.method = Some(method.into().to_ascii_uppercase());
        self
    }

    /// Apply until [`OneRosterServer::clear_faults`].
    pub fn forever(mut self) -> Fault {
        self.times = usize::MAX;
        self
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        self.times > 0
            && self
                .path_contains
                .as_deref()
                .is_none_or(|n| path.contains(n))
            && self.method.as_deref().is_none_or(|m| m == method.as_str())
    }
}

/// Ways a list answer departs from the 1.2 conventions, as some servers' do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListQuirks {
    /// Answer every page from the start, whatever `offset` asks for.
    pub ignore_offset: bool,
    /// Leave `total` out of the body (the `X-Total-Count` header still carries it).
    pub no_body_total: bool,
    /// Leave out the `X-Total-Count` header.
    pub no_total_header: bool,
}

/// One request the server received.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// 1-based arrival order.
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub method: String,
    /// Path without the query.
    pub path: String,
    pub query: Option<String>,
    /// The status answered; `None` when the connection was dropped.
    pub status: Option<u16>,
    /// `"status"`, `"delay"`, `"hold"` or `"drop"` when a fault applied.
    pub fault: Option<&'static str>,
    /// The request body (when `log_bodies` is on and the body is not empty).
    pub body: Option<Bytes>,
}

impl RequestRecord {
    /// The body parsed as JSON.
    pub fn json(&self) -> Option<Value> {
        self.body
            .as_ref()
            .and_then(|b| serde_json::from_slice(b).ok())
    }
}

/// Key of the request counters: method, resource (`users`, `courses`, `classes`,
/// `enrollments`, `orgs`, `token` or `other`) and status answered (0 = dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountKey {
    pub method: &'static str,
    pub resource: &'static str,
    pub status: u16,
}

#[derive(Default)]
struct Db {
    maps: [BTreeMap<String, Stored>; 5],
}

impl Db {
    fn map(&self, kind: Kind) -> &BTreeMap<String, Stored> {
        &self.maps[kind.idx()]
    }

    fn map_mut(&mut self, kind: Kind) -> &mut BTreeMap<String, Stored> {
        &mut self.maps[kind.idx()]
    }
}

#[derive(Default)]
struct Log {
    seq: u64,
    entries: VecDeque<RequestRecord>,
    counts: HashMap<CountKey, u64>,
}

struct Shared {
    prefix: String,
    token_path: String,
    static_token: Mutex<Option<String>>,
    clients: Vec<(String, String)>,
    basic_only: bool,
    token_ttl: Duration,
    max_limit: usize,
    log_capacity: usize,
    log_bodies: AtomicBool,
    db: Mutex<Db>,
    tokens: Mutex<HashMap<String, Instant>>,
    tokens_issued: AtomicU64,
    /// How many of the next tokens issued the API then refuses (a token endpoint and an
    /// API out of step: a key rotated on one side first).
    dead_tokens: AtomicU64,
    /// Requests being answered now, and the most at once since the last reset.
    in_flight: AtomicU64,
    most_in_flight: AtomicU64,
    faults: Mutex<Vec<Fault>>,
    faults_applied: AtomicU64,
    /// Whether answers held by [`FaultKind::Hold`], and requests by [`FaultKind::Stall`],
    /// may go.
    released: tokio::sync::watch::Sender<bool>,
    list_quirks: Mutex<ListQuirks>,
    log: Mutex<Log>,
    notify: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Now as `2026-01-15T08:30:00.123Z`.
pub fn now_iso() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn org_object(id: &str, name: &str, org_type: &str) -> Value {
    json!({
        "sourcedId": id,
        "status": "active",
        "dateLastModified": now_iso(),
        "name": name,
        "type": org_type,
        "identifier": id,
    })
}

/// A running OneRoster server; stops when dropped (or with [`OneRosterServer::shutdown`]).
pub struct OneRosterServer {
    /// The bound address (`127.0.0.1:port`).
    pub addr: SocketAddr,
    /// `http://127.0.0.1:port` followed by the prefix.
    pub base_url: String,
    /// `http://127.0.0.1:port`.
    pub root_url: String,
    /// The token endpoint's URL.
    pub token_url: String,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl OneRosterServer {
    /// Bind `127.0.0.1:0` and serve; panics when the socket cannot be bound.
    pub async fn start(opts: OneRosterOptions) -> OneRosterServer {
        match Self::try_start(opts).await {
            Ok(s) => s,
            Err(e) => panic!("cannot start the OneRoster test server: {e}"),
        }
    }

    /// Bind `127.0.0.1:0` and serve.
    pub async fn try_start(opts: OneRosterOptions) -> io::Result<OneRosterServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let prefix = opts.prefix.trim_end_matches('/').to_string();
        let mut db = Db::default();
        for (i, id) in opts.orgs.iter().enumerate() {
            db.map_mut(Kind::Org).insert(
                id.clone(),
                Stored {
                    value: org_object(id, &format!("School {}", i + 1), "school"),
                    received_at: Utc::now(),
                    owned_by_other: false,
                    writes: 0,
                },
            );
        }
        let shared = Arc::new(Shared {
            prefix: prefix.clone(),
            token_path: opts.token_path.clone(),
            static_token: Mutex::new(opts.static_token),
            clients: opts.oauth_clients,
            basic_only: opts.basic_only,
            token_ttl: opts.token_ttl,
            max_limit: opts.max_limit.max(1),
            log_capacity: opts.log_capacity,
            log_bodies: AtomicBool::new(opts.log_bodies),
            db: Mutex::new(db),
            tokens: Mutex::new(HashMap::new()),
            tokens_issued: AtomicU64::new(0),
            dead_tokens: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            most_in_flight: AtomicU64::new(0),
            faults: Mutex::new(Vec::new()),
            faults_applied: AtomicU64::new(0),
            released: tokio::sync::watch::Sender::new(false),
            list_quirks: Mutex::new(ListQuirks::default()),
            log: Mutex::new(Log::default()),
            notify: Notify::new(),
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(shared.clone())
            .into_make_service_with_connect_info::<Conn>();
        let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let signal = async move {
                let _ = shutdown_rx.wait_for(|stop| *stop).await;
            };
            let _ = axum::serve(KillListener(listener), app)
                .with_graceful_shutdown(signal)
                .await;
        });
        let root_url = format!("http://{addr}");
        Ok(OneRosterServer {
            addr,
            base_url: format!("{root_url}{prefix}"),
            token_url: format!("{root_url}{}", opts.token_path),
            root_url,
            shared,
            shutdown_tx,
            task: Mutex::new(Some(task)),
        })
    }

    /// The URL of a collection (`"users"`) or of a path below the prefix (`"users/u1"`).
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base_url, path.trim_start_matches('/'))
    }

    /// Stop accepting connections and close the open ones (in-flight delayed answers get at
    /// most two seconds). Later connection attempts are refused.
    pub async fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
        let task = lock(&self.task).take();
        if let Some(mut task) = task
            && tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }

    // ---- state ----

    /// Every object of a kind, by sourcedId.
    pub fn objects(&self, kind: Kind) -> BTreeMap<String, Value> {
        lock(&self.shared.db)
            .map(kind)
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect()
    }

    /// Every user, by sourcedId.
    pub fn users(&self) -> BTreeMap<String, Value> {
        self.objects(Kind::User)
    }

    /// Every course, by sourcedId.
    pub fn courses(&self) -> BTreeMap<String, Value> {
        self.objects(Kind::Course)
    }

    /// Every class, by sourcedId.
    pub fn classes(&self) -> BTreeMap<String, Value> {
        self.objects(Kind::Class)
    }

    /// Every enrollment, by sourcedId.
    pub fn enrollments(&self) -> BTreeMap<String, Value> {
        self.objects(Kind::Enrollment)
    }

    /// Every org, by sourcedId.
    pub fn orgs(&self) -> BTreeMap<String, Value> {
        self.objects(Kind::Org)
    }

    /// One object (unwrapped).
    pub fn get(&self, kind: Kind, id: &str) -> Option<Value> {
        lock(&self.shared.db)
            .map(kind)
            .get(id)
            .map(|s| s.value.clone())
    }

    /// One user (unwrapped).
    pub fn user(&self, id: &str) -> Option<Value> {
        self.get(Kind::User, id)
    }

    /// One object with its bookkeeping (`received_at`, `writes`, ownership).
    pub fn stored(&self, kind: Kind, id: &str) -> Option<Stored> {
        lock(&self.shared.db).map(kind).get(id).cloned()
    }

    /// How many objects of a kind exist (any status).
    pub fn count(&self, kind: Kind) -> usize {
        lock(&self.shared.db).map(kind).len()
    }

    /// How many objects of a kind have status `active`.
    pub fn count_active(&self, kind: Kind) -> usize {
        lock(&self.shared.db)
            .map(kind)
            .values()
            .filter(|s| s.status() == "active")
            .count()
    }

    /// Seed an org (any `org_type`: school, district, …).
    pub fn add_org(&self, id: &str, name: &str, org_type: &str) {
        self.insert(Kind::Org, org_object(id, name, org_type));
    }

    /// Put an object in place behind the client's back, unvalidated and as given (it needs a
    /// string `sourcedId`). Returns false when it has none.
    pub fn insert(&self, kind: Kind, value: Value) -> bool {
        let Some(id) = value.get("sourcedId").and_then(Value::as_str) else {
            return false;
        };
        let id = id.to_string();
        lock(&self.shared.db).map_mut(kind).insert(
            id,
            Stored {
                value,
                received_at: Utc::now(),
                owned_by_other: false,
                writes: 0,
            },
        );
        self.shared.notify.notify_waiters();
        true
    }

    /// Edit an object behind the client's back: `edit` changes the value, then its
    /// `dateLastModified` is set to now. Returns false when it does not exist.
    pub fn tamper(&self, kind: Kind, id: &str, edit: impl FnOnce(&mut Value)) -> bool {
        let found = {
            let mut db = lock(&self.shared.db);
            match db.map_mut(kind).get_mut(id) {
                Some(st) => {
                    edit(&mut st.value);
                    if let Value::Object(m) = &mut st.value {
                        m.insert("dateLastModified".into(), Value::String(now_iso()));
                    }
                    true
                }
                None => false,
            }
        };
        self.shared.notify.notify_waiters();
        found
    }

    /// [`OneRosterServer::tamper`] on a user.
    pub fn tamper_user(&self, id: &str, edit: impl FnOnce(&mut Value)) -> bool {
        self.tamper(Kind::User, id, edit)
    }

    /// Delete an object outright (no soft delete). Returns false when it did not exist.
    pub fn remove(&self, kind: Kind, id: &str) -> bool {
        let found = lock(&self.shared.db).map_mut(kind).remove(id).is_some();
        self.shared.notify.notify_waiters();
        found
    }

    /// Delete every object of `kinds` outright: a target that lost its data.
    pub fn remove_all(&self, kinds: &[Kind]) {
        for &k in kinds {
            for id in self.objects(k).keys() {
                assert!(self.remove(k, id), "{k:?} {id} went away meanwhile");
            }
        }
    }

    /// Mark an object as owned by another client: PUT and DELETE of it (and DELETE of the
    /// classes/enrollments under it) answer 403. Returns false when it does not exist.
    pub fn set_owner_other(&self, kind: Kind, id: &str) -> bool {
        self.set_owned(kind, id, true)
    }

    /// Undo [`OneRosterServer::set_owner_other`].
    pub fn clear_owner(&self, kind: Kind, id: &str) -> bool {
        self.set_owned(kind, id, false)
    }

    fn set_owned(&self, kind: Kind, id: &str, other: bool) -> bool {
        match lock(&self.shared.db).map_mut(kind).get_mut(id) {
            Some(st) => {
                st.owned_by_other = other;
                true
            }
            None => false,
        }
    }

    // ---- auth ----

    /// Invalidate every token issued so far (the static token stays valid).
    pub fn revoke_tokens(&self) {
        lock(&self.shared.tokens).clear();
    }

    /// Replace (or remove) the static token.
    pub fn set_static_token(&self, token: Option<String>) {
        *lock(&self.shared.static_token) = token;
    }

    /// The next `n` tokens issued are refused by the API (401) from the start.
    pub fn issue_dead_tokens(&self, n: u64) {
        self.shared.dead_tokens.store(n, Ordering::Relaxed);
    }

    /// The most requests it was answering at once since the last
    /// [`OneRosterServer::reset_most_in_flight`] (or its start).
    pub fn most_in_flight(&self) -> u64 {
        self.shared.most_in_flight.load(Ordering::Relaxed)
    }

    pub fn reset_most_in_flight(&self) {
        self.shared.most_in_flight.store(0, Ordering::Relaxed);
    }

    /// How many tokens the token endpoint has issued.
    pub fn tokens_issued(&self) -> u64 {
        self.shared.tokens_issued.load(Ordering::Relaxed)
    }

    // ---- list quirks ----

    /// Make lists misbehave the way some real servers do (see [`ListQuirks`]).
    pub fn set_list_quirks(&self, quirks: ListQuirks) {
        *lock(&self.shared.list_quirks) = quirks;
    }

    // ---- faults ----

    /// Add a fault; it applies from the next request on. Faults are tried in the order added
    /// and the first matching one applies (and uses up one of its `times`).
    pub fn inject(&self, fault: Fault) {
        if matches!(fault.kind, FaultKind::Hold | FaultKind::Stall) {
            self.shared.released.send_replace(false);
        }
        lock(&self.shared.faults).push(fault);
    }

    /// Let the answers held by [`Fault::held`] go, and every later one it holds.
    pub fn release_held(&self) {
        self.shared.released.send_replace(true);
    }

    /// Remove every pending fault.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// Remove the pending faults that apply to `method` alone.
    pub fn remove_faults(&self, method: &str) {
        lock(&self.shared.faults).retain(|f| f.method.as_deref() != Some(method));
    }

    /// How many fault applications are still pending (`usize::MAX` saturates).
    pub fn pending_faults(&self) -> usize {
        lock(&self.shared.faults)
            .iter()
            .fold(0usize, |n, f| n.saturating_add(f.times))
    }

    /// How many requests a fault has applied to.
    pub fn faults_applied(&self) -> u64 {
        self.shared.faults_applied.load(Ordering::Relaxed)
    }

    // ---- request log ----

    /// The retained request records, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.log).entries.iter().cloned().collect()
    }

    /// Every request counter.
    pub fn request_counts(&self) -> BTreeMap<CountKey, u64> {
        lock(&self.shared.log)
            .counts
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    /// How many requests arrived (all of them, whatever `log_capacity`).
    pub fn request_total(&self) -> u64 {
        lock(&self.shared.log).seq
    }

    /// How many requests with this method (`"*"`: any) went to this resource (`"users"`,
    /// `"token"`, …; `"*"`: any), whatever their answer.
    pub fn count_requests(&self, method: &str, resource: &str) -> u64 {
        lock(&self.shared.log)
            .counts
            .iter()
            .filter(|(k, _)| {
                (method == "*" || k.method.eq_ignore_ascii_case(method))
                    && (resource == "*" || k.resource == resource)
            })
            .map(|(_, v)| *v)
            .sum()
    }

    /// How many requests were answered with `status` (0: dropped connections).
    pub fn count_status(&self, status: u16) -> u64 {
        lock(&self.shared.log)
            .counts
            .iter()
            .filter(|(k, _)| k.status == status)
            .map(|(_, v)| *v)
            .sum()
    }

    /// Forget the request records and counters.
    pub fn clear_requests(&self) {
        let mut log = lock(&self.shared.log);
        log.entries.clear();
        log.counts.clear();
    }

    /// Turn keeping request bodies on or off.
    pub fn set_log_bodies(&self, on: bool) {
        self.shared.log_bodies.store(on, Ordering::Relaxed);
    }

    /// Wait until `pred` holds (checked on every request and state change, and every 50 ms),
    /// at most `timeout`. Returns whether it held.
    pub async fn wait_until(&self, mut pred: impl FnMut(&Self) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pred(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let step = (deadline - now).min(Duration::from_millis(50));
            let _ = tokio::time::timeout(step, notified).await;
        }
    }
}

impl Drop for OneRosterServer {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
    }
}

// ---------------------------------------------------------------------------------------
// Request handling.

fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

impl Shared {
    fn resource_of(&self, path: &str) -> &'static str {
        if path == self.token_path {
            return "token";
        }
        path.strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(|rest| Kind::from_collection(rest.split('/').next().unwrap_or("")))
            .map_or("other", Kind::collection)
    }

    fn take_fault(&self, method: &Method, path: &str) -> Option<(FaultKind, &'static str)> {
        let mut faults = lock(&self.faults);
        if faults.is_empty() {
            return None;
        }
        let i = faults.iter().position(|f| f.matches(method, path))?;
        let fault = &mut faults[i];
        if fault.times != usize::MAX {
            fault.times -= 1;
        }
        let kind = fault.kind.clone();
        if fault.times == 0 {
            faults.remove(i);
        }
        drop(faults);
        self.faults_applied.fetch_add(1, Ordering::Relaxed);
        let label = match kind {
            FaultKind::Status { .. } => "status",
            FaultKind::Delay(_) => "delay",
            FaultKind::Hold => "hold",
            FaultKind::Stall => "stall",
            FaultKind::Drop => "drop",
            FaultKind::Answer { .. } => "answer",
        };
        Some((kind, label))
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        status: Option<u16>,
        body: &Bytes,
        resource: &'static str,
        fault: Option<&'static str>,
    ) {
        let keep_body = self.log_bodies.load(Ordering::Relaxed) && !body.is_empty();
        {
            let mut log = lock(&self.log);
            log.seq += 1;
            let key = CountKey {
                method: method_name(method),
                resource,
                status: status.unwrap_or(0),
            };
            *log.counts.entry(key).or_insert(0) += 1;
            if self.log_capacity > 0 {
                if log.entries.len() >= self.log_capacity {
                    log.entries.pop_front();
                }
                let seq = log.seq;
                log.entries.push_back(RequestRecord {
                    seq,
                    at: Utc::now(),
                    method: method.as_str().to_string(),
                    path: path.to_string(),
                    query: query.map(str::to_string),
                    status,
                    fault,
                    body: keep_body.then(|| body.clone()),
                });
            }
        }
        self.notify.notify_waiters();
    }
}

async fn handle(
    State(s): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    req: Request,
) -> Response {
    let _in_flight = InFlight::new(&s);
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query();
    let resource = s.resource_of(&path);
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            let r = imsx(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invaliddata",
                "request body too large or unreadable",
            );
            s.record(
                &parts.method,
                &path,
                query,
                Some(413),
                &Bytes::new(),
                resource,
                None,
            );
            return r;
        }
    };
    let fault = s.take_fault(&parts.method, &path);
    let label = fault.as_ref().map(|(_, l)| *l);
    let fault = fault.map(|(k, _)| k);
    if fault == Some(FaultKind::Stall) {
        let _ = s.released.subscribe().wait_for(|r| *r).await;
    }
    match fault {
        Some(FaultKind::Drop) => {
            conn.drop_connection();
            s.record(&parts.method, &path, query, None, &body, resource, label);
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Some(kind @ (FaultKind::Status { .. } | FaultKind::Answer { .. })) => {
            let r = match kind {
                FaultKind::Status {
                    status,
                    retry_after,
                } => {
                    let code =
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    let minor = match status {
                        429 | 503 => "server_busy",
                        _ => "internal_server_error",
                    };
                    let mut r = imsx(code, minor, format!("injected fault: {status}"));
                    if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                        r.headers_mut().insert(header::RETRY_AFTER, v);
                    }
                    r
                }
                FaultKind::Answer {
                    status,
                    body: answer,
                } => Response::builder()
                    .status(
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    )
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(answer))
                    .unwrap(),
                _ => unreachable!("matched above"),
            };
            s.record(
                &parts.method,
                &path,
                query,
                Some(r.status().as_u16()),
                &body,
                resource,
                label,
            );
            r
        }
        // Processed as usual; a delay or a hold only keeps the answer back.
        kind @ (Some(FaultKind::Delay(_) | FaultKind::Hold | FaultKind::Stall) | None) => {
            let r = process(&s, &parts.method, &path, query, &parts.headers, &body);
            s.record(
                &parts.method,
                &path,
                query,
                Some(r.status().as_u16()),
                &body,
                resource,
                label,
            );
            match kind {
                Some(FaultKind::Delay(d)) => tokio::time::sleep(d).await,
                Some(FaultKind::Hold) => {
                    let _ = s.released.subscribe().wait_for(|r| *r).await;
                }
                _ => {}
            }
            r
        }
    }
}

/// One request being answered, until dropped (also when the client goes away).
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn new(s: &'a Shared) -> Self {
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.most_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(s)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn json_resp(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// An imsx-style error answer.
fn imsx(status: StatusCode, minor: &str, description: impl Into<String>) -> Response {
    json_resp(
        status,
        &json!({
            "imsx_codeMajor": "failure",
            "imsx_severity": "error",
            "imsx_description": description.into(),
            "imsx_CodeMinor": {
                "imsx_codeMinorField": [{
                    "imsx_codeMinorFieldName": "TargetEndSystem",
                    "imsx_codeMinorFieldValue": minor,
                }]
            },
        }),
    )
}

fn method_not_allowed(allow: &'static str) -> Response {
    let mut r = imsx(
        StatusCode::METHOD_NOT_ALLOWED,
        "invaliddata",
        format!("method not allowed; allowed: {allow}"),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

fn process(
    s: &Shared,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    if path == s.token_path {
        return token_endpoint(s, method, headers, body);
    }
    let Some(rest) = path
        .strip_prefix(s.prefix.as_str())
        .and_then(|r| r.strip_prefix('/'))
    else {
        return imsx(StatusCode::NOT_FOUND, "unknownobject", "no such endpoint");
    };
    if let Some(r) = authorize(s, headers) {
        return r;
    }
    let segs: Vec<String> = rest.split('/').map(|p| pct_decode(p, false)).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let Some(kind) = segs.first().and_then(|c| Kind::from_collection(c)) else {
        return imsx(StatusCode::NOT_FOUND, "unknownobject", "no such collection");
    };
    match (segs.as_slice(), method) {
        ([_], &Method::GET) => list(s, kind, None, query),
        ([_], _) => method_not_allowed("GET"),
        ([_, id], &Method::GET) if !id.is_empty() => get_one(s, kind, id),
        ([_, _], _) if kind == Kind::Org => method_not_allowed("GET"),
        ([_, id], &Method::PUT) if !id.is_empty() => put(s, kind, id, headers, body),
        ([_, id], &Method::DELETE) if !id.is_empty() => delete(s, kind, id),
        ([_, id], _) if !id.is_empty() => method_not_allowed("GET, PUT, DELETE"),
        ([_, id, "enrollments"], &Method::GET) if kind == Kind::User || kind == Kind::Class => {
            if lock(&s.db).map(kind).get(*id).is_none() {
                return not_found(kind, id);
            }
            let field = kind.singular();
            list(s, Kind::Enrollment, Some((field, id)), query)
        }
        _ => imsx(StatusCode::NOT_FOUND, "unknownobject", "no such endpoint"),
    }
}

/// `None` when the request carries a valid token, else the 401 answer.
fn authorize(s: &Shared, headers: &HeaderMap) -> Option<Response> {
    let unauthorized = |msg: &str| {
        let mut r = imsx(StatusCode::UNAUTHORIZED, "unauthorisedrequest", msg);
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        r
    };
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Some(unauthorized("missing bearer token"));
    };
    let token = match value.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
        _ => return Some(unauthorized("authorization scheme must be Bearer")),
    };
    if lock(&s.static_token).as_deref() == Some(token) {
        return None;
    }
    let mut tokens = lock(&s.tokens);
    match tokens.get(token) {
        Some(exp) if *exp > Instant::now() => None,
        Some(_) => {
            tokens.remove(token);
            Some(unauthorized("token expired"))
        }
        None => Some(unauthorized("invalid token")),
    }
}

fn token_endpoint(s: &Shared, method: &Method, headers: &HeaderMap, body: &Bytes) -> Response {
    let oauth_err = |status: StatusCode, error: &str, desc: &str| {
        let mut r = json_resp(status, &json!({"error": error, "error_description": desc}));
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    };
    if method != Method::POST {
        let mut r = oauth_err(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "use POST",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return oauth_err(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "body must be application/x-www-form-urlencoded",
        );
    }
    let form = parse_urlencoded(&String::from_utf8_lossy(body));
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    match field("grant_type") {
        Some("client_credentials") => {}
        Some(_) => {
            return oauth_err(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only client_credentials is supported",
            );
        }
        None => {
            return oauth_err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "missing grant_type",
            );
        }
    }
    // client_secret_basic, else client_secret_post.
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .and_then(|(_, b64)| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|pair| {
            pair.split_once(':')
                .map(|(id, secret)| (pct_decode(id, true), pct_decode(secret, true)))
        });
    let creds = basic.or_else(|| {
        if s.basic_only {
            return None;
        }
        Some((
            field("client_id")?.to_string(),
            field("client_secret")?.to_string(),
        ))
    });
    let Some((id, secret)) = creds else {
        return oauth_err(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "missing client credentials",
        );
    };
    if !s.clients.iter().any(|(i, k)| *i == id && *k == secret) {
        let mut r = oauth_err(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "unknown client or wrong secret",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"oneroster\""),
        );
        return r;
    }
    let token = format!("ort_{}", uuid::Uuid::new_v4().simple());
    let dead = s
        .dead_tokens
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok();
    if !dead {
        lock(&s.tokens).insert(token.clone(), Instant::now() + s.token_ttl);
    }
    s.tokens_issued.fetch_add(1, Ordering::Relaxed);
    let mut answer = json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": s.token_ttl.as_secs(),
    });
    if let (Some(scope), Value::Object(m)) = (field("scope"), &mut answer) {
        m.insert("scope".into(), Value::String(scope.to_string()));
    }
    let mut r = json_resp(StatusCode::OK, &answer);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn not_found(kind: Kind, id: &str) -> Response {
    imsx(
        StatusCode::NOT_FOUND,
        "unknownobject",
        format!("{} '{id}' not found", kind.singular()),
    )
}

fn get_one(s: &Shared, kind: Kind, id: &str) -> Response {
    let value = lock(&s.db).map(kind).get(id).map(|st| st.value.clone());
    match value {
        Some(v) => {
            let mut m = Map::new();
            m.insert(kind.singular().to_string(), v);
            json_resp(StatusCode::OK, &Value::Object(m))
        }
        None => not_found(kind, id),
    }
}

fn ref_id<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get(field)?.get("sourcedId")?.as_str()
}

fn is_deleted(v: &Value) -> bool {
    v.get("status").and_then(Value::as_str) == Some("tobedeleted")
}

fn owned_by_other_chain(db: &Db, kind: Kind, id: &str) -> bool {
    let Some(st) = db.map(kind).get(id) else {
        return false;
    };
    if st.owned_by_other {
        return true;
    }
    match kind {
        Kind::Class => ref_id(&st.value, "course").is_some_and(|c| {
            db.map(Kind::Course)
                .get(c)
                .is_some_and(|c| c.owned_by_other)
        }),
        Kind::Enrollment => {
            ref_id(&st.value, "class").is_some_and(|c| owned_by_other_chain(db, Kind::Class, c))
        }
        _ => false,
    }
}

fn delete(s: &Shared, kind: Kind, id: &str) -> Response {
    let mut db = lock(&s.db);
    if db.map(kind).get(id).is_none() {
        return not_found(kind, id);
    }
    if owned_by_other_chain(&db, kind, id) {
        return imsx(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} '{id}' is not owned by your client application",
                kind.singular()
            ),
        );
    }
    if kind == Kind::Course {
        let classes: HashSet<&str> = db
            .map(Kind::Class)
            .iter()
            .filter(|(_, c)| ref_id(&c.value, "course") == Some(id))
            .map(|(k, _)| k.as_str())
            .collect();
        let active = !classes.is_empty()
            && db.map(Kind::Enrollment).values().any(|e| {
                !is_deleted(&e.value)
                    && ref_id(&e.value, "class").is_some_and(|c| classes.contains(c))
            });
        if active {
            return json_resp(
                StatusCode::CONFLICT,
                &json!({"error": "Cannot delete course with active enrollments"}),
            );
        }
    }
    if let Some(st) = db.map_mut(kind).get_mut(id)
        && !is_deleted(&st.value)
    {
        if let Value::Object(m) = &mut st.value {
            m.insert("status".into(), Value::String("tobedeleted".into()));
            m.insert("dateLastModified".into(), Value::String(now_iso()));
        }
        st.received_at = Utc::now();
    }
    drop(db);
    StatusCode::NO_CONTENT.into_response()
}

// ---- PUT validation ----

struct Reject {
    status: StatusCode,
    minor: &'static str,
    msg: String,
}

impl Reject {
    fn into_response(self) -> Response {
        imsx(self.status, self.minor, self.msg)
    }
}

fn bad(msg: impl Into<String>) -> Reject {
    Reject {
        status: StatusCode::BAD_REQUEST,
        minor: "invaliddata",
        msg: msg.into(),
    }
}

type Obj = Map<String, Value>;

fn req_str<'a>(o: &'a Obj, f: &str) -> Result<&'a str, Reject> {
    match o.get(f) {
        None | Some(Value::Null) => Err(bad(format!("missing required field '{f}'"))),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s),
        Some(Value::String(_)) => Err(bad(format!("field '{f}' must not be empty"))),
        Some(_) => Err(bad(format!("field '{f}' must be a string"))),
    }
}

fn opt_str(o: &Obj, f: &str) -> Result<(), Reject> {
    match o.get(f) {
        None | Some(Value::Null | Value::String(_)) => Ok(()),
        Some(_) => Err(bad(format!("field '{f}' must be a string"))),
    }
}

fn one_of(o: &Obj, f: &str, allowed: &[&str], required: bool) -> Result<(), Reject> {
    match o.get(f) {
        None | Some(Value::Null) if !required => Ok(()),
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(()),
        None | Some(Value::Null) => Err(bad(format!("missing required field '{f}'"))),
        Some(v) => Err(bad(format!(
            "field '{f}' is {v}; must be one of {}",
            allowed.join(", ")
        ))),
    }
}

fn opt_bool_str(o: &Obj, f: &str) -> Result<(), Reject> {
    match o.get(f) {
        None => Ok(()),
        Some(Value::String(s)) if s == "true" || s == "false" => Ok(()),
        Some(v) => Err(bad(format!(
            "field '{f}' is {v}; must be the string \"true\" or \"false\""
        ))),
    }
}

fn opt_str_array(o: &Obj, f: &str) -> Result<(), Reject> {
    match o.get(f) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => Ok(()),
        Some(_) => Err(bad(format!("field '{f}' must be an array of strings"))),
    }
}

fn req_ref<'a>(o: &'a Obj, f: &str, what: &str) -> Result<&'a str, Reject> {
    match o.get(f) {
        None | Some(Value::Null) => Err(bad(format!("missing required field '{what}'"))),
        Some(Value::Object(r)) => match r.get("sourcedId") {
            Some(Value::String(s)) if !s.is_empty() => Ok(s),
            _ => Err(bad(format!(
                "'{what}.sourcedId' must be a non-empty string"
            ))),
        },
        Some(_) => Err(bad(format!(
            "field '{what}' must be an object {{\"sourcedId\": …}}"
        ))),
    }
}

struct Ref {
    kind: Kind,
    id: String,
    field: String,
}

fn push_ref(refs: &mut Vec<Ref>, kind: Kind, id: &str, field: &str) {
    refs.push(Ref {
        kind,
        id: id.to_string(),
        field: field.to_string(),
    });
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(t.and_utc());
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// Shape checks of an unwrapped object; returns the references to check against the store.
fn validate(kind: Kind, o: &Obj) -> Result<Vec<Ref>, Reject> {
    one_of(o, "status", STATUSES, true)?;
    let dlm = req_str(o, "dateLastModified")?;
    if DateTime::parse_from_rfc3339(dlm).is_err() {
        return Err(bad(format!(
            "dateLastModified '{dlm}' is not an ISO 8601 date-time with offset"
        )));
    }
    match o.get("metadata") {
        None | Some(Value::Null | Value::Object(_)) => {}
        Some(_) => return Err(bad("field 'metadata' must be an object")),
    }
    let mut refs = Vec::new();
    match kind {
        Kind::Org => return Err(bad("orgs are read-only")),
        Kind::User => {
            opt_bool_str(o, "enabledUser")?;
            req_str(o, "givenName")?;
            req_str(o, "familyName")?;
            let email = req_str(o, "email")?;
            if !email.contains('@') {
                return Err(bad(format!("email '{email}' is not an email address")));
            }
            opt_str(o, "username")?;
            opt_str_array(o, "grades")?;
            let roles = match o.get("roles") {
                None | Some(Value::Null) => return Err(bad("missing required field 'roles'")),
                Some(Value::Array(a)) if a.is_empty() => {
                    return Err(bad("'roles' must have at least one entry"));
                }
                Some(Value::Array(a)) => a,
                Some(_) => return Err(bad("field 'roles' must be an array")),
            };
            for (i, r) in roles.iter().enumerate() {
                let Value::Object(r) = r else {
                    return Err(bad(format!("roles[{i}] must be an object")));
                };
                let role = req_str(r, "role").map_err(|e| bad(format!("roles[{i}]: {}", e.msg)))?;
                if !USER_ROLES.contains(&role) && !role.starts_with("ext:") {
                    return Err(bad(format!(
                        "roles[{i}].role '{role}' is not a OneRoster 1.2 role ({} or ext:…)",
                        USER_ROLES.join(", ")
                    )));
                }
                one_of(r, "roleType", &["primary", "secondary"], false)
                    .map_err(|e| bad(format!("roles[{i}]: {}", e.msg)))?;
                let field = format!("roles[{i}].org");
                let org = req_ref(r, "org", &field)?;
                push_ref(&mut refs, Kind::Org, org, &field);
            }
            if o.get("primaryOrg").is_some_and(|v| !v.is_null()) {
                let org = req_ref(o, "primaryOrg", "primaryOrg")?;
                push_ref(&mut refs, Kind::Org, org, "primaryOrg");
            }
        }
        Kind::Course => {
            req_str(o, "title")?;
            opt_str(o, "courseCode")?;
            opt_str_array(o, "subjects")?;
            opt_str_array(o, "grades")?;
            let org = req_ref(o, "org", "org")?;
            push_ref(&mut refs, Kind::Org, org, "org");
        }
        Kind::Class => {
            req_str(o, "title")?;
            opt_str(o, "classCode")?;
            one_of(o, "classType", CLASS_TYPES, true)?;
            let course = req_ref(o, "course", "course")?;
            push_ref(&mut refs, Kind::Course, course, "course");
            let org = req_ref(o, "org", "org")?;
            push_ref(&mut refs, Kind::Org, org, "org");
            match o.get("terms") {
                None | Some(Value::Null) => {}
                Some(Value::Array(a)) => {
                    for (i, t) in a.iter().enumerate() {
                        let ok = t.get("sourcedId").and_then(Value::as_str).is_some();
                        if !ok {
                            return Err(bad(format!(
                                "terms[{i}] must be an object {{\"sourcedId\": …}}"
                            )));
                        }
                    }
                }
                Some(_) => return Err(bad("field 'terms' must be an array")),
            }
        }
        Kind::Enrollment => {
            one_of(o, "role", ENROLLMENT_ROLES, true)?;
            opt_bool_str(o, "primary")?;
            opt_str(o, "beginDate")?;
            opt_str(o, "endDate")?;
            let user = req_ref(o, "user", "user")?;
            push_ref(&mut refs, Kind::User, user, "user");
            let class = req_ref(o, "class", "class")?;
            push_ref(&mut refs, Kind::Class, class, "class");
        }
    }
    Ok(refs)
}

fn put(s: &Shared, kind: Kind, id: &str, headers: &HeaderMap, body: &Bytes) -> Response {
    let json_ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"));
    if !json_ct {
        return imsx(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invaliddata",
            "Content-Type must be application/json",
        );
    }
    let wrapper = kind.singular();
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad(format!("body is not valid JSON: {e}")).into_response(),
    };
    let Value::Object(mut outer) = value else {
        return bad(format!(
            "body must be a JSON object {{\"{wrapper}\": {{…}}}}"
        ))
        .into_response();
    };
    let Some(inner) = outer.remove(wrapper) else {
        return bad(format!("body must be wrapped as {{\"{wrapper}\": {{…}}}}")).into_response();
    };
    let Value::Object(obj) = inner else {
        return bad(format!("'{wrapper}' must be an object")).into_response();
    };
    match obj.get("sourcedId") {
        Some(Value::String(b)) if b == id => {}
        Some(Value::String(b)) => {
            return bad(format!(
                "sourcedId in path ('{id}') does not match sourcedId in body ('{b}')"
            ))
            .into_response();
        }
        None | Some(Value::Null) => {
            return bad("missing required field 'sourcedId'").into_response();
        }
        Some(_) => return bad("field 'sourcedId' must be a string").into_response(),
    }
    let refs = match validate(kind, &obj) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let live = !is_deleted_obj(&obj);
    let created = {
        let mut db = lock(&s.db);
        let existing = db.map(kind).get(id);
        if existing.is_some_and(|st| st.owned_by_other) {
            return imsx(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{wrapper} '{id}' is not owned by your client application"),
            );
        }
        for r in &refs {
            match db.map(r.kind).get(&r.id) {
                None => {
                    return imsx(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "unknownobject",
                        format!(
                            "{} references unknown {} '{}'",
                            r.field,
                            r.kind.singular(),
                            r.id
                        ),
                    );
                }
                Some(st) if live && is_deleted(&st.value) => {
                    return imsx(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "unknownobject",
                        format!(
                            "{} references {} '{}', which is tobedeleted",
                            r.field,
                            r.kind.singular(),
                            r.id
                        ),
                    );
                }
                Some(_) => {}
            }
        }
        let now = Utc::now();
        match db.map_mut(kind).get_mut(id) {
            Some(st) => {
                st.value = Value::Object(obj);
                st.received_at = now;
                st.writes += 1;
                false
            }
            None => {
                db.map_mut(kind).insert(
                    id.to_string(),
                    Stored {
                        value: Value::Object(obj),
                        received_at: now,
                        owned_by_other: false,
                        writes: 1,
                    },
                );
                true
            }
        }
    };
    let (status, word) = if created {
        (StatusCode::CREATED, "created")
    } else {
        (StatusCode::OK, "updated")
    };
    json_resp(status, &json!({"status": word, "sourcedId": id}))
}

fn is_deleted_obj(o: &Obj) -> bool {
    o.get("status").and_then(Value::as_str) == Some("tobedeleted")
}

// ---- lists ----

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Contains,
}

#[derive(Debug)]
struct Cond {
    path: Vec<String>,
    op: Op,
    value: String,
}

/// `field op 'value'` terms joined by AND/OR (AND binds tighter); returns OR-ed AND-groups.
fn parse_filter(s: &str) -> Result<Vec<Vec<Cond>>, String> {
    let mut groups: Vec<Vec<Cond>> = vec![Vec::new()];
    let mut rest = s.trim();
    loop {
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_'))
            .unwrap_or(rest.len());
        if end == 0 {
            return Err(format!("expected a field name at '{rest}'"));
        }
        let field = &rest[..end];
        rest = rest[end..].trim_start();
        let (op, len) = if rest.starts_with("!=") {
            (Op::Ne, 2)
        } else if rest.starts_with(">=") {
            (Op::Ge, 2)
        } else if rest.starts_with("<=") {
            (Op::Le, 2)
        } else if rest.starts_with('>') {
            (Op::Gt, 1)
        } else if rest.starts_with('<') {
            (Op::Lt, 1)
        } else if rest.starts_with('=') {
            (Op::Eq, 1)
        } else if rest.starts_with('~') {
            (Op::Contains, 1)
        } else {
            return Err(format!("unsupported or missing operator after '{field}'"));
        };
        rest = rest[len..].trim_start();
        let Some(quoted) = rest.strip_prefix('\'') else {
            return Err(format!("the value for '{field}' must be in single quotes"));
        };
        let mut value = String::new();
        let mut close = None;
        let mut chars = quoted.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '\'' {
                if chars.peek().is_some_and(|(_, n)| *n == '\'') {
                    value.push('\'');
                    chars.next();
                } else {
                    close = Some(i + 1);
                    break;
                }
            } else {
                value.push(c);
            }
        }
        let Some(close) = close else {
            return Err(format!("unterminated value for '{field}'"));
        };
        rest = quoted[close..].trim_start();
        let cond = Cond {
            path: field.split('.').map(str::to_string).collect(),
            op,
            value,
        };
        if let Some(g) = groups.last_mut() {
            g.push(cond);
        }
        if rest.is_empty() {
            return Ok(groups);
        }
        if let Some(r) = strip_keyword(rest, "AND") {
            rest = r;
        } else if let Some(r) = strip_keyword(rest, "OR") {
            groups.push(Vec::new());
            rest = r;
        } else {
            return Err(format!("expected AND or OR at '{rest}'"));
        }
    }
}

fn strip_keyword<'a>(s: &'a str, kw: &str) -> Option<&'a str> {
    let head = s.get(..kw.len())?;
    let tail = &s[kw.len()..];
    (head.eq_ignore_ascii_case(kw) && tail.starts_with(char::is_whitespace))
        .then(|| tail.trim_start())
}

fn leaves<'a>(v: &'a Value, path: &[String], out: &mut Vec<&'a Value>) {
    match path.split_first() {
        None => match v {
            Value::Array(a) => out.extend(a.iter()),
            _ => out.push(v),
        },
        Some((head, tail)) => match v {
            Value::Object(m) => {
                if let Some(c) = m.get(head) {
                    leaves(c, tail, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|e| leaves(e, path, out)),
            _ => {}
        },
    }
}

fn leaf_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn compare(a: &str, b: &str) -> CmpOrdering {
    if let (Some(x), Some(y)) = (parse_time(a), parse_time(b)) {
        return x.cmp(&y);
    }
    if let (Ok(x), Ok(y)) = (a.parse::<f64>(), b.parse::<f64>()) {
        return x.partial_cmp(&y).unwrap_or(CmpOrdering::Equal);
    }
    a.cmp(b)
}

fn field_path(kind: Kind, cond_path: &[String]) -> Vec<String> {
    // On users, `role` means any of `roles[].role`.
    if kind == Kind::User && cond_path.len() == 1 && cond_path[0] == "role" {
        return vec!["roles".into(), "role".into()];
    }
    cond_path.to_vec()
}

fn cond_matches(kind: Kind, c: &Cond, v: &Value) -> bool {
    let mut found = Vec::new();
    leaves(v, &field_path(kind, &c.path), &mut found);
    let vals: Vec<String> = found.into_iter().filter_map(leaf_string).collect();
    let want = c.value.as_str();
    match c.op {
        Op::Eq => vals.iter().any(|x| x == want),
        Op::Ne => !vals.iter().any(|x| x == want),
        Op::Contains => {
            let w = want.to_lowercase();
            vals.iter().any(|x| x.to_lowercase().contains(&w))
        }
        Op::Gt => vals
            .iter()
            .any(|x| compare(x, want) == CmpOrdering::Greater),
        Op::Ge => vals.iter().any(|x| compare(x, want) != CmpOrdering::Less),
        Op::Lt => vals.iter().any(|x| compare(x, want) == CmpOrdering::Less),
        Op::Le => vals
            .iter()
            .any(|x| compare(x, want) != CmpOrdering::Greater),
    }
}

fn filter_matches(kind: Kind, f: &[Vec<Cond>], v: &Value) -> bool {
    f.iter()
        .any(|group| group.iter().all(|c| cond_matches(kind, c, v)))
}

fn sort_key(kind: Kind, v: &Value, path: &[String]) -> Option<String> {
    let mut found = Vec::new();
    leaves(v, &field_path(kind, path), &mut found);
    found.into_iter().find_map(leaf_string)
}

fn list(s: &Shared, kind: Kind, scope: Option<(&str, &str)>, query: Option<&str>) -> Response {
    let q = parse_urlencoded(query.unwrap_or(""));
    let param = |name: &str| {
        q.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let limit = match param("limit").map(str::parse::<usize>) {
        None => 100.min(s.max_limit),
        Some(Ok(n)) if n > 0 => n.min(s.max_limit),
        Some(_) => {
            return imsx(
                StatusCode::BAD_REQUEST,
                "invalid_selection_field",
                "limit must be a positive integer",
            );
        }
    };
    let quirks = *lock(&s.list_quirks);
    let offset = match param("offset").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(_)) if quirks.ignore_offset => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return imsx(
                StatusCode::BAD_REQUEST,
                "invalid_selection_field",
                "offset must be a non-negative integer",
            );
        }
    };
    let filter = match param("filter").filter(|f| !f.trim().is_empty()) {
        None => None,
        Some(f) => match parse_filter(f) {
            Ok(f) => Some(f),
            Err(e) => {
                return imsx(
                    StatusCode::BAD_REQUEST,
                    "invalid_filter_field",
                    format!("invalid filter: {e}"),
                );
            }
        },
    };
    let sort: Option<Vec<String>> = param("sort")
        .filter(|f| !f.is_empty())
        .map(|f| f.split('.').map(str::to_string).collect());
    let desc = match param("orderBy") {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => {
            return imsx(
                StatusCode::BAD_REQUEST,
                "invalid_sort_field",
                format!("orderBy '{o}' must be asc or desc"),
            );
        }
    };
    let fields: Option<Vec<&str>> = param("fields")
        .filter(|f| !f.is_empty())
        .map(|f| f.split(',').map(str::trim).collect());

    let (total, page) = {
        let db = lock(&s.db);
        let mut items: Vec<&Value> = db
            .map(kind)
            .values()
            .map(|st| &st.value)
            .filter(|v| scope.is_none_or(|(field, id)| ref_id(v, field) == Some(id)))
            .filter(|v| filter.as_deref().is_none_or(|f| filter_matches(kind, f, v)))
            .collect();
        if let Some(path) = &sort {
            items.sort_by(|a, b| {
                let (ka, kb) = (sort_key(kind, a, path), sort_key(kind, b, path));
                match (ka, kb) {
                    (Some(x), Some(y)) => compare(&x, &y),
                    (None, Some(_)) => CmpOrdering::Greater,
                    (Some(_), None) => CmpOrdering::Less,
                    (None, None) => CmpOrdering::Equal,
                }
            });
            if desc {
                items.reverse();
            }
        }
        let total = items.len();
        let page: Vec<Value> = items
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|v| match (&fields, v) {
                (Some(fs), Value::Object(m)) => Value::Object(
                    m.iter()
                        .filter(|(k, _)| fs.contains(&k.as_str()))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                ),
                _ => v.clone(),
            })
            .collect();
        (total, page)
    };
    let mut body = Map::new();
    body.insert(kind.collection().to_string(), Value::Array(page));
    body.insert("offset".into(), json!(offset));
    body.insert("limit".into(), json!(limit));
    if !quirks.no_body_total {
        body.insert("total".into(), json!(total));
    }
    let mut r = json_resp(StatusCode::OK, &Value::Object(body));
    if !quirks.no_total_header {
        r.headers_mut()
            .insert("x-total-count", HeaderValue::from(total));
    }
    r
}

// ---- URL encoding ----

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Percent-decode (and, in forms and queries, turn `+` into a space).
fn pct_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' => {
                let hi = b.get(i + 1).copied().and_then(hex_val);
                let lo = b.get(i + 2).copied().and_then(hex_val);
                if let (Some(h), Some(l)) = (hi, lo) {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_urlencoded(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (pct_decode(k, true), pct_decode(v, true)),
            None => (pct_decode(p, true), String::new()),
        })
        .collect()
}
