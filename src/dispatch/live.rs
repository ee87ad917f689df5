//! The live, shared state of a running connector: its health, pauses, counts, holds.

use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::dispatcher::Counted;
use super::status::{rfc3339, shown_by_api, unquoted};
use crate::connectors::http;
use crate::store::RefusalPause;

/// A time ahead (a pause's end, a retry), kept on the monotonic clock and shown on the
/// wall clock as it reads when asked. Kept as a wall-clock time, a clock stepped back a
/// day (NTP, a VM resumed) held a paused connector for that day, and showed a retry a day
/// ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Deadline(tokio::time::Instant);

impl Deadline {
    pub(super) fn after(wait: Duration) -> Self {
        Deadline(tokio::time::Instant::now() + wait)
    }

    /// On the wall clock as it reads now; None once it has passed.
    pub(super) fn wall(self) -> Option<DateTime<Utc>> {
        let left = self.0.checked_duration_since(tokio::time::Instant::now())?;
        (!left.is_zero()).then(|| Utc::now() + chrono::Duration::from_std(left).unwrap_or_default())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pause {
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
pub(super) struct Health {
    pub(super) state: String,
    pub(super) last_success_at: Option<DateTime<Utc>>,
    pub(super) last_error: Option<String>,
    pub(super) last_error_at: Option<DateTime<Utc>>,
    /// The start of the target's answer as `last_error` quotes it. `/status` needs no
    /// token, and a target that echoes what it was sent put a user's name, email and
    /// phone there for anyone who could reach the port; it shows the error without it.
    pub(super) last_answer: Option<String>,
    pub(super) pause: Option<Pause>,
    /// A pause was logged and its end not yet: the end is logged once, by whichever
    /// request loop notices it first.
    pause_logged: bool,
    /// The pause came from one object's failures alone (no second request had failed):
    /// its end starts the count afresh, so that object cannot pause the connector again
    /// with its next failure before the others had their turn.
    pause_lone: bool,
    /// The soonest attempt ahead of a request waiting to retry.
    pub(super) next_retry: Option<Deadline>,
    /// The scheduled write a CSV connector waits for.
    pub(super) next_write_at: Option<DateTime<Utc>>,
    /// Why, and since when, the connector is paused for its target's refusals (with
    /// `Pause::Refusals`).
    refusal_pause: Option<RefusalPause>,
}

impl Health {
    /// Record an error with its time: `rosterd status` shows when it happened.
    pub(super) fn error(&mut self, reason: String) {
        self.last_error = Some(reason);
        self.last_error_at = Some(Utc::now());
        self.last_answer = None;
    }

    /// Record an error that quotes `answer`, the start of what the target said (as
    /// [`http::brief_answer`] gives it).
    pub(super) fn error_quoting(&mut self, reason: String, answer: Option<String>) {
        self.error(reason);
        self.last_answer = answer;
    }

    fn clear_error(&mut self) {
        self.last_error = None;
        self.last_error_at = None;
        self.last_answer = None;
    }
}

/// One request's run of failed attempts, counted from the last time the connector's
/// run of failures ended (a success, a resume).
#[derive(Default)]
pub(super) struct Streak {
    epoch: u64,
    failures: u64,
}

/// Shared, live state of one connector.
pub(super) struct Live {
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
    pub(super) delivered: AtomicU64,
    pub(super) retries: AtomicU64,
    /// Requests that failed since the run of failures began (the epoch): two or more,
    /// with nothing acknowledged in between, say the target is failing, not one object.
    pub(super) failing_requests: AtomicU64,
    /// Wakes request loops waiting out a pause or a backoff when a pause begins or is
    /// lifted (a resume, a reload).
    pub(super) pause_changed: tokio::sync::Notify,
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
    pub(super) approvals: watch::Sender<Approval>,
    /// The last approval the connector has carried out, and through which change.
    pub(super) applied: watch::Sender<(u64, u64)>,
    /// Dead letters an operator's replay is sending now: another replay of one of them
    /// (a CLI run again while the call it gave up on goes on) is refused, not sent twice.
    replaying: Mutex<std::collections::HashSet<u64>>,
    /// Set before a reload stops it for good (its file removed, or naming another
    /// connector): what its stop leaves unsent has no next start to go out at.
    pub(super) retiring: AtomicBool,
}

/// A dead letter claimed for one replay until dropped (see [`Live::replaying`]).
pub(super) struct ReplayClaim<'a> {
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
pub(super) struct Approval {
    pub(super) n: u64,
    pub(super) skip: bool,
}

impl Live {
    pub(super) fn new(tenant: &str, name: &str, state: &str) -> Arc<Live> {
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
    pub(super) fn claim_replay(&self, id: u64) -> Option<ReplayClaim<'_>> {
        // Not `then_some`: its claim, built and dropped when the letter is taken, would
        // give back the other replay's claim (and lock the set it is locked in).
        let free = self.replaying().insert(id);
        free.then(|| ReplayClaim { live: self, id })
    }

    pub(super) fn held_reason(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Held by its `[guard]` until the operator resumes it.
    pub(super) fn hold(&self, reason: &str) {
        let already = self.held_reason().replace(reason.to_owned()).is_some();
        self.health().error(reason.to_owned());
        if !already {
            tracing::error!(
                reason,
                "Connector held by its [guard] until resumed (`rosterd resume`); a reload lifts it only by changing the [guard]."
            );
        }
    }

    pub(super) fn held(&self) -> bool {
        self.held_reason().is_some()
    }

    /// The operator's resume: a hold lets its changes go, or (`skip`) skips them. The
    /// approval's number, when there was a hold.
    pub(super) fn approve(&self, skip: bool) -> Option<u64> {
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

    pub(super) fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn set_state(&self, s: &str) {
        self.health().state = s.to_owned();
    }

    pub(super) fn success(&self) {
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
    pub(super) fn counts(&self) -> Counted {
        Counted {
            delivered: self.delivered.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            last_success_at: self.health().last_success_at,
        }
    }

    /// Go on from the counts of the run before (see [`Live::counts`]). The last success
    /// too: cleared by a reload, it read "never" beside a count of deliveries, for as long
    /// as a quiet connector sent nothing.
    pub(super) fn count_on_from(&self, before: Counted) {
        self.delivered
            .fetch_add(before.delivered, Ordering::Relaxed);
        self.retries.fetch_add(before.retries, Ordering::Relaxed);
        let mut h = self.health();
        h.last_success_at = h.last_success_at.max(before.last_success_at);
    }

    /// A delivery, counted and dated. All an operator's replay that got through is (the
    /// metric counts it too): not a sign that the target recovered, since its failures
    /// leave the streak and any pause alone, and so does its success.
    pub(super) fn count_delivery(&self) {
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
    pub(super) fn failure(
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
    pub(super) fn count_repairs_afresh(&self) {
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
    ///
    /// [`Ctx::takes_writes`]: super::ctx::Ctx::takes_writes
    pub(super) fn repair_gave_up(&self, delivered: u64, limit: u64) -> bool {
        if self.delivered.load(Ordering::Acquire) != delivered {
            return false;
        }
        self.repairs_given_up.fetch_add(1, Ordering::AcqRel) + 1 == limit
    }

    /// The target took no write after a reconciliation's repairs failed in a row: the
    /// connector pauses as for the mirror's failures, and the run stops at the pause.
    pub(super) fn pause_for_repairs(&self, repairs: u64, pause: Duration, reason: &str) {
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

    pub(super) fn pause_until_resumed(&self, reason: &str, answer: Option<String>) {
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
    pub(super) fn refused(&self, limit: u64, reason: &str, answer: &str) {
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
    pub(super) fn refusal_pause(&self) -> Option<RefusalPause> {
        let h = self.health();
        h.refusal_pause
            .clone()
            .filter(|_| h.pause == Some(Pause::Refusals))
    }

    /// Paused for refusals as the store says it was when the connector last stopped.
    pub(super) fn restore_refusal_pause(&self, pause: RefusalPause) {
        let mut h = self.health();
        h.pause = Some(Pause::Refusals);
        h.error_quoting(pause.why.clone(), pause.answer.clone());
        h.last_error_at = Some(pause.at);
        h.refusal_pause = Some(pause);
        h.pause_logged = true;
    }

    /// A change the target took whole: its refusals before were those objects' own.
    pub(super) fn change_taken(&self) {
        self.refusals_in_a_row.store(0, Ordering::Release);
    }

    pub(super) fn resume(&self, by: &str) -> bool {
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

    pub(super) fn paused_until(&self) -> Option<DateTime<Utc>> {
        self.health().pause.and_then(Pause::until)
    }

    /// While paused: until when, and the last error that paused it.
    pub(super) fn pause_reason(&self) -> Option<String> {
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
    pub(super) async fn wait_unpaused(&self, cancel: &CancellationToken) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
