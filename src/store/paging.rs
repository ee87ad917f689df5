//! Where SCIM's offset paging starts. An identity provider pages through everyone with
//! `startIndex` stepping by `count` (Okta's import does), and an offset costs a walk of
//! every key before it: at a million users a page far in costs over half a second and a
//! full pass is quadratic.
//!
//! So each tenant keeps in memory how many users, and how many groups, have ids beginning
//! with each four-character prefix. A page adds up those counts to find the prefix its
//! first id has and walks only from there: ids are random UUIDs, spread over 65,536
//! prefixes, so that is about fifteen keys more than the page at a million users, at any
//! offset, in any order of pages. (Three characters left about 120 keys to pass over and
//! made a page at a million users half again as slow as one that resumes where the last
//! ended.) The counts are made by one walk the first time a tenant is paged past
//! its first page, and every write that adds or removes a user or group moves them, under
//! the tenant's write lock, right after its keys land. A page that reads them while a
//! write is landing may see that write or not, as a walk from the start may.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use crate::scim::ResourceKind;

/// How many leading bytes of an id pick its bucket.
pub(super) const PREFIX: usize = 4;

/// The leading bytes of an id (ids are [`super::keys::ID_LEN`] long, so never shorter).
pub(super) type Prefix = [u8; PREFIX];

/// How many ids of one kind begin with each prefix; absent until first needed.
#[derive(Default)]
struct Buckets {
    counts: BTreeMap<Prefix, usize>,
    /// Each prefix with the ids before it and its own, so a page finds its prefix by a
    /// binary search instead of adding up to 65,536 counts; made again after a write.
    starts: Option<Vec<(Prefix, usize, usize)>>,
}

impl Buckets {
    fn starts(&mut self) -> &[(Prefix, usize, usize)] {
        self.starts.get_or_insert_with(|| {
            let mut before = 0;
            self.counts
                .iter()
                .map(|(p, &n)| {
                    before += n;
                    (*p, before - n, n)
                })
                .collect()
        })
    }
}

/// A user or group came (+1) or went (−1).
pub(super) type Move = (ResourceKind, Prefix, i64);

#[derive(Default)]
pub(super) struct Positions {
    users: Mutex<Option<Buckets>>,
    groups: Mutex<Option<Buckets>>,
}

/// Where a page at some offset starts.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Start {
    /// At the first id beginning with `prefix`, after passing over `within` of them.
    At { prefix: Prefix, within: usize },
    /// Past the last id.
    End,
}

pub(super) fn prefix_of(id: &str) -> Option<Prefix> {
    id.as_bytes().get(..PREFIX)?.try_into().ok()
}

