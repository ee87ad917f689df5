//! `/metrics`: Prometheus text exposition of the process's counters, gauges and
//! histograms, through the `metrics` facade and a process-global Prometheus recorder.
//!
//! Like `/status` it needs no authentication and carries nothing that identifies a
//! person: every label value comes from a bounded set (route templates, never raw paths;
//! configured tenants and connectors; standard methods and status codes).
//!
//! Metrics recorded here (the HTTP middleware calls [`record_request`]):
//! - `rosterd_http_requests_total{route,method,status}`
//! - `rosterd_http_request_duration_seconds{route,method}` (histogram)
//! - `rosterd_scim_operations_total{tenant,resource,op,status_class}`
//! - gauges set at scrape time: `rosterd_connector_lag_events`, `rosterd_connector_lag_seconds`,
//!   `rosterd_connector_paused`, `rosterd_connector_dead_letters`,
//!   `rosterd_connector_loaded` (all `{connector,tenant}`, also for connectors whose file
//!   did not load; 0 for those and for connectors that could not start),
//!   `rosterd_connector_errors`, `rosterd_connector_load_failed{file}`
//!   (both for files that do not load and for connectors that cannot start) and
//!   `rosterd_changelog_last_seq{tenant}`, `rosterd_users{tenant,active}`,
//!   `rosterd_groups{tenant}`; per tenant with a bundle,
//!   `rosterd_review_queue_users`, `rosterd_bundle_archetypes` and
//!   `rosterd_bundle_reload_failed` (1 while a failed reload's error stands);
//!   `rosterd_reload_failed{part}` for the SCIM tokens and the Roster API keys;
//!   `rosterd_config_file_error` (1 while a restart would fail: config.toml on disk would
//!   not load, or a key file or bundle that failed to reload would be refused at start),
//!   `rosterd_store_size_bytes`, `rosterd_build_info{version}` (1),
//!   `rosterd_started_after_unclean_stop` (1 when the run before this one was killed or
//!   crashed).
//!
//! Elsewhere: `rosterd_store_flush_seconds` (store flusher); `rosterd_deliveries_total`
//! (with `outcome`), `rosterd_delivery_retries_total`, `rosterd_dead_letters_total` and
//! `rosterd_connector_changes_lost_total` (dispatch, through the functions below, all
//! `{connector,tenant}` and registered at 0 when a connector starts);
//! `rosterd_jobs_total{tenant,kind,trigger,status}` (schedule: each job that ended; server: those a stop interrupted).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::server::AppState;

pub const HTTP_REQUESTS_TOTAL: &str = "rosterd_http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "rosterd_http_request_duration_seconds";
pub const SCIM_OPERATIONS_TOTAL: &str = "rosterd_scim_operations_total";
pub const SCIM_UNRESOLVED_MANAGERS_TOTAL: &str = "rosterd_scim_unresolved_managers_total";
pub const STORE_FLUSH_SECONDS: &str = "rosterd_store_flush_seconds";
pub const CONNECTOR_LAG_EVENTS: &str = "rosterd_connector_lag_events";
pub const CONNECTOR_LAG_SECONDS: &str = "rosterd_connector_lag_seconds";
pub const CONNECTOR_PAUSED: &str = "rosterd_connector_paused";
pub const CONNECTOR_DEAD_LETTERS: &str = "rosterd_connector_dead_letters";
pub const CONNECTOR_LOADED: &str = "rosterd_connector_loaded";
pub const CONNECTOR_ERRORS: &str = "rosterd_connector_errors";
pub const CONNECTOR_LOAD_FAILED: &str = "rosterd_connector_load_failed";
pub const CONNECTOR_CHANGES_LOST: &str = "rosterd_connector_changes_lost_total";
pub const DELIVERIES_TOTAL: &str = "rosterd_deliveries_total";
pub const DELIVERY_RETRIES_TOTAL: &str = "rosterd_delivery_retries_total";
pub const DEAD_LETTERS_TOTAL: &str = "rosterd_dead_letters_total";
pub const CHANGELOG_LAST_SEQ: &str = "rosterd_changelog_last_seq";
pub const REVIEW_QUEUE_USERS: &str = "rosterd_review_queue_users";
pub const USERS: &str = "rosterd_users";
pub const GROUPS: &str = "rosterd_groups";
pub const BUNDLE_ARCHETYPES: &str = "rosterd_bundle_archetypes";
pub const BUNDLE_RELOAD_FAILED: &str = "rosterd_bundle_reload_failed";
pub const JOBS_TOTAL: &str = "rosterd_jobs_total";
pub const STORE_FAILED: &str = "rosterd_store_failed";
pub const RELOAD_FAILED: &str = "rosterd_reload_failed";
pub const CONFIG_FILE_ERROR: &str = "rosterd_config_file_error";
pub const BUILD_INFO: &str = "rosterd_build_info";
pub const STORE_SIZE_BYTES: &str = "rosterd_store_size_bytes";
pub const UNCLEAN_STOP: &str = "rosterd_started_after_unclean_stop";
pub const PANICS_TOTAL: &str = "rosterd_panics_total";
pub const SCHEDULE_LAST_RUN: &str = "rosterd_schedule_last_run_timestamp_seconds";
pub const SCHEDULE_RUNS: &str = "rosterd_schedule_runs_total";
pub const BACKUP_LAST_SUCCESS: &str = "rosterd_backup_last_success_timestamp_seconds";
pub const BACKUP_SIZE: &str = "rosterd_backup_size_bytes";
pub const BACKUPS_TOTAL: &str = "rosterd_backups_total";

