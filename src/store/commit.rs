//! Group commit: one flusher thread makes every write that was applied before a flush
//! started durable with that single flush.
//!
//! sled's `flush_async()` collapses under concurrent writers (measured under 1 write/s with
//! 16 writers), while a blocking `flush()` on a dedicated thread keeps up. A writer applies
//! its batch, takes a ticket, and waits until the flusher reports a flush that began after
//! the ticket was issued.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use tokio::sync::watch;

use super::StoreFailure;

/// What the flusher has made durable so far.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every ticket up to this one is on disk.
    durable: u64,
    /// Tickets above `durable` and up to this one were covered by a failed flush.
    failed_upto: u64,
    error: Option<Arc<str>>,
}

#[derive(Default)]
struct Requests {
    issued: u64,
    stop: bool,
}

struct Shared {
    requests: Mutex<Requests>,
    wake: Condvar,
    /// Set once, by the first unrecoverable storage error: sled keeps an I/O error for
    /// good, so every later write would fail too until the process restarts.
    failed: watch::Sender<Option<StoreFailure>>,
}

pub(crate) struct GroupCommit {
    shared: Arc<Shared>,
    progress: watch::Receiver<Progress>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A flush that could not complete; the writes it covered are not known to be durable.
#[derive(Debug, Clone)]
pub(crate) struct FlushFailed(pub Arc<str>);

impl GroupCommit {
    pub(crate) fn start(db: sled::Db, dir: PathBuf) -> std::io::Result<GroupCommit> {
        let shared = Arc::new(Shared {
            requests: Mutex::new(Requests::default()),
            wake: Condvar::new(),
            failed: watch::Sender::new(None),
        });
        let (tx, rx) = watch::channel(Progress::default());
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rosterd-flusher".into())
            .spawn(move || flusher(db, dir, thread_shared, tx))?;
        Ok(GroupCommit {
            shared,
            progress: rx,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Take a ticket for writes already applied to the tree. Must be called after the
    /// write, so that the flush serving this ticket starts after it.
    pub(crate) fn ticket(&self) -> u64 {
        let mut r = lock(&self.shared.requests);
        r.issued += 1;
        self.shared.wake.notify_one();
        r.issued
    }

    /// The newest ticket, when some ticket is not yet durable: a reader that saw state
    /// written under one of them must wait for it before telling anyone it holds.
    pub(crate) fn unflushed(&self) -> Option<u64> {
        let issued = lock(&self.shared.requests).issued;
        (self.progress.borrow().durable < issued).then_some(issued)
    }

    /// Wait until the ticket's writes are on disk.
    pub(crate) async fn wait(&self, ticket: u64) -> Result<(), FlushFailed> {
        let mut rx = self.progress.clone();
        let p = rx
            .wait_for(|p| p.durable >= ticket || p.failed_upto >= ticket)
            .await
            .map_err(|_| FlushFailed("the flusher has stopped".into()))?
            .clone();
        if p.durable >= ticket {
            Ok(())
        } else {
            Err(FlushFailed(
                p.error.unwrap_or_else(|| "flush failed".into()),
            ))
        }
    }

    /// Blocking variant for callers outside the async runtime (the CLI, shutdown).
    pub(crate) fn wait_blocking(&self, ticket: u64) -> Result<(), FlushFailed> {
        let mut rx = self.progress.clone();
        loop {
            {
                let p = rx.borrow_and_update();
                if p.durable >= ticket {
                    return Ok(());
                }
                if p.failed_upto >= ticket {
                    return Err(FlushFailed(
                        p.error.clone().unwrap_or_else(|| "flush failed".into()),
                    ));
                }
            }
            // Stopped (an earlier close): nothing will serve the ticket.
            if rx.has_changed().is_err() {
                return Err(FlushFailed("the flusher has stopped".into()));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Record that the storage engine failed for good; the first failure is kept.
    pub(crate) fn fail(&self, error: &str) {
        mark_failed(&self.shared, error);
    }

    pub(crate) fn failure(&self) -> Option<StoreFailure> {
        self.shared.failed.borrow().clone()
    }

    pub(crate) fn watch_failure(&self) -> watch::Receiver<Option<StoreFailure>> {
        self.shared.failed.subscribe()
    }

    /// Stop the flusher after it has served every ticket issued so far.
    pub(crate) fn stop(&self) {
        lock(&self.shared.requests).stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the counters
    // inside are still consistent because every update is a single assignment.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn mark_failed(shared: &Shared, error: &str) {
    let first = shared.failed.send_if_modified(|f| {
        if f.is_some() {
            return false;
        }
        *f = Some(StoreFailure {
            error: error.into(),
            at: chrono::Utc::now(),
        });
        true
    });
    if first {
        tracing::error!(
            error,
            "The store failed: writes are refused from now on, because the storage engine keeps this error until rosterd restarts. Restart rosterd once the cause (e.g. disk space) is fixed; rosterd exits by itself once the data directory is writable again, so that its service manager restarts it."
        );
    }
}

/// Test hook (integration tests boot a whole daemon and cannot fill a disk on demand):
/// the next flush of the store in this directory fails as a full disk would. Only the
/// flush's result is replaced; what follows is the production path.
pub fn fail_next_flush_in(dir: &Path) {
    lock(&INJECTED).push(dir.to_owned());
    ANY_INJECTED.store(true, Ordering::SeqCst);
}

static INJECTED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static ANY_INJECTED: AtomicBool = AtomicBool::new(false);

fn take_injected(dir: &Path) -> bool {
    if !ANY_INJECTED.load(Ordering::Relaxed) {
        return false;
    }
    let mut dirs = lock(&INJECTED);
    let before = dirs.len();
    dirs.retain(|d| d != dir);
    dirs.len() != before
}

fn flusher(db: sled::Db, dir: PathBuf, shared: Arc<Shared>, tx: watch::Sender<Progress>) {
    let mut durable = 0u64;
    loop {
        let target = {
            let mut r = lock(&shared.requests);
            while r.issued == durable && !r.stop {
                r = shared.wake.wait(r).unwrap_or_else(|e| e.into_inner());
            }
            if r.issued == durable && r.stop {
                return;
            }
            r.issued
        };
        let started = std::time::Instant::now();
        let flushed = if take_injected(&dir) {
            Err(sled::Error::Io(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "No space left on device (injected by a test)",
            )))
        } else {
            db.flush()
        };
        match flushed {
            Ok(_) => {
                durable = target;
                tx.send_modify(|p| p.durable = target);
                crate::store::record_flush(started.elapsed());
            }
            Err(e) => {
                let msg: Arc<str> = e.to_string().into();
                mark_failed(&shared, &msg);
                // Answer these tickets and keep serving later ones, so no writer waits
                // forever; the store refuses new writes once it is marked failed.
                durable = target;
                tx.send_modify(|p| {
                    p.failed_upto = target;
                    p.error = Some(msg);
                });
            }
        }
    }
}
