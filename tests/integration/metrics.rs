//! `/metrics`: Prometheus text, labelled by route template and configured tenants only.
//!
//! The recorder is process-global and every test in this binary counts into it, so the
//! assertions are lower bounds (`>=`) on what this test itself did.

use crate::harness::{Options, TENANT, TestDaemon};
use crate::mirror::named_webhook_file;
use crate::webhook::{WebhookOptions, WebhookServer};
use reqwest::Method;
use std::collections::BTreeMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(crate) struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parse the Prometheus text exposition format (samples only; comments skipped).
pub(crate) fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value: {line}"));
        let name = line[..name_end].to_owned();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if rest.starts_with('{') {
            let mut chars = rest[1..].char_indices();
            loop {
                // key
                let mut key = String::new();
                let mut closed = false;
                for (_, c) in chars.by_ref() {
                    match c {
                        '=' => break,
                        '}' => {
                            closed = true;
                            break;
                        }
                        ',' | ' ' => {}
                        c => key.push(c),
                    }
                }
                if closed {
                    break;
                }
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                let mut value = String::new();
                let mut escaped = false;
                for (_, c) in chars.by_ref() {
                    match (escaped, c) {
                        (true, 'n') => {
                            value.push('\n');
                            escaped = false;
                        }
                        (true, c) => {
                            value.push(c);
                            escaped = false;
                        }
                        (false, '\\') => escaped = true,
                        (false, '"') => break,
                        (false, c) => value.push(c),
                    }
                }
                labels.insert(key, value);
            }
            let consumed = chars.next().map(|(i, _)| i).unwrap_or(rest.len() - 1);
            rest = &rest[1 + consumed..];
        }
        let value_text = rest.split_whitespace().next().expect("value");
        let value: f64 = value_text
            .parse()
            .unwrap_or_else(|e| panic!("value {value_text:?} in {line}: {e}"));
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The sum over samples named `name` whose labels include all of `want`; `None` when no
/// sample matches.
pub(crate) fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

fn at_least(samples: &[Sample], name: &str, want: &[(&str, &str)], min: f64) {
    let got = value(samples, name, want);
    assert!(
        got.is_some_and(|v| v >= min),
        "{name}{want:?}: want >= {min}, got {got:?}"
    );
}

