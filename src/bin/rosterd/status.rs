//! `rosterd status`: a running daemon's /status shown readably, and with `--check`, what
//! in it needs an operator.

use anyhow::Result;
use rosterd::text::terminal_safe;
use std::io::Write as _;

use crate::args::DaemonArgs;
use crate::client::{call_daemon, excerpt, fail_unless_ok};
use crate::out_document;

/// One line on every connector shown, ahead of the lines of each: with hundreds of
/// tenants `rosterd status` runs to a thousand lines, and the one paused connector must
/// not have to be found among them. None without connectors.
fn connectors_summary(
    s: &serde_json::Value,
    shown: &dyn Fn(Option<&str>) -> bool,
) -> Option<String> {
    let named = |c: &serde_json::Value| {
        format!(
            "{}/{}",
            c["tenant"].as_str().unwrap_or("-"),
            c["name"].as_str().unwrap_or("-")
        )
    };
    let listed = |names: &[String]| {
        let more = names.len().saturating_sub(5);
        let mut text = names[..names.len().min(5)].join(", ");
        if more > 0 {
            text.push_str(&format!(" and {more} more"));
        }
        text
    };
    let of_shown = |key: &str| -> Vec<&serde_json::Value> {
        s[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| shown(c["tenant"].as_str()))
            .collect()
    };
    let (all, not_loaded) = (of_shown("connectors"), of_shown("unloaded_connectors"));
    let retired = of_shown("retired_connectors");
    let unloaded: Vec<String> = not_loaded.iter().map(|c| named(c)).collect();
    // Every tenant's, as listed below: a file that does not load may name none.
    let bad_files = s["connector_errors"].as_array().map_or(0, Vec::len);
    if all.is_empty() && unloaded.is_empty() && retired.is_empty() && bad_files == 0 {
        return None;
    }
    let (mut running, mut paused, mut other) = (0usize, Vec::new(), Vec::new());
    for c in &all {
        if c["paused"] == true {
            paused.push(named(c));
        } else if c["state"] == "running" {
            running += 1;
        } else {
            // The state's first words: "not started", "panicked (2 in a row)", "disabled".
            let state = c["state"].as_str().unwrap_or("-");
            let state = state.split(':').next().unwrap_or(state);
            other.push(format!("{} {state}", named(c)));
        }
    }
    let mut parts = vec![format!("{running} running")];
    if !paused.is_empty() {
        parts.push(format!("{} PAUSED ({})", paused.len(), listed(&paused)));
    }
    if !other.is_empty() {
        parts.push(format!("{} not running ({})", other.len(), listed(&other)));
    }
    if !unloaded.is_empty() {
        parts.push(format!(
            "{} NOT LOADED ({})",
            unloaded.len(),
            listed(&unloaded)
        ));
    }
    if bad_files > 0 {
        parts.push(format!(
            "{} NOT LOADING (below)",
            rosterd::text::plural(bad_files as u64, "connector file")
        ));
    }
    let lettered: Vec<(String, u64)> = all
        .iter()
        .chain(&not_loaded)
        .chain(&retired)
        .map(|c| (named(c), c["dead_letters"].as_u64().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let mut line = format!("connectors: {}", parts.join(", "));
    if !lettered.is_empty() {
        let total: u64 = lettered.iter().map(|(_, n)| n).sum();
        let names: Vec<String> = lettered.iter().map(|(c, n)| format!("{c} {n}")).collect();
        line.push_str(&format!("; dead letters {total} ({})", listed(&names)));
    }
    Some(line)
}

/// A `/status` text field, `-` when absent.
fn str_of(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or("-").to_owned()
}

/// A `/status` time, to the second, as the log writes them; `-` when absent.
fn time_of(v: &serde_json::Value) -> String {
    v.as_str().map_or("-".to_owned(), rfc3339)
}

/// A schedule's last run: its time, or `never` ("last run -" said nothing).
fn last_run_at(schedule: &serde_json::Value) -> String {
    match schedule["last_run"] {
        serde_json::Value::Null => "never".to_owned(),
        ref at => time_of(at),
    }
}

/// `/status`'s `backup`, in a line: the newest backup, one being written, the last failure.
fn backup_line(b: &serde_json::Value) -> String {
    let mut line = format!("backup (into {}): ", str_of(&b["dir"]));
    match b["last_path"].as_str() {
        Some(path) => line.push_str(&format!(
            "last written {} ({path}{})",
            time_of(&b["last_success_at"]),
            b["last_bytes"]
                .as_u64()
                .map(|n| format!(", {:.1} MiB", n as f64 / 1_048_576.0))
                .unwrap_or_default()
        )),
        None => line.push_str("none written yet"),
    }
    if let Some(since) = b["running_since"].as_str() {
        line.push_str(&format!("; one is being written since {}", rfc3339(since)));
    }
    if let Some(e) = b["last_error"].as_str() {
        line.push_str(&format!(
            "; FAILED at {}: {}",
            time_of(&b["last_error_at"]),
            indented(e)
        ));
    }
    line
}

pub(crate) fn print_status(
    daemon: &DaemonArgs,
    raw: bool,
    only: &[String],
    check: bool,
) -> Result<()> {
    let s = show_status(daemon, raw, only)?;
    if !check {
        return Ok(());
    }
    let attention = needing_attention(&s, only);
    if attention.is_empty() {
        return Ok(());
    }
    for line in &attention {
        note!("needs attention: {line}");
    }
    Err(NeedsAttention(attention.len()).into())
}

/// `status --check` found something for an operator: exit 3, apart from 1 (the daemon
/// unreachable, its store failed) and 2 (clap's, for a command it cannot parse).
#[derive(Debug)]
pub(crate) struct NeedsAttention(usize);

impl std::fmt::Display for NeedsAttention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} thing(s) need attention", self.0)
    }
}

