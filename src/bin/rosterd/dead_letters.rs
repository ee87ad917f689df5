//! `rosterd dead-letters`: list, replay and discard a connector's dead letters on a
//! running daemon, one by one or many a call.

use anyhow::{Context, Result};
use rosterd::text::terminal_safe;
use std::io::Write as _;

use crate::args::{DaemonArgs, DeadLetterCommand};
use crate::causes;
use crate::client::{call_daemon, call_daemon_within, fail_unless_ok};
use crate::status::indented;

/// Dead letters a `replay --all` sends the daemon at once: it starts letters for about
/// 20 s a call and hands back those it did not begin.
const REPLAY_BATCH: usize = 200;
/// Letters refused again, with none replayed, after which `replay --all` stops.
const REPLAY_GIVE_UP: usize = 20;
/// How long a replay waits for the daemon's answer: a letter it began near the end of its
/// 20 s takes what its requests take (each up to the connector's `timeout_ms`), and a
/// letter given up on goes on in the daemon, so the next call would find it in hand.
const REPLAY_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

pub(crate) fn dead_letters(
    daemon: &DaemonArgs,
    tenant: &str,
    command: DeadLetterCommand,
) -> Result<()> {
    use reqwest::Method;
    let base = "/api/v1/roster/connectors";
    // Each letter of a connector, oldest first, a page at a time; says so when there are
    // none. The first request names no page, so a daemon from before paging (which
    // refuses parameters it does not take) answers it with every letter.
    let each = |connector: &str, f: &mut dyn FnMut(&serde_json::Value) -> Result<()>| {
        let mut path = format!("{base}/{connector}/dead-letters");
        let mut none = true;
        loop {
            let (status, body) = call_daemon(daemon, Some(tenant), Method::GET, &path, None)?;
            fail_unless_ok(status, &body)?;
            for l in body["dead_letters"].as_array().into_iter().flatten() {
                none = false;
                f(l)?;
            }
            match body["next_after"].as_u64() {
                Some(after) => {
                    path = format!("{base}/{connector}/dead-letters?limit=1000&after={after}")
                }
                None => break,
            }
        }
        if none {
            outln!("{connector}: no dead letters")?;
        }
        Ok::<_, anyhow::Error>(())
    };
    // A command's one id, or with `--all` every letter listed now: after an outage there
    // can be hundreds, which is one command, not a loop by hand.
    let ids = |connector: &str, id: Option<u64>, all: bool, verb: &str| -> Result<Vec<u64>> {
        match id {
            Some(id) => Ok(vec![id]),
            None if !all => anyhow::bail!(
                "give the dead letter's id (12, or '#12' in quotes: unquoted, the shell drops #12 as a comment), or --all to {verb} every one"
            ),
            None => {
                let mut ids = Vec::new();
                each(connector, &mut |l| {
                    ids.extend(l["id"].as_u64());
                    Ok(())
                })?;
                Ok(ids)
            }
        }
    };
    match command {
        DeadLetterCommand::List { connector } => {
            let mut listed = 0usize;
            each(&connector, &mut |l| {
                listed += 1;
                outln!(
                    "#{} {} seq {} {}/{}: {}",
                    l["id"],
                    l["at"].as_str().unwrap_or_default(),
                    l["event"]["seq"],
                    l["event"]["resource_type"].as_str().unwrap_or_default(),
                    l["event"]["id"].as_str().unwrap_or_default(),
                    indented(l["reason"].as_str().unwrap_or_default())
                )?;
                if let Some(r) = l["request"].as_object() {
                    outln!(
                        "    sent: {} {}",
                        r["method"].as_str().unwrap_or_default(),
                        r["url"].as_str().unwrap_or_default()
                    )?;
                }
                if let Some(r) = l["response"].as_object() {
                    outln!(
                        "    answer: {} {}",
                        r["status"],
                        // A line of the answer must not read as a line of the listing.
                        indented(r["body"].as_str().unwrap_or_default())
                    )?;
                }
                Ok(())
            })?;
            // Past a screenful, how many there are is the first thing asked.
            if listed > 0 {
                outln!("{connector}: {listed} dead letter(s)")?;
            }
        }
        DeadLetterCommand::Replay { connector, id, all } => {
            let ids = ids(&connector, id, all, "replay")?;
            // Each letter's answer, from a single replay or from a batch's results.
            let mut failed = 0usize;
            // Read between calls, while `report` holds `failed`.
            let replayed = std::cell::Cell::new(0usize);
            let refused_again = std::cell::Cell::new(0usize);
            let mut report =
                |id: u64, status: reqwest::StatusCode, body: &serde_json::Value| -> Result<()> {
                    if let Err(e) = fail_unless_ok(status, body) {
                        // One refusal does not stop the rest: each letter is its own object.
                        failed += 1;
                        if body["error"] == "target_refused" {
                            refused_again.set(refused_again.get() + 1);
                        }
                        if status == reqwest::StatusCode::NOT_FOUND && body["error"] == "not_found"
                        {
                            note!("{connector}: no dead letter #{id}: {}", causes(&e));
                        } else {
                            note!(
                                "{connector}: dead letter #{id} not replayed, it stays: {}",
                                causes(&e)
                            );
                        }
                        return Ok(());
                    }
                    replayed.set(replayed.get() + 1);
                    let what = match body["sent"].as_str() {
                        Some("current_state") => "the object's current state",
                        _ => "the original event",
                    };
                    outln!("{connector}: dead letter #{id} replayed ({what} sent) and removed")?;
                    if let Some(note) = body["note"].as_str() {
                        outln!("warning: {note}")?;
                    }
                    Ok(())
                };
            let replay_one = |id: u64| {
                call_daemon_within(
                    daemon,
                    Some(tenant),
                    Method::POST,
                    &format!("{base}/{connector}/dead-letters/{id}/replay"),
                    None,
                    REPLAY_WAIT,
                )
            };
            // Many at once: the daemon reads the change log once a call, not once a letter.
            // One alone goes by itself.
            let mut left: std::collections::VecDeque<u64> = ids.iter().copied().collect();
            let mut one_by_one = ids.len() == 1;
            let mut unaccounted = 0usize;
            while let Some(&next) = left.front() {
                // A target that still refuses everything (the pause for refusals was
                // resumed, or the letters replayed, before the fix) would meet every
                // letter, each refused again: the first call, or 20 alone, say so.
                if replayed.get() == 0 && refused_again.get() >= REPLAY_GIVE_UP {
                    anyhow::bail!(
                        "the target refused again the {} dead letters replayed first, and took none: it still refuses everything, so the other {} were not tried. Fix the target (`rosterd dead-letters --tenant {tenant} list {connector}` shows its answers), then run `replay --all` again",
                        refused_again.get(),
                        left.len()
                    );
                }
                if one_by_one {
                    left.pop_front();
                    let (status, body) = replay_one(next)?;
                    report(next, status, &body)?;
                    continue;
                }
                let batch: Vec<u64> = left.drain(..left.len().min(REPLAY_BATCH)).collect();
                let (status, body) = call_daemon_within(
                    daemon,
                    Some(tenant),
                    Method::POST,
                    &format!("{base}/{connector}/dead-letters:replay"),
                    Some(serde_json::json!({ "ids": batch })),
                    REPLAY_WAIT,
                )
                .with_context(|| {
                    format!(
                        "the daemon may still be replaying dead letters #{} to #{}; once it is done, `replay --all` again tries those that stay",
                        batch[0],
                        batch[batch.len() - 1]
                    )
                })?;
                let Some(results) = batch_results(status, &body, &batch)? else {
                    one_by_one = true;
                    for id in batch.into_iter().rev() {
                        left.push_front(id);
                    }
                    continue;
                };
                let mut answered = std::collections::HashSet::new();
                for (id, status, r) in &results {
                    answered.insert(*id);
                    report(*id, *status, r)?;
                }
                if answered.is_empty() {
                    anyhow::bail!(
                        "the daemon replayed none of the {} dead letters asked for: {body}",
                        batch.len()
                    );
                }
                // Asked again: those of this call it handed back unanswered, so each call
                // leaves fewer and the loop ends whatever the daemon says.
                let handed_back: std::collections::HashSet<u64> = body["not_attempted"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(serde_json::Value::as_u64)
                    .collect();
                let unanswered = batch.iter().filter(|id| !answered.contains(id));
                for &id in unanswered.clone().filter(|id| !handed_back.contains(id)) {
                    // Neither answered nor handed back: not known to be replayed.
                    unaccounted += 1;
                    note!(
                        "{connector}: dead letter #{id} not known to be replayed, it may stay: the daemon's answer does not say what became of it"
                    );
                }
                for &id in unanswered.rev().filter(|id| handed_back.contains(id)) {
                    left.push_front(id);
                }
            }
            let failed = failed + unaccounted;
            if failed > 0 {
                anyhow::bail!(
                    "{failed} of {} dead letters were not replayed (see above)",
                    ids.len()
                );
            }
            if all && !ids.is_empty() {
                outln!("{connector}: {} dead letter(s) replayed", replayed.get())?;
            }
        }
        DeadLetterCommand::Discard { connector, id, all } => {
            let ids = ids(&connector, id, all, "discard")?;
            let (mut kept, mut discarded, mut unaccounted) = (0usize, 0usize, 0usize);
            let mut report = |id: u64, status: reqwest::StatusCode, body: &serde_json::Value| {
                match fail_unless_ok(status, body) {
                    Ok(()) => {
                        discarded += 1;
                        outln!("{connector}: dead letter #{id} discarded")?;
                    }
                    Err(e) if !all => return Err(e),
                    // Gone since it was listed (a replay went through): nothing stays.
                    Err(e) if status == reqwest::StatusCode::NOT_FOUND => {
                        note!("{connector}: no dead letter #{id} any more: {}", causes(&e));
                    }
                    // One held by another request (a replay sending it, another discard
                    // dropping it) does not stop the rest; which of them ends it is not
                    // known here.
                    Err(e) if status == reqwest::StatusCode::CONFLICT => {
                        kept += 1;
                        note!(
                            "{connector}: dead letter #{id} not discarded by this run, another request holds it: {}",
                            causes(&e)
                        );
                    }
                    Err(e) => {
                        kept += 1;
                        note!(
                            "{connector}: dead letter #{id} not discarded, it stays: {}",
                            causes(&e)
                        );
                    }
                }
                Ok(())
            };
            // All of them: as many a call as the daemon takes, in one store write each.
            let mut one_by_one = !all;
            let mut left: &[u64] = &ids;
            while !one_by_one && !left.is_empty() {
                let (batch, rest) = left.split_at(left.len().min(rosterd::api::REPLAY_BATCH_MAX));
                let (status, body) = call_daemon(
                    daemon,
                    Some(tenant),
                    Method::POST,
                    &format!("{base}/{connector}/dead-letters:discard"),
                    Some(serde_json::json!({ "ids": batch })),
                )?;
                let Some(results) = batch_results(status, &body, batch)? else {
                    one_by_one = true;
                    break;
                };
                let mut answered = std::collections::HashSet::new();
                for (id, status, r) in &results {
                    answered.insert(*id);
                    report(*id, *status, r)?;
                }
                for &id in batch.iter().filter(|id| !answered.contains(id)) {
                    unaccounted += 1;
                    note!(
                        "{connector}: dead letter #{id} not known to be discarded, it may stay: the daemon's answer does not say what became of it"
                    );
                }
                left = rest;
            }
            if one_by_one {
                for &id in left {
                    let (status, body) = call_daemon(
                        daemon,
                        Some(tenant),
                        Method::DELETE,
                        &format!("{base}/{connector}/dead-letters/{id}"),
                        None,
                    )?;
                    report(id, status, &body)?;
                }
            }
            let kept = kept + unaccounted;
            if kept > 0 {
                anyhow::bail!(
                    "{kept} of {} dead letters were not discarded (see above)",
                    ids.len()
                );
            }
            if all && !ids.is_empty() {
                outln!("{connector}: {discarded} dead letter(s) discarded")?;
            }
        }
    }
    Ok(())
}

/// The letters' outcomes in a batch call's answer (`dead-letters:replay`, `:discard`):
/// each letter this call asked for, once, with the status the daemon gave it. `None`
/// from a daemon older than the call, which has no such endpoint: send one a call.
fn batch_results(
    status: reqwest::StatusCode,
    body: &serde_json::Value,
    batch: &[u64],
) -> Result<Option<Vec<(u64, reqwest::StatusCode, serde_json::Value)>>> {
    if status == reqwest::StatusCode::NOT_FOUND
        && body["message"]
            .as_str()
            .is_some_and(|m| m.contains("no such endpoint"))
    {
        return Ok(None);
    }
    // The connector as a whole (unknown, not running): every letter would fail alike.
    fail_unless_ok(status, body)?;
    let mut answered = std::collections::HashSet::new();
    let mut out = Vec::new();
    for r in body["results"].as_array().into_iter().flatten() {
        let (Some(id), Some(code)) = (r["id"].as_u64(), r["status"].as_u64()) else {
            anyhow::bail!("the daemon's answer lists a result without id or status: {r}");
        };
        // Each letter counts once, and only one this call asked for.
        if !batch.contains(&id) || !answered.insert(id) {
            continue;
        }
        let status = u16::try_from(code)
            .ok()
            .and_then(|c| reqwest::StatusCode::from_u16(c).ok())
            .unwrap_or(reqwest::StatusCode::INTERNAL_SERVER_ERROR);
        out.push((id, status, r.clone()));
    }
    Ok(Some(out))
}
