//! Background jobs and their cron schedules. Jobs: reclassification (after a bundle
//! change) and reconciliation (reclassify, then re-send what drifted downstream; asked for
//! through `POST /api/v1/roster/scim:sync` or on the `reconcile` schedule). One job per
//! tenant at a time; while it runs, manual overrides are refused with 409 so a person's
//! decision and the job cannot interleave. The `export` and `compact` schedules run
//! outside that slot: they change no assignment.
use chrono::Utc;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::classify::TenantPolicy;
use crate::dispatch::ReconcileMode;
use crate::server::AppState;
use crate::store::{Job, JobStatus, ScheduledPart, ScheduledResult, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("a job is already running for tenant {0:?}")]
    AlreadyRunning(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Releases the tenant's job slot however the job ends, panics included.
struct Slot {
    state: Arc<AppState>,
    tenant: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.state.store.end_job(&self.tenant);
    }
}

/// Queue a reclassification of every user of `tenant` and return the job as queued.
pub async fn start_reclassify(
    state: Arc<AppState>,
    tenant: &str,
    kind: &str,
) -> Result<Job, JobError> {
    start_job(state, tenant, kind, None, None).await
}

/// Queue a reconciliation of `tenant`: reclassify, then repair every connector's drift
/// (only `connector`'s, when named); with `full`, send every object again (see
/// [`ReconcileMode::full`]).
pub async fn start_reconcile(
    state: Arc<AppState>,
    tenant: &str,
    kind: &str,
    full: bool,
    connector: Option<&str>,
) -> Result<Job, JobError> {
    let mode = ReconcileMode {
        dry_run: false,
        full,
    };
    start_job(state, tenant, kind, Some(mode), connector).await
}

/// A job: a reclassification, followed by a reconciliation when `reconcile` is given.
async fn start_job(
    state: Arc<AppState>,
    tenant: &str,
    kind: &str,
    reconcile: Option<ReconcileMode>,
    connector: Option<&str>,
) -> Result<Job, JobError> {
    let full = reconcile.is_some_and(|m| m.full);
    let (job, slot) = claim(&state, tenant, kind, full, connector).await?;
    let queued = job.clone();
    let tenant = tenant.to_owned();
    let jobs = state.jobs.clone();
    jobs.spawn(async move {
        let mut next = Some((job, slot, reconcile));
        while let Some((job, slot, reconcile)) = next.take() {
            let span = tracing::info_span!("job", tenant = %tenant, job_id = %job.job_id, kind = %job.kind);
            let record = job.clone();
            let run = tracing::Instrument::instrument(
                crate::ops::panics::catch(run_job(&state, &tenant, job, slot, reconcile)),
                span.clone(),
            );
            let rerun = match run.await {
                Ok(rerun) => rerun,
                Err(panic) => {
                    tracing::Instrument::instrument(
                        record_panicked(&state, &tenant, record, &panic),
                        span,
                    )
                    .await;
                    false
                }
            };
            if rerun {
                // The reload that changed the bundle could not start its own job while
                // this one held the slot; without another pass, users passed before the
                // reload would keep the old bundle's archetypes until the next restart.
                tracing::info!(tenant = %tenant, "The archetype bundle changed while a job ran; reclassifying again.");
                match claim(&state, &tenant, "bundle_change", false, None).await {
                    Ok((job, slot)) => next = Some((job, slot, None)),
                    // A job someone started meanwhile reclassifies with the new bundle.
                    Err(JobError::AlreadyRunning(_)) => {
                        tracing::info!(tenant = %tenant, "Another job took the slot first; it reclassifies with the new bundle.")
                    }
                    Err(e) => {
                        tracing::error!(tenant = %tenant, error = %e, "Cannot start the reclassification.")
                    }
                }
            }
        }
    });
    Ok(queued)
}

/// A job that panicked (a bug) ends `failed` with the panic's message, rather than
/// showing `running` until the next restart marks it interrupted. Its slot was freed as
/// the panic unwound, so the job can be started again at once.
async fn record_panicked(state: &AppState, tenant: &str, mut job: Job, panic: &str) {
    if state.shutdown.is_cancelled() {
        // As in `run_job`: a job the stop cut off is marked interrupted at the next
        // start, whatever its last moments did.
        tracing::error!(%panic, "The job panicked (a bug) as the daemon stopped; the next start marks it interrupted.");
        return;
    }
    tracing::error!(%panic, "The job panicked (a bug); it is recorded as failed.");
    job.status = JobStatus::Failed;
    job.error = Some(format!(
        "the job stopped on a bug in rosterd (it panicked: {panic}); the log has the details; starting the job again is safe"
    ));
    record_end(state, tenant, job).await;
}

/// A job's end, however it came: when, the jobs metric, and the record that
/// `scim/jobs/{id}` and `/status` read.
async fn record_end(state: &AppState, tenant: &str, mut job: Job) {
    job.finished_at = Some(Utc::now());
    count_finished_job(tenant, &job);
    if let Err(e) = state.store.put_job(tenant, job).await {
        tracing::error!(error = %e, "Cannot record the job's outcome.");
    }
}

/// Take the tenant's job slot and record a queued job in it.
async fn claim(
    state: &Arc<AppState>,
    tenant: &str,
    kind: &str,
    full: bool,
    connector: Option<&str>,
) -> Result<(Job, Slot), JobError> {
    // The store holds the flag, under the tenant's write lock, so an override write is
    // either before the job or refused with 409 (never inside it).
    if !state.store.claim_job(tenant).await? {
        return Err(JobError::AlreadyRunning(tenant.to_owned()));
    }
    let slot = Slot {
        state: state.clone(),
        tenant: tenant.to_owned(),
    };
    let job = Job {
        job_id: format!("scim-sync-{}", uuid::Uuid::new_v4().simple()),
        kind: kind.to_owned(),
        status: JobStatus::Queued,
        started_at: Utc::now(),
        finished_at: None,
        counts: BTreeMap::new(),
        error: None,
        full,
        connector: connector.map(str::to_owned),
    };
    state.store.put_job(tenant, job.clone()).await?;
    Ok((job, slot))
}

