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

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{AcquireError, Semaphore, SemaphorePermit, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

mod guard;
mod reconcile;
mod seqs;

pub use reconcile::{
    DISABLED_NOTE, DriftItem, DriftReport, HELD_CSV_NOTE, OWN_SCHEDULE_CSV_NOTE, ReconcileMode,
};

use crate::config::EnvFn;
use crate::connectors::csv::{CsvError, CsvSettings};
use crate::connectors::http::{self, Outcome, Request};
use crate::connectors::oneroster::{self, AuthError, Credentials, OneRosterSettings};
use crate::connectors::webhook::{self, SecretError, Signer, WebhookSettings};
use crate::connectors::{ConnectorConfig, Kind, Loaded, Plan, Unloaded};
use crate::ops::metrics as counters;
use crate::scim::ResourceKind;
use crate::store::{ChangeEvent, DeadLetter, RefusalPause, Store, StoreError, TargetResponse};
use seqs::Seqs;

/// A stored cursor of a connector that is not loaded.
struct Held {
    cursor_name: String,
    name: String,
    file: Option<std::path::PathBuf>,
    cursor: u64,
}

/// Changes read from the log per batch.
const BATCH: u64 = 1000;

/// A read-back page is tried this many times.
const READ_ATTEMPTS: u32 = 3;
/// The longest a read waits before its next attempt: a target asking for more (a
/// `Retry-After` of an hour) ends the read, which the job reports, rather than holding
/// the tenant's job slot while nothing happens.
const READ_RETRY_MAX_WAIT: Duration = Duration::from_secs(60);

/// A reconciliation's repairs that may use all their attempts in a row, nothing delivered
/// between, before the target is asked whether it takes writes (see
/// [`Ctx::repair_gave_up`]); at least the connector's `concurrency`, since that many fail
/// together when the target goes down.
const REPAIRS_GIVEN_UP_PAUSE: u64 = 3;

/// Attempts of a reconciliation's repair: one that still fails is left for the next run.
pub(super) const REPAIR_ATTEMPTS: u32 = 5;

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
            AuthError::Unset(_) => StartError::Environment(e.to_string()),
            AuthError::Token(_) => StartError::Config(e.to_string()),
        }
    }
}

/// How a connector is doing, as `/status` and the Roster API show it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectorStatus {
    pub name: String,
    pub tenant: String,
    pub kind: &'static str,
    pub file: String,
    /// Why its file does not load now: it keeps running on the config it was started
    /// with until the file is fixed (or removed).
    pub file_error: Option<String>,
    pub enabled: bool,
    pub dry_run: bool,
    /// Running, or why not.
    pub state: String,
    pub cursor: u64,
    pub lag_events: u64,
    pub lag_seconds: f64,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// The start of the target's answer, where `last_error` quotes it.
    #[serde(skip)]
    pub last_answer: Option<String>,
    pub paused: bool,
    pub paused_until: Option<DateTime<Utc>>,
    /// Why its `[guard]` holds it, until an operator resumes it. Apart from `last_error`,
    /// which a failure of an earlier change still in flight overwrites: the hold then
    /// read as a plain pause, and "fix the target, resume" sent what the guard held.
    pub held_by_guard: Option<String>,
    /// The soonest attempt ahead of a request waiting to retry (its backoff, or the
    /// target's `Retry-After`): a long one otherwise looks like a connector doing nothing.
    pub next_retry_at: Option<DateTime<Utc>>,
    /// When a CSV connector's schedule writes its files next, while it waits for it: an
    /// operator asks this of a nightly file, whose lag otherwise only grows all day.
    pub next_write_at: Option<DateTime<Utc>>,
    pub dead_letters: u64,
    pub delivered: u64,
    pub retries: u64,
    /// Its file loaded but the connector could not start (its `state` says why): for
    /// the metrics, which count it as not loaded, since it delivers nothing.
    #[serde(skip)]
    pub not_started: bool,
}

impl ConnectorStatus {
    /// As `/status`, which takes no token, shows it: `last_error` without the target's
    /// words, which may be the user it was sent (a target echoing the body it refused).
    /// The Roster API, which takes a token of the tenant, shows them.
    pub fn without_answer(mut self) -> Self {
        if let Some(error) = &mut self.last_error {
            *error = unquoted(
                error,
                self.last_answer.as_deref(),
                &shown_by_api(&self.name),
            );
        }
        self
    }
}

/// `error` with the target's `answer` it quotes replaced by where to read it (`shown`):
/// the Roster API, which takes a token of the tenant, or the log. A target echoing the
/// body it refused puts a user's name and email in its answer, and `/status` takes no
/// token.
fn unquoted(error: &str, answer: Option<&str>, shown: &str) -> String {
    // The answer is quoted after rosterd's own words: its last occurrence is the quote,
    // where a short answer ("error") may occur in those words as well.
    match answer.and_then(|a| Some((error.rfind(a)?, a.len()))) {
        Some((at, len)) => format!(
            "{}[the target's answer: {shown}]{}",
            &error[..at],
            &error[at + len..]
        ),
        None => error.to_owned(),
    }
}

/// Where a connector's last answer from its target is shown to those with a token.
fn shown_by_api(connector: &str) -> String {
    format!("GET /api/v1/roster/connectors/{connector} shows it")
}

/// A known connector that is not loaded (its file is broken, or missing since the last
/// stop): not delivering, falling behind, holding back compaction.
#[derive(Debug, Clone, Serialize)]
pub struct UnloadedStatus {
    pub name: String,
    pub tenant: String,
    /// The file that names it but does not load; `None` when no file does.
    pub file: Option<String>,
    pub cursor: u64,
    pub lag_events: u64,
    pub lag_seconds: f64,
    pub dead_letters: u64,
}

/// A retired connector that still holds dead letters (see
/// [`Dispatcher::retired_status`]).
#[derive(Debug, Clone, Serialize)]
pub struct RetiredStatus {
    pub name: String,
    pub tenant: String,
    pub dead_letters: u64,
}

/// A time ahead (a pause's end, a retry), kept on the monotonic clock and shown on the
/// wall clock as it reads when asked. Kept as a wall-clock time, a clock stepped back a
/// day (NTP, a VM resumed) held a paused connector for that day, and showed a retry a day
/// ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline(tokio::time::Instant);

impl Deadline {
    fn after(wait: Duration) -> Self {
        Deadline(tokio::time::Instant::now() + wait)
    }

    /// On the wall clock as it reads now; None once it has passed.
    fn wall(self) -> Option<DateTime<Utc>> {
        let left = self.0.checked_duration_since(tokio::time::Instant::now())?;
        (!left.is_zero()).then(|| Utc::now() + chrono::Duration::from_std(left).unwrap_or_default())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pause {
    Until(Deadline),
    /// Until an operator's resume or a reload (the preflight failed, a webhook's 410).
    UntilResumed,
    /// Until an operator's resume, after the target refused `pause_after_refusals`
    /// requests in a row: a reload leaves it (unless the connector's file changed), and
    /// the store keeps it across a restart. Each lifted it, and the connector then set
    /// aside that many changes again before it paused again (an audit counted 141 to 244
    /// more letters at each restart).
    Refusals,
}

impl Pause {
    /// Its end on the wall clock (`DateTime::MAX_UTC` until resumed); None once it is over.
    fn until(self) -> Option<DateTime<Utc>> {
        match self {
            Pause::UntilResumed | Pause::Refusals => Some(DateTime::<Utc>::MAX_UTC),
            Pause::Until(end) => end.wall(),
        }
    }
}

#[derive(Default)]
struct Health {
    state: String,
    last_success_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    last_error_at: Option<DateTime<Utc>>,
    /// The start of the target's answer as `last_error` quotes it. `/status` needs no
    /// token, and a target that echoes what it was sent put a user's name, email and
    /// phone there for anyone who could reach the port; it shows the error without it.
    last_answer: Option<String>,
    pause: Option<Pause>,
    /// A pause was logged and its end not yet: the end is logged once, by whichever
    /// request loop notices it first.
    pause_logged: bool,
    /// The pause came from one object's failures alone (no second request had failed):
    /// its end starts the count afresh, so that object cannot pause the connector again
    /// with its next failure before the others had their turn.
    pause_lone: bool,
    /// The soonest attempt ahead of a request waiting to retry.
    next_retry: Option<Deadline>,
    /// The scheduled write a CSV connector waits for.
    next_write_at: Option<DateTime<Utc>>,
    /// Why, and since when, the connector is paused for its target's refusals (with
    /// `Pause::Refusals`).
    refusal_pause: Option<RefusalPause>,
}

impl Health {
    /// Record an error with its time: `rosterd status` shows when it happened.
    fn error(&mut self, reason: String) {
        self.last_error = Some(reason);
        self.last_error_at = Some(Utc::now());
        self.last_answer = None;
    }

    /// Record an error that quotes `answer`, the start of what the target said (as
    /// [`http::brief_answer`] gives it).
    fn error_quoting(&mut self, reason: String, answer: Option<String>) {
        self.error(reason);
        self.last_answer = answer;
    }

    fn clear_error(&mut self) {
        self.last_error = None;
        self.last_error_at = None;
        self.last_answer = None;
    }
}

/// A time as the log and `rosterd status` show it: RFC 3339, to the second.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// One request's run of failed attempts, counted from the last time the connector's
/// run of failures ended (a success, a resume).
#[derive(Default)]
struct Streak {
    epoch: u64,
    failures: u64,
}

/// Shared, live state of one connector.
struct Live {
    tenant: String,
    name: String,
    health: Mutex<Health>,
    /// Failures in a row, in rounds: the longest run of failed attempts of any one
    /// request since the run began. Requests in flight together fail and retry side by
    /// side, so their n-th failures are one round, however many there are and however
    /// their jittered retries interleave; counting each failure would pause a connector
    /// with `concurrency` 16 after about one round.
    failures_in_a_row: AtomicU64,
    /// Requests the target refused in a row, with no change taken whole between them
    /// (see `retry.pause_after_refusals`).
    refusals_in_a_row: AtomicU64,
    /// A reconciliation's repairs that used all their attempts, in a row, with nothing
    /// delivered between (see [`Live::repair_gave_up`]).
    repairs_given_up: AtomicU64,
    /// Bumped when the run of failures ends, so that requests still retrying start
    /// their own runs over.
    epoch: AtomicU64,
    delivered: AtomicU64,
    retries: AtomicU64,
    /// Requests that failed since the run of failures began (the epoch): two or more,
    /// with nothing acknowledged in between, say the target is failing, not one object.
    failing_requests: AtomicU64,
    /// Wakes request loops waiting out a pause or a backoff when a pause begins or is
    /// lifted (a resume, a reload).
    pause_changed: tokio::sync::Notify,
    /// Wakes request loops waiting out a pause, not a backoff, when an acknowledgement
    /// ends the pause (see [`Live::success`]).
    pause_over: tokio::sync::Notify,
    /// Requests waiting out a pause now ([`Live::wait_unpaused`]).
    waiting_out_pause: AtomicU64,
    /// Held by its `[guard]`, and why: only an operator's resume lets it go, not a
    /// reload. Not a pause: the changes sent before the one held go on, and only the
    /// reading stops; status shows it as a pause until resumed.
    held: Mutex<Option<String>>,
    /// The operator's resumes of a hold, which the held connector waits for.
    approvals: watch::Sender<Approval>,
    /// The last approval the connector has carried out, and through which change.
    applied: watch::Sender<(u64, u64)>,
    /// Dead letters an operator's replay is sending now: another replay of one of them
    /// (a CLI run again while the call it gave up on goes on) is refused, not sent twice.
    replaying: Mutex<std::collections::HashSet<u64>>,
    /// Set before a reload stops it for good (its file removed, or naming another
    /// connector): what its stop leaves unsent has no next start to go out at.
    retiring: AtomicBool,
}

/// A dead letter claimed for one replay until dropped (see [`Live::replaying`]).
struct ReplayClaim<'a> {
    live: &'a Live,
    id: u64,
}

impl Drop for ReplayClaim<'_> {
    fn drop(&mut self) {
        self.live.replaying().remove(&self.id);
    }
}

/// The operator's word on a hold: the `n`-th, and whether to skip what is held instead
/// of sending it.
#[derive(Debug, Clone, Copy, Default)]
struct Approval {
    n: u64,
    skip: bool,
}

impl Live {
    fn new(tenant: &str, name: &str, state: &str) -> Arc<Live> {
        Arc::new(Live {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            health: Mutex::new(Health {
                state: state.to_owned(),
                ..Health::default()
            }),
            failures_in_a_row: AtomicU64::new(0),
            refusals_in_a_row: AtomicU64::new(0),
            repairs_given_up: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            failing_requests: AtomicU64::new(0),
            pause_changed: tokio::sync::Notify::new(),
            pause_over: tokio::sync::Notify::new(),
            waiting_out_pause: AtomicU64::new(0),
            held: Mutex::new(None),
            approvals: watch::Sender::new(Approval::default()),
            applied: watch::Sender::new((0, 0)),
            replaying: Mutex::new(Default::default()),
            retiring: AtomicBool::new(false),
        })
    }

    fn replaying(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u64>> {
        self.replaying.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Letter `id` for this replay alone; None while another replay sends it.
    fn claim_replay(&self, id: u64) -> Option<ReplayClaim<'_>> {
        // Not `then_some`: its claim, built and dropped when the letter is taken, would
        // give back the other replay's claim (and lock the set it is locked in).
        let free = self.replaying().insert(id);
        free.then(|| ReplayClaim { live: self, id })
    }

    fn held_reason(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Held by its `[guard]` until the operator resumes it.
    fn hold(&self, reason: &str) {
        let already = self.held_reason().replace(reason.to_owned()).is_some();
        self.health().error(reason.to_owned());
        if !already {
            tracing::error!(
                reason,
                "Connector held by its [guard] until resumed (`rosterd resume`); a reload lifts it only by changing the [guard]."
            );
        }
    }

    fn held(&self) -> bool {
        self.held_reason().is_some()
    }

    /// The operator's resume: a hold lets its changes go, or (`skip`) skips them. The
    /// approval's number, when there was a hold.
    fn approve(&self, skip: bool) -> Option<u64> {
        let reason = self.held_reason().take()?;
        // Resumed, the hold is no longer the connector's last word ("… resume sends
        // them" read as advice still to follow).
        let mut h = self.health();
        if h.last_error.as_deref() == Some(reason.as_str()) {
            h.clear_error();
        }
        drop(h);
        tracing::info!(tenant = %self.tenant, connector = %self.name, held = reason.as_str(), skip, "The operator lets go the changes the guard held.");
        let mut n = 0;
        self.approvals.send_modify(|a| {
            a.n += 1;
            a.skip = skip;
            n = a.n;
        });
        Some(n)
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, s: &str) {
        self.health().state = s.to_owned();
    }

    fn success(&self) {
        self.count_delivery();
        self.repairs_given_up.store(0, Ordering::Release);
        let rounds = self.failures_in_a_row.swap(0, Ordering::AcqRel);
        if rounds > 0 {
            self.epoch.fetch_add(1, Ordering::AcqRel);
            self.failing_requests.store(0, Ordering::Release);
            let mut h = self.health();
            // Only a timed pause: one request taken says nothing of the rest after
            // refusals, and a pause until resumed (a webhook's 410, a failed preflight)
            // is the operator's to lift. Any acknowledgement of a request already in
            // flight lifted it, and the connector went on sending to an endpoint that
            // had said it was gone.
            let paused = h.pause.take_if(|p| matches!(p, Pause::Until(_))).is_some();
            let still_paused = h.pause.is_some();
            h.pause_logged = false;
            drop(h);
            // The requests the pause stopped go now: left asleep, they waited for its
            // old end (30 s in an audit) while status said the connector was not paused,
            // and `rosterd resume` that there was nothing to lift. This happens when a
            // round's first answer is one object's failure that pauses the connector and
            // the others' acknowledgements follow.
            if paused {
                self.pause_over.notify_waiters();
            }
            // Requests still waiting out their backoff are not woken: one object's
            // success says nothing of another's failure, and a Retry-After stands.
            if still_paused {
                // "Recovered" read as if the pause had ended.
                tracing::info!(
                    failures = rounds,
                    "A request already in flight was acknowledged; the connector stays paused until resumed."
                );
            } else {
                tracing::info!(
                    failures = rounds,
                    "The target acknowledges again; the connector recovered."
                );
            }
        }
    }

    /// Requests delivered, retries and the last success, as status shows them.
    fn counts(&self) -> Counted {
        Counted {
            delivered: self.delivered.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            last_success_at: self.health().last_success_at,
        }
    }

    /// Go on from the counts of the run before (see [`Live::counts`]). The last success
    /// too: cleared by a reload, it read "never" beside a count of deliveries, for as long
    /// as a quiet connector sent nothing.
    fn count_on_from(&self, before: Counted) {
        self.delivered
            .fetch_add(before.delivered, Ordering::Relaxed);
        self.retries.fetch_add(before.retries, Ordering::Relaxed);
        let mut h = self.health();
        h.last_success_at = h.last_success_at.max(before.last_success_at);
    }

    /// A delivery, counted and dated. All an operator's replay that got through is (the
    /// metric counts it too): not a sign that the target recovered, since its failures
    /// leave the streak and any pause alone, and so does its success.
    fn count_delivery(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.health().last_success_at = Some(Utc::now());
    }

    /// A write of a CSV connector's files made apart from its own loop (the `export`
    /// schedule, a reconciliation) failed: shown and counted as the loop's failures are,
    /// without a retry of its own (the next run is the retry) or a pause.
    pub(super) fn write_failed(&self, reason: &str) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        self.health().error(reason.to_owned());
    }

    /// Record a failed attempt of the request whose run is `streak`; pause the
    /// connector once failures in a row reach the limit. The first failure of each
    /// round is logged, so an outage shows before the pause without a line per request.
    fn failure(
        &self,
        streak: &mut Streak,
        reason: &str,
        answer: Option<String>,
        pause_after: u64,
        pause: Duration,
    ) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        let epoch = self.epoch.load(Ordering::Acquire);
        if streak.epoch != epoch {
            *streak = Streak { epoch, failures: 0 };
        }
        streak.failures += 1;
        if streak.failures == 1 {
            self.failing_requests.fetch_add(1, Ordering::AcqRel);
        }
        let before = self
            .failures_in_a_row
            .fetch_max(streak.failures, Ordering::AcqRel);
        let n = before.max(streak.failures);
        let mut h = self.health();
        h.error_quoting(reason.to_owned(), answer);
        if n >= pause_after && h.pause.and_then(Pause::until).is_none() {
            h.pause = Some(Pause::Until(Deadline::after(pause)));
            h.pause_lone = self.failing_requests.load(Ordering::Acquire) < 2;
            let until = Utc::now() + chrono::Duration::from_std(pause).unwrap_or_default();
            h.pause_logged = true;
            drop(h);
            self.pause_changed.notify_waiters();
            tracing::warn!(failures = n, until = %rfc3339(until), reason, "Target keeps failing; connector paused.");
        } else if streak.failures > before && h.pause.is_none() {
            // Under a pause (another request's failure set it a moment ago) this one
            // waits for the pause, which its own line announced: "retrying" would say
            // otherwise.
            drop(h);
            tracing::warn!(
                failures = n,
                pause_after,
                reason,
                "Target failed; retrying."
            );
        }
    }

    /// A reconciliation's repairs given up are counted afresh (see
    /// [`Live::repair_gave_up`]): as a run begins to send (carried over, a run's count
    /// made the next run's first failures pause the connector), and once the target took
    /// a write after `limit` of them failed in a row (they were their objects' own
    /// failures).
    fn count_repairs_afresh(&self) {
        self.repairs_given_up.store(0, Ordering::Release);
    }

    /// A reconciliation's repair used all its attempts, while the target delivered
    /// nothing (the deliveries counted `delivered` when it began): whether it is the
    /// `limit`-th in a row, when the target should be asked whether it takes writes at
    /// all (see [`Ctx::takes_writes`]). A repair's attempts alone never reach
    /// `pause_after_failures` (5 against 20 by default), so against a dead target with no
    /// SCIM traffic a run tried every object five times: about 0.24 s an object at the
    /// default backoff, days for a large tenant, holding the tenant's job slot
    /// (overrides answer 409) all along. A repair that failed while the target took
    /// others is its object's own, and does not count.
    fn repair_gave_up(&self, delivered: u64, limit: u64) -> bool {
        if self.delivered.load(Ordering::Acquire) != delivered {
            return false;
        }
        self.repairs_given_up.fetch_add(1, Ordering::AcqRel) + 1 == limit
    }

    /// The target took no write after a reconciliation's repairs failed in a row: the
    /// connector pauses as for the mirror's failures, and the run stops at the pause.
    fn pause_for_repairs(&self, repairs: u64, pause: Duration, reason: &str) {
        self.repairs_given_up.store(0, Ordering::Release);
        let mut h = self.health();
        // A pause that ran out is no pause: the run after it must pause again.
        if h.pause.and_then(Pause::until).is_some() {
            return;
        }
        h.pause = Some(Pause::Until(Deadline::after(pause)));
        h.pause_lone = false;
        h.pause_logged = true;
        drop(h);
        // So that the next delivery lifts it, though one may have ended the run of
        // failures while the target was asked.
        self.failures_in_a_row.fetch_max(1, Ordering::AcqRel);
        self.pause_changed.notify_waiters();
        let until = Utc::now() + chrono::Duration::from_std(pause).unwrap_or_default();
        tracing::warn!(repairs, until = %rfc3339(until), reason, "Target failed a reconciliation's repairs in a row, each after all its attempts, and took no write when asked; connector paused, and the reconciliation stops.");
    }

    fn pause_until_resumed(&self, reason: &str, answer: Option<String>) {
        let mut h = self.health();
        h.error_quoting(reason.to_owned(), answer);
        // Every request in flight meets the same answer (a 410): one line says it. A
        // pause for refusals stays what it is: a reload must not lift it.
        let already = matches!(h.pause, Some(Pause::UntilResumed | Pause::Refusals));
        if h.pause != Some(Pause::Refusals) {
            h.pause = Some(Pause::UntilResumed);
        }
        h.pause_logged = true;
        drop(h);
        self.pause_changed.notify_waiters();
        if !already {
            tracing::error!(
                reason,
                "Connector paused until resumed (`rosterd resume`) or reloaded."
            );
        }
    }

