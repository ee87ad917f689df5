//! Opening the store: sled's open and what it finds (a layout to upgrade or refuse, a
//! restored backup's numbers to move on), unfinished snapshots removed, and what an
//! operator is told when an open fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use super::data_dir::{
    BACKUP_WHOLE, MARKER_TEXT, RESTORE_WHOLE, STORE_MARKER, refuse_root_in_theirs, require_store,
};
use super::upgrade::upgrade;
use super::{
    CLEANER_TICK_MS, DEFAULT_CACHE_BYTES, GroupCommit, Inner, SCHEMA_VERSION, SCHEMA_VERSION_KEY,
    STORE_ID_KEY, Store, StoreError, StoreResult, TenantCheck, check, restored, stored_schema,
};

pub(super) const HELD_ELSEWHERE: &str = "another rosterd (or process) is using";

/// Why `dir` could not be opened, with what an operator can do about it. sled's own
/// messages name neither the directory nor the file.
pub(super) fn open_error(dir: &Path, engine: &str) -> StoreError {
    let mut message = engine.to_owned();
    if engine.contains("could not acquire lock") {
        message = format!(
            "{HELD_ELSEWHERE} {}; stop it first, or give this one another data_dir ({engine})",
            dir.display()
        );
    }
    // An unfinished one is the next open's to remove (see remove_unfinished_snapshots).
    let snapshots: Vec<(PathBuf, u64)> = snapshot_files(dir)
        .into_iter()
        .filter(|(p, _)| !unfinished(p))
        .collect();
    let empty: Vec<String> = snapshots
        .iter()
        .filter(|(_, len)| *len == 0)
        .map(|(p, _)| p.display().to_string())
        .collect();
    if engine.contains("No space left") {
        message.push_str(
            "; free space on the data directory's file system, then start rosterd again (nothing needs moving: a snapshot a start on a full disk leaves unfinished is removed at the next start)",
        );
    } else if !empty.is_empty() {
        message.push_str(&format!(
            "; the directory holds empty snapshot file(s), typically left by a full disk: {}. Move them out of the directory (do not delete the rest of it) and start rosterd again; sled rebuilds the snapshot from its log",
            empty.join(", ")
        ));
    } else if engine.contains("orrupt") {
        // A snapshot cut short part-way reads as corruption as an empty one does, and
        // moving it aside loses nothing; a damaged log is a backup's work.
        let names: Vec<String> = snapshots
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        if names.is_empty() {
            message.push_str(&format!("; the store's files are damaged. Keep a copy of the directory, then restore it from a backup{TORN_COPY}"));
        } else {
            message.push_str(&format!(
                "; the store's files are damaged. First keep a copy of the directory, then move the snapshot file(s) out of it (do not delete the rest) and start rosterd again: {}. sled rebuilds the snapshot from its log, and a snapshot cut short by a crash or a full disk is the usual cause. If it still fails, or says the store's data is gone, the log itself is damaged: restore the directory from a backup",
                names.join(", ")
            ));
        }
    } else if engine.contains("ermission denied") {
        message.push_str("; the directory and its files must belong to the user rosterd runs as");
    }
    StoreError::Open {
        dir: dir.to_owned(),
        message,
    }
}

/// sled panics on some damaged files ("tried to serialize Uninitialized") instead of
/// answering an error; the operator needs the directory and a way out, not a worker's
/// backtrace.
fn engine_panic_as_error(
    dir: &Path,
    open: impl FnOnce() -> StoreResult<Store>,
) -> StoreResult<Store> {
    crate::ops::panics::catch_expected(open).unwrap_or_else(|what| {
        Err(open_error(
            dir,
            &format!("the storage engine failed reading its files (corrupted: {what})"),
        ))
    })
}