/// Run a claimed job to its end; true if the tenant's bundle changed meanwhile.
async fn run_job(
    state: &AppState,
    tenant: &str,
    mut job: Job,
    slot: Slot,
    reconcile: Option<ReconcileMode>,
) -> bool {
    job.status = JobStatus::Running;
    if let Err(e) = state.store.put_job(tenant, job.clone()).await {
        if state.shutdown.is_cancelled() {
            tracing::info!(error = %e, "The shutdown came before the job ran; the next start marks it interrupted.");
        } else {
            tracing::error!(error = %e, "Cannot record the job as running; it will not run.");
        }
        return false;
    }
    tracing::info!("Reclassification started.");
    let policy = state.roster.tenants.get(tenant).and_then(|t| t.policy());
    // Under way, the tenant is half on the new policy: were the job cut off and the old
    // bundle put back before the next start, the fingerprint (still the old one's) would
    // match again and leave those users on archetypes the bundle lacks. Recorded again
    // once the job has gone through.
    if let Some(p) = &policy
        && !state
            .store
            .policy_recorded(tenant, p.fingerprint())
            .unwrap_or(false)
        && let Err(e) = state.store.clear_policy_fingerprint(tenant).await
    {
        tracing::warn!(error = %e, "Cannot mark the tenant as being reclassified; were this job cut off, the next start might not reclassify it.");
    }
    let result = state.store.reclassify(tenant, 500, &state.shutdown).await;
    match result {
        // The stop came between two batches: said below, with the stop's other cases.
        Ok(None) => {}
        Ok(Some(c)) => {
            job.status = JobStatus::Succeeded;
            job.counts.insert("users".into(), c.scanned);
            job.counts.insert("changed".into(), c.changed);
            job.counts.insert("overrides_kept".into(), c.overrides_kept);
            let moved: u64 = c.moved_off_removed.values().sum();
            job.counts.insert("moved_off_removed".into(), moved);
            if moved > 0 {
                let list: Vec<String> = c
                    .moved_off_removed
                    .iter()
                    .map(|(id, n)| format!("{id} ({n})"))
                    .collect();
                tracing::warn!(
                    archetypes = %list.join(", "),
                    users = moved,
                    "Users held archetypes the bundle no longer has and were classified again; those at or above the review threshold took their new archetype with no person's review. Their governance events (rbac.archetype_assigned) name what they held. Check them, or put the archetypes back in the bundle."
                );
            }
            // A bundle reloaded while the job ran applied only to the users after that
            // point; its fingerprint is left unrecorded and the job runs again (below).
            if let Some(p) = policy
                .as_ref()
                .filter(|p| !policy_changed(state, tenant, p))
                && let Err(e) = state
                    .store
                    .set_policy_fingerprint(tenant, p.fingerprint())
                    .await
            {
                tracing::warn!(error = %e, "Cannot record the bundle fingerprint; the next start reclassifies again.");
            }
            if let Some(p) = &policy {
                let known = p.bundle().archetype_ids();
                match state.store.archetypes_held_outside(tenant, &known) {
                    Ok(orphans) if !orphans.is_empty() => {
                        let list: Vec<String> = orphans
                            .iter()
                            .map(|(id, users, _)| format!("{id} ({users})"))
                            .collect();
                        tracing::warn!(
                            archetypes = %list.join(", "),
                            "Users hold archetypes the bundle no longer has (manual overrides stand until cleared or replaced); GET /api/v1/roster/archetypes lists them with in_bundle false."
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot check for archetypes outside the bundle.")
                    }
                }
            }
            tracing::info!(
                users = c.scanned,
                changed = c.changed,
                "Reclassification finished."
            );
            if let Ok(n) = state.store.review_queue_len(tenant) {
                job.counts.insert("review_queue".into(), n);
            }
            if let Some(mode) = reconcile {
                tracing::info!(
                    connector = job.connector.as_deref(),
                    full = mode.full,
                    "Reconciliation started."
                );
                match state
                    .dispatch
                    .reconcile(tenant, mode, job.connector.as_deref())
                    .await
                {
                    Ok(reports) => {
                        for r in &reports {
                            let mut add = |k: &str, v: u64| {
                                *job.counts.entry(k.into()).or_default() += v;
                            };
                            add("drift_checked", r.checked);
                            add("drift_found", r.drifted);
                            add("drift_pending", r.pending);
                            add("drift_found_at_target", r.found_at_target);
                            add("drift_sent", r.sent);
                            add("drift_failed", r.failed);
                        }
                        let mut errors = Vec::new();
                        // Which connectors, and how many each; a paused one says more
                        // below.
                        errors.extend(reports.iter().filter(|r| r.failed > 0 && r.paused.is_none()).map(|r| {
                            format!(
                                "connector {}: {} drifted objects could not be re-sent (the target refused them or kept failing; its last_error in /status says how); they stay drifted, and the next reconciliation sends them again",
                                r.connector, r.failed
                            )
                        }));
                        // A read-back cut short left part of the target unchecked: the
                        // job did not do all it was asked to.
                        errors.extend(reports.iter().filter_map(|r| {
                            let why = r.read_back_stopped.as_ref()?;
                            Some(format!(
                                "connector {}: the read-back stopped early: {why}",
                                r.connector
                            ))
                        }));
                        // A pause ends re-sending to that connector: which, and why.
                        errors.extend(reports.iter().filter_map(|r| {
                            let why = r.paused.as_ref()?;
                            Some(match r.failed {
                                0 => format!(
                                    "connector {}: {why}; its changes wait for the pause to end or `rosterd resume`",
                                    r.connector
                                ),
                                n => format!(
                                    "connector {}: {n} drifted objects not re-sent: {why}; run the job again after the pause or `rosterd resume`",
                                    r.connector
                                ),
                            })
                        }));
                        errors.extend(reports.iter().filter_map(|r| {
                            let why = r.not_loaded.as_ref()?;
                            Some(format!("connector {}: {why}", r.connector))
                        }));
                        if !errors.is_empty() {
                            job.status = JobStatus::Failed;
                            job.error = Some(errors.join("; "));
                        }
                        // The job's own end, whoever started it (a schedule only logs
                        // that the job began), logged once; a job the shutdown cut off
                        // did not finish, and says so below instead.
                        if !state.shutdown.is_cancelled() {
                            // One field each, so a JSON log holds numbers, not a map in a
                            // string.
                            let n = |k: &str| job.counts.get(k).copied().unwrap_or(0);
                            macro_rules! end {
                                ($level:ident, $msg:literal) => {
                                    tracing::$level!(
                                        drift_checked = n("drift_checked"),
                                        drift_found = n("drift_found"),
                                        drift_pending = n("drift_pending"),
                                        drift_found_at_target = n("drift_found_at_target"),
                                        drift_sent = n("drift_sent"),
                                        drift_failed = n("drift_failed"),
                                        error = job.error.as_deref(),
                                        $msg
                                    )
                                };
                            }
                            if job.status == JobStatus::Failed {
                                end!(warn, "Reconciliation job failed.");
                            } else {
                                end!(info, "Reconciliation finished.");
                            }
                        }
                    }
                    Err(e) => {
                        job.status = JobStatus::Failed;
                        job.error = Some(e.to_string());
                        job_error(state, &e, "Reconciliation failed.");
                    }
                }
            }
        }
        Err(e) => {
            job.status = JobStatus::Failed;
            job.error = Some(e.to_string());
            job_error(state, &e, "Reclassification failed.");
        }
    }
    if state.shutdown.is_cancelled() {
        // The stop cut it off (a cancelled send reads as neither sent nor failed, so
        // even "succeeded" cannot be trusted now): no fault of the job, and no success.
        // It stays recorded as running, and the next start marks it interrupted (and
        // counts it so), as after a crash.
        tracing::info!(
            error = job.error.as_deref(),
            "The shutdown cut the job off; the next start marks it interrupted."
        );
        return false;
    }
    let rerun = job.status != JobStatus::Failed
        && policy.is_some_and(|p| policy_changed(state, tenant, &p));
    // Free the slot before the outcome is visible: whoever sees "succeeded" may override.
    drop(slot);
    record_end(state, tenant, job).await;
    rerun
}

/// A job's failure is an error, unless the daemon is stopping: then the stop is the
/// likely cause (blocking writes are cancelled with the runtime), and the job is left
/// for the next start to mark interrupted, which `run_job` logs with this error.
fn job_error(state: &AppState, e: &dyn std::fmt::Display, what: &str) {
    if !state.shutdown.is_cancelled() {
        tracing::error!(error = %e, "{what}");
    }
}

/// Whether the tenant's policy now differs from `started_with`.
fn policy_changed(state: &AppState, tenant: &str, started_with: &TenantPolicy) -> bool {
    state
        .roster
        .tenants
        .get(tenant)
        .and_then(|t| t.policy())
        .is_none_or(|now| now.fingerprint() != started_with.fingerprint())
}

/// Last and next run of one schedule.
#[derive(Debug, Clone, Default)]
struct ScheduleRun {
    cron: String,
    /// When a run last did something for at least one tenant (a run that only skipped
    /// does not count).
    last_run: Option<chrono::DateTime<Utc>>,
    /// Per tenant, in config order, what its last run that was not skipped did.
    parts: Vec<(String, ScheduledPart)>,
    /// When a run last found a tenant's job slot taken, and which tenants.
    last_skipped_at: Option<chrono::DateTime<Utc>>,
    last_skipped: Option<String>,
    next_run: Option<chrono::DateTime<Utc>>,
}

/// One tenant's result of a scheduled run.
enum Outcome {
    Done(ScheduledPart),
    /// The part failed (a CSV connector's files not written, say); shown as a done one.
    Failed(ScheduledPart),
    /// The tenant's job slot was taken: its last result stands.
    Skipped(String),
}

impl Outcome {
    /// The `result` label of `rosterd_schedule_runs_total`. `last_run` moves on a failed
    /// run too, so an alert on it alone never fires for an export that fails every
    /// night; this counter's `failed` does. A reconcile part is done once its job started.
    fn label(&self) -> &'static str {
        match self {
            Outcome::Done(_) => "done",
            Outcome::Failed(_) => "failed",
            Outcome::Skipped(_) => "skipped",
        }
    }
}

