//! An offline copy of a store into a fresh directory, which then takes the old one's
//! place: how a store gives back the space a build with a slow cleaner let it grow to.
//!
//! sled shrinks its file only from the end, so a file grown by garbage stays that size
//! once the garbage is gone (see `CLEANER_TICK_MS`). Copying every key into a new store
//! writes only what is live. The old directory is kept beside the new one, renamed, so
//! nothing is lost if the copy is wrong; every key and value is compared before the swap.

use std::path::{Path, PathBuf};

use super::rows::io;
use super::{CLEANER_TICK_MS, SCHEMA_VERSION, StoreError, StoreResult, stored_schema};

/// The page cache of the stores a copy opens (a rewrite's both, a backup's new one): each is
/// read or written in one pass. A backup of 200,000 users raised the daemon's RSS by about
/// 250 MiB at 16 MiB and 330 MiB at 64 MiB, in the same time.
pub(super) const COPY_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// The store a copy writes (a backup, a rewrite's new store) and reads back. Its cleaner
/// ticks as the daemon's does: at sled's default of 500 ms it reclaims one segment a tick,
/// behind what a bulk copy leaves to clean (a bare-sled copy came out at 2.17 times its
/// data, against 1.87–1.94 at 10 ms; the order of the writes, `backup::copy_all`, does
/// the rest: BENCHMARKS.md, "Session 51").
pub(super) fn copy_config(dir: &Path) -> sled::Config {
    sled::Config::new()
        .path(dir)
        .cache_capacity(COPY_CACHE_BYTES)
        .flush_every_ms(Some(CLEANER_TICK_MS))
}

/// What a rewrite did.
#[derive(Debug)]
pub struct Rewritten {
    /// Keys copied, over every tree.
    pub keys: u64,
    /// The data directory's size before and after, in bytes.
    pub before: u64,
    pub after: u64,
    /// Where the old directory is kept.
    pub kept: PathBuf,
}

/// sled's own files in a data directory; everything else (the marker, the row files) is
/// rosterd's and is copied as it is.
fn is_sleds(name: &str) -> bool {
    matches!(name, "db" | "conf" | "blobs") || name.starts_with("snap.")
}

pub(super) fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    dir.with_file_name(name)
}

pub(super) fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Copy the store in `dir` into a new directory and swap it in, keeping the old one as
/// `<dir>.before-rewrite`. The daemon must be stopped: sled's lock refuses a second
/// opener.
pub fn rewrite(dir: &Path) -> StoreResult<Rewritten> {
    let dir = &std::path::absolute(dir).map_err(|e| io(dir, e))?;
    super::Store::check_dir(dir)?;
    super::require_store(dir)?;
    // Renaming a link would move the link, and put the new store where it lives.
    if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(StoreError::Backend(format!(
            "{} is a symbolic link; give the directory it points to as --data-dir",
            dir.display()
        )));
    }
    let kept = sibling(dir, ".before-rewrite");
    if kept.exists() {
        return Err(StoreError::Backend(format!(
            "{} is still there from an earlier rewrite; remove it (once rosterd runs well on {}) and run this again",
            kept.display(),
            dir.display()
        )));
    }
    // What an interrupted rewrite left: it never replaced anything.
    let fresh = sibling(dir, ".rewrite");
    if fresh.exists() {
        std::fs::remove_dir_all(&fresh).map_err(|e| io(&fresh, e))?;
    }
    let before = dir_size(dir);
    let copied = (|| -> StoreResult<u64> {
        // One pass over each store: a small cache does, where sled's default (1 GiB)
        // would hold a large store's pages twice over.
        let old = sled::Config::new()
            .path(dir)
            .cache_capacity(COPY_CACHE_BYTES)
            .open()
            .map_err(|e| super::open_error(dir, &e.to_string()))?;
        if stored_schema(&old)? != Some(SCHEMA_VERSION) {
            return Err(StoreError::Backend(format!(
                "the store in {} is not at this build's layout (version {SCHEMA_VERSION}); start this rosterd on it once, so that it upgrades it, then stop it and rewrite",
                dir.display()
            )));
        }
        let new = copy_config(&fresh)
            .open()
            .map_err(|e| super::open_error(&fresh, &e.to_string()))?;
        let keys = copy(&old, &new)?;
        new.flush()?;
        same(&old, &new)?;
        drop(new);
        copy_ours(dir, &fresh)?;
        same_owner(dir, &fresh)?;
        Ok(keys)
    })();
    // A copy cut short by a full disk was left there, holding what space there had been
    // (the disk this command is run to relieve went to 0 bytes free), with a bare error.
    let keys = copied.map_err(|e| {
        let left = if !fresh.exists() {
            "nothing was copied".to_owned()
        } else if std::fs::remove_dir_all(&fresh).is_ok() {
            "its partial copy is removed".to_owned()
        } else {
            format!("remove its partial copy {}", fresh.display())
        };
        let space = if e.to_string().contains("No space left") {
            "; the copy needs free space beside the store for its live data, up to the store's own size"
        } else {
            ""
        };
        StoreError::Backend(format!(
            "the rewrite stopped and changed nothing: the store in {} is as it was, and {left}{space}: {e}",
            dir.display()
        ))
    })?;
    std::fs::rename(dir, &kept).map_err(|e| io(dir, e))?;
    if let Err(e) = std::fs::rename(&fresh, dir) {
        // Put the old store back where the daemon looks for it.
        let _ = std::fs::rename(&kept, dir);
        return Err(io(&fresh, e));
    }
    Ok(Rewritten {
        keys,
        before,
        after: dir_size(dir),
        kept,
    })
}

