//! An online backup: a copy of the store in a new directory, taken while it serves.
//!
//! sled has no snapshot, and its files copied while it runs are torn (session 38: 5 of
//! 13 copies would not open). So the copy goes key by key, one tree at a time. A tenant's
//! keys are read while its writers go on; each key a writer writes is noted once it is
//! applied, and copied again as it stands: in a few passes while writers go on, each
//! shorter than the last, then once more under the tenant's write lock. A key not noted
//! did not change after it was read, so the copy is the tree as it was at that moment,
//! and writers wait only for that last pass. Tenants are copied at different moments;
//! nothing in the store spans two of them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::rewrite::{copy_config, dir_size, sibling};
use super::rows::io;
use super::{
    MARKER_TEXT, Op, SCHEMA_VERSION, STORE_MARKER, Store, StoreError, StoreResult, keys,
    stored_schema,
};

/// What a backup wrote.
#[derive(Debug, Clone)]
pub struct BackedUp {
    pub path: PathBuf,
    /// Keys copied, over every tree.
    pub keys: u64,
    /// The backup directory's size.
    pub bytes: u64,
    pub took: Duration,
    /// The longest a tenant's writers waited for the backup (the last step of its copy).
    pub longest_hold: Duration,
}

/// What the copy wrote: its keys, each tree's digest, the longest hold on writers.
struct Copied {
    keys: u64,
    digests: Vec<(sled::IVec, Digested)>,
    longest_hold: Duration,
}

/// The tenant being copied, and what its writers did meanwhile.
pub(super) struct Tracking {
    tenant: String,
    touched: HashSet<Vec<u8>>,
    /// The tenant was opened while its keys were read: an open finishes an interrupted
    /// write and may rewrite the row file's token outside the write lock, unseen here.
    opened: bool,
}

/// Passes over the keys written meanwhile made before the last, held one; they end once
/// this few are left. 8 writers at 5,000–6,000 SCIM writes a second waited up to 573 ms
/// for a single held pass after a 14 s copy of 200,000 users, 174 ms after four passes of
/// a 99 s copy of a million, and 15 ms after eight (BENCHMARKS.md, "An online backup").
const UNHELD_PASSES: usize = 8;
/// (The unit tests' writes are few: they take every pass.)
const HELD_KEYS: usize = if cfg!(test) { 0 } else { 2_000 };

/// A tree whose tenant keeps being opened under the copy is given up after this many
/// tries; it cannot happen to a tenant the daemon serves, which it opens at the start.
const ATTEMPTS: usize = 3;

