//! A tenant write in progress ([`Txn`]): reads through its own pending writes, index and
//! membership changes, and the redo record that makes its keys land all or none
//! ([`apply_ops`], [`recover_intent`]).

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::{
    ChangeEvent, ChangeOp, Index, Member, Resolver, StoreError, StoreResult, decode, decode_u64,
    encode, etag, index_entries, keys, paging, record, resource_type, timestamp, u64_in,
};
use crate::scim::filter::{AttrPath, Filter};
use crate::scim::patch::{MemberOp, MemberRef};
use crate::scim::{ResourceKind, ScimError};

/// A write that changed something: its durability ticket and the last change sequence
/// number it logged (if it logged any).
pub(super) type Applied = (u64, Option<u64>);

/// One key write of a transaction: `None` deletes.
pub(super) type Op = (Vec<u8>, Option<Vec<u8>>);

/// A tenant write in progress: reads see the pending writes first.
pub(super) struct Txn<'a> {
    pub(super) tree: &'a sled::Tree,
    pub(super) pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    pub(super) events: Vec<ChangeEvent>,
    pub(super) next_seq: u64,
    pub(super) first_seq: u64,
    pub(super) now: DateTime<Utc>,
    /// The tenant's archetype policy, if it has one.
    pub(super) resolver: Option<Arc<dyn Resolver>>,
    /// Roster record halves handed over by the writes (see `record.rs`).
    pub(super) records: HashMap<String, record::Parts>,
    /// Users and groups that came into being or went away (set by `counter_ops`).
    pub(super) moves: Vec<paging::Move>,
    /// A job held the tenant when this write took the lock.
    pub(super) job_running: bool,
}

impl<'a> Txn<'a> {
    pub(super) fn new(
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

    pub(super) fn get(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        if let Some(p) = self.pending.get(key) {
            return Ok(p.clone());
        }
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    pub(super) fn exists(&self, key: &[u8]) -> StoreResult<bool> {
        if let Some(p) = self.pending.get(key) {
            return Ok(p.is_some());
        }
        Ok(self.tree.contains_key(key)?)
    }

    pub(super) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.pending.insert(key, Some(value));
    }

    pub(super) fn del(&mut self, key: Vec<u8>) {
        self.pending.insert(key, None);
    }

    /// Keys under `prefix`, committed and pending merged.
    pub(super) fn keys_with_prefix(&self, prefix: &[u8]) -> StoreResult<Vec<Vec<u8>>> {
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
    pub(super) fn next_counter(&mut self, key: &[u8], what: &str) -> StoreResult<u64> {
        let next = match self.get(key)? {
            Some(v) => decode_u64(&v, what)? + 1,
            None => 1,
        };
        self.put(key.to_vec(), next.to_be_bytes().to_vec());
        Ok(next)
    }

    pub(super) fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    pub(super) fn log(&mut self, event: ChangeEvent) {
        self.events.push(event);
    }

    pub(super) fn load(&self, kind: ResourceKind, id: &str) -> StoreResult<Option<Value>> {
        match self.get(&keys::resource(kind, id))? {
            Some(b) => Ok(Some(decode(&b)?)),
            None => Ok(None),
        }
    }

    pub(super) fn save(&mut self, kind: ResourceKind, id: &str, doc: &Value) -> StoreResult<()> {
        if kind == ResourceKind::User {
            self.record_user(id, doc)?;
        }
        let bytes = encode(doc)?;
        self.put(keys::resource(kind, id), bytes);
        Ok(())
    }

    pub(super) fn reindex(
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
    pub(super) fn stamp(
        &self,
        kind: ResourceKind,
        doc: &mut Value,
        created: Option<Value>,
        seq: u64,
    ) {
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
    pub(super) fn touch_group(
        &mut self,
        gid: &str,
        removed: String,
        of_user: bool,
    ) -> StoreResult<()> {
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

    pub(super) fn remove_member(
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

    pub(super) fn member_ids(&self, gid: &str) -> StoreResult<Vec<String>> {
        self.ids_under(&keys::members_prefix(gid))
    }

    /// The groups `member` belongs to directly, with this transaction's writes.
    pub(super) fn group_ids(&self, member: &str) -> StoreResult<Vec<String>> {
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

    pub(super) fn apply_member_ops(
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
    pub(super) fn into_ops(mut self) -> StoreResult<(Vec<Op>, Vec<paging::Move>)> {
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
pub(super) fn apply_ops(tree: &sled::Tree, ops: Vec<Op>) -> StoreResult<()> {
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

pub(super) fn encode_ops(ops: &[Op]) -> Vec<u8> {
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
pub(super) fn recover_intent(tree: &sled::Tree) -> StoreResult<bool> {
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
mod tests {
    use super::super::tests::user;
    use super::super::{SCHEMA_VERSION, SCHEMA_VERSION_KEY, Store, Update};
    use super::*;

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
}
