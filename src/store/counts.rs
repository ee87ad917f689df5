//! How many users, groups, inactive users and review-queue entries a tenant has, kept as
//! counters in the tenant's tree. `/status`, SCIM `totalResults` of an unfiltered list and
//! a reclassification's count read one key instead of walking the family: at 1,000,000
//! users a walk of the documents reads about a gigabyte of pages and takes seconds, and
//! an identity provider paging through `GET /Users` asks for the total on every page.
//!
//! Each archetype also has a counter of the users holding it and of those among them who
//! are active (`GET /api/v1/roster/archetypes`), judged from the roster records a write
//! replaces.

use std::collections::BTreeMap;

use super::keys::{self, Index};
use super::{Op, StoreError, StoreResult, Txn, count_under, paging, record};
use crate::scim::ResourceKind;
use crate::text::plural;

/// A family of keys whose size is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counted {
    Users,
    Groups,
    /// Users with `active: false` (entries of the inactive index).
    Inactive,
    /// Users in the review queue.
    Review,
}

impl Counted {
    const ALL: [Counted; 4] = [
        Counted::Users,
        Counted::Groups,
        Counted::Inactive,
        Counted::Review,
    ];

    pub(crate) fn of(kind: ResourceKind) -> Counted {
        match kind {
            ResourceKind::User => Counted::Users,
            ResourceKind::Group => Counted::Groups,
        }
    }

    /// `s count:name` → the family's size, a big-endian u64 (with the other singletons).
    fn key(self) -> &'static [u8] {
        match self {
            Counted::Users => b"s\0count:users",
            Counted::Groups => b"s\0count:groups",
            Counted::Inactive => b"s\0count:inactive",
            Counted::Review => b"s\0count:review",
        }
    }

    /// Every key of the family starts with this.
    fn prefix(self) -> Vec<u8> {
        match self {
            Counted::Users => keys::resource_prefix(ResourceKind::User),
            Counted::Groups => keys::resource_prefix(ResourceKind::Group),
            Counted::Inactive => keys::index_prefix(Index::Inactive, ""),
            Counted::Review => keys::review_prefix(),
        }
    }
}

/// The family's size as last committed. A tree without the counter has none of the family
/// (a new tenant); older layouts get their counters when the store opens.
pub(super) fn read(tree: &sled::Tree, family: Counted) -> StoreResult<u64> {
    super::u64_in(tree, family.key(), "counter")
}

impl Txn<'_> {
    /// The counter writes that go with this transaction's pending keys: a counted key that
    /// comes into being or goes away moves its family's counter. Judged from the keys
    /// themselves, like the roster records, so no write path has to remember to count.
    /// Writers of a tenant are serialized, so reading the counter here is safe.
    /// Also notes each user or group that came into being or went away (`Txn::moves`),
    /// which move the positions that SCIM paging counts.
    pub(super) fn counter_ops(&mut self) -> StoreResult<Vec<Op>> {
        let mut ops = Vec::new();
        for family in Counted::ALL {
            let prefix = family.prefix();
            let kind = match family {
                Counted::Users => Some(ResourceKind::User),
                Counted::Groups => Some(ResourceKind::Group),
                Counted::Inactive | Counted::Review => None,
            };
            let mut delta = 0i64;
            for (k, v) in self.pending.range(prefix.clone()..) {
                if !k.starts_with(&prefix) {
                    break;
                }
                let change = i64::from(v.is_some()) - i64::from(self.tree.contains_key(k)?);
                if change != 0
                    && let Some(kind) = kind
                    && let Some(p) = keys::trailing_id(k, prefix.len()).and_then(paging::prefix_of)
                {
                    self.moves.push((kind, p, change));
                }
                delta += change;
            }
            if delta != 0 {
                let now = read(self.tree, family)?.saturating_add_signed(delta);
                ops.push((family.key().to_vec(), Some(now.to_be_bytes().to_vec())));
            }
        }
        // Per archetype: the record a write replaces stops counting, the one it leaves
        // starts. Runs after the records are refreshed, so every changed user has one.
        let prefix = keys::record("");
        let mut deltas = Tally::<i64>::new();
        for (k, v) in self.pending.range(prefix.clone()..) {
            if !k.starts_with(&prefix) {
                break;
            }
            if let Some(old) = self.tree.get(k)? {
                tally(&mut deltas, &old, -1)?;
            }
            if let Some(new) = v {
                tally(&mut deltas, new, 1)?;
            }
        }
        for (archetype, (users, active)) in deltas {
            if users == 0 && active == 0 {
                continue;
            }
            let (u, a) = read_archetype(self.tree, &archetype)?;
            let now = (
                u.saturating_add_signed(users),
                a.saturating_add_signed(active),
            );
            ops.push(archetype_op(&archetype, now));
        }
        Ok(ops)
    }
}

