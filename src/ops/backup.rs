//! Backups of the store: on the `backup` schedule, on SIGUSR1, and by `rosterd store
//! backup` with the daemon stopped. Each goes into a new directory of `[backup] dir`
//! named for its time (`rosterd-20261205T023000Z`), which a daemon can be started on as it
//! is; the oldest beyond `keep` are removed once a new one is whole.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::store::{BackedUp, Store, StoreError};

const PREFIX: &str = "rosterd-";
const TIME_FORMAT: &str = "%Y%m%dT%H%M%SZ";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("backup directory {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a backup is being written already (since {0})")]
    Running(String),
    #[error(
        "not started: {} has {} MiB free, and a backup leaves at least {} MiB free there (key `backup.keep_free_mb`); {ROOM}",
        dir.display(), free / MIB, keep_free / MIB
    )]
    LowSpace {
        dir: PathBuf,
        free: u64,
        keep_free: u64,
    },
}

const MIB: u64 = 1024 * 1024;

/// What to do when a backup finds too little space.
const ROOM: &str = "make room (fewer backups kept, `backup.keep`; old ones removed by hand) or give `backup.dir` a filesystem of its own";

/// Where backups go and how many stay: `[backup]`, resolved.
#[derive(Debug, Clone)]
pub struct Plan {
    pub dir: PathBuf,
    pub keep: usize,
    /// Free space a backup leaves on the backup directory's filesystem (`None`: the
    /// default, [`default_keep_free`]).
    pub keep_free_mb: Option<u64>,
}

impl Plan {
    pub fn of(config: &crate::config::Config) -> Plan {
        Plan {
            dir: config.backup_dir(),
            keep: config.backup.keep,
            keep_free_mb: config.backup.keep_free_mb,
        }
    }

    /// The free space a backup leaves on a filesystem of `size` bytes.
    fn keep_free(&self, size: u64) -> u64 {
        self.keep_free_mb
            .map_or_else(|| default_keep_free(size), |mb| mb.saturating_mul(MIB))
    }

    /// What `check-config` should say about the space for backups: nothing, or why a
    /// backup would not start on the filesystem `dir` is (or will be) on as it is now.
    pub fn space_warning(&self) -> Option<String> {
        let on = self.dir.ancestors().find(|a| a.exists())?;
        let (free, size) = space(on).ok()?;
        let keep_free = self.keep_free(size);
        if keep_free >= size {
            Some(format!(
                "backup.keep_free_mb ({} MiB) is not less than the size of the filesystem of {} ({} MiB): no backup would ever start",
                keep_free / MIB,
                self.dir.display(),
                size / MIB
            ))
        } else if free < keep_free {
            Some(format!(
                "a backup now would not start: {} has {} MiB free, and a backup leaves at least {} MiB free there (key `backup.keep_free_mb`); {ROOM}",
                self.dir.display(),
                free / MIB,
                keep_free / MIB
            ))
        } else {
            None
        }
    }
}

/// What a backup run wrote and removed.
#[derive(Debug)]
pub struct Written {
    pub backup: BackedUp,
    /// Older backups removed to keep `keep`.
    pub removed: Vec<PathBuf>,
    /// Why older backups could not be removed: the backup is written all the same.
    pub prune_error: Option<String>,
}

impl Written {
    /// One line for the log, `/status` and the CLI.
    pub fn summary(&self) -> String {
        let held = self.backup.longest_hold.as_millis();
        format!(
            "{}: {} keys, {:.1} MiB in {:.1} s{}{}",
            self.backup.path.display(),
            self.backup.keys,
            self.backup.bytes as f64 / MIB as f64,
            self.backup.took.as_secs_f64(),
            // Nothing to say with the daemon stopped.
            if held > 0 {
                format!(" (writers held at most {held} ms)")
            } else {
                String::new()
            },
            match self.removed.len() {
                0 => String::new(),
                n => format!("; {n} older removed"),
            }
        )
    }
}

/// The filesystem holding `path`: bytes free to this user, and its size.
fn space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs is plain integers, for which all zeroes is a value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let block = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * block, st.f_blocks as u64 * block))
}

