//! Sending a change's requests: retries, pauses, dead letters.

use chrono::Utc;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{AcquireError, SemaphorePermit, watch};
use tracing::Instrument;

use super::commands::current_with_reports;
use super::ctx::{Ctx, Sender, Target};
use super::follow::Hashes;
use super::keys::object_keys;
use super::live::{Deadline, Streak};
use super::status::unquoted;
use super::{PlanError, REPAIR_ATTEMPTS};
use crate::connectors::Plan;
use crate::connectors::http::{self, Outcome, Request};
use crate::connectors::oneroster::{self, Credentials, OneRosterSettings};
use crate::connectors::webhook;
use crate::ops::metrics as counters;
use crate::scim::ResourceKind;
use crate::store::{ChangeEvent, DeadLetter, StoreError, TargetResponse};

/// A read-back page is tried this many times.
const READ_ATTEMPTS: u32 = 3;
/// The longest a read waits before its next attempt: a target asking for more (a
/// `Retry-After` of an hour) ends the read, which the job reports, rather than holding
/// the tenant's job slot while nothing happens.
const READ_RETRY_MAX_WAIT: Duration = Duration::from_secs(60);

/// A reconciliation's repairs that may use all their attempts in a row, nothing delivered
/// between, before the target is asked whether it takes writes (see
/// [`Ctx::repair_gave_up`]); at least the connector's `concurrency`, since that many fail
/// together when the target goes down.
const REPAIRS_GIVEN_UP_PAUSE: u64 = 3;

/// How one request ended.
pub(super) enum Sent {
    Ok,
    Refused {
        reason: String,
        response: Option<TargetResponse>,
    },
    Cancelled,
    /// A reconciliation's repair not tried again: a change sends its object now.
    Superseded,
}

/// How one change ended.
pub(super) enum Delivered {
    /// Acknowledged; these delivered-content hashes now hold.
    Done(Hashes),
    /// Set aside as a dead letter.
    DeadLettered,
    Cancelled,
}

impl Ctx {
    /// The OAuth or static credentials of a OneRoster target; None for other kinds.
    pub(super) fn credentials(&self) -> Option<&Credentials> {
        match &self.target {
            Target::OneRoster { credentials, .. } => Some(credentials),
            _ => None,
        }
    }

    /// Authorization headers of one attempt.
    async fn headers(&self, req: &Request) -> Result<Vec<(&'static str, String)>, String> {
        match &self.target {
            Target::OneRoster { credentials, .. } => credentials
                .bearer(&self.client, Duration::from_millis(self.config.timeout_ms))
                .await
                .map(|b| vec![("authorization", b)])
                .map_err(|e| format!("cannot get an access token: {e}")),
            Target::Webhook { signer, .. } => Ok(match (&req.message_id, &req.body) {
                (Some(id), Some(body)) => signer.headers(id, body),
                _ => vec![],
            }),
            Target::Csv { .. } => Ok(vec![]),
        }
    }

    /// Send one request of a change until the target acknowledges or refuses it.
    /// `max_attempts` bounds retries; `None` retries until cancelled. `started` is the
    /// change's: set once one of its requests has a slot (see [`Ctx::send_as`]).
    async fn send(&self, req: &Request, max_attempts: Option<u32>, started: &AtomicBool) -> Sent {
        self.send_as(req, max_attempts, Sender::Mirror(started), None)
            .await
    }

    /// A reconciliation's repair: as the mirror sends, but refused at once while the
    /// connector is paused (see [`Sender::Reconcile`]), and tried again only while
    /// `wanted` says so: its body dates from when the run read the object, and a change
    /// the mirror sent while it waited to retry would be put back.
    pub(super) async fn send_repair(
        &self,
        req: &Request,
        max_attempts: u32,
        wanted: &mut (dyn FnMut() -> bool + Send),
    ) -> Sent {
        self.send_as(req, Some(max_attempts), Sender::Reconcile, Some(wanted))
            .await
    }