/// The schedules' state, shared with `/status`.
#[derive(Default)]
pub struct Schedules {
    runs: std::sync::Mutex<BTreeMap<String, ScheduleRun>>,
    /// Set at the first compaction: every tenant's and every run's is read against it.
    compaction_clock: std::sync::Mutex<Option<CompactionClock>>,
}

impl Schedules {
    fn update(&self, name: &str, f: impl FnOnce(&mut ScheduleRun)) {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        f(runs.entry(name.to_owned()).or_default());
    }

    /// What compaction takes as now: see [`CompactionClock`].
    fn compaction_now(
        &self,
        now: chrono::DateTime<Utc>,
        started_at: chrono::DateTime<Utc>,
        since_start: std::time::Duration,
    ) -> chrono::DateTime<Utc> {
        let mut clock = self
            .compaction_clock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        clock
            .get_or_insert_with(|| CompactionClock::at_start(started_at))
            .read(now, since_start)
    }

    /// Record a run's per-tenant outcomes at `at`.
    fn record(&self, name: &str, at: chrono::DateTime<Utc>, outcomes: Vec<(String, Outcome)>) {
        // Every run lists every tenant, in config order.
        let order: Vec<String> = outcomes.iter().map(|(t, _)| t.clone()).collect();
        self.update(name, |r| {
            let mut skipped = Vec::new();
            let mut done = false;
            for (tenant, outcome) in outcomes {
                metrics::counter!(
                    crate::ops::metrics::SCHEDULE_RUNS,
                    "schedule" => name.to_owned(),
                    "result" => outcome.label(),
                )
                .increment(1);
                match outcome {
                    Outcome::Done(part) | Outcome::Failed(part) => {
                        done = true;
                        match r.parts.iter_mut().find(|(t, _)| *t == tenant) {
                            Some(slot) => slot.1 = part,
                            None => r.parts.push((tenant, part)),
                        }
                    }
                    Outcome::Skipped(text) => skipped.push(text),
                }
            }
            // A tenant first done in a later run (its slot was taken at first) takes its
            // place, not the end: `last_result` reads in the same order every time.
            r.parts
                .sort_by_key(|(t, _)| order.iter().position(|o| o == t).unwrap_or(usize::MAX));
            if done {
                r.last_run = Some(at);
            }
            if !skipped.is_empty() {
                r.last_skipped_at = Some(at);
                r.last_skipped = Some(skipped.join("; "));
            }
        });
    }
}

/// A scheduled job's state, as `last_result` words it.
fn job_state(job: &Job) -> String {
    match job.status {
        JobStatus::Queued | JobStatus::Running => "running".to_owned(),
        JobStatus::Succeeded => "succeeded".to_owned(),
        JobStatus::Failed => match &job.error {
            Some(e) => format!("failed: {e}"),
            None => "failed".to_owned(),
        },
        JobStatus::Interrupted => "interrupted (the daemon stopped while it ran)".to_owned(),
    }
}

/// The schedules' last and next runs, for `/status`. A `reconcile` run's
/// `last_result` names, per tenant, the job it started and that job's state now
/// (running, succeeded, failed with its error, interrupted); `jobs` holds those job
/// records as `GET /api/v1/roster/scim/jobs/{id}` gives them. A run that found a
/// tenant's job slot taken leaves that tenant's last result as it was and sets
/// `last_skipped_at` and `last_skipped` instead.
pub fn status(state: &AppState) -> serde_json::Value {
    let runs = state
        .schedules
        .runs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut doc = serde_json::Map::new();
    for (name, run) in runs {
        let mut text = Vec::new();
        let mut jobs = serde_json::Map::new();
        // Each tenant's part on its own as well: with hundreds of tenants `last_result`
        // is one long line, and `rosterd status --tenant` shows one tenant's part.
        let mut results = serde_json::Map::new();
        for (tenant, part) in &run.parts {
            let said = match part {
                ScheduledPart::Text(t) => t.clone(),
                ScheduledPart::Job(id) => match state.store.job(tenant, id) {
                    Ok(Some(job)) => {
                        jobs.insert(
                            tenant.clone(),
                            serde_json::to_value(&job).unwrap_or_default(),
                        );
                        format!("{tenant}: job {id} {}", job_state(&job))
                    }
                    Ok(None) => format!("{tenant}: job {id} (no record)"),
                    Err(e) => format!("{tenant}: job {id} (its state cannot be read: {e})"),
                },
            };
            results.insert(tenant.clone(), said.clone().into());
            text.push(said);
        }
        let mut entry = serde_json::json!({
            "cron": run.cron,
            "last_run": run.last_run,
            "last_result": (!text.is_empty()).then(|| text.join("; ")),
            "results": results,
            "last_skipped_at": run.last_skipped_at,
            "last_skipped": run.last_skipped,
            "next_run": run.next_run,
        });
        if !jobs.is_empty() {
            entry["jobs"] = serde_json::Value::Object(jobs);
        }
        doc.insert(name, entry);
    }
    serde_json::Value::Object(doc)
}

/// Each schedule's last run, for `/metrics`: the schedules that ran at least once.
pub fn last_runs(state: &AppState) -> Vec<(String, chrono::DateTime<Utc>)> {
    let runs = state
        .schedules
        .runs
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    runs.iter()
        .filter_map(|(name, r)| r.last_run.map(|at| (name.clone(), at)))
        .collect()
}

/// The next time `cron`, read in `tz`, fires.
pub fn next_run(cron: &croner::Cron, tz: chrono_tz::Tz) -> Option<chrono::DateTime<Utc>> {
    next_run_after(cron, tz, Utc::now(), None)
}

/// How far back the wall clock may be stepped after a run without that run's time coming
/// round again. As cron has it: a smaller step (an NTP correction, a clock set by hand)
/// must not run the schedule twice; a larger one corrects a wrong clock, and the schedule
/// follows the new time.
const REPEAT_GUARD: chrono::TimeDelta = chrono::TimeDelta::hours(3);

/// How long a wait for a wall-clock time sleeps before reading the wall clock again.
/// tokio sleeps on the monotonic clock, which an NTP step does not move and a paused VM
/// does not advance: one sleep for the whole wait fired late (or early) by the step.
const WALL_CLOCK_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// The next time `cron`, read in `tz`, fires after `now`, or after `fired` (the time of
/// the run just made) when the clock went back behind it by less than [`REPEAT_GUARD`].
pub fn next_run_after(
    cron: &croner::Cron,
    tz: chrono_tz::Tz,
    now: chrono::DateTime<Utc>,
    fired: Option<chrono::DateTime<Utc>>,
) -> Option<chrono::DateTime<Utc>> {
    let from = match fired {
        Some(f) if f > now && f - now <= REPEAT_GUARD => f,
        _ => now,
    };
    occurrence_after(cron, tz, from)
}