/// A GiB, or a tenth of a smaller filesystem: the backup directory is often on the
/// store's filesystem (the default is beside it), where a backup that took the last of
/// the space would make the store fail.
pub fn default_keep_free(size: u64) -> u64 {
    (1024 * MIB).min(size / 10)
}

/// Write a backup of `store` into `plan.dir`, named for `now`, then remove the oldest
/// beyond `plan.keep`. Blocking: it reads the whole store. Given up, leaving nothing, once
/// `stopped`, or when the filesystem's free space falls to `plan.keep_free_mb`.
pub fn write(
    store: &Store,
    plan: &Plan,
    now: DateTime<Utc>,
    stopped: &dyn Fn() -> bool,
) -> Result<Written, BackupError> {
    let dir = plan.dir.as_path();
    let at_dir = |source| BackupError::Dir {
        path: dir.to_owned(),
        source,
    };
    // "File exists (os error 17)" said nothing of what is wrong.
    if dir.exists() && !dir.is_dir() {
        return Err(at_dir(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            "it is not a directory (a file is there); name a directory for the backups",
        )));
    }
    Store::create_private_dir(dir).map_err(at_dir)?;
    // Before, not after: what an interrupted backup left may hold the space this one needs.
    remove_partials(dir).map_err(at_dir)?;
    let (free, size) = space(dir).map_err(at_dir)?;
    let keep_free = plan.keep_free(size);
    if free < keep_free {
        return Err(BackupError::LowSpace {
            dir: dir.to_owned(),
            free,
            keep_free,
        });
    }
    let stem = format!("{PREFIX}{}", now.format(TIME_FORMAT));
    // Two in one second (a signal right after the schedule): the second gets a suffix,
    // which sorts after the first.
    let mut to = dir.join(&stem);
    let mut n = 1;
    while to.exists() {
        to = dir.join(format!("{stem}-{n}"));
        n += 1;
    }
    let give_up = || {
        if stopped() {
            return Some("rosterd is stopping".to_owned());
        }
        match space(dir) {
            Ok((free, _)) if free < keep_free => Some(format!(
                "{} has {} MiB left free, and a backup leaves at least {} MiB (key `backup.keep_free_mb`); {ROOM}",
                dir.display(),
                free / MIB,
                keep_free / MIB
            )),
            _ => None,
        }
    };
    let backup = store.backup(&to, &give_up)?;
    let (removed, prune_error) = match prune(dir, plan.keep, &to, store.dir()) {
        Ok(removed) => (removed, None),
        Err(e) => (Vec::new(), Some(format!("{}: {e}", dir.display()))),
    };
    Ok(Written {
        backup,
        removed,
        prune_error,
    })
}

/// Why a start must not make a new, empty store in `data_dir`: there is none, yet
/// `backup_dir` holds backups of one. A restore whose copy failed (systemd's
/// StateDirectory= then leaves the directory empty) or a data directory named wrongly
/// looks just so, and a new store, which the identity provider fills and the connectors
/// mirror at once, handed a CSV consumer a roster of the few users written next, and lost
/// every write it acknowledged once the right store was back. `rosterd store init` makes
/// one on purpose.
pub fn new_store_refused(data_dir: &Path, backup_dir: &Path) -> Option<String> {
    if crate::store::Store::holds_store(data_dir) {
        return None;
    }
    let backups = list(backup_dir).ok()?;
    let newest = backups.last()?;
    Some(format!(
        "{} holds no store, yet {} holds {} backup(s) of one (the newest: {}): a restore whose copy failed, or a data directory named wrongly. Restore the newest backup into it (README: Backing up and restoring), or point the data directory at the store; to start a new, empty store there on purpose, run `rosterd store init` first",
        data_dir.display(),
        backup_dir.display(),
        backups.len(),
        newest.display()
    ))
}

