//! A connector's `[guard]`: counts the users the changes it reads deactivate or delete,
//! by the times the changes were made, and says when one more would pass the limit.
//! The times are the change log's, not the clock's, so a connector reading a backlog
//! (after an outage, or at a start) judges a burst as it happened, and a restart while
//! held holds again at the same change.

use chrono::{DateTime, Utc};
use std::collections::{HashMap, VecDeque};

use crate::connectors::GuardConfig;
use crate::store::{ChangeEvent, ChangeOp, Store, StoreError};

/// How many changes a start reads back from the cursor for the deprovisions it sent:
/// enough for any window at the write rates measured (about 7,000 a second), bounded so
/// a start does not read a day of changes.
const SEED_SCAN: usize = 200_000;

pub(super) struct Guard {
    limit: GuardConfig,
    /// The deprovisions let through within the window (when made, and whose), in log
    /// order.
    recent: VecDeque<(DateTime<Utc>, String)>,
    /// The users among them, with how many of their deprovisions: the limit counts
    /// users, so one deactivated and reactivated over and over counts once (a recheck saw
    /// one user's flapping hold a connector "for 4 users").
    users: HashMap<String, u32>,
    /// Changes up to this one were let through by an operator's resume.
    approved_through: u64,
}

/// A change the guard holds, and why.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Held {
    pub seq: u64,
    pub reason: String,
}

/// A user deactivated or deleted: what a mistaken deprovisioning is made of.
pub(super) fn deprovisions(ev: &ChangeEvent) -> bool {
    ev.resource_type == "User" && (ev.op == ChangeOp::Deleted || ev.deactivated)
}

/// How far back from a change its window reaches.
fn window(limit: &GuardConfig) -> chrono::Duration {
    chrono::Duration::minutes(limit.minutes as i64)
}

impl Guard {
    fn new(limit: GuardConfig) -> Guard {
        Guard {
            limit,
            recent: VecDeque::new(),
            users: HashMap::new(),
            approved_through: 0,
        }
    }

