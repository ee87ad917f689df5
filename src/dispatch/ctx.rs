//! What a connector sends to, and the context its task works with.

use backon::{BackoffBuilder, ExponentialBuilder};
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::csv_task::first_held;
use super::live::Live;
use super::seqs::Seqs;
use super::{StartError, blocking, guard};
use crate::config::EnvFn;
use crate::connectors::csv::CsvSettings;
use crate::connectors::oneroster::{self, Credentials, OneRosterSettings};
use crate::connectors::webhook::{Signer, WebhookSettings};
use crate::connectors::{ConnectorConfig, Kind};
use crate::store::{Store, StoreError};

/// Who sends a request. The mirror's own deliveries wait out a pause and count towards
/// the failures that pause it; an operator's replay tries once, now, and leaves the
/// connector's health alone: a target still refusing it is the answer the operator
/// asked for, not a reason to stall the mirror (or the next replay) for `pause_secs`.
/// A reconciliation counts towards the pause as the mirror does, but does not wait one
/// out: its job would hold the tenant's job slot, and refuse overrides with 409, for as
/// long as the target stays down.
#[derive(Clone, Copy)]
pub(super) enum Sender<'c> {
    /// A request of a change the connector follows from the log, with whether the change
    /// has started (see [`Ctx::send_as`]).
    Mirror(&'c AtomicBool),
    /// A OneRoster connector's checks before it follows the log: sent as the mirror
    /// sends, but a stop cuts it at once (it belongs to no change a stop lets finish).
    Preflight,
    Reconcile,
    Operator,
}

/// What a connector sends to.
pub(super) enum Target {
    OneRoster {
        settings: Box<OneRosterSettings>,
        credentials: Credentials,
    },
    Webhook {
        settings: WebhookSettings,
        signer: Signer,
    },
    Csv {
        settings: CsvSettings,
    },
}

/// What would keep `serve` from starting this connector (an unset or malformed secret),
/// checked exactly as a start does; for `check-config`.
pub fn check_start(config: &ConnectorConfig, env: &EnvFn) -> Result<(), String> {
    if !config.enabled {
        return Ok(());
    }
    Target::build(config, env)
        .map(drop)
        .map_err(|e| e.to_string())
}

impl Target {
    pub(super) fn build(config: &ConnectorConfig, env: &EnvFn) -> Result<Target, StartError> {
        let env = |v: &str| env(v);
        let missing = |section: &str| StartError::Config(format!("no [{section}] section"));
        match config.kind {
            Kind::Oneroster => {
                let settings = config
                    .oneroster
                    .clone()
                    .ok_or_else(|| missing("oneroster"))?;
                let credentials = Credentials::new(&settings.auth, &env)?;
                Ok(Target::OneRoster {
                    settings: Box::new(settings),
                    credentials,
                })
            }
            Kind::Webhook => {
                let settings = config.webhook.clone().ok_or_else(|| missing("webhook"))?;
                let signer = Signer::from_env(&settings, &env)?;
                Ok(Target::Webhook { settings, signer })
            }
            Kind::Csv => Ok(Target::Csv {
                settings: config.csv.clone().ok_or_else(|| missing("csv"))?,
            }),
        }
    }
}

/// Everything a connector's task works with.
pub(super) struct Ctx {
    pub(super) store: Store,
    pub(super) client: reqwest::Client,
    pub(super) config: ConnectorConfig,
    pub(super) target: Target,
    pub(super) live: Arc<Live>,
    pub(super) cancel: CancellationToken,
    /// Bounds requests in flight.
    pub(super) slots: Semaphore,
    /// Held by the one request of a change not started yet that queues for a slot: the
    /// requests of changes already started queue behind at most that one, not behind
    /// the first requests of a whole window of changes (see [`Ctx::slot`]).
    pub(super) start_gate: tokio::sync::Mutex<()>,
    /// What the connector following the log last took as acknowledged (see [`Acked`]).
    pub(super) acked: Mutex<Option<Acked>>,
    /// The objects a reconciliation is repairing now.
    pub(super) repairs: Repairs,
    /// Delivered-content hashes of changes finished but not written to the store yet (the
    /// follower writes them with the cursor, at most every 200 ms): a change that waited
    /// for one of them plans on them as the target now holds them. A user's enrollment
    /// owed once it can be sent is sent only where the target holds the class, and a class
    /// acknowledged a moment before looked not held (a re-audit lost it 7 times of 7).
    pub(super) unsaved: Mutex<HashMap<String, Option<u64>>>,
}

/// The objects a reconciliation is repairing now, by the keys the log follower orders
/// changes by: a change of one waits for the repairs' answers (see [`Repairing`]).
/// Several at once share a key: repairs go side by side, and the enrollments of one class
/// are all under its `Group/…` key, those of one user under its `User/…` key.
#[derive(Default)]
pub(super) struct Repairs(Mutex<HashMap<String, Vec<watch::Receiver<bool>>>>);

