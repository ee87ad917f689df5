//! The Roster API over HTTP: classification on SCIM writes, resolution precedence,
//! overrides and their errors, listing, export, review queue, events, jobs, auth and
//! tenant isolation.
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{BUNDLE, ENTERPRISE, OTHER_TENANT, TENANT, TestDaemon, jwt_with, patch_op};
use crate::mirror::status_text;

fn person(user_name: &str, title: &str, department: Option<&str>) -> Value {
    let mut u = json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE],
        "userName": user_name,
        "name": {"givenName": "Given", "familyName": "Family"},
        "emails": [{"value": user_name, "type": "work", "primary": true}],
        "title": title,
        "active": true,
    });
    if let Some(d) = department {
        u[ENTERPRISE] = json!({"department": d});
    }
    u
}

async fn create(d: &TestDaemon, user_name: &str, title: &str, dept: Option<&str>) -> String {
    let r = d.post("/Users", person(user_name, title, dept)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn roster_user(d: &TestDaemon, token: &str, user_id: &str) -> Value {
    let r = d
        .roster(Method::GET, &format!("/users/{user_id}"), token, None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// Ask `check` every 20 ms until it answers `Some`, for as long as a slow machine
/// could need (20 s); what the daemon does in the background is awaited this way.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    for _ in 0..1000 {
        if let Some(v) = check().await {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{what} never happened");
}

async fn wait_job(d: &TestDaemon, token: &str, job_id: &str) -> Value {
    eventually(&format!("job {job_id} finishing"), || async {
        let r = d
            .roster(Method::GET, &format!("/scim/jobs/{job_id}"), token, None)
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        matches!(r.body["status"].as_str(), Some("succeeded" | "failed")).then_some(r.body)
    })
    .await
}

/// Wait for the start-up reclassification (a fresh store has no policy fingerprint).
async fn settled(d: &TestDaemon) -> String {
    d.idle().await;
    d.jwt(TENANT, "roster:admin")
}

#[tokio::test]
async fn scim_writes_classify_and_overrides_stick() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let id = create(
        &d,
        "ada@acme.test",
        "software engineer",
        Some("Engineering"),
    )
    .await;

    let u = roster_user(&d, &admin, "user:ada@acme.test").await;
    assert_eq!(u["archetype_id"], "software_engineer", "{u}");
    assert_eq!(u["archetype_assigned_by"], "service:classifier");
    let c = u["archetype_confidence"].as_f64().unwrap();
    assert!(c > 0.0 && c <= 1.0, "{c}");
    assert_eq!(u["user_id"], "user:ada@acme.test");
    assert_eq!(u["job_title"], "software engineer");
    assert_eq!(u["department"], "Engineering");
    // The same user by SCIM id.
    assert_eq!(
        roster_user(&d, &admin, &id).await["user_id"],
        "user:ada@acme.test"
    );

    // A title change reclassifies inside the SCIM write.
    let r = d
        .patch(
            &format!("/Users/{id}"),
            patch_op(json!([{"op": "replace", "path": "title", "value": "financial analyst"}])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        roster_user(&d, &admin, &id).await["archetype_id"],
        "fpa_analyst"
    );

    // A manual override wins and survives later SCIM updates.
    let r = d
        .override_archetype(
            "/users/user:ada@acme.test",
            &admin,
            json!("production_planner"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["archetype_id"], "production_planner");
    assert_eq!(r.body["archetype_confidence"], 1.0);
    assert_eq!(r.body["archetype_assigned_by"], "user:it.admin@acme.test");
    let r = d
        .patch(
            &format!("/Users/{id}"),
            patch_op(json!([{"op": "replace", "path": "title", "value": "software engineer"}])),
        )
        .await;
    assert_eq!(r.status, 200);
    let u = roster_user(&d, &admin, &id).await;
    assert_eq!(
        u["archetype_id"], "production_planner",
        "override is sticky"
    );

    // A sync job (reclassification) keeps it too.
    let r = d.roster(Method::POST, "/scim:sync", &admin, None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["status"], "queued");
    let job = wait_job(&d, &admin, r.body["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["counts"]["overrides_kept"], 1, "{job}");
    assert_eq!(
        roster_user(&d, &admin, &id).await["archetype_id"],
        "production_planner"
    );

    // Clearing hands the user back to the classifier at once.
    let r = d
        .override_archetype(&format!("/users/{id}"), &admin, json!(null))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["archetype_id"], "software_engineer");
    assert_eq!(r.body["archetype_assigned_by"], "service:classifier");

    // Governance events record each change with its actor, before and after.
    let r = d
        .roster(Method::GET, &format!("/events?user_id={id}"), &admin, None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let kinds: Vec<&str> = r.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "rbac.archetype_assigned",
            "rbac.archetype_assigned",
            "rbac.archetype_overridden",
            "rbac.archetype_cleared",
        ],
        "{}",
        r.body
    );
    let overridden = &r.body["events"][2];
    assert_eq!(overridden["actor"], "user:it.admin@acme.test");
    assert_eq!(overridden["before"]["archetype_id"], "fpa_analyst");
    assert_eq!(overridden["after"]["archetype_id"], "production_planner");
    // One event carries the clear from the override to what the classifier gives now.
    let cleared = &r.body["events"][3];
    assert_eq!(cleared["actor"], "user:it.admin@acme.test");
    assert_eq!(cleared["before"]["archetype_id"], "production_planner");
    assert_eq!(cleared["before"]["source"], "override");
    assert_eq!(cleared["after"]["archetype_id"], "software_engineer");
    assert_eq!(
        cleared["after"]["archetype_assigned_by"],
        "service:classifier"
    );
    assert!(
        cleared["after"]["archetype_confidence"].is_number(),
        "{cleared}"
    );
    let history = r.body.clone();
    let r = d
        .roster(
            Method::GET,
            "/events?kind=rbac.archetype_overridden",
            &admin,
            None,
        )
        .await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 1, "{}", r.body);
    // A time window, bounds inclusive: the title change's assignment and the override,
    // nothing before or after.
    let at = |i: usize| {
        history["events"][i]["at"]
            .as_str()
            .unwrap()
            .replace('+', "%2B")
    };
    let seq = |e: &Value| e["seq"].as_u64().unwrap();
    let window: Vec<u64> = history["events"].as_array().unwrap()[1..3]
        .iter()
        .map(seq)
        .collect();
    for who in [format!("&user_id={id}"), String::new()] {
        let q = format!("/events?since={}&until={}{who}", at(1), at(2));
        let w = d.roster(Method::GET, &q, &admin, None).await;
        assert_eq!(w.status, 200, "{}", w.body);
        let got: Vec<u64> = w.body["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(seq)
            .collect();
        assert_eq!(got, window, "{q}: {}", w.body);
    }
    let q = format!("/events?since={}", at(3));
    let w = d.roster(Method::GET, &q, &admin, None).await;
    assert_eq!(
        w.body["events"][0]["seq"], history["events"][3]["seq"],
        "{}",
        w.body
    );
    let r = d
        .roster(
            Method::GET,
            "/events?since=2999-01-01T00:00:00Z",
            &admin,
            None,
        )
        .await;
    assert_eq!(r.body["events"], json!([]));
}

/// A long title is classified by its first words (the classifier reads a bounded prefix)
/// and stored whole; a value past the limit on any string is refused, naming it, rather
/// than copied into the store, the change log and every downstream request.
#[tokio::test]
async fn a_long_title_is_classified_by_its_start_and_a_huge_one_refused() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let mut title = String::from("software engineer");
    while title.len() < 60_000 {
        title.push_str(" senior software engineer");
    }
    let id = create(&d, "long@acme.test", &title, None).await;
    let u = roster_user(&d, &admin, &id).await;
    assert_eq!(
        u["archetype_id"], "software_engineer",
        "{}",
        u["archetype_id"]
    );
    assert_eq!(u["archetype_assigned_by"], "service:classifier");
    assert_eq!(u["job_title"].as_str().map(str::len), Some(title.len()));
    let huge = "x".repeat(200_000);
    let r = d
        .post("/Users", person("huge@acme.test", &huge, None))
        .await;
    assert_eq!(r.status, 400, "{}", r.body["detail"]);
    assert_eq!(r.body["scimType"], "invalidValue");
    let detail = r.body["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("title:") && detail.contains("at most 65536"),
        "{detail}"
    );
    // Through PATCH too.
    let r = d
        .patch(
            &format!("/Users/{id}"),
            patch_op(json!([{"op": "replace", "path": "title", "value": huge}])),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body["detail"]);
}

#[tokio::test]
async fn group_rules_outrank_the_classifier() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let id = create(&d, "lin@acme.test", "software engineer", None).await;
    let gid = d.create_group("Engineering Leads").await;
    d.add_members(&gid, &[&id]).await;
    let u = roster_user(&d, &admin, &id).await;
    assert_eq!(u["archetype_id"], "eng_lead", "{u}");
    assert_eq!(u["archetype_assigned_by"], format!("group:{gid}"));
    assert_eq!(u["archetype_confidence"], 1.0);
    assert_eq!(u["groups"], json!([gid]), "group ids, as roster-api.txt");
    assert_eq!(u["group_names"], json!(["Engineering Leads"]));

    let r = d.roster(Method::GET, "/groups", &admin, None).await;
    assert_eq!(r.status, 200);
    let g = &r.body["groups"][0];
    assert_eq!(g["member_count"], 1);
    assert_eq!(g["archetype_rule"], "eng_lead");
    assert_eq!(g["source"], "scim:azure-ad", "the tenant's idp");
    assert_eq!(
        g["claresia_role"], "admin",
        "group_roles, by displayName in any case"
    );
    let other = d.create_group("Pilot").await;
    let r = d.roster(Method::GET, "/groups", &admin, None).await;
    let pilot = r.body["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group_id"] == other.as_str())
        .cloned()
        .unwrap();
    assert_eq!(pilot["claresia_role"], "member", "{pilot}");
    assert!(pilot["archetype_rule"].is_null(), "{pilot}");

    // Leaving the group returns the user to the classifier.
    let r = d
        .patch(
            &format!("/Groups/{gid}"),
            patch_op(json!([{"op": "remove", "path": format!("members[value eq \"{id}\"]")}])),
        )
        .await;
    assert_eq!(r.status, 204);
    let u = roster_user(&d, &admin, &id).await;
    assert_eq!(u["archetype_id"], "software_engineer");
    assert_eq!(u["archetype_assigned_by"], "service:classifier");
}

#[tokio::test]
async fn a_member_toggled_within_one_patch_ends_as_the_last_operation_left_it() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let x = create(&d, "x@acme.test", "software engineer", None).await;
    let y = create(&d, "y@acme.test", "software engineer", None).await;
    let gid = d.create_group("Engineering Leads").await;
    d.add_members(&gid, &[&y]).await;
    let since = d
        .roster(Method::GET, "/changes?limit=1", &admin, None)
        .await
        .body["last_seq"]
        .as_u64()
        .unwrap();
    // x: add, remove, add (joins); y: remove, add, remove (leaves). Pairs cancelled as
    // sets would leave both as they were and write nothing.
    let r = d
        .patch(
            &format!("/Groups/{gid}"),
            patch_op(json!([
                {"op": "add", "path": "members", "value": [{"value": x}]},
                {"op": "remove", "path": format!("members[value eq \"{x}\"]")},
                {"op": "remove", "path": format!("members[value eq \"{y}\"]")},
                {"op": "add", "path": "members", "value": [{"value": x}, {"value": y}]},
                {"op": "remove", "path": format!("members[value eq \"{y}\"]")}
            ])),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let g = d.get(&format!("/Groups/{gid}")).await;
    let members: Vec<&str> = g.body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["value"].as_str().unwrap())
        .collect();
    assert_eq!(members, [x.as_str()], "{}", g.body);
    // The group rule follows, and downstream hears of both.
    assert_eq!(
        roster_user(&d, &admin, &x).await["archetype_id"],
        "eng_lead"
    );
    assert_eq!(
        roster_user(&d, &admin, &y).await["archetype_id"],
        "software_engineer"
    );
    let r = d
        .roster(
            Method::GET,
            &format!("/changes?since={since}"),
            &admin,
            None,
        )
        .await;
    let group_change = r.body["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["resource_type"] == "Group")
        .cloned()
        .unwrap_or_else(|| panic!("no group change: {}", r.body));
    assert_eq!(group_change["members_added"], json!([x]), "{group_change}");
    assert_eq!(
        group_change["members_removed"],
        json!([y]),
        "{group_change}"
    );
}

/// Poll the review queue until `want(ids in it)` holds: a reload's reclassification runs
/// as a background job.
async fn review_until(d: &TestDaemon, admin: &str, want: impl Fn(&[String]) -> bool) -> Value {
    eventually("the review queue reaching the expected state", || async {
        let r = d
            .roster(Method::GET, "/review?limit=1000", admin, None)
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let ids: Vec<String> = r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["scim_id"].as_str().unwrap().to_owned())
            .collect();
        want(&ids).then_some(r.body)
    })
    .await
}

#[tokio::test]
async fn a_new_review_threshold_moves_decided_users_in_and_out_of_the_queue() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let sure = create(&d, "sure@acme.test", "software engineer", None).await;
    let u = roster_user(&d, &admin, &sure).await;
    let confidence = u["archetype_confidence"].as_f64().unwrap();
    assert!((0.7..1.0).contains(&confidence), "{u}");
    let r = d.roster(Method::GET, "/review", &admin, None).await;
    assert_eq!(r.body["total"], 0, "{}", r.body);

    // The same bundle with a threshold above the user's confidence: the decision stands,
    // and the user now waits for review, as one created afterwards would.
    let raised = BUNDLE.replace("review_threshold = 0.7", "review_threshold = 1.0");
    assert_ne!(raised, BUNDLE);
    std::fs::write(d.root.join("bundle.toml"), &raised).unwrap();
    d.reload().await;
    let body = review_until(&d, &admin, |ids| ids.contains(&sure)).await;
    assert_eq!(body["total"], 1, "{body}");
    assert_eq!(body["review_threshold"], 1.0, "{body}");
    let u = roster_user(&d, &admin, &sure).await;
    assert_eq!(u["archetype_confidence"].as_f64().unwrap(), confidence);
    assert_eq!(u["archetype_assigned_by"], "service:classifier");
    let r = d
        .roster(
            Method::GET,
            "/users?archetype_confidence__lt=1.0",
            &admin,
            None,
        )
        .await;
    assert_eq!(r.body["users"].as_array().unwrap().len(), 1, "{}", r.body);
    // Only the queue moved: no assignment changed, so no governance event was written.
    let r = d
        .roster(
            Method::GET,
            &format!("/events?user_id={sure}"),
            &admin,
            None,
        )
        .await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 1, "{}", r.body);

    // And back out when the threshold comes down again.
    std::fs::write(d.root.join("bundle.toml"), BUNDLE).unwrap();
    d.reload().await;
    let body = review_until(&d, &admin, |ids| ids.is_empty()).await;
    assert_eq!(body["total"], 0, "{body}");
}

