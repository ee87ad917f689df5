//! The roster store: users, groups, their secondary indexes, group membership in both
//! directions and a per-tenant change log, on an embedded sled database.
//!
//! Every write to a tenant runs under that tenant's write lock, reads through an overlay of
//! its own pending writes, and lands as one atomic sled batch that also appends the change
//! events it produced. Callers get control back only after the group-commit flusher has
//! made the batch durable. No sled type appears in this module's public API, so another
//! engine can take its place behind the same functions.

mod backup;
mod check;
mod commit;
mod counts;
mod delivery;
mod keys;
mod paging;
mod record;
mod restored;
mod rewrite;
mod roster;
mod rows;
mod run;
pub use backup::BackedUp;
pub use check::{LISTED as CHECK_LISTED, TenantCheck};
pub use rewrite::{Rewritten, rewrite};
pub(crate) use rows::id_key;
pub use run::{RunRecord, daemon_serving};
#[cfg(test)]
mod testing;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::scim::filter::{AttrPath, Filter};
use crate::scim::patch::{MemberOp, MemberRef};
use crate::scim::schema::ENTERPRISE_USER_SCHEMA;
use crate::scim::{ResourceKind, ScimError};
use commit::GroupCommit;
pub use commit::fail_next_flush_in;
pub use delivery::{DeadLetter, RefusalPause, SentRequest, TargetResponse};
pub(crate) use keys::Index;
pub use record::{RecordAssignment, RecordBytes, RosterRecord, UserFields};
pub use roster::{
    Assignment, AssignmentSource, Candidate, Decision, EVENT_KINDS, EventQuery, GovernanceEvent,
    GroupRef, IdScan, Job, JobStatus, OverrideChange, OverrideRefusal, OverrideRules,
    ReclassifyCounts, Resolver, ScheduledPart, ScheduledResult,
};

/// sled's page cache unless configured (`server.cache_mb`).
pub const DEFAULT_CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// The period of sled's own flusher thread, which is the only place sled cleans its log:
/// it moves the live pages out of segments that are mostly garbage so they can be reused.
/// Each tick cleans at most one 512 KiB segment (its cleaner stops at a segment's end
/// until the next tick), so the period bounds how many bytes a second can be reclaimed.
/// At 1,000 ms that was 0.5 MiB/s, below what 50 SCIM writes a second produce (about
/// 10 KB each): the file grew 1.5 GiB an hour for 100 MiB of data, and without end. At
/// 10 ms, 2,300 writes a second (all this daemon could take on 2 cores) kept it at about
/// twice its data; at 20 and 50 ms it fell behind and kept falling behind for the 3
/// minutes measured. The cost is an idle wake-up and fsync every tick (0.7 % of a core).
/// Durability does not depend on this thread: group commit flushes every acknowledged
/// write.
const CLEANER_TICK_MS: u64 = 10;

/// Layout version of the data directory. Bumped whenever keys or values change shape.
const SCHEMA_VERSION: u64 = 7;
const SCHEMA_VERSION_KEY: &[u8] = b"rosterd:schema_version";

/// The key, in the default tree, of a random id a store is given when it is made, and
/// its backups and rewrites keep: what tells a store rebuilt empty (its data directory
/// lost) from the one it replaces, whose change numbers it starts over.
const STORE_ID_KEY: &[u8] = b"rosterd:store_id";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind:?} {id} not found")]
    NotFound { kind: ResourceKind, id: String },
    #[error("{0}")]
    Uniqueness(String),
    #[error("version mismatch: the resource is at {current}")]
    PreconditionFailed { current: String },
    /// The caller's update function refused the change.
    #[error(transparent)]
    Rejected(#[from] ScimError),
    #[error("storage engine: {0}")]
    Backend(String),
    /// Work done for the store on a blocking thread panicked: a bug in rosterd, logged
    /// where it happened. Its own variant, so a connector restarts on it (see
    /// `dispatch::task::supervised`) where a storage failure would stop it.
    #[error("a bug: the work panicked: {0}")]
    Panicked(String),
    /// The storage engine could not read or write its files (a full disk, a read-only
    /// or failing file system). sled keeps such an error for good.
    #[error("storage engine: I/O error: {0}")]
    Io(String),
    /// An earlier I/O error left the store unusable until rosterd restarts.
    #[error(
        "the store failed at {} ({}); restart rosterd once the cause (e.g. disk space) is fixed",
        .0.at.to_rfc3339_opts(SecondsFormat::Secs, true), .0.error
    )]
    Failed(StoreFailure),
    #[error("cannot open the store in {}: {message}", dir.display())]
    Open { dir: PathBuf, message: String },
    #[error("cannot flush the store in {} at shutdown: {message}", dir.display())]
    FinalFlush { dir: PathBuf, message: String },
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    /// The storage engine read a page of its files that is damaged. A start refuses only
    /// the damage sled meets while opening; a page read later fails here, once per read.
    #[error(
        "the store's files are damaged (the storage engine read corrupted data at {0}); keep a copy of the data directory, run `rosterd store check` on the newest backup and restore the newest that checks clean"
    )]
    Damaged(String),
    #[error(
        "data directory has layout version {found}; this rosterd reads version {SCHEMA_VERSION}"
    )]
    UnknownSchema { found: u64 },
    #[error("not durable: {0}")]
    NotDurable(String),
    /// An override the tenant's state refused at the moment it would have been written.
    #[error(transparent)]
    OverrideRefused(#[from] roster::OverrideRefusal),
    /// A backup that failed or was given up; the message names its directory. Apart from
    /// `Backend` and `Io`, whose "storage engine" reads as the store's own failure.
    #[error("{0}")]
    Backup(String),
}

impl StoreError {
    /// The open failed because another process (a running daemon) holds the store.
    pub fn held_elsewhere(&self) -> bool {
        matches!(self, StoreError::Open { message, .. } if message.starts_with(HELD_ELSEWHERE))
    }

    /// A blocking task that did not finish: it panicked, or the runtime is shutting down.
    pub fn from_join(e: tokio::task::JoinError) -> StoreError {
        if e.is_panic() {
            StoreError::Panicked(crate::ops::panics::message(e.into_panic().as_ref()))
        } else {
            StoreError::Backend(format!("a blocking task was cancelled: {e}"))
        }
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(e) => StoreError::Io(e.to_string()),
            // sled's own words end in `backtrace ()`, which reached job errors, `rosterd
            // status` and the log, and named no way out.
            sled::Error::Corruption { at, .. } => StoreError::Damaged(match at {
                Some(sled::DiskPtr::Inline(offset)) => format!("file offset {offset}"),
                Some(sled::DiskPtr::Blob(offset, blob)) => {
                    format!("file offset {offset} (blob {blob})")
                }
                None => "an unknown place".to_owned(),
            }),
            e => StoreError::Backend(e.to_string()),
        }
    }
}

impl StoreError {
    /// What a client is told when the store itself failed (a full disk, a failed flush,
    /// a store already marked failed): only what is known of its request, and to come
    /// back later. `None` for every other error. The SCIM and Roster API faces both
    /// answer these with 503 and [`OUTAGE_RETRY_AFTER_SECS`].
    pub fn outage_message(&self) -> Option<&'static str> {
        match self {
            // Refused before anything was applied.
            StoreError::Failed(_) => Some(
                "the store has failed and takes no changes until rosterd is restarted; nothing was applied; retry after the operator has fixed the store",
            ),
            // The write reached the engine, whose flush then failed: it may be visible
            // now, and may or may not survive the restart.
            StoreError::NotDurable(_) => Some(
                "the store failed while saving; the change may or may not have been saved; retry after the operator has fixed the store",
            ),
            // Reads meet it too (the engine keeps an I/O error for good).
            StoreError::Io(_) => Some(
                "the store cannot read or write its files (see /readyz and the rosterd log); retry after the operator has fixed it; a change this request made may or may not have been saved",
            ),
            _ => None,
        }
    }
}

/// How long a client should wait before retrying after a store outage: long enough for
/// an operator to be paged, short enough that a fixed store is used again soon.
pub const OUTAGE_RETRY_AFTER_SECS: &str = "120";

/// What a client is told of any other failure of the store: the cause is in the log, and
/// the request's outcome is not known.
pub const INTERNAL_ERROR_MESSAGE: &str = "internal error (see the rosterd log); a change in this request may or may not have been applied";

/// The unrecoverable storage error the store hit, and when.
#[derive(Debug, Clone)]
pub struct StoreFailure {
    pub error: Arc<str>,
    pub at: DateTime<Utc>,
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A stored user or group document (without group members, which live apart).
#[derive(Debug, Clone)]
pub struct Resource {
    pub id: String,
    /// Sequence number of the last change to this resource; the ETag is derived from it.
    pub version: u64,
    pub doc: Value,
}

impl Resource {
    pub fn etag(&self) -> String {
        etag(self.version)
    }
}

pub fn etag(version: u64) -> String {
    format!("W/\"{version}\"")
}

/// One member of a group, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Member {
    pub value: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

/// An `If-Match` precondition.
#[derive(Debug, Clone, PartialEq)]
pub enum IfMatch {
    Any,
    /// The ETags the client accepts, as sent.
    Tags(Vec<String>),
}

impl IfMatch {
    pub fn admits(&self, version: u64) -> bool {
        match self {
            IfMatch::Any => true,
            IfMatch::Tags(tags) => tags.iter().any(|t| tag_version(t) == Some(version)),
        }
    }
}

/// The version number inside `W/"12"` or `"12"`.
pub fn tag_version(tag: &str) -> Option<u64> {
    let t = tag.trim();
    let t = t.strip_prefix("W/").unwrap_or(t);
    t.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOp {
    Created,
    Updated,
    Deleted,
    /// Only the user's archetype assignment changed.
    Archetype,
}

/// One entry of a tenant's change log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeEvent {
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub resource_type: String,
    pub id: String,
    pub op: ChangeOp,
    /// The document after the change (absent for deletes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members_added: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members_removed: Vec<String>,
    /// A user's archetype assignment, when this change set or changed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment: Option<Assignment>,
    /// This change turned an active user inactive (`active: false`), which downstream
    /// targets treat as its own event.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deactivated: bool,
    /// This change turned an inactive user active again, the counterpart of
    /// `deactivated`: a receiver that acts on deactivations needs to hear of it. Changes
    /// logged before the field existed read as `false`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reactivated: bool,
    /// For a change that deactivated or reactivated a user: its direct groups then. A
    /// target that deletes inactive users takes these enrollments away (before the user)
    /// or brings them back with it; the groups read when the change is sent could already
    /// miss one that a later change left, whose enrollment would then outlive its user
    /// until that change came. `None` for other changes and those logged before the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
    /// This group change removes a user being deleted (the user's own deletion is logged
    /// next, in the same write): a connector's `[guard]` counts it as that user's
    /// deprovisioning, so that it holds the enrollments with the deletion instead of
    /// letting them go ahead of it. `false` for changes logged before the field.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting_user: bool,
}

impl ChangeEvent {
    /// A change with nothing but its number, time, object and kind set: for tests, and
    /// for what stands in a dead letter that cannot be read.
    pub fn bare(
        seq: u64,
        at: DateTime<Utc>,
        resource_type: &str,
        id: &str,
        op: ChangeOp,
    ) -> ChangeEvent {
        ChangeEvent {
            seq,
            at,
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            op,
            snapshot: None,
            members_added: vec![],
            members_removed: vec![],
            assignment: None,
            deactivated: false,
            reactivated: false,
            deleting_user: false,
            groups: None,
        }
    }
}

/// What an update function returns: the new document and membership changes.
pub struct Update {
    pub doc: Value,
    pub members: Vec<MemberOp>,
}

/// Lookups answered from an index.
#[derive(Debug, Clone)]
pub enum IndexQuery {
    UserName(String),
    ExternalId(String),
    Email(String),
    Manager(String),
    Department(String),
    GroupName(String),
}

struct Tenant {
    tree: sled::Tree,
    /// Held by the tenant's writer.
    write_lock: Mutex<WriteClock>,
    /// Turns at the write lock. Its writers run one at a time, each on a thread of the
    /// blocking pool (512, which every tenant shares): hundreds of one tenant's writers
    /// waiting there for the lock left no thread for the others' writes, reads and
    /// deliveries. The rest wait here, off the pool.
    writers: tokio::sync::Semaphore,
    /// Where SCIM pages start (see `paging.rs`).
    pages: paging::Positions,
    /// A job (sync, reclassification) holds the tenant. Set under `write_lock`, so a
    /// write that reads it under the lock is ordered before or after the job's start.
    job_running: std::sync::atomic::AtomicBool,
    /// The export's copy of the roster records (see `rows.rs`); `None` if it could not be
    /// opened, and the export then walks the tree.
    rows: Option<rows::RowFile>,
}

impl Tenant {
    /// The tenant's write lock. A writer that panicked holding it may have applied part
    /// of its batch to the tree and none of it to the export's row file, so the file is
    /// not used again (the tree is consistent: the redo record finishes the batch at the
    /// next open).
    fn writes(&self) -> std::sync::MutexGuard<'_, WriteClock> {
        self.write_lock.lock().unwrap_or_else(|e| {
            if let Some(rows) = &self.rows {
                rows.distrust();
            }
            e.into_inner()
        })
    }
}

/// How many of a tenant's writers may hold a blocking thread at once: one at the lock,
/// the others ready to take it at once.
const WRITERS_AT_THE_LOCK: usize = 4;

/// The time a tenant's writes are stamped with: never earlier than the write before, even
/// if the system clock is stepped back. Governance events are then in time order as well
/// as in sequence order, which is what lets a time filter search the log instead of
/// walking it.
struct WriteClock {
    last: DateTime<Utc>,
    /// Whether the clock was behind at the last write (to warn once, not per write).
    behind: bool,
}

impl WriteClock {
    fn stamp(&mut self, tenant: &str, clock: DateTime<Utc>) -> DateTime<Utc> {
        let behind = clock < self.last;
        if behind && !self.behind {
            tracing::warn!(
                tenant,
                clock = %timestamp(clock),
                last_write = %timestamp(self.last),
                "The system clock is behind this tenant's last write; writes keep that time until the clock catches up."
            );
        }
        self.behind = behind;
        self.last = self.last.max(clock);
        self.last
    }
}

struct Inner {
    db: sled::Db,
    dir: PathBuf,
    resolvers: RwLock<HashMap<String, Arc<dyn Resolver>>>,
    tenants: RwLock<HashMap<String, Arc<Tenant>>>,
    commit: GroupCommit,
    /// Per tenant, the last change sequence number known to be on disk. Connectors read
    /// the log only up to it, so nothing leaves the daemon that a crash could still undo.
    durable: RwLock<HashMap<String, tokio::sync::watch::Sender<u64>>>,
    /// The tenant an online backup is copying, and the keys its writers touched since.
    backup: Mutex<Option<backup::Tracking>>,
    /// [`STORE_ID_KEY`]'s value, empty for a store made before stores had one.
    id: String,
}

/// The store handle; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

