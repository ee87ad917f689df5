//! Status as operators see it: a connector's, a connector not loaded, a retired one.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// How a connector is doing, as `/status` and the Roster API show it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectorStatus {
    pub name: String,
    pub tenant: String,
    pub kind: &'static str,
    pub file: String,
    /// Why its file does not load now: it keeps running on the config it was started
    /// with until the file is fixed (or removed).
    pub file_error: Option<String>,
    pub enabled: bool,
    pub dry_run: bool,
    /// Running, or why not.
    pub state: String,
    pub cursor: u64,
    pub lag_events: u64,
    pub lag_seconds: f64,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// The start of the target's answer, where `last_error` quotes it.
    #[serde(skip)]
    pub last_answer: Option<String>,
    pub paused: bool,
    pub paused_until: Option<DateTime<Utc>>,
    /// Why its `[guard]` holds it, until an operator resumes it. Apart from `last_error`,
    /// which a failure of an earlier change still in flight overwrites: the hold then
    /// read as a plain pause, and "fix the target, resume" sent what the guard held.
    pub held_by_guard: Option<String>,
    /// The soonest attempt ahead of a request waiting to retry (its backoff, or the
    /// target's `Retry-After`): a long one otherwise looks like a connector doing nothing.
    pub next_retry_at: Option<DateTime<Utc>>,
    /// When a CSV connector's schedule writes its files next, while it waits for it: an
    /// operator asks this of a nightly file, whose lag otherwise only grows all day.
    pub next_write_at: Option<DateTime<Utc>>,
    pub dead_letters: u64,
    pub delivered: u64,
    pub retries: u64,
    /// Its file loaded but the connector could not start (its `state` says why): for
    /// the metrics, which count it as not loaded, since it delivers nothing.
    #[serde(skip)]
    pub not_started: bool,
}

impl ConnectorStatus {
    /// As `/status`, which takes no token, shows it: `last_error` without the target's
    /// words, which may be the user it was sent (a target echoing the body it refused).
    /// The Roster API, which takes a token of the tenant, shows them.
    pub fn without_answer(mut self) -> Self {
        if let Some(error) = &mut self.last_error {
            *error = unquoted(
                error,
                self.last_answer.as_deref(),
                &shown_by_api(&self.name),
            );
        }
        self
    }
}

/// `error` with the target's `answer` it quotes replaced by where to read it (`shown`):
/// the Roster API, which takes a token of the tenant, or the log. A target echoing the
/// body it refused puts a user's name and email in its answer, and `/status` takes no
/// token.
pub(super) fn unquoted(error: &str, answer: Option<&str>, shown: &str) -> String {
    // The answer is quoted after rosterd's own words: its last occurrence is the quote,
    // where a short answer ("error") may occur in those words as well.
    match answer.and_then(|a| Some((error.rfind(a)?, a.len()))) {
        Some((at, len)) => format!(
            "{}[the target's answer: {shown}]{}",
            &error[..at],
            &error[at + len..]
        ),
        None => error.to_owned(),
    }
}

/// Where a connector's last answer from its target is shown to those with a token.
pub(super) fn shown_by_api(connector: &str) -> String {
    format!("GET /api/v1/roster/connectors/{connector} shows it")
}

/// A known connector that is not loaded (its file is broken, or missing since the last
/// stop): not delivering, falling behind, holding back compaction.
#[derive(Debug, Clone, Serialize)]
pub struct UnloadedStatus {
    pub name: String,
    pub tenant: String,
    /// The file that names it but does not load; `None` when no file does.
    pub file: Option<String>,
    pub cursor: u64,
    pub lag_events: u64,
    pub lag_seconds: f64,
    pub dead_letters: u64,
}

/// A retired connector that still holds dead letters (see
/// [`Dispatcher::retired_status`]).
///
/// [`Dispatcher::retired_status`]: super::Dispatcher::retired_status
#[derive(Debug, Clone, Serialize)]
pub struct RetiredStatus {
    pub name: String,
    pub tenant: String,
    pub dead_letters: u64,
}

/// A time as the log and `rosterd status` show it: RFC 3339, to the second.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