impl Store {
    /// Copy the store into `to`, which must not exist, while it serves. The copy is
    /// written in `<to>.partial`, read back and compared, and only then renamed to `to`:
    /// a directory of that name is always a whole backup. `give_up` is asked as the copy
    /// and the read-back go, and says why to stop (a stop of the daemon, a filesystem
    /// filling up); nothing is then left.
    pub fn backup(&self, to: &Path, give_up: &GiveUp<'_>) -> StoreResult<BackedUp> {
        let started = Instant::now();
        // The engine keeps its I/O error for good, and each read of the copy would answer
        // it: a full data disk was reported as "No space left on device" on the backup's
        // path, on a file system with 51 GB free.
        if let Some(f) = self.failure() {
            return Err(StoreError::Failed(f));
        }
        if to.exists() {
            return Err(StoreError::Backup(format!(
                "{} exists already; a backup is written only into a new directory",
                to.display()
            )));
        }
        let partial = sibling(to, ".partial");
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| io(&partial, e))?;
        }
        Store::create_private_dir(&partial).map_err(|e| io(&partial, e))?;
        // First, so that a copy a kill -9 leaves is refused wherever it is copied to;
        // removed just before the store's marker goes in.
        let incomplete = partial.join(super::BACKUP_INCOMPLETE);
        write_synced(&incomplete, super::INCOMPLETE_TEXT.as_bytes())
            .map_err(|e| io(&incomplete, e))?;
        let copied = self
            .copy_into(&partial, give_up)
            .and_then(|c| finish(&partial, to, &c.digests, give_up).map(|()| c));
        let Copied {
            keys, longest_hold, ..
        } = copied.map_err(|e| {
            let _ = std::fs::remove_dir_all(&partial);
            // The store failed while it was copied: its error, not the backup's.
            if let Some(f) = self.failure() {
                return StoreError::Failed(f);
            }
            about(&partial, e)
        })?;
        Ok(BackedUp {
            path: to.to_owned(),
            keys,
            bytes: dir_size(to),
            took: started.elapsed(),
            longest_hold,
        })
    }

    /// Every tree into a new sled in `dir`.
    fn copy_into(&self, dir: &Path, give_up: &GiveUp<'_>) -> StoreResult<Copied> {
        let copy = copy_config(dir)
            .open()
            .map_err(|e| super::open_error(dir, &e.to_string()))?;
        let mut keys = 0;
        let mut digests = Vec::new();
        let mut longest_hold = Duration::ZERO;
        for name in self.inner.db.tree_names() {
            let (from, into) = (self.inner.db.open_tree(&name)?, copy.open_tree(&name)?);
            match name.strip_prefix(b"tenant/") {
                Some(tenant) => {
                    let tenant = std::str::from_utf8(tenant).map_err(|_| {
                        StoreError::Corrupt(format!(
                            "a tree is named {:?}",
                            String::from_utf8_lossy(&name)
                        ))
                    })?;
                    longest_hold =
                        longest_hold.max(self.copy_tenant(tenant, &from, &into, give_up)?);
                }
                // The layout version: written only at the open. The mark makes the
                // copy's first start number its changes past the original's.
                None => {
                    copy_all(&from, &into, give_up)?;
                    into.insert(
                        super::restored::BACKUP_MARK,
                        chrono::Utc::now().to_rfc3339().as_bytes(),
                    )?;
                }
            }
            let d = digest(&into, give_up)?;
            keys += d.keys;
            digests.push((name, d));
        }
        copy.flush()?;
        Ok(Copied {
            keys,
            digests,
            longest_hold,
        })
    }

    /// Copy one tenant's tree as it stands at the end of the copy; how long its writers
    /// waited.
    fn copy_tenant(
        &self,
        tenant: &str,
        from: &sled::Tree,
        into: &sled::Tree,
        give_up: &GiveUp<'_>,
    ) -> StoreResult<Duration> {
        for _ in 0..ATTEMPTS {
            self.holding_writers(tenant, || {
                *self.backup_tracking() = Some(Tracking {
                    tenant: tenant.to_owned(),
                    touched: HashSet::new(),
                    opened: false,
                });
            });
            into.clear()?;
            let mut copied = copy_all(from, into, give_up).map(drop);
            // While writers go on, copy again what they wrote during the last pass: each
            // pass is shorter than the one before, so the last one, which holds them, is
            // short too. A key written during a pass is noted for the next.
            for _ in 0..UNHELD_PASSES {
                let touched = match self.backup_tracking().as_mut() {
                    Some(t) if copied.is_ok() && !t.opened && t.touched.len() > HELD_KEYS => {
                        std::mem::take(&mut t.touched)
                    }
                    _ => break,
                };
                copied = copy_again(from, into, touched);
            }
            let held = Instant::now();
            let finished = self.holding_writers(tenant, || -> StoreResult<bool> {
                let Some(tracking) = self.backup_tracking().take() else {
                    return Ok(false);
                };
                copied?;
                if tracking.opened {
                    return Ok(false);
                }
                copy_again(from, into, tracking.touched)?;
                Ok(true)
            });
            if finished? {
                return Ok(held.elapsed());
            }
        }
        Err(StoreError::Backend(format!(
            "tenant {tenant} was opened {ATTEMPTS} times while it was copied; run the backup again"
        )))
    }

    /// Run `f` while no writer of `tenant` can apply anything: under its write lock, or,
    /// for a tenant not open here, under the tenants' map, which an open needs.
    fn holding_writers<T>(&self, tenant: &str, f: impl FnOnce() -> T) -> T {
        let map = self.inner.tenants.read().unwrap_or_else(|e| e.into_inner());
        match map.get(tenant).cloned() {
            Some(t) => {
                // Not held while waiting for the writer: a writer may open a tenant.
                drop(map);
                let _writes = t.writes();
                f()
            }
            None => f(),
        }
    }

    fn backup_tracking(&self) -> std::sync::MutexGuard<'_, Option<Tracking>> {
        self.inner.backup.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keys a writer of `tenant`, under its write lock, is about to write, if a backup
    /// is copying the tenant (which cannot begin or end while the writer holds the lock).
    pub(super) fn backup_notes(&self, tenant: &str, ops: &[Op]) -> Option<Vec<Vec<u8>>> {
        let copying = self
            .backup_tracking()
            .as_ref()
            .is_some_and(|t| t.tenant == tenant);
        copying.then(|| {
            let mut keys: Vec<Vec<u8>> = ops.iter().map(|(k, _)| k.clone()).collect();
            keys.push(keys::INTENT_KEY.to_vec());
            keys
        })
    }

    /// The writer has applied what [`Store::backup_notes`] noted.
    pub(super) fn backup_saw_write(&self, tenant: &str, keys: Vec<Vec<u8>>) {
        if let Some(tracking) = self.backup_tracking().as_mut()
            && tracking.tenant == tenant
        {
            tracking.touched.extend(keys);
        }
    }

    /// `tenant` is being opened (under the tenants' map).
    pub(super) fn backup_saw_open(&self, tenant: &str) {
        if let Some(tracking) = self.backup_tracking().as_mut()
            && tracking.tenant == tenant
        {
            tracking.opened = true;
        }
    }
}