/// The whole backups in `dir`, oldest first (by the time in their names, then the
/// suffix a second one in the same second got).
pub fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(order) = order_of(&name)
            && entry.file_type()?.is_dir()
        {
            found.push((order, entry.path()));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Whether `dir` is named as a whole backup is (`rosterd-20261205T021500Z`), wherever it
/// is: under the systemd unit the backups are beside the unit's data directory, which the
/// config need not name.
pub fn named_as_backup(dir: &Path) -> bool {
    dir.file_name()
        .is_some_and(|n| order_of(&n.to_string_lossy()).is_some())
}

/// Where a backup's name puts it in time: the time, then its suffix; `None` for anything
/// that is not a whole backup (a `.partial` one, a file of the operator's).
fn order_of(name: &str) -> Option<(DateTime<Utc>, u32)> {
    let rest = name.strip_prefix(PREFIX)?;
    let stamp = rest.get(..16)?;
    let n = match &rest[16..] {
        "" => 0,
        suffix => suffix.strip_prefix('-')?.parse::<u32>().ok()?,
    };
    let at = chrono::NaiveDateTime::parse_from_str(stamp, TIME_FORMAT).ok()?;
    Some((at.and_utc(), n))
}

/// Remove what interrupted backups left (`rosterd-….partial`; a file of that name too,
/// which would stand where the next backup is written).
fn remove_partials(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(PREFIX) && name.ends_with(".partial") {
            let removed = if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot remove {}: {e}", path.display()))
            })?;
            tracing::info!(path = %path.display(), "Removed a backup an earlier run left unfinished (a kill or a crash cut it short).");
        }
    }
    Ok(())
}

/// Remove the oldest backups beyond `keep`, never `written`, the one just written (a
/// clock stepped back names it older than the rest), nor the directory the daemon runs
/// on, should it be among them.
fn prune(dir: &Path, keep: usize, written: &Path, live: &Path) -> std::io::Result<Vec<PathBuf>> {
    // The same directory by its device and inode: a bind mount of the data directory
    // among the backups has another path, which no resolving of links would reach.
    let id = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
    };
    let same = |a: &Path, b: &Path| a == b || id(a).is_some_and(|a| Some(a) == id(b));
    let others: Vec<PathBuf> = list(dir)?
        .into_iter()
        .filter(|p| !same(p, written) && !same(p, live))
        .collect();
    let mut removed = Vec::new();
    for old in &others[..others.len().saturating_sub(keep.saturating_sub(1))] {
        std::fs::remove_dir_all(old).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot remove {}: {e}", old.display()))
        })?;
        removed.push(old.clone());
    }
    Ok(removed)
}

/// The newest whole backup in `dir` and its time.
pub fn newest(dir: &Path) -> Option<(PathBuf, DateTime<Utc>)> {
    let newest = list(dir).ok()?.pop()?;
    let (at, _) = order_of(&newest.file_name()?.to_string_lossy())?;
    Some((newest, at))
}

/// The daemon's backups: one at a time, and what the last ones did, for `/status` and
/// `/metrics`.
pub struct Backups {
    pub plan: Plan,
    state: Mutex<BackupState>,
    /// Whether one is being written; a stopping daemon waits until it has given up.
    busy: tokio::sync::watch::Sender<bool>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BackupState {
    pub running_since: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_path: Option<PathBuf>,
    pub last_bytes: Option<u64>,
    pub last_keys: Option<u64>,
    pub last_seconds: Option<f64>,
    /// The longest a tenant's writers waited for the last backup.
    pub last_longest_hold_ms: Option<u64>,
    /// Why the last backup failed, while no backup has been written since.
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// Backups written and failed since the start.
    pub written: u64,
    pub failed: u64,
}

impl Backups {
    /// Knows the newest backup already in the directory, so that `/status` and a missed
    /// schedule's catch-up see it after a restart.
    pub fn new(plan: Plan) -> Backups {
        let mut state = BackupState::default();
        if let Some((path, at)) = newest(&plan.dir) {
            state.last_success_at = Some(at);
            state.last_path = Some(path);
        }
        Backups {
            plan,
            state: Mutex::new(state),
            busy: tokio::sync::watch::Sender::new(false),
        }
    }

    pub fn state(&self) -> BackupState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Until no backup is being written (one given up by a stop removes its copy first).
    pub async fn idle(&self) {
        let _ = self.busy.subscribe().wait_for(|busy| !busy).await;
    }

