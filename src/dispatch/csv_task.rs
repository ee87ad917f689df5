//! The CSV connector's task: files written when changes settle, or on a schedule.

use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ctx::{Ctx, Target};
use super::live::{Approval, Deadline, Streak};
use super::status::rfc3339;
use super::{BATCH, blocking, guard};
use crate::connectors::csv::CsvError;
use crate::ops::metrics as counters;
use crate::store::{Store, StoreError};

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
pub(super) fn first_held(
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
pub(super) type Judged = Option<(guard::Guard, u64)>;

/// [`first_held`] off the async threads, for the connector's own guard (taken and given
/// back).
pub(super) async fn judge(
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
pub(super) async fn run_csv(ctx: Arc<Ctx>) -> Result<(), StoreError> {
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
    let mut backoff = ctx.backoff();
    let mut streak = Streak::default();
    // A scheduled write is owed from the moment it is due until it succeeds, and the
    // store keeps that across a stop, a reload or a crash: a write cut short or failed is
    // tried again after its backoff or at the next start, not at the next scheduled time
    // (a nightly file would miss its night). A restore marks every connector's files owed,
    // scheduled or not: they held what the restore lost (store::restored).
    let had_cursor = ctx.store.has_cursor(&tenant, &cursor_name)?;
    let mut owed = ctx.store.write_due(&tenant, &cursor_name)?
        // One that had not started before the backup (or came after it) has no cursor
        // for the restore to mark, and may have written what the restore lost.
        || (schedule.is_some() && ctx.store.was_restored()? && !had_cursor);
    // Kept from the first start, written or not, as an HTTP connector's is (see
    // `catch_up_compacted`): one that had not written yet (a scheduled one before its
    // first time, any on an empty change log) had none, and with its file removed while
    // the daemon was stopped, nothing in `/status` said a connector was missing.
    if !had_cursor {
        let at = ctx.store.cursor(&tenant, &cursor_name)?;
        ctx.store
            .advance_cursor(&tenant, &cursor_name, at, vec![])
            .await?;
    }
    ctx.live.set_state("running");
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
                "A scheduled write came due while the connector was not running (the daemon down, or the connector disabled or not loaded); writing now (catch_up)."
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