impl Repairs {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<watch::Receiver<bool>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A repair under `keys`, until the guard is dropped.
    fn begin(&self, keys: Vec<String>) -> Repairing<'_> {
        let (done, rx) = watch::channel(false);
        let mut map = self.map();
        for k in &keys {
            map.entry(k.clone()).or_default().push(rx.clone());
        }
        drop(map);
        Repairing {
            repairs: self,
            keys,
            done,
        }
    }

    /// The repairs of the object `key` under way.
    pub(super) fn of(&self, key: &str) -> Vec<watch::Receiver<bool>> {
        self.map().get(key).cloned().unwrap_or_default()
    }
}

/// A reconciliation's repair of one object, from before it checks the change log for a
/// change of the object until the target answered it. The log follower reads a change
/// only once it is logged, so a change the check did not see finds this and is sent after
/// the repair: sent alongside it, a target applying requests in another order than they
/// came put the repair's older copy back (session 41: 18 of 40 titles).
pub(super) struct Repairing<'a> {
    repairs: &'a Repairs,
    keys: Vec<String>,
    done: watch::Sender<bool>,
}

impl Drop for Repairing<'_> {
    fn drop(&mut self) {
        self.done.send_replace(true);
        let mine = self.done.subscribe();
        let mut map = self.repairs.map();
        for k in &self.keys {
            if let Some(waits) = map.get_mut(k) {
                waits.retain(|r| !r.same_channel(&mine));
                if waits.is_empty() {
                    map.remove(k);
                }
            }
        }
    }
}

/// The cursor a connector following the log last saved, and every change above it that
/// was acknowledged by then, in order. The store holds only the first
/// [`MAX_ACKED_RECORDED`] of them; a reconciliation that took the rest for still
/// waiting would leave their objects unrepaired for as long as one slow object held the
/// cursor.
///
/// [`MAX_ACKED_RECORDED`]: super::follow::MAX_ACKED_RECORDED
#[derive(Debug, Clone)]
pub(super) struct Acked {
    pub cursor: u64,
    pub above: Arc<Seqs>,
}

impl Ctx {
    /// The `[guard]` of the connector, if it has one, for a start at `cursor`.
    pub(super) async fn guard_at(&self, cursor: u64) -> Result<Option<guard::Guard>, StoreError> {
        let Some(limit) = self.config.guard else {
            return Ok(None);
        };
        let (store, tenant, key) = (
            self.store.clone(),
            self.tenant().to_owned(),
            self.cursor_name(),
        );
        let kind = self.config.kind;
        blocking(move || guard::Guard::at_start(limit, kind, &store, &tenant, &key, cursor))
            .await
            .map(Some)
    }

    /// Whether the connector's `[guard]` would hold one of the changes after its cursor,
    /// up to `through`: judged from the store (what it sent before, the operator's
    /// approval), for a write beside the connector's own loop, which may not have read
    /// them yet, or not since a restart. Reads the store in the calling thread.
    pub(super) fn guard_holds_now(&self, through: u64) -> Result<Option<guard::Held>, StoreError> {
        let Some(limit) = self.config.guard else {
            return Ok(None);
        };
        let (tenant, key) = (self.tenant(), self.cursor_name());
        let mut at = self.store.cursor(tenant, &key)?;
        let mut g = guard::Guard::at_start(limit, self.config.kind, &self.store, tenant, &key, at)?;
        first_held(&self.store, tenant, self.name(), &mut g, &mut at, through)
    }

    /// The operator resumed a held connector: every change logged by now may go (or,
    /// with `skipped_after`, those after that one are skipped), and a restart remembers
    /// it. Through which change.
    pub(super) async fn record_approval(
        &self,
        guard: &mut guard::Guard,
        skipped_after: Option<u64>,
    ) -> Result<u64, StoreError> {
        let through = self.store.last_seq(self.tenant())?;
        self.store
            .set_guard_approved(self.tenant(), &self.cursor_name(), through, skipped_after)
            .await?;
        guard.approve(through);
        if skipped_after.is_some() {
            tracing::warn!(
                through,
                "Held changes skipped by the operator: the changes up to this one are not sent; a reconciliation sends the target the current state of what they changed."
            );
        } else {
            tracing::info!(through, "Held changes let go by the operator's resume.");
        }
        Ok(through)
    }

    pub(super) fn tenant(&self) -> &str {
        &self.config.tenant
    }