    /// Lift a pause and start counting failures afresh; `by` says who, for the log.
    /// Whether it was paused.
    /// Failures are counted from nothing again: a new round begins.
    fn count_afresh(&self) {
        self.failures_in_a_row.store(0, Ordering::Release);
        self.refusals_in_a_row.store(0, Ordering::Release);
        self.repairs_given_up.store(0, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.failing_requests.store(0, Ordering::Release);
    }

    /// A request the target refused, counted; `limit` of them in a row, with no change
    /// taken whole between them, pause the connector until resumed. Set here, before the
    /// refused request gives up its slot: set once its change was stored as a dead
    /// letter, the requests that took the slot meanwhile overshot the limit by up to
    /// 144 (at `concurrency` 16, against a target answering at once).
    fn refused(&self, limit: u64, reason: &str, answer: &str) {
        let n = self.refusals_in_a_row.fetch_add(1, Ordering::AcqRel) + 1;
        if limit == 0 || n < limit {
            return;
        }
        let mut h = self.health();
        if h.pause == Some(Pause::Refusals) {
            return;
        }
        let (tenant, name) = (&self.tenant, &self.name);
        // The reason names one object ("not ours to change"); the answer shows when the
        // target means all of them ("token lacks scope").
        let last = http::with_answer(reason.to_owned(), answer);
        let answer = http::brief_answer(answer);
        let why = format!(
            "the target refused {n} requests in a row and took no change between them (the last: {last}): a target that refuses everything is misconfigured, so the connector stopped. The changes it refused are dead letters; those after them wait. Fix the target, then `rosterd dead-letters --tenant {tenant} replay {name} --all` (before the resume, so that they go ahead of the changes that wait) and `rosterd resume --tenant {tenant} {name}`"
        );
        h.pause = Some(Pause::Refusals);
        h.error_quoting(why.clone(), answer.clone());
        h.refusal_pause = Some(RefusalPause {
            at: h.last_error_at.unwrap_or_else(Utc::now),
            why: why.clone(),
            answer,
        });
        h.pause_logged = true;
        drop(h);
        self.pause_changed.notify_waiters();
        tracing::error!(
            reason = why.as_str(),
            "Connector paused until resumed (`rosterd resume`): its target refuses everything."
        );
    }

    /// Why, and since when, the connector is paused for its target's refusals, if it is.
    fn refusal_pause(&self) -> Option<RefusalPause> {
        let h = self.health();
        h.refusal_pause
            .clone()
            .filter(|_| h.pause == Some(Pause::Refusals))
    }

    /// Paused for refusals as the store says it was when the connector last stopped.
    fn restore_refusal_pause(&self, pause: RefusalPause) {
        let mut h = self.health();
        h.pause = Some(Pause::Refusals);
        h.error_quoting(pause.why.clone(), pause.answer.clone());
        h.last_error_at = Some(pause.at);
        h.refusal_pause = Some(pause);
        h.pause_logged = true;
    }

    /// A change the target took whole: its refusals before were those objects' own.
    fn change_taken(&self) {
        self.refusals_in_a_row.store(0, Ordering::Release);
    }

    fn resume(&self, by: &str) -> bool {
        self.count_afresh();
        let mut h = self.health();
        let was_paused = h.pause.and_then(Pause::until).is_some();
        h.pause = None;
        // Its advice (replay, then resume) is followed now, not still to follow.
        if let Some(pause) = h.refusal_pause.take()
            && h.last_error.as_deref() == Some(pause.why.as_str())
        {
            h.clear_error();
        }
        // Woken, the waiting requests try now.
        h.next_retry = None;
        h.pause_logged = false;
        drop(h);
        if was_paused {
            tracing::info!(tenant = %self.tenant, connector = %self.name, "Connector resumed by {by}.");
        }
        self.pause_changed.notify_waiters();
        was_paused
    }

    fn paused_until(&self) -> Option<DateTime<Utc>> {
        self.health().pause.and_then(Pause::until)
    }

    /// While paused: until when, and the last error that paused it.
    fn pause_reason(&self) -> Option<String> {
        if let Some(reason) = self.held_reason().as_deref() {
            return Some(format!("the connector is paused until resumed ({reason})"));
        }
        let until = self.paused_until()?;
        let when = if until == DateTime::<Utc>::MAX_UTC {
            "until resumed".to_owned()
        } else {
            format!(
                "until {}",
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )
        };
        // A job's error, which `/status` shows in the schedules' results: without the
        // target's words (an audit saw a refused user's email there, every hour).
        let h = self.health();
        let last = unquoted(
            h.last_error.as_deref().unwrap_or_default(),
            h.last_answer.as_deref(),
            &shown_by_api(&self.name),
        );
        // A resume clears the last error it answered (a hold's), and a pause that
        // outlives it read "paused until … ()".
        if last.is_empty() {
            return Some(format!("the connector is paused {when}"));
        }
        Some(format!("the connector is paused {when} ({last})"))
    }

    /// Wait while paused. False if cancelled meanwhile.
    async fn wait_unpaused(&self, cancel: &CancellationToken) -> bool {
        struct Waiting<'a>(&'a AtomicU64);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.waiting_out_pause.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting_out_pause);
        loop {
            // Listening before looking, so a resume in between is not missed.
            let changed = self.pause_changed.notified();
            let over = self.pause_over.notified();
            tokio::pin!(changed, over);
            changed.as_mut().enable();
            over.as_mut().enable();
            let Some(until) = self.paused_until() else {
                break;
            };
            let wait = (until - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep(wait.min(Duration::from_secs(3600))) => {}
                _ = changed => {}
                _ = over => {}
            }
        }
        if cancel.is_cancelled() {
            return false;
        }
        let mut h = self.health();
        if h.pause_logged && h.pause.and_then(Pause::until).is_none() {
            h.pause_logged = false;
            let lone = std::mem::take(&mut h.pause_lone);
            drop(h);
            // Others wait too: the count starts afresh, so that they get their turn.
            if lone && self.waiting_out_pause.load(Ordering::Acquire) > 1 {
                // At `concurrency = 1` the failing object took the one slot first at
                // each pause's end and paused the connector again at once: none of the
                // others went out, pause after pause (an audit's F1-c1). With nothing
                // else waiting, its next failure pauses again, as a dead target's probe
                // does (counted afresh, it took three attempts and let the pause show
                // as over between them).
                self.count_afresh();
            }
            tracing::info!("Pause over; trying the target again.");
        }
        true
    }
}

/// Who sends a request. The mirror's own deliveries wait out a pause and count towards
/// the failures that pause it; an operator's replay tries once, now, and leaves the
/// connector's health alone: a target still refusing it is the answer the operator
/// asked for, not a reason to stall the mirror (or the next replay) for `pause_secs`.
/// A reconciliation counts towards the pause as the mirror does, but does not wait one
/// out: its job would hold the tenant's job slot, and refuse overrides with 409, for as
/// long as the target stays down.
#[derive(Clone, Copy)]
enum Sender<'c> {
    /// A request of a change the connector follows from the log, with whether the change
    /// has started (see [`Ctx::send_as`]).
    Mirror(&'c AtomicBool),
    /// A OneRoster connector's checks before it follows the log: sent as the mirror
    /// sends, but a stop cuts it at once (it belongs to no change a stop lets finish).
    Preflight,
    Reconcile,
    Operator,
}

/// What a connector sends to.
enum Target {
    OneRoster {
        settings: Box<OneRosterSettings>,
        credentials: Credentials,
    },
    Webhook {
        settings: WebhookSettings,
        signer: Signer,
    },
    Csv {
        settings: CsvSettings,
    },
}

/// What would keep `serve` from starting this connector (an unset or malformed secret),
/// checked exactly as a start does; for `check-config`.
pub fn check_start(config: &ConnectorConfig, env: &EnvFn) -> Result<(), String> {
    if !config.enabled {
        return Ok(());
    }
    Target::build(config, env)
        .map(drop)
        .map_err(|e| e.to_string())
}

impl Target {
    fn build(config: &ConnectorConfig, env: &EnvFn) -> Result<Target, StartError> {
        let env = |v: &str| env(v);
        let missing = |section: &str| StartError::Config(format!("no [{section}] section"));
        match config.kind {
            Kind::Oneroster => {
                let settings = config
                    .oneroster
                    .clone()
                    .ok_or_else(|| missing("oneroster"))?;
                let credentials = Credentials::new(&settings.auth, &env)?;
                Ok(Target::OneRoster {
                    settings: Box::new(settings),
                    credentials,
                })
            }
            Kind::Webhook => {
                let settings = config.webhook.clone().ok_or_else(|| missing("webhook"))?;
                let signer = Signer::from_env(&settings, &env)?;
                Ok(Target::Webhook { settings, signer })
            }
            Kind::Csv => Ok(Target::Csv {
                settings: config.csv.clone().ok_or_else(|| missing("csv"))?,
            }),
        }
    }
}

/// Everything a connector's task works with.
struct Ctx {
    store: Store,
    client: reqwest::Client,
    config: ConnectorConfig,
    target: Target,
    live: Arc<Live>,
    cancel: CancellationToken,
    /// Bounds requests in flight.
    slots: Semaphore,
    /// Held by the one request of a change not started yet that queues for a slot: the
    /// requests of changes already started queue behind at most that one, not behind
    /// the first requests of a whole window of changes (see [`Ctx::slot`]).
    start_gate: tokio::sync::Mutex<()>,
    /// What the connector following the log last took as acknowledged (see [`Acked`]).
    acked: Mutex<Option<Acked>>,
    /// The objects a reconciliation is repairing now.
    repairs: Repairs,
    /// Delivered-content hashes of changes finished but not written to the store yet (the
    /// follower writes them with the cursor, at most every 200 ms): a change that waited
    /// for one of them plans on them as the target now holds them. A user's enrollment
    /// owed once it can be sent is sent only where the target holds the class, and a class
    /// acknowledged a moment before looked not held (a re-audit lost it 7 times of 7).
    unsaved: Mutex<HashMap<String, Option<u64>>>,
}

/// The objects a reconciliation is repairing now, by the keys the log follower orders
/// changes by: a change of one waits for the repairs' answers (see [`Repairing`]).
/// Several at once share a key: repairs go side by side, and the enrollments of one class
/// are all under its `Group/…` key, those of one user under its `User/…` key.
#[derive(Default)]
struct Repairs(Mutex<HashMap<String, Vec<watch::Receiver<bool>>>>);

impl Repairs {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<watch::Receiver<bool>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A repair under `keys`, until the guard is dropped.
    fn begin(&self, keys: Vec<String>) -> Repairing<'_> {
        let (done, rx) = watch::channel(false);
        let mut map = self.map();
        for k in &keys {
            map.entry(k.clone()).or_default().push(rx.clone());
        }
        drop(map);
        Repairing {
            repairs: self,
            keys,
            done,
        }
    }

    /// The repairs of the object `key` under way.
    fn of(&self, key: &str) -> Vec<watch::Receiver<bool>> {
        self.map().get(key).cloned().unwrap_or_default()
    }
}

/// A reconciliation's repair of one object, from before it checks the change log for a
/// change of the object until the target answered it. The log follower reads a change
/// only once it is logged, so a change the check did not see finds this and is sent after
/// the repair: sent alongside it, a target applying requests in another order than they
/// came put the repair's older copy back (session 41: 18 of 40 titles).
pub(super) struct Repairing<'a> {
    repairs: &'a Repairs,
    keys: Vec<String>,
    done: watch::Sender<bool>,
}

impl Drop for Repairing<'_> {
    fn drop(&mut self) {
        self.done.send_replace(true);
        let mine = self.done.subscribe();
        let mut map = self.repairs.map();
        for k in &self.keys {
            if let Some(waits) = map.get_mut(k) {
                waits.retain(|r| !r.same_channel(&mine));
                if waits.is_empty() {
                    map.remove(k);
                }
            }
        }
    }
}

/// The cursor a connector following the log last saved, and every change above it that
/// was acknowledged by then, in order. The store holds only the first
/// [`MAX_ACKED_RECORDED`] of them; a reconciliation that took the rest for still
/// waiting would leave their objects unrepaired for as long as one slow object held the
/// cursor.
#[derive(Debug, Clone)]
pub(super) struct Acked {
    pub cursor: u64,
    pub above: Arc<Seqs>,
}

impl Ctx {
    /// The `[guard]` of the connector, if it has one, for a start at `cursor`.
    async fn guard_at(&self, cursor: u64) -> Result<Option<guard::Guard>, StoreError> {
        let Some(limit) = self.config.guard else {
            return Ok(None);
        };
        let (store, tenant, key) = (
            self.store.clone(),
            self.tenant().to_owned(),
            self.cursor_name(),
        );
        let kind = self.config.kind;
        blocking(move || guard::Guard::at_start(limit, kind, &store, &tenant, &key, cursor))
            .await
            .map(Some)
    }

    /// Whether the connector's `[guard]` would hold one of the changes after its cursor,
    /// up to `through`: judged from the store (what it sent before, the operator's
    /// approval), for a write beside the connector's own loop, which may not have read
    /// them yet, or not since a restart. Reads the store in the calling thread.
    pub(super) fn guard_holds_now(&self, through: u64) -> Result<Option<guard::Held>, StoreError> {
        let Some(limit) = self.config.guard else {
            return Ok(None);
        };
        let (tenant, key) = (self.tenant(), self.cursor_name());
        let mut at = self.store.cursor(tenant, &key)?;
        let mut g = guard::Guard::at_start(limit, self.config.kind, &self.store, tenant, &key, at)?;
        first_held(&self.store, tenant, self.name(), &mut g, &mut at, through)
    }

    /// The operator resumed a held connector: every change logged by now may go (or,
    /// with `skipped_after`, those after that one are skipped), and a restart remembers
    /// it. Through which change.
    async fn record_approval(
        &self,
        guard: &mut guard::Guard,
        skipped_after: Option<u64>,
    ) -> Result<u64, StoreError> {
        let through = self.store.last_seq(self.tenant())?;
        self.store
            .set_guard_approved(self.tenant(), &self.cursor_name(), through, skipped_after)
            .await?;
        guard.approve(through);
        if skipped_after.is_some() {
            tracing::warn!(
                through,
                "Held changes skipped by the operator: the changes up to this one are not sent; a reconciliation sends the target the current state of what they changed."
            );
        } else {
            tracing::info!(through, "Held changes let go by the operator's resume.");
        }
        Ok(through)
    }

    fn tenant(&self) -> &str {
        &self.config.tenant
    }