pub(crate) fn record_flush(elapsed: std::time::Duration) {
    tracing::trace!(micros = elapsed.as_micros() as u64, "Store flushed.");
    metrics::histogram!("rosterd_store_flush_seconds").record(elapsed.as_secs_f64());
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

/// A tenant's change log, oldest first.
fn change_log(tree: &sled::Tree) -> sled::Iter {
    tree.range(keys::change(0)..=keys::change(u64::MAX))
}

/// The time of the newest change in a tenant's log, if it holds any.
fn newest_change_time(tree: &sled::Tree) -> StoreResult<Option<DateTime<Utc>>> {
    match change_log(tree).next_back() {
        Some(kv) => Ok(Some(decode::<ChangeEvent>(&kv?.1)?.at)),
        None => Ok(None),
    }
}

fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn resource_type(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::User => "User",
        ResourceKind::Group => "Group",
    }
}

/// A big-endian u64 value (counters, cursors, hashes); `what` names it in the error.
fn decode_u64(bytes: &[u8], what: &str) -> StoreResult<u64> {
    be_u64(bytes).ok_or_else(|| StoreError::Corrupt(format!("{what} is not 8 bytes")))
}

/// The number kept under `key` in `tree` (a counter, a sequence number); 0 when none is:
/// before the first change, or with none counted.
fn u64_in(tree: &sled::Tree, key: &[u8], what: &str) -> StoreResult<u64> {
    match tree.get(key)? {
        Some(v) => decode_u64(&v, what),
        None => Ok(0),
    }
}

/// The number in 8 big-endian bytes (a counter's value, the sequence number or letter id
/// a key ends with); `None` for any other length.
fn be_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

/// A stored JSON value (document, assignment, event, …); unreadable bytes are corruption.
fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: Serialize>(v: &T) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn version_of(doc: &Value) -> u64 {
    doc.pointer("/meta/version")
        .and_then(Value::as_str)
        .and_then(tag_version)
        .unwrap_or(0)
}

fn to_resource(id: String, doc: Value) -> Resource {
    Resource {
        version: version_of(&doc),
        id,
        doc,
    }
}

/// Every index entry a document contributes.
fn index_entries(kind: ResourceKind, id: &str, doc: &Value) -> Vec<(Index, String)> {
    let mut out = Vec::new();
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    match kind {
        ResourceKind::User => {
            if let Some(u) = s(doc.get("userName")) {
                out.push((Index::UserName, u.to_lowercase()));
            }
            if let Some(x) = s(doc.get("externalId")) {
                out.push((Index::UserExternalId, x));
            }
            if let Some(emails) = doc.get("emails").and_then(Value::as_array) {
                for e in emails {
                    if let Some(v) = s(e.get("value")) {
                        out.push((Index::Email, v.to_lowercase()));
                    }
                }
            }
            if !crate::scim::is_active(doc) {
                out.push((Index::Inactive, String::new()));
            }
            if let Some(ext) = doc.get(ENTERPRISE_USER_SCHEMA) {
                if let Some(m) = s(ext.pointer("/manager/value")) {
                    out.push((Index::Manager, m));
                }
                if let Some(d) = s(ext.get("department")) {
                    out.push((Index::Department, d.to_lowercase()));
                }
            }
        }
        ResourceKind::Group => {
            if let Some(x) = s(doc.get("externalId")) {
                out.push((Index::GroupExternalId, x));
            }
            if let Some(n) = s(doc.get("displayName")) {
                out.push((Index::GroupName, n.to_lowercase()));
            }
        }
    }
    out.sort_by(|a, b| (a.0 as u8, &a.1).cmp(&(b.0 as u8, &b.1)));
    out.dedup();
    let _ = id;
    out
}

/// A write that changed something: its durability ticket and the last change sequence
/// number it logged (if it logged any).
type Applied = (u64, Option<u64>);

/// One key write of a transaction: `None` deletes.
type Op = (Vec<u8>, Option<Vec<u8>>);

/// A tenant write in progress: reads see the pending writes first.
struct Txn<'a> {
    tree: &'a sled::Tree,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    events: Vec<ChangeEvent>,
    next_seq: u64,
    first_seq: u64,
    now: DateTime<Utc>,
    /// The tenant's archetype policy, if it has one.
    resolver: Option<Arc<dyn Resolver>>,
    /// Roster record halves handed over by the writes (see `record.rs`).
    records: HashMap<String, record::Parts>,
    /// Users and groups that came into being or went away (set by `counter_ops`).
    moves: Vec<paging::Move>,
    /// A job held the tenant when this write took the lock.
    job_running: bool,
}

impl<'a> Txn<'a> {
    fn new(
        tree: &'a sled::Tree,
        resolver: Option<Arc<dyn Resolver>>,
        now: DateTime<Utc>,
    ) -> StoreResult<Txn<'a>> {
        let last = u64_in(tree, keys::SEQ_KEY, "sequence counter")?;
        Ok(Txn {
            tree,
            pending: BTreeMap::new(),
            events: Vec::new(),
            next_seq: last + 1,
            first_seq: last + 1,
            now,
            resolver,
            records: HashMap::new(),
            moves: Vec::new(),
            job_running: false,
        })
    }

    fn get(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        if let Some(p) = self.pending.get(key) {
            return Ok(p.clone());
        }
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    fn exists(&self, key: &[u8]) -> StoreResult<bool> {
        if let Some(p) = self.pending.get(key) {
            return Ok(p.is_some());
        }
        Ok(self.tree.contains_key(key)?)
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.pending.insert(key, Some(value));
    }

    fn del(&mut self, key: Vec<u8>) {
        self.pending.insert(key, None);
    }

    /// Keys under `prefix`, committed and pending merged.
    fn keys_with_prefix(&self, prefix: &[u8]) -> StoreResult<Vec<Vec<u8>>> {
        let mut set: std::collections::BTreeSet<Vec<u8>> = std::collections::BTreeSet::new();
        for kv in self.tree.scan_prefix(prefix).keys() {
            set.insert(kv?.to_vec());
        }
        for (k, v) in self.pending.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            if v.is_some() {
                set.insert(k.clone());
            } else {
                set.remove(k);
            }
        }
        Ok(set.into_iter().collect())
    }

    /// Take the next value of the counter stored at `key` (the first is 1).
    fn next_counter(&mut self, key: &[u8], what: &str) -> StoreResult<u64> {
        let next = match self.get(key)? {
            Some(v) => decode_u64(&v, what)? + 1,
            None => 1,
        };
        self.put(key.to_vec(), next.to_be_bytes().to_vec());
        Ok(next)
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn log(&mut self, event: ChangeEvent) {
        self.events.push(event);
    }

    fn load(&self, kind: ResourceKind, id: &str) -> StoreResult<Option<Value>> {
        match self.get(&keys::resource(kind, id))? {
            Some(b) => Ok(Some(decode(&b)?)),
            None => Ok(None),
        }
    }

    fn save(&mut self, kind: ResourceKind, id: &str, doc: &Value) -> StoreResult<()> {
        if kind == ResourceKind::User {
            self.record_user(id, doc)?;
        }
        let bytes = encode(doc)?;
        self.put(keys::resource(kind, id), bytes);
        Ok(())
    }

    fn reindex(
        &mut self,
        kind: ResourceKind,
        id: &str,
        old: Option<&Value>,
        new: Option<&Value>,
    ) -> StoreResult<()> {
        let before: HashSet<(Index, String)> = old
            .map(|d| index_entries(kind, id, d).into_iter().collect())
            .unwrap_or_default();
        let after: Vec<(Index, String)> =
            new.map(|d| index_entries(kind, id, d)).unwrap_or_default();
        let after_set: HashSet<(Index, String)> = after.iter().cloned().collect();
        for (index, value) in &before {
            if !after_set.contains(&(*index, value.clone())) {
                self.del(keys::index_entry(*index, value, id));
            }
        }
        for (index, value) in after {
            if before.contains(&(index, value.clone())) {
                continue;
            }
            let key = keys::index_entry(index, &value, id);
            if index.is_unique()
                && let Some(owner) = self.get(&key)?
                && owner != id.as_bytes()
            {
                // Without the value: the refusal is logged at INFO, and an identity
                // provider retrying a duplicate wrote the person's email into the log at
                // each try. The client knows what it sent.
                return Err(StoreError::Uniqueness(
                    "userName is already taken in this tenant by another user".to_owned(),
                ));
            }
            if index == Index::GroupName
                && let Some(other) = self.other_group_named(&value, id)?
            {
                return Err(StoreError::Uniqueness(format!(
                    "displayName is already taken in this tenant by group {other:?} (names are compared without letter case)"
                )));
            }
            self.put(key, keys::index_value(index, id));
        }
        Ok(())
    }

    /// Another group than `id` whose lower-cased displayName is `name`. A group's name is
    /// held unique when it is given or changed, not over groups that share one already (a
    /// store from before kept them; each may still be written under its name): Entra and
    /// Okta match groups by displayName, and a group create retried after a timeout made a
    /// second group of the name, which their match then found twice.
    fn other_group_named(&self, name: &str, id: &str) -> StoreResult<Option<String>> {
        let prefix = keys::index_prefix(Index::GroupName, name);
        Ok(self
            .keys_with_prefix(&prefix)?
            .iter()
            .filter_map(|k| keys::trailing_id(k, prefix.len()))
            .find(|other| *other != id)
            .map(str::to_owned))
    }

    /// Stamp `meta` for a write at `seq`.
    fn stamp(&self, kind: ResourceKind, doc: &mut Value, created: Option<Value>, seq: u64) {
        let ts = timestamp(self.now);
        let meta = json!({
            "resourceType": resource_type(kind),
            "created": created.unwrap_or_else(|| Value::String(ts.clone())),
            "lastModified": ts,
            "version": etag(seq),
        });
        if let Some(obj) = doc.as_object_mut() {
            obj.insert("meta".into(), meta);
        }
    }

    /// Touch a group whose membership changed through another resource's deletion
    /// (`of_user`: a user's).
    fn touch_group(&mut self, gid: &str, removed: String, of_user: bool) -> StoreResult<()> {
        let Some(mut doc) = self.load(ResourceKind::Group, gid)? else {
            return Ok(());
        };
        let seq = self.seq();
        let created = doc.pointer("/meta/created").cloned();
        self.stamp(ResourceKind::Group, &mut doc, created, seq);
        self.save(ResourceKind::Group, gid, &doc)?;
        let event = ChangeEvent {
            seq,
            at: self.now,
            resource_type: "Group".into(),
            id: gid.to_owned(),
            op: ChangeOp::Updated,
            snapshot: Some(doc),
            members_added: vec![],
            members_removed: vec![removed],
            assignment: None,
            deactivated: false,
            reactivated: false,
            deleting_user: of_user,
            groups: None,
        };
        self.log(event);
        Ok(())
    }

    fn member_kind(&self, m: &MemberRef) -> StoreResult<String> {
        let candidates: &[ResourceKind] = match m.kind.as_deref() {
            Some(k) if k.eq_ignore_ascii_case("user") => &[ResourceKind::User],
            Some(k) if k.eq_ignore_ascii_case("group") => &[ResourceKind::Group],
            _ => &[ResourceKind::User, ResourceKind::Group],
        };
        for k in candidates {
            if self.exists(&keys::resource(*k, &m.value))? {
                return Ok(resource_type(*k).to_owned());
            }
        }
        Err(StoreError::Rejected(ScimError::invalid_value(format!(
            "member {:?} is not a {} of this tenant",
            m.value,
            m.kind.as_deref().unwrap_or("User or Group")
        ))))
    }

    fn add_member(&mut self, gid: &str, m: &MemberRef, added: &mut Vec<String>) -> StoreResult<()> {
        let key = keys::member(gid, &m.value);
        if self.exists(&key)? {
            return Ok(());
        }
        if m.value == gid {
            return Err(StoreError::Rejected(ScimError::invalid_value(
                "a group cannot be a member of itself",
            )));
        }
        let kind = self.member_kind(m)?;
        let record = Member {
            value: m.value.clone(),
            kind,
            display: m.display.clone(),
        };
        let bytes = encode(&record)?;
        self.put(key, bytes);
        self.put(keys::backref(&m.value, gid), Vec::new());
        added.push(m.value.clone());
        Ok(())
    }

    fn remove_member(
        &mut self,
        gid: &str,
        mid: &str,
        removed: &mut Vec<String>,
    ) -> StoreResult<()> {
        let key = keys::member(gid, mid);
        if self.exists(&key)? {
            self.del(key);
            self.del(keys::backref(mid, gid));
            removed.push(mid.to_owned());
        }
        Ok(())
    }

    fn member_ids(&self, gid: &str) -> StoreResult<Vec<String>> {
        self.ids_under(&keys::members_prefix(gid))
    }

    /// The groups `member` belongs to directly, with this transaction's writes.
    fn group_ids(&self, member: &str) -> StoreResult<Vec<String>> {
        self.ids_under(&keys::backrefs_prefix(member))
    }

    fn ids_under(&self, prefix: &[u8]) -> StoreResult<Vec<String>> {
        let mut out = Vec::new();
        for k in self.keys_with_prefix(prefix)? {
            if let Some(id) = keys::trailing_id(&k, prefix.len()) {
                out.push(id.to_owned());
            }
        }
        Ok(out)
    }

    /// Remove the group's members that `filter` selects; how many.
    fn remove_matching(
        &mut self,
        gid: &str,
        filter: &Filter,
        removed: &mut Vec<String>,
    ) -> StoreResult<usize> {
        let mut n = 0;
        for id in self.member_ids(gid)? {
            let Some(bytes) = self.get(&keys::member(gid, &id))? else {
                continue;
            };
            let member: Member = decode(&bytes)?;
            if member_matches(filter, &member) {
                self.remove_member(gid, &id, removed)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn apply_member_ops(
        &mut self,
        gid: &str,
        ops: &[MemberOp],
    ) -> StoreResult<(Vec<String>, Vec<String>)> {
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for op in ops {
            match op {
                MemberOp::Add(refs) => {
                    for m in refs {
                        self.add_member(gid, m, &mut added)?;
                    }
                }
                MemberOp::Remove(ids) => {
                    for id in ids {
                        self.remove_member(gid, id, &mut removed)?;
                    }
                }
                MemberOp::RemoveAll => {
                    for id in self.member_ids(gid)? {
                        self.remove_member(gid, &id, &mut removed)?;
                    }
                }
                MemberOp::ReplaceAll(refs) => {
                    // A diff against what is stored, so pushing the whole list to add one
                    // member costs one insert, not a delete and re-insert of everyone.
                    let wanted: HashSet<&str> = refs.iter().map(|m| m.value.as_str()).collect();
                    for id in self.member_ids(gid)? {
                        if !wanted.contains(id.as_str()) {
                            self.remove_member(gid, &id, &mut removed)?;
                        }
                    }
                    for m in refs {
                        self.add_member(gid, m, &mut added)?;
                    }
                }
                MemberOp::RemoveMatching(filter) => {
                    self.remove_matching(gid, filter, &mut removed)?;
                }
                MemberOp::ReplaceMatching(filter, refs) => {
                    if self.remove_matching(gid, filter, &mut removed)? == 0 {
                        return Err(StoreError::Rejected(ScimError::no_target(format!(
                            "members[{filter}] matches no member of the group"
                        ))));
                    }
                    for m in refs {
                        self.add_member(gid, m, &mut added)?;
                    }
                }
            }
        }
        Ok(net_membership(added, removed))
    }

    /// Every key this transaction writes (`None` deletes), change events, counters and the
    /// sequence counter included; and the users and groups that came or went.
    fn into_ops(mut self) -> StoreResult<(Vec<Op>, Vec<paging::Move>)> {
        self.refresh_records()?;
        let counters = self.counter_ops()?;
        let events = std::mem::take(&mut self.events);
        let mut ops = Vec::with_capacity(self.pending.len() + events.len() + counters.len() + 1);
        ops.extend(counters);
        for e in &events {
            ops.push((keys::change(e.seq), Some(encode(e)?)));
        }
        if self.next_seq != self.first_seq {
            ops.push((
                keys::SEQ_KEY.to_vec(),
                Some((self.next_seq - 1).to_be_bytes().to_vec()),
            ));
        }
        ops.extend(self.pending);
        Ok((ops, self.moves))
    }
}

/// Apply a transaction's writes so that a crash part-way cannot leave half of them.
///
/// sled's `apply_batch` would be atomic, but it takes sled's process-wide write lock,
/// which waits for every in-progress flush: with group commit that serializes all
/// writers behind the fsync (measured: ~1,300 creates/s at any concurrency). Plain
/// inserts only take the shared side. So the writes are first recorded as one redo
/// record, then applied one by one, then the record is removed; sled recovers a prefix
/// of its log, so after a crash either the record is absent (nothing or everything
/// landed) or it is present and [`recover_intent`] re-applies it. Writers of one tenant
/// are serialized by the tenant lock, so one record key per tenant suffices.
fn apply_ops(tree: &sled::Tree, ops: Vec<Op>) -> StoreResult<()> {
    let single = ops.len() == 1;
    if !single {
        tree.insert(keys::INTENT_KEY, encode_ops(&ops))?;
    }
    for (k, v) in ops {
        match v {
            Some(v) => tree.insert(k, v)?,
            None => tree.remove(k)?,
        };
    }
    if !single {
        tree.remove(keys::INTENT_KEY)?;
    }
    Ok(())
}

fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let size: usize = ops
        .iter()
        .map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, Vec::len))
        .sum();
    let mut out = Vec::with_capacity(size);
    for (k, v) in ops {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
        match v {
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.push(0),
        }
    }
    out
}

