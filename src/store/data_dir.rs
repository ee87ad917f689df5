//! The data directory: the marker files rosterd keeps in it, and the checks that refuse
//! one before sled writes there (someone else's files, another user's, a lost log, a
//! backup cut short).

use std::path::Path;

use super::{ROWS_DIR, Store, StoreError, StoreResult};

/// A directory that does not hold a store (no marker) is refused by what only reads or
/// copies one (`store backup`, `store rewrite`), which must not make one there.
pub(super) fn require_store(dir: &Path) -> StoreResult<()> {
    let marker = dir.join(STORE_MARKER);
    match std::fs::metadata(&marker) {
        Ok(m) if m.is_file() => return Ok(()),
        // Run as another user than the store's (the usual slip: without `sudo -u
        // rosterd`), "holds no rosterd store" sent the operator looking for lost data.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(StoreError::Open {
                dir: dir.to_owned(),
                message: format!(
                    "this user (uid {}) cannot read it: {e}; run the store commands as the store's user (`sudo -u rosterd rosterd store …` under the systemd unit)",
                    euid()
                ),
            });
        }
        _ => {}
    }
    if dir.join(BACKUP_INCOMPLETE).exists() {
        return Err(StoreError::Open {
            dir: dir.to_owned(),
            message: format!("it {CUT_SHORT} ({BACKUP_INCOMPLETE} is there). {RESTORE_WHOLE}"),
        });
    }
    // Only the commands for a stopped store get here, and under the unit the store's
    // directory is on the daemon's command line, not in the config they read.
    Err(StoreError::Backend(format!(
        "{} holds no rosterd store ({STORE_MARKER} is missing); name the store's directory with --data-dir (the systemd unit's is /var/lib/rosterd)",
        dir.display()
    )))
}

/// Written beside sled's files once a store has opened: a `db` that later goes missing
/// or empty would otherwise open as a new, empty store, and the connectors would mirror
/// that emptiness downstream.
pub(super) const STORE_MARKER: &str = ".rosterd-store";
/// In a backup being written, until it is whole: a directory holding it is refused.
pub(super) const BACKUP_INCOMPLETE: &str = ".rosterd-backup-incomplete";
pub(super) const INCOMPLETE_TEXT: &str = "This directory is a rosterd backup that was still being written: it holds part of the store at most. rosterd refuses to start on it.\n";
/// In a whole backup until a start serves it: `rosterd store check` tells a backup by
/// it, wherever the backup was moved and whatever it was renamed, and checks a copy.
pub(super) const BACKUP_WHOLE: &str = ".rosterd-backup";
pub(super) const WHOLE_TEXT: &str = "This directory is a whole rosterd backup. `rosterd store check` checks a copy of it, so that it stays as written. The first start of rosterd on it (a restore) removes this file.\n";

/// Whether `dir` holds a whole backup that no start has served yet.
pub fn written_as_backup(dir: &Path) -> bool {
    dir.join(BACKUP_WHOLE).is_file()
}

/// Why a backup cut short is refused, and what to use instead.
const CUT_SHORT: &str = "is a backup cut short (by a kill, a crash or a full disk) that holds part of the store at most: serving it would mirror a torn roster downstream";
/// What to restore instead of a backup refused as cut short.
pub(super) const RESTORE_WHOLE: &str = "Restore a whole backup (a `rosterd-<time>` directory, never `rosterd-<time>.partial`), copied with its hidden files (`cp -a`)";
pub(super) const MARKER_TEXT: &str = "This directory is a rosterd store. rosterd refuses to start on it if its `db` file is missing or empty.\n";

