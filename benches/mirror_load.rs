#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Mirror load benchmark: the real daemon (child process) mirroring SCIM users to a real
//! loopback OneRoster 1.2 server (in this process, on a runtime of its own).
//!
//! 1. Throughput: seed `BENCH_CHANGES` (default 100000) users over SCIM with no connector,
//!    then drop the OneRoster connector file in and SIGHUP the daemon; time from the reload
//!    until the target holds every user (PUT/s), and until the cursor has caught up.
//! 2. Latency: with the connector caught up, PATCH `title` of distinct users at a steady
//!    `BENCH_RATE` per second (default 500) for `BENCH_SECONDS` (default 20); a change's
//!    delay is when its PUT arrived at the target (recorded by the target, not polled)
//!    minus when the client got the SCIM 2xx.
//! 3. Full reconciliation (unless `BENCH_FULL=0`): `scim:sync {"full": true}`, every object
//!    sent again, up to `concurrency` at once, each first checked against the change log.
//!    `BENCH_FULL_DELAY_MS` (default 0) makes the target hold back every answer of the run
//!    that long: a target across a network.
//!
//! 4. Dead letters (unless `BENCH_LETTERS=0`; default 10000): the target refuses every PUT
//!    while that many users' titles are PATCHed, so each change is set aside; then it takes
//!    them again, and `rosterd dead-letters replay --all` (the CLI, as an operator runs it)
//!    is timed until every letter is replayed.
//!
//! `BENCH_CONCURRENCY` (default 32) is the connector's `concurrency`;
//! `BENCH_SEED_CONCURRENCY` (default 64) the SCIM creates in flight while seeding.
//! `BENCH_SLOW_MS` (default 0: off) makes the target hold back its answer to the first PUT
//! of every `BENCH_SLOW_EVERY`-th user (default 1000) for that long during the throughput
//! run: a target with a rare slow answer.
//! `BENCH_GUARD_USERS` (default 0: none) gives the connector a `[guard]` of that many
//! users in 60 minutes (the seed deprovisions no one, so it never holds: what it costs).
//! `cargo bench --bench mirror_load`. Prints a Markdown table.

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};

mod common;
use common::{
    DaemonOptions, JWT_SECRET, RssSampler, TENANT, TOKEN, env_usize, percentile, rss_kib,
};

#[path = "../tests/support/oneroster.rs"]
mod oneroster;
use oneroster::{Fault, Kind, OneRosterOptions, OneRosterServer};

const CONNECTOR: &str = "sis";
/// Changes the dispatcher reads per batch (`BATCH` in src/dispatch/mod.rs).
const DISPATCH_BATCH: u64 = 1000;

fn user_body(i: usize) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
                    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
        "userName": format!("user{i:07}@bench.example"),
        "externalId": format!("ext-{i}"),
        "name": {"givenName": "Bench", "familyName": format!("User{i}")},
        "emails": [{"value": format!("user{i:07}@bench.example"), "type": "work", "primary": true}],
        "title": "Engineer",
        "active": true,
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"department": "R&D"},
    })
}

fn connector_file(target: &OneRosterServer, concurrency: usize, guard_users: usize) -> String {
    let guard = match guard_users {
        0 => String::new(),
        n => format!("[guard]\nusers = {n}\nminutes = 60\n"),
    };
    format!(
        r#"kind = "oneroster"
name = "{CONNECTOR}"
tenant = "{TENANT}"
concurrency = {concurrency}
timeout_ms = 10000
[retry]
initial_delay_ms = 50
max_delay_ms = 1000
pause_after_failures = 1000
pause_secs = 1
{guard}[oneroster]
base_url = "{base}"
org_sourced_id = "{org}"
course_sourced_id = "course-rosterd"
[oneroster.auth]
token_env = "OR_TOKEN"
"#,
        base = target.base_url,
        org = oneroster::DEFAULT_ORG,
    )
}

