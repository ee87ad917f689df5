#![allow(clippy::unwrap_used, clippy::expect_used)]
//! SCIM load benchmark against the real daemon, run as a child process so its peak RSS is
//! its own: durable creates/s with concurrency, userName-eq lookup latency at full size,
//! one large group PATCH. `cargo bench --bench scim_load`; `BENCH_USERS` (default 100000)
//! and `BENCH_CONCURRENCY` (default 64) tune it. Prints a Markdown table.

use serde_json::{Value, json};
use std::time::Instant;

mod common;
use common::{TOKEN, env_usize, percentile, rss_kib, start_daemon};

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

#[tokio::main]
async fn main() {
    let users = env_usize("BENCH_USERS", 100_000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 64);
    let group_size = env_usize("BENCH_GROUP_MEMBERS", 50_000).min(users);
    let daemon = start_daemon("", &[]);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("client");
    let auth = format!("Bearer {TOKEN}");

    daemon.wait_ready(&client).await;

    // 1. Durable creates with concurrency.
    let (ids, create_secs) =
        common::create_users(&client, daemon.scim(), users, concurrency, user_body).await;
    let creates_per_sec = users as f64 / create_secs;

    // 2. userName eq lookups at full size, one at a time so latency is the server's.
    let lookups = 2_000;
    let mut lat = Vec::with_capacity(lookups);
    for k in 0..lookups {
        let i = (k * 7919) % users;
        let url = format!(
            "{}/Users?filter=userName%20eq%20%22USER{i:07}%40bench.example%22",
            daemon.scim()
        );
        let t = Instant::now();
        let r = client
            .get(&url)
            .header("authorization", &auth)
            .send()
            .await
            .expect("lookup");
        let v: Value = r.json().await.expect("json");
        lat.push(t.elapsed());
        assert_eq!(v["totalResults"], 1, "lookup {i}");
    }
    lat.sort();

    // 2b. Okta-style paging through every user, and /status.
    let paging = common::Paging::measure(&client, &daemon, users, 40).await;

    // 3. One PATCH adding `group_size` members, then one removing them all by value.
    let r = client
        .post(format!("{}/Groups", daemon.scim()))
        .header("authorization", &auth)
        .json(&json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "Everyone"}))
        .send()
        .await
        .expect("group");
    let gid = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("gid")
        .to_owned();
    let members: Vec<Value> = ids[..group_size]
        .iter()
        .map(|id| json!({"value": id}))
        .collect();
    let add = json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "add", "path": "members", "value": members}]});
    let t = Instant::now();
    let r = client
        .patch(format!(
            "{}/Groups/{gid}?excludedAttributes=members",
            daemon.scim()
        ))
        .header("authorization", &auth)
        .json(&add)
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    let patch_add = t.elapsed();
    let remove = json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "remove", "path": "members", "value": members}]});
    let t = Instant::now();
    let r = client
        .patch(format!(
            "{}/Groups/{gid}?excludedAttributes=members",
            daemon.scim()
        ))
        .header("authorization", &auth)
        .json(&remove)
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    let patch_remove = t.elapsed();

    let rss = rss_kib(daemon.child.id(), "VmHWM:");
    println!("| metric | value |");
    println!("|---|---|");
    println!("| users created | {users} (concurrency {concurrency}) |");
    println!("| durable creates/s | {creates_per_sec:.0} ({create_secs:.1} s) |");
    println!(
        "| userName eq lookup at {users} users, p50 / p99 | {:.3} ms / {:.3} ms |",
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3
    );
    paging.print(users);
    println!(
        "| PATCH adding {group_size} members in one request | {:.0} ms |",
        patch_add.as_secs_f64() * 1e3
    );
    println!(
        "| PATCH removing {group_size} members in one request | {:.0} ms |",
        patch_remove.as_secs_f64() * 1e3
    );
    println!("| daemon peak RSS | {:.0} MiB |", rss as f64 / 1024.0);
}
