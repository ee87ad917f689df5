#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Roster API at scale against the real daemon (child process): seed `BENCH_USERS`
//! (default 1,000,000) classified users through SCIM /Bulk, then time filtered list pages,
//! archetype counts, the review queue and the full CSV export, sampling the daemon's RSS
//! while the export streams; then unfiltered SCIM paging and /status.
//! `cargo bench --bench roster_load`. Prints a Markdown table.

mod common;
use common::{JWT_SECRET, RssSampler, TOKEN, env_usize, percentile, rss_kib, start_daemon};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

const BUNDLE: &str = include_str!("../tests/fixtures/bundle.toml");
const TITLES: &[&str] = &[
    "software engineer",
    "senior software engineer",
    "financial analyst",
    "production planner",
    "account executive",
    "engineering manager",
    "sales manager",
    "plant manager",
    "budget analyst",
    "zzqx blorp",
];
const DEPARTMENTS: &[&str] = &["Engineering", "Finance", "Operations", "Sales"];

fn user(i: usize) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
                    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
        "userName": format!("u{i:08}@bench.example"),
        "name": {"givenName": "Bench", "familyName": format!("User{i}")},
        "emails": [{"value": format!("u{i:08}@bench.example"), "type": "work", "primary": true}],
        "title": TITLES[i % TITLES.len()],
        "active": !i.is_multiple_of(50),
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User":
            {"department": DEPARTMENTS[i % DEPARTMENTS.len()]},
    })
}

fn jwt() -> String {
    let claims = json!({"sub": "bench", "tenant": common::TENANT, "scope": "roster:admin",
                        "aud": "bench", "exp": chrono::Utc::now().timestamp() + 86_400});
    rosterd::api::jwt::testing::hs256_token(JWT_SECRET.as_bytes(), &claims)
}