fn decode_ops(mut b: &[u8]) -> StoreResult<Vec<Op>> {
    let bad = || StoreError::Corrupt("unreadable redo record".into());
    let take = |n: usize, b: &mut &[u8]| -> StoreResult<Vec<u8>> {
        if b.len() < n {
            return Err(bad());
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head.to_vec())
    };
    let mut ops = Vec::new();
    while !b.is_empty() {
        let klen = u32::from_be_bytes(take(4, &mut b)?.try_into().map_err(|_| bad())?) as usize;
        let k = take(klen, &mut b)?;
        let flag = take(1, &mut b)?;
        let v = if flag[0] == 1 {
            let vlen = u32::from_be_bytes(take(4, &mut b)?.try_into().map_err(|_| bad())?) as usize;
            Some(take(vlen, &mut b)?)
        } else {
            None
        };
        ops.push((k, v));
    }
    Ok(ops)
}

/// Finish a transaction a crash interrupted (see [`apply_ops`]).
fn recover_intent(tree: &sled::Tree) -> StoreResult<bool> {
    let Some(record) = tree.get(keys::INTENT_KEY)? else {
        return Ok(false);
    };
    for (k, v) in decode_ops(&record)? {
        match v {
            Some(v) => tree.insert(k, v)?,
            None => tree.remove(k)?,
        };
    }
    tree.remove(keys::INTENT_KEY)?;
    tree.flush()?;
    Ok(true)
}

/// Keys under `prefix`, counted without decoding a value.
fn count_under(tree: &sled::Tree, prefix: &[u8]) -> StoreResult<u64> {
    let mut n = 0;
    for k in tree.scan_prefix(prefix).keys() {
        k?;
        n += 1;
    }
    Ok(n)
}

/// The ids that end the keys under `prefix` (after the key `after`, if given), in key
/// order, the first `skip` passed over and at most `take` returned. Nothing is decoded.
fn ids_under(
    tree: &sled::Tree,
    prefix: &[u8],
    after: Option<Vec<u8>>,
    skip: usize,
    take: usize,
) -> StoreResult<Vec<String>> {
    let start = roster::range_after(prefix, after).start;
    ids_from(tree, prefix, start, skip, take)
}

/// Ids under `prefix` from the key `start` on, past the first `skip`.
fn ids_from(
    tree: &sled::Tree,
    prefix: &[u8],
    start: Vec<u8>,
    skip: usize,
    take: usize,
) -> StoreResult<Vec<String>> {
    let mut out = Vec::new();
    let mut skipped = 0;
    let end = roster::range_after(prefix, None).end;
    for kv in tree.range(start..end) {
        let (k, _) = kv?;
        if out.len() == take {
            break;
        }
        let Some(id) = keys::trailing_id(&k, prefix.len()) else {
            continue;
        };
        if skipped < skip {
            skipped += 1;
        } else {
            out.push(id.to_owned());
        }
    }
    Ok(out)
}

/// The writes of a layout upgrade, applied in sled batches of 10,000. An upgrade runs
/// before the store serves and only adds keys derived from stored ones, so a crash
/// part-way just runs it again: no redo record is needed, and batches keep it fast.
struct UpgradeWriter<'a> {
    tree: &'a sled::Tree,
    batch: sled::Batch,
    pending: usize,
}

impl<'a> UpgradeWriter<'a> {
    const BATCH: usize = 10_000;

    fn new(tree: &'a sled::Tree) -> UpgradeWriter<'a> {
        UpgradeWriter {
            tree,
            batch: sled::Batch::default(),
            pending: 0,
        }
    }

    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) -> StoreResult<()> {
        self.batch.insert(key, value);
        self.pending += 1;
        if self.pending == Self::BATCH {
            self.tree.apply_batch(std::mem::take(&mut self.batch))?;
            self.pending = 0;
        }
        Ok(())
    }

    fn finish(self) -> StoreResult<()> {
        Ok(self.tree.apply_batch(self.batch)?)
    }
}

/// Bring every tenant from an older layout to this one, then record the new version.
/// Layout 1 had no roster records and no index of inactive users; layout 2 had no
/// counters; layout 3 did not index governance events by user and kind; layout 4 had no
/// archetype counters; layout 5 counted dead letters by walking them; layout 6 took a
/// user's names from `name` alone, untrimmed (see `scim::names`). Runs before the store
/// serves anything.
fn upgrade(db: &sled::Db, from: u64) -> StoreResult<()> {
    for name in db.tree_names() {
        let Some(tenant) = name.strip_prefix(b"tenant/") else {
            continue;
        };
        let tenant = String::from_utf8_lossy(tenant).into_owned();
        let tree = db.open_tree(&name)?;
        recover_intent(&tree)?;
        // An upgrade may rewrite records without moving the sequence numbers the export's
        // row file checks: build it again rather than trust it.
        tree.remove(keys::ROWS_TOKEN_KEY)?;
        let started = std::time::Instant::now();
        // Layout 1 had no records; up to 6 they held names as `name` had them, where
        // the derivation now trims them and falls back to a full name: `store check`
        // would call every such record wrong. The counters count nothing a name changes.
        if from < 7 {
            let users = record::build_all(&tree)?;
            tracing::info!(
                tenant,
                users,
                secs = started.elapsed().as_secs_f64(),
                "Upgraded the tenant's roster records to layout version 7 (names trimmed, else taken from a full name)."
            );
        }
        if from < 3 {
            let [users, groups, inactive, review] = counts::build_all(&tree)?;
            tracing::info!(
                tenant,
                users,
                groups,
                inactive,
                review,
                secs = started.elapsed().as_secs_f64(),
                "Upgraded the tenant's data to layout version 3 (counters)."
            );
        }
        if from < 4 {
            let events = roster::index_governance(&tree)?;
            tracing::info!(
                tenant,
                events,
                secs = started.elapsed().as_secs_f64(),
                "Upgraded the tenant's data to layout version 4 (governance events by user and kind)."
            );
        }
        if from < 5 {
            let archetypes = counts::build_archetypes(&tree)?;
            tracing::info!(
                tenant,
                archetypes,
                secs = started.elapsed().as_secs_f64(),
                "Upgraded the tenant's data to layout version 5 (users per archetype counted)."
            );
        }
        if from < 6 {
            let letters = delivery::build_dead_counts(&tree)?;
            tracing::info!(
                tenant,
                letters,
                secs = started.elapsed().as_secs_f64(),
                "Upgraded the tenant's data to layout version 6 (dead letters counted)."
            );
        }
    }
    db.insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION.to_string().as_bytes())?;
    db.flush()?;
    Ok(())
}

/// What a request did to each member, from the transitions it made in order.
/// `add_member` and `remove_member` record only real transitions, so an id's adds and
/// removes alternate and its net change is their difference: add, remove, add is one add
/// (cancelling pairs by set membership would lose it), and add, remove is nothing.
fn net_membership(added: Vec<String>, removed: Vec<String>) -> (Vec<String>, Vec<String>) {
    let mut net: HashMap<&str, i32> = HashMap::new();
    for id in &added {
        *net.entry(id.as_str()).or_default() += 1;
    }
    for id in &removed {
        *net.entry(id.as_str()).or_default() -= 1;
    }
    let mut seen = HashSet::new();
    let keep = |ids: &[String], want: i32, seen: &mut HashSet<String>| -> Vec<String> {
        ids.iter()
            .filter(|id| net.get(id.as_str()) == Some(&want) && seen.insert((*id).clone()))
            .cloned()
            .collect()
    };
    let net_added = keep(&added, 1, &mut seen);
    let net_removed = keep(&removed, -1, &mut seen);
    (net_added, net_removed)
}

/// The layout version a store records: `None` for none, `u64::MAX` for one unreadable.
fn stored_schema(db: &sled::Db) -> StoreResult<Option<u64>> {
    Ok(db.get(SCHEMA_VERSION_KEY)?.map(|v| {
        std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    }))
}

/// A directory that does not hold a store (no marker) is refused by what only reads or
/// copies one (`store backup`, `store rewrite`), which must not make one there.
fn require_store(dir: &Path) -> StoreResult<()> {
    let marker = dir.join(STORE_MARKER);
    match std::fs::metadata(&marker) {
        Ok(m) if m.is_file() => return Ok(()),
        // Run as another user than the store's (the usual slip: without `sudo -u
        // rosterd`), "holds no rosterd store" sent the operator looking for lost data.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(StoreError::Open {
                dir: dir.to_owned(),
                message: format!(
                    "this user (uid {}) cannot read it: {e}; run the store commands as the store's user (`sudo -u rosterd rosterd store …` under the systemd unit)",
                    euid()
                ),
            });
        }
        _ => {}
    }
    if dir.join(BACKUP_INCOMPLETE).exists() {
        return Err(StoreError::Open {
            dir: dir.to_owned(),
            message: format!("it {CUT_SHORT} ({BACKUP_INCOMPLETE} is there). {RESTORE_WHOLE}"),
        });
    }
    // Only the commands for a stopped store get here, and under the unit the store's
    // directory is on the daemon's command line, not in the config they read.
    Err(StoreError::Backend(format!(
        "{} holds no rosterd store ({STORE_MARKER} is missing); name the store's directory with --data-dir (the systemd unit's is /var/lib/rosterd)",
        dir.display()
    )))
}

const HELD_ELSEWHERE: &str = "another rosterd (or process) is using";

/// Why `dir` could not be opened, with what an operator can do about it. sled's own
/// messages name neither the directory nor the file.
fn open_error(dir: &Path, engine: &str) -> StoreError {
    let mut message = engine.to_owned();
    if engine.contains("could not acquire lock") {
        message = format!(
            "{HELD_ELSEWHERE} {}; stop it first, or give this one another data_dir ({engine})",
            dir.display()
        );
    }
    // An unfinished one is the next open's to remove (see remove_unfinished_snapshots).
    let snapshots: Vec<(PathBuf, u64)> = snapshot_files(dir)
        .into_iter()
        .filter(|(p, _)| !unfinished(p))
        .collect();
    let empty: Vec<String> = snapshots
        .iter()
        .filter(|(_, len)| *len == 0)
        .map(|(p, _)| p.display().to_string())
        .collect();
    if engine.contains("No space left") {
        message.push_str(
            "; free space on the data directory's file system, then start rosterd again (nothing needs moving: a snapshot a start on a full disk leaves unfinished is removed at the next start)",
        );
    } else if !empty.is_empty() {
        message.push_str(&format!(
            "; the directory holds empty snapshot file(s), typically left by a full disk: {}. Move them out of the directory (do not delete the rest of it) and start rosterd again; sled rebuilds the snapshot from its log",
            empty.join(", ")
        ));
    } else if engine.contains("orrupt") {
        // A snapshot cut short part-way reads as corruption as an empty one does, and
        // moving it aside loses nothing; a damaged log is a backup's work.
        let names: Vec<String> = snapshots
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        if names.is_empty() {
            message.push_str(&format!("; the store's files are damaged. Keep a copy of the directory, then restore it from a backup{TORN_COPY}"));
        } else {
            message.push_str(&format!(
                "; the store's files are damaged. First keep a copy of the directory, then move the snapshot file(s) out of it (do not delete the rest) and start rosterd again: {}. sled rebuilds the snapshot from its log, and a snapshot cut short by a crash or a full disk is the usual cause. If it still fails, or says the store's data is gone, the log itself is damaged: restore the directory from a backup",
                names.join(", ")
            ));
        }
    } else if engine.contains("ermission denied") {
        message.push_str("; the directory and its files must belong to the user rosterd runs as");
    }
    StoreError::Open {
        dir: dir.to_owned(),
        message,
    }
}

/// sled panics on some damaged files ("tried to serialize Uninitialized") instead of
/// answering an error; the operator needs the directory and a way out, not a worker's
/// backtrace.
fn engine_panic_as_error(
    dir: &Path,
    open: impl FnOnce() -> StoreResult<Store>,
) -> StoreResult<Store> {
    crate::ops::panics::catch_expected(open).unwrap_or_else(|what| {
        Err(open_error(
            dir,
            &format!("the storage engine failed reading its files (corrupted: {what})"),
        ))
    })
}

