#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Roster API at scale against the real daemon (child process): seed `BENCH_USERS`
//! (default 1,000,000) classified users through SCIM /Bulk, one in ten a manager of the
//! others and `BENCH_GROUPS` groups (default 20) of `BENCH_GROUP_MEMBERS` (default 50,000)
//! users each, then time filtered list pages, archetype counts, the review queue and the
//! full CSV export, sampling the daemon's RSS while the export streams; then unfiltered
//! SCIM paging and /status. `cargo bench --bench roster_load`. Prints a Markdown table.

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

/// User `i`, reporting to the user whose SCIM id is `manager`.
fn user(i: usize, manager: Option<&str>) -> Value {
    let mut enterprise = json!({"department": DEPARTMENTS[i % DEPARTMENTS.len()]});
    if let Some(m) = manager {
        enterprise["manager"] = json!({"value": m});
    }
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
                    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
        "userName": format!("u{i:08}@bench.example"),
        "name": {"givenName": "Bench", "familyName": format!("User{i}")},
        "emails": [{"value": format!("u{i:08}@bench.example"), "type": "work", "primary": true}],
        "title": TITLES[i % TITLES.len()],
        "active": !i.is_multiple_of(50),
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": enterprise,
    })
}

/// A manager for user `i` among the first `managers` users, scattered (a multiplicative
/// hash) so that an export meets them in no useful order.
fn manager_of(i: usize, managers: usize) -> usize {
    (i as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(17) as usize
        % managers
}

fn jwt() -> String {
    let claims = json!({"sub": "bench", "tenant": common::TENANT, "scope": "roster:admin",
                        "aud": "bench", "exp": chrono::Utc::now().timestamp() + 86_400});
    rosterd::api::jwt::testing::hs256_token(JWT_SECRET.as_bytes(), &claims)
}

#[tokio::main]
async fn main() {
    let users = env_usize("BENCH_USERS", 1_000_000);
    let daemon = start_daemon("bundle = \"bundle.toml\"\n", &[("bundle.toml", BUNDLE)]);
    let client = reqwest::Client::new();
    daemon.wait_ready(&client).await;
    let scim_auth = format!("Bearer {TOKEN}");

    // Seed through /Bulk, a few requests at a time, unless a kept store
    // (`BENCH_DATA_DIR`) already holds the roster.
    let present = scim_count(&client, &daemon.scim(), "Users").await;
    // Managers first, so that everyone else can name one by SCIM id.
    let managers = (users / 10).max(1);
    let fresh = present < users;
    let started = Instant::now();
    if fresh {
        let bosses = seed(&client, &daemon.scim(), 0..managers, None).await;
        seed(
            &client,
            &daemon.scim(),
            managers..users,
            Some(Arc::new(bosses)),
        )
        .await;
    }
    let seed_secs = started.elapsed().as_secs_f64();

    // Groups of users scattered across the roster (SCIM id order is random), created
    // unless the store already has them.
    let groups = env_usize("BENCH_GROUPS", 20);
    let members = env_usize("BENCH_GROUP_MEMBERS", 50_000);
    let had_groups = scim_count(&client, &daemon.scim(), "Groups").await;
    let started = Instant::now();
    let made_groups = had_groups < groups;
    if made_groups {
        let ids = all_user_ids(&client, &daemon.scim(), users.max(present)).await;
        for g in had_groups..groups {
            let list: Vec<Value> = (0..members.min(ids.len()))
                .map(|k| json!({"value": ids[(g * members + k) % ids.len()]}))
                .collect();
            let r = client
                .post(format!("{}/Groups", daemon.scim()))
                .header("authorization", &scim_auth)
                .json(
                    &json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                              "displayName": format!("bench-group-{g}"), "members": list}),
                )
                .send()
                .await
                .expect("group");
            assert_eq!(r.status(), 201, "group {g}");
        }
    }
    let group_secs = started.elapsed().as_secs_f64();

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
            "| users seeded through /Bulk (classified in the write; {managers} managers first) | {users} in {seed_secs:.1} s ({:.0}/s) |",
            users as f64 / seed_secs
        );
    }
    if made_groups {
        println!(
            "| groups of {members} created with one POST each | {} in {group_secs:.1} s |",
            groups - had_groups
        );
    } else {
        println!("| groups | {had_groups} already in the kept store |");
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
        if fresh {
            assert_eq!(e.with_manager, users - managers, "every manager named");
        }
        if made_groups && had_groups == 0 {
            assert_eq!(
                e.with_groups,
                users.min(groups * members),
                "every member's groups"
            );
        }
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
        println!(
            "| rows of that export with a manager / with groups | {} / {} |",
            e.with_manager, e.with_groups
        );
    }
}