fn copy(old: &sled::Db, new: &sled::Db) -> StoreResult<u64> {
    let mut keys = 0;
    for name in old.tree_names() {
        let (from, to) = (old.open_tree(&name)?, new.open_tree(&name)?);
        // Nothing to give up for: the daemon is stopped.
        keys += super::backup::copy_all(&from, &to, &|| None)?;
    }
    Ok(keys)
}

/// Every tree of `old` holds in `new` exactly what it holds in `old`.
fn same(old: &sled::Db, new: &sled::Db) -> StoreResult<()> {
    for name in old.tree_names() {
        let (a, b) = (old.open_tree(&name)?, new.open_tree(&name)?);
        let mut b_iter = b.iter();
        for kv in a.iter() {
            let kv = kv?;
            match b_iter.next().transpose()? {
                Some(other) if other == kv => {}
                _ => {
                    return Err(StoreError::Corrupt(format!(
                        "the copy of tree {} differs from the store at key {:?}; nothing was replaced",
                        String::from_utf8_lossy(&name),
                        String::from_utf8_lossy(&kv.0)
                    )));
                }
            }
        }
        if b_iter.next().is_some() {
            return Err(StoreError::Corrupt(format!(
                "the copy of tree {} holds more than the store; nothing was replaced",
                String::from_utf8_lossy(&name)
            )));
        }
    }
    Ok(())
}

fn copy_ours(from: &Path, to: &Path) -> StoreResult<()> {
    for entry in std::fs::read_dir(from).map_err(|e| io(from, e))? {
        let entry = entry.map_err(|e| io(from, e))?;
        let name = entry.file_name();
        if is_sleds(&name.to_string_lossy()) {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        let kind = entry.file_type().map_err(|e| io(&src, e))?;
        if kind.is_dir() {
            std::fs::create_dir_all(&dst).map_err(|e| io(&dst, e))?;
            copy_ours(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| io(&src, e))?;
        }
    }
    Ok(())
}

/// The new directory as the old one was: its mode, and its owner when run as root for a
/// store the service's own user owns (the unit's StateDirectory).
fn same_owner(old: &Path, new: &Path) -> StoreResult<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(old).map_err(|e| io(old, e))?;
    std::fs::set_permissions(new, meta.permissions()).map_err(|e| io(new, e))?;
    chown_all(new, meta.uid(), meta.gid())
}

fn chown_all(path: &Path, uid: u32, gid: u32) -> StoreResult<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).map_err(|e| io(path, e))?;
    if (meta.uid(), meta.gid()) != (uid, gid) {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| io(path, e))?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| io(path, e))? {
            chown_all(&entry.map_err(|e| io(path, e))?.path(), uid, gid)?;
        }
    }
    Ok(())
}
