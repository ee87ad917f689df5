//! How a write runs: its turn among the tenant's writers, the tenant's lock, the
//! transaction applied, and the wait until group commit has made it durable; and the
//! durable watermark connectors read the log up to.

use super::txn::apply_ops;
use super::{Applied, Op, Store, StoreError, StoreResult, Txn, keys, now};

impl Store {
    /// Run a write under the tenant lock, apply it atomically and take a durability ticket.
    pub(super) fn write_sync<T>(
        &self,
        tenant: &str,
        f: impl FnOnce(&mut Txn<'_>) -> StoreResult<T>,
    ) -> StoreResult<(T, Option<Applied>)> {
        // Refused before anything is applied: a write the engine took but could not make
        // durable would be visible now and gone after the restart.
        if let Some(f) = self.failure() {
            return Err(StoreError::Failed(f));
        }
        let t = self.tenant(tenant)?;
        let mut last_write = t.writes();
        let stamp = last_write.stamp(tenant, now());
        let mut txn = Txn::new(&t.tree, self.resolver(tenant), stamp)?;
        txn.job_running = t.job_running.load(std::sync::atomic::Ordering::Acquire);
        let out = f(&mut txn)?;
        if txn.pending.is_empty() && txn.events.is_empty() {
            // Nothing to write, but the answer reports state an earlier writer may have
            // applied and not yet flushed (an IdP retrying a PATCH, a repeated override):
            // it is acknowledged only once that state is durable, or a crash could undo
            // what the 2xx promised. Tickets are taken under this lock, so the newest one
            // covers every write this transaction could have read.
            return Ok((out, self.inner.commit.unflushed().map(|t| (t, None))));
        }
        let last_seq = (txn.next_seq != txn.first_seq).then(|| txn.next_seq - 1);
        let (ops, moves) = txn.into_ops()?;
        let record_prefix = keys::record("");
        let backref_prefix = keys::backrefs_all_prefix();
        // The backrefs (`b member group`) say who joined or left which group.
        let (records, memberships): (Vec<Op>, Vec<Op>) = match &t.rows {
            Some(_) => ops
                .iter()
                .filter(|(k, _)| k.starts_with(&record_prefix) || k.starts_with(&backref_prefix))
                .cloned()
                .partition(|(k, _)| k.starts_with(&record_prefix)),
            None => (Vec::new(), Vec::new()),
        };
        let noted = self.backup_notes(tenant, &ops);
        let applied = apply_ops(&t.tree, ops);
        // Noted once applied, failed or not: a backup that takes the keys noted so far
        // and copies them again then reads this write's values.
        if let Some(keys) = noted {
            self.backup_saw_write(tenant, keys);
        }
        if let Err(StoreError::Io(e)) = &applied {
            self.inner.commit.fail(e);
        }
        if !moves.is_empty() {
            match applied {
                Ok(()) => t.pages.moved(&moves),
                Err(_) => t.pages.forget(),
            }
        }
        if applied.is_err()
            && let Some(rows) = &t.rows
        {
            // Part of the batch may be in the tree: the file cannot say which.
            rows.distrust();
        }
        applied?;
        if let Some(rows) = &t.rows {
            fn text(b: &[u8]) -> &str {
                std::str::from_utf8(b).unwrap_or("")
            }
            rows.apply(
                &t.tree,
                records
                    .iter()
                    .map(|(k, v)| (text(&k[record_prefix.len()..]), v.as_deref())),
                memberships.iter().filter_map(|(k, v)| {
                    let (member, group) = keys::backref_parts(k)?;
                    Some((text(member), text(group), v.is_some()))
                }),
            );
        }
        // Taken before the lock is released, so a later writer that reads this state
        // finds its ticket already issued (see the no-op case above).
        let ticket = self.inner.commit.ticket();
        drop(last_write);
        Ok((out, Some((ticket, last_seq))))
    }

    /// Run a write on the blocking pool and return once it is durable.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        tenant: &str,
        f: impl FnOnce(&mut Txn<'_>) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let store = self.clone();
        let owned = tenant.to_owned();
        // What the write logs (and a panic in it) belongs to the request or job that made it.
        let span = tracing::Span::current();
        let t = self.tenant(tenant)?;
        // The turn is taken, held and given back by a task of its own, which the runtime
        // polls whatever becomes of the caller. A caller that is not polled for a while
        // (a connector's delivery, while its loop awaits something else, such as a write of
        // its cursor) would otherwise keep the turn it holds, or one handed to it in the
        // queue, and the tenant's every writer behind it waited for good: a webhook
        // connector setting aside dead letters hung the tenant's SCIM writes, and a stop.
        let turn = tokio::spawn(async move {
            let turn = t
                .writers
                .acquire()
                .await
                .map_err(|_| StoreError::Backend("the tenant's writers were closed".into()))?;
            let written =
                tokio::task::spawn_blocking(move || span.in_scope(|| store.write_sync(&owned, f)))
                    .await;
            // Given back before the flush is awaited: the next writer's changes join it.
            drop(turn);
            written.map_err(StoreError::from_join)?
        });
        // Given up with its caller: a write still waiting for its turn then never writes,
        // as before the task; one already writing finishes, as a write on the blocking
        // pool always did.
        let (out, ticket) = tokio_util::task::AbortOnDropHandle::new(turn)
            .await
            .map_err(StoreError::from_join)??;
        if let Some((ticket, last_seq)) = ticket {
            self.inner
                .commit
                .wait(ticket)
                .await
                .map_err(|e| StoreError::NotDurable(e.0.to_string()))?;
            if let Some(seq) = last_seq {
                // Writers of a tenant apply in sequence order and a flush covers
                // everything applied before it, so the largest durable seq is a watermark.
                self.durable_sender(tenant)
                    .send_if_modified(|v| std::mem::replace(v, (*v).max(seq)) < seq);
            }
        }
        Ok(out)
    }

    fn durable_sender(&self, tenant: &str) -> tokio::sync::watch::Sender<u64> {
        if let Some(tx) = self
            .inner
            .durable
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
        {
            return tx.clone();
        }
        let start = self.last_seq(tenant).unwrap_or(0);
        self.inner
            .durable
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant.to_owned())
            .or_insert_with(|| tokio::sync::watch::channel(start).0)
            .clone()
    }