/// Copy `keys` again from `from` as they stand now (a key gone is removed).
fn copy_again(from: &sled::Tree, into: &sled::Tree, keys: HashSet<Vec<u8>>) -> StoreResult<()> {
    for k in keys {
        match from.get(&k)? {
            Some(v) => into.insert(k, v)?,
            None => into.remove(k)?,
        };
    }
    Ok(())
}

/// Asked as a backup goes: `Some(why)` to give it up.
pub type GiveUp<'a> = dyn Fn() -> Option<String> + 'a;

/// How often (in keys) a backup asks whether to give up.
const ASK_EVERY: usize = 4096;

fn ask(give_up: &GiveUp<'_>, n: usize) -> StoreResult<()> {
    match n.is_multiple_of(ASK_EVERY).then(give_up).flatten() {
        Some(why) => Err(StoreError::Backup(format!(
            "the backup was given up: {why}; nothing was kept"
        ))),
        None => Ok(()),
    }
}

/// What went wrong with the backup in `partial`, naming it: the engine's own I/O errors
/// name no file, and a full disk there read like the store's own failure.
fn about(partial: &Path, e: StoreError) -> StoreError {
    match e {
        // The store's damage, met while copying it: its own, as a failure is.
        e @ (StoreError::Backup(_) | StoreError::Damaged(_)) => e,
        e => StoreError::Backup(format!("the backup in {}: {e}", partial.display())),
    }
}

/// Passes a copy makes over a tree, each writing the keys whose hash falls to it. Written
/// in one pass in key order, a copy's file came out at about twice its data: each insert
/// logs a fragment of a leaf that the next split rewrites whole, and sled reclaims a
/// segment only once half of it is dead, which those interleaved fragments seldom leave.
/// Spread over four passes, the leaves fill from four places at once: a backup of 13
/// million keys took 4,791 MiB instead of 7,126 MiB, in 193 s instead of 129 s
/// (BENCHMARKS.md, "Session 51"). A hash, not the position in the tree: writers change
/// the tree between passes, and a position could then be skipped by every pass.
const COPY_PASSES: u64 = 4;

fn pass_of(key: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    h.finish() % COPY_PASSES
}