/// A SCIM PATCH of the user at `url`'s title.
async fn retitle(
    client: &reqwest::Client,
    url: &str,
    auth: &str,
    title: &str,
) -> reqwest::Response {
    let body = json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "replace", "path": "title", "value": title}]});
    client
        .patch(url)
        .header("authorization", auth)
        .json(&body)
        .send()
        .await
        .expect("PATCH")
}

fn jwt() -> String {
    let claims = json!({"sub": "bench", "tenant": TENANT, "scope": "roster:admin",
                        "aud": "bench", "exp": Utc::now().timestamp() + 86_400});
    rosterd::api::jwt::testing::hs256_token(JWT_SECRET.as_bytes(), &claims)
}

fn sid(scim_id: &str) -> String {
    rosterd::connectors::sourced_id(TENANT, &format!("User/{scim_id}"))
}

/// utime + stime of a process (`"self"` or a pid), in seconds.
fn cpu_secs(pid: &str) -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let hz = *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    });
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(") ")?.1.to_owned();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let u: f64 = f.get(11)?.parse().ok()?;
            let k: f64 = f.get(12)?.parse().ok()?;
            Some((u + k) / hz)
        })
        .unwrap_or(0.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn wall_ms(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e3
}

/// The connector's entry of the Roster API (cheaper than `/status`, which counts users).
async fn connector(client: &reqwest::Client, base: &str, token: &str) -> Value {
    client
        .get(format!("{base}/api/v1/roster/connectors/{CONNECTOR}"))
        .bearer_auth(token)
        .send()
        .await
        .expect("connector")
        .json()
        .await
        .expect("connector json")
}

/// The store's group-commit flush histogram from `/metrics`: (bucket bounds in seconds
/// with cumulative counts, count, sum).
async fn flushes(client: &reqwest::Client, base: &str) -> (Vec<(f64, u64)>, u64, f64) {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let (mut buckets, mut count, mut sum) = (Vec::new(), 0, 0.0);
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("rosterd_store_flush_seconds") else {
            continue;
        };
        let value = rest.rsplit(' ').next().unwrap_or("0");
        if let Some(le) = rest.strip_prefix("_bucket{le=\"") {
            let le = le.split('"').next().unwrap_or("+Inf");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            buckets.push((le, value.parse().unwrap_or(0)));
        } else if rest.starts_with("_count") {
            count = value.parse().unwrap_or(0);
        } else if rest.starts_with("_sum") {
            sum = value.parse().unwrap_or(0.0);
        }
    }
    (buckets, count, sum)
}

/// Flushes between two scrapes: "N flushes, mean / p50 ≤ / p99 ≤ in ms".
fn flush_summary(a: &(Vec<(f64, u64)>, u64, f64), b: &(Vec<(f64, u64)>, u64, f64)) -> String {
    let n = b.1.saturating_sub(a.1);
    if n == 0 {
        return "no flushes (or /metrics unavailable)".into();
    }
    let mean = (b.2 - a.2) / n as f64 * 1e3;
    let bound = |q: f64| {
        let want = (q * n as f64).ceil() as u64;
        b.0.iter()
            .map(|(le, c)| {
                let before = a.0.iter().find(|(l, _)| l == le).map_or(0, |x| x.1);
                (*le, c.saturating_sub(before))
            })
            .find(|(_, c)| *c >= want)
            .map_or(f64::INFINITY, |(le, _)| le * 1e3)
    };
    format!(
        "{n} flushes, mean {mean:.1} ms, p50 ≤ {} ms, p99 ≤ {} ms",
        bound(0.5),
        bound(0.99)
    )
}

fn main() {
    // The target gets a runtime (and threads) of its own, so the client's work does not
    // queue in front of its answers.
    let target_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("oneroster")
        .enable_all()
        .build()
        .expect("target runtime");
    let target = target_rt.block_on(OneRosterServer::start(OneRosterOptions {
        log_bodies: false,
        log_capacity: 1000,
        ..OneRosterOptions::default()
    }));
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    client_rt.block_on(run(&target));
    drop(target);
    target_rt.shutdown_timeout(Duration::from_secs(2));
}