impl std::error::Error for NeedsAttention {}

/// What in a `/status` document needs an operator, one line each; with `only`, of those
/// tenants and what belongs to none.
fn needing_attention(s: &serde_json::Value, only: &[String]) -> Vec<String> {
    let shown = |t: &serde_json::Value| tenant_shown(only, t.as_str());
    let mut out = Vec::new();
    if s["config_file_error"].is_string() {
        out.push("config.toml as edited would not load: a restart would fail".to_owned());
    }
    for refusal in s["restart_refusals"].as_array().into_iter().flatten() {
        out.push(format!(
            "a restart would fail: {}",
            refusal.as_str().unwrap_or("?")
        ));
    }
    if let Some(errors) = s["reload_errors"].as_object() {
        for part in errors.keys() {
            out.push(format!("the last reload did not apply {part}"));
        }
    }
    let files = s["connector_errors"].as_array().map_or(0, Vec::len);
    if files > 0 {
        out.push(format!(
            "{} not loading",
            rosterd::text::plural(files as u64, "connector file")
        ));
    }
    for c in s["unloaded_connectors"].as_array().into_iter().flatten() {
        if shown(&c["tenant"]) {
            // Its letters, as a retired connector's below: they are in reach, and wait.
            let letters = match c["dead_letters"].as_u64().unwrap_or(0) {
                0 => String::new(),
                n => format!(" (it holds {})", rosterd::text::plural(n, "dead letter")),
            };
            out.push(format!(
                "connector {}/{} is not loaded{letters}",
                str_of(&c["tenant"]),
                str_of(&c["name"])
            ));
        }
    }
    // Refused requests, personal data, kept until discarded: as much the operator's as
    // a running connector's.
    for c in s["retired_connectors"].as_array().into_iter().flatten() {
        if let Some(n) = c["dead_letters"]
            .as_u64()
            .filter(|&n| n > 0 && shown(&c["tenant"]))
        {
            out.push(format!(
                "retired connector {}/{} holds {}",
                str_of(&c["tenant"]),
                str_of(&c["name"]),
                rosterd::text::plural(n, "dead letter")
            ));
        }
    }
    for c in s["connectors"].as_array().into_iter().flatten() {
        if !shown(&c["tenant"]) {
            continue;
        }
        let name = format!("{}/{}", str_of(&c["tenant"]), str_of(&c["name"]));
        if let Some(reason) = c["held_by_guard"].as_str() {
            out.push(format!("connector {name} is {reason}"));
        } else if c["paused"] == true {
            out.push(format!("connector {name} is paused"));
        } else if c["next_retry_at"].is_string() {
            // Failing before it pauses: the pause comes only after `pause_after_failures`.
            out.push(format!("connector {name} is retrying a failed request"));
        }
        if let Some(n) = c["dead_letters"].as_u64().filter(|&n| n > 0) {
            out.push(format!(
                "connector {name} holds {}",
                rosterd::text::plural(n, "dead letter")
            ));
        }
        if c["file_error"].is_string() {
            out.push(format!(
                "connector {name}'s file does not load (it runs on the one before)"
            ));
        }
    }
    for (tenant, t) in s["tenants"].as_object().into_iter().flatten() {
        if tenant_shown(only, Some(tenant)) && t["bundle"]["reload_error"].is_string() {
            out.push(format!("tenant {tenant}'s bundle did not reload"));
        }
    }
    if s["backup"]["last_error"].is_string() {
        out.push("the last backup failed".to_owned());
    }
    out
}

