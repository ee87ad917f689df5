//! Reconciliation: compare what each connector last delivered (a content hash per object)
//! with what the roster holds now, and send again what drifted. A OneRoster connector can
//! also read the target back (`filter=dateLastModified>…`) and repair objects that were
//! changed or deleted there behind rosterd's back.
//!
//! The change feed is the fast path; this is the safety net for what it cannot see: a
//! bundle change's side effects, a dead letter discarded by mistake, a target restored
//! from an old backup, a person editing the target by hand.

use chrono::Utc;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tracing::Instrument;

use super::seqs::Seqs;
use super::{Acked, Ctx, DispatchError, Dispatcher, Sent, Target};
use crate::connectors::csv::CsvError;
use crate::connectors::http::Request;
use crate::connectors::oneroster::{
    Deactivate, OneRosterSettings, Write, class_delete, class_put, content_hash, course_put,
    enrollment_delete, enrollment_put, group_key, held_downstream, member_key, stored_user_write,
    user_delete, user_key,
};
use crate::scim::ResourceKind;
use crate::store::{ChangeEvent, ChangeOp, IndexQuery, Store, StoreError};

/// The delivered hash of an object a full run meant to send again and did not: no
/// content hashes to it (a 64-bit hash is 0 once in 2^64), so the next run sends the
/// object again, or deletes it if the roster no longer has it.
const UNCONFIRMED: u64 = 0;

const OWED_FULL_NOTE: &str = "run full: a full reconciliation of this connector was cut off before it had marked what it was to send";

/// A reconciliation records the hashes of what it sent every so many objects.
const PROGRESS_EVERY: usize = 2_000;

/// A CSV connector's report while its guard holds it: its files are not written.
pub const HELD_CSV_NOTE: &str = "not written: the connector is held by its [guard]";

/// The report of a connector switched off (`enabled = false`).
pub const DISABLED_NOTE: &str =
    "disabled (`enabled = false`): not reconciled; its changes wait for it";

/// A CSV connector's report when it has a `schedule` of its own: not written here.
pub const OWN_SCHEDULE_CSV_NOTE: &str = "writes its files on its own schedule (connector key `csv.schedule`), not at a reconciliation or the `export` schedule";

/// Why every object drifts in a full reconciliation.
const FULL: &str = "sent again in full";

/// Items listed in a report; the counts are always complete.
const LISTED: usize = 200;

/// Pages one read-back asks for at most. Generous (ten million users at `limit=1000`, a
/// million from a target that caps pages at 100), but finite: a target that keeps
/// answering new pages past it is not paging, and the job must end.
const READ_BACK_MAX_PAGES: usize = 10_000;

/// What a reconciliation does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileMode {
    /// Only report what would be sent.
    pub dry_run: bool,
    /// Send every object again, whatever was delivered before, the course included: for a
    /// target that lost data (rebuilt empty, restored from an old backup). Comparing with
    /// what was delivered finds nothing missing there, and a read-back reads only the
    /// records that are left. Objects with changes waiting for the connector are sent
    /// too: the target may no longer hold what those changes' requests refer to.
    pub full: bool,
}

/// One object to send again.
#[derive(Debug, Clone, Serialize)]
pub struct DriftItem {
    /// `User/<id>`, `Group/<id>` or `Member/<group>/<user>`.
    pub object: String,
    /// `put` or `delete`.
    pub action: &'static str,
    pub reason: String,
    #[serde(skip)]
    request: Option<Request>,
    /// Recorded as delivered once sent; `None` removes the record (a delete, the course).
    #[serde(skip)]
    hash: Option<u64>,
    /// Found by the read-back.
    #[serde(skip)]
    at_target: bool,
}

/// What reconciliation found (and, unless a dry run, did) for one connector.
#[derive(Debug, Default, Serialize)]
pub struct DriftReport {
    pub connector: String,
    pub kind: &'static str,
    pub checked: u64,
    pub drifted: u64,
    /// Of `checked`, those left to the change feed: a change to them waits in the log
    /// for this connector (or was logged while the reconciliation ran) and sends them as
    /// they now stand, so sending them here too would make the target take them twice.
    pub pending: u64,
    /// Of `drifted`, those the read-back found changed or soft-deleted at the target.
    pub found_at_target: u64,
    pub sent: u64,
    pub failed: u64,
    /// Objects that cannot be expressed downstream (e.g. a user without an email).
    pub unmappable: u64,
    pub note: Option<String>,
    /// Why reading users back from the target ended before the end of its window (a
    /// failed request, a target that ignores `offset`); what was read is still repaired.
    pub read_back_stopped: Option<String>,
    /// Why re-sending stopped before the end: the connector is paused (its target kept
    /// failing, or answered 410). What was not sent counts in `failed`.
    pub paused: Option<String>,
    /// Why nothing was checked or re-sent: the connector is not loaded (its file does not
    /// load, or no file names it since the last stop), so its changes wait for it.
    pub not_loaded: Option<String>,
    /// The first drifted objects.
    pub items: Vec<DriftItem>,
}

impl DriftItem {
    fn from_write(w: Write, reason: String) -> DriftItem {
        DriftItem {
            action: if w.hash.is_some() { "put" } else { "delete" },
            object: w.key,
            reason,
            request: Some(w.request),
            hash: w.hash,
            at_target: false,
        }
    }
}

impl DriftReport {
    /// `item`, found drifted, is left to a change logged since.
    fn left_to_mirror(&mut self, item: &DriftItem) {
        self.drifted -= 1;
        self.pending += 1;
        if item.at_target {
            self.found_at_target -= 1;
        }
        self.items.retain(|i| i.object != item.object);
        tracing::debug!(object = %item.object, "Left to a change logged while reconciling.");
    }

    fn push(&mut self, item: DriftItem, all: &mut Vec<DriftItem>) {
        self.drifted += 1;
        if self.items.len() < LISTED {
            self.items.push(item.clone());
        }
        all.push(item);
    }
}

/// The objects that changes in the log above a connector's cursor will send. The last
/// of those changes for an object logged it as it stands (or its deletion), so the
/// mirror brings the target to where a reconciliation would.
///
/// Held as fingerprints of the keys, 8 bytes an object: a connector catching up on a
/// million changes would otherwise hold some 150 MB of key strings.
#[derive(Debug, Default)]
struct Pending {
    /// `User/…`, `Group/…` and `Member/…/…` keys.
    objects: HashSet<u64>,
    /// Users (by id) whose waiting change puts or deletes their enrollment in every group
    /// they are in: a deactivation or reactivation where deactivating deletes.
    enrollments_of: HashSet<u64>,
    /// The last change read.
    seen: u64,
    /// A change could not be read: those after it are not known (and not read again).
    unreadable: bool,
    /// Changes skipped at a hold ([`Store::guard_skipped`]).
    skipped: Seqs,
}

impl Pending {
    /// What the changes the connector `owner` has yet to acknowledge will send: above
    /// the newer of `live`'s cursor (when the connector following the log saved one) and
    /// the store's, skipping what either knows to be acknowledged.
    ///
    /// A change that cannot be read leaves what was read so far: its objects are then
    /// compared and sent as before this set existed (perhaps twice), rather than one
    /// undecodable change failing every reconciliation, the resync at a connector's
    /// start included.
    fn read(
        store: &Store,
        tenant: &str,
        owner: &str,
        s: &OneRosterSettings,
        live: Option<Acked>,
    ) -> Pending {
        let mut pending = Pending::default();
        let read = (|| {
            // The connector publishes what it saved only once the store has it, so a
            // reconciliation right after `rosterd status` showed a change delivered
            // could read the older `live` and leave that change's object to the mirror
            // (CI caught a dead-lettered user reported as not drifted). The store alone
            // keeps only the first acknowledgements above its cursor, hence both.
            pending.seen = store.cursor(tenant, owner)?;
            let mut acked: Seqs = store.acked_above(tenant, owner)?.into_iter().collect();
            if let Some(live) = live {
                pending.seen = pending.seen.max(live.cursor);
                acked.extend(&live.above);
            }
            acked.remove_through(pending.seen);
            // Skipped at a hold while a change before them was in flight: never to be
            // sent, so their objects are the reconciliation's to put right (the skip's
            // own reconciliation left them, and still said it succeeded).
            pending.skipped = Seqs::skipped(&store.guard_skipped(tenant, owner)?);
            pending.read_on(store, tenant, s, &acked)
        })();
        if let Err(e) = read {
            pending.unreadable = true;
            tracing::warn!(error = %e, after_seq = pending.seen, "Cannot read the changes waiting for this connector; the objects of those not read are compared and may be sent twice.");
        }
        pending
    }

