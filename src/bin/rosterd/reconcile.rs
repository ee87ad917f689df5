//! `rosterd reconcile` and `rosterd job`: start a reconciliation on a running daemon (or
//! only report what it would send), and follow a job until it ends.

use anyhow::Result;
use rosterd::text::terminal_safe;
use std::io::Write as _;

use crate::args::DaemonArgs;
use crate::client::{CLI_TIMEOUT, call_daemon, call_daemon_within, fail_unless_ok};
use crate::status::indented;

/// How long `reconcile --dry-run` waits: the daemon answers once it has read each
/// OneRoster target back, which may take up to the connector's `read_back_max_secs`
/// (default 1800): the minute other commands wait called a daemon busy reading stalled.
const DRY_RUN_CLI_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(7200);

/// What `rosterd reconcile` asks for.
pub(crate) struct ReconcileArgs {
    pub(crate) dry_run: bool,
    pub(crate) wait: bool,
    pub(crate) full: bool,
    pub(crate) connector: Option<String>,
}

pub(crate) fn reconcile(daemon: &DaemonArgs, tenant: &str, args: ReconcileArgs) -> Result<()> {
    let ReconcileArgs {
        dry_run,
        wait,
        full,
        connector,
    } = args;
    // `full` and `connector` only when asked: a daemon older than them refuses the keys.
    let mut ask = serde_json::json!({ "dry_run": dry_run });
    if full {
        ask["full"] = true.into();
    }
    if let Some(name) = &connector {
        ask["connector"] = name.as_str().into();
    }
    let (status, body) = call_daemon_within(
        daemon,
        Some(tenant),
        reqwest::Method::POST,
        "/api/v1/roster/scim:sync",
        Some(ask),
        if dry_run {
            DRY_RUN_CLI_TIMEOUT
        } else {
            CLI_TIMEOUT
        },
    )?;
    fail_unless_ok(status, &body)?;
    if !dry_run {
        let id = body["job_id"].as_str().unwrap_or_default();
        if wait {
            return show_job(daemon, tenant, id, true);
        }
        let of = connector
            .map(|c| format!(" of connector {c}"))
            .unwrap_or_default();
        outln!(
            "{}{of} job {id} started; follow it with `rosterd job --tenant {tenant} {id} --wait`",
            if full { "full reconcile" } else { "reconcile" }
        )?;
        return Ok(());
    }
    let connectors = body["connectors"].as_array().cloned().unwrap_or_default();
    if connectors.is_empty() {
        outln!("tenant {tenant} has no running connector")?;
    }
    for c in connectors {
        // Users the target cannot take (no email, say) are neither sent nor drift.
        let unmappable = match c["unmappable"].as_u64().unwrap_or(0) {
            0 => String::new(),
            n => format!(", {n} left out (the target's format cannot express them)"),
        };
        // Changes still on their way to the target send these; a dry run that counted
        // them as drift would alarm an operator during every catch-up.
        let pending = match c["pending"].as_u64().unwrap_or(0) {
            0 => String::new(),
            n => format!(", {n} left to changes waiting for this connector"),
        };
        outln!(
            "connector {} ({}): {} objects checked, {} would be sent{pending}{unmappable}{}",
            c["connector"].as_str().unwrap_or_default(),
            c["kind"].as_str().unwrap_or_default(),
            c["checked"],
            c["drifted"],
            c["note"]
                .as_str()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        )?;
        if let Some(p) = c["paused"].as_str() {
            outln!("    {p}")?;
        }
        // Else "0 would be sent" reads as a clean read-back of the whole target.
        if let Some(why) = c["read_back_stopped"].as_str() {
            outln!(
                "    the read-back stopped early, so drift at the target may be missed: {}",
                indented(why)
            )?;
        }
        for i in c["items"].as_array().cloned().unwrap_or_default() {
            outln!(
                "    {} {}: {}",
                i["action"].as_str().unwrap_or_default().to_uppercase(),
                i["object"].as_str().unwrap_or_default(),
                i["reason"].as_str().unwrap_or_default()
            )?;
        }
        // A CSV connector's one object (its files) is described by its note, not listed.
        let listed = c["items"].as_array().map(Vec::len).unwrap_or(0) as u64;
        if listed > 0 && c["drifted"].as_u64().unwrap_or(0) > listed {
            outln!(
                "    … and {} more",
                c["drifted"].as_u64().unwrap_or(0) - listed
            )?;
        }
    }
    Ok(())
}

/// How often `--wait` asks after a job: a reconciliation of a large tenant takes minutes,
/// and each question is one small read.
const JOB_POLL: std::time::Duration = std::time::Duration::from_secs(1);

pub(crate) fn show_job(daemon: &DaemonArgs, tenant: &str, id: &str, wait: bool) -> Result<()> {
    // Job ids are ours (`scim-sync-` and hex digits); anything else would be read as
    // another path or a query rather than looked up.
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        anyhow::bail!("{id:?} is not a job id: job ids are letters, digits, '-' and '_'");
    }
    let path = format!("/api/v1/roster/scim/jobs/{id}");
    let mut shown = String::new();
    loop {
        let (status, job) = call_daemon(daemon, Some(tenant), reqwest::Method::GET, &path, None)?;
        fail_unless_ok(status, &job)?;
        let line = job_line(&job);
        if line != shown {
            outln!("{line}")?;
            shown = line;
        }
        let state = job["status"].as_str().unwrap_or_default();
        match state {
            "succeeded" => return Ok(()),
            _ if !wait => return Ok(()),
            "failed" | "interrupted" => anyhow::bail!(
                "job {id} {state}{}",
                job["error"]
                    .as_str()
                    .map(|e| format!(": {}", indented(e)))
                    .unwrap_or_default()
            ),
            _ => std::thread::sleep(JOB_POLL),
        }
    }
}

/// One line per state of a job: its status, times, counts and error.
fn job_line(job: &serde_json::Value) -> String {
    let s = |k: &str| job[k].as_str().unwrap_or("-").to_owned();
    // What it covers beside why it ran: a full run, or one connector's.
    let mut kind = s("kind");
    if job["full"] == true {
        kind.push_str(", full");
    }
    if let Some(c) = job["connector"].as_str() {
        kind.push_str(&format!(", connector {c}"));
    }
    let mut line = format!(
        "job {} ({kind}): {}, started {}",
        s("job_id"),
        s("status"),
        s("started_at")
    );
    if let Some(at) = job["finished_at"].as_str() {
        line.push_str(&format!(", finished {at}"));
    }
    if let Some(counts) = job["counts"].as_object().filter(|c| !c.is_empty()) {
        let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line.push_str(&format!("; {}", counts.join(", ")));
    }
    if let Some(e) = job["error"].as_str() {
        // A target's answer in it must not start a line of its own.
        line.push_str(&format!("; error: {}", indented(e)));
    }
    line
}