/// The `route` label of requests no route matched (the fallback).
pub const UNMATCHED_ROUTE: &str = "unmatched";
/// The `tenant` label of SCIM requests naming a tenant that is not configured: whatever a
/// client puts in the path must not become a label value. Not a valid tenant id, so it
/// cannot collide with one.
pub const UNKNOWN_TENANT: &str = "(unknown)";

/// The content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Request latencies: 250 µs to 30 s.
const HTTP_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];
/// Group-commit flushes (an fsync): 100 µs to 5 s.
const FLUSH_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Gauges not set for this long leave the exposition. Every gauge is set at each scrape
/// (just before rendering), so only those of a connector whose file was removed go
/// stale, and they must not report a frozen lag forever.
const GAUGE_IDLE: Duration = Duration::from_secs(60);
/// How often histogram samples are folded into their buckets between scrapes, so that
/// they do not pile up in memory when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the process-global Prometheus recorder, once; later calls return the same
/// handle. `None` when it could not be installed (another recorder was installed first):
/// metrics are then not collected and `/metrics` answers 503. Never panics.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE.get_or_init(install_once).as_ref()
}

fn install_once() -> Option<PrometheusHandle> {
    let builder = PrometheusBuilder::new()
        .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(GAUGE_IDLE))
        .set_buckets_for_metric(
            Matcher::Full(HTTP_REQUEST_DURATION_SECONDS.to_owned()),
            HTTP_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(STORE_FLUSH_SECONDS.to_owned()), FLUSH_BUCKETS)
        });
    let handle = match builder.and_then(PrometheusBuilder::install_recorder) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot install the Prometheus recorder; /metrics is unavailable.");
            return None;
        }
    };
    describe();
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        // Scrapes still run upkeep themselves.
        tracing::warn!(error = %e, "Cannot start the metrics upkeep thread.");
    }
    Some(handle)
}

fn describe() {
    metrics::describe_counter!(HTTP_REQUESTS_TOTAL, "HTTP requests answered.");
    metrics::describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        "Time to answer an HTTP request (until the response head), in seconds."
    );
    metrics::describe_counter!(
        SCIM_OPERATIONS_TOTAL,
        "SCIM operations by tenant, resource, operation and status class."
    );
    metrics::describe_counter!(
        SCIM_UNRESOLVED_MANAGERS_TOTAL,
        "SCIM writes of a user whose new manager.value names no user (kept, shown as no manager)."
    );
    metrics::describe_histogram!(
        STORE_FLUSH_SECONDS,
        "Duration of a group-commit flush of the store, in seconds."
    );
    metrics::describe_counter!(
        DELIVERIES_TOTAL,
        "Requests a connector's target acknowledged, and CSV connectors' writes."
    );
    metrics::describe_counter!(
        DELIVERY_RETRIES_TOTAL,
        "Connector delivery attempts (and CSV writes) that failed and are retried."
    );
    metrics::describe_counter!(
        DEAD_LETTERS_TOTAL,
        "Changes a connector gave up on (dead-lettered)."
    );
    metrics::describe_gauge!(
        CONNECTOR_LAG_EVENTS,
        "Changes durable in the changelog but not yet delivered by the connector."
    );
    metrics::describe_gauge!(
        CONNECTOR_LAG_SECONDS,
        "Age of the oldest change the connector has not delivered, in seconds."
    );
    metrics::describe_gauge!(CONNECTOR_PAUSED, "1 when the connector is paused, else 0.");
    metrics::describe_gauge!(
        CONNECTOR_DEAD_LETTERS,
        "Dead letters currently held for the connector."
    );
    metrics::describe_gauge!(
        CONNECTOR_LOADED,
        "1 when the connector's file is loaded, 0 when its file exists but did not load (it is not delivering; its lag still counts)."
    );
    metrics::describe_gauge!(
        CONNECTOR_ERRORS,
        "Connector files that did not load, and connectors that could not start (a secret not set), at the last start or reload (as /status connector_errors)."
    );
    metrics::describe_gauge!(
        CONNECTOR_LOAD_FAILED,
        "1 while this connector file does not load or its connector cannot start; 0 once, after it was fixed or removed."
    );
    metrics::describe_counter!(
        CONNECTOR_CHANGES_LOST,
        "Changes compacted away before a webhook connector delivered them (their events cannot be rebuilt)."
    );
    metrics::describe_gauge!(
        CHANGELOG_LAST_SEQ,
        "Sequence number of the tenant's last durable change."
    );
    metrics::describe_gauge!(
        USERS,
        "Users in the tenant's roster, active or not (`active`)."
    );
    metrics::describe_gauge!(GROUPS, "Groups in the tenant's roster.");
    metrics::describe_gauge!(
        REVIEW_QUEUE_USERS,
        "Users whose automatic archetype is under the review threshold."
    );
    metrics::describe_gauge!(
        BUNDLE_ARCHETYPES,
        "Archetypes in the tenant's bundle in force."
    );
    metrics::describe_gauge!(
        BUNDLE_RELOAD_FAILED,
        "1 while the last reload of the tenant's bundle failed (the previous one serves; /status says whether a restart would load the file), else 0."
    );
    metrics::describe_counter!(
        PANICS_TOTAL,
        "Panics (bugs) since the start: each stopped a request (answered 500), a job (failed) or a task (restarted); the log's \"rosterd panicked\" lines say where."
    );
    // Present at 0, so that an alert on increase() sees the first one.
    metrics::counter!(PANICS_TOTAL).increment(0);
    metrics::describe_gauge!(
        RELOAD_FAILED,
        "1 while the last reload did not apply the `part` (scim_tokens: the tenants' token_env and token_hashes; api_keys: the Roster API's public_keys and jwks_file), so the previous ones stay in force (/status says why, and whether a restart would fail on them, which rosterd_config_file_error counts), else 0."
    );
    metrics::describe_gauge!(
        BUILD_INFO,
        "1, labelled with the running rosterd's version: a deploy shows as the label changing."
    );
    metrics::describe_gauge!(
        STORE_SIZE_BYTES,
        "Bytes the store takes on disk (as /status's store.size_bytes): its growth, against the filesystem's free space, is what a full disk is foreseen by."
    );
    metrics::describe_gauge!(
        UNCLEAN_STOP,
        "1 when this run started after one that did not stop cleanly (killed, crashed, or its machine went down; /status's unclean_stop says which run), else 0."
    );
    metrics::describe_gauge!(
        CONFIG_FILE_ERROR,
        "1 while the next start or restart would fail, else 0: config.toml, as it is on disk now, does not load (/status shows config_file_error), or a file it names did not load at the last reload and a start would refuse it too (the Roster API's key files, under /status reload_errors.api_keys, or a tenant's bundle, its bundle.reload_error; each error ends saying so), or the last reload found config.toml naming something else a start refuses (/status restart_refusals: a connectors directory that cannot be read, an [api.jwt] or a tenant added since the start whose keys or bundle do not load)."
    );
    metrics::describe_gauge!(
        STORE_FAILED,
        "1 once the store hit an unrecoverable storage error (e.g. a full disk) and refuses writes until rosterd restarts, else 0."
    );
    metrics::describe_counter!(
        SCHEDULE_RUNS,
        "Scheduled runs, one per tenant's part (one per run for the backup schedule), by `result`: done, failed (the part failed: a CSV connector's files not written, say) or skipped (its tenant ran a job). A reconcile part is done once its job started; the job's outcome is rosterd_jobs_total."
    );
    metrics::describe_gauge!(
        SCHEDULE_LAST_RUN,
        "When the schedule last ran (Unix time; kept across restarts); absent until its first run."
    );
    metrics::describe_gauge!(
        BACKUP_LAST_SUCCESS,
        "When the newest whole backup of the store was written (Unix time; found in the backup directory at start); absent until there is one."
    );
    metrics::describe_gauge!(
        BACKUP_SIZE,
        "The size of the last backup written since the start."
    );
    metrics::describe_counter!(
        BACKUPS_TOTAL,
        "Backups of the store attempted since the start, by result (written, failed)."
    );
    metrics::describe_counter!(
        JOBS_TOTAL,
        "Reclassify and reconcile jobs finished, by outcome."
    );
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/metrics", get(scrape))
}