    /// Nothing waiting, for a full run, but the changes logged from now on: the mirror
    /// delivers each with its objects as they stand then, while the run's copies date
    /// from when it read them. Sent after the mirror's, a run's copy put back a title
    /// changed meanwhile, and brought back, enabled, a user deleted meanwhile.
    fn from_now(store: &Store, tenant: &str) -> Pending {
        match store.last_seq(tenant) {
            Ok(seen) => Pending {
                seen,
                ..Pending::default()
            },
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read where the change log stands; objects changed while the full run goes on may be sent as they were when it began.");
                Pending {
                    unreadable: true,
                    ..Pending::default()
                }
            }
        }
    }

    /// Add the changes logged since the last one read, skipping `acked` (in order).
    fn read_on(
        &mut self,
        store: &Store,
        tenant: &str,
        s: &OneRosterSettings,
        acked: &Seqs,
    ) -> Result<(), StoreError> {
        loop {
            let page = store.changes(tenant, self.seen, 1000)?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            let last = last.seq;
            // A skipped change is done: the follower sends the current state of what it
            // touches once an older change of it still in flight ends (`follow_log`).
            let waiting: Vec<&ChangeEvent> = page
                .iter()
                .filter(|e| !acked.contains(e.seq) && !self.skipped.contains(e.seq))
                .collect();
            for e in waiting {
                self.add(store, tenant, s, e)?;
            }
            self.seen = last;
        }
    }

    /// The objects the mirror's plan for `e` sends (`oneroster::plan`).
    fn add(
        &mut self,
        store: &Store,
        tenant: &str,
        s: &OneRosterSettings,
        e: &ChangeEvent,
    ) -> Result<(), StoreError> {
        let mut put = |key: String| self.objects.insert(fingerprint(&key));
        match e.resource_type.as_str() {
            "User" => {
                put(user_key(&e.id));
                if e.op == ChangeOp::Deleted {
                    // The reports lose their manager with it.
                    for r in store.lookup(tenant, &IndexQuery::Manager(e.id.clone()))? {
                        put(user_key(&r));
                    }
                }
                if s.deactivate == Deactivate::Delete && (e.deactivated || e.reactivated) {
                    if e.reactivated {
                        // Back, the user's classes are put again as they stand.
                        for g in store.groups_of(tenant, &e.id)? {
                            put(group_key(&g));
                        }
                    }
                    self.enrollments_of.insert(fingerprint(&e.id));
                }
            }
            "Group" => {
                put(group_key(&e.id));
                for u in e.members_added.iter().chain(&e.members_removed) {
                    put(member_key(&e.id, u));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn user(&self, id: &str) -> bool {
        self.objects.contains(&fingerprint(&user_key(id)))
    }

    fn group(&self, id: &str) -> bool {
        self.objects.contains(&fingerprint(&group_key(id)))
    }

    /// An enrollment, as the user's group is now: a waiting deactivation or reactivation
    /// of the user puts or deletes it too.
    fn member(&self, group: &str, user: &str) -> bool {
        self.enrollments_of.contains(&fingerprint(user)) || self.enrollment_changed(group, user)
    }

    /// An enrollment a change of its group adds or removes. One that is no longer in the
    /// group is not among the enrollments a user's deactivation takes along.
    fn enrollment_changed(&self, group: &str, user: &str) -> bool {
        self.objects
            .contains(&fingerprint(&member_key(group, user)))
    }

    /// Whether a waiting change sends `object` (`User/…`, `Group/…`, `Member/…/…`),
    /// reading the changes logged since the last read first: one logged while the
    /// reconciliation ran sends the object as it stands, and a repair built earlier could
    /// land after it and put the target back.
    fn sends(
        &mut self,
        store: &Store,
        tenant: &str,
        s: &OneRosterSettings,
        object: &str,
    ) -> Result<bool, StoreError> {
        // Acknowledged or not: the repair was built before it.
        if !self.unreadable
            && let Err(e) = self.read_on(store, tenant, s, &Seqs::default())
        {
            self.unreadable = true;
            return Err(e);
        }
        self.verdict(object).resolve(store, tenant)
    }

    /// What the changes read so far say of `object`.
    fn verdict(&self, object: &str) -> Verdict {
        match object.split('/').collect::<Vec<_>>().as_slice() {
            ["User", id] => Verdict::Is(self.user(id)),
            ["Group", id] => Verdict::Is(self.group(id)),
            ["Member", g, u] if self.enrollment_changed(g, u) => Verdict::Is(true),
            ["Member", g, u] if self.enrollments_of.contains(&fingerprint(u)) => {
                Verdict::IfMember {
                    group: (*g).to_owned(),
                    user: (*u).to_owned(),
                }
            }
            _ => Verdict::Is(false),
        }
    }

    /// [`Pending::sends`] from the changes read so far, when that needs no store read (an
    /// enrollment of a user whose waiting change takes them all needs one).
    fn known(&self, object: &str) -> Option<bool> {
        if self.unreadable {
            return None;
        }
        match self.verdict(object) {
            Verdict::Is(sends) => Some(sends),
            Verdict::IfMember { .. } => None,
        }
    }

    /// [`Pending::sends`]; a change that cannot be read leaves the object to be sent.
    fn sends_or_warn(
        &mut self,
        store: &Store,
        tenant: &str,
        s: &OneRosterSettings,
        object: &str,
    ) -> bool {
        let sends = self.sends(store, tenant, s, object);
        sent_unless_known(sends, object)
    }

    /// Take in what another read of the log found (sets only grow, so reads of the same
    /// changes side by side add nothing twice).
    fn merge(&mut self, other: Pending) {
        self.objects.extend(other.objects);
        self.enrollments_of.extend(other.enrollments_of);
        self.seen = self.seen.max(other.seen);
        self.unreadable |= other.unreadable;
    }
}

/// What the waiting changes say of an object.
enum Verdict {
    Is(bool),
    /// An enrollment: sent by a waiting change of its user's state if the user is still in
    /// the class.
    IfMember {
        group: String,
        user: String,
    },
}

impl Verdict {
    fn resolve(self, store: &Store, tenant: &str) -> Result<bool, StoreError> {
        match self {
            Verdict::Is(sends) => Ok(sends),
            Verdict::IfMember { group, user } => store.is_member(tenant, &group, &user),
        }
    }
}

fn sent_unless_known(sends: Result<bool, StoreError>, object: &str) -> bool {
    sends.unwrap_or_else(|e| {
        tracing::warn!(%object, error = %e, "Cannot read the changes logged since the reconciliation began; the object is sent.");
        false
    })
}

/// [`Pending::sends_or_warn`] on the set a reconciliation's repairs share. The log is
/// read, and an enrollment looked up, without the lock: the other repairs' checks, some
/// on the runtime's threads, do not wait on a store read.
fn shared_sends(
    pending: &Mutex<Pending>,
    store: &Store,
    tenant: &str,
    s: &OneRosterSettings,
    object: &str,
) -> bool {
    let (seen, unreadable) = {
        let p = lock(pending);
        (p.seen, p.unreadable)
    };
    let verdict = if unreadable {
        lock(pending).verdict(object)
    } else {
        let mut news = Pending {
            seen,
            ..Pending::default()
        };
        let read = news.read_on(store, tenant, s, &Seqs::default());
        let mut p = lock(pending);
        // What was read is right even when the read broke off.
        p.merge(news);
        if let Err(e) = read {
            p.unreadable = true;
            return sent_unless_known(Err(e), object);
        }
        p.verdict(object)
    };
    sent_unless_known(verdict.resolve(store, tenant), object)
}

/// 8 bytes that stand for a key in a set; two keys of one tenant sharing them is
/// vanishingly unlikely (about 1 in 10^7 for a million keys).
fn fingerprint(key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// The desired OneRoster state of every object, compared with the delivered hashes.
/// Runs on the blocking pool: it walks the whole tenant, one object at a time.
fn diff(
    store: &Store,
    tenant: &str,
    hash_owner: &str,
    s: &OneRosterSettings,
    full: bool,
    pending: &Pending,
    report: &mut DriftReport,
) -> Result<Vec<DriftItem>, StoreError> {
    let mut all = Vec::new();
    let now = Utc::now();
    if full {
        report.checked += 1;
        report.push(
            DriftItem {
                object: format!("Course/{}", s.course_sourced_id),
                action: "put",
                reason: FULL.into(),
                request: Some(course_put(s, now)),
                hash: None,
                at_target: false,
            },
            &mut all,
        );
    }
    // An object drifted when what would be sent now differs from what was acknowledged.
    let mut check = |report: &mut DriftReport, w: Write| -> Result<(), StoreError> {
        report.checked += 1;
        // In full, what was delivered does not matter for an object that exists
        // downstream: it is sent whatever the hash says, so the hash is not read. So is a
        // user's DELETE: a target that lost data may have got a leaver back from a
        // backup, live, and only this takes its access away where no read-back runs.
        let reason = if full && (w.hash.is_some() || w.key.starts_with("User/")) {
            FULL
        } else {
            match (w.hash, store.delivered(tenant, hash_owner, &w.key)?) {
                (want, have) if want == have => return Ok(()),
                (None, _) => "inactive, but still delivered",
                (Some(_), Some(_)) => "differs from what was last delivered",
                (Some(_), None) => "never delivered",
            }
        };
        report.push(DriftItem::from_write(w, reason.into()), &mut all);
        Ok(())
    };
    // A bug on one object's content must not fail every reconciliation (nor, through
    // the resync at a connector's start, keep the connector from ever delivering): the
    // object is counted as one that cannot be mapped.
    let bug = |object: &str, panic: String| {
        tracing::error!(%object, %panic, "Cannot map this object for OneRoster (a bug); counted as unmappable.");
    };
    let left = |report: &mut DriftReport| {
        report.checked += 1;
        report.pending += 1;
    };
    // Users the target cannot be sent: their enrollments are not sent either (a target
    // refuses one naming a user it does not hold), nor taken away if it has them.
    let mut unsendable = HashSet::new();
    for r in store.scan(tenant, ResourceKind::User)? {
        let r = r?;
        match crate::ops::panics::catch_sync(|| {
            stored_user_write(store, s, tenant, &r.id, &r.doc, now)
        }) {
            Ok(mapped) => match mapped? {
                Ok(_) if pending.user(&r.id) => left(report),
                Ok(w) => check(report, w)?,
                Err(_) => {
                    report.unmappable += 1;
                    unsendable.insert(r.id);
                }
            },
            Err(panic) => {
                bug(&format!("User/{}", r.id), panic);
                report.unmappable += 1;
                unsendable.insert(r.id);
            }
        }
    }
    for g in store.scan(tenant, ResourceKind::Group)? {
        let g = g?;
        match crate::ops::panics::catch_sync(|| class_put(s, tenant, &g.id, &g.doc, now)) {
            Ok(_) if pending.group(&g.id) => left(report),
            Ok(w) => check(report, w)?,
            Err(panic) => {
                bug(&format!("Group/{}", g.id), panic);
                report.unmappable += 1;
                continue;
            }
        }
        for m in store.members(tenant, &g.id)? {
            let m = m?;
            if m.kind != "User" || unsendable.contains(&m.value) {
                continue;
            }
            if pending.member(&g.id, &m.value) {
                left(report);
                continue;
            }
            // Absent downstream while its user is; a member that is a user is always
            // held when deactivation only disables (no read needed then).
            let held = match s.deactivate {
                Deactivate::Delete => held_downstream(store, s, tenant, &m.value, u64::MAX)?,
                Deactivate::Disable => Some(true),
            };
            let w = match held {
                Some(true) => enrollment_put(s, tenant, &g.id, &m.value, now),
                Some(false) => enrollment_delete(s, tenant, &g.id, &m.value),
                None => continue,
            };
            check(report, w)?;
        }
    }
    // Delivered once, gone from the roster since: the delete was missed.
    for (key, _) in store.delivered_all(tenant, hash_owner)? {
        let parts: Vec<&str> = key.split('/').collect();
        let (exists, waits, w) = match parts.as_slice() {
            ["User", id] => (
                store.get_raw(tenant, ResourceKind::User, id)?.is_some(),
                pending.user(id),
                user_delete(s, tenant, id),
            ),
            ["Group", id] => (
                store.get_raw(tenant, ResourceKind::Group, id)?.is_some(),
                pending.group(id),
                class_delete(s, tenant, id),
            ),
            ["Member", g, u] => (
                store.is_member(tenant, g, u)?,
                pending.enrollment_changed(g, u),
                enrollment_delete(s, tenant, g, u),
            ),
            _ => continue,
        };
        if !exists && waits {
            left(report);
        } else if !exists {
            report.checked += 1;
            report.push(
                DriftItem::from_write(w, "gone from the roster, still delivered".into()),
                &mut all,
            );
        }
    }
    Ok(all)
}

/// The fields of `desired` as the target holds them, for comparison.
fn projected(target: &Value, desired: &Value) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(d) = desired.as_object() {
        for (k, want) in d {
            let got = match (target.get(k), want) {
                // OneRoster has `enabledUser` as the string "true" or "false"; a target
                // that stores and answers it as a boolean means the same, and counting
                // it as drift re-sent its every user on every reconciliation.
                (Some(Value::Bool(b)), Value::String(w)) if *w == b.to_string() => want.clone(),
                // `metadata` is a free-form blob a target need not keep, or may keep only
                // in part, or add its own keys to; counted as drift, every user such a
                // target read back was sent again on every reconciliation. Only a key of
                // ours that it keeps, with another value, is drift.
                (got, Value::Object(ours)) if k == "metadata" => {
                    let kept = got.and_then(Value::as_object);
                    Value::Object(
                        ours.iter()
                            .map(|(key, v)| {
                                let theirs = kept.and_then(|m| m.get(key)).unwrap_or(v);
                                (key.clone(), theirs.clone())
                            })
                            .collect(),
                    )
                }
                (got, _) => got.cloned().unwrap_or(Value::Null),
            };
            out.insert(k.clone(), got);
        }
    }
    Value::Object(out)
}

impl Dispatcher {
    /// Reconcile every connector of `tenant`, or only the one named `connector`: after
    /// one target was fixed, or a skip of what one connector's guard held, the others
    /// (another held, paused or off) neither run nor fail the job.
    pub async fn reconcile(
        &self,
        tenant: &str,
        mode: ReconcileMode,
        connector: Option<&str>,
    ) -> Result<Vec<DriftReport>, DispatchError> {
        if let Some(name) = connector {
            self.find_loaded(tenant, name, "a reconciliation")?;
        }
        self.reconcile_kind(tenant, mode, None, connector).await
    }

    /// Write the files of every CSV connector of `tenant` now.
    pub async fn export(&self, tenant: &str) -> Result<Vec<DriftReport>, DispatchError> {
        self.reconcile_kind(
            tenant,
            ReconcileMode::default(),
            Some(crate::connectors::Kind::Csv),
            None,
        )
        .await
    }

    async fn reconcile_kind(
        &self,
        tenant: &str,
        mode: ReconcileMode,
        only: Option<crate::connectors::Kind>,
        named: Option<&str>,
    ) -> Result<Vec<DriftReport>, DispatchError> {
        let dry_run = mode.dry_run;
        let chosen = |c: &crate::connectors::ConnectorConfig| {
            c.tenant == tenant
                && only.is_none_or(|k| k == c.kind)
                && named.is_none_or(|n| n == c.name)
        };
        let ctxs: Vec<Arc<Ctx>> = self
            .running()
            .values()
            .filter(|r| chosen(&r.config))
            .filter_map(|r| r.ctx.clone())
            .collect();
        let mut out = Vec::new();
        // A connector that is not loaded is reconciled neither: said, not left out, so
        // a job (or its dry run) does not read as covering every target while one is
        // behind. The export schedule concerns CSV files only, and no file says which
        // kind one of these is.
        if only.is_none() && named.is_none() {
            for h in self.held_cursors(tenant)? {
                if h.cursor_name.ends_with(".dry-run") {
                    continue;
                }
                let why = match &h.file {
                    Some(f) => format!(
                        "not loaded: its file {} does not load (file_error in /status says why); its changes wait for it: fix the file and reload",
                        f.display()
                    ),
                    None => "not loaded: no connector file names it since the last stop; its changes wait for it: restore its file and reload, or `rosterd retire` it".to_owned(),
                };
                out.push(DriftReport {
                    connector: h.name,
                    kind: "unknown",
                    note: Some(why.clone()),
                    not_loaded: Some(why),
                    ..DriftReport::default()
                });
            }
        }
        // Loaded but not running: said, as a connector not loaded is. Disabled on
        // purpose, it does not fail the job; one that cannot start (a secret not set)
        // does, since its changes wait for a fix.
        let idle: Vec<(String, &'static str, Option<String>)> = self
            .running()
            .values()
            .filter(|r| chosen(&r.config) && r.ctx.is_none())
            .map(|r| {
                (
                    r.config.name.clone(),
                    r.config.kind.as_str(),
                    r.not_started.clone(),
                )
            })
            .collect();
        for (connector, kind, not_started) in idle {
            let (note, not_loaded) = match not_started {
                Some(why) => {
                    let why = format!("{why}; its changes wait for it");
                    (why.clone(), Some(why))
                }
                None => (DISABLED_NOTE.to_owned(), None),
            };
            out.push(DriftReport {
                connector,
                kind,
                note: Some(note),
                not_loaded,
                ..DriftReport::default()
            });
        }
        for ctx in ctxs {
            let mut report = DriftReport {
                connector: ctx.name().to_owned(),
                kind: ctx.config.kind.as_str(),
                ..DriftReport::default()
            };
            match &ctx.target {
                Target::OneRoster { settings, .. } => {
                    reconcile_oneroster(&ctx, settings, mode, &mut report)
                        .instrument(ctx.span())
                        .await?;
                }
                // A reconciliation or the `[schedules] export` run that rewrote a
                // scheduled connector's files would hand its consumer a file it expects
                // only at the scheduled time (and a second one that night): the
                // connector's own schedule is the more particular one.
                Target::Csv { settings } if settings.schedule.is_some() => {
                    report.note = Some(OWN_SCHEDULE_CSV_NOTE.into());
                }
                // Its next write would carry what the guard holds.
                Target::Csv { .. } if ctx.live.held() => {
                    report.note = Some(HELD_CSV_NOTE.into());
                }
                Target::Csv { settings } => {
                    // The files are one object, written whole, and drift only when what
                    // they hold differs from what would be written now.
                    use crate::connectors::csv::Snapshot;
                    let how = if dry_run {
                        Snapshot::Compare
                    } else {
                        Snapshot::CompareAndReplace
                    };
                    let (store, t, s, stop) = (
                        self.store.clone(),
                        tenant.to_owned(),
                        settings.clone(),
                        ctx.cancel.clone(),
                    );
                    let judge = ctx.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        // Not only a hold in force: a mass deprovisioning the
                        // connector's loop has not read yet (it waits for the burst to
                        // settle, or has just started) would go into the files too.
                        let mut gate = |through: u64| match judge.guard_holds_now(through)? {
                            Some(h) => Err(CsvError::Withheld {
                                seq: h.seq,
                                reason: h.reason,
                            }),
                            None => Ok(()),
                        };
                        crate::connectors::csv::write_snapshot_gated(
                            &store, &t, &s, how, &stop, &mut gate,
                        )
                    })
                    .await;
                    match r.map_err(StoreError::from_join)? {
                        Err(CsvError::Withheld { seq, reason }) => {
                            tracing::warn!(parent: &ctx.span(), seq, reason = reason.as_str(), "CSV files not written: the connector's [guard] holds a change they would carry.");
                            report.note = Some(HELD_CSV_NOTE.into());
                            // As once the connector has read them and holds: the job
                            // fails, rather than say the tenant is in sync while what
                            // the files would carry waits for the operator.
                            report.paused =
                                Some(format!("the connector is paused until resumed ({reason})"));
                        }
                        Ok(rep) => {
                            if !dry_run {
                                // Written, as the connector's own writes are counted: an
                                // export that runs only by the schedule read `delivered 0`
                                // and no last success for good.
                                ctx.live.success();
                                crate::ops::metrics::delivered(tenant, ctx.name());
                            }
                            let differed = rep.differed.unwrap_or(true);
                            report.checked = rep.users;
                            report.drifted = u64::from(differed);
                            report.unmappable = rep.unmappable;
                            report.note = Some(
                                match (dry_run, differed) {
                                    (true, true) => {
                                        "would rewrite the CSV files, which differ from the roster"
                                    }
                                    (true, false) => "the CSV files hold the roster",
                                    (false, true) => {
                                        "CSV files rewritten: they differed from the roster"
                                    }
                                    // Rewritten all the same: a consumer may go by the
                                    // files' time, as after the `export` schedule.
                                    (false, false) => {
                                        "CSV files rewritten; they already held the roster"
                                    }
                                }
                                .into(),
                            );
                            if !dry_run {
                                report.sent = report.drifted;
                            }
                        }
                        Err(e) => {
                            // Said where the connector's own failures are: the job and
                            // the schedule's result point to `last_error`, which stayed
                            // empty, and the reason was nowhere.
                            let reason = e.to_string();
                            if !dry_run {
                                ctx.live.write_failed(&reason);
                                crate::ops::metrics::retried(tenant, ctx.name());
                            }
                            tracing::error!(parent: &ctx.span(), reason = reason.as_str(), "Cannot write the CSV files.");
                            report.failed = 1;
                            report.note = Some(reason);
                        }
                    }
                }
                Target::Webhook { .. } => {
                    report.note =
                        Some("webhooks carry events, not state: nothing to compare".into());
                }
            }
            // A paused connector delivers nothing, drift or not: a job that reported
            // success would tell the operator the tenant is in sync while its changes
            // wait.
            if report.paused.is_none() {
                report.paused = ctx.live.pause_reason();
            }
            out.push(report);
        }
        Ok(out)
    }
}

pub(super) async fn reconcile_oneroster(
    ctx: &Ctx,
    settings: &OneRosterSettings,
    mode: ReconcileMode,
    report: &mut DriftReport,
) -> Result<(), DispatchError> {
    let ReconcileMode { dry_run, mut full } = mode;
    let tenant = ctx.tenant().to_owned();
    let owner = ctx.cursor_name();
    // A full run cut off (kill -9, a crash) while it compared, before it marked what it was
    // to send, left nothing an ordinary run would see: this one runs full in its place.
    if !full && ctx.store.full_owed(&tenant, &owner)? {
        full = true;
        report.note = Some(OWED_FULL_NOTE.into());
        tracing::info!(
            dry_run,
            "This reconciliation runs full: a full one of this connector was cut off before it had marked what it was to send."
        );
    }
    if full && !dry_run {
        ctx.store.set_full_owed(&tenant, &owner, true).await?;
    }
    let items = {
        let (store, s, t, o) = (
            ctx.store.clone(),
            settings.clone(),
            tenant.clone(),
            owner.clone(),
        );
        let mut r = DriftReport::default();
        let live = ctx.acked();
        // In the connector's span: the diff and the waiting changes log what they cannot
        // read.
        let found = super::blocking(move || {
            // A full run is for a target that lost data: it sends every object, as the
            // target may no longer hold what an object's enrollments refer to, whatever
            // changes wait. Those logged from now on are the mirror's (see `from_now`).
            let pending = if full {
                Pending::from_now(&store, &t)
            } else {
                Pending::read(&store, &t, &o, &s, live)
            };
            diff(&store, &t, &o, &s, full, &pending, &mut r).map(|i| (i, r, pending))
        })
        .await?;
        let (items, r, pending) = found;
        report.checked = r.checked;
        report.drifted = r.drifted;
        report.pending = r.pending;
        report.unmappable = r.unmappable;
        report.items = r.items;
        (items, pending)
    };
    let (mut items, mut pending) = items;
    // In full, every user is sent anyway: nothing a read-back finds would add to it.
    if settings.read_back && !full {
        let (repaired, stopped) = read_back(ctx, settings, &tenant, &items, &pending).await?;
        report.found_at_target = repaired.len() as u64;
        report.read_back_stopped = stopped;
        for item in repaired {
            report.push(item, &mut items);
        }
    }
    // What changed while the tenant was compared, or the target read back, as the real
    // run finds it before each repair.
    if dry_run && !full {
        let (store, t, s) = (ctx.store.clone(), tenant.clone(), settings.clone());
        let mut p = std::mem::take(&mut pending);
        let (kept, left, p) = super::blocking(move || {
            let (kept, left): (Vec<_>, Vec<_>) = items
                .into_iter()
                .partition(|i| !p.sends_or_warn(&store, &t, &s, &i.object));
            Ok((kept, left, p))
        })
        .await?;
        pending = p;
        items = kept;
        for item in &left {
            report.left_to_mirror(item);
        }
    }
    if dry_run {
        // What the real run would meet: it re-sends nothing to a paused connector.
        report.paused = ctx.live.pause_reason();
        return Ok(());
    }
    if items.is_empty() {
        if full {
            ctx.store.set_full_owed(&tenant, &owner, false).await?;
        }
        return Ok(());
    }
    // Users and classes before enrollments, the course before its classes; deletes of
    // enrollments before classes. The course goes alone, first: its one request costs
    // the users nothing, and a target that holds it back holds back the whole run.
    let rank = |i: &DriftItem| match (i.action, i.object.split('/').next()) {
        ("put", Some("Course")) => 0,
        ("put", Some("User" | "Group")) => 1,
        ("put", _) => 2,
        ("delete", Some("Member")) => 3,
        ("delete", Some("Group")) => 4,
        _ => 5,
    };
    items.sort_by_key(rank);
    let mut hashes = Vec::new();
    let sendable = items.iter().filter(|i| i.request.is_some()).count() as u64;
    let durable = ctx.store.watch_durable(&tenant);
    let pending = Arc::new(Mutex::new(pending));
    // Set once nothing more is to be sent: a pause, a stop or an error.
    let over = AtomicBool::new(false);
    let mut paused = None;
    let mut failure = None;
    let mut left = 0;
    // Side by side, as the mirror sends, up to `concurrency`: one at a time, a full run
    // of a million objects against a target answering in 43 ms held the tenant's job
    // slot for about 8 hours. Each rank waits for the one before it (an enrollment
    // needs its user and class at the target). The target may meet the mirror's own
    // `concurrency` requests besides: repairs take none of its slots.
    let width = ctx.config.concurrency.max(1);
    ctx.live.count_repairs_afresh();
    if full {
        mark_unconfirmed(ctx, &tenant, &owner, &items).await?;
        ctx.store.set_full_owed(&tenant, &owner, false).await?;
    }
    // The users and classes the run could not put: their enrollments would be refused.
    let mut not_put = HashSet::new();
    let mut not_enrolled = 0u64;
    let mut from = 0;
    while from < items.len() && !over.load(Ordering::Relaxed) {
        let to = from + items[from..].partition_point(|i| rank(i) == rank(&items[from]));
        let mut failed_now = Vec::new();
        let not_put_before = &not_put;
        let mut repairs = futures_util::stream::iter(from..to)
            .map(|n| {
                let (item, pending, durable, over) = (&items[n], &pending, &durable, &over);
                let needs_missing = needs_one_of(item, not_put_before);
                async move {
                    if needs_missing {
                        return (n, Ok(Repair::NeedsMissing));
                    }
                    (n, repair(ctx, settings, pending, durable, item, over).await)
                }
            })
            .buffer_unordered(width);
        while let Some((n, outcome)) = repairs.next().await {
            let item = &items[n];
            let outcome = match outcome {
                Ok(outcome) => outcome,
                // The repairs in flight are let finish: dropped, their requests could
                // still reach the target, with nothing to keep the mirror's later change
                // of their objects behind them.
                Err(e) => {
                    over.store(true, Ordering::Relaxed);
                    failure.get_or_insert(e);
                    continue;
                }
            };
            match outcome {
                Repair::NotTried => {}
                Repair::NeedsMissing => {
                    report.failed += 1;
                    not_enrolled += 1;
                }
                Repair::Left | Repair::Sent(Sent::Superseded) => {
                    report.left_to_mirror(item);
                    left += 1;
                }
                Repair::Sent(Sent::Ok) => {
                    report.sent += 1;
                    hashes.push((item.object.clone(), item.hash));
                    // Recorded as the run goes: cut off by a crash, the next run sends
                    // again only what this one had not recorded.
                    if hashes.len() >= PROGRESS_EVERY
                        && let Err(e) = ctx
                            .store
                            .set_delivered(&tenant, &owner, std::mem::take(&mut hashes))
                            .await
                    {
                        over.store(true, Ordering::Relaxed);
                        failure.get_or_insert(e.into());
                    }
                }
                Repair::Sent(Sent::Refused { reason, .. }) => {
                    if let Some(p) = ctx.live.pause_reason() {
                        // Every later object would meet the same pause: counted all at
                        // once below rather than each logged.
                        over.store(true, Ordering::Relaxed);
                        paused.get_or_insert(p);
                    } else {
                        report.failed += 1;
                        if item.action == "put" {
                            failed_now.push(item.object.as_str());
                        }
                        tracing::warn!(object = %item.object, reason = reason.as_str(), "Reconciliation could not repair an object.");
                    }
                }
                Repair::Sent(Sent::Cancelled) => over.store(true, Ordering::Relaxed),
            }
        }
        drop(repairs);
        not_put.extend(failed_now);
        from = to;
    }
    if not_enrolled > 0 {
        tracing::warn!(
            not_sent = not_enrolled,
            "Reconciliation did not send enrollments whose user or class it could not put (the target would refuse them); the next run sends them."
        );
    }
    if let Some(paused) = paused {
        report.failed = sendable - report.sent - left;
        tracing::warn!(not_sent = report.failed, %paused, "Reconciliation stopped re-sending: the connector is paused.");
        report.paused = Some(paused);
    }
    ctx.store.set_delivered(&tenant, &owner, hashes).await?;
    failure.map_or(Ok(()), Err)
}

/// Before a full run sends anything: each object it is to send, marked unconfirmed.
///
/// A full run's object that does not go through still has its hash equal to what would
/// be sent, so an ordinary run would not see it missing. Marked unconfirmed, it differs
/// from anything the next run would send, which sends it again; the run records the hash
/// of each object sent as it goes. Marked at the run's end instead, a run cut off by
/// `kill -9` or the OOM killer was never finished (audit: 1,407 of 1,995 users still
/// missing after five restarts). Not forgotten: an object with no hash is one the target
/// never had, so one deleted from the roster meanwhile was never deleted at the target
/// (a recheck's G-8: a held connector's full run, then a skip, left the held leavers
/// there). One left to the mirror gets the hash of what the mirror sent when it is
/// acknowledged.
async fn mark_unconfirmed(
    ctx: &Ctx,
    tenant: &str,
    owner: &str,
    items: &[DriftItem],
) -> Result<(), DispatchError> {
    let marks = items
        .iter()
        .filter(|i| i.hash.is_some())
        .map(|i| (i.object.clone(), Some(UNCONFIRMED)))
        .collect();
    Ok(ctx.store.set_delivered(tenant, owner, marks).await?)
}

/// Whether `item` is an enrollment whose user or class is among `not_put`.
fn needs_one_of(item: &DriftItem, not_put: &HashSet<&str>) -> bool {
    if not_put.is_empty() || item.action != "put" {
        return false;
    }
    match item.object.split('/').collect::<Vec<_>>()[..] {
        ["Member", group, user] => {
            not_put.contains(group_key(group).as_str()) || not_put.contains(user_key(user).as_str())
        }
        _ => false,
    }
}

/// What became of one object a reconciliation would send.
enum Repair {
    /// A pause or a stop came first.
    NotTried,
    /// An enrollment whose user or class the run could not put.
    NeedsMissing,
    /// A change logged since the run read the object sends it: the mirror's.
    Left,
    Sent(Sent),
}

/// Send `item` again, unless a change logged meanwhile sends it (see [`leave_to_mirror`]).
async fn repair(
    ctx: &Ctx,
    settings: &OneRosterSettings,
    pending: &Arc<Mutex<Pending>>,
    durable: &tokio::sync::watch::Receiver<u64>,
    item: &DriftItem,
    over: &AtomicBool,
) -> Result<Repair, DispatchError> {
    let Some(req) = &item.request else {
        return Ok(Repair::NotTried);
    };
    if over.load(Ordering::Relaxed) {
        return Ok(Repair::NotTried);
    }
    // Before the check: a change logged after it waits for the repair.
    let _repairing = ctx.repairing(&item.object);
    // And while it sends.
    let logged = *durable.borrow();
    if leave_to_mirror(ctx, settings, pending, logged, &item.object).await? {
        return Ok(Repair::Left);
    }
    // Before each retry too: the mirror may have sent a change of the object while the
    // run waited out the backoff (a single 503 put old titles back, and deleted users
    // back, enabled).
    let (store, t) = (&ctx.store, ctx.tenant());
    let mut wanted = || !shared_sends(pending, store, t, settings, &item.object);
    Ok(Repair::Sent(
        ctx.send_repair(req, super::REPAIR_ATTEMPTS, &mut wanted)
            .await,
    ))
}

fn lock(pending: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    pending.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a change logged since `pending` was read sends `object`.
async fn leave_to_mirror(
    ctx: &Ctx,
    settings: &OneRosterSettings,
    pending: &Arc<Mutex<Pending>>,
    durable: u64,
    object: &str,
) -> Result<bool, DispatchError> {
    // Nothing the mirror could have sent was logged since the last read: the answer is in
    // what was read. A read of the log per object halved a full run's pace.
    {
        let p = lock(pending);
        if durable <= p.seen
            && let Some(sends) = p.known(object)
        {
            return Ok(sends);
        }
    }
    let (store, t, s, object, pending) = (
        ctx.store.clone(),
        ctx.tenant().to_owned(),
        settings.clone(),
        object.to_owned(),
        pending.clone(),
    );
    // Off the runtime: the read may be of many changes.
    Ok(super::blocking(move || Ok(shared_sends(&pending, &store, &t, &s, &object))).await?)
}

/// Users changed at the target over the read-back window whose state there is not what
/// rosterd would send: they are put back. Also why the read ended early, if it did.
///
/// Pages end at an empty page or at the total (`X-Total-Count`, as OneRoster 1.2 gives
/// it, or a `total` in the body). A target that ignores `offset` answers the first page
/// again and again, with neither: a page with no user an earlier page did not already
/// hold ends the read, and so does [`READ_BACK_MAX_PAGES`].
async fn read_back(
    ctx: &Ctx,
    settings: &OneRosterSettings,
    tenant: &str,
    already: &[DriftItem],
    pending: &Pending,
) -> Result<(Vec<DriftItem>, Option<String>), DispatchError> {
    // `read_back_hours` is at most ten years (checked at load), so this cannot overflow.
    let since = Utc::now() - chrono::Duration::hours(settings.read_back_hours as i64);
    let since = since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let deadline =
        tokio::time::Instant::now() + std::time::Duration::from_secs(settings.read_back_max_secs);
    let out_of_time = |pages: usize, offset: usize| {
        format!(
            "the read-back took the {} s `read_back_max_secs` allows, {pages} pages ({offset} users) read; the target answers too slowly to read its window in that time",
            settings.read_back_max_secs
        )
    };
    let mut out = Vec::new();
    // Objects already being repaired, so each is sent once.
    let mut seen: HashSet<String> = already.iter().map(|i| i.object.clone()).collect();
    // Fingerprints of the sourcedIds read so far: 8 bytes a user, not the ids.
    let mut read: HashSet<u64> = HashSet::new();
    // Made at the first user the target kept without our `metadata.scim_id`.
    let mut by_sourced_id: Option<SourcedIds> = None;
    let mut offset = 0usize;
    let mut pages = 0usize;
    let stopped = 'pages: loop {
        if pages == READ_BACK_MAX_PAGES || read.len() >= READ_BACK_MAX_USERS {
            break Some(format!(
                "{pages} pages read ({offset} users) and the target still answers more; that is the most one read-back asks for"
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            break Some(out_of_time(pages, offset));
        }
        pages += 1;
        let filter = format!("dateLastModified>'{since}'");
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("filter", &filter)
            .append_pair("limit", "1000")
            .append_pair("offset", &offset.to_string())
            .finish();
        let req = Request::get(format!("{}?{query}", settings.url("users")));
        let answer = match tokio::time::timeout_at(deadline, ctx.send_for_body(&req)).await {
            Ok(answer) => answer,
            Err(_) => {
                // This page was not read: counted as the log line counts them.
                pages -= 1;
                break Some(out_of_time(pages, offset));
            }
        };
        let (headers, body) = match answer {
            Ok(answer) => answer,
            Err(reason) => {
                break Some(format!(
                    "GET of the users page at offset {offset} ({}) failed: {reason}",
                    crate::connectors::http::shown_url(&req.url)
                ));
            }
        };
        // A login page from a proxy, or another shape of JSON, is not the end of the
        // list: taken as one, it would turn the repair off without a word.
        let page: UsersPage = match serde_json::from_slice(&body) {
            Ok(page) => page,
            Err(e) => {
                // The start in the log alone: the job's error shows in `/status`, and the
                // page may be a user's record.
                let start = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
                tracing::warn!(offset, error = %e, begins = start.as_str(), "A read-back page is not a OneRoster users page.");
                let what = crate::connectors::http::json_error_unquoted(&e);
                break Some(format!(
                    "GET of the users page at offset {offset} ({}) answered something that is not a OneRoster users page (a JSON object with a `users` array of at most {READ_BACK_MAX_PAGE_USERS}): {what}; how it begins is in rosterd's log",
                    crate::connectors::http::shown_url(&req.url),
                ));
            }
        };
        if page.users.is_empty() {
            break None;
        }
        let total = headers
            .get("x-total-count")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .or_else(|| serde_json::from_str::<u64>(page.total?.get()).ok());
        let (mut new, mut named) = (0usize, 0usize);
        for u in &page.users {
            if let Some(sid) = page_user_id(u) {
                named += 1;
                if read.insert(fingerprint(&sid)) {
                    new += 1;
                }
            }
        }
        if named == 0 {
            break Some(format!(
                "page {pages} (offset {offset}) held {} entries and no user with a `sourcedId`",
                page.users.len()
            ));
        }
        if new == 0 {
            break Some(format!(
                "page {pages} (offset {offset}) held only users earlier pages already had: the target seems to ignore `offset`"
            ));
        }
        offset += page.users.len();
        // One user is parsed at a time, each at most READ_BACK_MAX_USER_BYTES: the page as
        // one `Value` took about 40 times its size (a 30 MiB page of 0s took the daemon to
        // 1.2 GB), and so did one user of 30 MiB.
        for (i, raw) in page.users.into_iter().enumerate() {
            // Skipped, the user would go uncompared without a word.
            let at = format!("page {pages}, user {}", i + 1);
            if raw.get().len() > READ_BACK_MAX_USER_BYTES {
                break 'pages Some(format!(
                    "{at} is {} KiB, where a OneRoster user is a few; more than {} KiB is not read",
                    raw.get().len() >> 10,
                    READ_BACK_MAX_USER_BYTES >> 10
                ));
            }
            let target = match serde_json::from_str::<Value>(raw.get()) {
                Ok(target) => target,
                Err(e) => break 'pages Some(format!("{at} cannot be read: {e}")),
            };
            // `metadata` is a free-form blob a target need not keep; without it, the user
            // is found by the sourcedId rosterd gave it, or the repair would be off
            // without a word for such a target.
            let scim_id = match target.pointer("/metadata/scim_id").and_then(Value::as_str) {
                Some(id) => id.to_owned(),
                None => {
                    let Some(sid) = target.get("sourcedId").and_then(Value::as_str) else {
                        continue;
                    };
                    if by_sourced_id.is_none() {
                        let (store, t) = (ctx.store.clone(), tenant.to_owned());
                        let ids = tokio::task::spawn_blocking(move || SourcedIds::of(&store, &t))
                            .await
                            .map_err(StoreError::from_join)??;
                        tracing::info!(
                            users = ids.len(),
                            "The target keeps no `metadata.scim_id` on a user it read back; users are matched by their sourcedId."
                        );
                        by_sourced_id = Some(ids);
                    }
                    match by_sourced_id.as_ref().and_then(|ids| ids.get(sid)) {
                        Some(id) => id,
                        // Not one of ours (or gone from the roster): nothing to compare.
                        None => continue,
                    }
                }
            };
            let scim_id = scim_id.as_str();
            // Only a copy under the sourcedId rosterd gives that user is ours: `metadata`
            // is anyone's to write, and another's record naming our user was compared as
            // ours, and our user's record PUT again at every run.
            let ours = target.get("sourcedId").and_then(Value::as_str)
                == Some(crate::connectors::sourced_id(tenant, &user_key(scim_id)).as_str());
            // A change waiting for the connector sends it as it now stands.
            if !ours || seen.contains(&user_key(scim_id)) || pending.user(scim_id) {
                continue;
            }
            let write = {
                let (store, t, id, s) = (
                    ctx.store.clone(),
                    tenant.to_owned(),
                    scim_id.to_owned(),
                    settings.clone(),
                );
                tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
                    store
                        .get(&t, ResourceKind::User, &id)?
                        .map(|d| stored_user_write(&store, &s, &t, &id, &d.doc, Utc::now()))
                        .transpose()
                })
                .await
                .map_err(StoreError::from_join)??
            };
            // A copy the target holds as live of a user the roster has no place for
            // there (deleted from the roster, or inactive where inactive users are
            // deleted) is deleted again: a leaver restored at the SIS (a backup put
            // back, an undo) has its access back, and nothing else would take it away.
            let live = target.get("status").and_then(Value::as_str) != Some("tobedeleted");
            let deleted = |w: Write, why: &str| DriftItem {
                at_target: true,
                ..DriftItem::from_write(w, format!("{why}, and live at the target"))
            };
            let w = match write {
                None => {
                    if live {
                        let w = user_delete(settings, tenant, scim_id);
                        seen.insert(w.key.clone());
                        out.push(deleted(w, "deleted from the roster"));
                    }
                    continue;
                }
                // Not expressible: nothing to compare.
                Some(Err(_)) => continue,
                Some(Ok(w)) => w,
            };
            let Some(desired) = &w.body else {
                if live {
                    seen.insert(w.key.clone());
                    out.push(deleted(w, "to be deleted downstream (inactive)"));
                }
                continue;
            };
            if content_hash(&projected(&target, desired)) != content_hash(desired) {
                let reason = format!(
                    "changed at the target (status {:?})",
                    target.get("status").and_then(Value::as_str).unwrap_or("?")
                );
                seen.insert(w.key.clone());
                out.push(DriftItem {
                    at_target: true,
                    ..DriftItem::from_write(w, reason)
                });
            }
        }
        if total.is_some_and(|t| offset as u64 >= t) {
            break None;
        }
    };
    if let Some(reason) = &stopped {
        tracing::warn!(
            pages,
            users = offset,
            reason = reason.as_str(),
            "Read-back stopped before the end of its window; what was read is compared (and repaired, unless this is a dry run), changes at the target past it are not."
        );
    }
    Ok((out, stopped))
}

