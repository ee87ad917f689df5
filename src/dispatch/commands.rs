//! Operator commands on a connector: dead letters, replays, retirement, holds and pauses.

use chrono::Utc;
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;
use tracing::Instrument;

use super::csv_task::{Judged, judge};
use super::ctx::{Ctx, Sender, Target};
use super::dispatcher::{Dispatcher, Found, Held};
use super::keys::{object_keys, reports_of};
use super::live::Live;
use super::send::Sent;
use super::status::{ConnectorStatus, RetiredStatus};
use super::{BATCH, DispatchError, PlanError, blocking, guard};
use crate::scim::ResourceKind;
use crate::store::{ChangeEvent, DeadLetter, Store, StoreError};

impl Dispatcher {
    fn find(&self, tenant: &str, name: &str) -> Result<Found, DispatchError> {
        let running = self.running();
        let r = running
            .get(name)
            .filter(|r| r.config.tenant == tenant)
            .ok_or_else(|| DispatchError::UnknownConnector(name.to_owned()))?;
        Ok(Found {
            config: r.config.clone(),
            live: r.live.clone(),
            ctx: r.ctx.clone(),
            not_started: r.not_started.is_some(),
        })
    }

    /// A connector by name for what its dead letters need: `Ok(None)` when no file loads
    /// it but the store still knows it (a cursor, dead letters, a retirement), so that
    /// what is kept of it stays listable and removable. Its letters hold refused
    /// requests, personal data, which an operator must be able to see and remove with
    /// the connector gone: /status lists them, and the commands to handle them
    /// answered "no connector".
    fn find_letters(&self, tenant: &str, name: &str) -> Result<Option<Found>, DispatchError> {
        match self.find(tenant, name) {
            Ok(found) => Ok(Some(found)),
            // Also one a file that does not load names, though it never ran: it has no
            // letters, and "no connector" read as a misspelt name, as its status did.
            Err(DispatchError::UnknownConnector(_)) if self.known_unloaded(tenant, name)? => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A loaded connector by name, for what needs it loaded (`needs`, as the refusal
    /// says it). One the store knows, or that a file which does not load names, is
    /// refused as not loaded, saying why and what loads it: "no connector" read as a
    /// misspelt name, for a connector whose file is broken or that was retired.
    pub(super) fn find_loaded(
        &self,
        tenant: &str,
        name: &str,
        needs: &str,
    ) -> Result<Found, DispatchError> {
        match self.find(tenant, name) {
            Err(DispatchError::UnknownConnector(_)) if self.known_unloaded(tenant, name)? => {
                Err(self.not_loaded(tenant, name, needs))
            }
            found => found,
        }
    }

    /// Whether connector `name` of `tenant`, not loaded, is one the store knows or a file
    /// that does not load names (it may never have run).
    fn known_unloaded(&self, tenant: &str, name: &str) -> Result<bool, StoreError> {
        Ok(self.stored(tenant, name)? || self.unloaded_file(tenant, name).is_some())
    }

    /// The file naming connector `name` of `tenant` that did not load, if one does.
    fn unloaded_file(&self, tenant: &str, name: &str) -> Option<std::path::PathBuf> {
        self.unloaded_lock()
            .iter()
            .filter(|u| u.tenant.as_deref().is_none_or(|t| t == tenant))
            .find(|u| u.name.as_deref() == Some(name))
            .map(|u| u.file.clone())
    }

    /// Whether the store holds anything of connector `name` of `tenant`.
    fn stored(&self, tenant: &str, name: &str) -> Result<bool, StoreError> {
        let dry_run = format!("{name}.dry-run");
        Ok(self.store.dead_letter_count(tenant, name)? > 0
            || self
                .store
                .cursors(tenant)?
                .iter()
                .any(|(c, _)| *c == name || *c == dry_run)
            || self.store.retired(tenant)?.iter().any(|r| r == name))
    }

    /// Why a connector the store knows is not loaded, and what would load it again: for
    /// the refusal of what needs it running.
    fn not_loaded(&self, tenant: &str, name: &str, needs: &str) -> DispatchError {
        let held = self.held_cursors(tenant).unwrap_or_default();
        // One that never delivered has no cursor to find its file by.
        let file = held
            .iter()
            .filter(|h| h.name == name)
            .find_map(|h| h.file.clone())
            .or_else(|| self.unloaded_file(tenant, name));
        let retired = self
            .store
            .retired(tenant)
            .is_ok_and(|r| r.iter().any(|r| r == name));
        let (why, fix) = match file {
            Some(file) => (
                format!("its file {} does not load", file.display()),
                "fix that file and reload",
            ),
            None if retired => (
                "it is retired".to_owned(),
                "put back a file with its name and reload, which resumes it from its cursor",
            ),
            None => (
                "no connector file names it".to_owned(),
                "put its file back and reload",
            ),
        };
        DispatchError::NotLoaded(
            name.to_owned(),
            why,
            format!(
                "{needs} needs it running; to do that, {fix}. Its dead letters can be listed and discarded as it is (`rosterd dead-letters --tenant {tenant} list {name}`, `discard {name} --all`)"
            ),
        )
    }

    /// The changes a connector has not delivered, by the furthest behind of its cursors
    /// (one in dry run keeps its real one too): what compaction may drop once it is
    /// retired.
    pub(super) fn undelivered(&self, tenant: &str, name: &str) -> u64 {
        let dry_run = format!("{name}.dry-run");
        self.store
            .cursors(tenant)
            .unwrap_or_default()
            .iter()
            .filter(|(c, _)| *c == name || *c == dry_run)
            .map(|(c, _)| self.lag(tenant, c).1)
            .max()
            .unwrap_or(0)
    }

    /// Retired connectors that still hold dead letters, which no other list shows: not
    /// loaded, they are not connectors, and retired, not "not loaded" either, yet their
    /// letters stay in the store until discarded.
    pub fn retired_status(&self) -> Vec<RetiredStatus> {
        let mut out = Vec::new();
        for tenant in &self.tenants {
            let Ok(retired) = self.store.retired(tenant) else {
                continue;
            };
            // Named again by a file, loaded or not: listed as such. (`held_cursors`
            // takes the lock of the running ones itself.)
            let running: Vec<String> = self
                .running()
                .values()
                .filter(|r| r.config.tenant == *tenant)
                .map(|r| r.config.name.clone())
                .collect();
            let held = self.held_cursors(tenant).unwrap_or_default();
            for name in retired {
                if running.contains(&name) || held.iter().any(|h| h.name == name) {
                    continue;
                }
                let dead_letters = self.store.dead_letter_count(tenant, &name).unwrap_or(0);
                if dead_letters > 0 {
                    out.push(RetiredStatus {
                        name,
                        tenant: tenant.clone(),
                        dead_letters,
                    });
                }
            }
        }
        out
    }

    /// A connector's status, for `GET /connectors/NAME` and a reconciliation of one
    /// connector: one that is not loaded is said to be so, with why and what loads it.
    /// `needs`: what asks, as the refusal says it ("its status", "a reconciliation").
    pub fn loaded_connector_status(
        &self,
        tenant: &str,
        name: &str,
        needs: &str,
    ) -> Result<ConnectorStatus, DispatchError> {
        let f = self.find_loaded(tenant, name, needs)?;
        Ok(self.status_of(&f.config, &f.live, f.not_started))
    }

    /// A page of a connector's dead letters (ids above `after`, oldest first) and how
    /// many it holds in all.
    pub fn dead_letters(
        &self,
        tenant: &str,
        name: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, u64), DispatchError> {
        self.find_letters(tenant, name)?;
        Ok((
            self.store.dead_letters(tenant, name, after, limit)?,
            self.store.dead_letter_count(tenant, name)?,
        ))
    }

    pub async fn discard(&self, tenant: &str, name: &str, id: u64) -> Result<(), DispatchError> {
        let mut done = self.discard_batch(tenant, name, &[id]).await?;
        done.pop()
            .map_or(Err(DispatchError::NoSuchLetter(id)), |(_, r)| r)
    }

    /// Drop several dead letters in one store write, each with its own outcome: one a
    /// replay is sending (409) or one gone already (404) does not keep the others. At 300
    /// a second one call at a time, 20,000 letters took the operator over a minute.
    pub async fn discard_batch(
        &self,
        tenant: &str,
        name: &str,
        ids: &[u64],
    ) -> Result<Vec<(u64, Result<(), DispatchError>)>, DispatchError> {
        // Not loaded, nothing replays its letters. (A reload that loads it meanwhile may
        // replay a letter this discards: the store removes a letter once, so it goes
        // either way, and nothing is sent twice.)
        let live = self.find_letters(tenant, name)?.map(|f| f.live);
        let mut outcome: Vec<(u64, Result<(), DispatchError>)> = Vec::with_capacity(ids.len());
        let mut claims = Vec::new();
        let mut letters = Vec::new();
        for &id in ids {
            // A letter being replayed is the replay's: it goes if the target takes it.
            let claim = match &live {
                Some(live) => match live.claim_replay(id) {
                    Some(claim) => Some(claim),
                    None => {
                        outcome.push((id, Err(Self::in_hand(name, id))));
                        continue;
                    }
                },
                None => None,
            };
            match self.store.dead_letter(tenant, name, id) {
                Ok(Some(letter)) => {
                    claims.push(claim);
                    letters.push((id, Some(letter)));
                    outcome.push((id, Ok(())));
                }
                // One that cannot be read can still go: it is all that can be done.
                Err(StoreError::Corrupt(_)) => {
                    claims.push(claim);
                    letters.push((id, None));
                    outcome.push((id, Ok(())));
                }
                Ok(None) => outcome.push((id, Err(DispatchError::NoSuchLetter(id)))),
                Err(e) => outcome.push((id, Err(e.into()))),
            }
        }
        let wanted: Vec<u64> = letters.iter().map(|(id, _)| *id).collect();
        let removed = self.store.remove_dead_letters(tenant, name, wanted).await?;
        drop(claims);
        let mut removed = letters.iter().zip(removed);
        for (id, result) in outcome.iter_mut().filter(|(_, r)| r.is_ok()) {
            let Some(((_, letter), gone)) = removed.next() else {
                break;
            };
            if !gone {
                *result = Err(DispatchError::NoSuchLetter(*id));
                continue;
            }
            // The change is now never delivered to this target: the log is its only trace.
            match letter {
                Some(letter) => {
                    let ev = &letter.event;
                    tracing::warn!(tenant = %tenant, connector = %name, id, seq = ev.seq, object = %format!("{}/{}", ev.resource_type, ev.id), reason = letter.reason.as_str(), "Dead letter discarded by the operator; its change will not be delivered.");
                }
                None => {
                    tracing::warn!(tenant = %tenant, connector = %name, id, "Dead letter discarded by the operator; it could not be read, so which change it held is not known.");
                }
            }
        }
        Ok(outcome)
    }

    /// Send a dead letter's change again, once. On success the letter is removed; on
    /// failure it stays and the target's reason is returned.
    ///
    /// A state target (OneRoster) is sent the object's state as stored *now* (or its
    /// delete, if it is gone), never the letter's snapshot: the letter may be older than
    /// changes delivered since, and replaying it would undo them downstream (re-enable a
    /// user who left). The hashes recorded are those of what was sent. A webhook gets
    /// the original event with its original `webhook-id` and `data.seq`, as at-least-once
    /// event delivery promises; the answer lists the later changes of the same object
    /// already delivered, so the operator (and a receiver ordering by `data.seq`) knows
    /// the event is old news.
    pub async fn replay(
        &self,
        tenant: &str,
        name: &str,
        id: u64,
    ) -> Result<Replayed, DispatchError> {
        let (mut results, _) = self
            .replay_batch(tenant, name, &[id], Duration::MAX)
            .await?;
        // Not begun without a time limit: only a stop hands a letter back.
        results.pop().map(|(_, r)| r).unwrap_or_else(|| {
            Err(DispatchError::NotRunning(
                name.to_owned(),
                "shutting down".into(),
            ))
        })
    }

    /// [`Dispatcher::replay`] of each of `ids` in turn, until `budget` has passed: each
    /// letter's result, and the ids not begun. The change log is read once for the whole
    /// batch, to find the later changes of each letter's objects: read for each letter,
    /// `replay --all` managed 3–6 letters a second on a tenant of 27,000 changes. What
    /// concerns the connector as a whole (unknown, not running) fails the batch.
    pub async fn replay_batch(
        &self,
        tenant: &str,
        name: &str,
        ids: &[u64],
        budget: Duration,
    ) -> Result<(Vec<(u64, Result<Replayed, DispatchError>)>, Vec<u64>), DispatchError> {
        let began = tokio::time::Instant::now();
        let Some(Found { ctx, .. }) = self.find_letters(tenant, name)? else {
            return Err(self.not_loaded(tenant, name, "a replay"));
        };
        let ctx = ctx.ok_or_else(|| {
            DispatchError::NotRunning(name.to_owned(), "it is disabled or failed to start".into())
        })?;
        let oneroster = matches!(ctx.target, Target::OneRoster { .. });
        // Checked before each letter too: a hold may begin while a batch runs.
        let held = || ctx.live.held() && oneroster;
        if held() {
            let refused = ids.iter().map(|&id| (id, Err(Self::held_refusal(name))));
            return Ok((refused.collect(), vec![]));
        }
        // The hold lives in the connector's task, which after a start or a reload holds
        // again only once it has read that far (after its preflight, a pause, a
        // backlog): until then it reads as not held, and a replay sent a deprovisioning
        // the operator was about to skip. So the guard is judged from the store too, as
        // a CSV write beside the connector's loop is. Any hold refuses, as a hold in
        // force does: an object's state carries every change of it logged by now, and
        // which of them the guard would hold is the hold's to say, not the replay's.
        let mut judged: Judged = if oneroster {
            let cursor = self.store.cursor(tenant, &ctx.cursor_name())?;
            ctx.guard_at(cursor).await?.map(|g| (g, cursor))
        } else {
            None
        };
        if let Some(h) = self.judged_holds(&ctx, &mut judged).await? {
            let refused = ids
                .iter()
                .map(|&id| (id, Err(Self::guard_refusal(tenant, name, &h))));
            return Ok((refused.collect(), vec![]));
        }
        let letters: Vec<Result<DeadLetter, DispatchError>> = ids
            .iter()
            .map(|&id| self.stored_letter(tenant, name, id))
            .collect();
        let mut superseded = {
            let (store, t, cursor_name, events, classes) = (
                self.store.clone(),
                tenant.to_owned(),
                ctx.cursor_name(),
                letters
                    .iter()
                    .filter_map(|l| Some(l.as_ref().ok()?.event.clone()))
                    .collect::<Vec<_>>(),
                ctx.state_sends_classes(),
            );
            blocking(move || later_delivered_changes(&store, &t, &cursor_name, &events, classes))
                .await?
                .into_iter()
        };
        let mut results = Vec::with_capacity(ids.len());
        let mut letters = ids.iter().copied().zip(letters);
        for (id, letter) in letters.by_ref() {
            let superseded_by = match &letter {
                Ok(_) => superseded.next().unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            let refused = if held() {
                Some(Self::held_refusal(name))
            } else if letter.is_ok() {
                // Changes logged while the batch runs are judged before each letter.
                self.judged_holds(&ctx, &mut judged)
                    .await?
                    .map(|h| Self::guard_refusal(tenant, name, &h))
            } else {
                None
            };
            let result = match (refused, letter) {
                (Some(refused), _) => Err(refused),
                // Read again at its turn, which may come many seconds after the batch
                // began: a call the CLI gave up on goes on, and the operator's next
                // call must not send again what it replayed (or an operator discarded)
                // meanwhile.
                (None, Ok(_)) => match ctx.live.claim_replay(id) {
                    None => Err(Self::in_hand(name, id)),
                    Some(_claim) => match self.stored_letter(tenant, name, id) {
                        Ok(letter) => {
                            self.replay_letter(&ctx, tenant, name, letter, superseded_by)
                                .await
                        }
                        Err(e) => Err(e),
                    },
                },
                (None, Err(e)) => Err(e),
            };
            // Stopped (the daemon, or this connector for a reload): what was cut short
            // and what was not begun are handed back, not failed, for the next call.
            if ctx.cancel.is_cancelled() {
                let cut = matches!(result, Err(DispatchError::NotRunning(..)));
                if !cut {
                    results.push((id, result));
                }
                let left = cut.then_some(id).into_iter();
                return Ok((results, left.chain(letters.map(|(id, _)| id)).collect()));
            }
            results.push((id, result));
            if began.elapsed() >= budget {
                break;
            }
        }
        Ok((results, letters.map(|(id, _)| id).collect()))
    }

    /// Dead letter `id` of connector `name` as stored now.
    fn stored_letter(
        &self,
        tenant: &str,
        name: &str,
        id: u64,
    ) -> Result<DeadLetter, DispatchError> {
        match self.store.dead_letter(tenant, name, id) {
            Ok(found) => found.ok_or(DispatchError::NoSuchLetter(id)),
            Err(StoreError::Corrupt(e)) => Err(DispatchError::Refused(
                name.to_owned(),
                format!("cannot read dead letter {id} ({e}); it can only be discarded"),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Letter `id` is being replayed for another request.
    fn in_hand(name: &str, id: u64) -> DispatchError {
        DispatchError::Refused(
            name.to_owned(),
            format!(
                "is replaying or discarding dead letter {id} for another request now; a replay that goes through, or the discard, removes it"
            ),
        )
    }

    /// A OneRoster replay sends the object as it stands, which may be a deprovisioning
    /// the guard holds: a recheck saw a held user disabled, and on a delete-mode target
    /// deleted, by a replay before any resume. A webhook replay sends the letter's own
    /// event, which the guard let through.
    fn held_refusal(name: &str) -> DispatchError {
        DispatchError::Refused(
            name.to_owned(),
            "is held by its [guard], and a replay sends the object as it stands, which may be what the guard holds: resume it first (`rosterd resume`, or `--skip-held`)".into(),
        )
    }

    /// What the guard judged in `judged` holds of the changes logged by now: for a
    /// replay beside a connector that may not have read them yet.
    async fn judged_holds(
        &self,
        ctx: &Ctx,
        judged: &mut Judged,
    ) -> Result<Option<guard::Held>, StoreError> {
        if judged.is_none() {
            return Ok(None);
        }
        let upto = self.store.last_seq(ctx.tenant())?;
        judge(ctx, judged, upto).await
    }

    /// [`Dispatcher::held_refusal`] for a hold judged from the store that the connector
    /// has not read yet: a resume now finds nothing held, so the operator waits for the
    /// hold first.
    fn guard_refusal(tenant: &str, name: &str, held: &guard::Held) -> DispatchError {
        DispatchError::Refused(
            name.to_owned(),
            format!(
                "is held by its [guard] at change #{seq}, which the connector has not read yet (just after a start or a reload, or while it is behind or paused), and a replay sends the object as it stands, which may be what the guard holds. Once `rosterd status --tenant {tenant}` shows it held (a paused connector reaches the hold only once resumed), resume it (`rosterd resume`, or `--skip-held`), then replay",
                seq = held.seq
            ),
        )
    }

    async fn replay_letter(
        &self,
        ctx: &Ctx,
        tenant: &str,
        name: &str,
        letter: DeadLetter,
        superseded_by: Vec<u64>,
    ) -> Result<Replayed, DispatchError> {
        let id = letter.id;
        // Before the state is read, and until its hashes are written: a change of the
        // object logged meanwhile waits for the replay, as for a reconciliation's repair.
        // Sent beside it, the mirror's deactivation could land first and the replay's
        // older copy after, and with the mirror's hash written last no reconciliation saw
        // the leaver still enabled.
        let _ordered = matches!(ctx.target, Target::OneRoster { .. }).then(|| {
            ctx.repairing(&format!(
                "{}/{}",
                letter.event.resource_type, letter.event.id
            ))
        });
        let (event, reports, sent) = match &ctx.target {
            Target::OneRoster { .. } => {
                let (current, reports) =
                    current_with_reports(&self.store, tenant, letter.event.clone(), true).await?;
                (current, reports, ReplaySent::CurrentState)
            }
            Target::Webhook { .. } | Target::Csv { .. } => {
                (letter.event.clone(), vec![], ReplaySent::OriginalEvent)
            }
        };
        let plan = ctx.plan(&event, &reports).map_err(|e| match e {
            PlanError::Store(e) => DispatchError::Store(e),
            PlanError::Unplannable(reason) => DispatchError::Unmappable(reason),
        })?;
        for stage in &plan.stages {
            for req in stage {
                match ctx
                    .send_as(req, Some(1), Sender::Operator, None)
                    .instrument(ctx.span())
                    .await
                {
                    Sent::Ok | Sent::Superseded => {}
                    Sent::Cancelled => {
                        return Err(DispatchError::NotRunning(
                            name.to_owned(),
                            "shutting down".into(),
                        ));
                    }
                    Sent::Refused { reason, response } => {
                        let detail = response
                            .map(|r| format!(" ({}: {})", r.status, r.body))
                            .unwrap_or_default();
                        return Err(DispatchError::ReplayFailed(format!("{reason}{detail}")));
                    }
                }
            }
        }
        if !plan.hashes.is_empty() {
            // Reconciliation reads the hashes under the cursor's name (a dry run keeps
            // its own), so they are written there too.
            self.store
                .set_delivered(tenant, &ctx.cursor_name(), plan.hashes)
                .await?;
        }
        self.store.remove_dead_letter(tenant, name, id).await?;
        let note = match (sent, superseded_by.is_empty()) {
            (ReplaySent::CurrentState, true) => None,
            (ReplaySent::CurrentState, false) => Some(format!(
                "the letter's change #{} is older than later changes of {}/{} the connector has passed (delivered, or set aside as dead letters); the object's current state was sent, not the letter's snapshot",
                letter.event.seq, letter.event.resource_type, letter.event.id
            )),
            (ReplaySent::OriginalEvent, true) => None,
            (ReplaySent::OriginalEvent, false) => Some(format!(
                "the replayed event (change #{}) is older than later changes of {}/{} the connector has passed (#{}: delivered, or set aside as dead letters); receivers that apply events by data.seq will ignore it, others may now hold its older snapshot",
                letter.event.seq,
                letter.event.resource_type,
                letter.event.id,
                superseded_by
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", #")
            )),
        };
        match &note {
            Some(note) => {
                tracing::warn!(tenant = %tenant, connector = %name, id, note, "Dead letter replayed.")
            }
            None => {
                tracing::info!(tenant = %tenant, connector = %name, id, "Dead letter replayed.")
            }
        }
        Ok(Replayed {
            replayed: id,
            sent,
            superseded_by,
            note,
        })
    }

    /// Let compaction drop what a connector that is not loaded still has to deliver: the
    /// operator's word that it is gone for good (its file was removed while the daemon was
    /// stopped, so no reload recorded it). Returns how many changes it had not delivered.
    /// Its cursor and dead letters stay, so a file with its name later resumes from there.
    pub async fn retire(&self, tenant: &str, name: &str) -> Result<Retirement, DispatchError> {
        if let Some(r) = self
            .running()
            .get(name)
            .filter(|r| r.config.tenant == tenant)
        {
            return Err(DispatchError::NotRetirable(
                name.to_owned(),
                format!(
                    "is loaded from {}; remove that file and reload to retire it",
                    r.config.file.display()
                ),
            ));
        }
        let held = self.held_cursors(tenant)?;
        let mine: Vec<&Held> = held.iter().filter(|h| h.name == name).collect();
        if mine.is_empty() {
            // Retiring twice is the operator's retry, not a typo: say what is true.
            if self.store.retired(tenant)?.iter().any(|r| r == name) {
                return Ok(Retirement {
                    undelivered: 0,
                    dead_letters: self.store.dead_letter_count(tenant, name)?,
                    was_retired: true,
                });
            }
            return Err(DispatchError::UnknownConnector(name.to_owned()));
        }
        if let Some(file) = mine.iter().find_map(|h| h.file.as_ref()) {
            return Err(DispatchError::NotRetirable(
                name.to_owned(),
                format!(
                    "may be named by {}, which does not load; fix or remove that file and reload",
                    file.display()
                ),
            ));
        }
        let undelivered = self.undelivered(tenant, name);
        self.store.set_retired(tenant, name, true).await?;
        let dead_letters = self.store.dead_letter_count(tenant, name)?;
        tracing::warn!(%tenant, connector = %name, undelivered, dead_letters, "Connector retired by the operator: compaction may now drop the changes it never delivered. Its dead letters stay in the store until discarded (`rosterd dead-letters --tenant {tenant} list {name}`, then `discard {name} --all`). A file with its name resumes it from its cursor.");
        Ok(Retirement {
            undelivered,
            dead_letters,
            was_retired: false,
        })
    }

    /// Let a connector its guard holds go on without sending what it holds: its cursor
    /// moves past every change logged by now, and a reconciliation (the caller starts it)
    /// sends the target the current state of what they changed. Through which change.
    /// Not for a webhook connector: its receivers get events, not state, so the events of
    /// every other change held would be lost.
    pub async fn skip_held(&self, tenant: &str, name: &str) -> Result<Skipped, DispatchError> {
        let found = self.find_loaded(tenant, name, "a resume with --skip-held")?;
        let refuse = |why: &str| Err(DispatchError::Refused(name.to_owned(), why.to_owned()));
        let Some(ctx) = &found.ctx else {
            return refuse("is not running (disabled or failed to start): nothing is held");
        };
        if matches!(ctx.target, Target::Webhook { .. }) {
            return refuse(
                "sends webhook events, not state: skipping would lose the events of every other change held; resume it without skipping",
            );
        }
        let mut applied = found.live.applied.subscribe();
        let Some(n) = found.live.approve(true) else {
            return refuse("is not held by its [guard]: nothing to skip");
        };
        // The reconciliation that follows must find the cursor moved, or it would leave
        // what the skipped changes touched to them.
        let done = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let (seen, through) = *applied.borrow_and_update();
                if seen >= n {
                    return Some(through);
                }
                if applied.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match done {
            Ok(Some(through)) => {
                // A resume too: a pause for the target's failures (the change stuck in
                // flight behind the hold makes one) stayed, and the skip's
                // reconciliation failed on it, leaving the users deactivated before
                // the hold as they were.
                self.lift_pauses(tenant, name, ctx, &found.live).await?;
                Ok(Skipped {
                    through,
                    // The files are written from the roster as it stands: nothing to
                    // repair.
                    reconcile: !matches!(ctx.target, Target::Csv { .. }),
                })
            }
            _ => refuse(
                "did not confirm the skip (it stopped, or was restarted by a reload): see its state, and resume it again if it is still held",
            ),
        }
    }

    /// Lift a pause now (after the operator fixed the target). Returns whether it was
    /// paused: a resume of one that was not only starts its count of failures afresh.
    pub async fn resume(&self, tenant: &str, name: &str) -> Result<bool, DispatchError> {
        let found = self.find_loaded(tenant, name, "a resume")?;
        // Nothing runs to resume: saying "resumed" would promise deliveries that wait
        // for an `enabled = true` (or a fixed file) and a reload.
        let Some(ctx) = &found.ctx else {
            return Err(DispatchError::NotRunning(
                name.to_owned(),
                "it is disabled or failed to start".into(),
            ));
        };
        let held = found.live.approve(false).is_some();
        let was_paused = self.lift_pauses(tenant, name, ctx, &found.live).await?;
        Ok(was_paused || held)
    }

    /// The operator says the target is worth trying now: a pause for its failures or
    /// refusals ends, and its token endpoint is tried again too, whatever wait its last
    /// failure left. Whether it was paused.
    async fn lift_pauses(
        &self,
        tenant: &str,
        name: &str,
        ctx: &Ctx,
        live: &Live,
    ) -> Result<bool, DispatchError> {
        if let Some(credentials) = ctx.credentials() {
            credentials.forget_failure();
        }
        let was_paused = live.resume("the operator");
        if self.store.refusal_pause(tenant, name)?.is_some() {
            self.store.set_refusal_pause(tenant, name, None).await?;
        }
        Ok(was_paused)
    }
}

/// What [`Dispatcher::skip_held`] did.
#[derive(Debug, Clone, Copy)]
pub struct Skipped {
    /// The held changes up to this one were skipped.
    pub through: u64,
    /// Whether a reconciliation is owed for what they changed (not for a CSV connector,
    /// whose files hold the roster as it stands once written).
    pub reconcile: bool,
}

/// What a replay sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplaySent {
    /// The object's state as stored now (state targets).
    CurrentState,
    /// The event as the letter holds it (webhooks).
    OriginalEvent,
}

/// How a replay went, for the API and the CLI.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub replayed: u64,
    pub sent: ReplaySent,
    /// Later changes of the letter's object that the connector has passed: delivered, or
    /// set aside as dead letters themselves (telling them apart would read every letter
    /// of the connector at each replay).
    pub superseded_by: Vec<u64>,
    pub note: Option<String>,
}

/// At most this many later changes are listed in a replay's answer.
const SUPERSEDED_LISTED: usize = 20;

/// For each of `letters`, the changes after its own that touch one of its objects and
/// that the connector has already passed (delivered or dead-lettered themselves), at
/// most [`SUPERSEDED_LISTED`]: one read of the log from the oldest letter on.
fn later_delivered_changes(
    store: &Store,
    tenant: &str,
    cursor_name: &str,
    letters: &[ChangeEvent],
    classes: bool,
) -> Result<Vec<Vec<u64>>, StoreError> {
    let cursor = store.cursor(tenant, cursor_name)?;
    let mut out = vec![Vec::new(); letters.len()];
    let mut letters_of: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, letter) in letters.iter().enumerate() {
        for k in object_keys(letter, &[], classes) {
            letters_of.entry(k).or_default().push(i);
        }
    }
    let Some(mut since) = letters.iter().map(|l| l.seq).min() else {
        return Ok(out);
    };
    let mut unlisted = letters.len();
    let mut page_size = BATCH as usize;
    while since < cursor && unlisted > 0 {
        let page = match store.changes(tenant, since, page_size) {
            Ok(page) => page,
            // The list is for the answers' notes only: a change that cannot be read must
            // not keep the letters from being replayed. The page is read again a change
            // at a time, so the list goes up to it.
            Err(e) if e.outage_message().is_none() && page_size > 1 => {
                page_size = 1;
                continue;
            }
            Err(e) if e.outage_message().is_none() => {
                tracing::warn!(error = %e, after_seq = since, "Cannot read the change log past this change; a replay lists the later changes of its object read before it only.");
                break;
            }
            Err(e) => return Err(e),
        };
        let Some(last) = page.last() else { break };
        since = last.seq;
        for e in page.iter().filter(|e| e.seq <= cursor) {
            for k in object_keys(e, &[], classes) {
                for &i in letters_of.get(&k).into_iter().flatten() {
                    let listed = &mut out[i];
                    // A change touching two of a letter's objects is listed once.
                    if e.seq > letters[i].seq
                        && listed.len() < SUPERSEDED_LISTED
                        && listed.last() != Some(&e.seq)
                    {
                        listed.push(e.seq);
                        if listed.len() == SUPERSEDED_LISTED {
                            unlisted -= 1;
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The letter's change rewritten to the objects' state as stored now: the current
/// document (none if deleted since), and for a group each listed member as added or
/// removed by whether it is a member now. Planned like any change, it sends what the
/// target should hold today.
pub(super) fn current_state(
    store: &Store,
    tenant: &str,
    ev: &ChangeEvent,
) -> Result<ChangeEvent, StoreError> {
    let kind = if ev.resource_type == "Group" {
        ResourceKind::Group
    } else {
        ResourceKind::User
    };
    let doc = store.get(tenant, kind, &ev.id)?.map(|r| r.doc);
    let active = doc
        .as_ref()
        .map(|d| crate::connectors::oneroster::UserFields { doc: d }.active());
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for m in ev.members_added.iter().chain(&ev.members_removed) {
        if doc.is_some() && store.is_member(tenant, &ev.id, m)? {
            added.push(m.clone());
        } else {
            removed.push(m.clone());
        }
    }
    Ok(ChangeEvent {
        seq: ev.seq,
        at: Utc::now(),
        resource_type: ev.resource_type.clone(),
        id: ev.id.clone(),
        op: if doc.is_some() {
            crate::store::ChangeOp::Updated
        } else {
            crate::store::ChangeOp::Deleted
        },
        snapshot: doc,
        members_added: added,
        members_removed: removed,
        // The stored assignment is read when planning.
        assignment: None,
        // A deactivation or reactivation replayed is one still, while the user stays as
        // it left it: its enrollments leave or come back with it.
        deactivated: ev.deactivated && active == Some(false),
        reactivated: ev.reactivated && active == Some(true),
        deleting_user: false,
        // Its groups as they are now, as everything else here.
        groups: None,
    })
}

/// [`current_state`] of `ev`, with the users whose OneRoster bodies it sends again
/// ([`reports_of`], when `fans_out`): what a replay or a skipped change sends as its
/// objects stand now.
pub(super) async fn current_with_reports(
    store: &Store,
    tenant: &str,
    ev: ChangeEvent,
    fans_out: bool,
) -> Result<(ChangeEvent, Vec<String>), StoreError> {
    let (store, tenant) = (store.clone(), tenant.to_owned());
    blocking(move || {
        let current = current_state(&store, &tenant, &ev)?;
        let reports = if fans_out {
            reports_of(&store, &tenant, &current)?
        } else {
            vec![]
        };
        Ok((current, reports))
    })
    .await
}

/// What [`Dispatcher::retire`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retirement {
    /// The changes it never delivered, which compaction may now drop.
    pub undelivered: u64,
    /// Its dead letters, which stay in the store until discarded.
    pub dead_letters: u64,
    /// It was retired already; nothing changed.
    pub was_retired: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One read of the log serves a batch of letters: each gets the later changes of its
    /// own object that the connector passed, at most [`SUPERSEDED_LISTED`].
    #[tokio::test]
    async fn each_letter_of_a_batch_gets_its_own_objects_later_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let user = |name: &str| serde_json::json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": name});
        let mut ids = Vec::new();
        for name in ["ada", "bob", "cy"] {
            let id = store
                .create("t", ResourceKind::User, user(name), vec![])
                .await
                .unwrap()
                .id;
            ids.push(id);
        }
        let retitle = |id: String, n: usize| {
            let store = store.clone();
            async move {
                store
                    .update("t", ResourceKind::User, &id, None, move |doc| {
                        let mut doc = doc.clone();
                        doc["title"] = serde_json::json!(format!("T{n}"));
                        Ok(crate::store::Update {
                            doc,
                            members: vec![],
                        })
                    })
                    .await
                    .unwrap();
            }
        };
        for n in 0..25 {
            retitle(ids[0].clone(), n).await;
        }
        retitle(ids[1].clone(), 0).await;
        let log = store.changes("t", 0, 100).unwrap();
        let head = log.last().unwrap().seq;
        // The connector passed all but the last change, bob's.
        store
            .advance_cursor("t", "c", head - 1, vec![])
            .await
            .unwrap();
        let of =
            |id: &str| -> Vec<ChangeEvent> { log.iter().filter(|e| e.id == id).cloned().collect() };
        let (ada, bob, cy) = (of(&ids[0]), of(&ids[1]), of(&ids[2]));
        let seqs = |evs: &[ChangeEvent]| -> Vec<u64> { evs.iter().map(|e| e.seq).collect() };
        let letters = [
            ada[0].clone(),
            bob[0].clone(),
            ada[10].clone(),
            cy[0].clone(),
        ];
        let listed = later_delivered_changes(&store, "t", "c", &letters, false).unwrap();
        assert_eq!(
            listed,
            [seqs(&ada[1..21]), vec![], seqs(&ada[11..]), vec![]],
            "{listed:?}"
        );
        assert!(
            later_delivered_changes(&store, "t", "c", &[], false)
                .unwrap()
                .is_empty()
        );
        // A change that cannot be read ends the list there; the letters still replay.
        store.damage_change("t", ada[5].seq);
        let listed = later_delivered_changes(&store, "t", "c", &letters, false).unwrap();
        assert_eq!(listed[0], seqs(&ada[1..5]), "{listed:?}");
    }
}