async fn scrape(State(st): State<Arc<AppState>>) -> Response {
    let Some(handle) = install() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "error": "metrics_unavailable",
                "message": "another metrics recorder was installed in this process; Prometheus metrics are not collected",
            })),
        )
            .into_response();
    };
    // Connector status reads cursors and the changelog from the store.
    let rendered = tokio::task::spawn_blocking(move || {
        // The recorder is the process's: a daemon's gauges set and rendered without
        // another's (tests run several daemons in one process) set in between.
        static SCRAPING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = SCRAPING.lock().unwrap_or_else(|e| e.into_inner());
        let known = set_gauges(&st);
        handle.run_upkeep();
        without_retired(&handle.render(), &known)
    })
    .await;
    match rendered {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "Cannot render /metrics.");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": "internal", "message": e.to_string()})),
            )
                .into_response()
        }
    }
}

/// A SCIM write gave a user a `manager.value` that names no user.
pub fn unresolved_manager(tenant: &str) {
    metrics::counter!(SCIM_UNRESOLVED_MANAGERS_TOTAL, "tenant" => tenant.to_owned()).increment(1);
}

/// A connector's counters, at 0 until something happens: a series that appears only at
/// its first increment makes `rate()` and `increase()` blind to that first one, and
/// alerts on them silent until then. Called when a connector starts; a restart of the
/// connector (a reload) keeps the counts.
pub fn register_connector_counters(tenant: &str, connector: &str, webhook: bool) {
    let labels = connector_labels(tenant, connector);
    metrics::counter!(DELIVERIES_TOTAL, &delivered_labels(tenant, connector)).increment(0);
    metrics::counter!(DELIVERY_RETRIES_TOTAL, &labels).increment(0);
    metrics::counter!(DEAD_LETTERS_TOTAL, &labels).increment(0);
    if webhook {
        metrics::counter!(CONNECTOR_CHANGES_LOST, &labels).increment(0);
    }
}

