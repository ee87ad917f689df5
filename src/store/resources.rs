//! Users and groups: created, updated and deleted one write each, and read by id, by
//! index, in pages and through their memberships.

use serde_json::Value;

use super::{
    ChangeEvent, ChangeOp, IfMatch, Index, IndexQuery, Member, Resource, Store, StoreError,
    StoreResult, Tenant, Update, count_under, counts, decode, decode_u64, etag, groups_in,
    ids_from, ids_under, keys, paging, resource_type, to_resource, version_of,
};
use crate::scim::patch::{MemberOp, MemberRef};
use crate::scim::{ResourceKind, ScimError};

impl Store {
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
}

#[cfg(test)]
mod tests {
    use super::super::tests::user;
    use super::*;
    use serde_json::json;

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
