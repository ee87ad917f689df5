//! Archetype assignments, the review queue, governance events and jobs: the roster state
//! that lives beside the SCIM documents and changes in the same transactions.
//!
//! The store does not know how archetypes are chosen; a tenant's [`Resolver`] (built by
//! the classify stage from its bundle and group rules) decides, and the store makes that
//! decision durable together with the write that caused it.
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ChangeEvent, ChangeOp, Store, StoreError, StoreResult, Txn, decode, encode, keys};
use crate::scim::ResourceKind;

/// Where an assignment came from, highest precedence first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssignmentSource {
    Override,
    Group,
    Classifier,
    Default,
    Unassigned,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub archetype_id: String,
    pub confidence: f64,
}

/// What a tenant's policy decides for one user.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub archetype_id: Option<String>,
    pub confidence: f64,
    pub assigned_by: String,
    pub source: AssignmentSource,
    pub bundle_version: String,
    pub candidates: Vec<Candidate>,
}

/// What an override write does.
#[derive(Debug, Clone)]
pub enum OverrideChange {
    Set(String),
    Clear,
    /// Make the review item's current suggestion an override; with `expected`, only while
    /// the suggestion is still that one (the one the reviewer was shown).
    AcceptSuggestion {
        expected: Option<String>,
    },
}

/// Conditions [`Store::change_override`] checks at the moment of writing.
#[derive(Debug, Clone, Copy, Default)]
pub struct OverrideRules {
    /// Only a user waiting in the review queue (a review accept).
    pub only_review_items: bool,
    /// Not while a job holds the tenant (see [`Store::claim_job`]).
    pub refuse_during_job: bool,
}

/// Why an override was refused when it was about to be written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OverrideRefusal {
    #[error("{0} is not in the review queue")]
    NotInReview(String),
    #[error("this user has no suggested archetype")]
    NothingSuggested,
    #[error("archetype {0:?} is not in this tenant's bundle")]
    UnknownArchetype(String),
    #[error("a job is running for this tenant")]
    JobRunning,
    #[error("the suggestion is now {now:?}, not {expected:?}")]
    SuggestionChanged {
        expected: String,
        now: Option<String>,
    },
}

/// A user's archetype as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub archetype_id: Option<String>,
    pub confidence: f64,
    pub assigned_by: String,
    pub assigned_at: DateTime<Utc>,
    pub source: AssignmentSource,
    #[serde(default)]
    pub bundle_version: String,
    /// The classifier's best candidates, kept for reviewers even under an override.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<Candidate>,
    /// In the review queue: decided automatically with confidence under the threshold.
    #[serde(default)]
    pub needs_review: bool,
}

impl Assignment {
    /// The same archetype, confidence, source and actor: everything a governance event
    /// reports. A new bundle version that decides the same (a version bump, a reload of
    /// the same examples) changes no one's assignment.
    fn same_assignment(&self, d: &Decision) -> bool {
        self.archetype_id == d.archetype_id
            && (self.confidence - d.confidence).abs() < 1e-9
            && self.source == d.source
            && self.assigned_by == d.assigned_by
    }

    fn from_decision(d: Decision, at: DateTime<Utc>) -> Assignment {
        Assignment {
            archetype_id: d.archetype_id,
            confidence: d.confidence,
            assigned_by: d.assigned_by,
            assigned_at: at,
            source: d.source,
            bundle_version: d.bundle_version,
            candidates: d.candidates,
            needs_review: false,
        }
    }
}

/// A group as a resolver sees it.
#[derive(Debug, Clone)]
pub struct GroupRef {
    pub id: String,
    pub display_name: Option<String>,
    pub external_id: Option<String>,
}

/// A tenant's archetype policy, consulted inside store transactions. Must be fast and
/// must not block: it runs under the tenant's write lock.
pub trait Resolver: Send + Sync {
    /// The automatic decision for a user (everything below a manual override).
    fn decide(&self, user: &Value, groups: &[GroupRef]) -> Decision;
    /// Assignments under this confidence (and not set by a person or a group) need review.
    fn review_threshold(&self) -> f64;
    /// Whether group membership can change a decision (so membership changes re-resolve).
    fn uses_groups(&self) -> bool;
    /// The bundle version decisions are made with.
    fn bundle_version(&self) -> &str;
    /// Whether a person may give this archetype (it is in the bundle).
    fn has_archetype(&self, id: &str) -> bool;
}

/// One governance event: an audit record of an assignment change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GovernanceEvent {
    pub seq: u64,
    pub at: DateTime<Utc>,
    /// `rbac.archetype_assigned`, `rbac.archetype_overridden`, `rbac.archetype_cleared`,
    /// `rbac.archetype_removed`.
    pub kind: String,
    /// SCIM id of the user.
    pub user: String,
    pub actor: String,
    pub before: Option<Assignment>,
    pub after: Option<Assignment>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    /// Was running when the daemon stopped without finishing it.
    Interrupted,
}

impl JobStatus {
    /// The name the API and metrics give it (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Interrupted => "interrupted",
        }
    }

    /// Queued or running: the job holds (or waits for) the tenant's one job slot.
    pub fn holds_the_tenant(self) -> bool {
        matches!(self, JobStatus::Queued | JobStatus::Running)
    }
}

/// A background job (reclassify / reconcile) and what it did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: String,
    pub kind: String,
    pub status: JobStatus,
    pub started_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub counts: std::collections::BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A reconciliation that sent every object again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full: bool,
    /// A reconciliation of this connector alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector: Option<String>,
}

/// Governance event filters.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub user: Option<String>,
    pub kind: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only events with a larger sequence number (paging).
    pub after_seq: u64,
    pub limit: usize,
}

/// Whether events of this kind are indexed by kind. The classifier's routine assignments
/// are most of the log, so a walk of the log finds them at once and an index of them would
/// only cost every classified write another key (measured: about 5 % of /Bulk ingest). The
/// kinds a person causes (overrides, clears, removals) are rare, and it is those an
/// auditor asks for.
/// Every kind of governance event the store writes.
pub const EVENT_KINDS: [&str; 4] = [
    "rbac.archetype_assigned",
    "rbac.archetype_overridden",
    "rbac.archetype_cleared",
    "rbac.archetype_removed",
];

pub(super) fn kind_indexed(kind: &str) -> bool {
    kind != "rbac.archetype_assigned"
}

