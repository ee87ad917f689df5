//! The operator's surface in-process: /status and /readyz contents, bundle reload (as
//! SIGHUP asks for it).

use crate::harness::{OTHER_TENANT, TENANT, TestDaemon, patch_op};
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test]
async fn status_counts_each_tenant_and_readyz_answers() {
    let d = TestDaemon::start().await;
    let a = d.create_user("a@acme.test").await;
    d.create_user("b@acme.test").await;
    d.create_group("Ops").await;
    d.patch(
        &format!("/Users/{a}"),
        patch_op(json!([{"op": "replace", "value": {"active": false}}])),
    )
    .await;
    let r = d.raw(Method::GET, &d.url("/readyz"), None, &[], None).await;
    assert_eq!(r.status, 200);
    let s = d
        .raw(Method::GET, &d.url("/status"), None, &[], None)
        .await
        .body;
    // The package's version, and the commit built from when there is one.
    assert_eq!(s["version"], rosterd::VERSION);
    assert_eq!(rosterd::VERSION, expected_version());
    assert!(s["uptime_seconds"].as_i64().unwrap() >= 0);
    assert!(s["store"]["size_bytes"].as_u64().unwrap() > 0);
    assert_eq!(s["draining"], false);
    let t = &s["tenants"][TENANT];
    assert_eq!(t["users"], 2, "{s}");
    assert_eq!(t["active_users"], 1, "{s}");
    assert_eq!(t["groups"], 1, "{s}");
    assert!(t["review_queue"].is_u64());
    assert!(t["last_seq"].as_u64().unwrap() >= 4);
    assert_eq!(s["tenants"][OTHER_TENANT]["users"], 0);
    // Nothing personal: no userName in the document.
    assert!(!s.to_string().contains("a@acme.test"));
}

/// A tenant taken out of config.toml keeps its data in the store, and the start says so:
/// nothing did, and the store seemed to hold only what is served.
#[tokio::test]
async fn a_tenant_taken_out_of_the_config_is_said_to_keep_its_data() {
    let (token, hash) = rosterd::server::auth::new_token();
    let ghost = format!("[[tenants]]\nid = \"ghost\"\ntoken_hashes = [\"{hash}\"]\n");
    let d = TestDaemon::start_with(crate::harness::Options {
        config_extra: ghost,
        ..crate::harness::Options::default()
    })
    .await;
    for name in ["a@ghost.test", "b@ghost.test"] {
        let r = d
            .raw(
                Method::POST,
                &d.url("/scim/v2/ghost/Users"),
                Some(&token),
                &[("content-type", "application/scim+json")],
                Some(crate::harness::user(name).to_string().into_bytes()),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let (logs, _guard) = crate::harness::LogBuf::capture();
    let d = d.restart_with(|o| o.config_extra = String::new()).await;
    // Up once it answers.
    d.status().await;
    let said = logs.lines("config.toml does not declare it");
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].contains("WARN") && said[0].contains("tenant=ghost") && said[0].contains("users=2"),
        "{said:?}"
    );
    // Declared tenants are not named.
    assert!(
        logs.lines("does not declare")
            .iter()
            .all(|l| !l.contains(TENANT))
    );
    // Nor only at the start: its IdP is answered 401 as for a wrong token, and the
    // on-call saw nothing else say why.
    let status = d.status().await;
    assert_eq!(
        status["undeclared_tenants"],
        json!([{"tenant": "ghost", "users": 2, "groups": 0}]),
        "{status}"
    );
    let shown = crate::mirror::status_text(&d).await;
    assert!(
        shown.contains("tenant ghost: NOT DECLARED in config.toml")
            && shown.contains("the store keeps its 2 users and 0 groups"),
        "{shown}"
    );
    drop(d);
}

#[tokio::test]
async fn sighup_reloads_a_changed_bundle_and_reclassifies() {
    let d = TestDaemon::start().await;
    d.create_user("dev@acme.test").await;
    let reader = d.jwt(TENANT, "roster:read");
    let r = d.roster(Method::GET, "/archetypes", &reader, None).await;
    assert_eq!(r.body["bundle_version"], "test-1");
    let bundle = d.root.join("bundle.toml");
    let text = std::fs::read_to_string(&bundle).unwrap();
    std::fs::write(
        &bundle,
        text.replace("version = \"test-1\"", "version = \"test-2\""),
    )
    .unwrap();
    d.reload().await;
    let r = d.roster(Method::GET, "/archetypes", &reader, None).await;
    assert_eq!(r.body["bundle_version"], "test-2", "{}", r.body);
    // A broken bundle is refused and the working one stays.
    std::fs::write(&bundle, "version = ").unwrap();
    d.reload().await;
    let r = d.roster(Method::GET, "/archetypes", &reader, None).await;
    assert_eq!(r.body["bundle_version"], "test-2", "{}", r.body);
}

/// A full disk cannot be made on demand, so the store's next flush is made to fail as
/// one would (`fail_next_flush_in`); everything after that is the production path.
#[tokio::test]
async fn a_failed_store_is_reported_everywhere_and_the_daemon_exits_to_be_restarted() {
    let (logs, _guard) = crate::harness::LogBuf::capture();
    let mut d = TestDaemon::start().await;
    // The start's reclassification must not take the failed flush: a write applied just
    // after would then be flushed for real (sled, unlike the hook, would fail it again).
    // Its job slot frees before its last record is flushed, so a write acknowledged
    // after it (a 201 waits for its flush, and flushes go in order) shows that it is.
    d.idle().await;
    d.create_user("before@acme.test").await;
    rosterd::store::fail_next_flush_in(&d.root.join("data"));

    let r = d
        .post("/Users", crate::harness::user("during@acme.test"))
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        r.body["schemas"][0],
        "urn:ietf:params:scim:api:messages:2.0:Error"
    );
    let detail = r.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("may or may not have been saved"),
        "{detail}"
    );
    // Refused from now on, though the next flush would succeed: sled would not.
    for n in 0..3 {
        let r = d
            .post(
                "/Users",
                crate::harness::user(&format!("after{n}@acme.test")),
            )
            .await;
        assert_eq!(r.status, 503, "{}", r.body);
    }
    // The request that met the failure logs it (the store's own line comes from its
    // commit thread); the requests refused after it do not repeat it.
    let errors = logs.lines(" ERROR ");
    assert_eq!(errors.len(), 1, "{errors:#?}");

    let ready = d.raw(Method::GET, &d.url("/readyz"), None, &[], None).await;
    assert_eq!(ready.status, 503);
    let text = ready.body.as_str().unwrap().to_owned();
    assert!(
        text.contains("store failed")
            && text.contains("No space left")
            && text.contains("restart rosterd"),
        "{text}"
    );
    let s = d.status().await;
    let e = &s["store"]["error"];
    assert!(
        e["error"].as_str().unwrap().contains("No space left"),
        "{s}"
    );
    assert!(e["at"].is_string(), "{s}");
    assert!(
        e["hint"]
            .as_str()
            .unwrap()
            .contains("restart rosterd once the cause (e.g. disk space) is fixed"),
        "{s}"
    );
    let (text, _) = crate::metrics::scrape(&d).await;
    assert!(
        text.lines().any(|l| l == "rosterd_store_failed 1"),
        "{text}"
    );

    // The data directory takes writes (only the flush was made to fail), so the daemon
    // stops by itself, with an error, for its service manager to restart it.
    let err = d
        .exited(std::time::Duration::from_secs(120))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("store") && err.contains("No space left"),
        "{err}"
    );
}

#[tokio::test]
async fn a_healthy_store_reports_no_error() {
    let d = TestDaemon::start().await;
    d.create_user("a@acme.test").await;
    let s = d.status().await;
    assert!(s["store"]["error"].is_null(), "{s}");
    let (text, _) = crate::metrics::scrape(&d).await;
    assert!(
        text.lines().any(|l| l == "rosterd_store_failed 0"),
        "{text}"
    );
}

