//! `rosterd store check`: whether a store's derived keys agree with what they are derived
//! from. Every write keeps its indexes, roster records, membership back-references,
//! review queue and counters in the same atomic write as the documents, so they can
//! disagree only through a bug or damage the storage engine did not notice. Either
//! shows only as wrong answers (a user a filter misses, a count that never reaches
//! zero, a member whose group cannot be listed), never as an error, so an operator who
//! suspects the store after a crash, a full disk or an upgrade has no other way to tell.
//!
//! Each family is checked in both directions without holding a family in memory: every
//! document's expected keys are looked up, and the keys of the family are counted; only
//! when the count is off is the family walked again to name the keys nothing explains.
//! At a million users that keeps the check near one read of the store.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::counts::{self, Tally};
use super::keys::{self, ID_LEN, Index};
use super::roster::{self, Assignment, GovernanceEvent};
use super::{
    ChangeEvent, Member, StoreError, StoreResult, be_u64, count_under, decode, decode_u64,
    delivery, index_entries, record, recover_intent,
};
use crate::scim::ResourceKind;

/// The size of an export row file with no row: its header slot (see `rows.rs`).
const ROW_FILE_HEADER: u64 = 384;

/// At most this many problems are listed a tenant; all are counted.
pub const LISTED: usize = 50;

/// What the check found in one tenant.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TenantCheck {
    pub tenant: String,
    pub users: u64,
    pub groups: u64,
    pub memberships: u64,
    pub changes: u64,
    pub governance_events: u64,
    pub dead_letters: u64,
    /// A write a stop interrupted was completed when the tenant was opened, as a start
    /// would have.
    pub completed_a_write: bool,
    /// The first [`LISTED`] problems, each a sentence naming the key and what is wrong.
    pub problems: Vec<String>,
    /// Every problem found, listed or not.
    pub problem_count: u64,
    /// Keys written or removed to put derived keys right (`--repair`).
    pub repaired: u64,
    /// Put right what is derived as it is found.
    repair: bool,
    /// The config names the tenant, and the store has no data of it (yet: a start makes
    /// it).
    pub absent: bool,
}

impl TenantCheck {
    pub(super) fn problem(&mut self, what: String) {
        self.problem_count += 1;
        if self.problems.len() < LISTED {
            self.problems.push(what);
        }
    }

    /// When repairing, write (`Some`) or remove (`None`) a derived key the check found
    /// wrong. Each key stands alone: a repair cut short leaves every key it has not
    /// reached as it was, and running it again finishes it.
    pub(super) fn fix(
        &mut self,
        tree: &sled::Tree,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> StoreResult<bool> {
        if !self.repair {
            return Ok(false);
        }
        match value {
            Some(v) => tree.insert(key, v)?,
            None => tree.remove(key)?,
        };
        self.repaired += 1;
        Ok(true)
    }
}

/// Every tenant tree of the database, checked in name order; with `repair`, every derived
/// key found wrong is put right as it is found (the documents, assignments, memberships,
/// events and letters themselves are left as they are).
pub(super) fn check_all(
    db: &sled::Db,
    dir: &Path,
    configured: &[String],
    repair: bool,
) -> StoreResult<Vec<TenantCheck>> {
    let mut names: Vec<String> = db
        .tree_names()
        .iter()
        .filter_map(|n| {
            std::str::from_utf8(n)
                .ok()?
                .strip_prefix("tenant/")
                .map(str::to_owned)
        })
        .collect();
    let held = names.clone();
    for tenant in configured {
        if !names.contains(tenant) {
            names.push(tenant.clone());
        }
    }
    names.sort();
    let mut out = Vec::new();
    for tenant in names {
        let path = super::rows_path(dir, &tenant);
        // A row file of more than its header: the tenant had users, in this directory.
        let had_rows = std::fs::metadata(&path).is_ok_and(|m| m.len() > ROW_FILE_HEADER);
        if !held.contains(&tenant) {
            let mut c = TenantCheck {
                tenant,
                absent: true,
                ..TenantCheck::default()
            };
            if had_rows {
                c.problem(format!(
                    "the store holds none of this tenant's data, yet its export row file ({}) has rows: its data is gone. Restore a backup",
                    path.display()
                ));
            }
            out.push(c);
            continue;
        }
        let tree = db.open_tree(format!("tenant/{tenant}"))?;
        let mut c = TenantCheck {
            completed_a_write: recover_intent(&tree)?,
            tenant,
            repair,
            ..TenantCheck::default()
        };
        check_tree(&tree, &mut c)?;
        if tree.is_empty() && had_rows {
            c.problem(format!(
                "the tenant's data is empty, yet its export row file ({}) has rows: its data is gone. Restore a backup",
                path.display()
            ));
        }
        // After a repair the records changed: the file is built again at the next start.
        if c.repaired == 0 {
            let r = check_rows(&tree, &path, &mut c);
            go_on(&mut c, r)?;
        }
        if c.repaired > 0 {
            // The export's copy of the records is built from them at the next start.
            tree.remove(keys::ROWS_TOKEN_KEY)?;
            tree.flush()?;
        }
        out.push(c);
    }
    Ok(out)
}

/// How many keys of each derived family the documents explain, counted while they are
/// read: a family holding more keys than that holds some nothing explains. (Counted as
/// found, not as expected, so that a missing key cannot hide an extra one.)
#[derive(Default)]
struct Explained {
    index_entries: u64,
    records: u64,
    assignments: u64,
    archetype_entries: u64,
    review_entries: u64,
    archetypes: Tally<u64>,
    user_events: u64,
    kind_events: u64,
}

impl Explained {
    /// A user holding `archetype`, as its counters count them.
    fn holder(&mut self, archetype: &str, active: bool) {
        let e = self.archetypes.entry(archetype.to_owned()).or_default();
        e.0 += 1;
        e.1 += u64::from(active);
    }
}

pub(super) fn check_tree(tree: &sled::Tree, c: &mut TenantCheck) -> StoreResult<()> {
    let mut want = Explained::default();
    let r = check_documents(tree, c, &mut want);
    go_on(c, r)?;
    // Early, so that a count that is off is listed before the keys behind it; last when
    // repairing, so that the counts are taken after the keys nothing explains are gone.
    if !c.repair {
        let r = counts::check(tree, &want.archetypes, c);
        go_on(c, r)?;
    }
    let r = check_index_family(tree, c, &want);
    go_on(c, r)?;
    let r = check_per_user_families(tree, c, &want);
    go_on(c, r)?;
    let r = check_memberships(tree, c);
    go_on(c, r)?;
    let r = check_change_log(tree, c);
    // Without a readable counter, no cursor can be said to be past it.
    let last_seq = go_on(c, r)?.unwrap_or(u64::MAX);
    let r = check_governance(tree, c, &mut want);
    go_on(c, r)?;
    let r = delivery::check(tree, last_seq, c);
    c.dead_letters = go_on(c, r)?.unwrap_or_default();
    let r = check_departed(tree, c);
    go_on(c, r)?;
    let r = check_families_known(tree, c);
    go_on(c, r)?;
    if c.repair {
        let r = counts::check(tree, &want.archetypes, c);
        go_on(c, r)?;
    }
    Ok(())
}

/// A step that met a value it cannot read (a counter of the wrong length, say) is a
/// problem of the store, and the other steps still run; only the engine's own failures
/// end the check.
fn go_on<T>(c: &mut TenantCheck, r: StoreResult<T>) -> StoreResult<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(StoreError::Corrupt(what)) => {
            c.problem(format!(
                "a value cannot be read ({what}), which ended one part of the check early"
            ));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn kind_name(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::User => "user",
        ResourceKind::Group => "group",
    }
}

fn index_name(index: Index) -> &'static str {
    match index {
        Index::UserName => "userName",
        Index::UserExternalId => "user externalId",
        Index::GroupExternalId => "group externalId",
        Index::Email => "email",
        Index::Manager => "manager",
        Index::Department => "department",
        Index::GroupName => "group displayName",
        Index::Inactive => "inactive",
    }
}