    /// Mark `object` (a delivered-content key: `User/…`, `Group/…`, `Member/g/u`) as
    /// being repaired until the guard is dropped.
    pub(super) fn repairing(&self, object: &str) -> Repairing<'_> {
        let keys: Vec<String> = match object.split('/').collect::<Vec<_>>()[..] {
            ["User" | "Group", _] => vec![object.to_owned()],
            // An enrollment is sent with its group's changes and its user's.
            ["Member", group, user] => vec![format!("Group/{group}"), format!("User/{user}")],
            // The course: no change of the log sends it.
            _ => vec![],
        };
        self.repairs.begin(keys)
    }

    /// Whether a user's deactivation or reactivation sends the classes of its groups: a
    /// OneRoster target that deletes inactive users.
    fn state_sends_classes(&self) -> bool {
        matches!(&self.target, Target::OneRoster { settings, .. }
            if settings.deactivate == oneroster::Deactivate::Delete)
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    /// What every line about this connector's work sits under: its own task, an
    /// operator's replay and a reconciliation. Lines inside name neither tenant nor
    /// connector again.
    fn span(&self) -> tracing::Span {
        tracing::info_span!("connector", connector = %self.config.name, tenant = %self.config.tenant, kind = self.config.kind.as_str())
    }

    /// The cursor's key: a dry run keeps its own, so switching it off later sends
    /// everything for real.
    fn cursor_name(&self) -> String {
        cursor_name(&self.config)
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        backoff(&self.config.retry)
    }

    fn publish_acked(&self, acked: Option<Acked>) {
        *self.acked.lock().unwrap_or_else(|e| e.into_inner()) = acked;
    }

    /// What the connector following the log last saved, when it is following it.
    fn acked(&self) -> Option<Acked> {
        self.acked.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Delays between retries: doubling from `initial_delay_ms` up to `max_delay_ms`, each
/// with jitter, never above `max_delay_ms`. backon's jitter adds up to the delay itself
/// on top of it (after its cap), so the builder is given half of each bound: a delay
/// then lies between half the nominal one and the nominal one.
fn backoff(retry: &crate::connectors::RetryConfig) -> impl Iterator<Item = Duration> + use<> {
    let max = retry.max_delay();
    ExponentialBuilder::new()
        .with_min_delay(retry.initial_delay() / 2)
        .with_max_delay(max / 2)
        .with_jitter()
        .without_max_times()
        .build()
        // backon scales by an f32; rounding must not lift a delay over the cap.
        .map(move |d| d.min(max))
}

fn cursor_name(config: &ConnectorConfig) -> String {
    if config.dry_run {
        format!("{}.dry-run", config.name)
    } else {
        config.name.clone()
    }
}

/// How one request ended.
enum Sent {
    Ok,
    Refused {
        reason: String,
        response: Option<TargetResponse>,
    },
    Cancelled,
    /// A reconciliation's repair not tried again: a change sends its object now.
    Superseded,
}

/// How one change ended.
enum Delivered {
    /// Acknowledged; these delivered-content hashes now hold.
    Done(Hashes),
    /// Set aside as a dead letter.
    DeadLettered,
    Cancelled,
}

impl Ctx {
    /// The OAuth or static credentials of a OneRoster target; None for other kinds.
    fn credentials(&self) -> Option<&Credentials> {
        match &self.target {
            Target::OneRoster { credentials, .. } => Some(credentials),
            _ => None,
        }
    }

    /// Authorization headers of one attempt.
    async fn headers(&self, req: &Request) -> Result<Vec<(&'static str, String)>, String> {
        match &self.target {
            Target::OneRoster { credentials, .. } => credentials
                .bearer(&self.client, Duration::from_millis(self.config.timeout_ms))
                .await
                .map(|b| vec![("authorization", b)])
                .map_err(|e| format!("cannot get an access token: {e}")),
            Target::Webhook { signer, .. } => Ok(match (&req.message_id, &req.body) {
                (Some(id), Some(body)) => signer.headers(id, body),
                _ => vec![],
            }),
            Target::Csv { .. } => Ok(vec![]),
        }
    }

    /// Send one request of a change until the target acknowledges or refuses it.
    /// `max_attempts` bounds retries; `None` retries until cancelled. `started` is the
    /// change's: set once one of its requests has a slot (see [`Ctx::send_as`]).
    async fn send(&self, req: &Request, max_attempts: Option<u32>, started: &AtomicBool) -> Sent {
        self.send_as(req, max_attempts, Sender::Mirror(started), None)
            .await
    }

    /// A reconciliation's repair: as the mirror sends, but refused at once while the
    /// connector is paused (see [`Sender::Reconcile`]), and tried again only while
    /// `wanted` says so: its body dates from when the run read the object, and a change
    /// the mirror sent while it waited to retry would be put back.
    async fn send_repair(
        &self,
        req: &Request,
        max_attempts: u32,
        wanted: &mut (dyn FnMut() -> bool + Send),
    ) -> Sent {
        self.send_as(req, Some(max_attempts), Sender::Reconcile, Some(wanted))
            .await
    }

    /// `f`'s output, or None once a stop comes; with `drains` (a request of a change
    /// already started, which a stop lets finish) always the output.
    async fn unless_stopped<T>(
        &self,
        drains: bool,
        f: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        if drains {
            return Some(f.await);
        }
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => None,
            v = f => Some(v),
        }
    }

    /// A slot for a mirror request. A change already started (`started`) goes ahead of
    /// those not started: queued in turn, the second event of every change in the
    /// window (1,000 changes) waited behind the first events of all the others, so
    /// hundreds of changes were half sent at any moment, and a stop that came then left
    /// them half sent, to be sent again whole after it (a SIGTERM whose HTTP drain ran
    /// its 5 s re-sent 100–500 events).
    async fn slot(&self, started: bool) -> Result<SemaphorePermit<'_>, AcquireError> {
        if started {
            return self.slots.acquire().await;
        }
        let _gate = self.start_gate.lock().await;
        self.slots.acquire().await
    }

    /// A reconciliation's repair used all its attempts: once enough have in a row with
    /// nothing delivered (`concurrency`, at least [`REPAIRS_GIVEN_UP_PAUSE`], and at
    /// least `pause_after_failures` attempts), the connector pauses unless the target
    /// still takes a write. Objects the target fails on their data alone (a bug of its
    /// own) are all an ordinary run after a failed one sends, and they fail together:
    /// without the question they paused the connector at every run.
    async fn repair_gave_up(&self, delivered_before: u64, reason: &str) {
        let limit = REPAIRS_GIVEN_UP_PAUSE
            .max(self.config.concurrency as u64)
            .max(
                self.config
                    .retry
                    .pause_after_failures
                    .div_ceil(u64::from(REPAIR_ATTEMPTS)),
            );
        // Already paused or held (the mirror's failures, another repair's question):
        // the run stops at it, and the target need not be asked.
        if !self.live.repair_gave_up(delivered_before, limit) || self.live.pause_reason().is_some()
        {
            return;
        }
        if self.takes_writes().await {
            tracing::info!(
                repairs = limit,
                "A reconciliation's repairs failed in a row while the target took a write: those objects' own failures; not pausing."
            );
            self.live.count_repairs_afresh();
        } else if self.cancel.is_cancelled()
            || self.live.delivered.load(Ordering::Acquire) != delivered_before
        {
            // A stop cut the question short, or a delivery came while it was asked: no
            // answer that the target is down, and a pause set after a delivery would
            // stand until it ran out.
            self.live.count_repairs_afresh();
        } else {
            self.live
                .pause_for_repairs(limit, self.config.retry.pause(), reason);
        }
    }

    /// Whether the target takes a write now: one attempt of the course's PUT, which every
    /// start sends too and which changes nothing there but its date. A 401 is asked once
    /// more with a fresh token, as a mirror's request is: repairs failing with a 503 never
    /// drop the token, so one that expired or was revoked meanwhile answered the question
    /// for a target that takes writes, and paused the connector.
    async fn takes_writes(&self) -> bool {
        let Target::OneRoster { settings, .. } = &self.target else {
            return false;
        };
        let req = oneroster::course_put(settings, Utc::now());
        let mut refreshed = false;
        // What it answered, for the log: the pause's line names only the repairs' error.
        let said = loop {
            let headers = match self.headers(&req).await {
                Err(e) => break e,
                Ok(headers) => headers,
            };
            let used_auth = authorization(&headers);
            let timeout = Duration::from_millis(self.config.timeout_ms);
            let sending = http::send(&self.client, &req, headers, timeout);
            break match self.unless_stopped(false, sending).await {
                Some(Outcome::Delivered { body, .. }) if !oneroster::looks_like_a_page(&body) => {
                    return true;
                }
                Some(Outcome::Delivered { status, .. }) => {
                    format!("answered {status} with a page")
                }
                Some(Outcome::Retry { reason, .. } | Outcome::Refused { reason, .. }) => reason,
                Some(Outcome::Unauthorized { .. }) => {
                    if let Some(credentials) = self.credentials() {
                        credentials.invalidate(used_auth.as_deref()).await;
                        if !std::mem::replace(&mut refreshed, true) {
                            continue;
                        }
                    }
                    "answered 401".to_owned()
                }
                Some(Outcome::Gone { .. }) => "answered 410".to_owned(),
                None => "rosterd is stopping".to_owned(),
            };
        };
        tracing::warn!(
            answer = said.as_str(),
            "The target took no PUT of the course after a reconciliation's repairs failed in a row."
        );
        false
    }

    /// A preflight check (see [`Sender::Preflight`]).
    async fn send_preflight(&self, req: &Request) -> Sent {
        self.send_as(req, None, Sender::Preflight, None).await
    }

    /// A request the target took: counted, and the failure streak ended where it counts.
    fn delivered(&self, counts: bool, name: &str) -> Sent {
        if counts {
            self.live.success();
        } else {
            self.live.count_delivery();
        }
        counters::delivered(self.tenant(), name);
        Sent::Ok
    }

    async fn send_as(
        &self,
        req: &Request,
        max_attempts: Option<u32>,
        by: Sender<'_>,
        mut wanted: Option<&mut (dyn FnMut() -> bool + Send)>,
    ) -> Sent {
        let mirror = matches!(by, Sender::Mirror(_) | Sender::Preflight);
        // A change already started when a stop comes is let finish (the log follower
        // bounds that by STOP_DRAIN), so that what its target took is not sent again:
        // only waiting out a pause or a backoff gives up then. Started means one of its
        // requests got a slot: the changes queued behind `concurrency` have not, and
        // start no more once a stop comes (a reload's 3 s sent hundreds of them, each
        // sent again after it, since the cursor records only what finished before).
        let started = match by {
            Sender::Mirror(started) => Some(started),
            _ => None,
        };
        let drains = || started.is_some_and(|s| s.load(Ordering::Relaxed));
        let counts = !matches!(by, Sender::Operator);
        let name = self.name();
        if self.config.dry_run {
            // The object's path is what a dry run is for (a webhook's has none, and may
            // hold its secret); credentials in the URL are not.
            let url = match self.target {
                Target::Webhook { .. } => http::shown_url(&req.url),
                _ => http::recorded_url(&req.url),
            };
            tracing::info!(method = %req.method, %url,
                body = %req.body.as_deref().map(String::from_utf8_lossy).unwrap_or_default(),
                "Dry run: would send.");
            return Sent::Ok;
        }
        let mut backoff = self.backoff();
        let mut refreshed = false;
        let mut attempts = 0u32;
        // The target's own `Retry-After`, when a pause was waited out in its place.
        let mut not_before: Option<tokio::time::Instant> = None;
        let delivered_before = self.live.delivered.load(Ordering::Acquire);
        let mut streak = Streak::default();
        let timeout = Duration::from_millis(self.config.timeout_ms);
        // A request keeps its slot while it waits to retry, so `concurrency` bounds the
        // requests retrying against a failing target, not only those on the wire: a
        // batch of thousands would otherwise retry side by side, each on its own
        // backoff, and the target would see no backoff at all. Only the mirror takes
        // slots: an operator's replay sends one request at a time and a reconciliation
        // up to `concurrency` of its own, and neither must queue behind mirror requests
        // waiting out a backoff (a reconciliation holds the tenant's job slot meanwhile).
        let mut slot = None;
        loop {
            if attempts > 0
                && let Some(wanted) = wanted.as_deref_mut()
                && !wanted()
            {
                return Sent::Superseded;
            }
            if mirror && self.live.paused_until().is_some() {
                // Nothing is sent while paused; the slot goes to no one meanwhile.
                slot = None;
            }
            if mirror {
                let go_on = if drains() && self.cancel.is_cancelled() {
                    self.live.paused_until().is_none()
                } else {
                    self.live.wait_unpaused(&self.cancel).await
                };
                if !go_on {
                    return Sent::Cancelled;
                }
            }
            if let Some(t) = not_before.take()
                && t > tokio::time::Instant::now()
            {
                // The pause is over before the wait the target asked for: a pause of
                // 60 s sent a target answering `429 Retry-After: 600` a round of
                // requests every minute. An operator's resume still means now.
                let changed = self.live.pause_changed.notified();
                if counts {
                    self.live.health().next_retry = Some(Deadline::after(
                        t.saturating_duration_since(tokio::time::Instant::now()),
                    ));
                }
                tokio::select! {
                    () = tokio::time::sleep_until(t) => {}
                    () = changed => {
                        if self.live.paused_until().is_some() {
                            not_before = Some(t);
                        }
                    }
                    () = self.cancel.cancelled() => return Sent::Cancelled,
                }
                continue;
            }
            if matches!(by, Sender::Reconcile)
                && let Some(reason) = self.live.pause_reason()
            {
                return Sent::Refused {
                    reason,
                    response: None,
                };
            }
            if mirror && slot.is_none() {
                // Draining, the others' answers free the slots.
                match self.unless_stopped(drains(), self.slot(drains())).await {
                    Some(Ok(s)) => {
                        slot = Some(s);
                        started.inspect(|s| s.store(true, Ordering::Relaxed));
                    }
                    _ => return Sent::Cancelled,
                }
                // A pause may have begun while this request queued for its slot: every
                // request queued then would otherwise reach the target the pause spares.
                if self.live.paused_until().is_some() {
                    continue;
                }
            }
            attempts += 1;
            // Listening from before the request goes out, so a pause or a resume while
            // it is in flight cuts the wait after it short.
            let changed = self.live.pause_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let mut used_auth = None;
            // Outside a started change, a stop also cuts the wait for an access token (a
            // token endpoint may take its whole timeout to answer).
            let Some(headers) = self.unless_stopped(drains(), self.headers(req)).await else {
                return Sent::Cancelled;
            };
            let outcome = match headers {
                Ok(headers) => {
                    used_auth = authorization(&headers);
                    let sending = http::send(&self.client, req, headers, timeout);
                    match self.unless_stopped(drains(), sending).await {
                        Some(o) => o,
                        None => return Sent::Cancelled,
                    }
                }
                Err(reason) => Outcome::Retry {
                    reason,
                    // A token endpoint's `Retry-After` is kept, as a target's is.
                    retry_after: self.credentials().and_then(Credentials::token_wait),
                    response: None,
                },
            };
            let outcome = match (outcome, &self.target) {
                // A 200 is not enough: a proxy's login page, another org and an org
                // marked for deletion answer it too, and every PUT after would count the
                // proxy's page as delivered.
                (Outcome::Delivered { status, body, .. }, Target::OneRoster { settings, .. })
                    if matches!(by, Sender::Preflight) && req.method == reqwest::Method::GET =>
                {
                    // Refused, as a 404 is: the operator fixes the target, then resumes.
                    return match oneroster::check_org_answer(settings, &body) {
                        Ok(()) => self.delivered(counts, name),
                        Err((reason, quoted)) => Sent::Refused {
                            reason,
                            response: quoted.map(|body| TargetResponse { status, body }),
                        },
                    };
                }
                // A write's 2xx must not be a page: a proxy's login page answering 200 to
                // a PUT was counted as delivered, and the change was lost unless a
                // read-back found it (5 of 100 in an audit).
                (Outcome::Delivered { status, body, .. }, Target::OneRoster { .. })
                    if req.method != reqwest::Method::GET
                        && (200..300).contains(&status)
                        && oneroster::looks_like_a_page(&body) =>
                {
                    Outcome::Retry {
                        reason: format!(
                            "target answered {status} to a {} with a page, not OneRoster's answer (a proxy's login page?); the change is sent again",
                            req.method
                        ),
                        retry_after: None,
                        response: None,
                    }
                }
                (outcome, _) => outcome,
            };
            let (reason, retry_after, response) = match outcome {
                Outcome::Delivered { .. } => return self.delivered(counts, name),
                Outcome::Refused { reason, response } => {
                    if matches!(by, Sender::Mirror(_)) {
                        self.live.refused(
                            self.config.retry.pause_after_refusals,
                            &reason,
                            &response.body,
                        );
                    }
                    return Sent::Refused {
                        reason,
                        response: Some(response),
                    };
                }
                Outcome::Unauthorized { response } => {
                    if let Some(credentials) = self.credentials() {
                        // An expired or revoked token is dropped at every 401, so the
                        // next attempt fetches another: kept after the second, a token
                        // the target would never take again was sent at each retry until
                        // it expired (an hour by default), and a connector starting its
                        // preflight then delivered nothing for that long.
                        credentials.invalidate(used_auth.as_deref()).await;
                        // The first time, try again at once; after that, with the backoff,
                        // so a target refusing every token does not see one fetch and
                        // request after another.
                        if !refreshed {
                            refreshed = true;
                            continue;
                        }
                    }
                    (
                        "target refuses our credentials (401)".to_owned(),
                        None,
                        Some(response),
                    )
                }
                Outcome::Gone { response } if !mirror => (
                    "target answered 410 Gone: the endpoint is disabled".to_owned(),
                    None,
                    Some(response),
                ),
                Outcome::Gone { response } => {
                    self.live.pause_until_resumed(
                        &http::with_answer(
                            "target answered 410 Gone: the endpoint is disabled; fix it, then reload or resume".to_owned(),
                            &response.body,
                        ),
                        http::brief_answer(&response.body),
                    );
                    continue;
                }
                Outcome::Retry {
                    reason,
                    retry_after,
                    response,
                } => (reason, retry_after, response),
            };
            if counts {
                counters::retried(self.tenant(), name);
                self.live.failure(
                    &mut streak,
                    &reason,
                    response.as_ref().and_then(|r| http::brief_answer(&r.body)),
                    self.config.retry.pause_after_failures,
                    self.config.retry.pause(),
                );
            }
            if max_attempts.is_some_and(|m| attempts >= m) {
                if matches!(by, Sender::Reconcile) {
                    self.repair_gave_up(delivered_before, &reason).await;
                }
                return Sent::Refused { reason, response };
            }
            if !matches!(by, Sender::Operator) && self.live.paused_until().is_some() {
                // The pause is the wait: its end, or a resume, is the next attempt, and
                // not before the target's `Retry-After`.
                not_before = retry_after.map(|d| tokio::time::Instant::now() + d);
                continue;
            }
            // While only this request has failed, its slot goes back as it waits, so
            // another can try: if that one gets through, the failure was this object's
            // own, and an object that keeps failing never holds a slot the others
            // need, even at `concurrency = 1`. Once a second request fails with
            // nothing acknowledged in between, the target is failing: each failed
            // request keeps its slot from then on.
            if self.live.failing_requests.load(Ordering::Acquire) < 2 {
                slot = None;
            }
            let delay = backoff
                .next()
                .unwrap_or(self.config.retry.max_delay())
                .max(retry_after.unwrap_or_default());
            tracing::debug!(url = %http::shown_url(&req.url), reason = reason.as_str(), delay_ms = delay.as_millis() as u64, "Delivery failed; retrying.");
            if counts {
                // The soonest attempt still ahead: what an operator waits for.
                let at = Deadline::after(delay);
                let mut h = self.live.health();
                h.next_retry = Some(match h.next_retry {
                    Some(t) if t.wall().is_some() => t.min(at),
                    _ => at,
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut changed => {
                    // Resumed: the operator says the target is worth trying now, from
                    // the start of the backoff. (A pause that began is waited out at
                    // the top.)
                    if self.live.paused_until().is_none() {
                        backoff = self.backoff();
                    }
                }
                _ = self.cancel.cancelled() => return Sent::Cancelled,
            }
        }
    }

    /// A read (reconciliation's read-back): a few attempts; the answer's headers and body,
    /// or why there is none.
    async fn send_for_body(
        &self,
        req: &Request,
    ) -> Result<(reqwest::header::HeaderMap, bytes::Bytes), String> {
        // A stop ends the read at once: its wait for a `Retry-After` could last an hour,
        // and a resync's reads run in the connector's task, which the stop waits for.
        self.unless_stopped(false, self.read_body(req))
            .await
            .unwrap_or_else(|| Err("rosterd is stopping".to_owned()))
    }

    async fn read_body(
        &self,
        req: &Request,
    ) -> Result<(reqwest::header::HeaderMap, bytes::Bytes), String> {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let mut last = String::new();
        for attempt in 1..=READ_ATTEMPTS {
            let headers = self.headers(req).await?;
            let used_auth = authorization(&headers);
            match http::send(&self.client, req, headers, timeout).await {
                Outcome::Delivered { headers, body, .. } => return Ok((headers, body)),
                Outcome::Unauthorized { .. } => {
                    last = "target refuses our credentials (401)".into();
                    if let Some(credentials) = self.credentials() {
                        credentials.invalidate(used_auth.as_deref()).await;
                    }
                }
                Outcome::Retry {
                    reason,
                    retry_after,
                    response,
                } => {
                    let reason = self.unquoted_read(reason, response.as_ref());
                    // The job slot is held meanwhile (overrides answer 409), and nothing
                    // said why: a `Retry-After` of an hour kept a job waiting three
                    // hours, the last after its final attempt, without a log line.
                    let wait = match retry_after {
                        Some(asked) if asked > READ_RETRY_MAX_WAIT => {
                            return Err(format!(
                                "{reason}, and asks to wait {} s before the next attempt; a read waits at most {} s",
                                asked.as_secs(),
                                READ_RETRY_MAX_WAIT.as_secs()
                            ));
                        }
                        Some(asked) => asked,
                        // The connector's own first delay, which may be set far longer
                        // for deliveries than a read should wait.
                        None => self.config.retry.initial_delay().min(READ_RETRY_MAX_WAIT),
                    };
                    last = reason;
                    if attempt < READ_ATTEMPTS {
                        tokio::time::sleep(wait).await;
                    }
                }
                Outcome::Gone { response } | Outcome::Refused { response, .. } => {
                    let reason = http::with_answer(
                        format!("target answered {}", response.status),
                        &response.body,
                    );
                    return Err(self.unquoted_read(reason, Some(&response)));
                }
            }
        }
        Err(last)
    }

    /// A read's failure as the job reports it, which `/status` shows: without the
    /// target's words, which the log gets instead.
    fn unquoted_read(&self, reason: String, response: Option<&TargetResponse>) -> String {
        let answer = response.and_then(|r| http::brief_answer(&r.body));
        let Some(answer) = answer.filter(|a| reason.contains(a.as_str())) else {
            return reason;
        };
        tracing::warn!(reason = reason.as_str(), "A read of the target failed.");
        unquoted(&reason, Some(&answer), "in rosterd's log")
    }

    async fn send_one<'r>(
        &self,
        req: &'r Request,
        max_attempts: Option<u32>,
        started: &AtomicBool,
    ) -> (&'r Request, Sent) {
        (req, self.send(req, max_attempts, started).await)
    }

    /// The document a change leaves: its snapshot, or for an assignment-only change (which
    /// carries none) the user as stored, while it is still the document the change saw
    /// (its version, the seq of its last write, is not above the change's). A user
    /// written or deleted since has left that document behind: `None` then. The stored
    /// one would be a later state, sent ahead of the earlier changes still to come
    /// after this one (or, deleted, a DELETE ahead of them, which they then undid).
    fn document<'e>(
        &self,
        ev: &'e ChangeEvent,
    ) -> Result<Option<std::borrow::Cow<'e, serde_json::Value>>, StoreError> {
        Ok(match &ev.snapshot {
            Some(s) => Some(std::borrow::Cow::Borrowed(s)),
            None if ev.op == crate::store::ChangeOp::Archetype => self
                .user_as_of(&ev.id, ev.seq)?
                .map(|r| std::borrow::Cow::Owned(r.doc)),
            None => None,
        })
    }

    /// User `id` as stored, if no write after change `seq` has changed it (its version,
    /// the seq of its last write, is not above `seq`): then it is the user as that change
    /// saw it. A user written or deleted since is `None`; its later change carries it.
    fn user_as_of(&self, id: &str, seq: u64) -> Result<Option<crate::store::Resource>, StoreError> {
        Ok(self
            .store
            .get(self.tenant(), ResourceKind::User, id)?
            .filter(|r| r.version <= seq))
    }

    /// For user `id` as `doc` now stands, which the target has never acknowledged, the
    /// groups whose class the target holds without the user's enrollment: while the user
    /// could not be sent, its groups' changes left that enrollment out
    /// ([`oneroster::held_downstream`]). Read for such a user only: others cost nothing.
    fn enrollments_owed(
        &self,
        settings: &oneroster::OneRosterSettings,
        id: &str,
        doc: &serde_json::Value,
    ) -> Result<Vec<String>, StoreError> {
        let (tenant, owner) = (self.tenant(), self.cursor_name());
        let acked = |key: String| -> Result<bool, StoreError> {
            let unsaved = self
                .unsaved
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .copied();
            Ok(match unsaved {
                Some(hash) => hash.is_some(),
                None => self.store.delivered(tenant, &owner, &key)?.is_some(),
            })
        };
        if settings.deletes(doc) || !oneroster::can_send(doc) || acked(oneroster::user_key(id))? {
            return Ok(Vec::new());
        }
        let mut owed = Vec::new();
        for g in self.store.groups_of(tenant, id)? {
            if acked(oneroster::group_key(&g))? && !acked(oneroster::member_key(&g, id))? {
                owed.push(g);
            }
        }
        Ok(owed)
    }

    /// `reports`: the users [`reports_of`] found for the change, which a OneRoster target
    /// is sent again.
    fn plan(&self, ev: &ChangeEvent, reports: &[String]) -> Result<Plan, PlanError> {
        let tenant = self.tenant();
        match &self.target {
            Target::OneRoster { settings, .. } => {
                let doc = self.document(ev)?;
                if doc.is_none() && ev.op == crate::store::ChangeOp::Archetype {
                    // The user was written or deleted after this assignment: that later
                    // change, delivered after this one, sends the user with the
                    // assignment as stored then, or its DELETE (enrollments first).
                    return Ok(Plan::default());
                }
                let doc = doc.as_deref();
                let manager = match doc {
                    Some(d) if ev.resource_type == "User" => {
                        oneroster::existing_manager(&self.store, tenant, d)?
                    }
                    _ => None,
                };
                // The assignment as stored, not the change's own: a target is sent states,
                // and one of a later assignment may already have gone out with an earlier
                // change of the user, which the change's own would then undo until the
                // later one's change came.
                let assignment = match doc {
                    Some(_) if ev.resource_type == "User" => {
                        self.store.assignment(tenant, &ev.id)?
                    }
                    _ => None,
                };
                let mut added = Vec::with_capacity(ev.members_added.len());
                for m in &ev.members_added {
                    // Enrollments are for users; nested groups have none, and a user
                    // absent downstream while inactive can have none either.
                    if oneroster::held_downstream(&self.store, settings, tenant, m, ev.seq)?
                        == Some(true)
                    {
                        added.push(m.as_str());
                    }
                }
                // A user that leaves the target on deactivation takes its enrollments
                // with it, and brings them back on reactivation, each class put first
                // as it stands now: the group may be newer than anything the target
                // has been sent yet. Only at the change of state: every later change
                // of an inactive user would otherwise send a DELETE per group.
                // The groups as the change left them (see `ChangeEvent::groups`), those
                // read now for changes logged without them.
                let mut groups = Vec::new();
                if ev.resource_type == "User"
                    && settings.deactivate == oneroster::Deactivate::Delete
                    && (ev.deactivated || ev.reactivated)
                {
                    let ids = match &ev.groups {
                        Some(ids) => ids.clone(),
                        None => self.store.groups_of(tenant, &ev.id)?,
                    };
                    for g in ids {
                        match self.store.get(tenant, ResourceKind::Group, &g)? {
                            Some(r) => groups.push((g, r.doc)),
                            // A deactivation needs only the id to DELETE the enrollment of a
                            // group deleted since; a reactivation leaves it to that deletion.
                            None if ev.deactivated => groups.push((g, serde_json::Value::Null)),
                            None => {}
                        }
                    }
                }
                // A user's creation owes nothing: no group change before it named the user,
                // and those after it enroll the user themselves if it can be sent then (a
                // million creations need not each look up their groups).
                let owed = match doc {
                    Some(d)
                        if ev.resource_type == "User"
                            && ev.op != crate::store::ChangeOp::Created =>
                    {
                        self.enrollments_owed(settings, &ev.id, d)?
                    }
                    _ => Vec::new(),
                };
                let cur = oneroster::Current {
                    doc,
                    assignment: assignment.as_ref(),
                    manager,
                    user_members_added: added,
                    user_members_removed: ev.members_removed.iter().map(String::as_str).collect(),
                    reports: self.report_writes(settings, ev.seq, reports)?,
                    groups: groups.iter().map(|(g, doc)| (g.as_str(), doc)).collect(),
                    enrollments_owed: owed.iter().map(String::as_str).collect(),
                };
                oneroster::plan(settings, tenant, ev, cur).map_err(|e| PlanError::Unplannable(e.0))
            }
            Target::Webhook { settings, .. } => {
                let snapshot = self.document(ev)?;
                Ok(webhook::plan(
                    settings,
                    (self.store.id(), tenant),
                    ev,
                    snapshot.as_deref(),
                ))
            }
            Target::Csv { .. } => Ok(Plan::default()),
        }
    }

    /// The PUTs that bring these users' bodies up to date after change `seq`. One that is
    /// gone, written since `seq`, inactive and deleted downstream, or cannot be expressed
    /// has its own changes for that, delivered after this one (a body from a later write
    /// would be undone by the older snapshots of the changes between); sending it here
    /// would only fail the change that merely touched it.
    fn report_writes(
        &self,
        settings: &OneRosterSettings,
        seq: u64,
        reports: &[String],
    ) -> Result<Vec<oneroster::Write>, StoreError> {
        let tenant = self.tenant();
        let mut out = Vec::with_capacity(reports.len());
        for id in reports {
            let Some(r) = self.user_as_of(id, seq)? else {
                continue;
            };
            if let Ok(w) =
                oneroster::stored_user_write(&self.store, settings, tenant, id, &r.doc, Utc::now())?
                && w.body.is_some()
            {
                out.push(w);
            }
        }
        Ok(out)
    }

    async fn dead_letter(
        &self,
        ev: &ChangeEvent,
        reason: String,
        request: Option<&Request>,
        response: Option<TargetResponse>,
    ) -> Result<(), StoreError> {
        let object = format!("{}/{}", ev.resource_type, ev.id);
        // The log line and `last_error` show what the target said, not only the status:
        // a 403 reads as one object's ("not ours to change") where the answer may say
        // the token lacks a permission for every one.
        let shown = match &response {
            Some(r) => http::with_answer(reason.clone(), &r.body),
            None => reason.clone(),
        };
        let response_brief = response.as_ref().and_then(|r| http::brief_answer(&r.body));
        self.store
            .add_dead_letter(
                self.tenant(),
                DeadLetter {
                    id: 0,
                    connector: self.name().to_owned(),
                    at: Utc::now(),
                    reason: reason.clone(),
                    request: request.map(Request::record),
                    response,
                    event: ev.clone(),
                },
            )
            .await?;
        // Said once it is stored, so that the log never names a letter the list lacks.
        tracing::warn!(seq = ev.seq, %object, reason = shown.as_str(),
            "Change set aside as a dead letter; `rosterd dead-letters --tenant {} list {}` shows it.",
            self.tenant(), self.name());
        counters::dead_lettered(self.tenant(), self.name());
        // What shows as the connector's last error is this refusal, not an older blip.
        self.live.health().error_quoting(
            format!(
                "change #{} ({object}) set aside as a dead letter: {shown}",
                ev.seq
            ),
            response_brief,
        );
        Ok(())
    }

    /// Deliver one change: its stages in order, the requests of a stage concurrently.
    async fn deliver(
        &self,
        ev: &ChangeEvent,
        reports: &[String],
        max_attempts: Option<u32>,
    ) -> Result<Delivered, StoreError> {
        // A bug on one change's content must not stall the connector on it: its task
        // would restart at that change again and again. It is set aside like a change
        // the target cannot take, to be replayed once rosterd is fixed.
        let planned = crate::ops::panics::catch_sync(|| self.plan(ev, reports)).unwrap_or_else(|panic| {
            Err(PlanError::Unplannable(format!(
                "rosterd could not turn this change into requests: a bug (it panicked: {panic}); replay it once rosterd is fixed"
            )))
        });
        let plan = match planned {
            Ok(p) => p,
            Err(e) => {
                let reason = match e {
                    // A store that has failed is no fault of this change: the task ends
                    // on it (the daemon restarts to recover the store) rather than set
                    // every change aside. A record that cannot be read is this change's
                    // alone: it is set aside as before, and the connector goes on.
                    PlanError::Store(e) if e.outage_message().is_some() => return Err(e),
                    PlanError::Store(e) => {
                        format!("cannot read what this change needs from the store: {e}")
                    }
                    PlanError::Unplannable(reason) => reason,
                };
                self.dead_letter(ev, reason, None, None).await?;
                return Ok(Delivered::DeadLettered);
            }
        };
        let started = AtomicBool::new(false);
        for stage in &plan.stages {
            // A stage can hold 50,000 enrollments: keep only a window of them in flight.
            let mut pending = stage.iter();
            let mut inflight = FuturesUnordered::new();
            let window = self.config.concurrency * 2;
            let mut refused = None;
            loop {
                while inflight.len() < window {
                    match pending.next() {
                        Some(req) => inflight.push(self.send_one(req, max_attempts, &started)),
                        None => break,
                    }
                }
                let Some((req, sent)) = inflight.next().await else {
                    break;
                };
                match sent {
                    Sent::Ok | Sent::Superseded => {}
                    Sent::Cancelled => return Ok(Delivered::Cancelled),
                    Sent::Refused { reason, response } => {
                        refused.get_or_insert((req, reason, response));
                    }
                }
            }
            // The rest of the change depends on this stage (a class before its
            // enrollments, a webhook's user event before its assignment event), so it
            // stops here; a replay sends the whole change again, in order.
            if let Some((req, reason, response)) = refused {
                self.dead_letter(ev, reason, Some(req), response).await?;
                if let Some(pause) = self.live.refusal_pause() {
                    // The letter's line is not why the connector stopped, nor its time.
                    {
                        let mut h = self.live.health();
                        h.error_quoting(pause.why.clone(), pause.answer.clone());
                        h.last_error_at = Some(pause.at);
                    }
                    let (tenant, name) = (self.tenant(), self.name());
                    self.store
                        .set_refusal_pause(tenant, name, Some(&pause))
                        .await?;
                    // A resume between the look and the write has cleared the store
                    // already: it must stay cleared.
                    if self.live.refusal_pause().is_none() {
                        self.store.set_refusal_pause(tenant, name, None).await?;
                    }
                }
                return Ok(Delivered::DeadLettered);
            }
        }
        if plan.stages.iter().any(|s| !s.is_empty()) {
            self.live.change_taken();
        }
        Ok(Delivered::Done(plan.hashes))
    }

    /// What a change of `keys` waits for: the repairs under them, and the latest change
    /// of each still in flight. It becomes that latest change (`rx` says when it is done).
    /// `stands_for`: the keys it becomes the latest change of (the others it only waits
    /// on). A skipped change sent as it stands stands only for what it writes: standing
    /// for a group's members too (the order a group's change keeps with theirs), it made
    /// each member's later change, a title, wait behind the change stuck in flight
    /// before it.
    fn waits_for(
        &self,
        keys: &[String],
        latest: &mut HashMap<String, (u64, watch::Receiver<bool>)>,
        seq: u64,
        rx: &watch::Receiver<bool>,
        stands_for: impl Fn(&str) -> bool,
    ) -> Vec<watch::Receiver<bool>> {
        let mut waits = Vec::new();
        for k in keys {
            waits.extend(self.repairs.of(k));
            if !stands_for(k) {
                waits.extend(latest.get(k).map(|(_, r)| r.clone()));
            } else if let Some((_, r)) = latest.insert(k.clone(), (seq, rx.clone())) {
                waits.push(r);
            }
        }
        waits
    }

    /// Deliver one change once every earlier change it depends on is done, then say so.
    /// `as_it_stands`: the change was skipped at a hold behind an older change of its
    /// objects; it is sent as they stand once that is done ([`current_state`]), read then,
    /// so that whatever the IdP did meanwhile goes with it.
    async fn deliver_after(
        &self,
        ev: ChangeEvent,
        reports: Vec<String>,
        waits: Vec<watch::Receiver<bool>>,
        done: watch::Sender<bool>,
        as_it_stands: bool,
    ) -> (u64, Vec<String>, Result<Delivered, StoreError>) {
        let keys = object_keys(&ev, &reports, self.state_sends_classes());
        for mut w in waits {
            // A dropped sender means its change was abandoned (shutdown or store error).
            if w.wait_for(|d| *d).await.is_err() {
                return (ev.seq, keys, Ok(Delivered::Cancelled));
            }
        }
        // Stopping: a change not started yet (this one waited for an earlier one, drained
        // meanwhile) does not start.
        if self.cancel.is_cancelled() {
            return (ev.seq, keys, Ok(Delivered::Cancelled));
        }
        // Its retries and refusals are logged naming the change and the object, which
        // the target's answer alone (`500`) does not.
        let span = tracing::info_span!("change", seq = ev.seq, object = %format_args!("{}/{}", ev.resource_type, ev.id));
        let (ev, reports) = if as_it_stands {
            let seq = ev.seq;
            let fans_out = matches!(self.target, Target::OneRoster { .. });
            let read = current_with_reports(&self.store, self.tenant(), ev, fans_out)
                .instrument(span.clone())
                .await;
            match read {
                Ok(read) => read,
                Err(e) => return (seq, keys, Err(e)),
            }
        } else {
            (ev, reports)
        };
        if as_it_stands {
            span.in_scope(|| tracing::info!("Skipped at a hold behind an older change of its object, this change is sent as the object now stands, now that the older one is done."));
        }
        let r = self.deliver(&ev, &reports, None).instrument(span).await;
        if let Ok(Delivered::Done(hashes)) = &r {
            let mut unsaved = self.unsaved.lock().unwrap_or_else(|e| e.into_inner());
            unsaved.extend(hashes.iter().cloned());
        }
        done.send_replace(true);
        (ev.seq, keys, r)
    }
}