#[tokio::test]
async fn a_reload_says_when_the_edited_config_file_would_not_start() {
    let d = TestDaemon::start().await;
    let path = d.root.join("config.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{good}\n[server]\nlistne = 1\n")).unwrap();
    d.reload().await;
    let s = d.status().await;
    let e = s["config_file_error"].as_str().unwrap_or_default();
    assert!(e.contains("config.toml"), "{s}");
    // Still serving on the config it started with.
    assert_eq!(d.create_user("still@acme.test").await.len(), 36);
    std::fs::write(&path, &good).unwrap();
    d.reload().await;
    let s = d.status().await;
    assert!(s["config_file_error"].is_null(), "{s}");
    assert_eq!(s["config_changed_since_start"], false, "{s}");
}

/// `rosterd_config_file_error` as a scrape of `d` sets it. The recorder is the process's:
/// another test's daemon scraped at the same moment sets the gauge for its own file, so
/// the value read is the one a scrape of `d` agrees on twice.
pub(crate) async fn config_file_error_metric(d: &TestDaemon) -> f64 {
    let read = || async {
        let (_, samples) = crate::metrics::scrape(d).await;
        crate::metrics::value(&samples, "rosterd_config_file_error", &[]).unwrap()
    };
    loop {
        let (a, b) = (read().await, read().await);
        if a == b {
            return a;
        }
    }
}

#[tokio::test]
async fn status_says_when_the_config_file_changed_since_start() {
    let (logs, _guard) = crate::harness::LogBuf::capture();
    let d = TestDaemon::start().await;
    assert_eq!(d.status().await["config_changed_since_start"], false);
    assert_eq!(config_file_error_metric(&d).await, 0.0);
    let path = d.root.join("config.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    // A comment is no change.
    std::fs::write(&path, format!("{good}\n# a new tenant goes here\n")).unwrap();
    assert_eq!(d.status().await["config_changed_since_start"], false);
    // A valid edit that a reload does not apply: no reload needed for status to see it.
    std::fs::write(&path, format!("{good}\n[log]\nformat = \"json\"\n")).unwrap();
    let s = d.status().await;
    assert_eq!(s["config_changed_since_start"], true, "{s}");
    assert!(s["config_file_error"].is_null(), "{s}");
    assert_eq!(s["config_keys_waiting_for_restart"], json!(["log.format"]));
    // Each key that waits is named, a tenant's under its id: a reload said only
    // "tenants, group rules, server, schedules", and an operator who had edited a
    // tenant's bundle path or `allow_overrides` took the reload as applying them.
    let edited = good
        .replacen("bundle = \"bundle.toml\"", "bundle = \"other.toml\"", 1)
        .replace("allow_overrides = false", "allow_overrides = true")
        .replace(
            &format!("id = \"{OTHER_TENANT}\""),
            &format!("id = \"{OTHER_TENANT}\"\nreview_threshold = 0.5"),
        );
    std::fs::write(
        &path,
        format!("{edited}\n[[tenants]]\nid = \"new\"\ntoken_env = \"NEW_TOKEN\"\n"),
    )
    .unwrap();
    let s = d.status().await;
    assert_eq!(
        s["config_keys_waiting_for_restart"],
        json!([
            format!("tenants.{TENANT}.bundle"),
            format!("tenants.{OTHER_TENANT}.allow_overrides"),
            format!("tenants.{OTHER_TENANT}.review_threshold"),
            "tenants.new (added)",
        ]),
        "{s}"
    );
    d.reload().await;
    let said = logs.lines("The config file changed since start");
    assert!(
        said.len() == 1 && said[0].contains(&format!("tenants.{TENANT}.bundle")),
        "{said:?}"
    );
    // One that would not load shows without a reload too, and goes when undone.
    std::fs::write(&path, format!("listne = 1\n{good}")).unwrap();
    let s = d.status().await;
    assert_eq!(s["config_changed_since_start"], true, "{s}");
    assert!(
        s["config_file_error"]
            .as_str()
            .is_some_and(|e| e.contains("listne")),
        "{s}"
    );
    // So do the metrics, where an alert can see that the next restart would fail.
    assert_eq!(config_file_error_metric(&d).await, 1.0);
    // A file gone: a restart would fail as well.
    std::fs::remove_file(&path).unwrap();
    let s = d.status().await;
    assert_eq!(s["config_changed_since_start"], true, "{s}");
    assert!(s["config_file_error"].is_string(), "{s}");
    // A reload says it cannot be read, not that it was edited.
    d.reload().await;
    let said = logs.lines("The config file cannot be read now");
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        logs.lines("changed since start and, as it is now")
            .is_empty()
    );
    std::fs::write(&path, &good).unwrap();
    let s = d.status().await;
    assert_eq!(s["config_changed_since_start"], false, "{s}");
    assert!(s["config_file_error"].is_null(), "{s}");
}

/// What a client sends reaches the log cut: a long path or tenant segment (no token
/// needed) and the names of unknown attributes (one line listed 50,000 of them).
#[tokio::test]
async fn what_a_client_sends_is_logged_cut_to_size() {
    let (logs, _guard) = crate::harness::LogBuf::capture();
    let d = TestDaemon::start().await;
    let long = "x".repeat(60_000);
    let r = d
        .raw(
            Method::GET,
            &d.url(&format!("/scim/v2/{long}/Users")),
            Some("no-token"),
            &[("x-request-id", "long-tenant")],
            None,
        )
        .await;
    assert!(r.status.is_client_error(), "{}", r.status);
    let lines = logs.lines("long-tenant");
    assert!(!lines.is_empty(), "the refusal was not logged");
    for l in &lines {
        assert!(l.len() < 2_000, "{} bytes: {}", l.len(), &l[..300]);
        assert!(l.contains("60000 bytes in all"), "{l}");
    }
    let mut user = json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                          "userName": "many@example.com"});
    for i in 0..500 {
        user[format!("unknown{i:03}")] = json!(i);
    }
    let r = d
        .raw(
            Method::POST,
            &d.scim_url("/Users"),
            Some(&d.token),
            &[("x-request-id", "many-attrs")],
            Some(user.to_string().into_bytes()),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let warned: Vec<String> = logs
        .lines("many-attrs")
        .into_iter()
        .filter(|l| l.contains("Ignored attributes"))
        .collect();
    assert_eq!(warned.len(), 1, "{warned:?}");
    let w = &warned[0];
    assert!(w.contains("count=500") && w.contains("unknown000"), "{w}");
    assert!(
        w.contains("unknown019") && !w.contains("unknown020"),
        "lists the first 20 names only: {w}"
    );
}

/// A deactivation by PATCH or PUT (how Entra and Okta deprovision) is logged under the
/// IdP's request id, as a create and a delete are; a write that changes nothing is not.
#[tokio::test]
async fn an_update_is_logged_with_its_request_id_and_a_no_op_is_not() {
    let (logs, _guard) = crate::harness::LogBuf::capture();
    let d = TestDaemon::start().await;
    let id = d.create_user("deprov@acme.test").await;
    let send = |method: Method, rid: &'static str, body: Value| {
        let (d, id) = (&d, &id);
        async move {
            let r = d
                .raw(
                    method,
                    &d.scim_url(&format!("/Users/{id}")),
                    Some(&d.token),
                    &[
                        ("x-request-id", rid),
                        ("content-type", "application/scim+json"),
                    ],
                    Some(body.to_string().into_bytes()),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.body
        }
    };
    let off = json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "Replace", "path": "active", "value": "False"}]});
    let doc = send(Method::PATCH, "deprov-patch", off.clone()).await;
    let line = logs.lines("deprov-patch");
    assert_eq!(line.len(), 1, "{line:?}");
    assert!(
        line[0].contains("Resource updated.")
            && line[0].contains(&id)
            && line[0].contains("by=\"PATCH\"")
            && line[0].contains("deactivated=true"),
        "{line:?}"
    );
    // The same again: nothing changed, nothing said.
    send(Method::PATCH, "deprov-again", off).await;
    assert!(
        logs.lines("deprov-again").is_empty(),
        "{:?}",
        logs.lines("deprov-again")
    );
    let mut put = doc.clone();
    put["active"] = json!(true);
    send(Method::PUT, "deprov-put", put).await;
    let line = logs.lines("deprov-put");
    assert_eq!(line.len(), 1, "{line:?}");
    assert!(
        line[0].contains("reactivated=true")
            && line[0].contains("by=\"PUT\"")
            && !line[0].contains("deactivated"),
        "{line:?}"
    );
    // A change that leaves `active` alone names neither.
    let mut put = doc.clone();
    put["active"] = json!(true);
    put["title"] = json!("Buyer");
    send(Method::PUT, "deprov-title", put).await;
    let line = logs.lines("deprov-title");
    assert_eq!(line.len(), 1, "{line:?}");
    assert!(!line[0].contains("activated"), "{line:?}");
}