/// Copy every key of `from` into `into`; how many were written.
pub(super) fn copy_all(
    from: &sled::Tree,
    into: &sled::Tree,
    give_up: &GiveUp<'_>,
) -> StoreResult<u64> {
    let mut keys = 0;
    for pass in 0..COPY_PASSES {
        for (n, kv) in from.iter().enumerate() {
            ask(give_up, n)?;
            let (k, v) = kv?;
            if pass_of(&k) == pass {
                into.insert(k, v)?;
                keys += 1;
            }
        }
    }
    Ok(keys)
}

/// A tree's keys and a hash of its keys and values, in order.
#[derive(Debug, PartialEq)]
struct Digested {
    keys: u64,
    hash: Vec<u8>,
}

fn digest(tree: &sled::Tree, give_up: &GiveUp<'_>) -> StoreResult<Digested> {
    let mut hash = Sha256::new();
    let mut keys = 0;
    for (n, kv) in tree.iter().enumerate() {
        ask(give_up, n)?;
        let (k, v) = kv?;
        hash.update((k.len() as u64).to_be_bytes());
        hash.update(&k);
        hash.update((v.len() as u64).to_be_bytes());
        hash.update(&v);
        keys += 1;
    }
    Ok(Digested {
        keys,
        hash: hash.finalize().to_vec(),
    })
}

