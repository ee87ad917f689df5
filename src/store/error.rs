//! How the store fails: [`StoreError`], the failure that leaves it unusable until a restart
//! ([`StoreFailure`]), and what a client is told of an outage.

use chrono::{DateTime, SecondsFormat, Utc};
use std::path::PathBuf;
use std::sync::Arc;

use super::open::HELD_ELSEWHERE;
use super::{SCHEMA_VERSION, roster};
use crate::scim::{ResourceKind, ScimError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind:?} {id} not found")]
    NotFound { kind: ResourceKind, id: String },
    #[error("{0}")]
    Uniqueness(String),
    #[error("version mismatch: the resource is at {current}")]
    PreconditionFailed { current: String },
    /// The caller's update function refused the change.
    #[error(transparent)]
    Rejected(#[from] ScimError),
    #[error("storage engine: {0}")]
    Backend(String),
    /// Work done for the store on a blocking thread panicked: a bug in rosterd, logged
    /// where it happened. Its own variant, so a connector restarts on it (see
    /// `dispatch::task::supervised`) where a storage failure would stop it.
    #[error("a bug: the work panicked: {0}")]
    Panicked(String),
    /// The storage engine could not read or write its files (a full disk, a read-only
    /// or failing file system). sled keeps such an error for good.
    #[error("storage engine: I/O error: {0}")]
    Io(String),
    /// An earlier I/O error left the store unusable until rosterd restarts.
    #[error(
        "the store failed at {} ({}); restart rosterd once the cause (e.g. disk space) is fixed",
        .0.at.to_rfc3339_opts(SecondsFormat::Secs, true), .0.error
    )]
    Failed(StoreFailure),
    #[error("cannot open the store in {}: {message}", dir.display())]
    Open { dir: PathBuf, message: String },
    #[error("cannot flush the store in {} at shutdown: {message}", dir.display())]
    FinalFlush { dir: PathBuf, message: String },
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    /// The storage engine read a page of its files that is damaged. A start refuses only
    /// the damage sled meets while opening; a page read later fails here, once per read.
    #[error(
        "the store's files are damaged (the storage engine read corrupted data at {0}); keep a copy of the data directory, run `rosterd store check` on the newest backup and restore the newest that checks clean"
    )]
    Damaged(String),
    #[error(
        "data directory has layout version {found}; this rosterd reads version {SCHEMA_VERSION}"
    )]
    UnknownSchema { found: u64 },
    #[error("not durable: {0}")]
    NotDurable(String),
    /// An override the tenant's state refused at the moment it would have been written.
    #[error(transparent)]
    OverrideRefused(#[from] roster::OverrideRefusal),
    /// A backup that failed or was given up; the message names its directory. Apart from
    /// `Backend` and `Io`, whose "storage engine" reads as the store's own failure.
    #[error("{0}")]
    Backup(String),
}

impl StoreError {
    /// The open failed because another process (a running daemon) holds the store.
    pub fn held_elsewhere(&self) -> bool {
        matches!(self, StoreError::Open { message, .. } if message.starts_with(HELD_ELSEWHERE))
    }

    /// A blocking task that did not finish: it panicked, or the runtime is shutting down.
    pub fn from_join(e: tokio::task::JoinError) -> StoreError {
        if e.is_panic() {
            StoreError::Panicked(crate::ops::panics::message(e.into_panic().as_ref()))
        } else {
            StoreError::Backend(format!("a blocking task was cancelled: {e}"))
        }
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(e) => StoreError::Io(e.to_string()),
            // sled's own words end in `backtrace ()`, which reached job errors, `rosterd
            // status` and the log, and named no way out.
            sled::Error::Corruption { at, .. } => StoreError::Damaged(match at {
                Some(sled::DiskPtr::Inline(offset)) => format!("file offset {offset}"),
                Some(sled::DiskPtr::Blob(offset, blob)) => {
                    format!("file offset {offset} (blob {blob})")
                }
                None => "an unknown place".to_owned(),
            }),
            e => StoreError::Backend(e.to_string()),
        }
    }
}

impl StoreError {
    /// What a client is told when the store itself failed (a full disk, a failed flush,
    /// a store already marked failed): only what is known of its request, and to come
    /// back later. `None` for every other error. The SCIM and Roster API faces both
    /// answer these with 503 and [`OUTAGE_RETRY_AFTER_SECS`].
    pub fn outage_message(&self) -> Option<&'static str> {
        match self {
            // Refused before anything was applied.
            StoreError::Failed(_) => Some(
                "the store has failed and takes no changes until rosterd is restarted; nothing was applied; retry after the operator has fixed the store",
            ),
            // The write reached the engine, whose flush then failed: it may be visible
            // now, and may or may not survive the restart.
            StoreError::NotDurable(_) => Some(
                "the store failed while saving; the change may or may not have been saved; retry after the operator has fixed the store",
            ),
            // Reads meet it too (the engine keeps an I/O error for good).
            StoreError::Io(_) => Some(
                "the store cannot read or write its files (see /readyz and the rosterd log); retry after the operator has fixed it; a change this request made may or may not have been saved",
            ),
            _ => None,
        }
    }
}

/// How long a client should wait before retrying after a store outage: long enough for
/// an operator to be paged, short enough that a fixed store is used again soon.
pub const OUTAGE_RETRY_AFTER_SECS: &str = "120";

/// What a client is told of any other failure of the store: the cause is in the log, and
/// the request's outcome is not known.
pub const INTERNAL_ERROR_MESSAGE: &str = "internal error (see the rosterd log); a change in this request may or may not have been applied";

/// The unrecoverable storage error the store hit, and when.
#[derive(Debug, Clone)]
pub struct StoreFailure {
    pub error: Arc<str>,
    pub at: DateTime<Utc>,
}

pub type StoreResult<T> = Result<T, StoreError>;
