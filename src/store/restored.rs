//! A backup that starts to serve numbers its changes past those of the store it was
//! copied from.
//!
//! A restored store would otherwise number its next change right after the backup's
//! last, the number a change the restore lost already had downstream: a webhook event
//! with the `webhook-id` and `data.seq` of one the receiver took, which a receiver that
//! drops repeated ids, or events older than the newest it saw, would drop (a session-51
//! audit saw three such events, a deactivation could be one). The backup marks its copy;
//! the first `serve` of a marked store moves each tenant's counters on (see [`moved_on`]),
//! records the numbers it skipped, and removes the mark. No number is renumbered.
//!
//! The same goes for the dead letters' ids (an operator's note of letter #3 named
//! another letter after a restore), and for a tenant the backup does not hold: one added
//! after the backup numbered from #1 again, under the ids its lost changes had.

use super::keys::{GSEQ_KEY, SEQ_KEY, SKIPPED_KEY};
use super::{StoreResult, be_u64, u64_in};

/// The key, in the default tree, a backup writes into its copy: the time it was written.
pub(super) const BACKUP_MARK: &[u8] = b"rosterd:written_as_backup_at";

/// The key, in the default tree, of the mark of the backup whose start last moved the
/// counters: a later start that finds them moved tells by it whether a start of the same
/// backup was cut short, or the store the backup was written from had been restored.
const MOVED_FOR: &[u8] = b"rosterd:counters_moved_for_backup_at";

/// The key, in the default tree, of where a tenant new to a restored store numbers from
/// (big-endian u64): it may have existed after the backup, with changes the restore lost.
/// Kept, since the tenant may come back to the config any time after.
pub(super) const NEW_TENANTS_FROM: &[u8] = b"rosterd:restored_new_tenants_from";

/// How far the counters move at least: more changes than a store makes between a backup
/// and its restore, by far (a billion a day would take eleven years).
pub(super) const SKIP: u64 = 1 << 32;

/// Where a counter at `last` goes on from: past [`SKIP`], and past the microseconds since
/// 1970. The same backup restored twice, or an older one after a restored run, would
/// otherwise number from the same place again, reusing the first run's numbers (an
/// audit saw one `webhook-id` for two users); the clock has moved on since, by more
/// microseconds than a run makes changes. A clock set back is covered by the first bound
/// alone.
pub(super) fn moved_on(last: u64, now: chrono::DateTime<chrono::Utc>) -> u64 {
    let micros = u64::try_from(now.timestamp_micros()).unwrap_or(0);
    last.saturating_add(SKIP).max(micros)
}

/// One tenant's counters as the restore moved them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Moved {
    pub tenant: String,
    /// The backup's last change: the counter may have been moved already (see
    /// [`MovedBefore`]), and the number it was moved to was never a change.
    pub changes_from: u64,
    pub changes_to: u64,
    pub cursors: usize,
    /// Who had moved the counter already, with no change made since; `None` when no one.
    pub again: Option<MovedBefore>,
}

/// Who moved a restored backup's counters before its start did, with no change since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MovedBefore {
    /// An earlier start of this backup, cut short after it moved them and before it
    /// removed the backup's mark.
    ThisBackup,
    /// The start of another backup: the store this one was written from had been
    /// restored itself, and made no change between that restore and this backup.
    EarlierRestore,
    /// Either: moved by a rosterd that did not record which backup it moved them for.
    NotRecorded,
}

impl MovedBefore {
    /// What the start's WARN says of it.
    pub fn said(self) -> &'static str {
        match self {
            MovedBefore::ThisBackup => {
                " (an earlier start of this backup, cut short, had moved them already)"
            }
            MovedBefore::EarlierRestore => {
                " (the store this backup was written from had been restored itself, which moved them, and made no change between that restore and this backup)"
            }
            MovedBefore::NotRecorded => {
                " (they had been moved already, with no change since: by an earlier start of this backup that was cut short, or by a restore of the store this backup was written from)"
            }
        }
    }
}

/// A restored store's first start, as [`move_counters_of_a_restored_backup`] found it.
pub(super) struct Restored {
    /// When the backup was written, as its mark says.
    pub at: String,
    pub moved: Vec<Moved>,
}