/// Whether `status --tenant` (`only`) shows what belongs to `tenant` (None: to none).
fn tenant_shown(only: &[String], tenant: Option<&str>) -> bool {
    only.is_empty() || tenant.is_some_and(|t| only.iter().any(|o| o == t))
}

/// Print the status; the document, for `--check`.
fn show_status(daemon: &DaemonArgs, raw: bool, only: &[String]) -> Result<serde_json::Value> {
    let (status, s) = call_daemon(daemon, None, reqwest::Method::GET, "/status", None)?;
    fail_unless_ok(status, &s)?;
    // Another service on the port (a proxy, a wrong --url) must not read as a healthy,
    // empty rosterd, to a person or to a script checking the exit code.
    // A failed store leaves only what failed (`store.error`), which is what to show then.
    let whole = s["tenants"].is_object() && s["connectors"].is_array();
    if !(s["version"].is_string() && (whole || s["store"]["error"].is_object())) {
        anyhow::bail!(
            "the answer at /status is not rosterd's status document (is the address that of rosterd?): {}",
            excerpt(&s)
        );
    }
    if raw {
        out_document(&(serde_json::to_string_pretty(&s)? + "\n"))?;
        healthy_store(&s)?;
        return Ok(s);
    }
    // A mistyped tenant must not read as a tenant with nothing wrong.
    if let Some(tenants) = s["tenants"].as_object()
        && let Some(unknown) = only.iter().find(|t| !tenants.contains_key(*t))
    {
        let mut known: Vec<&str> = tenants.keys().map(String::as_str).collect();
        let more = known.len().saturating_sub(10);
        known.truncate(10);
        anyhow::bail!(
            "the daemon has no tenant {unknown:?}; its tenants: {}{}",
            known.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    let shown = |tenant: Option<&str>| tenant_shown(only, tenant);
    let up = s["uptime_seconds"].as_i64().unwrap_or(0);
    outln!(
        "rosterd {}  up {}h{:02}m  store {:.1} MiB{}",
        str_of(&s["version"]),
        up / 3600,
        (up % 3600) / 60,
        s["store"]["size_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        if s["draining"] == true {
            "  DRAINING"
        } else {
            ""
        }
    )?;
    if let Some(run) = s["unclean_stop"].as_object() {
        // A run file that no longer reads gives nulls.
        let pid = run
            .get("pid")
            .and_then(serde_json::Value::as_u64)
            .map_or("?".to_owned(), |p| p.to_string());
        let text = |k: &str| {
            run.get(k)
                .and_then(serde_json::Value::as_str)
                .unwrap_or("?")
        };
        outln!(
            "started after a run that did NOT stop cleanly (killed, crashed or its machine went down): pid {pid}, started {}, last alive {} (it ended within a minute after), version {}; `journalctl _PID={pid}` shows how it ended",
            text("started_at"),
            text("alive_at"),
            text("version"),
        )?;
    }
    if let Some(e) = s["config_file_error"].as_str() {
        outln!(
            "CONFIG FILE as edited would NOT load (a restart would fail; rosterd check-config):\n    {}",
            e.replace('\n', "\n    ")
        )?;
    } else if s["config_changed_since_start"] == true {
        let waiting: Vec<String> = s["config_keys_waiting_for_restart"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect();
        if waiting.is_empty() {
            // A daemon from before the keys were listed (a CLI upgraded ahead of it).
            outln!(
                "config file changed since start: what a reload does not apply waits for the next restart (rosterd check-config first)"
            )?;
        } else {
            outln!(
                "config file changed since start: {} {} only at the next restart, what the daemon started with staying in force until then, but for a token_env a reload removed, which stays out of force; a reload applies only the tenants' token_hashes and a token_env removed (rosterd check-config first)",
                rosterd::config::waiting_list(&waiting),
                if waiting.len() == 1 {
                    "applies"
                } else {
                    "apply"
                },
            )?;
        }
    }
    for refusal in s["restart_refusals"].as_array().into_iter().flatten() {
        outln!(
            "A RESTART WOULD FAIL (found at the last reload; rosterd check-config says why):\n    {}",
            refusal.as_str().unwrap_or("?").replace('\n', "\n    ")
        )?;
    }
    if let Some(errors) = s["reload_errors"].as_object() {
        for (part, e) in errors {
            let what = match part.as_str() {
                "scim_tokens" => "SCIM TOKENS NOT reloaded",
                "api_keys" => "ROSTER API KEYS NOT reloaded",
                _ => part.as_str(),
            };
            outln!(
                "{what} ({}), those in force stay until a reload applies them:\n    {}",
                time_of(&e["at"]),
                str_of(&e["error"]).trim_end().replace('\n', "\n    ")
            )?;
        }
    }
    let store_error = &s["store"]["error"];
    if store_error.is_object() {
        outln!(
            "STORE FAILED at {}: {}\n    {}",
            str_of(&store_error["at"]),
            str_of(&store_error["error"]),
            str_of(&store_error["hint"])
        )?;
    }
    if let Some(summary) = connectors_summary(&s, &shown) {
        outln!("{summary}")?;
    }
    if let Some(tenants) = s["tenants"].as_object() {
        for (id, t) in tenants {
            if !shown(Some(id)) {
                continue;
            }
            outln!(
                "tenant {id}: {} users ({} active), {} groups, review queue {}, last change #{}",
                t["users"],
                t["active_users"],
                t["groups"],
                t["review_queue"],
                t["last_seq"]
            )?;
            let j = &t["running_job"];
            if j.is_object() {
                outln!(
                    "    job {} ({}) running since {}: overrides answer 409 until it ends",
                    str_of(&j["job_id"]),
                    str_of(&j["kind"]),
                    time_of(&j["started_at"])
                )?;
            }
            let b = &t["bundle"];
            if b.is_object() {
                outln!(
                    "    bundle {} version {} ({} archetypes), loaded {}",
                    str_of(&b["path"]),
                    str_of(&b["version"]),
                    b["archetypes"],
                    time_of(&b["loaded_at"])
                )?;
            }
            if let Some(since) = b["training_since"].as_str() {
                outln!(
                    "    a changed bundle is being trained since {since}; the one above stays in effect until it is ready"
                )?;
            }
            if !b["reload_error"].is_null() {
                // TOML errors span lines (the line and a caret under it): keep them
                // indented under their tenant.
                outln!(
                    "    bundle NOT reloaded ({}), the one above stays in effect:\n        {}",
                    time_of(&b["reload_error_at"]),
                    indented(&str_of(&b["reload_error"]))
                )?;
            }
        }
    }
    // Taken out of config.toml, by a merge that dropped its block as readily as on purpose:
    // its IdP is refused as if its token were wrong, and only the start's WARN said why.
    for u in s["undeclared_tenants"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        if !shown(u["tenant"].as_str()) {
            continue;
        }
        outln!(
            "tenant {}: NOT DECLARED in config.toml, so neither served (its IdP's requests answer 401) nor sent anywhere; the store keeps its {} and {}. Declare it again and restart to serve it as it was.",
            str_of(&u["tenant"]),
            rosterd::text::plural(u["users"].as_u64().unwrap_or(0), "user"),
            rosterd::text::plural(u["groups"].as_u64().unwrap_or(0), "group"),
        )?;
    }
    for c in s["connectors"].as_array().cloned().unwrap_or_default() {
        if !shown(c["tenant"].as_str()) {
            continue;
        }
        let paused = match (&c["paused"], c["paused_until"].as_str()) {
            (serde_json::Value::Bool(true), Some(until)) => {
                Some(format!("PAUSED until {}", rfc3339(until)))
            }
            // A pause without an end waits for `rosterd resume` or a reload.
            (serde_json::Value::Bool(true), None) => Some("PAUSED until resumed".to_owned()),
            _ => None,
        };
        // A paused connector's task runs, but sends nothing: "running, PAUSED" read as a
        // contradiction, and the summary line above counts it apart from the running;
        // "paused, PAUSED until resumed" (a refusal pause kept across a restart) said it
        // twice.
        let state = match (str_of(&c["state"]), paused) {
            (state, None) => state,
            (state, Some(paused)) if state == "running" || state == "paused" => paused,
            (state, Some(paused)) => format!("{state}, {paused}"),
        };
        outln!(
            "connector {} ({}, tenant {}){}: {state}",
            str_of(&c["name"]),
            str_of(&c["kind"]),
            str_of(&c["tenant"]),
            if c["dry_run"] == true { " DRY RUN" } else { "" },
        )?;
        outln!(
            "    cursor #{}  lag {} events / {:.1} s  delivered {}  retries {}  dead letters {}  last success {}",
            c["cursor"],
            c["lag_events"],
            c["lag_seconds"].as_f64().unwrap_or(0.0),
            c["delivered"],
            c["retries"],
            c["dead_letters"],
            time_of(&c["last_success_at"])
        )?;
        if let Some(reason) = c["held_by_guard"].as_str() {
            outln!("    {}", indented(reason))?;
        }
        if let Some(at) = c["next_retry_at"].as_str() {
            outln!(
                "    retrying: next attempt at {} (its backoff, or the target's Retry-After)",
                rfc3339(at)
            )?;
        }
        if let Some(at) = c["next_write_at"].as_str() {
            outln!("    next scheduled write at {}", rfc3339(at))?;
        }
        // The hold's reason is its last error too, until another error comes: said once.
        if !c["last_error"].is_null() && c["last_error"] != c["held_by_guard"] {
            outln!(
                "    last error ({}): {}",
                time_of(&c["last_error_at"]),
                indented(&str_of(&c["last_error"]))
            )?;
        }
        if let Some(e) = c["file_error"].as_str() {
            outln!(
                "    its file no longer loads, so it runs on the config it was last loaded with: {}",
                indented(e)
            )?;
        }
    }
    for u in s["unloaded_connectors"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        if !shown(u["tenant"].as_str()) {
            continue;
        }
        let file = u["file"].as_str().map_or_else(
            || "no file names it; `rosterd retire` if it is gone for good".to_owned(),
            str::to_owned,
        );
        outln!(
            "connector {} (tenant {}): NOT LOADED ({file}), nothing is delivered; its cursor holds back compaction",
            str_of(&u["name"]),
            str_of(&u["tenant"]),
        )?;
        outln!(
            "    cursor #{}  lag {} events / {:.1} s  dead letters {}",
            u["cursor"],
            u["lag_events"],
            u["lag_seconds"].as_f64().unwrap_or(0.0),
            u["dead_letters"]
        )?;
    }
    for r in s["retired_connectors"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        if !shown(r["tenant"].as_str()) {
            continue;
        }
        let (name, tenant) = (str_of(&r["name"]), str_of(&r["tenant"]));
        outln!(
            "connector {name} (tenant {tenant}): RETIRED, nothing is delivered; {} kept in the store until discarded: `rosterd dead-letters --tenant {tenant} list {name}`, then `discard {name} --all`",
            rosterd::text::plural(r["dead_letters"].as_u64().unwrap_or(0), "dead letter"),
        )?;
    }
    let errors = s["connector_errors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !errors.is_empty() {
        // A file that does not load may name no tenant, or the wrong one: all are shown.
        // A connector already running on such a file goes on with its last good config
        // (its own lines say so); the file's other connectors are NOT started.
        // "NOT started" alone read as if the connectors running on such files had stopped.
        let what = "a connector already running on one goes on with the config it was last loaded with, as its own lines say; any other is NOT started";
        if only.is_empty() {
            outln!("connector files that do not load ({what}):")?;
        } else {
            outln!("connector files that do not load, of every tenant ({what}):")?;
        }
        for e in errors {
            outln!("    {}", indented(&str_of(&e)))?;
        }
    }
    if let Some(schedules) = s["schedules"].as_object() {
        for (name, sch) in schedules {
            if only.is_empty() {
                // "last run - (-)" said nothing twice.
                let mut last = last_run_at(sch);
                if !sch["last_run"].is_null() {
                    last.push_str(&format!(" ({})", indented(&str_of(&sch["last_result"]))));
                }
                outln!(
                    "schedule {name} ({}): last run {last}, next run {}",
                    str_of(&sch["cron"]),
                    time_of(&sch["next_run"])
                )?;
            } else {
                outln!(
                    "schedule {name} ({}): last run {}, next run {}",
                    str_of(&sch["cron"]),
                    last_run_at(sch),
                    time_of(&sch["next_run"])
                )?;
                // A store-wide schedule (the backup) has one result, the store's, whatever
                // tenants are asked for: "no result yet" per tenant read as if it never ran.
                let parts: Vec<&str> = match sch["results"][rosterd::schedule::BACKUP_PART].as_str()
                {
                    Some(_) => vec![rosterd::schedule::BACKUP_PART],
                    None => only.iter().map(String::as_str).collect(),
                };
                for t in parts {
                    match sch["results"][t].as_str() {
                        Some(result) => outln!("    {}", indented(result))?,
                        None => outln!("    {t}: no result yet")?,
                    }
                }
            }
            // A run that found a job still running: the result above is the last job's.
            if let Some(at) = sch["last_skipped_at"].as_str() {
                outln!(
                    "    last skipped {} ({})",
                    rfc3339(at),
                    indented(&str_of(&sch["last_skipped"]))
                )?;
            }
        }
    }
    if only.is_empty() && s["backup"].is_object() {
        outln!("{}", backup_line(&s["backup"]))?;
    }
    healthy_store(&s)?;
    Ok(s)
}

/// A TOML error spans lines (the line and a caret under it): its continuation lines go
/// under the entry they belong to, not at the margin where the next entry starts.
pub(crate) fn indented(text: &str) -> String {
    text.trim_end().replace('\n', "\n        ")
}

/// A failed store fails the command too, after the status is shown: a script that
/// checks `rosterd status`'s exit code must not read a daemon refusing writes as well.
fn healthy_store(s: &serde_json::Value) -> Result<()> {
    if s["store"]["error"].is_object() {
        anyhow::bail!(
            "the store has failed (see above): writes are refused until rosterd is restarted"
        );
    }
    Ok(())
}

/// A time from /status as the daemon's log shows it: RFC 3339 to the second (the
/// document carries nanoseconds). Anything else is shown as it came.
fn rfc3339(t: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|t| rosterd::dispatch::rfc3339(t.with_timezone(&chrono::Utc)))
        .unwrap_or_else(|_| t.to_owned())
}