#[tokio::main]
async fn main() {
    let users = env_usize("BENCH_USERS", 1_000_000);
    let batch = 1000;
    let daemon = start_daemon("bundle = \"bundle.toml\"\n", &[("bundle.toml", BUNDLE)]);
    let client = reqwest::Client::new();
    daemon.wait_ready(&client).await;
    let scim_auth = format!("Bearer {TOKEN}");

    // Seed through /Bulk, a few requests at a time, unless a kept store
    // (`BENCH_DATA_DIR`) already holds the roster.
    let present = client
        .get(format!("{}/Users?count=0", daemon.scim()))
        .header("authorization", &scim_auth)
        .send()
        .await
        .expect("count")
        .json::<Value>()
        .await
        .expect("count json")["totalResults"]
        .as_u64()
        .unwrap_or(0) as usize;
    let next = Arc::new(AtomicUsize::new(if present >= users { users } else { 0 }));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, next, auth, base) = (
            client.clone(),
            next.clone(),
            scim_auth.clone(),
            daemon.scim(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= users {
                    break;
                }
                let ops: Vec<Value> = (from..(from + batch).min(users))
                    .map(|i| json!({"method": "POST", "path": "/Users", "bulkId": format!("b{i}"), "data": user(i)}))
                    .collect();
                let r = client
                    .post(format!("{base}/Bulk"))
                    .header("authorization", &auth)
                    .json(&json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"], "Operations": ops}))
                    .send()
                    .await
                    .expect("bulk");
                assert_eq!(r.status(), 200);
                let _ = r.bytes().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("seed");
    }
    let seed_secs = started.elapsed().as_secs_f64();

    let token = jwt();
    let api = format!("{}/api/v1/roster", daemon.base);
    // Filtered list pages, the archetype counts and the review queue's first page, one
    // request at a time so latency is the server's: (path, array that must not be empty,
    // requests).
    // Governance events: one user's history, and the last thousand or so events by time
    // (a `since` near the end of a log of a million).
    let event = |after: usize| {
        let (client, api, token) = (client.clone(), api.clone(), token.clone());
        async move {
            let v: Value = client
                .get(format!("{api}/events?after={after}&limit=1"))
                .bearer_auth(&token)
                .send()
                .await
                .expect("events")
                .json()
                .await
                .expect("events json");
            v["events"][0].clone()
        }
    };
    let first = event(0).await;
    let late = event(users.max(present).saturating_sub(1000)).await;
    let (someone, late_at) = (
        first["scim_id"].as_str().expect("an event").to_owned(),
        late["at"]
            .as_str()
            .expect("a late event")
            .replace('+', "%2B"),
    );
    let queries = [
        (
            "users?archetype=software_engineer&limit=100".to_owned(),
            "users",
            50,
        ),
        ("users?department=Finance&limit=100".to_owned(), "users", 50),
        (
            "users?archetype_confidence__lt=0.7&limit=100".to_owned(),
            "users",
            50,
        ),
        (
            "users?email=u00000042@bench.example".to_owned(),
            "users",
            50,
        ),
        ("archetypes".to_owned(), "archetypes", 5),
        ("review?limit=100".to_owned(), "items", 20),
        (format!("events?user_id={someone}&limit=100"), "events", 20),
        (format!("events?since={late_at}&limit=100"), "events", 20),
    ];
    let mut list_rows = Vec::new();
    for (q, field, n) in queries {
        let mut lat = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            let r = client
                .get(format!("{api}/{q}"))
                .bearer_auth(&token)
                .send()
                .await
                .expect("list");
            assert_eq!(r.status(), 200, "{q}");
            let v: Value = r.json().await.expect("json");
            lat.push(t.elapsed());
            assert!(!v[field].as_array().expect(field).is_empty(), "{q}");
        }
        lat.sort();
        list_rows.push((q, percentile(&lat, 0.5), percentile(&lat, 0.99)));
    }

    // The whole roster as CSV, twice: the first walk after seeding pages the roster
    // records into sled's cache, the second finds them there. `BENCH_EXPORTS` sets how
    // many (more for profiling).
    let pid = daemon.child.id();
    let mut exports = Vec::new();
    for _ in 0..env_usize("BENCH_EXPORTS", 2) {
        exports.push(export(&client, &api, &token, pid).await);
    }

    // After the exports, so that they meet the cache as seeding left it.
    let paging = common::Paging::measure(&client, &daemon, users.max(present), 20).await;

    println!("| metric | value |");
    println!("|---|---|");
    if present >= users {
        println!("| users | {present} already in the kept store (`BENCH_DATA_DIR`) |");
    } else {
        println!(
            "| users seeded through /Bulk (classified in the write) | {users} in {seed_secs:.1} s ({:.0}/s) |",
            users as f64 / seed_secs
        );
    }
    for (q, p50, p99) in list_rows {
        // Ids and times differ from run to run; the shape of the query is what matters.
        let q = q
            .replace(&someone, "<id>")
            .replace(&late_at, "<the 1,000th event from the end>");
        println!(
            "| GET {q} at {users} users, p50 / p99 | {:.2} ms / {:.2} ms |",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    paging.print(users.max(present));
    for (i, e) in exports.iter().enumerate() {
        assert_eq!(e.rows, users.max(present), "every user exported once");
        let which = if i == 0 { "first" } else { "next" };
        println!(
            "| CSV export ({which}), {} rows ({:.0} MiB) | {:.1} s = {:.0} rows/s |",
            e.rows,
            e.bytes as f64 / 1048576.0,
            e.secs,
            e.rows as f64 / e.secs
        );
        println!(
            "| daemon RSS growth during that export | {:.1} MiB (from {:.0} MiB) |",
            e.rss_growth_kib as f64 / 1024.0,
            e.rss_before_kib as f64 / 1024.0
        );
    }
}

struct Export {
    rows: usize,
    bytes: usize,
    secs: f64,
    rss_before_kib: u64,
    rss_growth_kib: u64,
}

/// One full CSV export, sampling the daemon's RSS every 20 ms while it streams.
async fn export(client: &reqwest::Client, api: &str, token: &str, pid: u32) -> Export {
    let rss_before = rss_kib(pid, "VmRSS:");
    let sampler = RssSampler::start(pid, rss_before);
    let t = Instant::now();
    let mut resp = client
        .get(format!("{api}/users:export?format=csv&active=any"))
        .bearer_auth(token)
        .send()
        .await
        .expect("export");
    assert_eq!(resp.status(), 200);
    let mut lines = 0usize;
    let mut bytes = 0usize;
    while let Some(chunk) = resp.chunk().await.expect("chunk") {
        bytes += chunk.len();
        lines += chunk.iter().filter(|b| **b == b'\n').count();
    }
    let secs = t.elapsed().as_secs_f64();
    let max_rss = sampler.stop();
    Export {
        rows: lines - 1,
        bytes,
        secs,
        rss_before_kib: rss_before,
        rss_growth_kib: max_rss.saturating_sub(rss_before),
    }
}