/// What opening answers once a handle dropped a moment ago has let go of the directory:
/// sled releases its file lock only when its background threads let go of the database,
/// shortly after the drop (a backup reads back the copy it has just closed; tests re-open
/// a store).
pub(crate) fn past_the_lock<T, E: std::fmt::Debug>(
    open: impl Fn() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match open() {
            Err(e)
                if format!("{e:?}").contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Written beside sled's files once a store has opened: a `db` that later goes missing
/// or empty would otherwise open as a new, empty store, and the connectors would mirror
/// that emptiness downstream.
const STORE_MARKER: &str = ".rosterd-store";
/// In a backup being written, until it is whole: a directory holding it is refused.
const BACKUP_INCOMPLETE: &str = ".rosterd-backup-incomplete";
const INCOMPLETE_TEXT: &str = "This directory is a rosterd backup that was still being written: it holds part of the store at most. rosterd refuses to start on it.\n";
/// In a whole backup until a start serves it: `rosterd store check` tells a backup by
/// it, wherever the backup was moved and whatever it was renamed, and checks a copy.
const BACKUP_WHOLE: &str = ".rosterd-backup";
const WHOLE_TEXT: &str = "This directory is a whole rosterd backup. `rosterd store check` checks a copy of it, so that it stays as written. The first start of rosterd on it (a restore) removes this file.\n";

/// Whether `dir` holds a whole backup that no start has served yet.
pub fn written_as_backup(dir: &Path) -> bool {
    dir.join(BACKUP_WHOLE).is_file()
}

/// Why a backup cut short is refused, and what to use instead.
const CUT_SHORT: &str = "is a backup cut short (by a kill, a crash or a full disk) that holds part of the store at most: serving it would mirror a torn roster downstream";
/// What to restore instead of a backup refused as cut short.
const RESTORE_WHOLE: &str = "Restore a whole backup (a `rosterd-<time>` directory, never `rosterd-<time>.partial`), copied with its hidden files (`cp -a`)";
const MARKER_TEXT: &str = "This directory is a rosterd store. rosterd refuses to start on it if its `db` file is missing or empty.\n";

/// Said where damage is found: a directory restored from a copy taken while rosterd ran
/// reads as damaged (measured: 8 of 13 such copies), and the operator who just restored
/// it needs to know the backup, not the disk, is at fault.
const TORN_COPY: &str = " (a copy of the directory taken while rosterd was running is torn this way: take backups with rosterd itself (the `backup` schedule, SIGUSR1, or `rosterd store backup` while it is stopped), or as a filesystem snapshot; README, \"Backing up and restoring\")";

/// The directory of the export's row files (see `rows.rs`).
const ROWS_DIR: &str = "rows";

/// The ids of the groups `member` is a direct member of, in `tree`.
/// The tenant's export row file in the data directory `dir` (see `rows.rs`).
fn rows_path(dir: &Path, tenant: &str) -> PathBuf {
    dir.join(ROWS_DIR)
        .join(format!("{}.rows", hex::encode(tenant)))
}

fn groups_in(tree: &sled::Tree, member: &str) -> StoreResult<Vec<String>> {
    let prefix = keys::backrefs_prefix(member);
    let mut out = Vec::new();
    for k in tree.scan_prefix(&prefix).keys() {
        let k = k?;
        if let Some(id) = keys::trailing_id(&k, prefix.len()) {
            out.push(id.to_owned());
        }
    }
    Ok(out)
}

/// A data directory this process could not use: a path through a file, or a directory
/// on a read-only mount or owned by another user. `check-config` run as the service's
/// user then says so, rather than the first start. A directory not made yet is left to
/// [`Store::creatable`]: systemd's `StateDirectory=` makes it only at the start.
fn refuse_unwritable(dir: &Path) -> StoreResult<()> {
    let refuse = |message: String| {
        Err(StoreError::Open {
            dir: dir.to_owned(),
            message,
        })
    };
    // A link to nothing: `exists` follows it and says no, and creating the directory
    // there fails with "File exists".
    if !dir.exists() && dir.symlink_metadata().is_ok() {
        let to = std::fs::read_link(dir).unwrap_or_default();
        return refuse(format!(
            "it is a symbolic link to {}, which does not exist",
            to.display()
        ));
    }
    let existing = nearest_existing(dir);
    if !existing.is_dir() {
        return refuse(format!("{} is a file, not a directory", existing.display()));
    }
    if existing != dir {
        return Ok(());
    }
    if let Err(e) = writable(dir) {
        return refuse(format!(
            "the directory is not writable by this user (uid {}): {e}; rosterd writes its store there",
            euid()
        ));
    }
    // A store first started by another user (`sudo rosterd serve`, then the unit as
    // `rosterd`) keeps that user's files in a directory now this one's.
    let theirs: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            // sled's and ours; other entries (`lost+found` on a dedicated volume) are
            // not the daemon's to write.
            let store_file = ["db", "conf", "blobs", ROWS_DIR, STORE_MARKER]
                .contains(&name.as_ref())
                || name.starts_with("snap.");
            store_file && writable(&e.path()).is_err()
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // The export's row files too: a leftover of a start as root fails every rebuild.
        .chain(
            std::fs::read_dir(dir.join(ROWS_DIR))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| writable(&e.path()).is_err())
                .map(|e| format!("{ROWS_DIR}/{}", e.file_name().to_string_lossy())),
        )
        .collect();
    if !theirs.is_empty() {
        return refuse(format!(
            "this user (uid {}) cannot write the store's files {}; the directory and its files must belong to the user rosterd runs as (chown -R)",
            euid(),
            theirs.join(", ")
        ));
    }
    Ok(())
}

/// An offline command run with `sudo` on the store of the unit's user: opening the store
/// writes files (sled's snapshot, the completion of an interrupted write), which as root
/// would belong to root, and the daemon's next start would refuse them.
fn refuse_root_in_theirs(dir: &Path) -> StoreResult<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = match std::fs::metadata(dir) {
        Ok(m) => m.uid(),
        Err(_) => return Ok(()),
    };
    if euid() != 0 || owner == 0 {
        return Ok(());
    }
    Err(StoreError::Open {
        dir: dir.to_owned(),
        message: format!(
            "it belongs to uid {owner}, and this command runs as root: the files it writes there would be root's, which the daemon's next start refuses. Run it as the store's user instead (`sudo -u rosterd rosterd …`)"
        ),
    })
}

/// `dir` itself or its nearest ancestor that exists (the one a start would create it
/// in); `dir` when none does.
fn nearest_existing(dir: &Path) -> &Path {
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            // A relative path (`data`, from `--config config.toml`) ends in the
            // working directory, which exists; its parent is written as "".
            Some(p) if p.as_os_str().is_empty() => return Path::new("."),
            Some(p) => existing = p,
            None => return dir,
        }
    }
    existing
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Whether this process may write `path` (for a directory: create files in it), by its
/// effective ids (as the daemon will open it), including on a read-only mount.
fn writable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // A directory is written by creating in it, which needs search too; a file by
    // opening it for reading and writing.
    let mode = if dir.is_dir() {
        libc::W_OK | libc::X_OK
    } else {
        libc::R_OK | libc::W_OK
    };
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), mode, libc::AT_EACCESS) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A directory with files in it but no store is someone else's (a data_dir set to the
/// wrong path): sled would write its files among theirs and overwrite one named `db`.
/// A store always has sled's `conf`; an empty directory is a new store.
fn refuse_foreign(dir: &Path) -> StoreResult<()> {
    if dir.join("conf").is_file() {
        return Ok(());
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        // Missing or unreadable: sled's open says which, with the directory named.
        return Ok(());
    };
    let mut foreign: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            // sled's own: its blobs directory, and its files when empty (a creation cut
            // off before `conf`); what file systems and desktops put in any directory
            // (`lost+found` of a dedicated volume, `.DS_Store`), and our own dotfiles.
            let sled_file = name == "db" || name.starts_with("snap.");
            let empty = e.metadata().is_ok_and(|m| m.is_file() && m.len() == 0);
            let ours = name.starts_with('.')
                || name == "lost+found"
                || name == "blobs"
                || name == ROWS_DIR
                || (sled_file && empty);
            (!ours).then_some(name)
        })
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    let shown = foreign
        .iter()
        .take(5)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    Err(StoreError::Open {
        dir: dir.to_owned(),
        message: format!(
            "it holds files that are not a rosterd store ({shown}{}); point server.data_dir (or --data-dir) at an empty directory or at an existing rosterd store",
            if foreign.len() > 5 { ", …" } else { "" }
        ),
    })
}

/// sled writes a snapshot as `snap.<lsn>.generating` and renames it once whole; one left
/// behind (a start on a full disk leaves it empty) is read as the newest snapshot, so
/// every later start failed as corrupt, even once space was freed, until someone moved
/// it out. Removed under the lock sled takes (`flock` on `db`), so that a running
/// daemon's snapshot in progress is never touched: sled then reads the snapshot before
/// it, which the unfinished one had not yet replaced.
fn remove_unfinished_snapshots(dir: &Path) {
    let unfinished: Vec<PathBuf> = snapshot_files(dir)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| unfinished(p))
        .collect();
    if unfinished.is_empty() {
        return;
    }
    let Ok(db) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("db"))
    else {
        return;
    };
    if db.try_lock().is_err() {
        return;
    }
    for p in unfinished {
        match std::fs::remove_file(&p) {
            Ok(()) => {
                tracing::warn!(file = %p.display(), "Removed a snapshot the storage engine had not finished writing (a start on a full disk leaves one); it rebuilds the snapshot from its log.")
            }
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "Cannot remove a snapshot the storage engine had not finished writing; the start may fail on it.")
            }
        }
    }
}

/// Whether `snap` is one sled had not finished writing (see
/// [`remove_unfinished_snapshots`]).
fn unfinished(snap: &Path) -> bool {
    snap.to_string_lossy().ends_with(".generating")
}

/// The `snap.*` files in `dir` with their sizes. An empty one is an interrupted
/// snapshot write, which sled refuses as corruption although the log beside it is
/// intact.
fn snapshot_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut found: Vec<(PathBuf, u64)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("snap."))
        .filter_map(|e| {
            let m = e.metadata().ok().filter(|m| m.is_file())?;
            Some((e.path(), m.len()))
        })
        .collect();
    found.sort();
    found
}

fn member_matches(filter: &Filter, member: &Member) -> bool {
    let element = serde_json::to_value(member).unwrap_or(Value::Null);
    let wrapped = Filter::ValuePath {
        path: AttrPath {
            urn: None,
            attr: "members".into(),
            sub: None,
        },
        filter: Box::new(filter.clone()),
    };
    wrapped.matches(ResourceKind::Group, &json!({ "members": [element] }))
}

#[cfg(test)]
impl Store {
    /// Change `seq` overwritten with bytes that do not decode, as a damaged disk leaves it.
    pub(crate) fn damage_change(&self, tenant: &str, seq: u64) {
        let t = self.tenant(tenant).unwrap();
        t.tree
            .insert(keys::change(seq), &b"\xff not json"[..])
            .unwrap();
    }
}