/// The first time `cron`, read in `tz`, fires after `t`'s second.
fn occurrence_after(
    cron: &croner::Cron,
    tz: chrono_tz::Tz,
    t: chrono::DateTime<Utc>,
) -> Option<chrono::DateTime<Utc>> {
    cron.find_next_occurrence(&t.with_timezone(&tz), false)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The last time `cron`, read in `tz`, fired up to `now` (its second included), if any.
fn occurrence_until(
    cron: &croner::Cron,
    tz: chrono_tz::Tz,
    now: chrono::DateTime<Utc>,
) -> Option<chrono::DateTime<Utc>> {
    cron.find_previous_occurrence(&now.with_timezone(&tz), true)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The wall clock, but no later than `anchor` (a reading believed) plus the monotonic time
/// since: a step forward while the daemon runs (a wrong NTP answer, a year ahead) is not
/// believed where believing it loses data. Compaction took every change written meanwhile
/// as a year old otherwise, since the newest change was then stamped a year ahead too.
/// Time a VM spent paused is not counted either until the clock is believed again (see
/// [`CompactionClock`]), which only keeps changes a little longer.
fn vouched_now(
    now: chrono::DateTime<Utc>,
    anchor: chrono::DateTime<Utc>,
    since_anchor: std::time::Duration,
) -> chrono::DateTime<Utc> {
    chrono::Duration::from_std(since_anchor)
        .ok()
        .and_then(|d| anchor.checked_add_signed(d))
        .map_or(now, |vouched| now.min(vouched))
}

/// How far the wall clock may run ahead of the monotonic one between two compactions and
/// still count as having kept time. Both are slewed alike by NTP; this covers the start
/// (the monotonic clock is read a little after the wall clock) and the two reads' order.
const KEPT_TIME: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

/// How long a clock stepped forward must keep time before compaction believes it: longer
/// than NTP's longest default poll (timesyncd 2048 s, chrony 1024 s), so that a wrong
/// answer the next poll takes back is never believed, while a correction (a clock that
/// was behind at start: no RTC, NTP synced after the start) is, within the hour.
const STEP_SETTLES: std::time::Duration = std::time::Duration::from_secs(3600);

/// The wall clock as compaction may believe it, from one run to the next. Anchored at the
/// start's time, and moved to each reading believed since; a reading ahead of the anchor
/// by more than the monotonic time since is a step forward, believed only once the clock
/// has kept time from it for [`STEP_SETTLES`]. Without that re-anchoring, a clock that was
/// behind at start and corrected later was never believed until a restart, and compaction
/// removed nothing meanwhile.
#[derive(Debug, Clone, Copy)]
struct CompactionClock {
    /// The last reading believed, and when it was read, as monotonic time since the start.
    anchor: (chrono::DateTime<Utc>, std::time::Duration),
    /// The first reading of a step forward not believed yet, and when it was read.
    ahead: Option<(chrono::DateTime<Utc>, std::time::Duration)>,
}

impl CompactionClock {
    fn at_start(started_at: chrono::DateTime<Utc>) -> Self {
        CompactionClock {
            anchor: (started_at, std::time::Duration::ZERO),
            ahead: None,
        }
    }

    /// What compaction takes as now, given the wall clock `now` and the monotonic time
    /// since the start.
    fn read(
        &mut self,
        now: chrono::DateTime<Utc>,
        since_start: std::time::Duration,
    ) -> chrono::DateTime<Utc> {
        let (wall, mono) = self.anchor;
        let vouched = vouched_now(now, wall, since_start.saturating_sub(mono));
        let settled = self.ahead.is_some_and(|(w, m)| {
            let on_mono = since_start.saturating_sub(m);
            on_mono >= STEP_SETTLES && kept_time(now - w, on_mono)
        });
        if now <= vouched + KEPT_TIME || settled {
            self.anchor = (now, since_start);
            self.ahead = None;
            return now;
        }
        // A clock that moved again since the step was first seen (wrong answers tend to
        // wander) starts the wait over: only a step that then holds is a correction.
        let holding = self
            .ahead
            .is_some_and(|(w, m)| kept_time(now - w, since_start.saturating_sub(m)));
        if !holding {
            self.ahead = Some((now, since_start));
        }
        vouched
    }
}

/// Whether the wall clock moved by `on_wall` while the monotonic one moved by `on_mono`.
fn kept_time(on_wall: chrono::TimeDelta, on_mono: std::time::Duration) -> bool {
    chrono::Duration::from_std(on_mono).is_ok_and(|m| (on_wall - m).abs() <= KEPT_TIME)
}

/// How a wait for a schedule's next time ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The wall clock reached this time of the schedule: run it.
    Due(chrono::DateTime<Utc>),
    /// The schedule names no time from now on.
    Never,
    Cancelled,
}

/// Wait until the wall clock reaches the next time `cron`, read in `tz`, fires (after
/// `fired`, the time of the last run, see [`next_run_after`]). `shown` hears each next
/// time as it is settled, for `/status`. The wall clock is read again every
/// [`WALL_CLOCK_RECHECK`]: after a step forward the run comes at once (once, for every
/// time stepped over), after a step back at its time on the new clock.
pub async fn wait_next(
    cron: &croner::Cron,
    tz: chrono_tz::Tz,
    fired: Option<chrono::DateTime<Utc>>,
    cancel: &tokio_util::sync::CancellationToken,
    shown: impl FnMut(chrono::DateTime<Utc>),
) -> Wait {
    wait_next_by(cron, tz, fired, None, cancel, shown, Utc::now).await
}

/// [`wait_next`] on `clock`; with `since`, the first time after it is due at once if the
/// clock has passed it already: a time stepped over while the last run went on (or that
/// came during a run longer than the schedule's interval) is run once, at once, rather
/// than lost to a next time read from the clock after the run.
async fn wait_next_by(
    cron: &croner::Cron,
    tz: chrono_tz::Tz,
    fired: Option<chrono::DateTime<Utc>>,
    since: Option<chrono::DateTime<Utc>>,
    cancel: &tokio_util::sync::CancellationToken,
    mut shown: impl FnMut(chrono::DateTime<Utc>),
    clock: impl Fn() -> chrono::DateTime<Utc>,
) -> Wait {
    let mut waiting_for = since.and_then(|t| occurrence_after(cron, tz, t));
    let mut last_shown = None;
    loop {
        // One read per turn decides both whether the time is due and, if not, what is
        // next: with a read for each, a time the clock passed between them (a wall clock
        // slewed a little slower than the monotonic one the sleep ran on) was neither.
        let now = clock();
        if let Some(due) = waiting_for.filter(|due| now >= *due) {
            // The last of the times passed: the run after it is the next one to come, so
            // a step over several runs them once.
            let last = occurrence_until(cron, tz, now).filter(|last| *last >= due);
            return Wait::Due(last.unwrap_or(due));
        }
        // Settled again each turn, not kept: after a step back the time comes on the new
        // clock.
        let Some(next) = next_run_after(cron, tz, now, fired) else {
            return Wait::Never;
        };
        if last_shown != Some(next) {
            shown(next);
            last_shown = Some(next);
        }
        waiting_for = Some(next);
        let wait = (next - now).to_std().unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait.min(WALL_CLOCK_RECHECK)) => {}
            _ = cancel.cancelled() => return Wait::Cancelled,
        }
    }
}

/// The time `cron`, read in `tz`, last came due, if that is after `last` (the last run,
/// or `last` reads as later than now): a run missed while the daemon was down. None when
/// nothing ran before (a new schedule, or a new store: nothing was missed that anyone
/// could expect).
pub fn missed_run(
    cron: &croner::Cron,
    tz: chrono_tz::Tz,
    last: Option<chrono::DateTime<Utc>>,
) -> Option<chrono::DateTime<Utc>> {
    missed_run_at(cron, tz, last, Utc::now())
}

/// [`missed_run`] with the clock read at `now`. A time in `now`'s own second counts: the
/// wait that follows looks only past that second, and a start just after a time ran it
/// neither as missed nor as next.
fn missed_run_at(
    cron: &croner::Cron,
    tz: chrono_tz::Tz,
    last: Option<chrono::DateTime<Utc>>,
    now: chrono::DateTime<Utc>,
) -> Option<chrono::DateTime<Utc>> {
    let due = occurrence_until(cron, tz, now)?;
    let last = last?;
    // A last run stamped ahead of the clock was made while the clock was wrong: when it
    // really ran is not known, so the time due is run rather than taken as done.
    (due > last || last > now).then_some(due)
}

/// The schedule that backs up the store: one run for all tenants, whose result is
/// shown under this name in place of a tenant's.
const BACKUP: &str = "backup";
pub const BACKUP_PART: &str = "store";

