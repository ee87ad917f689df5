//! The roster store: users, groups, their secondary indexes, group membership in both
//! directions and a per-tenant change log, on an embedded sled database.
//!
//! Every write to a tenant runs under that tenant's write lock, reads through an overlay of
//! its own pending writes, and lands as one atomic sled batch that also appends the change
//! events it produced. Callers get control back only after the group-commit flusher has
//! made the batch durable. No sled type appears in this module's public API, so another
//! engine can take its place behind the same functions.
//!
//! Where each part is: `open` opens the store, `data_dir` refuses a directory that is not
//! one to open (and keeps its marker files), `upgrade` brings an older layout to this one,
//! and `close` ends it; `tenants` opens a tenant's data at its first use. A write is a
//! `txn` (its pending writes and the redo record that lands them), which `write` runs
//! under the tenant's lock and `commit` makes durable. `resources` are the users and
//! groups written and read, `changes` the change log, `roster` the archetype assignments,
//! governance events and jobs, `delivery` what connectors sent; `keys` lays out the keys,
//! and `record`, `counts`, `paging` and `rows` are kept from them (roster records,
//! counters, page starts, the export's row file), which `check` verifies and repairs.
//! `backup` and `rewrite` copy a store, `restored` moves a served backup's numbers on,
//! `run` records whether the last run ended cleanly, and `error` is how the store fails.

mod backup;
mod changes;
mod check;
mod close;
mod commit;
mod counts;
mod data_dir;
mod delivery;
mod error;
mod keys;
mod open;
mod paging;
mod record;
mod resources;
mod restored;
mod rewrite;
mod roster;
mod rows;
mod run;
mod tenants;
mod txn;
mod upgrade;
mod write;
pub use backup::BackedUp;
pub use check::{LISTED as CHECK_LISTED, TenantCheck};
pub use data_dir::written_as_backup;
pub use error::{
    INTERNAL_ERROR_MESSAGE, OUTAGE_RETRY_AFTER_SECS, StoreError, StoreFailure, StoreResult,
};
pub(crate) use open::past_the_lock;
pub use rewrite::{Rewritten, rewrite};
pub(crate) use rows::id_key;
pub use run::{RunRecord, daemon_serving};
#[cfg(test)]
mod testing;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::scim::ResourceKind;
use crate::scim::patch::MemberOp;
use crate::scim::schema::ENTERPRISE_USER_SCHEMA;
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

// Named by the files beside this one as `super::…`.
use data_dir::{
    BACKUP_INCOMPLETE, BACKUP_WHOLE, INCOMPLETE_TEXT, MARKER_TEXT, STORE_MARKER, WHOLE_TEXT,
    require_store,
};
use open::open_error;
use txn::{Applied, Op, Txn, recover_intent};
use upgrade::{UpgradeWriter, stored_schema};

// Named by the tests beside this one as `super::super::…`.
#[cfg(test)]
use crate::scim::patch::MemberRef;
#[cfg(test)]
use txn::encode_ops;

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

/// The directory of the export's row files (see `rows.rs`).
const ROWS_DIR: &str = "rows";

/// The tenant's export row file in the data directory `dir` (see `rows.rs`).
fn rows_path(dir: &Path, tenant: &str) -> PathBuf {
    dir.join(ROWS_DIR)
        .join(format!("{}.rows", hex::encode(tenant)))
}

/// The ids of the groups `member` is a direct member of, in `tree`.
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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

    pub(super) fn user(name: &str) -> Value {
        json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": name,
               "emails": [{"value": format!("{name}@x.test")}]})
    }
}
