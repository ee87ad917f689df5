//! Closing the store (a last flush, the export's row files sealed, the last handle let
//! go), and what a handle tells of the store: its failure, directory and size on disk.

use std::path::Path;
use std::sync::Arc;

use super::{ROWS_DIR, Store, StoreError, StoreFailure, StoreResult, Tenant, rows};

impl Store {
    /// On-disk size in bytes: sled's files and the export's row files, which at a
    /// million users are another 384 MB an operator sizing a disk needs to see.
    pub fn size_on_disk(&self) -> StoreResult<u64> {
        let dir = self.inner.dir.join(ROWS_DIR);
        let rows: u64 = match std::fs::read_dir(&dir) {
            // An entry gone between the listing and its metadata is a row file being
            // replaced by its rebuilt copy, which the listing also holds.
            Ok(entries) => entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .filter(std::fs::Metadata::is_file)
                .map(|m| m.len())
                .sum(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(rows::io(&dir, e)),
        };
        Ok(self.inner.db.size_on_disk()? + rows)
    }

    /// Flush everything and stop the flusher. Safe to call more than once.
    pub fn close(&self) -> StoreResult<()> {
        self.close_with(|| ())
    }

    /// [`Store::close`], running `between` after the last flush and before the export's
    /// row files are sealed: where a test puts a write that arrives during the close.
    pub(super) fn close_with(&self, between: impl FnOnce()) -> StoreResult<()> {
        let ticket = self.inner.commit.ticket();
        let _ = self.inner.commit.wait_blocking(ticket);
        self.inner.commit.stop();
        let tenants: Vec<Arc<Tenant>> = self
            .inner
            .tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        // Writes wait until the row files are sealed. One still in flight (a
        // reclassification's batch, a request past the drain deadline) that landed between
        // the token and the seal would be in a file vouched for, and perhaps never reach
        // the disk in the store; after the seal, its slot write unseals the file first.
        let writes: Vec<_> = tenants.iter().map(|t| t.writes()).collect();
        // Not sealed, a row file is built again at the next open: slower, never wrong.
        let sealing: Vec<&rows::RowFile> = tenants
            .iter()
            .filter_map(|t| {
                let rows = t.rows.as_ref()?;
                rows.prepare_seal(&t.tree).ok().map(|()| rows)
            })
            .collect();
        let flushed =
            self.inner.db.flush().map(drop).map_err(|e| {
                format!("{e}; changes made since the last successful flush may be lost")
            });
        between();
        if flushed.is_ok() && self.failure().is_none() {
            for rows in sealing {
                if let Err(e) = rows.seal() {
                    tracing::warn!(error = %e, "Cannot seal the export's copy of the roster records; the next start builds it again.");
                }
            }
        }
        drop(writes);
        flushed
            .and_then(|()| match self.failure() {
                Some(f) => Err(format!("the store had failed: {}", f.error)),
                None => Ok(()),
            })
            .map_err(|message| StoreError::FinalFlush {
                dir: self.inner.dir.clone(),
                message,
            })
    }

    /// Let go of a handle after [`Store::close`]. The last one is leaked instead: dropped,
    /// sled flushes again, and that flush can wait for good (sled issue #1412). Only a
    /// runtime shutting down under a stop (a test's, whose daemon task is dropped while
    /// its close runs) leaves the closing task with the last handle; the close flushed
    /// everything already, and the process is ending.
    pub fn release_after_close(self) {
        if Arc::strong_count(&self.inner) == 1 {
            std::mem::forget(self);
        }
    }

    /// The unrecoverable storage error this store hit, if any.
    pub fn failure(&self) -> Option<StoreFailure> {
        self.inner.commit.failure()
    }

    /// Changes to [`Store::failure`].
    pub fn watch_failure(&self) -> tokio::sync::watch::Receiver<Option<StoreFailure>> {
        self.inner.commit.watch_failure()
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}
