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
}

/// What a backup run wrote and removed.
#[derive(Debug)]
pub struct Written {
    pub backup: BackedUp,
    /// Older backups removed to keep `keep`.
    pub removed: Vec<PathBuf>,
}

impl Written {
    /// One line for the log, `/status` and the CLI.
    pub fn summary(&self) -> String {
        format!(
            "{}: {} keys, {:.1} MiB in {:.1} s (writers held at most {} ms){}",
            self.backup.path.display(),
            self.backup.keys,
            self.backup.bytes as f64 / 1_048_576.0,
            self.backup.took.as_secs_f64(),
            self.backup.longest_hold.as_millis(),
            match self.removed.len() {
                0 => String::new(),
                n => format!("; {n} older removed"),
            }
        )
    }
}

/// Write a backup of `store` into `dir`, named for `now`, then remove the oldest beyond
/// `keep`. Blocking: it reads the whole store. Given up, leaving nothing, once `stopped`.
pub fn write(
    store: &Store,
    dir: &Path,
    keep: usize,
    now: DateTime<Utc>,
    stopped: &dyn Fn() -> bool,
) -> Result<Written, BackupError> {
    let at_dir = |source| BackupError::Dir {
        path: dir.to_owned(),
        source,
    };
    Store::create_private_dir(dir).map_err(at_dir)?;
    let stem = format!("{PREFIX}{}", now.format(TIME_FORMAT));
    // Two in one second (a signal right after the schedule): the second gets a suffix,
    // which sorts after the first.
    let mut to = dir.join(&stem);
    let mut n = 1;
    while to.exists() {
        to = dir.join(format!("{stem}-{n}"));
        n += 1;
    }
    let backup = store.backup(&to, stopped)?;
    let removed = prune(dir, keep).map_err(at_dir)?;
    Ok(Written { backup, removed })
}

/// The whole backups in `dir`, oldest first.
pub fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if time_of(&name).is_some() && entry.file_type()?.is_dir() {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

/// The time a backup's name gives; `None` for anything that is not a whole backup (a
/// `.partial` one, a file of the operator's).
fn time_of(name: &str) -> Option<DateTime<Utc>> {
    let rest = name.strip_prefix(PREFIX)?;
    if rest.ends_with(".partial") {
        return None;
    }
    let stamp = rest.get(..16)?;
    let suffix = &rest[16..];
    if !(suffix.is_empty()
        || suffix
            .strip_prefix('-')
            .is_some_and(|n| n.parse::<u32>().is_ok()))
    {
        return None;
    }
    chrono::NaiveDateTime::parse_from_str(stamp, TIME_FORMAT)
        .ok()
        .map(|t| t.and_utc())
}

/// Remove the oldest backups beyond `keep`, and what an interrupted backup left.
fn prune(dir: &Path, keep: usize) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let all = list(dir)?;
    for old in &all[..all.len().saturating_sub(keep)] {
        std::fs::remove_dir_all(old)?;
        removed.push(old.clone());
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(PREFIX) && name.ends_with(".partial") {
            std::fs::remove_dir_all(&path)?;
        }
    }
    Ok(removed)
}

/// The newest whole backup in `dir` and its time.
pub fn newest(dir: &Path) -> Option<(PathBuf, DateTime<Utc>)> {
    let newest = list(dir).ok()?.pop()?;
    let at = time_of(&newest.file_name()?.to_string_lossy())?;
    Some((newest, at))
}

/// The daemon's backups: one at a time, and what the last ones did, for `/status` and
/// `/metrics`.
pub struct Backups {
    pub dir: PathBuf,
    pub keep: usize,
    state: Mutex<BackupState>,
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
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// Backups written and failed since the start.
    pub written: u64,
    pub failed: u64,
}

impl Backups {
    /// Knows the newest backup already in `dir`, so that `/status` and a missed
    /// schedule's catch-up see it after a restart.
    pub fn new(dir: PathBuf, keep: usize) -> Backups {
        let mut state = BackupState::default();
        if let Some((path, at)) = newest(&dir) {
            state.last_success_at = Some(at);
            state.last_path = Some(path);
        }
        Backups {
            dir,
            keep,
            state: Mutex::new(state),
        }
    }

    pub fn state(&self) -> BackupState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
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
        }
        tracing::info!(by, dir = %self.dir.display(), "Writing a backup of the store.");
        let (store2, dir, keep) = (store.clone(), self.dir.clone(), self.keep);
        let stop = stop.clone();
        let span = tracing::Span::current();
        let written = tokio::task::spawn_blocking(move || {
            span.in_scope(|| write(&store2, &dir, keep, now, &|| stop.is_cancelled()))
        })
        .await
        .unwrap_or_else(|e| Err(BackupError::Store(StoreError::from_join(e))));
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.running_since = None;
        match &written {
            Ok(w) => {
                tracing::info!(by, result = %w.summary(), "Backup written.");
                s.last_success_at = Some(now);
                s.last_path = Some(w.backup.path.clone());
                s.last_bytes = Some(w.backup.bytes);
                s.last_keys = Some(w.backup.keys);
                s.last_seconds = Some(w.backup.took.as_secs_f64());
                s.last_longest_hold_ms = Some(w.backup.longest_hold.as_millis() as u64);
                s.written += 1;
            }
            Err(e) => {
                tracing::error!(by, error = %e, "Backup failed.");
                s.last_error = Some(e.to_string());
                s.last_error_at = Some(now);
                s.failed += 1;
            }
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_backups_are_listed_and_pruned_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "rosterd-20261201T023000Z",
            "rosterd-20261203T023000Z",
            "rosterd-20261202T023000Z",
            "rosterd-20261203T023000Z-1",
            "rosterd-20261204T023000Z.partial",
            "rosterd-notatime",
            "mine",
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        std::fs::write(dir.path().join("rosterd-20261130T000000Z"), b"a file").unwrap();
        let names = |v: Vec<PathBuf>| -> Vec<String> {
            v.iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names(list(dir.path()).unwrap()),
            [
                "rosterd-20261201T023000Z",
                "rosterd-20261202T023000Z",
                "rosterd-20261203T023000Z",
                "rosterd-20261203T023000Z-1"
            ]
        );
        let (path, at) = newest(dir.path()).unwrap();
        assert!(path.ends_with("rosterd-20261203T023000Z-1"));
        assert_eq!(crate::dispatch::rfc3339(at), "2026-12-03T02:30:00Z");
        let removed = prune(dir.path(), 2).unwrap();
        assert_eq!(
            names(removed),
            ["rosterd-20261201T023000Z", "rosterd-20261202T023000Z"]
        );
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "mine",
                "rosterd-20261130T000000Z",
                "rosterd-20261203T023000Z",
                "rosterd-20261203T023000Z-1",
                "rosterd-notatime"
            ]
        );
    }
}
