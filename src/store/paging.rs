//! Bookmarks for SCIM's offset paging. An identity provider pages through everyone with
//! `startIndex` stepping by `count` (Okta's import does), and an offset costs a walk of
//! every key before it: at a million users the last pages cost over half a second each
//! and a full pass is quadratic. So the store remembers where each page it served ended;
//! the next page starting there resumes from that key instead of counting from the start.
//!
//! A bookmark holds only while the set of users and groups is unchanged: every write that
//! adds or removes one drops them all (before and after its keys move, so no walk that
//! overlapped the change can keep one). Then the next page counts from the start again,
//! which is exactly what it would have done without bookmarks.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::scim::ResourceKind;

/// How many bookmarks a tenant keeps: one per identity provider paging at a time is
/// enough; the oldest goes first.
const KEPT: usize = 16;

#[derive(Default)]
pub(super) struct Bookmarks {
    /// Moves whenever users or groups come or go.
    generation: AtomicU64,
    marks: Mutex<VecDeque<Mark>>,
}

struct Mark {
    kind: ResourceKind,
    /// The position (ids passed over) the next page starts at…
    position: usize,
    /// …which is just after this id.
    after: String,
    generation: u64,
}

impl Bookmarks {
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Users or groups are about to come or go, or just did.
    pub(super) fn invalidate(&self) {
        let mut marks = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        marks.clear();
    }

    /// The id a page starting at `position` resumes after, if a page served in this
    /// generation ended there.
    pub(super) fn find(
        &self,
        kind: ResourceKind,
        position: usize,
        generation: u64,
    ) -> Option<String> {
        let marks = self.lock();
        marks
            .iter()
            .find(|m| m.kind == kind && m.position == position && m.generation == generation)
            .map(|m| m.after.clone())
    }

    /// A page walked in `generation` ended with `after`, just before `position`. Kept only
    /// if nothing came or went since the walk began.
    pub(super) fn keep(&self, kind: ResourceKind, position: usize, after: &str, generation: u64) {
        let mut marks = self.lock();
        if self.generation() != generation {
            return;
        }
        marks.retain(|m| !(m.kind == kind && m.position == position));
        if marks.len() == KEPT {
            marks.pop_front();
        }
        marks.push_back(Mark {
            kind,
            position,
            after: after.to_owned(),
            generation,
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Mark>> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{create_user, set_user, user, when_unlocked};
    use super::super::{Store, ids_under, keys};
    use super::*;

    /// What an offset walk from the start answers, bookmarks or not.
    fn truth(store: &Store, skip: usize, take: usize) -> Vec<String> {
        let t = store.tenant("t").unwrap();
        ids_under(&t.tree, &keys::record(""), None, skip, take).unwrap()
    }

    fn marked(store: &Store, position: usize) -> bool {
        let t = store.tenant("t").unwrap();
        let g = t.pages.generation();
        t.pages.find(ResourceKind::User, position, g).is_some()
    }

    #[tokio::test]
    async fn pages_resume_from_bookmarks_until_users_come_or_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(dir.path()));
        let mut ids = Vec::new();
        for i in 0..40 {
            let doc = user(&format!("u{i:02}"), "t", true);
            ids.push(create_user(&store, doc).await);
        }
        ids.sort();

        // A full pass, seven at a time: every page resumes from the one before.
        let mut seen = Vec::new();
        for skip in (0..42).step_by(7) {
            if skip > 0 {
                assert!(marked(&store, skip), "no bookmark at {skip}");
            }
            let page = store.ids_page("t", ResourceKind::User, skip, 7).unwrap();
            assert_eq!(page, truth(&store, skip, 7));
            seen.extend(page);
        }
        assert_eq!(seen, ids);
        assert!(marked(&store, 35), "a full page leaves a bookmark");
        assert!(!marked(&store, 42), "a short last page leaves none");

        // An update moves no position: the bookmarks stay.
        set_user(&store, &ids[3], "other", true).await;
        assert!(marked(&store, 14));

        // A new user sorts somewhere before position 14: the bookmark would now be off by
        // one, so it is gone and the page counts from the start.
        create_user(&store, user("late", "t", true)).await;
        assert!(!marked(&store, 14));
        let page = store.ids_page("t", ResourceKind::User, 7, 7).unwrap();
        assert_eq!(page, truth(&store, 7, 7));
        let page = store.ids_page("t", ResourceKind::User, 14, 7).unwrap();
        assert_eq!(page, truth(&store, 14, 7));

        // So does a delete.
        assert!(marked(&store, 21));
        store
            .delete("t", ResourceKind::User, &ids[0], None)
            .await
            .unwrap();
        assert!(!marked(&store, 21));
        let page = store.ids_page("t", ResourceKind::User, 21, 7).unwrap();
        assert_eq!(page, truth(&store, 21, 7));
    }

    #[test]
    fn a_walk_that_overlapped_a_change_keeps_no_bookmark() {
        let marks = Bookmarks::default();
        let g = marks.generation();
        marks.invalidate();
        marks.keep(ResourceKind::User, 7, "x", g);
        assert_eq!(marks.find(ResourceKind::User, 7, g), None);
        assert_eq!(marks.find(ResourceKind::User, 7, marks.generation()), None);
        let g = marks.generation();
        marks.keep(ResourceKind::User, 7, "x", g);
        assert_eq!(marks.find(ResourceKind::User, 7, g).as_deref(), Some("x"));
        assert_eq!(marks.find(ResourceKind::Group, 7, g), None);
        for i in 0..KEPT {
            marks.keep(ResourceKind::Group, 100 + i, "y", g);
        }
        assert_eq!(
            marks.find(ResourceKind::User, 7, g),
            None,
            "the oldest went first"
        );
    }
}