/// Per archetype: users holding it, and how many of them are active.
pub(super) type Tally<N> = BTreeMap<String, (N, N)>;

fn tally(into: &mut Tally<i64>, record: &[u8], sign: i64) -> StoreResult<()> {
    if let Some((archetype, active)) = record::holding(record)? {
        let e = into.entry(archetype).or_default();
        e.0 += sign;
        e.1 += sign * i64::from(active);
    }
    Ok(())
}

/// `s count:archetype:<id>` → users holding the archetype and how many of them are
/// active, two big-endian u64s.
fn archetype_key(archetype: &str) -> Vec<u8> {
    let mut k = b"s\0count:archetype:".to_vec();
    k.extend_from_slice(archetype.as_bytes());
    k
}

/// The write that sets an archetype's counter; one nobody holds any longer goes away.
fn archetype_op(archetype: &str, (users, active): (u64, u64)) -> Op {
    let value = (users > 0).then(|| [users.to_be_bytes(), active.to_be_bytes()].concat());
    (archetype_key(archetype), value)
}

/// Every archetype someone holds, with its user and active-user counts, in id order.
pub(super) fn read_all_archetypes(tree: &sled::Tree) -> StoreResult<Vec<(String, u64, u64)>> {
    let prefix = archetype_key("");
    let mut out = Vec::new();
    for kv in tree.scan_prefix(&prefix) {
        let (k, v) = kv?;
        let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        let (users, active) = decode_archetype(&v)?;
        out.push((id, users, active));
    }
    Ok(out)
}

/// How many users hold the archetype, and how many of them are active, as last
/// committed.
pub(super) fn read_archetype(tree: &sled::Tree, archetype: &str) -> StoreResult<(u64, u64)> {
    match tree.get(archetype_key(archetype))? {
        Some(v) => decode_archetype(&v),
        None => Ok((0, 0)),
    }
}

fn decode_archetype(v: &[u8]) -> StoreResult<(u64, u64)> {
    if v.len() != 16 {
        return Err(StoreError::Corrupt("unreadable archetype counter".into()));
    }
    let (mut users, mut active) = ([0; 8], [0; 8]);
    users.copy_from_slice(&v[..8]);
    active.copy_from_slice(&v[8..]);
    Ok((u64::from_be_bytes(users), u64::from_be_bytes(active)))
}

/// Count every archetype's users from the roster records and store the counters: the
/// upgrade of a tenant from a layout without them. Returns how many archetypes are held.
pub(super) fn build_archetypes(tree: &sled::Tree) -> StoreResult<usize> {
    let mut counts = Tally::<u64>::new();
    for kv in tree.scan_prefix(keys::record("")) {
        let (_, v) = kv?;
        if let Some((archetype, active)) = record::holding(&v)? {
            let e = counts.entry(archetype).or_default();
            e.0 += 1;
            e.1 += u64::from(active);
        }
    }
    for (archetype, pair) in &counts {
        let (k, v) = archetype_op(archetype, *pair);
        if let Some(v) = v {
            tree.insert(k, v)?;
        }
    }
    Ok(counts.len())
}

/// Count every family by walking its keys and store the counters: the upgrade of a
/// tenant from a layout without them. Runs before the store serves anything.
pub(super) fn build_all(tree: &sled::Tree) -> StoreResult<[u64; 4]> {
    let mut out = [0; 4];
    for (i, family) in Counted::ALL.into_iter().enumerate() {
        out[i] = walk(tree, family)?;
        tree.insert(family.key(), &out[i].to_be_bytes())?;
    }
    Ok(out)
}