/// The id ending a key, if the key has one.
fn id_at_end(key: &[u8]) -> Option<&str> {
    let start = key.len().checked_sub(ID_LEN)?;
    std::str::from_utf8(&key[start..]).ok()
}

/// Printable, for a message: keys hold user-supplied values.
fn shown(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

/// Each user's and group's document, with the index entries, roster record, assignment,
/// archetype entry and review entry it implies.
fn check_documents(
    tree: &sled::Tree,
    c: &mut TenantCheck,
    want: &mut Explained,
) -> StoreResult<()> {
    for kind in [ResourceKind::User, ResourceKind::Group] {
        let prefix = keys::resource_prefix(kind);
        for kv in tree.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let what = kind_name(kind);
            let Some(id) = keys::trailing_id(&k, prefix.len()) else {
                c.problem(format!(
                    "a {what} document is stored under {}, which is not an id",
                    shown(&k[prefix.len()..])
                ));
                continue;
            };
            match kind {
                ResourceKind::User => c.users += 1,
                ResourceKind::Group => c.groups += 1,
            }
            let doc: Value = match decode(&v) {
                Ok(doc) => doc,
                Err(e) => {
                    c.problem(format!("{what} {id}: its document does not decode ({e})"));
                    if kind == ResourceKind::User {
                        want.assignments += u64::from(tree.contains_key(keys::assignment(id))?);
                        kept_as_recorded(tree, want, id)?;
                    }
                    continue;
                }
            };
            if let Some(stored) = doc.get("id").and_then(Value::as_str)
                && stored != id
            {
                c.problem(format!(
                    "{what} {id}: its document names another id, {stored:?}"
                ));
            }
            for (index, value) in index_entries(kind, id, &doc) {
                let name = index_name(index);
                let key = keys::index_entry(index, &value, id);
                let right = keys::index_value(index, id);
                match tree.get(&key)? {
                    Some(found) if found.as_ref() == right => want.index_entries += 1,
                    None => {
                        c.problem(format!(
                            "{what} {id}: its {name} index entry {value:?} is missing, so lookups by it miss this {what}"
                        ));
                        if c.fix(tree, key, Some(right))? {
                            want.index_entries += 1;
                        }
                    }
                    Some(found) => {
                        // Two users with one userName cannot both be right: a repair
                        // leaves that to the identity provider.
                        let other = String::from_utf8_lossy(&found).into_owned();
                        let theirs = holds(tree, kind, &other, index, &value)?;
                        c.problem(format!(
                            "{what} {id}: its {name} index entry {value:?} names {other:?} instead{}",
                            if theirs { ", which has it too" } else { "" }
                        ));
                        if !theirs && c.fix(tree, key, Some(right))? {
                            want.index_entries += 1;
                        }
                    }
                }
            }
            if kind == ResourceKind::User {
                check_user_derived(tree, c, want, id, &doc)?;
            }
        }
    }
    Ok(())
}