/// A client trying tokens wrote a WARN line per request (4,000 requests, 4,000 lines):
/// a minute logs 20 one by one, then one line says the rest are counted; each names the
/// client's address, which is what an operator blocks.
#[tokio::test]
async fn refusals_for_credentials_past_twenty_a_minute_are_counted_not_logged() {
    let (logs, _guard) = crate::harness::LogBuf::capture();
    let d = TestDaemon::start().await;
    for i in 0..45 {
        let r = d
            .raw(
                Method::GET,
                &d.scim_url("/Users"),
                Some(&format!("guess-{i}")),
                &[("x-request-id", &format!("guessing-{i:02}"))],
                None,
            )
            .await;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    let lines = logs.lines("request_id=guessing-");
    let one_by_one: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("Request refused: credentials."))
        .collect();
    assert_eq!(one_by_one.len(), 21, "{lines:#?}");
    assert!(
        one_by_one
            .iter()
            .all(|l| l.contains(" WARN ") && l.contains("client=127.0.0.1")),
        "{one_by_one:#?}"
    );
    let counted: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("the rest of the minute's are counted"))
        .collect();
    assert!(
        counted.len() == 1 && counted[0].contains("request_id=guessing-20"),
        "{lines:#?}"
    );
    // A token that is right still gets in.
    let ok = d
        .raw(
            Method::GET,
            &d.scim_url("/Users"),
            Some(&d.token),
            &[],
            None,
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    // A stop within the minute says how many it counted: summed up only once the minute
    // was over, the count of a flood just before a restart was never said.
    let mut d = d;
    assert!(logs.lines("more requests were refused").is_empty());
    d.stop().await;
    let summed = logs.lines("more requests were refused");
    assert!(
        summed.len() == 1
            && summed[0].contains("25 more requests")
            && summed[0].contains("127.0.0.1"),
        "{summed:#?}"
    );
}

#[tokio::test]
async fn a_refused_request_is_logged_with_its_request_id_and_what_the_client_was_told() {
    let (logs, _guard) = crate::harness::LogBuf::capture();
    let d = TestDaemon::start().await;
    let bad = d
        .raw(
            Method::GET,
            &d.scim_url("/Users?filter=userName%20zz%20%22x%22"),
            Some(&d.token),
            &[("x-request-id", "idp-req-123")],
            None,
        )
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let line = logs.lines("idp-req-123");
    assert_eq!(line.len(), 1, "{line:?}");
    assert!(
        line[0].contains(" INFO ")
            && line[0].contains("Request refused.")
            && line[0].contains("status=400")
            && line[0].contains("code=\"invalidFilter\"")
            && line[0].contains(&format!("tenant={TENANT}")),
        "{line:?}"
    );
    // What the client sent and the detail echoes cannot start a line of its own.
    let forged = d
        .raw(
            Method::GET,
            &d.scim_url("/Users?filter=userName%20eq%20%22x%0A2026-01-01T00:00:00Z%20ERROR%20forged%22%20zz"),
            Some(&d.token),
            &[("x-request-id", "idp-req-nl")],
            None,
        )
        .await;
    assert_eq!(forged.status, 400, "{}", forged.body);
    let all = logs.lines("");
    assert!(
        !all.iter().any(|l| l.starts_with("2026-01-01T00:00:00Z")),
        "{all:#?}"
    );
    assert_eq!(logs.lines("idp-req-nl").len(), 1, "{all:#?}");
    // A wrong token is WARN: nothing the IdP sends works until someone fixes it.
    let denied = d
        .raw(
            Method::GET,
            &d.scim_url("/Users"),
            Some("not-the-token"),
            &[("x-request-id", "idp-req-401")],
            None,
        )
        .await;
    assert_eq!(denied.status, 401);
    let line = logs.lines("idp-req-401");
    assert_eq!(line.len(), 1, "{line:?}");
    // SCIM has no scimType for a 401: the line has no code rather than an empty one.
    assert!(
        line[0].contains(" WARN ") && line[0].contains("status=401") && !line[0].contains("code="),
        "{line:?}"
    );
    // The Roster API's refusals too, with their error code.
    let api = d
        .raw(
            Method::GET,
            &d.url("/api/v1/roster/users"),
            None,
            &[("x-request-id", "api-req-1")],
            None,
        )
        .await;
    assert_eq!(api.status, 401);
    let line = logs.lines("api-req-1");
    assert!(
        line.len() == 1 && line[0].contains("code=\"token_missing\""),
        "{line:?}"
    );
    // An id that would print as more than one field is replaced by one of ours.
    let spoof = d
        .raw(
            Method::GET,
            &d.scim_url("/Users/nobody"),
            Some(&d.token),
            &[("x-request-id", "abc status=200 FAKE17")],
            None,
        )
        .await;
    assert_eq!(spoof.status, 404);
    assert_ne!(
        spoof.header("x-request-id").unwrap(),
        "abc status=200 FAKE17"
    );
    assert!(logs.lines("FAKE17").is_empty());
    // Nor one that would end the span's braces, or hold a quote or an escape.
    for id in ["a}b{cFAKE18", "it'sFAKE18", "a\\bFAKE18"] {
        let r = d
            .raw(
                Method::GET,
                &d.scim_url("/Users/nobody"),
                Some(&d.token),
                &[("x-request-id", id)],
                None,
            )
            .await;
        assert_eq!(r.status, 404);
        assert_ne!(r.header("x-request-id").unwrap(), id);
    }
    assert!(
        logs.lines("FAKE18").is_empty(),
        "{:?}",
        logs.lines("FAKE18")
    );
    // A request that succeeds is not logged at INFO.
    let ok = d
        .raw(
            Method::GET,
            &d.scim_url("/Users"),
            Some(&d.token),
            &[("x-request-id", "idp-req-ok")],
            None,
        )
        .await;
    assert_eq!(ok.status, 200);
    assert!(logs.lines("idp-req-ok").is_empty());
}

/// The panic hook `rosterd serve` installs: a panic is one ERROR line, in the span it
/// happened in, with its message, location and rosterd's own frames.
#[test]
fn the_panic_hook_logs_one_line_inside_its_span() {
    let (logs, guard) = crate::harness::LogBuf::capture();
    let metrics = rosterd::ops::metrics::install().expect("the recorder");
    let panics = || {
        crate::metrics::value(
            &crate::metrics::parse(&metrics.render()),
            "rosterd_panics_total",
            &[],
        )
    };
    let before = panics().expect("counted from the start");
    let previous = std::panic::take_hook();
    rosterd::ops::panics::install_hook();
    let caught = {
        let span = tracing::info_span!("request", request_id = "req-42", tenant = "acme");
        let _in = span.enter();
        std::panic::catch_unwind(|| panic!("index out of bounds in a test"))
    };
    // Expected panics are sled's, on damaged files; one anywhere else under the same
    // guard is still a bug.
    let expected = rosterd::ops::panics::catch_expected(|| -> u8 { panic!("not sled's") });
    std::panic::set_hook(previous);
    drop(guard);
    assert!(caught.is_err());
    assert_eq!(expected, Err("not sled's".to_owned()));
    // At least these two (another test's daemon may count one at the same time).
    assert!(
        panics().is_some_and(|n| n >= before + 2.0),
        "{:?}",
        panics()
    );
    let lines = logs.lines("rosterd panicked");
    let [line, other] = lines.as_slice() else {
        panic!("a line for each panic, got {lines:?}")
    };
    assert!(other.contains("panic=not sled's"), "{other}");
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("request_id=\"req-42\""), "{line}");
    assert!(line.contains("tenant=\"acme\""), "{line}");
    assert!(
        line.contains("panic=index out of bounds in a test"),
        "{line}"
    );
    assert!(
        line.contains("location=tests/integration/ops.rs:"),
        "{line}"
    );
    // The panic is in this test's crate, not rosterd's: no frame of rosterd's own to
    // show (which frames are kept is tested with the library).
    assert!(line.contains("frames=none of rosterd's own"), "{line}");
}

