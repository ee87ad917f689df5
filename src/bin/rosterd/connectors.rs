//! `rosterd resume` and `rosterd retire`: a connector's pause lifted, or a connector
//! whose file is gone retired, on a running daemon.

use anyhow::Result;
use rosterd::text::terminal_safe;
use std::io::Write as _;

use crate::args::DaemonArgs;
use crate::client::{call_daemon, fail_unless_ok};

pub(crate) fn resume(
    daemon: &DaemonArgs,
    tenant: &str,
    connector: &str,
    skip_held: bool,
) -> Result<()> {
    let (status, body) = call_daemon(
        daemon,
        Some(tenant),
        reqwest::Method::POST,
        &format!("/api/v1/roster/connectors/{connector}/resume"),
        skip_held.then(|| serde_json::json!({"skip_held": true})),
    )?;
    fail_unless_ok(status, &body)?;
    if skip_held {
        match body["note"].as_str() {
            // A CSV connector: its files carry the roster as it stands, held changes too.
            Some(note) => outln!("{connector}: resumed; {note}")?,
            None => outln!(
                "{connector}: resumed; the changes it held, up to #{}, were skipped (one of an object whose older change is still in flight is sent as the object stands once that lands)",
                body["skipped_through"]
            )?,
        }
        match (body["job"]["job_id"].as_str(), body["job_error"].as_str()) {
            (Some(id), _) => outln!(
                "reconciliation {id} started: it sends the current state of what they changed (follow it: rosterd job --tenant {tenant} {id} --wait)"
            )?,
            (None, Some(e)) => outln!("reconciliation not started: {e}")?,
            (None, None) => {}
        }
        return Ok(());
    }
    // A daemon from before `was_paused` answered only when it resumed something.
    if body["was_paused"].as_bool().unwrap_or(true) {
        outln!("{connector}: resumed")?;
    } else {
        outln!(
            "{connector}: was not paused (its count of failures in a row starts afresh, and any request waiting to retry tries now)"
        )?;
    }
    if let Some(n) = body["dead_letters"].as_u64().filter(|n| *n > 0) {
        outln!(
            "{connector}: {n} dead letter(s) stay, which a resume does not send: `rosterd dead-letters --tenant {tenant} replay {connector} --all` sends them"
        )?;
    }
    Ok(())
}

pub(crate) fn retire(daemon: &DaemonArgs, tenant: &str, connector: &str) -> Result<()> {
    let (status, body) = call_daemon(
        daemon,
        Some(tenant),
        reqwest::Method::POST,
        &format!("/api/v1/roster/connectors/{connector}/retire"),
        None,
    )?;
    fail_unless_ok(status, &body)?;
    if body["was_retired"] == true {
        outln!("{connector}: was already retired")?;
        return Ok(());
    }
    let undelivered = body["undelivered"].as_u64().unwrap_or(0);
    outln!(
        "{connector}: retired; the {undelivered} change(s) it never delivered may be compacted away"
    )?;
    // Older daemons do not say; a retirement that leaves letters must.
    if let Some(n) = body["dead_letters"].as_u64().filter(|&n| n > 0) {
        outln!(
            "{connector}: {} kept in the store until discarded: `rosterd dead-letters --tenant {tenant} list {connector}`, then `discard {connector} --all`",
            rosterd::text::plural(n, "dead letter")
        )?;
    }
    Ok(())
}
