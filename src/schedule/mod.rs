//! Background jobs. Today: reclassification (after a bundle change, or asked for through
//! `POST /api/v1/roster/scim:sync`). One job per tenant at a time; while it runs, manual
//! overrides are refused with 409 so a person's decision and the job cannot interleave.
use chrono::Utc;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::server::AppState;
use crate::store::{Job, JobStatus, StoreError};

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
        self.state
            .roster
            .syncing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.tenant);
    }
}

/// Queue a reclassification of every user of `tenant` and return the job as queued.
pub async fn start_reclassify(
    state: Arc<AppState>,
    tenant: &str,
    kind: &str,
) -> Result<Job, JobError> {
    let inserted = state
        .roster
        .syncing
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(tenant.to_owned());
    if !inserted {
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
    };
    state.store.put_job(tenant, job.clone()).await?;
    let queued = job.clone();
    let tenant = tenant.to_owned();
    let span = tracing::info_span!("job", tenant = %tenant, job_id = %job.job_id, kind = %job.kind);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            run_reclassify(&state, &tenant, job, slot).await;
        },
        span,
    ));
    Ok(queued)
}

async fn run_reclassify(state: &AppState, tenant: &str, mut job: Job, slot: Slot) {
    job.status = JobStatus::Running;
    if let Err(e) = state.store.put_job(tenant, job.clone()).await {
        tracing::error!(error = %e, "Cannot record the job as running; it will not run.");
        return;
    }
    tracing::info!("Reclassification started.");
    let policy = state.roster.tenants.get(tenant).and_then(|t| t.policy());
    let result = state.store.reclassify(tenant, 500).await;
    match result {
        Ok(c) => {
            job.status = JobStatus::Succeeded;
            job.counts.insert("users".into(), c.scanned);
            job.counts.insert("changed".into(), c.changed);
            job.counts.insert("overrides_kept".into(), c.overrides_kept);
            if let Some(p) = policy
                && let Err(e) = state
                    .store
                    .set_policy_fingerprint(tenant, p.fingerprint())
                    .await
            {
                tracing::warn!(error = %e, "Cannot record the bundle fingerprint; the next start reclassifies again.");
            }
            tracing::info!(
                users = c.scanned,
                changed = c.changed,
                "Reclassification finished."
            );
        }
        Err(e) => {
            job.status = JobStatus::Failed;
            job.error = Some(e.to_string());
            tracing::error!(error = %e, "Reclassification failed.");
        }
    }
    job.finished_at = Some(Utc::now());
    // Free the slot before the outcome is visible: whoever sees "succeeded" may override.
    drop(slot);
    if let Err(e) = state.store.put_job(tenant, job).await {
        tracing::error!(error = %e, "Cannot record the job's outcome.");
    }
}

/// The schedules' last and next runs, for `/status`.
pub fn status(_state: &AppState) -> serde_json::Value {
    serde_json::json!({})
}