/// The members a group's change adds or removes.
fn members_changed(ev: &ChangeEvent) -> impl Iterator<Item = &String> {
    ev.members_added.iter().chain(&ev.members_removed)
}

/// The objects a change touches (with the `reports` it sends again); changes sharing one
/// are delivered in log order. `classes`: the target is sent the classes of a user's
/// groups with the user's deactivation or reactivation ([`Ctx::state_sends_classes`]).
fn object_keys(ev: &ChangeEvent, reports: &[String], classes: bool) -> Vec<String> {
    let mut keys = vec![format!("{}/{}", ev.resource_type, ev.id)];
    if ev.resource_type == "Group" {
        keys.extend(members_changed(ev).map(|m| format!("User/{m}")));
    }
    // A target that deletes inactive users is sent the classes of the user's groups with
    // a reactivation, as the groups stand when it is planned: a later change of one of
    // them, sent while the reactivation waited to retry, would be put back as it was.
    // (Changes logged before `groups` was recorded have none; their groups are read when
    // they are sent.)
    // Only there: elsewhere it would send a group's members' changes of state one at a
    // time (500 deactivations in one group took 21.6 s instead of 1.6 s).
    if classes && ev.resource_type == "User" && (ev.deactivated || ev.reactivated) {
        keys.extend(ev.groups.iter().flatten().map(|g| format!("Group/{g}")));
    }
    keys.extend(reports.iter().map(|r| format!("User/{r}")));
    keys
}

/// The objects at the target whose state a change writes: its own, a group's enrollments
/// it adds or removes, the enrollments (and, back, the classes) a user's change of state
/// takes along on a target that deletes inactive users, and the reports it sends again.
/// [`object_keys`] is wider, for order: a group's change waits for its members', a state
/// change for its groups'. A change skipped at a hold is sent as it stands behind one in
/// flight only when they write the same object: matched by order, one user stuck in a
/// group of a thousand had every member's skipped change sent, one at a time behind it
/// (2,000 changes in 130.7 s, where a skip with nothing stuck took 0.02 s), and their
/// later changes waited for the stuck user too.
fn written_keys(ev: &ChangeEvent, reports: &[String], classes: bool) -> Vec<String> {
    let mut keys = vec![format!("{}/{}", ev.resource_type, ev.id)];
    if ev.resource_type == "Group" {
        keys.extend(members_changed(ev).map(|m| format!("Member/{}/{m}", ev.id)));
    } else if classes && (ev.deactivated || ev.reactivated) {
        for g in ev.groups.iter().flatten() {
            keys.push(format!("Member/{g}/{}", ev.id));
            if ev.reactivated {
                keys.push(format!("Group/{g}"));
            }
        }
    }
    keys.extend(reports.iter().map(|r| format!("User/{r}")));
    keys
}

/// The users whose OneRoster bodies a change alters besides its own objects: a deleted
/// user's reports, whose bodies named it as their manager (a body names only a manager
/// who exists). Found when the change is read from the log, so that it is delivered in
/// order with their own changes, as one of its objects.
fn reports_of(store: &Store, tenant: &str, ev: &ChangeEvent) -> Result<Vec<String>, StoreError> {
    if ev.resource_type != "User" || ev.op != crate::store::ChangeOp::Deleted {
        return Ok(vec![]);
    }
    store.lookup(tenant, &crate::store::IndexQuery::Manager(ev.id.clone()))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(StoreError::from_join)?
}

/// The first wait before a connector's task runs again after a panic; it doubles with
/// each panic in a row, up to [`RESTART_DELAY_MAX`].
const RESTART_DELAY: Duration = Duration::from_secs(1);
const RESTART_DELAY_MAX: Duration = Duration::from_secs(300);