impl EventQuery {
    fn admits(&self, e: &GovernanceEvent) -> bool {
        self.user.as_ref().is_none_or(|u| u == &e.user)
            && self.kind.as_ref().is_none_or(|k| k == &e.kind)
            && self.since.is_none_or(|s| e.at >= s)
            && self.until.is_none_or(|u| e.at <= u)
    }
}

/// The tenant's latest governance event, if it has any.
fn last_event(tree: &sled::Tree) -> StoreResult<Option<GovernanceEvent>> {
    match tree.range(keys::governance_all()).next_back() {
        Some(kv) => Ok(Some(decode(&kv?.1)?)),
        None => Ok(None),
    }
}

/// The time of the tenant's latest governance event, if it has any.
pub(super) fn last_event_time(tree: &sled::Tree) -> StoreResult<Option<DateTime<Utc>>> {
    Ok(last_event(tree)?.map(|e| e.at))
}

/// Where a walk of the log from `from` on should start to see every event at or after
/// `since`: a binary search over sequence numbers, which holds because events are stamped
/// in sequence order. About 20 reads for a million events instead of a walk of all those
/// before `since`.
fn first_event_since(tree: &sled::Tree, since: DateTime<Utc>, from: u64) -> StoreResult<u64> {
    let Some(last) = last_event(tree)? else {
        return Ok(from);
    };
    let end = last.seq.saturating_add(1);
    // Starting at `lo` misses nothing; starting at `hi` misses nothing either, and no
    // start before `lo` is needed.
    let (mut lo, mut hi) = (from, end.max(from));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match tree
            .range(keys::governance(mid)..keys::governance(hi))
            .next()
        {
            Some(kv) => {
                let e: GovernanceEvent = decode(&kv?.1)?;
                if e.at < since {
                    lo = e.seq + 1;
                } else {
                    hi = mid;
                }
            }
            // Nothing stored in [mid, hi): starting at mid is starting at hi.
            None => hi = mid,
        }
    }
    Ok(lo)
}

/// Index every stored governance event by user and by kind: the upgrade of a tenant from
/// a layout without those indexes. Returns how many events there were.
pub(super) fn index_governance(tree: &sled::Tree) -> StoreResult<u64> {
    let mut out = super::UpgradeWriter::new(tree);
    let mut n = 0u64;
    for kv in tree.range(keys::governance_all()) {
        let (_, v) = kv?;
        let e: GovernanceEvent = decode(&v)?;
        out.insert(keys::governance_of_user(&e.user, e.seq), Vec::new())?;
        if kind_indexed(&e.kind) {
            out.insert(keys::governance_of_kind(&e.kind, e.seq), Vec::new())?;
        }
        n += 1;
    }
    out.finish()?;
    Ok(n)
}

/// The key range of everything under `prefix` that sorts after `after_key` (itself a key
/// under `prefix`), or all of it.
pub(super) fn range_after(prefix: &[u8], after_key: Option<Vec<u8>>) -> std::ops::Range<Vec<u8>> {
    let start = match after_key {
        Some(mut k) => {
            k.push(0);
            k
        }
        None => prefix.to_vec(),
    };
    let mut end = prefix.to_vec();
    end.push(0xff);
    start..end
}

fn review_needed(source: AssignmentSource, confidence: f64, threshold: f64) -> bool {
    matches!(
        source,
        AssignmentSource::Classifier | AssignmentSource::Default | AssignmentSource::Unassigned
    ) && confidence < threshold
}