/// A data directory this process could not use: a path through a file, or a directory
/// on a read-only mount or owned by another user. `check-config` run as the service's
/// user then says so, rather than the first start. A directory not made yet is left to
/// [`Store::creatable`]: systemd's `StateDirectory=` makes it only at the start.
fn refuse_unwritable(dir: &Path) -> StoreResult<()> {
    let refuse = |message: String| {
        Err(StoreError::Open {
            dir: dir.to_owned(),
            message,
        })
    };
    // A link to nothing: `exists` follows it and says no, and creating the directory
    // there fails with "File exists".
    if !dir.exists() && dir.symlink_metadata().is_ok() {
        let to = std::fs::read_link(dir).unwrap_or_default();
        return refuse(format!(
            "it is a symbolic link to {}, which does not exist",
            to.display()
        ));
    }
    let existing = nearest_existing(dir);
    if !existing.is_dir() {
        return refuse(format!("{} is a file, not a directory", existing.display()));
    }
    if existing != dir {
        return Ok(());
    }
    if let Err(e) = writable(dir) {
        return refuse(format!(
            "the directory is not writable by this user (uid {}): {e}; rosterd writes its store there",
            euid()
        ));
    }
    // A store first started by another user (`sudo rosterd serve`, then the unit as
    // `rosterd`) keeps that user's files in a directory now this one's.
    let theirs: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            // sled's and ours; other entries (`lost+found` on a dedicated volume) are
            // not the daemon's to write.
            let store_file = ["db", "conf", "blobs", ROWS_DIR, STORE_MARKER]
                .contains(&name.as_ref())
                || name.starts_with("snap.");
            store_file && writable(&e.path()).is_err()
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // The export's row files too: a leftover of a start as root fails every rebuild.
        .chain(
            std::fs::read_dir(dir.join(ROWS_DIR))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| writable(&e.path()).is_err())
                .map(|e| format!("{ROWS_DIR}/{}", e.file_name().to_string_lossy())),
        )
        .collect();
    if !theirs.is_empty() {
        return refuse(format!(
            "this user (uid {}) cannot write the store's files {}; the directory and its files must belong to the user rosterd runs as (chown -R)",
            euid(),
            theirs.join(", ")
        ));
    }
    Ok(())
}

/// An offline command run with `sudo` on the store of the unit's user: opening the store
/// writes files (sled's snapshot, the completion of an interrupted write), which as root
/// would belong to root, and the daemon's next start would refuse them.
pub(super) fn refuse_root_in_theirs(dir: &Path) -> StoreResult<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = match std::fs::metadata(dir) {
        Ok(m) => m.uid(),
        Err(_) => return Ok(()),
    };
    if euid() != 0 || owner == 0 {
        return Ok(());
    }
    Err(StoreError::Open {
        dir: dir.to_owned(),
        message: format!(
            "it belongs to uid {owner}, and this command runs as root: the files it writes there would be root's, which the daemon's next start refuses. Run it as the store's user instead (`sudo -u rosterd rosterd …`)"
        ),
    })
}

/// `dir` itself or its nearest ancestor that exists (the one a start would create it
/// in); `dir` when none does.
fn nearest_existing(dir: &Path) -> &Path {
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            // A relative path (`data`, from `--config config.toml`) ends in the
            // working directory, which exists; its parent is written as "".
            Some(p) if p.as_os_str().is_empty() => return Path::new("."),
            Some(p) => existing = p,
            None => return dir,
        }
    }
    existing
}

pub(super) fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Whether this process may write `path` (for a directory: create files in it), by its
/// effective ids (as the daemon will open it), including on a read-only mount.
fn writable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // A directory is written by creating in it, which needs search too; a file by
    // opening it for reading and writing.
    let mode = if dir.is_dir() {
        libc::W_OK | libc::X_OK
    } else {
        libc::R_OK | libc::W_OK
    };
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), mode, libc::AT_EACCESS) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A directory with files in it but no store is someone else's (a data_dir set to the
/// wrong path): sled would write its files among theirs and overwrite one named `db`.
/// A store always has sled's `conf`; an empty directory is a new store.
fn refuse_foreign(dir: &Path) -> StoreResult<()> {
    if dir.join("conf").is_file() {
        return Ok(());
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        // Missing or unreadable: sled's open says which, with the directory named.
        return Ok(());
    };
    let mut foreign: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            // sled's own: its blobs directory, and its files when empty (a creation cut
            // off before `conf`); what file systems and desktops put in any directory
            // (`lost+found` of a dedicated volume, `.DS_Store`), and our own dotfiles.
            let sled_file = name == "db" || name.starts_with("snap.");
            let empty = e.metadata().is_ok_and(|m| m.is_file() && m.len() == 0);
            let ours = name.starts_with('.')
                || name == "lost+found"
                || name == "blobs"
                || name == ROWS_DIR
                || (sled_file && empty);
            (!ours).then_some(name)
        })
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    let shown = foreign
        .iter()
        .take(5)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    Err(StoreError::Open {
        dir: dir.to_owned(),
        message: format!(
            "it holds files that are not a rosterd store ({shown}{}); point server.data_dir (or --data-dir) at an empty directory or at an existing rosterd store",
            if foreign.len() > 5 { ", …" } else { "" }
        ),
    })
}