/// The tenant's users by the sourcedId each has downstream, for a target that keeps no
/// `metadata`, for one read-back. The store's ids are UUIDs, so a user takes 32 bytes
/// here (32 MB at a million); any other id is kept as text.
struct SourcedIds {
    /// (sourcedId, SCIM id), sorted by sourcedId.
    uuids: Vec<(u128, u128)>,
    other: std::collections::HashMap<u128, String>,
}

impl SourcedIds {
    fn of(store: &Store, tenant: &str) -> Result<Self, StoreError> {
        const PAGE: usize = 10_000;
        let users = store.count(tenant, ResourceKind::User)?;
        let mut uuids = Vec::with_capacity(usize::try_from(users).unwrap_or(0));
        let mut other = std::collections::HashMap::new();
        let mut skip = 0;
        loop {
            let ids = store.ids_page(tenant, ResourceKind::User, skip, PAGE)?;
            skip += ids.len();
            let last = ids.len() < PAGE;
            for id in ids {
                let sid = crate::connectors::sourced_uuid(tenant, &user_key(&id)).as_u128();
                match uuid::Uuid::try_parse(&id) {
                    Ok(u) if u.hyphenated().to_string() == id => uuids.push((sid, u.as_u128())),
                    _ => {
                        other.insert(sid, id);
                    }
                }
            }
            if last {
                uuids.sort_unstable();
                return Ok(Self { uuids, other });
            }
        }
    }