/// Start one task per configured schedule; they stop with `shutdown`.
pub fn spawn_schedules(state: Arc<AppState>, shutdown: tokio_util::sync::CancellationToken) {
    let tz = match state.config.schedules.tz() {
        Ok(tz) => tz,
        Err(e) => {
            tracing::error!(error = %e, "Schedules disabled.");
            return;
        }
    };
    for (name, expr) in state.config.schedules.entries() {
        let cron = match crate::config::parse_cron(expr) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(schedule = name, error = %e, "Schedule disabled.");
                continue;
            }
        };
        // What the last runs did before this start, so that `/status` does not forget them.
        let kept: Vec<(String, ScheduledResult)> = if name == BACKUP {
            // A backup's time is in its directory's name; a backup written by the CLI
            // while the daemon was down counts too.
            let last = state.backups.state();
            last.last_success_at
                .zip(last.last_path)
                .map(|(at, path)| {
                    let part = ScheduledPart::Text(format!("{BACKUP_PART}: {}", path.display()));
                    (BACKUP_PART.to_owned(), ScheduledResult { at, part })
                })
                .into_iter()
                .collect()
        } else {
            state
                .config
                .tenants
                .iter()
                .filter_map(|t| match state.store.scheduled_result(&t.id, name) {
                    Ok(kept) => kept.map(|k| (t.id.clone(), k)),
                    Err(e) => {
                        tracing::warn!(schedule = name, tenant = %t.id, error = %e, "Cannot read the schedule's last result.");
                        None
                    }
                })
                .collect()
        };
        let last_run = kept.iter().map(|(_, k)| k.at).max();
        // One read of the clock for both the catch-up and the start of the wait: a time
        // between two reads was neither missed nor next.
        let checked_at = Utc::now();
        let missed = if state.config.schedules.catch_up {
            missed_run_at(&cron, tz, last_run, checked_at)
        } else {
            None
        };
        state.schedules.update(name, |r| {
            r.cron = expr.to_owned();
            r.last_run = last_run;
            r.parts = kept.into_iter().map(|(t, k)| (t, k.part)).collect();
        });
        let task = Daemon {
            state: state.clone(),
            name,
        };
        let shutdown = shutdown.clone();
        let span = tracing::info_span!("schedule", schedule = name);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Some(due) = missed {
                    use crate::dispatch::rfc3339;
                    tracing::info!(
                        missed = %rfc3339(due),
                        last_run = %last_run.map(rfc3339).unwrap_or_default(),
                        "The schedule came due while the daemon was down; running it now (catch_up)."
                    );
                }
                keep(&cron, tz, missed.is_some(), checked_at, &shutdown, &task).await
            },
            span,
        ));
    }
}

/// What a schedule's task does besides keeping time, so that the tests can stand in for
/// the daemon and its clock.
trait Task {
    fn name(&self) -> &str;
    /// The wall clock.
    fn now(&self) -> chrono::DateTime<Utc>;
    /// Whether a tenant runs a job (holds its job slot).
    fn jobs_running(&self) -> bool;
    /// The next time, as settled, for `/status`.
    fn shown(&self, next: chrono::DateTime<Utc>);
    /// Run the schedule once.
    fn run(&self) -> impl std::future::Future<Output = ()> + Send;
}

/// The schedule `name` of the daemon.
struct Daemon {
    state: Arc<AppState>,
    name: &'static str,
}

impl Task for Daemon {
    fn name(&self) -> &str {
        self.name
    }
    fn now(&self) -> chrono::DateTime<Utc> {
        Utc::now()
    }
    fn jobs_running(&self) -> bool {
        let state = &self.state;
        state
            .config
            .tenants
            .iter()
            .any(|t| state.store.job_running(&t.id))
    }
    fn shown(&self, next: chrono::DateTime<Utc>) {
        self.state
            .schedules
            .update(self.name, |r| r.next_run = Some(next));
    }
    fn run(&self) -> impl std::future::Future<Output = ()> + Send {
        run_and_keep(&self.state, self.name)
    }
}

/// Whether schedule `name` runs in a tenant's job slot: only `reconcile` starts jobs. The
/// others (`export`, `compact`, `backup`) change no assignment and run beside a job.
fn needs_job_slot(name: &str) -> bool {
    name == "reconcile"
}

/// Keep one schedule until `cancel`: its catch-up first when `catch_up`, then each of its
/// times. `checked_at` is when the start looked for a missed time: a time up to it is
/// the catch-up's (run only with `catch_up`), and the wait takes the times after it.
async fn keep(
    cron: &croner::Cron,
    tz: chrono_tz::Tz,
    catch_up: bool,
    checked_at: chrono::DateTime<Utc>,
    cancel: &tokio_util::sync::CancellationToken,
    task: &impl Task,
) {
    let mut since = checked_at;
    if catch_up {
        // A catch-up that found the slot taken by the start-up reclassification (after a
        // bundle change) would be skipped, and a missed night's reconciliation would wait
        // for the next start. Only a schedule that needs the slot waits: the others ran
        // behind a job for nothing (minutes per million users) and lost their times.
        if needs_job_slot(task.name()) && !jobs_ended(task, cancel).await {
            return;
        }
        // The times that came while it waited are run by the catch-up, once; the wait
        // begins after it started.
        since = task.now();
        task.run().await;
    }
    // The last run's time, for a clock stepped back behind it (see `next_run_after`).
    let mut fired = None;
    loop {
        let shown = |next| task.shown(next);
        match wait_next_by(cron, tz, fired, Some(since), cancel, shown, || task.now()).await {
            Wait::Due(at) => {
                fired = Some(at);
                since = at;
            }
            Wait::Never => {
                tracing::warn!("The schedule has no next run.");
                return;
            }
            Wait::Cancelled => return,
        }
        task.run().await;
    }
}

/// Wait until no tenant runs a job; false if `cancel` came first. (A run at its time that
/// finds the slot taken is skipped instead: the next one comes soon.)
async fn jobs_ended(task: &impl Task, cancel: &tokio_util::sync::CancellationToken) -> bool {
    while task.jobs_running() {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = cancel.cancelled() => return false,
        }
    }
    true
}

/// Run schedule `name` once, record its result for `/status`, and keep each tenant's
/// part in the store, so that a restart (and a catch-up) knows it.
async fn run_and_keep(state: &Arc<AppState>, name: &str) {
    if name == BACKUP {
        // One run for the whole store, kept as the backup itself.
        let outcome = match state
            .backups
            .run(&state.store, "schedule", &state.shutdown)
            .await
        {
            Ok(w) => Outcome::Done(ScheduledPart::Text(format!(
                "{BACKUP_PART}: {}",
                w.summary()
            ))),
            // As a tenant's run that found a job running: the last result stands.
            Err(e @ crate::ops::backup::BackupError::Running(_)) => {
                Outcome::Skipped(format!("{BACKUP_PART}: skipped, {e}"))
            }
            Err(e) => Outcome::Failed(ScheduledPart::Text(format!("{BACKUP_PART}: failed: {e}"))),
        };
        state
            .schedules
            .record(name, Utc::now(), vec![(BACKUP_PART.to_owned(), outcome)]);
        return;
    }
    let outcomes = run_scheduled(state, name).await;
    let at = Utc::now();
    let done: Vec<(String, ScheduledPart)> = outcomes
        .iter()
        .filter_map(|(t, o)| match o {
            Outcome::Done(part) | Outcome::Failed(part) => Some((t.clone(), part.clone())),
            Outcome::Skipped(_) => None,
        })
        .collect();
    // Kept first, shown after: a stop right after the run then either finds it kept, or
    // it was never shown. Shown first, a stop in between made the next start run the
    // schedule again as missed (catch_up), although `/status` had shown it run.
    for (tenant, part) in done {
        let kept = ScheduledResult { at, part };
        if let Err(e) = state.store.set_scheduled_result(&tenant, name, &kept).await {
            tracing::warn!(%tenant, error = %e, "Cannot keep the run's result; /status forgets it at the next start.");
        }
    }
    state.schedules.record(name, at, outcomes);
}

/// Run one scheduled job for every tenant; what it did for each, for `/status`.
async fn run_scheduled(state: &Arc<AppState>, name: &str) -> Vec<(String, Outcome)> {
    let mut outcomes = Vec::new();
    for t in &state.config.tenants {
        let tenant = t.id.as_str();
        // A bug in one tenant's part must not take the others' results (a started job
        // among them) with it.
        match crate::ops::panics::catch(run_for_tenant(state, name, tenant)).await {
            Ok(Some(outcome)) => outcomes.push((tenant.to_owned(), outcome)),
            Ok(None) => {}
            Err(panic) => {
                let part =
                    format!("{tenant}: failed: the run stopped on a bug (it panicked: {panic})");
                tracing::error!(
                    schedule = name,
                    result = part.as_str(),
                    "Scheduled run failed."
                );
                outcomes.push((
                    tenant.to_owned(),
                    Outcome::Failed(ScheduledPart::Text(part)),
                ));
            }
        }
    }
    outcomes
}

