//! A connector's `[guard]`: counts the users the changes it reads deactivate or delete,
//! and the group memberships they end, by the times the changes were made, and says when
//! one more would pass a limit. The times are the change log's, not the clock's, so a
//! connector reading a backlog (after an outage, or at a start) judges a burst as it
//! happened, and a restart while held holds again at the same change.

use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet, VecDeque};

use crate::connectors::{GuardConfig, Kind};
use crate::store::{ChangeEvent, ChangeOp, Store, StoreError};

/// How many changes a start reads back from the cursor for the deprovisions it sent:
/// enough for any window at the write rates measured (about 7,000 a second), bounded so
/// a start does not read a day of changes.
const SEED_SCAN: usize = 200_000;

/// One limit's count: what it let through within the window, in log order, and how
/// often each thing counted appears there. Things count once however often they come
/// back (a recheck saw one user's flapping hold a connector "for 4 users").
struct Window {
    limit: u64,
    recent: VecDeque<(DateTime<Utc>, String)>,
    counts: HashMap<String, u32>,
}

impl Window {
    fn new(limit: u64) -> Window {
        Window {
            limit,
            recent: VecDeque::new(),
            counts: HashMap::new(),
        }
    }

    fn forget_until(&mut self, cutoff: DateTime<Utc>) {
        while let Some((t, _)) = self.recent.front()
            && *t <= cutoff
        {
            let Some((_, key)) = self.recent.pop_front() else {
                break;
            };
            if let Some(n) = self.counts.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&key);
                }
            }
        }
    }

    /// How many there would be with `keys` counted, when that is more than the limit.
    fn over(&self, keys: &[String]) -> Option<u64> {
        let new: HashSet<&String> = keys
            .iter()
            .filter(|k| !self.counts.contains_key(*k))
            .collect();
        let total = (self.counts.len() + new.len()) as u64;
        (total > self.limit && !new.is_empty()).then_some(total)
    }

    fn count(&mut self, at: DateTime<Utc>, key: &str) {
        *self.counts.entry(key.to_owned()).or_default() += 1;
        self.recent.push_back((at, key.to_owned()));
    }

    fn clear(&mut self) {
        self.recent.clear();
        self.counts.clear();
    }
}

/// What a change takes away, as a guard counts it.
#[derive(Default)]
struct Losses {
    /// The user it deactivates or deletes (at most one).
    users: Vec<String>,
    /// The memberships it ends while their users stay, as `group` U+001F `member`.
    memberships: Vec<String>,
    /// Those it ends with their user's deletion (counted with the user, under `users`).
    with_user: Vec<String>,
}

impl Losses {
    fn of(ev: &ChangeEvent) -> Losses {
        let mut l = Losses::default();
        match ev.resource_type.as_str() {
            "User" if ev.op == ChangeOp::Deleted || ev.deactivated => l.users.push(ev.id.clone()),
            // A user's removal from its groups is logged just before its deletion: it is
            // part of that deprovisioning, and counted as it, so a hold at that user
            // holds its enrollments too (they went out ahead of the hold before).
            "Group" if ev.deleting_user => {
                l.users.extend(ev.members_removed.iter().cloned());
                l.with_user.extend(membership_keys(ev));
            }
            "Group" => l.memberships.extend(membership_keys(ev)),
            _ => {}
        }
        l
    }

    fn is_empty(&self) -> bool {
        self.users.is_empty() && self.memberships.is_empty()
    }

    /// As a guard counts them: without a `users` limit, a deleted user's memberships count
    /// under `memberships` (a recheck saw a guard of memberships alone let 45 enrollments
    /// go with 10 deleted users, under a limit of 30).
    fn counted(mut self, users_limit: bool) -> Losses {
        if !users_limit {
            self.memberships.append(&mut self.with_user);
        }
        self
    }
}

/// A group change's removed memberships, as `group` U+001F `member`.
fn membership_keys(ev: &ChangeEvent) -> impl Iterator<Item = String> + '_ {
    ev.members_removed
        .iter()
        .map(move |m| format!("{}\u{1f}{m}", ev.id))
}

pub(super) struct Guard {
    config: GuardConfig,
    /// The connector's kind: what a resume does, which the hold's reason tells.
    kind: Kind,
    users: Option<Window>,
    memberships: Option<Window>,
    /// Changes up to this one were let through by an operator's resume.
    approved_through: u64,
    /// The start's count stopped once each limit was reached: until the changes it left
    /// uncounted leave the window (this time), the true figure may be higher.
    seeded_short_until: Option<DateTime<Utc>>,
}