    /// Write one now; `by` names what asked, for the log. Refused while one is written;
    /// given up once `stop` is cancelled.
    pub async fn run(
        &self,
        store: &Store,
        by: &str,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<Written, BackupError> {
        let now = Utc::now();
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(since) = s.running_since {
                let e = BackupError::Running(crate::dispatch::rfc3339(since));
                tracing::warn!(by, error = %e, "Backup not started.");
                return Err(e);
            }
            s.running_since = Some(now);
            self.busy.send_replace(true);
        }
        tracing::info!(by, dir = %self.plan.dir.display(), "Writing a backup of the store.");
        let (store2, plan) = (store.clone(), self.plan.clone());
        let stop = stop.clone();
        let stopping = stop.clone();
        let span = tracing::Span::current();
        let written = tokio::task::spawn_blocking(move || {
            span.in_scope(|| write(&store2, &plan, now, &|| stop.is_cancelled()))
        })
        .await
        .unwrap_or_else(|e| Err(BackupError::Store(StoreError::from_join(e))));
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.running_since = None;
        match &written {
            Ok(w) => {
                tracing::info!(by, result = w.summary().as_str(), "Backup written.");
                if let Some(e) = &w.prune_error {
                    tracing::warn!(by, error = %e, "Cannot remove the backups older than the newest `keep`.");
                }
                s.last_success_at = Some(now);
                s.last_path = Some(w.backup.path.clone());
                s.last_bytes = Some(w.backup.bytes);
                s.last_keys = Some(w.backup.keys);
                s.last_seconds = Some(w.backup.took.as_secs_f64());
                s.last_longest_hold_ms = Some(w.backup.longest_hold.as_millis() as u64);
                // A failure before stays counted in `failed`; it no longer describes the
                // backups, and a check of `last_error` would stay red until a restart.
                s.last_error = None;
                s.last_error_at = None;
                s.written += 1;
            }
            // Not a failure of the backup: the next start's schedule writes one.
            Err(e) if stopping.is_cancelled() => {
                tracing::warn!(by, error = %e, "Backup given up: rosterd is stopping.");
            }
            Err(e) => {
                tracing::error!(by, error = %e, "Backup failed.");
                s.last_error = Some(e.to_string());
                s.last_error_at = Some(now);
                s.failed += 1;
            }
        }
        self.busy.send_replace(false);
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[PathBuf]) -> Vec<String> {
        v.iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    fn made(dir: &Path, names: &[&str]) {
        for name in names {
            std::fs::create_dir(dir.join(name)).unwrap();
        }
    }

    #[test]
    fn check_config_warns_of_a_free_space_no_filesystem_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let plan = |keep_free_mb| Plan {
            dir: dir.path().join("not-yet/backups"),
            keep: 1,
            keep_free_mb,
        };
        let (free, size) = space(dir.path()).unwrap();
        let w = plan(Some(size / MIB + 1)).space_warning().unwrap();
        assert!(w.contains("no backup would ever start"), "{w}");
        // Between what is free and the filesystem's size.
        let w = plan(Some((free / MIB + size / MIB) / 2))
            .space_warning()
            .unwrap();
        assert!(w.contains("a backup now would not start"), "{w}");
        assert_eq!(plan(Some(0)).space_warning(), None);
    }