impl Positions {
    fn slot(&self, kind: ResourceKind) -> MutexGuard<'_, Option<Buckets>> {
        match kind {
            ResourceKind::User => &self.users,
            ResourceKind::Group => &self.groups,
        }
        .lock()
        .unwrap_or_else(|e| e.into_inner())
    }

    /// Where the page starting `skip` ids in begins, or `None` if the counts are not made.
    pub(super) fn locate(&self, kind: ResourceKind, skip: usize) -> Option<Start> {
        let mut slot = self.slot(kind);
        let starts = slot.as_mut()?.starts();
        // The last prefix with no more than `skip` ids before it holds the page's first id,
        // unless `skip` is past its ids too (the end).
        let i = starts.partition_point(|&(_, before, _)| before <= skip);
        Some(match i.checked_sub(1).map(|i| starts[i]) {
            Some((prefix, before, n)) if skip < before + n => Start::At {
                prefix,
                within: skip - before,
            },
            _ => Start::End,
        })
    }

    pub(super) fn is_made(&self, kind: ResourceKind) -> bool {
        self.slot(kind).is_some()
    }

    /// The counts from every id of `kind`. The caller holds the tenant's write lock, so no
    /// write lands while they are counted.
    pub(super) fn make<E>(
        &self,
        kind: ResourceKind,
        prefixes: impl IntoIterator<Item = Result<Prefix, E>>,
    ) -> Result<(), E> {
        let mut buckets = Buckets::default();
        for p in prefixes {
            *buckets.counts.entry(p?).or_default() += 1;
        }
        *self.slot(kind) = Some(buckets);
        Ok(())
    }

    /// A write's users and groups came and went (called under the tenant's write lock,
    /// once the write's keys are in the tree).
    pub(super) fn moved(&self, moves: &[Move]) {
        for &(kind, prefix, change) in moves {
            let mut slot = self.slot(kind);
            let Some(buckets) = slot.as_mut() else {
                continue;
            };
            buckets.starts = None;
            let n = buckets.counts.entry(prefix).or_default();
            *n = n.saturating_add_signed(change as isize);
            if *n == 0 {
                buckets.counts.remove(&prefix);
            }
        }
    }

    /// A write failed part-way, so nobody knows which of its keys landed: count again
    /// when next needed.
    pub(super) fn forget(&self) {
        *self.slot(ResourceKind::User) = None;
        *self.slot(ResourceKind::Group) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{create_user, set_user, user, when_unlocked};
    use super::super::{Store, ids_under, keys};
    use super::*;

    /// What an offset walk from the start answers.
    fn truth(store: &Store, skip: usize, take: usize) -> Vec<String> {
        let t = store.tenant("t").unwrap();
        ids_under(&t.tree, &keys::record(""), None, skip, take).unwrap()
    }

    fn made(store: &Store) -> bool {
        store.tenant("t").unwrap().pages.is_made(ResourceKind::User)
    }

    /// Every page of every size at every offset, against the walk from the start.
    fn every_page_agrees(store: &Store, n: usize) {
        for take in [1, 3, 7] {
            for skip in 0..n + 2 {
                let page = store.ids_page("t", ResourceKind::User, skip, take).unwrap();
                assert_eq!(page, truth(store, skip, take), "skip {skip} take {take}");
            }
        }
    }

    #[tokio::test]
    async fn pages_start_where_counting_from_the_first_user_would() {
        let dir = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(dir.path()));
        let mut ids = Vec::new();
        for i in 0..60 {
            let doc = user(&format!("u{i:02}"), "t", true);
            ids.push(create_user(&store, doc).await);
        }
        ids.sort();

        // The first page needs no counts; the next one makes them.
        store.ids_page("t", ResourceKind::User, 0, 7).unwrap();
        assert!(!made(&store));
        every_page_agrees(&store, ids.len());
        assert!(made(&store));
        let all = store.ids_page("t", ResourceKind::User, 0, 100).unwrap();
        assert_eq!(all, ids);

        // An update moves no position; creates and deletes move the counts with them.
        set_user(&store, &ids[3], "other", true).await;
        every_page_agrees(&store, ids.len());
        for i in 0..5 {
            create_user(&store, user(&format!("late{i}"), "t", true)).await;
        }
        every_page_agrees(&store, ids.len() + 5);
        for id in &ids[..10] {
            store
                .delete("t", ResourceKind::User, id, None)
                .await
                .unwrap();
        }
        assert!(
            made(&store),
            "writes move the counts, they do not drop them"
        );
        every_page_agrees(&store, ids.len() - 5);

        // After a failed write the counts are made again, from the tree.
        store.tenant("t").unwrap().pages.forget();
        every_page_agrees(&store, ids.len() - 5);
        assert!(made(&store));
    }

    #[test]
    fn counts_locate_the_prefix_and_the_ids_before_it() {
        let pages = Positions::default();
        assert_eq!(pages.locate(ResourceKind::User, 0), None, "not made yet");
        let ids = ["aaaa1", "aaaa2", "abcd1", "zzzz1", "zzzz2", "zzzz3"];
        pages
            .make::<()>(
                ResourceKind::User,
                ids.iter().map(|i| Ok(prefix_of(i).unwrap())),
            )
            .unwrap();
        let at = |prefix: &str, within| Start::At {
            prefix: prefix.as_bytes().try_into().unwrap(),
            within,
        };
        assert_eq!(pages.locate(ResourceKind::User, 0), Some(at("aaaa", 0)));
        assert_eq!(pages.locate(ResourceKind::User, 1), Some(at("aaaa", 1)));
        assert_eq!(pages.locate(ResourceKind::User, 2), Some(at("abcd", 0)));
        assert_eq!(pages.locate(ResourceKind::User, 5), Some(at("zzzz", 2)));
        assert_eq!(pages.locate(ResourceKind::User, 6), Some(Start::End));
        assert_eq!(pages.locate(ResourceKind::Group, 0), None, "kinds apart");

        let p = |s: &str| prefix_of(s).unwrap();
        pages.moved(&[
            (ResourceKind::User, p("abcd"), -1),
            (ResourceKind::User, p("bbbb"), 1),
        ]);
        assert_eq!(pages.locate(ResourceKind::User, 2), Some(at("bbbb", 0)));
        assert_eq!(pages.locate(ResourceKind::User, 3), Some(at("zzzz", 0)));
    }
}