fn check_user_derived(
    tree: &sled::Tree,
    c: &mut TenantCheck,
    want: &mut Explained,
    id: &str,
    doc: &Value,
) -> StoreResult<()> {
    let assignment: Option<Assignment> = match tree.get(keys::assignment(id))? {
        None => None,
        Some(b) => match decode(&b) {
            Ok(a) => Some(a),
            Err(e) => {
                want.assignments += 1;
                c.problem(format!("user {id}: its assignment does not decode ({e})"));
                return kept_as_recorded(tree, want, id);
            }
        },
    };
    // A missing assignment the record still holds: the record (and the archetype index
    // entry) are then the only trace of it, a person's override perhaps. Made again from
    // the document alone, they would lose it.
    if assignment.is_none()
        && let Some(held) = tree.get(keys::record(id))?
        && record::assigned(&held)?
    {
        c.problem(format!(
            "user {id}: its assignment is missing, though its roster record holds one{}; left as it is: set it again (an override, or a reclassification) or restore a backup",
            record::holding(&held)?
                .map(|(a, _)| format!(" (archetype {a:?})"))
                .unwrap_or_default()
        ));
        return kept_as_recorded(tree, want, id);
    }
    let expected = record::expected(doc, assignment.as_ref())?;
    match tree.get(keys::record(id))? {
        None => {
            c.problem(format!(
                "user {id}: its roster record is missing, so the Roster API and the export leave the user out"
            ));
            if c.fix(tree, keys::record(id), Some(expected))? {
                want.records += 1;
            }
        }
        Some(found) => {
            want.records += 1;
            if found.as_ref() != expected.as_slice() {
                c.problem(format!(
                    "user {id}: its roster record differs from its document and assignment, so the Roster API shows stale fields"
                ));
                c.fix(tree, keys::record(id), Some(expected))?;
            }
        }
    }
    let queued = tree.contains_key(keys::review(id))?;
    want.review_entries += u64::from(queued);
    let Some(a) = assignment else {
        return Ok(());
    };
    want.assignments += 1;
    if let Some(archetype) = &a.archetype_id {
        let active = doc.get("active").and_then(Value::as_bool).unwrap_or(true);
        want.holder(archetype, active);
        if tree.contains_key(keys::archetype_entry(archetype, id))? {
            want.archetype_entries += 1;
        } else {
            c.problem(format!(
                "user {id}: the archetype index lacks its entry under {archetype:?}, so listing by archetype misses the user"
            ));
            if c.fix(tree, keys::archetype_entry(archetype, id), Some(Vec::new()))? {
                want.archetype_entries += 1;
            }
        }
    }
    match (a.needs_review, queued) {
        (true, false) => {
            c.problem(format!(
                "user {id}: needs review but is not in the review queue"
            ));
            if c.fix(tree, keys::review(id), Some(Vec::new()))? {
                want.review_entries += 1;
            }
        }
        (false, true) => {
            c.problem(format!(
                "user {id}: is in the review queue though its assignment does not need review"
            ));
            if c.fix(tree, keys::review(id), None)? {
                want.review_entries -= 1;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The keys whose stored count is not the one counted (absent counts as the default),
/// with both, in key order: a family of counters held against a walk.
pub(super) fn disagreeing<'a, K: Ord, V: Copy + Default + PartialEq>(
    stored: &'a BTreeMap<K, V>,
    counted: &'a BTreeMap<K, V>,
) -> Vec<(&'a K, V, V)> {
    let keys: std::collections::BTreeSet<&K> = stored.keys().chain(counted.keys()).collect();
    keys.into_iter()
        .map(|k| {
            let get = |m: &BTreeMap<K, V>| m.get(k).copied().unwrap_or_default();
            (k, get(stored), get(counted))
        })
        .filter(|(_, s, w)| s != w)
        .collect()
}

/// Whether the resource `id` exists and its document has `value` in `index`.
fn holds(
    tree: &sled::Tree,
    kind: ResourceKind,
    id: &str,
    index: Index,
    value: &str,
) -> StoreResult<bool> {
    stored_and(tree, keys::resource(kind, id), |doc: &Value| {
        index_entries(kind, id, doc).contains(&(index, value.to_owned()))
    })
}

/// Whether a value is stored at `key` and `explains` it. One that does not decode is a
/// problem of its own, found where it is read: what it would explain is left alone.
fn stored_and<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    key: Vec<u8>,
    explains: impl FnOnce(&T) -> bool,
) -> StoreResult<bool> {
    Ok(match tree.get(key)? {
        Some(bytes) => decode::<T>(&bytes).map_or(true, |v| explains(&v)),
        None => false,
    })
}

/// A user whose assignment cannot be read, or is missing: the stored record, and the
/// archetype entry it names, stand for it, so that neither a count nor a repair takes
/// the user out of their archetype.
fn kept_as_recorded(tree: &sled::Tree, want: &mut Explained, id: &str) -> StoreResult<()> {
    let Some(held) = tree.get(keys::record(id))? else {
        return Ok(());
    };
    want.records += 1;
    want.review_entries += u64::from(tree.contains_key(keys::review(id))?);
    if let Some((archetype, active)) = record::holding(&held)? {
        want.holder(&archetype, active);
        if tree.contains_key(keys::archetype_entry(&archetype, id))? {
            want.archetype_entries += 1;
        }
    }
    Ok(())
}

/// Which index a key's tag names, and the kind of resource it points at.
fn index_of(tag: &[u8]) -> Option<(Index, ResourceKind)> {
    use Index::*;
    let all = [
        (UserName, ResourceKind::User),
        (UserExternalId, ResourceKind::User),
        (Email, ResourceKind::User),
        (Manager, ResourceKind::User),
        (Department, ResourceKind::User),
        (Inactive, ResourceKind::User),
        (GroupExternalId, ResourceKind::Group),
        (GroupName, ResourceKind::Group),
    ];
    all.into_iter()
        .find(|(i, _)| keys::index_prefix(*i, "").get(2..4) == Some(tag))
}

/// Index entries no document explains: looked for only when there are more than the
/// documents imply.
fn check_index_family(tree: &sled::Tree, c: &mut TenantCheck, want: &Explained) -> StoreResult<()> {
    let family = [b'i', 0];
    if count_under(tree, &family)? == want.index_entries {
        return Ok(());
    }
    for k in tree.scan_prefix(family).keys() {
        let k = k?;
        // `i SEP tag SEP value [SEP id]`
        let Some((index, kind)) = k.get(2..4).and_then(index_of) else {
            c.problem(format!("an index entry of an unknown index: {}", shown(&k)));
            continue;
        };
        let rest = &k[5.min(k.len())..];
        let (value, id) = if index.is_unique() {
            let id = tree.get(&k)?.map(|v| v.to_vec()).unwrap_or_default();
            (rest.to_vec(), String::from_utf8_lossy(&id).into_owned())
        } else {
            match (rest.len().checked_sub(ID_LEN + 1), id_at_end(rest)) {
                (Some(end), Some(id)) => (rest[..end].to_vec(), id.to_owned()),
                _ => {
                    c.problem(format!("an index entry without an id: {}", shown(&k)));
                    continue;
                }
            }
        };
        let value = String::from_utf8_lossy(&value).into_owned();
        let explained = holds(tree, kind, &id, index, &value)?;
        if !explained {
            c.problem(format!(
                "the {} index entry {value:?} points at {} {id}, which {}",
                index_name(index),
                kind_name(kind),
                if tree.contains_key(keys::resource(kind, &id))? {
                    "does not have that value: lookups by it find the wrong resource"
                } else {
                    "does not exist"
                }
            ));
            c.fix(tree, k.to_vec(), None)?;
        }
    }
    Ok(())
}

/// The families keyed by user id (records, assignments, archetype and review entries,
/// reactivation marks): each key's user must exist and explain it.
fn check_per_user_families(
    tree: &sled::Tree,
    c: &mut TenantCheck,
    want: &Explained,
) -> StoreResult<()> {
    let user_exists = |id: &str| tree.contains_key(keys::resource(ResourceKind::User, id));
    // Reactivation marks are few and no document says which users have one: always walked.
    let families: [(Vec<u8>, Option<u64>, &str); 4] = [
        (keys::record(""), Some(want.records), "a roster record"),
        (
            keys::assignment(""),
            Some(want.assignments),
            "an assignment",
        ),
        (
            keys::review_prefix(),
            Some(want.review_entries),
            "a review-queue entry",
        ),
        (keys::reactivated(""), None, "a reactivation mark"),
    ];
    for (prefix, explained, what) in families {
        if explained.is_some() && Some(count_under(tree, &prefix)?) == explained {
            continue;
        }
        for k in tree.scan_prefix(&prefix).keys() {
            let k = k?;
            match keys::trailing_id(&k, prefix.len()) {
                Some(id) if user_exists(id)? => {}
                // An assignment is not derived: a repair leaves it for a restored
                // document to find.
                Some(id) if prefix == keys::assignment("") => c.problem(format!(
                    "{what} of user {id}, who does not exist; left as it is (a repair changes no assignment)"
                )),
                Some(id) => {
                    c.problem(format!("{what} of user {id}, who does not exist"));
                    c.fix(tree, k.to_vec(), None)?;
                }
                None => c.problem(format!("{what} under a key without an id: {}", shown(&k))),
            }
        }
    }
    let prefix = [b'x', 0];
    if count_under(tree, &prefix)? != want.archetype_entries {
        for k in tree.scan_prefix(prefix).keys() {
            let k = k?;
            // `x archetype SEP id`
            let (Some(id), Some(end)) = (id_at_end(&k), k.len().checked_sub(ID_LEN + 1)) else {
                c.problem(format!(
                    "an archetype index entry without an id: {}",
                    shown(&k)
                ));
                continue;
            };
            let archetype = String::from_utf8_lossy(&k[2..end.max(2)]).into_owned();
            let held = if tree.contains_key(keys::assignment(id))? {
                stored_and(tree, keys::assignment(id), |a: &Assignment| {
                    a.archetype_id.as_deref() == Some(archetype.as_str())
                })?
            } else {
                // Missing, the assignment is named as such above; its record stands for it.
                let recorded = tree.get(keys::record(id))?;
                match recorded.as_deref().map(record::holding).transpose()? {
                    Some(Some((a, _))) => a == archetype,
                    _ => false,
                }
            };
            if !held {
                c.problem(format!(
                    "the archetype index lists user {id} under {archetype:?}, which the user does not hold"
                ));
                c.fix(tree, k.to_vec(), None)?;
            }
        }
    }
    Ok(())
}

/// Each membership has its back-reference, names an existing group and member of the
/// kind it records, and no back-reference is left without its membership.
fn check_memberships(tree: &sled::Tree, c: &mut TenantCheck) -> StoreResult<()> {
    let prefix = [b'm', 0];
    let mut backrefs_found = 0;
    for kv in tree.scan_prefix(prefix) {
        let (k, v) = kv?;
        // `m SEP gid SEP mid`
        let (gid, mid) = match (k.get(2..2 + ID_LEN), k.get(3 + ID_LEN..)) {
            (Some(g), Some(m)) if m.len() == ID_LEN => (
                String::from_utf8_lossy(g).into_owned(),
                String::from_utf8_lossy(m).into_owned(),
            ),
            _ => {
                c.problem(format!("a membership under a malformed key: {}", shown(&k)));
                continue;
            }
        };
        c.memberships += 1;
        if !tree.contains_key(keys::resource(ResourceKind::Group, &gid))? {
            c.problem(format!(
                "a membership of {mid} in group {gid}, which does not exist"
            ));
        }
        match decode::<Member>(&v) {
            Err(e) => c.problem(format!(
                "the membership of {mid} in group {gid} does not decode ({e})"
            )),
            Ok(m) => {
                let kind = if m.kind.eq_ignore_ascii_case("group") {
                    ResourceKind::Group
                } else {
                    ResourceKind::User
                };
                if m.value != mid {
                    c.problem(format!(
                        "the membership of {mid} in group {gid} records another member, {:?}",
                        m.value
                    ));
                } else if !tree.contains_key(keys::resource(kind, &mid))? {
                    c.problem(format!(
                        "group {gid} has member {mid}, a {} that does not exist",
                        kind_name(kind)
                    ));
                }
            }
        }
        if tree.contains_key(keys::backref(&mid, &gid))? {
            backrefs_found += 1;
        } else {
            c.problem(format!(
                "the membership of {mid} in group {gid} lacks its back-reference, so the member's groups leave it out"
            ));
            if c.fix(tree, keys::backref(&mid, &gid), Some(Vec::new()))? {
                backrefs_found += 1;
            }
        }
    }
    let backrefs = keys::backrefs_all_prefix();
    if count_under(tree, &backrefs)? != backrefs_found {
        for k in tree.scan_prefix(&backrefs).keys() {
            let k = k?;
            match keys::backref_parts(&k) {
                Some((mid, gid)) => {
                    let (mid, gid) = (String::from_utf8_lossy(mid), String::from_utf8_lossy(gid));
                    if !tree.contains_key(keys::member(&gid, &mid))? {
                        c.problem(format!(
                            "{mid} is listed as in group {gid}, which has no such member"
                        ));
                        c.fix(tree, k.to_vec(), None)?;
                    }
                }
                None => c.problem(format!(
                    "a back-reference under a malformed key: {}",
                    shown(&k)
                )),
            }
        }
    }
    Ok(())
}

/// Each change event decodes, sits under its own sequence number, and none is past the
/// sequence counter (the next write would take its number and overwrite it). Returns the
/// counter.
fn check_change_log(tree: &sled::Tree, c: &mut TenantCheck) -> StoreResult<u64> {
    let last = match tree.get(keys::SEQ_KEY)? {
        Some(v) => decode_u64(&v, "sequence counter")?,
        None => 0,
    };
    let mut highest = last;
    for kv in tree.scan_prefix(keys::changes_prefix()) {
        let (k, v) = kv?;
        c.changes += 1;
        let Some(seq) = k.get(2..).and_then(be_u64) else {
            c.problem(format!(
                "a change event under a malformed key: {}",
                shown(&k)
            ));
            continue;
        };
        if seq > last {
            c.problem(format!(
                "change {seq} is past the sequence counter ({last}): the next write would overwrite it"
            ));
            highest = highest.max(seq);
        }
        match decode::<ChangeEvent>(&v) {
            Ok(e) if e.seq != seq => {
                c.problem(format!("change {seq} holds the event of change {}", e.seq))
            }
            Ok(_) => {}
            Err(e) => c.problem(format!(
                "change {seq} does not decode ({e}): a connector that reaches it stops there (failed) until the store is restored"
            )),
        }
    }
    // Raised past every change, so that none is overwritten; nothing is renumbered.
    if highest > last
        && c.fix(
            tree,
            keys::SEQ_KEY.to_vec(),
            Some(highest.to_be_bytes().to_vec()),
        )?
    {
        return Ok(highest);
    }
    Ok(last)
}

/// Each governance event decodes, is within its counter and is indexed by user (and by
/// kind, for the kinds indexed so); no index entry is left without its event.
fn check_governance(
    tree: &sled::Tree,
    c: &mut TenantCheck,
    want: &mut Explained,
) -> StoreResult<()> {
    let last = match tree.get(keys::GSEQ_KEY)? {
        Some(v) => decode_u64(&v, "governance counter")?,
        None => 0,
    };
    let mut highest = last;
    for kv in tree.range(keys::governance_all()) {
        let (k, v) = kv?;
        c.governance_events += 1;
        let seq = be_u64(&k[2..]).unwrap_or(0);
        if seq > last {
            c.problem(format!(
                "governance event {seq} is past its counter ({last}): the next assignment change would overwrite it"
            ));
            highest = highest.max(seq);
        }
        let e: GovernanceEvent = match decode(&v) {
            Ok(e) => e,
            Err(e) => {
                c.problem(format!("governance event {seq} does not decode ({e})"));
                continue;
            }
        };
        if tree.contains_key(keys::governance_of_user(&e.user, seq))? {
            want.user_events += 1;
        } else {
            c.problem(format!(
                "governance event {seq} is missing from user {}'s events",
                e.user
            ));
            if c.fix(
                tree,
                keys::governance_of_user(&e.user, seq),
                Some(Vec::new()),
            )? {
                want.user_events += 1;
            }
        }
        if roster::kind_indexed(&e.kind) {
            if tree.contains_key(keys::governance_of_kind(&e.kind, seq))? {
                want.kind_events += 1;
            } else {
                c.problem(format!(
                    "governance event {seq} is missing from the events of kind {}",
                    e.kind
                ));
                if c.fix(
                    tree,
                    keys::governance_of_kind(&e.kind, seq),
                    Some(Vec::new()),
                )? {
                    want.kind_events += 1;
                }
            }
        }
    }
    if highest > last {
        c.fix(
            tree,
            keys::GSEQ_KEY.to_vec(),
            Some(highest.to_be_bytes().to_vec()),
        )?;
    }
    for (tag, expected, by) in [
        (b'e', want.user_events, "user"),
        (b'f', want.kind_events, "kind"),
    ] {
        if count_under(tree, &[tag, 0])? == expected {
            continue;
        }
        for k in tree.scan_prefix([tag, 0]).keys() {
            let k = k?;
            // `tag SEP value SEP seq`
            let Some(split) = k.len().checked_sub(9).filter(|&s| s >= 2) else {
                c.problem(format!(
                    "a governance index entry under a malformed key: {}",
                    shown(&k)
                ));
                continue;
            };
            let value = String::from_utf8_lossy(&k[2..split]).into_owned();
            let seq = be_u64(&k[split + 1..]).unwrap_or(0);
            let found = stored_and(tree, keys::governance(seq), |e: &GovernanceEvent| {
                if tag == b'e' {
                    e.user == value
                } else {
                    e.kind == value
                }
            })?;
            if !found {
                c.problem(format!(
                    "the governance events by {by} list event {seq} under {value:?}, which has no such event"
                ));
                c.fix(tree, k.to_vec(), None)?;
            }
        }
    }
    Ok(())
}

/// Each departed user's name points at an id that points back at a name.
fn check_departed(tree: &sled::Tree, c: &mut TenantCheck) -> StoreResult<()> {
    for kv in tree.scan_prefix([b'n', 0]) {
        let (k, id) = kv?;
        let name = String::from_utf8_lossy(&k[2..]).into_owned();
        let id = String::from_utf8_lossy(&id).into_owned();
        if !tree.contains_key(keys::departed_by_id(&id))? {
            c.problem(format!(
                "departed user {name:?} points at {id}, which has no departed name"
            ));
        }
    }
    Ok(())
}

/// The export's copy of the roster records (`rows.rs`), when a clean close vouched for
/// it: each row is the user's record with the user's groups, and every user has one. The
/// CSV export reads that file, not the store. Found right, it is vouched for again; found
/// wrong, it is left unvouched, so the next start builds it again.
fn check_rows(tree: &sled::Tree, path: &Path, c: &mut TenantCheck) -> StoreResult<()> {
    let Some(rows) = super::rows::RowFile::open_vouched(path, tree)? else {
        return Ok(());
    };
    let (mut seen, mut wrong) = (0u64, 0u64);
    let mut first_wrong: Option<String> = None;
    let walked = rows.for_each(|row| {
        seen += 1;
        let (id, agrees) = match row {
            super::rows::Row::Record { id, bytes, groups } => {
                let record = tree.get(keys::record(id))?;
                let mut same = record.as_deref() == Some(bytes);
                if let Some(packed) = groups {
                    let mut in_file: Vec<String> = super::rows::group_ids(packed).collect();
                    in_file.sort();
                    same &= in_file == super::groups_in(tree, id)?;
                }
                (id, same)
            }
            super::rows::Row::Stored { id } => (id, tree.contains_key(keys::record(id))?),
        };
        if !agrees {
            wrong += 1;
            first_wrong.get_or_insert_with(|| id.to_owned());
        }
        Ok(true)
    });
    match walked {
        Some(r) => r?,
        None => return Ok(()),
    }
    if wrong == 0 && seen == c.users {
        rows.prepare_seal(tree)?;
        tree.flush()?;
        rows.seal()?;
        return Ok(());
    }
    c.problem(format!(
        "the export's copy of the roster records ({}) has {} for {}, {wrong} of them unlike the store{}: CSV exports show what it holds. It is left to be built again at the next start",
        path.display(),
        crate::text::plural(seen, "row"),
        crate::text::plural(c.users, "user"),
        first_wrong.map(|id| format!(" (the first: user {id})")).unwrap_or_default()
    ));
    Ok(())
}

/// The one-byte family tags the store writes (see `keys.rs` and `delivery.rs`).
const KNOWN_FAMILIES: &[u8] = b"rimbcapnNxqgefjsvkKRwWAPSdDh";

/// Keys of a family this build does not write: another program's, or damage.
fn check_families_known(tree: &sled::Tree, c: &mut TenantCheck) -> StoreResult<()> {
    let mut unknown: BTreeMap<u8, u64> = BTreeMap::new();
    let mut at: Vec<u8> = Vec::new();
    // One key per family: jump past each family instead of reading it.
    while let Some(kv) = tree.range(at.clone()..).next() {
        let (k, _) = kv?;
        let tag = k[0];
        if !KNOWN_FAMILIES.contains(&tag) {
            *unknown.entry(tag).or_default() += count_under(tree, &[tag])?;
        }
        match tag.checked_add(1) {
            Some(next) => at = vec![next],
            None => break,
        }
    }
    for (tag, n) in unknown {
        c.problem(format!(
            "{n} keys begin with {}, a family this rosterd does not write",
            shown(&[tag])
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Doubtful, create_user, set_user, user, when_unlocked};
    use super::super::{DeadLetter, MemberRef, Store, keys};
    use super::*;
    use chrono::Utc;
    use serde_json::json;
    use std::sync::Arc;

    /// A tenant "t" made by the store's own writes alone: users in and out of the review
    /// queue, inactive, overridden, updated and deleted; a group in a group; a dead letter.
    async fn written(dir: &std::path::Path) -> (Store, Vec<String>) {
        let store = when_unlocked(|| Store::open(dir));
        store.set_resolver("t", Arc::new(Doubtful));
        let mut ids = Vec::new();
        for (i, (title, active)) in [
            ("sure", true),
            ("unsure", true),
            ("unsure", false),
            ("sure", true),
        ]
        .into_iter()
        .enumerate()
        {
            let mut doc = user(&format!("U{i}@example.com"), title, active);
            doc["emails"] = json!([{"value": format!("u{i}@example.com"), "primary": true}]);
            doc["externalId"] = json!(format!("ext-{i}"));
            doc[crate::scim::schema::ENTERPRISE_USER_SCHEMA] =
                json!({"department": "Eng", "manager": {"value": "boss"}});
            ids.push(create_user(&store, doc).await);
        }
        set_user(&store, &ids[1], "unsure", false).await;
        store
            .set_override("t", &ids[0], Some("y".into()), "user:admin")
            .await
            .unwrap();
        let member = |id: &String, kind: &str| MemberRef {
            value: id.clone(),
            kind: Some(kind.into()),
            display: None,
        };
        let group = |name: &str| json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": name});
        let inner = store
            .create(
                "t",
                ResourceKind::Group,
                group("inner"),
                vec![member(&ids[0], "User"), member(&ids[3], "User")],
            )
            .await
            .unwrap()
            .id;
        store
            .create(
                "t",
                ResourceKind::Group,
                group("outer"),
                vec![member(&inner, "Group"), member(&ids[1], "User")],
            )
            .await
            .unwrap();
        // Leaves its groups, its name for its governance history, and a governance event.
        store
            .delete("t", ResourceKind::User, &ids[3], None)
            .await
            .unwrap();
        let event = store.changes("t", 0, 1).unwrap().remove(0);
        store
            .add_dead_letter(
                "t",
                DeadLetter {
                    id: 0,
                    connector: "sis".into(),
                    at: Utc::now(),
                    reason: "refused".into(),
                    request: None,
                    response: None,
                    event,
                },
            )
            .await
            .unwrap();
        ids.push(inner);
        (store, ids)
    }

    fn checked(store: &Store) -> TenantCheck {
        let mut all = store.check(&[]).unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        all.remove(0)
    }

    #[tokio::test]
    async fn a_store_made_by_its_own_writes_checks_clean() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = written(dir.path()).await;
        let c = checked(&store);
        assert_eq!(c.problems, Vec::<String>::new());
        assert_eq!(c.problem_count, 0);
        assert_eq!((c.users, c.groups, c.memberships), (3, 2, 3), "{c:?}");
        assert_eq!(c.dead_letters, 1);
        assert!(c.changes >= 8 && c.governance_events >= 5, "{c:?}");
        assert!(!c.completed_a_write);
        let r = store.repair(&[]).unwrap();
        assert_eq!((r[0].problem_count, r[0].repaired), (0, 0));
    }

    /// One key written, changed or removed behind the store's back, and the words the
    /// check must find among its problems.
    struct Damage {
        does: fn(&sled::Tree, &[String]),
        finds: &'static [&'static str],
        /// What a repair cannot put right, left for the check after it: the damage is to
        /// a document, an event or a key of no family, not to what is derived from them.
        stays: &'static [&'static str],
    }

    fn user_key(id: &str) -> Vec<u8> {
        keys::resource(ResourceKind::User, id)
    }

    const GHOST: &str = "00000000-0000-0000-0000-000000000000";

    #[tokio::test]
    async fn each_kind_of_damage_is_named() {
        let cases: Vec<Damage> = vec![
            Damage {
                does: |t, ids| {
                    t.remove(keys::index_entry(Index::Email, "u1@example.com", &ids[1]))
                        .unwrap();
                },
                finds: &["email index entry \"u1@example.com\" is missing"],
                stays: &[],
            },
            Damage {
                does: |t, _| {
                    t.insert(
                        keys::index_entry(Index::Department, "ghosts", GHOST),
                        vec![],
                    )
                    .unwrap();
                },
                finds: &[
                    "department index entry \"ghosts\" points at user",
                    "does not exist",
                ],
                stays: &[],
            },
            Damage {
                does: |t, ids| {
                    t.insert(
                        keys::index_entry(Index::Department, "sales", &ids[0]),
                        vec![],
                    )
                    .unwrap();
                },
                finds: &["\"sales\" points at user", "does not have that value"],
                stays: &[],
            },
            Damage {
                does: |t, ids| {
                    t.insert(
                        keys::index_entry(Index::UserName, "u0@example.com", &ids[0]),
                        ids[1].as_bytes(),
                    )
                    .unwrap();
                },
                finds: &["userName index entry \"u0@example.com\" names"],
                stays: &[],
            },
            Damage {
                does: |t, ids| {
                    t.remove(keys::record(&ids[2])).unwrap();
                },
                finds: &["roster record is missing"],
                stays: &[],
            },
            Damage {
                does: |t, ids| {
                    let other = t.get(keys::record(&ids[1])).unwrap().unwrap();
                    t.insert(keys::record(&ids[0]), other).unwrap();
                },
                finds: &["roster record differs"],
                stays: &[],
            },
            Damage {
                // A missing record and one of nobody: counting alone would see neither.
                does: |t, ids| {
                    let r = t.remove(keys::record(&ids[1])).unwrap().unwrap();
                    t.insert(keys::record(GHOST), r).unwrap();
                },
                finds: &["roster record is missing", "roster record of user 00000000"],
                stays: &[],
            },
            Damage {
                does: |t, _| {
                    t.insert(keys::assignment(GHOST), b"{}".to_vec()).unwrap();
                },
                finds: &[
                    "assignment of user 00000000-0000-0000-0000-000000000000, who does not exist",
                ],
                stays: &[
                    "assignment of user 00000000-0000-0000-0000-000000000000, who does not exist; left as it is",
                ],
            },
            Damage {
                does: |t, ids| {
                    t.remove(keys::archetype_entry("y", &ids[0])).unwrap();
                },
                finds: &["archetype index lacks its entry under \"y\""],
                stays: &[],
            },
            Damage {
                does: |t, ids| {
                    t.insert(keys::archetype_entry("z", &ids[1]), vec![])
                        .unwrap();
                },
                finds: &["lists user", "under \"z\", which the user does not hold"],
                stays: &[],
            },
            Damage {
                does: |t, ids| {
                    t.insert(keys::review(&ids[0]), vec![]).unwrap();
                },
                finds: &["in the review queue though"],
                stays: &[],
            },
            Damage {
                does: |t, ids| {
                    t.remove(keys::review(&ids[2])).unwrap();
                },
                finds: &[
                    "needs review but is not in the review queue",
                    "count:review says 2, but there are 1",
                ],
                stays: &[],
            },
            Damage {
                does: |t, ids| {
                    t.remove(keys::backref(&ids[0], &ids[4])).unwrap();
                },
                finds: &["lacks its back-reference"],
                stays: &[],
            },
            Damage {
                does: |t, ids| {
                    t.insert(keys::backref(&ids[2], &ids[4]), vec![]).unwrap();
                },
                finds: &["is listed as in group", "which has no such member"],
                stays: &[],
            },
            Damage {
                does: |t, ids| {
                    t.remove(user_key(&ids[0])).unwrap();
                },
                finds: &[
                    "a user that does not exist",
                    "count:users says 3, but there are 2",
                ],
                stays: &["a user that does not exist"],
            },
            Damage {
                does: |t, _| {
                    t.insert(b"s\0count:groups", &7u64.to_be_bytes()).unwrap();
                },
                finds: &["count:groups says 7, but there are 2"],
                stays: &[],
            },
            Damage {
                does: |t, _| {
                    let mut v = 5u64.to_be_bytes().to_vec();
                    v.extend_from_slice(&5u64.to_be_bytes());
                    t.insert(b"s\0count:archetype:x", v).unwrap();
                },
                finds: &[
                    "archetype \"x\" is counted as held by 5 users (5 active), but 2 users (0 active) hold it",
                ],
                stays: &[],
            },
            Damage {
                does: |t, _| {
                    t.insert(keys::SEQ_KEY, &2u64.to_be_bytes()).unwrap();
                },
                finds: &[
                    "is past the sequence counter (2)",
                    "past the last change (2)",
                ],
                stays: &[],
            },
            Damage {
                does: |t, _| {
                    let last = t.get(keys::SEQ_KEY).unwrap().unwrap();
                    let last = u64::from_be_bytes(last.as_ref().try_into().unwrap());
                    t.insert(b"k\0sis", &(last + 5).to_be_bytes()).unwrap();
                },
                finds: &[
                    "\"sis\" has acknowledged up to change",
                    "it would skip the next 5 changes",
                ],
                stays: &[],
            },
            Damage {
                does: |t, _| {
                    t.insert(keys::change(1), &b"\xff not json"[..]).unwrap();
                },
                finds: &["change 1 does not decode"],
                stays: &["change 1 does not decode"],
            },
            Damage {
                does: |t, _| {
                    t.insert(b"s\0count:dead:sis", &0u64.to_be_bytes()).unwrap();
                },
                finds: &["\"sis\" is counted as holding 0 dead letters, but holds 1"],
                stays: &[],
            },
            Damage {
                does: |t, ids| {
                    t.remove(keys::governance_of_user(&ids[0], 1)).unwrap();
                },
                finds: &["governance event 1 is missing from user"],
                stays: &[],
            },
            Damage {
                does: |t, _| {
                    t.insert(
                        keys::governance_of_kind("rbac.archetype_cleared", 99),
                        vec![],
                    )
                    .unwrap();
                },
                finds: &["list event 99 under \"rbac.archetype_cleared\", which has no such event"],
                stays: &[],
            },
            Damage {
                // A value that cannot be read ends only its own part of the check.
                does: |t, ids| {
                    t.insert(b"s\0count:users", &b"short"[..]).unwrap();
                    t.remove(keys::backref(&ids[0], &ids[4])).unwrap();
                },
                finds: &[
                    "the counter count:users cannot be read (counter is not 8 bytes); there are 3",
                    "lacks its back-reference",
                ],
                stays: &[],
            },
            Damage {
                does: |t, _| {
                    t.insert(b"Z\0what", vec![]).unwrap();
                },
                finds: &["1 keys begin with \"Z\", a family this rosterd does not write"],
                stays: &["a family this rosterd does not write"],
            },
        ];
        for (i, case) in cases.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let (store, ids) = written(dir.path()).await;
            // A cursor, so that a sequence counter set back shows in it too.
            let last = store.last_seq("t").unwrap();
            store
                .tenant("t")
                .unwrap()
                .tree
                .insert(b"k\0sis", &last.to_be_bytes())
                .unwrap();
            assert_eq!(
                checked(&store).problems,
                Vec::<String>::new(),
                "case {i} before"
            );
            (case.does)(&store.tenant("t").unwrap().tree, &ids);
            let c = checked(&store);
            let all = c.problems.join("\n");
            for words in case.finds {
                assert!(all.contains(words), "case {i}: {words:?} not in:\n{all}");
            }
            assert_eq!(c.problem_count, c.problems.len() as u64);

            // A repair finds the same, puts right what is derived, and leaves the rest.
            let mut repaired = store.repair(&[]).unwrap();
            // Not always the same: a key put right early can explain one the check found
            // later, and a key removed early can leave one unexplained that it explained.
            let found = &repaired[0].problems;
            assert!(
                found.iter().any(|p| c.problems.contains(p)),
                "case {i}: the repair found {found:?}, the check {:?}",
                c.problems
            );
            let derived = !case.stays.is_empty() || repaired[0].repaired > 0;
            assert!(derived, "case {i}: nothing repaired");
            let after = checked(&store).problems;
            if case.stays.is_empty() {
                assert_eq!(after, Vec::<String>::new(), "case {i} after the repair");
            } else {
                let left = after.join("\n");
                for words in case.stays {
                    assert!(
                        left.contains(words),
                        "case {i}: {words:?} not left in:\n{left}"
                    );
                }
            }
            // Repaired again, nothing more is written.
            repaired = store.repair(&[]).unwrap();
            assert_eq!(
                repaired[0].repaired, 0,
                "case {i}: {:?}",
                repaired[0].problems
            );
        }
    }

    /// A lost assignment (a person's override here) is named, and a repair keeps what
    /// still records it rather than rebuild the user as unassigned.
    #[tokio::test]
    async fn a_missing_assignment_is_named_and_what_records_it_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (store, ids) = written(dir.path()).await;
        let t = store.tenant("t").unwrap();
        t.tree.remove(keys::assignment(&ids[0])).unwrap().unwrap();
        let before = counts::read_archetype(&t.tree, "y").unwrap();
        assert_eq!(before, (1, 1));
        let found = checked(&store).problems;
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains(
                "its assignment is missing, though its roster record holds one (archetype \"y\")"
            ),
            "{found:?}"
        );
        let repaired = store.repair(&[]).unwrap();
        assert_eq!(repaired[0].repaired, 0, "{:?}", repaired[0].problems);
        assert!(
            t.tree
                .contains_key(keys::archetype_entry("y", &ids[0]))
                .unwrap()
        );
        assert_eq!(counts::read_archetype(&t.tree, "y").unwrap(), before);
        assert_eq!(checked(&store).problems, found);
    }

    /// A tenant the config names with no data: a new one is only said to be absent; one
    /// whose row file shows it had users is a problem.
    #[tokio::test]
    async fn a_configured_tenant_whose_data_is_gone_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = written(dir.path()).await;
            store.close().unwrap();
        }
        let store = when_unlocked(|| Store::open(dir.path()));
        let names = ["new".to_owned(), "t".to_owned()];
        let all = store.check(&names).unwrap();
        assert_eq!(all.len(), 2);
        assert!(all[0].absent && all[0].problems.is_empty(), "{all:?}");
        assert!(!all[1].absent && all[1].problems.is_empty(), "{all:?}");
        assert!(store.inner.db.drop_tree("tenant/t").unwrap());
        let all = store.check(&names).unwrap();
        assert!(all[1].absent, "{all:?}");
        assert!(
            all[1].problems.len() == 1
                && all[1].problems[0]
                    .contains("holds none of this tenant's data, yet its export row file"),
            "{all:?}"
        );
        // Not named by the config, a dropped tenant is not looked for.
        assert!(store.check(&[]).unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_interrupted_write_is_completed_and_said() {
        let dir = tempfile::tempdir().unwrap();
        let (store, ids) = written(dir.path()).await;
        let t = store.tenant("t").unwrap();
        // What a crash between the redo record and its keys leaves: the record, with the
        // key it would write gone.
        let record = t.tree.remove(keys::record(&ids[0])).unwrap().unwrap();
        let ops = vec![(keys::record(&ids[0]), Some(record.to_vec()))];
        t.tree
            .insert(keys::INTENT_KEY, super::super::encode_ops(&ops))
            .unwrap();
        let c = checked(&store);
        assert!(c.completed_a_write);
        assert_eq!(c.problems, Vec::<String>::new());
    }

    #[tokio::test]
    async fn the_exports_row_file_is_compared_and_left_to_be_built_when_wrong() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = written(dir.path()).await;
            store.close().unwrap();
        }
        // A clean close vouched for the file: the check compares it, and vouches again.
        {
            let store = when_unlocked(|| Store::open(dir.path()));
            assert_eq!(checked(&store).problems, Vec::<String>::new());
            store.close().unwrap();
        }
        let path = super::super::rows_path(dir.path(), "t");
        let mut bytes = std::fs::read(&path).unwrap();
        // The first user's slot: past the header slot and the slot's own head, a byte of
        // the record's userName.
        bytes[384 + 20 + 3] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let store = when_unlocked(|| Store::open(dir.path()));
        let found = checked(&store).problems.join("\n");
        assert!(
            found.contains("has 3 rows for 3 users, 1 of them unlike the store (the first: user")
                && found.contains("built again at the next start"),
            "{found}"
        );
        // No longer vouched for, it is not read again; a start builds it anew.
        assert_eq!(checked(&store).problems, Vec::<String>::new());
    }

    #[test]
    fn many_problems_are_counted_and_the_first_listed() {
        let mut c = TenantCheck::default();
        for i in 0..LISTED + 7 {
            c.problem(format!("p{i}"));
        }
        assert_eq!(c.problems.len(), LISTED);
        assert_eq!(c.problem_count, LISTED as u64 + 7);
        assert_eq!(c.problems[0], "p0");
    }
}