impl Store {
    /// Whether `dir` holds a store (sled's files, or rosterd's marker).
    pub fn holds_store(dir: &Path) -> bool {
        dir.join("conf").is_file() || dir.join(STORE_MARKER).is_file()
    }

    /// Why this process could not create the data directory `dir`, if it does not exist
    /// and its nearest existing ancestor is not writable here. A warning, not an error:
    /// under systemd, `StateDirectory=` creates it before the start.
    pub fn creatable(dir: &Path) -> Option<String> {
        let existing = nearest_existing(dir);
        if existing == dir || !existing.is_dir() {
            return None;
        }
        writable(existing).err().map(|e| {
            format!(
                "{} does not exist, and this user (uid {}) cannot create it in {}: {e}",
                dir.display(),
                euid(),
                existing.display()
            )
        })
    }

    /// Why this process could not write files into `dir` (a CSV connector's), if it
    /// could not: the directory is not writable here, or it does not exist and cannot be
    /// made. A warning: run as another user than the service, it tells little.
    pub fn unwritable(dir: &Path) -> Option<String> {
        if !dir.exists() {
            return Self::creatable(dir);
        }
        writable(dir).err().map(|e| {
            format!(
                "this user (uid {}) cannot write into {}: {e}",
                euid(),
                dir.display()
            )
        })
    }

    /// Make `dir` and its missing parents readable by this user alone. The store holds
    /// every user's personal data and what targets answered; under
    /// the unit, `UMask=0077` and `StateDirectoryMode=0700` do this, but run by hand under
    /// the usual umask 022 the directory was 0755 and its files 0644, readable by every
    /// local user. A directory that exists already keeps its mode: it is the operator's.
    pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }

    /// What can be told of `dir` without opening it (and so without taking the lock a
    /// running daemon holds): someone else's files, or a store whose log is gone. For
    /// `check-config`; opening checks the same first.
    pub fn check_dir(dir: &Path) -> StoreResult<()> {
        refuse_unwritable(dir)?;
        refuse_foreign(dir)?;
        if dir.join(BACKUP_INCOMPLETE).exists() {
            return Err(StoreError::Open {
                dir: dir.to_owned(),
                message: format!("it {CUT_SHORT} ({BACKUP_INCOMPLETE} is there). {RESTORE_WHOLE}"),
            });
        }
        if dir.join(STORE_MARKER).is_file()
            && std::fs::metadata(dir.join("db")).map_or(true, |m| m.len() == 0)
        {
            return Err(StoreError::Open {
                dir: dir.to_owned(),
                message: format!(
                    "its log file `db` is missing or empty, yet the directory held a rosterd store ({STORE_MARKER} is there): the data was lost or moved. Restore the directory from a backup; to start an empty store on purpose, remove everything in the directory, {STORE_MARKER} included"
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_made_by_rosterd_is_its_users_alone() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("new").join("data");
        Store::create_private_dir(&dir).unwrap();
        for d in [&dir, &root.path().join("new")] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        // One that exists keeps the mode its operator gave it.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        Store::create_private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o750);
    }

    #[test]
    fn a_directory_of_other_files_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        // What a dedicated volume or a desktop leaves is not a reason to refuse.
        let volume = tempfile::tempdir().unwrap();
        std::fs::create_dir(volume.path().join("lost+found")).unwrap();
        std::fs::write(volume.path().join(".DS_Store"), "x").unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(volume.path()));
        store.close().unwrap();
        drop(store);
        std::fs::write(dir.path().join("db"), vec![7u8; 10_000]).unwrap();
        let err = Store::open(dir.path()).err().expect("refused").to_string();
        assert!(err.contains("notes.txt") && err.contains("db"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("db")).unwrap(),
            vec![7u8; 10_000]
        );
        // An empty directory is a new store, and a store opens again.
        let fresh = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(fresh.path()));
        store.close().unwrap();
        drop(store);
        let again = crate::store::testing::when_unlocked(|| Store::open(fresh.path()));
        again.close().unwrap();
    }
}