    /// Watch the tenant's durable change-log watermark: the largest sequence number that
    /// is on disk. Starts at the log's end as found when first asked.
    pub fn watch_durable(&self, tenant: &str) -> tokio::sync::watch::Receiver<u64> {
        self.durable_sender(tenant).subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::user;
    use super::super::{IndexQuery, WRITERS_AT_THE_LOCK, fail_next_flush_in};
    use super::*;
    use crate::scim::ResourceKind;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_failed_flush_marks_the_store_failed_until_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        store
            .create("t", ResourceKind::User, user("before"), vec![])
            .await
            .unwrap();
        assert!(store.failure().is_none());

        fail_next_flush_in(dir.path());
        let err = store
            .create("t", ResourceKind::User, user("during"), vec![])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotDurable(_)), "{err}");
        let failure = store.failure().expect("marked failed");
        assert!(failure.error.contains("No space left"), "{}", failure.error);

        // The flusher would succeed now, but sled would not: writes stay refused.
        let err = store
            .create("t", ResourceKind::User, user("after"), vec![])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Failed(_)), "{err}");
        assert!(err.to_string().contains("restart rosterd"), "{err}");

        let err = store.close().unwrap_err().to_string();
        assert!(
            err.contains("at shutdown") && err.contains(&dir.path().display().to_string()),
            "{err}"
        );
    }

    /// Writes that are polled once and then left (as a connector's deliveries are while
    /// its loop awaits a write of its cursor) must not keep the tenant's turns: another
    /// write of the tenant still goes through, and so do the left ones once polled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_left_unpolled_do_not_hold_the_tenants_turn() {
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let mut left = Vec::new();
        for i in 0..2 * WRITERS_AT_THE_LOCK {
            let s = store.clone();
            let mut f = async move {
                s.create("t", ResourceKind::User, user(&format!("left{i}")), vec![])
                    .await
            }
            .boxed();
            // Polled once, a write is nearly always left waiting. On a loaded machine
            // (CI beside a helper's audit) its task once wrote and flushed before that
            // poll returned: done, it holds nothing.
            match f.as_mut().now_or_never() {
                None => left.push(f),
                Some(done) => assert!(done.is_ok()),
            }
        }
        let another = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            store.create("t", ResourceKind::User, user("another"), vec![]),
        )
        .await
        .expect("a write waited behind writes nobody polls");
        assert!(another.is_ok());
        for f in left {
            assert!(f.await.is_ok());
        }
        assert_eq!(store.scan("t", ResourceKind::User).unwrap().count(), 9);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_share_flushes_and_log_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let mut tasks = Vec::new();
        for i in 0..64 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.create("t", ResourceKind::User, user(&format!("u{i}")), vec![])
                    .await
                    .unwrap()
            }));
        }
        let mut versions = Vec::new();
        for t in tasks {
            versions.push(t.await.unwrap().version);
        }
        versions.sort();
        assert_eq!(versions, (1..=64).collect::<Vec<u64>>());
        assert_eq!(store.last_seq("t").unwrap(), 64);
        let log = store.changes("t", 0, 1000).unwrap();
        assert_eq!(log.len(), 64);
        assert!(log.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        // Another tenant's log is separate.
        assert_eq!(store.last_seq("other").unwrap(), 0);
        store.close().unwrap();
        drop(store);
        let reopened = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        assert_eq!(reopened.scan("t", ResourceKind::User).unwrap().count(), 64);
        assert_eq!(
            reopened
                .lookup("t", &IndexQuery::Email("U7@X.TEST".into()))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_write_that_changes_nothing_waits_for_the_state_it_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        // With the flusher stopped, nothing written from here on becomes durable.
        store.inner.commit.stop();
        let (_, written) = store
            .write_sync("t", |txn| {
                txn.put(b"k".to_vec(), b"v".to_vec());
                Ok(())
            })
            .unwrap();
        let (written, _) = written.expect("a write takes a ticket");
        // A retry that finds the state already there must not be acknowledged before
        // that state is durable: it waits on a ticket at least as new.
        let (_, noop) = store.write_sync("t", |_| Ok(())).unwrap();
        let (waits_for, _) = noop.expect("a no-op after an unflushed write waits");
        assert!(waits_for >= written, "{waits_for} < {written}");
    }

    #[test]
    fn one_tenants_crowd_of_writers_does_not_queue_another_tenants_write_behind_it() {
        // Two blocking threads, as if the rest of the pool were taken: a's 200 writers
        // queued there for their lock put b's write behind all of them.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let order = rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            store
                .create("b", ResourceKind::User, user("warm"), vec![])
                .await
                .unwrap();
            let done = Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for i in 0..200 {
                let (s, done) = (store.clone(), done.clone());
                tasks.push(tokio::spawn(async move {
                    s.create("a", ResourceKind::User, user(&format!("a{i}")), vec![])
                        .await
                        .unwrap();
                    done.lock().unwrap().push("a");
                }));
            }
            tokio::task::yield_now().await;
            let (s, d) = (store.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                s.create("b", ResourceKind::User, user("b"), vec![])
                    .await
                    .unwrap();
                d.lock().unwrap().push("b");
            }));
            for t in tasks {
                t.await.unwrap();
            }
            done.lock().unwrap().clone()
        });
        assert_eq!(order.len(), 201);
        let b = order.iter().position(|w| *w == "b").unwrap();
        assert!(b < 50, "b's write finished {b}th of 201");
    }
}