/// sled reclaims the garbage in its log only from its own flusher thread, one segment a
/// tick; at one tick a second the file grew without end under a few dozen writes a
/// second (1.5 GiB an hour in a soak, for 100 MiB of data). The garbage that needs the
/// cleaner is a write's old page versions in pages nothing writes again soon, as when
/// users are created, changed and deleted all over the tree. These 24,000 writes leave
/// 400 users, the governance events and a change log compacted every second: the file
/// took 192 MiB with a tick a second, 28 MiB with the tick of now. (A size, not a time:
/// the wait only gives a cleaner slowed by a busy machine a chance to finish.)
#[tokio::test]
async fn the_store_file_stays_near_its_data_under_sustained_writes() {
    const WRITERS: usize = 8;
    const ROUNDS: usize = 1000;
    const LIVE: usize = 50;
    const LIMIT: u64 = 64 << 20;
    let d = TestDaemon::start_with(crate::harness::Options {
        config_extra: "[schedules]\ncompact = \"* * * * * *\"\nchangelog_retention_hours = 0\n"
            .into(),
        ..Default::default()
    })
    .await;
    let writers = (0..WRITERS).map(|w| {
        let d = &d;
        async move {
            let mut live = std::collections::VecDeque::new();
            for round in 0..ROUNDS {
                live.push_back(d.create_user(&format!("w{w}-{round}@acme.test")).await);
                let id = &live[round * 7 % live.len()];
                let r = d
                    .patch(
                        &format!("/Users/{id}"),
                        patch_op(json!([{"op": "replace", "path": "title",
                            "value": format!("Engineer {round}")}])),
                    )
                    .await;
                assert_eq!(r.status, 200, "{}", r.body);
                if live.len() > LIVE {
                    let id = live.pop_front().unwrap();
                    assert_eq!(d.delete(&format!("/Users/{id}")).await.status, 204);
                }
            }
            live
        }
    });
    let kept: Vec<String> = futures_util::future::join_all(writers)
        .await
        .into_iter()
        .flatten()
        .collect();

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut sizes = Vec::new();
    loop {
        let size = d.status().await["store"]["size_bytes"].as_u64().unwrap();
        sizes.push(size >> 20);
        if size < LIMIT {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store's file stays at {} MiB after the writes (limit {} MiB; MiB each second: {sizes:?})",
            size >> 20,
            LIMIT >> 20
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    // Nothing was lost on the way.
    assert_eq!(d.status().await["tenants"][TENANT]["users"], kept.len());
    let r = d.get(&format!("/Users/{}", kept[0])).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The `backup` schedule under SCIM writes: each backup is whole, the oldest beyond
/// `keep` go, and a daemon started on the newest serves every user acknowledged before
/// it began, with counters that agree with what it lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_written_under_writes_serves_every_write_acknowledged_before_it() {
    use chrono::{DateTime, Utc};
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut d =
        TestDaemon::start_with(crate::harness::Options {
            config_extra:
                "[schedules]\nbackup = \"*/2 * * * * *\"\n[backup]\nkeep = 2\nkeep_free_mb = 0\n"
                    .into(),
            ..Default::default()
        })
        .await;
    let stop = AtomicBool::new(false);
    let acked = std::sync::Mutex::new(Vec::<(String, DateTime<Utc>)>::new());
    let writers = (0..4).map(|w| {
        let (d, stop, acked) = (&d, &stop, &acked);
        async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = d.create_user(&format!("w{w}-{i}@acme.test")).await;
                acked.lock().unwrap().push((id, Utc::now()));
                i += 1;
            }
        }
    });
    let watch = async {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let s = d.status().await;
            if s["backup"]["written"].as_u64().unwrap() >= 3 {
                stop.store(true, Ordering::Relaxed);
                return s;
            }
            assert!(s["backup"]["last_error"].is_null(), "{}", s["backup"]);
            assert!(tokio::time::Instant::now() < deadline, "{}", s["backup"]);
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    let (s, _) = tokio::join!(watch, futures_util::future::join_all(writers));
    let backup = &s["backup"];
    assert_eq!(backup["failed"], 0, "{backup}");
    assert!(backup["last_keys"].as_u64().unwrap() > 0, "{backup}");
    assert!(
        s["schedules"]["backup"]["last_result"]
            .as_str()
            .unwrap()
            .starts_with("store: "),
        "{}",
        s["schedules"]["backup"]
    );
    let dir = d.root.join("data-backups");
    let last = std::path::PathBuf::from(backup["last_path"].as_str().unwrap());
    assert_eq!(last.parent(), Some(dir.as_path()));
    let metrics = d
        .raw(Method::GET, &d.url("/metrics"), None, &[], None)
        .await;
    let text = metrics.body.as_str().unwrap_or_default().to_owned();
    assert!(
        text.contains("rosterd_backup_last_success_timestamp_seconds"),
        "{text}"
    );
    // The schedule goes on until the stop; what it left is read after it.
    d.stop().await;
    // Three or more written, two kept (a `.partial` is one the stop gave up, if any).
    let mut kept: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("rosterd-") && !n.ends_with(".partial"))
        .collect();
    kept.sort();
    assert!(kept.len() <= 2, "{kept:?}");
    let newest = dir.join(kept.last().unwrap());
    // Its name gives the second it began in: what was acknowledged before that second
    // was acknowledged before it began.
    let began =
        chrono::NaiveDateTime::parse_from_str(&kept.last().unwrap()[8..24], "%Y%m%dT%H%M%SZ")
            .unwrap()
            .and_utc();
    let acked = acked.into_inner().unwrap();
    let before: Vec<&String> = acked
        .iter()
        .filter(|(_, at)| *at < began)
        .map(|(id, _)| id)
        .collect();
    assert!(
        !before.is_empty(),
        "no write was acknowledged before the backup began"
    );
    std::fs::rename(d.root.join("data"), d.root.join("data.live")).unwrap();
    std::fs::rename(&newest, d.root.join("data")).unwrap();
    let d = d.restart().await;
    for id in &before {
        let r = d.get(&format!("/Users/{id}")).await;
        assert_eq!(
            r.status, 200,
            "{id}, acknowledged before the backup: {}",
            r.body
        );
    }
    let listed = d.get("/Users?count=1").await.body["totalResults"].clone();
    let counted = d.status().await["tenants"][TENANT]["users"].clone();
    assert_eq!(listed, counted);
    assert!(listed.as_u64().unwrap() >= before.len() as u64);
    d.create_user("after@acme.test").await;
}

