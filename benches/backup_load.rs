#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Online backups against the real daemon (child process): seed `BENCH_USERS` (default
//! 200,000) users, write a backup with SIGUSR1 on a quiet daemon, then measure SCIM
//! writes (`BENCH_WRITERS`, default 8, PATCHing titles of random users) for
//! `BENCH_WINDOW_SECS` (default 20) without a backup and again while one is written.
//! `cargo bench --bench backup_load`. Prints a Markdown table.

mod common;
use common::{
    DaemonOptions, RssSampler, TOKEN, create_users, env_usize, percentile, rss_kib,
    start_daemon_with,
};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn user(i: usize) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": format!("u{i:08}@bench.example"),
        "name": {"givenName": "Bench", "familyName": format!("User{i}")},
        "emails": [{"value": format!("u{i:08}@bench.example"), "type": "work", "primary": true}],
        "title": "software engineer",
    })
}

/// Writes made until `stop`: each one's latency.
async fn write_until(
    client: &reqwest::Client,
    scim: &str,
    ids: &Arc<Vec<String>>,
    writers: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (client, scim, ids, stop) =
            (client.clone(), scim.to_owned(), ids.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::new();
            let mut k = w as u64;
            while !stop.load(Ordering::Relaxed) {
                k = k.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let id = &ids[(k >> 33) as usize % ids.len()];
                let body = json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                    "Operations": [{"op": "replace", "path": "title", "value": format!("title {k}")}]});
                let t = Instant::now();
                let r = client
                    .patch(format!("{scim}/Users/{id}"))
                    .header("authorization", format!("Bearer {TOKEN}"))
                    .json(&body)
                    .send()
                    .await
                    .expect("patch");
                assert_eq!(r.status(), 200, "patch {id}");
                took.push(t.elapsed());
            }
            took
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("writer"));
    }
    all.sort();
    all
}

fn row(name: &str, lat: &[Duration], secs: f64) -> String {
    format!(
        "| {name} | {:.0} writes/s | {:.1} | {:.1} | {:.1} |",
        lat.len() as f64 / secs,
        percentile(lat, 0.5).as_secs_f64() * 1e3,
        percentile(lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    )
}

/// Send SIGUSR1 and wait for the backup it writes; `/status`'s `backup` then.
async fn backup(client: &reqwest::Client, d: &common::Daemon) -> Value {
    let before = d.status(client).await["backup"]["written"]
        .as_u64()
        .unwrap();
    let ok = std::process::Command::new("kill")
        .args(["-USR1", &d.pid().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
    loop {
        let b = d.status(client).await["backup"].clone();
        assert!(b["last_error"].is_null(), "{b}");
        if b["written"].as_u64().unwrap() > before {
            return b;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() {
    let users = env_usize("BENCH_USERS", 200_000);
    let writers = env_usize("BENCH_WRITERS", 8);
    let window = Duration::from_secs(env_usize("BENCH_WINDOW_SECS", 20) as u64);
    let d = start_daemon_with(&DaemonOptions {
        config_extra: "[backup]\nkeep = 2\n",
        ..DaemonOptions::default()
    });
    let client = reqwest::Client::new();
    d.wait_ready(&client).await;
    let (ids, seed_secs) = create_users(&client, d.scim(), users, 16, user).await;
    let ids = Arc::new(ids);
    let store_bytes = d.status(&client).await["store"]["size_bytes"]
        .as_u64()
        .unwrap();

    let rss = RssSampler::start(d.pid(), rss_kib(d.pid(), "VmRSS:"));
    let rss_before = rss_kib(d.pid(), "VmRSS:");
    let quiet = backup(&client, &d).await;
    let rss_peak = rss.stop();

    // Writes alone, then writes while a backup is written (the window ends with it).
    let stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let t = Instant::now();
    let alone = write_until(&client, &d.scim(), &ids, writers, &stop).await;
    let alone_secs = t.elapsed().as_secs_f64();
    timer.await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (client, scim, ids, stop) = (client.clone(), d.scim(), ids.clone(), stop.clone());
        tokio::spawn(async move { write_until(&client, &scim, &ids, writers, &stop).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    let under = backup(&client, &d).await;
    stop.store(true, Ordering::Relaxed);
    let during = load.await.unwrap();
    let during_secs = t.elapsed().as_secs_f64() + 2.0;

    let mib = |v: &Value| v.as_u64().unwrap() as f64 / 1_048_576.0;
    println!("## Online backup — {users} users (seeded in {seed_secs:.1} s), {writers} writers\n");
    println!("| backup | seconds | keys | size | writers held at most |");
    println!("|---|---|---|---|---|");
    for (name, b) in [("quiet daemon", &quiet), ("under writes", &under)] {
        println!(
            "| {name} | {:.1} | {} | {:.1} MiB (store {:.1} MiB) | {} ms |",
            b["last_seconds"].as_f64().unwrap(),
            b["last_keys"],
            mib(&b["last_bytes"]),
            store_bytes as f64 / 1_048_576.0,
            b["last_longest_hold_ms"],
        );
    }
    println!(
        "\nRSS during the quiet backup: {:.0} MiB before, {:.0} MiB at most.\n",
        rss_before as f64 / 1024.0,
        rss_peak as f64 / 1024.0
    );
    println!("| SCIM PATCH | throughput | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    println!("{}", row("no backup", &alone, alone_secs));
    println!("{}", row("while a backup is written", &during, during_secs));
}