/// One tenant's part of a scheduled run; None for a schedule name that does nothing.
async fn run_for_tenant(state: &Arc<AppState>, name: &str, tenant: &str) -> Option<Outcome> {
    // Whether this tenant's part failed: such a run is a WARN, which the
    // `journalctl -p warning` the README suggests shows.
    let (part, failed) = match name {
        "reconcile" => {
            match start_reconcile(state.clone(), tenant, "schedule", false, None).await {
                // The job logs its own end, with its outcome.
                Ok(job) => {
                    tracing::info!(schedule = name, tenant, job_id = %job.job_id, "Scheduled run started.");
                    return Some(Outcome::Done(ScheduledPart::Job(job.job_id)));
                }
                Err(JobError::AlreadyRunning(_)) => {
                    let text = format!("{tenant}: skipped, a job is running");
                    tracing::info!(
                        schedule = name,
                        result = text.as_str(),
                        "Scheduled run skipped."
                    );
                    return Some(Outcome::Skipped(text));
                }
                Err(e) => (format!("{tenant}: failed: {e}"), true),
            }
        }
        "export" => match state.dispatch.export(tenant).await {
            Ok(r) => {
                let failed = r.iter().filter(|r| r.failed > 0).count();
                // Connectors it did not write, said, not counted as done: one its guard
                // holds, and one that writes on its own schedule (a recheck read "2 CSV
                // connector(s)" where one was written).
                let not_written = |note: &str, why: &str| match r
                    .iter()
                    .filter(|r| r.note.as_deref() == Some(note))
                    .count()
                {
                    0 => String::new(),
                    n => format!(", {n} {why}"),
                };
                let held = not_written(
                    crate::dispatch::HELD_CSV_NOTE,
                    "not written (held by its [guard])",
                );
                let own = not_written(
                    crate::dispatch::OWN_SCHEDULE_CSV_NOTE,
                    "left to its own schedule",
                );
                // And one switched off (the recheck's N2-3).
                let off = not_written(crate::dispatch::DISABLED_NOTE, "disabled");
                (
                    format!(
                        "{tenant}: {} CSV connector(s), {failed} failed{held}{own}{off}",
                        r.len()
                    ),
                    failed > 0,
                )
            }
            Err(e) => (format!("{tenant}: failed: {e}"), true),
        },
        "compact" => {
            let retention =
                chrono::Duration::hours(state.config.schedules.changelog_retention_hours as i64);
            let durable = *state.store.watch_durable(tenant).borrow();
            let upto = state.dispatch.lowest_cursor(tenant).unwrap_or(durable);
            let now = state.schedules.compaction_now(
                Utc::now(),
                state.started_at,
                state.started.elapsed(),
            );
            match state
                .store
                .compact_changes(tenant, upto, retention, now)
                .await
            {
                Ok(n) => (
                    format!("{tenant}: {n} change events removed (up to #{upto})"),
                    false,
                ),
                Err(e) => (format!("{tenant}: failed: {e}"), true),
            }
        }
        _ => return None,
    };
    if failed {
        tracing::warn!(
            schedule = name,
            result = part.as_str(),
            "Scheduled run failed."
        );
        Some(Outcome::Failed(ScheduledPart::Text(part)))
    } else {
        tracing::info!(
            schedule = name,
            result = part.as_str(),
            "Scheduled run finished."
        );
        Some(Outcome::Done(ScheduledPart::Text(part)))
    }
}

/// The work a job of this trigger (its record's kind) does, as the metrics name it.
pub(crate) fn job_kind(trigger: &str) -> &'static str {
    if trigger == "bundle_change" {
        "reclassify"
    } else {
        "reconcile"
    }
}