/// The counters of failures an alert watches with `increase()`, at 0 from the start, for
/// the same reason as [`register_connector_counters`]: a nightly export failing once after
/// a deploy, a job failing, the first burst of SCIM 5xx (an audit's full disk: a series
/// born at 228) alerted on nothing. Successes need no such help: their series are the
/// denominators, and a rate of zero failures is what they show.
pub fn register_failure_counters(config: &crate::config::Config) {
    let s = &config.schedules;
    for (schedule, set) in [
        ("reconcile", &s.reconcile),
        ("export", &s.export),
        ("compact", &s.compact),
        ("backup", &s.backup),
    ] {
        if set.is_some() {
            metrics::counter!(SCHEDULE_RUNS, "schedule" => schedule, "result" => "failed")
                .increment(0);
        }
    }
    for t in &config.tenants {
        let tenant = t.id.clone();
        metrics::counter!(SCIM_UNRESOLVED_MANAGERS_TOTAL, "tenant" => tenant.clone()).increment(0);
        for (resource, op) in [
            ("Users", "create"),
            ("Users", "replace"),
            ("Users", "patch"),
            ("Users", "delete"),
            ("Groups", "create"),
            ("Groups", "replace"),
            ("Groups", "patch"),
            ("Groups", "delete"),
            ("Bulk", "bulk"),
        ] {
            metrics::counter!(
                SCIM_OPERATIONS_TOTAL,
                "tenant" => tenant.clone(),
                "resource" => resource,
                "op" => op,
                "status_class" => "5xx",
            )
            .increment(0);
        }
        for trigger in ["bundle_change", "scim_sync", "schedule"] {
            for status in ["failed", "interrupted"] {
                metrics::counter!(
                    JOBS_TOTAL,
                    "tenant" => tenant.clone(),
                    "kind" => crate::schedule::job_kind(trigger),
                    "trigger" => trigger,
                    "status" => status,
                )
                .increment(0);
            }
        }
    }
}

/// Labelled as the connector gauges are: names are unique, but the tenant is what an
/// alert routes on and what joins the counters to the gauges.
fn connector_labels(tenant: &str, connector: &str) -> [(&'static str, String); 2] {
    [
        ("connector", connector.to_owned()),
        ("tenant", tenant.to_owned()),
    ]
}

fn delivered_labels(tenant: &str, connector: &str) -> [(&'static str, String); 3] {
    [
        ("connector", connector.to_owned()),
        ("tenant", tenant.to_owned()),
        ("outcome", "delivered".to_owned()),
    ]
}

/// A connector whose file was removed: its gauges read "not loaded" and 0 until they go
/// idle and leave the exposition a minute later, rather than their last values (loaded,
/// not lagging) for that minute.
pub fn connector_removed(tenant: &str, connector: &str) {
    let gauges = ConnectorGauges {
        loaded: false,
        lag_events: 0,
        lag_seconds: 0.0,
        paused: false,
        dead_letters: 0,
    };
    gauges.set(connector.to_owned(), tenant.to_owned());
}

/// A request the target acknowledged, or a CSV connector's write.
pub fn delivered(tenant: &str, connector: &str) {
    metrics::counter!(DELIVERIES_TOTAL, &delivered_labels(tenant, connector)).increment(1);
}

/// A failed attempt that will be retried.
pub fn retried(tenant: &str, connector: &str) {
    metrics::counter!(DELIVERY_RETRIES_TOTAL, &connector_labels(tenant, connector)).increment(1);
}

pub fn dead_lettered(tenant: &str, connector: &str) {
    metrics::counter!(DEAD_LETTERS_TOTAL, &connector_labels(tenant, connector)).increment(1);
}

/// Changes a webhook connector can never send: compaction removed them first.
pub fn changes_lost(tenant: &str, connector: &str, n: u64) {
    metrics::counter!(CONNECTOR_CHANGES_LOST, &connector_labels(tenant, connector)).increment(n);
}

/// The per-connector gauges, for loaded connectors and for those whose file did not load.
struct ConnectorGauges {
    loaded: bool,
    lag_events: u64,
    lag_seconds: f64,
    paused: bool,
    dead_letters: u64,
}

impl ConnectorGauges {
    fn set(&self, connector: String, tenant: String) {
        let labels = [("connector", connector), ("tenant", tenant)];
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        metrics::gauge!(CONNECTOR_LOADED, &labels).set(flag(self.loaded));
        metrics::gauge!(CONNECTOR_LAG_EVENTS, &labels).set(self.lag_events as f64);
        metrics::gauge!(CONNECTOR_LAG_SECONDS, &labels).set(self.lag_seconds);
        metrics::gauge!(CONNECTOR_PAUSED, &labels).set(flag(self.paused));
        metrics::gauge!(CONNECTOR_DEAD_LETTERS, &labels).set(self.dead_letters as f64);
    }
}

/// The counters of each connector, by family name.
const CONNECTOR_COUNTERS: [&str; 4] = [
    DELIVERIES_TOTAL,
    DELIVERY_RETRIES_TOTAL,
    DEAD_LETTERS_TOTAL,
    CONNECTOR_CHANGES_LOST,
];

/// `text` without the counters of connectors outside `known` (by connector and tenant):
/// those whose file was removed, and so retired. The exporter cannot drop a counter, so
/// they stood at their last values until a restart, beside the live connectors. Kept in
/// the recorder, a connector whose file comes back counts on from them.
fn without_retired(text: &str, known: &BTreeSet<(String, String)>) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let retired = CONNECTOR_COUNTERS.iter().any(|family| {
            line.strip_prefix(family)
                .and_then(|rest| rest.strip_prefix('{'))
                .is_some_and(|labels| {
                    let labels = label_pairs(labels);
                    let get = |k: &str| labels.iter().find(|(key, _)| key == k).map(|(_, v)| v);
                    match (get("connector"), get("tenant")) {
                        (Some(c), Some(t)) => !known.contains(&(c.clone(), t.clone())),
                        _ => false,
                    }
                })
        });
        if !retired {
            out.push_str(line);
        }
    }
    out
}