async fn run(target: &OneRosterServer) {
    let users = env_usize("BENCH_CHANGES", 100_000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 32);
    let seed_concurrency = env_usize("BENCH_SEED_CONCURRENCY", 64);
    let rate = env_usize("BENCH_RATE", 500).max(1);
    let slow_ms = env_usize("BENCH_SLOW_MS", 0);
    let slow_every = env_usize("BENCH_SLOW_EVERY", 1000).max(1);
    let seconds = env_usize("BENCH_SECONDS", 20);
    let load_at_start = loadavg();

    // No `[connectors] dir`: the default `connectors` beside the config, created with
    // the connector file after seeding (a named directory must exist at start).
    let daemon = common::start_daemon_with(&DaemonOptions {
        env: &[("OR_TOKEN", oneroster::DEFAULT_TOKEN)],
        ..DaemonOptions::default()
    });
    let pid = daemon.pid();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(seed_concurrency.max(64))
        .build()
        .expect("client");
    let auth = format!("Bearer {TOKEN}");
    let token = jwt();
    daemon.wait_ready(&client).await;

    // ---- Seed: users over SCIM, no connector yet. ----
    let (ids, seed_secs) =
        common::create_users(&client, daemon.scim(), users, seed_concurrency, user_body).await;
    let status = daemon.status(&client).await;
    let last_seq = status["tenants"][TENANT]["last_seq"].as_u64().unwrap_or(0);
    assert!(
        status["connectors"]
            .as_array()
            .is_some_and(|c| c.is_empty()),
        "no connector yet: {status}"
    );
    let rss_after_seed = rss_kib(pid, "VmRSS:");
    let hwm_after_seed = rss_kib(pid, "VmHWM:");
    let mut slow = 0;
    if slow_ms > 0 {
        for id in ids.iter().skip(slow_every / 2).step_by(slow_every) {
            target.inject(
                Fault::delay(Duration::from_millis(slow_ms as u64), 1)
                    .on_method("PUT")
                    .on_path(format!("/users/{}", sid(id))),
            );
            slow += 1;
        }
    }

    // ---- Throughput: the connector starts on a backlog of `users` changes. ----
    let dir = daemon.dir.path().join("connectors");
    std::fs::create_dir_all(&dir).expect("connectors dir");
    std::fs::write(
        dir.join(format!("{CONNECTOR}.toml")),
        connector_file(target, concurrency, env_usize("BENCH_GUARD_USERS", 0)),
    )
    .expect("connector file");
    let sampler = RssSampler::start(pid, rss_after_seed);
    let users_before = target.count(Kind::User);
    let puts_before = target.count_requests("PUT", "users");
    let flush0 = flushes(&client, &daemon.base).await;
    let (daemon_cpu0, self_cpu0) = (cpu_secs(&pid.to_string()), cpu_secs("self"));
    let t0 = Instant::now();
    let t0_wall = Utc::now();
    daemon.sighup();
    let deadline = Duration::from_secs(env_usize("BENCH_TIMEOUT_SECS", 1800) as u64);
    while target.count(Kind::User) < users_before + users {
        assert!(
            t0.elapsed() < deadline,
            "target holds {} of {users} users after {:?}",
            target.count(Kind::User) - users_before,
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_there = t0.elapsed();
    let (daemon_cpu1, self_cpu1) = (cpu_secs(&pid.to_string()), cpu_secs("self"));
    let caught = loop {
        let c = connector(&client, &daemon.base, &token).await;
        if c["lag_events"] == 0 && c["state"] == "running" {
            break c;
        }
        assert!(t0.elapsed() < deadline, "connector never caught up: {c}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let caught_up = t0.elapsed();
    let hwm_after_mirror = rss_kib(pid, "VmHWM:");
    let flush1 = flushes(&client, &daemon.base).await;
    let mirror_rss_max = sampler.stop();
    let put_total = target.count_requests("PUT", "users") - puts_before;
    target.clear_faults();

    // Where the time went: PUT arrivals per dispatcher batch (the log's seq order).
    let mut seq_of: HashMap<String, u64> = HashMap::with_capacity(users);
    let mut since = 0u64;
    let mut page_lat = Vec::new();
    loop {
        let t = Instant::now();
        let v: Value = client
            .get(format!(
                "{}/api/v1/roster/changes?since={since}&limit=1000",
                daemon.base
            ))
            .bearer_auth(&token)
            .send()
            .await
            .expect("changes")
            .json()
            .await
            .expect("changes json");
        let changes = v["changes"].as_array().cloned().unwrap_or_default();
        if changes.is_empty() {
            break;
        }
        if changes.len() == 1000 {
            page_lat.push(t.elapsed());
        }
        for c in &changes {
            if c["resource_type"] == "User" {
                seq_of.insert(
                    c["id"].as_str().unwrap_or_default().to_owned(),
                    c["seq"].as_u64().unwrap_or(0),
                );
            }
        }
        since = v["next_since"].as_u64().expect("next_since");
    }
    let mut arrivals: Vec<DateTime<Utc>> = Vec::with_capacity(users);
    let mut batches: HashMap<u64, Vec<DateTime<Utc>>> = HashMap::new();
    let mut rewritten = 0usize;
    for id in &ids {
        let st = target.stored(Kind::User, &sid(id)).expect("user at target");
        if st.writes != 1 {
            rewritten += 1;
        }
        arrivals.push(st.received_at);
        if let Some(seq) = seq_of.get(id) {
            batches
                .entry((seq - 1) / DISPATCH_BATCH)
                .or_default()
                .push(st.received_at);
        }
    }
    arrivals.sort();
    let first_put = wall_ms(t0_wall, arrivals[0]);
    let last_put = wall_ms(t0_wall, arrivals[arrivals.len() - 1]);
    let mut keys: Vec<u64> = batches.keys().copied().collect();
    keys.sort();
    let mut spans = Vec::new(); // first → last arrival within a batch
    let mut tails = Vec::new(); // 95th percentile arrival → last arrival within a batch
    let mut gaps = Vec::new(); // last arrival of a batch → first arrival of the next
    let mut prev_last: Option<DateTime<Utc>> = None;
    for k in &keys {
        let b = batches.get_mut(k).expect("batch");
        b.sort();
        let (first, last) = (b[0], b[b.len() - 1]);
        spans.push(wall_ms(first, last));
        tails.push(wall_ms(b[(b.len() - 1) * 95 / 100], last));
        if let Some(p) = prev_last {
            gaps.push(wall_ms(p, first));
        }
        prev_last = Some(last);
    }
    let stat = |v: &mut Vec<f64>| -> (f64, f64, f64, f64) {
        if v.is_empty() {
            return (0.0, 0.0, 0.0, 0.0);
        }
        v.sort_by(f64::total_cmp);
        let sum: f64 = v.iter().sum();
        (sum / v.len() as f64, v[v.len() / 2], v[v.len() - 1], sum)
    };
    let (span_mean, span_p50, span_max, _) = stat(&mut spans);
    let (tail_mean, _, tail_max, tail_sum) = stat(&mut tails);
    let (gap_mean, gap_p50, gap_max, gap_sum) = stat(&mut gaps);
    let put_secs = all_there.as_secs_f64();
    let puts_per_sec = users as f64 / put_secs;

    // ---- Latency: a steady rate of changes, each to a user of its own. ----
    let changes = (rate * seconds).min(users);
    if changes < rate * seconds {
        eprintln!(
            "note: only {users} users, so {changes} changes instead of {}",
            rate * seconds
        );
    }
    page_lat.sort();
    let hwm_after_reads = rss_kib(pid, "VmHWM:");
    let status_before = connector(&client, &daemon.base, &token).await;
    let flush2 = flushes(&client, &daemon.base).await;
    let retries_before = status_before["retries"].as_u64().unwrap_or(0);
    let run_tag = Utc::now().timestamp_millis();
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut handles = Vec::with_capacity(changes);
    let sending = Instant::now();
    for (i, id) in ids.iter().take(changes).enumerate() {
        interval.tick().await;
        let (client, auth, url) = (
            client.clone(),
            auth.clone(),
            format!("{}/Users/{id}", daemon.scim()),
        );
        let title = format!("Engineer {run_tag}-{i}");
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = retitle(&client, &url, &auth, &title).await;
            let acked = Utc::now();
            let took = t.elapsed();
            assert!(r.status().is_success(), "patch {i}: {}", r.status());
            let _ = r.bytes().await;
            (i, title, acked, took)
        }));
    }
    let mut sent = Vec::with_capacity(changes);
    for h in handles {
        sent.push(h.await.expect("patch task"));
    }
    let send_secs = sending.elapsed().as_secs_f64();
    let achieved = changes as f64 / send_secs;
    let mut pending: Vec<(usize, String, DateTime<Utc>)> = sent
        .iter()
        .map(|(i, title, acked, _)| (*i, title.clone(), *acked))
        .collect();
    let mut scim_lat: Vec<Duration> = sent.iter().map(|s| s.3).collect();
    scim_lat.sort();
    let mut delays_us: Vec<i64> = Vec::with_capacity(changes);
    let wait_from = Instant::now();
    let latency_wait = Duration::from_secs(env_usize("BENCH_LATENCY_WAIT_SECS", 300) as u64);
    while !pending.is_empty() && wait_from.elapsed() < latency_wait {
        pending.retain(|(i, title, acked)| {
            let st = target
                .stored(Kind::User, &sid(&ids[*i]))
                .expect("user at target");
            if st
                .value
                .pointer("/metadata/job_title")
                .and_then(Value::as_str)
                == Some(title)
            {
                delays_us.push(
                    (st.received_at - *acked)
                        .num_microseconds()
                        .unwrap_or(i64::MAX),
                );
                false
            } else {
                true
            }
        });
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let missing = pending.len();
    delays_us.sort_unstable();
    let negative = delays_us.iter().filter(|d| **d < 0).count();
    let delays: Vec<Duration> = delays_us
        .iter()
        .map(|d| Duration::from_micros((*d).max(0) as u64))
        .collect();
    let flush3 = flushes(&client, &daemon.base).await;
    let status_after = connector(&client, &daemon.base, &token).await;
    let rss_hwm = rss_kib(pid, "VmHWM:");

    // ---- A full reconciliation: every object sent again, up to `concurrency` at once,
    // each checked against the change log first (an object changed meanwhile is the
    // mirror's).
    let full_delay = env_usize("BENCH_FULL_DELAY_MS", 0);
    let full = if env_usize("BENCH_FULL", 1) > 0 {
        if full_delay > 0 {
            target.inject(
                Fault::delay(Duration::from_millis(full_delay as u64), 1)
                    .on_method("PUT")
                    .forever(),
            );
        }
        let puts_before = target.count_requests("PUT", "users");
        let t = Instant::now();
        let job: Value = client
            .post(format!("{}/api/v1/roster/scim:sync", daemon.base))
            .bearer_auth(&token)
            .json(&json!({"full": true}))
            .send()
            .await
            .expect("scim:sync")
            .json()
            .await
            .expect("scim:sync json");
        let url = format!(
            "{}/api/v1/roster/scim/jobs/{}",
            daemon.base,
            job["job_id"].as_str().expect("job_id")
        );
        let done = loop {
            let j: Value = client
                .get(&url)
                .bearer_auth(&token)
                .send()
                .await
                .expect("job")
                .json()
                .await
                .expect("job json");
            if j["status"] != "running" && j["status"] != "queued" {
                break j;
            }
            assert!(t.elapsed() < deadline, "the full run never ended: {j}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        target.clear_faults();
        Some((
            t.elapsed(),
            done,
            target.count_requests("PUT", "users") - puts_before,
        ))
    } else {
        None
    };

    // ---- Dead letters: a refusing target, then `replay --all`. ----
    let letters = env_usize("BENCH_LETTERS", 10_000).min(users);
    let replayed = if letters > 0 {
        target.inject(Fault::status(422, 0).forever().on_method("PUT"));
        let run_tag = Utc::now().timestamp_millis();
        let log_before = connector(&client, &daemon.base, &token).await["cursor"]
            .as_u64()
            .unwrap_or(0);
        let mut sent = futures_util::stream::iter(ids.iter().take(letters).map(|id| {
            let (client, auth, url) = (
                client.clone(),
                auth.clone(),
                format!("{}/Users/{id}", daemon.scim()),
            );
            async move {
                let r = retitle(&client, &url, &auth, &format!("Refused {run_tag}")).await;
                assert!(r.status().is_success(), "PATCH {}", r.status());
            }
        }))
        .buffer_unordered(seed_concurrency);
        while sent.next().await.is_some() {}
        let t = Instant::now();
        let set_aside = loop {
            let c = connector(&client, &daemon.base, &token).await;
            if c["lag_events"] == 0 && c["dead_letters"].as_u64() >= Some(letters as u64) {
                break c;
            }
            assert!(
                t.elapsed() < deadline,
                "the letters were never set aside: {c}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        target.clear_faults();
        let t = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rosterd"))
            .args([
                "dead-letters",
                "--tenant",
                TENANT,
                "replay",
                CONNECTOR,
                "--all",
            ])
            .args(["--url", &daemon.base, "--token", &token])
            .output()
            .expect("rosterd dead-letters replay --all");
        let took = t.elapsed();
        assert!(
            out.status.success(),
            "replay --all: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after = connector(&client, &daemon.base, &token).await;
        let log_span = set_aside["cursor"].as_u64().unwrap_or(0) - log_before;
        Some((
            set_aside["dead_letters"].clone(),
            log_span,
            took,
            after["dead_letters"].clone(),
        ))
    } else {
        None
    };

    let cores = |d: f64| d / put_secs;
    println!("| metric | value |");
    println!("|---|---|");
    println!(
        "| machine | {} cores, load average at start {load_at_start} (other work shares the machine) |",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| users seeded over SCIM (no connector) | {users} in {seed_secs:.1} s ({:.0}/s, {seed_concurrency} in flight), log last_seq {last_seq} |",
        users as f64 / seed_secs
    );
    if slow > 0 {
        println!(
            "| slow target answers injected (throughput run only) | {slow} PUTs held back {slow_ms} ms (1 per {slow_every} users) |"
        );
    }
    println!(
        "| **mirror throughput**: reload → target holds all {users} users | {put_secs:.2} s = **{puts_per_sec:.0} PUT/s** (connector concurrency {concurrency}) |"
    );
    println!(
        "| first / last user PUT after the reload | {first_put:.0} ms / {last_put:.0} ms (steady {:.0} PUT/s between them) |",
        (users - 1) as f64 / ((last_put - first_put) / 1e3)
    );
    println!(
        "| reload → cursor caught up (lag_events 0) | {:.2} s; delivered {}, retries {}, dead letters {} |",
        caught_up.as_secs_f64(),
        caught["delivered"],
        caught["retries"],
        caught["dead_letters"]
    );
    println!("| user PUTs received / users written more than once | {put_total} / {rewritten} |");
    println!(
        "| dispatch batches ({DISPATCH_BATCH} changes): first→last PUT, mean / p50 / max | {span_mean:.0} / {span_p50:.0} / {span_max:.0} ms over {} batches |",
        keys.len()
    );
    println!(
        "| idle gap between batches (last PUT of one → first PUT of the next), mean / p50 / max / total | {gap_mean:.1} / {gap_p50:.1} / {gap_max:.1} ms / {:.2} s ({:.1}% of the run) |",
        gap_sum / 1e3,
        gap_sum / 10.0 / put_secs
    );
    println!(
        "| batch tail (95th-percentile PUT → last PUT of the batch), mean / max / total | {tail_mean:.1} / {tail_max:.1} ms / {:.2} s |",
        tail_sum / 1e3
    );
    println!(
        "| store group-commit flushes during the mirror | {} |",
        flush_summary(&flush0, &flush1)
    );
    println!(
        "| GET /api/v1/roster/changes?limit=1000 (≈ the dispatcher's batch read, + JSON), p50 / max | {:.1} / {:.1} ms over {} pages |",
        ms(percentile(&page_lat, 0.5)),
        ms(page_lat.last().copied().unwrap_or_default()),
        page_lat.len()
    );
    println!(
        "| CPU during the mirror: daemon / bench process (target + client) | {:.2} / {:.2} cores |",
        cores(daemon_cpu1 - daemon_cpu0),
        cores(self_cpu1 - self_cpu0)
    );
    println!(
        "| daemon RSS: after seeding (peak while seeding) / max during the mirror (peak when caught up) / peak after the bench read the log over /changes / peak at the end | {:.0} ({:.0}) / {:.0} ({:.0}) / {:.0} / {:.0} MiB |",
        rss_after_seed as f64 / 1024.0,
        hwm_after_seed as f64 / 1024.0,
        mirror_rss_max as f64 / 1024.0,
        hwm_after_mirror as f64 / 1024.0,
        hwm_after_reads as f64 / 1024.0,
        rss_hwm as f64 / 1024.0
    );
    println!(
        "| latency run: SCIM PATCH title, distinct users | {changes} changes at {rate}/s target, **achieved {achieved:.0}/s** over {send_secs:.1} s |"
    );
    println!(
        "| SCIM PATCH response time, p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |",
        ms(percentile(&scim_lat, 0.50)),
        ms(percentile(&scim_lat, 0.99)),
        ms(scim_lat.last().copied().unwrap_or_default())
    );
    println!(
        "| **SCIM 2xx → PUT at the target**, p50 / p99 / max | {:.1} / **{:.1}** / {:.1} ms ({} measured, {missing} never arrived, {negative} arrived before the client saw the 2xx, counted as 0) |",
        ms(percentile(&delays, 0.50)),
        ms(percentile(&delays, 0.99)),
        ms(delays.last().copied().unwrap_or_default()),
        delays.len()
    );
    println!(
        "| store group-commit flushes during the latency run | {} |",
        flush_summary(&flush2, &flush3)
    );
    println!(
        "| connector after the latency run | retries +{}, dead letters {}, lag_events {} |",
        status_after["retries"].as_u64().unwrap_or(0) - retries_before,
        status_after["dead_letters"],
        status_after["lag_events"]
    );
    if let Some((took, job, user_puts)) = full {
        let sent = job["counts"]["drift_sent"].as_u64().unwrap_or(0);
        println!(
            "| **full reconciliation** (`scim:sync {{\"full\": true}}`, concurrency {concurrency}, answers held {full_delay} ms) | {} in {:.2} s = **{:.0} objects/s**; {user_puts} user PUTs, drift_pending {}, status {} |",
            sent,
            took.as_secs_f64(),
            sent as f64 / took.as_secs_f64(),
            job["counts"]["drift_pending"],
            job["status"]
        );
    }
    if let Some((letters, log_span, took, left)) = replayed {
        let n = letters.as_u64().unwrap_or(0) as f64;
        println!(
            "| **dead letters**: `rosterd dead-letters replay --all` of {letters} letters spread over {log_span} changes of the log | {:.2} s = **{:.0} letters/s**; letters left {left} |",
            took.as_secs_f64(),
            n / took.as_secs_f64()
        );
    }
}