/// Create `n` users with this title through SCIM /Bulk, 500 to a request.
async fn bulk_people(d: &TestDaemon, n: usize, title: &str) {
    let ops: Vec<Value> = (0..n)
        .map(|i| {
            json!({"method": "POST", "path": "/Users", "bulkId": format!("b{i}"),
                   "data": person(&format!("bulk{i}@acme.test"), title, None)})
        })
        .collect();
    for chunk in ops.chunks(500) {
        let r = d.bulk(json!(chunk)).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

/// The test bundle as version test-2, with this example title moved from
/// software_engineer to eng_lead.
fn bundle_moving(title: &str) -> String {
    let renewed = BUNDLE
        .replace("version = \"test-1\"", "version = \"test-2\"")
        .replace(&format!("\"{title}\", "), "")
        .replace(
            "examples = [\"engineering manager\"",
            &format!("examples = [\"{title}\", \"engineering manager\""),
        );
    assert_eq!(renewed.matches(title).count(), 1, "{title} is no example");
    renewed
}

/// Users with an assignment made with bundle `version`, by the governance events.
async fn assigned_with(
    d: &TestDaemon,
    admin: &str,
    version: &str,
) -> std::collections::HashSet<String> {
    let mut users = std::collections::HashSet::new();
    let mut after = 0u64;
    loop {
        let q = format!("/events?kind=rbac.archetype_assigned&after={after}&limit=1000");
        let r = d.roster(Method::GET, &q, admin, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        for e in r.body["events"].as_array().unwrap() {
            if e["after"]["bundle_version"] == version {
                users.insert(e["scim_id"].as_str().unwrap().to_owned());
            }
        }
        match r.body["next_after"].as_u64() {
            Some(n) => after = n,
            None => return users,
        }
    }
}

#[tokio::test]
async fn a_bundle_reloaded_while_a_job_runs_reaches_every_user() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    bulk_people(&d, 2000, "software developer").await;
    // A sync job starts on the old bundle and the new one arrives while it runs (or, on a
    // fast machine, just after; either way every user must end up on the new bundle).
    let r = d.roster(Method::POST, "/scim:sync", &admin, None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    // The new bundle moves the users' title to another archetype, so each of them gets
    // an assignment event (a version that decided the same would write none).
    let renewed = bundle_moving("software developer");
    std::fs::write(d.root.join("bundle.toml"), &renewed).unwrap();
    d.reload().await;
    // Generous for a slow machine; no job is left to run long before this ends.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut on_new = 0;
    while tokio::time::Instant::now() < deadline {
        on_new = assigned_with(&d, &admin, "test-2").await.len();
        if on_new == 2000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(on_new, 2000, "users left on the old bundle");
}

async fn events_of(d: &TestDaemon, admin: &str, id: &str) -> Vec<Value> {
    let r = d
        .roster(Method::GET, &format!("/events?user_id={id}"), admin, None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["events"].as_array().unwrap().clone()
}

#[tokio::test]
async fn the_default_is_named_as_such_and_an_unchanged_decision_is_no_event() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let sure = create(&d, "sure@acme.test", "software engineer", None).await;
    // Words the bundle has never seen, and no title at all (a department alone is no
    // evidence, even one the bundle hints at): the bundle's default decides, and says
    // so, in the assignment and in its event.
    let unknown = create(&d, "zz@acme.test", "zzqx blorp", None).await;
    let blank = create(&d, "blank@acme.test", "", Some("Engineering")).await;
    for id in [&unknown, &blank] {
        let u = roster_user(&d, &admin, id).await;
        assert_eq!(u["archetype_id"], "generalist", "{u}");
        assert_eq!(u["archetype_assigned_by"], "service:default", "{u}");
        assert_eq!(u["archetype_confidence"], 0.0, "{u}");
        let events = events_of(&d, &admin, id).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["after"]["source"], "default", "{events:?}");
        assert_eq!(events[0]["actor"], "service:default", "{events:?}");
    }
    let u = roster_user(&d, &admin, &sure).await;
    assert_eq!(u["archetype_assigned_by"], "service:classifier", "{u}");

    // A new bundle version that decides the same for these users reclassifies them
    // without an event; one title it does move (the job has run once it has) gets one.
    let moved = create(&d, "web@acme.test", "web developer", None).await;
    assert_eq!(
        roster_user(&d, &admin, &moved).await["archetype_id"],
        "software_engineer"
    );
    let renewed = bundle_moving("web developer");
    std::fs::write(d.root.join("bundle.toml"), &renewed).unwrap();
    d.reload().await;
    eventually("the moved title reaching eng_lead", || async {
        (roster_user(&d, &admin, &moved).await["archetype_id"] == "eng_lead").then_some(())
    })
    .await;
    settled(&d).await;
    let events = events_of(&d, &admin, &moved).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1]["after"]["archetype_id"], "eng_lead");
    assert_eq!(events[1]["after"]["bundle_version"], "test-2");
    for id in [&sure, &unknown, &blank] {
        let events = events_of(&d, &admin, id).await;
        assert_eq!(events.len(), 1, "{id}: {events:?}");
    }
    let u = roster_user(&d, &admin, &sure).await;
    assert_eq!(u["archetype_id"], "software_engineer", "{u}");
}

#[tokio::test]
async fn a_bundle_that_fails_to_reload_is_reported_while_the_old_one_serves() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let bundle = |s: &Value| s["tenants"][TENANT]["bundle"].clone();
    let b = bundle(&d.status().await);
    assert_eq!(b["version"], "test-1", "{b}");
    assert_eq!(b["archetypes"], 6, "{b}");
    assert!(b["path"].as_str().unwrap().ends_with("bundle.toml"), "{b}");
    assert!(b["reload_error"].is_null(), "{b}");

    // Two archetypes with one id: the reload fails, the old bundle keeps classifying,
    // and /status says why until a reload succeeds.
    let broken = BUNDLE.replace("id = \"eng_lead\"", "id = \"software_engineer\"");
    assert_ne!(broken, BUNDLE);
    std::fs::write(d.root.join("bundle.toml"), &broken).unwrap();
    d.reload().await;
    let b = bundle(&d.status().await);
    assert_eq!(b["version"], "test-1", "{b}");
    let error = b["reload_error"].as_str().unwrap_or_default();
    assert!(error.contains("duplicate archetype id"), "{b}");
    assert!(
        error.ends_with("a restart would refuse this file too"),
        "{b}"
    );
    assert!(b["reload_error_at"].is_string(), "{b}");
    let id = create(&d, "eng@acme.test", "engineering manager", None).await;
    assert_eq!(
        roster_user(&d, &admin, &id).await["archetype_id"],
        "eng_lead"
    );

    std::fs::write(d.root.join("bundle.toml"), bundle_moving("web developer")).unwrap();
    d.reload().await;
    let b = bundle(&d.status().await);
    assert_eq!(b["version"], "test-2", "{b}");
    assert!(b["reload_error"].is_null(), "{b}");
}

