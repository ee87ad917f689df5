//! A tenant's data, opened at its first use (an interrupted write completed, its write
//! clock and the export's row file set up); the tenants stored; the job that may hold one.

use chrono::{DateTime, Utc};
use std::sync::{Arc, Mutex};

use super::{
    Store, StoreError, StoreResult, Tenant, WRITERS_AT_THE_LOCK, WriteClock, decode,
    newest_change_time, paging, recover_intent, restored, roster, rows, rows_path,
};

impl Store {
    /// Open these tenants' data now rather than at their first request: after a crash
    /// that means finishing an interrupted write and building the export's row file
    /// (seconds at a million users), which belongs in the start, not in a request.
    pub fn open_tenants(&self, tenants: &[String]) -> StoreResult<()> {
        for t in tenants {
            self.tenant(t)?;
        }
        Ok(())
    }

    /// The value stored at `key` in the tenant's tree, decoded; `None` when there is none.
    pub(super) fn get_decoded<T: serde::de::DeserializeOwned>(
        &self,
        tenant: &str,
        key: Vec<u8>,
    ) -> StoreResult<Option<T>> {
        self.tenant(tenant)?
            .tree
            .get(key)?
            .map(|b| decode(&b))
            .transpose()
    }

    /// The tenants the store holds data of, declared or not.
    pub fn stored_tenants(&self) -> Vec<String> {
        self.inner
            .db
            .tree_names()
            .iter()
            .filter_map(|n| n.strip_prefix(b"tenant/"))
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .collect()
    }

    pub(super) fn tenant(&self, tenant: &str) -> StoreResult<Arc<Tenant>> {
        if let Some(t) = self
            .inner
            .tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
        {
            return Ok(t.clone());
        }
        let mut map = self
            .inner
            .tenants
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(t) = map.get(tenant) {
            return Ok(t.clone());
        }
        let tree = self.inner.db.open_tree(format!("tenant/{tenant}"))?;
        if let Some(from) = restored::number_a_new_tenant(&self.inner.db, &tree)? {
            tracing::warn!(
                tenant,
                next_change = from + 1,
                "This store was restored from a backup that does not hold this tenant: its change numbers start at #{} rather than #1, since it may have had changes after the backup that the restore lost. Governance event and dead-letter numbers start as far on.",
                from + 1
            );
        }
        if recover_intent(&tree)? {
            tracing::warn!(
                tenant,
                "Completed a write that the last stop had interrupted (a crash, a kill, or the stop after a store failure)."
            );
        }
        // Changes are stamped too, and a tenant may have no governance event (or had
        // them all pruned): a clock stepped back before this start would otherwise stamp
        // writes earlier than the last change.
        let last_write = roster::last_event_time(&tree)?
            .max(newest_change_time(&tree)?)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let rows_path = rows_path(&self.inner.dir, tenant);
        let rows = rows::RowFile::open(&rows_path, &tree)
            .inspect_err(|e| {
                tracing::warn!(tenant, error = %e, "Cannot open the export's copy of the roster records; exports read the store instead.");
            })
            .ok();
        let t = Arc::new(Tenant {
            tree,
            write_lock: Mutex::new(WriteClock {
                last: last_write,
                behind: false,
            }),
            writers: tokio::sync::Semaphore::new(WRITERS_AT_THE_LOCK),
            pages: paging::Positions::default(),
            job_running: Default::default(),
            rows,
        });
        self.backup_saw_open(tenant);
        map.insert(tenant.to_owned(), t.clone());
        Ok(t)
    }

    /// Mark the tenant as held by a job; false if one already holds it. Taken under the
    /// tenant's write lock, so every override write that checks it is ordered before the
    /// job or refused.
    pub async fn claim_job(&self, tenant: &str) -> StoreResult<bool> {
        let t = self.tenant(tenant)?;
        let claimed = tokio::task::spawn_blocking(move || {
            let _lock = t.writes();
            !t.job_running
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        })
        .await;
        claimed.map_err(StoreError::from_join)
    }

    /// The job that held the tenant has ended (its writes are all done).
    pub fn end_job(&self, tenant: &str) {
        if let Ok(t) = self.tenant(tenant) {
            t.job_running
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }

    pub fn job_running(&self, tenant: &str) -> bool {
        self.tenant(tenant)
            .is_ok_and(|t| t.job_running.load(std::sync::atomic::Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::user;
    use super::*;
    use crate::scim::ResourceKind;

    #[tokio::test]
    async fn a_restart_stamps_writes_no_earlier_than_the_last_change() {
        let dir = tempfile::tempdir().unwrap();
        let at = {
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            store
                .create("t", ResourceKind::User, user("a"), vec![])
                .await
                .unwrap();
            // No governance event: the store alone assigns no archetype.
            assert!(
                roster::last_event_time(&store.tenant("t").unwrap().tree)
                    .unwrap()
                    .is_none()
            );
            store.changes("t", 0, 1).unwrap()[0].at
        };
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        // A clock stepped back an hour before this start stamps the next write no earlier.
        let stamped = store
            .tenant("t")
            .unwrap()
            .writes()
            .stamp("t", at - chrono::Duration::hours(1));
        assert_eq!(stamped, at);
    }
}