impl Store {
    /// Open (or create) the store in `dir` with the default page cache.
    pub fn open(dir: &Path) -> StoreResult<Store> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Open (or create) the store in `dir`, caching up to `cache_bytes` of pages. A
    /// tenant walk (export, reconciliation) that fits in the cache never reads the disk.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> StoreResult<Store> {
        Self::open_checked(dir, cache_bytes, true)
    }

    /// Open an existing store for reading it whole (`rosterd store backup`, `store
    /// check`): one at an older layout is refused rather than upgraded, since a backup
    /// must not change what it copies, and a directory without a store is refused rather
    /// than made one.
    pub fn open_existing(dir: &Path, cache_bytes: u64) -> StoreResult<Store> {
        require_store(dir)?;
        refuse_root_in_theirs(dir)?;
        Self::open_checked(dir, cache_bytes, false)
    }

    fn open_checked(dir: &Path, cache_bytes: u64, upgrade: bool) -> StoreResult<Store> {
        engine_panic_as_error(dir, || Self::open_inner(dir, cache_bytes, upgrade)).map_err(|e| {
            match e {
                // Already actionable on their own, or naming the directory.
                e @ (StoreError::UnknownSchema { .. } | StoreError::Open { .. }) => e,
                // Its own advice is for a running store; the open's names the snapshots.
                StoreError::Damaged(at) => open_error(
                    dir,
                    &format!("the storage engine read corrupted data at {at}"),
                ),
                e => open_error(dir, &e.to_string()),
            }
        })
    }

    /// Whether `dir` holds a store (sled's files, or rosterd's marker).
    pub fn holds_store(dir: &Path) -> bool {
        dir.join("conf").is_file() || dir.join(STORE_MARKER).is_file()
    }

    /// Why this process could not create the data directory `dir`, if it does not exist
    /// and its nearest existing ancestor is not writable here. A warning, not an error:
    /// under systemd, `StateDirectory=` creates it before the start.
    pub fn creatable(dir: &Path) -> Option<String> {
        let existing = nearest_existing(dir);
        if existing == dir || !existing.is_dir() {
            return None;
        }
        writable(existing).err().map(|e| {
            format!(
                "{} does not exist, and this user (uid {}) cannot create it in {}: {e}",
                dir.display(),
                euid(),
                existing.display()
            )
        })
    }

    /// Why this process could not write files into `dir` (a CSV connector's), if it
    /// could not: the directory is not writable here, or it does not exist and cannot be
    /// made. A warning: run as another user than the service, it tells little.
    pub fn unwritable(dir: &Path) -> Option<String> {
        if !dir.exists() {
            return Self::creatable(dir);
        }
        writable(dir).err().map(|e| {
            format!(
                "this user (uid {}) cannot write into {}: {e}",
                euid(),
                dir.display()
            )
        })
    }

    /// Make `dir` and its missing parents readable by this user alone. The store holds
    /// every user's personal data and what targets answered; under
    /// the unit, `UMask=0077` and `StateDirectoryMode=0700` do this, but run by hand under
    /// the usual umask 022 the directory was 0755 and its files 0644, readable by every
    /// local user. A directory that exists already keeps its mode: it is the operator's.
    pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }

    /// What can be told of `dir` without opening it (and so without taking the lock a
    /// running daemon holds): someone else's files, or a store whose log is gone. For
    /// `check-config`; opening checks the same first.
    pub fn check_dir(dir: &Path) -> StoreResult<()> {
        refuse_unwritable(dir)?;
        refuse_foreign(dir)?;
        if dir.join(BACKUP_INCOMPLETE).exists() {
            return Err(StoreError::Open {
                dir: dir.to_owned(),
                message: format!("it {CUT_SHORT} ({BACKUP_INCOMPLETE} is there). {RESTORE_WHOLE}"),
            });
        }
        if dir.join(STORE_MARKER).is_file()
            && std::fs::metadata(dir.join("db")).map_or(true, |m| m.len() == 0)
        {
            return Err(StoreError::Open {
                dir: dir.to_owned(),
                message: format!(
                    "its log file `db` is missing or empty, yet the directory held a rosterd store ({STORE_MARKER} is there): the data was lost or moved. Restore the directory from a backup; to start an empty store on purpose, remove everything in the directory, {STORE_MARKER} included"
                ),
            });
        }
        Ok(())
    }

    fn open_inner(dir: &Path, cache_bytes: u64, may_upgrade: bool) -> StoreResult<Store> {
        Self::check_dir(dir)?;
        remove_unfinished_snapshots(dir);
        let marker = dir.join(STORE_MARKER);
        let was_a_store = marker.is_file();
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(CLEANER_TICK_MS))
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|e| {
                let text = match StoreError::from(e.clone()) {
                    StoreError::Damaged(at) => {
                        format!("the storage engine read corrupted data at {at}")
                    }
                    _ => e.to_string(),
                };
                open_error(dir, &text)
            })?;
        match stored_schema(&db)? {
            // A backup gets its marker last, after it reads back whole: one without it
            // was cut short (by a build before the incomplete mark, or copied without
            // its hidden files), and a start would take it for a store of before markers.
            Some(_) if !was_a_store && db.contains_key(restored::BACKUP_MARK)? => {
                return Err(StoreError::Open {
                    dir: dir.to_owned(),
                    message: format!(
                        "it holds a backup's data without the {STORE_MARKER} a whole backup ends with: a backup cut short (by a kill, a crash or a full disk), which holds part of the store at most, or a whole one copied without its hidden files (`cp dir/*`). {RESTORE_WHOLE}"
                    ),
                });
            }
            Some(found) => {
                if (1..SCHEMA_VERSION).contains(&found) {
                    if !may_upgrade {
                        return Err(StoreError::Backend(format!(
                            "the store in {} is at an older layout (version {found}, this build's is {SCHEMA_VERSION}), which this command does not change: use the rosterd that wrote it, or start this one on it first (a start upgrades it)",
                            dir.display()
                        )));
                    }
                    upgrade(&db, found)?;
                } else if found != SCHEMA_VERSION {
                    return Err(StoreError::UnknownSchema { found });
                }
            }
            // A directory that held a store opens with none of it: sled read a damaged
            // log as far as it could, which may be nothing. Serving would mirror an
            // empty roster downstream.
            None if was_a_store => {
                return Err(StoreError::Open {
                    dir: dir.to_owned(),
                    message: format!(
                        "the storage engine opened it but found none of the store's data, though the directory held a rosterd store ({STORE_MARKER} is there): its log `db` is damaged. Keep a copy of the directory, then restore it from a backup{TORN_COPY}; to start an empty store on purpose, remove everything in the directory, {STORE_MARKER} included"
                    ),
                });
            }
            None => {
                db.insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION.to_string().as_bytes())?;
                db.insert(STORE_ID_KEY, uuid::Uuid::new_v4().to_string().as_bytes())?;
                db.flush()?;
            }
        }
        // Only a start: a check or a backup of a backup leaves its mark for the start.
        if may_upgrade && let Some(r) = restored::move_counters_of_a_restored_backup(&db)? {
            // Said before the mark goes: a crash between the two would leave the jump
            // unexplained, where one before the mark's removal only says it again.
            for m in r.moved {
                let again = m.again.map_or("", restored::MovedBefore::said);
                tracing::warn!(
                    tenant = %m.tenant,
                    backup_written_at = %r.at,
                    last_change = m.changes_from,
                    next_change = m.changes_to + 1,
                    cursors_moved = m.cursors,
                    "This store is a backup starting to serve: its change numbers go on from #{} rather than #{}{again}, so that no change repeats a number (or a webhook-id) of one the restore lost. Governance event and dead-letter numbers move on as far, and CSV connectors write their files again.",
                    m.changes_to + 1,
                    m.changes_from + 1
                );
            }
            restored::finish(&db)?;
        } else if may_upgrade && restored::note_an_earlier_restore(&db)? {
            tracing::info!(
                "This store was restored from a backup by an earlier rosterd: a tenant new to it will number its changes past the restore, as one added to a store restored by this one does."
            );
        }
        // Served, it is a store and no longer a backup; at every start, in case the one
        // that removed the mark above was cut short before this.
        if may_upgrade {
            let whole = dir.join(BACKUP_WHOLE);
            match std::fs::remove_file(&whole) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(file = %whole.display(), error = %e, "Cannot remove the backup's marker from the store it became; `rosterd store check` will check a copy of this store, as of a backup, until it is removed.");
                }
                _ => {}
            }
        }
        if !was_a_store && let Err(e) = std::fs::write(&marker, MARKER_TEXT) {
            tracing::warn!(file = %marker.display(), error = %e, "Cannot write the store's marker file; a lost `db` file would then go unnoticed.");
        }
        let commit = GroupCommit::start(db.clone(), dir.to_owned())
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let id = db
            .get(STORE_ID_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                dir: dir.to_owned(),
                tenants: RwLock::new(HashMap::new()),
                resolvers: RwLock::new(HashMap::new()),
                commit,
                durable: RwLock::new(HashMap::new()),
                backup: Mutex::new(None),
                id,
            }),
        })
    }

    /// Whether this store was restored from a backup (its first start moved the numbers
    /// on, see [`restored`]).
    pub fn was_restored(&self) -> StoreResult<bool> {
        Ok(self.inner.db.contains_key(restored::NEW_TENANTS_FROM)?)
    }

    /// The store's random id (see [`STORE_ID_KEY`]); empty for a store made before stores
    /// had one. A webhook event's id is made from it, so that a store rebuilt empty does
    /// not send its changes under the ids of the lost store's.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Check every tenant's derived keys against the data they derive from (`rosterd
    /// store check`). Meant for a store no daemon serves: a stopped one's, or a backup.
    /// Opening a tenant completes a write a stop interrupted, as a start does.
    /// `configured`: the tenants the config names, each of which the store should hold.
    pub fn check(&self, configured: &[String]) -> StoreResult<Vec<TenantCheck>> {
        check::check_all(&self.inner.db, &self.inner.dir, configured, false)
    }

    /// The check, putting right every derived key it finds wrong as it goes (`rosterd
    /// store check --repair`): what each document, assignment, membership, event and
    /// letter implies is written, and what none implies is removed. Those primary keys
    /// are not changed, so what disagrees among them stays, and a second check lists it.
    pub fn repair(&self, configured: &[String]) -> StoreResult<Vec<TenantCheck>> {
        check::check_all(&self.inner.db, &self.inner.dir, configured, true)
    }

    /// Open these tenants' data now rather than at their first request: after a crash
    /// that means finishing an interrupted write and building the export's row file
    /// (seconds at a million users), which belongs in the start, not in a request.
    pub fn open_tenants(&self, tenants: &[String]) -> StoreResult<()> {
        for t in tenants {
            self.tenant(t)?;
        }
        Ok(())
    }

    /// The value stored at `key` in the tenant's tree, decoded; `None` when there is none.
    fn get_decoded<T: serde::de::DeserializeOwned>(
        &self,
        tenant: &str,
        key: Vec<u8>,
    ) -> StoreResult<Option<T>> {
        self.tenant(tenant)?
            .tree
            .get(key)?
            .map(|b| decode(&b))
            .transpose()
    }

    /// The tenants the store holds data of, declared or not.
    pub fn stored_tenants(&self) -> Vec<String> {
        self.inner
            .db
            .tree_names()
            .iter()
            .filter_map(|n| n.strip_prefix(b"tenant/"))
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .collect()
    }

    fn tenant(&self, tenant: &str) -> StoreResult<Arc<Tenant>> {
        if let Some(t) = self
            .inner
            .tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
        {
            return Ok(t.clone());
        }
        let mut map = self
            .inner
            .tenants
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(t) = map.get(tenant) {
            return Ok(t.clone());
        }
        let tree = self.inner.db.open_tree(format!("tenant/{tenant}"))?;
        if let Some(from) = restored::number_a_new_tenant(&self.inner.db, &tree)? {
            tracing::warn!(
                tenant,
                next_change = from + 1,
                "This store was restored from a backup that does not hold this tenant: its change numbers start at #{} rather than #1, since it may have had changes after the backup that the restore lost. Governance event and dead-letter numbers start as far on.",
                from + 1
            );
        }
        if recover_intent(&tree)? {
            tracing::warn!(
                tenant,
                "Completed a write that the last stop had interrupted (a crash, a kill, or the stop after a store failure)."
            );
        }
        // Changes are stamped too, and a tenant may have no governance event (or had
        // them all pruned): a clock stepped back before this start would otherwise stamp
        // writes earlier than the last change.
        let last_write = roster::last_event_time(&tree)?
            .max(newest_change_time(&tree)?)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let rows_path = rows_path(&self.inner.dir, tenant);
        let rows = rows::RowFile::open(&rows_path, &tree)
            .inspect_err(|e| {
                tracing::warn!(tenant, error = %e, "Cannot open the export's copy of the roster records; exports read the store instead.");
            })
            .ok();
        let t = Arc::new(Tenant {
            tree,
            write_lock: Mutex::new(WriteClock {
                last: last_write,
                behind: false,
            }),
            writers: tokio::sync::Semaphore::new(WRITERS_AT_THE_LOCK),
            pages: paging::Positions::default(),
            job_running: Default::default(),
            rows,
        });
        self.backup_saw_open(tenant);
        map.insert(tenant.to_owned(), t.clone());
        Ok(t)
    }

    /// Mark the tenant as held by a job; false if one already holds it. Taken under the
    /// tenant's write lock, so every override write that checks it is ordered before the
    /// job or refused.
    pub async fn claim_job(&self, tenant: &str) -> StoreResult<bool> {
        let t = self.tenant(tenant)?;
        let claimed = tokio::task::spawn_blocking(move || {
            let _lock = t.writes();
            !t.job_running
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        })
        .await;
        claimed.map_err(StoreError::from_join)
    }

    /// The job that held the tenant has ended (its writes are all done).
    pub fn end_job(&self, tenant: &str) {
        if let Ok(t) = self.tenant(tenant) {
            t.job_running
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }

    pub fn job_running(&self, tenant: &str) -> bool {
        self.tenant(tenant)
            .is_ok_and(|t| t.job_running.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Run a write under the tenant lock, apply it atomically and take a durability ticket.
    fn write_sync<T>(
        &self,
        tenant: &str,
        f: impl FnOnce(&mut Txn<'_>) -> StoreResult<T>,
    ) -> StoreResult<(T, Option<Applied>)> {
        // Refused before anything is applied: a write the engine took but could not make
        // durable would be visible now and gone after the restart.
        if let Some(f) = self.failure() {
            return Err(StoreError::Failed(f));
        }
        let t = self.tenant(tenant)?;
        let mut last_write = t.writes();
        let stamp = last_write.stamp(tenant, now());
        let mut txn = Txn::new(&t.tree, self.resolver(tenant), stamp)?;
        txn.job_running = t.job_running.load(std::sync::atomic::Ordering::Acquire);
        let out = f(&mut txn)?;
        if txn.pending.is_empty() && txn.events.is_empty() {
            // Nothing to write, but the answer reports state an earlier writer may have
            // applied and not yet flushed (an IdP retrying a PATCH, a repeated override):
            // it is acknowledged only once that state is durable, or a crash could undo
            // what the 2xx promised. Tickets are taken under this lock, so the newest one
            // covers every write this transaction could have read.
            return Ok((out, self.inner.commit.unflushed().map(|t| (t, None))));
        }
        let last_seq = (txn.next_seq != txn.first_seq).then(|| txn.next_seq - 1);
        let (ops, moves) = txn.into_ops()?;
        let record_prefix = keys::record("");
        let backref_prefix = keys::backrefs_all_prefix();
        // The backrefs (`b member group`) say who joined or left which group.
        let (records, memberships): (Vec<Op>, Vec<Op>) = match &t.rows {
            Some(_) => ops
                .iter()
                .filter(|(k, _)| k.starts_with(&record_prefix) || k.starts_with(&backref_prefix))
                .cloned()
                .partition(|(k, _)| k.starts_with(&record_prefix)),
            None => (Vec::new(), Vec::new()),
        };
        let noted = self.backup_notes(tenant, &ops);
        let applied = apply_ops(&t.tree, ops);
        // Noted once applied, failed or not: a backup that takes the keys noted so far
        // and copies them again then reads this write's values.
        if let Some(keys) = noted {
            self.backup_saw_write(tenant, keys);
        }
        if let Err(StoreError::Io(e)) = &applied {
            self.inner.commit.fail(e);
        }
        if !moves.is_empty() {
            match applied {
                Ok(()) => t.pages.moved(&moves),
                Err(_) => t.pages.forget(),
            }
        }
        if applied.is_err()
            && let Some(rows) = &t.rows
        {
            // Part of the batch may be in the tree: the file cannot say which.
            rows.distrust();
        }
        applied?;
        if let Some(rows) = &t.rows {
            fn text(b: &[u8]) -> &str {
                std::str::from_utf8(b).unwrap_or("")
            }
            rows.apply(
                &t.tree,
                records
                    .iter()
                    .map(|(k, v)| (text(&k[record_prefix.len()..]), v.as_deref())),
                memberships.iter().filter_map(|(k, v)| {
                    let (member, group) = keys::backref_parts(k)?;
                    Some((text(member), text(group), v.is_some()))
                }),
            );
        }
        // Taken before the lock is released, so a later writer that reads this state
        // finds its ticket already issued (see the no-op case above).
        let ticket = self.inner.commit.ticket();
        drop(last_write);
        Ok((out, Some((ticket, last_seq))))
    }

    /// Run a write on the blocking pool and return once it is durable.
    async fn write<T: Send + 'static>(
        &self,
        tenant: &str,
        f: impl FnOnce(&mut Txn<'_>) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let store = self.clone();
        let owned = tenant.to_owned();
        // What the write logs (and a panic in it) belongs to the request or job that made it.
        let span = tracing::Span::current();
        let t = self.tenant(tenant)?;
        // The turn is taken, held and given back by a task of its own, which the runtime
        // polls whatever becomes of the caller. A caller that is not polled for a while
        // (a connector's delivery, while its loop awaits something else, such as a write of
        // its cursor) would otherwise keep the turn it holds, or one handed to it in the
        // queue, and the tenant's every writer behind it waited for good: a webhook
        // connector setting aside dead letters hung the tenant's SCIM writes, and a stop.
        let turn = tokio::spawn(async move {
            let turn = t
                .writers
                .acquire()
                .await
                .map_err(|_| StoreError::Backend("the tenant's writers were closed".into()))?;
            let written =
                tokio::task::spawn_blocking(move || span.in_scope(|| store.write_sync(&owned, f)))
                    .await;
            // Given back before the flush is awaited: the next writer's changes join it.
            drop(turn);
            written.map_err(StoreError::from_join)?
        });
        // Given up with its caller: a write still waiting for its turn then never writes,
        // as before the task; one already writing finishes, as a write on the blocking
        // pool always did.
        let (out, ticket) = tokio_util::task::AbortOnDropHandle::new(turn)
            .await
            .map_err(StoreError::from_join)??;
        if let Some((ticket, last_seq)) = ticket {
            self.inner
                .commit
                .wait(ticket)
                .await
                .map_err(|e| StoreError::NotDurable(e.0.to_string()))?;
            if let Some(seq) = last_seq {
                // Writers of a tenant apply in sequence order and a flush covers
                // everything applied before it, so the largest durable seq is a watermark.
                self.durable_sender(tenant)
                    .send_if_modified(|v| std::mem::replace(v, (*v).max(seq)) < seq);
            }
        }
        Ok(out)
    }

    fn durable_sender(&self, tenant: &str) -> tokio::sync::watch::Sender<u64> {
        if let Some(tx) = self
            .inner
            .durable
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
        {
            return tx.clone();
        }
        let start = self.last_seq(tenant).unwrap_or(0);
        self.inner
            .durable
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant.to_owned())
            .or_insert_with(|| tokio::sync::watch::channel(start).0)
            .clone()
    }

    /// Watch the tenant's durable change-log watermark: the largest sequence number that
    /// is on disk. Starts at the log's end as found when first asked.
    pub fn watch_durable(&self, tenant: &str) -> tokio::sync::watch::Receiver<u64> {
        self.durable_sender(tenant).subscribe()
    }

    /// Create a resource from a normalized document; the store assigns `id` and `meta`.
    pub async fn create(
        &self,
        tenant: &str,
        kind: ResourceKind,
        mut doc: Value,
        members: Vec<MemberRef>,
    ) -> StoreResult<Resource> {
        self.write(tenant, move |txn| {
            let id = uuid::Uuid::new_v4().to_string();
            let seq = txn.seq();
            if let Some(obj) = doc.as_object_mut() {
                obj.insert("id".into(), Value::String(id.clone()));
            }
            txn.stamp(kind, &mut doc, None, seq);
            txn.reindex(kind, &id, None, Some(&doc))?;
            txn.save(kind, &id, &doc)?;
            let mut added = Vec::new();
            if kind == ResourceKind::Group && !members.is_empty() {
                (added, _) = txn.apply_member_ops(&id, &[MemberOp::Add(members)])?;
                txn.reassign_members(&added)?;
            }
            let assignment = match kind {
                ResourceKind::User => txn.reassign(&id, &doc)?,
                ResourceKind::Group => None,
            };
            txn.log(ChangeEvent {
                seq,
                at: txn.now,
                resource_type: resource_type(kind).into(),
                id: id.clone(),
                op: ChangeOp::Created,
                snapshot: Some(doc.clone()),
                members_added: added,
                members_removed: vec![],
                assignment,
                deactivated: false,
                reactivated: false,
                deleting_user: false,
                groups: None,
            });
            Ok(to_resource(id, doc))
        })
        .await
    }

    /// Read-modify-write one resource. `f` sees the current document (with `id` and
    /// `meta`) and returns the new one; `id` and `meta` of its result are overwritten.
    /// A change that alters nothing is not written and keeps the version.
    pub async fn update(
        &self,
        tenant: &str,
        kind: ResourceKind,
        id: &str,
        if_match: Option<IfMatch>,
        f: impl FnOnce(&Value) -> Result<Update, ScimError> + Send + 'static,
    ) -> StoreResult<Resource> {
        let id = id.to_owned();
        self.write(tenant, move |txn| {
            let old = txn.load(kind, &id)?.ok_or_else(|| StoreError::NotFound {
                kind,
                id: id.clone(),
            })?;
            let current = version_of(&old);
            if let Some(cond) = &if_match
                && !cond.admits(current)
            {
                return Err(StoreError::PreconditionFailed {
                    current: etag(current),
                });
            }
            let Update { mut doc, members } = f(&old)?;
            if let Some(obj) = doc.as_object_mut() {
                obj.insert("id".into(), Value::String(id.clone()));
                if let Some(meta) = old.get("meta") {
                    obj.insert("meta".into(), meta.clone());
                }
            }
            let (added, removed) = if kind == ResourceKind::Group {
                txn.apply_member_ops(&id, &members)?
            } else {
                (vec![], vec![])
            };
            if doc == old && added.is_empty() && removed.is_empty() {
                txn.pending.clear();
                return Ok(to_resource(id, old));
            }
            let seq = txn.seq();
            let created = old.pointer("/meta/created").cloned();
            txn.stamp(kind, &mut doc, created, seq);
            txn.reindex(kind, &id, Some(&old), Some(&doc))?;
            txn.save(kind, &id, &doc)?;
            let assignment = match kind {
                ResourceKind::User => txn.reassign(&id, &doc)?,
                ResourceKind::Group => {
                    // After the save, so group rules see the group's new name. A rule names
                    // a group by displayName or externalId: when either changes, every
                    // member may gain or lose the rule's archetype, not only those added.
                    let renamed = ["displayName", "externalId"]
                        .iter()
                        .any(|k| old.get(k) != doc.get(k));
                    let mut resolve: Vec<String> = removed.clone();
                    if renamed && txn.resolver.as_ref().is_some_and(|r| r.uses_groups()) {
                        resolve.extend(txn.member_ids(&id)?);
                    } else {
                        resolve.extend(added.iter().cloned());
                    }
                    txn.reassign_members(&resolve)?;
                    None
                }
            };
            let (was_active, is_active) =
                (crate::scim::is_active(&old), crate::scim::is_active(&doc));
            let deactivated = kind == ResourceKind::User && was_active && !is_active;
            let reactivated = kind == ResourceKind::User && !was_active && is_active;
            let groups = if deactivated || reactivated {
                Some(txn.group_ids(&id)?)
            } else {
                None
            };
            if reactivated {
                txn.put(keys::reactivated(&id), seq.to_be_bytes().to_vec());
            }
            txn.log(ChangeEvent {
                seq,
                at: txn.now,
                resource_type: resource_type(kind).into(),
                id: id.clone(),
                op: ChangeOp::Updated,
                snapshot: Some(doc.clone()),
                members_added: added,
                members_removed: removed,
                assignment,
                deactivated,
                reactivated,
                deleting_user: false,
                groups,
            });
            Ok(to_resource(id, doc))
        })
        .await
    }

    /// Delete a resource, its indexes, its memberships and (for a group) its members.
    pub async fn delete(
        &self,
        tenant: &str,
        kind: ResourceKind,
        id: &str,
        if_match: Option<IfMatch>,
    ) -> StoreResult<()> {
        let id = id.to_owned();
        self.write(tenant, move |txn| {
            let old = txn.load(kind, &id)?.ok_or_else(|| StoreError::NotFound {
                kind,
                id: id.clone(),
            })?;
            if let Some(cond) = &if_match {
                let current = version_of(&old);
                if !cond.admits(current) {
                    return Err(StoreError::PreconditionFailed {
                        current: etag(current),
                    });
                }
            }
            // It leaves the groups it is a member of first, and the log says so in that
            // order: a target then removes the memberships (OneRoster enrollments) before
            // the object they name, as a group's deletion removes them before the group.
            let prefix = keys::backrefs_prefix(&id);
            for key in txn.keys_with_prefix(&prefix)? {
                let Some(gid) = keys::trailing_id(&key, prefix.len()).map(str::to_owned) else {
                    continue;
                };
                txn.del(key.clone());
                txn.del(keys::member(&gid, &id));
                txn.touch_group(&gid, id.clone(), kind == ResourceKind::User)?;
            }
            let seq = txn.seq();
            txn.reindex(kind, &id, Some(&old), None)?;
            txn.del(keys::resource(kind, &id));
            if kind == ResourceKind::User {
                txn.drop_assignment(&id, old.get("userName").and_then(Value::as_str))?;
                txn.del(keys::reactivated(&id));
            }
            let mut removed = Vec::new();
            if kind == ResourceKind::Group {
                for mid in txn.member_ids(&id)? {
                    txn.remove_member(&id, &mid, &mut removed)?;
                }
                txn.reassign_members(&removed)?;
            }
            txn.log(ChangeEvent {
                seq,
                at: txn.now,
                resource_type: resource_type(kind).into(),
                id: id.clone(),
                op: ChangeOp::Deleted,
                snapshot: None,
                members_added: vec![],
                members_removed: removed,
                assignment: None,
                deactivated: false,
                reactivated: false,
                deleting_user: false,
                groups: None,
            });
            Ok(())
        })
        .await
    }

    pub fn get(&self, tenant: &str, kind: ResourceKind, id: &str) -> StoreResult<Option<Resource>> {
        let t = self.tenant(tenant)?;
        match t.tree.get(keys::resource(kind, id))? {
            Some(b) => Ok(Some(to_resource(id.to_owned(), decode(&b)?))),
            None => Ok(None),
        }
    }

    /// Ids answering an indexed equality lookup.
    pub fn lookup(&self, tenant: &str, query: &IndexQuery) -> StoreResult<Vec<String>> {
        let t = self.tenant(tenant)?;
        let (index, value) = match query {
            IndexQuery::UserName(v) => (Index::UserName, v.to_lowercase()),
            IndexQuery::ExternalId(v) => (Index::UserExternalId, v.clone()),
            IndexQuery::Email(v) => (Index::Email, v.to_lowercase()),
            IndexQuery::Manager(v) => (Index::Manager, v.clone()),
            IndexQuery::Department(v) => (Index::Department, v.to_lowercase()),
            IndexQuery::GroupName(v) => (Index::GroupName, v.to_lowercase()),
        };
        self.lookup_index(&t, index, &value)
    }

    /// Group ids whose externalId is `value`.
    pub fn lookup_group_external_id(&self, tenant: &str, value: &str) -> StoreResult<Vec<String>> {
        let t = self.tenant(tenant)?;
        self.lookup_index(&t, Index::GroupExternalId, value)
    }

    fn lookup_index(&self, t: &Tenant, index: Index, value: &str) -> StoreResult<Vec<String>> {
        let prefix = keys::index_prefix(index, value);
        if index.is_unique() {
            return Ok(t
                .tree
                .get(&prefix)?
                .and_then(|v| String::from_utf8(v.to_vec()).ok())
                .into_iter()
                .collect());
        }
        let mut out = Vec::new();
        for k in t.tree.scan_prefix(&prefix).keys() {
            let k = k?;
            if let Some(id) = keys::trailing_id(&k, prefix.len()) {
                out.push(id.to_owned());
            }
        }
        Ok(out)
    }

    /// Every resource of a kind, in id order, streamed from disk.
    pub fn scan(
        &self,
        tenant: &str,
        kind: ResourceKind,
    ) -> StoreResult<impl Iterator<Item = StoreResult<Resource>> + use<>> {
        let t = self.tenant(tenant)?;
        let prefix = keys::resource_prefix(kind);
        let plen = prefix.len();
        Ok(t.tree.scan_prefix(prefix).map(move |kv| {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k[plen..]).into_owned();
            Ok(to_resource(id, decode(&v)?))
        }))
    }

    /// Ids of users or groups in id order, the first `skip` passed over, at most `take`:
    /// one page of an unfiltered list. Users are walked through their roster records, a
    /// sixth the size of their documents, and nothing is decoded.
    pub fn ids_page(
        &self,
        tenant: &str,
        kind: ResourceKind,
        skip: usize,
        take: usize,
    ) -> StoreResult<Vec<String>> {
        let t = self.tenant(tenant)?;
        let key = |id: &str| match kind {
            ResourceKind::User => keys::record(id),
            ResourceKind::Group => keys::resource(kind, id),
        };
        let prefix = key("");
        if skip == 0 {
            return ids_from(&t.tree, &prefix, prefix.clone(), 0, take);
        }
        if !t.pages.is_made(kind) {
            // Under the write lock, so no user or group comes or goes while counting; a
            // walk of keys only, once per tenant and kind (about a second at a million).
            let _writes = t.writes();
            if !t.pages.is_made(kind) {
                let prefixes = t.tree.scan_prefix(&prefix).keys().filter_map(|k| match k {
                    Ok(k) => paging::prefix_of(keys::trailing_id(&k, prefix.len())?).map(Ok),
                    Err(e) => Some(Err(StoreError::from(e))),
                });
                t.pages.make(kind, prefixes)?;
            }
        }
        match t.pages.locate(kind, skip) {
            Some(paging::Start::At { prefix: p, within }) => {
                let mut start = prefix.clone();
                start.extend_from_slice(&p);
                ids_from(&t.tree, &prefix, start, within, take)
            }
            Some(paging::Start::End) => Ok(Vec::new()),
            // Counts forgotten by a failed write since: count the way there instead.
            None => ids_under(&t.tree, &prefix, None, skip, take),
        }
    }

    /// How many members a group has (its member keys counted; none decoded).
    pub fn member_count(&self, tenant: &str, group: &str) -> StoreResult<u64> {
        self.count_keys(tenant, &keys::members_prefix(group))
    }

    /// A group's members, streamed.
    pub fn members(
        &self,
        tenant: &str,
        group: &str,
    ) -> StoreResult<impl Iterator<Item = StoreResult<Member>> + use<>> {
        let t = self.tenant(tenant)?;
        Ok(t.tree
            .scan_prefix(keys::members_prefix(group))
            .values()
            .map(|v| {
                let v = v?;
                decode::<Member>(&v)
            }))
    }

    /// Is `member` directly in `group`?
    pub fn is_member(&self, tenant: &str, group: &str, member: &str) -> StoreResult<bool> {
        let t = self.tenant(tenant)?;
        Ok(t.tree.contains_key(keys::member(group, member))?)
    }

    /// Whether user `id` was reactivated by a change after `seq`: inactive then, unless
    /// deactivated and reactivated since. (Reactivations before this was kept count as
    /// none.)
    pub fn reactivated_after(&self, tenant: &str, id: &str, seq: u64) -> StoreResult<bool> {
        let t = self.tenant(tenant)?;
        Ok(match t.tree.get(keys::reactivated(id))? {
            Some(v) => decode_u64(&v, "reactivation seq")? > seq,
            None => false,
        })
    }

    /// Ids of the groups `member` directly belongs to.
    pub fn groups_of(&self, tenant: &str, member: &str) -> StoreResult<Vec<String>> {
        groups_in(&self.tenant(tenant)?.tree, member)
    }

    /// Change events with `seq > since`, oldest first, at most `limit`.
    pub fn changes(&self, tenant: &str, since: u64, limit: usize) -> StoreResult<Vec<ChangeEvent>> {
        self.changes_through(tenant, since, u64::MAX, limit)
    }

    /// [`Store::changes`], none above `upto`. A count alone does not bound them: the
    /// numbers a restore skipped leave a gap, and a reader counting up to the durable
    /// watermark read (and a connector sent) changes not yet on disk past it.
    pub fn changes_through(
        &self,
        tenant: &str,
        since: u64,
        upto: u64,
        limit: usize,
    ) -> StoreResult<Vec<ChangeEvent>> {
        if since >= upto {
            return Ok(Vec::new());
        }
        let t = self.tenant(tenant)?;
        let start = keys::change(since + 1);
        let end = keys::change(upto);
        let mut out = Vec::new();
        for kv in t.tree.range(start..=end).take(limit) {
            let (_, v) = kv?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// Up to `limit` change events at or below `upto`, newest first.
    pub fn changes_back(
        &self,
        tenant: &str,
        upto: u64,
        limit: usize,
    ) -> StoreResult<Vec<ChangeEvent>> {
        let t = self.tenant(tenant)?;
        let mut out = Vec::new();
        for kv in t
            .tree
            .range(keys::change(0)..=keys::change(upto))
            .rev()
            .take(limit)
        {
            out.push(decode(&kv?.1)?);
        }
        Ok(out)
    }

    /// Remove change events up to `upto` that are more than `retention` older than `now`,
    /// or than the newest change if that is earlier, oldest first, in batches so writers
    /// interleave. Returns how many were removed.
    pub async fn compact_changes(
        &self,
        tenant: &str,
        upto: u64,
        retention: chrono::Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        // The age is measured from the newest change when the clock reads later: a clock
        // stepped a year ahead (a wrong RTC, a bad NTP answer) otherwise made every change
        // look a year old, and the feed's readers lost them all.
        let Some(newest) = newest_change_time(&self.tenant(tenant)?.tree)? else {
            return Ok(0);
        };
        let before = now.min(newest) - retention;
        let mut removed = 0u64;
        loop {
            let t = self.tenant(tenant)?;
            let mut doomed = Vec::new();
            for kv in t
                .tree
                .range(keys::change(0)..=keys::change(upto))
                .take(10_000)
            {
                let (k, v) = kv?;
                let e: ChangeEvent = decode(&v)?;
                // The log is in time order: the first young event ends the pass. (With
                // no retention, `before` is the newest change's time, which goes too.)
                if e.at > before {
                    break;
                }
                doomed.push(k.to_vec());
            }
            if doomed.is_empty() {
                return Ok(removed);
            }
            let n = doomed.len() as u64;
            self.write(tenant, move |txn| {
                for k in doomed {
                    txn.del(k);
                }
                Ok(())
            })
            .await?;
            removed += n;
        }
    }

    /// The highest sequence number compaction removed from the log: every change up to
    /// it is gone, so a cursor below it has missed changes it can never read. Sequence
    /// numbers have no holes, so it is one below the oldest change kept (or the last
    /// sequence number when nothing is kept).
    pub fn changelog_floor(&self, tenant: &str) -> StoreResult<u64> {
        let tree = &self.tenant(tenant)?.tree;
        let floor = match change_log(tree).next() {
            Some(kv) => {
                let e: ChangeEvent = decode(&kv?.1)?;
                e.seq.saturating_sub(1)
            }
            None => self.last_seq(tenant)?,
        };
        Ok(restored::floor_below_skips(
            &restored::skipped(tree)?,
            floor,
        ))
    }

    /// How many numbers in `from + 1 ..= to` no change has because a restore skipped
    /// them (see `restored.rs`): what a connector's lag, a difference of numbers, leaves
    /// out.
    pub fn skipped_between(&self, tenant: &str, from: u64, to: u64) -> StoreResult<u64> {
        let ranges = restored::skipped(&self.tenant(tenant)?.tree)?;
        Ok(restored::skipped_between(&ranges, from, to))
    }

    /// The tenant's last change sequence number.
    pub fn last_seq(&self, tenant: &str) -> StoreResult<u64> {
        u64_in(
            &self.tenant(tenant)?.tree,
            keys::SEQ_KEY,
            "sequence counter",
        )
    }

    /// Number of users or groups (one counter read).
    pub fn count(&self, tenant: &str, kind: ResourceKind) -> StoreResult<u64> {
        counts::read(&self.tenant(tenant)?.tree, counts::Counted::of(kind))
    }

    /// Users with `active: false`.
    pub fn count_inactive(&self, tenant: &str) -> StoreResult<u64> {
        counts::read(&self.tenant(tenant)?.tree, counts::Counted::Inactive)
    }

    /// Keys under `prefix`, counted without decoding a value.
    fn count_keys(&self, tenant: &str, prefix: &[u8]) -> StoreResult<u64> {
        count_under(&self.tenant(tenant)?.tree, prefix)
    }

    /// On-disk size in bytes: sled's files and the export's row files, which at a
    /// million users are another 384 MB an operator sizing a disk needs to see.
    pub fn size_on_disk(&self) -> StoreResult<u64> {
        let dir = self.inner.dir.join(ROWS_DIR);
        let rows: u64 = match std::fs::read_dir(&dir) {
            // An entry gone between the listing and its metadata is a row file being
            // replaced by its rebuilt copy, which the listing also holds.
            Ok(entries) => entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .filter(std::fs::Metadata::is_file)
                .map(|m| m.len())
                .sum(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(rows::io(&dir, e)),
        };
        Ok(self.inner.db.size_on_disk()? + rows)
    }

    /// Flush everything and stop the flusher. Safe to call more than once.
    pub fn close(&self) -> StoreResult<()> {
        self.close_with(|| ())
    }

    /// [`Store::close`], running `between` after the last flush and before the export's
    /// row files are sealed: where a test puts a write that arrives during the close.
    fn close_with(&self, between: impl FnOnce()) -> StoreResult<()> {
        let ticket = self.inner.commit.ticket();
        let _ = self.inner.commit.wait_blocking(ticket);
        self.inner.commit.stop();
        let tenants: Vec<Arc<Tenant>> = self
            .inner
            .tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        // Writes wait until the row files are sealed. One still in flight (a
        // reclassification's batch, a request past the drain deadline) that landed between
        // the token and the seal would be in a file vouched for, and perhaps never reach
        // the disk in the store; after the seal, its slot write unseals the file first.
        let writes: Vec<_> = tenants.iter().map(|t| t.writes()).collect();
        // Not sealed, a row file is built again at the next open: slower, never wrong.
        let sealing: Vec<&rows::RowFile> = tenants
            .iter()
            .filter_map(|t| {
                let rows = t.rows.as_ref()?;
                rows.prepare_seal(&t.tree).ok().map(|()| rows)
            })
            .collect();
        let flushed =
            self.inner.db.flush().map(drop).map_err(|e| {
                format!("{e}; changes made since the last successful flush may be lost")
            });
        between();
        if flushed.is_ok() && self.failure().is_none() {
            for rows in sealing {
                if let Err(e) = rows.seal() {
                    tracing::warn!(error = %e, "Cannot seal the export's copy of the roster records; the next start builds it again.");
                }
            }
        }
        drop(writes);
        flushed
            .and_then(|()| match self.failure() {
                Some(f) => Err(format!("the store had failed: {}", f.error)),
                None => Ok(()),
            })
            .map_err(|message| StoreError::FinalFlush {
                dir: self.inner.dir.clone(),
                message,
            })
    }

    /// Let go of a handle after [`Store::close`]. The last one is leaked instead: dropped,
    /// sled flushes again, and that flush can wait for good (sled issue #1412). Only a
    /// runtime shutting down under a stop (a test's, whose daemon task is dropped while
    /// its close runs) leaves the closing task with the last handle; the close flushed
    /// everything already, and the process is ending.
    pub fn release_after_close(self) {
        if Arc::strong_count(&self.inner) == 1 {
            std::mem::forget(self);
        }
    }

    /// The unrecoverable storage error this store hit, if any.
    pub fn failure(&self) -> Option<StoreFailure> {
        self.inner.commit.failure()
    }

    /// Changes to [`Store::failure`].
    pub fn watch_failure(&self) -> tokio::sync::watch::Receiver<Option<StoreFailure>> {
        self.inner.commit.watch_failure()
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_stepped_back_does_not_stamp_writes_earlier() {
        let t0 = Utc::now();
        let at = |s: i64| t0 + chrono::Duration::seconds(s);
        let mut clock = WriteClock {
            last: DateTime::<Utc>::MIN_UTC,
            behind: false,
        };
        let stamps: Vec<_> = [0, 5, 2, 3, 5, 7]
            .into_iter()
            .map(|s| clock.stamp("t", at(s)))
            .collect();
        assert_eq!(stamps, [at(0), at(5), at(5), at(5), at(5), at(7)]);
        assert!(!clock.behind);
    }

    fn user(name: &str) -> Value {
        json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": name,
               "emails": [{"value": format!("{name}@x.test")}]})
    }

    #[tokio::test]
    async fn a_failed_flush_marks_the_store_failed_until_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        store
            .create("t", ResourceKind::User, user("before"), vec![])
            .await
            .unwrap();
        assert!(store.failure().is_none());

        fail_next_flush_in(dir.path());
        let err = store
            .create("t", ResourceKind::User, user("during"), vec![])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotDurable(_)), "{err}");
        let failure = store.failure().expect("marked failed");
        assert!(failure.error.contains("No space left"), "{}", failure.error);

        // The flusher would succeed now, but sled would not: writes stay refused.
        let err = store
            .create("t", ResourceKind::User, user("after"), vec![])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Failed(_)), "{err}");
        assert!(err.to_string().contains("restart rosterd"), "{err}");

        let err = store.close().unwrap_err().to_string();
        assert!(
            err.contains("at shutdown") && err.contains(&dir.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn an_empty_snapshot_file_is_named_in_the_open_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            store.close().unwrap();
        }
        let snap = dir.path().join("snap.00000000FFFFFFFF");
        std::fs::write(&snap, b"").unwrap();
        let err = match crate::store::testing::past_the_lock(|| Store::open(dir.path())) {
            Ok(_) => panic!("sled opened a directory with an empty snapshot"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&dir.path().display().to_string())
                && err.contains(&snap.display().to_string())
                && err.contains("Move them out"),
            "{err}"
        );
        // Moving the file away is the fix the message gives.
        std::fs::remove_file(&snap).unwrap();
        crate::store::testing::when_unlocked(|| Store::open(dir.path()));
    }

    /// A snapshot sled had not finished writing (`.generating`, left empty by a start on
    /// a full disk) made every later start fail as corrupt; it is removed at the open,
    /// but never under a store that holds the directory.
    #[test]
    fn an_unfinished_snapshot_is_removed_at_the_open_and_only_then() {
        let dir = closed_store_with_users(3);
        let snap = dir.path().join("snap.00000000FFFFFFFF.generating");
        std::fs::write(&snap, b"").unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        assert!(!snap.exists());
        assert_eq!(store.count("t", ResourceKind::User).unwrap(), 3);
        // Another process's open while this one holds the store leaves the file alone.
        std::fs::write(&snap, b"").unwrap();
        let e = Store::open(dir.path()).err().expect("opened a held store");
        assert!(e.held_elsewhere(), "{e}");
        assert!(snap.exists());
        store.close().unwrap();
    }

    /// A store with something in it, closed; the directory is returned.
    fn closed_store_with_users(n: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let rt = crate::store::testing::runtime();
        rt.block_on(async {
            for i in 0..n {
                let doc = json!({
                    "schemas": [crate::scim::schema::USER_SCHEMA],
                    "userName": format!("user{i}@x.test"),
                    "title": "Engineer ".repeat(20),
                });
                store
                    .create("t", ResourceKind::User, doc, vec![])
                    .await
                    .unwrap();
            }
        });
        store.close().unwrap();
        dir
    }

    #[test]
    fn a_data_directory_made_by_rosterd_is_its_users_alone() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("new").join("data");
        Store::create_private_dir(&dir).unwrap();
        for d in [&dir, &root.path().join("new")] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        // One that exists keeps the mode its operator gave it.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        Store::create_private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o750);
    }

    #[test]
    fn a_log_that_holds_none_of_the_store_is_refused() {
        let dir = closed_store_with_users(3);
        std::fs::write(dir.path().join("db"), vec![0xa5; 5000]).unwrap();
        for (snap, _) in snapshot_files(dir.path()) {
            std::fs::remove_file(snap).unwrap();
        }
        let err = match crate::store::testing::past_the_lock(|| Store::open(dir.path())) {
            Ok(_) => panic!("opened a garbled log as an empty store"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("found none of the store's data")
                && err.contains("restore it from a backup")
                && err.contains("taken while rosterd was running"),
            "{err}"
        );
    }

    #[test]
    fn a_lost_log_file_is_refused_not_opened_as_an_empty_store() {
        let dir = closed_store_with_users(3);
        assert!(dir.path().join(STORE_MARKER).is_file());
        let db = dir.path().join("db");
        for lose in [
            (|db: &Path| std::fs::write(db, b"").unwrap()) as fn(&Path),
            |db: &Path| std::fs::remove_file(db).unwrap(),
        ] {
            lose(&db);
            let err = match crate::store::testing::past_the_lock(|| Store::open(dir.path())) {
                Ok(_) => panic!("opened a store whose log is gone, as an empty one"),
                Err(e) => e.to_string(),
            };
            assert!(
                err.contains(&dir.path().display().to_string())
                    && err.contains("`db` is missing or empty")
                    && err.contains("Restore the directory from a backup"),
                "{err}"
            );
        }
        // A new directory is still a new store, and gets its marker.
        let fresh = tempfile::tempdir().unwrap();
        crate::store::testing::when_unlocked(|| Store::open(fresh.path()));
        assert!(fresh.path().join(STORE_MARKER).is_file());
    }

    #[test]
    fn damaged_files_are_an_open_error_with_a_way_out_not_a_panic() {
        // sled panics on some damaged logs (a large one cut short); a small test store
        // does not reproduce it, so the panic is sled's message, raised in its place.
        let dir = tempfile::tempdir().unwrap();
        let err = engine_panic_as_error(dir.path(), || {
            std::panic::resume_unwind(Box::new("tried to serialize Uninitialized"))
        })
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&dir.path().display().to_string())
                && err.contains("tried to serialize Uninitialized")
                && err.contains("the store's files are damaged")
                && err.contains("restore it from a backup")
                && err.contains("taken while rosterd was running"),
            "{err}"
        );

        // A damaged snapshot: the message says to move it aside first, which works.
        let dir = closed_store_with_users(50);
        // sled snapshots after a million operations; this one is cut short part-way.
        std::fs::write(dir.path().join("snap.0000000000000100"), vec![0x5a; 1000]).unwrap();
        let snaps = snapshot_files(dir.path());
        let err = match crate::store::testing::past_the_lock(|| Store::open(dir.path())) {
            Ok(_) => panic!("opened a store with a garbage snapshot"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("move the snapshot file(s) out of it")
                && err.contains(&snaps[0].0.display().to_string()),
            "{err}"
        );
        for (snap, _) in &snaps {
            std::fs::remove_file(snap).unwrap();
        }
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        assert_eq!(store.count("t", ResourceKind::User).unwrap(), 50);
    }

    #[test]
    fn a_store_in_use_names_the_directory_and_the_likely_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _held = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let err = match Store::open(dir.path()) {
            Ok(_) => panic!("opened a store another handle holds"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&format!(
                "another rosterd (or process) is using {}",
                dir.path().display()
            )),
            "{err}"
        );
    }

    /// Writes that are polled once and then left (as a connector's deliveries are while
    /// its loop awaits a write of its cursor) must not keep the tenant's turns: another
    /// write of the tenant still goes through, and so do the left ones once polled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_left_unpolled_do_not_hold_the_tenants_turn() {
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let mut left = Vec::new();
        for i in 0..2 * WRITERS_AT_THE_LOCK {
            let s = store.clone();
            let mut f = async move {
                s.create("t", ResourceKind::User, user(&format!("left{i}")), vec![])
                    .await
            }
            .boxed();
            // Polled once, a write is nearly always left waiting. On a loaded machine
            // (CI beside a helper's audit) its task once wrote and flushed before that
            // poll returned: done, it holds nothing.
            match f.as_mut().now_or_never() {
                None => left.push(f),
                Some(done) => assert!(done.is_ok()),
            }
        }
        let another = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            store.create("t", ResourceKind::User, user("another"), vec![]),
        )
        .await
        .expect("a write waited behind writes nobody polls");
        assert!(another.is_ok());
        for f in left {
            assert!(f.await.is_ok());
        }
        assert_eq!(store.scan("t", ResourceKind::User).unwrap().count(), 9);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_share_flushes_and_log_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let mut tasks = Vec::new();
        for i in 0..64 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.create("t", ResourceKind::User, user(&format!("u{i}")), vec![])
                    .await
                    .unwrap()
            }));
        }
        let mut versions = Vec::new();
        for t in tasks {
            versions.push(t.await.unwrap().version);
        }
        versions.sort();
        assert_eq!(versions, (1..=64).collect::<Vec<u64>>());
        assert_eq!(store.last_seq("t").unwrap(), 64);
        let log = store.changes("t", 0, 1000).unwrap();
        assert_eq!(log.len(), 64);
        assert!(log.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        // Another tenant's log is separate.
        assert_eq!(store.last_seq("other").unwrap(), 0);
        store.close().unwrap();
        drop(store);
        let reopened = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        assert_eq!(reopened.scan("t", ResourceKind::User).unwrap().count(), 64);
        assert_eq!(
            reopened
                .lookup("t", &IndexQuery::Email("U7@X.TEST".into()))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_directory_of_other_files_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        // What a dedicated volume or a desktop leaves is not a reason to refuse.
        let volume = tempfile::tempdir().unwrap();
        std::fs::create_dir(volume.path().join("lost+found")).unwrap();
        std::fs::write(volume.path().join(".DS_Store"), "x").unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(volume.path()));
        store.close().unwrap();
        drop(store);
        std::fs::write(dir.path().join("db"), vec![7u8; 10_000]).unwrap();
        let err = Store::open(dir.path()).err().expect("refused").to_string();
        assert!(err.contains("notes.txt") && err.contains("db"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("db")).unwrap(),
            vec![7u8; 10_000]
        );
        // An empty directory is a new store, and a store opens again.
        let fresh = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(fresh.path()));
        store.close().unwrap();
        drop(store);
        let again = crate::store::testing::when_unlocked(|| Store::open(fresh.path()));
        again.close().unwrap();
    }

    #[test]
    fn a_write_that_changes_nothing_waits_for_the_state_it_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        // With the flusher stopped, nothing written from here on becomes durable.
        store.inner.commit.stop();
        let (_, written) = store
            .write_sync("t", |txn| {
                txn.put(b"k".to_vec(), b"v".to_vec());
                Ok(())
            })
            .unwrap();
        let (written, _) = written.expect("a write takes a ticket");
        // A retry that finds the state already there must not be acknowledged before
        // that state is durable: it waits on a ticket at least as new.
        let (_, noop) = store.write_sync("t", |_| Ok(())).unwrap();
        let (waits_for, _) = noop.expect("a no-op after an unflushed write waits");
        assert!(waits_for >= written, "{waits_for} < {written}");
    }

    /// Groups that shared a displayName before it was held unique (a store from before)
    /// stay writable under it, in any letter case; a new group, or a rename, may not take
    /// it.
    #[tokio::test]
    async fn groups_that_already_share_a_name_stay_writable_and_no_other_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let group = |name: &str| json!({"displayName": name});
        let a = store
            .create("t", ResourceKind::Group, group("Finance"), vec![])
            .await
            .unwrap();
        let b = store
            .create("t", ResourceKind::Group, group("Sales"), vec![])
            .await
            .unwrap();
        // What an older store holds: b renamed onto a's name, index and all.
        let bid = b.id.clone();
        store
            .write_sync("t", move |txn| {
                let mut doc = txn.load(ResourceKind::Group, &bid)?.unwrap();
                doc["displayName"] = json!("Finance");
                txn.put(keys::resource(ResourceKind::Group, &bid), encode(&doc)?);
                txn.del(keys::index_entry(Index::GroupName, "sales", &bid));
                txn.put(
                    keys::index_entry(Index::GroupName, "finance", &bid),
                    keys::index_value(Index::GroupName, &bid),
                );
                Ok(())
            })
            .unwrap();
        for (id, name) in [(&b.id, "Finance"), (&b.id, "FINANCE"), (&a.id, "finance")] {
            let name = name.to_owned();
            store
                .update("t", ResourceKind::Group, id, None, move |doc| {
                    let mut doc = doc.clone();
                    doc["displayName"] = json!(name);
                    Ok(Update {
                        doc,
                        members: vec![],
                    })
                })
                .await
                .unwrap();
        }
        let e = store
            .create("t", ResourceKind::Group, group("FiNaNcE"), vec![])
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Uniqueness(_)), "{e}");
        let c = store
            .create("t", ResourceKind::Group, group("Ops"), vec![])
            .await
            .unwrap();
        let e = store
            .update("t", ResourceKind::Group, &c.id, None, |doc| {
                let mut doc = doc.clone();
                doc["displayName"] = json!("finance");
                Ok(Update {
                    doc,
                    members: vec![],
                })
            })
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Uniqueness(_)), "{e}");
    }

    /// A user's removal from its groups is logged ahead of its deletion and marked as
    /// part of it (a connector's guard counts it with the deletion); a member's removal
    /// by a group's own deletion, or a nested group's deletion, is not.
    #[tokio::test]
    async fn a_deleted_users_removal_from_its_groups_is_marked_as_its_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let mut ids = Vec::new();
        for name in ["leaver", "stayer"] {
            let u = store
                .create("t", ResourceKind::User, user(name), vec![])
                .await
                .unwrap();
            ids.push(u.id);
        }
        let m = |id: &str| MemberRef {
            value: id.to_owned(),
            kind: None,
            display: None,
        };
        let inner = store
            .create(
                "t",
                ResourceKind::Group,
                json!({"displayName": "inner"}),
                vec![],
            )
            .await
            .unwrap();
        let g = store
            .create(
                "t",
                ResourceKind::Group,
                json!({"displayName": "g"}),
                vec![m(&ids[0]), m(&ids[1]), m(&inner.id)],
            )
            .await
            .unwrap();
        let from = store.last_seq("t").unwrap();
        for (kind, id) in [
            (ResourceKind::User, &ids[0]),
            (ResourceKind::Group, &inner.id),
            (ResourceKind::Group, &g.id),
        ] {
            store.delete("t", kind, id, None).await.unwrap();
        }
        let logged: Vec<(String, ChangeOp, Vec<String>, bool)> = store
            .changes("t", from, 10)
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.op, e.members_removed, e.deleting_user))
            .collect();
        assert_eq!(
            logged,
            [
                (g.id.clone(), ChangeOp::Updated, vec![ids[0].clone()], true),
                (ids[0].clone(), ChangeOp::Deleted, vec![], false),
                (
                    g.id.clone(),
                    ChangeOp::Updated,
                    vec![inner.id.clone()],
                    false
                ),
                (inner.id.clone(), ChangeOp::Deleted, vec![], false),
                (g.id.clone(), ChangeOp::Deleted, vec![ids[1].clone()], false),
            ]
        );
    }

    #[tokio::test]
    async fn membership_ops_see_their_own_pending_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let a = store
            .create("t", ResourceKind::User, user("a"), vec![])
            .await
            .unwrap();
        let b = store
            .create("t", ResourceKind::User, user("b"), vec![])
            .await
            .unwrap();
        let m = |id: &str| MemberRef {
            value: id.to_owned(),
            kind: None,
            display: None,
        };
        let g = store
            .create(
                "t",
                ResourceKind::Group,
                json!({"displayName": "g"}),
                vec![m(&a.id)],
            )
            .await
            .unwrap();
        let (aid, bid) = (a.id.clone(), b.id.clone());
        let updated = store
            .update("t", ResourceKind::Group, &g.id, None, move |doc| {
                Ok(Update {
                    doc: doc.clone(),
                    members: vec![
                        MemberOp::Add(vec![m(&bid), m(&bid)]),
                        MemberOp::ReplaceAll(vec![m(&bid)]),
                    ],
                })
            })
            .await
            .unwrap();
        assert!(updated.version > g.version);
        let members: Vec<String> = store
            .members("t", &g.id)
            .unwrap()
            .map(|m| m.unwrap().value)
            .collect();
        assert_eq!(members, vec![b.id.clone()]);
        assert_eq!(store.groups_of("t", &aid).unwrap(), Vec::<String>::new());
        assert_eq!(store.groups_of("t", &b.id).unwrap(), vec![g.id.clone()]);
        let last = store.changes("t", updated.version - 1, 10).unwrap();
        assert_eq!(last[0].members_added, vec![b.id.clone()]);
        assert_eq!(last[0].members_removed, vec![aid]);

        // A no-op update writes nothing and keeps the version.
        let same = store
            .update("t", ResourceKind::Group, &g.id, None, |doc| {
                Ok(Update {
                    doc: doc.clone(),
                    members: vec![],
                })
            })
            .await
            .unwrap();
        assert_eq!(same.version, updated.version);
    }

    #[test]
    fn root_does_not_open_another_users_store_offline() {
        let dir = closed_store_with_users(1);
        if euid() != 0 {
            // Only root can give the directory away; as another user there is nothing to
            // refuse.
            Store::open_existing(dir.path(), 1 << 20)
                .unwrap()
                .close()
                .unwrap();
            return;
        }
        let chown = |uid: u32| std::os::unix::fs::chown(dir.path(), Some(uid), None).unwrap();
        let files = || {
            let mut all: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| {
                    let m = e.metadata().unwrap();
                    (e.file_name(), m.len(), m.modified().unwrap())
                })
                .collect();
            all.sort();
            all
        };
        let before = files();
        chown(65534);
        let e = Store::open_existing(dir.path(), 1 << 20)
            .err()
            .expect("refused");
        let text = e.to_string();
        assert!(
            text.contains("belongs to uid 65534") && text.contains("sudo -u rosterd"),
            "{text}"
        );
        assert_eq!(files(), before, "nothing is written as root");
        chown(0);
        let store = past_the_lock(|| Store::open_existing(dir.path(), 1 << 20)).unwrap();
        store.close().unwrap();
    }

    #[test]
    fn unknown_layout_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = crate::store::testing::when_unlocked(|| sled::open(dir.path()));
            db.insert(SCHEMA_VERSION_KEY, b"99").unwrap();
            db.flush().unwrap();
        }
        assert!(matches!(
            crate::store::testing::past_the_lock(|| Store::open(dir.path())),
            Err(StoreError::UnknownSchema { found: 99 })
        ));
    }

    #[test]
    fn an_interrupted_write_is_completed_when_the_tenant_opens() {
        let dir = tempfile::tempdir().unwrap();
        let ops: Vec<Op> = vec![
            (b"k1".to_vec(), Some(b"v1".to_vec())),
            (b"k2".to_vec(), Some(b"v2".to_vec())),
            (b"gone".to_vec(), None),
        ];
        {
            // What a crash after the redo record and the first key leaves behind.
            let db = crate::store::testing::when_unlocked(|| sled::open(dir.path()));
            db.insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION.to_string().as_bytes())
                .unwrap();
            let tree = db.open_tree("tenant/t").unwrap();
            tree.insert(b"gone", b"x".to_vec()).unwrap();
            tree.insert(keys::INTENT_KEY, encode_ops(&ops)).unwrap();
            tree.insert(b"k1", b"v1".to_vec()).unwrap();
            db.flush().unwrap();
        }
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let t = store.tenant("t").unwrap();
        assert_eq!(t.tree.get(b"k2").unwrap().as_deref(), Some(&b"v2"[..]));
        assert_eq!(t.tree.get(b"gone").unwrap(), None);
        assert_eq!(t.tree.get(keys::INTENT_KEY).unwrap(), None);
        assert_eq!(decode_ops(&encode_ops(&ops)).unwrap(), ops);
        assert!(decode_ops(b"\0\0\0\x09short").is_err());
    }

    #[test]
    fn one_tenants_crowd_of_writers_does_not_queue_another_tenants_write_behind_it() {
        // Two blocking threads, as if the rest of the pool were taken: a's 200 writers
        // queued there for their lock put b's write behind all of them.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let order = rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            store
                .create("b", ResourceKind::User, user("warm"), vec![])
                .await
                .unwrap();
            let done = Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for i in 0..200 {
                let (s, done) = (store.clone(), done.clone());
                tasks.push(tokio::spawn(async move {
                    s.create("a", ResourceKind::User, user(&format!("a{i}")), vec![])
                        .await
                        .unwrap();
                    done.lock().unwrap().push("a");
                }));
            }
            tokio::task::yield_now().await;
            let (s, d) = (store.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                s.create("b", ResourceKind::User, user("b"), vec![])
                    .await
                    .unwrap();
                d.lock().unwrap().push("b");
            }));
            for t in tasks {
                t.await.unwrap();
            }
            done.lock().unwrap().clone()
        });
        assert_eq!(order.len(), 201);
        let b = order.iter().position(|w| *w == "b").unwrap();
        assert!(b < 50, "b's write finished {b}th of 201");
    }

    #[tokio::test]
    async fn a_restart_stamps_writes_no_earlier_than_the_last_change() {
        let dir = tempfile::tempdir().unwrap();
        let at = {
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            store
                .create("t", ResourceKind::User, user("a"), vec![])
                .await
                .unwrap();
            // No governance event: the store alone assigns no archetype.
            assert!(
                roster::last_event_time(&store.tenant("t").unwrap().tree)
                    .unwrap()
                    .is_none()
            );
            store.changes("t", 0, 1).unwrap()[0].at
        };
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        // A clock stepped back an hour before this start stamps the next write no earlier.
        let stamped = store
            .tenant("t")
            .unwrap()
            .writes()
            .stamp("t", at - chrono::Duration::hours(1));
        assert_eq!(stamped, at);
    }

    #[tokio::test]
    async fn compaction_measures_age_from_the_newest_change_when_the_clock_is_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        for name in ["a", "b", "c"] {
            store
                .create("t", ResourceKind::User, user(name), vec![])
                .await
                .unwrap();
        }
        let week = chrono::Duration::hours(168);
        // The clock a year ahead: the changes are seconds old, not a year.
        let ahead = Utc::now() + chrono::Duration::days(365);
        assert_eq!(store.compact_changes("t", 3, week, ahead).await.unwrap(), 0);
        assert_eq!(store.changes("t", 0, 10).unwrap().len(), 3);
        // Without retention everything up to the cursor goes, the newest change too.
        let zero = chrono::Duration::zero();
        assert_eq!(
            store
                .compact_changes("t", 3, zero, Utc::now())
                .await
                .unwrap(),
            3
        );
        assert_eq!(store.changelog_floor("t").unwrap(), 3);
    }

    #[tokio::test]
    async fn a_change_of_active_is_logged_as_a_deactivation_or_a_reactivation() {
        use crate::store::testing::{create_user, set_user, user as doc};
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let id = create_user(&store, doc("ada", "Chef", true)).await;
        set_user(&store, &id, "Chef", false).await;
        set_user(&store, &id, "Cook", false).await;
        set_user(&store, &id, "Cook", true).await;
        set_user(&store, &id, "Chef", true).await;
        let flags = |log: Vec<ChangeEvent>| -> Vec<(bool, bool)> {
            log.iter().map(|e| (e.deactivated, e.reactivated)).collect()
        };
        let expected = [
            (false, false),
            (true, false),
            (false, false),
            (false, true),
            (false, false),
        ];
        assert_eq!(flags(store.changes("t", 0, 10).unwrap()), expected);
        store.close().unwrap();
        drop(store);
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        assert_eq!(flags(store.changes("t", 0, 10).unwrap()), expected);
        // A change logged before the field existed.
        let old: ChangeEvent = decode(
            br#"{"seq":3,"at":"2024-05-01T00:00:00Z","resource_type":"User","id":"u","op":"updated"}"#,
        )
        .unwrap();
        assert!(!old.reactivated && !old.deactivated);
    }
}