/// While a changed bundle trains (minutes for a large one), /status and `rosterd status`
/// say so: before, they showed the old bundle and nothing else, like a reload ignored.
#[tokio::test]
async fn a_bundle_being_trained_is_shown_while_the_old_one_serves() {
    let d = TestDaemon::start().await;
    settled(&d).await;
    let words = [
        "alder", "birch", "cedar", "maple", "rowan", "hazel", "larch", "aspen",
    ];
    let mut big = BUNDLE.replace("version = \"test-1\"", "version = \"test-big\"");
    for i in 0..150 {
        let w = |k: usize| words[(i * 7 + k * 3) % words.len()];
        big.push_str(&format!(
            "\n[[archetypes]]\nid = \"a{i}\"\ntitle = \"{} Role {i}\"\ndefault_cowork_id = \"c\"\nexamples = [\"{} {} Officer q{i}\", \"Senior {} {} q{i}x\", \"{} Lead z{i}\", \"{} Clerk {} y{i}\"]\n",
            w(0), w(1), w(2), w(3), w(4), w(5), w(6), w(7)
        ));
    }
    std::fs::write(d.root.join("bundle.toml"), &big).unwrap();
    d.ask_reload();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut seen_training = None;
    loop {
        let s = d.status().await;
        let b = &s["tenants"][TENANT]["bundle"];
        if b["version"] == "test-big" {
            assert!(b["training_since"].is_null(), "{b}");
            break;
        }
        assert!(b["reload_error"].is_null(), "{b}");
        if b["training_since"].is_string() && seen_training.is_none() {
            assert_eq!(b["version"], "test-1", "{b}");
            seen_training = Some(status_text(&d).await);
        }
        assert!(tokio::time::Instant::now() < deadline, "never loaded: {b}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let shown = seen_training.expect("training never shown in /status");
    assert!(
        shown.contains("a changed bundle is being trained since"),
        "{shown}"
    );
}

#[tokio::test]
async fn a_bundle_refused_by_the_starting_group_rules_says_when_a_restart_would_load_it() {
    let d = TestDaemon::start().await;
    settled(&d).await;
    let reload_error = |s: &Value| {
        s["tenants"][TENANT]["bundle"]["reload_error"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    // The bundle renames the archetype the config's group rule names: refused.
    let renamed = BUNDLE
        .replace("id = \"eng_lead\"", "id = \"engineering_lead\"")
        .replace("version = \"test-1\"", "version = \"test-2\"");
    assert_ne!(renamed, BUNDLE);
    std::fs::write(d.root.join("bundle.toml"), &renamed).unwrap();
    d.reload().await;
    let error = reload_error(&d.status().await);
    assert!(error.contains("\"eng_lead\""), "{error}");
    assert!(
        error.ends_with("a restart would refuse this file too"),
        "{error}"
    );
    // Where an alert watches for a restart that would fail.
    assert_eq!(crate::ops::config_file_error_metric(&d).await, 1.0);
    // The rule fixed as the error says. Rules are read only at start, so the reload is
    // refused again, but a restart would now load both, and the error says so (before, it
    // still said a restart would fail).
    let config = d.root.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let fixed = text.replace(
        "archetype = \"eng_lead\"",
        "archetype = \"engineering_lead\"",
    );
    assert_ne!(fixed, text);
    std::fs::write(&config, fixed).unwrap();
    d.reload().await;
    let error = reload_error(&d.status().await);
    assert!(error.ends_with("a restart applies both"), "{error}");
    assert_eq!(crate::ops::config_file_error_metric(&d).await, 0.0);
    // check-config loads what a start would: it agrees.
    let out = crate::harness::rosterd_command()
        .args(["check-config", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn overrides_outlive_a_bundle_that_drops_their_archetype_and_are_listed() {
    let (logs, _guard) = crate::harness::LogBuf::capture();
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let id = create(&d, "pp@acme.test", "software engineer", None).await;
    // Classified, not overridden: moved to another archetype by the change, and said so.
    let planner = create(&d, "planner@acme.test", "production planner", None).await;
    assert_eq!(
        roster_user(&d, &admin, &planner).await["archetype_id"],
        "production_planner"
    );
    let r = d
        .override_archetype(&format!("/users/{id}"), &admin, json!("production_planner"))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let without: String = BUNDLE
        .split_inclusive("[[archetypes]]")
        .filter(|block| !block.contains("id = \"production_planner\""))
        .collect::<String>()
        .replacen("version = \"test-1\"", "version = \"test-2\"", 1);
    assert!(!without.contains("production_planner"), "{without}");
    // Each piece ends with the header of the block after it, so dropping one piece
    // leaves every other block under a header of its own.
    std::fs::write(d.root.join("bundle.toml"), &without).unwrap();
    d.reload().await;
    let b = d.status().await["tenants"][TENANT]["bundle"].clone();
    assert_eq!(b["version"], "test-2", "{b}");
    settled(&d).await;

    let u = roster_user(&d, &admin, &id).await;
    assert_eq!(
        u["archetype_id"], "production_planner",
        "the override stands: {u}"
    );
    let moved = roster_user(&d, &admin, &planner).await;
    assert_ne!(moved["archetype_id"], "production_planner", "{moved}");
    let warned = logs.lines("were classified again; those at or above the review threshold");
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(
        warned[0].contains("archetypes=production_planner (1)") && warned[0].contains("users=1"),
        "{warned:?}"
    );
    let r = d.roster(Method::GET, "/archetypes", &admin, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let list = r.body["archetypes"].as_array().unwrap();
    let dropped: Vec<&Value> = list
        .iter()
        .filter(|a| a["archetype_id"] == "production_planner")
        .collect();
    assert_eq!(dropped.len(), 1, "{}", r.body);
    assert_eq!(dropped[0]["in_bundle"], false);
    assert_eq!(dropped[0]["user_count"], 1);
    assert!(
        list.iter().filter(|a| a["in_bundle"] == true).count() == 5,
        "{}",
        r.body
    );
    let total: u64 = list.iter().map(|a| a["user_count"].as_u64().unwrap()).sum();
    assert_eq!(total, 2, "every user counted once: {}", r.body);
    // The dropped archetype is still a filter that finds its holders.
    let r = d
        .roster(
            Method::GET,
            "/users?archetype=production_planner",
            &admin,
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["users"].as_array().unwrap().len(), 1, "{}", r.body);

    // Repeating the override the user holds is no change, so it is accepted (by PATCH
    // and as a bulk item, which counts it as in force) and writes no event; a new
    // override to the dropped archetype is refused.
    let events_url = format!("/events?user_id={id}");
    let events = async || {
        let r = d.roster(Method::GET, &events_url, &admin, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["events"].as_array().unwrap().len()
    };
    let before = events().await;
    let r = d
        .override_archetype(&format!("/users/{id}"), &admin, json!("production_planner"))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["archetype_id"], "production_planner", "{}", r.body);
    let other = create(&d, "other@acme.test", "software engineer", None).await;
    let r = d
        .bulk_assign(
            &admin,
            json!([
                {"user_id": id, "archetype_id": "production_planner"},
                {"user_id": other, "archetype_id": "production_planner"}
            ]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["updated"], 1, "{}", r.body);
    assert_eq!(r.body["errors"][0]["index"], 1, "{}", r.body);
    assert_eq!(
        r.body["errors"][0]["error"], "invalid_archetype",
        "{}",
        r.body
    );
    assert_eq!(events().await, before, "a repeat writes no event");
    let r = d
        .override_archetype(
            &format!("/users/{other}"),
            &admin,
            json!("production_planner"),
        )
        .await;
    api_error(&r, 400, "invalid_archetype");
    // An id of 60,000 characters is not echoed whole, into the answer or the log.
    let r = d
        .override_archetype(
            &format!("/users/{other}"),
            &admin,
            json!("a".repeat(60_000)),
        )
        .await;
    api_error(&r, 400, "invalid_archetype");
    let message = r.body["message"].as_str().unwrap();
    assert!(
        message.len() < 400 && message.contains("60000 bytes in all"),
        "{message}"
    );
}

#[tokio::test]
async fn renaming_a_group_applies_or_lifts_its_rule_for_every_member() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let old = create(&d, "old@acme.test", "software engineer", None).await;
    let gid = d.create_group("Platform").await;
    d.add_members(&gid, &[&old]).await;
    assert_eq!(
        roster_user(&d, &admin, &old).await["archetype_id"],
        "software_engineer"
    );

    // Renamed to the rule's group, adding a member in the same request: both get the
    // rule, the existing member and the new one.
    let new = create(&d, "new@acme.test", "software engineer", None).await;
    let r = d
        .patch(
            &format!("/Groups/{gid}"),
            patch_op(json!([
                {"op": "replace", "path": "displayName", "value": "Engineering Leads"},
                {"op": "add", "path": "members", "value": [{"value": new}]}
            ])),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    for id in [&old, &new] {
        let u = roster_user(&d, &admin, id).await;
        assert_eq!(u["archetype_id"], "eng_lead", "{u}");
        assert_eq!(u["archetype_assigned_by"], format!("group:{gid}"), "{u}");
    }

    // Renamed away: the classifier decides again.
    let r = d
        .patch(
            &format!("/Groups/{gid}"),
            patch_op(json!([{"op": "replace", "path": "displayName", "value": "Platform"}])),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    for id in [&old, &new] {
        let u = roster_user(&d, &admin, id).await;
        assert_eq!(u["archetype_id"], "software_engineer", "{u}");
        assert_eq!(u["archetype_assigned_by"], "service:classifier", "{u}");
    }
}

#[tokio::test]
async fn override_errors_are_documented_codes() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    create(&d, "bo@acme.test", "account executive", Some("Sales")).await;
    let path = "/users/user:bo@acme.test";

    let r = d.override_archetype(path, &admin, json!("astronaut")).await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (400, Some("invalid_archetype"))
    );
    let r = d
        .roster(
            Method::PATCH,
            path,
            &admin,
            Some(json!({"archetype": "sales_rep"})),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let reader = d.jwt(TENANT, "roster:read");
    let r = d
        .override_archetype(path, &reader, json!("sales_rep"))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (403, Some("insufficient_scope"))
    );
    let r = d
        .override_archetype("/users/user:ghost@acme.test", &admin, json!("sales_rep"))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (404, Some("not_found"))
    );

    // globex's policy forbids overrides.
    let r = d
        .raw(
            Method::POST,
            &d.url(&format!("/scim/v2/{OTHER_TENANT}/Users")),
            Some(&d.other_token),
            &[],
            Some(serde_json::to_vec(&person("cy@globex.test", "sales manager", None)).unwrap()),
        )
        .await;
    assert_eq!(r.status, 201);
    let globex = d.jwt(OTHER_TENANT, "roster:admin");
    let r = d
        .override_archetype("/users/user:cy@globex.test", &globex, json!("sales_rep"))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (422, Some("override_forbidden")),
        "{}",
        r.body
    );

    // While a sync job runs, overrides answer 409. A few thousand users keep it busy.
    bulk_people(&d, 1000, "software developer").await;
    let r = d.roster(Method::POST, "/scim:sync", &admin, None).await;
    assert_eq!(r.status, 202);
    let job_id = r.body["job_id"].as_str().unwrap().to_owned();
    let during = d.override_archetype(path, &admin, json!("sales_rep")).await;
    let second = d.roster(Method::POST, "/scim:sync", &admin, None).await;
    let job = wait_job(&d, &admin, &job_id).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["counts"]["users"], 1001, "{job}");
    assert_eq!(
        (during.status.as_u16(), during.body["error"].as_str()),
        (409, Some("sync_in_progress"))
    );
    assert_eq!(second.status, 409, "one job per tenant at a time");
    // Both name the job to follow.
    for r in [&during, &second] {
        let msg = r.body["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!("/api/v1/roster/scim/jobs/{job_id}")),
            "{msg}"
        );
    }
    let r = d.override_archetype(path, &admin, json!("sales_rep")).await;
    assert_eq!(
        r.status, 200,
        "after the job, overrides work again: {}",
        r.body
    );

    let r = d
        .roster(Method::GET, "/scim/jobs/scim-sync-unknown", &admin, None)
        .await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (404, Some("not_found"))
    );
}

/// Overrides made before a tenant turned them off still win, so the clear, which is
/// their only way out, stays open; setting one (by PATCH or a bulk item) is 422.
#[tokio::test]
async fn overrides_made_before_a_policy_forbids_them_can_still_be_cleared() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    create(&d, "a@acme.test", "software engineer", None).await;
    create(&d, "b@acme.test", "software engineer", None).await;
    for u in ["a", "b"] {
        let r = d
            .override_archetype(
                &format!("/users/user:{u}@acme.test"),
                &admin,
                json!("fpa_analyst"),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let d = d.restart_with(|o| o.allow_overrides = false).await;
    let admin = settled(&d).await;
    let set = d
        .override_archetype("/users/user:a@acme.test", &admin, json!("sales_rep"))
        .await;
    api_error(&set, 422, "override_forbidden");
    // Repeating the override a user holds sets nothing new: accepted, as a bulk re-send
    // of a team's overrides is.
    let again = d
        .override_archetype("/users/user:a@acme.test", &admin, json!("fpa_analyst"))
        .await;
    assert_eq!(again.status, 200, "{}", again.body);
    let r = d
        .bulk_assign(
            &admin,
            json!([{"user_id": "user:b@acme.test", "archetype_id": "fpa_analyst"}]),
        )
        .await;
    assert_eq!(
        (
            r.body["updated"].as_u64(),
            r.body["errors"].as_array().map(Vec::len)
        ),
        (Some(1), Some(0)),
        "{}",
        r.body
    );
    let clear = d
        .override_archetype("/users/user:a@acme.test", &admin, json!(null))
        .await;
    assert_eq!(clear.status, 200, "{}", clear.body);
    let a = roster_user(&d, &admin, "user:a@acme.test").await;
    assert_eq!(a["archetype_assigned_by"], "service:classifier", "{a}");
    let r = d
        .bulk_assign(
            &admin,
            json!([
                {"user_id": "user:b@acme.test", "archetype_id": null},
                {"user_id": "user:a@acme.test", "archetype_id": "sales_rep"}
            ]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["updated"], 1, "{}", r.body);
    assert_eq!(r.body["errors"][0]["index"], 1, "{}", r.body);
    assert_eq!(r.body["errors"][0]["status"], 422, "{}", r.body);
    assert_eq!(r.body["errors"][0]["error"], "override_forbidden");
    // A user who does not exist is 404, as PATCH says, before the policy is asked.
    let patch = d
        .override_archetype("/users/user:nobody@acme.test", &admin, json!("sales_rep"))
        .await;
    api_error(&patch, 404, "not_found");
    let r = d
        .bulk_assign(
            &admin,
            json!([{"user_id": "user:nobody@acme.test", "archetype_id": "sales_rep"}]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["errors"][0]["status"], 404, "{}", r.body);
    assert_eq!(r.body["errors"][0]["error"], "not_found", "{}", r.body);
    for u in ["a", "b"] {
        let got = roster_user(&d, &admin, &format!("user:{u}@acme.test")).await;
        assert_eq!(got["archetype_assigned_by"], "service:classifier", "{got}");
    }
}

/// How many governance events the first page of `/events` has for `user`.
async fn event_count(d: &TestDaemon, token: &str, user: &str) -> usize {
    let r = d
        .roster(Method::GET, &format!("/events?user_id={user}"), token, None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["events"].as_array().unwrap().len()
}

#[tokio::test]
async fn bulk_assign_reports_per_item() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    create(&d, "a@acme.test", "software engineer", None).await;
    create(&d, "b@acme.test", "account executive", None).await;
    create(&d, "c@acme.test", "account executive", None).await;
    let r = d
        .bulk_assign(
            &admin,
            json!([
                {"user_id": "user:a@acme.test", "archetype_id": "fpa_analyst"},
                {"user_id": "user:b@acme.test", "archetype_id": "production_planner"},
                {"user_id": "user:nobody@acme.test", "archetype_id": "fpa_analyst"},
                {"user_id": "user:c@acme.test", "archetype_id": "astronaut"}
            ]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["updated"], 2);
    assert_eq!(r.body["failed"], 2);
    assert_eq!(r.body["errors"][0]["index"], 2);
    assert_eq!(r.body["errors"][0]["error"], "not_found");
    assert_eq!(r.body["errors"][1]["error"], "invalid_archetype");
    assert_eq!(
        roster_user(&d, &admin, "user:b@acme.test").await["archetype_id"],
        "production_planner"
    );
    // null clears, as PATCH; a missing id is a per-item error that says so.
    let r = d
        .bulk_assign(
            &admin,
            json!([
                {"user_id": "user:a@acme.test", "archetype_id": null},
                {"user_id": "user:a@acme.test"},
                {"user_id": "user:b@acme.test", "archetype_id": 5}
            ]),
        )
        .await;
    assert_eq!(
        (r.body["updated"].as_u64(), r.body["failed"].as_u64()),
        (Some(1), Some(2)),
        "{}",
        r.body
    );
    let message = |i: usize| r.body["errors"][i]["message"].as_str().unwrap().to_owned();
    assert!(
        message(0).contains("is required") && message(0).contains("null to clear"),
        "{}",
        r.body
    );
    // One of another type is said to be that, not missing.
    assert!(message(1).contains("not 5"), "{}", r.body);
    let a = roster_user(&d, &admin, "user:a@acme.test").await;
    assert_eq!(a["archetype_assigned_by"], "service:classifier", "{a}");
    // One item per user: a later one naming the same user (by userName or SCIM id) fails
    // alone, and only the first is written.
    let events_before = event_count(&d, &admin, "user:c@acme.test").await;
    let c_id = d.user_id("c@acme.test").await;
    let r = d
        .bulk_assign(
            &admin,
            json!([
                {"user_id": "user:c@acme.test", "archetype_id": "fpa_analyst"},
                {"user_id": "user:c@acme.test", "archetype_id": null},
                {"user_id": c_id, "archetype_id": "production_planner"}
            ]),
        )
        .await;
    assert_eq!(
        (r.body["updated"].as_u64(), r.body["failed"].as_u64()),
        (Some(1), Some(2)),
        "{}",
        r.body
    );
    for (e, index) in r.body["errors"].as_array().unwrap().iter().zip([1, 2]) {
        assert_eq!(e["index"], index, "{e}");
        assert_eq!(e["error"], "invalid_request", "{e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("item 0 names this user already"),
            "{e}"
        );
    }
    assert_eq!(
        roster_user(&d, &admin, "user:c@acme.test").await["archetype_id"],
        "fpa_analyst"
    );
    let events_after = event_count(&d, &admin, "user:c@acme.test").await;
    assert_eq!(events_after, events_before + 1);
    let r = d
        .override_archetype("/users/user:c@acme.test", &admin, Value::Null)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // An item read as PATCH reads a body: it names a user, and nothing else than the two
    // fields. Each bad one fails alone, as a 400 that says why.
    let r = d
        .bulk_assign(
            &admin,
            json!([
                {"archetype_id": "fpa_analyst"},
                {"user_id": 5, "archetype_id": "fpa_analyst"},
                {"user_id": "user:a@acme.test", "archetype_id": "fpa_analyst", "note": "x"},
                "user:a@acme.test"
            ]),
        )
        .await;
    assert_eq!(r.body["failed"], 4, "{}", r.body);
    for (i, e) in r.body["errors"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            (e["index"].as_u64(), e["status"].as_u64()),
            (Some(i as u64), Some(400)),
            "{e}"
        );
        assert_eq!(e["error"], "invalid_request", "{e}");
    }
    assert!(
        r.body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("user_id is required")
    );
    assert!(
        r.body["errors"][2]["message"]
            .as_str()
            .unwrap()
            .contains("\"note\"")
    );
    // An unknown field beside the items is refused, not ignored while they are written.
    let r = d
        .roster(
            Method::POST,
            "/archetype:bulk-assign",
            &admin,
            Some(json!({"assignments": [{"user_id": "user:a@acme.test", "archetype_id": "fpa_analyst"}], "dry_run": true})),
        )
        .await;
    api_error(&r, 400, "invalid_request");
    assert_eq!(
        roster_user(&d, &admin, "user:a@acme.test").await["archetype_assigned_by"],
        "service:classifier"
    );
    let r = d
        .bulk_assign(
            &admin,
            json!([
                {"user_id": "user:a@acme.test", "archetype_id": "fpa_analyst"}
            ]),
        )
        .await;
    assert_eq!(r.body["updated"], 1, "{}", r.body);

    let r = d.roster(Method::GET, "/archetypes", &admin, None).await;
    assert_eq!(r.status, 200);
    let by_id = |id: &str| {
        r.body["archetypes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["archetype_id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_id("fpa_analyst")["user_count"], 1);
    assert_eq!(by_id("production_planner")["active_user_count"], 1);
    assert_eq!(by_id("software_engineer")["user_count"], 0);
    assert_eq!(
        by_id("fpa_analyst")["default_cowork_id"],
        "fpa-analyst.test.v1"
    );

    // A deactivated user still holds the archetype but no longer counts as active.
    let b = d.user_id("b@acme.test").await;
    let r = d
        .patch(
            &format!("/Users/{b}"),
            patch_op(json!([{"op": "replace", "value": {"active": false}}])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = d.roster(Method::GET, "/archetypes", &admin, None).await;
    let planner = r.body["archetypes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["archetype_id"] == "production_planner")
        .cloned()
        .unwrap();
    assert_eq!(
        (&planner["user_count"], &planner["active_user_count"]),
        (&json!(1), &json!(0)),
        "{planner}"
    );
}

#[tokio::test]
async fn listing_filters_and_pages() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let boss = create(
        &d,
        "boss@acme.test",
        "engineering manager",
        Some("Engineering"),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut u = person(
            &format!("dev{i}@acme.test"),
            "software engineer",
            Some("Engineering"),
        );
        u[ENTERPRISE]["manager"] = json!({"value": boss});
        let r = d.post("/Users", u).await;
        assert_eq!(r.status, 201);
        ids.push(r.body["id"].as_str().unwrap().to_owned());
    }
    create(&d, "fin@acme.test", "financial analyst", Some("Finance")).await;
    let gid = d.create_group("Pilot").await;
    d.add_members(&gid, &[&ids[0], &ids[1]]).await;
    // Deactivated users are hidden unless asked for.
    d.patch(
        &format!("/Users/{}", ids[6]),
        patch_op(json!([{"op": "replace", "value": {"active": false}}])),
    )
    .await;

    let list = |q: &str| {
        let (d, admin, q) = (&d, admin.clone(), q.to_owned());
        async move {
            let r = d
                .roster(Method::GET, &format!("/users{q}"), &admin, None)
                .await;
            assert_eq!(r.status, 200, "{q}: {}", r.body);
            r.body
        }
    };
    let names = |b: &Value| -> Vec<String> {
        let mut v: Vec<String> = b["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["user_id"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&list("?archetype=software_engineer").await).len(), 6);
    assert_eq!(
        names(&list("?archetype=software_engineer&active=false").await),
        ["user:dev6@acme.test"]
    );
    assert_eq!(
        names(&list("?archetype=software_engineer&active=any").await).len(),
        7
    );
    assert_eq!(
        names(&list("?email=FIN@acme.test").await),
        ["user:fin@acme.test"]
    );
    // Without emails, the userName is the address the roster shows, and finds.
    let r = d
        .post(
            "/Users",
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                   "userName": "NoMail@acme.test", "active": false}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let found = list("?email=nomail@acme.test&active=any").await;
    assert_eq!(names(&found), ["user:NoMail@acme.test"]);
    assert_eq!(found["users"][0]["email"], "NoMail@acme.test");
    // With emails, the userName that is an address still finds its user.
    let r = d
        .post(
            "/Users",
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                   "userName": "Login@acme.test", "active": false,
                   "emails": [{"type": "home", "value": "h0@home.example"}]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let found = list("?email=login@ACME.test&active=any").await;
    assert_eq!(names(&found), ["user:Login@acme.test"]);
    assert_eq!(found["users"][0]["email"], "h0@home.example");
    assert_eq!(
        names(&list("?manager_user_id=user:boss@acme.test").await).len(),
        6
    );
    assert_eq!(
        names(&list("?department=finance").await),
        ["user:fin@acme.test"]
    );
    assert_eq!(
        names(&list("?group=Pilot").await),
        ["user:dev0@acme.test", "user:dev1@acme.test"]
    );
    assert_eq!(
        names(&list(&format!("?group={gid}&department=engineering")).await).len(),
        2
    );
    assert_eq!(names(&list("?archetype_confidence__lt=0").await).len(), 0);
    assert_eq!(
        names(&list("?archetype_confidence__lt=1.01").await).len(),
        8
    );
    let u = &list("?email=dev0@acme.test").await["users"][0];
    assert_eq!(u["manager_user_id"], "user:boss@acme.test");
    assert_eq!(u["groups"], json!([gid]));
    assert_eq!(u["group_names"], json!(["Pilot"]));
    assert_eq!(u["is_active"], true);
    let u = &list("?email=dev0@acme.test").await["users"][0];
    assert_eq!(u["groups"], json!([gid]));
    assert_eq!(u["group_names"], json!(["Pilot"]));
    assert_eq!(names(&list(&format!("?group={gid}")).await).len(), 2);
    assert_eq!(
        names(&list(&format!("?group={}", gid.to_uppercase())).await).len(),
        2,
        "a group id in either case"
    );
    // One group's displayName that is another's externalId names two groups: the name no
    // longer picks one group, so it is refused (naming both ids), for the list and the
    // export alike; a group whose externalId is its own displayName is still one.
    let group = |name: &str, ext: &str| {
        json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
               "displayName": name, "externalId": ext})
    };
    let crew = d.post("/Groups", group("Crew", "Crew")).await;
    assert_eq!(crew.status, 201, "{}", crew.body);
    assert!(list("?group=Crew").await["users"].is_array());
    let deck = d.post("/Groups", group("Deck", "crew")).await;
    assert_eq!(deck.status, 201, "{}", deck.body);
    for path in ["/users?group=crew", "/users:export?format=csv&group=crew"] {
        let r = d.roster(Method::GET, path, &admin, None).await;
        api_error(&r, 400, "invalid_request");
        let msg = r.body["message"].as_str().unwrap();
        for g in [&crew, &deck] {
            assert!(msg.contains(g.body["id"].as_str().unwrap()), "{msg}");
        }
    }
    let deck_id = deck.body["id"].as_str().unwrap();
    assert_eq!(names(&list(&format!("?group={deck_id}")).await).len(), 0);

    // Paging with limit and an opaque cursor visits everyone exactly once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("?limit=3&cursor={c}"),
            None => "?limit=3".to_owned(),
        };
        let b = list(&q).await;
        seen.extend(names(&b));
        match b["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 8, "{seen:?}");
    // A cursor pages the query it came from: with other filters, on another endpoint or
    // for another tenant it is refused, not read as a position in another list.
    let c = list("?limit=3").await["next_cursor"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(names(&list(&format!("?limit=5&cursor={c}")).await).len(), 5);
    let other = d.jwt(crate::harness::OTHER_TENANT, "roster:admin");
    for (path, token) in [
        (format!("/users?department=finance&cursor={c}"), &admin),
        (format!("/review?cursor={c}"), &admin),
        (format!("/users?cursor={c}"), &other),
    ] {
        let r = d.roster(Method::GET, &path, token, None).await;
        api_error(&r, 400, "invalid_request");
        assert!(
            r.body["message"]
                .as_str()
                .unwrap()
                .contains("another query"),
            "{path}: {}",
            r.body
        );
    }
    // It is bound to the filters as the listing reads them, not to their spelling: the
    // default spelt out, another letter case, `all` for `any`, a user or group by
    // another of its names. The next page continues where the first one stopped.
    let first = |q: String| {
        let list = &list;
        async move {
            let b = list(&q).await;
            let c = b["next_cursor"].as_str().expect("a next page").to_owned();
            (names(&b), c)
        }
    };
    let boss_id = list("?email=boss@acme.test").await["users"][0]["scim_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (group, group_upper) = (
        format!("&group={gid}"),
        format!("&group={}", gid.to_uppercase()),
    );
    let manager_id = format!("&manager_user_id={boss_id}");
    for (limit, q, same) in [
        (2, "", "&active=true"),
        (2, "&active=true", "&active=TRUE"),
        (2, "&active=any", "&active=all"),
        (1, "&active=false", "&active=False"),
        (
            2,
            "&department=Engineering",
            "&department=ENGINEERING&active=true",
        ),
        (1, &group, &group_upper),
        (2, "&manager_user_id=user:boss@acme.test", &manager_id),
        (
            2,
            "&archetype_confidence__lt=1.01",
            "&archetype_confidence__lt=1.010",
        ),
    ] {
        let (page1, c) = first(format!("?limit={limit}{q}")).await;
        // `limit` may change between pages.
        let page2 = names(&list(&format!("?limit=3{same}&cursor={c}")).await);
        assert!(!page2.is_empty(), "{q} then {same}");
        assert!(page2.iter().all(|n| !page1.contains(n)), "{q} then {same}");
    }
    // Another filter is another list still.
    let (_, c) = first("?limit=2&department=engineering".to_owned()).await;
    for other in [
        "department=engineering&active=any",
        "department=finance",
        "department=engineering&archetype=software_engineer",
    ] {
        let r = d
            .roster(
                Method::GET,
                &format!("/users?{other}&cursor={c}"),
                &admin,
                None,
            )
            .await;
        api_error_saying(&r, 400, "invalid_request", "another query");
    }

    // A filter that names nothing is a slip, not an empty roster; so for the export.
    for (bad, code) in [
        ("?archetype=sofware_engineer", "invalid_archetype"),
        ("?archetype=SOFTWARE_ENGINEER", "invalid_archetype"),
        ("?manager_user_id=boss@acme.test", "invalid_request"),
        ("?manager_user_id=user:nobody@acme.test", "invalid_request"),
        ("?group=Pilots", "invalid_request"),
    ] {
        for path in [
            format!("/users{bad}"),
            format!("/users:export?format=csv&{}", &bad[1..]),
        ] {
            let r = d.roster(Method::GET, &path, &admin, None).await;
            api_error(&r, 400, code);
        }
    }
    for bad in [
        "?limit=0",
        "?limit=5000",
        "?active=maybe",
        "?cursor=!!",
        "?archetype_confidence__lt=x",
        "?colour=red",
        "?limit=1&limit=2",
        "?limit=+5",
    ] {
        let r = d
            .roster(Method::GET, &format!("/users{bad}"), &admin, None)
            .await;
        assert_eq!(
            (r.status.as_u16(), r.body["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn csv_export_has_the_documented_columns_and_is_safe() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let id = create(
        &d,
        "eve@acme.test",
        "=HYPERLINK(\"http://evil\")",
        Some("R&D, Labs"),
    )
    .await;
    create(&d, "max@acme.test", "financial analyst", Some("Finance")).await;
    let mut gids = Vec::new();
    // A name with a comma: the cell holds ids, so it still splits back into the three
    // groups.
    for name in ["Alpha, Team", "Beta", "Gamma"] {
        let gid = d.create_group(name).await;
        d.add_members(&gid, &[&id]).await;
        gids.push(gid);
    }
    gids.sort();
    let resp = d
        .client
        .get(d.url("/api/v1/roster/users:export?format=csv"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = resp.text().await.unwrap();
    let mut rdr = csv::Reader::from_reader(text.as_bytes());
    let headers: Vec<String> = rdr.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(
        headers,
        [
            "user_id",
            "email",
            "first_name",
            "last_name",
            "job_title",
            "department",
            "manager",
            "archetype_id",
            "archetype_confidence",
            "is_active",
            "groups"
        ]
    );
    let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2);
    let eve = rows.iter().find(|r| &r[0] == "user:eve@acme.test").unwrap();
    assert_eq!(
        &eve[4], "'=HYPERLINK(\"http://evil\")",
        "formula neutralized"
    );
    assert_eq!(&eve[5], "R&D, Labs", "commas quoted, not split");
    assert_eq!(eve[10].split(',').collect::<Vec<_>>(), gids);
    assert_eq!(&eve[9], "true");
    assert!(text.contains("\r\n"), "RFC 4180 line endings");

    let filtered = export_text(&d, &admin, "&department=finance").await;
    assert_eq!(filtered.lines().count(), 2, "{filtered}");
    let r = d
        .roster(Method::GET, "/users:export?format=xlsx", &admin, None)
        .await;
    assert_eq!(r.status, 400);
}

/// The CSV export's text, with `query` (`&department=…`) after `format=csv`.
async fn export_text(d: &TestDaemon, token: &str, query: &str) -> String {
    d.client
        .get(d.url(&format!("/api/v1/roster/users:export?format=csv{query}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The Keycloak scim plugin sends only `displayName`; authentik sends `familyName: " "`
/// for a one-word name. The Roster API and the CSV show the names the connectors send:
/// trimmed, blank as absent, else taken from the full name.
#[tokio::test]
async fn names_come_from_the_full_name_when_name_lacks_them_on_every_output() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let users = [
        json!({"userName": "grace@acme.test", "displayName": "Grace Hopper"}),
        json!({"userName": "cher@acme.test", "displayName": "Cher",
               "name": {"givenName": "Cher", "familyName": " ", "formatted": "Cher"}}),
        json!({"userName": "ada@acme.test", "displayName": "Ada King",
               "name": {"givenName": " Ada ", "familyName": "Lovelace"}}),
    ];
    for u in users {
        let r = d.post("/Users", u).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let want = [
        ("user:grace@acme.test", json!("Grace"), json!("Hopper")),
        ("user:cher@acme.test", json!("Cher"), Value::Null),
        ("user:ada@acme.test", json!("Ada"), json!("Lovelace")),
    ];
    for (user, first, last) in &want {
        let u = roster_user(&d, &admin, user).await;
        assert_eq!((&u["first_name"], &u["last_name"]), (first, last), "{u}");
    }
    let text = export_text(&d, &admin, "").await;
    let mut rdr = csv::Reader::from_reader(text.as_bytes());
    let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    for (user, first, last) in &want {
        let row = rows.iter().find(|r| &r[0] == *user).unwrap();
        let cell = |v: &Value| v.as_str().unwrap_or("").to_owned();
        assert_eq!((&row[2], &row[3]), (&*cell(first), &*cell(last)), "{text}");
    }
}

#[tokio::test]
async fn review_queue_lists_and_resolves() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let doubtful = create(&d, "who@acme.test", "zzqx blorp", None).await;
    create(
        &d,
        "sure@acme.test",
        "software engineer",
        Some("Engineering"),
    )
    .await;
    let r = d.roster(Method::GET, "/review", &admin, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let items = r.body["items"].as_array().unwrap();
    let item = items
        .iter()
        .find(|i| i["scim_id"] == doubtful.as_str())
        .unwrap_or_else(|| panic!("{}", r.body));
    // An item reads like a user object (roster-api.txt's names).
    assert_eq!(item["user_id"], "user:who@acme.test");
    assert_eq!(item["email"], "who@acme.test", "{item}");
    assert_eq!(item["is_active"], true);
    assert_eq!(item["archetype_assigned_by"], "service:default", "{item}");
    assert!(item["archetype_assigned_at"].is_string(), "{item}");
    assert!(
        items.iter().all(|i| i["user_id"] != "user:sure@acme.test"),
        "{}",
        r.body
    );
    assert!(
        items
            .iter()
            .all(|i| i["archetype_confidence"].as_f64().unwrap() < 0.7)
    );
    let total = r.body["total"].as_u64().unwrap();

    // Paged one at a time, the queue comes back whole, in order, each item once.
    for n in 0..2 {
        create(&d, &format!("unsure{n}@acme.test"), "zzqx blorp", None).await;
    }
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/review?limit=1&cursor={c}"),
            None => "/review?limit=1".to_owned(),
        };
        let r = d.roster(Method::GET, &path, &admin, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["total"].as_u64().unwrap(), total + 2);
        let items = r.body["items"].as_array().unwrap();
        assert!(items.len() <= 1, "{}", r.body);
        paged.extend(
            items
                .iter()
                .map(|i| i["scim_id"].as_str().unwrap().to_owned()),
        );
        assert!(
            paged.len() as u64 <= total + 2,
            "a cursor repeats: {paged:?}"
        );
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(paged.len() as u64, total + 2, "{paged:?}");
    assert!(paged.windows(2).all(|w| w[0] < w[1]), "{paged:?}");

    let r = d
        .roster(
            Method::POST,
            "/review/user:who@acme.test/accept",
            &admin,
            Some(json!({"archetype_id": "sales_rep"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["archetype_id"], "sales_rep");
    // Resolved now, and the confident user never was an item: accepting either is 409.
    for who in ["user:who@acme.test", "user:sure@acme.test"] {
        let r = d
            .roster(Method::POST, &format!("/review/{who}/accept"), &admin, None)
            .await;
        api_error_saying(&r, 409, "not_in_review", who);
    }
    assert_eq!(
        roster_user(&d, &admin, "user:sure@acme.test").await["archetype_assigned_by"],
        "service:classifier"
    );
    let r = d.roster(Method::GET, "/review", &admin, None).await;
    assert_eq!(r.body["total"].as_u64().unwrap(), total + 1);
    assert!(
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["scim_id"] != doubtful.as_str())
    );
}

#[tokio::test]
async fn tokens_are_verified_and_tenants_isolated() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let id = create(&d, "iso@acme.test", "software engineer", None).await;

    let r = d.roster(Method::GET, "/users", "not-a-jwt", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"rosterd\", error=\"invalid_token\"")
    );
    assert!(
        r.body["error"].is_string() && r.body["message"].is_string(),
        "{}",
        r.body
    );
    // No credentials at all: the challenge carries no error code (RFC 6750 §3.1).
    let r = d
        .client
        .get(d.url("/api/v1/roster/users"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"rosterd\"");
    // A token that is not ASCII was still sent: it is malformed, not missing.
    let r = d
        .client
        .get(d.url("/api/v1/roster/users"))
        .header(
            "authorization",
            reqwest::header::HeaderValue::from_bytes(b"Bearer \xc3\xa9.\xc3\xa9.\xc3\xa9").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer realm=\"rosterd\", error=\"invalid_token\""
    );
    api_error(&crate::harness::Resp::read(r).await, 401, "token_malformed");
    // Two Authorization headers are refused, whichever comes first.
    let r = d
        .roster_with(
            Method::GET,
            "/users",
            &admin,
            None,
            &[("authorization", "Bearer not-a-jwt")],
        )
        .await;
    api_error(&r, 400, "invalid_request");

    let now = chrono::Utc::now().timestamp();
    let expired = jwt_with(
        json!({"sub": "x", "tenant": TENANT, "scope": "roster:read", "aud": "rosterd-tests", "exp": now - 3600}),
    );
    let r = d.roster(Method::GET, "/users", &expired, None).await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (401, Some("token_expired"))
    );
    let wrong_aud = jwt_with(
        json!({"sub": "x", "tenant": TENANT, "scope": "roster:read", "aud": "someone-else", "exp": now + 60}),
    );
    assert_eq!(
        d.roster(Method::GET, "/users", &wrong_aud, None)
            .await
            .status,
        401
    );
    let not_yet = jwt_with(
        json!({"sub": "x", "tenant": TENANT, "scope": "roster:read", "aud": "rosterd-tests", "exp": now + 7200, "nbf": now + 3600}),
    );
    assert_eq!(
        d.roster(Method::GET, "/users", &not_yet, None).await.status,
        401
    );
    let no_scope = d.jwt(TENANT, "openid");
    let r = d.roster(Method::GET, "/users", &no_scope, None).await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (403, Some("insufficient_scope"))
    );
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"rosterd\", error=\"insufficient_scope\", scope=\"roster:read\"")
    );
    // Scopes are split at spaces only (RFC 6749 §3.3).
    let nbsp = d.jwt(TENANT, "roster:admin\u{a0}openid");
    api_error(
        &d.roster(Method::GET, "/users", &nbsp, None).await,
        403,
        "insufficient_scope",
    );
    // A claim that is there but of the wrong type is named as invalid, not missing.
    for claims in [
        json!({"sub": "x", "tenant": TENANT, "scope": "roster:read", "aud": "rosterd-tests", "exp": (now + 60).to_string()}),
        json!({"sub": "x", "tenant": TENANT, "scope": "roster:read", "aud": "rosterd-tests", "exp": now + 60, "iss": ["a", "b"]}),
    ] {
        let r = d
            .roster(Method::GET, "/users", &jwt_with(claims), None)
            .await;
        api_error(&r, 401, "token_invalid_claim");
    }
    // A `sub` is who acts, and overrides and events record it: one that names no one,
    // or not on one line, is as good as missing, and the message says what is wrong.
    for (sub, says) in [
        ("", "required claim `sub`"),
        (" ", "blank"),
        ("\u{3000}", "blank"),
        ("\t", "control character"),
        ("a\nb", "control character"),
    ] {
        let t = jwt_with(
            json!({"sub": sub, "tenant": TENANT, "scope": "roster:admin", "aud": "rosterd-tests", "exp": now + 60}),
        );
        let r = d
            .override_archetype(&format!("/users/{id}"), &t, json!("sales_rep"))
            .await;
        api_error_saying(&r, 401, "token_missing_claim", says);
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"rosterd\", error=\"invalid_token\""),
            "{sub:?}"
        );
    }

    // X-Tenant must agree with the token.
    let r = d
        .roster_with(
            Method::GET,
            "/users",
            &admin,
            None,
            &[("x-tenant", OTHER_TENANT)],
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (403, Some("tenant_mismatch"))
    );
    let r = d
        .roster_with(Method::GET, "/users", &admin, None, &[("x-tenant", TENANT)])
        .await;
    assert_eq!(r.status, 200);
    // A second copy of the header is checked as well as the first.
    let r = d
        .roster_with(
            Method::GET,
            "/users",
            &admin,
            None,
            &[("x-tenant", TENANT), ("x-tenant", OTHER_TENANT)],
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (403, Some("tenant_mismatch"))
    );
    // A token for an undeclared tenant opens nothing.
    let stranger = d.jwt("initech", "roster:admin");
    api_error(
        &d.roster(Method::GET, "/users", &stranger, None).await,
        403,
        "unknown_tenant",
    );
    // A bare userName in the path is the usual slip; the 404 says what to write.
    let r = d
        .roster(Method::GET, "/users/iso@acme.test", &admin, None)
        .await;
    api_error_saying(&r, 404, "not_found", "user:<userName>");

    // globex cannot see or change acme's users, by name or by id.
    let globex = d.jwt(OTHER_TENANT, "roster:admin");
    let r = d
        .roster(Method::GET, "/users?active=any", &globex, None)
        .await;
    assert_eq!(r.body["users"], json!([]));
    for path in [
        "/users/user:iso@acme.test".to_owned(),
        format!("/users/{id}"),
    ] {
        assert_eq!(
            d.roster(Method::GET, &path, &globex, None).await.status,
            404
        );
        let r = d
            .override_archetype(&path, &globex, json!("sales_rep"))
            .await;
        assert!(matches!(r.status.as_u16(), 404 | 422), "{}", r.status);
    }
    let r = d
        .roster(Method::GET, &format!("/events?user_id={id}"), &globex, None)
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn openapi_lists_exactly_the_served_operations() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let doc: Value = d
        .client
        .get(d.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 12);
    let mut checked = 0;
    for (path, item) in paths {
        for method in ["get", "post", "patch", "put", "delete"] {
            let Some(op) = item.get(method) else { continue };
            assert!(op["responses"].is_object(), "{method} {path}");
            let url = path
                .replace("{user_id}", "user:nobody@acme.test")
                .replace("{job_id}", "none")
                .replace("{name}", "nope")
                .replace("{id}", "1");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let resp = d
                .client
                .request(m, d.url(&url))
                .bearer_auth(&admin)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            // Served by a Roster API handler: a 2xx, or one of its JSON errors; never the
            // router's 404/405.
            assert_ne!(status, 405, "{method} {path}");
            assert!(
                status < 300 || body.get("error").is_some(),
                "{method} {path}: {status} {body}"
            );
            let documented = op["responses"].get(status.to_string()).is_some();
            assert!(
                documented,
                "{method} {path} answered {status}, which the document does not list"
            );
            // A query parameter the operation does not declare: whatever it answers
            // (a 400 where parameters are checked) is documented too.
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let status = d
                .client
                .request(m, d.url(&format!("{url}?zz_undeclared=1")))
                .bearer_auth(&admin)
                .json(&json!({}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            assert!(
                op["responses"].get(status.to_string()).is_some(),
                "{method} {path}?zz_undeclared=1 answered {status}, which the document does not list"
            );
            // Every authenticated operation declares the tenant headers it checks.
            if op.get("security") != Some(&json!([])) {
                let params = op["parameters"].as_array().unwrap();
                assert!(
                    params
                        .iter()
                        .any(|p| p["$ref"] == "#/components/parameters/XTenant"),
                    "{method} {path}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 13, "{checked}");
}

/// Whether `value` has what `schema` (of the served OpenAPI document `doc`) says it
/// has: required fields, the declared types of the fields it carries, array items,
/// `$ref`, `oneOf` and `not`. Enough of JSON Schema to hold the document to the handlers.
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return conforms(doc, &doc["components"]["schemas"][name], value, at);
    }
    if let Some(not) = schema.get("not")
        && conforms(doc, not, value, at).is_ok()
    {
        return Err(format!(
            "{at}: {value} matches what the schema rules out: {not}"
        ));
    }
    if let Some(any) = schema["oneOf"].as_array() {
        return any
            .iter()
            .find(|s| conforms(doc, s, value, at).is_ok())
            .map(|_| ())
            .ok_or_else(|| format!("{at}: {value} matches no oneOf branch"));
    }
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let fits = |t: &&str| *t == kind || (*t == "number" && kind == "integer");
    if !types.is_empty() && !types.iter().any(fits) {
        return Err(format!("{at}: {value} is {kind}, documented as {types:?}"));
    }
    if let Value::Object(o) = value {
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap();
            if !o.contains_key(r) {
                return Err(format!("{at}: required {r:?} missing from {value}"));
            }
        }
        for (k, v) in o {
            if let Some(s) = schema["properties"].get(k) {
                conforms(doc, s, v, &format!("{at}.{k}"))?;
            }
        }
    }
    if let (Value::Array(items), Some(s)) = (value, schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            conforms(doc, s, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// What each read answers is what the document says it answers, required fields
/// included, so code generated from it neither misses a field nor makes one optional.
#[tokio::test]
async fn answers_are_shaped_as_the_openapi_document_says() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let doc = d
        .raw(Method::GET, &d.url("/api/v1/openapi.json"), None, &[], None)
        .await
        .body;
    let ada = create(
        &d,
        "ada@acme.test",
        "software engineer",
        Some("Engineering"),
    )
    .await;
    create(&d, "vague@acme.test", "specialist", None).await;
    // No address anywhere: its email is null. A deleted user's events stay listed.
    let r = d
        .post("/Users", json!({"userName": "jdoe", "title": "accountant"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let gone = create(&d, "gone@acme.test", "accountant", None).await;
    assert_eq!(d.delete(&format!("/Users/{gone}")).await.status, 204);
    let gid = d.create_group("Leads").await;
    d.add_members(&gid, &[&ada]).await;
    let r = d
        .override_archetype("/users/user:ada@acme.test", &admin, json!("eng_lead"))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    d.idle().await;
    for (path, url) in [
        ("/api/v1/roster/users", "/users?active=any"),
        (
            "/api/v1/roster/users/{user_id}",
            "/users/user:ada@acme.test",
        ),
        ("/api/v1/roster/archetypes", "/archetypes"),
        ("/api/v1/roster/groups", "/groups"),
        ("/api/v1/roster/review", "/review"),
        ("/api/v1/roster/events", "/events"),
    ] {
        let r = d.roster(Method::GET, url, &admin, None).await;
        assert_eq!(r.status, 200, "{url}: {}", r.body);
        let schema =
            &doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"];
        assert!(schema.is_object(), "{path} documents its 200");
        if let Err(e) = conforms(&doc, schema, &r.body, url) {
            panic!("{e}");
        }
    }
    // The queue and the events hold something, so their items were checked.
    let review = d.roster(Method::GET, "/review", &admin, None).await;
    assert!(
        !review.body["items"].as_array().unwrap().is_empty(),
        "{}",
        review.body
    );
    let events = d.roster(Method::GET, "/events", &admin, None).await;
    let events = events.body["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "rbac.archetype_overridden")
    );
    assert!(events.iter().any(|e| e["kind"] == "rbac.archetype_removed"));
    let users = d
        .roster(Method::GET, "/users?active=any", &admin, None)
        .await;
    assert!(
        users.body["users"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["email"].is_null()),
        "{}",
        users.body
    );
}

/// A request target over 65,534 bytes is refused by hyper itself, 414 without a body,
/// before rosterd sees it (hyper has no setting for it): the OpenAPI document says so for
/// every operation, and one byte less is read and answered in the protocol's own format.
#[tokio::test]
async fn a_uri_too_long_to_read_is_414_as_documented() {
    let d = TestDaemon::start().await;
    let admin = d.jwt(TENANT, "roster:admin");
    let doc = d
        .raw(Method::GET, &d.url("/api/v1/openapi.json"), None, &[], None)
        .await
        .body;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let r = &op["responses"]["414"];
            assert!(
                r["description"]
                    .as_str()
                    .is_some_and(|t| t.contains("no body"))
                    && r.get("content").is_none(),
                "{method} {path}: {r}"
            );
        }
    }
    // The request target: path and query, as hyper counts it. Sent by hand: reqwest's
    // URI type holds the whole URL to the same limit, so it would send neither.
    let target = |prefix: &str, len: usize| format!("{prefix}{}", "a".repeat(len - prefix.len()));
    for (prefix, token, error) in [
        (
            "/api/v1/roster/users?zz=",
            &admin,
            "\"error\":\"invalid_request\"",
        ),
        (
            "/scim/v2/acme/Users?filter=",
            &d.token,
            "\"status\":\"400\"",
        ),
    ] {
        let answer = raw_http(d.addr, &target(prefix, 65_535), token).await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 "), "{prefix}: {head}");
        assert_eq!(body, "", "{prefix}");
        // One byte less is read, and refused in the protocol's own words.
        let answer = raw_http(d.addr, &target(prefix, 65_534), token).await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 "), "{prefix}: {head}");
        assert!(body.contains(error), "{prefix}: {body}");
    }
}

/// GET `target` with a bearer token over a fresh connection, written by hand; the whole
/// answer as text.
async fn raw_http(addr: std::net::SocketAddr, target: &str, token: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: rosterd\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// A Roster API error is `{error, message}` JSON with a stable code, whatever refused the
/// request: a handler, or axum before any handler ran.
/// An API error whose message says `text`.
/// A reviewer who says which suggestion they accept gets it, or 409 when the IdP changed
/// the title since they read the item; a bare accept took whatever the suggestion had
/// become (the tenant default here) and made it a sticky override.
#[tokio::test]
async fn accepting_a_review_item_can_name_the_suggestion_that_was_shown() {
    let d = TestDaemon::start().await;
    let admin = d.jwt(TENANT, "roster:admin");
    let id = create(&d, "pipes@acme.test", "account engineer", None).await;
    let shown = roster_user(&d, &admin, &id).await;
    let seen = shown["archetype_id"].as_str().unwrap().to_owned();
    assert!(
        shown["archetype_confidence"].as_f64().unwrap() < 0.7,
        "{shown}"
    );
    let retitle = json!([{"op": "replace", "path": "title", "value": "software sales"}]);
    let r = d.patch(&format!("/Users/{id}"), patch_op(retitle)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let now = roster_user(&d, &admin, &id).await;
    let now = now["archetype_id"].as_str().unwrap().to_owned();
    assert_ne!(now, seen, "the new title must suggest another archetype");

    let accept = |body: Value| {
        let (d, admin, id) = (&d, &admin, &id);
        async move {
            d.roster(
                Method::POST,
                &format!("/review/{id}/accept"),
                admin,
                Some(body),
            )
            .await
        }
    };
    let r = accept(json!({"expected_archetype_id": seen})).await;
    api_error_saying(
        &r,
        409,
        "suggestion_changed",
        &format!("the suggestion is \"{now}\", not \"{seen}\""),
    );
    // Nothing was written: still an item, no event.
    let user = roster_user(&d, &admin, &id).await;
    let by = user["archetype_assigned_by"].as_str().unwrap();
    assert!(by.starts_with("service:"), "{user}");
    let review = d.roster(Method::GET, "/review", &admin, None).await;
    assert!(
        review.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["scim_id"] == id.as_str()),
        "{}",
        review.body
    );
    let r = accept(json!({"expected_archetype_id": seen, "archetype_id": seen})).await;
    api_error_saying(&r, 400, "invalid_request", "send one");
    // The served document rules out that body too, and only that one of these.
    let doc = d
        .raw(Method::GET, &d.url("/api/v1/openapi.json"), None, &[], None)
        .await
        .body;
    let schema = &doc["paths"]["/api/v1/roster/review/{user_id}/accept"]["post"]["requestBody"]["content"]
        ["application/json"]["schema"];
    let both = json!({"expected_archetype_id": seen, "archetype_id": seen});
    assert!(conforms(&doc, schema, &both, "both").is_err(), "{schema}");
    for one in [
        json!({"expected_archetype_id": seen}),
        json!({"expected_archetype_id": seen, "archetype_id": null}),
        json!({"archetype_id": seen}),
        json!({}),
    ] {
        conforms(&doc, schema, &one, "one").unwrap();
    }
    let r = accept(json!({"expected_archetype_id": 7})).await;
    api_error_saying(&r, 400, "invalid_request", "expected_archetype_id must be");
    let r = accept(json!({"expected_archetype_id": "sales_repp"})).await;
    api_error_saying(&r, 400, "invalid_archetype", "sales_repp");
    let r = accept(json!({"expected_archetype_id": now})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["archetype_id"], now.as_str(), "{}", r.body);
    let user = roster_user(&d, &admin, &id).await;
    let by = user["archetype_assigned_by"].as_str().unwrap();
    assert!(by.starts_with("user:"), "{user}");
}

/// The tenant claim is logged before it is found to name a tenant: a direction control
/// in it goes to the log escaped, as the answer's message has it, not as is (it would
/// reverse the rest of the line on the operator's terminal).
#[tokio::test]
async fn a_tenant_claim_goes_to_the_log_escaped() {
    let (logs, _guard) = crate::harness::LogBuf::capture();
    let d = TestDaemon::start().await;
    let token = d.jwt("ahpla\u{202E}", "roster:admin");
    let r = d.roster(Method::GET, "/users", &token, None).await;
    api_error(&r, 403, "unknown_tenant");
    let said = logs.lines("ahpla");
    assert!(!said.is_empty(), "the refusal was not logged");
    for line in said {
        assert!(
            !line.contains('\u{202E}') && line.contains("ahpla\\u{202e}"),
            "{line:?}"
        );
    }
}

fn api_error_saying(r: &crate::harness::Resp, status: u16, code: &str, text: &str) {
    api_error(r, status, code);
    let msg = r.body["message"].as_str().unwrap_or_default();
    assert!(msg.contains(text), "{msg:?} should say {text:?}");
}

fn api_error(r: &crate::harness::Resp, status: u16, code: &str) {
    assert_eq!(r.status.as_u16(), status, "{}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{}",
        r.body
    );
    assert_eq!(r.body["error"], code, "{}", r.body);
    assert!(
        r.body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn every_roster_api_error_is_the_apis_json() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let id = create(&d, "ann@acme.test", "software engineer", None).await;

    api_error(
        &d.roster(Method::GET, "/nope", &admin, None).await,
        404,
        "not_found",
    );
    let r = d
        .roster(Method::DELETE, "/users/user:ann@acme.test", &admin, None)
        .await;
    api_error(&r, 405, "method_not_allowed");
    assert!(
        r.header("allow").is_some_and(|a| a.contains("PATCH")),
        "{:?}",
        r.headers
    );
    let r = d.roster(Method::PUT, "/archetypes", &admin, None).await;
    api_error(&r, 405, "method_not_allowed");
    let big = vec![b' '; 2 * 1024 * 1024];
    let url = d.url("/api/v1/roster/archetype:bulk-assign");
    let r = d
        .raw(Method::POST, &url, Some(&admin), &[], Some(big))
        .await;
    api_error(&r, 413, "payload_too_large");
    let url = d.url("/api/v1/roster/users/%FF");
    let r = d.raw(Method::GET, &url, Some(&admin), &[], None).await;
    api_error(&r, 400, "invalid_request");
    // SCIM keeps its own error schema.
    let r = d.get("/Nope").await;
    assert_eq!(r.status, 404);
    assert!(
        r.body["schemas"].to_string().contains("Error"),
        "{}",
        r.body
    );

    // Cursors: only one a page issued is taken.
    use base64::Engine;
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("not-an-id");
    for path in [
        format!("/users?cursor={forged}"),
        "/users?cursor=".to_owned(),
        "/users?cursor=AAAA".to_owned(),
        "/review?cursor=Zm9v".to_owned(),
    ] {
        api_error(
            &d.roster(Method::GET, &path, &admin, None).await,
            400,
            "invalid_request",
        );
    }
    let r = d.roster(Method::GET, "/users?limit=1", &admin, None).await;
    let cursor = r.body["next_cursor"].as_str().map(str::to_owned);
    if let Some(c) = cursor {
        let r = d
            .roster(Method::GET, &format!("/users?cursor={c}"), &admin, None)
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }

    // Endpoints without parameters refuse unknown ones, like the rest.
    for path in ["/archetypes?colour=red", "/groups?colour=red"] {
        api_error(
            &d.roster(Method::GET, path, &admin, None).await,
            400,
            "invalid_request",
        );
    }

    // Case-insensitive filters fold case as their indexes do, beyond ASCII.
    let etudes = create(
        &d,
        "Eve.Étoile@acme.test",
        "software engineer",
        Some("Études"),
    )
    .await;
    for q in [
        "/users?department=%C3%A9tudes",
        "/users?department=%C3%89TUDES&archetype=software_engineer",
        "/users?email=eve.%C3%A9toile@acme.test&archetype=software_engineer",
    ] {
        let r = d.roster(Method::GET, q, &admin, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let ids: Vec<&str> = r.body["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["scim_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [etudes.as_str()], "{q}");
    }

    // A review item accepts `{}` as the OpenAPI document allows, and a body of blanks
    // as no body; an empty id is refused in this endpoint's own words.
    let who = create(&d, "who@acme.test", "zzqx blorp", None).await;
    let r = d
        .roster(
            Method::POST,
            &format!("/review/{who}/accept"),
            &admin,
            Some(json!({"archetype_id": ""})),
        )
        .await;
    api_error_saying(&r, 400, "invalid_request", "null to accept the suggestion");
    let r = d
        .roster(
            Method::POST,
            &format!("/review/{who}/accept"),
            &admin,
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let blank = create(&d, "blank-body@acme.test", "zzqx blorp", None).await;
    let url = d.url(&format!("/api/v1/roster/review/{blank}/accept"));
    let r = d
        .raw(
            Method::POST,
            &url,
            Some(&admin),
            &[("content-type", "application/json")],
            Some(b"  \n".to_vec()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // A deleted user's history stays reachable, and named: by SCIM id (in either case)
    // and by the userName they had.
    assert_eq!(d.delete(&format!("/Users/{id}")).await.status, 204);
    let events = events_of(&d, &admin, &id).await;
    assert_eq!(
        events.last().map(|e| &e["kind"]),
        Some(&json!("rbac.archetype_removed")),
        "{events:?}"
    );
    assert!(
        events.iter().all(|e| e["user_id"] == "user:ann@acme.test"),
        "{events:?}"
    );
    assert_eq!(events_of(&d, &admin, &id.to_uppercase()).await, events);
    assert_eq!(events_of(&d, &admin, "user:ANN@acme.test").await, events);
    let r = d
        .roster(
            Method::GET,
            "/events?user_id=user:nobody@acme.test",
            &admin,
            None,
        )
        .await;
    api_error(&r, 404, "not_found");
    // An uppercase SCIM id names the same user.
    let r = d
        .roster(
            Method::GET,
            &format!("/users/{}", who.to_uppercase()),
            &admin,
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A filter no event could pass is a mistake to report, not an empty page.
    for q in [
        "/events?kind=rbac.archetype_overriden",
        "/events?kind=",
        "/events?since=2026-12-02T08:00:00Z&until=2026-12-02T07:00:00Z",
    ] {
        api_error(
            &d.roster(Method::GET, q, &admin, None).await,
            400,
            "invalid_request",
        );
    }
}

#[tokio::test]
async fn requests_are_read_strictly_whatever_the_endpoint() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let id = create(&d, "s@acme.test", "software engineer", None).await;
    // A query parameter the endpoint does not take is refused on every endpoint, not
    // just on the lists.
    for (method, path) in [
        (Method::GET, format!("/users/{id}?fields=email")),
        (Method::PATCH, format!("/users/{id}?dry_run=true")),
        (
            Method::POST,
            "/archetype:bulk-assign?dry_run=true".to_owned(),
        ),
        (Method::POST, "/scim:sync?dry_run=true".to_owned()),
        (Method::GET, "/connectors?x=1".to_owned()),
        (Method::GET, "/scim/jobs/nope?x=1".to_owned()),
    ] {
        let r = d
            .roster(
                method.clone(),
                &path,
                &admin,
                Some(json!({"archetype_id": null})),
            )
            .await;
        api_error(&r, 400, "invalid_request");
        assert!(
            r.body["message"]
                .as_str()
                .unwrap()
                .contains("unknown query parameter"),
            "{path}: {}",
            r.body
        );
    }
    // A query value that is not UTF-8 once decoded is refused, not matched as U+FFFD
    // (an empty page), in a value and in a name.
    for path in [
        "/users?department=%FF",
        "/events?kind=%C3%28",
        "/users?%FF=1",
    ] {
        let r = d.roster(Method::GET, path, &admin, None).await;
        api_error_saying(&r, 400, "invalid_request", "not UTF-8");
        // Judged only for a caller the daemon knows, and after its scope: the query of a
        // request with a bad token or too narrow a scope is not the first thing wrong.
        let r = d.roster(Method::GET, path, "not-a-jwt", None).await;
        api_error(&r, 401, "token_malformed");
    }
    let reader = d.jwt(TENANT, "roster:read");
    let r = d
        .roster(Method::POST, "/scim:sync?%FF=1", &reader, None)
        .await;
    api_error(&r, 403, "insufficient_scope");
    // `+` is a space, as clients building query strings encode one; `%2B` is a plus.
    create(
        &d,
        "plus+tag@acme.test",
        "accountant",
        Some("Human Resources"),
    )
    .await;
    let listed = |query: &'static str| {
        let d = &d;
        let admin = &admin;
        async move {
            let r = d.roster(Method::GET, query, admin, None).await;
            assert_eq!(r.status, 200, "{query}: {}", r.body);
            r.body["users"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["user_id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let want = vec!["user:plus+tag@acme.test".to_owned()];
    assert_eq!(listed("/users?department=Human+Resources").await, want);
    assert_eq!(listed("/users?email=plus%2Btag%40acme.test").await, want);
    assert!(listed("/users?email=plus+tag@acme.test").await.is_empty());
    // An empty user_id is refused as the other filters refuse one, not a 404.
    for query in [
        "/events?user_id=",
        "/events?user_id=user:",
        "/events?user_id=%20",
    ] {
        let r = d.roster(Method::GET, query, &admin, None).await;
        api_error_saying(&r, 400, "invalid_request", "user_id is empty");
    }
    // A message quoting what the client sent is cut: a 60,000-byte filter came back whole.
    let long = "g".repeat(60_000);
    let r = d
        .roster(Method::GET, &format!("/users?group={long}"), &admin, None)
        .await;
    api_error_saying(&r, 400, "invalid_request", "bytes in all)");
    assert!(
        r.body["message"].as_str().unwrap().len() < 1200,
        "{}",
        r.body
    );
    // A form post by mistake is told to send JSON; no Content-Type is read as JSON.
    let url = d.url(&format!("/api/v1/roster/users/{id}"));
    let send_body = |ct: Option<&'static str>, body: &'static str| {
        let mut req = d.client.patch(&url).bearer_auth(&admin).body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        async move { crate::harness::Resp::read(req.send().await.unwrap()).await }
    };
    let send = |ct| send_body(ct, r#"{"archetype_id": "fpa_analyst"}"#);
    let r = send(Some("application/x-www-form-urlencoded")).await;
    api_error(&r, 415, "unsupported_media_type");
    // A key given twice is ambiguous: JSON parsers keep one or the other.
    let r = send_body(
        None,
        r#"{"archetype_id": "sales_rep", "archetype_id": "fpa_analyst"}"#,
    )
    .await;
    api_error(&r, 400, "invalid_request");
    let msg = r.body["message"].as_str().unwrap();
    assert!(
        msg.contains("the key \"archetype_id\" is given twice"),
        "{msg}"
    );
    // A compressed body is refused, not read as plain text (nor called "not JSON").
    for encoding in ["gzip", "identity, br"] {
        let r = d
            .client
            .patch(&url)
            .bearer_auth(&admin)
            .header("content-encoding", encoding)
            .body(r#"{"archetype_id": "fpa_analyst"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["accept-encoding"], "identity");
        let r = crate::harness::Resp::read(r).await;
        api_error(&r, 415, "unsupported_media_type");
        let msg = r.body["message"].as_str().unwrap();
        assert!(msg.contains("Content-Encoding"), "{msg}");
    }
    // The body is judged only once the token lets the request in, and only where a body
    // is read: a GET ignores one, compressed or not, as it ignores a plain one.
    let zipped = |method: Method, path: &str, token: Option<&str>| {
        let mut req = d
            .client
            .request(method, d.url(&format!("/api/v1/roster{path}")))
            .header("content-encoding", "gzip")
            .body("hello");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { crate::harness::Resp::read(req.send().await.unwrap()).await }
    };
    let r = zipped(Method::PATCH, &format!("/users/{id}"), None).await;
    api_error(&r, 401, "token_missing");
    let reader = d.jwt(TENANT, "roster:read");
    let r = zipped(Method::PATCH, &format!("/users/{id}"), Some(&reader)).await;
    api_error(&r, 403, "insufficient_scope");
    let r = zipped(Method::GET, "/archetypes", None).await;
    api_error(&r, 401, "token_missing");
    let r = zipped(Method::GET, "/archetypes", Some(&admin)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        d.client
            .get(d.url("/api/v1/openapi.json"))
            .header("content-encoding", "gzip")
            .body("hello")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        roster_user(&d, &admin, &id).await["archetype_assigned_by"],
        "service:classifier",
        "nothing changed"
    );
    let r = d
        .client
        .patch(&url)
        .bearer_auth(&admin)
        .header("content-encoding", "identity")
        .body(r#"{"archetype_id": "fpa_analyst"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "identity is no encoding");
    let r = send(None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A JSON array is no options object, even where serde would read one from it.
    let r = d
        .roster(Method::POST, "/scim:sync", &admin, Some(json!([true])))
        .await;
    api_error(&r, 400, "invalid_request");
    let r = d
        .roster(Method::POST, "/scim:sync", &admin, Some(json!([])))
        .await;
    api_error(&r, 400, "invalid_request");

    // Events: the last page says so, even when it is exactly full.
    let all = d
        .roster(Method::GET, &format!("/events?user_id={id}"), &admin, None)
        .await;
    let n = all.body["events"].as_array().unwrap().len();
    assert!(n >= 2, "{}", all.body);
    assert!(all.body["next_after"].is_null(), "{}", all.body);
    let r = d
        .roster(
            Method::GET,
            &format!("/events?user_id={id}&limit={n}"),
            &admin,
            None,
        )
        .await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), n);
    assert!(
        r.body["next_after"].is_null(),
        "a full last page: {}",
        r.body
    );
    let r = d
        .roster(
            Method::GET,
            &format!("/events?user_id={id}&limit={}", n - 1),
            &admin,
            None,
        )
        .await;
    let next = r.body["next_after"].as_u64().expect("another page follows");
    let r = d
        .roster(
            Method::GET,
            &format!("/events?user_id={id}&after={next}"),
            &admin,
            None,
        )
        .await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 1, "{}", r.body);
}

/// RFC 7643 §2.5: null is unassigned, so a replace with null clears the attribute as a
/// remove does, and the cleared title reclassifies the user in the same write.
#[tokio::test]
async fn replacing_a_title_with_null_clears_it_and_reclassifies() {
    let d = TestDaemon::start().await;
    let admin = settled(&d).await;
    let id = create(&d, "nul@acme.test", "financial analyst", None).await;
    assert_eq!(
        roster_user(&d, &admin, &id).await["archetype_id"],
        "fpa_analyst"
    );
    let r = d
        .patch(
            &format!("/Users/{id}"),
            patch_op(json!([
                {"op": "Replace", "path": "title", "value": null},
                // Nothing matches: clearing it leaves the user as it is.
                {"op": "replace", "path": "emails[type eq \"home\"].value", "value": null},
            ])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.get("title").is_none(), "{}", r.body);
    assert_eq!(r.body["emails"][0]["value"], "nul@acme.test", "{}", r.body);
    let u = roster_user(&d, &admin, &id).await;
    assert!(u["job_title"].is_null(), "{u}");
    assert_ne!(u["archetype_id"], "fpa_analyst", "{u}");
    // Adding null adds nothing: refused, saying how to clear.
    let r = d
        .patch(
            &format!("/Users/{id}"),
            patch_op(json!([{"op": "add", "path": "title", "value": null}])),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["scimType"], "invalidValue", "{}", r.body);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("replace it with null"),
        "{}",
        r.body
    );
}

/// A GET of the export sent over a socket that then reads nothing, with a small receive
/// window so that the daemon's writes back up at once.
async fn stalled_export(d: &TestDaemon, token: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(d.addr).await.unwrap();
    let request = format!(
        "GET /api/v1/roster/users:export?format=csv HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\r\n",
        d.addr
    );
    s.write_all(request.as_bytes()).await.unwrap();
    s
}

/// A daemon whose clients are let go after a second of reading nothing, with 120 users
/// whose export is about 7 MB: far more than the socket buffers and the export's channel
/// hold. An admin token for it.
async fn with_a_long_export() -> (TestDaemon, String) {
    let d = TestDaemon::start_with(crate::harness::Options {
        client_timeout_secs: 1,
        ..crate::harness::Options::default()
    })
    .await;
    let admin = settled(&d).await;
    let long = "x".repeat(60_000);
    for i in 0..120 {
        let mut u = crate::harness::user(&format!("wide{i}@acme.test"));
        u["title"] = json!(long);
        assert_eq!(d.post("/Users", u).await.status, 201);
    }
    (d, admin)
}

/// A client that reads an export slowly but without stopping gets all of it, however
/// long the kernel's socket buffers take to drain: it was let go as if it read nothing,
/// since the kernel wakes a writer only once a third of a send buffer of megabytes has
/// drained (an audit's 40 KB/s reader was cut off after 20 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reading_an_export_slowly_gets_all_of_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (d, admin) = with_a_long_export().await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(65_536).unwrap();
    let mut s = socket.connect(d.addr).await.unwrap();
    let request = format!(
        "GET /api/v1/roster/users:export?format=csv HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {admin}\r\nConnection: close\r\n\r\n",
        d.addr
    );
    s.write_all(request.as_bytes()).await.unwrap();
    // About 640 KB/s: a second passes between the writer's wake-ups.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} bytes",
            got.len()
        );
        // Bounded: a read that never ends (seen once, in a loaded parallel run, not
        // reproduced) fails here with what was read, rather than holding the suite.
        let read = tokio::time::timeout(std::time::Duration::from_secs(60), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("nothing sent for 60 s, after {} bytes", got.len()));
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(got.len() > 7_000_000, "{} bytes", got.len());
    assert!(
        got.ends_with(b"0\r\n\r\n"),
        "cut off after {} bytes",
        got.len()
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_an_export_holds_its_slot_only_until_the_client_timeout() {
    use rosterd::api::export::EXPORTS_PER_TENANT;
    use tokio::io::AsyncReadExt;
    let (d, admin) = with_a_long_export().await;
    let mut stalled = Vec::new();
    for _ in 0..EXPORTS_PER_TENANT {
        stalled.push(stalled_export(&d, &admin).await);
    }
    let export = || async {
        d.client
            .get(d.url("/api/v1/roster/users:export?format=csv"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
    };
    // Every slot of the tenant is held: one more is told to come back.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let busy = loop {
        let resp = export().await;
        if resp.status() == 429 {
            break resp;
        }
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        assert!(
            tokio::time::Instant::now() < deadline,
            "no export was refused"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(busy.headers()["retry-after"], "10");
    let body: Value = busy.json().await.unwrap();
    assert_eq!(body["error"], "too_many_exports", "{body}");
    // The tenant's writes go on meanwhile.
    assert_eq!(
        d.post("/Users", crate::harness::user("during@acme.test"))
            .await
            .status,
        201
    );
    // A second after they stopped reading, the stalled exports are ended and their
    // slots free: a whole export is served again.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let text = loop {
        let resp = export().await;
        if resp.status() == 200 {
            break resp.text().await.unwrap();
        }
        assert_eq!(resp.status(), 429);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slots were never freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let rows = csv::Reader::from_reader(text.as_bytes()).records().count();
    assert_eq!(rows, 121, "every user, the one written meanwhile too");
    // Every stalled export let go: all the tenant's slots can be taken at once. (One
    // whose client's receive buffer still took bytes in its first wait gets another
    // before it is let go; were its client to read meanwhile, it would get the file.)
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut open = Vec::new();
        for _ in 0..EXPORTS_PER_TENANT {
            open.push(export().await);
        }
        if open.iter().all(|r| r.status() == 200) {
            break;
        }
        drop(open);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled exports were never all let go"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // A stalled client that reads at last finds its body cut off, not a complete CSV
    // (a chunked body that ends without its last chunk).
    let mut got = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        stalled[0].read_to_end(&mut got),
    )
    .await
    .expect("the daemon closed the stalled connection");
    assert!(
        read.is_err() || !got.ends_with(b"0\r\n\r\n"),
        "a stalled export read as complete"
    );
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got[..got.len().min(200)])
    );
}
