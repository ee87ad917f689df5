//! Following the change log: batches delivered in order per object, and the cursor.

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;

use super::ctx::{Acked, Ctx, Target};
use super::keys::{object_keys, reports_of, written_keys};
use super::send::Delivered;
use super::seqs::Seqs;
use super::{BATCH, STOP_DRAIN, blocking};
use crate::store::StoreError;

/// Delivered-content hashes by object key (`None`: gone downstream).
pub(super) type Hashes = Vec<(String, Option<u64>)>;

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
pub(super) const MAX_ACKED_RECORDED: usize = 1000;

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
pub(super) async fn follow_log(ctx: &Arc<Ctx>, tenant: &str) -> Result<(), StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