/// If `db` holds a backup's mark: move every tenant's change, governance and dead-letter
/// counters on ([`moved_on`]), and each connector cursor that stood at the last change
/// with them (a cursor behind it still has the changes after it to deliver); mark every
/// connector's files as owing a write (a CSV connector's files still held what the
/// restore lost, and its cursor, moved, had nothing to write); record the skipped
/// numbers, and where a tenant new to the store numbers from. The mark stays until
/// [`finish`], after the caller has said what moved: a start cut short in between moves
/// them again at the next, which only skips more.
pub(super) fn move_counters_of_a_restored_backup(db: &sled::Db) -> StoreResult<Option<Restored>> {
    let Some(mark) = db.get(BACKUP_MARK)? else {
        return Ok(None);
    };
    let mut moved = Vec::new();
    let now = chrono::Utc::now();
    let before = match db.get(MOVED_FOR)? {
        Some(m) if m == mark => MovedBefore::ThisBackup,
        Some(_) => MovedBefore::EarlierRestore,
        None => MovedBefore::NotRecorded,
    };
    for name in db.tree_names() {
        let Some(tenant) = name.strip_prefix(b"tenant/") else {
            continue;
        };
        let tree = db.open_tree(&name)?;
        let last = u64_in(&tree, SEQ_KEY, "sequence counter")?;
        let next = moved_on(last, now);
        let mut batch = sled::Batch::default();
        let cursors = super::delivery::restore_cursors(&tree, last, next, &mut batch)?;
        let from = before_skips(&skipped(&tree)?, last);
        move_counters(&tree, &mut batch, last, next, now)?;
        tree.apply_batch(batch)?;
        moved.push(Moved {
            tenant: String::from_utf8_lossy(tenant).into_owned(),
            changes_from: from,
            changes_to: next,
            cursors,
            again: (from != last).then_some(before),
        });
    }
    db.insert(MOVED_FOR, &mark)?;
    db.insert(NEW_TENANTS_FROM, &moved_on(0, now).to_be_bytes())?;
    db.flush()?;
    Ok(Some(Restored {
        at: String::from_utf8_lossy(&mark).into_owned(),
        moved,
    }))
}

/// Into `batch`: the tenant's change counter from `last` to `next`, its governance and
/// dead-letter counters past where they stand, and the skipped range.
fn move_counters(
    tree: &sled::Tree,
    batch: &mut sled::Batch,
    last: u64,
    next: u64,
    now: chrono::DateTime<chrono::Utc>,
) -> StoreResult<()> {
    batch.insert(SEQ_KEY, &next.to_be_bytes());
    let governance = u64_in(tree, GSEQ_KEY, "governance counter")?;
    batch.insert(GSEQ_KEY, &moved_on(governance, now).to_be_bytes());
    let letters = u64_in(tree, super::delivery::DEAD_SEQ_KEY, "dead-letter counter")?;
    batch.insert(
        super::delivery::DEAD_SEQ_KEY,
        &moved_on(letters, now).to_be_bytes(),
    );
    let mut skipped = tree
        .get(SKIPPED_KEY)?
        .map(|v| v.to_vec())
        .unwrap_or_default();
    skipped.extend_from_slice(&last.to_be_bytes());
    skipped.extend_from_slice(&next.to_be_bytes());
    batch.insert(SKIPPED_KEY, skipped);
    Ok(())
}

/// The number `last` stood at before the skips that end at it: the backup's last change,
/// where the counter had been moved on already with no change since (by an earlier start
/// cut short, or a restore of the store the backup was written from).
fn before_skips(ranges: &[(u64, u64)], last: u64) -> u64 {
    ranges
        .iter()
        .rev()
        .fold(last, |f, &(a, b)| if b == f { a } else { f })
}