    /// Mark `object` (a delivered-content key: `User/…`, `Group/…`, `Member/g/u`) as
    /// being repaired until the guard is dropped.
    pub(super) fn repairing(&self, object: &str) -> Repairing<'_> {
        let keys: Vec<String> = match object.split('/').collect::<Vec<_>>()[..] {
            ["User" | "Group", _] => vec![object.to_owned()],
            // An enrollment is sent with its group's changes and its user's.
            ["Member", group, user] => vec![format!("Group/{group}"), format!("User/{user}")],
            // The course: no change of the log sends it.
            _ => vec![],
        };
        self.repairs.begin(keys)
    }

    /// Whether a user's deactivation or reactivation sends the classes of its groups: a
    /// OneRoster target that deletes inactive users.
    pub(super) fn state_sends_classes(&self) -> bool {
        matches!(&self.target, Target::OneRoster { settings, .. }
            if settings.deactivate == oneroster::Deactivate::Delete)
    }

    pub(super) fn name(&self) -> &str {
        &self.config.name
    }

    /// What every line about this connector's work sits under: its own task, an
    /// operator's replay and a reconciliation. Lines inside name neither tenant nor
    /// connector again.
    pub(super) fn span(&self) -> tracing::Span {
        tracing::info_span!("connector", connector = %self.config.name, tenant = %self.config.tenant, kind = self.config.kind.as_str())
    }

    /// The cursor's key: a dry run keeps its own, so switching it off later sends
    /// everything for real.
    pub(super) fn cursor_name(&self) -> String {
        cursor_name(&self.config)
    }

    pub(super) fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        backoff(&self.config.retry)
    }

    pub(super) fn publish_acked(&self, acked: Option<Acked>) {
        *self.acked.lock().unwrap_or_else(|e| e.into_inner()) = acked;
    }

    /// What the connector following the log last saved, when it is following it.
    pub(super) fn acked(&self) -> Option<Acked> {
        self.acked.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Delays between retries: doubling from `initial_delay_ms` up to `max_delay_ms`, each
/// with jitter, never above `max_delay_ms`. backon's jitter adds up to the delay itself
/// on top of it (after its cap), so the builder is given half of each bound: a delay
/// then lies between half the nominal one and the nominal one.
fn backoff(retry: &crate::connectors::RetryConfig) -> impl Iterator<Item = Duration> + use<> {
    let max = retry.max_delay();
    ExponentialBuilder::new()
        .with_min_delay(retry.initial_delay() / 2)
        .with_max_delay(max / 2)
        .with_jitter()
        .without_max_times()
        .build()
        // backon scales by an f32; rounding must not lift a delay over the cap.
        .map(move |d| d.min(max))
}

pub(super) fn cursor_name(config: &ConnectorConfig) -> String {
    if config.dry_run {
        format!("{}.dry-run", config.name)
    } else {
        config.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Repairs side by side share keys (two enrollments of one user, of one class): a
    /// change of the key waits for each of them, not only for the last one begun, which
    /// had replaced the others.
    #[test]
    fn a_change_waits_for_every_repair_under_its_key() {
        let repairs = Repairs::default();
        let keys = |g: &str| vec![format!("Group/{g}"), "User/ada".to_owned()];
        let first = repairs.begin(keys("staff"));
        let second = repairs.begin(keys("night"));
        let waits = repairs.of("User/ada");
        assert_eq!(waits.len(), 2);
        assert_eq!(repairs.of("Group/staff").len(), 1);
        drop(first);
        assert!(*waits[0].borrow(), "the first repair's answer is not seen");
        assert!(!*waits[1].borrow());
        assert_eq!(repairs.of("User/ada").len(), 1);
        assert!(repairs.of("Group/staff").is_empty());
        drop(second);
        assert!(*waits[1].borrow());
        assert!(repairs.of("User/ada").is_empty());
        assert!(repairs.map().is_empty(), "a finished repair's key stayed");
    }

    #[test]
    fn backoff_doubles_with_jitter_and_never_exceeds_its_cap() {
        let retry = crate::connectors::RetryConfig {
            initial_delay_ms: 200,
            max_delay_ms: 5000,
            ..Default::default()
        };
        let (initial, max) = (retry.initial_delay(), retry.max_delay());
        for _ in 0..50 {
            let delays: Vec<Duration> = backoff(&retry).take(12).collect();
            assert!(
                delays[0] >= initial / 2 && delays[0] <= initial,
                "{delays:?}"
            );
            assert!(delays.iter().all(|d| *d <= max), "{delays:?}");
            // Past the cap the delays still spread (jitter), within its upper half.
            assert!(delays[8..].iter().all(|d| *d >= max / 2), "{delays:?}");
        }
        let late: std::collections::BTreeSet<Duration> =
            (0..20).filter_map(|_| backoff(&retry).nth(10)).collect();
        assert!(late.len() > 1, "no jitter at the cap: {late:?}");
    }
}