/// Each stored counter against a walk of its family, and each archetype's counter against
/// `archetypes`, counted from the users' assignments (for `rosterd store check`); put
/// right when repairing.
pub(super) fn check(
    tree: &sled::Tree,
    archetypes: &Tally<u64>,
    c: &mut super::check::TenantCheck,
) -> StoreResult<()> {
    for family in Counted::ALL {
        let name = String::from_utf8_lossy(&family.key()[2..]).into_owned();
        let walked = walk(tree, family)?;
        match read(tree, family) {
            Ok(stored) if stored == walked => continue,
            Ok(stored) => c.problem(format!(
                "the counter {name} says {stored}, but there are {walked}: /status and SCIM totals are off by {}",
                stored.abs_diff(walked)
            )),
            Err(StoreError::Corrupt(e)) => c.problem(format!(
                "the counter {name} cannot be read ({e}); there are {walked}"
            )),
            Err(e) => return Err(e),
        }
        c.fix(
            tree,
            family.key().to_vec(),
            Some(walked.to_be_bytes().to_vec()),
        )?;
    }
    let stored: Tally<u64> = read_all_archetypes(tree)?
        .into_iter()
        .map(|(a, users, active)| (a, (users, active)))
        .collect();
    for (archetype, s, w) in super::check::disagreeing(&stored, archetypes) {
        c.problem(format!(
            "archetype {archetype:?} is counted as held by {} ({} active), but {} ({} active) {} it",
            plural(s.0, "user"),
            s.1,
            plural(w.0, "user"),
            w.1,
            if w.0 == 1 { "holds" } else { "hold" }
        ));
        let (key, value) = archetype_op(archetype, w);
        c.fix(tree, key, value)?;
    }
    Ok(())
}