impl Txn<'_> {
    pub(super) fn load_assignment(&self, id: &str) -> StoreResult<Option<Assignment>> {
        match self.get(&keys::assignment(id))? {
            Some(b) => Ok(Some(decode(&b)?)),
            None => Ok(None),
        }
    }

    fn group_refs_of(&self, id: &str) -> StoreResult<Vec<GroupRef>> {
        let prefix = keys::backrefs_prefix(id);
        let mut out = Vec::new();
        for key in self.keys_with_prefix(&prefix)? {
            let Some(gid) = keys::trailing_id(&key, prefix.len()) else {
                continue;
            };
            let doc = self.load(ResourceKind::Group, gid)?;
            let text = |k: &str| {
                doc.as_ref()
                    .and_then(|d| d.get(k))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            out.push(GroupRef {
                id: gid.to_owned(),
                display_name: text("displayName"),
                external_id: text("externalId"),
            });
        }
        Ok(out)
    }

    /// Store `new` as the user's assignment, keeping the archetype index and the review
    /// queue in step, and record the change.
    fn put_assignment(
        &mut self,
        id: &str,
        before: Option<&Assignment>,
        mut new: Assignment,
        kind: &str,
        actor: &str,
    ) -> StoreResult<Assignment> {
        let threshold = self.resolver.as_ref().map_or(0.0, |r| r.review_threshold());
        new.needs_review = review_needed(new.source, new.confidence, threshold);
        if let Some(b) = before {
            if let Some(a) = &b.archetype_id {
                self.del(keys::archetype_entry(a, id));
            }
            if b.needs_review {
                self.del(keys::review(id));
            }
        }
        if let Some(a) = &new.archetype_id {
            self.put(keys::archetype_entry(a, id), Vec::new());
        }
        if new.needs_review {
            self.put(keys::review(id), Vec::new());
        }
        self.put(keys::assignment(id), encode(&new)?);
        self.record_assignment(id, Some(&new))?;
        self.govern(kind, id, actor, before.cloned(), Some(new.clone()))?;
        Ok(new)
    }

    pub(super) fn govern(
        &mut self,
        kind: &str,
        user: &str,
        actor: &str,
        before: Option<Assignment>,
        after: Option<Assignment>,
    ) -> StoreResult<()> {
        let seq = self.next_gseq()?;
        let event = GovernanceEvent {
            seq,
            at: self.now,
            kind: kind.to_owned(),
            user: user.to_owned(),
            actor: actor.to_owned(),
            before,
            after,
        };
        self.put(keys::governance(seq), encode(&event)?);
        self.put(keys::governance_of_user(user, seq), Vec::new());
        if kind_indexed(kind) {
            self.put(keys::governance_of_kind(kind, seq), Vec::new());
        }
        Ok(())
    }

    fn next_gseq(&mut self) -> StoreResult<u64> {
        self.next_counter(keys::GSEQ_KEY, "governance counter")
    }

    /// What the tenant's policy decides for this user now, overrides aside.
    fn decide(&self, resolver: &dyn Resolver, id: &str, doc: &Value) -> StoreResult<Decision> {
        let groups = if resolver.uses_groups() {
            self.group_refs_of(id)?
        } else {
            Vec::new()
        };
        Ok(resolver.decide(doc, &groups))
    }

    /// Re-run the tenant's policy for a user whose document or groups changed. A manual
    /// override is sticky and is left alone. Returns the assignment if it changed.
    pub(super) fn reassign(&mut self, id: &str, doc: &Value) -> StoreResult<Option<Assignment>> {
        let Some(resolver) = self.resolver.clone() else {
            return Ok(None);
        };
        let current = self.load_assignment(id)?;
        if current
            .as_ref()
            .is_some_and(|a| a.source == AssignmentSource::Override)
        {
            return Ok(None);
        }
        let d = self.decide(resolver.as_ref(), id, doc)?;
        if let Some(a) = current.as_ref().filter(|a| a.same_assignment(&d)) {
            // The decision stands. It records the bundle version in force, and its place
            // in the queue follows the threshold in force, but it is not an assignment
            // change: neither a governance event nor a change to mirror, and
            // `assigned_at` keeps when it was made.
            let mut kept = a.clone();
            kept.candidates = d.candidates;
            kept.bundle_version = d.bundle_version;
            kept.needs_review =
                review_needed(kept.source, kept.confidence, resolver.review_threshold());
            if kept != *a {
                if kept.needs_review != a.needs_review {
                    if kept.needs_review {
                        self.put(keys::review(id), Vec::new());
                    } else {
                        self.del(keys::review(id));
                    }
                }
                self.put(keys::assignment(id), encode(&kept)?);
                self.record_assignment(id, Some(&kept))?;
            }
            return Ok(None);
        }
        let actor = d.assigned_by.clone();
        let stored = self.put_assignment(
            id,
            current.as_ref(),
            Assignment::from_decision(d, self.now),
            "rbac.archetype_assigned",
            &actor,
        )?;
        Ok(Some(stored))
    }

    /// Group membership changed for these members: re-resolve the users among them if
    /// group rules can matter.
    pub(super) fn reassign_members(&mut self, ids: &[String]) -> StoreResult<()> {
        if !self.resolver.as_ref().is_some_and(|r| r.uses_groups()) {
            return Ok(());
        }
        for id in ids {
            if let Some(doc) = self.load(ResourceKind::User, id)?
                && let Some(a) = self.reassign(id, &doc)?
            {
                self.log_assignment(id, a);
            }
        }
        Ok(())
    }

    /// A change event for an assignment that changed without the document changing.
    pub(super) fn log_assignment(&mut self, id: &str, a: Assignment) {
        let seq = self.seq();
        self.log(ChangeEvent {
            seq,
            at: self.now,
            resource_type: "User".into(),
            id: id.to_owned(),
            op: ChangeOp::Archetype,
            snapshot: None,
            members_added: vec![],
            members_removed: vec![],
            assignment: Some(a),
            deactivated: false,
            reactivated: false,
            deleting_user: false,
            groups: None,
        });
    }

    /// The user `id` (userName `user_name`) is being deleted: their assignment goes, and
    /// their name is kept for their governance history.
    pub(super) fn drop_assignment(&mut self, id: &str, user_name: Option<&str>) -> StoreResult<()> {
        if let Some(a) = self.load_assignment(id)? {
            if let Some(name) = user_name {
                self.put(keys::departed_by_name(name), id.as_bytes().to_vec());
                self.put(keys::departed_by_id(id), name.as_bytes().to_vec());
            }
            if let Some(arch) = &a.archetype_id {
                self.del(keys::archetype_entry(arch, id));
            }
            self.del(keys::review(id));
            self.del(keys::assignment(id));
            self.record_assignment(id, None)?;
            self.govern("rbac.archetype_removed", id, "service:scim", Some(a), None)?;
        }
        Ok(())
    }
}

/// Counts from a reclassification pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReclassifyCounts {
    pub scanned: u64,
    pub changed: u64,
    pub overrides_kept: u64,
    /// Users moved off an archetype the bundle no longer has, by that archetype: they
    /// were classified again without a person looking (a role downstream may follow).
    pub moved_off_removed: std::collections::BTreeMap<String, u64>,
}