pub(crate) async fn scrape(d: &TestDaemon) -> (String, Vec<Sample>) {
    let r = d
        .raw(Method::GET, &d.url("/metrics"), None, &[], None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ct = r.header("content-type").unwrap_or_default();
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    let text = r.body.as_str().expect("text body").to_owned();
    let samples = parse(&text);
    (text, samples)
}

/// Scrape until `ready` holds (the store flusher and the connectors record from their own
/// threads and tasks, a moment after the response that depended on them).
pub(crate) async fn scrape_until(
    d: &TestDaemon,
    ready: impl Fn(&[Sample]) -> bool,
) -> (String, Vec<Sample>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (text, samples) = scrape(d).await;
        if ready(&samples) || tokio::time::Instant::now() >= deadline {
            return (text, samples);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn the_parser_reads_labels_escapes_and_special_values() {
    let s = parse(
        "# TYPE x counter\nx{a=\"1\",b=\"q\\\"u\\\\o\\nte\"} 3\ny 4.5\nz_bucket{le=\"+Inf\"} +Inf\n",
    );
    assert_eq!(s.len(), 3);
    assert_eq!(s[0].labels["b"], "q\"u\\o\nte");
    assert_eq!(value(&s, "x", &[("a", "1")]), Some(3.0));
    assert_eq!(value(&s, "y", &[]), Some(4.5));
    assert_eq!(
        value(&s, "z_bucket", &[("le", "+Inf")]),
        Some(f64::INFINITY)
    );
    assert_eq!(value(&s, "x", &[("a", "2")]), None);
}

#[tokio::test]
async fn metrics_count_scim_requests_by_route_template_and_configured_tenant() {
    let d = TestDaemon::start().await;
    let id = d.create_user("metrics.probe@acme.test").await;
    let r = d.get(&format!("/Users/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let missing = uuid::Uuid::new_v4().to_string();
    let r = d.get(&format!("/Users/{missing}")).await;
    assert_eq!(r.status, 404, "{}", r.body);
    // A tenant that is not configured, with a valid token of another tenant and with none.
    for token in [Some(d.token.as_str()), None] {
        let r = d
            .raw(Method::GET, &d.url("/scim/v2/nope/Users"), token, &[], None)
            .await;
        assert!(r.status.is_client_error(), "{}: {}", r.status, r.body);
    }
    // An unmatched path carrying an id must not become a label either.
    let r = d
        .raw(
            Method::GET,
            &d.url(&format!("/nowhere/{missing}")),
            None,
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 404);

    let flushed =
        |s: &[Sample]| value(s, "rosterd_store_flush_seconds_count", &[]).unwrap_or(0.0) >= 1.0;
    let (text, samples) = scrape_until(&d, flushed).await;

    let users = "/scim/v2/{tenant}/Users";
    let user = "/scim/v2/{tenant}/Users/{id}";
    let http = "rosterd_http_requests_total";
    at_least(
        &samples,
        http,
        &[("route", users), ("method", "POST"), ("status", "201")],
        1.0,
    );
    at_least(
        &samples,
        http,
        &[("route", user), ("method", "GET"), ("status", "200")],
        1.0,
    );
    at_least(
        &samples,
        http,
        &[("route", user), ("method", "GET"), ("status", "404")],
        1.0,
    );
    at_least(
        &samples,
        http,
        &[("route", "unmatched"), ("method", "GET"), ("status", "404")],
        1.0,
    );
    let duration = "rosterd_http_request_duration_seconds";
    at_least(
        &samples,
        &format!("{duration}_count"),
        &[("route", user), ("method", "GET")],
        2.0,
    );
    at_least(
        &samples,
        &format!("{duration}_bucket"),
        &[("route", user), ("method", "GET"), ("le", "+Inf")],
        2.0,
    );
    assert!(
        value(
            &samples,
            &format!("{duration}_bucket"),
            &[("route", user), ("le", "0.005")]
        )
        .is_some(),
        "the configured buckets are used:\n{text}"
    );

    let scim = "rosterd_scim_operations_total";
    let op = |op: &'static str, class: &'static str| {
        [
            ("tenant", TENANT),
            ("resource", "Users"),
            ("op", op),
            ("status_class", class),
        ]
    };
    at_least(&samples, scim, &op("create", "2xx"), 1.0);
    at_least(&samples, scim, &op("read", "2xx"), 1.0);
    at_least(&samples, scim, &op("read", "4xx"), 1.0);
    at_least(
        &samples,
        scim,
        &[
            ("tenant", "(unknown)"),
            ("resource", "Users"),
            ("op", "list"),
        ],
        2.0,
    );

    at_least(&samples, "rosterd_store_flush_seconds_count", &[], 1.0);
    at_least(
        &samples,
        "rosterd_changelog_last_seq",
        &[("tenant", TENANT)],
        0.0,
    );

    for s in &samples {
        for (k, v) in &s.labels {
            assert!(
                !v.contains(&id) && !v.contains(&missing),
                "a raw id in {}{{{k}={v:?}}}",
                s.name
            );
            assert!(
                !v.contains("/scim/v2/acme") && !v.contains("nowhere"),
                "a raw path in {}{{{k}={v:?}}}",
                s.name
            );
            assert_ne!(v, "nope", "an unconfigured tenant in {}{{{k}}}", s.name);
        }
    }
    assert!(!text.contains(&id), "the user id appears in /metrics");
    assert!(
        !text.contains("nope"),
        "the unknown tenant appears in /metrics"
    );
}

#[tokio::test]
async fn metrics_report_connector_gauges_and_deliveries() {
    let (hook, d) = crate::mirror::with_named_user_created_hook("metricshook", "").await;
    d.create_user("metrics.hook@acme.test").await;
    hook.wait_for(1, WAIT).await;

    let conn = [("connector", "metricshook"), ("tenant", TENANT)];
    let delivered = |s: &[Sample]| {
        value(
            s,
            "rosterd_deliveries_total",
            &[
                ("connector", "metricshook"),
                ("tenant", TENANT),
                ("outcome", "delivered"),
            ],
        )
        .unwrap_or(0.0)
            >= 1.0
            && value(s, "rosterd_connector_lag_events", &conn) == Some(0.0)
    };
    let (text, samples) = scrape_until(&d, delivered).await;
    assert!(delivered(&samples), "{text}");
    assert_eq!(
        value(&samples, "rosterd_connector_paused", &conn),
        Some(0.0)
    );
    assert!(value(&samples, "rosterd_connector_lag_seconds", &conn).is_some());
    assert_eq!(
        value(&samples, "rosterd_connector_dead_letters", &conn),
        Some(0.0)
    );
}

#[tokio::test]
async fn metrics_need_no_token_and_are_idempotent_across_daemons() {
    // A second daemon in the same process shares the recorder.
    let a = TestDaemon::start().await;
    let b = TestDaemon::start().await;
    scrape(&a).await;
    // b sees a's scrape: one recorder for the process.
    let (text, sb) = scrape(&b).await;
    let version = format!("rosterd_build_info{{version=\"{}\"}} 1", rosterd::VERSION);
    assert!(text.lines().any(|l| l == version), "{text}");
    at_least(&sb, "rosterd_store_size_bytes", &[], 1.0);
    at_least(
        &sb,
        "rosterd_http_requests_total",
        &[("route", "/metrics"), ("method", "GET"), ("status", "200")],
        1.0,
    );
}

#[tokio::test]
async fn metrics_show_the_review_queue_the_bundle_and_finished_jobs() {
    let d = TestDaemon::start().await;
    let r = d
        .post(
            "/Users",
            serde_json::json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": "doubtful@acme.test",
                "title": "zzqx blorp",
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let tenant = [("tenant", TENANT)];
    // The start-up reclassification is a job; its end is counted.
    let (text, samples) = scrape_until(&d, |s| {
        value(s, "rosterd_review_queue_users", &tenant).is_some_and(|v| v >= 1.0)
            && value(
                s,
                "rosterd_jobs_total",
                &[
                    ("tenant", TENANT),
                    ("kind", "reclassify"),
                    ("trigger", "bundle_change"),
                    ("status", "succeeded"),
                ],
            )
            .is_some_and(|v| v >= 1.0)
    })
    .await;
    at_least(&samples, "rosterd_review_queue_users", &tenant, 1.0);
    // The roster's size, as /status counts it.
    let status = d.status().await;
    let counts = &status["tenants"][TENANT];
    let users = |active: &str| {
        value(
            &samples,
            "rosterd_users",
            &[("tenant", TENANT), ("active", active)],
        )
    };
    assert_eq!(users("true"), counts["active_users"].as_f64(), "{text}");
    assert_eq!(users("true"), Some(1.0), "{text}");
    assert_eq!(users("false"), Some(0.0), "{text}");
    assert_eq!(
        value(&samples, "rosterd_groups", &tenant),
        Some(0.0),
        "{text}"
    );
    at_least(
        &samples,
        "rosterd_jobs_total",
        &[
            ("tenant", TENANT),
            ("kind", "reclassify"),
            ("trigger", "bundle_change"),
            ("status", "succeeded"),
        ],
        1.0,
    );
    at_least(&samples, "rosterd_bundle_archetypes", &tenant, 2.0);
    assert_eq!(
        value(&samples, "rosterd_bundle_reload_failed", &tenant),
        Some(0.0),
        "{text}"
    );
}

/// Removed, a connector is not loaded at once, not a minute later when its gauges go idle.
#[tokio::test]
async fn a_removed_connector_reads_not_loaded() {
    let hook = WebhookServer::start(WebhookOptions::default()).await;
    let (file_name, text) = named_webhook_file("removedhook", &hook, "[]");
    let d = TestDaemon::start_with(Options {
        connectors: vec![(file_name.clone(), text.clone())],
        env: vec![("HOOK_SECRET".into(), hook.secret.clone())],
        ..Options::default()
    })
    .await;
    let conn = [("connector", "removedhook"), ("tenant", TENANT)];
    let loaded =
        |v: f64| move |s: &[Sample]| value(s, "rosterd_connector_loaded", &conn) == Some(v);
    let (text_m, samples) = scrape_until(&d, loaded(1.0)).await;
    assert!(loaded(1.0)(&samples), "{text_m}");
    let counters = |s: &[Sample]| {
        [
            "rosterd_deliveries_total",
            "rosterd_delivery_retries_total",
            "rosterd_dead_letters_total",
            "rosterd_connector_changes_lost_total",
        ]
        .map(|name| value(s, name, &conn))
    };
    assert_eq!(counters(&samples), [Some(0.0); 4], "{text_m}");
    let path = d.root.join("connectors").join(&file_name);
    std::fs::remove_file(&path).unwrap();
    d.reload().await;
    let (text_m, samples) = scrape_until(&d, loaded(0.0)).await;
    assert!(loaded(0.0)(&samples), "{text_m}");
    // Its counters leave at once: they would otherwise stand until a restart.
    assert_eq!(counters(&samples), [None; 4], "{text_m}");
    // Back, it counts on.
    std::fs::write(&path, text).unwrap();
    d.reload().await;
    let (text_m, samples) = scrape_until(&d, loaded(1.0)).await;
    assert_eq!(counters(&samples), [Some(0.0); 4], "{text_m}");
}

#[tokio::test]
async fn a_connector_whose_file_broke_shows_as_not_loaded_with_its_lag_growing() {
    let hook = WebhookServer::start(WebhookOptions::default()).await;
    let (file_name, text) = named_webhook_file("brokenhook", &hook, r#"["roster.user_created"]"#);
    let d = TestDaemon::start_with(Options {
        connectors: vec![(file_name, text.clone())],
        env: vec![("HOOK_SECRET".into(), hook.secret.clone())],
        ..Options::default()
    })
    .await;
    d.create_user("first.broken@acme.test").await;
    let conn = [("connector", "brokenhook"), ("tenant", TENANT)];
    let (text_m, samples) = scrape_until(&d, |s| {
        value(s, "rosterd_connector_lag_events", &conn) == Some(0.0)
    })
    .await;
    assert_eq!(
        value(&samples, "rosterd_connector_loaded", &conn),
        Some(1.0),
        "{text_m}"
    );
    let file = d.root.join("connectors/brokenhook.toml");
    std::fs::write(&file, text.replace("url =", "urll =")).unwrap();
    // Broken on a reload, it would keep running on its old config: a start with the
    // broken file is what leaves it not loaded.
    let d = d.restart().await;
    for i in 0..3 {
        d.create_user(&format!("broken{i}@acme.test")).await;
    }
    let path = file.display().to_string();
    let failed = [("file", path.as_str())];
    let ready = |s: &[Sample]| {
        value(s, "rosterd_connector_lag_events", &conn).is_some_and(|v| v >= 3.0)
            && value(s, "rosterd_connector_load_failed", &failed) == Some(1.0)
    };
    let (text_m, samples) = scrape_until(&d, ready).await;
    assert!(ready(&samples), "{text_m}");
    assert_eq!(
        value(&samples, "rosterd_connector_loaded", &conn),
        Some(0.0),
        "{text_m}"
    );
    at_least(&samples, "rosterd_connector_errors", &[], 1.0);
    // Fixed: loaded again, caught up, and the file no longer reported.
    std::fs::write(&file, text).unwrap();
    d.reload().await;
    let ready = |s: &[Sample]| {
        value(s, "rosterd_connector_loaded", &conn) == Some(1.0)
            && value(s, "rosterd_connector_lag_events", &conn) == Some(0.0)
            && value(s, "rosterd_connector_load_failed", &failed) == Some(0.0)
    };
    let (text_m, samples) = scrape_until(&d, ready).await;
    assert!(ready(&samples), "{text_m}");
}

/// The README's alert, `rosterd_connector_errors > 0`, fires for a connector that is not
/// started as it does for a file that does not load, and /status says why.
#[tokio::test]
async fn a_connector_that_cannot_start_counts_as_a_connector_error() {
    let hook = WebhookServer::start(WebhookOptions::default()).await;
    // HOOK_SECRET is not in the daemon's environment.
    let d = TestDaemon::start_with(Options {
        connectors: vec![named_webhook_file(
            "nostarthook",
            &hook,
            r#"["roster.user_created"]"#,
        )],
        ..Options::default()
    })
    .await;
    let file = d.root.join("connectors/nostarthook.toml");
    let c = crate::mirror::connector(&d, "nostarthook").await;
    assert!(
        c["state"].as_str().unwrap().starts_with("not started"),
        "{c}"
    );
    // `rosterd status` shows when, as for any other error.
    assert!(c["last_error_at"].is_string(), "{c}");
    let s = d.status().await;
    let errors = s["connector_errors"].to_string();
    assert!(
        errors.contains("nostarthook.toml") && errors.contains("HOOK_SECRET"),
        "{s}"
    );
    let path = file.display().to_string();
    let failed = [("file", path.as_str())];
    let ready = |s: &[Sample]| value(s, "rosterd_connector_load_failed", &failed) == Some(1.0);
    let (text, samples) = scrape_until(&d, ready).await;
    assert!(ready(&samples), "{text}");
    at_least(&samples, "rosterd_connector_errors", &[], 1.0);
    // It delivers nothing, so it does not count as loaded.
    let conn = [("connector", "nostarthook"), ("tenant", TENANT)];
    assert_eq!(
        value(&samples, "rosterd_connector_loaded", &conn),
        Some(0.0),
        "{text}"
    );

    // A reload adding a file whose secret is not set: the same.
    let (late_name, late_text) = named_webhook_file("latehook", &hook, "[]");
    let late = d.root.join("connectors").join(late_name);
    std::fs::write(&late, late_text.replace("HOOK_SECRET", "LATE_SECRET")).unwrap();
    d.reload().await;
    let errors = d.status().await["connector_errors"].to_string();
    assert!(
        errors.contains("latehook.toml") && errors.contains("LATE_SECRET"),
        "{errors}"
    );
    let late_path = late.display().to_string();
    let late_failed = [("file", late_path.as_str())];
    let ready = |s: &[Sample]| value(s, "rosterd_connector_load_failed", &late_failed) == Some(1.0);
    let (text, samples) = scrape_until(&d, ready).await;
    assert!(ready(&samples), "{text}");
    // Removed: no longer an error.
    std::fs::remove_file(&late).unwrap();
    d.reload().await;
    let errors = d.status().await["connector_errors"].to_string();
    assert!(!errors.contains("latehook"), "{errors}");
    let ready = |s: &[Sample]| value(s, "rosterd_connector_load_failed", &late_failed) == Some(0.0);
    let (text, samples) = scrape_until(&d, ready).await;
    assert!(ready(&samples), "{text}");
}

/// Labelled like the gauges, and there from the connector's start: `rate()` and
/// `increase()` over a series that appears at its first increment miss that increment.
#[tokio::test]
async fn connector_counters_carry_the_tenant_and_start_at_zero() {
    let hook = WebhookServer::start(WebhookOptions::default()).await;
    let d = TestDaemon::start_with(Options {
        connectors: vec![
            named_webhook_file("zerohook", &hook, r#"["roster.user_created"]"#),
            (
                "zerocsv.toml".into(),
                format!(
                    "kind = \"csv\"\nname = \"zerocsv\"\ntenant = \"{TENANT}\"\n[csv]\ndir = \"zero-out\"\ndebounce_ms = 50\n"
                ),
            ),
        ],
        env: vec![("HOOK_SECRET".into(), hook.secret.clone())],
        ..Options::default()
    })
    .await;
    let (text, samples) = scrape(&d).await;
    for connector in ["zerohook", "zerocsv"] {
        let labels = [("connector", connector), ("tenant", TENANT)];
        let delivered = [
            ("connector", connector),
            ("tenant", TENANT),
            ("outcome", "delivered"),
        ];
        for (name, want) in [
            ("rosterd_deliveries_total", &delivered[..]),
            ("rosterd_delivery_retries_total", &labels[..]),
            ("rosterd_dead_letters_total", &labels[..]),
        ] {
            assert_eq!(
                value(&samples, name, want),
                Some(0.0),
                "{name}{want:?}\n{text}"
            );
        }
    }
    assert_eq!(
        value(
            &samples,
            "rosterd_connector_changes_lost_total",
            &[("connector", "zerohook"), ("tenant", TENANT)]
        ),
        Some(0.0),
        "{text}"
    );
    // A CSV write is a delivery in the metric as in `rosterd status`.
    d.create_user("counted@acme.test").await;
    let delivered = |s: &[Sample], connector: &str| {
        value(
            s,
            "rosterd_deliveries_total",
            &[
                ("connector", connector),
                ("tenant", TENANT),
                ("outcome", "delivered"),
            ],
        )
        .unwrap_or(0.0)
    };
    let ready = |s: &[Sample]| delivered(s, "zerohook") >= 1.0 && delivered(s, "zerocsv") >= 1.0;
    let (text, samples) = scrape_until(&d, ready).await;
    assert!(ready(&samples), "{text}");
    let csv = crate::mirror::connector(&d, "zerocsv").await;
    assert!(csv["delivered"].as_u64().unwrap() >= 1, "{csv}");
}

/// The `export` schedule's writes of a CSV connector count as its deliveries, and a write
/// that fails shows in its `last_error`, its retries and the schedule's runs: an export
/// run only by the schedule read `delivered 0` for good, and one failing every night
/// moved nothing but `last_run`.
#[tokio::test]
async fn a_scheduled_export_counts_its_writes_and_shows_its_failures() {
    let d = TestDaemon::start_with(Options {
        connectors: vec![(
            "nightout.toml".into(),
            format!(
                "kind = \"csv\"\nname = \"nightout\"\ntenant = \"{TENANT}\"\n[csv]\ndir = \"nightout-out\"\ndebounce_ms = 50\n"
            ),
        )],
        config_extra: "[schedules]\nexport = \"* * * * * *\"\n".into(),
        ..Options::default()
    })
    .await;
    d.create_user("ada@acme.test").await;
    let connector = |status: &serde_json::Value| {
        status["connectors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "nightout")
            .cloned()
            .unwrap_or_else(|| panic!("{status}"))
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let first = loop {
        let c = connector(&d.status().await);
        if c["delivered"].as_u64().unwrap_or(0) >= 1 {
            break c["delivered"].as_u64().unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "{c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // No change comes meanwhile: only the schedule writes.
    loop {
        let c = connector(&d.status().await);
        if c["delivered"].as_u64().unwrap_or(0) >= first + 2 {
            assert!(c["last_success_at"].is_string(), "{c}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the schedule's writes were not counted: {c}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed = |samples: &[Sample]| {
        value(
            samples,
            "rosterd_schedule_runs_total",
            &[("schedule", "export"), ("result", "failed")],
        )
        .unwrap_or(0.0)
    };
    let (_, before) = scrape(&d).await;
    let failed_before = failed(&before);
    let retries_before = value(
        &before,
        "rosterd_delivery_retries_total",
        &[("connector", "nightout"), ("tenant", TENANT)],
    )
    .unwrap_or(0.0);
    // The directory turns into a file: every write fails.
    let dir = d.root.join("connectors/nightout-out");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, "not a directory").unwrap();
    let c = loop {
        let c = connector(&d.status().await);
        if c["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("nightout-out"))
        {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failed write was not shown: {c}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(c["last_error_at"].is_string(), "{c}");
    let (text, after) = scrape_until(&d, |s| failed(s) > failed_before).await;
    assert!(failed(&after) > failed_before, "{text}");
    at_least(
        &after,
        "rosterd_delivery_retries_total",
        &[("connector", "nightout"), ("tenant", TENANT)],
        retries_before + 1.0,
    );
}

/// A /Bulk request answers 200 whatever its operations met: each operation counts on its
/// own, by its resource, method and status, so an alert on 4xx or 5xx sees them.
#[tokio::test]
async fn each_bulk_operation_counts_with_its_own_status() {
    let d = TestDaemon::start().await;
    let scim = "rosterd_scim_operations_total";
    let deletes = [
        ("tenant", TENANT),
        ("resource", "Groups"),
        ("op", "delete"),
        ("status_class", "4xx"),
    ];
    let bulks = [
        ("tenant", TENANT),
        ("resource", "Bulk"),
        ("op", "bulk"),
        ("status_class", "2xx"),
    ];
    // An operation that names no resource type or no write has labels of its own: as
    // `resource="Bulk"` it read as a /Bulk request that failed. (Whether anything else
    // moved cannot be told here: the counters are the whole test binary's.)
    let invalid = [
        ("tenant", TENANT),
        ("resource", "other"),
        ("op", "invalid"),
        ("status_class", "4xx"),
    ];
    let (_, before) = scrape(&d).await;
    let was = |want: &[(&str, &str)]| value(&before, scim, want).unwrap_or(0.0);
    let (deletes_before, bulks_before) = (was(&deletes), was(&bulks));
    let invalid_before = was(&invalid);
    let missing = uuid::Uuid::new_v4();
    let r = d
        .bulk(serde_json::json!([
            {"method": "DELETE", "path": format!("/Groups/{missing}")},
            {"method": "DELETE", "path": format!("/Groups/{missing}")},
            {"method": "FETCH", "path": "/Schemas/x"},
            {"method": "GET", "path": format!("/Users/{missing}")},
        ]))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["Operations"][0]["status"], "404", "{}", r.body);
    let (text, after) = scrape(&d).await;
    let now = |want: &[(&str, &str)]| value(&after, scim, want).unwrap_or(0.0);
    assert!(now(&deletes) >= deletes_before + 2.0, "{text}");
    assert!(now(&bulks) >= bulks_before + 1.0, "{text}");
    assert!(now(&invalid) >= invalid_before + 1.0, "{text}");
    let users_invalid = [
        ("tenant", TENANT),
        ("resource", "Users"),
        ("op", "invalid"),
        ("status_class", "4xx"),
    ];
    assert!(now(&users_invalid) >= 1.0, "a GET in a /Bulk: {text}");
}