    /// `f`'s output, or None once a stop comes; with `drains` (a request of a change
    /// already started, which a stop lets finish) always the output.
    async fn unless_stopped<T>(
        &self,
        drains: bool,
        f: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        if drains {
            return Some(f.await);
        }
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => None,
            v = f => Some(v),
        }
    }

    /// A slot for a mirror request. A change already started (`started`) goes ahead of
    /// those not started: queued in turn, the second event of every change in the
    /// window (1,000 changes) waited behind the first events of all the others, so
    /// hundreds of changes were half sent at any moment, and a stop that came then left
    /// them half sent, to be sent again whole after it (a SIGTERM whose HTTP drain ran
    /// its 5 s re-sent 100–500 events).
    async fn slot(&self, started: bool) -> Result<SemaphorePermit<'_>, AcquireError> {
        if started {
            return self.slots.acquire().await;
        }
        let _gate = self.start_gate.lock().await;
        self.slots.acquire().await
    }

    /// A reconciliation's repair used all its attempts: once enough have in a row with
    /// nothing delivered (`concurrency`, at least [`REPAIRS_GIVEN_UP_PAUSE`], and at
    /// least `pause_after_failures` attempts), the connector pauses unless the target
    /// still takes a write. Objects the target fails on their data alone (a bug of its
    /// own) are all an ordinary run after a failed one sends, and they fail together:
    /// without the question they paused the connector at every run.
    async fn repair_gave_up(&self, delivered_before: u64, reason: &str) {
        let limit = REPAIRS_GIVEN_UP_PAUSE
            .max(self.config.concurrency as u64)
            .max(
                self.config
                    .retry
                    .pause_after_failures
                    .div_ceil(u64::from(REPAIR_ATTEMPTS)),
            );
        // Already paused or held (the mirror's failures, another repair's question):
        // the run stops at it, and the target need not be asked.
        if !self.live.repair_gave_up(delivered_before, limit) || self.live.pause_reason().is_some()
        {
            return;
        }
        if self.takes_writes().await {
            tracing::info!(
                repairs = limit,
                "A reconciliation's repairs failed in a row while the target took a write: those objects' own failures; not pausing."
            );
            self.live.count_repairs_afresh();
        } else if self.cancel.is_cancelled()
            || self.live.delivered.load(Ordering::Acquire) != delivered_before
        {
            // A stop cut the question short, or a delivery came while it was asked: no
            // answer that the target is down, and a pause set after a delivery would
            // stand until it ran out.
            self.live.count_repairs_afresh();
        } else {
            self.live
                .pause_for_repairs(limit, self.config.retry.pause(), reason);
        }
    }

    /// Whether the target takes a write now: one attempt of the course's PUT, which every
    /// start sends too and which changes nothing there but its date. A 401 is asked once
    /// more with a fresh token, as a mirror's request is: repairs failing with a 503 never
    /// drop the token, so one that expired or was revoked meanwhile answered the question
    /// for a target that takes writes, and paused the connector.
    async fn takes_writes(&self) -> bool {
        let Target::OneRoster { settings, .. } = &self.target else {
            return false;
        };
        let req = oneroster::course_put(settings, Utc::now());
        let mut refreshed = false;
        // What it answered, for the log: the pause's line names only the repairs' error.
        let said = loop {
            let headers = match self.headers(&req).await {
                Err(e) => break e,
                Ok(headers) => headers,
            };
            let used_auth = authorization(&headers);
            let timeout = Duration::from_millis(self.config.timeout_ms);
            let sending = http::send(&self.client, &req, headers, timeout);
            break match self.unless_stopped(false, sending).await {
                Some(Outcome::Delivered { body, .. }) if !oneroster::looks_like_a_page(&body) => {
                    return true;
                }
                Some(Outcome::Delivered { status, .. }) => {
                    format!("answered {status} with a page")
                }
                Some(Outcome::Retry { reason, .. } | Outcome::Refused { reason, .. }) => reason,
                Some(Outcome::Unauthorized { .. }) => {
                    if let Some(credentials) = self.credentials() {
                        credentials.invalidate(used_auth.as_deref()).await;
                        if !std::mem::replace(&mut refreshed, true) {
                            continue;
                        }
                    }
                    "answered 401".to_owned()
                }
                Some(Outcome::Gone { .. }) => "answered 410".to_owned(),
                None => "rosterd is stopping".to_owned(),
            };
        };
        tracing::warn!(
            answer = said.as_str(),
            "The target took no PUT of the course after a reconciliation's repairs failed in a row."
        );
        false
    }

    /// A preflight check (see [`Sender::Preflight`]).
    pub(super) async fn send_preflight(&self, req: &Request) -> Sent {
        self.send_as(req, None, Sender::Preflight, None).await
    }

    /// A request the target took: counted, and the failure streak ended where it counts.
    fn delivered(&self, counts: bool, name: &str) -> Sent {
        if counts {
            self.live.success();
        } else {
            self.live.count_delivery();
        }
        counters::delivered(self.tenant(), name);
        Sent::Ok
    }

    pub(super) async fn send_as(
        &self,
        req: &Request,
        max_attempts: Option<u32>,
        by: Sender<'_>,
        mut wanted: Option<&mut (dyn FnMut() -> bool + Send)>,
    ) -> Sent {
        let mirror = matches!(by, Sender::Mirror(_) | Sender::Preflight);
        // A change already started when a stop comes is let finish (the log follower
        // bounds that by STOP_DRAIN), so that what its target took is not sent again:
        // only waiting out a pause or a backoff gives up then. Started means one of its
        // requests got a slot: the changes queued behind `concurrency` have not, and
        // start no more once a stop comes (a reload's 3 s sent hundreds of them, each
        // sent again after it, since the cursor records only what finished before).
        let started = match by {
            Sender::Mirror(started) => Some(started),
            _ => None,
        };
        let drains = || started.is_some_and(|s| s.load(Ordering::Relaxed));
        let counts = !matches!(by, Sender::Operator);
        let name = self.name();
        if self.config.dry_run {
            // The object's path is what a dry run is for (a webhook's has none, and may
            // hold its secret); credentials in the URL are not.
            let url = match self.target {
                Target::Webhook { .. } => http::shown_url(&req.url),
                _ => http::recorded_url(&req.url),
            };
            tracing::info!(method = %req.method, %url,
                body = %req.body.as_deref().map(String::from_utf8_lossy).unwrap_or_default(),
                "Dry run: would send.");
            return Sent::Ok;
        }
        let mut backoff = self.backoff();
        let mut refreshed = false;
        let mut attempts = 0u32;
        // The target's own `Retry-After`, when a pause was waited out in its place.
        let mut not_before: Option<tokio::time::Instant> = None;
        let delivered_before = self.live.delivered.load(Ordering::Acquire);
        let mut streak = Streak::default();
        let timeout = Duration::from_millis(self.config.timeout_ms);
        // A request keeps its slot while it waits to retry, so `concurrency` bounds the
        // requests retrying against a failing target, not only those on the wire: a
        // batch of thousands would otherwise retry side by side, each on its own
        // backoff, and the target would see no backoff at all. Only the mirror takes
        // slots: an operator's replay sends one request at a time and a reconciliation
        // up to `concurrency` of its own, and neither must queue behind mirror requests
        // waiting out a backoff (a reconciliation holds the tenant's job slot meanwhile).
        let mut slot = None;
        loop {
            if attempts > 0
                && let Some(wanted) = wanted.as_deref_mut()
                && !wanted()
            {
                return Sent::Superseded;
            }
            if mirror && self.live.paused_until().is_some() {
                // Nothing is sent while paused; the slot goes to no one meanwhile.
                slot = None;
            }
            if mirror {
                let go_on = if drains() && self.cancel.is_cancelled() {
                    self.live.paused_until().is_none()
                } else {
                    self.live.wait_unpaused(&self.cancel).await
                };
                if !go_on {
                    return Sent::Cancelled;
                }
            }
            if let Some(t) = not_before.take()
                && t > tokio::time::Instant::now()
            {
                // The pause is over before the wait the target asked for: a pause of
                // 60 s sent a target answering `429 Retry-After: 600` a round of
                // requests every minute. An operator's resume still means now.
                let changed = self.live.pause_changed.notified();
                if counts {
                    self.live.health().next_retry = Some(Deadline::after(
                        t.saturating_duration_since(tokio::time::Instant::now()),
                    ));
                }
                tokio::select! {
                    () = tokio::time::sleep_until(t) => {}
                    () = changed => {
                        if self.live.paused_until().is_some() {
                            not_before = Some(t);
                        }
                    }
                    () = self.cancel.cancelled() => return Sent::Cancelled,
                }
                continue;
            }
            if matches!(by, Sender::Reconcile)
                && let Some(reason) = self.live.pause_reason()
            {
                return Sent::Refused {
                    reason,
                    response: None,
                };
            }
            if mirror && slot.is_none() {
                // Draining, the others' answers free the slots.
                match self.unless_stopped(drains(), self.slot(drains())).await {
                    Some(Ok(s)) => {
                        slot = Some(s);
                        started.inspect(|s| s.store(true, Ordering::Relaxed));
                    }
                    _ => return Sent::Cancelled,
                }
                // A pause may have begun while this request queued for its slot: every
                // request queued then would otherwise reach the target the pause spares.
                if self.live.paused_until().is_some() {
                    continue;
                }
            }
            attempts += 1;
            // Listening from before the request goes out, so a pause or a resume while
            // it is in flight cuts the wait after it short.
            let changed = self.live.pause_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let mut used_auth = None;
            // Outside a started change, a stop also cuts the wait for an access token (a
            // token endpoint may take its whole timeout to answer).
            let Some(headers) = self.unless_stopped(drains(), self.headers(req)).await else {
                return Sent::Cancelled;
            };
            let outcome = match headers {
                Ok(headers) => {
                    used_auth = authorization(&headers);
                    let sending = http::send(&self.client, req, headers, timeout);
                    match self.unless_stopped(drains(), sending).await {
                        Some(o) => o,
                        None => return Sent::Cancelled,
                    }
                }
                Err(reason) => Outcome::Retry {
                    reason,
                    // A token endpoint's `Retry-After` is kept, as a target's is.
                    retry_after: self.credentials().and_then(Credentials::token_wait),
                    response: None,
                },
            };
            let outcome = match (outcome, &self.target) {
                // A 200 is not enough: a proxy's login page, another org and an org
                // marked for deletion answer it too, and every PUT after would count the
                // proxy's page as delivered.
                (Outcome::Delivered { status, body, .. }, Target::OneRoster { settings, .. })
                    if matches!(by, Sender::Preflight) && req.method == reqwest::Method::GET =>
                {
                    // Refused, as a 404 is: the operator fixes the target, then resumes.
                    return match oneroster::check_org_answer(settings, &body) {
                        Ok(()) => self.delivered(counts, name),
                        Err((reason, quoted)) => Sent::Refused {
                            reason,
                            response: quoted.map(|body| TargetResponse { status, body }),
                        },
                    };
                }
                // A write's 2xx must not be a page: a proxy's login page answering 200 to
                // a PUT was counted as delivered, and the change was lost unless a
                // read-back found it (5 of 100 in an audit).
                (Outcome::Delivered { status, body, .. }, Target::OneRoster { .. })
                    if req.method != reqwest::Method::GET
                        && (200..300).contains(&status)
                        && oneroster::looks_like_a_page(&body) =>
                {
                    Outcome::Retry {
                        reason: format!(
                            "target answered {status} to a {} with a page, not OneRoster's answer (a proxy's login page?); the change is sent again",
                            req.method
                        ),
                        retry_after: None,
                        response: None,
                    }
                }
                (outcome, _) => outcome,
            };
            let (reason, retry_after, response) = match outcome {
                Outcome::Delivered { .. } => return self.delivered(counts, name),
                Outcome::Refused { reason, response } => {
                    if matches!(by, Sender::Mirror(_)) {
                        self.live.refused(
                            self.config.retry.pause_after_refusals,
                            &reason,
                            &response.body,
                        );
                    }
                    return Sent::Refused {
                        reason,
                        response: Some(response),
                    };
                }
                Outcome::Unauthorized { response } => {
                    if let Some(credentials) = self.credentials() {
                        // An expired or revoked token is dropped at every 401, so the
                        // next attempt fetches another: kept after the second, a token
                        // the target would never take again was sent at each retry until
                        // it expired (an hour by default), and a connector starting its
                        // preflight then delivered nothing for that long.
                        credentials.invalidate(used_auth.as_deref()).await;
                        // The first time, try again at once; after that, with the backoff,
                        // so a target refusing every token does not see one fetch and
                        // request after another.
                        if !refreshed {
                            refreshed = true;
                            continue;
                        }
                    }
                    (
                        "target refuses our credentials (401)".to_owned(),
                        None,
                        Some(response),
                    )
                }
                Outcome::Gone { response } if !mirror => (
                    "target answered 410 Gone: the endpoint is disabled".to_owned(),
                    None,
                    Some(response),
                ),
                Outcome::Gone { response } => {
                    self.live.pause_until_resumed(
                        &http::with_answer(
                            "target answered 410 Gone: the endpoint is disabled; fix it, then reload or resume".to_owned(),
                            &response.body,
                        ),
                        http::brief_answer(&response.body),
                    );
                    continue;
                }
                Outcome::Retry {
                    reason,
                    retry_after,
                    response,
                } => (reason, retry_after, response),
            };
            if counts {
                counters::retried(self.tenant(), name);
                self.live.failure(
                    &mut streak,
                    &reason,
                    response.as_ref().and_then(|r| http::brief_answer(&r.body)),
                    self.config.retry.pause_after_failures,
                    self.config.retry.pause(),
                );
            }
            if max_attempts.is_some_and(|m| attempts >= m) {
                if matches!(by, Sender::Reconcile) {
                    self.repair_gave_up(delivered_before, &reason).await;
                }
                return Sent::Refused { reason, response };
            }
            if !matches!(by, Sender::Operator) && self.live.paused_until().is_some() {
                // The pause is the wait: its end, or a resume, is the next attempt, and
                // not before the target's `Retry-After`.
                not_before = retry_after.map(|d| tokio::time::Instant::now() + d);
                continue;
            }
            // While only this request has failed, its slot goes back as it waits, so
            // another can try: if that one gets through, the failure was this object's
            // own, and an object that keeps failing never holds a slot the others
            // need, even at `concurrency = 1`. Once a second request fails with
            // nothing acknowledged in between, the target is failing: each failed
            // request keeps its slot from then on.
            if self.live.failing_requests.load(Ordering::Acquire) < 2 {
                slot = None;
            }
            let delay = backoff
                .next()
                .unwrap_or(self.config.retry.max_delay())
                .max(retry_after.unwrap_or_default());
            tracing::debug!(url = %http::shown_url(&req.url), reason = reason.as_str(), delay_ms = delay.as_millis() as u64, "Delivery failed; retrying.");
            if counts {
                // The soonest attempt still ahead: what an operator waits for.
                let at = Deadline::after(delay);
                let mut h = self.live.health();
                h.next_retry = Some(match h.next_retry {
                    Some(t) if t.wall().is_some() => t.min(at),
                    _ => at,
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut changed => {
                    // Resumed: the operator says the target is worth trying now, from
                    // the start of the backoff. (A pause that began is waited out at
                    // the top.)
                    if self.live.paused_until().is_none() {
                        backoff = self.backoff();
                    }
                }
                _ = self.cancel.cancelled() => return Sent::Cancelled,
            }
        }
    }

    /// A read (reconciliation's read-back): a few attempts; the answer's headers and body,
    /// or why there is none.
    pub(super) async fn send_for_body(
        &self,
        req: &Request,
    ) -> Result<(reqwest::header::HeaderMap, bytes::Bytes), String> {
        // A stop ends the read at once: its wait for a `Retry-After` could last an hour,
        // and a resync's reads run in the connector's task, which the stop waits for.
        self.unless_stopped(false, self.read_body(req))
            .await
            .unwrap_or_else(|| Err("rosterd is stopping".to_owned()))
    }

    async fn read_body(
        &self,
        req: &Request,
    ) -> Result<(reqwest::header::HeaderMap, bytes::Bytes), String> {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let mut last = String::new();
        for attempt in 1..=READ_ATTEMPTS {
            let headers = self.headers(req).await?;
            let used_auth = authorization(&headers);
            match http::send(&self.client, req, headers, timeout).await {
                Outcome::Delivered { headers, body, .. } => return Ok((headers, body)),
                Outcome::Unauthorized { .. } => {
                    last = "target refuses our credentials (401)".into();
                    if let Some(credentials) = self.credentials() {
                        credentials.invalidate(used_auth.as_deref()).await;
                    }
                }
                Outcome::Retry {
                    reason,
                    retry_after,
                    response,
                } => {
                    let reason = self.unquoted_read(reason, response.as_ref());
                    // The job slot is held meanwhile (overrides answer 409), and nothing
                    // said why: a `Retry-After` of an hour kept a job waiting three
                    // hours, the last after its final attempt, without a log line.
                    let wait = match retry_after {
                        Some(asked) if asked > READ_RETRY_MAX_WAIT => {
                            return Err(format!(
                                "{reason}, and asks to wait {} s before the next attempt; a read waits at most {} s",
                                asked.as_secs(),
                                READ_RETRY_MAX_WAIT.as_secs()
                            ));
                        }
                        Some(asked) => asked,
                        // The connector's own first delay, which may be set far longer
                        // for deliveries than a read should wait.
                        None => self.config.retry.initial_delay().min(READ_RETRY_MAX_WAIT),
                    };
                    last = reason;
                    if attempt < READ_ATTEMPTS {
                        tokio::time::sleep(wait).await;
                    }
                }
                Outcome::Gone { response } | Outcome::Refused { response, .. } => {
                    let reason = http::with_answer(
                        format!("target answered {}", response.status),
                        &response.body,
                    );
                    return Err(self.unquoted_read(reason, Some(&response)));
                }
            }
        }
        Err(last)
    }

    /// A read's failure as the job reports it, which `/status` shows: without the
    /// target's words, which the log gets instead.
    fn unquoted_read(&self, reason: String, response: Option<&TargetResponse>) -> String {
        let answer = response.and_then(|r| http::brief_answer(&r.body));
        let Some(answer) = answer.filter(|a| reason.contains(a.as_str())) else {
            return reason;
        };
        tracing::warn!(reason = reason.as_str(), "A read of the target failed.");
        unquoted(&reason, Some(&answer), "in rosterd's log")
    }

    async fn send_one<'r>(
        &self,
        req: &'r Request,
        max_attempts: Option<u32>,
        started: &AtomicBool,
    ) -> (&'r Request, Sent) {
        (req, self.send(req, max_attempts, started).await)
    }

    /// The document a change leaves: its snapshot, or for an assignment-only change (which
    /// carries none) the user as stored, while it is still the document the change saw
    /// (its version, the seq of its last write, is not above the change's). A user
    /// written or deleted since has left that document behind: `None` then. The stored
    /// one would be a later state, sent ahead of the earlier changes still to come
    /// after this one (or, deleted, a DELETE ahead of them, which they then undid).
    fn document<'e>(
        &self,
        ev: &'e ChangeEvent,
    ) -> Result<Option<std::borrow::Cow<'e, serde_json::Value>>, StoreError> {
        Ok(match &ev.snapshot {
            Some(s) => Some(std::borrow::Cow::Borrowed(s)),
            None if ev.op == crate::store::ChangeOp::Archetype => self
                .user_as_of(&ev.id, ev.seq)?
                .map(|r| std::borrow::Cow::Owned(r.doc)),
            None => None,
        })
    }

    /// User `id` as stored, if no write after change `seq` has changed it (its version,
    /// the seq of its last write, is not above `seq`): then it is the user as that change
    /// saw it. A user written or deleted since is `None`; its later change carries it.
    fn user_as_of(&self, id: &str, seq: u64) -> Result<Option<crate::store::Resource>, StoreError> {
        Ok(self
            .store
            .get(self.tenant(), ResourceKind::User, id)?
            .filter(|r| r.version <= seq))
    }

    /// For user `id` as `doc` now stands, which the target has never acknowledged, the
    /// groups whose class the target holds without the user's enrollment: while the user
    /// could not be sent, its groups' changes left that enrollment out
    /// ([`oneroster::held_downstream`]). Read for such a user only: others cost nothing.
    fn enrollments_owed(
        &self,
        settings: &oneroster::OneRosterSettings,
        id: &str,
        doc: &serde_json::Value,
    ) -> Result<Vec<String>, StoreError> {
        let (tenant, owner) = (self.tenant(), self.cursor_name());
        let acked = |key: String| -> Result<bool, StoreError> {
            let unsaved = self
                .unsaved
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .copied();
            Ok(match unsaved {
                Some(hash) => hash.is_some(),
                None => self.store.delivered(tenant, &owner, &key)?.is_some(),
            })
        };
        if settings.deletes(doc) || !oneroster::can_send(doc) || acked(oneroster::user_key(id))? {
            return Ok(Vec::new());
        }
        let mut owed = Vec::new();
        for g in self.store.groups_of(tenant, id)? {
            if acked(oneroster::group_key(&g))? && !acked(oneroster::member_key(&g, id))? {
                owed.push(g);
            }
        }
        Ok(owed)
    }

    /// `reports`: the users [`reports_of`] found for the change, which a OneRoster target
    /// is sent again.
    ///
    /// [`reports_of`]: super::keys::reports_of
    pub(super) fn plan(&self, ev: &ChangeEvent, reports: &[String]) -> Result<Plan, PlanError> {
        let tenant = self.tenant();
        match &self.target {
            Target::OneRoster { settings, .. } => {
                let doc = self.document(ev)?;
                if doc.is_none() && ev.op == crate::store::ChangeOp::Archetype {
                    // The user was written or deleted after this assignment: that later
                    // change, delivered after this one, sends the user with the
                    // assignment as stored then, or its DELETE (enrollments first).
                    return Ok(Plan::default());
                }
                let doc = doc.as_deref();
                let manager = match doc {
                    Some(d) if ev.resource_type == "User" => {
                        oneroster::existing_manager(&self.store, tenant, d)?
                    }
                    _ => None,
                };
                // The assignment as stored, not the change's own: a target is sent states,
                // and one of a later assignment may already have gone out with an earlier
                // change of the user, which the change's own would then undo until the
                // later one's change came.
                let assignment = match doc {
                    Some(_) if ev.resource_type == "User" => {
                        self.store.assignment(tenant, &ev.id)?
                    }
                    _ => None,
                };
                let mut added = Vec::with_capacity(ev.members_added.len());
                for m in &ev.members_added {
                    // Enrollments are for users; nested groups have none, and a user
                    // absent downstream while inactive can have none either.
                    if oneroster::held_downstream(&self.store, settings, tenant, m, ev.seq)?
                        == Some(true)
                    {
                        added.push(m.as_str());
                    }
                }
                // A user that leaves the target on deactivation takes its enrollments
                // with it, and brings them back on reactivation, each class put first
                // as it stands now: the group may be newer than anything the target
                // has been sent yet. Only at the change of state: every later change
                // of an inactive user would otherwise send a DELETE per group.
                // The groups as the change left them (see `ChangeEvent::groups`), those
                // read now for changes logged without them.
                let mut groups = Vec::new();
                if ev.resource_type == "User"
                    && settings.deactivate == oneroster::Deactivate::Delete
                    && (ev.deactivated || ev.reactivated)
                {
                    let ids = match &ev.groups {
                        Some(ids) => ids.clone(),
                        None => self.store.groups_of(tenant, &ev.id)?,
                    };
                    for g in ids {
                        match self.store.get(tenant, ResourceKind::Group, &g)? {
                            Some(r) => groups.push((g, r.doc)),
                            // A deactivation needs only the id to DELETE the enrollment of a
                            // group deleted since; a reactivation leaves it to that deletion.
                            None if ev.deactivated => groups.push((g, serde_json::Value::Null)),
                            None => {}
                        }
                    }
                }
                // A user's creation owes nothing: no group change before it named the user,
                // and those after it enroll the user themselves if it can be sent then (a
                // million creations need not each look up their groups).
                let owed = match doc {
                    Some(d)
                        if ev.resource_type == "User"
                            && ev.op != crate::store::ChangeOp::Created =>
                    {
                        self.enrollments_owed(settings, &ev.id, d)?
                    }
                    _ => Vec::new(),
                };
                let cur = oneroster::Current {
                    doc,
                    assignment: assignment.as_ref(),
                    manager,
                    user_members_added: added,
                    user_members_removed: ev.members_removed.iter().map(String::as_str).collect(),
                    reports: self.report_writes(settings, ev.seq, reports)?,
                    groups: groups.iter().map(|(g, doc)| (g.as_str(), doc)).collect(),
                    enrollments_owed: owed.iter().map(String::as_str).collect(),
                };
                oneroster::plan(settings, tenant, ev, cur).map_err(|e| PlanError::Unplannable(e.0))
            }
            Target::Webhook { settings, .. } => {
                let snapshot = self.document(ev)?;
                Ok(webhook::plan(
                    settings,
                    (self.store.id(), tenant),
                    ev,
                    snapshot.as_deref(),
                ))
            }
            Target::Csv { .. } => Ok(Plan::default()),
        }
    }

    /// The PUTs that bring these users' bodies up to date after change `seq`. One that is
    /// gone, written since `seq`, inactive and deleted downstream, or cannot be expressed
    /// has its own changes for that, delivered after this one (a body from a later write
    /// would be undone by the older snapshots of the changes between); sending it here
    /// would only fail the change that merely touched it.
    fn report_writes(
        &self,
        settings: &OneRosterSettings,
        seq: u64,
        reports: &[String],
    ) -> Result<Vec<oneroster::Write>, StoreError> {
        let tenant = self.tenant();
        let mut out = Vec::with_capacity(reports.len());
        for id in reports {
            let Some(r) = self.user_as_of(id, seq)? else {
                continue;
            };
            if let Ok(w) =
                oneroster::stored_user_write(&self.store, settings, tenant, id, &r.doc, Utc::now())?
                && w.body.is_some()
            {
                out.push(w);
            }
        }
        Ok(out)
    }

    async fn dead_letter(
        &self,
        ev: &ChangeEvent,
        reason: String,
        request: Option<&Request>,
        response: Option<TargetResponse>,
    ) -> Result<(), StoreError> {
        let object = format!("{}/{}", ev.resource_type, ev.id);
        // The log line and `last_error` show what the target said, not only the status:
        // a 403 reads as one object's ("not ours to change") where the answer may say
        // the token lacks a permission for every one.
        let shown = match &response {
            Some(r) => http::with_answer(reason.clone(), &r.body),
            None => reason.clone(),
        };
        let response_brief = response.as_ref().and_then(|r| http::brief_answer(&r.body));
        self.store
            .add_dead_letter(
                self.tenant(),
                DeadLetter {
                    id: 0,
                    connector: self.name().to_owned(),
                    at: Utc::now(),
                    reason: reason.clone(),
                    request: request.map(Request::record),
                    response,
                    event: ev.clone(),
                },
            )
            .await?;
        // Said once it is stored, so that the log never names a letter the list lacks.
        tracing::warn!(seq = ev.seq, %object, reason = shown.as_str(),
            "Change set aside as a dead letter; `rosterd dead-letters --tenant {} list {}` shows it.",
            self.tenant(), self.name());
        counters::dead_lettered(self.tenant(), self.name());
        // What shows as the connector's last error is this refusal, not an older blip.
        self.live.health().error_quoting(
            format!(
                "change #{} ({object}) set aside as a dead letter: {shown}",
                ev.seq
            ),
            response_brief,
        );
        Ok(())
    }

    /// Deliver one change: its stages in order, the requests of a stage concurrently.
    async fn deliver(
        &self,
        ev: &ChangeEvent,
        reports: &[String],
        max_attempts: Option<u32>,
    ) -> Result<Delivered, StoreError> {
        // A bug on one change's content must not stall the connector on it: its task
        // would restart at that change again and again. It is set aside like a change
        // the target cannot take, to be replayed once rosterd is fixed.
        let planned = crate::ops::panics::catch_sync(|| self.plan(ev, reports)).unwrap_or_else(|panic| {
            Err(PlanError::Unplannable(format!(
                "rosterd could not turn this change into requests: a bug (it panicked: {panic}); replay it once rosterd is fixed"
            )))
        });
        let plan = match planned {
            Ok(p) => p,
            Err(e) => {
                let reason = match e {
                    // A store that has failed is no fault of this change: the task ends
                    // on it (the daemon restarts to recover the store) rather than set
                    // every change aside. A record that cannot be read is this change's
                    // alone: it is set aside as before, and the connector goes on.
                    PlanError::Store(e) if e.outage_message().is_some() => return Err(e),
                    PlanError::Store(e) => {
                        format!("cannot read what this change needs from the store: {e}")
                    }
                    PlanError::Unplannable(reason) => reason,
                };
                self.dead_letter(ev, reason, None, None).await?;
                return Ok(Delivered::DeadLettered);
            }
        };
        let started = AtomicBool::new(false);
        for stage in &plan.stages {
            // A stage can hold 50,000 enrollments: keep only a window of them in flight.
            let mut pending = stage.iter();
            let mut inflight = FuturesUnordered::new();
            let window = self.config.concurrency * 2;
            let mut refused = None;
            loop {
                while inflight.len() < window {
                    match pending.next() {
                        Some(req) => inflight.push(self.send_one(req, max_attempts, &started)),
                        None => break,
                    }
                }
                let Some((req, sent)) = inflight.next().await else {
                    break;
                };
                match sent {
                    Sent::Ok | Sent::Superseded => {}
                    Sent::Cancelled => return Ok(Delivered::Cancelled),
                    Sent::Refused { reason, response } => {
                        refused.get_or_insert((req, reason, response));
                    }
                }
            }
            // The rest of the change depends on this stage (a class before its
            // enrollments, a webhook's user event before its assignment event), so it
            // stops here; a replay sends the whole change again, in order.
            if let Some((req, reason, response)) = refused {
                self.dead_letter(ev, reason, Some(req), response).await?;
                if let Some(pause) = self.live.refusal_pause() {
                    // The letter's line is not why the connector stopped, nor its time.
                    {
                        let mut h = self.live.health();
                        h.error_quoting(pause.why.clone(), pause.answer.clone());
                        h.last_error_at = Some(pause.at);
                    }
                    let (tenant, name) = (self.tenant(), self.name());
                    self.store
                        .set_refusal_pause(tenant, name, Some(&pause))
                        .await?;
                    // A resume between the look and the write has cleared the store
                    // already: it must stay cleared.
                    if self.live.refusal_pause().is_none() {
                        self.store.set_refusal_pause(tenant, name, None).await?;
                    }
                }
                return Ok(Delivered::DeadLettered);
            }
        }
        if plan.stages.iter().any(|s| !s.is_empty()) {
            self.live.change_taken();
        }
        Ok(Delivered::Done(plan.hashes))
    }

    /// What a change of `keys` waits for: the repairs under them, and the latest change
    /// of each still in flight. It becomes that latest change (`rx` says when it is done).
    /// `stands_for`: the keys it becomes the latest change of (the others it only waits
    /// on). A skipped change sent as it stands stands only for what it writes: standing
    /// for a group's members too (the order a group's change keeps with theirs), it made
    /// each member's later change, a title, wait behind the change stuck in flight
    /// before it.
    pub(super) fn waits_for(
        &self,
        keys: &[String],
        latest: &mut HashMap<String, (u64, watch::Receiver<bool>)>,
        seq: u64,
        rx: &watch::Receiver<bool>,
        stands_for: impl Fn(&str) -> bool,
    ) -> Vec<watch::Receiver<bool>> {
        let mut waits = Vec::new();
        for k in keys {
            waits.extend(self.repairs.of(k));
            if !stands_for(k) {
                waits.extend(latest.get(k).map(|(_, r)| r.clone()));
            } else if let Some((_, r)) = latest.insert(k.clone(), (seq, rx.clone())) {
                waits.push(r);
            }
        }
        waits
    }

    /// Deliver one change once every earlier change it depends on is done, then say so.
    /// `as_it_stands`: the change was skipped at a hold behind an older change of its
    /// objects; it is sent as they stand once that is done ([`current_state`]), read then,
    /// so that whatever the IdP did meanwhile goes with it.
    ///
    /// [`current_state`]: super::commands::current_state
    pub(super) async fn deliver_after(
        &self,
        ev: ChangeEvent,
        reports: Vec<String>,
        waits: Vec<watch::Receiver<bool>>,
        done: watch::Sender<bool>,
        as_it_stands: bool,
    ) -> (u64, Vec<String>, Result<Delivered, StoreError>) {
        let keys = object_keys(&ev, &reports, self.state_sends_classes());
        for mut w in waits {
            // A dropped sender means its change was abandoned (shutdown or store error).
            if w.wait_for(|d| *d).await.is_err() {
                return (ev.seq, keys, Ok(Delivered::Cancelled));
            }
        }
        // Stopping: a change not started yet (this one waited for an earlier one, drained
        // meanwhile) does not start.
        if self.cancel.is_cancelled() {
            return (ev.seq, keys, Ok(Delivered::Cancelled));
        }
        // Its retries and refusals are logged naming the change and the object, which
        // the target's answer alone (`500`) does not.
        let span = tracing::info_span!("change", seq = ev.seq, object = %format_args!("{}/{}", ev.resource_type, ev.id));
        let (ev, reports) = if as_it_stands {
            let seq = ev.seq;
            let fans_out = matches!(self.target, Target::OneRoster { .. });
            let read = current_with_reports(&self.store, self.tenant(), ev, fans_out)
                .instrument(span.clone())
                .await;
            match read {
                Ok(read) => read,
                Err(e) => return (seq, keys, Err(e)),
            }
        } else {
            (ev, reports)
        };
        if as_it_stands {
            span.in_scope(|| tracing::info!("Skipped at a hold behind an older change of its object, this change is sent as the object now stands, now that the older one is done."));
        }
        let r = self.deliver(&ev, &reports, None).instrument(span).await;
        if let Ok(Delivered::Done(hashes)) = &r {
            let mut unsaved = self.unsaved.lock().unwrap_or_else(|e| e.into_inner());
            unsaved.extend(hashes.iter().cloned());
        }
        done.send_replace(true);
        (ev.seq, keys, r)
    }
}

/// The `Authorization` value among a request's headers, to know which token a 401 refused.
fn authorization(headers: &[(&'static str, String)]) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| *k == "authorization")
        .map(|(_, v)| v.clone())
}