impl Store {
    /// Install (or replace) a tenant's archetype policy. Existing assignments are not
    /// touched until [`Store::reclassify`] runs.
    pub fn set_resolver(&self, tenant: &str, resolver: std::sync::Arc<dyn Resolver>) {
        self.inner
            .resolvers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tenant.to_owned(), resolver);
    }

    pub fn resolver(&self, tenant: &str) -> Option<std::sync::Arc<dyn Resolver>> {
        self.inner
            .resolvers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            .cloned()
    }

    pub fn assignment(&self, tenant: &str, id: &str) -> StoreResult<Option<Assignment>> {
        self.get_decoded(tenant, keys::assignment(id))
    }

    /// Set (`Some`) or clear (`None`) a manual override. Clearing hands the user back to
    /// the automatic policy at once.
    pub async fn set_override(
        &self,
        tenant: &str,
        id: &str,
        archetype: Option<String>,
        actor: &str,
    ) -> StoreResult<Assignment> {
        let change = match archetype {
            Some(a) => OverrideChange::Set(a),
            None => OverrideChange::Clear,
        };
        self.change_override(tenant, id, change, OverrideRules::default(), actor)
            .await
    }

    /// Set or clear an override, or accept a review item, under `rules` that are checked
    /// inside the write, under the tenant's lock: a check made before it (is the user
    /// still in the queue, is the archetype still in the bundle, is a job running) could
    /// be stale by the time the write lands.
    pub async fn change_override(
        &self,
        tenant: &str,
        id: &str,
        change: OverrideChange,
        rules: OverrideRules,
        actor: &str,
    ) -> StoreResult<Assignment> {
        let id = id.to_owned();
        let actor = actor.to_owned();
        self.write(tenant, move |txn| {
            let doc = txn
                .load(ResourceKind::User, &id)?
                .ok_or_else(|| StoreError::NotFound {
                    kind: ResourceKind::User,
                    id: id.clone(),
                })?;
            if rules.refuse_during_job && txn.job_running {
                return Err(OverrideRefusal::JobRunning.into());
            }
            let current = txn.load_assignment(&id)?;
            if rules.only_review_items && !current.as_ref().is_some_and(|c| c.needs_review) {
                return Err(OverrideRefusal::NotInReview(id.clone()).into());
            }
            let archetype = match change {
                OverrideChange::Set(a) => Some(a),
                OverrideChange::Clear => None,
                OverrideChange::AcceptSuggestion { expected } => {
                    let now = current.as_ref().and_then(|c| c.archetype_id.clone());
                    // The IdP may have changed the title since the reviewer read the item:
                    // what they approved is not what would be made sticky.
                    if let Some(expected) = expected
                        && now.as_ref() != Some(&expected)
                    {
                        return Err(OverrideRefusal::SuggestionChanged { expected, now }.into());
                    }
                    match now {
                        Some(a) => Some(a),
                        None => return Err(OverrideRefusal::NothingSuggested.into()),
                    }
                }
            };
            // Repeating an override is not a change, so it stands even when a reload has
            // dropped its archetype since: only a new override must name one the bundle has.
            let repeated = |a: &String| {
                current.as_ref().is_some_and(|c| {
                    c.source == AssignmentSource::Override && c.archetype_id.as_ref() == Some(a)
                })
            };
            if let Some(a) = &archetype
                && !repeated(a)
                && txn.resolver.as_ref().is_some_and(|r| !r.has_archetype(a))
            {
                return Err(OverrideRefusal::UnknownArchetype(a.clone()).into());
            }
            let stored = match archetype {
                Some(a) => {
                    let version = txn
                        .resolver
                        .as_ref()
                        .map(|r| r.bundle_version().to_owned())
                        .unwrap_or_default();
                    let new = Assignment {
                        archetype_id: Some(a),
                        confidence: 1.0,
                        assigned_by: actor.clone(),
                        assigned_at: txn.now,
                        source: AssignmentSource::Override,
                        bundle_version: version,
                        candidates: current
                            .as_ref()
                            .map(|c| c.candidates.clone())
                            .unwrap_or_default(),
                        needs_review: false,
                    };
                    if new.archetype_id.as_ref().is_some_and(repeated) {
                        return Ok(current.unwrap_or(new));
                    }
                    txn.put_assignment(
                        &id,
                        current.as_ref(),
                        new,
                        "rbac.archetype_overridden",
                        &actor,
                    )?
                }
                None => {
                    if current
                        .as_ref()
                        .is_none_or(|c| c.source != AssignmentSource::Override)
                    {
                        return match current {
                            Some(c) => Ok(c),
                            None => Err(StoreError::NotFound {
                                kind: ResourceKind::User,
                                id: id.clone(),
                            }),
                        };
                    }
                    // The policy decides afresh, and one event carries the whole change:
                    // from the override to what the policy gives now.
                    let Some(resolver) = txn.resolver.clone() else {
                        return Err(StoreError::Backend(
                            "no archetype policy for this tenant".into(),
                        ));
                    };
                    let d = txn.decide(resolver.as_ref(), &id, &doc)?;
                    let now = txn.now;
                    txn.put_assignment(
                        &id,
                        current.as_ref(),
                        Assignment::from_decision(d, now),
                        "rbac.archetype_cleared",
                        &actor,
                    )?
                }
            };
            txn.log_assignment(&id, stored.clone());
            Ok(stored)
        })
        .await
    }

    /// Re-run the policy for every user (after a bundle change, or as a sync job), in
    /// batches so SCIM writes interleave. Overrides are kept. `None` when `stop` came
    /// first: the users after the last batch are as they were, so the caller must not
    /// take the tenant as reclassified.
    pub async fn reclassify(
        &self,
        tenant: &str,
        batch: usize,
        stop: &tokio_util::sync::CancellationToken,
    ) -> StoreResult<Option<ReclassifyCounts>> {
        let mut counts = ReclassifyCounts::default();
        let mut after: Option<String> = None;
        loop {
            if stop.is_cancelled() {
                return Ok(None);
            }
            let ids = self.user_ids_after(tenant, after.as_deref(), batch.max(1))?;
            let Some(last) = ids.last().cloned() else {
                break;
            };
            let (c, o, moved) = self
                .write(tenant, move |txn| {
                    let mut changed = 0u64;
                    let mut kept = 0u64;
                    let mut moved: Vec<String> = Vec::new();
                    for id in &ids {
                        let Some(doc) = txn.load(ResourceKind::User, id)? else {
                            continue;
                        };
                        let before = txn.load_assignment(id)?;
                        if before
                            .as_ref()
                            .is_some_and(|a| a.source == AssignmentSource::Override)
                        {
                            kept += 1;
                            continue;
                        }
                        if let Some(a) = txn.reassign(id, &doc)? {
                            txn.log_assignment(id, a);
                            changed += 1;
                            let gone = before.and_then(|b| b.archetype_id).filter(|held| {
                                txn.resolver
                                    .as_ref()
                                    .is_some_and(|r| !r.has_archetype(held))
                            });
                            moved.extend(gone);
                        }
                    }
                    Ok((changed, kept, moved))
                })
                .await?;
            counts.changed += c;
            counts.overrides_kept += o;
            for archetype in moved {
                *counts.moved_off_removed.entry(archetype).or_default() += 1;
            }
            after = Some(last);
        }
        counts.scanned = self.count(tenant, ResourceKind::User)?;
        Ok(Some(counts))
    }

    fn user_ids_after(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        let mut out = Vec::with_capacity(limit);
        for r in self.scan_after(tenant, ResourceKind::User, after)? {
            out.push(r?.id);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Resources of a kind with id greater than `after`, in id order, streamed.
    pub fn scan_after(
        &self,
        tenant: &str,
        kind: ResourceKind,
        after: Option<&str>,
    ) -> StoreResult<impl Iterator<Item = StoreResult<super::Resource>> + use<>> {
        let t = self.tenant(tenant)?;
        let prefix = keys::resource_prefix(kind);
        let plen = prefix.len();
        let range = range_after(&prefix, after.map(|a| keys::resource(kind, a)));
        Ok(t.tree.range(range).map(move |kv| {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k[plen..]).into_owned();
            Ok(super::to_resource(id, decode(&v)?))
        }))
    }

    /// Per archetype, the users holding it and how many of them are active: two counters
    /// kept by the writes, whatever the size of the tenant.
    pub fn archetype_user_counts(
        &self,
        tenant: &str,
        archetypes: &[&str],
    ) -> StoreResult<Vec<(u64, u64)>> {
        let t = self.tenant(tenant)?;
        archetypes
            .iter()
            .map(|a| super::counts::read_archetype(&t.tree, a))
            .collect()
    }

    /// Archetypes held by someone that `known` does not name (a bundle dropped them while
    /// overrides still point at them), with their user and active-user counts.
    pub fn archetypes_held_outside(
        &self,
        tenant: &str,
        known: &[&str],
    ) -> StoreResult<Vec<(String, u64, u64)>> {
        let t = self.tenant(tenant)?;
        Ok(super::counts::read_all_archetypes(&t.tree)?
            .into_iter()
            .filter(|(id, _, _)| !known.contains(&id.as_str()))
            .collect())
    }

    /// Up to `limit` ids of the review queue after `after`, in id order.
    pub fn review_queue_after(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        let t = self.tenant(tenant)?;
        let after = after.map(keys::review);
        super::ids_under(&t.tree, &keys::review_prefix(), after, 0, limit)
    }

    pub fn review_queue_len(&self, tenant: &str) -> StoreResult<u64> {
        super::counts::read(&self.tenant(tenant)?.tree, super::counts::Counted::Review)
    }

    /// Governance events matching `q`, oldest first.
    /// The SCIM id of a deleted user by their userName (any case): the latest one deleted
    /// under that name, if they ever had an assignment.
    pub fn departed_user(&self, tenant: &str, user_name: &str) -> StoreResult<Option<String>> {
        self.text_at(
            tenant,
            &keys::departed_by_name(user_name),
            "departed user id",
        )
    }

    /// The userName a deleted user had, by SCIM id.
    pub fn departed_name(&self, tenant: &str, id: &str) -> StoreResult<Option<String>> {
        self.text_at(tenant, &keys::departed_by_id(id), "departed userName")
    }

    fn text_at(&self, tenant: &str, key: &[u8], what: &str) -> StoreResult<Option<String>> {
        let t = self.tenant(tenant)?;
        t.tree
            .get(key)?
            .map(|v| {
                String::from_utf8(v.to_vec())
                    .map_err(|_| StoreError::Corrupt(format!("{what} is not UTF-8")))
            })
            .transpose()
    }

    pub fn governance_events(
        &self,
        tenant: &str,
        q: &EventQuery,
    ) -> StoreResult<Vec<GovernanceEvent>> {
        let t = self.tenant(tenant)?;
        let mut first = q.after_seq.saturating_add(1);
        let mut out = Vec::new();
        // Events are stamped in sequence order (see `Store::write_sync`), so the first one
        // after `until` ends every walk below.
        let mut take = |e: GovernanceEvent| {
            if q.until.is_some_and(|u| e.at > u) {
                return false;
            }
            if q.admits(&e) {
                out.push(e);
            }
            out.len() < q.limit
        };
        // A user's or a kind's events through their index, so that one user's history
        // among a million users' events reads that user's events only.
        let index = match (&q.user, &q.kind) {
            (Some(u), _) => Some((
                keys::governance_of_user_prefix(u),
                keys::governance_of_user(u, first),
            )),
            (None, Some(k)) if kind_indexed(k) => Some((
                keys::governance_of_kind_prefix(k),
                keys::governance_of_kind(k, first),
            )),
            _ => None,
        };
        match index {
            Some((prefix, start)) => {
                for kv in t.tree.range(start..) {
                    let (k, _) = kv?;
                    let Some(seq) = k.strip_prefix(prefix.as_slice()) else {
                        break;
                    };
                    let seq = super::decode_u64(seq, "governance index entry")?;
                    let v = t.tree.get(keys::governance(seq))?.ok_or_else(|| {
                        StoreError::Corrupt(format!("governance event {seq} is indexed but absent"))
                    })?;
                    if !take(decode(&v)?) {
                        break;
                    }
                }
            }
            None => {
                if let Some(since) = q.since {
                    first = first_event_since(&t.tree, since, first)?;
                }
                for kv in t
                    .tree
                    .range(keys::governance(first)..=keys::governance(u64::MAX))
                {
                    let (_, v) = kv?;
                    if !take(decode(&v)?) {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Store a job's record. A job that ends drops the oldest ended ones beyond
    /// [`JOBS_KEPT`]: a schedule every 20 s left 130,000 records a month, and a 409 or
    /// `/status` during a job read every one of them.
    pub async fn put_job(&self, tenant: &str, job: Job) -> StoreResult<()> {
        let ended = !job.status.holds_the_tenant();
        self.write(tenant, move |txn| {
            txn.put(keys::job(&job.job_id), encode(&job)?);
            if ended {
                prune_jobs(txn)?;
            }
            Ok(())
        })
        .await
    }

    pub fn job(&self, tenant: &str, id: &str) -> StoreResult<Option<Job>> {
        self.get_decoded(tenant, keys::job(id))
    }

    pub fn jobs(&self, tenant: &str) -> StoreResult<Vec<Job>> {
        let t = self.tenant(tenant)?;
        let mut out = Vec::new();
        for kv in t.tree.scan_prefix(keys::jobs_prefix()) {
            let (_, v) = kv?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// The job that holds the tenant's slot, if one does: the newest queued or running.
    pub fn running_job(&self, tenant: &str) -> StoreResult<Option<Job>> {
        if !self.job_running(tenant) {
            return Ok(None);
        }
        Ok(self
            .jobs(tenant)?
            .into_iter()
            .filter(|j| j.status.holds_the_tenant())
            .max_by_key(|j| j.started_at))
    }

    /// Jobs left `queued` or `running` by a daemon that stopped are marked interrupted,
    /// so nobody waits on them and they can be started again. Returns them as marked.
    pub async fn mark_interrupted_jobs(&self, tenant: &str) -> StoreResult<Vec<Job>> {
        let stale: Vec<Job> = self
            .jobs(tenant)?
            .into_iter()
            .filter(|j| j.status.holds_the_tenant())
            .collect();
        let mut marked = Vec::with_capacity(stale.len());
        for mut j in stale {
            j.status = JobStatus::Interrupted;
            j.finished_at = Some(Utc::now());
            j.error = Some("the daemon stopped before the job finished".into());
            self.put_job(tenant, j.clone()).await?;
            marked.push(j);
        }
        Ok(marked)
    }
}

/// Ended jobs a tenant keeps the records of (queued and running ones are always kept).
pub const JOBS_KEPT: usize = 1000;

/// Past [`JOBS_KEPT`] and a tenth (so that pruning reads the records once per hundred
/// jobs, not at every one), delete the records of the oldest ended jobs down to it.
fn prune_jobs(txn: &mut super::Txn<'_>) -> StoreResult<()> {
    let all = txn.keys_with_prefix(&keys::jobs_prefix())?;
    let total = all.len();
    if total <= JOBS_KEPT + JOBS_KEPT / 10 {
        return Ok(());
    }
    let mut ended = Vec::with_capacity(total);
    for k in all {
        if let Some(v) = txn.get(&k)? {
            let j: Job = decode(&v)?;
            if !j.status.holds_the_tenant() {
                ended.push((j.started_at, k));
            }
        }
    }
    ended.sort();
    let excess = total.saturating_sub(JOBS_KEPT).min(ended.len());
    for (_, k) in ended.into_iter().take(excess) {
        txn.del(k);
    }
    Ok(())
}

const POLICY_FINGERPRINT_KEY: &[u8] = b"s\0policy";

/// `s sched: name` → the schedule's last result for the tenant.
fn scheduled_key(schedule: &str) -> Vec<u8> {
    let mut k = b"s\0sched:".to_vec();
    k.extend_from_slice(schedule.as_bytes());
    k
}

/// What a scheduled run last did for a tenant. Kept in the store so that `/status` still
/// says what last night's run did after a morning's restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledResult {
    pub at: DateTime<Utc>,
    pub part: ScheduledPart,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduledPart {
    /// The run's own result (`export`, `compact`, or a job that could not start).
    Text(String),
    /// The id of the job the run started (`reconcile`); its state is read when shown.
    Job(String),
}

impl Store {
    pub fn scheduled_result(
        &self,
        tenant: &str,
        schedule: &str,
    ) -> StoreResult<Option<ScheduledResult>> {
        self.get_decoded(tenant, scheduled_key(schedule))
    }

    pub async fn set_scheduled_result(
        &self,
        tenant: &str,
        schedule: &str,
        result: &ScheduledResult,
    ) -> StoreResult<()> {
        let (key, value) = (scheduled_key(schedule), encode(result)?);
        self.write(tenant, move |txn| {
            txn.put(key, value);
            Ok(())
        })
        .await
    }
}

impl Store {
    /// The fingerprint of the policy the tenant's assignments were last computed with.
    pub fn policy_fingerprint(&self, tenant: &str) -> StoreResult<Option<String>> {
        let t = self.tenant(tenant)?;
        Ok(t.tree
            .get(POLICY_FINGERPRINT_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Whether the assignments are recorded as computed under the policy `fingerprint`.
    pub fn policy_recorded(&self, tenant: &str, fingerprint: &str) -> StoreResult<bool> {
        Ok(self.policy_fingerprint(tenant)?.as_deref() == Some(fingerprint))
    }

    /// Forget which policy the assignments were computed under: the next start
    /// reclassifies the tenant, whatever its bundle then.
    pub async fn clear_policy_fingerprint(&self, tenant: &str) -> StoreResult<()> {
        self.write(tenant, move |txn| {
            txn.del(POLICY_FINGERPRINT_KEY.to_vec());
            Ok(())
        })
        .await
    }

    pub async fn set_policy_fingerprint(&self, tenant: &str, fp: &str) -> StoreResult<()> {
        let fp = fp.as_bytes().to_vec();
        self.write(tenant, move |txn| {
            txn.put(POLICY_FINGERPRINT_KEY.to_vec(), fp);
            Ok(())
        })
        .await
    }
}

/// An index to walk in id order, for paged listings.
#[derive(Debug, Clone)]
pub enum IdScan {
    Archetype(String),
    Department(String),
    Manager(String),
    Email(String),
    /// Members of a group (users and groups).
    Members(String),
}

impl Store {
    /// Ids under an index entry, in id order, strictly after `after`, streamed: a page
    /// costs its own size, not the size of the index entry.
    pub fn scan_ids(
        &self,
        tenant: &str,
        scan: &IdScan,
        after: Option<&str>,
    ) -> StoreResult<impl Iterator<Item = StoreResult<String>> + use<>> {
        let t = self.tenant(tenant)?;
        let prefix = match scan {
            IdScan::Archetype(a) => keys::archetype_prefix(a),
            IdScan::Department(d) => {
                keys::index_prefix(super::Index::Department, &d.to_lowercase())
            }
            IdScan::Manager(m) => keys::index_prefix(super::Index::Manager, m),
            IdScan::Email(e) => keys::index_prefix(super::Index::Email, &e.to_lowercase()),
            IdScan::Members(g) => keys::members_prefix(g),
        };
        let plen = prefix.len();
        let start = match after {
            Some(a) => {
                let mut k = prefix.clone();
                k.extend_from_slice(a.as_bytes());
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut end = prefix;
        end.push(0xff);
        Ok(t.tree
            .range(start..end)
            .keys()
            .filter_map(move |k| match k {
                Ok(k) => keys::trailing_id(&k, plen).map(|id| Ok(id.to_owned())),
                Err(e) => Some(Err(e.into())),
            }))
    }

    /// A resource's stored JSON, undecoded, for readers that decode only what they need.
    pub fn get_raw(
        &self,
        tenant: &str,
        kind: ResourceKind,
        id: &str,
    ) -> StoreResult<Option<bytes::Bytes>> {
        let t = self.tenant(tenant)?;
        Ok(t.tree
            .get(keys::resource(kind, id))?
            .map(|v| bytes::Bytes::copy_from_slice(&v)))
    }

    /// Resources of a kind after `after` as (id, stored JSON), streamed and undecoded.
    pub fn scan_raw_after(
        &self,
        tenant: &str,
        kind: ResourceKind,
        after: Option<&str>,
    ) -> StoreResult<impl Iterator<Item = StoreResult<(String, bytes::Bytes)>> + use<>> {
        let t = self.tenant(tenant)?;
        let prefix = keys::resource_prefix(kind);
        let plen = prefix.len();
        let range = range_after(&prefix, after.map(|a| keys::resource(kind, a)));
        Ok(t.tree.range(range).map(move |kv| {
            let (k, v) = kv?;
            Ok((
                String::from_utf8_lossy(&k[plen..]).into_owned(),
                bytes::Bytes::copy_from_slice(&v),
            ))
        }))
    }
}

impl Store {
    /// Every assignment with user id after `after`, in id order: lets a full walk of the
    /// users join assignments by merging instead of a lookup per user.
    pub fn scan_assignments_after(
        &self,
        tenant: &str,
        after: Option<&str>,
    ) -> StoreResult<impl Iterator<Item = StoreResult<(String, Assignment)>> + use<>> {
        let t = self.tenant(tenant)?;
        let prefix = keys::assignment("");
        let plen = prefix.len();
        let range = range_after(&prefix, after.map(keys::assignment));
        Ok(t.tree.range(range).map(move |kv| {
            let (k, v) = kv?;
            let a: Assignment = decode(&v)?;
            Ok((String::from_utf8_lossy(&k[plen..]).into_owned(), a))
        }))
    }

    /// Every (member id, group id) pair with member id after `after`, in member order.
    pub fn scan_memberships_after(
        &self,
        tenant: &str,
        after: Option<&str>,
    ) -> StoreResult<impl Iterator<Item = StoreResult<(String, String)>> + use<>> {
        let t = self.tenant(tenant)?;
        let prefix = keys::backrefs_all_prefix();
        // Past every key of `after` itself: its keys are `b SEP after SEP group`.
        let after_key = after.map(|a| {
            let mut k = keys::backrefs_prefix(a);
            k.push(0xff);
            k
        });
        let range = range_after(&prefix, after_key);
        Ok(t.tree.range(range).keys().filter_map(move |k| {
            let k = match k {
                Ok(k) => k,
                Err(e) => return Some(Err(e.into())),
            };
            let (member, group) = keys::backref_parts(&k)?;
            Some(Ok((
                String::from_utf8_lossy(member).into_owned(),
                String::from_utf8_lossy(group).into_owned(),
            )))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::SCHEMA_VERSION_KEY;
    use super::super::testing::{Doubtful, create_user, set_user, user};
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn ended_jobs_past_the_kept_number_are_dropped_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let t0 = Utc::now() - chrono::Duration::days(30);
        let job = |i: usize, status: JobStatus| Job {
            job_id: format!("job-{i:05}"),
            kind: "reconcile".into(),
            status,
            started_at: t0 + chrono::Duration::seconds(i as i64),
            finished_at: None,
            counts: Default::default(),
            error: None,
            full: false,
            connector: None,
        };
        // The oldest of all is still running: it must survive any pruning.
        store
            .put_job("t", job(0, JobStatus::Running))
            .await
            .unwrap();
        let total = JOBS_KEPT + JOBS_KEPT / 10 + 1;
        for i in 1..total {
            store
                .put_job("t", job(i, JobStatus::Succeeded))
                .await
                .unwrap();
        }
        let kept = store.jobs("t").unwrap();
        assert_eq!(kept.len(), JOBS_KEPT);
        assert!(kept.iter().any(|j| j.job_id == "job-00000"));
        let oldest_ended = kept
            .iter()
            .filter(|j| j.job_id != "job-00000")
            .map(|j| j.job_id.clone())
            .min()
            .unwrap();
        assert_eq!(oldest_ended, format!("job-{:05}", total - JOBS_KEPT + 1));
        assert!(
            store
                .job("t", &format!("job-{:05}", total - 1))
                .unwrap()
                .is_some()
        );
        assert!(store.job("t", "job-00001").unwrap().is_none());
    }

    #[test]
    fn job_status_names_are_the_serialized_ones() {
        for s in [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Interrupted,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    fn query(user: Option<&str>, kind: Option<&str>, after_seq: u64, limit: usize) -> EventQuery {
        EventQuery {
            user: user.map(str::to_owned),
            kind: kind.map(str::to_owned),
            since: None,
            until: None,
            after_seq,
            limit,
        }
    }

    /// What a query must answer: every stored event, filtered here.
    fn expected(store: &Store, q: &EventQuery) -> Vec<GovernanceEvent> {
        let all = store
            .governance_events("t", &query(None, None, 0, usize::MAX))
            .unwrap();
        all.into_iter()
            .filter(|e| e.seq > q.after_seq && q.admits(e))
            .take(q.limit)
            .collect()
    }

    async fn history(store: &Store) -> Vec<String> {
        let mut ids = Vec::new();
        for (i, title) in ["sure", "unsure", "sure"].into_iter().enumerate() {
            ids.push(create_user(store, user(&format!("u{i}"), title, true)).await);
        }
        store
            .set_override("t", &ids[0], Some("y".into()), "user:admin")
            .await
            .unwrap();
        store
            .set_override("t", &ids[0], None, "user:admin")
            .await
            .unwrap();
        set_user(store, &ids[1], "sure", true).await;
        ids
    }

    #[tokio::test]
    async fn events_by_user_and_kind_match_a_full_walk() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        store.set_resolver("t", Arc::new(Doubtful));
        let ids = history(&store).await;
        let overridden = "rbac.archetype_overridden";
        let assigned = "rbac.archetype_assigned";
        let queries = [
            query(Some(&ids[0]), None, 0, 100),
            query(Some(&ids[1]), None, 0, 100),
            query(None, Some(overridden), 0, 100),
            query(None, Some(assigned), 0, 100),
            query(Some(&ids[0]), Some(assigned), 0, 100),
            query(Some(&ids[2]), Some(overridden), 0, 100),
            query(Some(&ids[0]), None, 1, 2),
            query(None, Some(assigned), 2, 1),
        ];
        for q in &queries {
            let got = store.governance_events("t", q).unwrap();
            assert_eq!(got, expected(&store, q), "{:?} {:?}", q.user, q.kind);
        }
        let kinds: Vec<String> = store
            .governance_events("t", &queries[0])
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, [assigned, overridden, "rbac.archetype_cleared"]);
        assert_eq!(store.governance_events("t", &queries[1]).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_layout_3_directory_gets_its_event_indexes_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let ids = {
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            store.set_resolver("t", Arc::new(Doubtful));
            let ids = history(&store).await;
            store.close().unwrap();
            ids
        };
        {
            // What layout 3 had: the events without their indexes.
            let db = crate::store::testing::when_unlocked(|| sled::open(dir.path()));
            let tree = db.open_tree("tenant/t").unwrap();
            for prefix in [b"e\0", b"f\0"] {
                for k in tree.scan_prefix(prefix).keys() {
                    tree.remove(k.unwrap()).unwrap();
                }
            }
            db.insert(SCHEMA_VERSION_KEY, b"3").unwrap();
            db.flush().unwrap();
        }
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let q = query(Some(&ids[0]), None, 0, 100);
        assert_eq!(store.governance_events("t", &q).unwrap().len(), 3);
        assert_eq!(
            store.governance_events("t", &q).unwrap(),
            expected(&store, &q)
        );
    }

    #[tokio::test]
    async fn override_rules_are_checked_as_the_write_lands() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        store.set_resolver("t", Arc::new(Doubtful));
        let sure = create_user(&store, user("sure", "sure", true)).await;
        let unsure = create_user(&store, user("unsure", "unsure", true)).await;
        let review = OverrideRules {
            only_review_items: true,
            refuse_during_job: true,
        };
        let refused = |r: StoreResult<Assignment>| match r {
            Err(StoreError::OverrideRefused(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let accept = |id: String| {
            let store = &store;
            async move {
                store
                    .change_override(
                        "t",
                        &id,
                        OverrideChange::AcceptSuggestion { expected: None },
                        review,
                        "user:rev",
                    )
                    .await
            }
        };

        // Only a review item can be accepted, and accepting takes its suggestion.
        assert!(matches!(
            refused(accept(sure.clone()).await),
            OverrideRefusal::NotInReview(_)
        ));
        let a = accept(unsure.clone()).await.unwrap();
        assert_eq!(
            (a.archetype_id.as_deref(), a.source),
            (Some("x"), AssignmentSource::Override)
        );
        // A second reviewer finds it resolved.
        assert!(matches!(
            refused(accept(unsure.clone()).await),
            OverrideRefusal::NotInReview(_)
        ));

        // An archetype the bundle no longer has.
        let set = |a: &str| {
            store.change_override(
                "t",
                &sure,
                OverrideChange::Set(a.to_owned()),
                OverrideRules::default(),
                "user:admin",
            )
        };
        assert!(matches!(
            refused(set("retired").await),
            OverrideRefusal::UnknownArchetype(a) if a == "retired"
        ));

        // While a job holds the tenant, and again once it has ended.
        assert!(store.claim_job("t").await.unwrap());
        assert!(!store.claim_job("t").await.unwrap(), "one job at a time");
        let during = store
            .change_override(
                "t",
                &sure,
                OverrideChange::Set("y".into()),
                review,
                "user:admin",
            )
            .await;
        assert!(matches!(refused(during), OverrideRefusal::JobRunning));
        // Unless the caller does not mind (the rules are the caller's).
        assert!(set("y").await.is_ok());
        store.end_job("t");
        assert!(!store.job_running("t"));
        let events = store
            .governance_events("t", &query(Some(&sure), None, 0, 100))
            .unwrap();
        assert_eq!(events.len(), 2, "the refusals wrote nothing: {events:?}");
    }

    #[tokio::test]
    async fn time_filters_match_a_full_walk() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        store.set_resolver("t", Arc::new(Doubtful));
        let ids = history(&store).await;
        for i in 0..6 {
            let title = if i % 2 == 0 { "sure" } else { "unsure" };
            create_user(&store, user(&format!("more{i}"), title, true)).await;
            store
                .set_override("t", &ids[0], Some(format!("o{i}")), "user:admin")
                .await
                .unwrap();
        }
        let all = store
            .governance_events("t", &query(None, None, 0, usize::MAX))
            .unwrap();
        assert!(all.len() >= 16, "{}", all.len());
        let mut asked = 0;
        for (i, from) in all.iter().enumerate() {
            // Each event's own time as `since` (the boundary is inclusive), a time just
            // past it, and windows closed by a later event's time.
            let sinces = [from.at, from.at + chrono::Duration::nanoseconds(1)];
            for since in sinces {
                for to in all
                    .iter()
                    .skip(i)
                    .step_by(3)
                    .map(|e| Some(e.at))
                    .chain([None])
                {
                    for (user, after_seq, limit) in [
                        (None, 0, 100),
                        (None, 3, 2),
                        (Some(ids[0].as_str()), 0, 100),
                    ] {
                        let mut q = query(user, None, after_seq, limit);
                        q.since = Some(since);
                        q.until = to;
                        let got = store.governance_events("t", &q).unwrap();
                        assert_eq!(got, expected(&store, &q), "since {since} until {to:?}");
                        asked += 1;
                    }
                }
            }
        }
        assert!(asked > 100);
        let last = all.last().unwrap();
        let mut q = query(None, None, 0, 100);
        q.since = Some(last.at + chrono::Duration::seconds(1));
        assert!(store.governance_events("t", &q).unwrap().is_empty());
        q.since = Some(all[0].at - chrono::Duration::seconds(1));
        assert_eq!(store.governance_events("t", &q).unwrap().len(), all.len());
    }

    #[tokio::test]
    async fn writes_are_never_stamped_before_the_last_event() {
        let dir = tempfile::tempdir().unwrap();
        let ahead = Utc::now() + chrono::Duration::hours(1);
        {
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            store.set_resolver("t", Arc::new(Doubtful));
            history(&store).await;
            store.close().unwrap();
        }
        {
            // What a clock later stepped back by an hour leaves: the last event an hour
            // ahead of the clock.
            let db = crate::store::testing::when_unlocked(|| sled::open(dir.path()));
            let tree = db.open_tree("tenant/t").unwrap();
            let (k, v) = tree
                .range(keys::governance_all())
                .next_back()
                .unwrap()
                .unwrap();
            let mut e: GovernanceEvent = decode(&v).unwrap();
            e.at = ahead;
            tree.insert(k, encode(&e).unwrap()).unwrap();
            db.flush().unwrap();
        }
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        store.set_resolver("t", Arc::new(Doubtful));
        let id = create_user(&store, user("late", "sure", true)).await;
        let mine = store
            .governance_events("t", &query(Some(&id), None, 0, 100))
            .unwrap();
        assert_eq!(mine.len(), 1);
        assert!(mine[0].at >= ahead, "{} < {ahead}", mine[0].at);
        let mut q = query(None, None, 0, 100);
        q.since = Some(ahead);
        let found: Vec<u64> = store
            .governance_events("t", &q)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[1], mine[0].seq);
    }
}