    fn get(&self, sourced_id: &str) -> Option<String> {
        let sid = uuid::Uuid::parse_str(sourced_id).ok()?.as_u128();
        match self.uuids.binary_search_by_key(&sid, |(s, _)| *s) {
            Ok(i) => Some(
                uuid::Uuid::from_u128(self.uuids[i].1)
                    .hyphenated()
                    .to_string(),
            ),
            Err(_) => self.other.get(&sid).cloned(),
        }
    }

    fn len(&self) -> usize {
        self.uuids.len() + self.other.len()
    }
}

/// Users one read-back reads at most: twice the million users of a tenant that one
/// daemon is built for. The pages are counted too, but a target ignoring `limit` filled
/// each with up to [`READ_BACK_MAX_PAGE_USERS`] new ones, and the set of their
/// fingerprints grew by a gigabyte in 40 s, to 8 GB in 7 minutes. At this many the set
/// is about 40 MB.
const READ_BACK_MAX_USERS: usize = 2_000_000;

/// The largest user entry read. Parsed, JSON takes about 40 times its text, and one user
/// of 30 MiB (within the page's cap) took the daemon to 950 MB.
const READ_BACK_MAX_USER_BYTES: usize = 256 << 10;

/// Users one read-back page may hold. It asks for `limit=1000`; a target that ignores
/// `limit` and answers everyone at once is read up to this many (and 32 MiB), past which
/// the page is refused rather than held in memory.
const READ_BACK_MAX_PAGE_USERS: usize = 100_000;