/// Count a job that reached its end (succeeded, failed, or interrupted by a stop).
///
/// A job records what started it (`bundle_change`, `scim_sync`, `schedule`); the metric's
/// `kind` is the work, which is what an alert is written against, and `trigger` is the
/// record's kind.
pub(crate) fn count_finished_job(tenant: &str, job: &crate::store::Job) {
    metrics::counter!(
        crate::ops::metrics::JOBS_TOTAL,
        "tenant" => tenant.to_owned(),
        "kind" => job_kind(&job.kind),
        "trigger" => job.kind.clone(),
        "status" => job.status.as_str(),
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &ScheduleRun) -> Vec<String> {
        r.parts
            .iter()
            .map(|(t, p)| match p {
                ScheduledPart::Text(x) => format!("{t}={x}"),
                ScheduledPart::Job(id) => format!("{t}=job {id}"),
            })
            .collect()
    }

    /// A wall clock that runs with tokio's (paused) clock from `start`, plus steps.
    #[derive(Clone)]
    struct SteppedClock {
        start: chrono::DateTime<Utc>,
        began: tokio::time::Instant,
        step_secs: Arc<std::sync::atomic::AtomicI64>,
    }

    impl SteppedClock {
        fn at(start: chrono::DateTime<Utc>) -> Self {
            SteppedClock {
                start,
                began: tokio::time::Instant::now(),
                step_secs: Arc::default(),
            }
        }
        fn now(&self) -> chrono::DateTime<Utc> {
            let step = self.step_secs.load(std::sync::atomic::Ordering::SeqCst);
            self.start
                + chrono::Duration::from_std(self.began.elapsed()).unwrap()
                + chrono::Duration::seconds(step)
        }
        fn step(&self, secs: i64) {
            self.step_secs
                .fetch_add(secs, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn utc(d: u32, h: u32, m: u32, s: u32) -> chrono::DateTime<Utc> {
        use chrono::TimeZone;
        Utc.with_ymd_and_hms(2027, 5, d, h, m, s).unwrap()
    }

    /// Wait for `0 0 3 * * *` from 02:58:00 on the 10th, stepping the wall clock by
    /// `step` seconds 30 s in; what the wait ended with, and the wall time then.
    async fn wait_across_a_step(step: i64) -> (Wait, chrono::DateTime<Utc>) {
        let cron = crate::config::parse_cron("0 0 3 * * *").unwrap();
        let clock = SteppedClock::at(utc(10, 2, 58, 0));
        let stepper = clock.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            stepper.step(step);
        });
        let waited = wait_on(&cron, &clock, None, None).await;
        (waited, clock.now())
    }

    /// [`wait_next_by`] in UTC on `clock`, never cancelled.
    async fn wait_on(
        cron: &croner::Cron,
        clock: &SteppedClock,
        fired: Option<chrono::DateTime<Utc>>,
        since: Option<chrono::DateTime<Utc>>,
    ) -> Wait {
        let c = clock.clone();
        let cancel = tokio_util::sync::CancellationToken::new();
        wait_next_by(
            cron,
            chrono_tz::UTC,
            fired,
            since,
            &cancel,
            |_| {},
            move || c.now(),
        )
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_schedule_runs_at_its_wall_time_when_the_clock_is_stepped() {
        // Within a minute of the time it was due on the clock as it now reads.
        let recheck = chrono::Duration::seconds(60);
        // Forward an hour (NTP, or a VM resumed): 03:00 is run at once, not at 04:00.
        let (waited, now) = wait_across_a_step(3600).await;
        assert_eq!(waited, Wait::Due(utc(10, 3, 0, 0)));
        assert!(now <= utc(10, 3, 58, 30) + recheck, "{now}");
        // Back an hour: not at 02:00 on the new clock, at 03:00.
        let (waited, now) = wait_across_a_step(-3600).await;
        assert_eq!(waited, Wait::Due(utc(10, 3, 0, 0)));
        assert!(now >= utc(10, 3, 0, 0), "{now}");
        assert!(now <= utc(10, 3, 0, 0) + recheck, "{now}");
        // Back a day: a correction; the schedule follows the new clock's 03:00.
        let (waited, now) = wait_across_a_step(-86_400).await;
        assert_eq!(waited, Wait::Due(utc(9, 3, 0, 0)));
        assert!(
            now >= utc(9, 3, 0, 0) && now <= utc(9, 3, 0, 0) + recheck,
            "{now}"
        );
    }

    #[test]
    fn a_clock_stepped_forward_while_running_is_not_believed_for_compaction() {
        let start = utc(10, 12, 0, 0);
        let hour = std::time::Duration::from_secs(3600);
        // A year ahead after an hour's run: an hour after the start is all it vouches for.
        let year_on = start + chrono::Duration::days(365) + chrono::Duration::hours(1);
        assert_eq!(vouched_now(year_on, start, hour), utc(10, 13, 0, 0));
        // A clock that kept time, or was stepped back, is believed.
        assert_eq!(
            vouched_now(utc(10, 13, 0, 0), start, hour),
            utc(10, 13, 0, 0)
        );
        assert_eq!(
            vouched_now(utc(10, 11, 0, 0), start, hour),
            utc(10, 11, 0, 0)
        );
    }

    #[test]
    fn a_clock_stepped_back_after_a_run_does_not_run_it_again() {
        let cron = crate::config::parse_cron("0 0 3 * * *").unwrap();
        let ran = Some(utc(10, 3, 0, 0));
        // Back an hour, just after the 03:00 run: the next is tomorrow's.
        assert_eq!(
            next_run_after(&cron, chrono_tz::UTC, utc(10, 2, 0, 5), ran),
            Some(utc(11, 3, 0, 0))
        );
        // Back a day: a correction, so the new clock's day has its run.
        assert_eq!(
            next_run_after(
                &cron,
                chrono_tz::UTC,
                utc(9, 3, 0, 5) - chrono::Duration::hours(1),
                ran
            ),
            Some(utc(9, 3, 0, 0))
        );
        // Every two minutes, a minute back after the 10:02 run: 10:04 next, not 10:03...
        let every2 = crate::config::parse_cron("0 */2 * * * *").unwrap();
        assert_eq!(
            next_run_after(
                &every2,
                chrono_tz::UTC,
                utc(10, 10, 1, 1),
                Some(utc(10, 10, 2, 0))
            ),
            Some(utc(10, 10, 4, 0))
        );
        // ...and without a run to guard, from the clock.
        assert_eq!(
            next_run_after(&every2, chrono_tz::UTC, utc(10, 10, 1, 1), None),
            Some(utc(10, 10, 2, 0))
        );
    }

    #[test]
    fn a_run_is_missed_only_when_its_time_came_after_the_last_run() {
        use chrono::{Datelike, TimeZone};
        let new_year = crate::config::parse_cron("0 0 0 1 1 *").unwrap();
        let this_new_year = Utc
            .with_ymd_and_hms(Utc::now().year(), 1, 1, 0, 0, 0)
            .unwrap();
        let before = this_new_year - chrono::Duration::days(30);
        assert_eq!(
            missed_run(&new_year, chrono_tz::UTC, Some(before)),
            Some(this_new_year)
        );
        let after = this_new_year + chrono::Duration::seconds(1);
        assert_eq!(missed_run(&new_year, chrono_tz::UTC, Some(after)), None);
        // A last run from a clock that was ahead (it reads as later than now).
        let ahead = Utc::now() + chrono::Duration::days(1);
        assert_eq!(
            missed_run(&new_year, chrono_tz::UTC, Some(ahead)),
            Some(this_new_year)
        );
        // Nothing ran before: nothing was missed.
        assert_eq!(missed_run(&new_year, chrono_tz::UTC, None), None);
    }

    #[test]
    fn a_tenant_skipped_at_first_takes_its_config_place_in_the_last_result() {
        let s = Schedules::default();
        let at = Utc::now();
        let done = |x: &str| Outcome::Done(ScheduledPart::Text(x.to_owned()));
        s.record(
            "reconcile",
            at,
            vec![
                ("acme".into(), Outcome::Skipped("acme: skipped".into())),
                ("globex".into(), done("g1")),
            ],
        );
        s.record(
            "reconcile",
            at,
            vec![("acme".into(), done("a2")), ("globex".into(), done("g2"))],
        );
        let runs = s.runs.lock().unwrap();
        assert_eq!(text(&runs["reconcile"]), ["acme=a2", "globex=g2"]);
    }

    /// A daemon started while the wall clock was behind (no RTC, NTP not synced yet at
    /// boot) and whose clock NTP then corrected: once the corrected clock has kept time,
    /// compaction follows it rather than the start's time plus the uptime, which stayed in
    /// the past until a restart, so that no change ever looked old enough to remove.
    #[tokio::test]
    async fn compaction_resumes_once_a_clock_behind_at_start_is_corrected() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let user = |name: &str| serde_json::json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": name});
        for name in ["ada", "bob", "cy"] {
            store
                .create("t", crate::scim::ResourceKind::User, user(name), vec![])
                .await
                .unwrap();
        }
        let last = store.changes("t", 0, 100).unwrap().last().unwrap().seq;
        // The changes are stamped now: with no retention, all of them are old enough once
        // compaction's now has reached them (a retention is measured back from the newest
        // change at most, so it would keep these whatever the clock).
        let compacted = |now| store.compact_changes("t", last, chrono::Duration::zero(), now);
        // Started three days ago, when the clock read a year behind.
        let real_now = Utc::now();
        let mut clock = CompactionClock::at_start(real_now - chrono::Duration::days(365 + 3));
        let day = std::time::Duration::from_secs(86_400);
        let hour = std::time::Duration::from_secs(3600);
        // The first run after the correction sees a step forward, as it would a wrong NTP
        // answer: not believed yet.
        let now = clock.read(real_now - chrono::Duration::hours(1), 3 * day - hour);
        assert_eq!(compacted(now).await.unwrap(), 0, "believed at once: {now}");
        // An hour on, the clock has kept time since: a correction.
        let now = clock.read(real_now, 3 * day);
        assert_eq!(now, real_now);
        assert_eq!(compacted(now).await.unwrap(), 3, "took {now} as now");
        // And it is believed from then on.
        let later = real_now + chrono::Duration::minutes(15);
        assert_eq!(clock.read(later, 3 * day + hour / 4), later);
    }

    /// A step forward is believed only once the clock has kept time from it for
    /// STEP_SETTLES, as the monotonic clock measures it: not at a second reading moments
    /// later (every tenant's compaction reads the clock in turn), nor when it moved again.
    #[test]
    fn a_clock_stepped_forward_is_believed_for_compaction_only_once_it_keeps_time() {
        let start = utc(10, 12, 0, 0);
        let secs = std::time::Duration::from_secs;
        let year = chrono::Duration::days(365);
        let day = chrono::Duration::days(1);
        // The wall time `mono` seconds after the start, as a clock keeping time reads it.
        let at = |mono: u64| start + chrono::Duration::seconds(mono as i64);
        let mut clock = CompactionClock::at_start(start);
        assert_eq!(clock.read(at(600), secs(600)), at(600));
        // A year ahead: the monotonic clock vouches for no more than it measured...
        assert_eq!(clock.read(at(1800) + year, secs(1800)), at(1800));
        // ...also at the next tenant's read, moments later...
        assert_eq!(clock.read(at(1801) + year, secs(1801)), at(1801));
        // ...and when the clock moved again (another wrong answer), the wait starts over.
        assert_eq!(clock.read(at(4000) + year + day, secs(4000)), at(4000));
        assert_eq!(clock.read(at(7000) + year + day, secs(7000)), at(7000));
        // An hour after that, still keeping time: believed.
        let stepped = at(7600) + year + day;
        assert_eq!(clock.read(stepped, secs(7600)), stepped);
        // A clock stepped back is believed at once...
        let mut clock = CompactionClock::at_start(start);
        assert_eq!(clock.read(at(600) + year, secs(600)), at(600));
        assert_eq!(clock.read(at(700), secs(700)), at(700));
        // ...and a step forward taken back is forgotten: seen again, it waits again.
        assert_eq!(clock.read(at(4300) + year, secs(4300)), at(4300));
        // A clock a few seconds ahead of the monotonic one keeps time (the monotonic one
        // is read a little after the wall clock at start), and counts from there.
        let mut clock = CompactionClock::at_start(start);
        assert_eq!(clock.read(at(605), secs(600)), at(605));
        assert_eq!(clock.read(at(1200) + year, secs(1195)), at(1200));
    }

    /// The wall clock is read once per turn of the wait: a read for "is it due?" and
    /// another for "what is next?" lost a time falling between the two (a wall clock
    /// slewed a little slower than tokio's monotonic one, as NTP does, read 1 us short
    /// of it, then 1 us past): the next day's was waited for instead.
    #[tokio::test(start_paused = true)]
    async fn a_time_the_clock_reaches_between_two_reads_is_run() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let cron = crate::config::parse_cron("0 0 3 * * *").unwrap();
        let due = utc(10, 3, 0, 0);
        let reads = AtomicUsize::new(0);
        let began = tokio::time::Instant::now();
        let clock = || {
            let us = chrono::Duration::microseconds;
            match reads.fetch_add(1, Ordering::SeqCst) {
                // 10 s before: the wait sleeps 10 s on the monotonic clock...
                0 => due - chrono::Duration::seconds(10),
                // ...after which the slewed wall clock reads 1 us short of 03:00...
                1 => due - us(1),
                // ...and 1 us past at any read after that.
                _ => due + us(1) + chrono::Duration::from_std(began.elapsed()).unwrap(),
            }
        };
        let cancel = tokio_util::sync::CancellationToken::new();
        let waited = wait_next_by(&cron, chrono_tz::UTC, None, None, &cancel, |_| {}, clock).await;
        assert_eq!(waited, Wait::Due(due));
    }

    /// A start within the second after a schedule's time catches it up: the catch-up
    /// looked only before that second, and the wait only after it.
    #[tokio::test(start_paused = true)]
    async fn a_start_within_the_second_after_a_time_catches_it_up() {
        let cron = crate::config::parse_cron("0 0 3 * * *").unwrap();
        let now = utc(10, 3, 0, 0) + chrono::Duration::milliseconds(300);
        let yesterdays = Some(utc(9, 3, 0, 5));
        assert_eq!(
            missed_run_at(&cron, chrono_tz::UTC, yesterdays, now),
            Some(utc(10, 3, 0, 0))
        );
        // Run at 03:00:00.1, it is not missed...
        assert_eq!(
            missed_run_at(
                &cron,
                chrono_tz::UTC,
                Some(now - chrono::Duration::milliseconds(200)),
                now
            ),
            None
        );
        // ...and the wait after the check is for tomorrow's.
        let clock = SteppedClock::at(now);
        let waited = wait_on(&cron, &clock, None, Some(now)).await;
        assert_eq!(waited, Wait::Due(utc(11, 3, 0, 0)));
        // A time between the check and the wait's first read is run at once.
        let checked = utc(10, 3, 0, 0) - chrono::Duration::milliseconds(1);
        let clock = SteppedClock::at(checked + chrono::Duration::milliseconds(2));
        let waited = wait_on(&cron, &clock, None, Some(checked)).await;
        assert_eq!(waited, Wait::Due(utc(10, 3, 0, 0)));
    }

    /// A schedule for the tests: its clock, whether a job runs, and the wall time each of
    /// its runs began; a run takes `run_takes` (monotonic) and the first one steps the
    /// clock by `step_in_first_run`; `cancel` ends it after `runs_wanted` runs.
    struct Fake {
        name: &'static str,
        clock: SteppedClock,
        busy: Arc<std::sync::atomic::AtomicBool>,
        runs: std::sync::Mutex<Vec<chrono::DateTime<Utc>>>,
        run_takes: std::time::Duration,
        step_in_first_run: i64,
        runs_wanted: usize,
        cancel: tokio_util::sync::CancellationToken,
    }

    impl Fake {
        fn new(name: &'static str, clock: SteppedClock, runs_wanted: usize) -> Self {
            Fake {
                name,
                clock,
                busy: Arc::default(),
                runs: Default::default(),
                run_takes: std::time::Duration::ZERO,
                step_in_first_run: 0,
                runs_wanted,
                cancel: Default::default(),
            }
        }

        /// Keep the schedule `cron` (in UTC) from now, catching up or not; its runs.
        async fn keep(&self, cron: &str, catch_up: bool) -> Vec<chrono::DateTime<Utc>> {
            let cron = crate::config::parse_cron(cron).unwrap();
            let checked_at = self.clock.now();
            // A day of the test's clock: a schedule stalled behind a job fails, not hangs.
            let day = std::time::Duration::from_secs(86_400);
            let kept = keep(
                &cron,
                chrono_tz::UTC,
                catch_up,
                checked_at,
                &self.cancel,
                self,
            );
            tokio::time::timeout(day, kept)
                .await
                .expect("the schedule stalled");
            self.runs.lock().unwrap().clone()
        }
    }

    impl Task for Fake {
        fn name(&self) -> &str {
            self.name
        }
        fn now(&self) -> chrono::DateTime<Utc> {
            self.clock.now()
        }
        fn jobs_running(&self) -> bool {
            self.busy.load(std::sync::atomic::Ordering::SeqCst)
        }
        fn shown(&self, _: chrono::DateTime<Utc>) {}
        async fn run(&self) {
            let n = {
                let mut runs = self.runs.lock().unwrap();
                runs.push(self.clock.now());
                runs.len()
            };
            if n == 1 {
                self.clock.step(self.step_in_first_run);
            }
            tokio::time::sleep(self.run_takes).await;
            if n == self.runs_wanted {
                self.cancel.cancel();
            }
        }
    }

    /// A step forward during a run over the schedule's next time: that time runs once,
    /// as the run ends, not at the time after (the clock read after the run lay past it).
    #[tokio::test(start_paused = true)]
    async fn a_time_stepped_over_during_a_run_runs_once_when_it_ends() {
        let mut fake = Fake::new("export", SteppedClock::at(utc(10, 1, 59, 0)), 3);
        // The 02:00 run takes a minute, during which the clock is stepped 70 minutes on.
        fake.step_in_first_run = 70 * 60;
        fake.run_takes = std::time::Duration::from_secs(60);
        let runs = fake.keep("0 0 * * * *", false).await;
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert_eq!(runs[0], utc(10, 2, 0, 0));
        // 03:00, at 03:11 as the run ends.
        assert_eq!(runs[1], utc(10, 3, 11, 0));
        // Then at its time: the run at 03:11 took a minute, and 04:00 was not passed.
        assert_eq!(runs[2], utc(10, 4, 0, 0));
        // Stepped over several times, it runs once: the run after 05:00 is 06:00's.
        let clock = SteppedClock::at(utc(10, 5, 10, 0));
        let cron = crate::config::parse_cron("0 0 * * * *").unwrap();
        let at = Some(utc(10, 2, 0, 0));
        let waited = wait_on(&cron, &clock, at, at).await;
        assert_eq!(waited, Wait::Due(utc(10, 5, 0, 0)));
        let at = Some(utc(10, 5, 0, 0));
        let waited = wait_on(&cron, &clock, at, at).await;
        assert_eq!(waited, Wait::Due(utc(10, 6, 0, 0)));
    }

    /// While a job runs at start, only a schedule that needs the job slot (`reconcile`)
    /// waits to catch up, and its times that come meanwhile are run by the catch-up,
    /// once; the others catch up at once and keep their times.
    #[tokio::test(start_paused = true)]
    async fn only_a_schedule_that_needs_the_job_slot_waits_for_jobs_to_catch_up() {
        let every15 = "0 */15 * * * *";
        // A job runs throughout: export catches up at 03:05 and runs at 03:15, 03:30.
        let export = Fake::new("export", SteppedClock::at(utc(10, 3, 5, 0)), 3);
        export.busy.store(true, std::sync::atomic::Ordering::SeqCst);
        let runs = export.keep(every15, true).await;
        assert_eq!(
            runs,
            [utc(10, 3, 5, 0), utc(10, 3, 15, 0), utc(10, 3, 30, 0)]
        );
        // A job runs until 03:20: reconcile catches up then, 03:15 with it, and runs at
        // 03:30.
        let reconcile = Fake::new("reconcile", SteppedClock::at(utc(10, 3, 5, 0)), 2);
        reconcile
            .busy
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let busy = reconcile.busy.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(15 * 60)).await;
            busy.store(false, std::sync::atomic::Ordering::SeqCst);
        });
        let runs = reconcile.keep(every15, true).await;
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert!(
            runs[0] >= utc(10, 3, 20, 0) && runs[0] <= utc(10, 3, 20, 1),
            "{runs:?}"
        );
        assert_eq!(runs[1], utc(10, 3, 30, 0));
        // No catch-up asked for: nothing waits, whatever the schedule.
        let reconcile = Fake::new("reconcile", SteppedClock::at(utc(10, 3, 5, 0)), 1);
        reconcile
            .busy
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(reconcile.keep(every15, false).await, [utc(10, 3, 15, 0)]);
    }
}