/// A backup that would leave less than `keep_free_mb` free on its filesystem (often the
/// store's) is not started, and says why where an operator looks.
#[tokio::test]
async fn a_backup_that_would_fill_its_filesystem_is_not_started() {
    let d =
        TestDaemon::start_with(crate::harness::Options {
            config_extra:
                "[schedules]\nbackup = \"* * * * * *\"\n[backup]\nkeep_free_mb = 1000000000000\n"
                    .into(),
            ..Default::default()
        })
        .await;
    d.create_user("a@acme.test").await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let s = loop {
        let s = d.status().await;
        if s["backup"]["failed"].as_u64().unwrap() >= 1 {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", s["backup"]);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let error = s["backup"]["last_error"].as_str().unwrap();
    assert!(
        error.starts_with("not started: ") && error.contains("backup.keep_free_mb"),
        "{error}"
    );
    assert_eq!(s["backup"]["written"], 0);
    assert!(
        s["schedules"]["backup"]["last_result"]
            .as_str()
            .unwrap()
            .starts_with("store: failed: not started"),
        "{}",
        s["schedules"]["backup"]
    );
    // Nothing was left, and the store is untouched.
    let dir = d.root.join("data-backups");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    d.create_user("b@acme.test").await;
}

/// A backup night missed while the daemon was down is caught up at the start
/// (`catch_up`), as the newest backup in the directory tells: one older than the last
/// time the schedule came due.
#[tokio::test]
async fn a_missed_backup_is_written_at_the_start_with_catch_up() {
    let extra = "[schedules]\nbackup = \"0 0 3 1 1 *\"\ncatch_up = true\n";
    let mut d = TestDaemon::start_with(crate::harness::Options {
        config_extra: extra.into(),
        ..Default::default()
    })
    .await;
    d.create_user("a@acme.test").await;
    // No backup yet: nothing to catch up (as for any schedule that never ran).
    assert_eq!(d.status().await["backup"]["written"], 0);
    d.stop().await;
    // A backup from long before the last 1 January, 03:00.
    let old = d.root.join("data-backups/rosterd-20000101T000000Z");
    std::fs::create_dir_all(&old).unwrap();
    let d = d.restart().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let s = loop {
        let s = d.status().await;
        if s["backup"]["written"] == 1 {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", s["backup"]);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let path = s["backup"]["last_path"].as_str().unwrap();
    assert!(
        std::path::Path::new(path).join(".rosterd-store").is_file(),
        "{path}"
    );
    assert_ne!(std::path::Path::new(path), old);
}

/// A leaked SCIM token is rotated without a restart: the new one added beside the old and
/// a reload (the IdP switches meanwhile), then the old one removed and a reload. A config
/// that does not load changes no token, and an edit undone brings the first ones back.
#[tokio::test]
async fn a_scim_token_is_rotated_with_reloads() {
    use rosterd::server::auth::{TokenHash, new_token};
    let d = TestDaemon::start().await;
    let config = d.root.join("config.toml");
    let first = std::fs::read_to_string(&config).unwrap();
    let old_hash = TokenHash::of(&d.token).to_string();
    let old_line = format!("token_hashes = [\"{old_hash}\"]");
    assert!(first.contains(&old_line), "{first}");
    let (new, new_hash) = new_token();
    let status = |token: String| {
        let d = &d;
        async move {
            d.raw(Method::GET, &d.scim_url("/Users"), Some(&token), &[], None)
                .await
                .status
                .as_u16()
        }
    };
    let with = |line: String| {
        std::fs::write(&config, first.replace(&old_line, &line)).unwrap();
    };
    assert_eq!(
        (status(d.token.clone()).await, status(new.clone()).await),
        (200, 401)
    );

    with(format!("token_hashes = [\"{old_hash}\", \"{new_hash}\"]"));
    d.reload().await;
    assert_eq!(
        (status(d.token.clone()).await, status(new.clone()).await),
        (200, 200)
    );

    with(format!("token_hashes = [\"{new_hash}\"]"));
    d.reload().await;
    assert_eq!(
        (status(d.token.clone()).await, status(new.clone()).await),
        (401, 200)
    );
    // A reload applied all of that edit: nothing waits for a restart (the status said it
    // did, and the log asked for one, halfway through a rotation).
    let changed = || async { d.status().await["config_changed_since_start"].clone() };
    assert_eq!(changed().await, false);
    // An edit a reload does not apply is still said.
    std::fs::write(
        &config,
        first.replace(
            &old_line,
            &format!("token_hashes = [\"{new_hash}\"]\nreview_threshold = 0.5"),
        ),
    )
    .unwrap();
    assert_eq!(changed().await, true);

    with("token_hashes = [\"sha256:not-a-hash\"]".to_owned());
    d.reload().await;
    assert_eq!(
        (status(d.token.clone()).await, status(new.clone()).await),
        (401, 200)
    );

    std::fs::write(&config, &first).unwrap();
    d.reload().await;
    assert_eq!(
        (status(d.token.clone()).await, status(new.clone()).await),
        (200, 401)
    );
}

/// A reload that cannot apply the Roster API's key files or the tenants' SCIM tokens
/// keeps the old ones in force. An operator rotating them must see that the rotation did
/// not happen: the log said so once, `/status`, `rosterd status` and the metrics keep
/// saying it until a reload applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_keeps_old_tokens_or_keys_says_so_until_one_applies() {
    use crate::harness::Options;
    use crate::metrics::{scrape, value};
    use rosterd::api::jwt::testing::EC_P256_PUBLIC as EC_PUBLIC;
    use rosterd::server::auth::{TokenHash, new_token};
    let (from_env, _) = new_token();
    let d = TestDaemon::start_with(Options {
        jwt_extra: "public_keys = [\"issuer.pem\"]".to_owned(),
        files: vec![("issuer.pem".to_owned(), EC_PUBLIC.to_owned())],
        env: vec![("ACME_SCIM_TOKEN".to_owned(), from_env.clone())],
        tenant_extra: "token_env = \"ACME_SCIM_TOKEN\"".to_owned(),
        ..Options::default()
    })
    .await;
    let es256 = es256_reader_token(None);
    let answers = || async {
        let api = d
            .roster(Method::GET, "/archetypes", &es256, None)
            .await
            .status;
        let scim = d.get("/Users").await.status;
        (api.as_u16(), scim.as_u16())
    };
    let failed = |part: &'static str| {
        let d = &d;
        async move {
            let (_, samples) = scrape(d).await;
            value(&samples, "rosterd_reload_failed", &[("part", part)])
        }
    };
    let errors = || async { d.status().await["reload_errors"].clone() };
    assert_eq!(answers().await, (200, 200));
    assert_eq!(errors().await, json!({}));

    std::fs::write(d.root.join("issuer.pem"), "not a key\n").unwrap();
    let config = d.root.join("config.toml");
    let first = std::fs::read_to_string(&config).unwrap();
    // The other tenant given the hash of the token the first one's token_env holds: the
    // file loads (it cannot know the variable's value), the tokens do not.
    let other = format!("token_hashes = [\"{}\"]", TokenHash::of(&d.other_token));
    let shared = format!(
        "token_hashes = [\"{}\", \"{}\"]",
        TokenHash::of(&d.other_token),
        TokenHash::of(&from_env)
    );
    let edited = first.replacen(&other, &shared, 1);
    assert_ne!(edited, first);
    std::fs::write(&config, &edited).unwrap();
    d.reload().await;
    // Both kept what was in force.
    assert_eq!(answers().await, (200, 200));
    let e = errors().await;
    let said = |part: &str| e[part]["error"].as_str().unwrap_or_default().to_owned();
    assert!(said("api_keys").contains("issuer.pem"), "{e}");
    assert!(said("scim_tokens").contains("same SCIM token"), "{e}");
    assert!(e["api_keys"]["at"].is_string(), "{e}");
    assert_eq!(
        (failed("api_keys").await, failed("scim_tokens").await),
        (Some(1.0), Some(1.0))
    );
    let url = format!("http://{}", d.addr);
    let (ok, out, err) = crate::cli::rosterd_async(&["status", "--url", &url]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("SCIM TOKENS NOT reloaded") && out.contains("ROSTER API KEYS NOT reloaded"),
        "{out}"
    );

    // Each stands until a reload applies its part.
    std::fs::write(&config, &first).unwrap();
    d.reload().await;
    let e = errors().await;
    assert!(
        e.get("scim_tokens").is_none() && e["api_keys"].is_object(),
        "{e}"
    );
    std::fs::write(d.root.join("issuer.pem"), EC_PUBLIC).unwrap();
    d.reload().await;
    assert_eq!(errors().await, json!({}));
    assert_eq!(
        (failed("api_keys").await, failed("scim_tokens").await),
        (Some(0.0), Some(0.0))
    );
    assert_eq!(answers().await, (200, 200));

    // A config.toml that does not load gives no token either: a typo made while
    // rotating a leaked one leaves it working, and the tokens' alert must say so.
    std::fs::write(
        &config,
        first.replacen("token_hashes = [", "token_hashes = [[", 1),
    )
    .unwrap();
    d.reload().await;
    let e = errors().await;
    assert!(
        e["scim_tokens"]["error"]
            .as_str()
            .is_some_and(|s| s.contains("config.toml does not load")),
        "{e}"
    );
    assert_eq!(failed("scim_tokens").await, Some(1.0));
    std::fs::write(&config, &first).unwrap();
    d.reload().await;
    assert_eq!(errors().await, json!({}));
}

/// The version a build of this checkout should report: the package's, and the commit
/// checked out when the crate is its own git checkout (CI's clone). A build script that
/// missed a commit (it watched the branch's ref alone, and a worktree keeps that in the
/// main repository) reported the commit before.
fn expected_version() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let own = git(&["rev-parse", "--show-toplevel"])
        .is_some_and(|top| std::fs::canonicalize(top).ok() == std::fs::canonicalize(dir).ok());
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) if own => format!("{}+git.{commit}", env!("CARGO_PKG_VERSION")),
        _ => env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// What each of `tokens` is answered at the tenant's `/Users`.
async fn scim_answers(d: &TestDaemon, tokens: &[&str]) -> Vec<u16> {
    let mut out = Vec::new();
    for t in tokens {
        let r = d
            .raw(Method::GET, &d.scim_url("/Users"), Some(t), &[], None)
            .await;
        out.push(r.status.as_u16());
    }
    out
}

/// A tenant taken out of config.toml is served, with its tokens, until the restart its
/// removal waits for: a reload that gives one of those tokens to another tenant keeps the
/// tokens in force and says why. It applied them, and the token opened both tenants.
#[tokio::test]
async fn a_token_of_a_tenant_taken_out_of_the_file_is_not_given_to_another_by_a_reload() {
    use crate::harness::OTHER_TENANT;
    use rosterd::server::auth::TokenHash;
    let d = TestDaemon::start().await;
    let config = d.root.join("config.toml");
    let started = std::fs::read_to_string(&config).unwrap();
    let own = format!("token_hashes = [\"{}\"]", TokenHash::of(&d.token));
    let other_table = started
        .find(&format!("[[tenants]]\nid = \"{OTHER_TENANT}\""))
        .unwrap();
    // The other tenant's table, to the end of its bundle and overrides lines.
    let other_end = other_table
        + started[other_table..]
            .find("allow_overrides = false\n")
            .unwrap()
        + "allow_overrides = false\n".len();
    let merged = format!("{}{}", &started[..other_table], &started[other_end..]).replacen(
        &own,
        &format!(
            "token_hashes = [\"{}\", \"{}\"]",
            TokenHash::of(&d.token),
            TokenHash::of(&d.other_token)
        ),
        1,
    );
    assert!(!merged.contains(OTHER_TENANT), "{merged}");
    std::fs::write(&config, &merged).unwrap();
    d.reload().await;
    let s = d.status().await;
    let error = s["reload_errors"]["scim_tokens"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains(&format!("a SCIM token of tenant \"{OTHER_TENANT}\""))
            && error.contains("restart first"),
        "{s}"
    );
    // The other tenant's token opens its own tenant only; the first keeps its own.
    assert_eq!(scim_answers(&d, &[&d.other_token, &d.token]).await[0], 403);
    let other_users = d
        .raw(
            Method::GET,
            &d.scim_url("/Users")
                .replace(&format!("/{TENANT}/"), &format!("/{OTHER_TENANT}/")),
            Some(&d.other_token),
            &[],
            None,
        )
        .await;
    assert_eq!(other_users.status.as_u16(), 200);
    assert_eq!(scim_answers(&d, &[&d.token]).await, [200]);
}

/// A `token_env` added to a tenant, or renamed, waits for the restart that the reload's
/// log and `rosterd status` say it waits for: its variable was read when the daemon
/// started, and a reload put that value in force (a token revoked an hour earlier opened
/// another tenant) while both said the key applies only at the next restart. A restart
/// applies it; a `token_env` removed is applied by the reload.
/// `config.toml`'s text with `var` as the test tenant's `token_env`.
fn naming_token_env(config: &str, var: &str) -> String {
    let named = config.replacen(
        &format!("id = \"{TENANT}\""),
        &format!("id = \"{TENANT}\"\ntoken_env = \"{var}\""),
        1,
    );
    assert_ne!(named, config);
    named
}

/// A `token_env` added on a reload, naming a variable the daemon's environment does not
/// set, says that the restart it waits for would be refused unless the environment file
/// sets it by then: the reload said only that it waited for a restart.
#[tokio::test]
async fn a_token_env_added_for_a_variable_not_set_says_the_restart_needs_it() {
    let (logs, _guard) = crate::harness::LogBuf::capture();
    let d = TestDaemon::start().await;
    let config = d.root.join("config.toml");
    let started = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, naming_token_env(&started, "ACME_NOT_SET_ANYWHERE")).unwrap();
    d.reload().await;
    let said = logs.lines("which this daemon's environment does not set");
    assert!(
        said.len() == 1
            && said[0].contains(" WARN ")
            && said[0].contains(&format!(
                "tenants.{TENANT}.token_env names ACME_NOT_SET_ANYWHERE"
            ))
            && said[0].contains("the restart refuses to start"),
        "{said:?}"
    );
    // The tokens in force stay.
    assert_eq!(scim_answers(&d, &[d.token.as_str()]).await, [200]);
}