/// Read the copy back from disk, compare it with what was written, and move it to `to`.
fn finish(
    partial: &Path,
    to: &Path,
    digests: &[(sled::IVec, Digested)],
    give_up: &GiveUp<'_>,
) -> StoreResult<()> {
    {
        // The copy's handle was dropped a moment ago.
        let back = super::past_the_lock(|| copy_config(partial).open())
            .map_err(|e| super::open_error(partial, &e.to_string()))?;
        if stored_schema(&back)? != Some(SCHEMA_VERSION) {
            return Err(StoreError::Corrupt(format!(
                "the backup in {} does not read back its layout version",
                partial.display()
            )));
        }
        for (name, written) in digests {
            if digest(&back.open_tree(name)?, give_up)? != *written {
                return Err(StoreError::Corrupt(format!(
                    "the backup's tree {} does not read back as written",
                    String::from_utf8_lossy(name)
                )));
            }
        }
    }
    let incomplete = partial.join(super::BACKUP_INCOMPLETE);
    std::fs::remove_file(&incomplete).map_err(|e| io(&incomplete, e))?;
    let whole = partial.join(super::BACKUP_WHOLE);
    write_synced(&whole, super::WHOLE_TEXT.as_bytes()).map_err(|e| io(&whole, e))?;
    let marker = partial.join(STORE_MARKER);
    write_synced(&marker, MARKER_TEXT.as_bytes()).map_err(|e| io(&marker, e))?;
    std::fs::rename(partial, to).map_err(|e| io(partial, e))?;
    // The rename is durable only once the directory holding it is.
    if let Some(parent) = to.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(parent, e))?;
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scim::ResourceKind;
    use crate::store::testing::{runtime, user, when_unlocked};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// What must agree inside a tenant's copy if it is the tree as of one moment: the
    /// user counter, the users, their roster records, and the change log's end.
    fn consistent(store: &Store, tenant: &str) -> u64 {
        let users: Vec<String> = store
            .scan(tenant, ResourceKind::User)
            .unwrap()
            .map(|r| r.unwrap().id)
            .collect();
        assert_eq!(
            store.count(tenant, ResourceKind::User).unwrap(),
            users.len() as u64,
            "{tenant}: the counter"
        );
        let records = store
            .ids_page(tenant, ResourceKind::User, 0, usize::MAX)
            .unwrap();
        assert_eq!(records, users, "{tenant}: the roster records");
        // Opened as a start, the copy numbered its next change past the original's; its
        // log ends where the original's did when it was copied.
        let last = store.last_seq(tenant).unwrap();
        let end = last - store.skipped_between(tenant, 0, last).unwrap();
        let newest = store.changes(tenant, end.saturating_sub(1), 10).unwrap();
        assert_eq!(
            newest.last().map(|c| c.seq),
            Some(end),
            "{tenant}: the change log's end"
        );
        users.len() as u64
    }

    #[test]
    fn a_backup_taken_under_writes_holds_each_tenant_as_of_one_moment() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("backup");
        let store = when_unlocked(|| Store::open(&dir.path().join("data")));
        let (kept, backed) = rt.block_on(async {
            let mut kept = Vec::new();
            for i in 0..300 {
                let tenant = ["t", "u"][i % 2];
                let r = store
                    .create(
                        tenant,
                        ResourceKind::User,
                        user(&format!("kept{i}"), "Engineer", true),
                        vec![],
                    )
                    .await
                    .unwrap();
                kept.push((tenant, r.id));
            }
            // Writers create users and delete them again while the backup reads.
            let stop = Arc::new(AtomicBool::new(false));
            let mut writers = Vec::new();
            for w in 0..8 {
                let (store, stop) = (store.clone(), stop.clone());
                writers.push(tokio::spawn(async move {
                    let tenant = ["t", "u"][w % 2];
                    let mut made = std::collections::VecDeque::new();
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            return i;
                        }
                        let r = store
                            .create(
                                tenant,
                                ResourceKind::User,
                                user(&format!("w{w}-{i}"), "Nurse", true),
                                vec![],
                            )
                            .await
                            .unwrap();
                        made.push_back(r.id);
                        if made.len() > 20 {
                            let id = made.pop_front().unwrap();
                            store
                                .delete(tenant, ResourceKind::User, &id, None)
                                .await
                                .unwrap();
                        }
                    }
                    unreachable!()
                }));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let s = store.clone();
            let to2 = to.clone();
            let backed = tokio::task::spawn_blocking(move || s.backup(&to2, &|| None))
                .await
                .unwrap()
                .unwrap();
            stop.store(true, Ordering::Relaxed);
            let mut writes = 0;
            for w in writers {
                writes += w.await.unwrap();
            }
            assert!(writes > 100, "the writers wrote {writes} users in all");
            (kept, backed)
        });
        store.close().unwrap();
        assert_eq!(backed.path, to);
        assert!(!sibling(&to, ".partial").exists());
        assert!(to.join(STORE_MARKER).is_file());
        let copy = when_unlocked(|| Store::open(&to));
        for (tenant, id) in &kept {
            assert!(
                copy.get(tenant, ResourceKind::User, id).unwrap().is_some(),
                "{tenant}/{id}"
            );
        }
        let users = consistent(&copy, "t") + consistent(&copy, "u");
        assert!(users >= 300, "{users}");
    }

    /// A restored backup's first start numbers its changes past the original's, so that
    /// none repeats the number of a change the restore lost; a check of it does not, and
    /// the move is made once.
    #[test]
    fn a_restored_backup_numbers_its_changes_past_the_originals() {
        use super::super::restored::SKIP;
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(&dir.path().join("data")));
        let create = |s: &Store, name: &str| {
            rt.block_on(s.create(
                "t",
                ResourceKind::User,
                user(name, "Engineer", true),
                vec![],
            ))
            .unwrap()
        };
        for i in 0..3 {
            create(&store, &format!("u{i}"));
        }
        let last = store.last_seq("t").unwrap();
        let counter = |s: &Store, tenant: &str, key: &[u8]| {
            let tree = s.inner.db.open_tree(format!("tenant/{tenant}")).unwrap();
            tree.get(key)
                .unwrap()
                .map_or(0, |v| crate::store::decode_u64(&v, "").unwrap())
        };
        let gseq = |s: &Store| counter(s, "t", crate::store::keys::GSEQ_KEY);
        let letters =
            |s: &Store, tenant: &str| counter(s, tenant, crate::store::delivery::DEAD_SEQ_KEY);
        let governance = gseq(&store);
        rt.block_on(store.advance_cursor("t", "caught-up", last, vec![]))
            .unwrap();
        rt.block_on(store.advance_cursor("t", "behind", last - 1, vec![]))
            .unwrap();
        let to = dir.path().join("backup");
        store.backup(&to, &|| None).unwrap();
        // The change the restore loses.
        create(&store, "lost");
        store.close().unwrap();

        // A check, or any other command that is not a start, leaves it as it was.
        let checked = when_unlocked(|| Store::open_existing(&to, 16 << 20));
        assert_eq!(checked.last_seq("t").unwrap(), last);
        checked.close().unwrap();
        drop(checked);
        // The same backup, to be restored a second time after the first restored run.
        let twice = dir.path().join("twice");
        copy_dir(&to, &twice);

        let restored = when_unlocked(|| Store::open(&to));
        let next = restored.last_seq("t").unwrap();
        assert!(next >= last + SKIP, "{last} {next}");
        assert_eq!(restored.cursor("t", "caught-up").unwrap(), next);
        assert_eq!(restored.cursor("t", "behind").unwrap(), last - 1);
        // What a lag and the compaction floor read leave the skipped numbers out.
        assert_eq!(
            restored.skipped_between("t", last - 1, next).unwrap(),
            next - last
        );
        assert!(restored.changelog_floor("t").unwrap() < last);
        let r = create(&restored, "after");
        assert_eq!(restored.last_seq("t").unwrap(), next + 1, "{r:?}");
        let newest = restored.changes("t", last, 10).unwrap();
        assert_eq!(newest.iter().map(|c| c.seq).collect::<Vec<_>>(), [next + 1]);
        // A reader going up to a watermark inside the gap reads nothing past it: a count
        // of `next - last` would have reached the change after the gap.
        assert!(
            restored
                .changes_through("t", last, next, 10)
                .unwrap()
                .is_empty()
        );
        let through = restored.changes_through("t", last, next + 1, 10).unwrap();
        assert_eq!(
            through.iter().map(|c| c.seq).collect::<Vec<_>>(),
            [next + 1]
        );
        assert!(gseq(&restored) >= governance + SKIP);
        // Dead-letter ids move on too: an id noted before the restore named another
        // letter after it.
        assert!(letters(&restored, "t") >= SKIP);
        // Every connector's files are owed a write: a CSV connector's held what the
        // restore lost.
        for c in ["caught-up", "behind"] {
            assert!(restored.write_due("t", c).unwrap(), "{c}");
        }
        // A tenant the backup does not hold may have had changes after it: it numbers
        // past the restore too, with the numbers below skipped (a new connector's lag
        // reads 0, not billions).
        let fresh = restored.last_seq("new").unwrap();
        assert!(fresh >= next, "{fresh} {next}");
        assert_eq!(restored.skipped_between("new", 0, fresh).unwrap(), fresh);
        assert!(
            letters(&restored, "new") >= SKIP
                && counter(&restored, "new", crate::store::keys::GSEQ_KEY) >= SKIP
        );
        restored.close().unwrap();
        drop(restored);
        // Once: a second start finds no mark.
        let again = when_unlocked(|| Store::open(&to));
        assert_eq!(again.last_seq("t").unwrap(), next + 1);
        // One restored by session 51's rosterd has the skipped ranges but not where a new
        // tenant numbers from: its next start notes that, and a tenant added later
        // numbers past the restore.
        again
            .inner
            .db
            .remove(super::super::restored::NEW_TENANTS_FROM)
            .unwrap();
        again.close().unwrap();
        drop(again);
        let upgraded = when_unlocked(|| Store::open(&to));
        assert!(upgraded.last_seq("later").unwrap() >= SKIP);
        upgraded.close().unwrap();
        drop(upgraded);
        // Restored again, the backup numbers past the first restored run's numbers (an
        // audit saw one webhook-id for two users when both runs started at one number).
        std::thread::sleep(Duration::from_millis(2));
        let second = when_unlocked(|| Store::open(&twice));
        assert!(second.last_seq("t").unwrap() > next + 1);
    }

    /// The WARN of a restored store's first start says who had moved its counters
    /// already, with no change since: an earlier start of the same backup, cut short, or
    /// a restore of the store the backup was written from. It blamed a start cut short
    /// for both.
    #[test]
    fn a_restored_start_says_who_had_moved_its_counters_already() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(&dir.path().join("data")));
        rt.block_on(store.create(
            "t",
            ResourceKind::User,
            user("u0", "Engineer", true),
            vec![],
        ))
        .unwrap();
        let first = dir.path().join("first");
        store.backup(&first, &|| None).unwrap();
        store.close().unwrap();
        drop(store);
        // The WARN lines of a start of `dir`.
        let started = |dir: &Path| {
            let (logs, guard) = crate::ops::journal::testing::LogBuf::capture();
            let store = when_unlocked(|| Store::open(dir));
            drop(guard);
            store.close().unwrap();
            drop(store);
            logs.lines("This store is a backup starting to serve")
                .join("\n")
        };
        // A start cut short after it moved the counters, before it removed the mark.
        let cut = dir.path().join("cut");
        copy_dir(&first, &cut);
        {
            let db = copy_config(&cut).open().unwrap();
            super::super::restored::move_counters_of_a_restored_backup(&db)
                .unwrap()
                .unwrap();
        }
        let warned = started(&cut);
        assert!(
            warned.contains("(an earlier start of this backup, cut short, had moved them already)"),
            "{warned}"
        );
        // Restored whole, then backed up before any change: that backup's start finds
        // the counters moved by the restore before it, which was not cut short.
        let warned = started(&first);
        assert!(!warned.contains("had moved them already"), "{warned}");
        let restored = when_unlocked(|| Store::open(&first));
        let second = dir.path().join("second");
        restored.backup(&second, &|| None).unwrap();
        restored.close().unwrap();
        drop(restored);
        let warned = started(&second);
        assert!(
            warned.contains("(the store this backup was written from had been restored itself, which moved them, and made no change between that restore and this backup)"),
            "{warned}"
        );
        assert!(!warned.contains("cut short"), "{warned}");
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    /// A store that failed is not backed up, and says it is the store that failed: each
    /// read of the copy answered the engine's kept error, and a full data disk was
    /// reported as "No space left on device" on the backup's path.
    #[test]
    fn a_failed_store_is_not_backed_up_and_says_it_failed() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = when_unlocked(|| Store::open(&data));
        let create = |name: &str| {
            rt.block_on(store.create(
                "t",
                ResourceKind::User,
                user(name, "Engineer", true),
                vec![],
            ))
        };
        create("before").unwrap();
        crate::store::fail_next_flush_in(&data);
        assert!(create("during").is_err());
        assert!(store.failure().is_some());
        let to = dir.path().join("b");
        let e = store.backup(&to, &|| None).unwrap_err();
        assert!(
            matches!(e, StoreError::Failed(_)) && e.to_string().contains("the store failed at"),
            "{e}"
        );
        assert!(!to.exists() && !sibling(&to, ".partial").exists());
    }

    #[test]
    fn a_backup_never_writes_into_a_directory_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(&dir.path().join("data")));
        let to = dir.path().join("old");
        std::fs::create_dir(&to).unwrap();
        std::fs::write(to.join("keep"), b"x").unwrap();
        let e = store.backup(&to, &|| None).unwrap_err();
        assert!(e.to_string().contains("exists already"), "{e}");
        assert!(to.join("keep").is_file());
    }

    /// Back `store` up into `to`; whether `seen` held of the copy being written
    /// (`<to>.partial`) at any of the backup's questions whether to give up.
    fn backed_up_seeing(store: &Store, to: &Path, seen: impl Fn(&Path) -> bool) -> bool {
        let partial = sibling(to, ".partial");
        let saw = std::cell::Cell::new(false);
        store
            .backup(to, &|| {
                saw.set(saw.get() || seen(&partial));
                None
            })
            .unwrap();
        saw.get()
    }

    /// A backup a kill -9 cut short, copied into place as a data directory, is refused:
    /// a start took it for a store from before markers and served a torn roster. So is
    /// one that lost its marker (a build before the incomplete mark, `cp dir/*`).
    #[test]
    fn a_backup_cut_short_is_refused_wherever_it_is_copied() {
        let dir = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(&dir.path().join("data")));
        let to = dir.path().join("b");
        // While it is written, the copy carries the mark: seen from inside the copy.
        let marked = backed_up_seeing(&store, &to, |partial| {
            partial.join(super::super::BACKUP_INCOMPLETE).is_file()
        });
        assert!(marked, "the copy carried no incomplete mark while written");
        assert!(!to.join(super::super::BACKUP_INCOMPLETE).exists());
        store.close().unwrap();
        drop(store);
        // What a kill leaves: the mark still there.
        std::fs::write(
            to.join(super::super::BACKUP_INCOMPLETE),
            super::super::INCOMPLETE_TEXT,
        )
        .unwrap();
        let e = Store::open(&to).err().expect("opened a backup cut short");
        assert!(e.to_string().contains("is a backup cut short"), "{e}");
        // Without the mark and without the marker: the data says it was a backup.
        std::fs::remove_file(to.join(super::super::BACKUP_INCOMPLETE)).unwrap();
        std::fs::remove_file(to.join(STORE_MARKER)).unwrap();
        let e = when_unlocked(|| match Store::open(&to) {
            Err(e) if e.to_string().contains("could not acquire lock") => Err(e),
            other => Ok(other),
        })
        .err()
        .expect("opened a backup without its marker");
        assert!(
            e.to_string().contains("a backup cut short") && e.to_string().contains("cp -a"),
            "{e}"
        );
        assert!(!to.join(STORE_MARKER).exists(), "it was adopted as a store");
        // A whole one opens.
        std::fs::write(to.join(STORE_MARKER), MARKER_TEXT).unwrap();
        when_unlocked(|| Store::open(&to));
    }

    /// A whole backup is marked as one wherever it goes, so that `store check` does not
    /// open it in place; a check leaves the mark, and the first start, which makes it a
    /// store, removes it. A backup renamed out of the backup directory was opened in place.
    #[test]
    fn a_backup_is_marked_as_one_until_a_start_serves_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(&dir.path().join("data")));
        let to = dir.path().join("b");
        let marked = backed_up_seeing(&store, &to, super::super::written_as_backup);
        assert!(!marked, "a backup was marked whole while it was written");
        assert!(!super::super::written_as_backup(&dir.path().join("data")));
        store.close().unwrap();
        drop(store);
        let moved = dir.path().join("kept-for-audit");
        std::fs::rename(&to, &moved).unwrap();
        assert!(super::super::written_as_backup(&moved));
        let checked = when_unlocked(|| Store::open_existing(&moved, 1 << 20));
        checked.close().unwrap();
        drop(checked);
        assert!(
            super::super::written_as_backup(&moved),
            "a check took the mark"
        );
        let started = when_unlocked(|| Store::open(&moved));
        assert!(
            !super::super::written_as_backup(&moved),
            "a start left the mark"
        );
        assert!(moved.join(STORE_MARKER).is_file());
        drop(started);
    }

    #[test]
    fn a_stopped_backup_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(&dir.path().join("data")));
        let to = dir.path().join("b");
        let e = store
            .backup(&to, &|| Some("rosterd is stopping".into()))
            .unwrap_err();
        assert!(
            e.to_string().contains("given up: rosterd is stopping"),
            "{e}"
        );
        assert!(!to.exists());
        assert!(!sibling(&to, ".partial").exists());
        // Given up at each question it asks in turn, copying or reading back, it leaves
        // nothing, or, past the last one, a whole backup.
        let dir2 = tempfile::tempdir().unwrap();
        for stop_at in 1.. {
            let to = dir2.path().join(format!("b{stop_at}"));
            let asked = std::cell::Cell::new(0);
            let given_up = store.backup(&to, &|| {
                asked.set(asked.get() + 1);
                (asked.get() == stop_at).then(|| "asked to".to_owned())
            });
            assert!(!sibling(&to, ".partial").exists(), "{stop_at}");
            match given_up {
                Err(e) => assert!(!to.exists() && e.to_string().contains("given up"), "{e}"),
                Ok(_) => {
                    assert!(stop_at > 2 && to.join(STORE_MARKER).is_file());
                    break;
                }
            }
        }
    }
}
