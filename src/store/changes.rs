//! The tenant's change log: read forward (connectors) and back, compacted, and where it
//! starts and ends.

use chrono::{DateTime, Utc};

use super::{
    ChangeEvent, Store, StoreResult, change_log, decode, keys, newest_change_time, restored, u64_in,
};

#[cfg(test)]
impl Store {
    /// Change `seq` overwritten with bytes that do not decode, as a damaged disk leaves it.
    pub(crate) fn damage_change(&self, tenant: &str, seq: u64) {
        let t = self.tenant(tenant).unwrap();
        t.tree
            .insert(keys::change(seq), &b"\xff not json"[..])
            .unwrap();
    }
}

impl Store {
    /// Change events with `seq > since`, oldest first, at most `limit`.
    pub fn changes(&self, tenant: &str, since: u64, limit: usize) -> StoreResult<Vec<ChangeEvent>> {
        self.changes_through(tenant, since, u64::MAX, limit)
    }

    /// [`Store::changes`], none above `upto`. A count alone does not bound them: the
    /// numbers a restore skipped leave a gap, and a reader counting up to the durable
    /// watermark read (and a connector sent) changes not yet on disk past it.
    pub fn changes_through(
        &self,
        tenant: &str,
        since: u64,
        upto: u64,
        limit: usize,
    ) -> StoreResult<Vec<ChangeEvent>> {
        if since >= upto {
            return Ok(Vec::new());
        }
        let t = self.tenant(tenant)?;
        let start = keys::change(since + 1);
        let end = keys::change(upto);
        let mut out = Vec::new();
        for kv in t.tree.range(start..=end).take(limit) {
            let (_, v) = kv?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// Up to `limit` change events at or below `upto`, newest first.
    pub fn changes_back(
        &self,
        tenant: &str,
        upto: u64,
        limit: usize,
    ) -> StoreResult<Vec<ChangeEvent>> {
        let t = self.tenant(tenant)?;
        let mut out = Vec::new();
        for kv in t
            .tree
            .range(keys::change(0)..=keys::change(upto))
            .rev()
            .take(limit)
        {
            out.push(decode(&kv?.1)?);
        }
        Ok(out)
    }

    /// Remove change events up to `upto` that are more than `retention` older than `now`,
    /// or than the newest change if that is earlier, oldest first, in batches so writers
    /// interleave. Returns how many were removed.
    pub async fn compact_changes(
        &self,
        tenant: &str,
        upto: u64,
        retention: chrono::Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        // The age is measured from the newest change when the clock reads later: a clock
        // stepped a year ahead (a wrong RTC, a bad NTP answer) otherwise made every change
        // look a year old, and the feed's readers lost them all.
        let Some(newest) = newest_change_time(&self.tenant(tenant)?.tree)? else {
            return Ok(0);
        };
        let before = now.min(newest) - retention;
        let mut removed = 0u64;
        loop {
            let t = self.tenant(tenant)?;
            let mut doomed = Vec::new();
            for kv in t
                .tree
                .range(keys::change(0)..=keys::change(upto))
                .take(10_000)
            {
                let (k, v) = kv?;
                let e: ChangeEvent = decode(&v)?;
                // The log is in time order: the first young event ends the pass. (With
                // no retention, `before` is the newest change's time, which goes too.)
                if e.at > before {
                    break;
                }
                doomed.push(k.to_vec());
            }
            if doomed.is_empty() {
                return Ok(removed);
            }
            let n = doomed.len() as u64;
            self.write(tenant, move |txn| {
                for k in doomed {
                    txn.del(k);
                }
                Ok(())
            })
            .await?;
            removed += n;
        }
    }

    /// The highest sequence number compaction removed from the log: every change up to
    /// it is gone, so a cursor below it has missed changes it can never read. Sequence
    /// numbers have no holes, so it is one below the oldest change kept (or the last
    /// sequence number when nothing is kept).
    pub fn changelog_floor(&self, tenant: &str) -> StoreResult<u64> {
        let tree = &self.tenant(tenant)?.tree;
        let floor = match change_log(tree).next() {
            Some(kv) => {
                let e: ChangeEvent = decode(&kv?.1)?;
                e.seq.saturating_sub(1)
            }
            None => self.last_seq(tenant)?,
        };
        Ok(restored::floor_below_skips(
            &restored::skipped(tree)?,
            floor,
        ))
    }

    /// How many numbers in `from + 1 ..= to` no change has because a restore skipped
    /// them (see `restored.rs`): what a connector's lag, a difference of numbers, leaves
    /// out.
    pub fn skipped_between(&self, tenant: &str, from: u64, to: u64) -> StoreResult<u64> {
        let ranges = restored::skipped(&self.tenant(tenant)?.tree)?;
        Ok(restored::skipped_between(&ranges, from, to))
    }

    /// The tenant's last change sequence number.
    pub fn last_seq(&self, tenant: &str) -> StoreResult<u64> {
        u64_in(
            &self.tenant(tenant)?.tree,
            keys::SEQ_KEY,
            "sequence counter",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::user;
    use super::*;
    use crate::scim::ResourceKind;

    #[tokio::test]
    async fn compaction_measures_age_from_the_newest_change_when_the_clock_is_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        for name in ["a", "b", "c"] {
            store
                .create("t", ResourceKind::User, user(name), vec![])
                .await
                .unwrap();
        }
        let week = chrono::Duration::hours(168);
        // The clock a year ahead: the changes are seconds old, not a year.
        let ahead = Utc::now() + chrono::Duration::days(365);
        assert_eq!(store.compact_changes("t", 3, week, ahead).await.unwrap(), 0);
        assert_eq!(store.changes("t", 0, 10).unwrap().len(), 3);
        // Without retention everything up to the cursor goes, the newest change too.
        let zero = chrono::Duration::zero();
        assert_eq!(
            store
                .compact_changes("t", 3, zero, Utc::now())
                .await
                .unwrap(),
            3
        );
        assert_eq!(store.changelog_floor("t").unwrap(), 3);
    }
}