/// The users `range` through /Bulk, four requests of 1,000 in flight, each reporting to
/// one of `bosses` (SCIM ids); answers their ids in order.
async fn seed(
    client: &reqwest::Client,
    base: &str,
    range: std::ops::Range<usize>,
    bosses: Option<Arc<Vec<String>>>,
) -> Vec<String> {
    const BATCH: usize = 1000;
    let (first, end) = (range.start, range.end);
    let next = Arc::new(AtomicUsize::new(first));
    let ids = Arc::new(std::sync::Mutex::new(vec![String::new(); end - first]));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, next, ids, bosses, base) = (
            client.clone(),
            next.clone(),
            ids.clone(),
            bosses.clone(),
            base.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(BATCH, Ordering::Relaxed);
                if from >= end {
                    break;
                }
                let ops: Vec<Value> = (from..(from + BATCH).min(end))
                    .map(|i| {
                        let boss = bosses.as_ref().map(|b| b[manager_of(i, b.len())].as_str());
                        json!({"method": "POST", "path": "/Users", "bulkId": format!("b{i}"),
                               "data": user(i, boss)})
                    })
                    .collect();
                let r = client
                    .post(format!("{base}/Bulk"))
                    .header("authorization", format!("Bearer {TOKEN}"))
                    .json(&json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"], "Operations": ops}))
                    .send()
                    .await
                    .expect("bulk");
                assert_eq!(r.status(), 200);
                let v: Value = r.json().await.expect("bulk json");
                let mut ids = ids.lock().expect("ids");
                for op in v["Operations"].as_array().expect("Operations") {
                    assert_eq!(op["status"], "201", "{op}");
                    let i: usize = op["bulkId"].as_str().expect("bulkId")[1..]
                        .parse()
                        .expect("bulkId");
                    let loc = op["location"].as_str().expect("location");
                    ids[i - first] = loc.rsplit('/').next().expect("id").to_owned();
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("seed");
    }
    Arc::try_unwrap(ids)
        .expect("the tasks are done")
        .into_inner()
        .expect("ids")
}

/// `totalResults` of `GET /{kind}?count=0`.
async fn scim_count(client: &reqwest::Client, base: &str, kind: &str) -> usize {
    client
        .get(format!("{base}/{kind}?count=0"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .expect("count")
        .json::<Value>()
        .await
        .expect("count json")["totalResults"]
        .as_u64()
        .unwrap_or(0) as usize
}

/// Every user's SCIM id, paging 1,000 at a time.
async fn all_user_ids(client: &reqwest::Client, base: &str, users: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(users);
    for start in (1..=users).step_by(1000) {
        let v: Value = client
            .get(format!(
                "{base}/Users?startIndex={start}&count=1000&attributes=id"
            ))
            .header("authorization", format!("Bearer {TOKEN}"))
            .send()
            .await
            .expect("ids")
            .json()
            .await
            .expect("ids json");
        for r in v["Resources"].as_array().expect("Resources") {
            ids.push(r["id"].as_str().expect("id").to_owned());
        }
    }
    assert_eq!(ids.len(), users, "every user's id");
    ids
}

struct Export {
    rows: usize,
    bytes: usize,
    secs: f64,
    rss_before_kib: u64,
    rss_growth_kib: u64,
    /// Rows whose `manager` cell, and whose `groups` cell, is filled.
    with_manager: usize,
    with_groups: usize,
}

/// One full CSV export, sampling the daemon's RSS every 20 ms while it streams; the body
/// is kept and read as CSV only once the timing is over.
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
    let mut body = Vec::with_capacity(256 << 20);
    while let Some(chunk) = resp.chunk().await.expect("chunk") {
        body.extend_from_slice(&chunk);
    }
    let secs = t.elapsed().as_secs_f64();
    let max_rss = sampler.stop();
    let mut csv = csv::Reader::from_reader(body.as_slice());
    let head = csv.headers().expect("header").clone();
    let col = |name: &str| head.iter().position(|h| h == name).expect(name);
    let (manager, groups) = (col("manager"), col("groups"));
    let (mut rows, mut with_manager, mut with_groups) = (0, 0, 0);
    for row in csv.records() {
        let row = row.expect("a CSV row");
        rows += 1;
        with_manager += usize::from(!row[manager].is_empty());
        with_groups += usize::from(!row[groups].is_empty());
    }
    Export {
        rows,
        bytes: body.len(),
        secs,
        rss_before_kib: rss_before,
        rss_growth_kib: max_rss.saturating_sub(rss_before),
        with_manager,
        with_groups,
    }
}