/// What opening answers once a handle dropped a moment ago has let go of the directory:
/// sled releases its file lock only when its background threads let go of the database,
/// shortly after the drop (a backup reads back the copy it has just closed; tests re-open
/// a store).
pub(crate) fn past_the_lock<T, E: std::fmt::Debug>(
    open: impl Fn() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match open() {
            Err(e)
                if format!("{e:?}").contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Said where damage is found: a directory restored from a copy taken while rosterd ran
/// reads as damaged (measured: 8 of 13 such copies), and the operator who just restored
/// it needs to know the backup, not the disk, is at fault.
const TORN_COPY: &str = " (a copy of the directory taken while rosterd was running is torn this way: take backups with rosterd itself (the `backup` schedule, SIGUSR1, or `rosterd store backup` while it is stopped), or as a filesystem snapshot; README, \"Backing up and restoring\")";

/// sled writes a snapshot as `snap.<lsn>.generating` and renames it once whole; one left
/// behind (a start on a full disk leaves it empty) is read as the newest snapshot, so
/// every later start failed as corrupt, even once space was freed, until someone moved
/// it out. Removed under the lock sled takes (`flock` on `db`), so that a running
/// daemon's snapshot in progress is never touched: sled then reads the snapshot before
/// it, which the unfinished one had not yet replaced.
fn remove_unfinished_snapshots(dir: &Path) {
    let unfinished: Vec<PathBuf> = snapshot_files(dir)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| unfinished(p))
        .collect();
    if unfinished.is_empty() {
        return;
    }
    let Ok(db) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("db"))
    else {
        return;
    };
    if db.try_lock().is_err() {
        return;
    }
    for p in unfinished {
        match std::fs::remove_file(&p) {
            Ok(()) => {
                tracing::warn!(file = %p.display(), "Removed a snapshot the storage engine had not finished writing (a start on a full disk leaves one); it rebuilds the snapshot from its log.")
            }
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "Cannot remove a snapshot the storage engine had not finished writing; the start may fail on it.")
            }
        }
    }
}

/// Whether `snap` is one sled had not finished writing (see
/// [`remove_unfinished_snapshots`]).
fn unfinished(snap: &Path) -> bool {
    snap.to_string_lossy().ends_with(".generating")
}

/// The `snap.*` files in `dir` with their sizes. An empty one is an interrupted
/// snapshot write, which sled refuses as corruption although the log beside it is
/// intact.
fn snapshot_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut found: Vec<(PathBuf, u64)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("snap."))
        .filter_map(|e| {
            let m = e.metadata().ok().filter(|m| m.is_file())?;
            Some((e.path(), m.len()))
        })
        .collect();
    found.sort();
    found
}