    /// The guard of a connector starting at `cursor` (cursor name `key`): it counts the
    /// deprovisions sent before, after the last approval, that a later change's window
    /// may still hold. Without them a restart during a burst, or while held, would count
    /// from nothing and let `users` more go each time (a test saw a restart send all
    /// that was held).
    pub fn at_start(
        limit: GuardConfig,
        store: &Store,
        tenant: &str,
        key: &str,
        cursor: u64,
    ) -> Result<Guard, StoreError> {
        let approved_through = store.guard_approved(tenant, key)?;
        let window = window(&limit);
        let (mut below, mut scanned, mut newest) = (cursor, 0usize, None);
        let mut found: Vec<(DateTime<Utc>, String)> = Vec::new();
        let mut distinct = std::collections::HashSet::new();
        'scan: while below > approved_through && scanned < SEED_SCAN {
            let batch = store.changes_back(tenant, below, 1024)?;
            let Some(last) = batch.last() else { break };
            below = last.seq.saturating_sub(1);
            scanned += batch.len();
            for ev in &batch {
                let newest = *newest.get_or_insert(ev.at);
                if ev.seq <= approved_through || ev.at <= newest - window {
                    break 'scan;
                }
                if deprovisions(ev) {
                    found.push((ev.at, ev.id.clone()));
                    distinct.insert(ev.id.clone());
                    if distinct.len() as u64 >= limit.users {
                        break 'scan;
                    }
                }
            }
        }
        found.reverse();
        let mut guard = Guard::new(limit);
        guard.approved_through = approved_through;
        for (at, id) in found {
            guard.count(at, id);
        }
        Ok(guard)
    }

    /// `ev` was sent before (acknowledged above the cursor): counted, never held.
    pub fn sent(&mut self, ev: &ChangeEvent) {
        if ev.seq > self.approved_through && deprovisions(ev) {
            self.forget_before(ev.at);
            self.count(ev.at, ev.id.clone());
        }
    }

    fn count(&mut self, at: DateTime<Utc>, user: String) {
        *self.users.entry(user.clone()).or_default() += 1;
        self.recent.push_back((at, user));
    }

    fn forget_before(&mut self, at: DateTime<Utc>) {
        let window = window(&self.limit);
        while let Some((t, _)) = self.recent.front()
            && *t <= at - window
        {
            let Some((_, user)) = self.recent.pop_front() else {
                break;
            };
            if let Some(n) = self.users.get_mut(&user) {
                *n -= 1;
                if *n == 0 {
                    self.users.remove(&user);
                }
            }
        }
    }

    /// Whether `ev`, the next change in log order, may be sent: `None`, counted, or
    /// the hold. A held change is not counted; it comes again once approved.
    pub fn check(&mut self, ev: &ChangeEvent, tenant: &str, connector: &str) -> Option<Held> {
        if ev.seq <= self.approved_through || !deprovisions(ev) {
            return None;
        }
        self.forget_before(ev.at);
        if self.users.contains_key(&ev.id) || (self.users.len() as u64) < self.limit.users {
            self.count(ev.at, ev.id.clone());
            return None;
        }
        let GuardConfig { users, minutes } = self.limit;
        Some(Held {
            seq: ev.seq,
            reason: format!(
                "held by its [guard]: change #{seq} would make {n} users deactivated or deleted within {minutes} minutes, more than {users}; if the identity provider meant it, `rosterd resume --tenant {tenant} {connector}` sends them; if not, undo it there first (the target then gets both, in order)",
                seq = ev.seq,
                n = users + 1,
            ),
        })
    }

    /// The operator let every change up to `through` go: the count starts again after it.
    pub fn approve(&mut self, through: u64) {
        self.approved_through = self.approved_through.max(through);
        self.recent.clear();
        self.users.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(
        seq: u64,
        minute: i64,
        resource: &str,
        op: ChangeOp,
        deactivated: bool,
    ) -> ChangeEvent {
        let at = DateTime::parse_from_rfc3339("2026-12-05T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
            + chrono::Duration::minutes(minute);
        serde_json::from_value(serde_json::json!({
            "seq": seq,
            "at": at,
            "resource_type": resource,
            "id": format!("id-{seq}"),
            "op": op,
            "deactivated": deactivated,
        }))
        .unwrap()
    }

    #[test]
    fn more_deprovisions_than_the_limit_within_the_window_are_held() {
        let mut g = Guard::new(GuardConfig {
            users: 3,
            minutes: 10,
        });
        let mut check = |ev: ChangeEvent| g.check(&ev, "acme", "sis").map(|h| h.seq);
        // Not deprovisions: a group deleted, a user updated or created.
        assert_eq!(check(change(1, 0, "Group", ChangeOp::Deleted, false)), None);
        assert_eq!(check(change(2, 0, "User", ChangeOp::Updated, false)), None);
        assert_eq!(check(change(3, 0, "User", ChangeOp::Created, false)), None);
        // Three within ten minutes pass, the fourth is held, and held again if read
        // again (a restart).
        assert_eq!(check(change(4, 0, "User", ChangeOp::Updated, true)), None);
        assert_eq!(check(change(5, 1, "User", ChangeOp::Deleted, false)), None);
        assert_eq!(check(change(6, 2, "User", ChangeOp::Deleted, false)), None);
        assert_eq!(
            check(change(7, 9, "User", ChangeOp::Deleted, false)),
            Some(7)
        );
        assert_eq!(
            check(change(7, 9, "User", ChangeOp::Deleted, false)),
            Some(7)
        );
        // Ten minutes after the first, it has left the window.
        assert_eq!(check(change(8, 10, "User", ChangeOp::Deleted, false)), None);
        assert_eq!(check(change(9, 11, "User", ChangeOp::Deleted, false)), None);
        assert_eq!(
            check(change(10, 11, "User", ChangeOp::Deleted, false)),
            Some(10)
        );
    }

    /// The limit counts users: one deactivated, reactivated and deactivated again counts
    /// once, however often.
    #[test]
    fn a_user_deprovisioned_again_counts_once() {
        let mut g = Guard::new(GuardConfig {
            users: 2,
            minutes: 10,
        });
        let of = |seq: u64, user: &str| {
            let mut ev = change(seq, 0, "User", ChangeOp::Updated, true);
            ev.id = user.to_owned();
            ev
        };
        for seq in 1..=6 {
            assert_eq!(g.check(&of(seq, "flapper"), "acme", "sis"), None, "#{seq}");
        }
        assert_eq!(g.check(&of(7, "second"), "acme", "sis"), None);
        assert_eq!(g.check(&of(8, "flapper"), "acme", "sis"), None);
        let held = g.check(&of(9, "third"), "acme", "sis").unwrap();
        assert_eq!(held.seq, 9);
        assert!(
            held.reason.contains("would make 3 users"),
            "{}",
            held.reason
        );
    }

    #[test]
    fn an_approval_lets_its_changes_through_and_counts_anew_after_them() {
        let mut g = Guard::new(GuardConfig {
            users: 1,
            minutes: 60,
        });
        let ev = |seq| change(seq, 0, "User", ChangeOp::Deleted, false);
        assert!(g.check(&ev(1), "acme", "sis").is_none());
        let held = g.check(&ev(2), "acme", "sis").unwrap();
        assert!(
            held.reason.contains("`rosterd resume --tenant acme sis`"),
            "{}",
            held.reason
        );
        assert!(held.reason.contains("more than 1"), "{}", held.reason);
        g.approve(4);
        for seq in 2..=4 {
            assert_eq!(g.check(&ev(seq), "acme", "sis"), None);
        }
        assert_eq!(g.check(&ev(5), "acme", "sis"), None);
        assert_eq!(g.check(&ev(6), "acme", "sis").map(|h| h.seq), Some(6));
    }
}