/// A store restored and first started by a rosterd from before [`NEW_TENANTS_FROM`]
/// (session 51's) moved its tenants' counters, recording the skipped ranges, but not
/// where a new tenant numbers from: one added later numbered from #1 again. Such a store
/// gets it at its next start.
pub(super) fn note_an_earlier_restore(db: &sled::Db) -> StoreResult<bool> {
    if db.contains_key(NEW_TENANTS_FROM)? {
        return Ok(false);
    }
    for name in db.tree_names() {
        if name.starts_with(b"tenant/") && db.open_tree(&name)?.contains_key(SKIPPED_KEY)? {
            db.insert(
                NEW_TENANTS_FROM,
                &moved_on(0, chrono::Utc::now()).to_be_bytes(),
            )?;
            db.flush()?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// The restore is done: remove the backup's mark.
pub(super) fn finish(db: &sled::Db) -> StoreResult<()> {
    db.remove(BACKUP_MARK)?;
    db.flush()?;
    Ok(())
}

/// A tenant's tree opened empty in a store that was restored from a backup: number its
/// changes, governance events and dead letters past where [`NEW_TENANTS_FROM`] says, as
/// if it had been moved with the others. Returns the change counter, if it did.
pub(super) fn number_a_new_tenant(db: &sled::Db, tree: &sled::Tree) -> StoreResult<Option<u64>> {
    if !tree.is_empty() {
        return Ok(None);
    }
    let Some(from) = db.get(NEW_TENANTS_FROM)?.and_then(|v| be_u64(&v)) else {
        return Ok(None);
    };
    let now = chrono::Utc::now();
    // Past the restore, and past now as a restore would number (the clock stepped back
    // since is covered by the first).
    let next = moved_on(0, now).max(from);
    let mut batch = sled::Batch::default();
    move_counters(tree, &mut batch, 0, next, now)?;
    tree.apply_batch(batch)?;
    tree.flush()?;
    Ok(Some(next))
}

/// The ranges of change numbers a restore skipped, as `(last before, first after - 1)`:
/// no change has a number in `last + 1 ..= next`.
pub(super) fn skipped(tree: &sled::Tree) -> StoreResult<Vec<(u64, u64)>> {
    let Some(v) = tree.get(SKIPPED_KEY)? else {
        return Ok(Vec::new());
    };
    Ok(v.chunks_exact(16)
        .filter_map(|c| {
            let (a, b) = c.split_at(8);
            Some((be_u64(a)?, be_u64(b)?))
        })
        .collect())
}

/// How many of the numbers in `from + 1 ..= to` a restore skipped.
pub(super) fn skipped_between(ranges: &[(u64, u64)], from: u64, to: u64) -> u64 {
    ranges
        .iter()
        .map(|&(last, next)| next.min(to).saturating_sub(last.max(from)))
        .sum()
}

/// `floor`, the number before the oldest change the log holds, read past the skipped
/// numbers: a floor at the top of a skipped range means nothing was compacted there,
/// since no change had those numbers.
pub(super) fn floor_below_skips(ranges: &[(u64, u64)], floor: u64) -> u64 {
    ranges.iter().rev().fold(
        floor,
        |f, &(last, next)| if f > last && f <= next { last } else { f },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_numbers_are_counted_only_inside_the_window() {
        let r = [(10, 20), (25, 35)];
        assert_eq!(skipped_between(&r, 0, 100), 20);
        assert_eq!(skipped_between(&r, 15, 30), 5 + 5);
        assert_eq!(skipped_between(&r, 20, 25), 0);
        assert_eq!(skipped_between(&r, 0, 5), 0);
        assert_eq!(skipped_between(&[], 0, 5), 0);
    }

    #[test]
    fn a_later_restore_numbers_past_an_earlier_ones_run() {
        let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        let first = moved_on(6, t("2026-12-06T14:00:00Z"));
        // The first restored run made a thousand changes; the same backup is restored
        // again a second later.
        let again = moved_on(6, t("2026-12-06T14:00:01Z"));
        assert!(again > first + 1000, "{first} {again}");
        assert!(first >= 6 + SKIP);
        // A clock at 1970 still skips.
        assert_eq!(moved_on(6, t("1970-01-01T00:00:00Z")), 6 + SKIP);
    }

    #[test]
    fn a_start_cut_short_is_seen_through_to_the_backups_last_change() {
        assert_eq!(before_skips(&[], 7), 7);
        assert_eq!(before_skips(&[(2, 50)], 50), 2, "moved once, cut short");
        assert_eq!(before_skips(&[(2, 50), (50, 90)], 90), 2, "twice");
        // Changes made after a restore end the chain: that run was not cut short.
        assert_eq!(before_skips(&[(2, 50)], 53), 53);
        assert_eq!(before_skips(&[(2, 50), (53, 90)], 90), 53);
    }

    #[test]
    fn a_floor_in_a_skipped_range_falls_to_its_start() {
        let r = [(10, 20), (25, 35)];
        assert_eq!(floor_below_skips(&r, 20), 10);
        assert_eq!(floor_below_skips(&r, 15), 10);
        assert_eq!(floor_below_skips(&r, 10), 10);
        assert_eq!(floor_below_skips(&r, 21), 21);
        // Both skips, with nothing between them left: from the upper to the lower.
        assert_eq!(floor_below_skips(&r, 35), 25);
        assert_eq!(floor_below_skips(&[(10, 20), (20, 30)], 30), 10);
    }
}
