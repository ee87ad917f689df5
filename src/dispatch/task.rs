//! A connector's task: run again after a panic, and the HTTP connector's run.

use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::ctx::{Ctx, Target};
use super::follow::follow_log;
use super::live::Live;
use super::reconcile;
use super::send::Sent;
use super::status::rfc3339;
use super::{DispatchError, blocking};
use crate::connectors::http;
use crate::connectors::oneroster;
use crate::ops::metrics as counters;
use crate::store::StoreError;

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
pub(super) async fn supervised<F, Fut>(live: &Live, cancel: &CancellationToken, mut run: F)
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
pub(super) async fn run_http(ctx: Arc<Ctx>) -> Result<(), StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::Ordering;

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
}