/// A change the guard holds, and why.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Held {
    pub seq: u64,
    pub reason: String,
}

impl Guard {
    fn new(config: GuardConfig) -> Guard {
        Guard {
            config,
            kind: Kind::Oneroster,
            users: config.users.map(Window::new),
            memberships: config.memberships.map(Window::new),
            approved_through: 0,
            seeded_short_until: None,
        }
    }

    fn windows(&mut self) -> impl Iterator<Item = &mut Window> {
        self.users.iter_mut().chain(self.memberships.iter_mut())
    }

    /// The guard of a connector starting at `cursor` (cursor name `key`): it counts the
    /// deprovisions sent before, after the last approval, that a later change's window
    /// may still hold. Without them a restart during a burst, or while held, would count
    /// from nothing and let `users` more go each time (a test saw a restart send all
    /// that was held).
    pub fn at_start(
        config: GuardConfig,
        kind: Kind,
        store: &Store,
        tenant: &str,
        key: &str,
        cursor: u64,
    ) -> Result<Guard, StoreError> {
        let approved_through = store.guard_approved(tenant, key)?;
        let window = window(&config);
        let (mut below, mut scanned, mut newest) = (cursor, 0usize, None);
        let mut found: Vec<(DateTime<Utc>, Losses)> = Vec::new();
        let (mut users, mut memberships) = (HashSet::new(), HashSet::new());
        let mut short_until = None;
        let (mut read_to_the_end, mut oldest_read) = (false, None);
        // Older ones cannot change a later decision once each limit is reached by
        // newer ones: those leave the window last.
        let full = |seen: &HashSet<String>, limit: Option<u64>| {
            limit.is_none_or(|l| seen.len() as u64 >= l)
        };
        'scan: while below > approved_through && scanned < SEED_SCAN {
            let batch = store.changes_back(tenant, below, 1024)?;
            let Some(last) = batch.last() else { break };
            below = last.seq.saturating_sub(1);
            scanned += batch.len();
            for ev in &batch {
                let newest = *newest.get_or_insert(ev.at);
                if ev.seq <= approved_through || ev.at <= newest - window {
                    read_to_the_end = true;
                    break 'scan;
                }
                oldest_read = Some(ev.at);
                let losses = Losses::of(ev).counted(config.users.is_some());
                if losses.is_empty() {
                    continue;
                }
                users.extend(losses.users.iter().cloned());
                memberships.extend(losses.memberships.iter().cloned());
                found.push((ev.at, losses));
                if full(&users, config.users) && full(&memberships, config.memberships) {
                    short_until = Some(ev.at + window);
                    break 'scan;
                }
            }
        }
        // Stopped at SEED_SCAN inside the window: what is older was not counted either.
        if short_until.is_none() && !read_to_the_end && scanned >= SEED_SCAN {
            short_until = oldest_read.map(|at| at + window);
        }
        found.reverse();
        let mut guard = Guard::new(config);
        guard.kind = kind;
        guard.approved_through = approved_through;
        guard.seeded_short_until = short_until;
        for (at, losses) in found {
            guard.count(at, &losses);
        }
        Ok(guard)
    }

    /// `ev` was sent before (acknowledged above the cursor): counted, never held.
    pub fn sent(&mut self, ev: &ChangeEvent) {
        if ev.seq > self.approved_through {
            let losses = Losses::of(ev).counted(self.users.is_some());
            if !losses.is_empty() {
                self.forget_before(ev.at);
                self.count(ev.at, &losses);
            }
        }
    }

    fn count(&mut self, at: DateTime<Utc>, losses: &Losses) {
        for (w, keys) in [
            (self.users.as_mut(), &losses.users),
            (self.memberships.as_mut(), &losses.memberships),
        ] {
            if let Some(w) = w {
                for k in keys {
                    w.count(at, k);
                }
            }
        }
    }

    fn forget_before(&mut self, at: DateTime<Utc>) {
        let cutoff = at - window(&self.config);
        for w in self.windows() {
            w.forget_until(cutoff);
        }
    }

    /// Whether `ev`, the next change in log order, may be sent: `None`, counted, or
    /// the hold. A held change is not counted; it comes again once approved.
    pub fn check(&mut self, ev: &ChangeEvent, tenant: &str, connector: &str) -> Option<Held> {
        if ev.seq <= self.approved_through {
            return None;
        }
        let losses = Losses::of(ev).counted(self.users.is_some());
        if losses.is_empty() {
            return None;
        }
        self.forget_before(ev.at);
        let minutes = self.config.minutes;
        // Counted short at the start: an operator sizing an incident by this figure
        // read 4 where hundreds had gone.
        let n_of = |n: u64| match self.seeded_short_until {
            Some(until) if ev.at < until => format!("at least {n}"),
            _ => n.to_string(),
        };
        let what = if let Some(n) = self.users.as_ref().and_then(|w| w.over(&losses.users)) {
            let limit = self.config.users.unwrap_or_default();
            format!(
                "make {} users deactivated or deleted within {minutes} minutes, more than {limit}",
                n_of(n)
            )
        } else if let Some(n) = self
            .memberships
            .as_ref()
            .and_then(|w| w.over(&losses.memberships))
        {
            let limit = self.config.memberships.unwrap_or_default();
            format!(
                "end {} group memberships within {minutes} minutes, more than {limit}",
                n_of(n)
            )
        } else {
            self.count(ev.at, &losses);
            return None;
        };
        // What to do, by what a resume does for this kind: the line an operator reads
        // in an incident (an audit saw it steer a delete-mode target's operator to the
        // plain resume, which deletes the users and puts them back).
        let resume = format!("`rosterd resume --tenant {tenant} {connector}`");
        let next = match self.kind {
            Kind::Oneroster => format!(
                "if the identity provider meant it, {resume} sends them; if not, undo it there, then `rosterd resume --tenant {tenant} {connector} --skip-held` sends none of them and reconciles"
            ),
            Kind::Csv => format!(
                "{resume} writes the files from the roster as it then stands: if the identity provider did not mean it, undo it there first"
            ),
            Kind::Webhook => format!(
                "if the identity provider meant it, {resume} sends them; if not, undo it there first (the receivers then get both events, in order)"
            ),
        };
        Some(Held {
            seq: ev.seq,
            reason: format!(
                "held by its [guard]: change #{seq} would {what}; {next}",
                seq = ev.seq
            ),
        })
    }

    /// The operator let every change up to `through` go: the count starts again after it.
    pub fn approve(&mut self, through: u64) {
        self.approved_through = self.approved_through.max(through);
        self.seeded_short_until = None;
        for w in self.windows() {
            w.clear();
        }
    }
}