#[tokio::test]
async fn a_token_env_added_or_renamed_waits_for_the_restart_it_is_said_to() {
    use crate::harness::Options;
    use rosterd::server::auth::{TokenHash, new_token};
    let (logs, _guard) = crate::harness::LogBuf::capture();
    let (first, _) = new_token();
    let (second, _) = new_token();
    let d = TestDaemon::start_with(Options {
        env: vec![
            ("ACME_SCIM_TOKEN".to_owned(), first.clone()),
            ("ACME_SCIM_TOKEN_2".to_owned(), second.clone()),
        ],
        ..Options::default()
    })
    .await;
    let config = d.root.join("config.toml");
    let started = std::fs::read_to_string(&config).unwrap();
    let own = d.token.clone();
    let tokens = [own.as_str(), first.as_str(), second.as_str()];
    let key = format!("tenants.{TENANT}.token_env");
    let waiting = |s: &Value| s["config_keys_waiting_for_restart"].clone();

    std::fs::write(&config, naming_token_env(&started, "ACME_SCIM_TOKEN")).unwrap();
    d.reload().await;
    // Not in force, as the reload and the status say.
    assert_eq!(scim_answers(&d, &tokens).await, [200, 401, 401]);
    let s = d.status().await;
    assert_eq!(waiting(&s), json!([key]), "{s}");
    assert!(s["reload_errors"].get("scim_tokens").is_none(), "{s}");
    let said = logs.lines("The config file changed since start");
    assert!(said.len() == 1 && said[0].contains(&key), "{said:?}");
    assert!(logs.lines("SCIM tokens reloaded").is_empty());
    // Set where the daemon runs: no word of a restart refused.
    assert!(logs.lines("environment does not set").is_empty());
    // The reload's first line names all it reloads, the tokens included.
    assert_eq!(
        logs.lines("reloading connectors, archetype bundles, the tenants' SCIM tokens and the Roster API's key files")
            .len(),
        1
    );
    let url = format!("http://{}", d.addr);
    let (ok, out, err) = crate::cli::rosterd_async(&["status", "--url", &url]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("{key} applies only at the next restart")),
        "{out}"
    );

    // A start with it puts it in force.
    let d = d
        .restart_with(|o| o.tenant_extra = "token_env = \"ACME_SCIM_TOKEN\"".to_owned())
        .await;
    assert_eq!(scim_answers(&d, &tokens).await, [200, 200, 401]);
    let with_first = std::fs::read_to_string(&config).unwrap();
    assert_eq!(d.status().await["config_changed_since_start"], false);

    // Renamed: the variable the daemon started with stays in force until a restart.
    std::fs::write(
        &config,
        with_first.replace("\"ACME_SCIM_TOKEN\"", "\"ACME_SCIM_TOKEN_2\""),
    )
    .unwrap();
    d.reload().await;
    assert_eq!(scim_answers(&d, &tokens).await, [200, 200, 401]);
    assert_eq!(waiting(&d.status().await), json!([key]));

    // Removed: the reload applies it, and nothing waits.
    std::fs::write(
        &config,
        with_first.replace("token_env = \"ACME_SCIM_TOKEN\"\n", ""),
    )
    .unwrap();
    d.reload().await;
    assert_eq!(scim_answers(&d, &tokens).await, [200, 401, 401]);
    assert_eq!(d.status().await["config_changed_since_start"], false);

    // A token_hashes entry added meanwhile, as a rotation away from the variable does.
    let (third, third_hash) = new_token();
    let own_hash = TokenHash::of(&own).to_string();
    let own_line = format!("token_hashes = [\"{own_hash}\"]");
    let with_third = with_first
        .replace("token_env = \"ACME_SCIM_TOKEN\"\n", "")
        .replacen(
            &own_line,
            &format!("token_hashes = [\"{own_hash}\", \"{third_hash}\"]"),
            1,
        );
    assert!(with_third.contains(&third_hash.to_string()), "{with_third}");
    std::fs::write(&config, &with_third).unwrap();
    d.reload().await;
    let tokens = [
        own.as_str(),
        first.as_str(),
        second.as_str(),
        third.as_str(),
    ];
    assert_eq!(scim_answers(&d, &tokens).await, [200, 401, 401, 200]);

    // Removed, it stays out of force until a restart: named again (the file then reads as
    // the daemon started), or another named in its place, the value its variable had at
    // the start, the token just revoked, came back into force. The rest of the file is
    // applied all the same: the hash taken out again revokes its token. The file as the
    // daemon started, with its token_env waiting, was taken for one that does not load
    // ("unknown error"), and no token of it was applied.
    for again in [
        with_first.clone(),
        with_first.replace("\"ACME_SCIM_TOKEN\"", "\"ACME_SCIM_TOKEN_2\""),
    ] {
        std::fs::write(&config, &again).unwrap();
        d.reload().await;
        assert_eq!(scim_answers(&d, &tokens).await, [200, 401, 401, 401]);
        let s = d.status().await;
        assert_eq!(waiting(&s), json!([key]), "{s}");
        assert_eq!(s["config_changed_since_start"], true, "{s}");
        assert_eq!(s["reload_errors"], json!({}), "{s}");
        assert!(s["config_file_error"].is_null(), "{s}");
    }
}