/// The family's size by walking its keys.
fn walk(tree: &sled::Tree, family: Counted) -> StoreResult<u64> {
    count_under(tree, &family.prefix())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Doubtful, create_user, set_user, user};
    use super::super::{MemberRef, SCHEMA_VERSION_KEY, Store};
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    /// The counters agree with a walk of every family, and the archetype counters with a
    /// walk of the archetype index against the inactive index.
    fn assert_in_step(store: &Store) -> [u64; 4] {
        let t = store.tenant("t").unwrap();
        let counted = Counted::ALL.map(|f| read(&t.tree, f).unwrap());
        let walked = Counted::ALL.map(|f| walk(&t.tree, f).unwrap());
        assert_eq!(counted, walked, "users, groups, inactive, review");
        assert_eq!(archetype_counters(&t.tree), walk_archetypes(&t.tree));
        counted
    }

    fn archetype_counters(tree: &sled::Tree) -> Tally<u64> {
        read_all_archetypes(tree)
            .unwrap()
            .into_iter()
            .map(|(a, users, active)| (a, (users, active)))
            .collect()
    }

    fn walk_archetypes(tree: &sled::Tree) -> Tally<u64> {
        let inactive = keys::index_prefix(Index::Inactive, "");
        let inactive: Vec<Vec<u8>> = tree
            .scan_prefix(&inactive)
            .keys()
            .map(|k| k.unwrap()[inactive.len()..].to_vec())
            .collect();
        let mut out = Tally::<u64>::new();
        for k in tree.scan_prefix(b"x\0").keys() {
            // `x archetype \0 id`
            let k = k.unwrap();
            let (head, id) = k.split_at(k.len() - 36);
            let a = String::from_utf8(head[2..head.len() - 1].to_vec()).unwrap();
            let e = out.entry(a).or_default();
            e.0 += 1;
            e.1 += u64::from(!inactive.iter().any(|i| i.as_slice() == id));
        }
        out
    }

    #[tokio::test]
    async fn counters_follow_every_kind_of_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        store.set_resolver("t", Arc::new(Doubtful));
        assert_eq!(assert_in_step(&store), [0, 0, 0, 0]);

        let mut ids = Vec::new();
        for (i, (title, active)) in [("sure", true), ("unsure", true), ("unsure", false)]
            .into_iter()
            .enumerate()
        {
            let doc = user(&format!("u{i}"), title, active);
            ids.push(create_user(&store, doc).await);
        }
        assert_eq!(assert_in_step(&store), [3, 0, 1, 2]);

        // Updates that leave a key in place, move one in, and move one out.
        set_user(&store, &ids[0], "unsure", false).await;
        set_user(&store, &ids[1], "unsure", true).await;
        set_user(&store, &ids[2], "sure", true).await;
        assert_eq!(assert_in_step(&store), [3, 0, 1, 2]);

        // A person's override takes a user out of the queue; clearing it puts them back.
        store
            .set_override("t", &ids[0], Some("y".into()), "user:admin")
            .await
            .unwrap();
        assert_eq!(assert_in_step(&store)[3], 1);
        assert_eq!(
            read_archetype(&store.tenant("t").unwrap().tree, "y").unwrap(),
            (1, 0)
        );
        store
            .set_override("t", &ids[0], None, "user:admin")
            .await
            .unwrap();
        assert_eq!(assert_in_step(&store)[3], 2);

        let members = vec![MemberRef {
            value: ids[1].clone(),
            kind: None,
            display: None,
        }];
        let gid = store
            .create(
                "t",
                ResourceKind::Group,
                json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                       "displayName": "g"}),
                members,
            )
            .await
            .unwrap()
            .id;
        assert_eq!(assert_in_step(&store), [3, 1, 1, 2]);

        store
            .delete("t", ResourceKind::User, &ids[0], None)
            .await
            .unwrap();
        store
            .delete("t", ResourceKind::User, &ids[1], None)
            .await
            .unwrap();
        store
            .delete("t", ResourceKind::Group, &gid, None)
            .await
            .unwrap();
        assert_eq!(assert_in_step(&store), [1, 0, 0, 0]);
        assert_eq!(store.count("t", ResourceKind::User).unwrap(), 1);
        let t = store.tenant("t").unwrap();
        assert_eq!(read_archetype(&t.tree, "x").unwrap(), (1, 1));
        assert_eq!(read_archetype(&t.tree, "y").unwrap(), (0, 0));
        assert!(archetype_counters(&t.tree).keys().eq(["x"]));
    }

    #[tokio::test]
    async fn a_layout_2_directory_gets_its_counters_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            store.set_resolver("t", Arc::new(Doubtful));
            for (i, active) in [true, false].into_iter().enumerate() {
                let doc = user(&format!("u{i}"), "unsure", active);
                create_user(&store, doc).await;
            }
            store.close().unwrap();
        }
        {
            // What layout 2 had: everything but the counters.
            let db = crate::store::testing::when_unlocked(|| sled::open(dir.path()));
            let tree = db.open_tree("tenant/t").unwrap();
            for family in Counted::ALL {
                tree.remove(family.key()).unwrap();
            }
            db.insert(SCHEMA_VERSION_KEY, b"2").unwrap();
            db.flush().unwrap();
        }
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        assert_eq!(assert_in_step(&store), [2, 0, 1, 2]);
    }

    #[tokio::test]
    async fn a_layout_4_directory_gets_its_archetype_counters_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            store.set_resolver("t", Arc::new(Doubtful));
            for (i, active) in [true, false, true].into_iter().enumerate() {
                let doc = user(&format!("u{i}"), "sure", active);
                let id = create_user(&store, doc).await;
                if i == 2 {
                    store
                        .set_override("t", &id, Some("y".into()), "user:admin")
                        .await
                        .unwrap();
                }
            }
            store.close().unwrap();
        }
        {
            // What layout 4 had: everything but the archetype counters.
            let db = crate::store::testing::when_unlocked(|| sled::open(dir.path()));
            let tree = db.open_tree("tenant/t").unwrap();
            for k in tree.scan_prefix(archetype_key("")).keys() {
                tree.remove(k.unwrap()).unwrap();
            }
            db.insert(SCHEMA_VERSION_KEY, b"4").unwrap();
            db.flush().unwrap();
        }
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        assert_eq!(assert_in_step(&store), [3, 0, 1, 0]);
        let counts = store.archetype_user_counts("t", &["x", "y", "z"]).unwrap();
        assert_eq!(counts, [(2, 1), (1, 1), (0, 0)]);
    }
}