    /// A file where the backup directory should be is said to be one ("File exists" was).
    #[test]
    fn a_backup_directory_that_is_a_file_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("data")).unwrap();
        let file = dir.path().join("bk");
        std::fs::write(&file, b"x").unwrap();
        let plan = Plan {
            dir: file.clone(),
            keep: 1,
            keep_free_mb: Some(0),
        };
        let e =
            write(&store, &plan, Utc::now(), &|| false).expect_err("wrote a backup into a file");
        assert!(e.to_string().contains("is not a directory"), "{e}");
        store.close().unwrap();
    }

    #[test]
    fn only_whole_backups_are_listed_in_the_order_they_were_written() {
        let dir = tempfile::tempdir().unwrap();
        made(
            dir.path(),
            &[
                "rosterd-20261201T023000Z",
                "rosterd-20261203T023000Z-10",
                "rosterd-20261203T023000Z",
                "rosterd-20261202T023000Z",
                "rosterd-20261203T023000Z-2",
                "rosterd-20261204T023000Z.partial",
                "rosterd-20261204T023000Z-1.partial",
                "rosterd-notatime",
                "mine",
            ],
        );
        std::fs::write(dir.path().join("rosterd-20261130T000000Z"), b"a file").unwrap();
        // A file where a backup would be written is in its way as much as a directory.
        std::fs::write(dir.path().join("rosterd-20261205T000000Z.partial"), b"").unwrap();
        assert_eq!(
            names(&list(dir.path()).unwrap()),
            [
                "rosterd-20261201T023000Z",
                "rosterd-20261202T023000Z",
                "rosterd-20261203T023000Z",
                "rosterd-20261203T023000Z-2",
                "rosterd-20261203T023000Z-10",
            ]
        );
        let (path, at) = newest(dir.path()).unwrap();
        assert!(path.ends_with("rosterd-20261203T023000Z-10"));
        assert_eq!(crate::dispatch::rfc3339(at), "2026-12-03T02:30:00Z");
        remove_partials(dir.path()).unwrap();
        assert!(!dir.path().join("rosterd-20261204T023000Z.partial").exists());
        assert!(!dir.path().join("rosterd-20261205T000000Z.partial").exists());
        assert!(
            !dir.path()
                .join("rosterd-20261204T023000Z-1.partial")
                .exists()
        );
        assert!(dir.path().join("rosterd-notatime").exists());
    }

    /// The oldest go, but never the backup just written (after a clock stepped back its
    /// name is the oldest) nor a data directory that lies among them.
    #[test]
    fn pruning_keeps_the_newest_the_one_written_and_the_live_store() {
        let dir = tempfile::tempdir().unwrap();
        let all = [
            "rosterd-20261201T023000Z",
            "rosterd-20261202T023000Z",
            "rosterd-20261203T023000Z",
            "rosterd-20261204T023000Z",
        ];
        made(dir.path(), &all);
        let d = |n: &str| dir.path().join(n);
        let removed = prune(dir.path(), 2, &d(all[3]), Path::new("/nowhere")).unwrap();
        assert_eq!(names(&removed), &all[..2]);
        assert_eq!(names(&list(dir.path()).unwrap()), &all[2..]);

        // Written with a clock a day behind.
        made(dir.path(), &["rosterd-20261130T023000Z"]);
        let removed = prune(
            dir.path(),
            2,
            &d("rosterd-20261130T023000Z"),
            Path::new("/nowhere"),
        )
        .unwrap();
        assert_eq!(names(&removed), [all[2]]);
        assert_eq!(
            names(&list(dir.path()).unwrap()),
            ["rosterd-20261130T023000Z", all[3]]
        );

        // A daemon run on one of them (which the config check refuses) keeps it.
        let removed = prune(dir.path(), 1, &d(all[3]), &d("rosterd-20261130T023000Z")).unwrap();
        assert!(removed.is_empty(), "{removed:?}");
    }

    /// A success clears the last failure (still counted), which a check of `last_error`
    /// would otherwise show until a restart.
    #[tokio::test]
    async fn a_backup_written_after_a_failure_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("data")).unwrap();
        let mut backups = Backups::new(Plan {
            dir: dir.path().join("data-backups"),
            keep: 2,
            keep_free_mb: Some(u64::MAX / MIB),
        });
        let stop = tokio_util::sync::CancellationToken::new();
        let e = backups.run(&store, "test", &stop).await.unwrap_err();
        assert!(matches!(e, BackupError::LowSpace { .. }), "{e}");
        let s = backups.state();
        assert_eq!((s.failed, s.written), (1, 0));
        assert!(s.last_error.unwrap().starts_with("not started"));
        backups.plan.keep_free_mb = Some(0);
        backups.run(&store, "test", &stop).await.unwrap();
        let s = backups.state();
        assert_eq!((s.failed, s.written), (1, 1));
        assert!(s.last_error.is_none() && s.last_error_at.is_none());
        backups.idle().await;
    }
}