/// How far back from a change its window reaches.
fn window(config: &GuardConfig) -> chrono::Duration {
    chrono::Duration::minutes(config.minutes as i64)
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
            users: Some(3),
            memberships: None,
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
            users: Some(2),
            memberships: None,
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
            users: Some(1),
            memberships: None,
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

    fn group(
        seq: u64,
        id: &str,
        op: ChangeOp,
        removed: &[&str],
        deleting_user: bool,
    ) -> ChangeEvent {
        let mut ev = change(seq, 0, "Group", op, false);
        ev.id = id.to_owned();
        ev.members_removed = removed.iter().map(|m| m.to_string()).collect();
        ev.deleting_user = deleting_user;
        ev
    }

    fn deleted(seq: u64, user: &str) -> ChangeEvent {
        let mut ev = change(seq, 0, "User", ChangeOp::Deleted, false);
        ev.id = user.to_owned();
        ev
    }

    /// Three users deleted, each leaving its groups first: whether `g` holds each change.
    fn three_leavers(g: &mut Guard) -> Vec<Option<u64>> {
        [
            group(1, "maths", ChangeOp::Updated, &["u1"], true),
            group(2, "art", ChangeOp::Updated, &["u1"], true),
            deleted(3, "u1"),
            group(4, "maths", ChangeOp::Updated, &["u2"], true),
            deleted(5, "u2"),
            group(6, "maths", ChangeOp::Updated, &["u3"], true),
        ]
        .iter()
        .map(|ev| g.check(ev, "acme", "sis").map(|h| h.seq))
        .collect()
    }

    /// A deleted user leaves its groups first, in changes of their own: they are held with
    /// the deletion, so the held user keeps its enrollments at the target.
    #[test]
    fn a_deleted_users_removal_from_its_groups_is_held_with_its_deletion() {
        let mut g = Guard::new(GuardConfig {
            users: Some(2),
            memberships: None,
            minutes: 10,
        });
        // The third user is held at its first group, not at its deletion.
        assert_eq!(
            three_leavers(&mut g),
            [None, None, None, None, None, Some(6)]
        );
    }

    /// `memberships` counts the memberships that end while their users stay: a group's
    /// members removed, or the group deleted with them.
    #[test]
    fn memberships_ended_are_counted_apart_from_users() {
        let mut g = Guard::new(GuardConfig {
            users: Some(1),
            memberships: Some(4),
            minutes: 10,
        });
        let mut check = |ev: ChangeEvent| g.check(&ev, "acme", "sis");
        assert_eq!(
            check(group(1, "maths", ChangeOp::Updated, &["u1", "u2"], false)),
            None
        );
        // The same membership ending again (added back in between) counts once.
        assert_eq!(
            check(group(2, "maths", ChangeOp::Updated, &["u1"], false)),
            None
        );
        // A user's deletion counts as a user, not as the memberships it ends.
        assert_eq!(
            check(group(3, "maths", ChangeOp::Updated, &["u9"], true)),
            None
        );
        assert_eq!(check(deleted(4, "u9")), None);
        assert_eq!(
            check(group(5, "art", ChangeOp::Updated, &["u1"], false)),
            None
        );
        // A group deleted with three members would make six.
        let held = check(group(
            6,
            "art",
            ChangeOp::Deleted,
            &["u2", "u3", "u4"],
            false,
        ))
        .unwrap();
        assert_eq!(held.seq, 6);
        assert!(
            held.reason
                .contains("would end 6 group memberships within 10 minutes, more than 4"),
            "{}",
            held.reason
        );
        // One more passes, and the users' limit still holds on its own.
        assert_eq!(
            check(group(7, "art", ChangeOp::Updated, &["u5"], false)),
            None
        );
        let held = check(deleted(8, "u10")).unwrap();
        assert!(
            held.reason.contains("would make 2 users"),
            "{}",
            held.reason
        );
    }

    /// Without `users`, deprovisions are not counted; without `memberships`, groups are not.
    #[test]
    fn a_guard_counts_only_what_it_names() {
        let mut g = Guard::new(GuardConfig {
            users: None,
            memberships: Some(1),
            minutes: 10,
        });
        for seq in 1..=5 {
            assert_eq!(
                g.check(&deleted(seq, &format!("u{seq}")), "acme", "sis"),
                None
            );
        }
        let ev = group(6, "maths", ChangeOp::Deleted, &["a", "b"], false);
        assert_eq!(g.check(&ev, "acme", "sis").map(|h| h.seq), Some(6));
        // Without `users`, a deleted user's memberships count as memberships.
        let mut g = Guard::new(GuardConfig {
            users: None,
            memberships: Some(2),
            minutes: 10,
        });
        assert_eq!(
            three_leavers(&mut g),
            [None, None, None, Some(4), None, Some(6)]
        );
        let mut g = Guard::new(GuardConfig {
            users: Some(1),
            memberships: None,
            minutes: 10,
        });
        let ev = group(1, "maths", ChangeOp::Deleted, &["a", "b", "c"], false);
        assert_eq!(g.check(&ev, "acme", "sis"), None);
    }

    /// The hold says what a resume does for the connector's kind: a OneRoster target's
    /// operator is pointed to the skip, which a webhook connector cannot do.
    #[test]
    fn the_hold_tells_what_to_run_for_the_connectors_kind() {
        let reason = |kind: Kind| {
            let mut g = Guard::new(GuardConfig {
                users: Some(1),
                memberships: None,
                minutes: 10,
            });
            g.kind = kind;
            assert_eq!(g.check(&deleted(1, "u1"), "acme", "sis"), None);
            g.check(&deleted(2, "u2"), "acme", "sis").unwrap().reason
        };
        let skip = "`rosterd resume --tenant acme sis --skip-held`";
        let or = reason(Kind::Oneroster);
        assert!(or.contains(skip), "{or}");
        let hook = reason(Kind::Webhook);
        assert!(
            !hook.contains("--skip-held") && hook.contains("both events"),
            "{hook}"
        );
        let csv = reason(Kind::Csv);
        assert!(
            !csv.contains("--skip-held") && csv.contains("writes the files"),
            "{csv}"
        );
    }
}
