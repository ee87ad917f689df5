//! Dispatch: every committed change reaches every configured connector, in order per
//! object, at least once.
//!
//! Each connector runs one task that follows its tenant's change log from a durable
//! cursor, reading only up to the store's durable watermark (nothing a crash could still
//! undo leaves the daemon). A batch of changes is delivered concurrently, but a change
//! waits for every earlier change of the batch that touches one of its objects (a group's
//! membership change waits for its members' own changes, so an enrollment never precedes
//! its user). The cursor moves only after the whole batch was acknowledged or set aside
//! as dead letters; a crash replays the batch, which the targets absorb because every
//! request is idempotent (PUT by stable sourcedId, DELETE tolerating 404, webhook ids
//! stable per change).
//!
//! Retrying is apart from transport: `connectors::http` says what an answer means,
//! this module waits (exponential backoff with jitter, at least `Retry-After`), pauses a
//! connector whose target keeps failing, and dead-letters what the target refused.
//!
//! Where each part is: `follow` reads the log and lets a change go once the earlier
//! changes to its objects (`keys`) are done; `send` delivers it, with retries, pauses and
//! dead letters, through the task's context (`ctx`) and the connector's live state
//! (`live`); `task` runs a connector again after a panic, and `csv_task` is the CSV
//! connector's own loop; `guard` holds a burst of deprovisioning; `reconcile` repairs
//! drift; `dispatcher` starts, reloads and stops connectors, `commands` are what an
//! operator asks of one, and `status` is what they are shown.

use std::time::Duration;

mod commands;
mod csv_task;
mod ctx;
mod dispatcher;
mod follow;
mod guard;
mod keys;
mod live;
mod reconcile;
mod send;
mod seqs;
mod status;
mod task;

pub use commands::{ReplaySent, Replayed, Retirement, Skipped};
pub use ctx::check_start;
pub use dispatcher::Dispatcher;
pub use reconcile::{
    DISABLED_NOTE, DriftItem, DriftReport, HELD_CSV_NOTE, OWN_SCHEDULE_CSV_NOTE, ReconcileMode,
};
pub use status::{ConnectorStatus, RetiredStatus, UnloadedStatus, rfc3339};

use crate::connectors::oneroster::AuthError;
use crate::connectors::webhook::SecretError;
use crate::store::StoreError;
// Named by `reconcile` as `super::…`.
use ctx::{Acked, Ctx, Target};
use send::Sent;

/// Changes read from the log per batch.
const BATCH: u64 = 1000;

/// Attempts of a reconciliation's repair: one that still fails is left for the next run.
pub(super) const REPAIR_ATTEMPTS: u32 = 5;

/// How long a stopping connector lets the changes it started finish. The connectors stop
/// side by side after the HTTP server's drain (5 s), so a stop stays within the 10 s
/// README promises.
const STOP_DRAIN: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("no connector {0:?} for this tenant")]
    UnknownConnector(String),
    #[error("connector {0:?} is not running: {1}")]
    NotRunning(String, String),
    /// Known to the store (a cursor, dead letters) but loaded from no file: what needs
    /// it running (a replay) cannot be done, what needs only the store can.
    #[error("connector {0:?} is not loaded ({1}): {2}")]
    NotLoaded(String, String, String),
    #[error("dead letter {0} not found")]
    NoSuchLetter(u64),
    #[error("connector {0:?} {1}")]
    NotRetirable(String, String),
    /// What the connector is doing now refuses the operator's request (a skip of a
    /// connector not held, a replay while held): a conflict, not an error.
    #[error("connector {0:?} {1}")]
    Refused(String, String),
    #[error("the target refused the replay: {0}")]
    ReplayFailed(String),
    /// Nothing was sent: the object cannot be expressed for this target as it stands.
    #[error(
        "nothing was sent: rosterd cannot express this object for the target: {0}; correct it at the identity provider (its next change is sent) or discard the letter"
    )]
    Unmappable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a change could not be turned into requests.
#[derive(Debug, thiserror::Error)]
enum PlanError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The change cannot be expressed for the target (or mapping it panicked): it goes
    /// to the dead letters.
    #[error("{0}")]
    Unplannable(String),
}

/// What keeps a connector from starting, found before its task runs.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A secret the file names is unset or malformed in the daemon's environment.
    #[error("{0}")]
    Environment(String),
    #[error("{0}")]
    Config(String),
}

impl StartError {
    /// The error with what to do about it, for the log and `/status`.
    pub fn explained(&self) -> String {
        match self {
            // The process's environment is fixed when it starts (systemd reads
            // EnvironmentFile then), so a reload can never see a variable set since.
            StartError::Environment(e) => format!(
                "{e}; rosterd reads its environment only when it starts, so a variable set or changed since needs a restart (systemctl restart rosterd), not a reload"
            ),
            StartError::Config(e) => e.clone(),
        }
    }
}

impl From<SecretError> for StartError {
    fn from(e: SecretError) -> Self {
        StartError::Environment(e.to_string())
    }
}

impl From<AuthError> for StartError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unset(_) | AuthError::Blank(_) => StartError::Environment(e.to_string()),
            AuthError::Token(_) => StartError::Config(e.to_string()),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(StoreError::from_join)?
}