/// The label pairs at the start of `s` (what follows a sample's `{`), unescaped as the
/// exposition format escapes them (`\\`, `\"`, `\n`), up to the closing `}`.
fn label_pairs(s: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => break,
                },
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        let Some(end) = end else { break };
        pairs.push((key.trim_start_matches(',').to_owned(), value));
        rest = &after[end..];
        if !rest.starts_with(',') {
            break;
        }
    }
    pairs
}

/// Gauges that describe state rather than events, read fresh at every scrape. Returns
/// the connectors this daemon knows, loaded or not, by name and tenant.
fn set_gauges(st: &AppState) -> BTreeSet<(String, String)> {
    let mut known = BTreeSet::new();
    metrics::gauge!(STORE_FAILED).set(if st.store.failure().is_some() {
        1.0
    } else {
        0.0
    });
    // Read at each scrape, as /status reads it: an edit nobody reloaded yet still stops
    // the next restart (systemd then gives up after its start limit).
    // Set at every scrape, as every gauge: the exporter drops one left unset for a
    // minute, and one set once at the start was gone from the second minute on.
    metrics::gauge!(BUILD_INFO, "version" => crate::VERSION).set(1.0);
    metrics::gauge!(UNCLEAN_STOP).set(if st.unclean_stop.is_some() { 1.0 } else { 0.0 });
    if let Ok(bytes) = st.store.size_on_disk() {
        metrics::gauge!(STORE_SIZE_BYTES).set(bytes as f64);
    }
    // The alert that a restart would fail: on config.toml, or on a file it names that the
    // last reload could not load and a start would refuse too (the Roster API's key files
    // or a bundle), each of which stopped the whole daemon, SCIM included, at a restart.
    let bundle_refused = st
        .roster
        .tenants
        .values()
        .any(|r| r.bundle_state().restart_refuses);
    metrics::gauge!(CONFIG_FILE_ERROR).set(
        if st.config.on_disk().error.is_some()
            || st.reload_errors.restart_fails()
            || bundle_refused
            || !st
                .restart_refusals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        {
            1.0
        } else {
            0.0
        },
    );
    let reload_errors = st.reload_errors.get();
    for part in crate::server::Reloadable::ALL {
        metrics::gauge!(RELOAD_FAILED, "part" => part.as_str()).set(
            if reload_errors.contains_key(&part) {
                1.0
            } else {
                0.0
            },
        );
    }
    {
        // A retired connector's dead letters stay in the store until discarded, and an
        // alert on this gauge is where they are looked for: removing the file took them
        // out of it. Before the connectors below, which set their own when one is back;
        // one whose last letter went reads 0 once, then goes idle.
        static RETIRED: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());
        let mut shown = RETIRED.lock().unwrap_or_else(|e| e.into_inner());
        let retired = st.dispatch.retired_status();
        let now: BTreeSet<(String, String)> = retired
            .iter()
            .map(|r| (r.name.clone(), r.tenant.clone()))
            .collect();
        for (connector, tenant) in shown.difference(&now) {
            let labels = [("connector", connector.clone()), ("tenant", tenant.clone())];
            metrics::gauge!(CONNECTOR_DEAD_LETTERS, &labels).set(0.0);
        }
        for r in retired {
            let labels = [("connector", r.name), ("tenant", r.tenant)];
            metrics::gauge!(CONNECTOR_DEAD_LETTERS, &labels).set(r.dead_letters as f64);
        }
        *shown = now;
    }
    for c in st.dispatch.status(None) {
        let gauges = ConnectorGauges {
            loaded: !c.not_started,
            lag_events: c.lag_events,
            lag_seconds: c.lag_seconds,
            paused: c.paused,
            dead_letters: c.dead_letters,
        };
        known.insert((c.name.clone(), c.tenant.clone()));
        gauges.set(c.name, c.tenant);
    }
    // A connector whose file broke keeps its lag growing in the gauges, so a lag alert
    // fires for the one that actually stopped.
    for c in st.dispatch.unloaded_status() {
        let gauges = ConnectorGauges {
            loaded: false,
            lag_events: c.lag_events,
            lag_seconds: c.lag_seconds,
            paused: false,
            dead_letters: c.dead_letters,
        };
        known.insert((c.name.clone(), c.tenant.clone()));
        gauges.set(c.name, c.tenant);
    }
    // As many as /status lists: a connector that cannot start is as much an error for
    // the README's `rosterd_connector_errors > 0` alert as a file that does not load.
    metrics::gauge!(CONNECTOR_ERRORS).set(st.dispatch.load_errors().len() as f64);
    let errors = st.dispatch.failing_files();
    {
        // Files reported failing at an earlier scrape: a fixed one reads 0 once, then
        // goes idle and leaves the exposition.
        static FAILING: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
        let mut failing = FAILING.lock().unwrap_or_else(|e| e.into_inner());
        let now: BTreeSet<String> = errors.into_iter().collect();
        for fixed in failing.difference(&now) {
            metrics::gauge!(CONNECTOR_LOAD_FAILED, "file" => fixed.clone()).set(0.0);
        }
        for f in &now {
            metrics::gauge!(CONNECTOR_LOAD_FAILED, "file" => f.clone()).set(1.0);
        }
        *failing = now;
    }
    let backup = st.backups.state();
    if let Some(at) = backup.last_success_at {
        metrics::gauge!(BACKUP_LAST_SUCCESS).set(at.timestamp_millis() as f64 / 1000.0);
    }
    if let Some(bytes) = backup.last_bytes {
        metrics::gauge!(BACKUP_SIZE).set(bytes as f64);
    }
    metrics::counter!(BACKUPS_TOTAL, "result" => "written").absolute(backup.written);
    metrics::counter!(BACKUPS_TOTAL, "result" => "failed").absolute(backup.failed);
    // `time() - rosterd_schedule_last_run_timestamp_seconds > …` catches a nightly
    // export or compaction that stopped running, which no job counter covers.
    for (schedule, at) in crate::schedule::last_runs(st) {
        let seconds = at.timestamp_millis() as f64 / 1000.0;
        metrics::gauge!(SCHEDULE_LAST_RUN, "schedule" => schedule).set(seconds);
    }
    for t in &st.config.tenants {
        let seq = *st.store.watch_durable(&t.id).borrow();
        metrics::gauge!(CHANGELOG_LAST_SEQ, "tenant" => t.id.clone()).set(seq as f64);
        // Counters the store keeps, as `/status` reads them: an alert on a roster that
        // suddenly shrinks (an IdP deprovisioning everyone) needs no scrape of `/status`.
        match super::status::RosterCounts::of(st, &t.id) {
            Ok(c) => {
                metrics::gauge!(USERS, "tenant" => t.id.clone(), "active" => "true")
                    .set(c.active as f64);
                metrics::gauge!(USERS, "tenant" => t.id.clone(), "active" => "false")
                    .set((c.users - c.active) as f64);
                metrics::gauge!(GROUPS, "tenant" => t.id.clone()).set(c.groups as f64);
            }
            Err(e) => {
                tracing::warn!(tenant = %t.id, error = %e, "Cannot read the roster's counts for /metrics.")
            }
        }
        let Some(roster) = st.roster.tenants.get(&t.id) else {
            continue;
        };
        if roster.policy().is_none() {
            continue;
        }
        // A counter the store keeps, not a walk: cheap at every scrape.
        match st.store.review_queue_len(&t.id) {
            Ok(n) => metrics::gauge!(REVIEW_QUEUE_USERS, "tenant" => t.id.clone()).set(n as f64),
            Err(e) => {
                tracing::warn!(tenant = %t.id, error = %e, "Cannot read the review queue's size for /metrics.")
            }
        }
        let bundle = roster.bundle_state();
        metrics::gauge!(BUNDLE_ARCHETYPES, "tenant" => t.id.clone()).set(bundle.archetypes as f64);
        metrics::gauge!(BUNDLE_RELOAD_FAILED, "tenant" => t.id.clone()).set(
            if bundle.reload_error.is_some() {
                1.0
            } else {
                0.0
            },
        );
    }
    known
}