/// Run a connector's task until it ends. A panic (a bug, perhaps on one change's
/// content) must not leave the connector dead while /status still says "running": the
/// task runs again from the last acknowledged cursor, as after a restart, after a wait
/// that grows while it keeps panicking, so a change that always panics costs a line a
/// few minutes rather than a busy loop. (A change whose content makes the task panic is
/// dead-lettered in `deliver` before it gets here.) A store error ends it, as before:
/// an I/O failure has marked the store failed, which stops the daemon for its service
/// manager to restart; any other shows as `failed: <error>` until a restart.
async fn supervised<F, Fut>(live: &Live, cancel: &CancellationToken, mut run: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    let mut panics: u32 = 0;
    loop {
        let started = tokio::time::Instant::now();
        // A panic in the task, or in blocking work it waited for (which comes back as
        // an error of its own), is the same bug.
        let ran = match crate::ops::panics::catch(run()).await {
            Ok(Err(StoreError::Panicked(panic))) => Err(panic),
            other => other,
        };
        match ran {
            Ok(Ok(())) => return live.set_state("stopped"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "Connector stopped on a store error.");
                return live.set_state(&format!("failed: {e}"));
            }
            Err(panic) => {
                // A run that held up for longer than the longest wait was delivering:
                // its panic starts a new count, with a short wait again.
                if started.elapsed() >= RESTART_DELAY_MAX {
                    panics = 0;
                }
                panics = panics.saturating_add(1);
                let wait = RESTART_DELAY
                    .saturating_mul(2u32.saturating_pow(panics - 1))
                    .min(RESTART_DELAY_MAX);
                let at = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
                tracing::error!(
                    %panic,
                    panics,
                    restart_at = %rfc3339(at),
                    "Connector task panicked (a bug); it starts again from its last acknowledged change."
                );
                {
                    let mut h = live.health();
                    h.state = format!(
                        "panicked ({panics} in a row): {panic}; starting again at {}",
                        rfc3339(at)
                    );
                    h.error(format!("panicked: {panic}"));
                }
                tokio::select! {
                    () = cancel.cancelled() => return live.set_state("stopped"),
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// The task of an HTTP connector (OneRoster, webhook).
async fn run_http(ctx: Arc<Ctx>) -> Result<(), StoreError> {
    let tenant = ctx.tenant().to_owned();
    ctx.store.no_write_owed(&tenant, &ctx.cursor_name()).await?;
    // Paused as it was at the stop (its target refused everything): nothing goes out
    // until the operator resumes it. Said as such: a OneRoster connector showed
    // "preflight" meanwhile, as if its preflight were what failed.
    if ctx.live.refusal_pause().is_some() {
        ctx.live.set_state("paused");
        if !ctx.live.wait_unpaused(&ctx.cancel).await {
            return Ok(());
        }
    }
    if let Target::OneRoster { settings, .. } = &ctx.target {
        // The org must exist and the course must be in place before any class.
        ctx.live.set_state("preflight");
        for (what, req) in oneroster::preflight(settings, Utc::now()) {
            loop {
                match ctx.send_preflight(&req).await {
                    Sent::Ok | Sent::Superseded => break,
                    Sent::Cancelled => return Ok(()),
                    Sent::Refused { reason, response } => {
                        // By its host alone: the base URL may carry credentials (an
                        // audit saw a password in the unauthenticated /status).
                        ctx.live.pause_until_resumed(
                            &format!(
                                "preflight {} of {what} at {} failed: {reason}",
                                req.method,
                                http::shown_url(&req.url)
                            ),
                            response.and_then(|r| http::brief_answer(&r.body)),
                        );
                        if !ctx.live.wait_unpaused(&ctx.cancel).await {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
    catch_up_compacted(&ctx, &tenant).await?;
    ctx.live.set_state("running");
    follow_log(&ctx, &tenant).await
}

/// A cursor below the change log's floor missed changes compaction removed (the
/// connector's file was away, or broken before compaction held such files back). A
/// OneRoster target is brought up to date by reconciling every object; webhook events
/// cannot be rebuilt, so the lost range is said loudly. Either way the cursor then moves
/// to the floor, where the log resumes.
async fn catch_up_compacted(ctx: &Arc<Ctx>, tenant: &str) -> Result<(), StoreError> {
    let cursor_name = ctx.cursor_name();
    let (cursor, floor, known, skipped) = {
        let (store, t, n) = (ctx.store.clone(), tenant.to_owned(), cursor_name.clone());
        blocking(move || {
            let (cursor, floor) = (store.cursor(&t, &n)?, store.changelog_floor(&t)?);
            // Numbers a restore skipped were never changes (store::restored).
            let skipped = store.skipped_between(&t, cursor, floor)?;
            Ok((cursor, floor, store.has_cursor(&t, &n)?, skipped))
        })
        .await?
    };
    if cursor >= floor {
        if !known {
            // Kept from the first start, delivered or not: one that never delivered had
            // no cursor, so brought back after its changes were compacted away it read as
            // new and said nothing of what it lost (a docs check's finding).
            ctx.store
                .advance_cursor(tenant, &cursor_name, cursor, vec![])
                .await?;
        }
        return Ok(());
    }
    let (first, last) = (cursor + 1, floor);
    let lost = (last - cursor).saturating_sub(skipped);
    // Across a restore the range spans billions of numbers that were never changes; the
    // count keeps an operator from reading them as lost.
    let counted = if skipped > 0 {
        format!(
            " ({}; a restore skipped the numbers between)",
            crate::text::plural(lost, "change")
        )
    } else {
        String::new()
    };
    match &ctx.target {
        Target::OneRoster { settings, .. } => {
            if known {
                tracing::warn!(
                    first,
                    last,
                    "Changes #{first}..#{last}{counted} were compacted away before this connector delivered them; reconciling every object to bring the target up to date."
                );
            } else {
                tracing::info!(
                    first,
                    last,
                    "New connector on a compacted change log; reconciling every object first."
                );
            }
            ctx.live.set_state("resync");
            let mut report = reconcile::DriftReport::default();
            match reconcile::reconcile_oneroster(
                ctx,
                settings,
                reconcile::ReconcileMode::default(),
                &mut report,
            )
            .await
            {
                Ok(()) => {}
                Err(DispatchError::Store(e)) => return Err(e),
                Err(e) => return Err(StoreError::Backend(e.to_string())),
            }
            if ctx.cancel.is_cancelled() {
                // Not finished: the next start reconciles again.
                return Ok(());
            }
            if report.failed > 0 || report.unmappable > 0 || report.read_back_stopped.is_some() {
                let stopped = report
                    .read_back_stopped
                    .as_deref()
                    .map(|r| format!("; the read-back stopped early: {r}"))
                    .unwrap_or_default();
                let reason = format!(
                    "resync after compacted changes #{first}..#{last}: {} of {} objects failed, {} cannot be mapped{stopped}; run `rosterd reconcile` once the target accepts them",
                    report.failed, report.drifted, report.unmappable
                );
                tracing::warn!(reason = reason.as_str(), "Resync incomplete.");
                ctx.live.health().error(reason);
            } else {
                tracing::info!(
                    checked = report.checked,
                    sent = report.sent,
                    "Resync finished."
                );
            }
        }
        _ if known => {
            let reason = format!(
                "changes #{first}..#{last}{counted} were compacted away before this connector delivered them; their webhook events are lost for this target (reconcile it by other means)"
            );
            tracing::error!(first, last, lost, "{reason}");
            counters::changes_lost(tenant, ctx.name(), lost);
            ctx.live.health().error(reason);
        }
        _ => {
            tracing::info!(
                first = last + 1,
                "New connector on a compacted change log; it starts at the oldest change kept."
            );
        }
    }
    ctx.store
        .advance_cursor(tenant, &cursor_name, floor, vec![])
        .await
}

/// Delivered-content hashes by object key (`None`: gone downstream).
type Hashes = Vec<(String, Option<u64>)>;

/// Which changes read from the log are done, and the cursor that follows from it.
struct Progress {
    /// The last sequence number read from the log.
    read: u64,
    /// The cursor as last written.
    persisted: u64,
    in_flight: std::collections::BTreeSet<u64>,
    /// Finished changes since the last write, with their delivered-content hashes.
    finished: BTreeMap<u64, Hashes>,
    /// Finished changes above the written cursor, whose hashes are written.
    done: Seqs,
    /// Whether a change finished since the last write.
    unsaved: bool,
    /// Changes a stop or reload recorded as acknowledged, not read again yet.
    ahead: std::collections::BTreeSet<u64>,
    /// Changes the operator skipped at a hold, not read yet: a stop came while a change
    /// before them was still in flight.
    skipped: Seqs,
    /// Objects changes before those touch, whose skipped changes are sent as they stand.
    owed: Owed,
}

/// Objects a change before a range skipped at a hold touches (in flight at the skip, or
/// read by this run; after a start, from the cursor on), each with that change's number.
/// Sent, such a change leaves its object as it had it, and the skipped change after it
/// never came: a leaver stayed enabled at the target, or a user the IdP put back
/// disabled, and the skip's reconciliation left them to the change in flight. A skipped
/// change of one of them is sent instead as the object stands, once the changes before
/// it are done.
///
/// The cursor stays below each change owed until the range is read past, and below one
/// whose skipped change is being sent until that is done: a stop in between reads that
/// change again at the start, and so the skipped range after it, where the cursor past
/// it had the start jump the range and the object stay as the older change left it.
#[derive(Debug, Default)]
struct Owed {
    /// What each change in flight writes ([`written_keys`]), for a skip that comes
    /// while it is.
    writes: HashMap<u64, Vec<String>>,
    keys: HashMap<String, u64>,
    /// For each change being sent as it stands, the changes it holds the cursor below.
    sending: HashMap<u64, Vec<u64>>,
    /// How many keys and sends hold the cursor below each change.
    pins: BTreeMap<u64, usize>,
}

impl Owed {
    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn pin(&mut self, seq: u64) {
        *self.pins.entry(seq).or_default() += 1;
    }

    fn unpin(&mut self, seq: u64) {
        if let std::collections::btree_map::Entry::Occupied(mut e) = self.pins.entry(seq) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// Change `seq`, which writes `writes` at the target, is sent.
    fn sending(&mut self, seq: u64, writes: Vec<String>) {
        self.writes.insert(seq, writes);
    }

    /// A range is skipped: what the changes in flight write is owed.
    fn owe_in_flight(&mut self) {
        let writes = std::mem::take(&mut self.writes);
        for (&seq, keys) in &writes {
            self.owe(keys.iter().cloned(), seq);
        }
        self.writes = writes;
    }

    /// Change `seq`, before a skipped range, writes `keys` at the target.
    fn owe(&mut self, keys: impl IntoIterator<Item = String>, seq: u64) {
        for k in keys {
            if let std::collections::hash_map::Entry::Vacant(e) = self.keys.entry(k) {
                e.insert(seq);
                self.pin(seq);
            }
        }
    }

    /// Whether skipped change `seq` of `keys` is to be sent as its objects stand; it then
    /// holds the cursor below the changes owed until it is done ([`Owed::sent`]). A
    /// user's is read whole when sent: a later skipped change of it needs none.
    fn send_skipped(&mut self, seq: u64, keys: &[String], user: bool) -> bool {
        let held: Vec<u64> = keys
            .iter()
            .filter_map(|k| self.keys.get(k).copied())
            .collect();
        if held.is_empty() {
            return false;
        }
        for &s in &held {
            self.pin(s);
        }
        if user && let Some(s) = keys.first().and_then(|k| self.keys.remove(k)) {
            self.unpin(s);
        }
        self.sending.insert(seq, held);
        true
    }

    /// Change `seq` is done: if it was a skipped change sent as it stands, the cursor may
    /// pass what it held.
    fn sent(&mut self, seq: u64) {
        self.writes.remove(&seq);
        for s in self.sending.remove(&seq).unwrap_or_default() {
            self.unpin(s);
        }
    }

    /// The range is read past: only what is still being sent holds the cursor.
    fn read_past(&mut self) {
        for (_, s) in std::mem::take(&mut self.keys) {
            self.unpin(s);
        }
    }

    /// The lowest change the cursor must stay below.
    fn floor(&self) -> Option<u64> {
        self.pins.keys().next().copied()
    }
}

/// The most changes recorded as acknowledged above the cursor: one object failing for
/// a day while a million others go through must not make each write of the cursor
/// megabytes long. Those past it are sent again after a stop, as all were before.
const MAX_ACKED_RECORDED: usize = 1000;

/// Of the changes acknowledged above the cursor, those the store keeps: the nearest the
/// cursor.
fn recorded(acked: &Seqs) -> Vec<u64> {
    acked.iter().take(MAX_ACKED_RECORDED).collect()
}

/// What [`Progress::take`] gives to write: the cursor, the changes above it that are
/// finished too (the first [`MAX_ACKED_RECORDED`] are written), and the hashes not
/// written yet.
type ToWrite = (u64, Seqs, Hashes);

impl Progress {
    /// Every change up to this one was acknowledged or dead-lettered.
    fn cursor(&self) -> u64 {
        let first = match (self.in_flight.first().copied(), self.owed.floor()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        first.map(|s| s - 1).unwrap_or(self.read)
    }

    fn finish(&mut self, seq: u64, hashes: Hashes) {
        self.in_flight.remove(&seq);
        self.owed.sent(seq);
        self.finished.insert(seq, hashes);
        self.unsaved = true;
    }

    /// Whether a stop or reload recorded this change as acknowledged; it is then done,
    /// and not sent again. Taken off the list: a second call answers false.
    fn take_acked(&mut self, seq: u64) -> bool {
        if self.ahead.remove(&seq) {
            self.finished.insert(seq, Vec::new());
            return true;
        }
        false
    }

    /// The operator skipped the changes read from now on up to `through`: none is sent.
    /// `read_through`: moved past them at once, or (behind a change in flight whose
    /// objects one of them may touch) read one by one as skipped.
    fn skip(&mut self, through: u64, read_through: bool) {
        self.ahead.retain(|&s| s > through);
        if read_through {
            self.read = self.read.max(through);
            self.skipped.remove_through(through);
        } else if through > self.read {
            self.skipped.extend(&Seqs::skipped(&[(self.read, through)]));
        }
    }

    /// Whether the operator skipped this change at a hold (a range a stop left above the
    /// cursor); it is then done, and not sent.
    fn was_skipped(&self, seq: u64) -> bool {
        self.skipped.contains(seq)
    }

    /// Past a skipped range the read has reached, at once: read change by change, a
    /// million skipped changes were each fetched to be dropped. (Not while a change read
    /// before it is owed a repair: [`follow_log`]'s `owed`.)
    fn read_past_skipped(&mut self) {
        if let Some(end) = self.skipped.end_of(self.read + 1) {
            self.read = end;
        }
    }

    /// What to write, when the cursor moved or a change finished since the last write.
    /// Hashes are written as their changes finish, even above the cursor: a change
    /// starts only once every earlier change of its objects is done, so its hash is the
    /// latest acknowledged state of those objects.
    fn take(&mut self) -> Option<ToWrite> {
        let cursor = self.cursor();
        if cursor <= self.persisted && !self.unsaved {
            return None;
        }
        let finished = std::mem::take(&mut self.finished);
        let mut hashes = Vec::new();
        for (seq, h) in finished {
            hashes.extend(h);
            if seq > cursor {
                self.done.insert(seq);
            }
        }
        self.done.remove_through(cursor);
        self.persisted = cursor;
        self.unsaved = false;
        let mut acked = self.done.clone();
        acked.extend(&self.ahead.iter().copied().collect());
        Some((cursor, acked, hashes))
    }
}

/// Follow the change log with a sliding window of changes in flight.
///
/// A change starts as soon as every earlier change touching one of its objects is done, so
/// a slow or retrying object holds one slot, not the connector. The cursor is the highest
/// sequence number below which every change was acknowledged or dead-lettered; it is
/// written at most every `CURSOR_EVERY` while busy (a lost cursor write only means an
/// idempotent replay), and when the connector goes idle or stops.
async fn follow_log(ctx: &Arc<Ctx>, tenant: &str) -> Result<(), StoreError> {
    const CURSOR_EVERY: Duration = Duration::from_millis(200);
    let window = (ctx.config.concurrency * 32).clamp(BATCH as usize, 8 * BATCH as usize);
    let cursor_name = ctx.cursor_name();
    // Only a OneRoster body names a user's manager.
    let fans_out = matches!(ctx.target, Target::OneRoster { .. });
    let classes = ctx.state_sends_classes();
    let mut durable = ctx.store.watch_durable(tenant);
    // A reconciliation reads the store until this run saves.
    ctx.publish_acked(None);
    let start = ctx.store.cursor(tenant, &cursor_name)?;
    let mut progress = Progress {
        read: start,
        persisted: start,
        in_flight: Default::default(),
        finished: BTreeMap::new(),
        done: Seqs::default(),
        unsaved: false,
        ahead: ctx
            .store
            .acked_above(tenant, &cursor_name)?
            .into_iter()
            .filter(|&s| s > start)
            .collect(),
        skipped: {
            let mut skipped = Seqs::skipped(&ctx.store.guard_skipped(tenant, &cursor_name)?);
            skipped.remove_through(start);
            skipped
        },
        owed: Owed::default(),
    };
    let save = |progress: &mut Progress| {
        let taken = progress.take();
        let (store, cursor_name) = (&ctx.store, &cursor_name);
        async move {
            match taken {
                Some((cursor, acked, hashes)) => {
                    let saved = hashes.clone();
                    store
                        .record_progress(tenant, cursor_name, cursor, recorded(&acked), hashes)
                        .await?;
                    // Written: the store answers for them now, unless a later change of
                    // the same object finished meanwhile with another hash.
                    let mut unsaved = ctx.unsaved.lock().unwrap_or_else(|e| e.into_inner());
                    for (key, hash) in saved {
                        if unsaved.get(&key) == Some(&hash) {
                            unsaved.remove(&key);
                        }
                    }
                    ctx.publish_acked(Some(Acked {
                        cursor,
                        above: Arc::new(acked),
                    }));
                    Ok(())
                }
                None => Ok(()),
            }
        }
    };
    // The latest change of each object still in flight: what a new change must wait for.
    let mut latest: HashMap<String, (u64, watch::Receiver<bool>)> = HashMap::new();
    let mut running = FuturesUnordered::new();
    let mut last_write = std::time::Instant::now();
    let mut guard = ctx.guard_at(start).await?;
    let mut approvals = ctx.live.approvals.subscribe();
    // Held at this change: nothing from it on is read until the operator resumes.
    let mut held = false;
    // Changes cut off by the stop, not acknowledged.
    let mut given_up = 0usize;
    loop {
        let upto = *durable.borrow_and_update();
        if !progress.skipped.any_above(progress.read) {
            progress.owed.read_past();
        }
        if progress.owed.is_empty() {
            progress.read_past_skipped();
        }
        // Refill in large reads: a read per finished change would cost more than the send.
        let room = progress.in_flight.len() <= window / 2;
        if room && !held && progress.read < upto {
            let (read, n) = (
                progress.read,
                ((upto - progress.read) as usize).min(window - progress.in_flight.len()),
            );
            let events = {
                let (store, tenant) = (ctx.store.clone(), tenant.to_owned());
                blocking(move || {
                    store
                        .changes_through(&tenant, read, upto, n)?
                        .into_iter()
                        .map(|ev| {
                            let reports = if fans_out {
                                reports_of(&store, &tenant, &ev)?
                            } else {
                                vec![]
                            };
                            Ok((ev, reports))
                        })
                        .collect::<Result<Vec<_>, StoreError>>()
                })
                .await?
            };
            if events.is_empty() {
                // Compacted away below the watermark: nothing to send there.
                progress.read = upto;
            }
            for (ev, reports) in events {
                let keys = object_keys(&ev, &reports, classes);
                let writes = written_keys(&ev, &reports, classes);
                if progress.was_skipped(ev.seq) {
                    progress.read = ev.seq;
                    // Sent as it stands before a stop: not again.
                    if !progress.take_acked(ev.seq)
                        && progress
                            .owed
                            .send_skipped(ev.seq, &writes, ev.resource_type == "User")
                    {
                        let (tx, rx) = watch::channel(false);
                        let waits = ctx.waits_for(&keys, &mut latest, ev.seq, &rx, |k| {
                            writes.iter().any(|w| w == k)
                        });
                        progress.in_flight.insert(ev.seq);
                        running.push(ctx.deliver_after(ev, reports, waits, tx, true));
                    }
                    continue;
                }
                // Asked once: the answer takes the change off the list.
                let acked = progress.take_acked(ev.seq);
                if let Some(g) = guard.as_mut() {
                    if acked {
                        g.sent(&ev);
                    } else if let Some(h) = g.check(&ev, tenant, ctx.name()) {
                        // Read again once resumed, from the change before it.
                        approvals.borrow_and_update();
                        ctx.live.hold(&h.reason);
                        held = true;
                        break;
                    }
                }
                progress.read = ev.seq;
                // Acknowledged before a stop, it may still have landed after the skip.
                if progress.skipped.any_above(ev.seq) {
                    progress.owed.owe(writes.iter().cloned(), ev.seq);
                }
                if acked {
                    continue;
                }
                let (tx, rx) = watch::channel(false);
                let waits = ctx.waits_for(&keys, &mut latest, ev.seq, &rx, |_| true);
                progress.in_flight.insert(ev.seq);
                progress.owed.sending(ev.seq, writes);
                running.push(ctx.deliver_after(ev, reports, waits, tx, false));
            }
            continue;
        }
        let idle = running.is_empty();
        if idle || last_write.elapsed() >= CURSOR_EVERY {
            save(&mut progress).await?;
            last_write = std::time::Instant::now();
        }
        tokio::select! {
            Some((seq, keys, r)) = running.next(), if !idle => {
                match r? {
                    // Stopping: drain, as below. Counted with those the drain gives up:
                    // uncounted, a stop that cut off one change said only "stopped
                    // cleanly".
                    Delivered::Cancelled => {
                        given_up += 1;
                        break;
                    }
                    Delivered::Done(h) => progress.finish(seq, h),
                    Delivered::DeadLettered => progress.finish(seq, vec![]),
                }
                for k in keys {
                    if latest.get(&k).is_some_and(|(s, _)| *s == seq) {
                        latest.remove(&k);
                    }
                }
            }
            r = durable.changed(), if room && !held => if r.is_err() { return Ok(()) },
            r = approvals.changed(), if held => {
                if r.is_err() {
                    return Ok(());
                }
                let approval = *approvals.borrow_and_update();
                if let Some(g) = guard.as_mut() {
                    let skipped_after = approval.skip.then_some(progress.read);
                    let through = ctx.record_approval(g, skipped_after).await?;
                    if approval.skip {
                        // Read past them: the cursor moves over them as if sent, once
                        // the changes still in flight before them are done. Until then
                        // the store keeps them as skipped (`set_guard_approved`).
                        progress.owed.owe_in_flight();
                        progress.skip(through, progress.owed.is_empty());
                        progress.unsaved = true;
                        save(&mut progress).await?;
                    }
                    ctx.live.applied.send_replace((approval.n, through));
                }
                held = false;
            }
            // Behind one slow change nothing else may come for a long time: what finished
            // is saved anyway (a crash would send it again, and a reconciliation would
            // take it for still waiting).
            () = tokio::time::sleep_until((last_write + CURSOR_EVERY).into()), if progress.unsaved => {}
            _ = ctx.cancel.cancelled() => break,
        }
    }
    // Stopping. No change starts, but those already started get up to STOP_DRAIN to
    // finish (a request waiting out a pause or a backoff gives up), so that what a
    // target took is not sent again after the start; a change that does not finish in
    // time is, whole. Then keep what is acknowledged.
    let draining = tokio::time::Instant::now();
    let deadline = tokio::time::sleep(STOP_DRAIN);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = running.next() => match next {
                Some((seq, _, r)) => match r? {
                    Delivered::Done(h) => progress.finish(seq, h),
                    Delivered::DeadLettered => progress.finish(seq, vec![]),
                    Delivered::Cancelled => given_up += 1,
                },
                None => break,
            },
            () = &mut deadline => break,
        }
    }
    // Said, or "stopped cleanly" reads as if the target had everything.
    let unfinished = given_up + running.len();
    if unfinished > 0 {
        // How long the stop waited, not the most it may: one whose requests were waiting
        // out a backoff gives up at once, and `seconds=3` read as three seconds spent.
        let waited_ms = draining.elapsed().as_millis() as u64;
        // A retired connector has no next start: promising one hid from an operator who
        // removed a file by mistake that compaction would now drop these changes.
        if ctx.live.retiring.load(Ordering::Acquire) {
            tracing::warn!(
                changes = unfinished,
                waited_ms,
                "The stop left changes not yet acknowledged: cut off in flight, or still waiting their turn (a slow target, a request waiting out a retry). The connector is being retired, so they go out only if a file with its name brings it back before compaction drops them."
            );
        } else {
            tracing::warn!(
                changes = unfinished,
                waited_ms,
                "The stop left changes not yet acknowledged: cut off in flight, or still waiting their turn (a slow target, a request waiting out a retry); each goes out, whole, at the next start."
            );
        }
    }
    drop(running);
    save(&mut progress).await
}

/// How long a stopping connector lets the changes it started finish. The connectors stop
/// side by side after the HTTP server's drain (5 s), so a stop stays within the 10 s
/// README promises.
const STOP_DRAIN: Duration = Duration::from_secs(3);

/// Wait until no change has come for `debounce_ms`, so a burst becomes one write; but
/// no longer than ten times that after the first, so a sync that runs for an hour still
/// gets its files written along the way. False if cancelled or the store went away.
async fn settled(
    durable: &mut tokio::sync::watch::Receiver<u64>,
    debounce_ms: u64,
    cancel: &CancellationToken,
) -> bool {
    let quiet = Duration::from_millis(debounce_ms);
    let latest = tokio::time::Instant::now() + quiet * 10;
    loop {
        let until = (tokio::time::Instant::now() + quiet).min(latest);
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return true,
            r = durable.changed() => {
                if r.is_err() {
                    return false;
                }
                if tokio::time::Instant::now() >= latest {
                    return true;
                }
            }
            _ = cancel.cancelled() => return false,
        }
    }
}

/// The first change after `guarded`, up to `upto`, that the guard holds; `guarded` moves
/// to the change before it, or to `upto`. A CSV connector writes every change at once, so
/// the guard reads them all before a write. Reads the store in the calling thread.
fn first_held(
    store: &Store,
    tenant: &str,
    connector: &str,
    guard: &mut guard::Guard,
    guarded: &mut u64,
    upto: u64,
) -> Result<Option<guard::Held>, StoreError> {
    while *guarded < upto {
        let events = store.changes(tenant, *guarded, BATCH as usize)?;
        if events.is_empty() {
            *guarded = upto;
            break;
        }
        for ev in events {
            if let Some(h) = guard.check(&ev, tenant, connector) {
                return Ok(Some(h));
            }
            *guarded = ev.seq;
        }
    }
    Ok(None)
}

/// A CSV connector's guard and the last change it judged.
type Judged = Option<(guard::Guard, u64)>;

/// [`first_held`] off the async threads, for the connector's own guard (taken and given
/// back).
async fn judge(
    ctx: &Ctx,
    judged: &mut Judged,
    upto: u64,
) -> Result<Option<guard::Held>, StoreError> {
    let Some((mut g, mut at)) = judged.take() else {
        return Ok(None);
    };
    let (store, tenant, name) = (
        ctx.store.clone(),
        ctx.tenant().to_owned(),
        ctx.name().to_owned(),
    );
    let (g, at, held) = blocking(move || {
        let held = first_held(&store, &tenant, &name, &mut g, &mut at, upto)?;
        Ok((g, at, held))
    })
    .await?;
    *judged = Some((g, at));
    Ok(held)
}

/// Held by its guard at a write: wait for the operator's resume, and record it. The files
/// are written whole, from the store as it is: skipping the held changes is sending them.
/// False when the connector stops first.
async fn csv_held(
    ctx: &Ctx,
    guard: &mut guard::Guard,
    approvals: &mut watch::Receiver<Approval>,
    reason: &str,
) -> Result<bool, StoreError> {
    approvals.borrow_and_update();
    ctx.live.hold(reason);
    tokio::select! {
        r = approvals.changed() => if r.is_err() { return Ok(false) },
        _ = ctx.cancel.cancelled() => return Ok(false),
    }
    let approval = *approvals.borrow_and_update();
    let through = ctx.record_approval(guard, None).await?;
    ctx.live.applied.send_replace((approval.n, through));
    Ok(true)
}

/// The task of a CSV connector: write the files after changes settle, or on a schedule.
async fn run_csv(ctx: Arc<Ctx>) -> Result<(), StoreError> {
    let Target::Csv { settings } = &ctx.target else {
        return Ok(());
    };
    let tenant = ctx.tenant().to_owned();
    let cursor_name = ctx.cursor_name();
    if !ctx.config.dry_run {
        let s = settings.clone();
        // A directory on a hung mount must not stall a worker thread.
        let _ = tokio::task::spawn_blocking(move || s.remove_stale_staged()).await;
    }
    let mut durable = ctx.store.watch_durable(&tenant);
    let schedule = settings
        .schedule
        .as_deref()
        .and_then(|s| crate::config::parse_cron(s).ok());
    ctx.live.set_state("running");
    let mut backoff = ctx.backoff();
    let mut streak = Streak::default();
    // A scheduled write is owed from the moment it is due until it succeeds, and the
    // store keeps that across a stop, a reload or a crash: a write cut short or failed is
    // tried again after its backoff or at the next start, not at the next scheduled time
    // (a nightly file would miss its night). A restore marks every connector's files owed,
    // scheduled or not: they held what the restore lost (store::restored).
    let mut owed = ctx.store.write_due(&tenant, &cursor_name)?
        // One that had not written before the backup (or came after it) has no cursor
        // for the restore to mark, and may have written what the restore lost.
        || (schedule.is_some()
            && ctx.store.was_restored()?
            && !ctx.store.has_cursor(&tenant, &cursor_name)?);
    if let Some(cron) = &schedule
        && settings.catch_up
        && !owed
        && !ctx.config.dry_run
    {
        let last = ctx.store.last_scheduled_write(&tenant, &cursor_name)?;
        if let Some(due) = crate::schedule::missed_run(cron, chrono_tz::UTC, last) {
            tracing::info!(
                missed = %rfc3339(due),
                last_write = %last.map(rfc3339).unwrap_or_default(),
                "A scheduled write came due while the daemon was down; writing now (catch_up)."
            );
            ctx.store.mark_write_due(&tenant, &cursor_name).await?;
            owed = true;
        }
    }
    // Files missing at the start of an on-change connector that has something to write
    // (a reload renamed them or moved the directory, or someone removed them) are
    // written now, not at the next change of the roster, which may be hours away. A
    // scheduled connector's consumer expects them at the scheduled time.
    if schedule.is_none() && !owed && !ctx.config.dry_run && *durable.borrow() > 0 {
        let s = settings.clone();
        let missing = tokio::task::spawn_blocking(move || s.files().iter().any(|f| !f.exists()))
            .await
            .unwrap_or(false);
        if missing {
            tracing::info!(dir = %settings.dir.display(), "The connector's files are missing; writing them now.");
            owed = true;
        }
    }
    // The time of the last scheduled write, so that a clock stepped back does not write again.
    let mut fired = None;
    // The last change the guard has read: the files hold every change up to the cursor.
    let guarded = ctx.store.cursor(&tenant, &cursor_name)?;
    let mut judged: Judged = ctx.guard_at(guarded).await?.map(|g| (g, guarded));
    let mut approvals = ctx.live.approvals.subscribe();
    loop {
        match &schedule {
            _ if owed => {}
            Some(cron) => {
                use crate::schedule::Wait;
                // A connector's own schedule is read in UTC (documented in csv.toml.example).
                let shown = |next| ctx.live.health().next_write_at = Some(next);
                let waited =
                    crate::schedule::wait_next(cron, chrono_tz::UTC, fired, &ctx.cancel, shown)
                        .await;
                ctx.live.health().next_write_at = None;
                match waited {
                    Wait::Due(at) => fired = Some(at),
                    Wait::Never => {
                        ctx.live
                            .pause_until_resumed("the schedule has no next run", None);
                        return Ok(());
                    }
                    Wait::Cancelled => return Ok(()),
                }
                if !ctx.config.dry_run {
                    ctx.store.mark_write_due(&tenant, &cursor_name).await?;
                    owed = true;
                }
            }
            None => {
                let cursor = ctx.store.cursor(&tenant, &cursor_name)?;
                if *durable.borrow_and_update() <= cursor {
                    tokio::select! {
                        r = durable.changed() => if r.is_err() { return Ok(()) },
                        _ = ctx.cancel.cancelled() => return Ok(()),
                    }
                    continue;
                }
                if !settled(&mut durable, settings.debounce_ms, &ctx.cancel).await {
                    return Ok(());
                }
            }
        }
        let upto = *durable.borrow_and_update();
        if let Some(h) = judge(&ctx, &mut judged, upto).await? {
            let Some((g, _)) = judged.as_mut() else {
                return Ok(());
            };
            if !csv_held(&ctx, g, &mut approvals, &h.reason).await? {
                return Ok(());
            }
            // Written at the next turn: owed if scheduled, the cursor behind if not.
            continue;
        }
        if ctx.config.dry_run {
            tracing::info!(dir = %settings.dir.display(), "Dry run: would write the CSV files.");
            // Still owed in the store, for when the dry run ends; here, said once rather
            // than at every turn of the loop.
            owed = false;
        } else {
            let (store, t, s, stop) = (
                ctx.store.clone(),
                tenant.clone(),
                settings.clone(),
                ctx.cancel.clone(),
            );
            let name = ctx.name().to_owned();
            let mut taken = judged.take();
            let written = tokio::task::spawn_blocking(move || {
                // The files read the store as it stands while they are written: the
                // guard judges what was logged meanwhile too, before they replace the
                // old ones.
                let mut gate = |through: u64| match taken.as_mut() {
                    Some((g, at)) => match first_held(&store, &t, &name, g, at, through)? {
                        Some(h) => Err(CsvError::Withheld {
                            seq: h.seq,
                            reason: h.reason,
                        }),
                        None => Ok(()),
                    },
                    None => Ok(()),
                };
                let written = crate::connectors::csv::write_snapshot_gated(
                    &store,
                    &t,
                    &s,
                    crate::connectors::csv::Snapshot::Replace,
                    &stop,
                    &mut gate,
                );
                (written, taken)
            })
            .await;
            let written = match written {
                Ok((written, taken)) => {
                    judged = taken;
                    Ok(written)
                }
                Err(e) => {
                    // The guard went with the thread: counted again from the store.
                    let cursor = ctx.store.cursor(&tenant, &cursor_name)?;
                    judged = ctx.guard_at(cursor).await?.map(|g| (g, cursor));
                    Err(e)
                }
            };
            if let Ok(Err(CsvError::Withheld { reason, .. })) = &written {
                let Some((g, _)) = judged.as_mut() else {
                    return Ok(());
                };
                if !csv_held(&ctx, g, &mut approvals, reason).await? {
                    return Ok(());
                }
                continue;
            }
            if let Ok(Err(CsvError::Stopped)) = written {
                // No failure. The cursor stays, and a scheduled write stays owed, so the
                // next start writes them.
                tracing::info!(
                    "CSV write cut short by the stop; the files stand as they were, and the next start writes them."
                );
                return Ok(());
            }
            let written = written
                .map_err(|e| StoreError::from_join(e).to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match written {
                Ok(report) => {
                    let report: crate::connectors::csv::SnapshotReport = report;
                    if owed {
                        ctx.store
                            .scheduled_write_done(&tenant, &cursor_name, Utc::now())
                            .await?;
                        owed = false;
                    }
                    ctx.live.success();
                    // `rosterd status` counts a write as delivered; so does the metric.
                    counters::delivered(&tenant, ctx.name());
                    backoff = ctx.backoff();
                    tracing::info!(users = report.users, "CSV files written.");
                }
                Err(reason) => {
                    counters::retried(&tenant, ctx.name());
                    ctx.live.failure(
                        &mut streak,
                        &reason,
                        None,
                        ctx.config.retry.pause_after_failures,
                        ctx.config.retry.pause(),
                    );
                    let delay = backoff.next().unwrap_or(ctx.config.retry.max_delay());
                    // Before any await: /status never shows the failure without its retry.
                    ctx.live.health().next_retry = Some(Deadline::after(delay));
                    // `failure` above said it at WARN, with the reason, as for any target;
                    // a second line at ERROR per attempt counted double in `-p err`.
                    tracing::debug!(
                        reason = reason.as_str(),
                        retry_in_ms = delay.as_millis() as u64,
                        "Cannot write the CSV files; trying again."
                    );
                    // Still owed if scheduled, the cursor still behind if not: the next
                    // turn of the loop writes them.
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = ctx.cancel.cancelled() => return Ok(()),
                    }
                    if !ctx.live.wait_unpaused(&ctx.cancel).await {
                        return Ok(());
                    }
                    continue;
                }
            }
        }
        ctx.store
            .advance_cursor(&tenant, &cursor_name, upto, vec![])
            .await?;
    }
}

struct Running {
    config: ConnectorConfig,
    live: Arc<Live>,
    ctx: Option<Arc<Ctx>>,
    /// Why an enabled connector is not running (its file names a secret the
    /// environment lacks), as /status `connector_errors` lists it.
    not_started: Option<String>,
    cancel: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

/// A running connector, as found by name.
struct Found {
    config: ConnectorConfig,
    live: Arc<Live>,
    ctx: Option<Arc<Ctx>>,
    not_started: bool,
}

/// All connectors of the daemon. Reloading replaces the ones whose file changed and
/// leaves the others running.
pub struct Dispatcher {
    store: Store,
    env: EnvFn,
    client: reqwest::Client,
    shutdown: CancellationToken,
    running: Mutex<BTreeMap<String, Running>>,
    load_errors: Mutex<Vec<String>>,
    /// The files behind `load_errors`: their connectors still hold back compaction.
    unloaded: Mutex<Vec<Unloaded>>,
    /// Running connectors whose file no longer loads (name → why): they keep running on
    /// the config they were started with until the file is fixed or removed.
    broken: Mutex<BTreeMap<String, String>>,
    /// Of those, the files that load but whose connector cannot start as they now read
    /// (file, error): the loader does not list them, yet they are errors to report.
    unstartable: Mutex<Vec<(std::path::PathBuf, String)>>,
    /// The connectors directory last applied (see [`Loaded::listed`]).
    dir_identity: Mutex<Option<crate::connectors::DirIdentity>>,
    /// The configured tenants, whose stored cursors are looked through for connectors
    /// that are not loaded.
    tenants: Vec<String>,
    /// Every connector task, so that a stop waits for all of them: a reload cut short by
    /// the stop drops its own wait for the connectors it was stopping.
    tasks: tokio_util::task::TaskTracker,
    /// What connectors a reload stopped had counted (delivered, retries, last success), by tenant and
    /// name: started again, by that reload or a later one (its file put back), a
    /// connector goes on from them, as its metrics do.
    counted: Mutex<HashMap<(String, String), Counted>>,
}

/// What a connector counted before a reload stopped it (see [`Live::counts`]).
#[derive(Clone, Copy)]
struct Counted {
    delivered: u64,
    retries: u64,
    last_success_at: Option<DateTime<Utc>>,
}

impl Dispatcher {
    pub fn new(
        store: Store,
        env: EnvFn,
        tenants: Vec<String>,
        shutdown: CancellationToken,
    ) -> Arc<Dispatcher> {
        let client = reqwest::Client::builder()
            .user_agent(format!("rosterd/{}", crate::VERSION))
            .pool_max_idle_per_host(256)
            // A redirect is the target's answer, not followed (see `http::classify`).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Arc::new(Dispatcher {
            store,
            env,
            client,
            shutdown,
            running: Mutex::new(BTreeMap::new()),
            load_errors: Mutex::new(Vec::new()),
            unloaded: Mutex::new(Vec::new()),
            broken: Mutex::new(BTreeMap::new()),
            unstartable: Mutex::new(Vec::new()),
            dir_identity: Mutex::new(None),
            tenants,
            tasks: tokio_util::task::TaskTracker::new(),
            counted: Mutex::new(HashMap::new()),
        })
    }

    fn broken(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.broken.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unstartable_lock(&self) -> std::sync::MutexGuard<'_, Vec<(std::path::PathBuf, String)>> {
        self.unstartable.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unloaded_lock(&self) -> std::sync::MutexGuard<'_, Vec<Unloaded>> {
        self.unloaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connector files that did not load at the last start or reload (a copy: the
    /// callers go on to read the store).
    fn unloaded(&self) -> Vec<Unloaded> {
        self.unloaded_lock().clone()
    }

    /// The file of each connector now running (or set up but disabled), by name: on a
    /// reload these keep their names against newcomers.
    pub fn running_files(&self) -> BTreeMap<String, std::path::PathBuf> {
        self.running()
            .iter()
            .map(|(n, r)| (n.clone(), r.config.file.clone()))
            .collect()
    }

    /// Apply a freshly loaded connectors directory: stop connectors whose file changed
    /// or was removed, start new and changed ones, and lift an "until resumed" pause of
    /// the ones left running (a reload is how an operator says "I fixed it"; the pause
    /// messages promise it).
    ///
    /// What does not load does not stop what runs: a running connector whose file is now
    /// broken keeps its old config (as a broken bundle does), and so does one whose
    /// changed file cannot start (a secret the daemon's environment lacks: the new
    /// connector is built before the old one stops). A directory that cannot be read
    /// changes nothing, nor does another directory in which no connector file loads while
    /// connectors run. Only a removed file stops its connector, and retires it: its cursor
    /// then no longer holds back compaction.
    /// Returns the errors, also kept for /status: files that do not load, changed files
    /// whose connector cannot start, and connectors not started.
    pub async fn apply(&self, loaded: Loaded) -> Vec<String> {
        let file_errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        if loaded.dir_unreadable {
            for e in &file_errors {
                tracing::error!(error = %e, "Connectors not reloaded: their directory cannot be read. Every connector keeps running as loaded before.");
            }
            return self.set_errors(file_errors);
        }
        {
            let mut last = self.dir_identity.lock().unwrap_or_else(|e| e.into_inner());
            let running_count = self.running().len();
            let identity = loaded.listed.as_ref().and_then(|(_, id)| *id);
            let swapped = last.is_some() && *last != identity;
            if let Some((dir, _)) = loaded
                .listed
                .as_ref()
                .filter(|_| swapped && running_count > 0 && loaded.connectors.is_empty())
            {
                let mut errors = vec![format!(
                    "the connectors directory {} is now another directory, with no connector file that loads, while {running_count} connector(s) run: taken for a volume not mounted or a link pointed elsewhere, not for the removal of every file. Every connector keeps running as loaded before. To remove them all, remove their files from the directory they were loaded from, or restart rosterd (their stored cursors are then listed as not loaded until `rosterd retire`)",
                    dir.display()
                )];
                tracing::error!(error = %errors[0], "Connectors not reloaded: their directory is another, and nothing in it loads.");
                errors.extend(file_errors);
                return self.set_errors(errors);
            }
            *last = identity;
        }
        // Which running connector each unloadable file is, if any: by file, or by the
        // name the file still gives.
        let mut broken = BTreeMap::new();
        {
            let running = self.running();
            for (e, u) in loaded.errors.iter().zip(&loaded.unloaded) {
                let of = running.values().find(|r| {
                    r.config.file == u.file
                        || (u.name.as_deref() == Some(r.config.name.as_str())
                            && u.tenant.as_deref().is_none_or(|t| t == r.config.tenant))
                });
                match of {
                    // A rejected duplicate names a connector that still loads from its
                    // own file: that one is not broken.
                    Some(r) if !loaded.connectors.iter().any(|c| c.name == r.config.name) => {
                        tracing::error!(tenant = %r.config.tenant, connector = %r.config.name, error = %e, "Connector file does not load; the connector keeps running on its previously loaded config until the file is fixed or removed.");
                        broken.insert(r.config.name.clone(), e.to_string());
                    }
                    _ => tracing::error!(error = %e, "Connector file not loaded; the others are."),
                }
            }
        }
        *self.unloaded_lock() = loaded.unloaded;
        let wanted: BTreeMap<String, ConnectorConfig> = loaded
            .connectors
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();
        // Every new or changed connector is built before anything stops: one that cannot
        // start must not take down the connector running on the file's previous version.
        let mut prepared = BTreeMap::new();
        let mut unstartable = Vec::new();
        {
            let running = self.running();
            for (name, config) in &wanted {
                let old = running.get(name);
                if old.is_some_and(|r| r.config == *config) {
                    continue;
                }
                let built = self.prepare(config);
                match (&built, old) {
                    (Err(e), Some(old)) if old.ctx.is_some() => {
                        let error = format!(
                            "{}: its connector cannot start as the file now reads, so it keeps running on its previous config: {}",
                            config.file.display(),
                            e.explained()
                        );
                        tracing::error!(tenant = %config.tenant, connector = %name, %error, "Connector file changed, but the connector cannot start as it now reads; it keeps running on its previously loaded config until the file is fixed or removed.");
                        broken.insert(name.clone(), error.clone());
                        unstartable.push((config.file.clone(), error));
                    }
                    _ => {
                        prepared.insert(name.clone(), built);
                    }
                }
            }
        }
        // They stay listed while they stop (up to STOP_DRAIN, side by side): meanwhile
        // /status shows them, and `retire` refuses them, as still loaded.
        let (stopping, handles, held): (
            Vec<ConnectorConfig>,
            Vec<JoinHandle<()>>,
            std::collections::HashSet<String>,
        ) = {
            let mut running = self.running();
            let mut handles = Vec::new();
            let mut configs = Vec::new();
            let mut held = std::collections::HashSet::new();
            for (n, r) in running.iter_mut() {
                if broken.contains_key(n) || wanted.get(n) == Some(&r.config) {
                    continue;
                }
                if !wanted.contains_key(n) {
                    r.live.retiring.store(true, Ordering::Release);
                }
                r.cancel.cancel();
                handles.extend(r.handle.take());
                configs.push(r.config.clone());
                if r.live.held() {
                    held.insert(n.clone());
                }
            }
            (configs, handles, held)
        };
        *self.broken() = broken;
        *self.unstartable_lock() = unstartable;
        for c in &stopping {
            let (tenant, name) = (&c.tenant, &c.name);
            if let Some(new) = wanted.get(name) {
                let reshaped = match (&c.oneroster, &new.oneroster) {
                    (Some(old), Some(new)) => old.reshaped(new),
                    _ => vec![],
                };
                if held.contains(name) && new.guard != c.guard {
                    // Started again, it counts by the new table: a higher limit, or none,
                    // lets go what the old one held, with no resume.
                    tracing::warn!(%tenant, connector = %name, "Stopping connector to start it again: its file changed its [guard] while it held changes. It holds again only if the new [guard] would; otherwise the held changes go out now.");
                } else if reshaped.is_empty() {
                    tracing::info!(%tenant, connector = %name, "Stopping connector to start it again: its file changed.");
                    // Files it no longer writes stay as they were: a consumer still
                    // reading them reads a roster that stopped moving.
                    if let (Some(old), Some(new)) = (c.csv.clone(), new.csv.clone()) {
                        // Off the runtime: a directory on a hung mount.
                        let left: Vec<String> = tokio::task::spawn_blocking(move || {
                            let kept = new.files();
                            old.files()
                                .into_iter()
                                .filter(|f| !kept.contains(f) && f.exists())
                                .map(|f| f.display().to_string())
                                .collect()
                        })
                        .await
                        .unwrap_or_default();
                        if !left.is_empty() {
                            tracing::warn!(%tenant, connector = %name, files = %left.join(", "), "The connector no longer writes these files; they stay as they were, and stop following the roster. Remove them once nothing reads them.");
                        }
                    }
                } else {
                    tracing::warn!(%tenant, connector = %name, keys = %reshaped.join(", "), "Stopping connector to start it again: its file changes what it sends for objects the target already has, which stay as they are until a reconciliation: run `rosterd reconcile --tenant {tenant} --connector {name}` (or wait for the scheduled one).");
                }
                continue;
            }
            // Said once it has stopped (below), with what it left behind.
        }
        futures_util::future::join_all(handles).await;
        {
            let mut running = self.running();
            for c in &stopping {
                // Read once it has stopped, with what it finished while stopping.
                if let Some(r) = running.remove(&c.name) {
                    let mut counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
                    counted.insert((c.tenant.clone(), c.name.clone()), r.live.counts());
                }
            }
        }
        // A changed file may be the fix (a new credential, another URL): its connector
        // starts sending again. A removed one leaves nothing to pause.
        for c in &stopping {
            match self.store.refusal_pause(&c.tenant, &c.name) {
                Ok(None) => {}
                Ok(Some(_)) => match self.store.set_refusal_pause(&c.tenant, &c.name, None).await {
                    Ok(()) => {
                        tracing::info!(tenant = %c.tenant, connector = %c.name, "The connector's pause for its target's refusals ends with the change of its file.")
                    }
                    Err(e) => {
                        tracing::error!(tenant = %c.tenant, connector = %c.name, error = %e, "Cannot end the connector's pause for refusals in the store; it starts paused.")
                    }
                },
                Err(e) => {
                    tracing::error!(tenant = %c.tenant, connector = %c.name, error = %e, "Cannot read whether the connector was paused for refusals.")
                }
            }
        }
        for c in stopping.iter().filter(|c| !wanted.contains_key(&c.name)) {
            let (tenant, name) = (&c.tenant, &c.name);
            counters::connector_removed(tenant, name);
            if let Err(e) = self.store.set_retired(tenant, name, true).await {
                tracing::error!(%tenant, connector = %name, error = %e, "Cannot record the connector as retired; its cursor keeps holding back compaction.");
                continue;
            }
            // At WARN with the counts, as `rosterd retire` says it: a file removed by
            // mistake (an editor's rename, `mv x.toml x.toml.bak`) got an INFO line, and
            // nothing afterwards showed the changes compaction would drop, nor the dead
            // letters (refused requests, personal data) left in the store.
            let undelivered = self.undelivered(tenant, name);
            let dead_letters = self.store.dead_letter_count(tenant, name).unwrap_or(0);
            // Renamed in place: the same file now names another connector, which starts
            // on a cursor of its own (from the oldest change the log holds, for a new
            // name); the operator should hear that, not that the file went away.
            let kept = match dead_letters {
                0 => String::new(),
                n => format!(
                    " Its {n} dead letter(s) stay in the store until discarded (`rosterd dead-letters --tenant {tenant} list {name}`, then `discard {name} --all`)."
                ),
            };
            let why = match wanted.values().find(|w| w.file == c.file) {
                Some(renamed) => format!(
                    "its file now names another connector, {}, which keeps its own cursor, dead letters and delivered hashes (a new name starts from the oldest change the log holds)",
                    renamed.name
                ),
                None => "its file was removed".to_owned(),
            };
            tracing::warn!(
                %tenant,
                connector = %name,
                file = %c.file.display(),
                undelivered,
                dead_letters,
                "Connector retired: {why}. Its cursor no longer holds back change-log compaction, which may now drop the {undelivered} change(s) it never delivered.{kept} A file with its name resumes it from its cursor."
            );
        }
        // Only pauses that wait for the operator (preflight refused, 410 Gone): a pause
        // for repeated failures ends by itself and then probes the target anyway.
        for r in self.running().values() {
            // A hold waits for the operator's word, which a reload for another reason
            // is not.
            if r.ctx.is_some()
                && !r.live.held()
                && r.live.health().pause == Some(Pause::UntilResumed)
            {
                r.live.resume("a reload");
            }
            // An operator who reloaded to lift it hears why it stays.
            if let Some(pause) = r.live.refusal_pause() {
                tracing::info!(tenant = %r.config.tenant, connector = %r.config.name, since = %rfc3339(pause.at), "The connector stays paused for its target's refusals: a reload lifts that only when it changes the connector's file; `rosterd resume` lifts it.");
            }
        }
        for (name, config) in wanted {
            if self.running().contains_key(&name) {
                continue;
            }
            if self
                .store
                .retired(&config.tenant)
                .is_ok_and(|r| r.contains(&name))
                && let Err(e) = self.store.set_retired(&config.tenant, &name, false).await
            {
                tracing::error!(tenant = %config.tenant, connector = %name, error = %e, "Cannot clear the connector's retirement.");
            }
            let built = prepared
                .remove(&name)
                .unwrap_or_else(|| self.prepare(&config));
            let counts = self
                .counted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(config.tenant.clone(), name.clone()));
            let r = self.start(config, built);
            // Started again, a connector goes on counting where it was, as its metrics
            // do: status and the dashboards disagreed from the first reload on.
            if let Some(counts) = counts {
                r.live.count_on_from(counts);
            }
            self.running().insert(name, r);
        }
        // Said at every start and reload: otherwise the change log just grows, and only
        // /status shows why.
        for u in self.unloaded_status().iter().filter(|u| u.file.is_none()) {
            tracing::warn!(
                tenant = %u.tenant,
                connector = %u.name,
                lag_events = u.lag_events,
                "No connector file names this stored cursor, so it holds back change-log compaction. Put its file back, or if it is gone for good: rosterd retire --tenant {} {}",
                u.tenant,
                u.name
            );
        }
        self.set_errors(file_errors)
    }

    /// Keep `file_errors` with the errors of connectors that cannot start for /status,
    /// and return them all. A connector not started stays so until its file changes or
    /// the daemon restarts, so every reload reports it again (and counts as failed), as
    /// it does a file that still does not load.
    fn set_errors(&self, mut errors: Vec<String>) -> Vec<String> {
        errors.extend(self.unstartable_lock().iter().map(|(_, e)| e.clone()));
        errors.extend(
            self.running()
                .values()
                .filter_map(|r| r.not_started.clone()),
        );
        *self.load_errors.lock().unwrap_or_else(|e| e.into_inner()) = errors.clone();
        errors
    }

    /// What `start` needs that can fail (the secrets, from the environment), checked
    /// before anything stops; `Ok(None)` for a disabled connector, which runs nothing.
    fn prepare(&self, config: &ConnectorConfig) -> Result<Option<Target>, StartError> {
        if !config.enabled {
            return Ok(None);
        }
        Target::build(config, &self.env).map(Some)
    }

    fn start(&self, config: ConnectorConfig, built: Result<Option<Target>, StartError>) -> Running {
        let cancel = self.shutdown.child_token();
        let target = match built {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Running {
                    live: Live::new(&config.tenant, &config.name, "disabled"),
                    config,
                    ctx: None,
                    not_started: None,
                    cancel,
                    handle: None,
                };
            }
            Err(e) => {
                let reason = format!("not started: {}", e.explained());
                tracing::error!(tenant = %config.tenant, connector = %config.name, reason = reason.as_str(), "Connector not started.");
                let live = Live::new(&config.tenant, &config.name, &reason);
                // The state says what to do; `last error` is the error alone.
                live.health().error(e.to_string());
                return Running {
                    not_started: Some(format!(
                        "{}: connector {:?} {reason}",
                        config.file.display(),
                        config.name
                    )),
                    live,
                    config,
                    ctx: None,
                    cancel,
                    handle: None,
                };
            }
        };
        counters::register_connector_counters(
            &config.tenant,
            &config.name,
            config.kind == Kind::Webhook,
        );
        let live = Live::new(&config.tenant, &config.name, "starting");
        if config.kind != Kind::Csv
            && let Some(pause) = self
                .store
                .refusal_pause(&config.tenant, &config.name)
                .unwrap_or_else(|e| {
                    tracing::error!(tenant = %config.tenant, connector = %config.name, error = %e, "Cannot read whether the connector was paused for refusals; it starts unpaused.");
                    None
                })
        {
            live.restore_refusal_pause(pause);
        }
        let ctx = Arc::new(Ctx {
            store: self.store.clone(),
            client: self.client.clone(),
            slots: Semaphore::new(config.concurrency),
            start_gate: tokio::sync::Mutex::new(()),
            config: config.clone(),
            target,
            live: live.clone(),
            cancel: cancel.clone(),
            acked: Mutex::new(None),
            repairs: Repairs::default(),
            unsaved: Mutex::new(HashMap::new()),
        });
        let span = ctx.span();
        let task_ctx = ctx.clone();
        let handle = self.tasks.spawn(
            async move {
                tracing::info!(dry_run = task_ctx.config.dry_run, "Connector started.");
                if let Some(pause) = task_ctx.live.refusal_pause() {
                    tracing::warn!(since = %rfc3339(pause.at), reason = pause.why.as_str(), "The connector starts paused until resumed, as it was when it stopped: its target refused everything.");
                }
                let (live, cancel) = (task_ctx.live.clone(), task_ctx.cancel.clone());
                supervised(&live, &cancel, || {
                    let ctx = task_ctx.clone();
                    async move {
                        match ctx.target {
                            Target::Csv { .. } => run_csv(ctx.clone()).await,
                            _ => run_http(ctx.clone()).await,
                        }
                    }
                })
                .await;
            }
            .instrument(span),
        );
        Running {
            config,
            live,
            ctx: Some(ctx),
            not_started: None,
            cancel,
            handle: Some(handle),
        }
    }

    /// Stop every connector; cursors stay where the last acknowledged batch left them.
    pub async fn stop_all(&self) {
        for r in std::mem::take(&mut *self.running()).into_values() {
            r.cancel.cancel();
        }
        // Side by side (each may take STOP_DRAIN to finish what it started), and with
        // those a reload cut short by the stop was stopping.
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The lowest cursor of the tenant's known connectors: running ones (enabled or not)
    /// and every stored cursor of a connector that is not loaded, for whatever reason
    /// (its file is broken, or missing since the last stop), unless it was retired by
    /// removing its file and reloading. The change log below it has been delivered
    /// everywhere it still has to go. `None` when nothing holds the log.
    pub fn lowest_cursor(&self, tenant: &str) -> Option<u64> {
        let mut running: Vec<u64> = Vec::new();
        for r in self
            .running()
            .values()
            .filter(|r| r.config.tenant == tenant)
        {
            running.push(
                self.store
                    .cursor(tenant, &cursor_name(&r.config))
                    .unwrap_or(0),
            );
            // A connector in dry run still owes its target what its real cursor has not
            // delivered: turned on to quiet a failing target, dry run let compaction drop
            // those changes, and the webhook events with them (a schedules audit lost
            // 21,841). A connector that never ran for real has no such cursor.
            if r.config.dry_run {
                match self.store.has_cursor(tenant, &r.config.name) {
                    Ok(false) => {}
                    Ok(true) => {
                        running.push(self.store.cursor(tenant, &r.config.name).unwrap_or(0))
                    }
                    Err(_) => return Some(0),
                }
            }
        }
        // A store error here must hold compaction back, not let it run free.
        let Ok(held) = self.held_cursors(tenant) else {
            return Some(0);
        };
        running
            .into_iter()
            .chain(held.into_iter().map(|h| h.cursor))
            .min()
    }

    /// The stored cursors of the tenant's connectors that are not loaded and not
    /// retired (or retired, and named again by a file that does not load), with the
    /// file that names them if there is one. A file whose name cannot be read could be
    /// any connector not retired.
    fn held_cursors(&self, tenant: &str) -> Result<Vec<Held>, StoreError> {
        let running: Vec<String> = self
            .running()
            .values()
            .filter(|r| r.config.tenant == tenant)
            .map(|r| r.config.name.clone())
            .collect();
        let unloaded = self.unloaded();
        let retired = self.store.retired(tenant)?;
        let mut out = Vec::new();
        for (cursor_name, cursor) in self.store.cursors(tenant)? {
            let name = cursor_name
                .strip_suffix(".dry-run")
                .unwrap_or(&cursor_name)
                .to_owned();
            // A loaded connector governs both of its cursors.
            if running.contains(&name) {
                continue;
            }
            // A retired connector is held only by a file that names it: its file was
            // removed on purpose, and any file that cannot be read (a dangling link, a
            // directory) brought every retired connector back as "not loaded", blamed
            // on that file, with alerts on lag no one owes. Should its file come back,
            // the gap compaction left is reported then.
            let is_retired = retired.contains(&name);
            let file = unloaded
                .iter()
                .filter(|u| u.tenant.as_deref().is_none_or(|t| t == tenant))
                .find(|u| match u.name.as_deref() {
                    Some(n) => n == name,
                    None => !is_retired,
                })
                .map(|u| u.file.clone());
            if file.is_none() && is_retired {
                continue;
            }
            out.push(Held {
                cursor_name,
                name,
                file,
                cursor,
            });
        }
        Ok(out)
    }

    /// The connector files that did not load at the last start or reload, and those
    /// whose connector cannot start (not started, or kept on its previous config).
    pub fn failing_files(&self) -> Vec<String> {
        let mut files: Vec<String> = self
            .unloaded_lock()
            .iter()
            .map(|u| u.file.display().to_string())
            .collect();
        files.extend(
            self.unstartable_lock()
                .iter()
                .map(|(f, _)| f.display().to_string()),
        );
        files.extend(
            self.running()
                .values()
                .filter(|r| r.not_started.is_some())
                .map(|r| r.config.file.display().to_string()),
        );
        files
    }

    pub fn load_errors(&self) -> Vec<String> {
        self.load_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Status of every connector (of one tenant, if given).
    pub fn status(&self, tenant: Option<&str>) -> Vec<ConnectorStatus> {
        let snapshot: Vec<(ConnectorConfig, Arc<Live>, bool)> = self
            .running()
            .values()
            .filter(|r| tenant.is_none_or(|t| t == r.config.tenant))
            .map(|r| (r.config.clone(), r.live.clone(), r.not_started.is_some()))
            .collect();
        snapshot
            .into_iter()
            .map(|(c, live, not_started)| self.status_of(&c, &live, not_started))
            .collect()
    }

    /// Cursor, lag in changes and age of the oldest undelivered change of a cursor.
    /// Durable changes after `cursor`.
    fn lag_events(&self, tenant: &str, cursor: u64) -> u64 {
        let durable = *self.store.watch_durable(tenant).borrow();
        // A restore skips numbers no change has (store::restored).
        let skipped = self
            .store
            .skipped_between(tenant, cursor, durable)
            .unwrap_or(0);
        durable.saturating_sub(cursor).saturating_sub(skipped)
    }

    fn lag(&self, tenant: &str, cursor_name: &str) -> (u64, u64, f64) {
        let cursor = self.store.cursor(tenant, cursor_name).unwrap_or(0);
        // Changes the target acknowledged past one still in flight are not behind: one
        // object's failure held the cursor, and an audit read "lag 11" with 10 of the 11
        // delivered.
        let acked = self
            .store
            .acked_above(tenant, cursor_name)
            .map(|a| a.iter().filter(|&&s| s > cursor).count() as u64)
            .unwrap_or(0);
        let lag_events = self.lag_events(tenant, cursor).saturating_sub(acked);
        let lag_seconds = if lag_events > 0 {
            self.store
                .changes(tenant, cursor, 1)
                .ok()
                .and_then(|e| e.first().map(|e| e.at))
                .map(|at| (Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0)
                .unwrap_or(0.0)
        } else {
            0.0
        };
        (cursor, lag_events, lag_seconds)
    }

    /// Connectors that are not loaded but whose stored cursor holds back compaction
    /// (their file is broken, or was missing at the start), with its lag: they are not
    /// delivering, and their lag is what alerts should see.
    pub fn unloaded_status(&self) -> Vec<UnloadedStatus> {
        let mut out = Vec::new();
        for tenant in &self.tenants {
            let Ok(mut held) = self.held_cursors(tenant) else {
                continue;
            };
            // One entry a connector: one that was ever in dry run has a cursor for it
            // too, and was listed twice, with two lags (an audit's `2 NOT LOADED (t1/dr,
            // t1/dr)`). Its real cursor's lag is what its target is owed; both still
            // hold back compaction (see `lowest_cursor`).
            held.sort_by(|a, b| {
                (&a.name, a.cursor_name != a.name).cmp(&(&b.name, b.cursor_name != b.name))
            });
            held.dedup_by(|later, first| later.name == first.name);
            for h in held {
                let (cursor, lag_events, lag_seconds) = self.lag(tenant, &h.cursor_name);
                out.push(UnloadedStatus {
                    dead_letters: self.store.dead_letter_count(tenant, &h.name).unwrap_or(0),
                    file: h.file.map(|f| f.display().to_string()),
                    name: h.name,
                    tenant: tenant.clone(),
                    cursor,
                    lag_events,
                    lag_seconds,
                });
            }
        }
        out
    }

    fn status_of(&self, c: &ConnectorConfig, live: &Live, not_started: bool) -> ConnectorStatus {
        let (cursor, lag_events, lag_seconds) = self.lag(&c.tenant, &cursor_name(c));
        // Read once: `paused` and `held_by_guard` from one look at the hold.
        let held_by_guard = live.held_reason().clone();
        let paused_until = if held_by_guard.is_some() {
            Some(DateTime::<Utc>::MAX_UTC)
        } else {
            live.paused_until()
        };
        let h = live.health();
        ConnectorStatus {
            name: c.name.clone(),
            tenant: c.tenant.clone(),
            kind: c.kind.as_str(),
            file: c.file.display().to_string(),
            file_error: self.broken().get(&c.name).cloned(),
            enabled: c.enabled,
            dry_run: c.dry_run,
            state: h.state.clone(),
            cursor,
            lag_events,
            lag_seconds,
            last_success_at: h.last_success_at,
            last_error: h.last_error.clone(),
            last_error_at: h.last_error_at,
            last_answer: h.last_answer.clone(),
            paused: paused_until.is_some(),
            paused_until: paused_until.filter(|u| *u != DateTime::<Utc>::MAX_UTC),
            held_by_guard,
            // While paused the pause's end is the next attempt; `paused_until` says it.
            next_retry_at: h
                .next_retry
                .and_then(Deadline::wall)
                .filter(|_| paused_until.is_none()),
            next_write_at: h.next_write_at,
            dead_letters: self
                .store
                .dead_letter_count(&c.tenant, &c.name)
                .unwrap_or(0),
            delivered: live.delivered.load(Ordering::Relaxed),
            retries: live.retries.load(Ordering::Relaxed),
            not_started,
        }
    }

    fn find(&self, tenant: &str, name: &str) -> Result<Found, DispatchError> {
        let running = self.running();
        let r = running
            .get(name)
            .filter(|r| r.config.tenant == tenant)
            .ok_or_else(|| DispatchError::UnknownConnector(name.to_owned()))?;
        Ok(Found {
            config: r.config.clone(),
            live: r.live.clone(),
            ctx: r.ctx.clone(),
            not_started: r.not_started.is_some(),
        })
    }

    /// A connector by name for what its dead letters need: `Ok(None)` when no file loads
    /// it but the store still knows it (a cursor, dead letters, a retirement), so that
    /// what is kept of it stays listable and removable. Its letters hold refused
    /// requests, personal data, which an operator must be able to see and remove with
    /// the connector gone: /status lists them, and the commands to handle them
    /// answered "no connector".
    fn find_letters(&self, tenant: &str, name: &str) -> Result<Option<Found>, DispatchError> {
        match self.find(tenant, name) {
            Ok(found) => Ok(Some(found)),
            // Also one a file that does not load names, though it never ran: it has no
            // letters, and "no connector" read as a misspelt name, as its status did.
            Err(DispatchError::UnknownConnector(_)) if self.known_unloaded(tenant, name)? => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A loaded connector by name, for what needs it loaded (`needs`, as the refusal
    /// says it). One the store knows, or that a file which does not load names, is
    /// refused as not loaded, saying why and what loads it: "no connector" read as a
    /// misspelt name, for a connector whose file is broken or that was retired.
    fn find_loaded(&self, tenant: &str, name: &str, needs: &str) -> Result<Found, DispatchError> {
        match self.find(tenant, name) {
            Err(DispatchError::UnknownConnector(_)) if self.known_unloaded(tenant, name)? => {
                Err(self.not_loaded(tenant, name, needs))
            }
            found => found,
        }
    }

    /// Whether connector `name` of `tenant`, not loaded, is one the store knows or a file
    /// that does not load names (it may never have run).
    fn known_unloaded(&self, tenant: &str, name: &str) -> Result<bool, StoreError> {
        Ok(self.stored(tenant, name)? || self.unloaded_file(tenant, name).is_some())
    }

    /// The file naming connector `name` of `tenant` that did not load, if one does.
    fn unloaded_file(&self, tenant: &str, name: &str) -> Option<std::path::PathBuf> {
        self.unloaded_lock()
            .iter()
            .filter(|u| u.tenant.as_deref().is_none_or(|t| t == tenant))
            .find(|u| u.name.as_deref() == Some(name))
            .map(|u| u.file.clone())
    }

    /// Whether the store holds anything of connector `name` of `tenant`.
    fn stored(&self, tenant: &str, name: &str) -> Result<bool, StoreError> {
        let dry_run = format!("{name}.dry-run");
        Ok(self.store.dead_letter_count(tenant, name)? > 0
            || self
                .store
                .cursors(tenant)?
                .iter()
                .any(|(c, _)| *c == name || *c == dry_run)
            || self.store.retired(tenant)?.iter().any(|r| r == name))
    }

    /// Why a connector the store knows is not loaded, and what would load it again: for
    /// the refusal of what needs it running.
    fn not_loaded(&self, tenant: &str, name: &str, needs: &str) -> DispatchError {
        let held = self.held_cursors(tenant).unwrap_or_default();
        // One that never delivered has no cursor to find its file by.
        let file = held
            .iter()
            .filter(|h| h.name == name)
            .find_map(|h| h.file.clone())
            .or_else(|| self.unloaded_file(tenant, name));
        let retired = self
            .store
            .retired(tenant)
            .is_ok_and(|r| r.iter().any(|r| r == name));
        let (why, fix) = match file {
            Some(file) => (
                format!("its file {} does not load", file.display()),
                "fix that file and reload",
            ),
            None if retired => (
                "it is retired".to_owned(),
                "put back a file with its name and reload, which resumes it from its cursor",
            ),
            None => (
                "no connector file names it".to_owned(),
                "put its file back and reload",
            ),
        };
        DispatchError::NotLoaded(
            name.to_owned(),
            why,
            format!(
                "{needs} needs it running; to do that, {fix}. Its dead letters can be listed and discarded as it is (`rosterd dead-letters --tenant {tenant} list {name}`, `discard {name} --all`)"
            ),
        )
    }

    /// The changes a connector has not delivered, by the furthest behind of its cursors
    /// (one in dry run keeps its real one too): what compaction may drop once it is
    /// retired.
    fn undelivered(&self, tenant: &str, name: &str) -> u64 {
        let dry_run = format!("{name}.dry-run");
        self.store
            .cursors(tenant)
            .unwrap_or_default()
            .iter()
            .filter(|(c, _)| *c == name || *c == dry_run)
            .map(|(c, _)| self.lag(tenant, c).1)
            .max()
            .unwrap_or(0)
    }

    /// Retired connectors that still hold dead letters, which no other list shows: not
    /// loaded, they are not connectors, and retired, not "not loaded" either, yet their
    /// letters stay in the store until discarded.
    pub fn retired_status(&self) -> Vec<RetiredStatus> {
        let mut out = Vec::new();
        for tenant in &self.tenants {
            let Ok(retired) = self.store.retired(tenant) else {
                continue;
            };
            // Named again by a file, loaded or not: listed as such. (`held_cursors`
            // takes the lock of the running ones itself.)
            let running: Vec<String> = self
                .running()
                .values()
                .filter(|r| r.config.tenant == *tenant)
                .map(|r| r.config.name.clone())
                .collect();
            let held = self.held_cursors(tenant).unwrap_or_default();
            for name in retired {
                if running.contains(&name) || held.iter().any(|h| h.name == name) {
                    continue;
                }
                let dead_letters = self.store.dead_letter_count(tenant, &name).unwrap_or(0);
                if dead_letters > 0 {
                    out.push(RetiredStatus {
                        name,
                        tenant: tenant.clone(),
                        dead_letters,
                    });
                }
            }
        }
        out
    }

    /// A connector's status, for `GET /connectors/NAME` and a reconciliation of one
    /// connector: one that is not loaded is said to be so, with why and what loads it.
    /// `needs`: what asks, as the refusal says it ("its status", "a reconciliation").
    pub fn loaded_connector_status(
        &self,
        tenant: &str,
        name: &str,
        needs: &str,
    ) -> Result<ConnectorStatus, DispatchError> {
        let f = self.find_loaded(tenant, name, needs)?;
        Ok(self.status_of(&f.config, &f.live, f.not_started))
    }

    /// A page of a connector's dead letters (ids above `after`, oldest first) and how
    /// many it holds in all.
    pub fn dead_letters(
        &self,
        tenant: &str,
        name: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, u64), DispatchError> {
        self.find_letters(tenant, name)?;
        Ok((
            self.store.dead_letters(tenant, name, after, limit)?,
            self.store.dead_letter_count(tenant, name)?,
        ))
    }

    pub async fn discard(&self, tenant: &str, name: &str, id: u64) -> Result<(), DispatchError> {
        let mut done = self.discard_batch(tenant, name, &[id]).await?;
        done.pop()
            .map_or(Err(DispatchError::NoSuchLetter(id)), |(_, r)| r)
    }

    /// Drop several dead letters in one store write, each with its own outcome: one a
    /// replay is sending (409) or one gone already (404) does not keep the others. At 300
    /// a second one call at a time, 20,000 letters took the operator over a minute.
    pub async fn discard_batch(
        &self,
        tenant: &str,
        name: &str,
        ids: &[u64],
    ) -> Result<Vec<(u64, Result<(), DispatchError>)>, DispatchError> {
        // Not loaded, nothing replays its letters. (A reload that loads it meanwhile may
        // replay a letter this discards: the store removes a letter once, so it goes
        // either way, and nothing is sent twice.)
        let live = self.find_letters(tenant, name)?.map(|f| f.live);
        let mut outcome: Vec<(u64, Result<(), DispatchError>)> = Vec::with_capacity(ids.len());
        let mut claims = Vec::new();
        let mut letters = Vec::new();
        for &id in ids {
            // A letter being replayed is the replay's: it goes if the target takes it.
            let claim = match &live {
                Some(live) => match live.claim_replay(id) {
                    Some(claim) => Some(claim),
                    None => {
                        outcome.push((id, Err(Self::in_hand(name, id))));
                        continue;
                    }
                },
                None => None,
            };
            match self.store.dead_letter(tenant, name, id) {
                Ok(Some(letter)) => {
                    claims.push(claim);
                    letters.push((id, Some(letter)));
                    outcome.push((id, Ok(())));
                }
                // One that cannot be read can still go: it is all that can be done.
                Err(StoreError::Corrupt(_)) => {
                    claims.push(claim);
                    letters.push((id, None));
                    outcome.push((id, Ok(())));
                }
                Ok(None) => outcome.push((id, Err(DispatchError::NoSuchLetter(id)))),
                Err(e) => outcome.push((id, Err(e.into()))),
            }
        }
        let wanted: Vec<u64> = letters.iter().map(|(id, _)| *id).collect();
        let removed = self.store.remove_dead_letters(tenant, name, wanted).await?;
        drop(claims);
        let mut removed = letters.iter().zip(removed);
        for (id, result) in outcome.iter_mut().filter(|(_, r)| r.is_ok()) {
            let Some(((_, letter), gone)) = removed.next() else {
                break;
            };
            if !gone {
                *result = Err(DispatchError::NoSuchLetter(*id));
                continue;
            }
            // The change is now never delivered to this target: the log is its only trace.
            match letter {
                Some(letter) => {
                    let ev = &letter.event;
                    tracing::warn!(tenant = %tenant, connector = %name, id, seq = ev.seq, object = %format!("{}/{}", ev.resource_type, ev.id), reason = letter.reason.as_str(), "Dead letter discarded by the operator; its change will not be delivered.");
                }
                None => {
                    tracing::warn!(tenant = %tenant, connector = %name, id, "Dead letter discarded by the operator; it could not be read, so which change it held is not known.");
                }
            }
        }
        Ok(outcome)
    }

    /// Send a dead letter's change again, once. On success the letter is removed; on
    /// failure it stays and the target's reason is returned.
    ///
    /// A state target (OneRoster) is sent the object's state as stored *now* (or its
    /// delete, if it is gone), never the letter's snapshot: the letter may be older than
    /// changes delivered since, and replaying it would undo them downstream (re-enable a
    /// user who left). The hashes recorded are those of what was sent. A webhook gets
    /// the original event with its original `webhook-id` and `data.seq`, as at-least-once
    /// event delivery promises; the answer lists the later changes of the same object
    /// already delivered, so the operator (and a receiver ordering by `data.seq`) knows
    /// the event is old news.
    pub async fn replay(
        &self,
        tenant: &str,
        name: &str,
        id: u64,
    ) -> Result<Replayed, DispatchError> {
        let (mut results, _) = self
            .replay_batch(tenant, name, &[id], Duration::MAX)
            .await?;
        // Not begun without a time limit: only a stop hands a letter back.
        results.pop().map(|(_, r)| r).unwrap_or_else(|| {
            Err(DispatchError::NotRunning(
                name.to_owned(),
                "shutting down".into(),
            ))
        })
    }

    /// [`Dispatcher::replay`] of each of `ids` in turn, until `budget` has passed: each
    /// letter's result, and the ids not begun. The change log is read once for the whole
    /// batch, to find the later changes of each letter's objects: read for each letter,
    /// `replay --all` managed 3–6 letters a second on a tenant of 27,000 changes. What
    /// concerns the connector as a whole (unknown, not running) fails the batch.
    pub async fn replay_batch(
        &self,
        tenant: &str,
        name: &str,
        ids: &[u64],
        budget: Duration,
    ) -> Result<(Vec<(u64, Result<Replayed, DispatchError>)>, Vec<u64>), DispatchError> {
        let began = tokio::time::Instant::now();
        let Some(Found { ctx, .. }) = self.find_letters(tenant, name)? else {
            return Err(self.not_loaded(tenant, name, "a replay"));
        };
        let ctx = ctx.ok_or_else(|| {
            DispatchError::NotRunning(name.to_owned(), "it is disabled or failed to start".into())
        })?;
        let oneroster = matches!(ctx.target, Target::OneRoster { .. });
        // Checked before each letter too: a hold may begin while a batch runs.
        let held = || ctx.live.held() && oneroster;
        if held() {
            let refused = ids.iter().map(|&id| (id, Err(Self::held_refusal(name))));
            return Ok((refused.collect(), vec![]));
        }
        // The hold lives in the connector's task, which after a start or a reload holds
        // again only once it has read that far (after its preflight, a pause, a
        // backlog): until then it reads as not held, and a replay sent a deprovisioning
        // the operator was about to skip. So the guard is judged from the store too, as
        // a CSV write beside the connector's loop is. Any hold refuses, as a hold in
        // force does: an object's state carries every change of it logged by now, and
        // which of them the guard would hold is the hold's to say, not the replay's.
        let mut judged: Judged = if oneroster {
            let cursor = self.store.cursor(tenant, &ctx.cursor_name())?;
            ctx.guard_at(cursor).await?.map(|g| (g, cursor))
        } else {
            None
        };
        if let Some(h) = self.judged_holds(&ctx, &mut judged).await? {
            let refused = ids
                .iter()
                .map(|&id| (id, Err(Self::guard_refusal(tenant, name, &h))));
            return Ok((refused.collect(), vec![]));
        }
        let letters: Vec<Result<DeadLetter, DispatchError>> = ids
            .iter()
            .map(|&id| self.stored_letter(tenant, name, id))
            .collect();
        let mut superseded = {
            let (store, t, cursor_name, events, classes) = (
                self.store.clone(),
                tenant.to_owned(),
                ctx.cursor_name(),
                letters
                    .iter()
                    .filter_map(|l| Some(l.as_ref().ok()?.event.clone()))
                    .collect::<Vec<_>>(),
                ctx.state_sends_classes(),
            );
            blocking(move || later_delivered_changes(&store, &t, &cursor_name, &events, classes))
                .await?
                .into_iter()
        };
        let mut results = Vec::with_capacity(ids.len());
        let mut letters = ids.iter().copied().zip(letters);
        for (id, letter) in letters.by_ref() {
            let superseded_by = match &letter {
                Ok(_) => superseded.next().unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            let refused = if held() {
                Some(Self::held_refusal(name))
            } else if letter.is_ok() {
                // Changes logged while the batch runs are judged before each letter.
                self.judged_holds(&ctx, &mut judged)
                    .await?
                    .map(|h| Self::guard_refusal(tenant, name, &h))
            } else {
                None
            };
            let result = match (refused, letter) {
                (Some(refused), _) => Err(refused),
                // Read again at its turn, which may come many seconds after the batch
                // began: a call the CLI gave up on goes on, and the operator's next
                // call must not send again what it replayed (or an operator discarded)
                // meanwhile.
                (None, Ok(_)) => match ctx.live.claim_replay(id) {
                    None => Err(Self::in_hand(name, id)),
                    Some(_claim) => match self.stored_letter(tenant, name, id) {
                        Ok(letter) => {
                            self.replay_letter(&ctx, tenant, name, letter, superseded_by)
                                .await
                        }
                        Err(e) => Err(e),
                    },
                },
                (None, Err(e)) => Err(e),
            };
            // Stopped (the daemon, or this connector for a reload): what was cut short
            // and what was not begun are handed back, not failed, for the next call.
            if ctx.cancel.is_cancelled() {
                let cut = matches!(result, Err(DispatchError::NotRunning(..)));
                if !cut {
                    results.push((id, result));
                }
                let left = cut.then_some(id).into_iter();
                return Ok((results, left.chain(letters.map(|(id, _)| id)).collect()));
            }
            results.push((id, result));
            if began.elapsed() >= budget {
                break;
            }
        }
        Ok((results, letters.map(|(id, _)| id).collect()))
    }

    /// Dead letter `id` of connector `name` as stored now.
    fn stored_letter(
        &self,
        tenant: &str,
        name: &str,
        id: u64,
    ) -> Result<DeadLetter, DispatchError> {
        match self.store.dead_letter(tenant, name, id) {
            Ok(found) => found.ok_or(DispatchError::NoSuchLetter(id)),
            Err(StoreError::Corrupt(e)) => Err(DispatchError::Refused(
                name.to_owned(),
                format!("cannot read dead letter {id} ({e}); it can only be discarded"),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Letter `id` is being replayed for another request.
    fn in_hand(name: &str, id: u64) -> DispatchError {
        DispatchError::Refused(
            name.to_owned(),
            format!(
                "is replaying or discarding dead letter {id} for another request now; a replay that goes through, or the discard, removes it"
            ),
        )
    }

    /// A OneRoster replay sends the object as it stands, which may be a deprovisioning
    /// the guard holds: a recheck saw a held user disabled, and on a delete-mode target
    /// deleted, by a replay before any resume. A webhook replay sends the letter's own
    /// event, which the guard let through.
    fn held_refusal(name: &str) -> DispatchError {
        DispatchError::Refused(
            name.to_owned(),
            "is held by its [guard], and a replay sends the object as it stands, which may be what the guard holds: resume it first (`rosterd resume`, or `--skip-held`)".into(),
        )
    }

    /// What the guard judged in `judged` holds of the changes logged by now: for a
    /// replay beside a connector that may not have read them yet.
    async fn judged_holds(
        &self,
        ctx: &Ctx,
        judged: &mut Judged,
    ) -> Result<Option<guard::Held>, StoreError> {
        if judged.is_none() {
            return Ok(None);
        }
        let upto = self.store.last_seq(ctx.tenant())?;
        judge(ctx, judged, upto).await
    }

    /// [`Dispatcher::held_refusal`] for a hold judged from the store that the connector
    /// has not read yet: a resume now finds nothing held, so the operator waits for the
    /// hold first.
    fn guard_refusal(tenant: &str, name: &str, held: &guard::Held) -> DispatchError {
        DispatchError::Refused(
            name.to_owned(),
            format!(
                "is held by its [guard] at change #{seq}, which the connector has not read yet (just after a start or a reload, or while it is behind or paused), and a replay sends the object as it stands, which may be what the guard holds. Once `rosterd status --tenant {tenant}` shows it held (a paused connector reaches the hold only once resumed), resume it (`rosterd resume`, or `--skip-held`), then replay",
                seq = held.seq
            ),
        )
    }

    async fn replay_letter(
        &self,
        ctx: &Ctx,
        tenant: &str,
        name: &str,
        letter: DeadLetter,
        superseded_by: Vec<u64>,
    ) -> Result<Replayed, DispatchError> {
        let id = letter.id;
        // Before the state is read, and until its hashes are written: a change of the
        // object logged meanwhile waits for the replay, as for a reconciliation's repair.
        // Sent beside it, the mirror's deactivation could land first and the replay's
        // older copy after, and with the mirror's hash written last no reconciliation saw
        // the leaver still enabled.
        let _ordered = matches!(ctx.target, Target::OneRoster { .. }).then(|| {
            ctx.repairing(&format!(
                "{}/{}",
                letter.event.resource_type, letter.event.id
            ))
        });
        let (event, reports, sent) = match &ctx.target {
            Target::OneRoster { .. } => {
                let (current, reports) =
                    current_with_reports(&self.store, tenant, letter.event.clone(), true).await?;
                (current, reports, ReplaySent::CurrentState)
            }
            Target::Webhook { .. } | Target::Csv { .. } => {
                (letter.event.clone(), vec![], ReplaySent::OriginalEvent)
            }
        };
        let plan = ctx.plan(&event, &reports).map_err(|e| match e {
            PlanError::Store(e) => DispatchError::Store(e),
            PlanError::Unplannable(reason) => DispatchError::Unmappable(reason),
        })?;
        for stage in &plan.stages {
            for req in stage {
                match ctx
                    .send_as(req, Some(1), Sender::Operator, None)
                    .instrument(ctx.span())
                    .await
                {
                    Sent::Ok | Sent::Superseded => {}
                    Sent::Cancelled => {
                        return Err(DispatchError::NotRunning(
                            name.to_owned(),
                            "shutting down".into(),
                        ));
                    }
                    Sent::Refused { reason, response } => {
                        let detail = response
                            .map(|r| format!(" ({}: {})", r.status, r.body))
                            .unwrap_or_default();
                        return Err(DispatchError::ReplayFailed(format!("{reason}{detail}")));
                    }
                }
            }
        }
        if !plan.hashes.is_empty() {
            // Reconciliation reads the hashes under the cursor's name (a dry run keeps
            // its own), so they are written there too.
            self.store
                .set_delivered(tenant, &ctx.cursor_name(), plan.hashes)
                .await?;
        }
        self.store.remove_dead_letter(tenant, name, id).await?;
        let note = match (sent, superseded_by.is_empty()) {
            (ReplaySent::CurrentState, true) => None,
            (ReplaySent::CurrentState, false) => Some(format!(
                "the letter's change #{} is older than later changes of {}/{} the connector has passed (delivered, or set aside as dead letters); the object's current state was sent, not the letter's snapshot",
                letter.event.seq, letter.event.resource_type, letter.event.id
            )),
            (ReplaySent::OriginalEvent, true) => None,
            (ReplaySent::OriginalEvent, false) => Some(format!(
                "the replayed event (change #{}) is older than later changes of {}/{} the connector has passed (#{}: delivered, or set aside as dead letters); receivers that apply events by data.seq will ignore it, others may now hold its older snapshot",
                letter.event.seq,
                letter.event.resource_type,
                letter.event.id,
                superseded_by
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", #")
            )),
        };
        match &note {
            Some(note) => {
                tracing::warn!(tenant = %tenant, connector = %name, id, note, "Dead letter replayed.")
            }
            None => {
                tracing::info!(tenant = %tenant, connector = %name, id, "Dead letter replayed.")
            }
        }
        Ok(Replayed {
            replayed: id,
            sent,
            superseded_by,
            note,
        })
    }

    /// Let compaction drop what a connector that is not loaded still has to deliver: the
    /// operator's word that it is gone for good (its file was removed while the daemon was
    /// stopped, so no reload recorded it). Returns how many changes it had not delivered.
    /// Its cursor and dead letters stay, so a file with its name later resumes from there.
    pub async fn retire(&self, tenant: &str, name: &str) -> Result<Retirement, DispatchError> {
        if let Some(r) = self
            .running()
            .get(name)
            .filter(|r| r.config.tenant == tenant)
        {
            return Err(DispatchError::NotRetirable(
                name.to_owned(),
                format!(
                    "is loaded from {}; remove that file and reload to retire it",
                    r.config.file.display()
                ),
            ));
        }
        let held = self.held_cursors(tenant)?;
        let mine: Vec<&Held> = held.iter().filter(|h| h.name == name).collect();
        if mine.is_empty() {
            // Retiring twice is the operator's retry, not a typo: say what is true.
            if self.store.retired(tenant)?.iter().any(|r| r == name) {
                return Ok(Retirement {
                    undelivered: 0,
                    dead_letters: self.store.dead_letter_count(tenant, name)?,
                    was_retired: true,
                });
            }
            return Err(DispatchError::UnknownConnector(name.to_owned()));
        }
        if let Some(file) = mine.iter().find_map(|h| h.file.as_ref()) {
            return Err(DispatchError::NotRetirable(
                name.to_owned(),
                format!(
                    "may be named by {}, which does not load; fix or remove that file and reload",
                    file.display()
                ),
            ));
        }
        let undelivered = self.undelivered(tenant, name);
        self.store.set_retired(tenant, name, true).await?;
        let dead_letters = self.store.dead_letter_count(tenant, name)?;
        tracing::warn!(%tenant, connector = %name, undelivered, dead_letters, "Connector retired by the operator: compaction may now drop the changes it never delivered. Its dead letters stay in the store until discarded (`rosterd dead-letters --tenant {tenant} list {name}`, then `discard {name} --all`). A file with its name resumes it from its cursor.");
        Ok(Retirement {
            undelivered,
            dead_letters,
            was_retired: false,
        })
    }

    /// Let a connector its guard holds go on without sending what it holds: its cursor
    /// moves past every change logged by now, and a reconciliation (the caller starts it)
    /// sends the target the current state of what they changed. Through which change.
    /// Not for a webhook connector: its receivers get events, not state, so the events of
    /// every other change held would be lost.
    pub async fn skip_held(&self, tenant: &str, name: &str) -> Result<Skipped, DispatchError> {
        let found = self.find_loaded(tenant, name, "a resume with --skip-held")?;
        let refuse = |why: &str| Err(DispatchError::Refused(name.to_owned(), why.to_owned()));
        let Some(ctx) = &found.ctx else {
            return refuse("is not running (disabled or failed to start): nothing is held");
        };
        if matches!(ctx.target, Target::Webhook { .. }) {
            return refuse(
                "sends webhook events, not state: skipping would lose the events of every other change held; resume it without skipping",
            );
        }
        let mut applied = found.live.applied.subscribe();
        let Some(n) = found.live.approve(true) else {
            return refuse("is not held by its [guard]: nothing to skip");
        };
        // The reconciliation that follows must find the cursor moved, or it would leave
        // what the skipped changes touched to them.
        let done = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let (seen, through) = *applied.borrow_and_update();
                if seen >= n {
                    return Some(through);
                }
                if applied.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match done {
            Ok(Some(through)) => {
                // A resume too: a pause for the target's failures (the change stuck in
                // flight behind the hold makes one) stayed, and the skip's
                // reconciliation failed on it, leaving the users deactivated before
                // the hold as they were.
                self.lift_pauses(tenant, name, ctx, &found.live).await?;
                Ok(Skipped {
                    through,
                    // The files are written from the roster as it stands: nothing to
                    // repair.
                    reconcile: !matches!(ctx.target, Target::Csv { .. }),
                })
            }
            _ => refuse(
                "did not confirm the skip (it stopped, or was restarted by a reload): see its state, and resume it again if it is still held",
            ),
        }
    }

    /// Lift a pause now (after the operator fixed the target). Returns whether it was
    /// paused: a resume of one that was not only starts its count of failures afresh.
    pub async fn resume(&self, tenant: &str, name: &str) -> Result<bool, DispatchError> {
        let found = self.find_loaded(tenant, name, "a resume")?;
        // Nothing runs to resume: saying "resumed" would promise deliveries that wait
        // for an `enabled = true` (or a fixed file) and a reload.
        let Some(ctx) = &found.ctx else {
            return Err(DispatchError::NotRunning(
                name.to_owned(),
                "it is disabled or failed to start".into(),
            ));
        };
        let held = found.live.approve(false).is_some();
        let was_paused = self.lift_pauses(tenant, name, ctx, &found.live).await?;
        Ok(was_paused || held)
    }

    /// The operator says the target is worth trying now: a pause for its failures or
    /// refusals ends, and its token endpoint is tried again too, whatever wait its last
    /// failure left. Whether it was paused.
    async fn lift_pauses(
        &self,
        tenant: &str,
        name: &str,
        ctx: &Ctx,
        live: &Live,
    ) -> Result<bool, DispatchError> {
        if let Some(credentials) = ctx.credentials() {
            credentials.forget_failure();
        }
        let was_paused = live.resume("the operator");
        if self.store.refusal_pause(tenant, name)?.is_some() {
            self.store.set_refusal_pause(tenant, name, None).await?;
        }
        Ok(was_paused)
    }
}

/// What [`Dispatcher::skip_held`] did.
#[derive(Debug, Clone, Copy)]
pub struct Skipped {
    /// The held changes up to this one were skipped.
    pub through: u64,
    /// Whether a reconciliation is owed for what they changed (not for a CSV connector,
    /// whose files hold the roster as it stands once written).
    pub reconcile: bool,
}

/// What a replay sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplaySent {
    /// The object's state as stored now (state targets).
    CurrentState,
    /// The event as the letter holds it (webhooks).
    OriginalEvent,
}

/// How a replay went, for the API and the CLI.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub replayed: u64,
    pub sent: ReplaySent,
    /// Later changes of the letter's object that the connector has passed: delivered, or
    /// set aside as dead letters themselves (telling them apart would read every letter
    /// of the connector at each replay).
    pub superseded_by: Vec<u64>,
    pub note: Option<String>,
}

/// At most this many later changes are listed in a replay's answer.
const SUPERSEDED_LISTED: usize = 20;

/// For each of `letters`, the changes after its own that touch one of its objects and
/// that the connector has already passed (delivered or dead-lettered themselves), at
/// most [`SUPERSEDED_LISTED`]: one read of the log from the oldest letter on.
fn later_delivered_changes(
    store: &Store,
    tenant: &str,
    cursor_name: &str,
    letters: &[ChangeEvent],
    classes: bool,
) -> Result<Vec<Vec<u64>>, StoreError> {
    let cursor = store.cursor(tenant, cursor_name)?;
    let mut out = vec![Vec::new(); letters.len()];
    let mut letters_of: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, letter) in letters.iter().enumerate() {
        for k in object_keys(letter, &[], classes) {
            letters_of.entry(k).or_default().push(i);
        }
    }
    let Some(mut since) = letters.iter().map(|l| l.seq).min() else {
        return Ok(out);
    };
    let mut unlisted = letters.len();
    let mut page_size = BATCH as usize;
    while since < cursor && unlisted > 0 {
        let page = match store.changes(tenant, since, page_size) {
            Ok(page) => page,
            // The list is for the answers' notes only: a change that cannot be read must
            // not keep the letters from being replayed. The page is read again a change
            // at a time, so the list goes up to it.
            Err(e) if e.outage_message().is_none() && page_size > 1 => {
                page_size = 1;
                continue;
            }
            Err(e) if e.outage_message().is_none() => {
                tracing::warn!(error = %e, after_seq = since, "Cannot read the change log past this change; a replay lists the later changes of its object read before it only.");
                break;
            }
            Err(e) => return Err(e),
        };
        let Some(last) = page.last() else { break };
        since = last.seq;
        for e in page.iter().filter(|e| e.seq <= cursor) {
            for k in object_keys(e, &[], classes) {
                for &i in letters_of.get(&k).into_iter().flatten() {
                    let listed = &mut out[i];
                    // A change touching two of a letter's objects is listed once.
                    if e.seq > letters[i].seq
                        && listed.len() < SUPERSEDED_LISTED
                        && listed.last() != Some(&e.seq)
                    {
                        listed.push(e.seq);
                        if listed.len() == SUPERSEDED_LISTED {
                            unlisted -= 1;
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The letter's change rewritten to the objects' state as stored now: the current
/// document (none if deleted since), and for a group each listed member as added or
/// removed by whether it is a member now. Planned like any change, it sends what the
/// target should hold today.
fn current_state(store: &Store, tenant: &str, ev: &ChangeEvent) -> Result<ChangeEvent, StoreError> {
    let kind = if ev.resource_type == "Group" {
        ResourceKind::Group
    } else {
        ResourceKind::User
    };
    let doc = store.get(tenant, kind, &ev.id)?.map(|r| r.doc);
    let active = doc
        .as_ref()
        .map(|d| crate::connectors::oneroster::UserFields { doc: d }.active());
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for m in ev.members_added.iter().chain(&ev.members_removed) {
        if doc.is_some() && store.is_member(tenant, &ev.id, m)? {
            added.push(m.clone());
        } else {
            removed.push(m.clone());
        }
    }
    Ok(ChangeEvent {
        seq: ev.seq,
        at: Utc::now(),
        resource_type: ev.resource_type.clone(),
        id: ev.id.clone(),
        op: if doc.is_some() {
            crate::store::ChangeOp::Updated
        } else {
            crate::store::ChangeOp::Deleted
        },
        snapshot: doc,
        members_added: added,
        members_removed: removed,
        // The stored assignment is read when planning.
        assignment: None,
        // A deactivation or reactivation replayed is one still, while the user stays as
        // it left it: its enrollments leave or come back with it.
        deactivated: ev.deactivated && active == Some(false),
        reactivated: ev.reactivated && active == Some(true),
        deleting_user: false,
        // Its groups as they are now, as everything else here.
        groups: None,
    })
}

/// [`current_state`] of `ev`, with the users whose OneRoster bodies it sends again
/// ([`reports_of`], when `fans_out`): what a replay or a skipped change sends as its
/// objects stand now.
async fn current_with_reports(
    store: &Store,
    tenant: &str,
    ev: ChangeEvent,
    fans_out: bool,
) -> Result<(ChangeEvent, Vec<String>), StoreError> {
    let (store, tenant) = (store.clone(), tenant.to_owned());
    blocking(move || {
        let current = current_state(&store, &tenant, &ev)?;
        let reports = if fans_out {
            reports_of(&store, &tenant, &current)?
        } else {
            vec![]
        };
        Ok((current, reports))
    })
    .await
}

/// What [`Dispatcher::retire`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retirement {
    /// The changes it never delivered, which compaction may now drop.
    pub undelivered: u64,
    /// Its dead letters, which stay in the store until discarded.
    pub dead_letters: u64,
    /// It was retired already; nothing changed.
    pub was_retired: bool,
}

/// The `Authorization` value among a request's headers, to know which token a 401 refused.
fn authorization(headers: &[(&'static str, String)]) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| *k == "authorization")
        .map(|(_, v)| v.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Repairs side by side share keys (two enrollments of one user, of one class): a
    /// change of the key waits for each of them, not only for the last one begun, which
    /// had replaced the others.
    #[test]
    fn a_change_waits_for_every_repair_under_its_key() {
        let repairs = Repairs::default();
        let keys = |g: &str| vec![format!("Group/{g}"), "User/ada".to_owned()];
        let first = repairs.begin(keys("staff"));
        let second = repairs.begin(keys("night"));
        let waits = repairs.of("User/ada");
        assert_eq!(waits.len(), 2);
        assert_eq!(repairs.of("Group/staff").len(), 1);
        drop(first);
        assert!(*waits[0].borrow(), "the first repair's answer is not seen");
        assert!(!*waits[1].borrow());
        assert_eq!(repairs.of("User/ada").len(), 1);
        assert!(repairs.of("Group/staff").is_empty());
        drop(second);
        assert!(*waits[1].borrow());
        assert!(repairs.of("User/ada").is_empty());
        assert!(repairs.map().is_empty(), "a finished repair's key stayed");
    }

    /// One read of the log serves a batch of letters: each gets the later changes of its
    /// own object that the connector passed, at most [`SUPERSEDED_LISTED`].
    #[tokio::test]
    async fn each_letter_of_a_batch_gets_its_own_objects_later_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let user = |name: &str| serde_json::json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": name});
        let mut ids = Vec::new();
        for name in ["ada", "bob", "cy"] {
            let id = store
                .create("t", ResourceKind::User, user(name), vec![])
                .await
                .unwrap()
                .id;
            ids.push(id);
        }
        let retitle = |id: String, n: usize| {
            let store = store.clone();
            async move {
                store
                    .update("t", ResourceKind::User, &id, None, move |doc| {
                        let mut doc = doc.clone();
                        doc["title"] = serde_json::json!(format!("T{n}"));
                        Ok(crate::store::Update {
                            doc,
                            members: vec![],
                        })
                    })
                    .await
                    .unwrap();
            }
        };
        for n in 0..25 {
            retitle(ids[0].clone(), n).await;
        }
        retitle(ids[1].clone(), 0).await;
        let log = store.changes("t", 0, 100).unwrap();
        let head = log.last().unwrap().seq;
        // The connector passed all but the last change, bob's.
        store
            .advance_cursor("t", "c", head - 1, vec![])
            .await
            .unwrap();
        let of =
            |id: &str| -> Vec<ChangeEvent> { log.iter().filter(|e| e.id == id).cloned().collect() };
        let (ada, bob, cy) = (of(&ids[0]), of(&ids[1]), of(&ids[2]));
        let seqs = |evs: &[ChangeEvent]| -> Vec<u64> { evs.iter().map(|e| e.seq).collect() };
        let letters = [
            ada[0].clone(),
            bob[0].clone(),
            ada[10].clone(),
            cy[0].clone(),
        ];
        let listed = later_delivered_changes(&store, "t", "c", &letters, false).unwrap();
        assert_eq!(
            listed,
            [seqs(&ada[1..21]), vec![], seqs(&ada[11..]), vec![]],
            "{listed:?}"
        );
        assert!(
            later_delivered_changes(&store, "t", "c", &[], false)
                .unwrap()
                .is_empty()
        );
        // A change that cannot be read ends the list there; the letters still replay.
        store.damage_change("t", ada[5].seq);
        let listed = later_delivered_changes(&store, "t", "c", &letters, false).unwrap();
        assert_eq!(listed[0], seqs(&ada[1..5]), "{listed:?}");
    }

    #[test]
    fn a_change_owed_a_skipped_send_holds_the_cursor_until_that_is_done() {
        // 10 (of User/a) is in flight when 13..=20 are skipped.
        let mut p = Progress {
            read: 12,
            persisted: 9,
            in_flight: [10].into(),
            finished: BTreeMap::new(),
            done: Seqs::default(),
            unsaved: false,
            ahead: Default::default(),
            skipped: Seqs::skipped(&[(12, 20)]),
            owed: Owed::default(),
        };
        p.owed.owe(["User/a".to_owned()], 10);
        p.finish(10, vec![]);
        assert_eq!(p.cursor(), 9, "passed, a stop would read the range as done");
        let a = ["User/a".to_owned()];
        assert!(!p.owed.send_skipped(14, &["User/b".to_owned()], true));
        assert!(p.owed.send_skipped(15, &a, true));
        assert!(
            !p.owed.send_skipped(16, &a, true),
            "the user is read whole when sent: once is enough"
        );
        p.in_flight.insert(15);
        p.read = 20;
        p.owed.read_past();
        assert_eq!(p.cursor(), 9, "15 is still being sent");
        p.finish(15, vec![]);
        assert_eq!(p.cursor(), 20);
        assert!(p.owed.pins.is_empty(), "{:?}", p.owed);
    }

    #[test]
    fn progress_records_what_was_acknowledged_above_the_cursor() {
        let mut p = Progress {
            read: 14,
            persisted: 10,
            in_flight: [11, 12, 13, 14].into(),
            finished: BTreeMap::new(),
            done: Seqs::default(),
            unsaved: false,
            // Recorded by the last stop, not read again yet.
            ahead: [20, 21].into(),
            skipped: Seqs::default(),
            owed: Owed::default(),
        };
        // 11 is slow; 12 and 13 are acknowledged behind it.
        p.finish(12, vec![("User/a".into(), Some(1))]);
        p.finish(13, vec![]);
        let (cursor, acked, hashes) = p.take().unwrap();
        assert_eq!(cursor, 10);
        assert_eq!(acked.iter().collect::<Vec<_>>(), [12, 13, 20, 21]);
        assert_eq!(hashes, [("User/a".to_owned(), Some(1))]);
        assert!(p.take().is_none(), "nothing new to write");
        p.finish(11, vec![]);
        p.finish(14, vec![]);
        assert!(p.take_acked(20));
        assert!(!p.take_acked(22));
        p.read = 20;
        let (cursor, acked, hashes) = p.take().unwrap();
        assert_eq!((cursor, acked.iter().collect()), (20, vec![21]));
        assert!(hashes.is_empty());
        // One object stuck while thousands go through: all of them, in order (the
        // record keeps those nearest the cursor, a reconciliation reads them all).
        assert!(p.take_acked(21));
        p.read = 21;
        assert_eq!(p.take().unwrap().1, Seqs::default());
        p.in_flight.insert(22);
        for seq in 23..3000 {
            p.in_flight.insert(seq);
            p.finish(seq, vec![]);
        }
        p.read = 2999;
        let (cursor, acked, _) = p.take().unwrap();
        assert_eq!(cursor, 21);
        assert_eq!(
            acked.iter().collect::<Vec<_>>(),
            (23..3000).collect::<Vec<_>>()
        );
        assert_eq!(
            recorded(&acked),
            (23..23 + MAX_ACKED_RECORDED as u64).collect::<Vec<_>>()
        );
        // A million more behind the same stuck change are kept as the one range they
        // make, not a million entries sorted again at every write.
        for seq in 3000..1_003_000 {
            p.in_flight.insert(seq);
            p.finish(seq, vec![]);
            if seq % 100_000 == 0 {
                p.take();
            }
        }
        p.read = 1_002_999;
        let (cursor, acked, _) = p.take().unwrap();
        assert_eq!(cursor, 21);
        assert_eq!(acked, (23..1_003_000).collect());
        assert_eq!(p.done, acked);
        assert!(p.finished.is_empty());
    }

    use crate::store::ChangeOp;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_connector_task_runs_again() {
        let live = Live::new("t", "c", "running");
        let cancel = CancellationToken::new();
        let runs = std::sync::atomic::AtomicU32::new(0);
        let seen = Mutex::new(Vec::new());
        let start = tokio::time::Instant::now();
        supervised(&live, &cancel, || {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            seen.lock()
                .unwrap()
                .push((start.elapsed().as_secs(), live.health().state.clone()));
            async move {
                match n {
                    0 => panic!("bad change #{n}"),
                    // In blocking work, which comes back as an error.
                    1 => Err(StoreError::Panicked(format!("bad change #{n}"))),
                    // Delivers for longer than the longest wait, then panics.
                    2 => {
                        tokio::time::sleep(RESTART_DELAY_MAX).await;
                        panic!("later")
                    }
                    _ => Ok(()),
                }
            }
        })
        .await;
        let seen = seen.into_inner().unwrap();
        let at: Vec<u64> = seen.iter().map(|(t, _)| *t).collect();
        // Waits of 1 s and 2 s in a row; after the long run, 1 s again.
        assert_eq!(at, [0, 1, 3, 3 + 300 + 1]);
        assert_eq!(seen[0].1, "running");
        assert!(
            seen[1]
                .1
                .starts_with("panicked (1 in a row): bad change #0; starting again at "),
            "{}",
            seen[1].1
        );
        assert!(
            seen[2]
                .1
                .starts_with("panicked (2 in a row): bad change #1")
        );
        assert!(
            seen[3].1.starts_with("panicked (1 in a row): later"),
            "{}",
            seen[3].1
        );
        assert_eq!(live.health().state, "stopped");
        assert_eq!(live.health().last_error.as_deref(), Some("panicked: later"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_ends_the_wait_after_a_panic() {
        let live = Live::new("t", "c", "running");
        let cancel = CancellationToken::new();
        let runs = std::sync::atomic::AtomicU32::new(0);
        let stop = cancel.clone();
        supervised(&live, &cancel, || {
            runs.fetch_add(1, Ordering::SeqCst);
            stop.cancel();
            async { panic!("always") }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(live.health().state, "stopped");
    }

    #[test]
    fn repairs_given_up_in_a_row_while_nothing_is_delivered_reach_the_limit_once() {
        let live = Live::new("t", "c", "running");
        live.count_repairs_afresh();
        assert!(!live.repair_gave_up(0, 3));
        assert!(!live.repair_gave_up(0, 3));
        // A delivery between starts the count over.
        live.success();
        assert!(!live.repair_gave_up(1, 3));
        assert!(!live.repair_gave_up(1, 3));
        // A repair that failed while the target took another: that object's own.
        assert!(!live.repair_gave_up(0, 3));
        assert!(live.repair_gave_up(1, 3));
        // Once: the repairs failing alongside do not ask again.
        assert!(!live.repair_gave_up(1, 3));
        // A new run counts afresh: two of the last, one of this, is not three.
        live.count_repairs_afresh();
        assert!(!live.repair_gave_up(1, 3));
        assert!(!live.repair_gave_up(1, 3));
        live.count_repairs_afresh();
        assert!(!live.repair_gave_up(1, 3));
        assert!(!live.repair_gave_up(1, 3));
        assert!(live.repair_gave_up(1, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_for_repairs_comes_again_once_the_last_ran_out() {
        let live = Live::new("t", "c", "running");
        let pause = Duration::from_secs(60);
        live.pause_for_repairs(3, pause, "503");
        assert!(live.paused_until().is_some());
        tokio::time::advance(pause + Duration::from_secs(1)).await;
        assert!(live.paused_until().is_none());
        // The ended pause is still recorded until a delivery or a probe clears it: it
        // must not keep the next run from pausing.
        live.pause_for_repairs(3, pause, "503");
        assert!(live.paused_until().is_some());
        // A delivery lifts it.
        live.success();
        assert!(live.paused_until().is_none());
    }

    #[test]
    fn requests_failing_together_are_one_failure_in_a_row() {
        let live = Live::new("t", "c", "running");
        let pause = Duration::from_secs(3600);
        // Eight requests fail twice each, their retries interleaved: two rounds.
        let mut streaks: Vec<Streak> = (0..8).map(|_| Streak::default()).collect();
        for _ in 0..2 {
            for s in &mut streaks {
                live.failure(s, "500", None, 3, pause);
            }
        }
        assert!(live.paused_until().is_none());
        assert_eq!(live.retries.load(Ordering::Relaxed), 16);
        // One of them fails a third time: three rounds in a row.
        live.failure(&mut streaks[0], "500", None, 3, pause);
        assert!(live.paused_until().is_some());
        // A resume starts the count over, for requests still retrying too.
        live.resume("a test");
        live.failure(&mut streaks[1], "500", None, 3, pause);
        live.failure(&mut streaks[1], "500", None, 3, pause);
        assert!(live.paused_until().is_none());
        // So does a success.
        live.success();
        live.failure(&mut streaks[1], "500", None, 3, pause);
        live.failure(&mut streaks[1], "500", None, 3, pause);
        assert!(live.paused_until().is_none());
    }

    /// A round's first answer paused the connector (one object's 500), the others'
    /// acknowledgements came after and ended the pause: the requests waiting for it go
    /// at once, not at its old end, which status no longer showed.
    #[tokio::test(start_paused = true)]
    async fn an_acknowledgement_that_ends_a_pause_wakes_those_waiting_for_it() {
        let live = Live::new("t", "c", "running");
        live.failure(
            &mut Streak::default(),
            "500",
            None,
            1,
            Duration::from_secs(30),
        );
        assert!(live.paused_until().is_some());
        let waiter = {
            let live = live.clone();
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                assert!(live.wait_unpaused(&CancellationToken::new()).await);
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        live.success();
        assert_eq!(live.paused_until(), None);
        let waited = waiter.await.unwrap();
        assert!(waited < Duration::from_secs(1), "{waited:?}");
    }

    /// A pause one object's failures set starts the count afresh when it ends, if other
    /// requests wait for it: that object's next failure does not pause the connector
    /// again before they had their turn. Alone, or for a failing target (two requests
    /// failed), the pause is probed once.
    #[tokio::test(start_paused = true)]
    async fn one_objects_pause_ends_with_the_count_afresh_a_targets_does_not() {
        let pause = Duration::from_secs(30);
        let cancel = CancellationToken::new();
        let live = Live::new("t", "c", "running");
        let mut lone = Streak::default();
        for _ in 0..3 {
            live.failure(&mut lone, "500", None, 3, pause);
        }
        assert!(live.paused_until().is_some());
        // Another request waits out the pause with the failing one.
        let other = {
            let (live, cancel) = (live.clone(), cancel.clone());
            tokio::spawn(async move { live.wait_unpaused(&cancel).await })
        };
        tokio::task::yield_now().await;
        let failing = live.wait_unpaused(&cancel);
        tokio::pin!(failing);
        tokio::select! {
            biased;
            _ = &mut failing => panic!("the pause ended at once"),
            () = tokio::task::yield_now() => {}
        }
        tokio::time::advance(pause + Duration::from_secs(1)).await;
        assert!(failing.await);
        assert!(other.await.unwrap());
        live.failure(&mut lone, "500", None, 3, pause);
        assert_eq!(
            live.paused_until(),
            None,
            "one object paused it again at once"
        );

        // Nothing else waiting: its next failure pauses again.
        for _ in 0..2 {
            live.failure(&mut lone, "500", None, 3, pause);
        }
        assert!(live.paused_until().is_some());
        tokio::time::advance(pause + Duration::from_secs(1)).await;
        assert!(live.wait_unpaused(&cancel).await);
        live.failure(&mut lone, "500", None, 3, pause);
        assert!(
            live.paused_until().is_some(),
            "alone, it was not probed once"
        );

        let live = Live::new("t", "c", "running");
        let (mut a, mut b) = (Streak::default(), Streak::default());
        live.failure(&mut a, "503", None, 3, pause);
        live.failure(&mut b, "503", None, 3, pause);
        live.failure(&mut a, "503", None, 3, pause);
        live.failure(&mut a, "503", None, 3, pause);
        assert!(live.paused_until().is_some());
        tokio::time::advance(pause + Duration::from_secs(1)).await;
        assert!(live.wait_unpaused(&cancel).await);
        live.failure(&mut a, "503", None, 3, pause);
        assert!(
            live.paused_until().is_some(),
            "the probe's failure pauses again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_ends_by_the_monotonic_clock_whatever_the_wall_clock_reads() {
        let live = Live::new("t", "c", "running");
        live.failure(
            &mut Streak::default(),
            "503",
            None,
            1,
            Duration::from_secs(60),
        );
        let until = live.paused_until().expect("paused");
        let ahead = until - Utc::now();
        assert!(
            ahead > chrono::Duration::seconds(55) && ahead <= chrono::Duration::seconds(60),
            "{ahead}"
        );
        // tokio's clock moves on a minute while the wall clock stays where it was, as
        // after a step back of a minute: the pause is over all the same.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(live.paused_until(), None);
        let cancel = CancellationToken::new();
        assert!(live.wait_unpaused(&cancel).await);
        // A pause until resumed stays one, whatever either clock does.
        live.pause_until_resumed("410", None);
        tokio::time::advance(Duration::from_secs(86_400 * 30)).await;
        assert_eq!(live.paused_until(), Some(DateTime::<Utc>::MAX_UTC));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_settles_into_one_write_but_a_long_one_does_not_wait_forever() {
        let cancel = CancellationToken::new();
        let feed = |every: u64, n: u64| {
            let (tx, rx) = tokio::sync::watch::channel(0u64);
            tokio::spawn(async move {
                for i in 1..=n {
                    tokio::time::sleep(Duration::from_millis(every)).await;
                    tx.send(i).unwrap();
                }
                // Keep the channel open until the test ends.
                std::future::pending::<()>().await;
            });
            rx
        };
        // Five changes 300 ms apart, the last at 1.5 s: quiet for 1 s after it.
        let mut rx = feed(300, 5);
        let start = tokio::time::Instant::now();
        assert!(settled(&mut rx, 1000, &cancel).await);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(2500), "{took:?}");
        assert!(took < Duration::from_millis(2600), "{took:?}");
        // Changes that never stop: ten times the debounce, then the write.
        let mut rx = feed(300, 1000);
        let start = tokio::time::Instant::now();
        assert!(settled(&mut rx, 1000, &cancel).await);
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(10), "{took:?}");
        assert!(took < Duration::from_millis(10_400), "{took:?}");
    }

    #[test]
    fn backoff_doubles_with_jitter_and_never_exceeds_its_cap() {
        let retry = crate::connectors::RetryConfig {
            initial_delay_ms: 200,
            max_delay_ms: 5000,
            ..Default::default()
        };
        let (initial, max) = (retry.initial_delay(), retry.max_delay());
        for _ in 0..50 {
            let delays: Vec<Duration> = backoff(&retry).take(12).collect();
            assert!(
                delays[0] >= initial / 2 && delays[0] <= initial,
                "{delays:?}"
            );
            assert!(delays.iter().all(|d| *d <= max), "{delays:?}");
            // Past the cap the delays still spread (jitter), within its upper half.
            assert!(delays[8..].iter().all(|d| *d >= max / 2), "{delays:?}");
        }
        let late: std::collections::BTreeSet<Duration> =
            (0..20).filter_map(|_| backoff(&retry).nth(10)).collect();
        assert!(late.len() > 1, "no jitter at the cap: {late:?}");
    }

    #[test]
    fn group_changes_depend_on_their_members() {
        let ev = ChangeEvent {
            seq: 1,
            at: Utc::now(),
            resource_type: "Group".into(),
            id: "g".into(),
            op: ChangeOp::Updated,
            snapshot: None,
            members_added: vec!["u1".into()],
            members_removed: vec!["u2".into()],
            assignment: None,
            deactivated: false,
            reactivated: false,
            deleting_user: false,
            groups: None,
        };
        assert_eq!(
            object_keys(&ev, &[], true),
            ["Group/g", "User/u1", "User/u2"]
        );
        let reports = ["r1".to_owned()];
        assert_eq!(
            object_keys(&ev, &reports, false),
            ["Group/g", "User/u1", "User/u2", "User/r1"]
        );
    }

    #[test]
    fn a_change_of_state_depends_on_the_users_groups() {
        let ev = |deactivated: bool, reactivated: bool| ChangeEvent {
            seq: 1,
            at: Utc::now(),
            resource_type: "User".into(),
            id: "u".into(),
            op: ChangeOp::Updated,
            snapshot: None,
            members_added: vec![],
            members_removed: vec![],
            assignment: None,
            deactivated,
            reactivated,
            deleting_user: false,
            groups: Some(vec!["g1".into(), "g2".into()]),
        };
        assert_eq!(
            object_keys(&ev(false, true), &[], true),
            ["User/u", "Group/g1", "Group/g2"]
        );
        assert_eq!(
            object_keys(&ev(true, false), &[], true),
            ["User/u", "Group/g1", "Group/g2"]
        );
        assert_eq!(object_keys(&ev(false, false), &[], true), ["User/u"]);
        // A target sent no class with them keeps them apart from the groups' changes.
        assert_eq!(object_keys(&ev(false, true), &[], false), ["User/u"]);
    }
}