/// A read-back page as read: each user left as its JSON text (within the answer, which
/// is at most 32 MiB), to be parsed one at a time.
#[derive(serde::Deserialize)]
struct UsersPage<'a> {
    #[serde(borrow, deserialize_with = "bounded_users")]
    users: Vec<&'a serde_json::value::RawValue>,
    /// Left as its text and read only as a number: as a `Value`, a `total` of 30 MiB of
    /// `[0,0,…]` took the daemon to 1.2 GB.
    #[serde(borrow, default)]
    total: Option<&'a serde_json::value::RawValue>,
}

fn bounded_users<'de, D>(d: D) -> Result<Vec<&'de serde_json::value::RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<&'de serde_json::value::RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "an array of at most {READ_BACK_MAX_PAGE_USERS} users")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut users = Vec::new();
            while let Some(u) = seq.next_element()? {
                if users.len() == READ_BACK_MAX_PAGE_USERS {
                    return Err(serde::de::Error::custom(format!(
                        "more than {READ_BACK_MAX_PAGE_USERS} users in one page"
                    )));
                }
                users.push(u);
            }
            Ok(users)
        }
    }
    d.deserialize_seq(Bounded)
}

/// A page entry's `sourcedId`, read without parsing the rest of it.
fn page_user_id(raw: &serde_json::value::RawValue) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        #[serde(rename = "sourcedId")]
        sourced_id: Option<String>,
    }
    serde_json::from_str::<Id>(raw.get()).ok()?.sourced_id
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What a target does with the free-form `metadata` is not drift, unless it keeps one
    /// of rosterd's keys with another value.
    #[test]
    fn metadata_is_drift_only_where_a_key_of_ours_changed() {
        let desired = json!({"givenName": "Ada", "metadata": {"scim_id": "1", "title": "Eng"}});
        let same = |metadata: Option<Value>| {
            let mut target = json!({"givenName": "Ada", "sourcedId": "s"});
            if let Some(m) = metadata {
                target["metadata"] = m;
            }
            content_hash(&projected(&target, &desired)) == content_hash(&desired)
        };
        assert!(same(None));
        assert!(same(Some(Value::Null)));
        assert!(same(Some(json!({}))));
        assert!(same(Some(json!({"scim_id": "1"}))));
        assert!(same(Some(
            json!({"scim_id": "1", "title": "Eng", "theirs": 7})
        )));
        assert!(!same(Some(json!({"scim_id": "1", "title": "Chef"}))));
        assert!(!same(Some(json!({"scim_id": "2"}))));
        let mut renamed = desired.clone();
        renamed["givenName"] = json!("Mallory");
        assert_ne!(
            content_hash(&projected(&renamed, &desired)),
            content_hash(&desired)
        );
    }

    fn settings(deactivate: &str) -> OneRosterSettings {
        toml::from_str(&format!(
            "base_url = \"http://t/or/\"\norg_sourced_id = \"org\"\ncourse_sourced_id = \"c\"\ndeactivate = \"{deactivate}\"\n[auth]\ntoken_env = \"T\"\n"
        ))
        .unwrap()
    }

    fn user(name: &str) -> Value {
        json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": name, "active": true})
    }

    /// A change logged after the waiting changes were read (while the tenant was
    /// compared, or the repairs sent) is found before a repair of its object goes out.
    #[tokio::test]
    async fn a_change_logged_while_reconciling_leaves_its_object_to_the_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = settings("disable");
        let ada = store
            .create("t", ResourceKind::User, user("ada"), vec![])
            .await
            .unwrap()
            .id;
        let bob = store
            .create("t", ResourceKind::User, user("bob"), vec![])
            .await
            .unwrap()
            .id;
        let head = store.changes("t", 0, 10).unwrap().last().unwrap().seq;
        // The connector delivered both.
        store.advance_cursor("t", "or", head, vec![]).await.unwrap();
        let mut pending = Pending::read(&store, "t", "or", &s, None);
        assert!(!pending.user(&ada) && !pending.user(&bob));
        let shared = Mutex::new(Pending::read(&store, "t", "or", &s, None));
        store
            .update("t", ResourceKind::User, &ada, None, |doc| {
                let mut doc = doc.clone();
                doc["title"] = json!("Engineer");
                Ok(crate::store::Update {
                    doc,
                    members: vec![],
                })
            })
            .await
            .unwrap();
        assert!(pending.sends(&store, "t", &s, &user_key(&ada)).unwrap());
        assert!(!pending.sends(&store, "t", &s, &user_key(&bob)).unwrap());
        // Repairs side by side share one set, each reading the log outside its lock.
        assert!(!shared_sends(&shared, &store, "t", &s, &user_key(&bob)));
        assert!(shared_sends(&shared, &store, "t", &s, &user_key(&ada)));
        assert_eq!(lock(&shared).seen, pending.seen);
        assert!(lock(&shared).known(&user_key(&ada)).unwrap());
    }

    /// The connector saves its progress, then publishes it: a reconciliation in between
    /// must not take what the store already records as delivered for waiting, nor drop
    /// what only the published record knows (the store keeps the first acknowledgements
    /// above the cursor only).
    #[tokio::test]
    async fn waiting_changes_are_read_above_the_newer_of_the_saved_and_published_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = settings("disable");
        let mut ids = Vec::new();
        for name in ["ada", "bob", "cy", "dee"] {
            let id = store
                .create("t", ResourceKind::User, user(name), vec![])
                .await
                .unwrap()
                .id;
            ids.push(id);
        }
        let seqs: Vec<u64> = store
            .changes("t", 0, 10)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        // Saved: through bob, and dee acknowledged above. Published: an older record,
        // through ada, that knows dee's acknowledgement only.
        store
            .record_progress("t", "or", seqs[1], vec![seqs[3]], vec![])
            .await
            .unwrap();
        let live = crate::dispatch::Acked {
            cursor: seqs[0],
            above: Arc::new([seqs[3]].into_iter().collect()),
        };
        let pending = Pending::read(&store, "t", "or", &s, Some(live));
        let waiting: Vec<bool> = ids.iter().map(|id| pending.user(id)).collect();
        assert_eq!(waiting, [false, false, true, false]);
        // Published past what the store keeps: cy's acknowledgement only there.
        let live = crate::dispatch::Acked {
            cursor: seqs[1],
            above: Arc::new([seqs[2], seqs[3]].into_iter().collect()),
        };
        let pending = Pending::read(&store, "t", "or", &s, Some(live));
        let waiting: Vec<bool> = ids.iter().map(|id| pending.user(id)).collect();
        assert_eq!(waiting, [false, false, false, false]);
    }
}