/// A SCIM request's resource and operation, for `rosterd_scim_operations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScimOp {
    /// `Users`, `Groups`, `Bulk`, `.search` or `other` (discovery endpoints, `/Me`).
    pub resource: &'static str,
    /// `create`, `read`, `list`, `replace`, `patch`, `delete`, `search`, `bulk`, or
    /// `invalid` for a /Bulk operation whose method is none of its writes.
    pub op: &'static str,
}

impl ScimOp {
    /// One operation of a /Bulk request, by the resource type its path names (`None`: a
    /// path that names none) and its method, as the request it stands for is counted.
    /// One that names no resource type or no write is `other` or `invalid`: counted as
    /// `Bulk`, it read as a /Bulk request that failed, and `op="bulk"` on `Users` as an
    /// operation Users do not have.
    pub fn of_bulk_operation(kind: Option<crate::scim::ResourceKind>, method: &str) -> ScimOp {
        ScimOp {
            resource: kind.map_or("other", crate::scim::ResourceKind::endpoint),
            op: Method::from_bytes(method.as_bytes())
                .ok()
                .and_then(|m| write_op(&m))
                .unwrap_or("invalid"),
        }
    }
}

/// The `op` of a write: POST creates (in a collection), PUT replaces, PATCH patches,
/// DELETE deletes.
fn write_op(method: &Method) -> Option<&'static str> {
    match *method {
        Method::POST => Some("create"),
        Method::PUT => Some("replace"),
        Method::PATCH => Some("patch"),
        Method::DELETE => Some("delete"),
        _ => None,
    }
}