impl Store {
    /// Open (or create) the store in `dir` with the default page cache.
    pub fn open(dir: &Path) -> StoreResult<Store> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Open (or create) the store in `dir`, caching up to `cache_bytes` of pages. A
    /// tenant walk (export, reconciliation) that fits in the cache never reads the disk.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> StoreResult<Store> {
        Self::open_checked(dir, cache_bytes, true)
    }

    /// Open an existing store for reading it whole (`rosterd store backup`, `store
    /// check`): one at an older layout is refused rather than upgraded, since a backup
    /// must not change what it copies, and a directory without a store is refused rather
    /// than made one.
    pub fn open_existing(dir: &Path, cache_bytes: u64) -> StoreResult<Store> {
        require_store(dir)?;
        refuse_root_in_theirs(dir)?;
        Self::open_checked(dir, cache_bytes, false)
    }

    fn open_checked(dir: &Path, cache_bytes: u64, upgrade: bool) -> StoreResult<Store> {
        engine_panic_as_error(dir, || Self::open_inner(dir, cache_bytes, upgrade)).map_err(|e| {
            match e {
                // Already actionable on their own, or naming the directory.
                e @ (StoreError::UnknownSchema { .. } | StoreError::Open { .. }) => e,
                // Its own advice is for a running store; the open's names the snapshots.
                StoreError::Damaged(at) => open_error(
                    dir,
                    &format!("the storage engine read corrupted data at {at}"),
                ),
                e => open_error(dir, &e.to_string()),
            }
        })
    }

    fn open_inner(dir: &Path, cache_bytes: u64, may_upgrade: bool) -> StoreResult<Store> {
        Self::check_dir(dir)?;
        remove_unfinished_snapshots(dir);
        let marker = dir.join(STORE_MARKER);
        let was_a_store = marker.is_file();
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(CLEANER_TICK_MS))
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|e| {
                let text = match StoreError::from(e.clone()) {
                    StoreError::Damaged(at) => {
                        format!("the storage engine read corrupted data at {at}")
                    }
                    _ => e.to_string(),
                };
                open_error(dir, &text)
            })?;
        match stored_schema(&db)? {
            // A backup gets its marker last, after it reads back whole: one without it
            // was cut short (by a build before the incomplete mark, or copied without
            // its hidden files), and a start would take it for a store of before markers.
            Some(_) if !was_a_store && db.contains_key(restored::BACKUP_MARK)? => {
                return Err(StoreError::Open {
                    dir: dir.to_owned(),
                    message: format!(
                        "it holds a backup's data without the {STORE_MARKER} a whole backup ends with: a backup cut short (by a kill, a crash or a full disk), which holds part of the store at most, or a whole one copied without its hidden files (`cp dir/*`). {RESTORE_WHOLE}"
                    ),
                });
            }
            Some(found) => {
                if (1..SCHEMA_VERSION).contains(&found) {
                    if !may_upgrade {
                        return Err(StoreError::Backend(format!(
                            "the store in {} is at an older layout (version {found}, this build's is {SCHEMA_VERSION}), which this command does not change: use the rosterd that wrote it, or start this one on it first (a start upgrades it)",
                            dir.display()
                        )));
                    }
                    upgrade(&db, found)?;
                } else if found != SCHEMA_VERSION {
                    return Err(StoreError::UnknownSchema { found });
                }
            }
            // A directory that held a store opens with none of it: sled read a damaged
            // log as far as it could, which may be nothing. Serving would mirror an
            // empty roster downstream.
            None if was_a_store => {
                return Err(StoreError::Open {
                    dir: dir.to_owned(),
                    message: format!(
                        "the storage engine opened it but found none of the store's data, though the directory held a rosterd store ({STORE_MARKER} is there): its log `db` is damaged. Keep a copy of the directory, then restore it from a backup{TORN_COPY}; to start an empty store on purpose, remove everything in the directory, {STORE_MARKER} included"
                    ),
                });
            }
            None => {
                db.insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION.to_string().as_bytes())?;
                db.insert(STORE_ID_KEY, uuid::Uuid::new_v4().to_string().as_bytes())?;
                db.flush()?;
            }
        }
        // Only a start: a check or a backup of a backup leaves its mark for the start.
        if may_upgrade && let Some(r) = restored::move_counters_of_a_restored_backup(&db)? {
            // Said before the mark goes: a crash between the two would leave the jump
            // unexplained, where one before the mark's removal only says it again.
            for m in r.moved {
                let again = m.again.map_or("", restored::MovedBefore::said);
                tracing::warn!(
                    tenant = %m.tenant,
                    backup_written_at = %r.at,
                    last_change = m.changes_from,
                    next_change = m.changes_to + 1,
                    cursors_moved = m.cursors,
                    "This store is a backup starting to serve: its change numbers go on from #{} rather than #{}{again}, so that no change repeats a number (or a webhook-id) of one the restore lost. Governance event and dead-letter numbers move on as far, and CSV connectors write their files again.",
                    m.changes_to + 1,
                    m.changes_from + 1
                );
            }
            restored::finish(&db)?;
        } else if may_upgrade && restored::note_an_earlier_restore(&db)? {
            tracing::info!(
                "This store was restored from a backup by an earlier rosterd: a tenant new to it will number its changes past the restore, as one added to a store restored by this one does."
            );
        }
        // Served, it is a store and no longer a backup; at every start, in case the one
        // that removed the mark above was cut short before this.
        if may_upgrade {
            let whole = dir.join(BACKUP_WHOLE);
            match std::fs::remove_file(&whole) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(file = %whole.display(), error = %e, "Cannot remove the backup's marker from the store it became; `rosterd store check` will check a copy of this store, as of a backup, until it is removed.");
                }
                _ => {}
            }
        }
        if !was_a_store && let Err(e) = std::fs::write(&marker, MARKER_TEXT) {
            tracing::warn!(file = %marker.display(), error = %e, "Cannot write the store's marker file; a lost `db` file would then go unnoticed.");
        }
        let commit = GroupCommit::start(db.clone(), dir.to_owned())
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let id = db
            .get(STORE_ID_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                dir: dir.to_owned(),
                tenants: RwLock::new(HashMap::new()),
                resolvers: RwLock::new(HashMap::new()),
                commit,
                durable: RwLock::new(HashMap::new()),
                backup: Mutex::new(None),
                id,
            }),
        })
    }

    /// Whether this store was restored from a backup (its first start moved the numbers
    /// on, see [`restored`]).
    pub fn was_restored(&self) -> StoreResult<bool> {
        Ok(self.inner.db.contains_key(restored::NEW_TENANTS_FROM)?)
    }

    /// The store's random id (see [`STORE_ID_KEY`]); empty for a store made before stores
    /// had one. A webhook event's id is made from it, so that a store rebuilt empty does
    /// not send its changes under the ids of the lost store's.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Check every tenant's derived keys against the data they derive from (`rosterd
    /// store check`). Meant for a store no daemon serves: a stopped one's, or a backup.
    /// Opening a tenant completes a write a stop interrupted, as a start does.
    /// `configured`: the tenants the config names, each of which the store should hold.
    pub fn check(&self, configured: &[String]) -> StoreResult<Vec<TenantCheck>> {
        check::check_all(&self.inner.db, &self.inner.dir, configured, false)
    }

    /// The check, putting right every derived key it finds wrong as it goes (`rosterd
    /// store check --repair`): what each document, assignment, membership, event and
    /// letter implies is written, and what none implies is removed. Those primary keys
    /// are not changed, so what disagrees among them stays, and a second check lists it.
    pub fn repair(&self, configured: &[String]) -> StoreResult<Vec<TenantCheck>> {
        check::check_all(&self.inner.db, &self.inner.dir, configured, true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::data_dir::euid;
    use super::*;
    use crate::scim::ResourceKind;
    use serde_json::json;

    #[test]
    fn an_empty_snapshot_file_is_named_in_the_open_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            store.close().unwrap();
        }
        let snap = dir.path().join("snap.00000000FFFFFFFF");
        std::fs::write(&snap, b"").unwrap();
        let err = match crate::store::testing::past_the_lock(|| Store::open(dir.path())) {
            Ok(_) => panic!("sled opened a directory with an empty snapshot"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&dir.path().display().to_string())
                && err.contains(&snap.display().to_string())
                && err.contains("Move them out"),
            "{err}"
        );
        // Moving the file away is the fix the message gives.
        std::fs::remove_file(&snap).unwrap();
        crate::store::testing::when_unlocked(|| Store::open(dir.path()));
    }

    /// A snapshot sled had not finished writing (`.generating`, left empty by a start on
    /// a full disk) made every later start fail as corrupt; it is removed at the open,
    /// but never under a store that holds the directory.
    #[test]
    fn an_unfinished_snapshot_is_removed_at_the_open_and_only_then() {
        let dir = closed_store_with_users(3);
        let snap = dir.path().join("snap.00000000FFFFFFFF.generating");
        std::fs::write(&snap, b"").unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        assert!(!snap.exists());
        assert_eq!(store.count("t", ResourceKind::User).unwrap(), 3);
        // Another process's open while this one holds the store leaves the file alone.
        std::fs::write(&snap, b"").unwrap();
        let e = Store::open(dir.path()).err().expect("opened a held store");
        assert!(e.held_elsewhere(), "{e}");
        assert!(snap.exists());
        store.close().unwrap();
    }

    /// A store with something in it, closed; the directory is returned.
    fn closed_store_with_users(n: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let rt = crate::store::testing::runtime();
        rt.block_on(async {
            for i in 0..n {
                let doc = json!({
                    "schemas": [crate::scim::schema::USER_SCHEMA],
                    "userName": format!("user{i}@x.test"),
                    "title": "Engineer ".repeat(20),
                });
                store
                    .create("t", ResourceKind::User, doc, vec![])
                    .await
                    .unwrap();
            }
        });
        store.close().unwrap();
        dir
    }

    #[test]
    fn a_log_that_holds_none_of_the_store_is_refused() {
        let dir = closed_store_with_users(3);
        std::fs::write(dir.path().join("db"), vec![0xa5; 5000]).unwrap();
        for (snap, _) in snapshot_files(dir.path()) {
            std::fs::remove_file(snap).unwrap();
        }
        let err = match crate::store::testing::past_the_lock(|| Store::open(dir.path())) {
            Ok(_) => panic!("opened a garbled log as an empty store"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("found none of the store's data")
                && err.contains("restore it from a backup")
                && err.contains("taken while rosterd was running"),
            "{err}"
        );
    }

    #[test]
    fn a_lost_log_file_is_refused_not_opened_as_an_empty_store() {
        let dir = closed_store_with_users(3);
        assert!(dir.path().join(STORE_MARKER).is_file());
        let db = dir.path().join("db");
        for lose in [
            (|db: &Path| std::fs::write(db, b"").unwrap()) as fn(&Path),
            |db: &Path| std::fs::remove_file(db).unwrap(),
        ] {
            lose(&db);
            let err = match crate::store::testing::past_the_lock(|| Store::open(dir.path())) {
                Ok(_) => panic!("opened a store whose log is gone, as an empty one"),
                Err(e) => e.to_string(),
            };
            assert!(
                err.contains(&dir.path().display().to_string())
                    && err.contains("`db` is missing or empty")
                    && err.contains("Restore the directory from a backup"),
                "{err}"
            );
        }
        // A new directory is still a new store, and gets its marker.
        let fresh = tempfile::tempdir().unwrap();
        crate::store::testing::when_unlocked(|| Store::open(fresh.path()));
        assert!(fresh.path().join(STORE_MARKER).is_file());
    }

    #[test]
    fn damaged_files_are_an_open_error_with_a_way_out_not_a_panic() {
        // sled panics on some damaged logs (a large one cut short); a small test store
        // does not reproduce it, so the panic is sled's message, raised in its place.
        let dir = tempfile::tempdir().unwrap();
        let err = engine_panic_as_error(dir.path(), || {
            std::panic::resume_unwind(Box::new("tried to serialize Uninitialized"))
        })
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&dir.path().display().to_string())
                && err.contains("tried to serialize Uninitialized")
                && err.contains("the store's files are damaged")
                && err.contains("restore it from a backup")
                && err.contains("taken while rosterd was running"),
            "{err}"
        );

        // A damaged snapshot: the message says to move it aside first, which works.
        let dir = closed_store_with_users(50);
        // sled snapshots after a million operations; this one is cut short part-way.
        std::fs::write(dir.path().join("snap.0000000000000100"), vec![0x5a; 1000]).unwrap();
        let snaps = snapshot_files(dir.path());
        let err = match crate::store::testing::past_the_lock(|| Store::open(dir.path())) {
            Ok(_) => panic!("opened a store with a garbage snapshot"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("move the snapshot file(s) out of it")
                && err.contains(&snaps[0].0.display().to_string()),
            "{err}"
        );
        for (snap, _) in &snaps {
            std::fs::remove_file(snap).unwrap();
        }
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        assert_eq!(store.count("t", ResourceKind::User).unwrap(), 50);
    }

    #[test]
    fn a_store_in_use_names_the_directory_and_the_likely_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _held = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let err = match Store::open(dir.path()) {
            Ok(_) => panic!("opened a store another handle holds"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&format!(
                "another rosterd (or process) is using {}",
                dir.path().display()
            )),
            "{err}"
        );
    }

    #[test]
    fn root_does_not_open_another_users_store_offline() {
        let dir = closed_store_with_users(1);
        if euid() != 0 {
            // Only root can give the directory away; as another user there is nothing to
            // refuse.
            Store::open_existing(dir.path(), 1 << 20)
                .unwrap()
                .close()
                .unwrap();
            return;
        }
        let chown = |uid: u32| std::os::unix::fs::chown(dir.path(), Some(uid), None).unwrap();
        let files = || {
            let mut all: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| {
                    let m = e.metadata().unwrap();
                    (e.file_name(), m.len(), m.modified().unwrap())
                })
                .collect();
            all.sort();
            all
        };
        let before = files();
        chown(65534);
        let e = Store::open_existing(dir.path(), 1 << 20)
            .err()
            .expect("refused");
        let text = e.to_string();
        assert!(
            text.contains("belongs to uid 65534") && text.contains("sudo -u rosterd"),
            "{text}"
        );
        assert_eq!(files(), before, "nothing is written as root");
        chown(0);
        let store = past_the_lock(|| Store::open_existing(dir.path(), 1 << 20)).unwrap();
        store.close().unwrap();
    }

    #[test]
    fn unknown_layout_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = crate::store::testing::when_unlocked(|| sled::open(dir.path()));
            db.insert(SCHEMA_VERSION_KEY, b"99").unwrap();
            db.flush().unwrap();
        }
        assert!(matches!(
            crate::store::testing::past_the_lock(|| Store::open(dir.path())),
            Err(StoreError::UnknownSchema { found: 99 })
        ));
    }
}