/// A `roster:read` token signed ES256 by `rosterd::api::jwt::testing::EC_P256_PRIVATE`,
/// naming `kid` if given.
fn es256_reader_token(kid: Option<&str>) -> String {
    use crate::harness::JWT_AUDIENCE;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = kid.map(str::to_owned);
    let key = rosterd::api::jwt::testing::EC_P256_PRIVATE;
    jsonwebtoken::encode(
        &header,
        &json!({
            "sub": "it.admin@acme.test",
            "tenant": TENANT,
            "scope": "roster:read",
            "aud": JWT_AUDIENCE,
            "exp": chrono::Utc::now().timestamp() + 3600,
        }),
        &jsonwebtoken::EncodingKey::from_ec_pem(key.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A JWKS with the public half of `rosterd::api::jwt::testing::EC_P256_PRIVATE`, as `k1`.
const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","alg":"ES256","use":"sig","x":"7-rS5LWxOMAax0YWlGALfYZnViO_FgJ8z4RKu7lUzcs","y":"r_wZY0Rl1dhyTXfqyc5PlQK5ZRfJTp2b1uLDyzIvIH4"}]}"#;

/// What the Roster API answers a token signed by the JWKS's key.
async fn jwks_answer(d: &TestDaemon) -> u16 {
    let token = es256_reader_token(Some("k1"));
    d.roster(Method::GET, "/archetypes", &token, None)
        .await
        .status
        .as_u16()
}

async fn api_keys_error(d: &TestDaemon) -> String {
    d.status().await["reload_errors"]["api_keys"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A pipe put in place of a key file is refused at a reload as any file that is not
/// regular is, and holds nothing up. The reload read the key files to see whether they
/// had changed with a plain read, on a runtime worker: it waited for a writer that never
/// came, no reload ended after it, and the worker's requests (SIGTERM's too) waited with it.
/// Multi-threaded, so that on such code the test fails at `reload`'s deadline rather
/// than hanging with the runtime's one thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipe_in_place_of_a_key_file_holds_up_no_reload() {
    use crate::harness::Options;
    use std::os::unix::fs::OpenOptionsExt;
    /// Opens the pipe for writing once the test ends, so a read waiting on it ends too.
    struct Writer(std::path::PathBuf);
    impl Drop for Writer {
        fn drop(&mut self) {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.0);
        }
    }
    let d = TestDaemon::start_with(Options {
        jwt_extra: "jwks_file = \"jwks.json\"".to_owned(),
        files: vec![("jwks.json".to_owned(), JWKS.to_owned())],
        ..Options::default()
    })
    .await;
    assert_eq!(jwks_answer(&d).await, 200);
    let jwks = d.root.join("jwks.json");
    std::fs::remove_file(&jwks).unwrap();
    let fifo = std::ffi::CString::new(jwks.to_str().unwrap()).unwrap();
    // SAFETY: a path that is NUL-terminated, and a valid mode.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let _writer = Writer(jwks.clone());
    d.reload().await;
    assert_eq!(jwks_answer(&d).await, 200, "the keys in force stay");
    let e = api_keys_error(&d).await;
    assert!(
        e.contains("jwks.json") && e.contains("not a regular file"),
        "{e}"
    );
    // And the next reload is not held up either.
    d.reload().await;
    assert_eq!(config_file_error_metric(&d).await, 1.0);
}

/// A reload says what a start on config.toml as it is now would refuse, where nothing
/// in force shows it: it said only that the keys waited for a restart, and the restart
/// refused to start, SCIM included, with no alert before it (`rosterd_config_file_error`
/// stayed 0).
#[tokio::test]
async fn a_reload_says_what_in_config_toml_a_restart_would_refuse() {
    use rosterd::server::auth::new_token;
    let d = TestDaemon::start().await;
    let config = d.root.join("config.toml");
    let started = std::fs::read_to_string(&config).unwrap();
    let refusals = |s: &Value| -> Vec<String> {
        s["restart_refusals"]
            .as_array()
            .unwrap_or_else(|| panic!("restart_refusals in /status: {s}"))
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect()
    };
    assert!(refusals(&d.status().await).is_empty());

    // The connectors directory edited to one that is not there.
    std::fs::write(
        &config,
        started.replace("dir = \"connectors\"", "dir = \"connectors-nope\""),
    )
    .unwrap();
    d.reload().await;
    let said = refusals(&d.status().await);
    assert!(
        said.len() == 1 && said[0].contains("connectors-nope"),
        "{said:?}"
    );
    assert_eq!(config_file_error_metric(&d).await, 1.0);
    let url = format!("http://{}", d.addr);
    let (ok, out, err) = crate::cli::rosterd_async(&["status", "--url", &url]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("A RESTART WOULD FAIL") && out.contains("connectors-nope"),
        "{out}"
    );
    // check-config agrees.
    let path = config.to_str().unwrap().to_owned();
    let (ok, _, err) = crate::cli::rosterd_async(&["check-config", "--config", &path]).await;
    assert!(!ok && err.contains("connectors-nope"), "{err}");

    // Put back: nothing stands.
    std::fs::write(&config, &started).unwrap();
    d.reload().await;
    assert!(refusals(&d.status().await).is_empty());
    assert_eq!(config_file_error_metric(&d).await, 0.0);

    // A tenant added whose bundle does not load.
    let (_, hash) = new_token();
    std::fs::write(
        &config,
        format!("{started}\n[[tenants]]\nid = \"added\"\ntoken_hashes = [\"{hash}\"]\nbundle = \"missing.toml\"\n"),
    )
    .unwrap();
    d.reload().await;
    let said = refusals(&d.status().await);
    assert!(
        said.len() == 1 && said[0].contains("\"added\"") && said[0].contains("missing.toml"),
        "{said:?}"
    );
    assert_eq!(config_file_error_metric(&d).await, 1.0);

    // The directory in force moved away, config.toml as it started.
    std::fs::write(&config, &started).unwrap();
    std::fs::rename(d.root.join("connectors"), d.root.join("connectors.away")).unwrap();
    d.reload().await;
    let said = refusals(&d.status().await);
    assert!(
        said.len() == 1 && said[0].contains("cannot read the connectors directory"),
        "{said:?}"
    );
    assert_eq!(config_file_error_metric(&d).await, 1.0);
    std::fs::rename(d.root.join("connectors.away"), d.root.join("connectors")).unwrap();
    d.reload().await;
    assert!(refusals(&d.status().await).is_empty());
    assert_eq!(config_file_error_metric(&d).await, 0.0);
}

/// config.toml edited to name another bundle file that does not load waits for a restart
/// that would refuse it, SCIM included: the reload says so where a bundle that did not
/// reload is said (the tenant's `bundle.reload_error`, `rosterd_config_file_error`). It
/// said only that `tenants.….bundle` waited for a restart, and no alert fired.
#[tokio::test]
async fn a_bundle_config_toml_now_names_that_does_not_load_says_a_restart_would_fail() {
    let d = TestDaemon::start().await;
    let config = d.root.join("config.toml");
    let started = std::fs::read_to_string(&config).unwrap();
    assert_eq!(config_file_error_metric(&d).await, 0.0);
    std::fs::write(d.root.join("next.toml"), "not a bundle [\n").unwrap();
    let edited = started.replacen("bundle = \"bundle.toml\"", "bundle = \"next.toml\"", 1);
    assert_ne!(edited, started);
    std::fs::write(&config, &edited).unwrap();
    d.reload().await;
    let s = d.status().await;
    let bundle = &s["tenants"][TENANT]["bundle"];
    let error = bundle["reload_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("next.toml") && error.contains("a restart would refuse it"),
        "{s}"
    );
    // The bundle in force stays.
    assert_eq!(bundle["version"], "test-1", "{s}");
    assert_eq!(config_file_error_metric(&d).await, 1.0);
    // Fixed, nothing stands; the other tenant, whose bundle line did not change, was
    // never said to fail.
    std::fs::copy(d.root.join("bundle.toml"), d.root.join("next.toml")).unwrap();
    d.reload().await;
    let s = d.status().await;
    assert!(
        s["tenants"][TENANT]["bundle"]["reload_error"].is_null(),
        "{s}"
    );
    assert!(
        s["tenants"][OTHER_TENANT]["bundle"]["reload_error"].is_null(),
        "{s}"
    );
    assert_eq!(config_file_error_metric(&d).await, 0.0);
}

/// A JWKS file that does not load at a reload keeps the keys in force, and says that a
/// restart would fail on it: the start refuses to run without the Roster API's keys,
/// SCIM included, and "those in force stay" alone led an operator to restart to force
/// the new keys in. Said as for a bundle (the error ends so) and counted where an alert
/// already watches for a restart that would fail (`rosterd_config_file_error`).
#[tokio::test]
async fn a_key_file_that_does_not_reload_says_a_restart_would_fail() {
    use crate::harness::Options;
    let (logs, _guard) = crate::harness::LogBuf::capture();
    let jwt_extra = || "jwks_file = \"jwks.json\"".to_owned();
    let d = TestDaemon::start_with(Options {
        jwt_extra: jwt_extra(),
        files: vec![
            ("jwks.json".to_owned(), JWKS.to_owned()),
            ("other.json".to_owned(), JWKS.to_owned()),
        ],
        ..Options::default()
    })
    .await;
    assert_eq!(jwks_answer(&d).await, 200);
    assert_eq!(config_file_error_metric(&d).await, 0.0);

    // A rotation gone wrong: a truncated upload.
    std::fs::write(d.root.join("jwks.json"), "{\"keys\":[\n").unwrap();
    d.reload().await;
    assert_eq!(jwks_answer(&d).await, 200, "the keys in force stay");
    let e = api_keys_error(&d).await;
    assert!(
        e.contains("jwks.json")
            && e.ends_with(
                "a restart would refuse this file too: rosterd would not start, SCIM included"
            ),
        "{e}"
    );
    let said = logs.lines("Roster API keys not reloaded");
    assert!(
        said.len() == 1 && said[0].contains("a restart would fail"),
        "{said:?}"
    );
    assert_eq!(config_file_error_metric(&d).await, 1.0);
    let url = format!("http://{}", d.addr);
    let (ok, out, err) = crate::cli::rosterd_async(&["status", "--url", &url]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("ROSTER API KEYS NOT reloaded")
            && out.contains("a restart would refuse this file too"),
        "{out}"
    );

    // config.toml edited since the start to name a file that loads: a restart would
    // start, on that file.
    let config = d.root.join("config.toml");
    let started = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, started.replace("\"jwks.json\"", "\"other.json\"")).unwrap();
    d.reload().await;
    let e = api_keys_error(&d).await;
    assert!(e.ends_with("a restart applies them"), "{e}");
    assert_eq!(config_file_error_metric(&d).await, 0.0);
    std::fs::write(&config, &started).unwrap();
    d.reload().await;
    assert_eq!(config_file_error_metric(&d).await, 1.0);

    // What was said is so: a start on that file fails.
    let mut d = d.restart_with(|o| o.jwt_extra = jwt_extra()).await;
    let stopped = d.exited(std::time::Duration::from_secs(30)).await;
    assert!(
        matches!(&stopped, Err(e) if e.to_string().contains("jwks.json")),
        "{stopped:?}"
    );
    // Fixed: nothing stands.
    std::fs::write(d.root.join("jwks.json"), JWKS).unwrap();
    let d = d.restart_with(|o| o.jwt_extra = jwt_extra()).await;
    assert_eq!(jwks_answer(&d).await, 200);
    assert!(api_keys_error(&d).await.is_empty());
    assert_eq!(config_file_error_metric(&d).await, 0.0);

    // The files in force load, but config.toml as edited names one that does not: a
    // restart would fail on it, which nothing said.
    let config = d.root.join("config.toml");
    let started = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        started.replace("\"jwks.json\"", "\"missing.json\""),
    )
    .unwrap();
    d.reload().await;
    assert_eq!(jwks_answer(&d).await, 200, "the keys in force stay");
    let e = api_keys_error(&d).await;
    assert!(
        e.contains("missing.json") && e.contains("a restart would refuse them"),
        "{e}"
    );
    assert_eq!(config_file_error_metric(&d).await, 1.0);
    std::fs::write(&config, &started).unwrap();
    d.reload().await;
    assert!(api_keys_error(&d).await.is_empty());
    assert_eq!(config_file_error_metric(&d).await, 0.0);
}