/// Classify a request by method and matched route template (`/scim/v2/{tenant}/Users/{id}`).
/// `None` when it is not a SCIM route, or the method is not an operation of that route
/// (those are answered 405 and counted only in `rosterd_http_requests_total`).
pub fn classify_scim(method: &Method, route: &str) -> Option<ScimOp> {
    let rest = route
        .strip_prefix("/scim/v2/{tenant}")
        .filter(|r| r.is_empty() || r.starts_with('/'))?;
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let op = |resource: &'static str, op: &'static str| Some(ScimOp { resource, op });
    let read = *method == Method::GET || *method == Method::HEAD;
    match segments.as_slice() {
        [res @ ("Users" | "Groups")] => {
            let resource = if *res == "Users" { "Users" } else { "Groups" };
            if read {
                op(resource, "list")
            } else if *method == Method::POST {
                op(resource, "create")
            } else {
                None
            }
        }
        [res @ ("Users" | "Groups"), ".search"] => {
            let resource = if *res == "Users" { "Users" } else { "Groups" };
            (*method == Method::POST).then_some(ScimOp {
                resource,
                op: "search",
            })
        }
        [res @ ("Users" | "Groups"), _id] => {
            let resource = if *res == "Users" { "Users" } else { "Groups" };
            match *method {
                // A resource is not created by a POST to itself.
                Method::POST => None,
                _ if read => op(resource, "read"),
                _ => write_op(method).and_then(|o| op(resource, o)),
            }
        }
        [".search"] => (*method == Method::POST).then_some(ScimOp {
            resource: ".search",
            op: "search",
        }),
        ["Bulk"] => (*method == Method::POST).then_some(ScimOp {
            resource: "Bulk",
            op: "bulk",
        }),
        // Discovery (ServiceProviderConfig, Schemas, ResourceTypes) and /Me.
        [_, ..] if read => op("other", "read"),
        [_, ..] => write_op(method).and_then(|o| op("other", o)),
        [] => None,
    }
}

/// The `method` label: standard methods as themselves, anything else `other` (a client
/// can send any token as a method).
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Record one answered request. `route` is the matched route template (`None`: no route
/// matched); `tenant` the SCIM tenant of the request if it is a configured one.
pub fn record_request(
    route: Option<&str>,
    method: &Method,
    status: StatusCode,
    elapsed: Duration,
    tenant: Option<&str>,
) {
    let route_label = route.unwrap_or(UNMATCHED_ROUTE);
    let method_l = method_label(method);
    metrics::counter!(
        HTTP_REQUESTS_TOTAL,
        "route" => route_label.to_owned(),
        "method" => method_l,
        "status" => status.as_u16().to_string(),
    )
    .increment(1);
    metrics::histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        "route" => route_label.to_owned(),
        "method" => method_l,
    )
    .record(elapsed.as_secs_f64());
    if let Some(op) = route.and_then(|r| classify_scim(method, r)) {
        record_scim_operation(tenant.unwrap_or(UNKNOWN_TENANT), op, status);
    }
}

