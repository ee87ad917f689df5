//! Whether the daemon that last served this store stopped cleanly.
//!
//! A daemon writes a file into the data directory when it starts serving and removes it
//! once the store closed cleanly; a start that finds one knows the last run was killed
//! (`kill -9`, the OOM killer, systemd's stop timeout), crashed or lost its machine. A
//! start after that logged as any other did, and the operator had only the journal to
//! tell the two apart. A file beside sled's, not a key in it: an online backup copies
//! the keys, and a store restored from it would say a run it never had ended badly.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::Store;

const RUN_FILE: &str = ".rosterd-running";

/// What a running daemon records of itself in the data directory; read at the next start,
/// the run that did not stop cleanly. A file that no longer reads gives `None`s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub pid: Option<u32>,
    pub started_at: Option<String>,
    /// Rewritten every minute: the run ended within a minute of it.
    #[serde(default)]
    pub alive_at: Option<String>,
    pub version: Option<String>,
}

impl RunRecord {
    /// This process, started at `started_at`.
    pub fn this_process(started_at: &str) -> RunRecord {
        RunRecord {
            pid: Some(std::process::id()),
            started_at: Some(started_at.to_owned()),
            alive_at: Some(started_at.to_owned()),
            version: Some(crate::VERSION.to_owned()),
        }
    }
}

/// Whether a daemon serves the store in `dir` now: its run file names a live process.
/// A store command holds the store's lock too, and was taken for a daemon ("ask it with
/// SIGUSR1", with no daemon to ask).
pub fn daemon_serving(dir: &Path) -> bool {
    let Ok(bytes) = std::fs::read(dir.join(RUN_FILE)) else {
        return false;
    };
    let record: RunRecord = serde_json::from_slice(&bytes).unwrap_or_default();
    record.pid.is_some_and(|pid| {
        let Ok(pid) = i32::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        alive || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    })
}

impl Store {
    fn run_file(&self) -> PathBuf {
        self.dir().join(RUN_FILE)
    }

    /// The run before this one on the store, if it did not stop cleanly.
    pub fn unclean_run(&self) -> std::io::Result<Option<RunRecord>> {
        let path = self.run_file();
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).unwrap_or_default())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(at(&path, e)),
        }
    }

    /// Record that `run` serves this store (in place of the run before), or that it is
    /// still alive.
    pub fn record_run(&self, run: &RunRecord) -> std::io::Result<()> {
        write_synced(
            &self.run_file(),
            &serde_json::to_vec(run).unwrap_or_default(),
        )
    }

    /// The store closed cleanly: the next start need not say otherwise.
    pub fn end_run(&self) -> std::io::Result<()> {
        let path = self.run_file();
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(at(&path, e)),
        }
    }
}

fn at(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Written through a temporary file and a rename: a crash while writing leaves the old
/// file or the new, never half of one.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_file_name(format!("{RUN_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(|e| at(&tmp, e))?;
    f.write_all(bytes).map_err(|e| at(&tmp, e))?;
    f.sync_all().map_err(|e| at(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| at(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_not_ended_is_found_by_the_next_and_an_ended_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.unclean_run().unwrap(), None);
        store
            .record_run(&RunRecord::this_process("2026-12-07T05:00:00Z"))
            .unwrap();
        // Killed: nothing removed the file.
        let before = store.unclean_run().unwrap().unwrap();
        assert_eq!(before.pid, Some(std::process::id()));
        assert_eq!(before.started_at.as_deref(), Some("2026-12-07T05:00:00Z"));
        let mut run = RunRecord::this_process("2026-12-07T06:00:00Z");
        store.record_run(&run).unwrap();
        run.alive_at = Some("2026-12-07T06:01:00Z".into());
        store.record_run(&run).unwrap();
        assert_eq!(store.unclean_run().unwrap().unwrap(), run);
        store.end_run().unwrap();
        assert_eq!(store.unclean_run().unwrap(), None);
        // A file that does not read is still a run that did not end.
        std::fs::write(dir.path().join(RUN_FILE), b"\0\0").unwrap();
        assert_eq!(store.unclean_run().unwrap(), Some(RunRecord::default()));
        // One that cannot be written is said, naming the file; the run before is still
        // read (the audit's directory in the temporary file's place).
        std::fs::create_dir(dir.path().join(format!("{RUN_FILE}.tmp"))).unwrap();
        let e = store
            .record_run(&RunRecord::this_process("2026-12-07T07:00:00Z"))
            .unwrap_err();
        assert!(e.to_string().contains(RUN_FILE), "{e}");
        assert!(store.unclean_run().unwrap().is_some());
    }
}