/// Count one SCIM operation: a request's, or one of a /Bulk request's operations (which
/// the request's own 200 does not show).
pub fn record_scim_operation(tenant: &str, ScimOp { resource, op }: ScimOp, status: StatusCode) {
    metrics::counter!(
        SCIM_OPERATIONS_TOTAL,
        "tenant" => tenant.to_owned(),
        "resource" => resource,
        "op" => op,
        "status_class" => status_class(status),
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(method: Method, route: &str) -> Option<(&'static str, &'static str)> {
        classify_scim(&method, route).map(|o| (o.resource, o.op))
    }

    #[test]
    fn classifies_scim_operations() {
        let users = "/scim/v2/{tenant}/Users";
        let user = "/scim/v2/{tenant}/Users/{id}";
        assert_eq!(c(Method::POST, users), Some(("Users", "create")));
        assert_eq!(c(Method::GET, users), Some(("Users", "list")));
        assert_eq!(c(Method::GET, user), Some(("Users", "read")));
        assert_eq!(c(Method::HEAD, user), Some(("Users", "read")));
        assert_eq!(c(Method::PUT, user), Some(("Users", "replace")));
        assert_eq!(c(Method::PATCH, user), Some(("Users", "patch")));
        assert_eq!(c(Method::DELETE, user), Some(("Users", "delete")));
        assert_eq!(
            c(Method::POST, "/scim/v2/{tenant}/Users/.search"),
            Some(("Users", "search"))
        );
        assert_eq!(
            c(Method::POST, "/scim/v2/{tenant}/Groups"),
            Some(("Groups", "create"))
        );
        assert_eq!(
            c(Method::PATCH, "/scim/v2/{tenant}/Groups/{id}"),
            Some(("Groups", "patch"))
        );
        assert_eq!(
            c(Method::POST, "/scim/v2/{tenant}/Groups/.search"),
            Some(("Groups", "search"))
        );
        assert_eq!(
            c(Method::POST, "/scim/v2/{tenant}/.search"),
            Some((".search", "search"))
        );
        assert_eq!(
            c(Method::POST, "/scim/v2/{tenant}/Bulk"),
            Some(("Bulk", "bulk"))
        );
        // A /Bulk operation: by its resource type and method; one that names neither
        // is never counted as a /Bulk request.
        let b = |kind, method| {
            let o = ScimOp::of_bulk_operation(kind, method);
            (o.resource, o.op)
        };
        use crate::scim::ResourceKind::{Group, User};
        assert_eq!(b(Some(User), "PATCH"), ("Users", "patch"));
        assert_eq!(b(Some(Group), "DELETE"), ("Groups", "delete"));
        assert_eq!(b(Some(User), "GET"), ("Users", "invalid"));
        assert_eq!(b(None, "PUT"), ("other", "replace"));
        assert_eq!(b(None, ""), ("other", "invalid"));
        assert_eq!(
            c(Method::GET, "/scim/v2/{tenant}/ServiceProviderConfig"),
            Some(("other", "read"))
        );
        assert_eq!(
            c(Method::GET, "/scim/v2/{tenant}/Schemas/{id}"),
            Some(("other", "read"))
        );
        assert_eq!(
            c(Method::PATCH, "/scim/v2/{tenant}/Me"),
            Some(("other", "patch"))
        );
    }

    /// The failures an alert counts with increase() are there at 0 before the first:
    /// a series born at 1 is no increase to Prometheus.
    #[test]
    fn failure_counters_are_present_at_zero_from_the_start() {
        let config = crate::config::Config::parse(
            "version = 1\n[[tenants]]\nid = \"t1\"\ntoken_env = \"T1_TOKEN\"\n[schedules]\nexport = \"0 0 2 * * *\"\n",
            std::path::Path::new("/x/config.toml"),
        )
        .unwrap();
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || register_failure_counters(&config));
        let text = handle.render();
        for line in [
            "rosterd_schedule_runs_total{schedule=\"export\",result=\"failed\"} 0",
            "rosterd_scim_unresolved_managers_total{tenant=\"t1\"} 0",
            "rosterd_scim_operations_total{tenant=\"t1\",resource=\"Users\",op=\"create\",status_class=\"5xx\"} 0",
            "rosterd_scim_operations_total{tenant=\"t1\",resource=\"Bulk\",op=\"bulk\",status_class=\"5xx\"} 0",
            "rosterd_jobs_total{tenant=\"t1\",kind=\"reconcile\",trigger=\"schedule\",status=\"failed\"} 0",
            "rosterd_jobs_total{tenant=\"t1\",kind=\"reclassify\",trigger=\"bundle_change\",status=\"interrupted\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        // A schedule left out never runs, so it has nothing to fail.
        assert!(!text.contains("schedule=\"backup\""), "{text}");
    }

    #[test]
    fn methods_a_route_does_not_serve_are_not_operations() {
        assert_eq!(c(Method::DELETE, "/scim/v2/{tenant}/Users"), None);
        assert_eq!(c(Method::POST, "/scim/v2/{tenant}/Users/{id}"), None);
        assert_eq!(c(Method::GET, "/scim/v2/{tenant}/Bulk"), None);
        assert_eq!(c(Method::GET, "/scim/v2/{tenant}/.search"), None);
        assert_eq!(c(Method::OPTIONS, "/scim/v2/{tenant}/Users/{id}"), None);
        assert_eq!(c(Method::TRACE, "/scim/v2/{tenant}/Schemas"), None);
    }

    #[test]
    fn other_routes_are_not_scim() {
        assert_eq!(c(Method::GET, "/status"), None);
        assert_eq!(c(Method::GET, "/metrics"), None);
        assert_eq!(c(Method::GET, "/api/v1/roster/users"), None);
        assert_eq!(c(Method::GET, "/scim/v2/{tenant}"), None);
        assert_eq!(c(Method::GET, "/scim/v2/{tenant}x/Users"), None);
    }

    #[test]
    fn labels_are_bounded() {
        let odd = Method::from_bytes(b"X-ANYTHING").expect("token");
        assert_eq!(method_label(&odd), "other");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        assert_eq!(status_class(StatusCode::CREATED), "2xx");
        assert_eq!(status_class(StatusCode::NOT_FOUND), "4xx");
        assert_eq!(status_class(StatusCode::SERVICE_UNAVAILABLE), "5xx");
    }

    #[test]
    fn counters_of_retired_connectors_are_left_out() {
        let text = "# TYPE rosterd_deliveries_total counter\n\
            rosterd_deliveries_total{connector=\"sis\",tenant=\"acme\",outcome=\"delivered\"} 3\n\
            rosterd_deliveries_total{connector=\"gone\",tenant=\"acme\",outcome=\"delivered\"} 7\n\
            rosterd_dead_letters_total{connector=\"q\\\"x\\\\y\",tenant=\"acme\"} 1\n\
            rosterd_dead_letters_total{connector=\"sis\",tenant=\"other\"} 2\n\
            rosterd_connector_loaded{connector=\"gone\",tenant=\"acme\"} 0\n\
            rosterd_http_requests_total{route=\"x\"} 1\n";
        let known: BTreeSet<(String, String)> = [("sis", "acme"), ("q\"x\\y", "acme")]
            .into_iter()
            .map(|(c, t)| (c.to_owned(), t.to_owned()))
            .collect();
        let kept = without_retired(text, &known);
        let lines: Vec<&str> = kept.lines().collect();
        assert_eq!(
            lines,
            [
                "# TYPE rosterd_deliveries_total counter",
                "rosterd_deliveries_total{connector=\"sis\",tenant=\"acme\",outcome=\"delivered\"} 3",
                "rosterd_dead_letters_total{connector=\"q\\\"x\\\\y\",tenant=\"acme\"} 1",
                // Gauges go idle by themselves; other metrics have no connector.
                "rosterd_connector_loaded{connector=\"gone\",tenant=\"acme\"} 0",
                "rosterd_http_requests_total{route=\"x\"} 1",
            ]
        );
    }

    #[test]
    fn install_is_idempotent() {
        let a = install().map(|h| h as *const PrometheusHandle);
        let b = install().map(|h| h as *const PrometheusHandle);
        assert_eq!(a, b);
    }
}
